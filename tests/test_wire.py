"""The wire format (docs/wire-format.md, pipeline/wire.py): round trips, every validator's
rejections, and a property test that a decoder never fails with anything but WireError."""
from __future__ import annotations

import struct

import blake3
import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import wire
from pipeline.wire import WireError

PAGE_SIZE = 4096
PAGE_COUNT = 1024
MAX_BATCH = 64

HDR = struct.Struct("<4sHHQII")


# -- helpers ---------------------------------------------------------------------------
def record(rtype: int, body: bytes, epoch: int = 5, *, marker: bytes = b"COLO",
           version: int = 1, body_length: int | None = None, reserved: int = 0) -> bytes:
    """A raw record with any header fields, right or wrong."""
    length = len(body) if body_length is None else body_length
    return HDR.pack(marker, version, rtype, epoch, length, reserved) + body


def body_of(msg: bytes) -> bytes:
    return msg[wire.HEADER_SIZE:]


def with_body(msg: bytes, body: bytes) -> bytes:
    """``msg`` with its body replaced and body_length fixed up (so only the body is wrong)."""
    _, _, rtype, epoch, _, _ = HDR.unpack_from(msg, 0)
    return record(rtype, body, epoch)


def rejects(msg: bytes, decode, *words: str) -> str:
    """``decode(msg)`` raises WireError whose message contains every one of ``words``."""
    with pytest.raises(WireError) as exc_info:
        decode(msg)
    text = str(exc_info.value)
    for w in words:
        assert w in text, f"{w!r} not in WireError message {text!r}"
    return text


def dec_pages(msg: bytes):
    return wire.decode_pages(msg, PAGE_COUNT, PAGE_SIZE, MAX_BATCH)


def dec_svm_dirty(msg: bytes):
    return wire.decode_svm_dirty(msg, PAGE_COUNT)


def page(fill: int | None = None, seed: int = 0) -> bytes:
    if fill is not None:
        return bytes([fill]) * PAGE_SIZE
    return np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def text_page() -> bytes:
    return (b"the quick brown fox jumps over the lazy dog. " * 100)[:PAGE_SIZE]


def pages_record(kinds: list[int], epoch: int = 9, pfns: list[int] | None = None,
                 enc_len: list[int] | None = None, data: bytes | None = None) -> bytes:
    """A valid PAGES record (unless enc_len/data are given) with pages of ``kinds``."""
    n = len(kinds)
    pfns = pfns if pfns is not None else [3 * i + 1 for i in range(n)]
    plains, encs = [], []
    for i, kind in enumerate(kinds):
        if kind == wire.ENC_RAW:
            p = page(seed=i)
            plains.append(p), encs.append(p)
        elif kind == wire.ENC_LZ4:
            p = text_page()
            enc = lz4.block.compress(p, store_size=False)
            assert 0 < len(enc) < PAGE_SIZE
            plains.append(p), encs.append(enc)
        elif kind == wire.ENC_ZERO:
            plains.append(bytes(PAGE_SIZE)), encs.append(b"")
        else:
            plains.append(page(fill=0x5A)), encs.append(b"")
    hashes = np.frombuffer(b"".join(blake3.blake3(p).digest() for p in plains),
                           np.uint8).reshape(n, 32) if n else np.zeros((0, 32), np.uint8)
    lens = enc_len if enc_len is not None else [len(e) for e in encs]
    payload = data if data is not None else b"".join(encs)
    return wire.encode_pages(epoch, np.array(pfns, np.uint64), hashes,
                             np.array(lens, np.uint32), np.array(kinds, np.uint8), payload)


def pages_meta(n: int) -> tuple[int, int]:
    """(offset of enc_len, offset of enc_kind) in a PAGES body of n pages."""
    enc_len_at = 8 + 8 * n + 32 * n
    return enc_len_at, enc_len_at + 4 * n


# -- round trips -----------------------------------------------------------------------
def test_hello_round_trip():
    for role in (wire.ROLE_PRIMARY, wire.ROLE_SECONDARY):
        for name in ("", "node-a", "nœud-ß-東京"):
            msg = wire.encode_hello(PAGE_SIZE, role, 262144, name)
            hdr = wire.decode_header(msg)
            assert (hdr.type, hdr.name, hdr.epoch) == (wire.HELLO, "HELLO", 0)
            assert hdr.body_length == len(msg) - wire.HEADER_SIZE
            assert wire.decode_hello(msg) == wire.Hello(PAGE_SIZE, role, 262144, name)


