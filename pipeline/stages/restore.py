"""Secondary: the restore stage. Assembles each epoch from the verify workers, and
applies it to the SVM only when it is complete and every page verified.

It keeps the secondary's cache: a copy of guest memory as of the last committed
checkpoint, with the blake3 of each page. At commit of epoch e, with the SVM paused:
  1. the epoch's pages go into the SVM and the cache (REF pages come from the cache),
  2. pages the SVM dirtied itself during e, and the PVM did not send, are restored
     from the cache,
  3. the primary's vCPU state is loaded.
A torn epoch (bad page, missing pages, newer epoch started, coordinator abort) is
discarded whole and the SVM is rolled back to the last committed checkpoint.

Talks to the coordinator over a pipe (the types: pipeline/messages.py):
  <- ApplyCmd(e)           sent at BEGIN: once all END markers of e arrived, e is applied
                           (-> [Checked, Written,] Applied) or, if it cannot be, discarded
                           (-> Aborted) at once
  <- AbortCmd(e)           -> Aborted; nothing if e was applied already (the coordinator
                           tore it while it was being applied: the Applied stands)
Applying as soon as the epoch is assembled, with the command already here, saves the
round trip through the coordinator (Ready, then ApplyCmd) the stage once made per epoch.
Until the epoch is here (the SVM paused since BEGIN, this stage idle), the stage copies the
SVM's dirty pages (those not zero) into a side buffer, a chunk at a time between batches:
the epoch's SVM pages go into the cache from that copy once the SVM runs again, not from
the SVM inside its pause. The cache is not touched before the epoch is applied, so a torn
epoch leaves it the last committed checkpoint's.

Early ACK: once the epoch is checked whole (every page verified and counted, the SVM
pages still as SVM_DIRTY hashed them, the vCPU state taken by the backend) nothing can
stop it being applied, so the stage says ``Checked`` before it writes the pages and the
coordinator ACKs the epoch meanwhile (not for a proof checkpoint: its ACK carries the
memory digest of the applied state). ``Written`` follows once the SVM's memory is the
epoch's: the SVM stays paused until then, and the stage then copies the epoch's pages from
staging (and its SVM pages from the side buffer) into its cache while the SVM runs. ``Applied`` follows; a takeover waits for it.
A secondary that dies between Checked and Applied is stale: its SVM is half-applied and
never used (the node stops; the primary re-protects with a fresh one).

The receive stage's work runs in this process (pipeline/stages/receive.py, ``Receiver``):
the loop reads the pages channel itself, and the batches of raw pages the receive side
placed in staging come to the restore side on the ``direct`` ring of this same process, as
does every END marker of an epoch that had no lz4 batch: no process hand-off and no
wake-up between a record's arrival and its assembly (two records and an EPOCH_END at 1k
pages: session 19). The next epoch's pages are placed in staging only once this side is
done with the rows of the one before (``Restore.done``): with the early ACK that is after
its pages were written out of staging, in this loop, before it reads the next record.
The first epoch (SYNC, all of memory) goes the same way, but for its raw batches on the
direct ring: their pages go from the record into the SVM and the cache (``unstaged``), not
through staging; the staging area (shared with the verify workers, which decode into it) is
as large as guest memory.
"""
from __future__ import annotations

import mmap
import os
import time
from typing import NamedTuple

import numpy as np
import zmq

from pipeline import faults, messages, proof_pages, trace, wire
from pipeline.pfns import in_sorted_pfns, unique_pfns
from pipeline.ring import Ring
from pipeline.sockets import io_threads
from pipeline.stages.common import (MARK_BAD, MARK_UNSTAGED, SLOT_END, HashTable, PageBuffer,
                                    StageContext, StagePriority, domain_page_hashes,
                                    zero_page_hash)
from pipeline.stages.inputs import await_checkpoint_input
from pipeline.stages.receive import Receiver
from pipeline.xen_io.base import Domain


def _populated(shape: tuple[int, int], populate: bool = True) -> np.ndarray:
    """Zeroed private memory the kernel backs in one go now (MAP_POPULATE), at stage
    start: left to first touch, the full sync took one fault per page of the cache (0.2-1.7
    s for 256 MiB on a loaded 2-core machine, against 0.1 s populated at start). Not
    ``populate``: backed page by page as it is first written (memory used only as far as
    it is)."""
    size = shape[0] * shape[1]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | \
        (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), np.uint8).reshape(shape)


_sampler = np.random.default_rng()

