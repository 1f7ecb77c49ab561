"""A live round's raw pages (a full sync's, a pre-copy round's: PAGES_UNHASHED) go from the
record into the SVM and the restore stage's cache without the copy into staging (session 20):
the receive side leaves them in the record (``Receiver.unstaged``) and the restore side, in
the same turn, writes them from there. Staging is not touched. An unhashed batch that comes
after the SVM ran is not written into the SVM: its pages go into staging as before and its
epoch is refused at its END.

Real shared-memory rings, staging segment, counters and wire records, the real Receiver and
Restore; the guest's memory is an array of this process (a Domain of its own, as the Xen
backend reads and writes it: no mapping of all of it)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline import wire
from pipeline.counters import STAGE_COUNTERS, NodeCounters
from pipeline.ring import Ring, SlotLayout
from pipeline.shm import create_segment, segment_prefix
from pipeline.stages.common import (MARK_STAGED, MARK_UNSTAGED, SLOT_DATA, PageBuffer,
                                    StageContext, zero_page_hash)
from pipeline.stages.receive import Receiver
from pipeline.stages.restore import Restore
from pipeline.supervisor import EXTRA_COUNTERS
from pipeline.xen_io.base import Domain

PAGES, BATCH, PS = 64, 8, 4096
STALE = 0xEE    # what staging holds before: still there after an unstaged batch


class MemoryDomain(Domain):
    page_size, page_count, name = PS, PAGES, "memory"

    def __init__(self) -> None:
        self.mem = np.full((PAGES, PS), 0x55, np.uint8)
        self.vcpu = b""

    def read_pages(self, pfns, out) -> None:
        out[:len(pfns)] = self.mem[np.asarray(pfns, np.intp)]

    def write_pages(self, pfns, data) -> None:
        self.mem[np.asarray(pfns, np.intp)] = data

    def get_vcpu_state(self) -> bytes:
        return self.vcpu

    def set_vcpu_state(self, blob: bytes) -> None:
        self.vcpu = blob

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def is_paused(self) -> bool:
        return True

    def enable_dirty_log(self) -> None:
        pass

    def read_and_clear_dirty(self) -> np.ndarray:
        return np.zeros(0, np.uint64)


class _Stop:
    def is_set(self) -> bool:
        return False


@pytest.fixture
def side(node):
    """(Receiver, Restore, direct ring, staging rows, domain)."""
    p = segment_prefix(node)
    layout = SlotLayout(batch_pages=BATCH, page_size=PS)
    to_verify = [Ring.create(f"{p}v0", 2, layout)]
    direct = Ring.create(f"{p}d", 4, SlotLayout(batch_pages=BATCH, page_size=512))
    segment = create_segment(f"{p}staging", PAGES * PS)
    staging = PageBuffer(segment, PS)
    staging.pages[:] = STALE
    names = ("restore", "receive")
    counters = NodeCounters.create(node, {n: STAGE_COUNTERS + tuple(
        c for c in EXTRA_COUNTERS[n] if c not in STAGE_COUNTERS) for n in names})
    ctx, rctx = (StageContext(n, counters.stage(n), _Stop(), logging.getLogger(f"test.{n}"),
                              counters) for n in names)
    dom = MemoryDomain()
    r = Restore(ctx, dom, 2, staging.pages, "sample")
    rcv = Receiver(rctx, to_verify, PAGES, PS, lambda: r.done, staging, direct, "sample",
                   unstaged=r.unstaged)
    yield rcv, r, direct, staging.pages, dom
    for ring in [*to_verify, direct]:
        ring.unlink()
        ring.close()
    counters.unlink()
    counters.close()
    segment.unlink()
    segment.close()


def _live(epoch: int, pfns: list[int], raw: np.ndarray, zeros: list[int]) -> bytes:
    """An unhashed batch: RAW pages ``pfns`` with the content ``raw``, ZERO pages ``zeros``
    (their hash the zero page's, as the digest stage sends them)."""
    at = np.asarray(pfns + zeros, np.uint64)
    n = len(at)
    kinds = np.array([wire.ENC_RAW] * len(pfns) + [wire.ENC_ZERO] * len(zeros), np.uint8)
    hashes = np.zeros((n, 32), np.uint8)
    hashes[len(pfns):] = np.frombuffer(zero_page_hash(PS), np.uint8)
    lens = np.where(kinds == wire.ENC_RAW, PS, 0).astype(np.uint32)
    return wire.encode_pages(epoch, at, hashes, lens, kinds, raw.reshape(-1),
                             wire.PAGES_UNHASHED)


def _take(ring: Ring, r: Restore):
    """Every slot on ``ring`` through the restore side: [(kind, marks)], the last verdict."""
    seen, verdict = [], None
    while (slot := ring.try_acquire_read()) is not None:
        seen.append((slot.kind, slot.marks))
        verdict = r.take_slot(slot) or verdict
        ring.release_read(slot)
    return seen, verdict


def test_a_syncs_raw_pages_go_from_the_record_into_the_svm_and_the_cache(side):
    rcv, r, direct, staging, dom = side
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (3, PS), dtype=np.uint8)
    assert rcv.take(_live(0, [5, 9, 20], raw, [30, 31]))
    assert r.unstaged, "the batch's pages were not left in the record"
    seen, verdict = _take(direct, r)
    assert seen == [(SLOT_DATA, MARK_STAGED | MARK_UNSTAGED)]
    assert not r.unstaged
    assert (staging == STALE).all(), "staging was written"
    assert np.array_equal(dom.mem[[5, 9, 20]], raw) and not dom.mem[[30, 31]].any()
    assert np.array_equal(r.cache[[5, 9, 20]], raw) and not r.cache[[30, 31]].any()
    assert (dom.mem[[0, 6, 40]] == 0x55).all()       # nothing else written
    assert rcv.take(wire.encode_epoch_end(0, 5, 1, wire.FLAG_SYNC, b"vcpu-0"))
    _, verdict = _take(direct, r)
    assert verdict is not None and verdict.ok, verdict
    applied = r.apply(0, np.zeros(0, np.uint64), False)
    assert applied.epoch == 0 and applied.pages == 5, applied
    assert np.array_equal(dom.mem[[5, 9, 20]], raw) and dom.vcpu == b"vcpu-0"
    assert np.array_equal(r.cache[[5, 9, 20]], raw)


