"""Secondary: the receive stage. Validates every record from the ``pages`` channel and
deals PAGES batches round robin to the verify workers; EPOCH_END becomes an END marker
on every ring that carried batches of the epoch (the first one's carries the vCPU blob;
each says how many there are, ``end_markers``).

A record that does not validate is dropped, counted and logged; it is never passed on.
The epoch it belonged to then cannot be complete (EPOCH_END announces more pages than
arrive), so the restore stage discards that epoch whole.

Each batch is also given its place in the staging area (``slot.row``: the index of its
first page), so verify workers decode straight into staging in parallel and no stage
copies a page twice. A record of an epoch older than the newest one seen is stale
(the primary has moved on) and is dropped here.

A batch of raw pages (no lz4) is copied into staging here, with nothing left to decode.
Unless every page is to be hashed again (``pipeline.verify_pages = "full"``, which the
verify workers share between them), this stage also does the check (one page, or none)
and hands the batch straight to the restore stage on the ``direct`` ring: one process
hand-off less per batch on the way to the commit.

The restore stage ACKs an epoch before it has written the epoch's pages out of staging
(early ACK), so the primary's next epoch can arrive while they are still read: a newer
epoch's first record waits here until the restore stage is done with the previous
epoch's rows (``gate``, common.StagingGate) and the verify workers have decoded every
batch dealt to them (a torn epoch's can still be queued there).

With security.mode = "sealed" (pipeline/seal.py) every record must be sealed under this
session's key and come at its place (wire.SealPosition); this stage opens each EPOCH_END
(its vCPU state) itself and deals every PAGES record to the verify workers, which open
them. A record refused for its seal is counted (``seal_refused``) and dropped: its epoch
is then short of pages, or of its END, and torn.
"""
from __future__ import annotations

import time

import numpy as np
import zmq

from pipeline import seal, trace, wire
from pipeline.ring import Ring, RingTimeout
from pipeline.sockets import io_threads
from pipeline.stages.common import (MARK_BAD, MARK_STAGED, SLOT_DATA, SLOT_END, PageBuffer,
                                    StageContext, StagePriority, StagingGate, write_slot)
from pipeline.stages.verify import check_hashes


#: how long a receive stage waiting for the verify workers to drain sleeps on one ring before
#: it looks whether the stage is stopping (the wait ends at the verify worker's release)
DRAIN_WAIT_S = 0.2


