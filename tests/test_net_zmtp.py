"""pipeline.net.zmtp.ZmtpPull, the client stage's ``client-inputs.sock``: a ZMTP 3.0 PULL
end read by the calling thread, against real libzmq PUSH sockets (the demo's, the tests',
localpair's and the fault matrix's clients) and the benchmark's own ZmtpPush."""
from __future__ import annotations

import socket
import threading
import time

import zmq

from pipeline.net.zmtp import ZmtpPull, ZmtpPush, command, greeting


def _pump(pull: ZmtpPull, want: int, timeout: float = 60.0) -> list[bytes]:
    """Poll as the client stage does (zmq_poll over pull.poll_items()), until ``want``
    messages came or ``timeout``."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        msg = pull.recv()
        if msg is not None:
            got.append(msg)
            continue
        ready = zmq.zmq_poll(pull.poll_items(), 50)
        pull.take_ready([fd for fd, _ in ready])
    return got


def test_libzmq_push_sockets_deliver_every_message_in_order(tmp_path):
    address = "ipc://" + str(tmp_path / "client-inputs.sock")
    pull = ZmtpPull(address)
    ctx = zmq.Context()
    pushes = []
    try:
        for _ in range(2):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.IMMEDIATE, 1)   # as AnswerStream: only over a handshake done
            push.connect(address)
            pushes.append(push)
        # wait for both handshakes (IMMEDIATE: a send waits for them, never queues blind)
        deadline = time.monotonic() + 60
        hellos = 0
        while sum(1 for p in pull.peers.values() if p.ready) < 2 \
                and time.monotonic() < deadline:
            ready = zmq.zmq_poll(pull.poll_items(), 50)
            pull.take_ready([fd for fd, _ in ready])
            for p in pushes:
                try:
                    p.send(b"hello", zmq.NOBLOCK)
                    hellos += 1
                except zmq.Again:
                    pass
        assert sum(1 for p in pull.peers.values() if p.ready) == 2, pull.last_error
        msgs = {0: [b"a %d" % i for i in range(3000)] + [b"x" * 255, b"y" * 256,
                                                         b"z" * 70000, b""],
                1: [b"b %d" % i for i in range(3000)]}
        # sent without blocking, the pull read whenever a push is full: a blocking send
        # waits for the PULL end to read, and only this thread reads it (the pushes' high-
        # water mark plus the kernel's socket buffers is all that may be in flight; CI hung
        # here once, 300 s, in a blocking send)
        got: list[bytes] = []
        for i, p in enumerate(pushes):
            for m in msgs[i]:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        p.send(m, zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        assert time.monotonic() < deadline, "the push stayed full for 60 s"
                        got += _pump(pull, 1 << 30, timeout=0.05)
        # plus the hellos that went while the handshakes finished
        got += _pump(pull, sum(len(m) for m in msgs.values()) + hellos - len(got))
        got = [m for m in got if m != b"hello"]
        # each peer's messages in its order (the peers interleave)
        assert [m for m in got if not m.startswith(b"b ")] == msgs[0]
        assert [m for m in got if m.startswith(b"b ")] == msgs[1]
        assert pull.errors == 0 and pull.recv() is None
    finally:
        for p in pushes:
            p.close()
        pull.close()
        ctx.term()


def test_a_push_socket_follows_the_endpoint_to_a_new_pull(tmp_path):
    """A node that stops and one that binds the same path again (a restart, or the
    survivor of a takeover taking the address): libzmq's PUSH reconnects and delivers to
    the new end, as it did to libzmq's PULL; a stale socket file is replaced at bind."""
    address = "ipc://" + str(tmp_path / "client-inputs.sock")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.RECONNECT_IVL, 20)
    try:
        push.connect(address)                 # nothing bound yet: libzmq retries
        pull = ZmtpPull(address)
        push.send(b"first")
        assert _pump(pull, 1) == [b"first"]
        pull.listener.close()                 # dies without unlinking its socket file
        for fd in list(pull.peers):
            pull.peers.pop(fd).sock.close()
        pull = ZmtpPull(address)              # the file is stale: unlinked and bound again
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        n = 0
        while not got and time.monotonic() < deadline:
            try:
                push.send(b"again %d" % n, zmq.NOBLOCK)   # (the first may go to the dead end)
                n += 1
            except zmq.Again:
                pass
            got = _pump(pull, 1, timeout=0.2)
        assert got and got[0].startswith(b"again"), got
        pull.close()
    finally:
        push.close()
        ctx.term()


