"""The SVM's TCP sequence rewriting (what QEMU's filter-rewriter does).

The PVM's and the SVM's kernels pick different initial sequence numbers (and
TCP timestamp offsets). Per connection the rewriter learns, from the two
SYN-ACKs, ``offset = PVM ISN - SVM ISN`` and applies it:

* to the SVM's outgoing segments: ``seq += offset`` (so they compare against the PVM's);
* to the client's segments mirrored to the SVM: ``ack -= offset``, SACK edges
  and the echoed timestamp likewise (so the SVM's stack accepts the client's ACKs).

Checksums are recomputed. After a checkpoint the SVM holds the PVM's state, so
every offset is reset to 0 (:meth:`reset`).

On the secondary's host (:mod:`pipeline.net.redirector`, QEMU's filter-rewriter does the
same) the PVM's SYN-ACK is never seen: :meth:`observe_client` learns the PVM's ISN and
timestamp from the client's ACK that completes the handshake (it acknowledges PVM ISN + 1
and echoes the PVM's TSval). After a failover the SVM's segments go to the client
directly, so their TSval is moved into the PVM's space too (the client's PAWS check would
drop a segment whose timestamp looks older than the PVM's).

**Re-protection** (:mod:`pipeline.net.redirector`): the survivor's guest goes on in the
SVM's space on every connection the clients opened before the failover, and so does a
new secondary's guest synced from it; :meth:`export_offsets` and :meth:`load_offsets`
carry those connections' offsets to the new secondary's redirector.
"""
from __future__ import annotations

import logging
import struct
from collections import OrderedDict

from pipeline.net.build import l4_checksum
from pipeline.net.packet import KIND_TCP, TCP_ACK, TCP_SYN, MalformedFrame, parse_frame

log = logging.getLogger(__name__)

TCPOPT_EOL, TCPOPT_NOP, TCPOPT_SACK, TCPOPT_TIMESTAMP = 0, 1, 5, 8
M32 = 0xFFFFFFFF


class _Flow:
    __slots__ = ("carried", "client_syn", "pvm_isn", "pvm_ts", "seq_offset", "svm_isn",
                 "svm_ts", "ts_offset")

    def __init__(self) -> None:
        self.pvm_isn = self.svm_isn = self.pvm_ts = self.svm_ts = None
        self.seq_offset = 0
        self.ts_offset = 0
        self.client_syn = False     # the client's SYN seen: its next ACK ends the handshake
        self.carried = False        # loaded (load_offsets): a connection from before a failover


def _timestamp(frame: bytes, l4: int) -> int | None:
    """TSval of a segment's timestamp option, if it has one."""
    for pos, kind, length in _options(frame, l4):
        if kind == TCPOPT_TIMESTAMP and length == 10:
            return struct.unpack_from("!I", frame, pos + 2)[0]
    return None


def _options(frame: bytes | bytearray, l4: int):
    end = l4 + (frame[l4 + 12] >> 4) * 4
    pos = l4 + 20
    while pos < end:
        kind = frame[pos]
        if kind == TCPOPT_EOL:
            return
        if kind == TCPOPT_NOP:
            pos += 1
            continue
        if pos + 1 >= end or frame[pos + 1] < 2 or pos + frame[pos + 1] > end:
            return                   # a broken option list: leave the rest alone
        yield pos, kind, frame[pos + 1]
        pos += frame[pos + 1]


