"""The receive side in the restore stage's process (pipeline/stages/receive.py, session 19)
never waits inside a record: what it would wait for (the verify workers' output, the
coordinator's commands) is the same process's work. A record it cannot take yet is refused
with nothing changed, and taken whole when offered again once the reason is gone:

- a newer epoch's first record while the restore side is not done with the staging rows
  of the epoch before (early ACK: they are still read);
- a newer epoch's first record while a verify worker still holds a batch dealt to it (a
  torn epoch's, decoded late, overwrote the next epoch's raw pages: issue 11);
- a record whose ring is full, and an EPOCH_END while any of its marker rings is (all its
  markers or none).

A held record is validated once (a sealed one is checked at its place once) and offered
again with ``retry``. Real shared-memory rings and real wire records; the counters are a
real node segment."""
from __future__ import annotations

import logging

import blake3
import numpy as np
import pytest

from pipeline import wire
from pipeline.counters import STAGE_COUNTERS, NodeCounters
from pipeline.ring import Ring, SlotLayout
from pipeline.shm import create_segment, segment_prefix
from pipeline.stages.common import MARK_STAGED, SLOT_DATA, SLOT_END, PageBuffer, StageContext
from pipeline.stages.receive import Receiver

PAGES, BATCH, PS = 64, 4, 4096
RECEIVE = ("skipped_optional", "stale_records", "staging_wait_ns", "conn_drops",
           "conn_crypto_errors", "verify_drain_waits", "seal_refused")


class _Stop:
    def is_set(self) -> bool:
        return False


@pytest.fixture
def side(node):
    """(Receiver, verify rings, direct ring, staging rows, [done epoch], counters)."""
    layout = SlotLayout(batch_pages=BATCH, page_size=PS)
    p = segment_prefix(node)
    to_verify = [Ring.create(f"{p}v{i}", 2, layout) for i in range(2)]
    direct = Ring.create(f"{p}d", 2, SlotLayout(batch_pages=BATCH, page_size=512))
    segment = create_segment(f"{p}staging", PAGES * PS)
    staging = PageBuffer(segment, PS)
    counters = NodeCounters.create(node, {"receive": STAGE_COUNTERS + RECEIVE})
    ctx = StageContext("receive", counters.stage("receive"), _Stop(),
                       logging.getLogger("test.receive"), counters)
    done = [-1]
    rcv = Receiver(ctx, to_verify, PAGES, PS, lambda: done[0], staging, direct, "sample")
    yield rcv, to_verify, direct, staging.pages, done, counters.stage("receive")
    for r in [*to_verify, direct]:
        r.unlink()
        r.close()
    counters.unlink()
    counters.close()
    segment.unlink()
    segment.close()


def _raw(epoch: int, pfns: list[int], fill: int) -> bytes:
    pages = np.full((len(pfns), PS), fill, np.uint8)
    pages[:, 0] = np.arange(len(pfns))
    hashes = np.frombuffer(b"".join(blake3.blake3(p.tobytes()).digest() for p in pages),
                           np.uint8).reshape(-1, 32)
    n = len(pfns)
    return wire.encode_pages(epoch, np.asarray(pfns, np.uint64), hashes,
                             np.full(n, PS, np.uint32), np.zeros(n, np.uint8),
                             pages.reshape(-1))


def _lz4(epoch: int, pfns: list[int]) -> bytes:
    """A batch of one lz4-packed page (goes to a verify worker, not straight on)."""
    import lz4.block
    page = np.full(PS, 7, np.uint8)
    n = len(pfns)
    return wire.encode_pages(epoch, np.asarray(pfns, np.uint64),
                             np.tile(np.frombuffer(blake3.blake3(page.tobytes()).digest(),
                                                   np.uint8), (n, 1)),
                             np.full(n, PS, np.uint32), np.zeros(n, np.uint8),
                             lz4.block.compress(np.tile(page, n).tobytes(), store_size=False),
                             wire.PAGES_PACKED)


def _drain(ring: Ring) -> list:
    out = []
    while (slot := ring.try_acquire_read()) is not None:
        out.append((slot.kind, slot.epoch, slot.count, slot.row, slot.marks))
        ring.release_read(slot)
    return out


def test_a_newer_epoch_waits_until_the_restore_side_is_done_with_the_rows(side):
    rcv, _verify, direct, staging, done, c = side
    assert rcv.take(_raw(1, [10, 11], 0x11))
    assert rcv.take(wire.encode_epoch_end(1, 2, 1, 0, b"vcpu"))
    assert _drain(direct) == [(SLOT_DATA, 1, 2, 0, MARK_STAGED), (SLOT_END, 1, 0, 0, 0)]
    # epoch 2's first record would reuse row 0, which epoch 1's apply still reads
    assert not rcv.take(_raw(2, [20], 0x22))
    for _ in range(3):
        assert not rcv.retry()
    assert rcv.held is not None
    assert staging[0, 1] == 0x11 and direct.occupancy == 0
    assert c.as_dict()["items_out"] == 2
    done[0] = 1
    assert rcv.retry() and rcv.held is None
    assert staging[0, 1] == 0x22 and _drain(direct) == [(SLOT_DATA, 2, 1, 0, MARK_STAGED)]
    assert c.as_dict()["items_out"] == 3 and c.as_dict()["staging_wait_ns"] > 0


