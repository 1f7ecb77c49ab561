"""Fuzzing the wire decoder (pipeline/wire.py) for answers, not only for crashes.

Property 1 (arbitrary bytes): a message is either refused with a WireError whose text names
the record and the field, or it decodes to a value that the record's encoder turns back into
the very same bytes (after zeroing what docs/wire-format.md calls reserved or padding: zero
on write, ignored on read). So a decoder can neither crash, nor accept something it then
reads differently from what was sent.

Property 2 (generative round trips): every valid value of every record encodes and then
decodes to itself.

The wire module itself counts nothing: its callers (the receive stage, both coordinators,
the inputs stage) catch WireError and count it in their ``errors`` counter. What they rely on,
that nothing but WireError escapes a decoder, is what property 1 checks.

Examples come from the tests/conftest.py profile (fixed, bounded); ``HYPOTHESIS_PROFILE=fuzz``
hunts longer. scripts/fuzz_wire.py runs the same check under atheris.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline import wire
from pipeline.wire import WireError
from pipeline.wire_roundtrip import (
    MAX_BATCH, PAGE_COUNT, PAGE_SIZE, canonical, check_message, decode_record, reencode,
)

HDR = struct.Struct("<4sHHQII")
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


def record(rtype: int, body: bytes, epoch: int = 5, reserved: int = 0) -> bytes:
    return HDR.pack(b"COLO", 1, rtype, epoch, len(body), reserved) + body


# -- valid values of every record ------------------------------------------------------
hashes32 = st.binary(min_size=32, max_size=32)


@st.composite
def hellos(draw):
    page_size = draw(st.integers(1, 2**32 - 1))
    page_count = draw(st.integers(1, 2**64 - 1))
    top = min(page_size, 0xFFFF)
    written = []
    for _ in range(draw(st.integers(0, 3))):
        a = draw(st.integers(0, top - 1))
        written.append((draw(st.integers(0, min(page_count - 1, 2**64 - 1))), a,
                        draw(st.integers(a + 1, top))))
    return wire.Hello(page_size, draw(st.sampled_from([wire.ROLE_PRIMARY, wire.ROLE_SECONDARY])),
                      page_count, draw(st.text(max_size=20)), tuple(written))


@st.composite
def svm_dirties(draw):
    n = draw(st.integers(0, 8))
    pfns = np.array(draw(st.lists(st.integers(0, PAGE_COUNT - 1), min_size=n, max_size=n)),
                    np.uint64)
    hashes = np.frombuffer(draw(st.binary(min_size=32 * n, max_size=32 * n)),
                           np.uint8).reshape(n, 32)
    return wire.SvmDirty(draw(U64), pfns, hashes, draw(st.booleans()))


@st.composite
def page_batches(draw):
    """A valid PAGES record's fields: any mix of kinds (or a packed record)."""
    packed = draw(st.booleans())
    n = draw(st.integers(1, 6))
    kinds = (st.sampled_from([wire.ENC_RAW, wire.ENC_ZERO, wire.ENC_REF, wire.ENC_SVM])
             if packed else st.sampled_from(wire.ENC_KINDS))
    enc_kind = draw(st.lists(kinds, min_size=n, max_size=n))
    if packed and wire.ENC_RAW not in enc_kind:
        enc_kind[draw(st.integers(0, n - 1))] = wire.ENC_RAW
    enc_len = [PAGE_SIZE if k == wire.ENC_RAW else
               draw(st.integers(1, PAGE_SIZE - 1)) if k == wire.ENC_LZ4 else 0
               for k in enc_kind]
    total = sum(enc_len)
    size = draw(st.integers(1, total)) if packed else total
    data = draw(st.binary(min_size=size, max_size=size))
    return (draw(U64),
            np.array(draw(st.lists(st.integers(0, PAGE_COUNT - 1), min_size=n, max_size=n)),
                     np.uint64),
            np.frombuffer(draw(st.binary(min_size=32 * n, max_size=32 * n)),
                          np.uint8).reshape(n, 32),
            np.array(enc_len, np.uint32), np.array(enc_kind, np.uint8), data,
            wire.PAGES_PACKED if packed else 0)


acks = st.builds(wire.Ack, U64, st.sampled_from([wire.ACK_COMMITTED, wire.ACK_ABORTED]), U64,
                 hashes32, st.text(max_size=40), U64, U64)
# (a sealed EPOCH_END is tests/test_seal.py's: its flags bit needs a key)
epoch_ends = st.builds(wire.EpochEnd, U64, U64, U64, U32.map(lambda f: f & ~wire.EPOCH_END_SEALED),
                       st.binary(max_size=64))
begins = st.builds(wire.CheckpointBegin, U64, U32, st.sampled_from(
    [0, wire.FLAG_SYNC, wire.FLAG_DIGEST, wire.FLAG_SYNC | wire.FLAG_PRECOPY,
     wire.FLAG_SYNC | wire.FLAG_DIGEST, wire.BEGIN_FLAGS]))