def test_zmtp_push_and_pull_pair(tmp_path):
    address = "ipc://" + str(tmp_path / "client-inputs.sock")
    pull = ZmtpPull(address)
    pending: list[ZmtpPush] = []
    try:
        # the push's handshake waits for the pull's answer: the pull turns meanwhile
        t = threading.Thread(target=lambda: pending.append(ZmtpPush(address, timeout=60)))
        t.start()
        deadline = time.monotonic() + 60
        while t.is_alive() and time.monotonic() < deadline:
            ready = zmq.zmq_poll(pull.poll_items(), 50)
            pull.take_ready([fd for fd, _ in ready])
        t.join(1)
        (push,) = pending
        msgs = [b"request %d" % i for i in range(20000)]
        for m in msgs:
            push.send(m)
        got: list[bytes] = []
        deadline = time.monotonic() + 120
        while len(got) < len(msgs) and time.monotonic() < deadline:
            push.flush()
            got += _pump(pull, len(msgs) - len(got), timeout=0.05)
        assert got == msgs
        push.close()
    finally:
        pull.close()


def test_a_peer_that_is_not_a_push_end_is_disconnected_counted_and_named(tmp_path):
    """Bad input on client-inputs.sock: the peer goes, the error is counted and says
    what was wrong; a good peer beside it is served on."""
    address = "ipc://" + str(tmp_path / "client-inputs.sock")
    errors: list[str] = []
    pull = ZmtpPull(address, on_error=errors.append)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    # a ZMTP peer that says it is a PULL end (two PULL ends never pair), and one that
    # speaks something else
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        push.connect(address)
        other.connect(str(tmp_path / "client-inputs.sock"))
        other.sendall(greeting() + command(b"READY", {b"Socket-Type": b"PULL"}))
        garbage.connect(str(tmp_path / "client-inputs.sock"))
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
        push.send(b"served")
        assert _pump(pull, 1) == [b"served"]
        deadline = time.monotonic() + 60
        while len(errors) < 2 and time.monotonic() < deadline:
            ready = zmq.zmq_poll(pull.poll_items(), 50)
            pull.take_ready([fd for fd, _ in ready])
        assert pull.errors == 2, (pull.errors, errors)
        assert any("ZMTP" in e and "GET / HTTP" in e for e in errors), errors
        assert any("not a PUSH socket" in e and "PULL" in e for e in errors), errors
        assert all("client-inputs.sock" in e for e in errors), errors
        # the garbage peer was hung up on (after the greeting it was sent on connecting)
        garbage.settimeout(60)
        data = b""
        while chunk := garbage.recv(4096):
            data += chunk
        assert data.startswith(b"\xff")
        push.send(b"still served")
        assert _pump(pull, 1) == [b"still served"]
        assert len(pull.peers) == 1
    finally:
        garbage.close()
        push.close()
        other.close()
        pull.close()
        ctx.term()


def test_frames_split_anywhere_across_reads_come_out_whole_and_in_order(tmp_path):
    """A read of whole short frames is taken as it is; one that ends inside a frame (or
    inside its size) keeps the rest for the next read: the messages are the same however
    the peer's bytes were cut."""
    address = "ipc://" + str(tmp_path / "client-inputs.sock")
    pull = ZmtpPull(address)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect(str(tmp_path / "client-inputs.sock"))
        msgs = [b"abc", b"de", b"", b"x" * 300, b"fghij", b"y" * 255]
        wire = b"".join(bytes([0, len(m)]) + m if len(m) < 256 else
                        bytes([2]) + len(m).to_bytes(8, "big") + m for m in msgs)
        stream = greeting() + command(b"READY", {b"Socket-Type": b"PUSH"}) + wire
        got: list[bytes] = []
        # cut the stream at every few bytes, each piece read before the next is sent
        for at in range(0, len(stream), 7):
            peer.sendall(stream[at:at + 7])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ready = zmq.zmq_poll(pull.poll_items(), 50)
                if ready:
                    pull.take_ready([fd for fd, _ in ready])
                    break
            while (m := pull.recv()) is not None:
                got.append(m)
        got += _pump(pull, len(msgs) - len(got), timeout=5)
        assert got == msgs and pull.errors == 0, (got, pull.last_error)
    finally:
        peer.close()
        pull.close()
