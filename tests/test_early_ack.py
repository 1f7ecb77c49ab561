"""Early ACK (issue 13): the secondary ACKs an epoch once it is checked whole, before its
pages are written into the SVM, and finishes writing them before the SVM runs or a
takeover goes on from it.

The restore stage is stopped (SIGSTOP) at ``restore.checked``: the epoch is checked and
ACKed, and not one of its pages is written. From there:

- the next epoch's pages arrive and must wait for the restore stage to be done with the
  staging rows they would reuse (a hand primary sends them without waiting for anything;
  the receive stage's work is done in the restore stage's process since session 19, so
  they wait in the pages channel until it wrote the epoch out of staging);
- the primary dies: the secondary must write the whole epoch before it goes live, so its
  memory is a replay of exactly the inputs it consumed.

Stopped at ``restore.written`` instead (the SVM's memory is the epoch's, the stage's cache
not yet), the SVM runs on before the epoch is applied.

The secondary dying in the same window (stale, re-synced) is the fault matrix's
``secondary@restore.pages_written`` row.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import wait_until
from test_failover import TABLES, _svm_serves_on, _wait_takeover_decision, replay_digest
from test_secondary_faults import (BATCH, PAGES, close_hand_pair, committed_pair, counters,
                                   hand_pvm)

from pipeline import wire
from pipeline.counters import STATUS_COMMITTED
from pipeline.localpair import LocalPair, continue_stopped

pytestmark = pytest.mark.slow  # starts real node processes


def _restore_pid(pair: LocalPair) -> int:
    return pair.node("secondary").node_info()["stage_pids"]["restore"]


def _secondary_stopped_at(tmp_path, point: str):
    """A secondary node alone (a hand primary drives it) whose restore stage stops
    (SIGSTOP) at ``point`` in the first checkpoint that is ACKed early, and the hand
    primary's PVM."""
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": PAGES},
        "pipeline": {"verify_workers": 2, "batch_pages": BATCH, "verify_pages": "full"},
        # long enough for the test's steps while the restore stage is stopped; the hand
        # primary sends no heartbeats (control silence counts interval + timeout)
        "checkpoint": {"epoch_timeout_ms": 60000, "max_interval_ms": 60000},
    }, workdir=str(tmp_path), log_level="info")
    # pass 1: the full sync; the first checkpoint asks for a digest (no early ACK); pass 2: E
    pair.start(roles=("secondary",), faults={"secondary": f"{point}:2:stop"})
    return pair, hand_pvm(pair)


def test_the_next_epoch_waits_until_the_acked_one_left_staging(tmp_path):
    """Epoch E is ACKed while the restore stage is stopped before writing it; the hand
    primary then sends all of E+1's pages at once (other pages, so staging rows E's pages
    are still in would get E+1's content). Once the restore stage goes on, both epochs
    are applied and the SVM's memory is the PVM's exactly. Placed in staging before the
    restore stage wrote E out of it, E+1 would overwrite E's rows and E be applied with the
    wrong content (the receive stage did so in a process of its own before the staging
    gate, issue 13; now the restore stage's process does its work and reads E+1's records
    only once it is done with E)."""
    pair, dom = _secondary_stopped_at(tmp_path, "restore.checked")
    prim = None
    try:
        prim, _ = committed_pair(pair, dom)
        first = prim.dirty_some(64)
        ack = prim.checkpoint(first, compress=False)
        # the ACK came while the restore stage is stopped before the first page write
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        assert pair.fault_fired("secondary", "restore.checked")
        assert counters(pair)["coordinator"]["acked_early"] >= 1
        second = prim.dirty_some(64)
        assert len(np.setdiff1d(first, second)), "E+1 must leave some of E's pages alone"
        e = prim.epoch
        prim.epoch += 1
        before = counters(pair)["receive"]["items_in"]
        prim.control.send(wire.encode_checkpoint_begin(e, 0, 0))
        msgs, _, _ = prim.records(e, second, compress=False)
        for m in msgs:
            prim.pages.send(m)
        continue_stopped(_restore_pid(pair))
        wire.decode_svm_dirty(prim.recv(wire.SVM_DIRTY, timeout=60), PAGES)
        prim.pages.send(wire.encode_epoch_end(e, len(second), len(msgs), 0,
                                              dom.get_vcpu_state()))
        ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
        assert ack.epoch == e and ack.status == wire.ACK_COMMITTED, ack
        assert prim.probe() == dom.memory_digest()
        assert counters(pair)["receive"]["items_in"] >= before + len(msgs) + 1
    finally:
        close_hand_pair(pair, dom, prim)