inputs = st.tuples(U64, U64, st.binary(max_size=64))


def encode_batch(fields) -> bytes:
    epoch, pfns, hashes, enc_len, enc_kind, data, flags = fields
    return wire.encode_pages(epoch, pfns, hashes, enc_len, enc_kind, data, flags)


#: a valid message of any record type, by its encoder
valid_messages = st.one_of(
    hellos().map(lambda h: wire.encode_hello(h.page_size, h.role, h.page_count, h.name,
                                             h.written)),
    begins.map(lambda b: wire.encode_checkpoint_begin(b.epoch, b.cause, b.flags)),
    svm_dirties().map(lambda s: wire.encode_svm_dirty(s.epoch, s.pfns, s.hashes, s.more)),
    page_batches().map(encode_batch),
    epoch_ends.map(lambda e: wire.encode_epoch_end(e.epoch, e.pages, e.records, e.flags,
                                                   e.vcpu)),
    acks.map(lambda a: wire.encode_ack(a.epoch, a.status, a.pages_applied, a.reason,
                                       a.memory_digest, a.assembled_ns, a.apply_ns)),
    inputs.map(lambda i: wire.encode_input(*i)),
    U64.map(wire.encode_shutdown),
    st.lists(st.dictionaries(st.text(max_size=8), U64, max_size=3), max_size=3).map(
        wire.encode_net_offsets),
)


# -- property 2: valid values round-trip -----------------------------------------------
@given(hellos())
def test_hello_round_trips(h):
    msg = wire.encode_hello(h.page_size, h.role, h.page_count, h.name, h.written)
    assert wire.decode_hello(msg) == h


@given(begins)
def test_checkpoint_begin_round_trips(b):
    assert wire.decode_checkpoint_begin(wire.encode_checkpoint_begin(b.epoch, b.cause,
                                                                     b.flags)) == b


@given(svm_dirties())
def test_svm_dirty_round_trips(s):
    got = wire.decode_svm_dirty(wire.encode_svm_dirty(s.epoch, s.pfns, s.hashes, s.more),
                                PAGE_COUNT)
    assert got.epoch == s.epoch and got.more == s.more
    assert np.array_equal(got.pfns, s.pfns) and np.array_equal(got.hashes, s.hashes)


@given(page_batches())
def test_pages_round_trip(fields):
    epoch, pfns, hashes, enc_len, enc_kind, data, flags = fields
    b = wire.decode_pages(encode_batch(fields), PAGE_COUNT, PAGE_SIZE, MAX_BATCH)
    assert (b.epoch, b.packed, bytes(b.data)) == (epoch, bool(flags), data)
    for got, want in ((b.pfns, pfns), (b.hashes, hashes), (b.enc_len, enc_len),
                      (b.enc_kind, enc_kind)):
        assert np.array_equal(got, want)
    assert list(b.offsets) == [int(enc_len[:i].sum()) for i in range(len(enc_len))]


@given(epoch_ends)
def test_epoch_end_round_trips(e):
    assert wire.decode_epoch_end(wire.encode_epoch_end(e.epoch, e.pages, e.records, e.flags,
                                                       e.vcpu)) == e


@given(acks)
def test_ack_round_trips(a):
    assert wire.decode_ack(wire.encode_ack(a.epoch, a.status, a.pages_applied, a.reason,
                                           a.memory_digest, a.assembled_ns, a.apply_ns)) == a


@given(inputs)
def test_input_round_trips(i):
    assert wire.decode_input(wire.encode_input(*i)) == i


@given(U64)
def test_shutdown_round_trips(epoch):
    assert wire.decode_shutdown(wire.encode_shutdown(epoch)) == epoch


@given(valid_messages)
def test_every_valid_message_is_accepted_and_encodes_back_exactly(msg):
    value = decode_record(msg)
    assert reencode(value) == msg


# -- property 1: arbitrary bytes are refused (naming record and field) or read back exact --
@st.composite
def mutated(draw):
    """A valid message with one kind of damage (the decoder's deep paths need a valid start)."""
    msg = bytearray(draw(valid_messages))
    how = draw(st.sampled_from(["byte", "word", "truncate", "extend", "header"]))
    if how == "byte":
        for _ in range(draw(st.integers(1, 3))):
            msg[draw(st.integers(0, len(msg) - 1))] = draw(st.integers(0, 255))
    elif how == "word":   # a count, a length or an epoch set to anything
        size = draw(st.sampled_from([1, 2, 4, 8]))
        value = draw(st.one_of(st.integers(0, 2**(8 * size) - 1),
                               st.sampled_from([0, 1, 2**(8 * size) - 1])))
        at = draw(st.integers(0, len(msg) - size))
        msg[at:at + size] = value.to_bytes(size, "little")
    elif how == "truncate":
        del msg[draw(st.integers(0, len(msg) - 1)):]
    elif how == "extend":
        msg += draw(st.binary(min_size=1, max_size=48))
    else:               # header fields only: type, epoch, reserved
        struct.pack_into("<HQ", msg, 6, draw(st.integers(0, 0xFFFF)), draw(U64))
        struct.pack_into("<I", msg, 20, draw(U32))
    if how != "truncate" and len(msg) >= wire.HEADER_SIZE and draw(st.booleans()):
        struct.pack_into("<I", msg, 16, len(msg) - wire.HEADER_SIZE)   # length made to agree
    return bytes(msg)