def test_checkpoint_begin_round_trip():
    for cause, flags in ((0, 0), (3, wire.FLAG_SYNC), (1, wire.FLAG_DIGEST),
                         (2**32 - 1, wire.FLAG_SYNC | wire.FLAG_DIGEST)):
        msg = wire.encode_checkpoint_begin(2**63 + 7, cause, flags)
        assert wire.decode_header(msg).type == wire.CHECKPOINT_BEGIN
        assert wire.decode_checkpoint_begin(msg) == wire.CheckpointBegin(2**63 + 7, cause, flags)


@pytest.mark.parametrize("pfns", [[], [0], [1, 5, 6, PAGE_COUNT - 1]])
def test_svm_dirty_round_trip(pfns):
    hashes = np.arange(32 * len(pfns), dtype=np.uint32).astype(np.uint8).reshape(-1, 32)
    msg = wire.encode_svm_dirty(11, np.array(pfns, np.uint64), hashes)
    assert wire.decode_header(msg).type == wire.SVM_DIRTY
    got = dec_svm_dirty(msg)
    assert got.epoch == 11
    assert got.pfns.dtype == np.dtype("<u8") and got.pfns.tolist() == pfns
    assert got.hashes.shape == (len(pfns), 32) and (got.hashes == hashes).all()
    # without hashes: all zero, which matches no page
    assert not dec_svm_dirty(wire.encode_svm_dirty(11, np.array(pfns, np.uint64))).hashes.any()


@pytest.mark.parametrize("kinds", [
    [wire.ENC_RAW],
    [wire.ENC_LZ4],
    [wire.ENC_ZERO],
    [wire.ENC_REF],
    [wire.ENC_SVM],
    [wire.ENC_RAW, wire.ENC_LZ4, wire.ENC_ZERO, wire.ENC_REF, wire.ENC_LZ4, wire.ENC_RAW,
     wire.ENC_SVM],
    [wire.ENC_ZERO] * MAX_BATCH,
])
def test_pages_round_trip(kinds):
    n = len(kinds)
    pfns = [(7 * i + 2) % PAGE_COUNT for i in range(n)]
    msg = pages_record(kinds, epoch=42, pfns=pfns)
    assert wire.decode_header(msg).type == wire.PAGES
    b = dec_pages(msg)
    assert b.epoch == 42 and b.count == n
    assert b.pfns.tolist() == pfns
    assert b.enc_kind.tolist() == kinds
    assert b.hashes.shape == (n, 32)
    assert int(b.enc_len.sum()) == len(b.data)
    assert b.offsets.tolist() == [int(x) for x in np.concatenate(([0], np.cumsum(b.enc_len)[:-1]))]
    # each page's encoding decodes back to the page its hash names
    for i, kind in enumerate(kinds):
        enc = bytes(b.data[b.offsets[i]:b.offsets[i] + b.enc_len[i]])
        if kind == wire.ENC_RAW:
            plain = enc
        elif kind == wire.ENC_LZ4:
            plain = lz4.block.decompress(enc, uncompressed_size=PAGE_SIZE)
        elif kind == wire.ENC_ZERO:
            assert enc == b""
            plain = bytes(PAGE_SIZE)
        else:
            assert enc == b""
            plain = page(fill=0x5A)
        assert blake3.blake3(plain).digest() == bytes(b.hashes[i])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9])