def test_the_svm_runs_on_once_its_memory_is_the_epoch_s_while_the_cache_takes_it(
        tmp_path):
    """The restore stage is stopped at ``restore.written``: the SVM's memory is epoch E's
    (its pages written, its SVM pages cached), E's pages not yet in the stage's cache. The
    SVM must run on from there (issue 15: it stayed paused until the cache had them too,
    4-7 ms past the primary's commit), and E is applied (Applied) only once the stage goes
    on: the next epoch is applied on top, and a proof checkpoint then finds the SVM's
    memory the PVM's."""
    pair, dom = _secondary_stopped_at(tmp_path, "restore.written")
    prim = None
    try:
        prim, _ = committed_pair(pair, dom)
        before = counters(pair)
        ack = prim.checkpoint(prim.dirty_some(64), compress=False)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        pair.wait_fault_fired("secondary", "restore.written", timeout=60,
                              what="the restore stage stopped once the SVM's memory was E's")
        wait_until(lambda: counters(pair)["coordinator"]["svm_resumes"]
                   > before["coordinator"]["svm_resumes"], timeout=60,
                   what="the SVM resumed while the restore stage's cache lacks E")
        assert counters(pair)["restore"]["epochs_applied"] == \
            before["restore"]["epochs_applied"], "E was applied with the stage stopped"
        continue_stopped(_restore_pid(pair))
        ack = prim.checkpoint(prim.dirty_some(64), compress=False)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        ack = prim.checkpoint(prim.dirty_some(40), wire.FLAG_DIGEST)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        assert ack.memory_digest == dom.memory_digest()
        assert counters(pair)["restore"]["epochs_applied"] == \
            before["restore"]["epochs_applied"] + 3
    finally:
        close_hand_pair(pair, dom, prim)


def test_the_primary_dying_after_the_ack_the_secondary_applies_it_all_then_goes_live(
        tmp_path):
    """The primary has epoch E's ACK (its outputs released) while the secondary has not
    written one page of E; then the primary's host dies. The secondary writes all of E and
    goes live from E: its memory is a replay of exactly the inputs it consumed (a
    half-applied E, or a takeover from E - 1 after the primary released E's outputs,
    could not be)."""
    pair = LocalPair(dict(TABLES, checkpoint=dict(TABLES["checkpoint"],
                                                  epoch_timeout_ms=60000)),
                     workdir=str(tmp_path / "pair"))
    try:
        # the 14th checked epoch is a checkpoint of a protected pair (sync, at most 8
        # pre-copy rounds, then checkpoints; none asks for a digest here)
        pair.start(faults={"secondary": "restore.checked:14:stop"})
        pair.wait_fault_fired("secondary", "restore.checked", timeout=180,
                              what="the restore stage stopped after checking an epoch")

        def last_committed(role: str) -> int:
            done = [cp["epoch"] for cp in pair.checkpoints(role)
                    if cp["status"] == STATUS_COMMITTED]
            return done[-1] if done else -1
        # the primary commits E on the early ACK; the secondary records E only once applied
        wait_until(lambda: last_committed("primary") > last_committed("secondary"),
                   timeout=120, what="the primary committing the epoch on its early ACK")
        acked = last_committed("primary")
        wait_until(lambda: pair.stage_counter("heartbeat", "items_in", "secondary") > 0,
                   timeout=60, what="the secondary hearing the primary's heartbeat")
        pair.kill("primary")
        # the secondary knows the primary is gone while E is still unwritten
        wait_until(lambda: pair.stage_counter("coordinator", "peer_lost", "secondary") > 0,
                   timeout=120, what="the secondary declaring the primary lost")
        assert last_committed("secondary") < acked
        assert pair.node("secondary").node_info().get("role") != "active"
        continue_stopped(_restore_pid(pair))
        info = _wait_takeover_decision(pair)
        assert info["role"] == "active", info
        assert info["active_since_epoch"] == acked == last_committed("secondary"), info
        _svm_serves_on(pair)
        digest, seq = pair.active_digest()
        assert seq > 0
        assert digest == replay_digest(seq), f"the SVM is not a replay of inputs 0..{seq - 1}"
    finally:
        pair.stop()
        pair.cleanup()
