"""The write-forwarding link between the primary's and the secondary's disk stage.

ZeroMQ DEALER (primary, one per NBD connection, connects) ↔ ROUTER (secondary, binds).
Fixed-width little-endian fields, reserved fields zero on write and ignored on read.

FORWARD message (primary → secondary): the writes one burst of NBD requests produced,
as groups of writes, two frames per group:

    frame 2i, n × 72 bytes, one header per write of the group:
                        magic "CDW1" | kind u8 (1 WRITE, 2 ZERO, 3 SYNC, 4 SYNC_BEGIN,
                        5 SYNC_END, 6 SYNC_ZERO, 7 SYNC_CHECK, 8 ZERO_ALLOC) | reserved 3 |
                        epoch u64 | seq u64 | offset u64 | length u32 | reserved u32 |
                        blake3(data) 32 bytes (all zero for ZERO; may be all zero for
                        WRITE and SYNC: UNHASHED, see below)
    frame 2i+1: the data of the group's WRITEs and SYNCs back to back, in header order
                (``length`` bytes each; the other kinds have none)

A WRITE's or SYNC's digest may be all zero (``UNHASHED``): the primary has no use for
the digest of a guest's write, and hashing it there cost as much of the NBD connection's
thread as receiving the write. The secondary then hashes a WRITE itself when its disk
comparator is on (the comparator needs the digest, and the buffer log record then
carries it; with ``disk.compare = "off"`` neither) and a SYNC not at all. The bytes in
transit are guarded by TCP's checksums, and on a secured link by CURVE's authenticator,
which rejects any altered message. A digest that is given is checked (EBADMSG).

Small writes travel many to a group (one frame pair, so one send and one receive for
a burst of them); a large write is a group of its own, its data frame sent without a
copy. Each write is judged on its own; a group whose data frame does not hold exactly
the bytes its headers announce is refused whole.

``seq`` is the write's place in the primary's one write order (all NBD connections, from
1 without gaps); ``epoch`` the checkpoint epoch it belongs to (both decided together).

SEAL message (primary → secondary, on the primary's own seal socket; no answer), one
frame of 32 bytes: magic "CDS1" | reserved u32 | epoch u64 | last_seq u64 | reserved u64.
Sent when the checkpoint's pause moves the write epoch past ``epoch``: every write
tagged ``epoch`` or earlier has a seq ≤ ``last_seq``, and seqs are given without gaps,
so the secondary commits ``epoch`` only once it has seen every seq up to ``last_seq``
(writes travel on one socket per NBD connection and may arrive after the pages).

ACK message (secondary → primary): the answers to every FORWARD of one DEALER that the
secondary handled in one burst, one frame (a send of its own costs more than the bytes):

    16 bytes: magic "CDA2" | count u32 | reserved u64
    count × 16 bytes: seq u64 | status u32 (0 ok, else an errno) | reason length u32
    the utf-8 reasons, concatenated in entry order (nothing when all are ok)

The secondary acks a write once it is appended to its buffer file (page cache, not
fsync): the guest's write then survives the loss of the primary host, which is the
failure COLO protects against; losing both hosts at once is outside the model.
"""
from __future__ import annotations

import errno
import functools
import struct
from typing import NamedTuple

import blake3
import numpy as np

try:
    from pipeline import _pagehash     # csrc/pagehash.c: many 4 KiB pages in one call
except ImportError:                    # (not built: hashed one by one)
    _pagehash = None

