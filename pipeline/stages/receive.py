"""Secondary: the receive stage's work, done in the restore stage's process (issue 13,
session 19: one process hand-off less per record on a commit's path). It validates every
record from the ``pages`` channel and deals PAGES batches round robin to the verify
workers; EPOCH_END becomes an END marker on every ring that carried batches of the epoch
(the first one's carries the vCPU blob; each says how many there are, ``end_markers``).
Its counters stay the ``receive`` block (``conn_drops`` among them: the coordinator reads
them there).

A record that does not validate is dropped, counted and logged; it is never passed on.
The epoch it belonged to then cannot be complete (EPOCH_END announces more pages than
arrive), so the restore stage discards that epoch whole.

Each batch is also given its place in the staging area (``slot.row``: the index of its
first page), so verify workers decode straight into staging in parallel and no stage
copies a page twice. A record of an epoch older than the newest one seen is stale
(the primary has moved on) and is dropped here.

A batch of raw pages (no lz4) is copied into staging here, with nothing left to decode;
but for a live round's (a full sync's, a pre-copy round's: ``PAGES_UNHASHED``) on the
``direct`` ring, whose pages the restore side writes into the SVM and its cache as soon as
it takes the slot, in this same turn of the loop: those it takes from the record itself
(``unstaged``), and staging is not written at all (a copy of every page less in a sync).
Unless every page is to be hashed again (``pipeline.verify_pages = "full"``, which the
verify workers share between them), this stage also does the check (one page, or none)
and hands the batch to the restore stage's own side on the ``direct`` ring, which the
same process reads at once: no process hand-off at all on the way to the commit.

A record is never waited for inside :meth:`Receiver.take`: the restore stage's loop, which
calls it, is also what the wait would be for (the verify workers' output, the
coordinator's commands). Where it cannot be taken yet, ``take`` changes nothing and says
so; the loop holds the record (reading no other) and offers it again after each thing it
did. That is the case while a ring it goes to is full, and for a newer epoch's first
record while the restore side is not done with the staging rows of the one before (the
restore stage ACKs an epoch before it has written its pages out of staging, early ACK; in
one process it writes them before it reads the next record, so this holds a torn epoch's
successor only, until the coordinator gives the torn one up) or while the verify workers
still hold batches dealt to them (a torn epoch's can still be queued there). A held record
was validated already (and, sealed, found at its place): it is placed as it is once it can.

With security.mode = "sealed" (pipeline/seal.py) every record must be sealed under this
session's key and come at its place (wire.SealPosition); this side opens each EPOCH_END
(its vCPU state) itself and deals every PAGES record to the verify workers, which open
them. A record refused for its seal is counted (``seal_refused``) and dropped: its epoch
is then short of pages, or of its END, and torn.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from pipeline import faults, seal, trace, wire
from pipeline.ring import Ring
from pipeline.stages.common import (MARK_BAD, MARK_STAGED, MARK_UNSTAGED, SLOT_DATA, SLOT_END,
                                    PageBuffer, StageContext, StagePriority)
from pipeline.stages.verify import check_hashes


class Receiver:
    """The receive side of the restore stage's process. ``rings``: to the verify workers;
    ``staging``: a batch of raw pages (not lz4) goes straight from the message into its
    place in staging, one copy, and the verify worker only checks it; with ``direct`` (the
    ring to the restore side) and ``check`` (pipeline.verify_pages) other than "full", it
    is checked here and skips the verify workers. ``done()``: the newest epoch whose
    staging rows the restore side is done with (Restore.done). ``ctx``: the receive
    counters and log. ``priority``: the process's scheduling (common.StagePriority).
    ``seal_keys``: security.mode = "sealed". ``unstaged``: the restore side's (Restore.
    unstaged), where a live round's raw batch on the ``direct`` ring leaves its pages: the
    slot's row -> (the rows of its RAW pages, those pages in the record)."""

    def __init__(self, ctx: StageContext, rings: list[Ring], page_count: int, page_size: int,
                 done: Callable[[], int], staging: PageBuffer | None = None,
                 direct: Ring | None = None, check: str = "full",
                 priority: StagePriority | None = None,
                 seal_keys: seal.SealKeys | None = None,
                 unstaged: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.ctx, self.c = ctx, ctx.counters
        self.rings, self.direct = rings, direct
        self.ends = rings if direct is None else [*rings, direct]   # where END markers go
        self.direct_ok = direct is not None and staging is not None and check != "full"
        self.staging, self.check, self.done, self.priority = staging, check, done, priority
        self.opener = seal.Opener(seal_keys) if seal_keys is not None else None
        self.unstaged = unstaged
        self.position = wire.SealPosition()
        self.page_count, self.page_size = page_count, page_size
        self.batch = rings[0].layout.batch_pages
        self.rr = 0
        self.epoch, self.staged = -1, 0     # the newest epoch seen, pages of it placed so far
        self.used: set[int] = set()         # which of ``ends`` carried batches of ``epoch``
        # the record validated and not placed yet: (its message, kept alive while held;
        # its decoded record), and when it was first refused
        self.held: tuple[object, object] | None = None
        self.held_ns = 0
        self.drain_counted = False

    def take(self, msg) -> bool:
        """A record off the socket: validate it and deal it (or drop it, counted); False when
        it is held (:attr:`held`): valid, but it cannot be placed yet; :meth:`retry` it."""
        trace.point("recv")
        self.c.add("items_in", 1)
        self.c.add("bytes_in", len(msg))
        if faults.ACTIVE:
            faults.point("stage.receive.loop")
        t0 = time.perf_counter_ns()
        try:
            record = self._validate(msg)
        except wire.WireError as exc:
            self._refused(exc)
            record = None
        return self._offer(msg, record, t0)

    def retry(self) -> bool:
        """Offer the held record again; True once it is placed (or dropped)."""
        msg, record = self.held
        return self._offer(msg, record, time.perf_counter_ns())

    def _offer(self, msg, record, t0: int) -> bool:
        try:
            placed = record is None or self._place(record)
        except wire.WireError as exc:
            self._refused(exc)
            placed = True
        if not placed:
            if self.held is None:
                self.held, self.held_ns = (msg, record), t0
            return False
        if self.held is not None:
            self.c.add("staging_wait_ns", time.perf_counter_ns() - self.held_ns)
            self.held, self.held_ns, self.drain_counted = None, 0, False
        self.c.add("busy_ns", time.perf_counter_ns() - t0)
        self.c.max("ring_high_water", max(r.high_water for r in self.ends))
        return True

    def _refused(self, exc: wire.WireError) -> None:
        self.c.add("errors", 1)
        if isinstance(exc, wire.SealRefused):
            self.c.add("seal_refused", 1)
        self.ctx.log.warning("pages channel: dropped a bad record: %s", exc)

    def _stale(self, record_epoch: int, name: str) -> bool:
        """Is the record's epoch older than the newest seen (dropped, counted)?"""
        if record_epoch >= self.epoch:
            return False
        self.c.add("stale_records", 1)
        self.ctx.log.warning("dropped %s of epoch %d: epoch %d already began", name,
                             record_epoch, self.epoch)
        return True

    def _validate(self, msg):
        """The decoded record (wire.Pages or wire.EpochEnd), None for one dropped here (stale,
        optional); raises WireError (SealRefused) for a bad one. Sealed, it is checked at its
        place here, once: what is valid is placed as it is, however long it is held."""
        hdr = wire.decode_header(msg)
        if self.priority is not None:
            self.priority.working(hdr.epoch)
        if hdr.type == wire.PAGES:
            b = wire.decode_pages(msg, self.page_count, self.page_size, self.batch)
            if self._stale(b.epoch, hdr.name):
                return None
            if (b.sealed is None) != (self.opener is None):
                raise wire.SealRefused(
                    "PAGES: not sealed, and security.mode = 'sealed' takes no plaintext "
                    "page" if self.opener is not None else
                    "PAGES: sealed, but this node's security.mode is not 'sealed'")
            if self.opener is not None:
                try:
                    self.opener.check_key(b.sealed.key_id, "PAGES")
                except seal.SealError as exc:
                    raise wire.SealRefused(str(exc)) from None
                self.position.check("PAGES", b.epoch, b.sealed)
            return b
        if hdr.type == wire.EPOCH_END:
            if self._stale(hdr.epoch, hdr.name):    # before it is opened
                return None
            return wire.decode_epoch_end(msg, self.opener,
                                         self.position if self.opener else None)
        if hdr.type & wire.OPTIONAL_BIT:
            self.c.add("skipped_optional", 1)
            return None
        raise wire.WireError(f"{hdr.name} record on the pages channel")

    def _start(self, record_epoch: int) -> bool:
        """May a record of ``record_epoch`` be placed now? A newer epoch than the newest
        seen starts placing pages from the top of the staging area, once the restore side
        is done with the rows of the one before and no verify worker holds a batch."""
        if record_epoch > self.epoch:
            if self.staged and self.done() < self.epoch:
                return False        # the restore side still reads the rows of self.epoch
            if self.staged and any(r.occupancy for r in self.rings):
                # a verify worker still holds a batch dealt to it (a torn epoch's): decoded
                # after the next epoch's raw pages were copied into the same rows, it
                # overwrote them, and the SVM got another page's content (issue 11)
                if not self.drain_counted:
                    self.c.add("verify_drain_waits", 1)
                    self.drain_counted = True
                return False
            if self.held is not None:
                trace.point("staging_free", record_epoch)
            self.epoch, self.staged, self.used = record_epoch, 0, set()
        return True

    def _place(self, record) -> bool:
        if isinstance(record, wire.EpochEnd):
            return self._end(record)
        return self._pages(record)

    def _pages(self, b) -> bool:
        if not self._start(b.epoch):
            return False
        if self.staged + b.count > self.page_count:
            raise wire.WireError(f"PAGES: epoch {b.epoch} carries more than the "
                                 f"guest's {self.page_count} pages")
        raw = self.staging is not None and not b.packed and b.sealed is None \
            and not (b.enc_kind == wire.ENC_LZ4).any()
        ring = self.direct if raw and self.direct_ok else self.rings[self.rr]
        if ring.occupancy >= ring.slots:
            return False
        slot = ring.acquire_write(0)
        n, staged = b.count, self.staged
        slot.reset(SLOT_DATA, b.epoch, n)
        slot.pfns[:n], slot.hashes[:n] = b.pfns, b.hashes
        slot.enc_len[:n], slot.enc_kind[:n] = b.enc_len, b.enc_kind
        slot.batch_flags = (wire.PAGES_PACKED if b.packed else 0) | \
            (wire.PAGES_UNHASHED if b.unhashed else 0) | \
            (wire.PAGES_SEALED if b.sealed is not None else 0)
        slot.row = staged
        if raw:
            rows = self.staging.pages[staged:staged + n]
            carry = b.enc_kind == wire.ENC_RAW
            k = int(carry.sum())
            slot.marks = MARK_STAGED
            if ring is self.direct and b.unhashed and self.unstaged is not None:
                # written from the record by the restore side in this turn (the record is
                # kept alive by the arrays); nothing to hash: unhashed
                slot.marks |= MARK_UNSTAGED
                self.unstaged[staged] = (
                    np.flatnonzero(carry), b.data.reshape(k, self.page_size) if k else
                    np.zeros((0, self.page_size), np.uint8))
            elif k:
                pages = b.data.reshape(k, self.page_size)
                if k == n:
                    rows[:] = pages
                else:
                    # by index: a boolean mask's assignment cost 3x (316 against 106 ns a
                    # page, one core)
                    rows[np.flatnonzero(carry)] = pages
            # (ZERO pages' rows are left as they are: the restore stage writes zeros for
            # them and never reads their rows)
            if ring is self.direct:
                problem = check_hashes(slot, rows, slot.enc_kind[:n], self.page_size,
                                       self.check)
                if problem:
                    slot.marks |= MARK_BAD
                    self.c.add("errors", 1)
                    self.ctx.log.warning("epoch %d: bad page batch: %s", b.epoch, problem)
        else:
            slot.data_flat[:len(b.data)] = b.data
            slot.data_len = len(b.data)
        self.staged += n
        self.used.add(self.ends.index(ring))
        ring.commit_write(slot)
        trace.point("dealt", b.epoch)
        if ring is not self.direct:
            self.rr = (self.rr + 1) % len(self.rings)
        self.c.add("items_out", n)
        return True

    def _end(self, end) -> bool:
        if not self._start(end.epoch):
            return False
        # END markers only on the rings that carried the epoch's batches: a verify worker
        # with none of them is not woken to pass a marker on (two hand-offs off a small
        # checkpoint's path when every batch went straight to restore)
        targets = [r for i, r in enumerate(self.ends) if i in self.used] or self.ends[:1]
        if any(r.occupancy >= r.slots for r in targets):
            return False        # all of them or none: a marker short tears nothing, waits
        if len(end.vcpu) > targets[0].layout.data_size:
            raise wire.WireError(f"EPOCH_END: vCPU blob of {len(end.vcpu)} bytes is larger "
                                 "than a ring slot")
        for i, ring in enumerate(targets):
            slot = ring.acquire_write(0)
            blob = end.vcpu if i == 0 else b""
            slot.reset(SLOT_END, end.epoch, 0)
            slot.epoch_pages, slot.epoch_flags = end.pages, end.flags
            slot.vcpu_len, slot.end_markers = len(blob), len(targets)
            slot.data_flat[:len(blob)] = np.frombuffer(blob, np.uint8)
            ring.commit_write(slot)
        return True
