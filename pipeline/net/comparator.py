"""The comparison core: one object that owns every held frame.

Per connection (keyed by :attr:`Packet.key`) it keeps the PVM's and the SVM's
frames in arrival order and compares them with one function per kind:

* TCP by sequence range (``_compare_tcp``): the SVM's payload bytes are gathered
  into a per-connection stream, so a PVM segment may match several SVM segments
  or part of one. SYN/FIN/RST must agree; window, checksum, IP id and options are
  ignored. Pure ACKs carry no output and are released at once (as QEMU does).
  The SVM's sequence numbers must already be in the PVM's space (our
  :mod:`pipeline.net.rewriter` or QEMU's filter-rewriter does that); SYN
  segments are placed at relative position 0 on both sides, so an SVM SYN-ACK
  that was not rewritten still matches.
* UDP and ICMP (``_compare_datagram``): the bytes after the IP header.
* Anything else (``_compare_datagram`` too, on the whole frame).

Frames leave through :meth:`_release_frames` (one by one) and :meth:`_match_run` (a
run of equal frames in one piece, below), and checkpoints are asked for through
:meth:`_request`, at most once per epoch; nothing else releases or requests.

Streams (``push_stream``, what the loop gives it from a ``tcp:``/``unix:`` source):
the bytes of each side wait, uncompared, for the other side's; while nothing is held
anywhere, the longest run of frame pairs at the same place in both streams that are
equal outside the fields that may differ (IPv4 id and checksum, TCP window and
checksum; valid untagged IPv4 TCP/UDP/ICMP frames only, so every such pair is one
the per-frame path would match) is released as one piece of stream bytes: one numpy
comparison for a thousand frames, no parsing, no connection lookup. A read that is one
frame, meeting one frame of the other side (the usual round of a comparator that keeps
up: ``push_pair``, ``_meet_waiting``), is judged the same way without being queued.
Anything else goes one frame at a time through ``push_primary``/``push_secondary``.

Epochs: frames are tagged with the epoch they arrived in. ``on_snapshot(e)``
starts epoch ``e + 1``; ``on_committed(e)`` releases every PVM frame of epoch
``e`` or earlier (matched or not) in arrival order, forgets the SVM's side (it was
restored from the PVM) and keeps comparing later PVM frames against the restored
SVM. A connection that diverged is not compared again until that commit, so one
divergence asks once. Not done (QEMU does it): holding a matched PVM segment
until the SVM has acknowledged the same client bytes.

Bounds (``max_queue_frames`` per connection and side, ``max_connections``) limit
memory; they never lose a PVM frame. A PVM frame that does not fit is kept, with
every PVM frame after it, in arrival order (:attr:`blocked`: the caller stops
reading the PVM until a commit, so the guest's transmit path backs up as a full
NIC ring would) and a checkpoint is requested (cause ``net_queue_full``); the
commit empties the queues and the kept frames go on in order. SVM frames that do
not fit are discarded until the next commit: they are never output, and the
commit would discard them anyway; the PVM frames they would have matched are held
until that commit instead.

Release policy (``net.release``): ``compare`` is all of the above. ``commit`` is
Remus's output buffering: nothing is compared, the SVM's frames are dropped, and
every PVM frame waits in one queue (``_awaiting``, in arrival order) until the epoch
that produced it commits; ``max_queue_frames`` bounds that queue, with the same
back-pressure. The policy is decided at two named points, ``_take_primary`` (what a
PVM frame does on arrival) and ``_release_committed`` (what a commit releases); frames
still leave only through ``_release_frames``.
"""
from __future__ import annotations

import ipaddress
import logging
import struct
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from pipeline.net.fragments import Reassembler
from pipeline.net.framing import (
    BOUNDARY_COMMITTED,
    BOUNDARY_KINDS,
    BOUNDARY_RECORD,
    BOUNDARY_ROLLED_BACK,
    BOUNDARY_SIZE,
    BOUNDARY_SNAPSHOT,
    BOUNDARY_WORD,
    Boundary,
    FrameDecoder,
)
from pipeline.net.packet import (
    KIND_TCP,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    MalformedFrame,
    Packet,
    parse_frame,
)
from pipeline.net.settings import MAX_FRAME_BYTES, NetSettings

log = logging.getLogger(__name__)

PRIMARY, SECONDARY = 0, 1
SIDE_NAMES = ("primary", "secondary")

#: every counter the comparator keeps (the stage maps them onto StageCounters)
COUNTER_NAMES = (
    "primary_frames_in", "secondary_frames_in", "primary_bytes_in", "secondary_bytes_in",
    "frames_released", "bytes_released", "secondary_frames_dropped", "primary_frames_dropped",
    "malformed_frames", "mismatches", "timeouts", "checkpoint_requests", "requests_coalesced",
    "table_full", "queue_full", "connections_evicted", "connections_closed",
    "fragments_held", "fragments_dropped", "commits", "snapshots", "passthrough_frames",
    "mirror_frames_held", "mirror_frames_dropped",
    # back-pressure: PVM frames kept out of the queues, time the PVM was not read, the
    # most PVM frames held at once, SVM frames discarded after their side overflowed
    "primary_frames_stalled", "backpressure_ns", "backpressures", "held_frames_peak",
    "secondary_overflow_frames",
    # the latency the comparator adds: PVM frames released after being held, by how long
    # (upper bounds in RELEASE_DELAY_BOUNDS_MS; the rest of frames_released went out at once)
    *(f"released_after_le_{b}ms" for b in ("0.1", "0.3", "1", "3", "10", "30", "100", "300",
                                           "1000", "3000")),
    "released_after_gt_3000ms",
    # frame pairs matched as part of a run of equal frames (compared in one piece)
    "run_matched_frames",
    # of those, pairs judged and released by the native rounds (pipeline.net.native)
    "native_matched_frames",
    # 1 once this comparator's native rounds are loaded (pipeline.net.loop): until then
    # every round runs in Python, and while a background load runs, beside a thread that
    # holds the GIL for tens of ms at a time (scripts/bench_service.py waits for it)
    "native_rounds_loaded",
)

#: upper bounds (ms) of the held-frame buckets, in COUNTER_NAMES order (inf: the last)
RELEASE_DELAY_BOUNDS_MS = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000, float("inf"))
RELEASE_DELAY_COUNTERS = tuple(n for n in COUNTER_NAMES if n.startswith("released_after_"))
_DELAY_BOUNDS_S = tuple(b / 1000 for b in RELEASE_DELAY_BOUNDS_MS[:-1])


def added_latency_ms(counters: dict[str, int], q: float) -> float:
    """The ``q`` quantile (0..1) of the time PVM frames spent in the comparator, from its
    counters: the upper bound of the bucket it falls in (0 for frames released at once)."""
    held = [counters.get(n, 0) for n in RELEASE_DELAY_COUNTERS]
    total = max(counters.get("frames_released", 0), sum(held))
    if not total:
        return 0.0
    rank = q * total
    seen = total - sum(held)                 # released at once
    if seen >= rank:
        return 0.0
    for bound, n in zip(RELEASE_DELAY_BOUNDS_MS, held):
        seen += n
        if seen >= rank:
            return bound
    return RELEASE_DELAY_BOUNDS_MS[-1]

#: SVM payload bytes held per connection before the queue counts as full
BYTES_PER_QUEUED_FRAME = 1514

Release = Callable[[bytes, int], None]
Request = Callable[[str, str], None]


class CounterSink(Protocol):
    def add(self, name: str, n: int) -> None: ...


class Held:
    """One frame (or the fragments of one datagram) waiting in a connection queue."""

    __slots__ = ("arrived", "ctrl", "done", "end", "epoch", "frames", "packet", "primary",
                 "start")

    def __init__(self, packet: Packet, frames: tuple | list, arrived: float,
                 epoch: int, primary: bool = True) -> None:
        self.primary = primary
        self.packet = packet
        self.frames = frames
        self.arrived = arrived
        self.epoch = epoch
        self.done = False
        # TCP: relative sequence range of the payload and the control flags
        self.start = 0
        self.end = 0
        self.ctrl = 0


