"""Fuzzing the disk forwarding channel's format (pipeline/disk/wire.py) and the heartbeat
record (pipeline/stages/heartbeat.py): the other two formats a peer sends, next to
pipeline/wire.py (tests/test_fuzz_wire.py).

Property 1: any FORWARD group (header frame, data frame) gives one answer per write: the
write, whose fields the encoder turns back into exactly its header (reserved bytes zeroed)
and whose data is exactly its bytes of the data frame, or a ForwardError carrying the
write's seq, an errno and a text naming the write and what is wrong; a group that cannot
be split gives one refusal. Nothing raises. SEAL, ACK and HEARTBEAT likewise: refused with
their error naming the field, or read back to the same bytes.

Property 2: valid values encode then decode to themselves.

(ACK's reasons are read with replacement characters when they are not UTF-8: they only go
into log lines and error texts, so that lossy reading is left as it is.)
"""
from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.disk import wire
from pipeline.stages.heartbeat import (
    RECORD_SIZE, Heartbeat, HeartbeatError, decode_heartbeat, encode_heartbeat,
)

BS = 512
EXPORT = 64 * BS
COMMITTED = 10
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
STATUSES = {errno.EINVAL, errno.ESTALE, errno.EBADMSG}


# -- valid writes --------------------------------------------------------------------------
@st.composite
def writes(draw):
    """(kind, epoch, seq, offset, length, data, digest) of one valid forwarded write."""
    kind = draw(st.sampled_from(wire.KINDS))
    epoch = draw(st.integers(COMMITTED + 1, COMMITTED + wire.MAX_EPOCH_LEAD))
    seq = draw(U64)
    if kind in (wire.KIND_SYNC_BEGIN, wire.KIND_SYNC_END):
        digest = draw(st.binary(min_size=32, max_size=32)) if kind == wire.KIND_SYNC_BEGIN \
            else wire.ZERO_DIGEST
        return kind, epoch, seq, 0, 0, None, digest
    blocks = draw(st.integers(1, 4))
    offset = draw(st.integers(0, EXPORT // BS - blocks)) * BS
    length = blocks * BS
    if kind in wire.DATA_KINDS:
        data = draw(st.binary(min_size=length, max_size=length))
        # the primary sends guest writes and sync extents unhashed
        digest = draw(st.sampled_from([wire.digest_of(data), wire.UNHASHED]))
        return kind, epoch, seq, offset, length, data, digest
    digest = draw(st.binary(min_size=32, max_size=32)) if kind == wire.KIND_SYNC_CHECK \
        else wire.ZERO_DIGEST
    return kind, epoch, seq, offset, length, None, digest


def group(ws) -> list[bytes]:
    return [b"".join(wire.forward_header(k, e, s, o, n, d, g) for k, e, s, o, n, d, g in ws),
            b"".join(d for *_, d, _g in ws if d is not None)]


def decode(frames):
    return wire.decode_forward_group(frames, EXPORT, BS, COMMITTED)


@given(st.lists(writes(), min_size=1, max_size=5))
def test_valid_groups_round_trip(ws):
    got = decode(group(ws))
    assert len(got) == len(ws)
    for w, (kind, epoch, seq, offset, length, data, digest) in zip(got, ws):
        assert isinstance(w, wire.ForwardedWrite), w
        if kind == wire.KIND_WRITE and digest == wire.UNHASHED:
            digest = wire.digest_of(data)      # the secondary hashes an unhashed write
        assert (w.kind, w.epoch, w.seq, w.offset, w.length, w.digest) == (
            kind, epoch, seq, offset, length, digest)
        assert (None if w.data is None else bytes(w.data)) == data


# -- any group ---------------------------------------------------------------------------------
def canonical_header(h: bytes) -> bytes:
    """A forward header with its reserved bytes (after kind, after length) zeroed."""
    return h[:5] + bytes(3) + h[8:36] + bytes(4) + h[40:]


def check_group(headers: bytes, data: bytes) -> None:
    got = decode([headers, data])
    n, rest = divmod(len(headers), wire.FORWARD_HEADER.size)
    if n == 0 or rest:
        assert len(got) == 1 and isinstance(got[0], wire.ForwardError)
        assert got[0].status == errno.EINVAL and "forward header frame" in str(got[0])
        return
    assert len(got) == n
    parsed = list(wire.FORWARD_HEADER.iter_unpack(headers))
    pos = 0
    for i, (answer, fields) in enumerate(zip(got, parsed)):
        h = headers[i * wire.FORWARD_HEADER.size:(i + 1) * wire.FORWARD_HEADER.size]
        at = pos
        if fields[1] in wire.DATA_KINDS:      # its bytes of the data frame, refused or not
            pos += fields[5]
        if isinstance(answer, wire.ForwardError):
            assert answer.seq == fields[3] and answer.status in STATUSES, answer
            assert str(answer).startswith(("forwarded write seq", "forward group")), answer
            continue
        w = answer
        expected = canonical_header(h)
        if w.kind == wire.KIND_WRITE and h[40:] == wire.UNHASHED:
            expected = expected[:40] + wire.digest_of(w.data)   # hashed at the secondary
        assert wire.forward_header(w.kind, w.epoch, w.seq, w.offset, w.length, w.data,
                                   w.digest) == expected
        if w.kind in wire.DATA_KINDS:
            assert bytes(w.data) == data[at:at + w.length]
        else:
            assert w.data is None
    if not any(isinstance(a, wire.ForwardError) and str(a).startswith("forward group")
               for a in got):
        assert pos == len(data)          # every data byte belongs to exactly one write


@st.composite
def damaged_groups(draw):
    headers, data = (bytearray(f) for f in group(draw(st.lists(writes(), min_size=1,
                                                               max_size=3))))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["headers", "headers", "data"]))
        buf = headers if target == "headers" or not data else data
        how = draw(st.sampled_from(["byte", "word", "cut", "extend"]))
        if how == "byte" and buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        elif how == "word" and len(buf) >= 8:
            at = draw(st.integers(0, len(buf) - 8))
            buf[at:at + 8] = draw(st.sampled_from([0, 1, COMMITTED, 2**64 - 1]) | U64) \
                .to_bytes(8, "little")
        elif how == "cut" and buf:
            del buf[draw(st.integers(0, len(buf) - 1)):]
        else:
            buf += draw(st.binary(min_size=1, max_size=70))
    return bytes(headers), bytes(data)