def test_pages_padding_for_every_count(n):
    """The metadata is padded to a multiple of 8 whatever the count (45·n is odd for odd n)."""
    msg = pages_record([wire.ENC_RAW] * n)
    meta = 8 + 45 * n
    assert len(body_of(msg)) == meta + (-meta % 8) + n * PAGE_SIZE
    assert dec_pages(msg).count == n


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, MAX_BATCH])
def test_pages_laid_before_their_data_are_the_same_record(n):
    """The send stage lays a PAGES record's header and arrays in front of the data in a
    ring slot (encode_pages_prefix) and sends that memory: byte for byte the record the
    wire format defines (docs/wire-format.md), built here field by field, and what
    encode_pages returns. A prefix that does not fit is refused, naming the sizes."""
    rng = np.random.default_rng(n)
    pfns = rng.integers(0, PAGE_COUNT, n).astype(np.uint64)
    hashes = rng.integers(0, 256, (n, 32)).astype(np.uint8)
    kinds = np.full(n, wire.ENC_RAW, np.uint8)
    kinds[::3] = wire.ENC_ZERO
    enc_len = np.where(kinds == wire.ENC_RAW, PAGE_SIZE, 0).astype(np.uint32)
    data = rng.integers(0, 256, int(enc_len.sum())).astype(np.uint8)
    meta = n * 45
    body = (struct.pack("<II", n, wire.PAGES_UNHASHED) + pfns.astype("<u8").tobytes()
            + hashes.tobytes() + enc_len.astype("<u4").tobytes() + kinds.tobytes()
            + bytes(-meta % 8) + data.tobytes())
    spec = struct.pack("<4sHHQII", b"COLO", 1, wire.PAGES, 9, len(body), 0) + body
    assert wire.encode_pages(9, pfns, hashes, enc_len, kinds, data, wire.PAGES_UNHASHED) == spec
    room = wire.pages_prefix_size(MAX_BATCH)
    slot = np.full(room + len(data), 0xEE, np.uint8)    # a slot's prefix area, then data
    slot[room:] = data
    start = wire.encode_pages_prefix(slot[:room], 9, pfns, hashes, enc_len, kinds, len(data),
                                     wire.PAGES_UNHASHED)
    assert slot[start:].tobytes() == spec
    with pytest.raises(ValueError, match="need"):
        wire.encode_pages_prefix(slot[:wire.HEADER_SIZE], 9, pfns, hashes, enc_len, kinds,
                                 len(data))


@pytest.mark.parametrize("flags,vcpu", [(wire.FLAG_SYNC, b""), (0, b"\x00\x01vcpu-state" * 50)])
def test_epoch_end_round_trip(flags, vcpu):
    msg = wire.encode_epoch_end(13, 1000, 16, flags, vcpu)
    assert wire.decode_header(msg).type == wire.EPOCH_END
    assert wire.decode_epoch_end(msg) == wire.EpochEnd(13, 1000, 16, flags, vcpu)


def test_ack_round_trip():
    digest = bytes(range(32))
    msg = wire.encode_ack(21, wire.ACK_COMMITTED, 77, memory_digest=digest)
    assert wire.decode_header(msg).type == wire.ACK
    assert wire.decode_ack(msg) == wire.Ack(21, wire.ACK_COMMITTED, 77, digest, "")
    msg = wire.encode_ack(22, wire.ACK_ABORTED, 0, reason="epoch torn: 3 pages missing — ß")
    assert wire.decode_ack(msg) == wire.Ack(22, wire.ACK_ABORTED, 0, bytes(32),
                                            "epoch torn: 3 pages missing — ß")
    # the secondary's two durations (the primary splits its commit time by them)
    msg = wire.encode_ack(23, wire.ACK_COMMITTED, 5, assembled_ns=2**40 + 7, apply_ns=123)
    assert wire.decode_ack(msg) == wire.Ack(23, wire.ACK_COMMITTED, 5, bytes(32), "",
                                            2**40 + 7, 123)


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 9])
def test_input_round_trip(payload):
    msg = wire.encode_input(4, 2**64 - 1, payload)
    assert wire.decode_header(msg).type == wire.INPUT
    assert wire.decode_input(msg) == (4, 2**64 - 1, payload)


def test_shutdown_round_trip():
    msg = wire.encode_shutdown(99)
    assert len(msg) == wire.HEADER_SIZE
    hdr = wire.decode_header(msg)
    assert hdr == wire.Header(wire.SHUTDOWN, 99, 0)
    assert hdr.type & wire.OPTIONAL_BIT and hdr.name == "SHUTDOWN"


def test_decoders_accept_memoryview_and_bytearray():
    msg = pages_record([wire.ENC_RAW, wire.ENC_ZERO])
    assert dec_pages(memoryview(msg)).count == 2
    assert dec_pages(bytearray(msg)).count == 2
    assert wire.decode_hello(memoryview(wire.encode_hello(4096, 1, 5, "a"))).name == "a"


