"""Secondary: a verify worker. Decodes every page of a batch (lz4 → page, RAW as is,
ZERO → zeros) and checks its blake3 against the hash the primary sent. A batch with a
page that fails is marked BAD (and counted); the restore stage then discards its epoch.
REF pages are checked by the restore stage, which holds the committed hashes.
"""
from __future__ import annotations

import time

import blake3
import lz4.block
import numpy as np

from pipeline import wire
from pipeline.ring import Ring, Slot
from pipeline.stages.common import (SLOT_BAD, SLOT_END, StageContext, copy_marker, read_slot,
                                    write_slot, zero_page_hash)


def decode_batch(src: Slot, out: Slot, page_size: int) -> str:
    """Decode and verify ``src`` into ``out``; returns '' or why the batch is bad."""
    n = src.count
    kinds, lens = src.enc_kind[:n], src.enc_len[:n]
    offsets = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    zero_hash = np.frombuffer(zero_page_hash(page_size), np.uint8)
    problem = ""
    for i in range(n):
        kind, off, ln = kinds[i], offsets[i], lens[i]
        if kind == wire.ENC_REF:
            continue
        if kind == wire.ENC_ZERO:
            out.data[i] = 0
            if not np.array_equal(src.hashes[i], zero_hash):
                problem = problem or f"pfn {src.pfns[i]}: ZERO page sent with a non-zero hash"
            continue
        if kind == wire.ENC_RAW:
            out.data[i] = src.data_flat[off:off + ln]
        else:
            try:
                page = lz4.block.decompress(src.data_flat[off:off + ln], uncompressed_size=page_size)
            except lz4.block.LZ4BlockError as exc:
                problem = problem or f"pfn {src.pfns[i]}: lz4 data does not decode ({exc})"
                continue
            if len(page) != page_size:
                problem = problem or f"pfn {src.pfns[i]}: lz4 data decodes to {len(page)} bytes"
                continue
            out.data[i] = np.frombuffer(page, np.uint8)
        if blake3.blake3(out.data[i]).digest() != src.hashes[i].tobytes():
            problem = problem or f"pfn {src.pfns[i]}: blake3 mismatch"
    return problem


def run(ctx: StageContext, ring_in: Ring, ring_out: Ring, page_size: int) -> None:
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
            problem = decode_batch(slot, out, page_size)
            out.pfns[:n], out.hashes[:n], out.enc_kind[:n] = (slot.pfns[:n], slot.hashes[:n],
                                                              slot.enc_kind[:n])
            out.enc_len[:n] = slot.enc_len[:n]
            out.kind, out.epoch, out.count, out.seq = slot.kind, slot.epoch, n, 0
            out.flags, out.aux_len = slot.flags | (SLOT_BAD if problem else 0), 0
            if problem:
                c.add("errors", 1)
                ctx.log.warning("epoch %d: bad page batch: %s", slot.epoch, problem)
            c.add("items_in", n)
            c.add("items_out", n)
            c.add("bytes_in", int(slot.enc_len[:n].sum()))
            c.add("bytes_out", n * page_size)
        ring_in.release_read(slot)
        ring_out.commit_write(out)
        c.add("busy_ns", time.perf_counter_ns() - t0)
        c.max("ring_high_water", ring_out.high_water)
