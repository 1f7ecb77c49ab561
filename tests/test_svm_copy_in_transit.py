"""The SVM's pages copied while the epoch is in transit (issue 15: the SVM's pause past the
primary's commit).

The secondary's restore stage copies the SVM's dirty pages (those not zero) into a side
buffer between BEGIN and the epoch's pages arriving, the SVM paused and the stage idle; the
epoch's SVM pages then go into the stage's cache from that copy after the SVM resumed,
instead of from the SVM inside its pause. The cache is the last committed checkpoint's
until the epoch is applied, whatever happened to the copy.

A hand primary (tests/test_secondary_faults.py) drives a real secondary node: it feeds both
guests the same inputs (the PVM itself, the SVM through the inputs channel) or the SVM
alone, and sends an epoch's pages only once the restore stage counted the copy (an event,
not a hope that the copy finished first). The cache is then read back through a rollback:
pages the SVM wrote on its own go back to the cache's content, and a proof checkpoint
compares the SVM's whole memory with the PVM's.
"""
from __future__ import annotations

import contextlib

import blake3
import numpy as np
import pytest
import zmq
from conftest import start_hand_secondary, wait_until
from test_secondary_faults import (BATCH, PAGES, HandPrimary, close_hand_pair,
                                   committed_pair, counters, hand_pvm)

from pipeline import sockets, wire
from pipeline.localpair import LocalPair
from pipeline.stages.common import zero_page_hash
from pipeline.xen_io.sim import SimDomain

pytestmark = pytest.mark.slow  # starts real node processes

SVM_PAGES = (100, 64, 0x5A)     # first, count, byte: pages both guests fill alike
ZERO_PAGES = (300, 16, 0)       # pages both guests fill with zeros (ZERO, never copied)


def _pair(tmp_path, verify: str = "full") -> LocalPair:
    # (long timeouts: the test steps between BEGIN and the epoch's pages wait for events)
    return start_hand_secondary(tmp_path, verify, epoch_timeout_ms=60000,
                                max_interval_ms=60000)


def _inputs(prim: HandPrimary):
    inputs = sockets.inputs_out(prim.nctx)
    assert inputs.poll(30_000, zmq.POLLOUT), "the secondary's inputs socket never connected"
    return inputs


@contextlib.contextmanager
def _hand_secondary(tmp_path, verify: str = "full"):
    """A real secondary node driven by a hand primary, with a committed first checkpoint:
    (the pair, the hand PVM, the hand primary, its inputs socket to the SVM); closed after."""
    pair = _pair(tmp_path, verify)
    dom = hand_pvm(pair)
    prim = None
    try:
        prim, _ = committed_pair(pair, dom)
        yield pair, dom, prim, _inputs(prim)
    finally:
        close_hand_pair(pair, dom, prim)


def _svm_runs(pair, inputs, epoch: int, seq: int, payload: bytes) -> None:
    """The SVM gets input ``seq`` (mirrored) and runs it."""
    inputs.send(wire.encode_input(epoch, seq, payload))
    wait_until(lambda: counters(pair)["mirror"]["svm_input_seq"] > seq, timeout=60,
               what=f"the SVM running input {seq}")


def _both_run(pair, dom, inputs, epoch: int, payload: bytes) -> None:
    """The PVM and the SVM run the same input; the PVM is paused again after it."""
    seq = dom.feed_input(payload)
    dom.resume()
    wait_until(lambda: dom.input_seq() > seq, timeout=30, what="the PVM running its input")
    dom.pause()
    _svm_runs(pair, inputs, epoch, seq, payload)