# -- the header --------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 23])
def test_header_short_message(size):
    rejects(wire.encode_checkpoint_begin(1, 0)[:size], wire.decode_header,
            "record", "header", f"{size} bytes")


def test_header_bad_marker():
    msg = wire.encode_checkpoint_begin(1, 0)
    rejects(b"XOLO" + msg[4:], wire.decode_header, "record", "marker", "XOLO")
    rejects(b"colo" + msg[4:], wire.decode_header, "record", "marker")


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_header_wrong_version(version):
    msg = record(wire.CHECKPOINT_BEGIN, bytes(8), version=version)
    rejects(msg, wire.decode_header, "record", "version", str(version))


@pytest.mark.parametrize("delta", [-1, 1, 1000, -8])
def test_header_body_length_mismatch(delta):
    msg = record(wire.CHECKPOINT_BEGIN, bytes(8), body_length=8 + delta)
    rejects(msg, wire.decode_header, "CHECKPOINT_BEGIN", "body_length", str(8 + delta))


def test_header_body_length_mismatch_after_truncation():
    msg = pages_record([wire.ENC_RAW])
    rejects(msg[:-1], wire.decode_header, "PAGES", "body_length")
    rejects(msg + b"\0", wire.decode_header, "PAGES", "body_length")


@pytest.mark.parametrize("rtype", [0x0000, 0x0008, 0x0009, 0x7FFF])
def test_header_unknown_mandatory_type(rtype):
    rejects(record(rtype, b"abc"), wire.decode_header, "record", "type", f"0x{rtype:04x}")


@pytest.mark.parametrize("rtype", [0x8000, 0x80FF, 0x9001, 0xFFFF])
def test_header_unknown_optional_type_is_accepted(rtype):
    hdr = wire.decode_header(record(rtype, b"some future body", epoch=3))
    assert hdr == wire.Header(rtype, 3, len(b"some future body"))
    assert hdr.name == f"0x{rtype:04x}"


def test_header_reserved_is_ignored():
    msg = record(wire.CHECKPOINT_BEGIN, struct.pack("<II", 1, 0), epoch=8, reserved=0xDEADBEEF)
    assert wire.decode_checkpoint_begin(msg) == wire.CheckpointBegin(8, 1, 0)


@pytest.mark.parametrize("decode,msg", [
    (wire.decode_hello, wire.encode_checkpoint_begin(1, 0)),
    (wire.decode_checkpoint_begin, wire.encode_hello(4096, 1, 5, "x")),
    (dec_svm_dirty, wire.encode_input(1, 1, b"")),
    (dec_pages, wire.encode_epoch_end(1, 0, 0, 0, b"")),
    (wire.decode_epoch_end, wire.encode_svm_dirty(1, np.array([], np.uint64))),
    (wire.decode_ack, wire.encode_shutdown(1)),
    (wire.decode_input, wire.encode_ack(1, 0)),
])
def test_decoder_refuses_another_record_type(decode, msg):
    rejects(msg, decode, "record type", "expected")


def test_decoders_check_the_header_first():
    rejects(b"XOLO" + wire.encode_hello(4096, 1, 5, "x")[4:], wire.decode_hello, "marker")
    rejects(pages_record([wire.ENC_RAW])[:-3], dec_pages, "PAGES", "body_length")


# -- PAGES ----------------------------------------------------------------------------
def test_pages_count_zero():
    msg = record(wire.PAGES, struct.pack("<II", 0, 0))
    rejects(msg, dec_pages, "PAGES", "count", "0")


def test_pages_count_above_max_batch():
    msg = pages_record([wire.ENC_ZERO] * (MAX_BATCH + 1))
    rejects(msg, dec_pages, "PAGES", "count", str(MAX_BATCH + 1), str(MAX_BATCH))
    # the same record is fine for a node whose max_batch is larger
    assert wire.decode_pages(msg, PAGE_COUNT, PAGE_SIZE, MAX_BATCH + 1).count == MAX_BATCH + 1


def test_pages_count_huge_is_rejected_before_reading_arrays():
    rejects(record(wire.PAGES, struct.pack("<II", 2**32 - 1, 0)), dec_pages, "PAGES", "count")