# Pages per step when pages go from one place to another through a buffer (the SVM's pages
# into the cache) or zeros are written: 1 MiB, so the buffer stays in the core's cache and
# each page is read and written once from memory (through one buffer the size of the whole
# set, each page was also written to and read back from it: at 16k pages, 11k SVM pages,
# 45 MiB through memory twice more).
CHUNK_PAGES = 256

# Rows of the side buffer of the SVM's pages (Restore.svm_copy) backed at the stage's start:
# 16 MiB, more than the service bench's checkpoints dirty (~2k pages)
SVM_COPY_PREFAULT = 4096


class Verdict(NamedTuple):
    """All END markers of ``epoch`` arrived; ``ok`` if it can be applied, else ``reason``."""
    epoch: int
    ok: bool
    reason: str
    at_ns: int      # time.monotonic_ns() when it was assembled


class SvmCopy:
    """The SVM's dirty pages of ``epoch`` being copied, while the epoch is in transit, into
    the restore stage's side buffer (``Restore.svm_copy``, row i = ``pfns[i]``): the first
    ``done`` of them are there. ``zeros``: the SVM's dirty pages it holds as zeros (their
    SVM_DIRTY hash), never copied."""

    def __init__(self, epoch: int, pfns: np.ndarray, zeros: np.ndarray) -> None:
        self.epoch = epoch
        self.pfns = pfns        # sorted, unique
        self.zeros = zeros      # sorted, unique
        self.done = 0

    def pending(self) -> bool:
        return self.done < len(self.pfns)


