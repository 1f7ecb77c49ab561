"""Primary: the send stage. Turns encoded batches into PAGES records on the ``pages``
channel and closes each epoch with an EPOCH_END record once every digest worker's
END marker has arrived (so every page of the epoch was sent before it).

When the rest of an epoch is all in the rings as one of its batches is taken (a small
checkpoint's: each digest worker publishes its last batch and its END marker together),
the epoch's last PAGES record and EPOCH_END go as the two frames of one ZeroMQ message:
one send, one wake-up of each side's I/O thread and of the receive stage less. The records
before it go one message each as before (the receive stage gets a message only once all
of its frames arrived: joined, the first batch waited for the second's transfer, commit
p50 of 1k pages 7.2-8.1 -> 9.5-11 ms). Nothing waits for a record to make a message.

It also records the (pfn, hash) of every page of the epoch in the shared
``pending`` arrays; the coordinator applies them to the hash table when the
secondary acknowledges the epoch, and re-sends those pfns if the epoch was torn.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from pipeline import faults, messages, trace, wire
from pipeline.compress_policy import MIN_BYTES, WINDOW_BYTES, CompressPolicy, Window
from pipeline.sockets import io_threads, send_until_stopped
from pipeline.ring import Ring
from pipeline.stages.common import (MARK_LZ4, SLOT_END, StageContext, StagePriority, read_slot,
                                    ready_rings)


@dataclass
class Pending:
    """Shared arrays: the pages of the epoch in flight (written by send, read by coordinator)."""
    pfns: np.ndarray       # (page_count,) uint64
    hashes: np.ndarray     # (page_count, 32) uint8
    count: np.ndarray      # (1,) uint64


class PendingWriter:
    """The send stage's side of :class:`Pending`: the pages of the newest epoch only. A torn
    epoch's batches can still come out of some rings after the next epoch's first batch
    came out of another; the coordinator settled that epoch already (it read ``pending``
    when it tore it), so they are not added: added, they were taken for the next epoch's
    pages, and two epochs of up to all of memory overflowed the arrays (the send stage
    died with a broadcast error when epochs kept timing out)."""

    def __init__(self, pending: Pending) -> None:
        self.pending, self.epoch = pending, -1

    def add(self, epoch: int, pfns: np.ndarray, hashes: np.ndarray) -> bool:
        """Record a batch of ``epoch``; False (nothing recorded) for an older epoch's."""
        if epoch < self.epoch:
            return False
        p = self.pending
        if epoch > self.epoch:
            self.epoch = epoch
            p.count[0] = 0
        k, n = int(p.count[0]), len(pfns)
        p.pfns[k:k + n] = pfns
        p.hashes[k:k + n] = hashes
        p.count[0] = k + n
        return True


@dataclass
class EpochStats:
    pages: int = 0
    records: int = 0
    bytes_wire: int = 0
    kinds: dict[int, int] = field(default_factory=lambda: dict.fromkeys(wire.ENC_KINDS, 0))
    markers: int = 0
    ended: set[int] = field(default_factory=set)   # the rings whose END marker came
    announced: int = 0                             # pages, as the END markers say
    vcpu: bytes = b""
    epoch_flags: int = 0


class _Unsent:
    """The tracker of a record laid out in its slot and not sent yet: the slot is not
    handed back (nor any after it) until ZeroMQ has sent it and is done with it."""
    done = False


UNSENT = _Unsent()
DROPPED = object()     # deliver(): the record was not sent (the secondary is lost), go on


BLOCKED_NS = 2_000_000   # a send that took longer waited for the peer to take records
# A record with at least this much page data goes out of its ring slot without a copy: the
# record's header and arrays are laid in the slot's wire prefix, in front of the data, and
# ZeroMQ sends that memory; the slot is handed back once ZeroMQ is done with it. Smaller
# records are copied (below pyzmq's copy threshold it copies anyway, and tracking costs a
# wake-up of pyzmq's garbage thread per record).
ZERO_COPY_BYTES = 256 << 10
HELD_WAIT_S = 0.005      # while ZeroMQ holds slots, the ring wait is this long at most, so
                         # slots it is done with go back to the digest workers