class Connection:
    """Both sides of one flow (guest -> client direction).

    The TCP fields have class-level defaults and get their own mutable containers
    only for TCP connections (most datagram flows are short: keep them cheap).
    """

    # --- TCP: relative sequence space (see Comparator._rel) ---
    base: int | None = None
    high_rel = 0
    #: PVM bytes below this relative position were matched (or released by a commit)
    verified: int | None = None
    #: the SVM's contiguous bytes: sec_buf holds [sec_start, sec_start + len)
    sec_start: int | None = None
    sec_buf: bytearray | bytes = b""
    #: out-of-order SVM segments: relative start -> payload
    sec_ooo: dict[int, bytes] | None = None
    sec_ooo_bytes = 0
    #: relative position -> SYN/FIN flags seen from the SVM
    sec_ctrl: dict[int, int] | None = None
    sec_fin: int | None = None
    sec_rst = False

    def __init__(self, key: tuple, is_tcp: bool) -> None:
        self.key = key
        self.is_tcp = is_tcp
        self.primary: deque[Held] = deque()
        self.secondary: deque[Held] = deque()
        #: set while a divergence waits for its checkpoint: no comparing until the commit
        self.diverged = False
        #: FIN or RST seen from both sides: drop the connection once its queues are empty
        self.closed = 0
        if is_tcp:
            self.reset_secondary()

    def idle(self) -> bool:
        return not self.primary and not self.secondary and not self.sec_buf and not self.sec_ooo

    def reset_secondary(self) -> None:
        """Forget the SVM's side: after a checkpoint the SVM restarts from the PVM's state."""
        self.secondary.clear()
        if not self.is_tcp:
            return
        self.sec_start = None
        self.sec_buf = bytearray()
        self.sec_ooo = {}
        self.sec_ooo_bytes = 0
        self.sec_ctrl = {}
        self.sec_fin = None
        self.sec_rst = False


