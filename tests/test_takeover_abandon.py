"""A takeover attempt and a primary that turns out to be alive (issue 11: the 2% loss row's
false "peer lost", after which the secondary blocked ~7 s on the witness though the
primary's heartbeat was back, and the pair went through a timeout and a full re-sync).

Real node processes (``LocalPair``, the local witness). The false loss is caused for
real: the primary's heartbeat stage is stopped (SIGSTOP), so the secondary hears nothing
while the primary's coordinator holds its lease. The moment that matters is named: the
secondary's coordinator stops itself at ``takeover.guard`` (loss decided, the guard not
yet asked) or ``takeover.granted`` (the witness granted the role, the SVM not yet live),
and the test lets the primary's heartbeat come back there before it continues.
"""
from __future__ import annotations

import os
import signal

import pytest

from conftest import wait_until

from pipeline.localpair import LocalPair, continue_stopped, free_port_base

pytestmark = pytest.mark.slow  # starts real node processes

TABLES = {
    "guest": {"backend": "sim", "page_count": 2048},
    "guest.workload": {"seed": 5, "input_rate_hz": 250.0, "pages_per_input": 8},
    # the primary waits for the ACK of the epoch in flight while the secondary's
    # coordinator is stopped at the named point: the test, not a timeout, decides
    "checkpoint": {"max_interval_ms": 150, "min_interval_ms": 5, "epoch_timeout_ms": 600000},
}



def _pid(pair: LocalPair, role: str, stage: str) -> int:
    return int(pair.node(role).node_info()["stage_pids"][stage])


def _peer_silent_until(pair: LocalPair, deciding: str, point: str, what: str) -> None:
    """The other node's heartbeat stage is stopped (that node alive) until ``deciding``'s
    coordinator stopped itself at ``point`` having decided the peer is lost; the heartbeat
    comes back there, ``deciding``'s heartbeat hears it again, and its coordinator is
    continued. What it does then is the test's."""
    other = "secondary" if deciding == "primary" else "primary"
    wait_until(lambda: pair.stage_counter("heartbeat", "items_in", deciding) > 0,
               timeout=60, what=f"the {deciding} hearing the {other}")
    hb = _pid(pair, other, "heartbeat")
    os.kill(hb, signal.SIGSTOP)          # the other node alive, its heartbeat silent
    try:
        pair.wait_fault_fired(deciding, point, what=what)
    finally:
        os.kill(hb, signal.SIGCONT)
    wait_until(lambda: pair.stage_counter("heartbeat", "peer_back", deciding) >= 1,
               timeout=120, what=f"the {deciding}'s heartbeat hearing the {other} again")
    continue_stopped(_pid(pair, deciding, "coordinator"))


def test_a_primary_heard_again_before_the_grant_abandons_the_takeover(tmp_path):
    """The secondary declares the primary lost, then hears it again before the witness
    granted the role: the attempt is abandoned (counted, logged, named in the node info),
    the SVM stays the standby, and the pair goes on protected with no re-sync: the
    primary never lost its secondary, checkpoints go on, both memories equal."""
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"))
    try:
        pair.start(faults={"secondary": "takeover.guard:stop"})
        pair.wait_protected(timeout=300)
        _peer_silent_until(pair, "secondary", "takeover.guard",
                           "the secondary deciding to take over")
        wait_until(lambda: pair.stage_counter("coordinator", "takeovers_abandoned",
                                              "secondary") >= 1,
                   timeout=120, what="the takeover attempt abandoned")
        sec = pair.node("secondary").node_info()
        assert sec["role"] == "secondary" and "heartbeat is back" in sec["takeover_abandoned"]
        wait_until(lambda: "event=takeover_abandoned" in pair.log_tail("secondary", 1 << 24),
                   timeout=60, what="the abandoned attempt logged")
        for counter in ("takeovers", "takeovers_refused"):
            assert pair.stage_counter("coordinator", counter, "secondary") == 0, counter
        coord = pair.node("primary").stage("coordinator")
        done = coord.as_dict()["epochs_committed"]
        wait_until(lambda: coord.as_dict()["epochs_committed"] >= done + 10, timeout=180,
                   what="10 more checkpoints after the abandoned takeover")
        assert pair.node("primary").node_info()["state"] == "protected"
        assert pair.stage_counter("coordinator", "peer_lost", "primary") == 0
        assert pair.stage_counter("coordinator", "sync_restarts", "primary") == 0
        assert pair.stage_counter("coordinator", "takeovers_abandoned", "secondary") == 1
        assert pair.prove_memory_equal(timeout=180).get("memory_equal") is True
    finally:
        pair.stop()
        pair.cleanup()


