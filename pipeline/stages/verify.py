"""Secondary: a verify worker. Decodes every page of a batch (lz4 → page, RAW as is,
ZERO → zeros) straight into its place in the staging area (``slot.row``, given by the
receive stage) and checks its blake3 against the hash the primary sent (all pages, one
per batch, or none: ``pipeline.verify_pages``). A batch with a page that fails is marked
BAD (and counted); the restore stage then discards its epoch.
REF pages are checked by the restore stage, which holds the committed hashes. What goes
on to the restore stage is the batch's metadata only.

A sealed batch (security.mode = "sealed", pipeline/seal.py) is opened first
(:func:`open_batch`): its hashes into the slot, its data straight into staging when it
is all raw pages, else into a buffer of this worker's, decoded from there. One whose seal
does not open is BAD (counted: ``seal_refused``), like a page that fails its hash.
"""
from __future__ import annotations

import time

import lz4.block
import numpy as np

from pipeline import faults, seal, wire
from pipeline.ring import Ring, Slot
from pipeline.stages.common import (MARK_BAD, MARK_STAGED, PageBuffer, StageContext,
                                    StagePriority, hash_pages, worker_loop, zero_page_hash)


CHECKS = ("full", "sample", "off")
_sampler = np.random.default_rng()


def open_batch(opener: seal.Opener, src: Slot, out: np.ndarray, scratch: np.ndarray,
               aad: np.ndarray, page_size: int) -> np.ndarray | None:
    """Open the sealed batch ``src``: its hashes into ``src.hashes``, its encoded data into
    the rows ``out`` when it is all raw pages (returns None: nothing left to decode), else
    into ``scratch`` (returns that data). Raises seal.SealError naming the record."""
    n = src.count
    plain = src.data_len - wire.sealed_pages_extra(n)
    direct = not src.batch_flags & wire.PAGES_PACKED and plain == n * page_size
    data = out[:n].reshape(-1) if direct else scratch[:plain]
    prefix = wire.pages_aad(aad, src.epoch, src.pfns[:n], src.hashes[:n], src.enc_len[:n],
                            src.enc_kind[:n], src.data_len, src.batch_flags)
    opener.open(prefix, src.data_flat[:src.data_len], [src.hashes[:n], data],
                f"PAGES of epoch {src.epoch} (pfns {int(src.pfns[0])}..{int(src.pfns[n - 1])})")
    return None if direct else data


def decode_batch(src: Slot, out: np.ndarray, page_size: int, check: str = "full",
                 data: np.ndarray | None = None, staged: bool = False) -> str:
    """Decode and verify ``src`` into the rows of ``out``; returns '' or why it is bad.

    ``check``: which data pages are re-hashed and compared with the hash the primary sent:
    all of them, one in 64 chosen at random, or none (CURVE or the seal already
    authenticates every message; the periodic memory proof, checkpoint.verify_every, still
    compares all of memory). ZERO pages' hashes are always checked (no hashing needed).
    ``data``: the encoded pages (a sealed batch's, opened: open_batch), else the slot's;
    ``staged``: the pages are in ``out`` already (opened there)."""
    n = src.count
    kinds, lens = src.enc_kind[:n], src.enc_len[:n]
    if data is None:
        data = src.data_flat[:src.data_len]
    if staged or src.marks & MARK_STAGED:
        problem = ""            # the receive stage (or the seal) put the raw pages in place
    elif src.batch_flags & wire.PAGES_PACKED:
        problem = _decode_packed(src, out, page_size, data)
    else:
        problem = _decode_plain(src, out, kinds, lens, page_size, data)
    return problem or check_hashes(src, out, kinds, page_size, check)


