"""The client stage's resend to a secondary that just joined (inputs.resend_unconsumed).

A secondary that joins an unprotected primary gets every input the PVM has not consumed
yet before any new one. The inputs channel queues only for a connected peer (ZMQ_IMMEDIATE:
a dead secondary's queue must not reach the next one), so while the secondary is away a
send waits. The fault matrix's ``partition-pages`` row found the resend waiting for the
stage's stop alone: the re-joining secondary stopped as stale in the middle of it and the
PVM served nothing more for as long as the node ran. Here the real sockets of both sides
and a real sim guest whose inputs are not consumed yet (paused).
"""
from __future__ import annotations

import threading

import zmq
from conftest import free_port, wait_until

from pipeline import config, sockets, wire
from pipeline.stages.inputs import resend_unconsumed

#: a deadline far beyond the test's need: only a stage that ignored the loss reaches it
STOP_AFTER_S = 60.0


def settings(role: str, port: int):
    return config.from_dict({
        "node": {"name": role, "role": role, "listen": f"tcp://127.0.0.1:{port}"},
        "peer": {"address": f"tcp://127.0.0.1:{port}"},
        "security": {"mode": "plaintext"}})


def unconsumed_inputs(make_sim_domain, count: int):
    dom = make_sim_domain("resend", 64)          # paused: it consumes none of them
    payloads = [b"request %d" % i for i in range(count)]
    for payload in payloads:
        dom.feed_input(payload, wake=False)
    assert (dom.input_seq(), dom.input_head) == (0, count)
    return dom, payloads


def test_the_resend_goes_in_order_to_a_connected_secondary(make_sim_domain):
    dom, payloads = unconsumed_inputs(make_sim_domain, 5)
    port = free_port(4)
    prim = sockets.NodeContext(settings("primary", port))
    sec = sockets.NodeContext(settings("secondary", port))
    try:
        into = sockets.inputs_in(sec)
        out = sockets.inputs_out(prim)
        assert out.poll(30_000, zmq.POLLOUT), "the secondary's inputs socket never connected"
        assert resend_unconsumed(out, dom, 7, threading.Event(), give_up=lambda: False)
        got = [wire.decode_input(into.recv()) for _ in payloads]
        assert got == [(7, seq, p) for seq, p in enumerate(payloads)]
    finally:
        prim.close()
        sec.close()


def test_the_resend_gives_up_when_the_secondary_is_lost_again(make_sim_domain):
    dom, _ = unconsumed_inputs(make_sim_domain, 5)
    port = free_port(4)
    prim = sockets.NodeContext(settings("primary", port))
    sec = sockets.NodeContext(settings("secondary", port))
    stop = threading.Event()
    watchdog = threading.Timer(STOP_AFTER_S, stop.set)
    try:
        into = sockets.inputs_in(sec)
        out = sockets.inputs_out(prim)
        assert out.poll(30_000, zmq.POLLOUT), "the secondary's inputs socket never connected"
        # the secondary went away (its socket closed: nobody takes the inputs now) ...
        into.close(0)
        sec.close()
        wait_until(lambda: not out.poll(0, zmq.POLLOUT), 60,
                   "the inputs socket left with no peer to queue for")
        # ... and the coordinator declared it lost: the stage is not stopping
        lost = threading.Event()
        lost.set()
        watchdog.start()
        assert resend_unconsumed(out, dom, 7, stop, give_up=lost.is_set) is False
        assert not stop.is_set(), "the resend waited for the stage's stop, not the loss"
    finally:
        watchdog.cancel()
        prim.close()

