"""A checkpoint's control hops wait at the pause's priority (pipeline.pause_priority,
issue 13): the snapshot stage's wait for its command, the coordinators' waits for the
epoch's records, and the coordinators' ZeroMQ I/O threads, which carry BEGIN, SVM_DIRTY's
parts and the ACK. The pages channel's I/O threads (bulk encryption) stay at normal
priority. Checked on a running pair, by the scheduling policy of each thread."""
from __future__ import annotations

import os

import pytest
from conftest import wait_until

from pipeline.localpair import LocalPair

pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0,
                                 reason="SCHED_FIFO needs root or CAP_SYS_NICE")]


def _threads(pid: int) -> dict[int, str]:
    """Thread id -> thread name of process ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as fh:
            out[int(tid)] = fh.read().strip()
    return out


def _fifo(tid: int) -> bool:
    return os.sched_getscheduler(tid) == os.SCHED_FIFO


def _io_threads(pid: int) -> list[int]:
    return [t for t, name in _threads(pid).items() if name.startswith("ZMQbg/IO")]


def test_control_hops_wait_at_real_time_and_the_pages_channel_does_not(tmp_path):
    with LocalPair({
        "guest": {"backend": "sim", "page_count": 2048},
        "checkpoint": {"max_interval_ms": 50, "min_interval_ms": 0},
    }, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected(timeout=300)
        pair.wait_checkpoints(len(pair.checkpoints()) + 3, timeout=300)
        pids = {role: pair.node(role).node_info()["stage_pids"]
                for role in ("primary", "secondary")}
        for role in ("primary", "secondary"):
            io = _io_threads(pids[role]["coordinator"])
            assert io and all(_fifo(t) for t in io), (role, _threads(pids[role]["coordinator"]))
        # the pages channel's I/O threads encrypt every page: never at real time
        for role, stage in (("primary", "send"), ("secondary", "receive")):
            io = _io_threads(pids[role][stage])
            assert io and not any(_fifo(t) for t in io), (role, stage)
        # the snapshot stage sleeps at real time between commands (it drops to normal
        # priority for the digest hand-off after each resume, then waits again)
        snapshot = pids["primary"]["snapshot"]
        wait_until(lambda: _fifo(snapshot), 60, "the snapshot stage waits at SCHED_FIFO")
        # and the pair goes on committing checkpoints
        before = len(pair.checkpoints())
        cps = pair.wait_checkpoints(before + 3, timeout=300)
        assert all(cp["status"] == 0 for cp in cps[before:]), cps[before:]
