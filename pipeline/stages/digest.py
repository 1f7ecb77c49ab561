"""Primary: a digest worker. Hashes (blake3) and compresses (lz4) batches of pages.

Per page, in order of cost: an all-zero page is sent as ZERO; a page whose blake3
equals the hash of what the secondary holds at that pfn (its last committed copy)
is sent as REF; a page whose blake3 equals the SVM's own page at that pfn (the hashes
the secondary sent with SVM_DIRTY) is sent as SVM; the other pages carry data, and all
of a batch's go as ONE lz4 block (PACKED) when that is smaller and compression is on
(pipeline.compress), else raw back to back. One block per batch instead of
one per page lets lz4 find repeats across pages (text-like pages: 0.28 of raw instead
of 0.43) and costs one call instead of dozens.

The pages of a full sync or pre-copy round (wire.FLAG_SYNC) are not hashed unless the
secondary is to check every page (``hash_sync``, pipeline.verify_pages = "full"): hashing
was two thirds of this worker's CPU per page there (1.16 of 1.5 us), on the sync's
critical path, and the hashes serve only later REF pages. Their records go UNHASHED:
zero bytes for the hash of a data page, which no blake3 equals, so such a page is sent
with its content (or as SVM) the next time it is dirty, and carries a hash from then on.

With security.mode = "sealed" this worker also seals each batch's hashes and data for the
wire (:func:`seal_batch`, pipeline/seal.py): the pages are encoded into a buffer of its
own, then sealed into the slot, so sealing costs no copy of its own.
"""
from __future__ import annotations

import os
import select
import time
from collections import deque

import lz4.block
import numpy as np

from pipeline import faults, seal, trace, wire
from pipeline.ring import Ring, Slot
from pipeline.stages.common import (MARK_BUFFERED, MARK_LZ4, POLL_S, SLOT_END, HashTable,
                                    PageBuffer, StageContext, StagePriority, SvmPages, copy_marker,
                                    hash_pages, read_slot, write_slot, zero_page_hash)


def encode_batch(src_pfns: np.ndarray, pages: np.ndarray, table: HashTable | None,
                 out_hashes: np.ndarray, out_len: np.ndarray, out_kind: np.ndarray,
                 out_data: np.ndarray, compress: bool = True,
                 lz4_stats: list[int] | None = None, svm: SvmPages | None = None,
                 epoch: int = 0) -> tuple[int, bool, dict[int, int]]:
    """Encode ``pages`` (n, page_size) into the output arrays: :func:`hash_batch`, then
    :func:`encode_hashed`. Returns (bytes of data, packed, pages per kind)."""
    nonzero = hash_batch(pages, out_hashes)
    return encode_hashed(src_pfns, pages, nonzero, table, out_hashes, out_len, out_kind,
                         out_data, compress, lz4_stats, svm, epoch)


def hash_batch(pages: np.ndarray, out_hashes: np.ndarray, hash_data: bool = True) -> np.ndarray:
    """blake3 of every page of ``pages`` (n, page_size) into ``out_hashes``; returns which
    pages are not all zero (a zero page gets the zero page's hash without hashing).
    Without ``hash_data`` the pages that are not zero get zero bytes (UNHASHED)."""
    n, page_size = pages.shape
    nonzero = nonzero_pages(pages)
    nz = np.flatnonzero(nonzero)
    out_hashes[:n] = np.frombuffer(zero_page_hash(page_size), np.uint8)
    if not hash_data:
        out_hashes[nz] = 0
    elif len(nz) == n:
        out_hashes[:n] = hash_pages(pages)
    elif len(nz):
        out_hashes[nz] = hash_pages(pages, nz)
    return nonzero


def nonzero_pages(pages: np.ndarray) -> np.ndarray:
    """Which rows of ``pages`` (n, page_size) are not all zero. A page whose first word is
    not zero is not read further (most pages that carry data); only the others are read
    whole (152 against 288 ns a page on the sim guest's mix, one core)."""
    words = pages.view(np.uint64).reshape(len(pages), -1)
    nonzero = words[:, 0] != 0
    maybe = np.flatnonzero(~nonzero)
    if len(maybe):
        nonzero[maybe] = words[maybe].any(axis=1)
    return nonzero


