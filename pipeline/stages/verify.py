"""Secondary: a verify worker. Decodes every page of a batch (lz4 → page, RAW as is,
ZERO → zeros) straight into its place in the staging area (``slot.row``, given by the
receive stage) and checks its blake3 against the hash the primary sent. A batch with a
page that fails is marked BAD (and counted); the restore stage then discards its epoch.
REF pages are checked by the restore stage, which holds the committed hashes. What goes
on to the restore stage is the batch's metadata only.
"""
from __future__ import annotations

import blake3
import lz4.block
import numpy as np

from pipeline import wire
from pipeline.ring import Ring, Slot
from pipeline.stages.common import MARK_BAD, StageContext, worker_loop, zero_page_hash


def decode_batch(src: Slot, out: np.ndarray, page_size: int) -> str:
    """Decode and verify ``src`` into the rows of ``out``; returns '' or why it is bad."""
    n = src.count
    kinds, lens = src.enc_kind[:n], src.enc_len[:n]
    if src.batch_flags & wire.PAGES_PACKED:
        return _decode_packed(src, out, page_size)
    offsets = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    for i in range(n):
        kind, off, ln = kinds[i], offsets[i], lens[i]
        if kind == wire.ENC_ZERO:
            out[i] = 0
        elif kind == wire.ENC_RAW:
            out[i] = src.data_flat[off:off + ln]
        elif kind == wire.ENC_LZ4:
            try:
                page = lz4.block.decompress(src.data_flat[off:off + ln],
                                            uncompressed_size=page_size)
            except lz4.block.LZ4BlockError as exc:
                return f"pfn {src.pfns[i]}: lz4 data does not decode ({exc})"
            if len(page) != page_size:
                return f"pfn {src.pfns[i]}: lz4 data decodes to {len(page)} bytes"
            out[i] = np.frombuffer(page, np.uint8)
    return _check_hashes(src, out, kinds, page_size)


def _decode_packed(src: Slot, out: np.ndarray, page_size: int) -> str:
    """A PACKED batch: one lz4 block holding all RAW pages back to back."""
    n = src.count
    kinds = src.enc_kind[:n]
    carry = np.flatnonzero(kinds == wire.ENC_RAW)
    size = len(carry) * page_size
    try:
        block = lz4.block.decompress(src.data_flat[:src.data_len], uncompressed_size=size)
    except lz4.block.LZ4BlockError as exc:
        return f"pfns {src.pfns[carry[0]]}..: packed lz4 data does not decode ({exc})"
    if len(block) != size:
        return f"pfns {src.pfns[carry[0]]}..: packed data decodes to {len(block)} bytes, not {size}"
    pages = np.frombuffer(block, np.uint8).reshape(len(carry), page_size)
    if len(carry) == n:
        out[:n] = pages
    else:
        out[carry] = pages
    out[kinds == wire.ENC_ZERO] = 0
    return _check_hashes(src, out, kinds, page_size)


def _check_hashes(src: Slot, out: np.ndarray, kinds: np.ndarray, page_size: int) -> str:
    zero_hash = zero_page_hash(page_size)
    for i in range(src.count):
        if kinds[i] == wire.ENC_REF:
            continue
        expect = src.hashes[i].tobytes()
        if kinds[i] == wire.ENC_ZERO:
            if expect != zero_hash:
                return f"pfn {src.pfns[i]}: ZERO page sent with a non-zero hash"
        elif blake3.blake3(out[i]).digest() != expect:
            return f"pfn {src.pfns[i]}: blake3 mismatch"
    return ""


def run(ctx: StageContext, ring_in: Ring, ring_out: Ring, staging: np.ndarray) -> None:
    page_size = staging.shape[1]
    c = ctx.counters

    def process(slot, out) -> None:
        n = slot.count
        problem = decode_batch(slot, staging[slot.row:slot.row + n], page_size)
        out.reset(slot.kind, slot.epoch, n)
        out.pfns[:n], out.hashes[:n], out.enc_kind[:n] = (slot.pfns[:n], slot.hashes[:n],
                                                          slot.enc_kind[:n])
        out.enc_len[:n] = slot.enc_len[:n]
        out.row, out.batch_flags = slot.row, slot.batch_flags
        out.marks = MARK_BAD if problem else 0
        if problem:
            c.add("errors", 1)
            ctx.log.warning("epoch %d: bad page batch: %s", slot.epoch, problem)
        c.add("items_in", n)
        c.add("items_out", n)
        c.add("bytes_in", int(slot.enc_len[:n].sum()))
        c.add("bytes_out", n * page_size)

    worker_loop(ctx, ring_in, ring_out, process)