def _begin(pair, prim: HandPrimary, flags: int = 0) -> tuple[int, wire.SvmDirty]:
    """BEGIN of the next epoch; its SVM_DIRTY (one part: the test's sets are small), once the
    restore stage copied every page of it that is not zero (what the test waits for)."""
    copied = counters(pair)["restore"]["svm_copied_in_transit"]
    e = prim.epoch
    prim.epoch += 1
    prim.control.send(wire.encode_checkpoint_begin(e, 0, flags))
    svm = wire.decode_svm_dirty(prim.recv(wire.SVM_DIRTY), PAGES)
    assert not svm.more
    zero = np.frombuffer(zero_page_hash(4096), np.uint8)
    want = int((svm.hashes != zero).any(axis=1).sum())
    assert want >= SVM_PAGES[1], "the SVM's filled pages are not in its dirty set"
    wait_until(lambda: counters(pair)["restore"]["svm_copied_in_transit"] - copied >= want,
               timeout=60, what="the restore stage copying the SVM's pages in transit")
    assert counters(pair)["restore"]["svm_copied_in_transit"] - copied == want, \
        "the restore stage copied pages the SVM holds as zeros"
    return e, svm


def _send_epoch(prim: HandPrimary, dom, e: int, svm: wire.SvmDirty
                ) -> tuple[wire.Ack, int, int]:
    """The PVM's dirty pages as epoch ``e``: those the PVM has as the SVM does as SVM pages
    (the digest stage's rule: a zero page goes as ZERO), the rest with their content. The
    ACK, the number of SVM pages, and of ZERO pages the SVM holds as zeros."""
    dirty = dom.read_and_clear_dirty()
    pvm = np.empty((len(dirty), 4096), np.uint8)
    dom.read_pages(dirty, pvm)
    hashes = np.frombuffer(b"".join(blake3.blake3(p).digest() for p in pvm),
                           np.uint8).reshape(-1, 32)
    svm_hash = dict(zip(svm.pfns.tolist(), map(bytes, svm.hashes)))
    zero = zero_page_hash(4096)
    same = np.array([svm_hash.get(p) == bytes(h) != zero
                     for p, h in zip(dirty.tolist(), hashes)], bool)
    zero_held = sum(svm_hash.get(p) == bytes(h) == zero
                    for p, h in zip(dirty.tolist(), hashes))
    msgs, _, _ = prim.records(e, dirty[~same], compress=False)
    n = int(same.sum())
    for at in range(0, n, BATCH):      # (a record holds a batch at most)
        k = min(BATCH, n - at)
        msgs.append(wire.encode_pages(e, dirty[same][at:at + k], hashes[same][at:at + k],
                                      np.zeros(k, np.uint32),
                                      np.full(k, wire.ENC_SVM, np.uint8), b""))
    for m in msgs:
        prim.pages.send(m)
    prim.pages.send(wire.encode_epoch_end(e, len(dirty), len(msgs), 0, dom.get_vcpu_state()))
    ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
    if ack.status == wire.ACK_COMMITTED:
        prim.table.update(dirty, hashes)
    return ack, n, zero_held


def _commit_filled_epoch(pair, dom, prim: HandPrimary, inputs) -> tuple[dict, int, int]:
    """Both guests fill SVM_PAGES and ZERO_PAGES alike; the next epoch commits and is
    applied. The restore stage's counters before it, the number of SVM pages and of ZERO
    pages the SVM held as zeros."""
    before = counters(pair)["restore"]
    _both_run(pair, dom, inputs, prim.epoch, SimDomain.fill_command(*SVM_PAGES))
    _both_run(pair, dom, inputs, prim.epoch, SimDomain.fill_command(*ZERO_PAGES))
    e, svm = _begin(pair, prim)
    ack, n, held = _send_epoch(prim, dom, e, svm)
    assert (ack.epoch, ack.status) == (e, wire.ACK_COMMITTED), ack
    wait_until(lambda: counters(pair)["restore"]["epochs_applied"]
               > before["epochs_applied"], timeout=60, what="the epoch applied")
    return before, n, held