class Comparator:
    """Compares PVM and SVM frames; releases matched PVM frames; requests checkpoints.

    ``release(frame, vnet_hdr_len)`` gets every PVM frame that may go to the client.
    ``request(cause, detail)`` is called at most once per epoch with cause
    ``net_divergence`` or ``net_timeout``. Call :meth:`on_snapshot` /
    :meth:`on_committed` from the coordinator's events, or :meth:`flush` for
    Xen's/QEMU's all-at-once ``COLO_CHECKPOINT``.
    """

    def __init__(self, settings: NetSettings, release: Release, request: Request,
                 counters: CounterSink | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 release_block: Callable[[bytes], None] | None = None,
                 boundary: Callable[[int, Boundary], None] | None = None) -> None:
        self.settings = settings
        self._release_cb = release
        self._request_cb = request
        self._sink = counters
        self._clock = clock
        self._timeout = settings.compare_timeout_ms / 1000.0
        self._max_queue = settings.max_queue_frames
        self._max_secondary_bytes = settings.max_queue_frames * BYTES_PER_QUEUED_FRAME
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.connections: OrderedDict[tuple, Connection] = OrderedDict()
        #: every Held in arrival order, for the timeout scan (done ones are skipped lazily)
        self._arrivals: deque[tuple[Held, Connection]] = deque()
        self._reassembly = (Reassembler(settings.max_fragment_datagrams),
                            Reassembler(settings.max_fragment_datagrams))
        #: the epoch new PVM frames belong to (advanced by on_snapshot)
        self.epoch = 0
        #: the last epoch the SVM was restored to; PVM frames of it or earlier go out at once
        self.committed = -1
        #: the newest PVM epoch the SVM's current run can match (the SVM restored at commit
        #: e runs on until the pause of checkpoint e + 1)
        self.svm_epoch = 0
        self._requested_epoch = -1
        self.passthrough = False
        self._malformed_logged = 0
        #: a PVM frame did not fit: the caller stops reading the PVM until a commit
        self.blocked = False
        self._blocked_since = 0.0
        #: PVM frames (and snapshot boundaries: ``(None, epoch)``, ``(None, -1 - epoch)`` when
        #: the boundary came as an event) not taken yet, in order
        self._stalled: deque[tuple[bytes | None, int]] = deque()
        #: the SVM's side overflowed: its frames are discarded until the next commit
        self._svm_overflow = False
        #: PVM frames in the connection queues now, and SVM frames
        self._held = 0
        #: net.release = "commit": PVM frames (epoch, frame, vnet, arrived) waiting for the
        #: commit of their epoch, in arrival order (so their epochs never decrease)
        self.release_on_commit = settings.release == "commit"
        self._awaiting: deque[tuple[int, bytes, int, float]] = deque()
        self._svm_held = 0
        #: each side's framed stream bytes not compared yet (push_stream)
        self._streams = (_Stream(), _Stream())
        self._pumping = False
        #: where in-band epoch boundaries go (the loop adds its own work to them)
        self._boundary_cb: Callable[[int, Boundary], None] = self.on_boundary
        #: where a run of released frames goes as one piece of framed bytes
        self._release_block_cb: Callable[[bytes], None] = release_block or self._release_block
        if boundary is not None:
            self._boundary_cb = boundary

    # ------------------------------------------------------------------ input
    def push_primary(self, frame: bytes, vnet_hdr_len: int = 0, now: float | None = None) -> None:
        """A frame the PVM sent."""
        counters = self.counters
        counters["primary_frames_in"] += 1
        counters["primary_bytes_in"] += len(frame)
        if self._sink is not None:
            self._sink.add("primary_frames_in", 1)
            self._sink.add("primary_bytes_in", len(frame))
        if self.passthrough:
            self._count("passthrough_frames")
            self._release_frames([(frame, vnet_hdr_len)])
            return
        if self.blocked:
            self._stalled.append((frame, vnet_hdr_len))
            self._count("primary_frames_stalled")
            return
        refused = self._take_primary(frame, vnet_hdr_len,
                                     self._clock() if now is None else now)
        if refused is not None:
            self._block(refused)

    def _take_primary(self, frame: bytes, vnet_hdr_len: int, now: float):
        """The release policy's arrival point for a PVM frame (not blocked, not passthrough):
        released, held, or handed back (returned) when it does not fit."""
        if self.release_on_commit:
            if self.epoch <= self.committed and not self._awaiting:
                self._release_frames([(frame, vnet_hdr_len)])
                return None
            if len(self._awaiting) >= self._max_queue:
                self._count("queue_full")
                self._request("net_queue_full", "frames waiting for a commit at the bound")
                return ((frame, vnet_hdr_len),)
            self._awaiting.append((self.epoch, frame, vnet_hdr_len, now))
            self._note_held(1)
            return None
        if self.epoch <= self.committed:
            # the SVM already holds the state after this frame (its commit was seen
            # before the PVM's snapshot boundary): nothing to compare it with
            self._release_frames([(frame, vnet_hdr_len)])
            return None
        return self._push(PRIMARY, frame, vnet_hdr_len, now)

    def push_secondary(self, frame: bytes, vnet_hdr_len: int = 0,
                       now: float | None = None) -> None:
        """A frame the SVM sent (sequence numbers already in the PVM's space)."""
        counters = self.counters
        counters["secondary_frames_in"] += 1
        counters["secondary_bytes_in"] += len(frame)
        if self._sink is not None:
            self._sink.add("secondary_frames_in", 1)
            self._sink.add("secondary_bytes_in", len(frame))
        if self.passthrough or self.release_on_commit:
            self._count("secondary_frames_dropped")
            return
        if self._svm_overflow:
            self._count("secondary_overflow_frames")
            self._count("secondary_frames_dropped")
            return
        self._push(SECONDARY, frame, vnet_hdr_len, self._clock() if now is None else now)

    def _push(self, side: int, frame: bytes, vnet_hdr_len: int, now: float):
        """Parse, queue and compare one frame. Returns the PVM frames that did not fit
        (the frame itself, or all fragments of a datagram it completed), else None."""
        try:
            packet = parse_frame(frame, vnet_hdr_len)
        except MalformedFrame as exc:
            self._malformed(side, frame, str(exc))
            return
        frames = ((frame, vnet_hdr_len),)
        if packet.frag_id is not None:
            try:
                done = self._reassembly[side].add(packet, now, self.epoch)
            except MalformedFrame as exc:
                # a refused datagram drops every fragment of it held so far, not only this one
                self._malformed(side, frame, str(exc), len(getattr(exc, "frames", ())) or 1)
                return
            if done is None:
                self._count("fragments_held")
                return
            packet, frames = done
        conn = self._connection(packet, now)
        if conn is None:
            return self._bound(side, "table_full", packet, frames)
        held = Held(packet, frames, now, self.epoch if side == PRIMARY else self.svm_epoch,
                    side == PRIMARY)
        if conn.is_tcp:
            if not self._push_tcp(side, conn, held):
                return self._bound(side, "queue_full", packet, frames)
        else:
            queue = conn.primary if side == PRIMARY else conn.secondary
            if len(queue) >= self._max_queue:
                return self._bound(side, "queue_full", packet, frames)
            queue.append(held)
            self._arrivals.append((held, conn))
            if side == PRIMARY:
                self._note_held(1)
            else:
                self._svm_held += 1
            if not conn.diverged:
                self._compare_datagram(conn)
                if not conn.primary and not conn.secondary:
                    # a datagram flow keeps no state between frames: forget it when idle
                    del self.connections[conn.key]
        if conn.closed == 3:
            self._maybe_forget(conn)
        return None

    def note_malformed(self, side: int, reason: str) -> None:
        """An adapter could not even cut a frame out of its stream (e.g. a bad length)."""
        self._malformed(side, b"", reason)

    def _malformed(self, side: int, frame: bytes, reason: str, frames: int = 1) -> None:
        self._count("malformed_frames", frames)
        if side == PRIMARY:
            self._count("primary_frames_dropped", frames)
        else:
            self._count("secondary_frames_dropped", frames)
        self._malformed_logged += 1
        n = self._malformed_logged
        if n <= 10 or n % 1000 == 0:
            log.warning("dropped malformed %s frame (%d bytes, #%d): %s; starts %s",
                        SIDE_NAMES[side], len(frame), n, reason, frame[:32].hex())

    def _bound(self, side: int, counter: str, packet: Packet, frames):
        """A bound was hit: ask for a checkpoint, which empties the queues. A PVM frame is
        handed back to be kept (returned); the SVM's side is discarded until the commit."""
        self._count(counter)
        n = self.counters[counter]
        if n <= 10 or n % 1000 == 0:
            log.warning("%s (#%d) on the %s side at %s: %s", counter, n, SIDE_NAMES[side],
                        _describe(packet.key), "holding the PVM's frames until the next "
                        "commit" if side == PRIMARY else "SVM output discarded until the "
                        "next commit")
        self._request("net_queue_full", f"{counter} on {SIDE_NAMES[side]} side")
        if side == PRIMARY:
            return frames
        self._svm_overflow = True
        self._count("secondary_overflow_frames", len(frames))
        self._count("secondary_frames_dropped", len(frames))
        return None

    def _block(self, frames) -> None:
        """Keep ``frames`` (and every PVM frame after them) until a commit makes room."""
        if not self.blocked:
            self.blocked = True
            self._blocked_since = self._clock()
            self._count("backpressures")
        self._stalled.extendleft(reversed(frames))
        self._count("primary_frames_stalled", len(frames))

    def _unblock(self) -> None:
        """After a commit: feed the kept PVM frames back in order until one does not fit."""
        if not self.blocked:
            return
        self.blocked = False
        stalled = self._stalled
        while stalled and not self.blocked:
            frame, vnet = stalled.popleft()
            if frame is None:          # a snapshot boundary kept in line (< 0: not in-band)
                self._snapshot(vnet if vnet >= 0 else -1 - vnet, vnet >= 0)
            elif self.passthrough:
                self._release_frames([(frame, vnet)])
            else:
                refused = self._take_primary(frame, vnet, self._clock())
                if refused is not None:
                    self.blocked = True
                    stalled.extendleft(reversed(refused))
        if not self.blocked:
            self._count("backpressure_ns", int((self._clock() - self._blocked_since) * 1e9))

    def _note_held(self, n: int) -> None:
        self._held += n
        if self._held > self.counters["held_frames_peak"]:
            self._count("held_frames_peak", self._held - self.counters["held_frames_peak"])

    # ------------------------------------------------------------ connections
    def _connection(self, packet: Packet, now: float) -> Connection | None:
        conns = self.connections
        conn = conns.get(packet.key)
        if conn is not None:
            conns.move_to_end(packet.key)
            return conn
        if len(conns) >= self.settings.max_connections:
            for key, old in conns.items():   # least recently used first
                if old.idle():
                    del conns[key]
                    self._count("connections_evicted")
                    break
            else:
                return None
        conn = Connection(packet.key, packet.kind == KIND_TCP)
        conns[packet.key] = conn
        return conn

    def _maybe_forget(self, conn: Connection) -> None:
        if conn.closed == 3 and conn.idle() and not conn.diverged:
            self.connections.pop(conn.key, None)
            self._count("connections_closed")
        elif not conn.is_tcp and conn.idle() and not conn.diverged:
            self.connections.pop(conn.key, None)

    # -------------------------------------------------------------------- TCP
    def _rel(self, conn: Connection, seq: int) -> int:
        """Sequence number -> position relative to the PVM's SYN (unwrapped past 2**32)."""
        if conn.base is None:
            conn.base = seq     # joined mid-stream: positions relative to the first seen
        high = conn.high_rel
        delta = (seq - conn.base - high) & 0xFFFFFFFF
        if delta < 0x80000000:
            conn.high_rel = high + delta
            return high + delta
        return high + delta - 0x100000000

    def _push_tcp(self, side: int, conn: Connection, held: Held) -> bool:
        """False: the frame did not fit its queue."""
        p = held.packet
        ctrl = p.flags & (TCP_SYN | TCP_FIN | TCP_RST)
        if ctrl & TCP_SYN:
            if side == PRIMARY:
                conn.base, conn.high_rel = p.seq, 0
            start = 1        # the SYN itself sits at 0; data after it
        else:
            start = self._rel(conn, p.seq)
        held.start, held.end, held.ctrl = start, start + len(p.payload), ctrl
        if ctrl & (TCP_FIN | TCP_RST):
            conn.closed |= 1 << side
        if side == PRIMARY:
            if not ctrl and not p.payload:
                # a pure ACK carries no output of the guest: nothing to compare
                self._release_frames(held.frames)
                return True
            if len(conn.primary) >= self._max_queue:
                return False
            conn.primary.append(held)
            self._arrivals.append((held, conn))
            self._note_held(1)
        else:
            if not ctrl and not p.payload:
                self._count("secondary_frames_dropped")
                return True
            primary = conn.primary
            if primary and not conn.sec_buf and not conn.sec_ooo and not conn.diverged \
                    and conn.sec_fin is None:
                head = primary[0]
                # the usual case: the SVM sent exactly the PVM's oldest held segment
                if head.start == start and head.end == held.end and head.ctrl == ctrl \
                        and not ctrl & TCP_RST and head.packet.payload == p.payload:
                    if ctrl & TCP_SYN:
                        conn.sec_ctrl[0] = TCP_SYN
                    elif ctrl & TCP_FIN:
                        conn.sec_ctrl[held.end] = TCP_FIN
                        conn.sec_fin = held.end
                    primary.popleft()
                    if conn.verified is None or head.end > conn.verified:
                        conn.verified = head.end
                    conn.sec_start = held.end     # the SVM stream continues from here
                    self.counters["secondary_frames_dropped"] += 1
                    if self._sink is not None:
                        self._sink.add("secondary_frames_dropped", 1)
                    self._release_held(head)
                    if primary:
                        self._compare_tcp(conn)
                    return True
            if not self._absorb_secondary(conn, held):
                return False
        if not conn.diverged:
            self._compare_tcp(conn)
        return True

    def _absorb_secondary(self, conn: Connection, held: Held) -> bool:
        """Add an SVM segment's bytes and flags to the connection's SVM stream."""
        held_bytes = len(conn.sec_buf) + conn.sec_ooo_bytes
        if held_bytes + len(held.packet.payload) > self._max_secondary_bytes \
                or len(conn.secondary) >= self._max_queue:
            return False
        ctrl, start, end = held.ctrl, held.start, held.end
        if ctrl & TCP_SYN:
            conn.sec_ctrl[0] = conn.sec_ctrl.get(0, 0) | TCP_SYN
        if ctrl & TCP_FIN:
            conn.sec_ctrl[end] = conn.sec_ctrl.get(end, 0) | TCP_FIN
            conn.sec_fin = end if conn.sec_fin is None else min(conn.sec_fin, end)
        if ctrl & TCP_RST:
            conn.sec_rst = True
        payload = held.packet.payload
        if payload:
            if conn.sec_start is None or (not conn.sec_buf and not conn.sec_ooo):
                conn.sec_start = start        # nothing buffered: the stream restarts here
            sec_end = conn.sec_start + len(conn.sec_buf)
            if start < conn.sec_start:
                # an earlier segment arrived late: it becomes the head of the stream
                if end >= conn.sec_start:
                    conn.sec_buf[:0] = payload[:conn.sec_start - start]
                else:
                    conn.sec_ooo[conn.sec_start] = bytes(conn.sec_buf)
                    conn.sec_ooo_bytes += len(conn.sec_buf)
                    conn.sec_buf = bytearray(payload)
                conn.sec_start = start
                self._merge_out_of_order(conn)
            elif start <= sec_end:
                if end > sec_end:
                    conn.sec_buf += payload if start == sec_end else payload[sec_end - start:]
                    if conn.sec_ooo:
                        self._merge_out_of_order(conn)
            elif start not in conn.sec_ooo or len(conn.sec_ooo[start]) < len(payload):
                conn.sec_ooo_bytes += len(payload) - len(conn.sec_ooo.get(start, b""))
                conn.sec_ooo[start] = payload
        conn.secondary.append(held)
        self._svm_held += 1
        self._arrivals.append((held, conn))
        return True

    @staticmethod
    def _merge_out_of_order(conn: Connection) -> None:
        while conn.sec_ooo:
            sec_end = conn.sec_start + len(conn.sec_buf)
            progressed = False
            for start in sorted(conn.sec_ooo):
                if start > sec_end:
                    break
                payload = conn.sec_ooo.pop(start)
                conn.sec_ooo_bytes -= len(payload)
                if start + len(payload) > sec_end:
                    conn.sec_buf += payload[sec_end - start:]
                    sec_end = conn.sec_start + len(conn.sec_buf)
                progressed = True
            if not progressed:
                return

    def _compare_tcp(self, conn: Connection) -> None:
        """Release PVM segments (in arrival order) whose bytes and flags the SVM matched."""
        while conn.primary:
            held = conn.primary[0]
            verdict = self._tcp_verdict(conn, held)
            if verdict is None:
                break                                   # wait for more SVM output
            if verdict:
                conn.primary.popleft()
                if conn.verified is None or held.end > conn.verified:
                    conn.verified = held.end
                self._release_held(held)
                continue
            self._diverged(conn, f"TCP bytes/flags differ at relative seq {held.start}..{held.end}"
                                 f" of {_describe(conn.key)}")
            return
        self._trim_secondary(conn)

    def _tcp_verdict(self, conn: Connection, held: Held) -> bool | None:
        """True: all of the PVM segment matched; False: it differs; None: not decided yet."""
        start, end, ctrl = held.start, held.end, held.ctrl
        sec_start = conn.sec_start
        sec_end = sec_start + len(conn.sec_buf) if sec_start is not None else None
        if conn.sec_fin is not None and end > conn.sec_fin:
            return False                                # the SVM closed before these bytes
        verified = conn.verified
        lo = start if verified is None or start >= verified else verified
        if lo < end:
            if sec_start is None or sec_end <= lo or sec_start > lo:
                return None
            upto = min(sec_end, end)
            payload = held.packet.payload
            mine = payload if lo == start and upto == end else payload[lo - start:upto - start]
            if mine != conn.sec_buf[lo - sec_start:upto - sec_start]:
                return False
            if upto < end:
                return None
        if ctrl & TCP_RST and not conn.sec_rst:
            return None
        if ctrl & TCP_SYN and not conn.sec_ctrl.get(0, 0) & TCP_SYN:
            return None
        if ctrl & TCP_FIN:
            if conn.sec_fin is None:
                if sec_end is not None and sec_end > end:
                    return False                        # the SVM sent more where the PVM closed
                return None
            if conn.sec_fin != end:
                return False
        return True

    def _trim_secondary(self, conn: Connection) -> None:
        """Drop SVM bytes and segments the PVM's released bytes have covered."""
        verified = conn.verified
        if verified is None:
            return
        if conn.sec_start is not None and verified > conn.sec_start:
            cut = min(verified - conn.sec_start, len(conn.sec_buf))
            del conn.sec_buf[:cut]
            conn.sec_start += cut
        secondary = conn.secondary
        dropped = 0
        while secondary and secondary[0].end <= verified:
            held = secondary.popleft()
            held.done = True
            self._svm_held -= 1
            dropped += len(held.frames)
        if dropped:
            self.counters["secondary_frames_dropped"] += dropped
            if self._sink is not None:
                self._sink.add("secondary_frames_dropped", dropped)

    # --------------------------------------------------------- UDP/ICMP/other
    def _compare_datagram(self, conn: Connection) -> None:
        """The PVM's oldest frame must equal one of the SVM's frames (QEMU's rule)."""
        primary, secondary = conn.primary, conn.secondary
        while primary and secondary:
            held = primary[0]
            if held.epoch > self.svm_epoch:
                # produced after the snapshot the SVM has not been restored to yet: only
                # the restored SVM's output (after the commit) may match it
                return
            want = held.packet.compare
            other = secondary[0]
            if other.packet.compare == want:          # the usual case: the oldest matches
                secondary.popleft()
            else:
                for other in secondary:
                    if other.packet.compare == want:
                        break
                else:
                    self._diverged(conn, f"{len(want)}-byte datagram matches none of "
                                         f"{len(secondary)} SVM frames on {_describe(conn.key)}")
                    return
                secondary.remove(other)
            primary.popleft()
            other.done = True
            self._svm_held -= 1
            self.counters["secondary_frames_dropped"] += len(other.frames)
            if self._sink is not None:
                self._sink.add("secondary_frames_dropped", len(other.frames))
            self._release_held(held)

    # ------------------------------------------------------ release / request
    def _release_held(self, held: Held) -> None:
        held.done = True
        self._held -= 1
        self._note_delay(held.arrived, len(held.frames))
        self._release_frames(held.frames)

    def _note_delay(self, arrived: float, n: int = 1) -> None:
        """How long a frame was held, into its RELEASE_DELAY_COUNTERS bucket."""
        self._count(RELEASE_DELAY_COUNTERS[bisect_left(_DELAY_BOUNDS_S,
                                                       self._clock() - arrived)], n)

    def _release_frames(self, frames: list[tuple[bytes, int]]) -> None:
        """The one place frames leave the comparator."""
        counters = self.counters
        for frame, vnet in frames:
            counters["frames_released"] += 1
            counters["bytes_released"] += len(frame)
            if self._sink is not None:
                self._sink.add("frames_released", 1)
                self._sink.add("bytes_released", len(frame))
            self._release_cb(frame, vnet)

    def _release_block(self, block: bytes) -> None:
        """A run of released frames in the stream framing, for a release callback per frame
        (the counters were taken by the caller)."""
        for frame, vnet in FrameDecoder(False).feed(block):
            self._release_cb(frame, vnet)

    def _request(self, cause: str, detail: str) -> None:
        """The one place a checkpoint is requested: at most once per epoch."""
        if self._requested_epoch == self.epoch:
            self._count("requests_coalesced")
            return
        self._requested_epoch = self.epoch
        self._count("checkpoint_requests")
        log.info("requesting checkpoint in epoch %d: %s (%s)", self.epoch, cause, detail)
        self._request_cb(cause, detail)

    def _diverged(self, conn: Connection, detail: str) -> None:
        conn.diverged = True
        self._count("mismatches")
        self._request("net_divergence", detail)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        if self._sink is not None:
            self._sink.add(name, n)

    # ------------------------------------------------------ framed streams
    # The loop hands over a stream source's bytes as they came (QEMU's framing, epoch
    # boundaries in-band). Whole items wait here, uncompared, until the other side's
    # bytes are there; then, while nothing else is held, the longest run of frame pairs
    # that are equal outside the fields that may differ is released in one piece
    # (_match_run). The rest goes one item at a time through push_primary/push_secondary.

    def push_stream(self, side: int, data: bytes, generation: int = 0,
                    arrived: float | None = None) -> None:
        """Bytes of one side's framed stream (see :mod:`pipeline.net.framing`). ``generation``
        changes when the stream's peer changed (a partial item from the old one is dropped).
        ``arrived``: when they were read, if not now (the comparator's clock)."""
        r = self._streams[side]
        if generation != r.generation:
            del r.buf[r.walked:]
            r.decoder, r.generation = None, generation
        if not r.buf and r.decoder is None and self._meet_waiting(side, data, arrived):
            return
        now = self._clock() if arrived is None else arrived
        if r.decoder is not None:
            # an oversized frame is being skipped: the decoder resynchronises the stream
            self._feed_decoder(side, r, data, now)
            return
        if r.head:
            r.compact()
        buf = r.buf
        buf += data
        offs, pos, end = r.offs, r.walked, len(buf)
        unpack = _WORD.unpack_from
        walked = _STRIDE_AFTER
        while end - pos >= 4:
            (length,) = unpack(buf, pos)
            if walked >= _STRIDE_AFTER and length <= MAX_FRAME_BYTES \
                    and end - pos >= _STRIDE_MIN * (length + 4):
                # a bulk stream's frames mostly have one length: check the length words
                # where equal frames would put them, all at once, and take that run
                stride = length + 4
                at = np.arange(pos, end - stride + 1, stride)
                equal = _words_at(buf, at) == length
                same = len(at) if equal.all() else int(equal.argmin())
                if same >= _STRIDE_MIN:
                    offs.extend(at[:same].tolist())
                    pos += same * stride
                    continue
                walked = 0
            walked += 1
            if length == BOUNDARY_WORD:
                size = BOUNDARY_SIZE
            elif length > MAX_FRAME_BYTES:
                # hand the rest to a decoder, which counts and skips the bad frame
                rest = bytes(buf[pos:])
                del buf[pos:]
                r.walked = pos
                r.note_arrived(now)
                r.decoder = FrameDecoder(False, MAX_FRAME_BYTES,
                                         lambda why, s=side: self.note_malformed(s, why))
                self._feed_decoder(side, r, rest, now)
                return
            else:
                size = 4 + length
            if end - pos < size:
                break
            if length == BOUNDARY_WORD:
                r.boundaries += 1
            offs.append(pos)
            pos += size
        if pos > r.walked:
            r.walked = pos
            r.note_arrived(now)
        self._pump()

    def push_pair(self, pvm: bytes, pvm_generation: int, svm: bytes,
                  svm_generation: int, arrived: float | None = None) -> None:
        """What one read of each side's stream brought (either may be empty), as
        ``push_stream(PRIMARY, pvm, ...)`` then ``push_stream(SECONDARY, svm, ...)`` would
        take it, with a shortcut for the usual round of a comparator that keeps up: one
        frame from each side, equal, nothing waiting or held anywhere."""
        if pvm and svm:
            pr, sr = self._streams
            if not pr.buf and not sr.buf and pr.decoder is None and sr.decoder is None \
                    and pvm_generation == pr.generation and svm_generation == sr.generation \
                    and self._release_equal(pvm, svm, arrived):
                return
        if pvm:
            self.push_stream(PRIMARY, pvm, pvm_generation, arrived)
        if svm:
            self.push_stream(SECONDARY, svm, svm_generation, arrived)

    def _meet_waiting(self, side: int, data, arrived: float | None = None) -> bool:
        """``data`` (this side's stream is empty) against the other side's stream when that
        holds exactly one whole frame: see _release_equal. False: nothing was done."""
        other = self._streams[1 - side]
        if len(other.offs) - other.head != 1 or other.walked != len(other.buf) \
                or other.boundaries or other.decoder is not None \
                or other.walked - other.offs[other.head] != len(data):
            return False
        waiting = other.buf[other.offs[other.head]:other.walked]
        if side == PRIMARY:
            if not self._release_equal(data, waiting, arrived):
                return False
        elif not self._release_equal(waiting, data, other.since):
            return False
        other.take(1)
        return True

    def _release_equal(self, pvm, svm, arrived: float | None) -> bool:
        """The PVM's item ``pvm`` (its length word and frame) out at once if it is one
        whole frame, ``svm`` is the same size and equal outside the fields that may differ,
        and nothing is held anywhere (what _match_run does for a run of one, without queueing
        either, walking a stream or parsing). ``arrived``: when the PVM's frame came (None:
        now). False: nothing was done.

        Kept this short because a comparator woken for one frame pair runs it with cold
        caches, where every step costs several cache misses: on a busy machine a round for
        one pair through the stream queues took ~60 us of CPU against ~17 us back to back."""
        n = len(pvm)
        if len(svm) != n or n < 42:
            return False
        (length,) = _WORD.unpack_from(pvm)
        if length + 4 != n or length > MAX_FRAME_BYTES or _WORD.unpack_from(svm)[0] != length \
                or not self._fast_ok() or not _equal_outside_masks(pvm, svm, 4):
            return False
        self._release_block_cb(pvm)
        self._count_run(1, length)
        self._note_delay(self._clock() if arrived is None else arrived)
        return True

    def native_ok(self, pvm_generation: int, svm_generation: int) -> bool:
        """Rounds of one equal frame pair each may be judged outside (pipeline.net.native)
        and counted with :meth:`count_released_pairs`: no stream bytes wait, both streams'
        peers are the ones last seen, and nothing is held anywhere (_fast_ok). What those
        rounds release needs no state but the counters, so this stays true through them."""
        pr, sr = self._streams
        return not pr.buf and not sr.buf and pr.decoder is None and sr.decoder is None \
            and pvm_generation == pr.generation and svm_generation == sr.generation \
            and self._fast_ok()

    def count_released_pairs(self, k: int, n_bytes: int, delays) -> None:
        """``k`` frame pairs (``n_bytes`` a side, length words not counted) were judged
        equal and released outside (see :meth:`native_ok`); ``delays``: how many of them
        in each RELEASE_DELAY_COUNTERS bucket."""
        self._count_run(k, n_bytes)
        self._count("native_matched_frames", k)
        for name, n in zip(RELEASE_DELAY_COUNTERS, delays):
            if n:
                self._count(name, int(n))

    def stream_frames(self) -> int:
        """Items (frames, boundaries) read from the streams and not compared yet."""
        return sum(len(r.offs) - r.head for r in self._streams)

    def settle(self) -> None:
        """Compare everything the streams brought (before an event from another channel)."""
        for side in (PRIMARY, SECONDARY):
            self._settle(side, self._clock())

    def _feed_decoder(self, side: int, r, data, now: float) -> None:
        """Bytes for a stream whose decoder is skipping an oversized frame: the decoder
        resynchronises; the stream goes back to the fast walk once it is idle again."""
        items = r.decoder.feed(data)
        if r.decoder.idle:
            r.decoder = None
        self._settle(side, now)
        self._slow_items(side, items, now)
        self._pump()

    def _settle(self, side: int, now: float) -> None:
        r = self._streams[side]
        while r.head < len(r.offs) and not (side == PRIMARY and self.blocked):
            self._slow_one(side, now)

    def _through_boundary(self, side: int) -> None:
        """Items of a side through the per-frame path up to and including its next boundary."""
        r = self._streams[side]
        before = r.boundaries
        now = self._clock()
        while r.boundaries == before and r.head < len(r.offs):
            self._slow_one(side, now)

    def _slow_items(self, side: int, items, now: float) -> None:
        for item in items:
            if type(item) is Boundary:
                self._boundary_cb(side, item)
            elif side == PRIMARY:
                self.push_primary(item[0], item[1], now)
            else:
                self.push_secondary(item[0], item[1], now)

    def _slow_one(self, side: int, now: float) -> None:
        """The oldest item of a side's stream through the per-frame path."""
        r = self._streams[side]
        buf, at = r.buf, r.offs[r.head]
        (length,) = _WORD.unpack_from(buf, at)
        since = r.since if r.since is not None else now   # when this item arrived
        if length == BOUNDARY_WORD:
            _, kind, epoch, aborted = BOUNDARY_RECORD.unpack_from(buf, at)
            r.boundaries -= 1
            frame = None
        else:
            frame = bytes(buf[at + 4:at + 4 + length])
        r.take(1)
        if frame is None:
            if kind in BOUNDARY_KINDS:
                self._boundary_cb(side, Boundary(kind, epoch, aborted))
            else:
                self.note_malformed(side, f"unknown epoch boundary kind {kind}")
            return
        if side == PRIMARY:
            self.push_primary(frame, 0, since)
        else:
            self.push_secondary(frame, 0, since)

    def _fast_ok(self) -> bool:
        """Nothing held anywhere: a pair of equal frames can be released without a lookup."""
        if self.blocked or self._svm_overflow or self.passthrough or self._stalled \
                or self.release_on_commit \
                or not self.committed < self.epoch <= self.svm_epoch:
            return False
        arrivals = self._arrivals
        while arrivals and arrivals[0][0].done:
            arrivals.popleft()
        return not arrivals and not self._reassembly[PRIMARY].pending \
            and not self._reassembly[SECONDARY].pending

    def _pump(self) -> None:
        if self._pumping:
            return               # an in-band boundary's event: the outer pump goes on
        self._pumping = True
        try:
            pvm, svm = self._streams
            while True:
                np_, ns = len(pvm.offs) - pvm.head, len(svm.offs) - svm.head
                if np_ and ns:
                    if self._fast_ok() and self._match_run():
                        continue
                    # one item through the per-frame path: from the SVM while PVM frames
                    # wait for it (so both streams get back in step, e.g. after the SVM
                    # split a segment), else from the PVM
                    self._slow_one(SECONDARY if self._held or self.blocked else PRIMARY,
                                   self._clock())
                    continue
                # one side only: while nothing is held its frames wait for the other's
                # (to be compared as a run), unless they are more than a queue's worth;
                # otherwise what is held may be waiting for them. The SVM's commit
                # boundary is taken at once: held PVM frames may go out with it.
                if ns and self._streams[SECONDARY].boundaries:
                    self._through_boundary(SECONDARY)
                    continue
                if np_ and (np_ > self._max_queue or self._svm_held or self.passthrough
                            or self.epoch <= self.committed or self._stalled
                            or self.release_on_commit):
                    self._settle(PRIMARY, self._clock())     # they can be judged now
                elif ns and (ns > self._max_queue or self._held or self.passthrough
                             or self.release_on_commit):
                    self._settle(SECONDARY, self._clock())
                break
        finally:
            self._pumping = False

    def _match_run(self) -> int:
        """Release the longest run of PVM frames equal to the SVM's at the same place in the
        streams (outside IPv4 id and checksum, TCP window and checksum), valid untagged IPv4
        TCP/UDP/ICMP frames all; returns how many."""
        pvm, svm = self._streams
        p0, s0 = pvm.offs[pvm.head], svm.offs[svm.head]
        avail = min(pvm.walked - p0, svm.walked - s0)
        offs = pvm.offs
        # items whose gathered header bytes lie within what both sides have
        many = bisect_right(offs, p0 + avail - _GATHER, pvm.head) - pvm.head
        if many > _SMALL_RUN:
            k, size = _match_numpy(pvm.buf, svm.buf, offs, pvm.head, many, p0, s0, avail)
        else:
            few = bisect_right(offs, p0 + avail - 1, pvm.head) - pvm.head
            k, size = _match_small(pvm.buf, svm.buf, offs, pvm.head, few, p0, s0, avail)
        if not k:
            return 0
        for arrived, n in pvm.arrivals(k):
            self._note_delay(arrived, n)
        with memoryview(pvm.buf) as view, view[p0:p0 + size] as block:
            self._release_block_cb(block)       # valid during the call only
        pvm.take(k)
        svm.take(k)
        self._count_run(k, size - 4 * k)
        return k

    def _count_run(self, k: int, n_bytes: int) -> None:
        """The counters of ``k`` frame pairs (``n_bytes`` a side) matched and released."""
        c = self.counters
        c["primary_frames_in"] += k
        c["secondary_frames_in"] += k
        c["primary_bytes_in"] += n_bytes
        c["secondary_bytes_in"] += n_bytes
        c["frames_released"] += k
        c["bytes_released"] += n_bytes
        c["secondary_frames_dropped"] += k
        c["run_matched_frames"] += k
        if self._sink is not None:
            for name, n in (("primary_frames_in", k), ("secondary_frames_in", k),
                            ("primary_bytes_in", n_bytes), ("secondary_bytes_in", n_bytes),
                            ("frames_released", k), ("bytes_released", n_bytes),
                            ("secondary_frames_dropped", k), ("run_matched_frames", k)):
                self._sink.add(name, n)

    # ---------------------------------------------------------------- timers
    def check_timeouts(self, now: float | None = None) -> None:
        """Request a checkpoint if a frame waited longer than ``compare_timeout_ms``."""
        now = self._clock() if now is None else now
        for side, r in enumerate(self._streams):
            if r.since is not None and now - r.since >= self._timeout:
                self._settle(side, now)          # stream frames waiting that long count too
        arrivals = self._arrivals
        while arrivals and arrivals[0][0].done:
            arrivals.popleft()
        if arrivals and now - arrivals[0][0].arrived >= self._timeout:
            held, conn = arrivals[0]
            if self._requested_epoch != self.epoch:
                self._count("timeouts")
                self._request("net_timeout", f"frame of {_describe(conn.key)} unmatched for "
                                             f"{(now - held.arrived) * 1000:.0f} ms")
        if self._reassembly[PRIMARY].oldest(now) >= self._timeout \
                and self._requested_epoch != self.epoch:
            self._count("timeouts")
            self._request("net_timeout", "PVM IPv4 fragments incomplete")

    def held_frames(self) -> int:
        """PVM frames currently held (all connections, or waiting for a commit; not counting
        frames kept back)."""
        return sum(len(c.primary) for c in self.connections.values()) + len(self._awaiting)

    def stalled_frames(self) -> int:
        """PVM frames kept back while :attr:`blocked` (not yet in any queue)."""
        return sum(1 for frame, _ in self._stalled if frame is not None)

    # ------------------------------------------------------------ checkpoints
    def on_snapshot(self, epoch: int, in_band: bool = False) -> None:
        """The PVM was snapshotted at the end of ``epoch``: later frames belong to ``epoch + 1``.
        In order with :meth:`push_primary`: while PVM frames are kept back it waits behind them.
        ``in_band``: the boundary came in the PVM's stream, so every PVM frame before it is
        of ``epoch`` or earlier, whatever an event on another channel said before."""
        if self._stalled:
            self._stalled.append((None, epoch if in_band else -1 - epoch))
            return
        self._snapshot(epoch, in_band)

    def _snapshot(self, epoch: int, in_band: bool) -> None:
        if in_band and self.epoch > epoch:
            for held, _ in self._arrivals:
                if held.primary and held.epoch > epoch:
                    held.epoch = epoch
            awaiting = self._awaiting
            if awaiting and awaiting[-1][0] > epoch:
                self._awaiting = deque((min(e, epoch), f, v, t) for e, f, v, t in awaiting)
                self._release_committed()   # the commit of ``epoch`` may have come first
        if epoch + 1 > self.epoch:
            self._count("snapshots")        # PVM epochs ended (an event and its boundary: once)
            self.epoch = epoch + 1

    def on_committed(self, epoch: int, snapshot_seen: bool = True) -> None:
        """The SVM now holds the PVM's state of ``epoch``: release the PVM frames held from it
        (matched or not) in arrival order, forget the SVM's output, compare what is left
        against the new SVM. ``snapshot_seen=False`` (boundaries in-band): the PVM's snapshot
        boundary of ``epoch`` may still be ahead in its stream; PVM frames before it are
        released as they come."""
        self._count("commits")
        if epoch > self.committed:
            self.committed = epoch
        self._release_committed()
        keep: deque[tuple[Held, Connection]] = deque()
        for held, conn in self._arrivals:
            if held.done:
                continue
            if held.primary:
                if held.epoch <= epoch:
                    self._release_held(held)
                else:
                    keep.append((held, conn))
            else:
                held.done = True
                self._svm_held -= 1
                self._count("secondary_frames_dropped", len(held.frames))
        self._arrivals = keep
        for conn in list(self.connections.values()):
            primary = conn.primary
            while primary and primary[0].done:
                held = primary.popleft()
                if conn.is_tcp and (conn.verified is None or held.end > conn.verified):
                    conn.verified = held.end
            conn.reset_secondary()
            conn.diverged = False
            self._maybe_forget(conn)
        for frames in self._reassembly[PRIMARY].take_until(epoch):
            self._release_frames(frames)          # incomplete PVM datagrams are output too
        for frames in self._reassembly[SECONDARY].take_until(epoch):
            self._count("fragments_dropped", len(frames))
        if snapshot_seen and self.epoch <= epoch and not self._stalled:
            self.epoch = epoch + 1
        self.svm_epoch = max(self.svm_epoch, epoch + 1)
        self._svm_overflow = False
        self._unblock()
        self._pump()          # stream frames kept back while blocked

    def on_boundary(self, side: int, b: Boundary) -> None:
        """An epoch boundary read in a side's stream, in order with its frames."""
        if side == PRIMARY and b.kind == BOUNDARY_SNAPSHOT:
            self.on_snapshot(b.epoch, in_band=True)
        elif side == SECONDARY and b.kind == BOUNDARY_COMMITTED:
            # the PVM's snapshot boundary of this epoch may still be ahead in its stream
            self.on_committed(b.epoch, snapshot_seen=False)
        elif side == SECONDARY and b.kind == BOUNDARY_ROLLED_BACK:
            self.on_rolled_back(b.epoch, b.aborted)
        else:
            self.note_malformed(side, f"unexpected {b!r} in the {SIDE_NAMES[side]}'s stream")

    def _release_committed(self) -> None:
        """net.release = "commit": the frames of committed epochs go out, in arrival order."""
        awaiting, committed = self._awaiting, self.committed
        n = 0
        while awaiting and awaiting[0][0] <= committed:
            _, frame, vnet, arrived = awaiting.popleft()
            self._note_delay(arrived)
            self._release_frames([(frame, vnet)])
            n += 1
        self._held -= n

    def on_rolled_back(self, epoch: int, aborted: int) -> None:
        """The SVM was put back to committed ``epoch`` after epoch ``aborted`` was torn: its
        output so far is forgotten; it replays from ``epoch`` up to the next checkpoint's
        pause. Already released PVM frames are not compared again: the replay may repeat
        their matches, which only costs a checkpoint."""
        for conn in list(self.connections.values()):
            for held in conn.secondary:
                held.done = True
                self._svm_held -= 1
                self._count("secondary_frames_dropped", len(held.frames))
            conn.reset_secondary()
        self.svm_epoch = max(self.svm_epoch, aborted + 1)
        self._svm_overflow = False

    def flush(self) -> None:
        """Xen's/QEMU's ``COLO_CHECKPOINT``: every held PVM frame goes out, the SVM's are dropped."""
        epoch = self.epoch
        self.on_snapshot(epoch)
        self.on_committed(epoch)

    def set_passthrough(self, on: bool) -> None:
        """Stop comparing (failover, or the secondary is gone): release everything held."""
        if on and not self.passthrough:
            self.passthrough = True
            before = self.counters["frames_released"]
            self.flush()
            self._unblock()
            log.warning("no longer comparing: %d held PVM frames released, in arrival order",
                        self.counters["frames_released"] - before)
        self.passthrough = on


