"""sockets.DropWatch with real CURVE sockets and a real TCP relay that corrupts one byte.

libzmq 4.3 refuses a message that fails CURVE authentication with one
HANDSHAKE_FAILED_PROTOCOL event and keeps the connection open and silent: the peer never
reconnects. The watch counts it, resets the connection (unbind, bind again: retried while
libzmq still closes the old listener), and the sender's next message arrives over a new
connection. A stranger whose handshake fails is not counted as a broken connection.
"""
from __future__ import annotations

import select
import socket
import threading

import zmq

from conftest import free_port, wait_until

from pipeline import sockets


class Counters:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n


class CorruptingRelay:
    """A TCP relay from ``port`` to ``target``; :meth:`corrupt_next` flips one byte in the
    next chunk of more than 2000 bytes from the client (the sender's next big message)."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen()
        self.flip = threading.Event()
        self.flipped = 0
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def corrupt_next(self) -> None:
        self.flip.set()

    def _accept(self) -> None:
        while not self.stop:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(c,), daemon=True).start()

    def _pump(self, c: socket.socket) -> None:
        s = socket.create_connection(("127.0.0.1", self.target))
        try:
            while not self.stop:
                ready, _, _ = select.select([c, s], [], [], 0.1)
                for a in ready:
                    try:
                        data = a.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    if a is c and self.flip.is_set() and len(data) > 2000:
                        data = bytearray(data)
                        data[len(data) // 2] ^= 0x55
                        data = bytes(data)
                        self.flip.clear()
                        self.flipped += 1
                    (s if a is c else c).sendall(data)
        finally:
            c.close()
            s.close()

    def close(self) -> None:
        self.stop = True
        self.listener.close()


def test_a_message_failing_curve_is_counted_and_the_connection_reset_every_time():
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    ctx = zmq.Context()
    port, relay_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    pull = ctx.socket(zmq.PULL)
    pull.curve_server, pull.curve_secretkey, pull.curve_publickey = True, server_sec, server_pub
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(endpoint)
    counters = Counters()
    watch = sockets.DropWatch(pull, endpoint, "pages", counters)
    relay = CorruptingRelay(relay_port, port)
    push = ctx.socket(zmq.PUSH)
    push.curve_serverkey, push.curve_secretkey, push.curve_publickey = \
        server_pub, client_sec, client_pub
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.IMMEDIATE, 1)
    push.connect(f"tcp://127.0.0.1:{relay_port}")
    stranger = ctx.socket(zmq.PUSH)         # a CURVE client with the wrong server key
    stranger.curve_serverkey = zmq.curve_keypair()[0]
    stranger.curve_secretkey, stranger.curve_publickey = client_sec, client_pub
    stranger.setsockopt(zmq.LINGER, 0)
    try:
        push.send(b"a" * 10000)
        assert pull.poll(60000) and pull.recv() == b"a" * 10000
        stranger.connect(endpoint)
        rounds = 10
        for k in range(1, rounds + 1):
            relay.corrupt_next()
            push.send(b"b" * 10000)          # refused: fails its authentication
            wait_until(lambda: watch.check() or counters.values.get("conn_drops", 0) >= k,
                       timeout=60, what=f"broken connection {k} noticed")
            # the sender goes on sending (as the send stage does): what it queued for the
            # old connection before it saw the reset is lost, the rest comes over the new one
            def arrived() -> bool:
                watch.check()
                try:
                    push.send(b"c%d" % k, zmq.NOBLOCK)
                except zmq.Again:
                    pass
                return bool(pull.poll(0))
            wait_until(arrived, timeout=60, what=f"a message after reset {k}")
            assert pull.recv() == b"c%d" % k
            while pull.poll(200):
                assert pull.recv() == b"c%d" % k
        assert relay.flipped == rounds
        assert counters.values == {"conn_drops": rounds, "conn_crypto_errors": rounds}
    finally:
        relay.close()
        watch.close()
        for s in (push, pull, stranger):
            s.close(0)
        ctx.term()
