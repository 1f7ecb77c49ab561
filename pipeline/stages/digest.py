"""Primary: a digest worker. Hashes (blake3) and compresses (lz4) batches of pages.

Per page, in order of cost: an all-zero page is sent as ZERO; a page whose blake3
equals the hash of what the secondary holds at that pfn (its last committed copy)
is sent as REF; otherwise the page is lz4-compressed, and sent RAW when lz4 does not
make it smaller. Encoded pages are packed back to back into the output slot's data,
so the send stage ships one contiguous run of bytes per batch.
"""
from __future__ import annotations

import time

import blake3
import lz4.block
import numpy as np

from pipeline import wire
from pipeline.ring import Ring
from pipeline.stages.common import (SLOT_END, HashTable, StageContext, copy_marker, read_slot,
                                    write_slot, zero_page_hash)


def encode_batch(src_pfns: np.ndarray, pages: np.ndarray, table: HashTable | None,
                 out_hashes: np.ndarray, out_len: np.ndarray, out_kind: np.ndarray,
                 out_data: np.ndarray) -> tuple[int, dict[int, int]]:
    """Encode ``pages`` (n, page_size) into the output arrays; returns (data bytes, kind counts)."""
    n, page_size = pages.shape
    nonzero = pages.view(np.uint64).reshape(n, -1).any(axis=1)
    zero_hash = np.frombuffer(zero_page_hash(page_size), np.uint8)
    for i in range(n):
        out_hashes[i] = np.frombuffer(blake3.blake3(pages[i]).digest(), np.uint8) \
            if nonzero[i] else zero_hash
    ref = table.matches(src_pfns, out_hashes[:n]) & nonzero if table is not None \
        else np.zeros(n, bool)
    off = 0
    counts = {wire.ENC_RAW: 0, wire.ENC_LZ4: 0, wire.ENC_ZERO: 0, wire.ENC_REF: 0}
    for i in range(n):
        if not nonzero[i]:
            kind, length = wire.ENC_ZERO, 0
        elif ref[i]:
            kind, length = wire.ENC_REF, 0
        else:
            packed = lz4.block.compress(pages[i], store_size=False)
            if len(packed) < page_size:
                kind, length = wire.ENC_LZ4, len(packed)
                out_data[off:off + length] = np.frombuffer(packed, np.uint8)
            else:
                kind, length = wire.ENC_RAW, page_size
                out_data[off:off + length] = pages[i]
        out_kind[i], out_len[i] = kind, length
        off += length
        counts[kind] += 1
    return off, counts


def run(ctx: StageContext, ring_in: Ring, ring_out: Ring, table: HashTable) -> None:
    c = ctx.counters
    while True:
        slot = read_slot(ctx, ring_in)
        if slot is None:
            return
        out = write_slot(ctx, ring_out)
        if out is None:
            return
        t0 = time.perf_counter_ns()
        if slot.kind == SLOT_END:
            copy_marker(slot, out)
        else:
            n = slot.count
            out.pfns[:n] = slot.pfns[:n]
            nbytes, counts = encode_batch(slot.pfns[:n], slot.data[:n], table, out.hashes,
                                          out.enc_len, out.enc_kind, out.data_flat)
            out.kind, out.epoch, out.count, out.flags = slot.kind, slot.epoch, n, slot.flags
            out.aux_len, out.seq = nbytes, 0
            c.add("items_in", n)
            c.add("bytes_in", n * slot.data.shape[1])
            c.add("items_out", n)
            c.add("bytes_out", nbytes)
            c.add("pages_zero", counts[wire.ENC_ZERO])
            c.add("pages_ref", counts[wire.ENC_REF])
            c.add("pages_lz4", counts[wire.ENC_LZ4])
            c.add("pages_raw", counts[wire.ENC_RAW])
        ring_in.release_read(slot)
        ring_out.commit_write(out)
        c.add("busy_ns", time.perf_counter_ns() - t0)
        c.max("ring_high_water", ring_out.high_water)