class AutoCompress:
    """``pipeline.compress = "auto"``: measures windows of sending, lets the policy judge
    them and publishes its decision in the shared word the digest workers read. A window
    holds batches of one mode (the digest worker marks the batches it compressed)."""

    def __init__(self, ctx: StageContext, workers: int, page_size: int, decision) -> None:
        self.ctx, self.page_size, self.decision = ctx, page_size, decision
        self.policy = CompressPolicy(workers, bool(decision.value))
        self.digests = [f"digest.{i}" for i in range(workers)]
        self.lz4_seen = self._lz4_totals()
        self.lz4 = self.policy.compress     # the mode of the batches in the window
        # after a switch the first window of the new mode is not judged: its sends also
        # waited for the old mode's records still queued ahead of them
        self.settling = False
        self._reset()

    def _reset(self) -> None:
        self.t0 = 0
        self.wire = self.pages = self.blocked_ns = 0

    def _lz4_totals(self) -> list[int]:
        tot = [0, 0, 0]
        if self.ctx.node is None:
            return tot
        for name in self.digests:
            d = self.ctx.node.stage(name).as_dict()
            for j, key in enumerate(("lz4_ns", "lz4_bytes_in", "lz4_bytes_out")):
                tot[j] += d.get(key, 0)
        return tot

    def sent(self, t_start: int, t_end: int, wire_bytes: int, data_pages: int,
             lz4: bool) -> None:
        """One PAGES record, its pages compressed (or tried) or not: the send began at
        ``t_start`` and returned at ``t_end``."""
        if lz4 != self.lz4:
            self.judge(t_start)
            self.lz4 = lz4
        waited = t_end - t_start > BLOCKED_NS
        if waited and not self.blocked_ns:
            # the first send that waited for the peer: what went before filled the queues
            # (ZeroMQ's and the kernel's) at the producer's pace, not the link's
            self._reset()
        if not self.t0:
            self.t0 = t_start
        self.wire += wire_bytes
        self.pages += data_pages * self.page_size
        if waited:
            self.blocked_ns += t_end - t_start
        if self.pages >= WINDOW_BYTES:
            self.judge(t_end)

    def judge(self, now: int) -> None:
        """End the window (an epoch ended, it is long enough, or the batches' mode changed)
        and act on the verdict."""
        if not self.t0:
            return
        c = self.ctx.counters
        lz4 = self._lz4_totals()
        self.policy.observe_lz4(*(a - b for a, b in zip(lz4, self.lz4_seen)))
        self.lz4_seen = lz4
        window = Window(self.wire, self.pages, (now - self.t0) / 1e9, self.blocked_ns / 1e9,
                        self.lz4)
        self._reset()
        if window.page_bytes < MIN_BYTES:
            return
        c.add("windows_lz4" if window.compressed else "windows_raw", 1)
        if window.compressed != self.policy.compress:
            return      # batches encoded before the last switch: they say nothing new
        if self.settling:
            self.settling = False
            return
        verdict = self.policy.judge(window)
        if self.policy.link_b_s:
            c.set("link_mb_s", int(self.policy.link_b_s / 1e6))
        if self.policy.lz4_b_s:
            c.set("lz4_mb_s", int(self.policy.lz4_b_s / 1e6))
        if verdict is not None:
            self.decision.value = int(verdict[0])
            self.settling = True
            c.add("compress_switches", 1)
            self.ctx.log.info("event=compress mode=%s why=%r", "lz4" if verdict[0] else "none",
                              verdict[1])