# ------------------------------------------------------------- stream runs
_WORD = struct.Struct("!I")
#: IPv4 total length, id, fragment field, TTL, protocol (frame offsets 16..23)
_IPV4_FIELDS = struct.Struct("!HHHBB")
#: runs up to this many frames are compared frame by frame, longer ones with numpy
_SMALL_RUN = 16
#: header bytes gathered per item (offsets from the length word): length 0-3, ethertype
#: 16-17, version/IHL 18, total length 20-21, fragment field 24-25, protocol 27, UDP
#: length 42-43, TCP data offset 50
_HEADER_COLS = np.array([0, 1, 2, 3, 16, 17, 18, 20, 21, 24, 25, 27, 42, 43, 50])
#: an item needs this many bytes for its header to be gathered
_GATHER = 4 + 54
#: offsets in a frame the run comparison ignores: IPv4 id and checksum; TCP window, checksum
_IP_MASK = np.array([18, 19, 24, 25])
_TCP_MASK = np.array([48, 49, 50, 51])


#: the walk over a stream's length words tries a stride of equal frames after this many
#: frames walked one by one, and takes it when at least _STRIDE_MIN frames fit it
_STRIDE_AFTER, _STRIDE_MIN = 16, 16
_WORD_COLS = np.arange(4)


def _words_at(buf, at: np.ndarray) -> np.ndarray:
    """The big-endian u32 words at byte offsets ``at`` of ``buf``."""
    w = np.frombuffer(buf, np.uint8)[at[:, None] + _WORD_COLS].astype(np.uint32)
    return w[:, 0] << 24 | w[:, 1] << 16 | w[:, 2] << 8 | w[:, 3]


