"""The wire format between a primary and a secondary node (docs/wire-format.md).

One encoder and one validator per record type, named as in the document. Every
validator raises :class:`WireError` naming the record type and the field that is
wrong; nothing is applied from a record that did not validate.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from pipeline import seal

MARKER = b"COLO"
VERSION = 1
OPTIONAL_BIT = 0x8000

HELLO = 0x0001
CHECKPOINT_BEGIN = 0x0002
SVM_DIRTY = 0x0003
PAGES = 0x0004
EPOCH_END = 0x0005
ACK = 0x0006
INPUT = 0x0007
SHUTDOWN = 0x8008
NET_OFFSETS = 0x8009

RECORD_NAMES = {
    HELLO: "HELLO", CHECKPOINT_BEGIN: "CHECKPOINT_BEGIN", SVM_DIRTY: "SVM_DIRTY",
    PAGES: "PAGES", EPOCH_END: "EPOCH_END", ACK: "ACK", INPUT: "INPUT", SHUTDOWN: "SHUTDOWN",
    NET_OFFSETS: "NET_OFFSETS",
}

# enc_kind of a page in a PAGES record
ENC_RAW, ENC_LZ4, ENC_ZERO, ENC_REF, ENC_SVM = 0, 1, 2, 3, 4
ENC_KINDS = (ENC_RAW, ENC_LZ4, ENC_ZERO, ENC_REF, ENC_SVM)

FLAG_SYNC = 1     # CHECKPOINT_BEGIN / EPOCH_END: the first full sync
PAGES_PACKED = 1  # PAGES flags: the RAW pages' data is one lz4 block of them back to back
PAGES_UNHASHED = 2  # PAGES flags: the data pages carry no blake3 (their hash field is zero
                    # bytes): a full sync's or pre-copy round's, hashed by neither side
PAGES_SEALED = 4  # PAGES flags: sealed (security.mode = "sealed", pipeline/seal.py): the
                  # data is a seal of two parts, the pages' hashes and the encoded data; the
                  # hashes field is zero bytes
SEALED_PAGES_PARTS = 2
FLAG_DIGEST = 4   # CHECKPOINT_BEGIN: both sides hash all of guest memory at this checkpoint
FLAG_PRECOPY = 8  # CHECKPOINT_BEGIN, with FLAG_SYNC: a pre-copy round after the full sync
                  # (only what changed since the last round: a secondary without the full
                  # sync must not take it for one)
BEGIN_FLAGS = FLAG_SYNC | FLAG_DIGEST | FLAG_PRECOPY
EPOCH_END_FLAGS = FLAG_SYNC   # the CHECKPOINT_BEGIN flags an EPOCH_END repeats
EPOCH_END_SEALED = 1 << 16    # EPOCH_END flags: the vcpu field is sealed (pipeline/seal.py)
ROLE_PRIMARY, ROLE_SECONDARY = 1, 2

# The channels between the two hosts, by their port's offset from peer.address's port.
CHANNEL_PORT_OFFSETS = {"pages": 0, "control": 1, "inputs": 2, "heartbeat": 3}
#: node.role "auto" with a replicated disk: the disk's forwarding link follows the
#: secondary's address too (fixed roles name it in disk.forward)
DISK_FORWARD_PORT_OFFSET = 4
#: node.role "auto" with a comparator: the SVM's output stream goes to the primary's
#: address at this offset (net.secondary_in, which fixed roles name)
NET_SECONDARY_PORT_OFFSET = 5


def channel_address(peer_address: str, channel: str) -> str:
    """The address of ``channel`` for a pair whose ``peer.address`` is ``peer_address``
    (``tcp://HOST:PORT``): the same host, the port plus the channel's offset."""
    base, port = peer_address.rsplit(":", 1)
    return f"{base}:{int(port) + CHANNEL_PORT_OFFSETS[channel]}"
ACK_COMMITTED, ACK_ABORTED = 0, 1

_HEADER = struct.Struct("<4sHHQII")
HEADER_SIZE = _HEADER.size  # 24


class WireError(ValueError):
    """A record that does not follow the wire format; the message says which field."""


class SealRefused(WireError):
    """A record refused for its seal (security.mode = "sealed", pipeline/seal.py): not
    sealed, sealed where nothing is, under another key, out of its place, or a tag that
    does not verify. Counted apart (``seal_refused``)."""


@dataclass(frozen=True)
class Header:
    type: int
    epoch: int
    body_length: int

    @property
    def name(self) -> str:
        return RECORD_NAMES.get(self.type, f"0x{self.type:04x}")


def _record(rtype: int, epoch: int, *body: bytes) -> bytes:
    length = sum(len(b) for b in body)
    return b"".join((_HEADER.pack(MARKER, VERSION, rtype, epoch, length, 0), *body))


def decode_header(msg: bytes | memoryview) -> Header:
    """Validate the record header of one message. Unknown optional types are returned as they
    are (the caller skips them); unknown mandatory types raise."""
    if len(msg) < HEADER_SIZE:
        raise WireError(f"record: message of {len(msg)} bytes is shorter than the "
                        f"{HEADER_SIZE}-byte header")
    marker, version, rtype, epoch, length, _reserved = _HEADER.unpack_from(msg, 0)
    if marker != MARKER:
        raise WireError(f"record: bad marker {bytes(marker)!r} (expected {MARKER!r})")
    if version != VERSION:
        raise WireError(f"record: unsupported version {version} (this node speaks {VERSION})")
    if length != len(msg) - HEADER_SIZE:
        raise WireError(f"{RECORD_NAMES.get(rtype, hex(rtype))}: body_length {length} but "
                        f"{len(msg) - HEADER_SIZE} bytes follow the header")
    if rtype not in RECORD_NAMES and not rtype & OPTIONAL_BIT:
        raise WireError(f"record: unknown mandatory record type 0x{rtype:04x}")
    return Header(rtype, epoch, length)


def _body(msg: bytes | memoryview, expected_type: int) -> tuple[Header, memoryview]:
    hdr = decode_header(msg)
    if hdr.type != expected_type:
        expected = RECORD_NAMES[expected_type]
        raise WireError(f"{expected}: record type {hdr.name}, expected {expected}")
    return hdr, memoryview(msg)[HEADER_SIZE:]


def _need(name: str, body: memoryview, size: int, what: str) -> None:
    if len(body) < size:
        raise WireError(f"{name}: body of {len(body)} bytes is too short for {what} "
                        f"({size} bytes needed)")


# -- HELLO ---------------------------------------------------------------
_HELLO = struct.Struct("<IBB2xQII")
HELLO_SEAL = 1     # HELLO flags: a 32-byte seal key share follows (security.mode = "sealed")
_WRITTEN_RANGE = struct.Struct("<QHH")   # frame index, start, end: bytes the hypervisor writes


@dataclass(frozen=True)
class Hello:
    page_size: int
    role: int
    page_count: int
    name: str
    #: (frame, start, end) byte ranges the sender's hypervisor writes itself (Domain.hypervisor_written)
    written: tuple[tuple[int, int, int], ...] = ()
    #: security.mode = "sealed": this side's random share of the session's seal key
    seal_share: bytes | None = None


def encode_hello(page_size: int, role: int, page_count: int, name: str,
                 written: tuple[tuple[int, int, int], ...] = (),
                 seal_share: bytes | None = None) -> bytes:
    raw = name.encode()
    ranges = b"".join(_WRITTEN_RANGE.pack(f, a, b) for f, a, b in written)
    if seal_share is not None and len(seal_share) != seal.SHARE_SIZE:
        raise ValueError(f"HELLO: a seal share of {len(seal_share)} bytes")
    flags = HELLO_SEAL if seal_share is not None else 0
    return _record(HELLO, 0, _HELLO.pack(page_size, role, flags, page_count, len(raw),
                                         len(written)), raw, ranges, seal_share or b"")


def decode_hello(msg: bytes | memoryview) -> Hello:
    hdr, body = _body(msg, HELLO)
    _need("HELLO", body, _HELLO.size, "the fixed fields")
    page_size, role, flags, page_count, name_len, n_written = _HELLO.unpack_from(body, 0)
    if flags & ~HELLO_SEAL:
        raise WireError(f"HELLO: unknown flags 0x{flags:x}")
    share_len = seal.SHARE_SIZE if flags & HELLO_SEAL else 0
    end = _HELLO.size + name_len + n_written * _WRITTEN_RANGE.size
    if len(body) != end + share_len:
        raise WireError(f"HELLO: name_length {name_len}, written_count {n_written} and flags "
                        f"0x{flags:x} do not match the body of {len(body)} bytes")
    if role not in (ROLE_PRIMARY, ROLE_SECONDARY):
        raise WireError(f"HELLO: unknown role {role}")
    try:
        name = bytes(body[_HELLO.size:_HELLO.size + name_len]).decode()
    except UnicodeDecodeError as exc:
        raise WireError(f"HELLO: name is not UTF-8 ({exc})") from None
    written = tuple(_WRITTEN_RANGE.iter_unpack(body[_HELLO.size + name_len:end]))
    for f, a, b in written:
        if f >= page_count or not a < b <= page_size:
            raise WireError(f"HELLO: written range frame {f} bytes {a}..{b} is outside "
                            f"{page_count} pages of {page_size} bytes")
    if hdr.epoch != 0:
        raise WireError(f"HELLO: epoch {hdr.epoch}, expected 0")
    return Hello(page_size, role, page_count, name, written,
                 bytes(body[end:]) if share_len else None)


# -- CHECKPOINT_BEGIN ----------------------------------------------------
_BEGIN = struct.Struct("<II")


@dataclass(frozen=True)
class CheckpointBegin:
    epoch: int
    cause: int
    flags: int


def encode_checkpoint_begin(epoch: int, cause: int, flags: int = 0) -> bytes:
    return _record(CHECKPOINT_BEGIN, epoch, _BEGIN.pack(cause, flags))


def decode_checkpoint_begin(msg: bytes | memoryview) -> CheckpointBegin:
    hdr, body = _body(msg, CHECKPOINT_BEGIN)
    if len(body) != _BEGIN.size:
        raise WireError(f"CHECKPOINT_BEGIN: body is {len(body)} bytes, expected {_BEGIN.size}")
    cause, flags = _BEGIN.unpack_from(body, 0)
    if flags & ~BEGIN_FLAGS:
        raise WireError(f"CHECKPOINT_BEGIN: unknown flags 0x{flags & ~BEGIN_FLAGS:x}")
    if flags & FLAG_PRECOPY and not flags & FLAG_SYNC:
        raise WireError(f"CHECKPOINT_BEGIN: flags 0x{flags:x}: PRECOPY (a pre-copy round) "
                        "without SYNC")
    return CheckpointBegin(hdr.epoch, cause, flags)


# -- SVM_DIRTY -----------------------------------------------------------
SVM_DIRTY_MORE = 1 << 0   # more SVM_DIRTY parts of this epoch follow (higher pfns)


@dataclass(frozen=True)
class SvmDirty:
    epoch: int
    pfns: np.ndarray      # (count,) uint64: the pages the SVM wrote since the last checkpoint
    hashes: np.ndarray    # (count, 32) uint8: blake3 of each of them as the SVM holds it now
    more: bool = False    # a part: more parts follow, every pfn of them above these


def encode_svm_dirty(epoch: int, pfns: np.ndarray, hashes: np.ndarray | None = None,
                     more: bool = False) -> bytes:
    """``hashes``: blake3 of the SVM's page at each pfn (None: all zero, which never
    matches a page, so the primary refers to none of them). ``more``: this is a part of
    the epoch's SVM_DIRTY and more follow, with higher pfns (the secondary sends the
    hashes as it has them, so the primary's digest workers start on the pages below)."""
    pfns = np.ascontiguousarray(pfns, dtype="<u8")
    if hashes is None:
        hashes = np.zeros((len(pfns), 32), np.uint8)
    hashes = np.ascontiguousarray(hashes, np.uint8)
    if hashes.shape != (len(pfns), 32):
        raise ValueError(f"SVM_DIRTY: {len(pfns)} pfns but hashes of shape {hashes.shape}")
    if len(pfns) >= 1 << 32:
        raise ValueError(f"SVM_DIRTY: {len(pfns)} pfns do not fit the u32 count")
    return _record(SVM_DIRTY, epoch, struct.pack("<II", len(pfns),
                                                 SVM_DIRTY_MORE if more else 0),
                   pfns.tobytes(), hashes.tobytes())


def decode_svm_dirty(msg: bytes | memoryview, page_count: int) -> SvmDirty:
    hdr, body = _body(msg, SVM_DIRTY)
    _need("SVM_DIRTY", body, 8, "count and flags")
    count, flags = struct.unpack_from("<II", body, 0)
    if flags & ~SVM_DIRTY_MORE:
        raise WireError(f"SVM_DIRTY: unknown flags 0x{flags:08x}")
    if len(body) != 8 + 40 * count:
        raise WireError(f"SVM_DIRTY: count {count} does not match a body of {len(body)} bytes")
    pfns = np.frombuffer(body, dtype="<u8", count=count, offset=8)
    hashes = np.frombuffer(body, np.uint8, 32 * count, 8 + 8 * count).reshape(count, 32)
    if count and int(pfns.max()) >= page_count:
        raise WireError(f"SVM_DIRTY: pfn {int(pfns.max())} beyond the guest's {page_count} pages")
    return SvmDirty(hdr.epoch, pfns, hashes, bool(flags & SVM_DIRTY_MORE))


# -- PAGES ---------------------------------------------------------------
_PAGES = struct.Struct("<II")


@dataclass
class PageBatch:
    """A decoded PAGES record: numpy views into the message (no copies)."""
    epoch: int
    pfns: np.ndarray      # (n,) uint64
    hashes: np.ndarray    # (n, 32) uint8
    enc_len: np.ndarray   # (n,) uint32
    enc_kind: np.ndarray  # (n,) uint8
    data: np.ndarray      # (sum(enc_len),) uint8, or the lz4 block when packed
    offsets: np.ndarray   # (n,) int64: where page i's encoding starts in data (not packed)
    packed: bool = False
    unhashed: bool = False  # PAGES_UNHASHED: the data pages' hashes are zero bytes
    #: PAGES_SEALED: the seal header; ``data`` is then the whole sealed field (header,
    #: ciphertext, tag), opened by the verify worker (pipeline/seal.py)
    sealed: seal.SealHeader | None = None

    @property
    def count(self) -> int:
        return len(self.pfns)


def _pad8(n: int) -> int:
    return -n % 8


def encode_pages(epoch: int, pfns: np.ndarray, hashes: np.ndarray, enc_len: np.ndarray,
                 enc_kind: np.ndarray, data: np.ndarray | bytes | memoryview,
                 flags: int = 0) -> bytes:
    """``data`` holds the encoded pages back to back (``sum(enc_len)`` bytes), or with
    ``flags=PAGES_PACKED`` one lz4 block of all the RAW pages back to back."""
    data = memoryview(data).cast("B")
    prefix = np.empty(pages_prefix_size(len(pfns)), np.uint8)
    start = encode_pages_prefix(prefix, epoch, pfns, hashes, enc_len, enc_kind, len(data),
                                flags)
    return b"".join((prefix[start:].data, data))


def pages_prefix_size(max_batch: int) -> int:
    """Bytes of a PAGES record before its data, at most, for up to ``max_batch`` pages."""
    return HEADER_SIZE + _PAGES.size + max_batch * (8 + 32 + 4 + 1) + 7


def encode_pages_prefix(out: np.ndarray, epoch: int, pfns: np.ndarray, hashes: np.ndarray,
                        enc_len: np.ndarray, enc_kind: np.ndarray, data_len: int,
                        flags: int = 0) -> int:
    """What a PAGES record holds before its ``data_len`` bytes of data (encode_pages), laid
    into the uint8 array ``out`` so that it ends at ``out``'s end; returns where it starts.
    The data that follows ``out`` in memory then makes the record without a copy."""
    n = len(pfns)
    meta = n * (8 + 32 + 4 + 1)
    body = _PAGES.size + meta + _pad8(meta)
    start = len(out) - HEADER_SIZE - body
    if start < 0:
        raise ValueError(f"PAGES: {n} pages need {HEADER_SIZE + body} bytes before the data, "
                         f"the room is {len(out)}")
    at = start + HEADER_SIZE + _PAGES.size
    out[start:at] = np.frombuffer(_HEADER.pack(MARKER, VERSION, PAGES, epoch, body + data_len,
                                               0) + _PAGES.pack(n, flags), np.uint8)
    out[at:at + 8 * n] = np.ascontiguousarray(pfns, "<u8").view(np.uint8)
    at += 8 * n
    if flags & PAGES_SEALED:
        out[at:at + 32 * n] = 0        # they ride in the seal
    else:
        out[at:at + 32 * n] = np.ascontiguousarray(hashes, np.uint8).reshape(-1)
    at += 32 * n
    out[at:at + 4 * n] = np.ascontiguousarray(enc_len, "<u4").view(np.uint8)
    at += 4 * n
    out[at:at + n] = enc_kind
    out[at + n:] = 0
    return start


_ENC_LEN_RANGES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _enc_len_ranges(page_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, span) by enc_kind, uint32: the enc_len a page of that kind may have is lo to
    lo + span. RAW: the page size; LZ4: 1 to page_size - 1; ZERO, REF, SVM: 0. None for a
    page size these cannot say (below 2, or beyond uint32)."""
    if not 2 <= page_size < 2**32:
        return None
    r = _ENC_LEN_RANGES.get(page_size)
    if r is None:
        lo = np.zeros(len(ENC_KINDS), np.uint32)
        span = np.zeros(len(ENC_KINDS), np.uint32)
        lo[ENC_RAW] = page_size
        lo[ENC_LZ4], span[ENC_LZ4] = 1, page_size - 2
        r = _ENC_LEN_RANGES[page_size] = (lo, span)
    return r


def decode_pages(msg: bytes | memoryview, page_count: int, page_size: int,
                 max_batch: int) -> PageBatch:
    hdr, body = _body(msg, PAGES)
    _need("PAGES", body, _PAGES.size, "count")
    n, flags = _PAGES.unpack_from(body, 0)
    if not 1 <= n <= max_batch:
        raise WireError(f"PAGES: count {n} outside 1..{max_batch}")
    meta = n * (8 + 32 + 4 + 1)
    data_at = _PAGES.size + meta + _pad8(meta)
    _need("PAGES", body, data_at, f"the arrays of {n} pages")
    off = _PAGES.size
    pfns = np.frombuffer(body, "<u8", n, off); off += 8 * n
    hashes = np.frombuffer(body, np.uint8, 32 * n, off).reshape(n, 32); off += 32 * n
    enc_len = np.frombuffer(body, "<u4", n, off); off += 4 * n
    enc_kind = np.frombuffer(body, np.uint8, n, off)
    data = np.frombuffer(body, np.uint8, len(body) - data_at, data_at)
    if int(pfns.max()) >= page_count:
        raise WireError(f"PAGES: pfn {int(pfns.max())} beyond the guest's {page_count} pages")
    if int(enc_kind.max()) > ENC_SVM:
        raise WireError(f"PAGES: unknown enc_kind {int(enc_kind.max())}")
    # RAW is 0: the pages of other kinds are the nonzero kinds
    raws = n - int(np.count_nonzero(enc_kind))
    lz4s = int(np.count_nonzero(enc_kind == ENC_LZ4))
    # every enc_len in its kind's range, by one gather of each kind's least length: with no
    # LZ4 page each kind has one length; else len - lo (uint32, wrapping below lo) at most
    # the kind's span. The three checks by kind below, each a boolean gather, cost ~40 us a
    # record of 500 pages on the receiver's path before the ACK; they run only to name
    # what is wrong (the same errors, in the same order), and have the last word
    ranges = _enc_len_ranges(page_size)
    if ranges is not None:
        lo = ranges[0].take(enc_kind)
        bad = (enc_len != lo).any() if not lz4s \
            else (np.subtract(enc_len, lo, dtype=np.uint32) > ranges[1].take(enc_kind)).any()
    if ranges is None or bad:
        raw = enc_kind == ENC_RAW
        if np.any(enc_len[raw] != page_size):
            raise WireError(f"PAGES: enc_len of a RAW page is not the page size {page_size}")
        lz = enc_kind == ENC_LZ4
        if np.any((enc_len[lz] == 0) | (enc_len[lz] >= page_size)):
            raise WireError("PAGES: enc_len of an LZ4 page is 0 or not smaller than a page")
        if np.any(enc_len[~(raw | lz)] != 0):
            raise WireError("PAGES: enc_len of a ZERO, REF or SVM page is not 0 (they carry "
                            "no data)")
    # with no LZ4 page every data page is a RAW page of page_size bytes (checked above)
    total = raws * page_size if not lz4s else int(enc_len.sum(dtype=np.int64))
    if flags & ~(PAGES_PACKED | PAGES_UNHASHED | PAGES_SEALED):
        raise WireError(f"PAGES: unknown flags 0x{flags:x}")
    packed = bool(flags & PAGES_PACKED)
    sealed = None
    plain = len(data)
    if flags & PAGES_SEALED:
        extra = sealed_pages_extra(n)
        if plain < extra:
            raise WireError(f"PAGES: sealed data of {plain} bytes is shorter than the seal "
                            f"of {n} pages' hashes ({extra})")
        if hashes.any():
            raise SealRefused("PAGES: sealed, but the hashes field is not zero bytes (the "
                              "hashes ride in the seal)")
        sealed = seal.read_header(data)
        plain -= extra
    if packed:
        if lz4s or not raws:
            raise WireError("PAGES: a packed record must have RAW pages and no LZ4 page")
        if not 0 < plain <= total:
            raise WireError(f"PAGES: packed data of {plain} bytes for {total} bytes of "
                            "RAW pages")
    elif total != plain:
        raise WireError(f"PAGES: enc_len adds up to {total} bytes but {plain} bytes of "
                        "data follow" + (" (sealed)" if sealed else ""))
    offsets = np.empty(n, np.int64)
    offsets[0] = 0
    np.cumsum(enc_len[:-1], dtype=np.int64, out=offsets[1:])
    return PageBatch(hdr.epoch, pfns, hashes, enc_len, enc_kind, data, offsets, packed,
                     bool(flags & PAGES_UNHASHED), sealed)


def sealed_pages_extra(n: int) -> int:
    """Bytes a sealed PAGES record of ``n`` pages has in its data beyond the encoded pages:
    the seal's header and tags, and the hashes."""
    return seal.overhead(SEALED_PAGES_PARTS) + 32 * n


def pages_aad(scratch: np.ndarray, epoch: int, pfns: np.ndarray, hashes: np.ndarray,
              enc_len: np.ndarray, enc_kind: np.ndarray, sealed_len: int,
              flags: int) -> np.ndarray:
    """A sealed PAGES record's bytes before its data (what the seal's tags cover besides
    the seal header: pipeline/seal.py), laid into ``scratch`` (``pages_prefix_size``
    bytes or more) as :func:`encode_pages_prefix` lays them for the wire (the hashes field
    zero bytes). ``sealed_len``: the record's data, the whole seal. The digest worker seals
    and the verify worker opens with the same bytes."""
    start = encode_pages_prefix(scratch, epoch, pfns, hashes, enc_len, enc_kind, sealed_len,
                                flags | PAGES_SEALED)
    return scratch[start:]


class SealPosition:
    """The receive stage's check that each sealed record of an epoch comes at its place:
    every sealer's records of an epoch carry indexes 0, 1, 2, ... in the order it sealed
    them, and the channel keeps that order. A record sent again (a replay) or one after a
    lost one is refused, naming the record and field; an epoch with a refused record is
    torn (it lacks pages, or its EPOCH_END). The tag itself (that the index is the one
    sealed) is the verify worker's to check."""

    def __init__(self) -> None:
        self.epoch, self.next = -1, {}

    def check(self, name: str, epoch: int, header: seal.SealHeader) -> None:
        """Raises SealRefused naming the record, epoch, sealer and index."""
        if epoch != self.epoch:
            self.epoch, self.next = epoch, {}
        want = self.next.get(header.sealer, 0)
        if header.index != want:
            raise SealRefused(f"{name}: epoch {epoch} sealer {header.sealer}: seal index "
                            f"{header.index}, expected {want} ("
                            + ("sent again: a replay" if header.index < want else
                               "a record before it was lost") + ")")
        self.next[header.sealer] = want + 1


# -- EPOCH_END -----------------------------------------------------------
_END = struct.Struct("<QQII")


@dataclass(frozen=True)
class EpochEnd:
    epoch: int
    pages: int
    records: int
    flags: int
    vcpu: bytes


def encode_epoch_end(epoch: int, pages: int, records: int, flags: int, vcpu: bytes,
                     sealer: "seal.Sealer | None" = None) -> bytes:
    """``sealer`` (security.mode = "sealed"): the vcpu field goes sealed, the record's
    fields before it bound to the seal (pipeline/seal.py)."""
    if sealer is None:
        return _record(EPOCH_END, epoch, _END.pack(pages, records, flags, len(vcpu)), vcpu)
    n = len(vcpu) + seal.OVERHEAD
    prefix = _HEADER.pack(MARKER, VERSION, EPOCH_END, epoch, _END.size + n, 0) + \
        _END.pack(pages, records, flags | EPOCH_END_SEALED, n)
    out = bytearray(len(prefix) + n)
    out[:len(prefix)] = prefix
    sealer.seal(epoch, prefix, [vcpu], memoryview(out)[len(prefix):])
    return bytes(out)


def decode_epoch_end(msg: bytes | memoryview, opener: "seal.Opener | None" = None,
                     position: SealPosition | None = None) -> EpochEnd:
    """``opener`` (security.mode = "sealed"): the record must be sealed, at its place
    (``position``), and open; its vcpu comes out opened and its flags without the seal's
    bit. Without an opener a sealed record is refused (no key to open it)."""
    hdr, body = _body(msg, EPOCH_END)
    _need("EPOCH_END", body, _END.size, "the fixed fields")
    pages, records, flags, vlen = _END.unpack_from(body, 0)
    if len(body) != _END.size + vlen:
        raise WireError(f"EPOCH_END: vcpu_length {vlen} does not match the body")
    vcpu = body[_END.size:]
    if bool(flags & EPOCH_END_SEALED) != (opener is not None):
        raise SealRefused("EPOCH_END: " + ("flags say sealed, but this node's security.mode "
                                         "is not 'sealed'" if opener is None else
                                         "flags say not sealed, and security.mode = "
                                         "'sealed' takes no plaintext"))
    if opener is not None:
        if vlen < seal.OVERHEAD:
            raise SealRefused(f"EPOCH_END: sealed vcpu of {vlen} bytes is shorter than the "
                            f"seal's {seal.OVERHEAD}")
        out = bytearray(vlen - seal.OVERHEAD)
        try:
            opener.open(memoryview(msg)[:HEADER_SIZE + _END.size], vcpu, [out],
                        "EPOCH_END vcpu")
        except seal.SealError as exc:
            raise SealRefused(str(exc)) from None
        if position is not None:     # after the tag: a forged one does not move it on
            position.check("EPOCH_END", hdr.epoch, seal.read_header(vcpu))
        return EpochEnd(hdr.epoch, pages, records, flags & ~EPOCH_END_SEALED, bytes(out))
    return EpochEnd(hdr.epoch, pages, records, flags, bytes(vcpu))


# -- ACK -----------------------------------------------------------------
_ACK = struct.Struct("<IIQ32sQQ")


@dataclass(frozen=True)
class Ack:
    epoch: int
    status: int
    pages_applied: int
    memory_digest: bytes   # 32 zero bytes unless the checkpoint asked for FLAG_DIGEST
    reason: str
    assembled_ns: int = 0  # secondary: from CHECKPOINT_BEGIN received to the epoch assembled
    apply_ns: int = 0      # secondary: from the epoch assembled to this ACK (apply, resume)


def encode_ack(epoch: int, status: int, pages_applied: int = 0, reason: str = "",
               memory_digest: bytes = b"", assembled_ns: int = 0, apply_ns: int = 0) -> bytes:
    raw = reason.encode()
    return _record(ACK, epoch, _ACK.pack(status, len(raw), pages_applied,
                                         memory_digest.ljust(32, b"\0"), assembled_ns,
                                         apply_ns), raw)


def decode_ack(msg: bytes | memoryview) -> Ack:
    hdr, body = _body(msg, ACK)
    _need("ACK", body, _ACK.size, "the fixed fields")
    status, rlen, applied, digest, assembled_ns, apply_ns = _ACK.unpack_from(body, 0)
    if len(body) != _ACK.size + rlen:
        raise WireError(f"ACK: reason_length {rlen} does not match the body")
    if status not in (ACK_COMMITTED, ACK_ABORTED):
        raise WireError(f"ACK: unknown status {status}")
    try:
        reason = bytes(body[_ACK.size:]).decode()
    except UnicodeDecodeError as exc:
        raise WireError(f"ACK: reason is not UTF-8 ({exc})") from None
    return Ack(hdr.epoch, status, applied, digest, reason, assembled_ns, apply_ns)


# -- INPUT ---------------------------------------------------------------
def encode_input(epoch: int, seq: int, payload: bytes) -> bytes:
    return _record(INPUT, epoch, struct.pack("<Q", seq), payload)


def decode_input(msg: bytes | memoryview) -> tuple[int, int, bytes]:
    hdr, body = _body(msg, INPUT)
    _need("INPUT", body, 8, "seq")
    (seq,) = struct.unpack_from("<Q", body, 0)
    return hdr.epoch, seq, bytes(body[8:])


# -- SHUTDOWN ------------------------------------------------------------
def encode_shutdown(epoch: int) -> bytes:
    return _record(SHUTDOWN, epoch)


def decode_shutdown(msg: bytes | memoryview) -> int:
    """The epoch of a SHUTDOWN record (its body is empty)."""
    hdr, _ = _body(msg, SHUTDOWN)
    if hdr.body_length:
        raise WireError(f"SHUTDOWN: body_length {hdr.body_length}, expected 0 (the body is "
                        "empty)")
    return hdr.epoch


# -- NET_OFFSETS ---------------------------------------------------------
def encode_net_offsets(rows: list[dict]) -> bytes:
    """The survivor's carried TCP sequence offsets (``SeqRewriter.export_offsets`` rows),
    as JSON."""
    import json
    return _record(NET_OFFSETS, 0, json.dumps(rows, separators=(",", ":")).encode())


def decode_net_offsets(msg: bytes | memoryview) -> list[dict]:
    """The rows of a NET_OFFSETS record: a JSON list of objects (what each row holds is
    the rewriter's to check: ``SeqRewriter.load_offsets``)."""
    import json
    hdr, body = _body(msg, NET_OFFSETS)
    if hdr.epoch != 0:
        raise WireError(f"NET_OFFSETS: epoch {hdr.epoch}, expected 0")
    try:
        rows = json.loads(bytes(body).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"NET_OFFSETS: the body is not UTF-8 JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise WireError("NET_OFFSETS: the body is not a JSON list of objects")
    return rows
