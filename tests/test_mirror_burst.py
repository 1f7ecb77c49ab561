"""A burst of mirrored inputs: the mirror feeds the SVM each in the order it came; a bad
record inside the burst is counted and dropped, and the inputs after it are still fed.

The primary is the test (tests/test_secondary_faults.py's hand primary) with a real
secondary node: it sends a few hundred inputs at once, faster than the mirror takes them
(the mirror finds a backlog on its wake-ups, as it does under load)."""
from __future__ import annotations

import pytest
import zmq
from conftest import start_hand_secondary, wait_until
from test_secondary_faults import (close_hand_pair, committed_pair, counters,
                                   hand_pvm)

from pipeline import sockets, wire
from pipeline.xen_io.sim import SimDomain

pytestmark = pytest.mark.slow  # starts a real node

N = 320


def test_a_burst_of_inputs_is_fed_in_order_and_a_bad_record_in_it_is_dropped(tmp_path):
    # the hand primary sends no heartbeats: long intervals keep the secondary's
    # control-silence fallback from taking over between the test's steps
    pair = start_hand_secondary(tmp_path, "full", epoch_timeout_ms=60000,
                                max_interval_ms=60000, input_log_slots=4 * N)
    dom = hand_pvm(pair)
    prim = None
    try:
        prim, _ = committed_pair(pair, dom)
        first = dom.input_seq()
        errors = counters(pair)["mirror"]["errors"]
        inputs = sockets.inputs_out(prim.nctx)
        assert inputs.poll(30_000, zmq.POLLOUT), "the secondary's inputs socket never connected"
        payloads = [SimDomain.write_command(1 + i % 4) for i in range(N)]
        for i, payload in enumerate(payloads):
            inputs.send(wire.encode_input(prim.epoch, first + i, payload))
            if i == N // 2:
                inputs.send(b"not an input record")
        # every input fed (one out of order would be refused: the SVM's log takes only
        # its head), the bad record counted once, nothing held back
        wait_until(lambda: counters(pair)["mirror"]["svm_input_seq"] == first + N, 60,
                   "the SVM running every input of the burst")
        mirror = counters(pair)["mirror"]
        assert mirror["errors"] == errors + 1
        assert mirror["input_full"] == 0
        # the PVM runs the same inputs: the next checkpoint finds both memories equal
        for payload in payloads:
            dom.feed_input(payload)
        dom.resume()
        dom.wait_for_input_seq(first + N, 60)
        dom.pause()
        ack = prim.checkpoint(dom.read_and_clear_dirty(), wire.FLAG_DIGEST)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        assert ack.memory_digest == dom.memory_digest()
    finally:
        close_hand_pair(pair, dom, prim)