def test_the_svm_pages_reach_the_cache_from_the_copy_made_in_transit(tmp_path):
    """Both guests fill the same pages (and some with zeros); the epoch's pages are sent
    only once the restore stage copied the SVM's (not its zero pages): every SVM page then
    goes into the cache from that copy, none from the SVM in its pause. The SVM then
    rewrites those pages on its own: the next checkpoint puts them back from the cache, and
    the SVM's memory is the PVM's exactly (the cache had the epoch's SVM pages)."""
    with _hand_secondary(tmp_path) as (pair, dom, prim, inputs):
        before, n, _ = _commit_filled_epoch(pair, dom, prim, inputs)
        assert n >= SVM_PAGES[1]
        after = counters(pair)["restore"]
        assert after["pages_same_as_svm"] - before["pages_same_as_svm"] == n
        assert after["svm_cached_paused"] == before["svm_cached_paused"], \
            "SVM pages were copied from the SVM in its pause"
        # (every page checked: the ZERO pages are written, whatever the SVM held)
        assert after["zero_pages_held"] == before["zero_pages_held"]
        # the SVM alone rewrites the SVM pages: the next checkpoint brings none of them,
        # so they go back from the cache
        first, count, byte = SVM_PAGES
        _svm_runs(pair, inputs, prim.epoch, dom.input_head,
                  SimDomain.fill_command(first, count, byte ^ 0xFF))
        assert prim.probe() == dom.memory_digest()


def test_an_epoch_torn_after_the_copy_leaves_the_cache_the_last_checkpoint_s(tmp_path):
    """The SVM alone fills pages (the PVM does not); the restore stage copies them in
    transit; then the next BEGIN tears the epoch (the path a primary lost mid-epoch takes
    too: the coordinator's AbortCmd). The SVM is put back from the cache, which the copy
    never touched: a proof checkpoint right after finds the SVM's memory the PVM's, which
    never had those pages filled."""
    with _hand_secondary(tmp_path) as (pair, dom, prim, inputs):
        aborted = counters(pair)["restore"]["epochs_aborted"]
        _svm_runs(pair, inputs, prim.epoch, dom.input_head,
                  SimDomain.fill_command(*SVM_PAGES))
        e, _svm = _begin(pair, prim)
        # torn: the next epoch begins before any of e's pages came
        proof = prim.epoch
        prim.epoch += 1
        prim.control.send(wire.encode_checkpoint_begin(proof, 0, wire.FLAG_DIGEST))
        ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
        assert (ack.epoch, ack.status) == (e, wire.ACK_ABORTED), ack
        assert counters(pair)["restore"]["epochs_aborted"] == aborted + 1
        wire.decode_svm_dirty(prim.recv(wire.SVM_DIRTY), PAGES)
        prim.pages.send(wire.encode_epoch_end(proof, 0, 0, 0, dom.get_vcpu_state()))
        ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
        assert (ack.epoch, ack.status) == (proof, wire.ACK_COMMITTED), ack
        assert ack.memory_digest == dom.memory_digest()


def test_zero_pages_the_svm_holds_as_zeros_are_not_written_in_its_pause(tmp_path):
    """With the SVM pages sampled (the default), a ZERO page the SVM holds as zeros (its
    SVM_DIRTY hash) is left as it is in the SVM's pause, as an SVM page is, and goes into
    the cache as zeros: the SVM then rewrites those pages on its own, the next checkpoint
    puts them back from the cache, and the SVM's memory is the PVM's exactly."""
    with _hand_secondary(tmp_path, verify="sample") as (pair, dom, prim, inputs):
        before, _, held = _commit_filled_epoch(pair, dom, prim, inputs)
        assert held >= ZERO_PAGES[1]
        assert counters(pair)["restore"]["zero_pages_held"] - before["zero_pages_held"] \
            == held
        first, count, _ = ZERO_PAGES
        _svm_runs(pair, inputs, prim.epoch, dom.input_head,
                  SimDomain.fill_command(first, count, 0x77))
        assert prim.probe() == dom.memory_digest()