def test_a_newer_epoch_waits_until_the_verify_workers_took_every_batch(side):
    rcv, verify, direct, staging, done, c = side
    assert rcv.take(_lz4(1, [10]))             # dealt to a verify worker, not yet decoded
    assert verify[0].occupancy == 1
    done[0] = 1                                # epoch 1 given up (torn)
    assert not rcv.take(_raw(2, [20], 0x33)) and not rcv.retry()
    assert c.as_dict()["verify_drain_waits"] == 1       # one wait, however often offered
    assert staging[0, 1] == 0 and direct.occupancy == 0
    _drain(verify[0])                          # the worker released it
    assert rcv.retry()
    assert staging[0, 1] == 0x33 and _drain(direct) == [(SLOT_DATA, 2, 1, 0, MARK_STAGED)]


def test_a_full_ring_holds_the_record_and_an_end_goes_on_all_its_rings_or_none(side):
    rcv, verify, direct, staging, done, c = side
    # batches alternate between the two verify rings (2 slots each): the fifth finds its
    # ring full
    for i in range(4):
        assert rcv.take(_lz4(1, [i]))
    assert not rcv.take(_lz4(1, [9]))
    assert c.as_dict()["items_out"] == 4
    assert [r.occupancy for r in verify] == [2, 2]
    _drain(verify[0])
    assert rcv.retry()
    assert [r.occupancy for r in verify] == [1, 2]
    # the END's markers go on both verify rings: one of them is full
    end = wire.encode_epoch_end(1, 5, 5, 0, b"vcpu")
    assert not rcv.take(end)
    assert verify[0].occupancy == 1            # no marker on the ring that had room
    got = _drain(verify[1])
    assert rcv.retry()
    assert [k for k, *_ in got] == [SLOT_DATA, SLOT_DATA]
    ends = [_drain(r)[-1] for r in verify]
    assert [(k, e) for k, e, *_ in ends] == [(SLOT_END, 1), (SLOT_END, 1)]


def test_a_stale_or_bad_record_is_dropped_not_held(side):
    rcv, _verify, direct, _staging, done, c = side
    assert rcv.take(_raw(3, [1], 0x44))
    assert rcv.take(_raw(2, [2], 0x55))        # older than the newest epoch: dropped
    assert rcv.take(b"\x00" * 10)              # does not validate: dropped, counted
    d = c.as_dict()
    assert d["stale_records"] == 1 and d["errors"] == 1 and d["items_out"] == 1
    assert len(_drain(direct)) == 1


def test_a_held_sealed_record_is_checked_at_its_place_once(node):
    """security.mode = "sealed": a record's seal index is checked when it is validated; held
    (its ring full) and offered again, it is placed, not refused as sent twice."""
    from pipeline import seal
    keys = seal.SealKeys()
    keys.install(*seal.derive_key(bytes(32), bytes(range(32))))
    layout = SlotLayout(batch_pages=BATCH, page_size=PS)
    p = segment_prefix(node)
    to_verify = [Ring.create(f"{p}v{i}", 2, layout) for i in range(2)]
    counters = NodeCounters.create(node, {"receive": STAGE_COUNTERS + RECEIVE})
    ctx = StageContext("receive", counters.stage("receive"), _Stop(),
                       logging.getLogger("test.receive"), counters)
    try:
        rcv = Receiver(ctx, to_verify, PAGES, PS, lambda: -1, seal_keys=keys)
        for _ in range(2):                     # the END's ring is full
            slot = to_verify[0].acquire_write(0)
            slot.reset(SLOT_DATA, 0, 1)
            to_verify[0].commit_write(slot)
        end = wire.encode_epoch_end(1, 0, 0, 0, b"vcpu", seal.Sealer(keys, seal.SEND_SEALER))
        assert not rcv.take(end) and not rcv.retry()
        _drain(to_verify[0])
        assert rcv.retry()
        got = to_verify[0].try_acquire_read()
        assert (got.kind, got.epoch, bytes(got.data_flat[:got.vcpu_len])) == \
            (SLOT_END, 1, b"vcpu")
        to_verify[0].release_read(got)
        d = counters.stage("receive").as_dict()
        assert d["seal_refused"] == 0 and d["errors"] == 0
        # the same record again is a replay: refused by its place, counted, dropped
        assert rcv.take(end)
        d = counters.stage("receive").as_dict()
        assert d["seal_refused"] == 1 and to_verify[0].occupancy == 0
    finally:
        for r in to_verify:
            r.unlink()
            r.close()
        counters.unlink()
        counters.close()