def encode_hashed(src_pfns: np.ndarray, pages: np.ndarray, nonzero: np.ndarray,
                  table: HashTable | None, out_hashes: np.ndarray, out_len: np.ndarray,
                  out_kind: np.ndarray, out_data: np.ndarray, compress: bool = True,
                  lz4_stats: list[int] | None = None, svm: SvmPages | None = None,
                  epoch: int = 0) -> tuple[int, bool, dict[int, int]]:
    """Encode hashed ``pages`` (:func:`hash_batch`) into the output arrays.

    Returns (bytes of data, packed, pages per kind). Pages that carry data are sent as
    one lz4 block of all of them (``packed``) when that is smaller, else raw.
    A fixed number of numpy calls per batch.
    ``lz4_stats``, if given, gets [ns in lz4, bytes in, bytes out] added (the auto
    compression policy judges the compressor by them). ``svm``: the SVM's hashes of its
    dirty pages for ``epoch``: a page the SVM holds alike goes as SVM, with no data."""
    n, page_size = pages.shape
    nz_count = int(nonzero.sum())
    ref = table.matches(src_pfns, out_hashes[:n]) & nonzero if table is not None \
        else np.zeros(n, bool)
    carry = nonzero & ~ref
    same = carry & svm.same(epoch, src_pfns, out_hashes[:n]) if svm is not None \
        else np.zeros(n, bool)
    carry &= ~same
    out_kind[:n] = np.where(carry, wire.ENC_RAW, np.where(
        ref, wire.ENC_REF, np.where(same, wire.ENC_SVM, wire.ENC_ZERO)))
    out_len[:n] = np.where(carry, page_size, 0)
    k = int(carry.sum())
    counts = {wire.ENC_RAW: k, wire.ENC_ZERO: n - nz_count, wire.ENC_REF: int(ref.sum()),
              wire.ENC_SVM: int(same.sum())}
    if not k:
        return 0, False, counts
    if not compress:
        # the pages that carry data straight into the record, one copy (a gather into a
        # block and a copy of the block cost 670 against 390 ns a page with the zero check)
        if k == n:
            out_data[:pages.nbytes] = pages.reshape(-1)
        else:
            np.take(pages, np.flatnonzero(carry), axis=0, mode="clip",
                    out=out_data[:k * page_size].reshape(k, page_size))
        return k * page_size, False, counts
    block = pages if k == n else pages[carry]
    t0 = time.perf_counter_ns()
    packed = lz4.block.compress(block, store_size=False)
    if lz4_stats is not None:
        lz4_stats[0] += time.perf_counter_ns() - t0
        lz4_stats[1] += block.nbytes
        lz4_stats[2] += len(packed)
    if len(packed) < block.nbytes:
        out_data[:len(packed)] = np.frombuffer(packed, np.uint8)
        return len(packed), True, counts
    out_data[:block.nbytes] = block.reshape(-1)
    return block.nbytes, False, counts


def seal_batch(sealer: seal.Sealer, out: Slot, n: int, data: np.ndarray,
               aad: np.ndarray) -> int:
    """Seal the encoded batch in ``out`` for the wire: its hashes and ``data`` (its encoded
    pages, laid out of the slot) go sealed into the slot's data, the record's fields bound
    to them (wire.pages_aad). Returns the slot's new data length."""
    out.batch_flags |= wire.PAGES_SEALED
    prefix = wire.pages_aad(aad, out.epoch, out.pfns[:n], out.hashes[:n], out.enc_len[:n],
                            out.enc_kind[:n], len(data) + wire.sealed_pages_extra(n),
                            out.batch_flags)
    return sealer.seal(out.epoch, prefix, [out.hashes[:n], data], out.data_flat)


