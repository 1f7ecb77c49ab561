"""The socket framing of QEMU's filter-mirror, filter-redirector and colo-compare.

Each frame on the stream is::

    u32 BE length | [u32 BE vnet header length, only with vnet_hdr_support] | frame

``length`` counts the whole frame (the vnet header included, not the vnet
length word). Frames larger than :data:`MAX_FRAME_BYTES` are rejected. Unlike
QEMU (which stops reading the socket after an oversized frame), the decoder
skips the announced bytes and stays in step with the stream.

Xen's notify channel uses the same length prefix without a vnet word.
"""
from __future__ import annotations

import struct
from collections.abc import Callable

from pipeline.net.settings import MAX_FRAME_BYTES

LENGTH_WORD = struct.Struct("!I")

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

    def _bad(self, reason: str) -> None:
        self.malformed += 1
        if self.on_malformed is not None:
            self.on_malformed(reason)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes from the stream; returns the frames completed by them."""
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