class _Stream:
    """One side's stream bytes not compared yet: whole items (frames, boundaries) start at
    ``offs[head:]`` in ``buf``; ``buf[walked:]`` is the start of an item still arriving.

    Items are numbered from the stream's start (``taken`` of them consumed); ``_arrived``
    says when each read brought its items, so a frame's wait counts from its own arrival,
    not from the oldest item the stream held since it was last empty (a stream that the
    other side never quite catches up with is never empty: its frames would all have
    looked as old as its first, and timed out)."""

    __slots__ = ("_arrived", "boundaries", "buf", "decoder", "generation", "head", "offs",
                 "taken", "walked")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.offs: list[int] = []
        self.head = 0
        self.walked = 0
        #: items consumed since the stream began
        self.taken = 0
        #: (number of the first item after this read's, when it arrived), oldest first
        self._arrived: deque[tuple[int, float]] = deque()
        #: a FrameDecoder while an oversized frame is skipped
        self.decoder: FrameDecoder | None = None
        self.generation = 0
        #: epoch boundaries among the items
        self.boundaries = 0

    @property
    def since(self) -> float | None:
        """When the oldest item here arrived (timeouts count from it)."""
        return self._arrived[0][1] if self._arrived else None

    def note_arrived(self, now: float) -> None:
        """The items walked so far and not noted yet arrived ``now``."""
        end = self.taken + len(self.offs) - self.head
        if end > (self._arrived[-1][0] if self._arrived else self.taken):
            self._arrived.append((end, now))

    def arrivals(self, k: int) -> list[tuple[float, int]]:
        """(arrival time, how many) of the ``k`` oldest items."""
        out, start, stop = [], self.taken, self.taken + k
        for end, when in self._arrived:
            n = min(end, stop) - start
            out.append((when, n))
            start += n
            if start >= stop:
                break
        return out

    def take(self, k: int) -> None:
        """The ``k`` oldest items were consumed."""
        self.head += k
        taken = self.taken = self.taken + k
        arrived = self._arrived
        while arrived and arrived[0][0] <= taken:
            arrived.popleft()
        if self.head == len(self.offs):
            self.clear()

    def clear(self) -> None:
        """Every whole item was taken: keep only the partial one."""
        if self.walked == len(self.buf):
            self.buf.clear()
        else:
            del self.buf[:self.walked]
        self.offs, self.head, self.walked = [], 0, 0
        if self._arrived:
            self._arrived.clear()

    def compact(self) -> None:
        start = self.offs[self.head]
        del self.buf[:start]
        self.offs = [o - start for o in self.offs[self.head:]]
        self.head = 0
        self.walked -= start