class Assembly:
    """One epoch being put together in the staging area."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.n = 0              # pages staged
        self.problem = ""       # why the epoch cannot be applied ('' = fine so far)
        self.markers = 0
        self.announced = -1     # pages EPOCH_END announced
        self.vcpu = b""
        self.sync = False
        self.unhashed = False   # a batch came without its pages' hashes (PAGES_UNHASHED)


class Restore:
    def __init__(self, ctx: StageContext, domain: Domain, n_rings: int,
                 staging: np.ndarray, check: str = "full") -> None:
        self.ctx, self.domain, self.n_rings = ctx, domain, n_rings
        self.check = check          # pipeline.verify_pages, for the SVM pages
        pc, ps = domain.page_count, domain.page_size
        self.cache = _populated((pc, ps))
        self.table = HashTable(np.zeros((pc, 32), np.uint8), np.zeros(pc, bool))
        self.staging = staging      # shared: the verify workers decode pages into it
        self.staged_pfns = np.zeros(pc, np.uint64)
        self.staged_hashes = np.zeros((pc, 32), np.uint8)
        self.staged_from_cache = np.zeros(pc, bool)
        self.staged_from_svm = np.zeros(pc, bool)      # SVM pages: the SVM holds them
        self.staged_written = np.zeros(pc, bool)       # already in the SVM and the cache
        # ZERO pages: written as zeros, never read from staging (the receive stage does not
        # clear their rows: a memset in staging, then two copies out of it, for a page
        # known to be zeros)
        self.staged_zero = np.zeros(pc, bool)
        # False until the SVM may have run: a paused checkpoint's END marker arrived, or one
        # was applied (a discarded epoch leaves it as the last commit left it)
        self.svm_may_run = False
        self.chunk = np.zeros((CHUNK_PAGES, ps), np.uint8)   # SVM pages on their way
        # The SVM's dirty pages as it holds them, copied while their epoch is in transit
        # (the SVM paused since BEGIN, this stage idle until the first batch: several ms):
        # the epoch's SVM pages go into the cache from here after the SVM resumed, as the
        # brought pages go from staging, instead of from the SVM inside its pause (0.7 ms
        # at 1k pages, 1.5 at 2k). Backed as far as the largest dirty set used it; its
        # first rows now (a first touch costs ~10x the copy: the first checkpoint of a
        # service bench's row copied half its ~1.4k SVM pages in transit without this)
        self.svm_copy = _populated((pc, ps), populate=False)
        self.svm_copy[:min(pc, SVM_COPY_PREFAULT)].fill(0)
        self.transit: SvmCopy | None = None
        # a live round's raw batches the receive side left in their records (a copy into
        # staging less for each of a full sync's pages): slot.row -> (the rows of its RAW
        # pages, those pages); each taken by take_slot in the loop's turn that placed it
        self.unstaged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.zeros = np.zeros((CHUNK_PAGES, ps), np.uint8)   # stays zero: ZERO pages' source
        self.asm: Assembly | None = None
        self.committed_epoch = -1
        self.committed_vcpu = b""
        self.done = -1      # every epoch <= this was answered or given up: its records are
                            # stale, its staging rows free for the receive stage

    def finish(self, epoch: int) -> None:
        """Done with every epoch <= ``epoch`` (answered, or a newer one asked for): an
        assembly of one is dropped, the receive stage may place pages over their rows."""
        if self.asm is not None and self.asm.epoch <= epoch:
            self.asm = None
        if self.transit is not None and self.transit.epoch <= epoch:
            self.transit = None
        if epoch > self.done:
            self.done = epoch

    # -- assembling -------------------------------------------------------
    def _assembly_for(self, epoch: int) -> Assembly | None:
        c = self.ctx.counters
        if epoch <= self.committed_epoch:
            c.add("stale_records", 1)
            self.ctx.log.warning("dropped a record of epoch %d: epoch %d is already committed",
                                 epoch, self.committed_epoch)
            return None
        if epoch <= self.done:
            c.add("stale_records", 1)
            self.ctx.log.warning("dropped a record of epoch %d: it was answered or given up "
                                 "already", epoch)
            return None
        if self.asm is not None and epoch < self.asm.epoch:
            c.add("stale_records", 1)
            self.ctx.log.warning("dropped a record of old epoch %d while assembling %d",
                                 epoch, self.asm.epoch)
            return None
        if self.asm is None or epoch > self.asm.epoch:
            if self.asm is not None:
                c.add("torn_epochs", 1)
                self.ctx.log.warning("epoch %d torn: epoch %d started before it was complete",
                                     self.asm.epoch, epoch)
            self.asm = Assembly(epoch)
        return self.asm

    def take_slot(self, slot) -> Verdict | None:
        """Stage one slot; returns the Verdict when the epoch is assembled."""
        unstaged = self.unstaged.pop(slot.row, None) if slot.kind != SLOT_END \
            and slot.marks & MARK_UNSTAGED else None
        asm = self._assembly_for(slot.epoch)
        if asm is None:
            return None
        if slot.kind == SLOT_END:
            asm.markers += 1
            asm.sync = bool(slot.epoch_flags & wire.FLAG_SYNC)
            if not asm.sync:
                self.svm_may_run = True
            if slot.vcpu_len:
                asm.vcpu = slot.data_flat[:slot.vcpu_len].tobytes()
            asm.announced = slot.epoch_pages
            if asm.markers < (slot.end_markers or self.n_rings):
                return None
            if asm.unhashed and not asm.sync:
                # only a full sync's or pre-copy round's pages may come without hashes
                asm.problem = asm.problem or "pages without their hashes (UNHASHED) in a " \
                    "checkpoint"
            if not asm.problem and asm.n != asm.announced:
                asm.problem = (f"{asm.n} pages arrived and verified but EPOCH_END "
                               f"announced {asm.announced}")
            return Verdict(asm.epoch, not asm.problem, asm.problem, time.monotonic_ns())
        n = slot.count
        if slot.marks & MARK_BAD:
            asm.problem = asm.problem or "a page failed verification"
        if slot.row + n > len(self.staged_pfns):
            asm.problem = asm.problem or "more pages than the guest has"
        if slot.batch_flags & wire.PAGES_UNHASHED:
            asm.unhashed = True     # refused at the END markers unless the epoch is a sync
        if asm.problem:
            return None
        pfns, kinds = slot.pfns[:n], slot.enc_kind[:n]
        refs = kinds == wire.ENC_REF
        if refs.any() and not self.table.matches(pfns[refs], slot.hashes[:n][refs]).all():
            asm.problem = "a REF page does not match the committed copy"
            return None
        at = slot.row               # where the verify worker put the pages in staging
        svm = kinds == wire.ENC_SVM
        zero = kinds == wire.ENC_ZERO
        self.staged_from_cache[at:at + n] = refs
        self.staged_from_svm[at:at + n] = svm
        self.staged_zero[at:at + n] = zero
        self.staged_pfns[at:at + n] = pfns
        self.staged_hashes[at:at + n] = slot.hashes[:n]
        written = self.staged_written[at:at + n]
        written[:] = False
        if not self.svm_may_run:
            # The SVM never ran (the full sync, pre-copy rounds): there is no checkpoint to
            # roll it back to, so the batch's pages go into the SVM and the cache now, while
            # the rest of the epoch streams in, instead of all at the end (a torn round's
            # pages are sent again by the next one, whose pages then overwrite these).
            write = ~(refs | svm)
            if unstaged is not None:
                self._write_unstaged(pfns, *unstaged, write, zero)
            else:
                self._write_staged(pfns, self.staging[at:at + n], write, zero)
            written[:] = write
        elif unstaged is not None:
            # (an unhashed batch after the SVM ran: its epoch is refused at its END; its
            # pages go where the apply would read them all the same)
            rows, pages = unstaged
            self.staging[at:at + n][rows] = pages
        asm.n += n
        return None

    # -- writing ----------------------------------------------------------
    def _write_staged(self, pfns: np.ndarray, block: np.ndarray, write: np.ndarray,
                      zero: np.ndarray, svm: bool = True, cache: bool = True) -> None:
        """The rows ``write`` of ``block`` (staging rows of ``pfns``) into the SVM (``svm``)
        and the cache (``cache``); the ``zero`` ones among them (ZERO pages: their rows hold
        nothing) as zeros. When every row is written, the ZERO rows are cleared in staging
        and all go in one copy (a full sync's batches: a gather of the others would copy
        them once more)."""
        if write.all():
            if zero.any():
                block[zero] = 0
            if cache:
                self.cache[pfns] = block
            if svm:
                self.domain.write_pages(pfns, block)
            return
        data = write & ~zero
        if data.any():
            rows = block[data]
            if cache:
                self.cache[pfns[data]] = rows
            if svm:
                self.domain.write_pages(pfns[data], rows)
        zero = write & zero
        if zero.any():
            self._write_zeros(pfns[zero], svm, cache)

    def _write_unstaged(self, pfns: np.ndarray, rows: np.ndarray, pages: np.ndarray,
                        write: np.ndarray, zero: np.ndarray) -> None:
        """The batch's pages ``write`` into the SVM and the cache, its RAW pages from the
        record (``pages``, those of the batch's ``rows``), its ZERO pages as zeros: staging
        is not read (the receive side did not write it, Receiver.unstaged)."""
        keep = write[rows]
        if not keep.all():
            rows, pages = rows[keep], pages[keep]
        if len(rows):
            at = pfns[rows]
            self.cache[at] = pages
            self.domain.write_pages(at, pages)
        zero = write & zero
        if zero.any():
            self._write_zeros(pfns[zero])

    def _write_zeros(self, pfns: np.ndarray, svm: bool = True, cache: bool = True) -> None:
        """The pages ``pfns`` become zeros in the SVM (``svm``) and the cache (``cache``):
        straight into guest memory when the backend maps it all (sim), one memset a page
        (through write_pages from a zero buffer, each page was also read: 0.6 ms for 600
        pages against 0.1 ms, on the SVM's pause after the early ACK)."""
        if cache:
            self.cache[pfns] = 0
        view = self.domain.memory_view() if svm else None
        if view is not None:
            view[pfns] = 0
            return
        for at in range(0, len(pfns) if svm else 0, CHUNK_PAGES):
            part = pfns[at:at + CHUNK_PAGES]
            self.domain.write_pages(part, self.zeros[:len(part)])

    def _cache_svm_pages(self, pfns: np.ndarray) -> None:
        """The SVM's pages ``pfns`` (as it holds them) into the cache, a chunk at a time:
        straight from guest memory when the backend maps it all (sim). This is on the SVM's
        pause after the early ACK (the SVM may run only once they are cached); through
        read_pages each page was copied twice, the gather by np.take: 2.0 ms of CPU for
        700 pages against 0.9 ms straight (a 1k checkpoint's SVM pages; the service
        bench's checkpoints have ~1430)."""
        view = self.domain.memory_view()     # (prefaulted at the stage's start)
        for at in range(0, len(pfns), CHUNK_PAGES):
            part = pfns[at:at + CHUNK_PAGES]
            if view is not None:
                self.cache[part] = view[part]
                continue
            held = self.chunk[:len(part)]
            self.domain.read_pages(part, held)
            self.cache[part] = held

    # -- the SVM's pages, while the epoch is in transit ---------------------
    def start_svm_copy(self, epoch: int, svm_dirty: np.ndarray,
                       nonzero: np.ndarray | None = None) -> None:
        """The coordinator asked for ``epoch`` (the SVM paused since its BEGIN, its dirty
        pages ``svm_dirty``, those of them it does not hold as zeros ``nonzero``, None: not
        known) and its pages are not all here: copy the SVM's dirty pages that are not
        zeros while they come (:meth:`copy_svm_step`, when nothing else is to be done). The
        SVM stays paused until this stage answered the epoch (Written, Aborted), which ends
        the copy, so every page copied is the SVM's page as the epoch's apply finds it."""
        dirty = unique_pfns(svm_dirty)
        pfns = dirty if nonzero is None else unique_pfns(nonzero)
        zeros = np.zeros(0, np.uint64) if nonzero is None else \
            dirty[~in_sorted_pfns(dirty, pfns)]
        self.transit = SvmCopy(epoch, pfns, zeros) if len(dirty) else None
        trace.point("svm_copy_start", epoch, str(len(pfns)))

    def copy_svm_step(self) -> bool:
        """Copy the next chunk of the SVM's dirty pages into the side buffer; True while
        some are left."""
        t = self.transit
        if t is None or not t.pending():
            return False
        part = t.pfns[t.done:t.done + CHUNK_PAGES]
        into = self.svm_copy[t.done:t.done + len(part)]
        view = self.domain.memory_view()
        if view is not None:
            # (one copy: mode "raise" with out= copies through a buffer)
            np.take(view, part.astype(np.intp), axis=0, out=into, mode="clip")
        else:
            self.domain.read_pages(part, into)
        t.done += len(part)
        self.ctx.counters.add("svm_copied_in_transit", len(part))
        if t.pending():
            return True
        trace.point("svm_copied", t.epoch, str(t.done))
        faults.point("restore.svm_copied")
        return False

    def _svm_copied(self, t: SvmCopy | None, svm_pfns: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The SVM pages ``svm_pfns`` copied in transit (``t``: their pfns, their rows in
        the side buffer), and those that were not (copied from the SVM, paused)."""
        none = np.zeros(0, np.uint64)
        if t is None or not t.done or not len(svm_pfns):
            return none, none.astype(np.intp), svm_pfns
        copied = t.pfns[:t.done]
        rows = np.searchsorted(copied, svm_pfns)
        hit = rows < len(copied)
        hit[hit] = copied[rows[hit]] == svm_pfns[hit]
        return svm_pfns[hit], rows[hit], svm_pfns[~hit]

    def _cache_copied(self, pfns: np.ndarray, rows: np.ndarray) -> None:
        """The side buffer's ``rows`` (the SVM's pages ``pfns``, copied in transit) into the
        cache, a chunk at a time, in the order of the rows: where they run on without a gap
        (every page copied was an SVM page, as with deterministic guests) each chunk goes
        from a slice of the buffer, one copy a page (a gather by rows copies twice)."""
        order = np.argsort(rows, kind="stable")
        pfns, rows = pfns[order], rows[order]
        for at in range(0, len(pfns), CHUNK_PAGES):
            part, held = pfns[at:at + CHUNK_PAGES], rows[at:at + CHUNK_PAGES]
            first, last = int(held[0]), int(held[-1])
            if last - first == len(held) - 1:
                self.cache[part] = self.svm_copy[first:last + 1]
            else:
                self.cache[part] = self.svm_copy[held]

    # -- applying ---------------------------------------------------------
    def apply(self, epoch: int, svm_dirty: np.ndarray, want_digest: bool,
              assembled_ns: int = 0, on_checked=None, give_up=None
              ) -> messages.Applied | messages.Aborted:
        """``on_checked(Checked)`` is called once nothing can stop the epoch being applied,
        before its pages are written (not when ``want_digest``: that ACK waits for the
        digest of the applied memory), and ``on_checked(Written)`` once the SVM's memory is
        the epoch's: the SVM may run on, while this stage fills its cache with the pages
        the epoch brought (from staging: what the SVM does then changes nothing of them).
        ``give_up()``: the coordinator tore the epoch (ends a wait for its input)."""
        asm = self.asm
        if asm is None or asm.epoch != epoch or asm.problem:
            why = asm.problem if asm is not None and asm.epoch == epoch else "not assembled"
            return self.abort(epoch, svm_dirty, why)
        if not asm.sync:
            try:
                faults.point("restore.assembled")
            except OSError as exc:  # COLO_FAULT errno=...: the epoch ends torn here
                return self.abort(epoch, svm_dirty, f"torn by a fault: {exc}")
        n = asm.n
        pfns = self.staged_pfns[:n]
        transit, self.transit = self.transit, None
        if transit is not None and transit.epoch != epoch:
            transit = None
        # ZERO pages the SVM holds as zeros already (SVM_DIRTY's hash, the SVM paused
        # since) are not written into it in its pause, as SVM pages are not: checked like
        # them (below), unless every page is to be checked (hashing costs more than the
        # write), and written into the cache as zeros after Written
        held_zero = np.zeros(n, bool)
        if transit is not None and len(transit.zeros) and self.check != "full":
            zero_rows = np.flatnonzero(self.staged_zero[:n])
            held_zero[zero_rows[in_sorted_pfns(pfns[zero_rows], transit.zeros)]] = True
        # SVM pages first, while nothing has changed: the SVM must still hold each one as
        # it was when SVM_DIRTY hashed it (paused since; a change behind the pipeline's
        # back tears the epoch). pipeline.verify_pages says how many are hashed again:
        # all, one in 64 at random, none; hashed where they are (no copy) when the backend
        # maps all of guest memory. They go into the cache after the ACK (below): the SVM
        # stays paused until then and the epoch writes none of them.
        svm_rows = np.flatnonzero(self.staged_from_svm[:n])
        svm_pfns = pfns[svm_rows]
        if len(svm_rows) and self.check != "off":
            check = None if self.check == "full" else np.sort(_sampler.choice(
                len(svm_rows), -(-len(svm_rows) // 64), replace=False))
            got = domain_page_hashes(self.domain, svm_pfns if check is None
                                     else svm_pfns[check])
            bad = (got != self.staged_hashes[svm_rows if check is None
                                             else svm_rows[check]]).any(axis=1)
            if bad.any():
                self.ctx.counters.add("svm_refs_refused", int(bad.sum()))
                first = int(svm_pfns[bad.argmax() if check is None else check[bad.argmax()]])
                return self.abort(epoch, svm_dirty, (
                    f"the SVM's page {first} no longer has the hash SVM_DIRTY gave for it "
                    f"({int(bad.sum())} such pages): changed behind the pipeline's back"))
        if held_zero.any() and self.check == "sample":
            rows = np.flatnonzero(held_zero)
            rows = np.sort(_sampler.choice(rows, -(-len(rows) // 64), replace=False))
            zero = np.frombuffer(zero_page_hash(self.domain.page_size), np.uint8)
            bad = (domain_page_hashes(self.domain, pfns[rows]) != zero).any(axis=1)
            if bad.any():
                self.ctx.counters.add("svm_refs_refused", int(bad.sum()))
                return self.abort(epoch, svm_dirty, (
                    f"the SVM's page {int(pfns[rows[bad.argmax()]])} is no longer zeros as "
                    f"SVM_DIRTY's hash said ({int(bad.sum())} such pages): changed behind "
                    "the pipeline's back"))
        trace.point("svm_checked", epoch, str(len(svm_rows)))
        io = self.domain.simulated_io()
        if asm.vcpu and io is not None:
            # the input the PVM was inside must be in the SVM's log before the state goes
            # in (issue 11): missing, the epoch is discarded whole, nothing of it applied
            missing = await_checkpoint_input(io, asm.vcpu, give_up or (lambda: False),
                                             self.ctx.counters)
            if missing:
                self.ctx.counters.add("inputs_missing", 1)
                self.ctx.counters.add("errors", 1)
                self.ctx.log.error("epoch=%d event=input_missing %s", epoch, missing)
                return self.abort(epoch, svm_dirty, missing)
        if asm.vcpu:
            # first, because the backend checks the blob before changing anything: a blob
            # it refuses aborts the epoch while memory is still untouched
            try:
                self.domain.set_vcpu_state(asm.vcpu)
            except ValueError as exc:
                return self.abort(epoch, svm_dirty, f"vCPU state refused: {exc}")
            faults.point("restore.vcpu_set")
        early = on_checked is not None and not want_digest
        if early:
            on_checked(messages.Checked(epoch, n, assembled_ns))
            trace.point("checked", epoch)
            faults.point("restore.checked")
        # Into the SVM first, into the cache once the SVM's memory is whole (Written): the
        # SVM's pause after the early ACK holds only the writes the SVM needs (the SVM
        # pages' copy into the cache among them: they change once it runs)
        brought = ~(self.staged_from_cache[:n] | self.staged_from_svm[:n])
        write = brought & ~self.staged_written[:n]
        self._write_staged(pfns, self.staging[:n], write & ~held_zero, self.staged_zero[:n],
                           cache=False)
        if held_zero.any():
            self.ctx.counters.add("zero_pages_held", int(held_zero.sum()))
        trace.point("pages_written", epoch, str(int(held_zero.sum())))
        faults.point("restore.pages_written")
        # The SVM pages into the cache: the ones copied while the epoch was in transit go
        # from that copy once the SVM runs (below, beside the brought pages); the rest (the
        # epoch came whole before the copy was done, an SVM page outside the SVM's dirty
        # set) from the SVM now, while it is paused: it changes them once it runs
        copied_pfns, copied_rows, late = self._svm_copied(transit, svm_pfns)
        if len(late):
            self._cache_svm_pages(late)
        if len(svm_rows):
            self.ctx.counters.add("pages_same_as_svm", len(svm_rows))
            self.ctx.counters.add("svm_cached_paused", len(late))
        trace.point("svm_cached", epoch, str(len(late)))
        # Pages the SVM wrote itself and the epoch did not bring go back to their committed
        # content; REF pages need nothing more (the SVM holds them unless it wrote them),
        # nor do SVM pages (the SVM holds them as the epoch has them). Every page the
        # epoch staged counts as brought but REF pages: a page written at staging time is
        # in the SVM already. (A lookup table over the pfns' range, not a sort: np.setdiff1d
        # sorted both sets, 5 ms at 16k pages.)
        brought_pfns = pfns[brought | self.staged_from_svm[:n]]
        from_cache = svm_dirty[np.isin(svm_dirty, brought_pfns, invert=True, kind="table")] \
            if len(svm_dirty) and len(brought_pfns) else np.asarray(svm_dirty)
        from_cache = from_cache.astype(np.uint64)
        if len(from_cache):
            self.domain.write_pages(from_cache, self.cache[from_cache])
        trace.point("svm_rolled", epoch, str(len(from_cache)))
        if early:
            on_checked(messages.Written(epoch, n, assembled_ns))
            trace.point("written", epoch)
            faults.point("restore.written")
        self._write_staged(pfns, self.staging[:n], write, self.staged_zero[:n], svm=False)
        self._cache_copied(copied_pfns, copied_rows)
        trace.point("cache_written", epoch)
        self.table.update(pfns, self.staged_hashes[:n])
        if asm.vcpu:
            self.committed_vcpu = asm.vcpu
            self.svm_may_run = True
        self.committed_epoch = epoch
        self.asm = None
        digest = self.domain.memory_digest() if want_digest else b""
        if want_digest:
            # (only when a test asks)
            proof_pages.record(self.domain, "svm", epoch, domain_page_hashes)
        input_seq = -1
        io = self.domain.simulated_io()
        if self.committed_vcpu and io is not None:
            input_seq = io.vcpu_input_seq(self.committed_vcpu)
        self.ctx.counters.add("epochs_applied", 1)
        self.ctx.counters.add("items_out", n)
        return messages.Applied(epoch, n, digest, input_seq, assembled_ns)

    def abort(self, epoch: int, svm_dirty: np.ndarray, reason: str) -> messages.Aborted:
        """Discard the epoch and put the SVM back at the last committed checkpoint.
        Before any checkpoint committed there is none: the SVM stays paused, never run
        (the coordinator resumes it only from a committed one), and the next epoch's
        pages may go straight into it again."""
        self.svm_may_run = bool(self.committed_vcpu)
        if self.transit is not None and self.transit.epoch <= epoch:
            self.transit = None     # (the cache was never touched by the copy)
        if len(svm_dirty):
            self.domain.write_pages(svm_dirty, self.cache[svm_dirty])
        if self.committed_vcpu:
            self.domain.set_vcpu_state(self.committed_vcpu)
        if self.asm is not None and self.asm.epoch <= epoch:
            self.asm = None
        self.ctx.counters.add("epochs_aborted", 1)
        self.ctx.log.warning("epoch %d discarded: %s; the SVM stays at epoch %d", epoch, reason,
                             self.committed_epoch)
        return messages.Aborted(epoch, reason)


def run(ctx: StageContext, domain: Domain, rings: list[Ring], ctrl,
        staging: PageBuffer, check: str = "full", priority: StagePriority | None = None, *,
        pages_in: zmq.Socket, receive_ctx: StageContext, to_verify: list[Ring],
        direct: Ring | None = None, seal_keys=None) -> None:
    """``rings``: the verify workers' rings to this stage and ``direct``, the ring the
    receive side (this process) puts raw batches and END markers on. ``pages_in``: the
    pages channel, read here (``receive_ctx``: the receive counters and log; ``to_verify``:
    the rings to the verify workers; ``seal_keys``: security.mode = "sealed"). ``check``: pipeline.verify_pages, how many SVM pages
    are hashed again at apply. ``priority``: this stage's scheduling
    (common.StagePriority), followed by the pages channel's ZeroMQ I/O thread, which takes
    every record in; a proof checkpoint is applied at normal priority (its ACK waits for a
    hash of all of memory)."""
    r = Restore(ctx, domain, len(rings), staging.pages, check)
    receiver = Receiver(receive_ctx, to_verify, domain.page_count, domain.page_size,
                        lambda: r.done, staging, direct, check, priority, seal_keys,
                        r.unstaged)
    # up to here the stage maps staging and guest memory and populates its cache (all of
    # guest memory): a full sync's pages wait for it (benchmarks wait for this counter)
    ctx.counters.set("cache_populated", 1)
    c = ctx.counters
    wanted: messages.ApplyCmd | None = None     # the epoch to apply once assembled
    verdict: Verdict | None = None              # an assembled epoch not yet asked for
    replied = -1                                # the newest epoch answered (one reply each)
    # the pages channel, the rings and the commands; without the channel while the receive
    # side holds a record (no other is read meanwhile)
    reading, holding = zmq.Poller(), zmq.Poller()
    reading.register(pages_in, zmq.POLLIN)
    for fd in [ring.fileno() for ring in rings] + [ctrl.fileno()]:
        reading.register(fd, zmq.POLLIN)
        holding.register(fd, zmq.POLLIN)

    def settle() -> None:
        """Apply (or discard) the epoch asked for once it is assembled."""
        nonlocal wanted, verdict, replied
        if verdict is not None and verdict.epoch <= replied:
            verdict = None
        if wanted is not None and wanted.epoch <= replied:
            wanted = None
        if wanted is None or verdict is None or verdict.epoch != wanted.epoch:
            return
        cmd, v = wanted, verdict
        wanted = verdict = None
        if priority is not None and cmd.want_digest:
            priority.normal()
        trace.point("apply_start", cmd.epoch)
        # (while it is applied, a command can only be the coordinator's AbortCmd of it)
        reply = r.apply(cmd.epoch, cmd.svm_dirty, cmd.want_digest, v.at_ns, ctrl.send,
                        give_up=lambda: ctrl.poll(0)) \
            if v.ok else r.abort(cmd.epoch, cmd.svm_dirty, v.reason)
        trace.point("applied", cmd.epoch)
        replied = cmd.epoch
        r.finish(cmd.epoch)
        ctrl.send(reply)

    def assemble() -> None:
        """Every slot published on the rings to this stage, in each ring's order."""
        nonlocal verdict
        for ring in rings:
            while True:
                slot = ring.try_acquire_read()
                if slot is None:
                    break
                if priority is not None:
                    priority.working(slot.epoch)
                c.add("items_in", slot.count if slot.kind != SLOT_END else 0)
                trace.point("slot", slot.epoch)
                v = r.take_slot(slot)
                ring.release_read(slot)
                if v is not None:
                    verdict = v
                    settle()

    if priority is not None:
        priority.follow(io_threads())
    while not ctx.stopping():
        copying = r.transit is not None and r.transit.pending()
        if priority is not None:
            if copying:
                priority.background(r.transit.epoch)
            else:
                priority.waiting()
        held = receiver.held is not None
        ready = dict((holding if held else reading).poll(0 if copying else 200))
        t0 = time.perf_counter_ns()
        received = 0
        if copying and not ready:
            # nothing came: the next chunk of the SVM's pages (the epoch's records, batches
            # and commands go first, each waits for one chunk at most), then any digest or
            # verify worker waiting for this core at the same real-time priority
            r.copy_svm_step()
            os.sched_yield()
            c.add("busy_ns", time.perf_counter_ns() - t0)
            continue
        if pages_in in ready:
            frame = pages_in.recv(copy=False)
            t1 = time.perf_counter_ns()
            held = not receiver.take(frame.buffer)
            received += time.perf_counter_ns() - t1
        assemble()
        if ctrl.fileno() in ready:
            cmd = ctrl.recv()
            if priority is not None and hasattr(cmd, "epoch"):
                priority.working(cmd.epoch)
            if isinstance(cmd, messages.ApplyCmd):
                # the coordinator asks for e only after it had its answer for e - 1 (or
                # never took e - 1 up): nothing older will be applied
                r.finish(cmd.epoch - 1)
                wanted = cmd
                settle()
                if wanted is not None:
                    # its pages are still on their way: the SVM's pages meanwhile
                    r.start_svm_copy(cmd.epoch, cmd.svm_dirty, cmd.svm_nonzero)
            elif isinstance(cmd, messages.AbortCmd):
                # an epoch answered already (applied, or found torn here) keeps its reply
                if cmd.epoch > replied:
                    replied = cmd.epoch
                    if wanted is not None and wanted.epoch <= cmd.epoch:
                        wanted = None
                    if verdict is not None and verdict.epoch <= cmd.epoch:
                        verdict = None
                    reply = r.abort(*cmd)
                    r.finish(cmd.epoch)
                    ctrl.send(reply)
            else:
                raise ValueError(f"restore stage: unknown command {cmd!r}")
        if held:
            # offered again after whatever this turn did (a verify worker's batch taken, an
            # epoch answered or given up): what it waited for may be done
            t1 = time.perf_counter_ns()
            if receiver.retry():
                assemble()
            received += time.perf_counter_ns() - t1
        # (the receive side's time is in its own counters)
        c.add("busy_ns", time.perf_counter_ns() - t0 - received)
