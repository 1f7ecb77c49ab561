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

The option phase is fuzzed the same way: any sequence of options (known and unknown, data
right or wrong for each) gets the replies a model says, then GO, EXPORT_NAME, ABORT or a
broken handshake (bad magic, an option too long), which ends the connection and is counted.

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


# -- the option phase on a real socket -------------------------------------------------------------
def _options():
    """(option, data) pairs: every option this export knows and some it does not, with
    data right or wrong for it."""
    info = st.builds(lambda n, k: struct.pack(">I", len(n)) + n + struct.pack(">H", len(k))
                     + b"".join(struct.pack(">H", i) for i in k),
                     st.binary(max_size=6), st.lists(st.integers(0, 4), max_size=3))
    meta = st.builds(meta_request, st.binary(max_size=6),
                     st.lists(st.sampled_from([b"base:allocation", b"base:", b"x-other:y",
                                               b"\xff\xfe"]), max_size=3))
    data = st.one_of(st.just(b""), st.binary(max_size=24), info, meta)
    return st.tuples(st.sampled_from([P.OPT_LIST, P.OPT_STRUCTURED_REPLY,
                                      P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT,
                                      P.OPT_INFO, P.OPT_STARTTLS, 4, 11, 0xFFFF]), data)


def expected_replies(option: int, data: bytes, structured: bool) -> tuple[list, bool]:
    """(replies as (type, data), structured afterwards) by the rules the export documents."""
    err = [(P.REP_ERR_INVALID, None)]
    if option == P.OPT_LIST:
        return [(P.REP_SERVER, bytes(4)), (P.REP_ACK, b"")], structured
    if option == P.OPT_INFO:
        if not _wellformed(data):
            return err, structured
        return [(P.REP_INFO, P.info_export(SIZE)),
                (P.REP_INFO, P.info_block_size(BS, BS, MAX_REQUEST)), (P.REP_ACK, b"")], \
            structured
    if option == P.OPT_STRUCTURED_REPLY:
        return (err, structured) if data else ([(P.REP_ACK, b"")], True)
    if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
        if not structured:
            return err, structured
        try:
            queries = P.meta_context_queries(data)
        except ValueError:
            return err, structured
        listing = option == P.OPT_LIST_META_CONTEXT
        hit = (listing and not queries) or any(
            q == P.BASE_ALLOCATION or (listing and q == "base:") for q in queries)
        ctx = struct.pack(">I", 0 if listing else P.BASE_ALLOCATION_ID) + b"base:allocation"
        return [(P.REP_META_CONTEXT, ctx)] * hit + [(P.REP_ACK, b"")], structured
    return [(P.REP_ERR_UNSUP, None)], structured


@given(st.lists(_options(), max_size=8),
       st.sampled_from(["go", "export_name", "abort", "bad_magic", "too_long"]))
def test_every_option_gets_the_replies_the_model_says(options, end):
    tmp = tempfile.mkdtemp(prefix="fuzz-nbdopt-")
    disk = PrimaryDisk(DiskSettings(image=f"{tmp}/disk.img", export_size=SIZE, block_size=BS,
                                    export=f"unix:{tmp}/nbd.sock", max_request=MAX_REQUEST),
                       forward=False)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30)
        sock.connect(f"{tmp}/nbd.sock")
        assert recv_exact(sock, 18)[:8] == P.NBDMAGIC
        sock.sendall(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))

        def option(opt: int, data: bytes) -> list:
            sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)
            out = []
            while True:
                magic, got_opt, rtype, n = P.OPTION_REPLY.unpack(
                    recv_exact(sock, P.OPTION_REPLY.size))
                assert (magic, got_opt) == (P.OPT_REPLY_MAGIC, opt)
                out.append((rtype, recv_exact(sock, n)))
                if rtype == P.REP_ACK or rtype & 0x80000000:
                    return out

        structured = False
        for opt, data in options:
            want, structured = expected_replies(opt, data, structured)
            got = option(opt, data)
            assert [t for t, _ in got] == [t for t, _ in want], (opt, data)
            for (_, g), (_, w) in zip(got, want):
                assert w is None or g == w, (opt, data)
        if end == "go":
            assert option(P.OPT_GO, bytes(6))[-1] == (P.REP_ACK, b"")
            sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, BS))
            reply = recv_exact(sock, P.CHUNK.size if structured else P.SIMPLE_REPLY.size)
            assert struct.unpack(">I", reply[:4])[0] == (
                P.STRUCTURED_REPLY_MAGIC if structured else P.SIMPLE_REPLY_MAGIC)
        elif end == "export_name":
            sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
            assert recv_exact(sock, 10) == SIZE.to_bytes(8, "big") + \
                P.TRANSMISSION_FLAGS.to_bytes(2, "big")
        elif end == "abort":
            assert option(P.OPT_ABORT, b"") == [(P.REP_ACK, b"")]
            assert sock.recv(1) == b""
        else:   # the peer broke the protocol: the connection ends and it is counted
            bad = (P.OPTION_HEADER.pack(0x1234, P.OPT_LIST, 0) if end == "bad_magic"
                   else P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 65537))
            sock.sendall(bad)
            assert sock.recv(1) == b""
            wait_until(lambda: disk.counters["bad_requests"] == 1, 60,
                       "the broken handshake counted", interval=0.001)
        assert disk.counters["bad_requests"] == (end in ("bad_magic", "too_long"))
    finally:
        sock.close()
        disk.close()
        shutil.rmtree(tmp, ignore_errors=True)
