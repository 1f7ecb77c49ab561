"""Sealed page data: AES-GCM on the pages channel (``security.mode = "sealed"``).

With CURVE on the pages channel, libzmq encrypts every record in one I/O thread per socket
(XSalsa20-Poly1305): the largest CPU item of a secure full sync, ~0.75 s per 512 MiB, on
one core (docs/tuning.md, session 11). Sealed, the pages channel carries no CURVE: each
PAGES record's data is sealed with AES-GCM (``cryptography``'s AESGCM, OpenSSL with
AES-NI) by the digest worker that encoded it and opened by the verify worker that decodes
it, in parallel, and the send stage seals each EPOCH_END's vCPU blob. The control channel
(and inputs, heartbeat, disk forwarding) stays CurveZMQ: the key is agreed over it.

What this module holds (pipeline/wire.py frames the records, its validators call no key):

* :func:`derive_key`: the session's key from the two HELLOs' random shares (HKDF-SHA256);
  a new HELLO exchange (a new secondary, a reconnect, a takeover's re-protection) is a
  new key. Keys live in memory only (:class:`SealKeys`), never on disk nor in a log.
* :class:`SealKeys`: the node's current key, shared with its forked stages: an anonymous
  shared mapping (no file anywhere, left out of core dumps), written by the coordinator
  under a sequence lock, read by the stages before each record.
* :class:`Sealer` and :class:`Opener`: one per process; :func:`seal_into` and
  :func:`open_into` are the pure functions under them.

A sealed field is a 24-byte seal header and one or more parts, each its ciphertext and
a 16-byte tag: a sealed PAGES record's data is two parts, the pages' blake3 hashes (a
hash would tell an observer which pages equal a page it can guess) and the encoded data,
so that a verify worker opens each straight to where it goes (the hashes into the slot,
raw pages into the staging area); an EPOCH_END's vcpu field is one. Part j's nonce is the
header's ``sealer`` (digest worker i: i; the send stage: :data:`SEND_SEALER`) and
``counter + j``; a sealer's counter starts at 0 under each key and moves on by the parts
it sealed: a nonce never repeats under one key. The associated data is the record's bytes
before the field (record header with type, epoch and length; count, flags, pfns, lengths
and kinds of every page) and the seal header, whose ``index`` is the record's place
among its sealer's records of the epoch: a record cannot be moved to another epoch,
another place, other pages, nor cut short, without a tag failing; a record sent again is
refused by its index (the receive stage, wire.SealPosition). In the clear stay the
records' headers, pfns, kinds and lengths: which pages were written and how well they
compressed.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

# ``cryptography`` is imported where a key is used, not here: pipeline/wire.py reads seal
# headers in every process, most of which never seal or open anything
AESGCM = Any

SHARE_SIZE = 32          # each HELLO's random share
KEY_SIZE = 32            # AES-256
TAG_SIZE = 16
HEADER = struct.Struct("<IIQII")   # key_id, sealer, counter, index, reserved
HEADER_SIZE = HEADER.size          # 24
OVERHEAD = HEADER_SIZE + TAG_SIZE  # bytes a sealed field of one part has beyond its plaintext
SEND_SEALER = 0xFFFF_FFFF          # the send stage (EPOCH_END); digest worker i is i
NO_KEY = 0                         # key_id of the store's own key before any agreement
_INFO = b"colo-pipeline pages channel AES-256-GCM, v1"


class SealError(ValueError):
    """A sealed field that does not open; the message says which field and why."""


@dataclass(frozen=True)
class SealHeader:
    key_id: int
    sealer: int
    counter: int
    index: int



def read_header(sealed) -> SealHeader:
    key_id, sealer, counter, index, _ = HEADER.unpack_from(sealed, 0)
    return SealHeader(key_id, sealer, counter, index)


def new_share() -> bytes:
    return os.urandom(SHARE_SIZE)


def derive_key(primary_share: bytes, secondary_share: bytes) -> tuple[int, bytes]:
    """(key_id, key) of a session from the two HELLOs' shares. Both nodes add randomness:
    the key is new whichever side restarted. ``key_id`` (never :data:`NO_KEY`) names the
    key in each sealed record, so a record of another session is refused as such."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    if len(primary_share) != SHARE_SIZE or len(secondary_share) != SHARE_SIZE:
        raise ValueError(f"seal key shares must be {SHARE_SIZE} bytes each")
    out = HKDF(hashes.SHA256(), KEY_SIZE + 4, salt=None, info=_INFO).derive(
        primary_share + secondary_share)
    key_id = int.from_bytes(out[KEY_SIZE:], "little") or 1
    return key_id, out[:KEY_SIZE]


def overhead(parts: int = 1) -> int:
    """Bytes a sealed field of ``parts`` parts has beyond their plaintexts."""
    return HEADER_SIZE + TAG_SIZE * parts


def _nonce(sealer: int, counter: int) -> bytes:
    return struct.pack("<IQ", sealer, counter)


def _buf(b) -> memoryview:
    return memoryview(b).cast("B") if not isinstance(b, memoryview) or b.format != "B" \
        or b.ndim != 1 else b