def test_once_the_witness_granted_the_takeover_goes_through(tmp_path):
    """The primary's coordinator (its lease) and heartbeat stop; the witness grants the
    secondary the next generation once the lease lapsed. The primary's heartbeat comes
    back right then, before the SVM is live: the takeover goes through all the same (the
    grant is the commit point; abandoning after it could leave no active side), and the
    stale primary, continued, gives its role up and exits: never two active sides."""
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"))
    try:
        pair.start(faults={"secondary": "takeover.granted:stop"})
        pair.wait_protected(timeout=300)
        wait_until(lambda: pair.stage_counter("heartbeat", "items_in", "secondary") > 0,
                   timeout=60, what="the secondary hearing the primary")
        coord, hb = _pid(pair, "primary", "coordinator"), _pid(pair, "primary", "heartbeat")
        os.kill(coord, signal.SIGSTOP)       # no lease renewal, no checkpoints
        os.kill(hb, signal.SIGSTOP)          # no heartbeat
        try:
            pair.wait_fault_fired("secondary", "takeover.granted",
                                  what="the witness granting the secondary the role")
        finally:
            os.kill(hb, signal.SIGCONT)
        wait_until(lambda: pair.stage_counter("heartbeat", "peer_back", "secondary") >= 1,
                   timeout=120, what="the secondary's heartbeat hearing the primary again")
        continue_stopped(_pid(pair, "secondary", "coordinator"))
        info = pair.wait_info("role", "active", role="secondary", timeout=120)
        assert pair.stage_counter("coordinator", "takeovers", "secondary") == 1
        assert pair.stage_counter("coordinator", "takeovers_abandoned", "secondary") == 0
        os.kill(coord, signal.SIGCONT)
        pair.wait_exit("primary", timeout=120)    # the stale primary gave its role up
        log = pair.log_tail("primary", 1 << 24)
        assert "RoleLost" in log or "lease" in log or "later generation" in log, log[-2000:]
        assert info["generation"] > 1
    finally:
        pair.stop()
        pair.cleanup()


def test_a_secondary_heard_again_before_the_primary_acted_keeps_the_pair_protected(tmp_path):
    """The same on the primary's side: its heartbeat declares the secondary lost (the
    secondary's heartbeat stage stopped: the secondary itself alive), the primary's
    coordinator stops at ``primary.peer_lost`` (decided, not yet unprotected), the
    secondary's heartbeat comes back there. The primary gives the loss up (counted,
    logged): it never went unprotected, no re-sync, the secondary never became stale,
    checkpoints go on and both memories are equal."""
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"))
    try:
        pair.start(faults={"primary": "primary.peer_lost:stop"})
        pair.wait_protected(timeout=300)
        _peer_silent_until(pair, "primary", "primary.peer_lost",
                           "the primary deciding its secondary is lost")
        wait_until(lambda: pair.stage_counter("coordinator", "losses_abandoned",
                                              "primary") >= 1,
                   timeout=120, what="the loss given up")
        assert "event=loss_abandoned" in pair.log_tail("primary", 1 << 24)
        coord = pair.node("primary").stage("coordinator")
        done = coord.as_dict()["epochs_committed"]
        wait_until(lambda: coord.as_dict()["epochs_committed"] >= done + 10, timeout=180,
                   what="10 more checkpoints after the abandoned loss")
        assert pair.node("primary").node_info()["state"] == "protected"
        for counter in ("peer_lost", "sync_restarts", "reprotections"):
            assert pair.stage_counter("coordinator", counter, "primary") == 0, counter
        assert pair.stage_counter("coordinator", "takeovers", "secondary") == 0
        assert pair.prove_memory_equal(timeout=180).get("memory_equal") is True
    finally:
        pair.stop()
        pair.cleanup()


def test_a_new_secondary_process_is_not_the_lost_one_heard_again(tmp_path):
    """The primary's heartbeat declares the secondary lost (its node killed) and the
    primary's coordinator stops at ``primary.peer_lost``; a new secondary node starts at
    the same address and its heartbeat is heard there. That is not the lost secondary
    back (another heartbeat instance): the primary goes unprotected and re-protects the
    new one after its HELLO, with a full sync of memory and of the replicated disk. Taken
    for the lost one (the fault matrix's partition rows), the new secondary was sent
    checkpoints it had no sync for, and its disk, which never got the disk sync's BEGIN,
    failed every commit ("seen only up to 0")."""
    disk = {"export_size": 8 << 20, "durable_commit": False,
            "forward": f"tcp://127.0.0.1:{free_port_base(1)}"}
    # no witness: the primary's coordinator is stopped while a whole node starts (seconds
    # on a loaded machine), longer than a lease; the test is about its decision
    pair = LocalPair({**TABLES, "failover": {"witness": "none"}},
                     workdir=str(tmp_path / "pair"), role_tables={
        r: {"disk": {**disk, "image": f"{{workdir}}/{r}.img",
                     "export": f"unix:{{workdir}}/{r}.nbd"}} for r in ("primary", "secondary")})
    try:
        pair.start(faults={"primary": "primary.peer_lost:stop"})
        pair.wait_protected(timeout=300)
        wait_until(lambda: pair.stage_counter("heartbeat", "items_in", "primary") > 0,
                   timeout=60, what="the primary hearing the secondary")
        pair.kill("secondary")
        pair.wait_fault_fired("primary", "primary.peer_lost",
                              what="the primary deciding its secondary is lost")
        pair.start_node("secondary")
        wait_until(lambda: pair.stage_counter("heartbeat", "peer_back", "primary") >= 1,
                   timeout=120, what="the primary's heartbeat hearing the new secondary")
        continue_stopped(_pid(pair, "primary", "coordinator"))
        wait_until(lambda: pair.stage_counter("coordinator", "reprotections", "primary") >= 1,
                   timeout=180, what="the primary re-protecting with the new secondary")
        pair.wait_protected(timeout=300)
        assert pair.stage_counter("coordinator", "losses_abandoned", "primary") == 0
        assert "comes from a new process" in pair.log_tail("primary", 1 << 24)
        coord = pair.node("primary").stage("coordinator")
        done = coord.as_dict()["epochs_committed"]
        wait_until(lambda: coord.as_dict()["epochs_committed"] >= done + 5, timeout=180,
                   what="5 checkpoints with the new secondary (its disk commits them)")
        assert pair.prove_memory_equal(timeout=180).get("memory_equal") is True
        pair.check_alive()
    finally:
        pair.stop()
        pair.cleanup()
