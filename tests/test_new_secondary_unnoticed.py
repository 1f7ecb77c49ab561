"""A new secondary process that starts within one heartbeat timeout of the old one's
death (issue 11). The primary never hears a loss (its heartbeat never went silent long
enough), its sockets reconnect to the new process by themselves, and it went on sending
ordinary checkpoints the new process never had a full sync for: without a disk, the new
SVM committed a partial memory, no copy of the PVM.

Real node processes (``LocalPair``). No silence is ever decided: the heartbeat's timeout
is 200 s (the tests check the primary's heartbeat declared no loss). The moment is named:
the primary's coordinator stops itself between two checkpoints (``primary.released``),
the secondary node is killed and a new one started meanwhile, then the coordinator goes on.

- The primary's half: its heartbeat hears the new process (another instance) before its
  coordinator goes on: the old secondary counts as lost at once, the primary goes
  unprotected and re-protects the new one after its HELLO (a full sync).
- The secondary's half: the primary's heartbeat stage is stopped too (it cannot hear the
  new process), so the coordinator sends the new secondary an ordinary checkpoint. The
  secondary refuses it (never applied), stops as stale; restarted (as its supervisor
  would), it is synced and the pair is protected again.
"""
from __future__ import annotations

import os
import re
import signal

import pytest

from conftest import wait_until

from pipeline.localpair import LocalPair, continue_stopped

pytestmark = pytest.mark.slow  # starts real node processes

STOP_AT = "primary.released:30:stop"     # a committed checkpoint, well after protection
TABLES = {
    "guest": {"backend": "sim", "page_count": 2048},
    "guest.workload": {"seed": 5, "input_rate_hz": 250.0, "pages_per_input": 8},
    # the primary waits for its epoch while the test restarts nodes: the test, not a
    # timeout, decides
    "checkpoint": {"max_interval_ms": 150, "min_interval_ms": 5, "epoch_timeout_ms": 600000},
    # no silence is ever decided (200 s): the primary only learns of the new process from
    # its heartbeat's instance (or not at all)
    "heartbeat": {"interval_ms": 2000, "miss_count": 100},
    # the primary's coordinator stays stopped while a whole node starts, longer than a lease
    "failover": {"witness": "none"},
}



def _pid(pair: LocalPair, role: str, stage: str) -> int:
    return int(pair.node(role).node_info()["stage_pids"][stage])


def _log_from(pair: LocalPair, role: str, offset: int) -> str:
    """The role's log from ``offset`` on (a restarted node appends to the same file)."""
    with open(os.path.join(pair.workdir, f"{role}.log"), "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def _log_size(pair: LocalPair, role: str) -> int:
    return os.path.getsize(os.path.join(pair.workdir, f"{role}.log"))


def _stopped_between_checkpoints(pair: LocalPair) -> None:
    pair.start(faults={"primary": STOP_AT})
    pair.wait_protected(timeout=300)
    wait_until(lambda: pair.stage_counter("heartbeat", "items_in", "primary") > 0,
               timeout=60, what="the primary hearing the secondary")
    pair.wait_fault_fired("primary", "primary.released", timeout=300,
                          what="the primary's coordinator stopping between two checkpoints")


def _protected_again(pair: LocalPair, new_log: int) -> None:
    """The primary re-protected the secondary started last (a full sync), no silence was
    decided, that secondary applied no ordinary checkpoint before its sync, and both
    memories are equal."""
    wait_until(lambda: pair.stage_counter("coordinator", "reprotections", "primary") >= 1,
               timeout=180, what="the primary re-protecting the new secondary")
    info = pair.prove_memory_equal(timeout=300)     # (after the re-protection's sync)
    assert info.get("memory_equal") is True, info
    assert pair.node("primary").node_info()["state"] == "protected"
    assert pair.stage_counter("coordinator", "secondaries_replaced", "primary") == 1
    assert pair.stage_counter("coordinator", "reprotections", "primary") == 1
    assert pair.stage_counter("heartbeat", "peer_lost", "primary") == 0   # no silence
    assert pair.stage_counter("coordinator", "losses_abandoned", "primary") == 0
    assert pair.stage_counter("coordinator", "unsynced_refused", "secondary") == 0
    log = _log_from(pair, "secondary", new_log)
    assert "event=unsynced_refused" not in log
    assert re.search(r"primary '[^']*' connected", log) and "event=applied" in log  # a sync
    assert "event=secondary_replaced" in pair.log_tail("primary", 1 << 24)
    pair.check_alive()


def test_the_primary_re_protects_a_new_secondary_it_hears_without_a_silence(tmp_path):
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"), log_level="info")
    try:
        _stopped_between_checkpoints(pair)
        pair.kill("secondary")
        new_log = _log_size(pair, "secondary")
        pair.start_node("secondary")
        wait_until(lambda: pair.stage_counter("heartbeat", "peer_new_instance",
                                              "primary") >= 1,
                   timeout=120, what="the primary's heartbeat hearing the new secondary")
        continue_stopped(_pid(pair, "primary", "coordinator"))
        _protected_again(pair, new_log)
    finally:
        pair.stop()
        pair.cleanup()


def test_a_new_secondary_refuses_a_checkpoint_it_had_no_full_sync_for(tmp_path):
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"), log_level="info")
    try:
        _stopped_between_checkpoints(pair)
        hb = _pid(pair, "primary", "heartbeat")
        os.kill(hb, signal.SIGSTOP)          # the primary cannot hear the new process
        try:
            pair.kill("secondary")
            second_log = _log_size(pair, "secondary")
            pair.start_node("secondary")
            pair.wait_info("state", "waiting", role="secondary", timeout=120)
            continue_stopped(_pid(pair, "primary", "coordinator"))
            # the next checkpoint (ordinary) goes to the new process: refused, it stops
            wait_until(lambda: "event=unsynced_refused" in _log_from(pair, "secondary",
                                                                     second_log),
                       timeout=120, what="the new secondary refusing an ordinary checkpoint")
            assert pair.wait_exit("secondary", timeout=120) != 0
            log = _log_from(pair, "secondary", second_log)
            assert "never received a full sync" in log and "StaleSecondary" in log, log[-3000:]
            # it never had a HELLO (no sync) and applied nothing, ever
            assert not re.search(r"primary '[^']*' connected", log), log[-3000:]
            assert "event=applied" not in log, log[-3000:]
            # restarted, as its supervisor would
            third_log = _log_size(pair, "secondary")
            pair.start_node("secondary")
        finally:
            os.kill(hb, signal.SIGCONT)
        _protected_again(pair, third_log)
    finally:
        pair.stop()
        pair.cleanup()
