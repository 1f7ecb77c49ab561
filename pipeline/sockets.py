"""Every host-to-host ZeroMQ socket of a node, created in one place with its options.

The secondary binds, the primary connects (a primary can then be pointed at a new
secondary). Socket names say their role and direction: ``pages_out`` is the
primary's end of the pages channel, ``pages_in`` the secondary's.
"""
from __future__ import annotations

import zmq

from pipeline.config import Settings, peer_endpoints

SEND_TIMEOUT_MS = 200   # a blocked send wakes up this often to look at the stop event


def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    return s


def pages_out(ctx: zmq.Context, settings: Settings) -> zmq.Socket:
    s = _socket(ctx, zmq.PUSH, 256)
    s.connect(peer_endpoints(settings)["pages"])
    return s


def pages_in(ctx: zmq.Context, settings: Settings) -> zmq.Socket:
    s = _socket(ctx, zmq.PULL, 256)
    s.bind(peer_endpoints(settings)["pages"])
    return s


def control(ctx: zmq.Context, settings: Settings) -> zmq.Socket:
    """Both ways: checkpoint begin/acks and hello. DEALER on both ends (one peer each)."""
    s = _socket(ctx, zmq.DEALER, 1000)
    addr = peer_endpoints(settings)["control"]
    if settings.node.role == "secondary":
        s.bind(addr)
    else:
        s.connect(addr)
    return s


def inputs_out(ctx: zmq.Context, settings: Settings) -> zmq.Socket:
    s = _socket(ctx, zmq.PUSH, 100000)
    s.connect(peer_endpoints(settings)["inputs"])
    return s


def inputs_in(ctx: zmq.Context, settings: Settings) -> zmq.Socket:
    s = _socket(ctx, zmq.PULL, 100000)
    s.bind(peer_endpoints(settings)["inputs"])
    return s


def send_until_stopped(sock: zmq.Socket, msg, stop, copy: bool = True) -> bool:
    """Send, retrying while the peer is slow or away; False if ``stop`` was set first."""
    while True:
        try:
            sock.send(msg, copy=copy)
            return True
        except zmq.Again:
            if stop.is_set():
                return False