def seal_into(aead: AESGCM, header: SealHeader, aad_prefix, parts, out) -> int:
    """Seal the plaintexts ``parts`` into ``out`` (writable, at least their lengths plus
    ``overhead(len(parts))`` bytes): the seal header, then each part's ciphertext and tag.
    The associated data is ``aad_prefix`` (the record's bytes before this field) and the
    seal header. Returns the bytes written."""
    hdr = HEADER.pack(header.key_id, header.sealer, header.counter, header.index, 0)
    aad = bytes(aad_prefix) + hdr
    view = _buf(out)
    view[:HEADER_SIZE] = hdr
    at = HEADER_SIZE
    for j, part in enumerate(parts):
        n = len(_buf(part)) + TAG_SIZE
        aead.encrypt_into(_nonce(header.sealer, header.counter + j), part, aad,
                          view[at:at + n])
        at += n
    return at


def open_into(aead: AESGCM, aad_prefix, sealed, outs, what: str) -> None:
    """Open the sealed field ``sealed`` into ``outs``, one writable buffer per part, each
    exactly its part's plaintext length. Raises :class:`SealError` naming ``what`` (the
    record and field) if the lengths do not add up or a tag does not verify: tampered,
    cut short, moved to another record's place, or sealed under another key. An ``out``
    may hold unverified plaintext then: the caller discards it (the epoch is torn)."""
    from cryptography.exceptions import InvalidTag
    sealed = _buf(sealed)
    outs = [_buf(o) for o in outs]
    want = sum(len(o) for o in outs) + overhead(len(outs))
    if len(sealed) != want:
        raise SealError(f"{what}: {len(sealed)} bytes sealed, expected {want}")
    hdr = read_header(sealed)
    aad = bytes(aad_prefix) + bytes(sealed[:HEADER_SIZE])
    at = HEADER_SIZE
    for j, out in enumerate(outs):
        n = len(out) + TAG_SIZE
        try:
            aead.decrypt_into(_nonce(hdr.sealer, hdr.counter + j), sealed[at:at + n], aad,
                              out)
        except InvalidTag:
            raise SealError(f"{what}: part {j}: the tag does not verify (sealer {hdr.sealer} "
                            f"counter {hdr.counter} index {hdr.index}: tampered, cut short, "
                            "replayed into another place or sealed under another key)"
                            ) from None
        at += n


class SealKeys:
    """The node's current seal key, in an anonymous shared mapping the supervisor makes
    before it forks the stages (inherited, never a file; MADV_DONTDUMP keeps it out of
    core dumps). One writer, the coordinator (:meth:`install` at each HELLO exchange);
    readers take the key under a sequence lock (an odd ``seq`` is a write under way).

    Until a key is agreed the store holds a random key of its own under :data:`NO_KEY`:
    what is sealed with it no one can open, and a receiver refuses it by its key id."""

    _LAYOUT = struct.Struct("<QI4x32s")     # seq, key_id, key

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, mmap.PAGESIZE)
        try:
            self.map.madvise(mmap.MADV_DONTDUMP)
        except (AttributeError, OSError):
            pass
        self._LAYOUT.pack_into(self.map, 0, 0, NO_KEY, os.urandom(KEY_SIZE))

    def seq(self) -> int:
        return struct.unpack_from("<Q", self.map, 0)[0]

    def install(self, key_id: int, key: bytes) -> None:
        seq = self.seq()
        struct.pack_into("<Q", self.map, 0, seq + 1)
        struct.pack_into("<I4x32s", self.map, 8, key_id, key)
        struct.pack_into("<Q", self.map, 0, seq + 2)

    def current(self) -> tuple[int, int, bytes]:
        """(seq, key_id, key), consistent."""
        while True:
            seq, key_id, key = self._LAYOUT.unpack_from(self.map, 0)
            if not seq & 1 and self.seq() == seq:
                return seq, key_id, key

    def key_id(self) -> int:
        return self.current()[1]


class _KeyUser:
    """A process's view of the store: a new AESGCM when the key changed."""

    def __init__(self, keys: SealKeys) -> None:
        self.keys, self.seq, self.key_id, self.aead = keys, -1, NO_KEY, None

    def refresh(self) -> bool:
        """True if the key changed since the last look."""
        if self.keys.seq() == self.seq:
            return False
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self.seq, self.key_id, key = self.keys.current()
        self.aead = AESGCM(key)
        return True


class Sealer(_KeyUser):
    """One sealing process (a digest worker, the send stage): its nonce counter (from 0
    under each key: a stage that dies stops its node, whose next session has a new key)
    and its records' index in each epoch."""

    def __init__(self, keys: SealKeys, sealer: int) -> None:
        super().__init__(keys)
        self.sealer, self.counter, self.epoch, self.index = sealer, 0, -1, 0

    def seal(self, epoch: int, aad_prefix, parts, out) -> int:
        """:func:`seal_into` the next record of ``epoch``; returns the bytes written."""
        if self.refresh():
            self.counter = 0
        if epoch != self.epoch:
            self.epoch, self.index = epoch, 0
        header = SealHeader(self.key_id, self.sealer, self.counter, self.index)
        self.counter += len(parts)
        self.index += 1
        return seal_into(self.aead, header, aad_prefix, parts, out)


class Opener(_KeyUser):
    """One opening process (a verify worker, the receive stage)."""

    def check_key(self, key_id: int, what: str) -> None:
        self.refresh()
        if key_id == NO_KEY or key_id != self.key_id:
            raise SealError(f"{what}: sealed under key id {key_id:#010x}, this session's is "
                            f"{self.key_id:#010x}" + (" (none agreed yet)"
                                                      if self.key_id == NO_KEY else ""))

    def open(self, aad_prefix, sealed, outs, what: str) -> None:
        """:func:`open_into` with this session's key (a record under another is refused
        by its key id)."""
        self.check_key(read_header(sealed).key_id, what)
        open_into(self.aead, aad_prefix, sealed, outs, what)