FORWARD_MAGIC = b"CDW1"
ACK_MAGIC = b"CDA2"
KIND_WRITE = 1
KIND_ZERO = 2
#: the initial sync (a secondary that starts from an empty image): BEGIN (no data; the
#: secondary empties its image), SYNC (an allocated extent of the primary's image, with
#: its data, written straight into the secondary's image), SYNC_ZERO (an extent that
#: reads as zeros), END (no data; every extent was sent). They take seqs in the one
#: write order like writes, so they are applied in their place among them.
KIND_SYNC = 3
KIND_SYNC_BEGIN = 4
KIND_SYNC_END = 5
KIND_SYNC_ZERO = 6     # an allocated extent that reads as zeros: no data sent
#: an incremental sync's question: does your extent have this blake3? The secondary
#: answers 0 (same: nothing to send) or ENODATA (send it: the primary then sends SYNC or
#: SYNC_ZERO with the same seq). BEGIN carries the primary's image generation in its
#: digest field; its answer's reason says "full" (the secondary emptied its image) or
#: "incremental" (same generation: it kept its image and compares extents).
KIND_SYNC_CHECK = 7
#: a ZERO whose blocks stay allocated (NBD's NO_HOLE: WRITE_ZEROES without a punched hole)
KIND_ZERO_ALLOC = 8
SYNC_KINDS = (KIND_SYNC, KIND_SYNC_BEGIN, KIND_SYNC_END, KIND_SYNC_ZERO, KIND_SYNC_CHECK)
#: the guest's writes that carry no data
ZERO_KINDS = (KIND_ZERO, KIND_ZERO_ALLOC)
KINDS = (KIND_WRITE,) + ZERO_KINDS + SYNC_KINDS
#: kinds whose data follows in the group's data frame
DATA_KINDS = (KIND_WRITE, KIND_SYNC)
ZERO_DIGEST = bytes(32)
#: the digest field of a WRITE or SYNC whose data the primary did not hash
UNHASHED = ZERO_DIGEST
FORWARD_HEADER = struct.Struct("<4sB3xQQQI4x32s")
SEAL_MAGIC = b"CDS1"
SEAL = struct.Struct("<4s4xQQ8x")
ACK_HEADER = struct.Struct("<4sI8x")
ACK_ENTRY = struct.Struct("<QII")
#: how far ahead of the last committed epoch a write may be tagged. Normally 1 or 2
#: (e+2 starts when the primary snapshots e+1 before the secondary committed it), but
#: aborted checkpoints let the primary run further ahead; this only catches garbage.
MAX_EPOCH_LEAD = 1 << 16