class SeqRewriter:
    """Per-connection sequence/timestamp offsets between the SVM and the PVM."""

    def __init__(self, max_connections: int = 4096) -> None:
        self.max_connections = max_connections
        self._flows: OrderedDict[tuple, _Flow] = OrderedDict()
        self.rewritten = 0

    def _flow(self, key: tuple, create: bool) -> _Flow | None:
        flow = self._flows.get(key)
        if flow is None and create:
            if len(self._flows) >= self.max_connections:
                self._flows.popitem(last=False)
            flow = self._flows[key] = _Flow()
        return flow

    @staticmethod
    def _parse(frame: bytes, vnet: int):
        try:
            packet = parse_frame(frame, vnet)
        except MalformedFrame:
            return None          # the comparator counts it; nothing to rewrite
        return packet if packet.kind == KIND_TCP else None

    def _learn(self, flow: _Flow) -> None:
        if flow.pvm_isn is not None and flow.svm_isn is not None:
            flow.seq_offset = (flow.pvm_isn - flow.svm_isn) & M32
            if flow.pvm_ts is not None and flow.svm_ts is not None:
                flow.ts_offset = (flow.pvm_ts - flow.svm_ts) & M32

    def observe_primary(self, frame: bytes, vnet: int = 0) -> None:
        """A PVM frame: learn the PVM's ISN from its SYN-ACK."""
        packet = self._parse(frame, vnet)
        if packet is None or packet.flags & (TCP_SYN | TCP_ACK) != TCP_SYN | TCP_ACK:
            return
        flow = self._flow(packet.key, True)
        flow.pvm_isn, flow.pvm_ts = packet.seq, _timestamp(frame, packet.l4_offset)
        self._learn(flow)

    def observe_client(self, frame: bytes, vnet: int = 0) -> None:
        """A client frame on the secondary's host (the PVM's SYN-ACK is not seen there):
        the client's ACK that completes the handshake acknowledges PVM ISN + 1 and echoes
        the PVM's TSval; call before :meth:`to_secondary`."""
        packet = self._parse(frame, vnet)
        if packet is None:
            return
        vlans, ver, proto, src, dst, sport, dport = packet.key
        key = (vlans, ver, proto, dst, src, dport, sport)
        if packet.flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            flow = self._flow(key, True)
            flow.client_syn, flow.pvm_isn, flow.seq_offset, flow.ts_offset = True, None, 0, 0
            return
        flow = self._flow(key, False)
        if flow is None or not flow.client_syn or not packet.flags & TCP_ACK:
            return
        flow.client_syn = False
        flow.pvm_isn = (packet.ack - 1) & M32
        for pos, kind, length in _options(frame, packet.l4_offset):
            if kind == TCPOPT_TIMESTAMP and length == 10:
                flow.pvm_ts = struct.unpack_from("!I", frame, pos + 6)[0]
        self._learn(flow)

    def from_secondary(self, frame: bytes, vnet: int = 0) -> bytes:
        """An SVM frame: move its sequence number (and TSval) into the PVM's space."""
        packet = self._parse(frame, vnet)
        if packet is None:
            return frame
        if packet.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK:
            flow = self._flow(packet.key, True)
            flow.svm_isn, flow.svm_ts = packet.seq, _timestamp(frame, packet.l4_offset)
            self._learn(flow)
        else:
            flow = self._flow(packet.key, False)
        if flow is None or not (flow.seq_offset or flow.ts_offset):
            return frame
        out = bytearray(frame)
        l4 = packet.l4_offset
        struct.pack_into("!I", out, l4 + 4, (packet.seq + flow.seq_offset) & M32)
        if flow.ts_offset:
            for pos, kind, length in list(_options(out, l4)):
                if kind == TCPOPT_TIMESTAMP and length == 10:
                    tsval = struct.unpack_from("!I", out, pos + 2)[0]
                    struct.pack_into("!I", out, pos + 2, (tsval + flow.ts_offset) & M32)
        return self._fix_checksum(out, packet)

    def to_secondary(self, frame: bytes, vnet: int = 0) -> bytes:
        """A client frame mirrored to the SVM: move its ACK (and SACK, TSecr) into the
        SVM's space."""
        packet = self._parse(frame, vnet)
        if packet is None:
            return frame
        # client -> guest: the guest's flow key has the addresses and ports swapped
        vlans, ver, proto, src, dst, sport, dport = packet.key
        flow = self._flow((vlans, ver, proto, dst, src, dport, sport), False)
        if flow is None or not (flow.seq_offset or flow.ts_offset):
            return frame
        out = bytearray(frame)
        l4 = packet.l4_offset
        if packet.flags & TCP_ACK:
            struct.pack_into("!I", out, l4 + 8, (packet.ack - flow.seq_offset) & M32)
        for pos, kind, length in list(_options(out, l4)):
            if kind == TCPOPT_SACK:
                for edge in range(pos + 2, pos + length - 3, 4):
                    value = struct.unpack_from("!I", out, edge)[0]
                    struct.pack_into("!I", out, edge, (value - flow.seq_offset) & M32)
            elif kind == TCPOPT_TIMESTAMP and length == 10 and flow.ts_offset:
                tsecr = struct.unpack_from("!I", out, pos + 6)[0]
                struct.pack_into("!I", out, pos + 6, (tsecr - flow.ts_offset) & M32)
        return self._fix_checksum(out, packet)

    def _fix_checksum(self, out: bytearray, packet) -> bytes:
        l3, l4 = packet.l3_offset, packet.l4_offset
        if packet.key[1] == 4:
            end = l3 + struct.unpack_from("!H", out, l3 + 2)[0]
        else:
            end = l3 + 40 + struct.unpack_from("!H", out, l3 + 4)[0]
        src, dst = packet.key[3], packet.key[4]
        struct.pack_into("!H", out, l4 + 16, 0)
        struct.pack_into("!H", out, l4 + 16, l4_checksum(src, dst, 6, out[l4:end]))
        self.rewritten += 1
        return bytes(out)

    def export_offsets(self) -> list[dict]:
        """The connections whose segments are moved (a non-zero offset), as JSON-ready rows
        for :meth:`load_offsets` on another host's rewriter."""
        rows = []
        for (vlans, ver, proto, src, dst, sport, dport), f in self._flows.items():
            if f.seq_offset or f.ts_offset:
                rows.append({"vlans": list(vlans), "ip": ver, "proto": proto,
                             "guest": bytes(src).hex(), "client": bytes(dst).hex(),
                             "guest_port": sport, "client_port": dport,
                             "seq_offset": f.seq_offset, "ts_offset": f.ts_offset})
        return rows

    def load_offsets(self, rows: list) -> int:
        """Take over another rewriter's offsets (:meth:`export_offsets`): all of them or,
        on a malformed row, none (ValueError naming the row). Returns how many."""
        flows = []
        for i, row in enumerate(rows):
            try:
                ver, length = row["ip"], {4: 4, 6: 16}.get(row["ip"])
                src, dst = bytes.fromhex(row["guest"]), bytes.fromhex(row["client"])
                key = (tuple(int(v) for v in row["vlans"]), ver, int(row["proto"]), src,
                       dst, int(row["guest_port"]), int(row["client_port"]))
                seq_offset, ts_offset = int(row["seq_offset"]), int(row["ts_offset"])
                if length is None or len(src) != length or len(dst) != length:
                    raise ValueError(f"IPv{ver} addresses {row['guest']}, {row['client']}")
                if not (0 <= seq_offset <= M32 and 0 <= ts_offset <= M32):
                    raise ValueError("offsets outside 32 bits")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ValueError(f"offsets row {i} ({row!r}) is malformed: {exc!r}") from None
            flows.append((key, seq_offset, ts_offset))
        for key, seq_offset, ts_offset in flows:
            flow = self._flow(key, True)
            flow.seq_offset, flow.ts_offset = seq_offset, ts_offset
            flow.carried = True
        return len(flows)

    def reset_learnt(self) -> tuple[int, int]:
        """A checkpoint on a re-protected pair: the SVM now holds the PVM's state, so the
        offsets learnt here (connections opened while protected: the two guests' ISNs
        differ until a checkpoint) are 0 again, but the carried ones stay: both guests are
        in the survivor guest's space on those, which the clients' differs from. Returns
        (connections reset, connections kept)."""
        learnt = [key for key, f in self._flows.items() if not f.carried]
        for key in learnt:
            del self._flows[key]
        return len(learnt), len(self._flows)

    def reset(self) -> None:
        """After a checkpoint the SVM continues from the PVM's state: no offsets any more."""
        self._flows.clear()
