"""pipeline.sockets.HandshakeWatch: a channel whose handshake failed comes up again, and
one that libzmq brought up again by itself is left alone (a reconnect then would drop
what the socket had queued: the full sync lost PAGES records that way)."""
from __future__ import annotations

import socket

import zmq

from pipeline.sockets import HandshakeWatch
from conftest import StaleListener, free_port, wait_until

MSG = bytes(64 << 10)


class ClosingListener(StaleListener):
    """Accepts every connection on 127.0.0.1:``port`` and closes it at once, as a peer
    that is restarting would: the client's handshake fails without detail, and libzmq
    connects again by itself. ``count``: connections taken."""

    count = 0

    def accepted(self, c: socket.socket) -> None:
        self.count += 1
        c.close()


def _push(ctx: zmq.Context) -> zmq.Socket:
    """Like the primary's pages socket: queues only for a connected peer, short queue."""
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.SNDHWM, 8)
    return s


def _pull(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 8)
    s.bind(endpoint)
    return s


def _fill(push: zmq.Socket) -> int:
    """Send until the socket's own queue is full (a send waited a whole second for room:
    the peer's queue and the kernel's buffers are full too); returns how many went."""
    push.setsockopt(zmq.SNDTIMEO, 1000)
    n = 0
    while True:
        try:
            push.send(MSG)
        except zmq.Again:
            return n
        n += 1


def _receive(pull: zmq.Socket, n: int) -> int:
    got = 0
    while got < n and pull.poll(30_000):
        pull.recv()
        got += 1
    return got


def test_a_handshake_libzmq_retried_by_itself_is_not_torn_down():
    """The peer closes the first connection mid-handshake (failure without detail); libzmq
    connects again by itself and the channel works. The watch's reconnect, due by then,
    is called off: done, it dropped every message the socket had queued."""
    ctx = zmq.Context()
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    closing = ClosingListener(port)
    push = _push(ctx)
    watch = HandshakeWatch(push, endpoint)
    try:
        push.connect(endpoint)
        # now=0: the failure is noted, the reconnect it schedules is not yet due
        wait_until(lambda: (watch.check(now=0), watch.failures)[1] >= 1, timeout=60,
                   what="a failed handshake with the closing listener")
        closing.close()
        pull = _pull(ctx, endpoint)
        push.setsockopt(zmq.SNDTIMEO, 60_000)
        push.send(b"probe")             # libzmq's own retry reached the real peer
        assert pull.poll(60_000) and pull.recv() == b"probe"
        sent = _fill(push)
        assert not watch.check(now=1e9), "reconnected a channel that was up"
        assert watch.recovered == 1
        assert _receive(pull, sent) == sent
    finally:
        closing.close()
        watch.close()
        ctx.destroy(linger=0)


def test_a_protocol_error_is_connected_again():
    """A stale peer of another mechanism: libzmq gives up on the endpoint for good; the
    watch connects again, and once the real peer listens there, messages flow."""
    ctx = zmq.Context()
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    stale = StaleListener(port)
    push = _push(ctx)
    watch = HandshakeWatch(push, endpoint)
    try:
        push.connect(endpoint)
        wait_until(lambda: (watch.check(now=0), watch.failures)[1] >= 1, timeout=60,
                   what="a failed handshake with the stale listener")
        stale.close()
        pull = _pull(ctx, endpoint)
        assert watch.check(now=1e9)
        push.setsockopt(zmq.SNDTIMEO, 60_000)
        push.send(b"after")
        assert pull.poll(60_000) and pull.recv() == b"after"
        assert watch.recovered == 0
    finally:
        stale.close()
        watch.close()
        ctx.destroy(linger=0)