def run(ctx: StageContext, pages_in: zmq.Socket, rings: list[Ring], page_count: int,
        page_size: int, staging: PageBuffer | None = None, direct: Ring | None = None,
        check: str = "full", gate: StagingGate | None = None,
        priority: StagePriority | None = None, seal_keys: seal.SealKeys | None = None) -> None:
    """``staging``: a batch of raw pages (not lz4) goes straight from the message into its
    place in staging, one copy, and the verify worker only checks it; with ``direct`` (a
    ring to the restore stage) and ``check`` (pipeline.verify_pages) other than "full",
    this stage checks it and it skips the verify workers. ``priority``: this stage's
    scheduling (common.StagePriority), followed by the pages channel's ZeroMQ I/O thread,
    which takes every record in. ``seal_keys``: security.mode = "sealed"."""
    c = ctx.counters
    opener = seal.Opener(seal_keys) if seal_keys is not None else None
    position = wire.SealPosition()
    ends = rings if direct is None else [*rings, direct]   # the rings END markers go on
    direct_ok = direct is not None and staging is not None and check != "full"
    batch = rings[0].layout.batch_pages
    rr = 0
    epoch, staged = -1, 0     # the newest epoch seen, and pages of it placed so far
    used: set[int] = set()    # which of ``ends`` carried batches of ``epoch``

    def fresh(record_epoch: int, name: str) -> bool:
        """After a record validated: False (counted) if its epoch is older than the newest
        seen; a newer epoch starts placing pages from the top of the staging area, once
        the restore stage is done with the rows of the one before (the epochs before that
        one were waited for when it began)."""
        nonlocal epoch, staged, used
        if record_epoch < epoch:
            c.add("stale_records", 1)
            ctx.log.warning("dropped %s of epoch %d: epoch %d already began", name,
                            record_epoch, epoch)
            return False
        if record_epoch > epoch:
            if gate is not None and staged and gate.released.value < epoch:
                t0 = time.perf_counter_ns()
                if not gate.wait(epoch, ctx.stopping):
                    return False
                c.add("staging_wait_ns", time.perf_counter_ns() - t0)
                trace.point("staging_free", record_epoch)
            if staged and not verify_drained():
                return False
            epoch, staged, used = record_epoch, 0, set()
        return True

    def verify_drained() -> bool:
        """Wait until the verify workers decoded every batch dealt to them so far (False if
        the stage stops first). A torn epoch's batches can still be queued there when the
        restore stage is done with its rows (it gave the epoch up): decoded after the next
        epoch's raw pages were copied into the same rows, they overwrote them, and the SVM
        got another page's content (issue 11: unequal memories after a re-protection's
        sync, whose first records came after a lost secondary's torn epoch). Once an epoch
        was applied its batches all went through already: this waits only after a torn one."""
        if not any(r.occupancy for r in rings):
            return True
        c.add("verify_drain_waits", 1)
        t0 = time.perf_counter_ns()
        for ring in rings:
            while True:
                if ctx.stopping():
                    return False
                try:
                    ring.wait_empty(DRAIN_WAIT_S)   # asleep until the worker releases
                    break
                except RingTimeout:
                    continue
        c.add("staging_wait_ns", time.perf_counter_ns() - t0)
        return True

    if priority is not None:
        priority.follow(io_threads())
    while not ctx.stopping():
        if priority is not None:
            priority.waiting()
        if not pages_in.poll(200):
            continue
        frame = pages_in.recv(copy=False)
        t0 = time.perf_counter_ns()
        msg = frame.buffer
        trace.point("recv")
        c.add("items_in", 1)
        c.add("bytes_in", len(msg))
        try:
            hdr = wire.decode_header(msg)
            if priority is not None:
                priority.working(hdr.epoch)
            if hdr.type == wire.PAGES:
                b = wire.decode_pages(msg, page_count, page_size, batch)
                if not fresh(b.epoch, hdr.name):
                    continue
                if (b.sealed is None) != (opener is None):
                    raise wire.SealRefused(
                        "PAGES: not sealed, and security.mode = 'sealed' takes no plaintext "
                        "page" if opener is not None else
                        "PAGES: sealed, but this node's security.mode is not 'sealed'")
                if opener is not None:
                    try:
                        opener.check_key(b.sealed.key_id, "PAGES")
                    except seal.SealError as exc:
                        raise wire.SealRefused(str(exc)) from None
                    position.check("PAGES", b.epoch, b.sealed)
                if staged + b.count > page_count:
                    raise wire.WireError(f"PAGES: epoch {b.epoch} carries more than the "
                                         f"guest's {page_count} pages")
                raw = staging is not None and not b.packed and b.sealed is None \
                    and not (b.enc_kind == wire.ENC_LZ4).any()
                ring = direct if raw and direct_ok else rings[rr]
                slot = write_slot(ctx, ring)
                if slot is None:
                    return
                n = b.count
                slot.reset(SLOT_DATA, b.epoch, n)
                slot.pfns[:n], slot.hashes[:n] = b.pfns, b.hashes
                slot.enc_len[:n], slot.enc_kind[:n] = b.enc_len, b.enc_kind
                slot.batch_flags = (wire.PAGES_PACKED if b.packed else 0) | \
                    (wire.PAGES_UNHASHED if b.unhashed else 0) | \
                    (wire.PAGES_SEALED if b.sealed is not None else 0)
                slot.row = staged
                if raw:
                    rows = staging.pages[staged:staged + n]
                    carry = b.enc_kind == wire.ENC_RAW
                    k = int(carry.sum())
                    if k:
                        pages = b.data.reshape(k, page_size)
                        if k == n:
                            rows[:] = pages
                        else:
                            # by index: a boolean mask's assignment cost 3x (316
                            # against 106 ns a page, one core)
                            rows[np.flatnonzero(carry)] = pages
                    # (ZERO pages' rows are left as they are: the restore stage writes
                    # zeros for them and never reads their rows)
                    slot.marks = MARK_STAGED
                    if ring is direct:
                        problem = check_hashes(slot, rows, slot.enc_kind[:n], page_size, check)
                        if problem:
                            slot.marks |= MARK_BAD
                            c.add("errors", 1)
                            ctx.log.warning("epoch %d: bad page batch: %s", b.epoch, problem)
                else:
                    slot.data_flat[:len(b.data)] = b.data
                    slot.data_len = len(b.data)
                staged += n
                used.add(ends.index(ring))
                ring.commit_write(slot)
                trace.point("dealt", b.epoch)
                if ring is not direct:
                    rr = (rr + 1) % len(rings)
                c.add("items_out", n)
            elif hdr.type == wire.EPOCH_END:
                if hdr.epoch < epoch:        # stale: dropped by fresh() before it is opened
                    fresh(hdr.epoch, hdr.name)
                    continue
                end = wire.decode_epoch_end(msg, opener, position if opener else None)
                if not fresh(end.epoch, hdr.name):
                    continue
                # END markers only on the rings that carried the epoch's batches: a verify
                # worker with none of them is not woken to pass a marker on (two hand-offs
                # off a small checkpoint's path when every batch went straight to restore)
                targets = [r for i, r in enumerate(ends) if i in used] or ends[:1]
                for i, ring in enumerate(targets):
                    slot = write_slot(ctx, ring)
                    if slot is None:
                        return
                    blob = end.vcpu if i == 0 else b""
                    if len(blob) > slot.data_flat.size:
                        raise wire.WireError(f"EPOCH_END: vCPU blob of {len(blob)} bytes is "
                                             "larger than a ring slot")
                    slot.reset(SLOT_END, end.epoch, 0)
                    slot.epoch_pages, slot.epoch_flags = end.pages, end.flags
                    slot.vcpu_len, slot.end_markers = len(blob), len(targets)
                    slot.data_flat[:len(blob)] = np.frombuffer(blob, np.uint8)
                    ring.commit_write(slot)
            elif hdr.type & wire.OPTIONAL_BIT:
                c.add("skipped_optional", 1)
            else:
                raise wire.WireError(f"{hdr.name} record on the pages channel")
        except wire.WireError as exc:
            c.add("errors", 1)
            if isinstance(exc, wire.SealRefused):
                c.add("seal_refused", 1)
            ctx.log.warning("pages channel: dropped a bad record: %s", exc)
        c.add("busy_ns", time.perf_counter_ns() - t0)
        c.max("ring_high_water", max(r.high_water for r in ends))
