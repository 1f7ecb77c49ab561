"""The benchmark client's direct request channel (pipeline.service_client.ZmtpPush): a
ZMTP 3.0 PUSH end written by the client's own thread, talking to a real libzmq PULL
socket on an ipc endpoint, as the client stage binds ``client-inputs.sock``."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import zmq

from pipeline.service_client import ZmtpPush


def test_every_message_arrives_in_order_and_a_backlog_never_blocks_the_sender(tmp_path):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    address = "ipc://" + str(tmp_path / "client-inputs.sock")
    pull.bind(address)
    push = ZmtpPush(address)
    try:
        # short frames, the longest short one, long frames, an empty message; and so many
        # that neither libzmq's queue nor the socket buffer takes them all before the
        # receiver reads (a blocking send would hang here, nothing reads yet)
        msgs = [b"request %d" % i for i in range(20000)]
        msgs += [b"y" * 255, b"z" * 256, b"x" * 5000, b""]
        for m in msgs:
            push.send(m)
        assert push.pending, "everything went at once: the backlog case was not reached"
        got = []
        deadline = time.monotonic() + 120
        while len(got) < len(msgs) and time.monotonic() < deadline:
            push.flush()
            while pull.poll(20):
                got.append(pull.recv())
        assert got == msgs
        assert not push.pending
    finally:
        push.close()
        pull.close()
        ctx.term()


def test_a_peer_that_is_not_a_zmtp_pull_socket_is_refused_by_name(tmp_path):
    path = str(tmp_path / "not-zmq.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def answer_garbage() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n" + bytes(64))
        conn.recv(1024)
        conn.close()
    t = threading.Thread(target=answer_garbage, daemon=True)
    t.start()
    try:
        with pytest.raises(ConnectionError, match="not-zmq.sock.*ZMTP"):
            ZmtpPush("ipc://" + path, timeout=30)
    finally:
        t.join(30)
        listener.close()
    with pytest.raises(ValueError, match="not an ipc://"):
        ZmtpPush("tcp://127.0.0.1:1")


def test_a_push_socket_is_refused_as_the_peer(tmp_path):
    """Two PUSH ends never pair: the peer's READY names its socket type."""
    ctx = zmq.Context()
    other = ctx.socket(zmq.PUSH)
    other.setsockopt(zmq.LINGER, 0)
    address = "ipc://" + os.path.join(str(tmp_path), "push.sock")
    other.bind(address)
    try:
        with pytest.raises(ConnectionError, match="push.sock.*PULL"):
            ZmtpPush(address, timeout=30)
    finally:
        other.close()
        ctx.term()
