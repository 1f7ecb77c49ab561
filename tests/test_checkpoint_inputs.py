"""A checkpoint that caught the PVM inside an input (issue 11): the secondary ACKs it only
once the SVM's input log holds that input, and discards it whole if the input never comes.

The primary feeds its guest an input before it mirrors it. A primary that dies in between
left a secondary whose last checkpoint had its guest half-way through an input it never
got: the SVM waited for it for good, and after a takeover the new primary's client stage
filled that seq, maybe with another payload than the one the guest had begun.

The primary here is the test (tests/test_secondary_faults.py's hand primary) with a real
secondary node: its PVM stops itself at a breakpoint in the middle of an input (no
timing), the test sends the checkpoint, and mirrors that input or never does.
"""
from __future__ import annotations

import numpy as np
import pytest
import zmq
from conftest import wait_until
from test_secondary_faults import (BATCH, PAGES, close_hand_pair, committed_pair, counters,
                                   hand_pvm)

from pipeline import sockets, wire
from pipeline.localpair import LocalPair
from pipeline.xen_io.sim import SimDomain

pytestmark = pytest.mark.slow  # starts real node processes


def _pair(tmp_path, epoch_timeout_ms: int) -> LocalPair:
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": PAGES},
        "pipeline": {"verify_workers": 2, "batch_pages": BATCH, "verify_pages": "full"},
        # the hand primary sends no heartbeats; a long interval keeps the secondary's
        # control-silence fallback from taking over between the test's steps
        "checkpoint": {"epoch_timeout_ms": epoch_timeout_ms, "max_interval_ms": 60000},
    }, workdir=str(tmp_path), log_level="info")
    pair.start(roles=("secondary",))
    return pair


def _pvm_inside_an_input(dom) -> tuple[int, bytes, np.ndarray]:
    """Feed the PVM an input and let it stop itself at page 10 of it (its breakpoint):
    (the input's seq, its payload, the PVM's dirty pages), the PVM paused there."""
    payload = SimDomain.write_command(64)
    seq = dom.feed_input(payload)
    dom.break_at(seq, 10)
    dom.resume()
    dom.wait_break()
    blob = dom.get_vcpu_state()
    assert (dom.vcpu_input_seq(blob), dom.vcpu_input_step(blob)) == (seq, 10)
    assert dom.vcpu_inputs_taken(blob) == seq + 1
    return seq, payload, dom.read_and_clear_dirty()


def test_inputs_taken_counts_the_input_a_guest_is_inside(tmp_path):
    """Between inputs a guest has begun every input below its seq; inside one (any page,
    even before the first write) also that one."""
    pair = _pair(tmp_path, 60000)
    dom = hand_pvm(pair)
    try:
        seq = dom.feed_input(SimDomain.write_command(8))
        dom.resume()
        wait_until(lambda: dom.input_seq() > seq, timeout=30, what="the PVM's input")
        dom.pause()
        blob = dom.get_vcpu_state()
        assert dom.vcpu_inputs_taken(blob) == dom.vcpu_input_seq(blob) == seq + 1
        _pvm_inside_an_input(dom)
    finally:
        close_hand_pair(pair, dom)


def test_a_checkpoint_inside_an_input_is_acked_once_the_input_is_mirrored(tmp_path):
    """The checkpoint arrives before the input it caught the PVM inside: the secondary
    waits (counted), sends no ACK, and commits once the input is mirrored; the SVM then
    finishes that input from its own log."""
    pair = _pair(tmp_path, 60000)
    dom = hand_pvm(pair)
    prim = None
    try:
        prim, _ = committed_pair(pair, dom)
        inputs = sockets.inputs_out(prim.nctx)
        assert inputs.poll(30_000, zmq.POLLOUT), "the secondary's inputs socket never connected"
        seq, payload, dirty = _pvm_inside_an_input(dom)
        e = prim.epoch
        prim.epoch += 1
        prim.control.send(wire.encode_checkpoint_begin(e, 0, 0))
        wire.decode_svm_dirty(prim.recv(wire.SVM_DIRTY), PAGES)
        msgs, _, _ = prim.records(e, dirty)
        for m in msgs:
            prim.pages.send(m)
        prim.pages.send(wire.encode_epoch_end(e, len(dirty), len(msgs), 0,
                                              dom.get_vcpu_state()))
        wait_until(lambda: counters(pair)["restore"]["inputs_awaited"] >= 1, timeout=60,
                   what="the secondary waiting for the input the checkpoint is inside")
        assert not prim.control.poll(0), "the secondary answered before it had the input"
        inputs.send(wire.encode_input(e, seq, payload))
        ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
        assert (ack.epoch, ack.status) == (e, wire.ACK_COMMITTED), ack
        assert counters(pair)["restore"]["inputs_missing"] == 0
        # the SVM runs on from the checkpoint: the rest of that input, from its own log
        wait_until(lambda: counters(pair)["mirror"]["svm_input_seq"] > seq, timeout=60,
                   what="the SVM finishing the input it was loaded inside")
    finally:
        close_hand_pair(pair, dom, prim)


def test_a_checkpoint_inside_an_input_never_mirrored_is_discarded_whole(tmp_path):
    """The input never comes (the primary died between feeding and mirroring it): the
    epoch is discarded, counted and named, nothing of it applied (the SVM is exactly at
    the last commit), and the pair goes on with the next checkpoint."""
    pair = _pair(tmp_path, 1500)    # the coordinator tears the epoch at 1.5 s
    dom = hand_pvm(pair)
    prim = None
    try:
        prim, committed = committed_pair(pair, dom)
        seq, _, dirty = _pvm_inside_an_input(dom)
        ack = prim.checkpoint(dirty)
        assert ack.status == wire.ACK_ABORTED and f"input seq {seq}" in ack.reason, ack
        assert counters(pair)["restore"]["inputs_missing"] == 1
        assert "event=input_missing" in pair.log_tail("secondary", 1 << 20)
        # the PVM finishes the input (between inputs now: no input missing) and the
        # secondary is exactly at the last commit, then takes the next checkpoint whole
        dom.resume()
        wait_until(lambda: dom.input_seq() > seq, timeout=30, what="the PVM's input")
        dom.pause()
        dirty = np.union1d(dirty, dom.read_and_clear_dirty()).astype(np.uint64)
        assert prim.probe() == committed
        ack = prim.checkpoint(dirty, wire.FLAG_DIGEST)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        assert ack.memory_digest == dom.memory_digest()
    finally:
        close_hand_pair(pair, dom, prim)
