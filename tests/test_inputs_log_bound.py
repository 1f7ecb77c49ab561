"""A checkpoint that caught the PVM inside an input the SVM's input log cannot take yet.

The secondary keeps every input from its last commit on (a rollback replays them), at most
``guest.input_log_slots``; the mirror holds the next ones back until a commit trims the
log. A fast client's checkpoint (asked for at half the log) can catch the PVM inside such
an input: the checkpoint itself is what makes room for it, so the restore stage must apply
it without waiting for the input. It waited for it (its bound was the SVM's own position
plus the log's size, not the last commit's position plus it) until its 10 s ran out, then
tore the epoch: the SVM paused and the PVM's answers held all that time (the official CI's
``test_a_fast_client_makes_checkpoints_before_the_secondary_input_log_fills``, 11 s).

The primary is the test (tests/test_secondary_faults.py's hand primary) with a real
secondary node; its PVM stops itself at a breakpoint inside the input (no timing).
"""
from __future__ import annotations

import pytest
import zmq
from conftest import start_hand_secondary, wait_until
from test_secondary_faults import (close_hand_pair, committed_pair, counters,
                                   hand_pvm)

from pipeline import sockets, wire
from pipeline.xen_io.sim import SimDomain

pytestmark = pytest.mark.slow  # starts a real node

#: the secondary's input log (the schema's minimum)
SLOTS = 16


def test_a_checkpoint_inside_an_input_beyond_the_full_log_commits_at_once(tmp_path):
    # the hand primary sends no heartbeats: long intervals keep the secondary's
    # control-silence fallback from taking over between the test's steps
    pair = start_hand_secondary(tmp_path, "full", epoch_timeout_ms=60000,
                                max_interval_ms=60000, input_log_slots=SLOTS)
    dom = hand_pvm(pair)
    prim = None
    try:
        prim, _ = committed_pair(pair, dom)     # the PVM consumed input 0 (not mirrored)
        first = dom.input_seq()
        inputs = sockets.inputs_out(prim.nctx)
        assert inputs.poll(30_000, zmq.POLLOUT), "the secondary's inputs socket never connected"
        payloads = [SimDomain.write_command(16) for _ in range(SLOTS + 2)]
        # the SVM gets a full log's worth (it runs them) and the two after, which the mirror
        # must hold back: nothing has been committed since the first of them
        for i, payload in enumerate(payloads):
            inputs.send(wire.encode_input(prim.epoch, first + i, payload))
        wait_until(lambda: counters(pair)["mirror"]["svm_input_seq"] == first + SLOTS, 60,
                   "the SVM running the log's worth of inputs")
        wait_until(lambda: counters(pair)["mirror"]["input_full"] >= 1, 60,
                   "the mirror holding the next input back (the log full)")
        # the PVM runs the same inputs and stops inside the last one, beyond the SVM's log
        inside = first + SLOTS + 1
        for payload in payloads:
            dom.feed_input(payload)
        dom.break_at(inside, 5)
        dom.resume()
        dom.wait_break()
        blob = dom.get_vcpu_state()
        assert (dom.vcpu_input_seq(blob), dom.vcpu_inputs_taken(blob)) == (inside, inside + 1)
        ack = prim.checkpoint(dom.read_and_clear_dirty(), wire.FLAG_DIGEST)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        assert ack.memory_digest == dom.memory_digest()
        assert counters(pair)["restore"]["inputs_missing"] == 0
        # the commit made room: the mirror feeds the held inputs and the SVM finishes the
        # one it was loaded inside, from its own log
        wait_until(lambda: counters(pair)["mirror"]["svm_input_seq"] > inside, 60,
                   "the SVM finishing the input it was loaded inside")
    finally:
        close_hand_pair(pair, dom, prim)


def test_input_log_checkpoints_wait_until_the_pvm_consumed_what_a_commit_can_free():
    """The client stage's input_log_full request (inputs.input_log_checkpoint_due): half
    the log arrived since the last commit, and the PVM consumed a quarter of it since. A
    PVM with a backlog of half the log or more made every commit ask for the next one (at
    5000 requests/s, 12-15 checkpoints a second), though a checkpoint frees the SVM's log
    only up to the PVM's position at its snapshot."""
    from pipeline.stages.inputs import input_log_checkpoint_due as due
    keep = 8192                         # half of 16384 slots
    # keeping pace: the PVM consumed nearly all that arrived: due at half the log
    assert not due(head=8191, consumed=8190, committed=0, keep_limit=keep)
    assert due(head=8192, consumed=8190, committed=0, keep_limit=keep)
    # a backlog of the whole log right after a commit: not due until the PVM consumed a
    # quarter of the log since (the old rule: due at once, after every commit)
    assert not due(head=30000, consumed=13616, committed=13616, keep_limit=keep)
    assert not due(head=30000, consumed=13616 + 4095, committed=13616, keep_limit=keep)
    assert due(head=30000, consumed=13616 + 4096, committed=13616, keep_limit=keep)
    # the smallest logs still ask
    assert due(head=1, consumed=1, committed=0, keep_limit=1)
