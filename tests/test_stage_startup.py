"""The coordinator starts only once every other stage of its node has started up.

A stage maps what it works on when it starts (rings, staging, guest memory; the restore
stage populates a cache of all of guest memory). A coordinator that started beside them
answered the primary's HELLO at once, and the full sync ran into a restore stage still
populating its cache: the sync's first page waited 1.2-1.5 s for it (512 MiB, a loaded
2-core machine), every page queued behind it, and the sync was timed with that startup
in it. Here the secondary's restore stage stops at the named point ``restore.started``
(cache populated, startup not yet reported): while it is stopped, the secondary's
supervisor has not forked its coordinator; continued, the pair comes up protected.
"""
from __future__ import annotations

import os
import re

import pytest

from pipeline import faults
from pipeline.localpair import LocalPair, continue_stopped, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _children(pid: int) -> dict[int, str]:
    """The child processes of ``pid``, with their names (/proc/PID/comm)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            for child in fh.read().split():
                try:
                    with open(f"/proc/{child}/comm") as fh2:
                        out[int(child)] = fh2.read().strip()
                except OSError:
                    pass
    return out


def test_the_coordinator_waits_for_the_restore_stage_to_start_up(tmp_path):
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": 4096},
        "guest.workload": {"seed": 3, "input_rate_hz": 50.0},
    }, workdir=str(tmp_path), log_level="info")
    with pair:
        pair.start(faults={"secondary": "restore.started:1:stop"})
        pair.wait_fault_fired("secondary", "restore.started", 1, timeout=300)
        line = next(ln for ln in pair.log_tail("secondary", 1 << 24).splitlines()
                    if faults.fired_line("restore.started", 1, "stop") in ln)
        restore = int(re.search(r"pid (\d+)", line).group(1))
        supervisor = pair.procs["secondary"].pid
        # every stage was forked before the wait, the coordinator is not: the restore
        # stage is a child, stopped at the point (or about to be), and no child is named
        # after the coordinator (stage_main names its process first thing)
        children = _children(supervisor)
        assert restore in children, children
        assert "colo-coordinato" not in children.values(), children
        assert "coordinator" not in pair.node("secondary").node_info().get("stage_pids", {})
        continue_stopped(restore)
        pair.wait_protected(timeout=300)
        wait_until(lambda: "colo-coordinato" in _children(supervisor).values(), 60,
                   "the secondary's coordinator process")
        assert "stages started up in" in pair.log_tail("secondary", 1 << 24)
        pair.check_alive()
