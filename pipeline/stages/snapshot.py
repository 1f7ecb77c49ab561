"""Primary: the snapshot stage. Pauses the PVM, reads its dirty log, copies the dirty pages
and the vCPU state into the digest rings, and resumes the PVM at once.

The PVM's new output is held by the comparator until this epoch commits, so resuming
before the pages are hashed, compressed or sent is safe: the PVM pause is the copy of
the dirty set into shared memory and nothing else.

Commands come from the coordinator over a pipe (the types: pipeline/messages.py):
  SyncCmd        -> Synced        all of memory, live
  PrecopyCmd     -> Precopied     live: pages written since the last round, the PVM keeps running
  SnapshotCmd    -> Snapshotted   the PVM paused: a checkpoint
A checkpoint's pages leave the PVM's dirty log at its pause, so the stage keeps them
(``taken``) until the next SnapshotCmd says whether that checkpoint committed: torn
(``retake``), they go out again with the next one. Only this stage knows them all: the
coordinator can give an epoch up (its secondary lost, then heard again) before the pause
or before every page was dispatched.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline import faults, messages, proof_pages, trace, wire
from pipeline.net.framing import BOUNDARY_SNAPSHOT, encode_boundary
from pipeline.ring import Ring
from pipeline.stages.common import (MARK_BUFFERED, SLOT_DATA, SLOT_END, PageBuffer,
                                    PausePriority, StageContext, domain_page_hashes,
                                    write_slot)
from pipeline.xen_io.base import Domain


class Prescan:
    """The PVM's dirty log read (and cleared) while the PVM runs, and the pages it names
    copied into the snapshot buffer then, so that a checkpoint's pause reads and copies
    only what was written since the last round (issue 13: re-protecting each written
    page, 0.3-0.5 us a page, was most of the pause's read of the log, and the copy of the
    dirty set from the guest's 4 KiB-mapped memory the largest part of the pause), as
    live migration's pre-copy does, and the secondary's SvmPrehash for the SVM's hashes.

    Nothing is missed, nothing stale is sent: a round takes a page off the log and
    re-protects it in one step (the kernel's PAGEMAP_SCAN per page table entry, Xen's
    CLEAN under its paging lock, the bitmap's clear of what its copy saw) and copies it
    after that, so a write after the re-protection, during the copy or later, puts the
    page in the log again and in the pause's read, which copies it again (:meth:`take`)
    with the PVM stopped; a page not in the pause's read was not written since its
    round's copy. The pages held here count as the PVM's dirty ones for the coordinator's
    threshold (the counter ``prescan_held``; a page written again after a round counts
    twice there until the pause: the trigger errs early).

    The buffer's rows are the digest workers' until they released every slot of the last
    checkpoint: a round waits for that (every digest ring empty), copying nothing before.
    A page gets a row at its first round and keeps it; a checkpoint's pages go to the
    digest workers in row order (the rounds' pages, then the pause's new ones), not pfn
    order. Not copied early on a guest with bytes the hypervisor writes without marking
    their page dirty (Xen's vcpu_info, Domain.hypervisor_written): the pause copies all.

    A round runs at the pause's priority, where the stage waits for its command, and reads
    the log in parts (Domain.prescan_dirty), stopping when a command waits: the pause
    reads the rest.

    The cadence follows what the rounds take (:meth:`_next_wait`): every ``prescan_ms``
    (and 40x a round's read of the log, 2x its copy) while the PVM writes fast (a burst: a checkpoint's worth of
    pages taken before its pause), but a steady trickle is taken about LEFT_PAGES pages at
    a time (a service writing 2 pages a request at 1000 requests/s: every ~100 ms, not
    every 5-20 ms for ~10 pages: each round is a wake-up at real time above the request
    path and a walk of the whole log, for pages the pause would copy in microseconds).
    No rounds while no secondary protects the guest (``unprotected``, the node's shared
    word): no checkpoint will take their pages (the next protection starts with a full
    sync, :meth:`start`)."""

    COST_FACTOR = 40    # a round at most every this many times its read of the log (the
                        # walk of all of memory: ~0.1-0.2 ms on a 256 MiB sim guest, ~0.3
                        # more when it re-protects pages)
    COPY_FACTOR = 2     # and this many times its copy: work the pause would do anyway (as
                        # the secondary's SvmPrehash hashing), so at most a third of a core;
                        # at 40x, a round that copied the first 500 pages of a 1k burst
                        # (~1 ms) put the next one 40 ms off, past the checkpoint's pause
    IDLE_MAX_S = 0.1    # rounds that found nothing (or little) come less often, down to this
    AFTER_PAUSE = 4     # the first round after a pause waits this many prescan_ms: the
                        # checkpoint's stages have the cores first
    LEFT_PAGES = 256    # at the rate the PVM writes, a round when about this many pages were
                        # written since the last: what the pause may have left to read and
                        # copy (~0.3-0.5 ms) when it comes between two rounds

    def __init__(self, domain: Domain, counters, prescan_ms: int,
                 snapbuf: PageBuffer | None = None, rings: list[Ring] | tuple = (),
                 unprotected=None) -> None:
        self.domain, self.c = domain, counters
        self.unprotected = unprotected      # a shared int: 1 while no secondary protects
        self.min_s = prescan_ms / 1000
        n = domain.page_count if prescan_ms else 0
        # the pages the rounds took, a flag per page: joining them with the pause's read
        # is a mask and one flatnonzero (0.2-0.4 ms for 16k pages at load 20), where
        # np.union1d's sort took 2-3 ms, in the pause
        self.held = np.zeros(n, bool)
        self.count = 0
        # copied early: a page's row in the snapshot buffer (-1: none), the rows' pages
        self.buf = snapbuf if prescan_ms and not domain.hypervisor_written() else None
        self.rings = rings
        self.row_of = np.full(n if self.buf is not None else 0, -1, np.int64)
        self.order = np.zeros(len(self.buf.pages) if self.buf is not None else 0, np.uint64)
        self.rows = 0
        self.stale: list[np.ndarray] = []   # pages whose row is older than their last write
        self.run_starts: list[int] = []     # the rows where each round's pages start
        #: the last take's pfns are in sorted runs starting at these indexes
        self.runs: list[int] = [0]
        self.on = False             # only once the dirty log is on (a full sync started it)
        self.wait_s = self.min_s
        self.rate = 0.0             # pages/s the last round that took any saw
        self.next_at = 0.0
        self.last_at = 0.0          # when the last round (or the hand-over) began

    def start(self) -> None:
        """The dirty log was (re)started: every page counts as clean, nothing is held."""
        self.on = self.min_s > 0
        self.held[:] = False
        self.row_of[:] = -1
        self._handed_over()

    def _active(self) -> bool:
        return self.on and not (self.unprotected is not None and self.unprotected.value)

    def timeout(self, longest: float) -> float:
        """How long the stage may wait for a command before the next round is due."""
        if not self._active():
            return longest
        return max(0.0, min(longest, self.next_at - time.monotonic()))

    def due(self) -> bool:
        return self._active() and time.monotonic() >= self.next_at

    def round(self, interrupted) -> None:
        if self.buf is not None and any(r.occupancy for r in self.rings):
            # the digest workers still read the last checkpoint's rows: later
            self.next_at = time.monotonic() + self.min_s
            return
        t0 = time.monotonic()
        trace.point("prescan_start")
        got = self.domain.prescan_dirty(interrupted)
        t_read = time.monotonic()
        if len(got):
            self.held[got] = True
            self.count = int(np.count_nonzero(self.held))
            if self.buf is not None:
                self._copy(got, interrupted)
        self.wait_s = self._next_wait(len(got), t0 - self.last_at, t_read - t0,
                                      time.monotonic() - t_read)
        self.last_at = t0
        self.c.add("prescans", 1)
        self.c.add("pages_prescanned", len(got))
        self.c.set("prescan_held", self.count)
        trace.point("prescan_end", -1, f"{len(got)}/{self.count}")
        self.next_at = time.monotonic() + self.wait_s

    def _next_wait(self, got: int, since: float, read: float, copy: float = 0.0) -> float:
        """Seconds to the next round, after one that took ``got`` pages written in the
        ``since`` seconds before it, its read of the log taking ``read`` seconds and its copy
        ``copy``. Never sooner than prescan_ms, COST_FACTOR times the read and COPY_FACTOR
        times the copy; never later than IDLE_MAX_S but for those:

        * nothing: twice the last wait (an idle PVM is looked at less and less often);
        * as fast as the last round that took any saw (within 2x either way): a steady
          writer, when LEFT_PAGES more should be written at that rate, however many this
          one took (a service's trickle: a round every ~80 ms, not every ~80 then ~15);
        * a burst (LEFT_PAGES or more): at once, as often as allowed;
        * a few, after a long wait: soon (prescan_ms), to see whether a burst began (its
          first pages alone say nothing of its rate; a 1k-page write takes 10-60 ms);
        * a few, after a short one: when LEFT_PAGES more should be written at that rate."""
        floor = max(self.min_s, self.COST_FACTOR * read, self.COPY_FACTOR * copy)
        if not got:
            self.rate = 0.0     # (idle: the next pages may be a burst's first)
            return min(self.IDLE_MAX_S, max(floor, 2 * self.wait_s))
        rate = got / max(since, 1e-6)
        last, self.rate = self.rate, rate
        paced = min(self.IDLE_MAX_S, max(floor, self.LEFT_PAGES / rate))
        if last and last / 2 <= rate <= 2 * last:
            # as fast as the last round saw: a steady writer, at its pace (a trickle that
            # reached LEFT_PAGES after a long wait counted as a burst, or as a few pages
            # after a long wait: every other round a look at floor, twice the rounds)
            return paced
        if got >= self.LEFT_PAGES or since > 2 * floor:
            return floor
        return paced

    #: pages copied between two looks at ``interrupted`` (a command waiting): 16k pages
    #: in one go held a checkpoint's command back by their whole copy (~27 ms at load 25)
    COPY_PART = 1024

    def _copy(self, pfns: np.ndarray, interrupted) -> None:
        """Copy ``pfns`` (just taken off the log) into their rows, new rows for new pages
        while the buffer has any, in parts, stopping when a command waits. What is left:
        pages with a row whose copy is now older than their last write (``stale``, the
        pause copies them again) and new pages without a row (the pause copies them)."""
        rows = self.row_of[pfns]
        had = rows >= 0
        again, again_rows = pfns[had], rows[had]
        new = pfns[~had][:len(self.order) - self.rows]
        done = 0
        for at in range(0, len(again), self.COPY_PART):
            part = slice(at, at + self.COPY_PART)
            self._copy_to_rows(again[part], again_rows[part])
            done = min(len(again), at + self.COPY_PART)
            if done < len(again) + len(new) and interrupted():
                self.stale.append(again[done:])
                self.c.add("pages_precopied", done)
                return
        if len(new):
            self.run_starts.append(self.rows)   # (each round's new pages: sorted by pfn)
        for at in range(0, len(new), self.COPY_PART):
            part = new[at:at + self.COPY_PART]
            row = self.rows
            self.domain.read_pages(part, self.buf.pages[row:row + len(part)])
            self.row_of[part] = np.arange(row, row + len(part))
            self.order[row:row + len(part)] = part
            self.rows += len(part)
            done += len(part)
            if at + len(part) < len(new) and interrupted():
                break
        self.c.add("pages_precopied", done)

    def _copy_to_rows(self, pfns: np.ndarray, rows: np.ndarray) -> None:
        """Pages that have a row already (written again since it was copied): a gather,
        then into their rows (few: those written between two reads of the log)."""
        pages = np.empty((len(pfns), self.buf.pages.shape[1]), np.uint8)
        self.domain.read_pages(pfns, pages)
        self.buf.pages[rows] = pages

    def take(self, dirty: np.ndarray, extra: np.ndarray | None = None
             ) -> tuple[np.ndarray, int]:
        """The pause: ``dirty`` (what the log holds now, read with the PVM stopped) and
        ``extra`` (pages to send again), with the pages the rounds took; they are handed
        over. Returns (pfns, copied): the first ``copied`` pfns are in the snapshot
        buffer's rows 0..copied-1 already, as the PVM holds them now (``dirty`` is copied
        again here); the rest are to be copied. Without early copies: the pfns sorted,
        copied 0. ``runs`` then says where the pfns' sorted runs start (one per round that
        copied, then the rest)."""
        if extra is not None and len(extra):
            dirty = np.union1d(dirty, extra).astype(np.uint64)
        if self.stale:
            # taken off the log by a round that was stopped before it copied them again
            dirty = np.union1d(dirty, np.concatenate(self.stale)).astype(np.uint64)
        if not self.count:
            self.runs = [0]
            self._handed_over()
            return dirty, 0
        copied = self.rows
        self.runs = self.run_starts + [copied]
        if copied == self.count:
            # every page the rounds took has its row (the common case): the pause's work
            # is in the size of its own read, not of the guest
            early = self.order[:copied].copy()
            rows = self.row_of[dirty]
            again = rows >= 0
            if again.any():
                self._copy_to_rows(dirty[again], rows[again])
            self.c.add("pages_recopied", int(again.sum()))
            pfns = np.concatenate((early, dirty[~again])).astype(np.uint64)
            self.held[early] = False
            self.row_of[early] = -1
        else:
            # pages the rounds took but had no row for (the buffer was full) or could not
            # copy: all of them, the copied ones first
            self.held[dirty] = True
            pfns = np.flatnonzero(self.held).astype(np.uint64)
            self.held[pfns] = False
            if copied:
                rows = self.row_of[dirty]
                again = rows >= 0
                if again.any():
                    self._copy_to_rows(dirty[again], rows[again])
                self.c.add("pages_recopied", int(again.sum()))
                early = self.order[:copied].copy()
                rest = pfns[self.row_of[pfns] < 0]
                self.row_of[early] = -1
                pfns = np.concatenate((early, rest))
        self._handed_over()
        return pfns, copied

    def _handed_over(self) -> None:
        self.count = 0
        self.rows = 0
        self.stale = []
        self.run_starts = []
        self.c.set("prescan_held", 0)
        self.wait_s = self.min_s
        self.last_at = time.monotonic()
        self.next_at = self.last_at + self.AFTER_PAUSE * self.min_s


def checkpoint_batch(pages: int, workers: int, batch_pages: int) -> int:
    """Pages per batch of a checkpoint's ``pages`` dirty pages: an equal share for each of
    the ``workers`` digest workers, at most ``batch_pages`` (a slot). Each batch is a hand-off
    at every stage of the commit's path (digest, send, receive, restore, and the I/O threads
    between), so as few as keep every worker busy: 1k pages as 2 batches of 500 (not 4 of
    256), 16k as 16 of 1024 (not 63 of 256): commit p50 6.3-6.5 -> 5.3-5.6 ms and 47 -> 34 ms
    (scripts/bench_pipeline.py, shared 2-core machine; two batches per worker were slower)."""
    return max(1, min(batch_pages, -(-pages // workers)))


def _deal(ctx: StageContext, rings: list[Ring], pfns: np.ndarray, epoch: int, fill,
          batch: int = 0, checkpoint: bool = False) -> bool:
    """Deal ``pfns`` in batches to the digest rings, round robin; ``fill(slot, chunk, start)``
    puts a batch's pages (or where to find them) into its slot. ``checkpoint``: the batches
    are a checkpoint's (counted, checkpoint_batches)."""
    batch = batch or rings[0].layout.batch_pages
    for n, start in enumerate(range(0, len(pfns), batch)):
        chunk = pfns[start:start + batch]
        ring = rings[n % len(rings)]
        slot = write_slot(ctx, ring)
        if slot is None:
            return False
        k = len(chunk)
        slot.reset(SLOT_DATA, epoch, k)
        slot.pfns[:k] = chunk
        fill(slot, chunk, start)
        ring.commit_write(slot)
        ctx.counters.add("items_out", k)
        if checkpoint:
            ctx.counters.add("checkpoint_batches", 1)
    return True


def _copy_pages(ctx: StageContext, domain: Domain, rings: list[Ring], pfns: np.ndarray,
                epoch: int, flags: int = 0, checkpoint: bool = False) -> bool:
    """Copy the pages ``pfns`` themselves into the ring slots (full sync, pre-copy, and a
    dirty set that overflowed the snapshot buffer). ``flags``: the epoch's, on every slot
    (wire.FLAG_SYNC: the digest workers need not hash a sync's pages). ``checkpoint``: as
    :func:`_deal`'s."""
    def fill(slot, chunk, start) -> None:
        slot.epoch_flags = flags
        domain.read_pages(chunk, slot.data[:len(chunk)])
        ctx.counters.add("bytes_out", len(chunk) * slot.data.shape[1])
    return _deal(ctx, rings, pfns, epoch, fill, checkpoint=checkpoint)


def _dispatch_buffered(ctx: StageContext, rings: list[Ring], pfns: np.ndarray,
                       epoch: int, runs: list[int] | tuple = ()) -> bool:
    """Hand the digest workers the pages already copied to the snapshot buffer: each slot
    names its pfns and where they sit in the buffer (``row``), no page data.

    ``runs``: where the sorted runs of ``pfns`` start (the prescan's rounds, Prescan.runs).
    Each batch is cut from one run and the batches go out in the order of their highest
    pfn: a digest worker classifies a batch once SVM_DIRTY's parts (ascending pfns) reach
    its highest pfn, and its batches leave in order, so one batch cut across runs (its
    highest pfn near the top) held the worker's others back until the last part came
    (svm_early_batches of 16k pages 9-18 -> 1-4 before this order).

    But only while that adds at most a batch per worker: a service's trickle of writes
    is taken by ~100 rounds of a few new pages each per checkpoint, and cutting at each
    of them dealt its 2048 pages as 46-80 batches instead of 2 (each a hand-off at every
    stage of the commit's path, one after the other: its commit 32-63 ms against 10-19
    without the prescan, session 17). Then the batches are cut in row order, each across
    the runs it holds, and still go out in the order of their highest pfn.

    Every batch is counted (checkpoint_batches; checkpoints_dealt counts the checkpoints):
    that bug showed only in a trace, `stats` now shows the batches per checkpoint."""
    batch = checkpoint_batch(len(pfns), len(rings), rings[0].layout.batch_pages)
    bounds = sorted({0, len(pfns), *(r for r in runs if 0 < r < len(pfns))})
    if len(bounds) <= 2:
        def fill(slot, chunk, start) -> None:
            slot.row = start
            slot.marks = MARK_BUFFERED
        return _deal(ctx, rings, pfns, epoch, fill, batch, checkpoint=True)
    pieces = [(at, min(at + batch, end)) for start, end in zip(bounds, bounds[1:])
              for at in range(start, end, batch)]
    if len(pieces) > -(-len(pfns) // batch) + len(rings):
        pieces = [(at, min(at + batch, len(pfns))) for at in range(0, len(pfns), batch)]
    # (each piece's highest pfn: a piece cut from one run is sorted, one across runs not)
    pieces.sort(key=lambda p: int(pfns[p[0]:p[1]].max()))
    for n, (start, end) in enumerate(pieces):
        ring = rings[n % len(rings)]
        slot = write_slot(ctx, ring)
        if slot is None:
            return False
        k = end - start
        slot.reset(SLOT_DATA, epoch, k)
        slot.pfns[:k] = pfns[start:end]
        slot.row = start
        slot.marks = MARK_BUFFERED
        ring.commit_write(slot)
        ctx.counters.add("items_out", k)
        ctx.counters.add("checkpoint_batches", 1)
    return True


def _end_markers(ctx: StageContext, rings: list[Ring], epoch: int, pages: int, flags: int,
                 vcpu: bytes) -> bool:
    for i, ring in enumerate(rings):
        slot = write_slot(ctx, ring)
        if slot is None:
            return False
        blob = vcpu if i == 0 else b""
        if len(blob) > slot.data_flat.size:
            raise ValueError(f"vCPU state of {len(blob)} bytes does not fit a ring slot "
                             f"({slot.data_flat.size} bytes); raise pipeline.batch_pages")
        slot.reset(SLOT_END, epoch, 0)
        slot.epoch_pages, slot.epoch_flags, slot.vcpu_len = pages, flags, len(blob)
        slot.data_flat[:len(blob)] = np.frombuffer(blob, np.uint8)
        ring.commit_write(slot)
    return True


def run(ctx: StageContext, domain: Domain, rings: list[Ring], ctrl,
        snapbuf: PageBuffer, disk_run_dir: str = "", pause_realtime: bool = True,
        prescan_ms: int = 0, unprotected=None) -> None:
    """``disk_run_dir``: the node has a replicated disk whose stage listens there; its write
    epoch moves on while the PVM is paused, so every write is tagged with the epoch whose
    memory state it follows. ``prescan_ms``: checkpoint.prescan_ms (:class:`Prescan`), whose
    rounds stop while ``unprotected`` (the node's shared word) is 1."""
    disk = None
    if disk_run_dir:
        from pipeline.stages.disk import DiskControl
        disk = DiskControl(disk_run_dir, "primary")
    log = ctx.log
    priority = PausePriority(pause_realtime)
    # the pages the last checkpoint took off the PVM's dirty log (its carried ones too)
    taken = np.zeros(0, np.uint64)
    prescan = Prescan(domain, ctx.counters, prescan_ms, snapbuf, rings, unprotected)
    while not ctx.stopping():
        # The command is awaited at the pause's priority: a checkpoint's pause starts the
        # moment the coordinator asks for it (at normal priority, under load, the wake-up
        # waited 2-5 ms for a core, on the commit's path). Asleep, it takes no CPU; any
        # other command drops it at once.
        priority.urgent(True)
        if not ctrl.poll(prescan.timeout(0.2)):
            if prescan.due():
                prescan.round(lambda: bool(ctrl.poll(0)))
            continue
        cmd = ctrl.recv()
        if not isinstance(cmd, messages.SnapshotCmd):
            priority.urgent(False)
        trace.point("cmd", getattr(cmd, 'epoch', -1), type(cmd).__name__)
        t_busy = time.perf_counter_ns()
        waited = ctx.counters.as_dict()["wait_ns"]
        if isinstance(cmd, messages.SyncCmd):
            epoch = cmd.epoch
            # Dirty tracking starts before the first page is read: a page the PVM writes
            # while the sync streams it is sent again by the first checkpoint.
            domain.enable_dirty_log()
            prescan.start()
            taken = np.zeros(0, np.uint64)      # (the sync sends every page)
            pfns = np.arange(domain.page_count, dtype=np.uint64)
            if not _copy_pages(ctx, domain, rings, pfns, epoch, wire.FLAG_SYNC):
                return
            if not _end_markers(ctx, rings, epoch, len(pfns), wire.FLAG_SYNC, b""):
                return
            log.info("epoch=%d event=sync_queued pages=%d", epoch, len(pfns))
            ctrl.send(messages.Synced(epoch, len(pfns)))
        elif isinstance(cmd, messages.PrecopyCmd):
            epoch = cmd.epoch
            dirty, _ = prescan.take(domain.read_and_clear_dirty())
            if not _copy_pages(ctx, domain, rings, dirty, epoch, wire.FLAG_SYNC):
                return
            if not _end_markers(ctx, rings, epoch, len(dirty), wire.FLAG_SYNC, b""):
                return
            ctrl.send(messages.Precopied(epoch, len(dirty)))
        elif isinstance(cmd, messages.SnapshotCmd):
            epoch, flags, retake = cmd
            if disk is not None:  # a checkpoint holds the whole disk: the initial sync first
                disk.wait_synced()
            # the pause at the hops' level, not at WORK (where the stage waited): at WORK the
            # coordinators' SVM_DIRTY hops (HOP) took both cores inside the pause, and its
            # read of an almost empty log (the prescan's) took 0.85-1.1 ms instead of ~0.5,
            # for hashes the digest workers use only once the PVM runs again
            priority.urgent(True, priority.HOP)
            t0 = time.perf_counter_ns()
            trace.point("pausing", epoch)
            domain.pause()
            if disk is not None:
                disk.set_epoch(epoch + 1)
            # the network comparator's epoch boundary, in order with the PVM's output
            domain.mark_outputs(encode_boundary(BOUNDARY_SNAPSHOT, epoch))
            t_paused = time.perf_counter_ns()
            trace.point("paused", epoch)
            # what was written since the last prescan, and the pages the rounds took (the
            # first ``copied`` of them in the snapshot buffer already)
            dirty, copied = prescan.take(domain.read_and_clear_dirty(),
                                         taken if retake else None)
            taken = dirty
            faults.point("snapshot.dirty_read")
            t_dirty = time.perf_counter_ns()
            trace.point("dirty_read", epoch, str(len(dirty)))
            vcpu = domain.get_vcpu_state()
            # a verified checkpoint hashes all of memory while paused; timed apart, so the
            # pause of the checkpoint itself stays visible
            t_verify = time.perf_counter_ns()
            digest = b""
            if flags & wire.FLAG_DIGEST:
                priority.urgent(False)
                digest = domain.memory_digest()
                # (only when a test asks)
                proof_pages.record(domain, "pvm", epoch, domain_page_hashes)
                priority.urgent(True, priority.HOP)
            verify_ns = time.perf_counter_ns() - t_verify if digest else 0
            # The pause is one gather of the dirty pages into the snapshot buffer, with
            # every core free for it: the digest workers only hear of the pages after the
            # PVM runs again. A dirty set larger than the buffer overflows into the rings.
            t_copy = time.perf_counter_ns()
            k = min(len(dirty), len(snapbuf.pages))
            domain.read_pages(dirty[copied:k], snapbuf.pages[copied:k])
            ok = _copy_pages(ctx, domain, rings, dirty[k:], epoch, checkpoint=True)
            t_resume = time.perf_counter_ns()
            trace.point("copied", epoch)
            domain.resume()
            trace.point("resumed", epoch)
            pause_ns = time.perf_counter_ns() - t0
            # still at the pause's priority for the hand-off to the digest workers (a few
            # ring slots of metadata), who wait at it too (common.StagePriority): at normal
            # priority the stage was preempted by the first of them woken, and the other
            # batches and the END markers waited for a core; dropped before the resume,
            # the stage was preempted with the guest still stopped (resume_ms 2-28 ms in
            # the Xen lab instead of 0.3-0.8)
            ctx.counters.add("bytes_out", k * snapbuf.pages.shape[1])
            ctx.counters.add("checkpoints_dealt", 1)
            if not ok or not _dispatch_buffered(ctx, rings, dirty[:k], epoch, prescan.runs) or \
                    not _end_markers(ctx, rings, epoch, len(dirty), flags, vcpu):
                return
            io = domain.simulated_io()
            input_seq = io.vcpu_input_seq(vcpu) if io is not None else -1
            input_step = io.vcpu_input_step(vcpu) if io is not None else 0
            trace.point("dispatched", epoch)
            ctrl.send(messages.Snapshotted(epoch, len(dirty), pause_ns, input_seq, digest,
                                           verify_ns, input_step))
            # where the pause went: the numbers to tune it by (after the hand-offs, which
            # the digest workers and the coordinator wait for)
            # (copied_early: pages the prescan had copied already, Prescan)
            log.info("epoch=%d event=paused pages=%d pause_ms=%.2f stop_ms=%.2f dirty_log_ms=%.2f "
                     "vcpu_ms=%.2f copy_ms=%.2f resume_ms=%.2f verify_ms=%.1f copied_early=%d",
                     epoch, len(dirty),
                     pause_ns / 1e6, (t_paused - t0) / 1e6, (t_dirty - t_paused) / 1e6,
                     (t_verify - t_dirty) / 1e6, (t_resume - t_copy) / 1e6,
                     (t0 + pause_ns - t_resume) / 1e6, verify_ns / 1e6, copied,
                     extra={"epoch": epoch})
        else:
            raise ValueError(f"snapshot stage: unknown command {cmd!r}")
        # busy = the command's time less what it spent waiting for ring slots
        ctx.counters.add("busy_ns", time.perf_counter_ns() - t_busy
                         - (ctx.counters.as_dict()["wait_ns"] - waited))
        ctx.counters.max("ring_high_water", max(r.high_water for r in rings))