@pytest.mark.parametrize("pfn", [PAGE_COUNT, PAGE_COUNT + 1, 2**64 - 1])
def test_pages_pfn_beyond_page_count(pfn):
    msg = pages_record([wire.ENC_ZERO, wire.ENC_ZERO], pfns=[0, pfn])
    rejects(msg, dec_pages, "PAGES", "pfn", str(pfn), str(PAGE_COUNT))


def test_pages_last_pfn_is_accepted():
    assert dec_pages(pages_record([wire.ENC_ZERO], pfns=[PAGE_COUNT - 1])).pfns[0] == PAGE_COUNT - 1


@pytest.mark.parametrize("kind", [5, 6, 0xFF])
def test_pages_unknown_enc_kind(kind):
    n = 2
    body = bytearray(body_of(pages_record([wire.ENC_ZERO] * n)))
    _, kind_at = pages_meta(n)
    body[kind_at + 1] = kind
    rejects(with_body(pages_record([wire.ENC_ZERO] * n), bytes(body)), dec_pages,
            "PAGES", "enc_kind", str(kind))


@pytest.mark.parametrize("enc_len", [0, 1, PAGE_SIZE - 1, PAGE_SIZE + 1])
def test_pages_raw_with_wrong_enc_len(enc_len):
    msg = pages_record([wire.ENC_RAW], enc_len=[enc_len], data=bytes(enc_len))
    rejects(msg, dec_pages, "PAGES", "RAW", "enc_len")


@pytest.mark.parametrize("enc_len", [0, PAGE_SIZE, PAGE_SIZE + 1])
def test_pages_lz4_with_bad_enc_len(enc_len):
    msg = pages_record([wire.ENC_LZ4], enc_len=[enc_len], data=bytes(enc_len))
    rejects(msg, dec_pages, "PAGES", "LZ4", "enc_len")


# A ZERO or REF page carrying data: the message should name the field (enc_len) like every
# other one; it says "PAGES: a ZERO or REF page with data".
@pytest.mark.parametrize("kind", [wire.ENC_ZERO, wire.ENC_REF, wire.ENC_SVM])
@pytest.mark.parametrize("enc_len", [1, PAGE_SIZE])
def test_pages_zero_or_ref_with_data_is_rejected(kind, enc_len):
    msg = pages_record([wire.ENC_RAW, kind], enc_len=[PAGE_SIZE, enc_len],
                       data=page(seed=1) + bytes(enc_len))
    text = rejects(msg, dec_pages, "PAGES")
    assert "ZERO" in text or "REF" in text


@pytest.mark.parametrize("kind", [wire.ENC_ZERO, wire.ENC_REF, wire.ENC_SVM])
def test_pages_zero_or_ref_with_data_names_enc_len(kind):
    msg = pages_record([kind], enc_len=[1], data=b"\0")
    rejects(msg, dec_pages, "PAGES", "enc_len")


@pytest.mark.parametrize("extra", [-1, 1, -PAGE_SIZE, 4096 * 3])
def test_pages_enc_len_sum_does_not_match_data(extra):
    good = pages_record([wire.ENC_RAW, wire.ENC_LZ4, wire.ENC_ZERO])
    body = body_of(good)
    body = body[:len(body) + extra] if extra < 0 else body + bytes(extra)
    rejects(with_body(good, body), dec_pages, "PAGES", "enc_len", "data")


def test_pages_data_after_zero_pages_only():
    good = pages_record([wire.ENC_ZERO, wire.ENC_REF])
    rejects(with_body(good, body_of(good) + b"\0"), dec_pages, "PAGES", "enc_len", "data")


@pytest.mark.parametrize("n", [1, 2, 5, MAX_BATCH])
def test_pages_truncated_arrays(n):
    good = pages_record([wire.ENC_ZERO] * n)
    body = body_of(good)
    meta = 8 + 45 * n
    data_at = meta + (-meta % 8)
    assert len(body) == data_at
    for cut in sorted({4, 8, 8 + 8 * n - 1, 8 + 40 * n, meta - 1, data_at - 1}):
        rejects(with_body(good, body[:cut]), dec_pages, "PAGES", "too short", str(cut))


# -- SVM_DIRTY ---------------------------------------------------------------------------
@pytest.mark.parametrize("count,pfns", [(3, [1, 2]), (1, [1, 2]), (0, [4]), (2**31, [1]),
                                        (2**32 - 1, [])])
