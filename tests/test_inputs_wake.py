"""The input stages sleep until the guest answers, not only until the next input (issue 15):
a stage that slept on its input socket alone left the guest's answer in the output pipe
until the next input came (at 200 requests/s up to 5 ms on every answer; the SVM's commit
boundary, which releases the PVM's held answers, waited as long)."""
from __future__ import annotations

import zmq

from pipeline.stages.inputs import OutputPort
from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain


def test_the_wait_ends_when_the_guest_answers_with_no_input_message():
    dom = open_sim_domain("wake", 64, WorkloadSpec(pages_per_input=1), dirty_log="bitmap")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)          # the stage's input socket: nothing ever comes
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("inproc://no-input")
    try:
        dom.start(paused=False)
        port = OutputPort(None, "")      # no comparator: wait() needs neither
        assert dom.read_outputs(0.0) == []
        dom.feed_input(b"request 0")
        # the bound is a backstop far above the test's timeout: only the guest's answer
        # can end this wait
        assert port.wait(dom, sock, 3_600_000) is False
        assert [seq for seq, _ in dom.read_outputs(0.0)] == [0]
    finally:
        sock.close()
        ctx.term()
        dom.close()
