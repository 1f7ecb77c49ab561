"""The wire format's fuzz oracle: what a correct decoder must do with any message.

Used by tests/test_fuzz_wire.py (hypothesis) and scripts/fuzz_wire.py (atheris), so both
check the same thing. :func:`check_message` takes any bytes and asserts that either

* the decoder refuses them with a :class:`pipeline.wire.WireError` whose text begins with
  the record's name (or ``record`` for the header) and names a field of it, or
* the decoded value, given to the record's encoder, gives back exactly those bytes once
  the bytes docs/wire-format.md calls reserved or padding are zeroed (zero on write,
  ignored on read).

Anything else (another exception, a value that encodes to other bytes) is an
AssertionError (or that exception) naming the message.
"""
from __future__ import annotations

import re
import struct

from pipeline import wire

#: the guest the decoders are given (small pages keep fuzzed PAGES records small)
PAGE_SIZE = 64
PAGE_COUNT = 1024
MAX_BATCH = 64

_HDR = struct.Struct("<4sHHQII")
_RESERVED = slice(20, 24)            # header: reserved
_HELLO_RESERVED = slice(wire.HEADER_SIZE + 6, wire.HEADER_SIZE + 8)   # (5 is its flags)

#: what a refusal may name: the fields of each record (docs/wire-format.md), "body" for a
#: body of the wrong size, and "record type" for a record given to another's decoder
FIELDS = {
    "record": ("header", "marker", "version", "record type"),
    "HELLO": ("body", "epoch", "name_length", "written_count", "role", "name", "written",
              "flags"),
    "CHECKPOINT_BEGIN": ("body", "flags"),
    "SVM_DIRTY": ("body", "count", "flags", "pfn"),
    "PAGES": ("body", "count", "pfn", "enc_kind", "enc_len", "flags", "packed", "data",
              "hashes"),
    "EPOCH_END": ("body", "vcpu_length", "flags"),
    "ACK": ("body", "reason_length", "status", "reason"),
    "INPUT": ("body",),
    "SHUTDOWN": ("body",),
    "NET_OFFSETS": ("body", "epoch"),
}
_COMMON = ("body_length", "record type")
_PREFIX = re.compile(r"^(\w+): ")


def decode_record(msg: bytes) -> tuple[int, object]:
    """(record type, value) as a receiver reads ``msg``: the header, then the decoder of its
    type; an unknown optional record is its header and body (a receiver skips it)."""
    hdr = wire.decode_header(msg)
    t = hdr.type
    if t == wire.HELLO:
        return t, wire.decode_hello(msg)
    if t == wire.CHECKPOINT_BEGIN:
        return t, wire.decode_checkpoint_begin(msg)
    if t == wire.SVM_DIRTY:
        return t, wire.decode_svm_dirty(msg, PAGE_COUNT)
    if t == wire.PAGES:
        return t, wire.decode_pages(msg, PAGE_COUNT, PAGE_SIZE, MAX_BATCH)
    if t == wire.EPOCH_END:
        return t, wire.decode_epoch_end(msg)
    if t == wire.ACK:
        return t, wire.decode_ack(msg)
    if t == wire.INPUT:
        return t, wire.decode_input(msg)
    if t == wire.SHUTDOWN:
        return t, wire.decode_shutdown(msg)
    if t == wire.NET_OFFSETS:
        wire.decode_net_offsets(msg)    # refused as the coordinator would refuse it
        # accepted: its JSON has many spellings of one value, so the bytes are compared
        # (header and body, as for a record a receiver skips)
    return t, (hdr, bytes(msg[wire.HEADER_SIZE:]))


def reencode(decoded: tuple[int, object]) -> bytes:
    """The bytes the record's encoder makes of a decoded value."""
    t, v = decoded
    if t == wire.HELLO:
        return wire.encode_hello(v.page_size, v.role, v.page_count, v.name, v.written,
                                 v.seal_share)
    if t == wire.CHECKPOINT_BEGIN:
        return wire.encode_checkpoint_begin(v.epoch, v.cause, v.flags)
    if t == wire.SVM_DIRTY:
        return wire.encode_svm_dirty(v.epoch, v.pfns, v.hashes, v.more)
    if t == wire.PAGES:
        return wire.encode_pages(v.epoch, v.pfns, v.hashes, v.enc_len, v.enc_kind, v.data,
                                 (wire.PAGES_PACKED if v.packed else 0)
                                 | (wire.PAGES_UNHASHED if v.unhashed else 0)
                                 | (wire.PAGES_SEALED if v.sealed is not None else 0))
    if t == wire.EPOCH_END:
        return wire.encode_epoch_end(v.epoch, v.pages, v.records, v.flags, v.vcpu)
    if t == wire.ACK:
        return wire.encode_ack(v.epoch, v.status, v.pages_applied, v.reason, v.memory_digest,
                               v.assembled_ns, v.apply_ns)
    if t == wire.INPUT:
        return wire.encode_input(*v)
    if t == wire.SHUTDOWN:
        return wire.encode_shutdown(v)
    hdr, body = v
    return _HDR.pack(wire.MARKER, wire.VERSION, hdr.type, hdr.epoch, len(body), 0) + body


def canonical(msg: bytes) -> bytes:
    """``msg`` with its reserved and padding bytes zeroed (what an encoder writes there)."""
    out = bytearray(msg)
    if len(out) < wire.HEADER_SIZE:
        return bytes(out)
    out[_RESERVED] = bytes(4)
    rtype = struct.unpack_from("<H", out, 6)[0]
    if rtype == wire.HELLO and len(out) >= _HELLO_RESERVED.stop:
        out[_HELLO_RESERVED] = bytes(2)
    if rtype == wire.PAGES and len(out) >= wire.HEADER_SIZE + 8:
        n = struct.unpack_from("<I", out, wire.HEADER_SIZE)[0]
        meta_end = wire.HEADER_SIZE + 8 + n * (8 + 32 + 4 + 1)
        pad = -(8 + n * (8 + 32 + 4 + 1)) % 8
        if meta_end + pad <= len(out):
            out[meta_end:meta_end + pad] = bytes(pad)
    return bytes(out)


def check_refusal(msg: bytes, exc: wire.WireError) -> None:
    """The refusal's text begins with the record's name and names one of its fields."""
    text = str(exc)
    m = _PREFIX.match(text)
    assert m, f"WireError does not begin with the record's name: {text!r} for {msg.hex()}"
    name = m.group(1)
    if name.startswith("0x"):          # an unknown record type, by its number
        words = _COMMON
    else:
        assert name in FIELDS, f"WireError names no record: {text!r} for {msg.hex()}"
        words = FIELDS[name] + _COMMON
    assert any(w in text for w in words), (
        f"WireError names no field of {name} (one of {words}): {text!r} for {msg.hex()}")


def check_message(msg: bytes) -> bool:
    """Assert the oracle's property for ``msg``; True if it was accepted, False if refused."""
    try:
        decoded = decode_record(msg)
    except wire.WireError as exc:
        check_refusal(msg, exc)
        return False
    again = reencode(decoded)
    assert again == canonical(msg), (
        f"accepted as {decoded!r} but that encodes to {again.hex()}, not {msg.hex()}")
    return True
