"""The snapshot stage's real-time scheduling inside the PVM pause (pipeline.pause_priority)."""
from __future__ import annotations

import os
import threading

import pytest

from pipeline.stages.common import StagePriority
from pipeline.stages.snapshot import PausePriority


def _policy() -> int:
    return os.sched_getscheduler(0)


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root or CAP_SYS_NICE")
@pytest.mark.root
def test_urgent_switches_to_fifo_and_back():
    before = _policy()
    p = PausePriority(True)
    try:
        p.urgent(True)
        assert _policy() == os.SCHED_FIFO and os.sched_getparam(0).sched_priority == 1
    finally:
        p.urgent(False)
    assert _policy() == before == os.SCHED_OTHER


def test_normal_priority_leaves_the_scheduler_alone():
    before = _policy()
    p = PausePriority(False)
    p.urgent(True)
    assert _policy() == before


def test_refused_real_time_falls_back_quietly(monkeypatch):
    """Where the host refuses real time (no CAP_SYS_NICE), the pause runs at normal priority."""
    calls = []

    def refuse(pid, policy, param):
        calls.append(policy)
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    p = PausePriority(True)
    p.urgent(True)
    p.urgent(True)
    p.urgent(False)
    assert calls == [os.SCHED_FIFO] and not p.allowed


class _Word:
    """A stand-in for SharedState.live (a multiprocessing Value) in this process."""

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root or CAP_SYS_NICE")
@pytest.mark.root
def test_a_data_stage_works_on_a_checkpoint_at_real_time_and_on_a_live_round_normally():
    """common.StagePriority: asleep and at work on a checkpoint's pages at SCHED_FIFO, on a
    live round's (full sync, pre-copy) and asleep while one is in flight at normal
    priority; the threads it follows (the pages channel's I/O thread) go along."""
    live = _Word(-1)
    p = StagePriority(True, live)
    done = threading.Event()
    tids = []
    helper = threading.Thread(target=lambda: (tids.append(threading.get_native_id()),
                                              done.wait(60)))
    helper.start()
    try:
        while not tids:
            done.wait(0.01)
        p.follow(tids)
        p.waiting()
        assert _policy() == os.SCHED_FIFO and os.sched_getscheduler(tids[0]) == os.SCHED_FIFO
        p.working(7)
        assert _policy() == os.SCHED_FIFO
        live.value = 8                      # a full sync, epoch 8, begins
        p.working(8)
        assert _policy() == os.SCHED_OTHER and os.sched_getscheduler(tids[0]) == os.SCHED_OTHER
        p.waiting()
        assert _policy() == os.SCHED_OTHER
        p.working(7)                        # a straggler of a checkpoint before it
        assert _policy() == os.SCHED_FIFO
        live.value = -1                     # the sync is over
        p.working(9)
        assert _policy() == os.SCHED_FIFO and os.sched_getscheduler(tids[0]) == os.SCHED_FIFO
        p.normal()
        assert _policy() == os.SCHED_OTHER and os.sched_getscheduler(tids[0]) == os.SCHED_OTHER
    finally:
        p.normal()
        done.set()
        helper.join()
    assert _policy() == os.SCHED_OTHER


def test_a_data_stage_at_normal_priority_leaves_the_scheduler_alone():
    p = StagePriority(False, _Word(-1))
    p.waiting()
    p.working(3)
    assert _policy() == os.SCHED_OTHER