def _decode_plain(src: Slot, out: np.ndarray, kinds: np.ndarray, lens: np.ndarray,
                  page_size: int, data: np.ndarray) -> str:
    """RAW pages back to back (one copy for all of them); LZ4 pages one call each."""
    n = src.count
    out[kinds == wire.ENC_ZERO] = 0
    lz = np.flatnonzero(kinds == wire.ENC_LZ4)
    raw = kinds == wire.ENC_RAW
    if not len(lz):
        k = int(raw.sum())
        if k:
            pages = data[:k * page_size].reshape(k, page_size)
            if k == n:
                out[:n] = pages
            else:
                out[np.flatnonzero(raw)] = pages     # (by index: 3x a boolean mask)
        return ""
    offsets = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    for i in np.flatnonzero(raw | (kinds == wire.ENC_LZ4)).tolist():
        off, ln = int(offsets[i]), int(lens[i])
        if kinds[i] == wire.ENC_RAW:
            out[i] = data[off:off + ln]
            continue
        try:
            page = lz4.block.decompress(data[off:off + ln],
                                        uncompressed_size=page_size)
        except lz4.block.LZ4BlockError as exc:
            return f"pfn {src.pfns[i]}: lz4 data does not decode ({exc})"
        if len(page) != page_size:
            return f"pfn {src.pfns[i]}: lz4 data decodes to {len(page)} bytes"
        out[i] = np.frombuffer(page, np.uint8)
    return ""


def _decode_packed(src: Slot, out: np.ndarray, page_size: int, data: np.ndarray) -> str:
    """A PACKED batch: one lz4 block holding all RAW pages back to back."""
    n = src.count
    kinds = src.enc_kind[:n]
    carry = np.flatnonzero(kinds == wire.ENC_RAW)
    size = len(carry) * page_size
    try:
        block = lz4.block.decompress(data, uncompressed_size=size)
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
    return ""


def check_hashes(src: Slot, out: np.ndarray, kinds: np.ndarray, page_size: int,
                 check: str) -> str:
    """Why the decoded pages ``out`` of batch ``src`` are bad ('' if they are not): a ZERO
    page with another hash, or a data page whose blake3 differs (``check``: which are
    hashed, see decode_batch)."""
    n = src.count
    zero = np.flatnonzero(kinds == wire.ENC_ZERO)
    if len(zero):
        bad = (src.hashes[zero] != np.frombuffer(zero_page_hash(page_size), np.uint8)).any(1)
        if bad.any():
            return f"pfn {src.pfns[zero[bad.argmax()]]}: ZERO page sent with a non-zero hash"
    if check == "off" or src.batch_flags & wire.PAGES_UNHASHED:   # (a sync's: no hashes)
        return ""
    data = np.flatnonzero((kinds == wire.ENC_RAW) | (kinds == wire.ENC_LZ4))
    if not len(data):
        return ""
    if check == "sample":     # one data page in 64 (at least one per batch), at random
        data = np.sort(_sampler.choice(data, -(-len(data) // 64), replace=False))
    rows = None if len(data) == n else data
    got = hash_pages(out[:n], rows)
    bad = (got != src.hashes[data]).any(axis=1)
    if bad.any():
        return f"pfn {src.pfns[data[bad.argmax()]]}: blake3 mismatch"
    return ""


def run(ctx: StageContext, ring_in: Ring, ring_out: Ring, staging: PageBuffer,
        check: str = "full", priority: StagePriority | None = None,
        seal_keys: seal.SealKeys | None = None) -> None:
    """``priority``: this stage's scheduling (common.StagePriority). ``seal_keys``:
    security.mode = "sealed" (the receive stage lets no unsealed batch through then)."""
    if check not in CHECKS:
        raise ValueError(f"verify stage: check={check!r} is not one of {CHECKS}")
    staging = staging.pages
    page_size = staging.shape[1]
    c = ctx.counters
    opener = scratch = aad = None
    if seal_keys is not None:
        opener = seal.Opener(seal_keys)
        scratch = np.empty(ring_in.layout.data_size, np.uint8)
        aad = np.empty(wire.pages_prefix_size(ring_in.layout.batch_pages), np.uint8)

    def process(slot, out) -> None:
        n = slot.count
        if faults.ACTIVE and not slot.marks & MARK_STAGED:
            faults.point("verify.decode")
        rows = staging[slot.row:slot.row + n]
        problem, data, staged = "", None, False
        if slot.batch_flags & wire.PAGES_SEALED:
            t0 = time.perf_counter_ns()
            try:
                if opener is None:
                    raise seal.SealError("PAGES: sealed, but this node has no seal key")
                data = open_batch(opener, slot, rows, scratch, aad, page_size)
                staged = data is None
            except seal.SealError as exc:
                problem = str(exc)
                c.add("seal_refused", 1)
            c.add("open_ns", time.perf_counter_ns() - t0)
        problem = problem or decode_batch(slot, rows, page_size, check, data, staged)
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

    worker_loop(ctx, ring_in, ring_out, process, priority)
