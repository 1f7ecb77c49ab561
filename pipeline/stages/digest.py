"""Primary: a digest worker. Hashes (blake3) and compresses (lz4) batches of pages.

Per page, in order of cost: an all-zero page is sent as ZERO; a page whose blake3
equals the hash of what the secondary holds at that pfn (its last committed copy)
is sent as REF; the other pages carry data, and all of a batch's go as ONE lz4 block
(PACKED) when that is smaller, else raw back to back. One block per batch instead of
one per page lets lz4 find repeats across pages (text-like pages: 0.28 of raw instead
of 0.43) and costs one call instead of dozens.
"""
from __future__ import annotations


import blake3
import lz4.block
import numpy as np

from pipeline import wire
from pipeline.ring import Ring
from pipeline.stages.common import (MARK_BUFFERED, HashTable, PageBuffer, StageContext,
                                    worker_loop, zero_page_hash)


def encode_batch(src_pfns: np.ndarray, pages: np.ndarray, table: HashTable | None,
                 out_hashes: np.ndarray, out_len: np.ndarray, out_kind: np.ndarray,
                 out_data: np.ndarray, compress: bool = True) -> tuple[int, bool, dict[int, int]]:
    """Encode ``pages`` (n, page_size) into the output arrays.

    Returns (bytes of data, packed, pages per kind). Pages that carry data are sent as
    one lz4 block of all of them (``packed``) when that is smaller, else raw."""
    n, page_size = pages.shape
    nonzero = pages.view(np.uint64).reshape(n, -1).any(axis=1)
    zero_hash = np.frombuffer(zero_page_hash(page_size), np.uint8)
    for i in range(n):
        out_hashes[i] = np.frombuffer(blake3.blake3(pages[i]).digest(), np.uint8) \
            if nonzero[i] else zero_hash
    ref = table.matches(src_pfns, out_hashes[:n]) & nonzero if table is not None \
        else np.zeros(n, bool)
    carry = nonzero & ~ref
    out_kind[:n] = np.where(carry, wire.ENC_RAW, np.where(ref, wire.ENC_REF, wire.ENC_ZERO))
    out_len[:n] = np.where(carry, page_size, 0)
    k = int(carry.sum())
    counts = {wire.ENC_RAW: k, wire.ENC_ZERO: int((~nonzero).sum()), wire.ENC_REF: int(ref.sum())}
    if not k:
        return 0, False, counts
    block = pages if k == n else pages[carry]
    packed = lz4.block.compress(block, store_size=False) if compress else b""
    if packed and len(packed) < block.nbytes:
        out_data[:len(packed)] = np.frombuffer(packed, np.uint8)
        return len(packed), True, counts
    out_data[:block.nbytes] = block.reshape(-1)
    return block.nbytes, False, counts


def run(ctx: StageContext, ring_in: Ring, ring_out: Ring, table: HashTable,
        snapbuf: PageBuffer, compress: bool = True) -> None:
    c = ctx.counters

    def process(slot, out) -> None:
        n = slot.count
        out.reset(slot.kind, slot.epoch, n)
        out.pfns[:n] = slot.pfns[:n]
        pages = snapbuf.pages[slot.row:slot.row + n] if slot.marks & MARK_BUFFERED \
            else slot.data[:n]
        nbytes, packed, counts = encode_batch(slot.pfns[:n], pages, table, out.hashes,
                                              out.enc_len, out.enc_kind, out.data_flat,
                                              compress)
        out.batch_flags = wire.PAGES_PACKED if packed else 0
        out.data_len = nbytes
        c.add("items_in", n)
        c.add("bytes_in", n * pages.shape[1])
        c.add("items_out", n)
        c.add("bytes_out", nbytes)
        c.add("pages_zero", counts[wire.ENC_ZERO])
        c.add("pages_ref", counts[wire.ENC_REF])
        c.add("pages_packed" if packed else "pages_raw", counts[wire.ENC_RAW])

    worker_loop(ctx, ring_in, ring_out, process)
