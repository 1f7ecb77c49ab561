"""Primary: a digest worker. Hashes (blake3) and compresses (lz4) batches of pages.

Per page, in order of cost: an all-zero page is sent as ZERO; a page whose blake3
equals the hash of what the secondary holds at that pfn (its last committed copy)
is sent as REF; a page whose blake3 equals the SVM's own page at that pfn (the hashes
the secondary sent with SVM_DIRTY) is sent as SVM; the other pages carry data, and all
of a batch's go as ONE lz4 block (PACKED) when that is smaller and compression is on
(pipeline.compress), else raw back to back. One block per batch instead of
one per page lets lz4 find repeats across pages (text-like pages: 0.28 of raw instead
of 0.43) and costs one call instead of dozens.
"""
from __future__ import annotations

import time

import lz4.block
import numpy as np

from pipeline import wire
from pipeline.ring import Ring
from pipeline.stages.common import (MARK_BUFFERED, MARK_LZ4, HashTable, PageBuffer, StageContext,
                                    SvmPages, hash_pages, worker_loop, zero_page_hash)


def encode_batch(src_pfns: np.ndarray, pages: np.ndarray, table: HashTable | None,
                 out_hashes: np.ndarray, out_len: np.ndarray, out_kind: np.ndarray,
                 out_data: np.ndarray, compress: bool = True,
                 lz4_stats: list[int] | None = None, svm: SvmPages | None = None,
                 epoch: int = 0) -> tuple[int, bool, dict[int, int]]:
    """Encode ``pages`` (n, page_size) into the output arrays.

    Returns (bytes of data, packed, pages per kind). Pages that carry data are sent as
    one lz4 block of all of them (``packed``) when that is smaller, else raw.
    A fixed number of numpy calls per batch; per page only the blake3 call (hash_pages).
    ``lz4_stats``, if given, gets [ns in lz4, bytes in, bytes out] added (the auto
    compression policy judges the compressor by them). ``svm``: the SVM's hashes of its
    dirty pages for ``epoch``: a page the SVM holds alike goes as SVM, with no data."""
    n, page_size = pages.shape
    nonzero = pages.view(np.uint64).reshape(n, -1).any(axis=1)
    nz = np.flatnonzero(nonzero)
    out_hashes[:n] = np.frombuffer(zero_page_hash(page_size), np.uint8)
    if len(nz) == n:
        out_hashes[:n] = hash_pages(pages)
    elif len(nz):
        out_hashes[nz] = hash_pages(pages, nz)
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
    counts = {wire.ENC_RAW: k, wire.ENC_ZERO: n - len(nz), wire.ENC_REF: int(ref.sum()),
              wire.ENC_SVM: int(same.sum())}
    if not k:
        return 0, False, counts
    block = pages if k == n else pages[carry]
    if compress:
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


def run(ctx: StageContext, ring_in: Ring, ring_out: Ring, table: HashTable,
        snapbuf: PageBuffer, compress: str = "lz4", decision=None,
        svm: SvmPages | None = None, worker: int = 0) -> None:
    """``compress``: "lz4", "none", or "auto": then the shared word ``decision`` (set by
    the send stage, pipeline/compress_policy.py) says, batch by batch.
    ``svm``: a checkpoint's batches (from the snapshot buffer) wait for the SVM's hashes
    of its dirty pages (SVM_DIRTY, published by the coordinator); other batches use them
    if they are there."""
    c = ctx.counters
    lz4_stats = [0, 0, 0]

    def svm_for(epoch: int, buffered: bool) -> SvmPages | None:
        if svm is None:
            return None
        if buffered and svm.ready.value < epoch:
            t0 = time.perf_counter_ns()
            ok = svm.wait(epoch, worker, ctx.stopping)
            c.add("svm_wait_ns", time.perf_counter_ns() - t0)
            return svm if ok else None
        return svm if svm.ready.value >= epoch else None

    def process(slot, out) -> None:
        n = slot.count
        out.reset(slot.kind, slot.epoch, n)
        out.pfns[:n] = slot.pfns[:n]
        pages = snapbuf.pages[slot.row:slot.row + n] if slot.marks & MARK_BUFFERED \
            else slot.data[:n]
        on = compress == "lz4" or (compress == "auto" and bool(decision.value))
        lz4_stats[:] = (0, 0, 0)
        nbytes, packed, counts = encode_batch(slot.pfns[:n], pages, table, out.hashes,
                                              out.enc_len, out.enc_kind, out.data_flat,
                                              on, lz4_stats,
                                              svm_for(slot.epoch,
                                                      bool(slot.marks & MARK_BUFFERED)),
                                              slot.epoch)
        if lz4_stats[1]:
            c.add("lz4_ns", lz4_stats[0])
            c.add("lz4_bytes_in", lz4_stats[1])
            c.add("lz4_bytes_out", lz4_stats[2])
        out.batch_flags = wire.PAGES_PACKED if packed else 0
        out.marks = MARK_LZ4 if on else 0
        out.data_len = nbytes
        c.add("items_in", n)
        c.add("bytes_in", n * pages.shape[1])
        c.add("items_out", n)
        c.add("bytes_out", nbytes)
        c.add("pages_zero", counts[wire.ENC_ZERO])
        c.add("pages_ref", counts[wire.ENC_REF])
        c.add("pages_same_as_svm", counts[wire.ENC_SVM])
        c.add("pages_packed" if packed else "pages_raw", counts[wire.ENC_RAW])

    worker_loop(ctx, ring_in, ring_out, process)
