"""IPv4 reassembly, so a datagram is compared as a whole even when the PVM and the
SVM fragment it differently (or pick different IP ids)."""
from __future__ import annotations

import struct

from pipeline.net.packet import MalformedFrame, Packet, parse_frame

#: largest IPv4 datagram
MAX_DATAGRAM = 65535


class _Partial:
    __slots__ = ("epoch", "first", "frames", "pieces", "started", "total")

    def __init__(self, started: float, epoch: int) -> None:
        self.pieces: dict[int, bytes] = {}
        self.frames: list[tuple[bytes, int]] = []
        self.total: int | None = None
        self.first: Packet | None = None
        self.started = started
        self.epoch = epoch


class Reassembler:
    """Fragments of one side, keyed by (vlans, src, dst, proto, ip id). Bounded: when full,
    the oldest incomplete datagram's frames are handed back by :meth:`take_until`/dropped."""

    def __init__(self, max_datagrams: int) -> None:
        self.max_datagrams = max_datagrams
        self._partials: dict[tuple, _Partial] = {}
        self._evicted: list[list[tuple[bytes, int]]] = []

    def add(self, packet: Packet, now: float, epoch: int
            ) -> tuple[Packet, list[tuple[bytes, int]]] | None:
        """Add a fragment; returns (reassembled packet, original frames) once complete."""
        payload = packet.compare
        if packet.frag_more and len(payload) % 8:
            raise MalformedFrame(f"IPv4 fragment at offset {packet.frag_offset} has "
                                 f"{len(payload)} bytes, not a multiple of 8")
        if packet.frag_offset + len(payload) > MAX_DATAGRAM:
            raise MalformedFrame(f"IPv4 fragment at offset {packet.frag_offset} runs past "
                                 f"{MAX_DATAGRAM} bytes")
        part = self._partials.get(packet.frag_id)
        if part is None:
            if len(self._partials) >= self.max_datagrams:
                oldest = next(iter(self._partials))
                self._evicted.append(self._partials.pop(oldest).frames)
            part = self._partials[packet.frag_id] = _Partial(now, epoch)
        part.pieces[packet.frag_offset] = payload
        part.frames.append((packet.frame, packet.vnet_hdr_len))
        if packet.frag_offset == 0:
            part.first = packet
        if not packet.frag_more:
            part.total = packet.frag_offset + len(payload)
        if part.total is None or part.first is None:
            return None
        data = bytearray()
        for offset in sorted(part.pieces):
            if offset > len(data):
                return None                       # a hole
            data += part.pieces[offset][len(data) - offset:]
        if len(data) < part.total:
            return None
        del self._partials[packet.frag_id]
        first = part.first
        frame = bytearray(first.frame[:first.l4_offset])
        l3 = first.l3_offset
        total_length = first.l4_offset - l3 + part.total
        try:
            if total_length > MAX_DATAGRAM:
                raise MalformedFrame(f"IPv4 fragments reassemble to a total length of "
                                     f"{total_length} bytes, more than {MAX_DATAGRAM}")
            # total length, id 0, flags and fragment offset 0: a whole datagram again
            struct.pack_into("!HHH", frame, l3 + 2, total_length, 0, 0)
            frame += data[:part.total]
            return parse_frame(bytes(frame), first.vnet_hdr_len), part.frames
        except MalformedFrame as exc:
            exc.frames = part.frames   # the refused datagram's frames (this one last): dropped
            raise

    @property
    def pending(self) -> bool:
        """Fragments held (incomplete or evicted datagrams)."""
        return bool(self._partials) or bool(self._evicted)

    def oldest(self, now: float) -> float:
        """Age in seconds of the oldest incomplete datagram (0 when none)."""
        if not self._partials:
            return 0.0
        return now - next(iter(self._partials.values())).started

    def take_until(self, epoch: int) -> list[list[tuple[bytes, int]]]:
        """Remove the incomplete datagrams begun in ``epoch`` or earlier (and any evicted ones)."""
        out, self._evicted = self._evicted, []
        for key in [k for k, p in self._partials.items() if p.epoch <= epoch]:
            out.append(self._partials.pop(key).frames)
        return out