def _equal_outside_masks(p, s, at: int = 0) -> bool:
    """``p[at:]`` is a valid untagged IPv4 TCP/UDP/ICMP frame (no options, not a fragment)
    and ``s[at:]`` equals it outside the IPv4 id and checksum (and, for TCP, window and
    checksum): the per-frame path would match them. Same length assumed; ``p[:at]`` (a
    stream item's length word) must equal ``s[:at]`` too.

    One copy of ``s`` with those fields taken from ``p``, then one comparison: slicing
    each equal stretch out of both frames made several 1 KiB copies, a third of a cold
    single-pair round (~13 us of ~40)."""
    n = len(p) - at
    if n < 38 or p[at + 12:at + 15] != b"\x08\x00\x45":
        return False
    total, _id, frag, _ttl, proto = _IPV4_FIELDS.unpack_from(p, at + 16)
    if frag & 0x3FFF or total < 20 or 14 + total > n:
        return False
    if proto == 6:
        if n < 54 or total < 40 or not 20 <= (p[at + 46] >> 4) * 4 <= total - 20:
            return False
    elif proto == 17:
        if n < 42 or total < 28 or not 8 <= (p[at + 38] << 8 | p[at + 39]) <= total - 20:
            return False
    elif proto != 1 or total < 24:
        return False
    t = bytearray(s)
    t[at + 18:at + 20] = p[at + 18:at + 20]             # IPv4 id
    t[at + 24:at + 26] = p[at + 24:at + 26]             # IPv4 header checksum
    if proto == 6:
        t[at + 48:at + 52] = p[at + 48:at + 52]         # TCP window and checksum
    return t == p


