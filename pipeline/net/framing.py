"""The socket framing of QEMU's filter-mirror, filter-redirector and colo-compare.

Each frame on the stream is::

    u32 BE length | [u32 BE vnet header length, only with vnet_hdr_support] | frame

``length`` counts the whole frame (the vnet header included, not the vnet
length word). Frames larger than :data:`MAX_FRAME_BYTES` are rejected. Unlike
QEMU (which stops reading the socket after an oversized frame), the decoder
skips the announced bytes and stays in step with the stream.

Xen's notify channel uses the same length prefix without a vnet word.

Epoch boundaries (ours, not QEMU's) travel in the same stream, in order with the
frames, so the comparator judges every frame against the right epoch::

    u32 BE 0xFFFFFFFF | u32 BE kind | u64 BE epoch | u64 BE aborted epoch

``kind``: 1 the PVM was snapshotted at the end of ``epoch`` (frames after this belong
to ``epoch + 1``); 2 the SVM was restored to the PVM's snapshot of ``epoch`` (its
frames after this are the restored SVM's); 3 the SVM was rolled back to committed
``epoch`` after ``aborted epoch`` was torn. The length word is never a frame's
(frames are at most :data:`MAX_FRAME_BYTES`); the guest cannot write it.
"""
from __future__ import annotations

import struct
from collections.abc import Callable

from pipeline.net.settings import MAX_FRAME_BYTES

LENGTH_WORD = struct.Struct("!I")

BOUNDARY_WORD = 0xFFFFFFFF
#: the boundary record: length word, kind, epoch, aborted epoch
BOUNDARY_RECORD = _BOUNDARY = struct.Struct("!IIQQ")
BOUNDARY_SIZE = BOUNDARY_RECORD.size
BOUNDARY_SNAPSHOT, BOUNDARY_COMMITTED, BOUNDARY_ROLLED_BACK = 1, 2, 3
BOUNDARY_KINDS = {BOUNDARY_SNAPSHOT: "snapshot", BOUNDARY_COMMITTED: "committed",
                  BOUNDARY_ROLLED_BACK: "rolled_back"}


class Boundary:
    """An epoch boundary read from a frame stream (not a frame: it does not unpack as one)."""

    __slots__ = ("aborted", "epoch", "kind")

    def __init__(self, kind: int, epoch: int, aborted: int = 0) -> None:
        self.kind, self.epoch, self.aborted = kind, epoch, aborted

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Boundary) and (self.kind, self.epoch, self.aborted) == (
            other.kind, other.epoch, other.aborted)

    def __repr__(self) -> str:
        return f"Boundary({BOUNDARY_KINDS.get(self.kind, self.kind)}, {self.epoch}, {self.aborted})"


def encode_boundary(kind: int, epoch: int, aborted: int = 0) -> bytes:
    """One epoch boundary record in the frame stream."""
    if kind not in BOUNDARY_KINDS:
        raise ValueError(f"unknown boundary kind {kind}")
    return _BOUNDARY.pack(BOUNDARY_WORD, kind, epoch, aborted)

Frame = tuple[bytes, int]   # (frame bytes, vnet header length at its start)


def encode_frame(frame: bytes, vnet_hdr_len: int = 0, vnet_hdr: bool = False) -> bytes:
    """One frame in QEMU's socket framing."""
    if vnet_hdr:
        return LENGTH_WORD.pack(len(frame)) + LENGTH_WORD.pack(vnet_hdr_len) + frame
    return LENGTH_WORD.pack(len(frame)) + frame


class FrameDecoder:
    """Turns a byte stream into frames; bad lengths are reported, skipped, and never
    desynchronise the stream."""

    def __init__(self, vnet_hdr: bool = False, max_frame: int = MAX_FRAME_BYTES,
                 on_malformed: Callable[[str], None] | None = None) -> None:
        self.vnet_hdr = vnet_hdr
        self.max_frame = max_frame
        self.on_malformed = on_malformed
        self._buf = bytearray()
        self._skip = 0           # bytes of an oversized frame still to discard
        self.malformed = 0
        #: epoch boundaries decoded so far (feed() returns them in place, as Boundary)
        self.boundaries = 0

    @property
    def idle(self) -> bool:
        """No partial frame and nothing to skip: the stream is at an item boundary."""
        return not self._buf and not self._skip

    def _bad(self, reason: str) -> None:
        self.malformed += 1
        if self.on_malformed is not None:
            self.on_malformed(reason)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes from the stream; returns the frames completed by them (and any
        epoch boundary among them, as a :class:`Boundary` in its place)."""
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        buf = bytes(self._buf) + data if self._buf else bytes(data)
        out: list[Frame] = []
        vnet_hdr = self.vnet_hdr
        head = 8 if vnet_hdr else 4
        unpack = LENGTH_WORD.unpack_from
        size = len(buf)
        pos = 0
        while size - pos >= head:
            (length,) = unpack(buf, pos)
            if length == BOUNDARY_WORD:
                if size - pos < _BOUNDARY.size:
                    break
                _, kind, epoch, aborted = _BOUNDARY.unpack_from(buf, pos)
                pos += _BOUNDARY.size
                if kind in BOUNDARY_KINDS:
                    out.append(Boundary(kind, epoch, aborted))   # type: ignore[arg-type]
                    self.boundaries += 1
                else:
                    self._bad(f"unknown epoch boundary kind {kind}")
                continue
            vnet = unpack(buf, pos + 4)[0] if vnet_hdr else 0
            if length > self.max_frame:
                self._bad(f"frame length {length} exceeds {self.max_frame}")
                pos += head
                available = min(length, size - pos)
                pos += available
                self._skip = length - available
                if self._skip:
                    break
                continue
            if size - pos - head < length:
                break
            pos += head
            if vnet > length:
                self._bad(f"vnet header length {vnet} exceeds frame length {length}")
            else:
                out.append((buf[pos:pos + length], vnet))
            pos += length
        self._buf = bytearray(buf[pos:]) if pos < size else bytearray()
        return out