@given(st.binary(max_size=200), st.binary(max_size=100))
def test_arbitrary_frames_give_one_answer_per_write(headers, data):
    check_group(headers, data)


@given(damaged_groups())
def test_damaged_groups_give_one_answer_per_write(frames):
    check_group(*frames)


# -- SEAL and ACK --------------------------------------------------------------------------------
@given(U64.filter(bool), U64)
def test_seal_round_trips(epoch, last_seq):
    assert wire.decode_seal(wire.encode_seal(epoch, last_seq)) == (epoch, last_seq)


@given(st.binary(min_size=wire.SEAL.size, max_size=wire.SEAL.size) | st.binary(max_size=40))
@example(b"XXXX" + bytes(4) + (5).to_bytes(8, "little") + bytes(16))
def test_any_seal_is_refused_or_read_back_exactly(frame):
    try:
        epoch, last_seq = wire.decode_seal(frame)
    except wire.ForwardError as exc:
        assert str(exc).startswith("SEAL") and exc.status == errno.EINVAL
        return
    canonical = frame[:4] + bytes(4) + frame[8:24] + bytes(8)
    assert wire.encode_seal(epoch, last_seq) == canonical


def test_a_seal_with_another_magic_is_refused():
    """decode_seal did not look at the magic (its caller's is_seal did): a 32-byte frame
    of anything but epoch 0 was read as a SEAL."""
    with pytest.raises(wire.ForwardError, match="SEAL: magic b'XXXX'"):
        wire.decode_seal(b"XXXX" + bytes(4) + (5).to_bytes(8, "little") + bytes(16))


acks = st.lists(st.tuples(U64, U32, st.text(max_size=20)), max_size=5)


@given(acks)
def test_ack_round_trips(entries):
    assert wire.decode_ack([wire.encode_ack(entries)]) == entries


@given(st.one_of(acks.map(wire.encode_ack), st.binary(max_size=80)), st.data())
def test_any_ack_is_refused_or_read_back_exactly(msg, data):
    msg = bytearray(msg)
    if msg and data.draw(st.booleans()):
        msg[data.draw(st.integers(0, len(msg) - 1))] = data.draw(st.integers(0, 255))
    msg = bytes(msg)
    try:
        entries = wire.decode_ack([msg])
    except ValueError as exc:
        assert "ack" in str(exc), exc
        return
    again = wire.encode_ack(entries)
    if all("\ufffd" not in r for _, _, r in entries):
        assert again == msg[:4] + struct.pack("<I", len(entries)) + bytes(8) + msg[16:]


# -- HEARTBEAT ---------------------------------------------------------------------------------
heartbeats = st.builds(Heartbeat, st.sampled_from([1, 2]), st.integers(1, 2**32 - 1),
                       U32, U64, st.integers(-2**63, 2**63 - 1), U64)


@given(heartbeats)
def test_heartbeat_round_trips(hb):
    assert decode_heartbeat(encode_heartbeat(hb)) == hb


@given(heartbeats, st.integers(0, RECORD_SIZE - 1), st.integers(0, 255), st.booleans())
def test_any_heartbeat_is_refused_naming_the_field_or_read_back_exactly(hb, at, value, fix_crc):
    import zlib
    msg = bytearray(encode_heartbeat(hb))
    msg[at] = value
    if fix_crc:   # damage behind a correct crc reaches the field checks
        struct.pack_into("<I", msg, RECORD_SIZE - 8, zlib.crc32(bytes(msg[:RECORD_SIZE - 8])))
    try:
        got = decode_heartbeat(bytes(msg))
    except HeartbeatError as exc:
        assert str(exc).startswith("HEARTBEAT: ") and any(
            w in str(exc) for w in ("length", "magic", "version", "crc32", "role", "reserved",
                                    "interval_ms")), exc
        return
    assert encode_heartbeat(got) == bytes(msg)