def _match_small(pbuf, sbuf, offs: list[int], head: int, count: int, p0: int, s0: int,
                 avail: int) -> tuple[int, int]:
    """(frames, bytes) of the run at the heads of both streams, frame by frame."""
    unpack = _WORD.unpack_from
    k = size = 0
    for i in range(head, head + count):
        o = offs[i]
        rel = o - p0
        if rel + 4 > avail:
            break
        (length,) = unpack(pbuf, o)
        end = rel + 4 + length
        if length > MAX_FRAME_BYTES or end > avail or unpack(sbuf, s0 + rel)[0] != length:
            break
        if not _equal_outside_masks(pbuf[o + 4:o + 4 + length],
                                    sbuf[s0 + rel + 4:s0 + rel + 4 + length]):
            break
        k, size = k + 1, end
    return k, size


def _match_numpy(pbuf, sbuf, offs: list[int], head: int, count: int, p0: int, s0: int,
                 avail: int) -> tuple[int, int]:
    """The same as _match_small for a long run: the headers of all items checked at once,
    then one byte comparison of the whole run; the differing bytes must all be maskable."""
    o = np.asarray(offs[head:head + count], dtype=np.int64) - p0
    a = np.frombuffer(pbuf, np.uint8, count=avail, offset=p0)
    b = np.frombuffer(sbuf, np.uint8, count=avail, offset=s0)
    h = a[o[:, None] + _HEADER_COLS].astype(np.int64)      # the columns of _HEADER_COLS
    length = h[:, 0] << 24 | h[:, 1] << 16 | h[:, 2] << 8 | h[:, 3]
    ends = o + 4 + length
    total = h[:, 7] << 8 | h[:, 8]
    proto = h[:, 11]
    tcp = proto == 6
    doff = (h[:, 14] >> 4) * 4
    ulen = h[:, 12] << 8 | h[:, 13]
    valid = ((length >= 38) & (length <= MAX_FRAME_BYTES) & (ends <= avail)
             & (h[:, 4] == 8) & (h[:, 5] == 0) & (h[:, 6] == 0x45)
             & ((h[:, 9] & 0x3F) == 0) & (h[:, 10] == 0)
             & (total >= 20) & (14 + total <= length)
             & ((tcp & (length >= 54) & (total >= 40) & (doff >= 20) & (doff <= total - 20))
                | ((proto == 17) & (length >= 42) & (total >= 28) & (ulen >= 8)
                   & (ulen <= total - 20))
                | ((proto == 1) & (total >= 24))))
    bad = np.flatnonzero(~valid)
    limit = int(bad[0]) if len(bad) else len(o)
    if limit == 0:
        return 0, 0
    run_end = int(ends[limit - 1])
    differ = np.flatnonzero(a[:run_end] != b[:run_end])
    if len(differ):
        starts = o[:limit] + 4                               # frame starts
        item = np.searchsorted(starts, differ, side="right") - 1
        at = differ - starts[item]                           # offset in its frame
        maskable = np.isin(at, _IP_MASK) | (tcp[:limit][item] & np.isin(at, _TCP_MASK))
        if item[0] < 0:
            maskable[item < 0] = False                       # a length word differs
        unmasked = np.flatnonzero(~maskable)
        if len(unmasked):
            first = int(differ[unmasked[0]])
            k = int(np.searchsorted(ends[:limit], first, side="right"))
            return k, int(ends[k - 1]) if k else 0
    return limit, run_end

def _describe(key: tuple) -> str:
    vlans, ver = key[0], key[1]
    tag = f"vlan{'.'.join(map(str, vlans))} " if vlans else ""
    if ver == "l2":
        return f"{tag}ethertype 0x{key[2]:04x} {key[3].hex(':')}"
    proto, src, dst, sport, dport = key[2:]
    return (f"{tag}proto {proto} {ipaddress.ip_address(src)}:{sport} -> "
            f"{ipaddress.ip_address(dst)}:{dport}")