def run(ctx: StageContext, ring_in: Ring, ring_out: Ring, table: HashTable,
        snapbuf: PageBuffer, compress: str = "lz4", decision=None,
        svm: SvmPages | None = None, worker: int = 0, hash_sync: bool = True,
        priority: StagePriority | None = None, seal_keys: seal.SealKeys | None = None) -> None:
    """``compress``: "lz4", "none", or "auto": then the shared word ``decision`` (set by
    the send stage, pipeline/compress_policy.py) says, batch by batch.
    ``svm``: a checkpoint's batches (from the snapshot buffer) wait for the SVM's hashes
    of its dirty pages (SVM_DIRTY, published by the coordinator); other batches use them
    if they are there.

    The pages are hashed first and the wait comes after: while the secondary hashes the
    SVM's pages, this worker hashes the PVM's, up to ``hold`` batches ahead, and only the
    classification (ZERO/REF/SVM/data) and compression wait (they were all behind the
    wait before, the PVM's hashing added to the secondary's on the commit's path).
    ``hash_sync``: hash the pages of a full sync or pre-copy round too (else UNHASHED).
    ``priority``: this stage's scheduling (common.StagePriority). ``seal_keys``
    (security.mode = "sealed"): every batch goes sealed (:func:`seal_batch`)."""
    c = ctx.counters
    lz4_stats = [0, 0, 0]
    sealer = plain = aad = None
    if seal_keys is not None:
        sealer = seal.Sealer(seal_keys, worker)
        plain = np.empty(ring_out.layout.data_size, np.uint8)   # a batch encoded, unsealed
        aad = np.empty(wire.pages_prefix_size(ring_out.layout.batch_pages), np.uint8)
    stage = ctx.name.split(".")[0]
    wake = svm.wake[worker] if svm is not None else -1
    # (input slot, output slot, its non-zero pages; None for an END marker): hashed,
    # waiting for the SVM's hashes of their epoch; output slots are committed in order
    held: deque[tuple[Slot, Slot, np.ndarray | None]] = deque()
    hold = max(1, min(ring_in.slots, ring_out.slots) // 2)

    def pages_of(slot: Slot) -> np.ndarray:
        n = slot.count
        return snapbuf.pages[slot.row:slot.row + n] if slot.marks & MARK_BUFFERED \
            else slot.data[:n]

    def waits(item) -> bool:
        slot, _, nonzero = item
        return (nonzero is not None and svm is not None and bool(slot.marks & MARK_BUFFERED)
                and not svm.covers(slot.epoch, int(slot.pfns[:slot.count].max())))

    def take(slot: Slot) -> bool:
        """Hash a new input slot into a fresh output slot and hold it."""
        if faults.ACTIVE:
            faults.point(f"stage.{stage}.loop")
        out = write_slot(ctx, ring_out)
        if out is None:
            return False
        if priority is not None:
            priority.working(slot.epoch)
        trace.point("taken", slot.epoch)
        t0 = time.perf_counter_ns()
        nonzero = None
        if slot.kind != SLOT_END:
            n = slot.count
            out.reset(slot.kind, slot.epoch, n)
            out.pfns[:n] = slot.pfns[:n]
            unhashed = not hash_sync and bool(slot.epoch_flags & wire.FLAG_SYNC)
            out.batch_flags = wire.PAGES_UNHASHED if unhashed else 0
            nonzero = hash_batch(pages_of(slot), out.hashes, not unhashed)
            if unhashed:
                c.add("pages_unhashed", int(nonzero.sum()))
        held.append((slot, out, nonzero))
        trace.point("hashed", slot.epoch)
        c.add("busy_ns", time.perf_counter_ns() - t0)
        return True

    def finish(slot: Slot, out: Slot, nonzero: np.ndarray | None) -> None:
        t0 = time.perf_counter_ns()
        if nonzero is None:
            copy_marker(slot, out)
        else:
            encode(slot, out, nonzero)
        ring_in.release_read(slot)
        ring_out.commit_write(out)
        trace.point("encoded", out.epoch)
        c.add("busy_ns", time.perf_counter_ns() - t0)
        c.max("ring_high_water", ring_out.high_water)

    def encode(slot: Slot, out: Slot, nonzero: np.ndarray) -> None:
        n = slot.count
        pages = pages_of(slot)
        on = compress == "lz4" or (compress == "auto" and bool(decision.value))
        lz4_stats[:] = (0, 0, 0)
        # the SVM's hashes of this epoch as far as they came (every pfn of a batch that
        # waited; an SVM page is one whose hash came for this epoch: SvmPages.same)
        sv = svm
        if sv is not None and slot.marks & MARK_BUFFERED and sv.ready.value < slot.epoch:
            c.add("svm_early_batches", 1)      # on a part of SVM_DIRTY, the rest to come
        unhashed = out.batch_flags & wire.PAGES_UNHASHED
        nbytes, packed, counts = encode_hashed(slot.pfns[:n], pages, nonzero,
                                               None if unhashed else table,
                                               out.hashes, out.enc_len, out.enc_kind,
                                               out.data_flat if sealer is None else plain,
                                               on, lz4_stats,
                                               None if unhashed else sv, slot.epoch)
        if lz4_stats[1]:
            c.add("lz4_ns", lz4_stats[0])
            c.add("lz4_bytes_in", lz4_stats[1])
            c.add("lz4_bytes_out", lz4_stats[2])
        out.batch_flags = unhashed | (wire.PAGES_PACKED if packed else 0)
        out.marks = MARK_LZ4 if on else 0
        out.data_len = nbytes
        if sealer is not None:
            t0 = time.perf_counter_ns()
            out.data_len = seal_batch(sealer, out, n, plain[:nbytes], aad)
            c.add("seal_ns", time.perf_counter_ns() - t0)
        c.add("items_in", n)
        c.add("bytes_in", n * pages.shape[1])
        c.add("items_out", n)
        c.add("bytes_out", nbytes)
        c.add("pages_zero", counts[wire.ENC_ZERO])
        c.add("pages_ref", counts[wire.ENC_REF])
        c.add("pages_same_as_svm", counts[wire.ENC_SVM])
        c.add("pages_packed" if packed else "pages_raw", counts[wire.ENC_RAW])

    while True:
        while held and not waits(held[0]):
            finish(*held.popleft())
        if not held:
            if priority is not None:
                priority.waiting()
            slot = read_slot(ctx, ring_in)
            if slot is None or not take(slot):
                return
            continue
        # the oldest batch waits for the SVM's hashes: hash what else came meanwhile
        if len(held) < hold:
            slot = ring_in.try_acquire_read()
            if slot is not None:
                if not take(slot):
                    return
                continue
        t0 = time.perf_counter_ns()
        fds = [wake, ring_in.fileno()] if len(held) < hold else [wake]
        readable = select.select(fds, [], [], POLL_S)[0]
        c.add("svm_wait_ns", time.perf_counter_ns() - t0)
        if wake in readable:
            try:
                os.eventfd_read(wake)
            except BlockingIOError:
                pass
        if not readable and ctx.stopping():
            return