def test_svm_dirty_count_mismatch(count, pfns):
    body = struct.pack("<II", count, 0) + np.array(pfns, "<u8").tobytes()
    rejects(record(wire.SVM_DIRTY, body), dec_svm_dirty, "SVM_DIRTY", "count", str(count))


@pytest.mark.parametrize("flags", [2, 1 << 31, 0xFFFFFFFF])
def test_svm_dirty_unknown_flags(flags):
    body = struct.pack("<II", 0, flags)
    rejects(record(wire.SVM_DIRTY, body), dec_svm_dirty, "SVM_DIRTY", "flags", f"{flags:08x}")


def test_svm_dirty_part_round_trip():
    hashes = np.arange(64, dtype=np.uint8).reshape(2, 32)
    got = dec_svm_dirty(wire.encode_svm_dirty(4, np.array([5, 9], np.uint64), hashes, more=True))
    assert got.more and got.pfns.tolist() == [5, 9] and (got.hashes == hashes).all()
    assert not dec_svm_dirty(wire.encode_svm_dirty(4, np.array([5], np.uint64))).more


@pytest.mark.parametrize("body", [b"", b"\1\0\0", bytes(7)])
def test_svm_dirty_too_short_for_count(body):
    rejects(record(wire.SVM_DIRTY, body), dec_svm_dirty, "SVM_DIRTY", "count")


def test_svm_dirty_count_with_odd_trailing_bytes():
    body = struct.pack("<II", 1, 0) + bytes(9)
    rejects(record(wire.SVM_DIRTY, body), dec_svm_dirty, "SVM_DIRTY", "count")


@pytest.mark.parametrize("pfn", [PAGE_COUNT, 2**64 - 1])
def test_svm_dirty_pfn_out_of_range(pfn):
    msg = wire.encode_svm_dirty(1, np.array([0, 3, pfn], np.uint64))
    rejects(msg, dec_svm_dirty, "SVM_DIRTY", "pfn", str(pfn))


# -- EPOCH_END -------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_epoch_end_vcpu_length_mismatch(delta):
    good = wire.encode_epoch_end(3, 10, 1, 0, b"abcd")
    body = body_of(good)
    body = body[:len(body) + delta] if delta < 0 else body + bytes(delta)
    rejects(with_body(good, body), wire.decode_epoch_end, "EPOCH_END", "vcpu_length")


def test_epoch_end_vcpu_length_huge():
    body = struct.pack("<QQII", 1, 1, 0, 2**32 - 1) + b"xy"
    rejects(record(wire.EPOCH_END, body), wire.decode_epoch_end, "EPOCH_END", "vcpu_length")


@pytest.mark.parametrize("size", [0, 23])
def test_epoch_end_too_short(size):
    rejects(record(wire.EPOCH_END, bytes(size)), wire.decode_epoch_end, "EPOCH_END", "too short")


# -- ACK ---------------------------------------------------------------------------
@pytest.mark.parametrize("status", [2, 0xFFFFFFFF])
def test_ack_unknown_status(status):
    msg = wire.encode_ack(1, status, 5, reason="x")
    rejects(msg, wire.decode_ack, "ACK", "status", str(status))


@pytest.mark.parametrize("delta", [-1, 1])
def test_ack_reason_length_mismatch(delta):
    good = wire.encode_ack(1, wire.ACK_ABORTED, 0, reason="torn")
    body = body_of(good)
    body = body[:len(body) + delta] if delta < 0 else body + b"!"
    rejects(with_body(good, body), wire.decode_ack, "ACK", "reason_length")


@pytest.mark.parametrize("size", [47, 63])
def test_ack_too_short(size):
    rejects(record(wire.ACK, bytes(size)), wire.decode_ack, "ACK", "too short")


# -- HELLO -----------------------------------------------------------------------------
@pytest.mark.parametrize("role", [0, 3, 255])
def test_hello_bad_role(role):
    rejects(wire.encode_hello(4096, role, 10, "n"), wire.decode_hello, "HELLO", "role", str(role))


