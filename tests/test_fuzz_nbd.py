"""Fuzzing the NBD request parser (pipeline/disk/nbd_protocol.py and the transmission phase
of pipeline/disk/nbd_server.py) for answers.

The request parser has no encoder of its own and lives in the server's connection loop,
so it is fuzzed where it runs: a real export (forwarding off) on a unix socket, sent any
sequence of requests (every command, known and unknown, any flags, offsets and lengths
at and around the bounds, the block size and the request limit, oversized writes with
their payload, a bad magic). A model (the NBD spec's rules as this export documents
them, and a bytearray for the image) says what each reply must be: its cookie, its
error (EINVAL, EOVERFLOW or none) and, for a read, the bytes. Every refusal is counted in
``bad_requests``; a bad magic ends that connection and is counted; nothing else changes
the image.

The option parsers are pure functions: any bytes give ValueError naming the request or
the parsed queries, which encode back to the same bytes when they are UTF-8 (a query
that is not UTF-8 is read with replacement characters and then matches no context: the
one case where the value read is not the bytes sent, and harmless, so not changed).
"""
from __future__ import annotations

import shutil
import socket
import struct
import tempfile

from conftest import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.disk import nbd_protocol as P
from pipeline.disk.nbd_client import NbdClient
from pipeline.disk.nbd_server import _info_request_ok
from pipeline.disk.settings import DiskSettings
from pipeline.stages.disk import PrimaryDisk

BS = 512
SIZE = 64 * 1024
MAX_REQUEST = 8 * 1024
CMDS = [P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_WRITE_ZEROES,
        P.CMD_BLOCK_STATUS, 5, 8, 0xFFFF]
#: offsets and lengths at and around every bound the server checks
EDGES = [0, 1, BS - 1, BS, BS + 1, 3 * BS, MAX_REQUEST - BS, MAX_REQUEST, MAX_REQUEST + BS,
         2 * MAX_REQUEST, SIZE - MAX_REQUEST, SIZE - BS, SIZE, SIZE + BS, 2**63, 2**64 - BS]


@st.composite
def requests(draw):
    cmd = draw(st.sampled_from(CMDS))
    offset = draw(st.sampled_from(EDGES) | st.integers(0, SIZE // BS).map(lambda b: b * BS))
    length = draw(st.sampled_from([e for e in EDGES if e < 2**32]) |
                  st.integers(1, MAX_REQUEST // BS).map(lambda b: b * BS))
    flags = draw(st.sampled_from([0, P.CMD_FLAG_FUA, P.CMD_FLAG_NO_HOLE, 0xFFFF]))
    fill = draw(st.integers(0, 255))
    return cmd, flags, offset, length, fill


def expected(cmd: int, offset: int, length: int) -> int:
    """The error the export must answer with (0: none), by the rules it documents."""
    if cmd in (P.CMD_READ, P.CMD_WRITE) and length > MAX_REQUEST:
        return P.EOVERFLOW
    if cmd == P.CMD_FLUSH:
        return 0
    if cmd == P.CMD_BLOCK_STATUS:   # no metadata context is selected by this client
        return P.EINVAL
    if cmd not in (P.CMD_READ, P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
        return P.EINVAL
    if length == 0 or offset + length > SIZE or offset % BS or length % BS:
        return P.EINVAL
    return 0


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"the server closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


#: a real export per example costs ~20 ms: a third of the profile's examples
@settings(max_examples=max(20, settings.default.max_examples // 3))
@given(st.lists(requests(), max_size=12), st.booleans())
def test_every_request_gets_the_reply_the_model_says_and_refusals_are_counted(reqs, bad_magic):
    tmp = tempfile.mkdtemp(prefix="fuzz-nbd-")
    disk = PrimaryDisk(DiskSettings(image=f"{tmp}/disk.img", export_size=SIZE, block_size=BS,
                                    export=f"unix:{tmp}/nbd.sock", max_request=MAX_REQUEST),
                       forward=False)
    client = NbdClient(disk.uri)
    try:
        model = bytearray(SIZE)
        refused = 0
        for cookie, (cmd, flags, offset, length, fill) in enumerate(reqs, 1):
            payload = bytes([fill]) * length if cmd == P.CMD_WRITE else b""
            client.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset,
                                               length) + payload)
            error = expected(cmd, offset, length)
            magic, got_error, got_cookie = P.SIMPLE_REPLY.unpack(
                recv_exact(client.sock, P.SIMPLE_REPLY.size))
            assert (magic, got_error, got_cookie) == (P.SIMPLE_REPLY_MAGIC, error, cookie), (
                f"{P.CMD_NAMES.get(cmd, cmd)} [{offset}, +{length})")
            refused += bool(error)
            if error:
                continue
            if cmd == P.CMD_READ:
                assert recv_exact(client.sock, length) == model[offset:offset + length]
            elif cmd == P.CMD_WRITE:
                model[offset:offset + length] = payload
            elif cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                model[offset:offset + length] = bytes(length)
        if bad_magic:   # the connection ends; the export counts it and serves others
            client.sock.sendall(P.REQUEST.pack(0x12345678, 0, P.CMD_READ, 99, 0, BS))
            assert client.sock.recv(1) == b""
            refused += 1
        wait_until(lambda: disk.counters["bad_requests"] == refused, 60,
                   f"bad_requests == {refused} (is {disk.counters['bad_requests']})",
                   interval=0.001)
        with open(f"{tmp}/disk.img", "rb") as f:
            assert f.read().ljust(SIZE, b"\0") == bytes(model)
        other = NbdClient(disk.uri)
        assert other.read(0, BS) == model[:BS]
        other.close()
    finally:
        client.close()
        disk.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- the option parsers -----------------------------------------------------------------------
def meta_request(name: bytes, queries: list[bytes]) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


@given(st.binary(max_size=16), st.lists(st.text(max_size=20).map(str.encode), max_size=5))
def test_meta_context_queries_round_trip(name, queries):
    assert P.meta_context_queries(meta_request(name, queries)) == [q.decode() for q in queries]


@given(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, q, cut, extra: meta_request(n, q)[:cut] + extra,
              st.binary(max_size=8), st.lists(st.binary(max_size=8), max_size=4),
              st.integers(0, 80), st.binary(max_size=4))))
def test_meta_context_queries_refuse_naming_the_request_or_read_back_exactly(data):
    try:
        queries = P.meta_context_queries(data)
    except ValueError as exc:
        assert str(exc).startswith("meta context request"), exc
        return
    name_len = int.from_bytes(data[:4], "big")
    raw = [q.encode() for q in queries]
    if all("\ufffd" not in q for q in queries):
        assert meta_request(data[4:4 + name_len], raw) == data
    else:   # not UTF-8: same count and framing, text read with replacement characters
        assert len(queries) == int.from_bytes(data[4 + name_len:8 + name_len], "big")


@given(st.binary(max_size=16), st.lists(st.integers(0, 0xFFFF), max_size=6),
       st.binary(max_size=3))
def test_info_requests_are_accepted_exactly_when_well_formed(name, infos, extra):
    good = (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))
    assert _info_request_ok(good)
    assert _info_request_ok(good + extra) == (extra == b"")
    for cut in range(len(good)):
        assert not _info_request_ok(good[:cut]) or cut >= 6 and _wellformed(good[:cut])


def _wellformed(data: bytes) -> bool:
    """A prefix that happens to be a whole request itself (fewer info types, say)."""
    n = int.from_bytes(data[:4], "big")
    return len(data) >= 6 + n and len(data) == 6 + n + 2 * int.from_bytes(data[4 + n:6 + n],
                                                                            "big")