def _guest_policy(dom) -> int:
    return os.sched_getscheduler(dom.guest_pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root or CAP_SYS_NICE")
@pytest.mark.root
def test_a_sim_guest_raised_after_its_answer_serves_its_requests_at_normal_priority(
        make_sim_domain):
    """Issue 15, the bimodal p99: a real-time pauser raised the guest after posting the
    pause request, so a guest running on the other core could answer first, still at
    normal priority, and the raise landed after its drop: the guest then served its
    clients at SCHED_FIFO until its next pause (seconds under COLO), above the stages that
    feed it and read its answers. Here that interleaving exactly: paused and answered at
    normal priority, then raised (the late raise), then resumed and fed one input."""
    dom = make_sim_domain(paused=False)
    dom.feed_input(b"before the pause")
    dom.wait_for_input_seq(dom.input_head)
    dom.pause()                            # (this test runs at normal priority: no raise)
    assert _guest_policy(dom) == os.SCHED_OTHER
    os.sched_setscheduler(dom.guest_pid, os.SCHED_FIFO, os.sched_param(1))   # the late raise
    dom.resume()
    dom.feed_input(b"after the pause")
    dom.wait_for_input_seq(dom.input_head)  # it ran: past its pause, into the request
    assert _guest_policy(dom) == os.SCHED_OTHER


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root or CAP_SYS_NICE")
@pytest.mark.root
def test_a_real_time_pauser_leaves_a_busy_sim_guest_at_normal_priority(make_sim_domain):
    """pause() from a SCHED_FIFO pauser (the snapshot stage, the secondary coordinator),
    the guest busy writing on the other core, many times: each time the guest is back at
    normal priority once it answered, and after the resume."""
    from pipeline.xen_io.sim import SimDomain
    dom = make_sim_domain(paused=False)
    p = PausePriority(True)
    try:
        for _ in range(20):
            dom.feed_input(SimDomain.write_command(200))     # keep the guest busy writing
            p.urgent(True)
            dom.pause()
            p.urgent(False)
            assert dom.is_paused and _guest_policy(dom) == os.SCHED_OTHER
            dom.resume()
            dom.feed_input(b"a request")
            dom.wait_for_input_seq(dom.input_head)
            assert _guest_policy(dom) == os.SCHED_OTHER
    finally:
        p.urgent(False)


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root or CAP_SYS_NICE")
@pytest.mark.root
@pytest.mark.timeout(900)
def test_the_pvms_pause_runs_at_the_hops_level_above_the_checkpoints_work(tmp_path):
    """Inside the PVM's pause the snapshot stage runs at SCHED_FIFO HOP, the coordinators'
    level, not at WORK where it waits for its command: at WORK the coordinators' SVM_DIRTY
    hops took both cores inside the pause (the prescan's read of an almost empty log took
    0.85-1.1 ms, not ~0.5). Stopped (SIGSTOP, a named fault point) after the pause's read
    of the log, its thread is at HOP; continued, the pair goes on committing and the stage
    waits for its next command at WORK."""
    import signal

    from conftest import wait_until

    from pipeline.localpair import LocalPair
    with LocalPair({
        "guest": {"backend": "sim", "page_count": 2048},
        # the stopped pause must outlast the checks: the epoch in flight waits
        "checkpoint": {"max_interval_ms": 50, "min_interval_ms": 0,
                       "epoch_timeout_ms": 600_000},
    }, workdir=str(tmp_path)) as pair:
        pair.start(faults={"primary": "snapshot.dirty_read:2:stop"})
        snapshot = None
        try:
            pair.wait_fault_fired("primary", "snapshot.dirty_read", 2, 300,
                                  "the snapshot stage stopped inside the PVM's pause")
            snapshot = pair.node("primary").node_info()["stage_pids"]["snapshot"]
            assert os.sched_getscheduler(snapshot) == os.SCHED_FIFO
            assert os.sched_getparam(snapshot).sched_priority == PausePriority.HOP
        finally:
            if snapshot is not None:
                os.kill(snapshot, signal.SIGCONT)
        before = len(pair.checkpoints())
        cps = pair.wait_checkpoints(before + 3, timeout=300)
        assert all(cp["status"] == 0 for cp in cps[before:]), cps[before:]
        wait_until(lambda: os.sched_getparam(snapshot).sched_priority == PausePriority.WORK,
                   60, "the snapshot stage waits for its command at WORK again")
