"""A checkpoint given up by the primary after its pause took the PVM's dirty pages off the
log, but before they reached the send stage: its pages go again with the next checkpoint
(issue 11/17: the Xen lab's full run on d71dac9, under load, gave epoch 10 up and every
proof after it was unequal; the survivor's guest found stale pages).

The primary's carry was the pages the send stage had seen for the torn epoch
(``pending``); the pages the snapshot stage had taken off the PVM's dirty log and not yet
dispatched were in neither the carry nor the log: the SVM never got them. The moment is
named, not hoped for: the snapshot stage stops itself at ``snapshot.dirty_read`` (the PVM
paused, its dirty log read and cleared, nothing copied); the secondary's heartbeat stage is
stopped until the primary's coordinator has declared it lost (``primary.peer_lost``: the
epoch is torn, its carry settled), then heard again, so the loss is abandoned and the pair
stays protected, as in the lab. A new checkpoint's BEGIN then tears the epoch on the
secondary too (rolled back), the snapshot stage goes on, and the full-memory proof must
hold. Real node processes (``LocalPair``), sim guests.
"""
from __future__ import annotations

import os
import signal

import pytest
from conftest import wait_until

from pipeline.localpair import LocalPair, continue_stopped
from pipeline.xen_io.sim import SimDomain

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]   # starts real node processes

WRITTEN = 300       # pages the guest writes before the torn checkpoint, never again after
#: pages the REF test fills with one byte value (SimDomain.fill_command): FILL_A in the
#: committed checkpoint before the torn one, FILL_B in the torn one, FILL_A again after
FILL_FIRST, FILL_PAGES, FILL_A, FILL_B = 1000, 32, 0x11, 0x22

TABLES = {
    "guest": {"backend": "sim", "page_count": 4096},
    # no input but the test's: the pages of the torn epoch are written once
    "guest.workload": {"seed": 11, "input_rate_hz": 0.0},
    # checkpoints only when the test asks; the epoch in flight waits for the test, not
    # for a timeout
    "checkpoint": {"max_interval_ms": 3_600_000, "min_interval_ms": 0,
                   "dirty_threshold_pages": 4096, "epoch_timeout_ms": 600_000},
}


def _fired(pair: LocalPair, role: str, point: str) -> bool:
    return f"COLO_FAULT fired: {point} pass" in pair.log_tail(role, 1 << 24)


def _pid(pair: LocalPair, role: str, stage: str) -> int:
    return int(pair.node(role).node_info()["stage_pids"][stage])


def _write(pair: LocalPair, pages: int) -> None:
    """Both guests write ``pages`` pages (the SVM runs the mirrored input too)."""
    _run(pair, SimDomain.write_command(pages), f"both guests wrote {pages} pages")


def _fill(pair: LocalPair, value: int) -> None:
    """Both guests fill the REF test's pages with ``value``."""
    _run(pair, SimDomain.fill_command(FILL_FIRST, FILL_PAGES, value),
         f"both guests filled {FILL_PAGES} pages with {value:#x}")


def _run(pair: LocalPair, command: bytes, what: str) -> None:
    seq = pair.stage_counter("client", "pvm_input_seq")
    pair.inject_input(command)
    wait_until(lambda: pair.stage_counter("client", "pvm_input_seq") > seq
               and pair.stage_counter("mirror", "svm_input_seq", role="secondary") > seq,
               120, what)


def _give_up_mid_pause(pair: LocalPair, fill: bool = False) -> int:
    """Protected pair, then a checkpoint of a few pages, then ``WRITTEN`` pages written and
    a checkpoint the primary gives up while the snapshot stage holds them off the dirty log
    (stopped at ``snapshot.dirty_read``): the secondary declared lost, then heard again (the
    loss given up, still protected). Returns the snapshot stage's pid, still stopped.
    ``fill``: the few pages' checkpoint also has the fill pages at FILL_A, the given-up
    one has them at FILL_B."""
    # pass 1 of snapshot.dirty_read is the first checkpoint (protection), pass 2 a small
    # one, pass 3 the one given up
    pair.start(faults={"primary": "snapshot.dirty_read:3:stop,primary.peer_lost:stop"})
    pair.wait_protected(timeout=300)
    coord = pair.node("primary").stage("coordinator")
    assert coord.as_dict()["epochs_aborted"] == 0
    # a committed checkpoint of a few pages first: the pages in flight when the next one is
    # given up are its (as in the lab), not the full sync's (all of memory)
    _write(pair, 8)
    if fill:
        _fill(pair, FILL_A)
    committed = coord.as_dict()["epochs_committed"]
    pair.request_checkpoint()
    wait_until(lambda: coord.as_dict()["epochs_committed"] > committed, 120,
               "a checkpoint of a few pages committed")
    _write(pair, WRITTEN)
    if fill:
        _fill(pair, FILL_B)
    pair.request_checkpoint()
    wait_until(lambda: _fired(pair, "primary", "snapshot.dirty_read"), 120,
               "the snapshot stage holding the checkpoint's pages, off the dirty log")
    snapshot = _pid(pair, "primary", "snapshot")
    # the secondary alive, its heartbeat silent: the primary gives the epoch up
    hb = _pid(pair, "secondary", "heartbeat")
    os.kill(hb, signal.SIGSTOP)
    try:
        wait_until(lambda: _fired(pair, "primary", "primary.peer_lost"), 120,
                   "the primary deciding its secondary is lost mid-epoch")
    finally:
        os.kill(hb, signal.SIGCONT)
    wait_until(lambda: pair.stage_counter("heartbeat", "peer_back") >= 1, 120,
               "the primary's heartbeat hearing the secondary again")
    continue_stopped(_pid(pair, "primary", "coordinator"))
    wait_until(lambda: pair.stage_counter("coordinator", "losses_abandoned") >= 1, 120,
               "the loss given up: still protected")
    assert coord.as_dict()["epochs_aborted"] == 1
    return snapshot