def test_an_unhashed_batch_after_the_svm_ran_is_staged_and_its_epoch_refused(side):
    rcv, r, direct, staging, dom = side
    raw = np.full((2, PS), 0x11, np.uint8)
    assert rcv.take(_live(0, [1, 2], raw, []))
    assert rcv.take(wire.encode_epoch_end(0, 2, 1, wire.FLAG_SYNC, b"vcpu-0"))
    _take(direct, r)
    r.apply(0, np.zeros(0, np.uint64), False)
    r.finish(0)
    assert r.svm_may_run
    # epoch 1, an ordinary checkpoint, brings an unhashed batch: never into the SVM
    later = np.full((2, PS), 0x22, np.uint8)
    assert rcv.take(_live(1, [1, 3], later, [4]))
    seen, _ = _take(direct, r)
    assert seen == [(SLOT_DATA, MARK_STAGED | MARK_UNSTAGED)] and not r.unstaged
    assert (dom.mem[1] == 0x11).all() and (dom.mem[3] == 0x55).all()
    assert (dom.mem[4] == 0x55).all()
    assert (staging[:2] == 0x22).all()               # in staging, where the apply reads
    assert rcv.take(wire.encode_epoch_end(1, 3, 1, 0, b"vcpu-1"))
    _, verdict = _take(direct, r)
    assert verdict is not None and not verdict.ok
    assert "without their hashes" in verdict.reason