headers_with_any_body = st.builds(
    record, st.one_of(st.sampled_from(sorted(wire.RECORD_NAMES)), st.integers(0, 0xFFFF)),
    st.binary(max_size=300), U64, U32)


@given(st.binary(max_size=120))
def test_arbitrary_bytes_are_refused_or_read_back_exactly(data):
    check_message(data)


@given(headers_with_any_body)
@example(record(wire.HELLO, struct.pack("<IB3xQII", 4096, 1, 8, 0, 0), epoch=3))
@example(record(wire.ACK, struct.pack("<IIQ32sQQ", 0, 1, 0, bytes(32), 0, 0) + b"\xff"))
@example(record(wire.SHUTDOWN, b"x"))
def test_any_body_behind_a_valid_header_is_refused_or_read_back_exactly(msg):
    check_message(msg)


@given(mutated())
def test_damaged_valid_messages_are_refused_or_read_back_exactly(msg):
    check_message(msg)


# -- the regressions the fuzzing found (each was accepted and read differently) -----------
def test_hello_with_a_nonzero_epoch_is_refused():
    """HELLO is epoch 0 (docs/wire-format.md); an epoch 3 HELLO used to be accepted and would
    be re-encoded with epoch 0."""
    msg = bytearray(wire.encode_hello(4096, wire.ROLE_PRIMARY, 8, "p"))
    struct.pack_into("<Q", msg, 8, 3)
    with pytest.raises(WireError, match="HELLO: epoch 3"):
        wire.decode_hello(bytes(msg))


def test_ack_with_a_reason_that_is_not_utf8_is_refused():
    """ACK's reason is UTF-8; it used to be decoded with replacement characters, so the
    value read was not what was sent."""
    msg = record(wire.ACK, struct.pack("<IIQ32sQQ", 1, 2, 0, bytes(32), 0, 0) + b"\xc3(")
    with pytest.raises(WireError, match="ACK: reason is not UTF-8"):
        wire.decode_ack(msg)


def test_shutdown_with_a_body_is_refused():
    """SHUTDOWN has an empty body; it had no validator, so any body was taken as one."""
    with pytest.raises(WireError, match="SHUTDOWN: body_length 1"):
        wire.decode_shutdown(record(wire.SHUTDOWN, b"x"))


def test_a_record_of_another_type_names_the_type_field():
    msg = wire.encode_input(1, 2, b"")
    with pytest.raises(WireError, match="PAGES: record type INPUT"):
        wire.decode_pages(msg, PAGE_COUNT, PAGE_SIZE, MAX_BATCH)


def test_canonical_zeroes_only_reserved_and_padding():
    """The comparison's normalisation touches nothing but the documented reserved bytes."""
    msg = bytearray(wire.encode_hello(4096, 1, 8, "p"))
    msg[20:24] = b"\xff" * 4       # header reserved
    msg[24 + 6:24 + 8] = b"\xee" * 2   # HELLO's reserved 2 bytes (after its flags)
    assert canonical(bytes(msg)) == wire.encode_hello(4096, 1, 8, "p")
    b = wire.encode_pages(1, np.array([2], np.uint64), np.zeros((1, 32), np.uint8),
                          np.array([0], np.uint32), np.array([wire.ENC_ZERO], np.uint8), b"")
    padded = bytearray(b)
    padded[-3:] = b"\x01\x02\x03"  # 8 + 45 bytes of arrays: 3 bytes of padding end the body
    assert canonical(bytes(padded)) == b


# -- the atheris harness (scripts/fuzz_wire.py) runs a fixed amount of work in CI -----------------
def _harness(tmp_path, *args: str) -> dict:
    import json
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "fuzz_wire.py")
    p = subprocess.run([sys.executable, script, "--seed", "1", "--seconds", "120", "--json",
                        "--artifacts", str(tmp_path / "artifacts"), *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"the fuzzer found a crash:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_atheris_harness_runs_and_finds_nothing(tmp_path):
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.fail("atheris is not installed: scripts/install.sh --test installs the "
                    "project's [fuzz] extra")
    got = _harness(tmp_path, "--engine", "atheris", "--runs", "20000")
    assert (got["engine"], got["crashes"], got["crash_files"]) == ("atheris", 0, [])
    assert got["executions"] >= 20000 and got["coverage_edges"] > 0


def test_random_harness_runs_and_finds_nothing(tmp_path):
    got = _harness(tmp_path, "--engine", "random", "--runs", "20000")
    assert (got["engine"], got["crashes"], got["executions"]) == ("random", 0, 20000)
    assert got["accepted"] and got["refused"]   # both answers are exercised