def _still_protected(pair: LocalPair) -> None:
    assert pair.node("primary").node_info()["state"] == "protected"
    for counter in ("peer_lost", "sync_restarts", "reprotections"):
        assert pair.stage_counter("coordinator", counter) == 0, counter
    assert pair.stage_counter("coordinator", "epochs_aborted") == 1


def test_pages_taken_off_the_dirty_log_of_a_checkpoint_given_up_go_with_the_next(tmp_path):
    """As in the lab: the secondary discards the given-up epoch (the next BEGIN came first).
    Before the fix: memory_equal False, 281 of the 300 pages differing."""
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"))
    try:
        snapshot = _give_up_mid_pause(pair)
        coord = pair.node("primary").stage("coordinator")
        # the next checkpoint's BEGIN tears the epoch on the secondary (the SVM rolled back)
        # while the snapshot stage still holds its pages
        sec_aborted = pair.stage_counter("coordinator", "epochs_aborted", role="secondary")
        committed = coord.as_dict()["epochs_committed"]
        pair.request_checkpoint()
        wait_until(lambda: pair.stage_counter("coordinator", "epochs_aborted",
                                              role="secondary") > sec_aborted, 120,
                   "the secondary discarding the torn epoch")
        continue_stopped(snapshot)
        wait_until(lambda: coord.as_dict()["epochs_committed"] > committed, 300,
                   "the next checkpoint committed")
        info = pair.prove_memory_equal(timeout=300)
        assert info["memory_equal"] is True, info
        _still_protected(pair)
        # the SVM ran the write too: the discarded epoch took its pages off the SVM's dirty
        # log (SVM_DIRTY) and rolled them back from the secondary's cache; nothing of them
        # needs carrying (only the PVM's side lost pages)
        torn = [r for r in pair.checkpoints("secondary") if r["status"] != 0]
        assert len(torn) == 1 and torn[0]["pages_svm_dirty"] >= WRITTEN, torn
        # the torn epoch's Snapshotted came during the next epoch: not taken for its own
        assert "event=stale_snapshot the snapshot stage's answer for epoch" in \
            pair.log_tail("primary", 1 << 24)
    finally:
        pair.stop()
        pair.cleanup()


def test_a_checkpoint_given_up_by_the_primary_and_applied_by_the_secondary(tmp_path):
    """The other ending: the snapshot stage goes on before any next BEGIN, so the secondary
    gets the given-up epoch whole and applies it (its ACK comes to a primary that gave the
    epoch up). The primary sends the epoch's pages again with the next checkpoint, which
    commits; both memories are equal."""
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"))
    try:
        snapshot = _give_up_mid_pause(pair)
        sec_committed = pair.stage_counter("coordinator", "epochs_committed", role="secondary")
        continue_stopped(snapshot)
        wait_until(lambda: pair.stage_counter("coordinator", "epochs_committed",
                                              role="secondary") > sec_committed, 120,
                   "the secondary applying the epoch the primary gave up")
        records = len(pair.checkpoints())   # (the given-up epoch's is the last)
        pair.request_checkpoint()
        cp = pair.wait_checkpoints(records + 1, timeout=300)[records]
        assert cp["status"] == 0 and cp["pages_dirty"] >= WRITTEN, cp   # sent again
        info = pair.prove_memory_equal(timeout=300)
        assert info["memory_equal"] is True, info
        _still_protected(pair)
    finally:
        pair.stop()
        pair.cleanup()


def test_a_page_back_at_its_committed_content_after_a_given_up_epoch_the_secondary_applied(
        tmp_path):
    """The second test's ending, and then pages go back to the content they had at the
    last checkpoint the primary saw committed. The secondary applied the given-up epoch, so
    it holds them as that epoch had them (FILL_B), not as the primary's REF table says
    (FILL_A): sent as REF, they were refused, the checkpoint torn, and every retry torn the
    same way until the pages changed (the pair stopped checkpointing; clients' packets
    waited). An epoch given up without an ACK now makes the primary forget the table: the
    pages go in full (here as SVM pages: the SVM wrote them alike) once."""
    pair = LocalPair(TABLES, workdir=str(tmp_path / "pair"))
    try:
        snapshot = _give_up_mid_pause(pair, fill=True)
        sec_committed = pair.stage_counter("coordinator", "epochs_committed", role="secondary")
        continue_stopped(snapshot)
        wait_until(lambda: pair.stage_counter("coordinator", "epochs_committed",
                                              role="secondary") > sec_committed, 120,
                   "the secondary applying the epoch the primary gave up")
        _fill(pair, FILL_A)          # back at the content of the last committed checkpoint
        records = len(pair.checkpoints())
        pair.request_checkpoint()
        cp = pair.wait_checkpoints(records + 1, timeout=300)[records]
        # on the old table: status aborted, pages_skipped_hash >= FILL_PAGES (the REFs), the
        # secondary's reason "a REF page does not match the committed copy"
        assert cp["status"] == 0 and cp["pages_dirty"] >= WRITTEN, cp
        assert cp["pages_skipped_hash"] == 0, cp
        info = pair.prove_memory_equal(timeout=300)
        assert info["memory_equal"] is True, info
        _still_protected(pair)
        assert "a REF page does not match" not in pair.log_tail("secondary", 1 << 24)
    finally:
        pair.stop()
        pair.cleanup()