@pytest.mark.parametrize("name", [b"\xff", b"ab\xc3", b"\xed\xa0\x80", b"ok\x80ok"])
def test_hello_name_not_utf8(name):
    body = struct.pack("<IB3xQII", 4096, wire.ROLE_PRIMARY, 10, len(name), 0) + name
    rejects(record(wire.HELLO, body, epoch=0), wire.decode_hello, "HELLO", "name", "UTF-8")


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_hello_name_length_mismatch(delta):
    good = wire.encode_hello(4096, wire.ROLE_SECONDARY, 10, "name")
    body = body_of(good)
    body = body[:len(body) + delta] if delta < 0 else body + bytes(delta)
    rejects(with_body(good, body), wire.decode_hello, "HELLO", "name_length")


def test_hello_too_short():
    rejects(record(wire.HELLO, bytes(23)), wire.decode_hello, "HELLO", "too short")


# -- CHECKPOINT_BEGIN, INPUT --------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 4, 7, 9, 16])
def test_checkpoint_begin_wrong_size(size):
    rejects(record(wire.CHECKPOINT_BEGIN, bytes(size)), wire.decode_checkpoint_begin,
            "CHECKPOINT_BEGIN", "body", str(size))


@pytest.mark.parametrize("size", [0, 1, 7])
def test_input_too_short(size):
    rejects(record(wire.INPUT, bytes(size)), wire.decode_input, "INPUT", "seq", "too short")


# -- property: nothing but WireError --------------------------------------------------------
DECODERS = {
    wire.HELLO: wire.decode_hello,
    wire.CHECKPOINT_BEGIN: wire.decode_checkpoint_begin,
    wire.SVM_DIRTY: dec_svm_dirty,
    wire.PAGES: dec_pages,
    wire.EPOCH_END: wire.decode_epoch_end,
    wire.ACK: wire.decode_ack,
    wire.INPUT: wire.decode_input,
}


def decode_any(msg: bytes):
    """What a receiver does: the header, then the matching decoder. Only WireError may escape."""
    try:
        hdr = wire.decode_header(msg)
        dec = DECODERS.get(hdr.type)
        return dec(msg) if dec else hdr
    except WireError:
        return None


def valid_records() -> list[bytes]:
    return [
        wire.encode_hello(PAGE_SIZE, wire.ROLE_PRIMARY, PAGE_COUNT, "prim"),
        wire.encode_checkpoint_begin(3, 1, wire.FLAG_DIGEST),
        wire.encode_svm_dirty(3, np.array([1, 2, 900], np.uint64)),
        pages_record([wire.ENC_RAW, wire.ENC_LZ4, wire.ENC_ZERO, wire.ENC_REF, wire.ENC_LZ4]),
        pages_record([wire.ENC_ZERO, wire.ENC_REF, wire.ENC_ZERO]),
        wire.encode_epoch_end(3, 5, 1, 0, b"vcpu" * 3),
        wire.encode_ack(3, wire.ACK_ABORTED, 5, reason="torn", memory_digest=b"d" * 32),
        wire.encode_input(3, 77, b"payload"),
        wire.encode_shutdown(3),
    ]


VALID = valid_records()
PROP = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
PROP_STRUCTURED = settings(PROP, max_examples=200)   # slower to generate; still a few seconds


@PROP
@given(st.binary(max_size=200))
def test_property_arbitrary_bytes(data):
    decode_any(data)


@PROP
@given(st.sampled_from(sorted(DECODERS) + [wire.SHUTDOWN, 0x8001, 0x0008]),
       st.integers(0, 2**64 - 1), st.binary(max_size=400))
def test_property_valid_header_arbitrary_body(rtype, epoch, body):
    decode_any(record(rtype, body, epoch))


@PROP
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=400))
def test_property_arbitrary_body_to_every_decoder(rtype, body):
    """Every decoder, given a well-formed header of its type and any body."""
    msg = record(rtype, body)
    try:
        DECODERS[rtype](msg)
    except WireError:
        pass


@st.composite
def pages_bodies(draw):
    """PAGES bodies that pass the count check and then go wrong in any field."""
    n = draw(st.integers(1, 4))
    pfns = draw(st.lists(st.sampled_from([0, 1, PAGE_COUNT - 1, PAGE_COUNT, 2**64 - 1]),
                         min_size=n, max_size=n))
    kinds = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    lens = draw(st.lists(st.sampled_from([0, 1, 100, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1,
                                          2**32 - 1]), min_size=n, max_size=n))
    meta = (np.array(pfns, "<u8").tobytes() + bytes(32 * n) + np.array(lens, "<u4").tobytes()
            + bytes(kinds))
    body = struct.pack("<II", n, 0) + meta + bytes(-(8 + len(meta)) % 8)
    cut = draw(st.integers(0, len(body)))
    if draw(st.booleans()):
        body = body[:cut]
    data_len = draw(st.sampled_from([0, 1, sum(lens) % 20000, PAGE_SIZE]))
    return body + bytes(data_len)


