"""Primary: the send stage. Turns encoded batches into PAGES records on the ``pages``
channel and closes each epoch with an EPOCH_END record once every digest worker's
END marker has arrived (so every page of the epoch was sent before it).

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

from pipeline import faults, messages, seal, trace, wire
from pipeline.compress_policy import MIN_BYTES, WINDOW_BYTES, CompressPolicy, Window
from pipeline.sockets import io_threads, send_until_stopped
from pipeline.ring import Ring
from pipeline.shm import prefault_array
from pipeline.stages.common import MARK_LZ4, SLOT_END, StageContext, StagePriority, ready_rings


@dataclass
class Pending:
    """Shared arrays: the pages of the epoch in flight (written by send, read by coordinator)."""
    pfns: np.ndarray       # (page_count,) uint64
    hashes: np.ndarray     # (page_count, 32) uint8
    count: np.ndarray      # (1,) uint64

    def prefault(self) -> None:
        """The tables segment into this process's page tables (common._prefault)."""
        prefault_array(self.pfns)


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
    vcpu: bytes = b""
    epoch_flags: int = 0


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
        priority: StagePriority | None = None, seal_keys: seal.SealKeys | None = None) -> None:
    """While ``shared.unprotected`` is set (the secondary is lost) batches are drained and
    dropped, so the snapshot stage never waits on a ring that nobody empties.
    ``compress="auto"``: this stage decides, in ``shared.compress``, whether the digest
    workers compress (pipeline/compress_policy.py). ``priority``: this stage's scheduling
    (common.StagePriority), followed by the pages channel's ZeroMQ I/O thread, which
    carries every record. ``seal_keys`` (security.mode = "sealed"): each EPOCH_END's vCPU
    state goes sealed (the digest workers sealed the PAGES records)."""
    c = ctx.counters
    sealer = seal.Sealer(seal_keys, seal.SEND_SEALER) if seal_keys is not None else None
    epochs: dict[int, EpochStats] = {}
    recorded = PendingWriter(pending)
    auto = AutoCompress(ctx, len(rings), rings[0].layout.page_size, shared.compress) \
        if compress == "auto" else None

    def deliver(msg, copy: bool = True, track: bool = False):
        """True (or, with ``track``, the send's zmq.MessageTracker) once sent or dropped;
        False when the stage stops."""
        if shared.unprotected.value:
            c.add("dropped_unprotected", 1)
            return True
        return send_until_stopped(pages_out, msg, ctx.stop, copy,
                                  give_up=lambda: bool(shared.unprotected.value),
                                  track=track) or not ctx.stopping()

    # per ring, the slots taken and not handed back, in the order taken (a ring takes them
    # back in that order): [slot, the tracker of the record sent from it, or None]
    held: list[deque[list]] = [deque() for _ in rings]

    def hand_back(i: int) -> None:
        q = held[i]
        while q and (q[0][1] is None or q[0][1].done):
            rings[i].release_read(q.popleft()[0])

    if priority is not None:
        priority.follow(io_threads())
    while not ctx.stopping():
        for i in range(len(rings)):
            hand_back(i)
        if priority is not None:
            priority.waiting()
        ready, _ = ready_rings(rings, [], HELD_WAIT_S if any(held) else 0.2)
        for i in ready:
            slot = rings[i].try_acquire_read()
            if slot is None:
                continue
            if priority is not None:
                priority.working(slot.epoch)
            entry = [slot, None]
            held[i].append(entry)
            t0 = time.perf_counter_ns()
            e = slot.epoch
            st = epochs.get(e)
            if st is None:
                st = epochs[e] = EpochStats()
            if slot.kind == SLOT_END:
                st.markers += 1
                if slot.vcpu_len:
                    st.vcpu = slot.data_flat[:slot.vcpu_len].tobytes()
                st.epoch_flags = slot.epoch_flags
                announced = slot.epoch_pages
                hand_back(i)
                if st.markers == len(rings):
                    if st.pages != announced:
                        raise RuntimeError(f"epoch {e}: {st.pages} pages went through the "
                                           f"digest workers but {announced} were snapshotted")
                    msg = wire.encode_epoch_end(e, st.pages, st.records,
                                                st.epoch_flags & wire.EPOCH_END_FLAGS, st.vcpu,
                                                sealer)
                    if not deliver(msg):
                        return
                    trace.point("sent_end", e)
                    faults.point("send.epoch_end")
                    st.bytes_wire += len(msg)
                    c.add("bytes_out", len(msg))
                    del epochs[e]
                    if auto is not None:
                        auto.judge(time.perf_counter_ns())
                    ctrl.send(messages.Sent(
                        e, pages=st.pages, records=st.records, bytes_wire=st.bytes_wire,
                        pages_data=st.kinds[wire.ENC_RAW] + st.kinds[wire.ENC_LZ4],
                        pages_zero=st.kinds[wire.ENC_ZERO], pages_ref=st.kinds[wire.ENC_REF],
                        pages_svm=st.kinds[wire.ENC_SVM]))
            else:
                n = slot.count
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
                marks = slot.marks
                if not in_place:
                    hand_back(i)
                t_send = time.perf_counter_ns()
                sent = deliver(msg, copy=False, track=in_place)
                if not sent:
                    return
                if in_place:
                    c.add("records_in_place", 1)
                    if sent is not True:
                        entry[1] = sent      # handed back once ZeroMQ is done with it
                    hand_back(i)
                trace.point("sent_pages", e)
                faults.point("send.pages")
                if auto is not None:
                    auto.sent(t_send, time.perf_counter_ns(), len(msg),
                              int(kinds[wire.ENC_RAW]), bool(marks & MARK_LZ4))
                st.pages += n
                st.records += 1
                st.bytes_wire += len(msg)
                c.add("items_in", n)
                c.add("items_out", 1)
                c.add("bytes_out", len(msg))
            c.add("busy_ns", time.perf_counter_ns() - t0)
