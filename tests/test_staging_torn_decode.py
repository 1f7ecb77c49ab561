"""A torn epoch's batch that a verify worker decodes late must not land in the next epoch's
staging rows (issue 11).

Session 8's clean-clone CI run 7: after a re-protection's full sync the memory proof found
the SVM's memory unequal to the PVM's. The primary's epoch in flight when it heard the new
secondary was torn there, and its records (lz4 batches among them, ``pipeline.compress =
"auto"`` under load) went to the new secondary just before the sync's. Every epoch places
its pages from the top of the staging area; the receive stage waited only for the restore
stage to be done with the torn epoch's rows (it gave the epoch up at the next BEGIN), not
for the verify workers: one still decoding a batch of the torn epoch wrote it over rows
where the receive stage had already copied the next epoch's raw pages, and the SVM got
another page's content.

Here the moment is named: a real secondary node, driven by a hand primary
(tests/test_secondary_faults.py); the verify worker that gets epoch A's only batch (lz4)
stops before decoding it (``verify.decode:1:stop``). A is torn by the next BEGIN. Epoch B
sends raw pages, which the receive stage copies into the same staging rows itself; only
then (or once the receive stage waits for the verify workers) does the stopped worker go
on. B must commit with the SVM's memory equal to the PVM's.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import wait_until
from test_secondary_faults import BATCH, PAGES, HandPrimary, close_hand_pair, hand_pvm

from pipeline import wire
from pipeline.localpair import LocalPair, continue_stopped

pytestmark = pytest.mark.slow  # starts real node processes


def _stage(pair: LocalPair, name: str) -> dict:
    return pair.node("secondary").snapshot()["stages"][name]


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")


def test_a_torn_epochs_late_decode_does_not_overwrite_the_next_epochs_pages(tmp_path):
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": PAGES},
        # raw batches skip the verify workers (sample): the receive stage copies them into
        # staging itself, so only the torn epoch's lz4 batch goes through a verify worker
        "pipeline": {"verify_workers": 2, "batch_pages": BATCH, "verify_pages": "sample"},
        # the hand primary sends no heartbeats: no silence decided between the steps
        "checkpoint": {"epoch_timeout_ms": 600000, "max_interval_ms": 30000},
    }, workdir=str(tmp_path), log_level="info")
    pair.start(roles=("secondary",), faults={"secondary": "verify.decode:1:stop"})
    dom = hand_pvm(pair)
    prim = None
    try:
        prim = HandPrimary(pair, dom)
        prim.hello()
        # full sync and a first checkpoint, all raw: no verify worker decodes anything
        ack = prim.checkpoint(np.arange(PAGES, dtype=np.uint64), wire.FLAG_SYNC,
                              compress=False)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        ack = prim.checkpoint(prim.dirty_some(40), wire.FLAG_DIGEST, compress=False)
        assert ack.status == wire.ACK_COMMITTED and ack.memory_digest == dom.memory_digest()

        # the PVM's pages: A's compress well (one lz4 batch), B's do not (raw)
        pfns_a = np.arange(200, 200 + BATCH, dtype=np.uint64)
        pfns_b = np.arange(400, 400 + BATCH, dtype=np.uint64)
        dom.write_pages(pfns_a, np.repeat(np.arange(BATCH, dtype=np.uint8)[:, None] + 65,
                                          4096, axis=1))
        rng = np.random.default_rng(11)
        dom.write_pages(pfns_b, rng.integers(0, 256, (BATCH, 4096), dtype=np.uint8))

        # epoch A: its one batch (lz4) is staged at the top rows; a verify worker takes it
        # and stops before decoding it
        a = prim.epoch
        prim.epoch += 1
        prim.control.send(wire.encode_checkpoint_begin(a, 0, 0))
        wire.decode_svm_dirty(prim.recv(wire.SVM_DIRTY), PAGES)
        msgs, _, _ = prim.records(a, pfns_a, compress=True)
        assert len(msgs) == 1 and wire.decode_pages(msgs[0], PAGES, 4096, BATCH).packed
        prim.pages.send(msgs[0])
        prim.pages.send(wire.encode_epoch_end(a, BATCH, 1, 0, dom.get_vcpu_state()))
        pair.wait_fault_fired("secondary", "verify.decode", 1, 120,
                              "a verify worker stopping before it decodes epoch A's batch")
        pids = pair.node("secondary").node_info()["stage_pids"]
        verify_pids = [int(pids[f"verify.{i}"]) for i in range(2)]
        stopped = wait_until(lambda: next((p for p in verify_pids if _stopped(p)), None),
                             60, "the verify worker stopped at verify.decode")

        # epoch B tears A (a newer BEGIN): A is given up, its rows free for the restore stage
        b = prim.epoch
        prim.epoch += 1
        prim.control.send(wire.encode_checkpoint_begin(b, 0, 0))
        ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
        assert ack.epoch == a and ack.status == wire.ACK_ABORTED, ack
        wire.decode_svm_dirty(prim.recv(wire.SVM_DIRTY, timeout=60), PAGES)
        # B: A's pages again (A was torn) and B's, raw: B's first batch goes to the rows A's
        # batch was given
        pfns = np.concatenate((pfns_b, pfns_a))
        placed = _stage(pair, "receive")["items_out"]
        msgs, _, _ = prim.records(b, pfns, compress=False)
        assert not any(wire.decode_pages(m, PAGES, 4096, BATCH).packed for m in msgs)
        for m in msgs:
            prim.pages.send(m)
        # the receive stage copied B's pages into staging, or waits for the verify workers
        # to be done with A's batch first (issue 11's fix): either way, now the worker goes on
        wait_until(lambda: _stage(pair, "receive")["items_out"] >= placed + len(pfns)
                   or _stage(pair, "receive").get("verify_drain_waits", 0) >= 1, 60,
                   "epoch B's pages placed in staging (or waiting for the verify workers)")
        dropped = _stage(pair, "restore")["stale_records"]
        continue_stopped(stopped)
        # the worker decoded A's batch and passed it on; the restore stage drops it (A was
        # given up), and the receive stage has placed B's pages
        wait_until(lambda: _stage(pair, "restore")["stale_records"] > dropped, 60,
                   "epoch A's batch dropped by the restore stage")
        wait_until(lambda: _stage(pair, "receive")["items_out"] >= placed + len(pfns), 60,
                   "epoch B's pages placed in staging")
        prim.pages.send(wire.encode_epoch_end(b, len(pfns), len(msgs), 0,
                                              dom.get_vcpu_state()))
        ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
        assert ack.epoch == b and ack.status == wire.ACK_COMMITTED, ack
        # the SVM holds B's pages as the PVM has them, not A's decoded over them
        assert prim.probe() == dom.memory_digest(), \
            "the SVM's memory differs from the PVM's after epoch B"
    finally:
        close_hand_pair(pair, dom, prim)