@PROP_STRUCTURED
@given(pages_bodies())
def test_property_structured_pages(body):
    decode_any(record(wire.PAGES, body))


@PROP_STRUCTURED
@given(st.sampled_from(range(len(VALID))), st.data())
def test_property_corrupted_valid_records(index, data):
    msg = bytearray(VALID[index])
    assert decode_any(bytes(msg)) is not None      # valid before corruption
    how = data.draw(st.sampled_from(["byte", "truncate", "truncate-fixed", "extend-fixed"]))
    if how == "byte":
        pos = data.draw(st.integers(0, len(msg) - 1))
        msg[pos] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        msg = msg[:data.draw(st.integers(0, len(msg) - 1))]
    elif how == "truncate-fixed":   # truncated body, body_length made to agree
        cut = data.draw(st.integers(wire.HEADER_SIZE, len(msg)))
        msg = msg[:cut]
        struct.pack_into("<I", msg, 16, cut - wire.HEADER_SIZE)
    else:
        msg += data.draw(st.binary(min_size=1, max_size=64))
        struct.pack_into("<I", msg, 16, len(msg) - wire.HEADER_SIZE)
    decode_any(bytes(msg))


@PROP_STRUCTURED
@given(st.sampled_from(range(len(VALID))), st.integers(0, 2**32 - 1), st.integers(0, 200))
def test_property_corrupted_body_word(index, value, pos):
    """A 32-bit field anywhere in the body (counts, lengths) set to any value."""
    msg = bytearray(VALID[index])
    body_len = len(msg) - wire.HEADER_SIZE
    if body_len < 4:
        return
    at = wire.HEADER_SIZE + pos % (body_len - 3)
    struct.pack_into("<I", msg, at, value)
    decode_any(bytes(msg))


def test_hello_carries_the_hypervisor_written_ranges_and_checks_them() -> None:
    """The primary's vcpu_info ranges go to the secondary in HELLO (docs/wire-format.md)."""
    written = ((40, 0x3C0, 0x3D0), (40, 0x3E0, 0x400))
    msg = wire.encode_hello(4096, wire.ROLE_PRIMARY, 32786, "prim", written)
    assert wire.decode_hello(msg) == wire.Hello(4096, wire.ROLE_PRIMARY, 32786, "prim", written)
    assert wire.decode_hello(wire.encode_hello(4096, 1, 5, "a")).written == ()
    rejects(wire.encode_hello(4096, 1, 40, "p", written), wire.decode_hello, "HELLO", "frame 40", "outside")
    rejects(wire.encode_hello(4096, 1, 50, "p", ((1, 0x20, 0x10),)), wire.decode_hello, "HELLO", "written range")
    rejects(with_body(msg, msg[wire.HEADER_SIZE:-2]), wire.decode_hello, "HELLO", "written_count")


def test_pages_unhashed_flag_round_trips_and_other_bits_are_refused():
    """PAGES_UNHASHED (a full sync's pages, sent without their hashes) is a known flag; a
    bit beyond the known ones (PAGES_SEALED is tests/test_seal.py's) is not."""
    p = page(seed=3)
    msg = wire.encode_pages(9, np.array([1, 2], np.uint64), np.zeros((2, 32), np.uint8),
                            np.array([PAGE_SIZE, 0], np.uint32),
                            np.array([wire.ENC_RAW, wire.ENC_ZERO], np.uint8), p,
                            wire.PAGES_UNHASHED)
    b = dec_pages(msg)
    assert b.unhashed and not b.packed and bytes(b.data) == p
    assert not dec_pages(pages_record([wire.ENC_RAW])).unhashed
    bad = wire.encode_pages(9, np.array([1], np.uint64), np.zeros((1, 32), np.uint8),
                            np.array([0], np.uint32), np.array([wire.ENC_ZERO], np.uint8),
                            b"", 8)
    rejects(bad, dec_pages, "PAGES", "unknown flags", "0x8")