class ForwardError(ValueError):
    """A forwarded write that was refused; nothing of it was applied."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.seq = 0  # the refused write's seq, where known


class ForwardedWrite(NamedTuple):
    """One validated forwarded write (a tuple: made once per write of every group)."""

    kind: int
    epoch: int
    seq: int
    offset: int
    length: int
    digest: bytes
    data: bytes | memoryview | None  # None for ZERO


#: from this size on a blake3 uses every core (1 MiB: 146 → 104 us here, idle): the syncs'
#: extents, the SVM's writes; not the forwarded writes (:func:`hashed`)
PARALLEL_HASH_MIN = 256 * 1024


def digest_of(data: bytes | bytearray | memoryview, parallel: bool = True) -> bytes:
    """blake3 of ``data``; from PARALLEL_HASH_MIN on on every core unless ``parallel`` is
    False (see :func:`hashed`)."""
    threads = blake3.blake3.AUTO if parallel and len(data) >= PARALLEL_HASH_MIN else 1
    return blake3.blake3(data, max_threads=threads).digest()


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """The blake3 of ``length`` zero bytes (a sync's question about a hole)."""
    return digest_of(bytes(length))


def forward_header(kind: int, epoch: int, seq: int, offset: int, length: int,
                   data: bytes | bytearray | memoryview | None,
                   digest: bytes | None = None) -> bytes:
    """The 72-byte header of one write (its blake3 computed here unless given: a
    SYNC_CHECK's, a BEGIN's generation)."""
    if digest is None:
        digest = ZERO_DIGEST if data is None else digest_of(data)
    return FORWARD_HEADER.pack(FORWARD_MAGIC, kind, epoch, seq, offset, length, digest)


def encode_forward(kind: int, epoch: int, seq: int, offset: int, length: int,
                   data: bytes | bytearray | memoryview | None,
                   digest: bytes | None = None) -> list:
    """A group of one write: [header frame, data frame]."""
    return [forward_header(kind, epoch, seq, offset, length, data, digest),
            b"" if data is None else data]


def decode_forward_group(frames: list, export_size: int, block_size: int,
                         committed_epoch: int, hash_unhashed: bool = True
                         ) -> list[ForwardedWrite | ForwardError]:
    """Validate one group (its two frames, as buffers) of a FORWARD message: per write, the
    write or the ForwardError (with ``.seq``) that refuses it. A group that cannot be
    split into writes is one ForwardError with seq 0. ``hash_unhashed=False``: an
    UNHASHED write keeps that digest (hash it later with :func:`hashed`)."""
    headers, data = frames
    n, rest = divmod(len(headers), FORWARD_HEADER.size)
    if n == 0 or rest:
        return [ForwardError(errno.EINVAL, f"forward header frame of {len(headers)} bytes, "
                                           f"not a multiple of {FORWARD_HEADER.size}")]
    parsed = list(FORWARD_HEADER.iter_unpack(headers))
    announced = sum(h[5] for h in parsed if h[1] in DATA_KINDS)
    if announced != len(data):
        msg = (f"forward group of {n} writes: a {len(data)}-byte data frame, the headers "
               f"announce {announced}")
        return [refusal(errno.EINVAL, msg, h[3]) for h in parsed]
    out: list[ForwardedWrite | ForwardError] = []
    view = memoryview(data)
    pos = 0
    for magic, kind, epoch, seq, offset, length, digest in parsed:
        chunk = None
        if kind in DATA_KINDS:
            chunk = view[pos:pos + length]
            pos += length
        try:
            out.append(_validate(magic, kind, epoch, seq, offset, length, digest, chunk,
                                 export_size, block_size, committed_epoch, hash_unhashed))
        except ForwardError as e:
            e.seq = seq
            out.append(e)
    return out


def refusal(status: int, message: str, seq: int) -> ForwardError:
    e = ForwardError(status, message)
    e.seq = seq
    return e


def _validate(magic: bytes, kind: int, epoch: int, seq: int, offset: int, length: int,
              digest: bytes, data: memoryview | None, export_size: int, block_size: int,
              committed_epoch: int, hash_unhashed: bool = True) -> ForwardedWrite:
    def what() -> str:   # (only for a refusal: formatting it per write cost a microsecond)
        return f"forwarded write seq {seq} epoch {epoch} [{offset}, +{length})"
    if magic != FORWARD_MAGIC:
        raise ForwardError(errno.EINVAL, f"{what()}: magic {magic!r}, expected "
                                         f"{FORWARD_MAGIC!r}")
    if kind not in KINDS:
        raise ForwardError(errno.EINVAL, f"{what()}: unknown kind {kind}")
    if kind == KIND_SYNC_BEGIN:
        # a BEGIN starts a session: its epoch becomes the base of the window
        if epoch == 0:
            raise ForwardError(errno.EINVAL, f"{what()}: a sync BEGIN of epoch 0")
    elif epoch <= committed_epoch or epoch > committed_epoch + MAX_EPOCH_LEAD:
        raise ForwardError(errno.ESTALE, f"{what()}: wrong epoch, the last committed is "
                                         f"{committed_epoch} (accepted: {committed_epoch + 1}.."
                                         f"{committed_epoch + MAX_EPOCH_LEAD})")
    if kind in (KIND_SYNC_BEGIN, KIND_SYNC_END):
        if offset or length or (kind == KIND_SYNC_END and digest != ZERO_DIGEST):
            raise ForwardError(errno.EINVAL, f"{what()}: a sync marker with an extent")
        return ForwardedWrite(kind, epoch, seq, offset, length, digest, None)
    if length == 0 or offset % block_size or length % block_size:
        raise ForwardError(errno.EINVAL, f"{what()}: not a whole number of {block_size}-byte "
                                         f"blocks")
    if offset + length > export_size:
        raise ForwardError(errno.EINVAL, f"{what()}: beyond the export size {export_size}")
    if kind == KIND_SYNC_CHECK:
        return ForwardedWrite(kind, epoch, seq, offset, length, digest, None)
    if kind in DATA_KINDS:
        if digest == UNHASHED:
            # a WRITE's digest is needed (buffer log record, comparator); a SYNC's not
            if kind == KIND_WRITE and hash_unhashed:
                digest = digest_of(data)
        elif digest_of(data) != digest:
            raise ForwardError(errno.EBADMSG, f"{what()}: blake3 of the data does not match")
    elif digest != ZERO_DIGEST:
        raise ForwardError(errno.EINVAL, f"{what()}: ZERO with a digest")
    return ForwardedWrite(kind, epoch, seq, offset, length, digest, data)


def hashed(w: ForwardedWrite) -> ForwardedWrite:
    """``w`` with its blake3, if it came unhashed (decoded with ``hash_unhashed=False``).
    Hashed on the calling thread (the secondary's receiver), not on blake3's worker
    threads: for a stream of forwarded 1 MiB writes their hand-offs (wake-ups, their
    sched_yield spinning) cost more than they save — the receiver and its workers 0.80 ->
    0.65 ms CPU per MiB, both stages 2.40 -> 2.24 (A/B, 6 alternated runs each, load
    28-32)."""
    if w.digest == UNHASHED and w.kind == KIND_WRITE:   # (_replace costs several us)
        return ForwardedWrite(w.kind, w.epoch, w.seq, w.offset, w.length,
                              digest_of(w.data, parallel=False), w.data)
    return w


#: the size whose writes :func:`hashed_all` hashes together (pipeline._pagehash's page)
PAGE = 4096


def hashed_all(writes: list[ForwardedWrite]) -> list[ForwardedWrite]:
    """:func:`hashed` of each of ``writes``. The unhashed 4 KiB WRITEs among them (a burst
    of small writes) are hashed in one call (pipeline._pagehash, each digest the page's
    blake3), not in one blake3 call each: 1.4 against 2.6 us per write here."""
    pages = [w.data for w in writes
             if w.length == PAGE and w.digest == UNHASHED and w.kind == KIND_WRITE]
    if len(pages) < 2 or _pagehash is None:
        return [hashed(w) for w in writes]
    digests = np.empty((len(pages), 32), np.uint8)
    _pagehash.hash_pages(np.frombuffer(b"".join(pages), np.uint8).reshape(-1, PAGE), None,
                         digests)
    raw = digests.tobytes()
    out, at = [], 0
    for w in writes:
        if w.digest == UNHASHED and w.kind == KIND_WRITE:
            if w.length == PAGE:
                digest, at = raw[at:at + 32], at + 32
            else:
                digest = digest_of(w.data, parallel=False)     # (as hashed does)
            w = ForwardedWrite(w.kind, w.epoch, w.seq, w.offset, w.length, digest, w.data)
        out.append(w)
    return out


def encode_seal(epoch: int, last_seq: int) -> bytes:
    return SEAL.pack(SEAL_MAGIC, epoch, last_seq)


def is_seal(body: list) -> bool:
    """A SEAL message's body (buffers of its frames): one frame with the seal magic?"""
    return len(body) == 1 and bytes(body[0][:4]) == SEAL_MAGIC


def decode_seal(frame: bytes | memoryview) -> tuple[int, int]:
    """(epoch, last_seq); raise ForwardError naming what is wrong."""
    if len(frame) != SEAL.size:
        raise ForwardError(errno.EINVAL, f"SEAL of {len(frame)} bytes, expected {SEAL.size}")
    magic, epoch, last_seq = SEAL.unpack(frame)
    if magic != SEAL_MAGIC:
        raise ForwardError(errno.EINVAL, f"SEAL: magic {bytes(magic)!r}, expected {SEAL_MAGIC!r}")
    if epoch == 0:
        raise ForwardError(errno.EINVAL, f"SEAL of epoch 0 (last seq {last_seq})")
    return epoch, last_seq


def encode_ack(entries: list[tuple[int, int, str]]) -> bytes:
    """One ACK message (its one frame) for ``entries`` of (seq, status, reason)."""
    pack = ACK_ENTRY.pack
    if not any([r for _s, _st, r in entries]):     # (nearly always: every write taken)
        return ACK_HEADER.pack(ACK_MAGIC, len(entries)) + b"".join(
            [pack(seq, status, 0) for seq, status, _r in entries])
    reasons = [r.encode() for _s, _st, r in entries]
    table = b"".join(ACK_ENTRY.pack(seq, status, len(r))
                     for (seq, status, _r), r in zip(entries, reasons))
    return ACK_HEADER.pack(ACK_MAGIC, len(entries)) + table + b"".join(reasons)


def decode_ack(frames: list) -> list[tuple[int, int, str]]:
    """[(seq, status, reason), ...] of an ACK message (its frames); ValueError naming what
    is malformed."""
    if len(frames) != 1 or len(frames[0]) < ACK_HEADER.size:
        raise ValueError(f"malformed ack: {len(frames)} frames"
                         + (f", {len(frames[0])} bytes" if frames else ""))
    msg = bytes(frames[0])
    magic, count = ACK_HEADER.unpack_from(msg)
    if magic != ACK_MAGIC:
        raise ValueError(f"ack magic {magic!r}, expected {ACK_MAGIC!r}")
    end = ACK_HEADER.size + count * ACK_ENTRY.size
    if len(msg) < end:
        raise ValueError(f"ack of {count} entries in {len(msg)} bytes")
    table = list(ACK_ENTRY.iter_unpack(msg[ACK_HEADER.size:end]))
    if len(msg) == end and not any([n for _seq, _status, n in table]):
        # no reasons (nearly always): no slicing and decoding for each entry
        return [(seq, status, "") for seq, status, _n in table]
    out, pos = [], end
    for seq, status, n in table:
        out.append((seq, status, msg[pos:pos + n].decode(errors="replace")))
        pos += n
    if pos != len(msg):
        raise ValueError(f"ack of {count} entries: reasons of {len(msg) - end} bytes, the "
                         f"table announces {pos - end}")
    return out