def run(ctx: StageContext, rings: list[Ring], ctrl, pages_out: zmq.Socket,
        pending: Pending, shared, compress: str = "lz4",
        priority: StagePriority | None = None) -> None:
    """While ``shared.unprotected`` is set (the secondary is lost) batches are drained and
    dropped, so the snapshot stage never waits on a ring that nobody empties.
    ``compress="auto"``: this stage decides, in ``shared.compress``, whether the digest
    workers compress (pipeline/compress_policy.py). ``priority``: this stage's scheduling
    (common.StagePriority), followed by the pages channel's ZeroMQ I/O thread, which
    carries every record."""
    c = ctx.counters
    epochs: dict[int, EpochStats] = {}
    recorded = PendingWriter(pending)
    auto = AutoCompress(ctx, len(rings), rings[0].layout.page_size, shared.compress) \
        if compress == "auto" else None

    def deliver(msg, copy: bool = True, track: bool = False, more: bool = False,
                part: bool = False):
        """True (or, with ``track``, the send's zmq.MessageTracker) once sent or dropped;
        False when the stage stops. ``more``: another frame of the same ZeroMQ message
        follows. ``part``: a frame after the first of a message: it goes whatever happens
        (a message left open would take the next record in; after its first frame ZeroMQ
        takes the rest without waiting, or drops them itself if the connection broke)."""
        if shared.unprotected.value and not part:
            c.add("dropped_unprotected", 1)
            return DROPPED
        sent = send_until_stopped(pages_out, msg, ctx.stop, copy,
                                  give_up=(lambda: False) if part else
                                  (lambda: bool(shared.unprotected.value)),
                                  track=track, more=more)
        return sent or (DROPPED if not ctx.stopping() else False)

    # per ring, the slots taken and not handed back, in the order taken (a ring takes them
    # back in that order): [slot, the tracker of the record sent from it, or None]
    held: list[deque[list]] = [deque() for _ in rings]

    def hand_back(i: int) -> None:
        q = held[i]
        while q and (q[0][1] is None or q[0][1].done):
            rings[i].release_read(q.popleft()[0])

    def epoch_of(e: int) -> EpochStats:
        st = epochs.get(e)
        if st is None:
            st = epochs[e] = EpochStats()
        return st

    def rest_published(e: int, i: int) -> list[tuple[int, int]] | None:
        """When ring ``i``'s batch of epoch ``e`` just taken is followed by every other
        record of ``e`` already published (each ring's up to its END marker, or its marker
        already in): (ring, slots to take) of that rest, ring ``i`` first; else None."""
        st = epochs[e]
        rest = []
        for j in [i] + [j for j in range(len(rings)) if j != i]:
            if j in st.ended:
                continue
            upto = None
            for k, slot in enumerate(rings[j].published()):
                if slot.epoch != e:
                    return None
                if slot.kind == SLOT_END:
                    upto = k + 1
                    break
            if upto is None:
                return None
            rest.append((j, upto))
        return rest

    def take_end(i: int, slot) -> bool:
        """An END marker from ring ``i``; True once every ring's marker of its epoch is in."""
        st = epoch_of(slot.epoch)
        st.markers += 1
        st.ended.add(i)
        if slot.vcpu_len:
            st.vcpu = slot.data_flat[:slot.vcpu_len].tobytes()
        st.epoch_flags = slot.epoch_flags
        st.announced = slot.epoch_pages
        hand_back(i)
        return st.markers == len(rings)

    def epoch_end(e: int) -> bytes:
        st = epochs[e]
        if st.pages != st.announced:
            raise RuntimeError(f"epoch {e}: {st.pages} pages went through the "
                               f"digest workers but {st.announced} were snapshotted")
        return wire.encode_epoch_end(e, st.pages, st.records,
                                     st.epoch_flags & wire.EPOCH_END_FLAGS, st.vcpu)

    def ended(e: int, msg: bytes) -> None:
        """After EPOCH_END of ``e`` went out."""
        st = epochs.pop(e)
        trace.point("sent_end", e)
        faults.point("send.epoch_end")
        st.bytes_wire += len(msg)
        c.add("bytes_out", len(msg))
        if auto is not None:
            auto.judge(time.perf_counter_ns())
        ctrl.send(messages.Sent(
            e, pages=st.pages, records=st.records, bytes_wire=st.bytes_wire,
            pages_data=st.kinds[wire.ENC_RAW] + st.kinds[wire.ENC_LZ4],
            pages_zero=st.kinds[wire.ENC_ZERO], pages_ref=st.kinds[wire.ENC_REF],
            pages_svm=st.kinds[wire.ENC_SVM]))

    def record(i: int, slot, entry: list):
        """A PAGES record of ``slot``: (the message, sent in place, data pages, lz4)."""
        e, n = slot.epoch, slot.count
        st = epoch_of(e)
        in_place = slot.framed is not None and slot.data_len >= ZERO_COPY_BYTES
        if in_place:
            room = rings[i].layout.wire_prefix
            start = wire.encode_pages_prefix(
                slot.framed[:room], e, slot.pfns[:n], slot.hashes[:n],
                slot.enc_len[:n], slot.enc_kind[:n], slot.data_len, slot.batch_flags)
            msg = slot.framed[start:room + slot.data_len]
        else:
            msg = wire.encode_pages(e, slot.pfns[:n], slot.hashes[:n],
                                    slot.enc_len[:n], slot.enc_kind[:n],
                                    slot.data_flat[:slot.data_len], slot.batch_flags)
        if not recorded.add(e, slot.pfns[:n], slot.hashes[:n]):
            c.add("stale_batches", 1)
        kinds = np.bincount(slot.enc_kind[:n], minlength=len(wire.ENC_KINDS))
        for kind in wire.ENC_KINDS:
            st.kinds[kind] += int(kinds[kind])
        if in_place:
            entry[1] = UNSENT
        else:
            hand_back(i)
        st.pages += n
        st.records += 1
        st.bytes_wire += len(msg)
        c.add("items_in", n)
        c.add("items_out", 1)
        c.add("bytes_out", len(msg))
        return msg, in_place, int(kinds[wire.ENC_RAW]), bool(slot.marks & MARK_LZ4)

    def send_records(frames: list) -> bool:
        """Send ``frames`` as one ZeroMQ message: (ring, held entry, message, in place,
        data pages, lz4) per PAGES record, the last frame may be an EPOCH_END (ring
        None). False when the stage stops."""
        dropped = False
        for k, (i, entry, msg, in_place, data_pages, lz4) in enumerate(frames):
            t_send = time.perf_counter_ns()
            if dropped:     # the message's first frame was dropped: all of it is
                sent = DROPPED
            else:
                sent = deliver(msg, copy=False, track=in_place, more=k < len(frames) - 1,
                               part=k > 0)
            if not sent:
                return False
            dropped = sent is DROPPED
            if i is None:
                continue
            if in_place:
                c.add("records_in_place", 1)
                # handed back once ZeroMQ is done with it (at once if it was dropped)
                entry[1] = None if sent is True or sent is DROPPED else sent
                hand_back(i)
            trace.point("sent_pages", entry[0].epoch)
            if auto is not None:
                auto.sent(t_send, time.perf_counter_ns(), len(msg), data_pages, lz4)
        for i, *_ in frames:
            if i is not None:
                faults.point("send.pages")
        return True

    def take(i: int, wait: bool = False):
        """The next published slot of ring ``i``, held until handed back. ``wait``: it was
        seen published (Ring.published), its token may be a few instructions behind."""
        slot = read_slot(ctx, rings[i]) if wait else rings[i].try_acquire_read()
        if slot is None:
            return None, None
        entry = [slot, None]
        held[i].append(entry)
        return slot, entry

    if priority is not None:
        priority.follow(io_threads())
    while not ctx.stopping():
        for i in range(len(rings)):
            hand_back(i)
        if priority is not None:
            priority.waiting()
        ready, _ = ready_rings(rings, [], HELD_WAIT_S if any(held) else 0.2)
        for i in ready:
            slot, entry = take(i)
            if slot is None:
                continue
            if priority is not None:
                priority.working(slot.epoch)
            t0 = time.perf_counter_ns()
            e = slot.epoch
            if slot.kind == SLOT_END:
                if take_end(i, slot):
                    msg = epoch_end(e)
                    if not deliver(msg):
                        return
                    ended(e, msg)
                c.add("busy_ns", time.perf_counter_ns() - t0)
                continue
            frames = [(i, entry, *record(i, slot, entry))]
            # When the rest of the epoch is already waiting in the rings (a small
            # checkpoint's last batch, its END markers), its last PAGES record and EPOCH_END
            # go as one ZeroMQ message: one send, one wake-up of each I/O thread and of the
            # receive stage less. Only what is published already: nothing waits for a record.
            rest = rest_published(e, i)
            if rest is not None:
                last = False
                for j, count in rest:
                    for _ in range(count):
                        s2, entry2 = take(j, wait=True)
                        if s2 is None:
                            return
                        if s2.kind == SLOT_END:
                            last = take_end(j, s2)
                        else:
                            frames.append((j, entry2, *record(j, s2, entry2)))
                if last:
                    frames.append((None, None, epoch_end(e), False, 0, False))
            # each record but the last goes on its own, as it would have: the receive stage
            # takes one while the next is still on the wire (ZeroMQ hands over a message
            # only once all of its frames arrived)
            joined = frames[-2:] if frames[-1][0] is None else frames[-1:]
            for single in frames[:len(frames) - len(joined)]:
                if not send_records([single]):
                    return
            if not send_records(joined):
                return
            if rest is not None and frames[-1][0] is None:
                c.add("epoch_end_joined", 1)
                ended(e, frames[-1][2])
            c.add("busy_ns", time.perf_counter_ns() - t0)
