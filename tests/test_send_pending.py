"""The send stage's record of the epoch in flight (``pending``: pfn and hash of each page
sent, which the coordinator commits to its hash table or carries into the next epoch).

A torn epoch's batches can still come out of one ring after the next epoch's first batch
came out of another (the rings are FIFO each, the stage takes from whichever is ready):
those late batches belong to an epoch the coordinator already settled. Recorded as the
next epoch's, two epochs of up to all of memory overflowed the arrays and the send stage
died ("could not broadcast input array from shape (256,) into shape (0,)", seen with
epochs timing out back to back after the secondary was lost)."""
from __future__ import annotations

import numpy as np

from pipeline.stages.send import Pending, PendingWriter

PAGES = 8


def _pending() -> Pending:
    return Pending(np.zeros(PAGES, np.uint64), np.zeros((PAGES, 32), np.uint8),
                   np.zeros(1, np.uint64))


def _hashes(pfns: np.ndarray, epoch: int) -> np.ndarray:
    h = np.zeros((len(pfns), 32), np.uint8)
    h[:, 0], h[:, 1] = pfns, epoch
    return h


def test_a_torn_epochs_late_batches_are_not_the_next_epochs_pages() -> None:
    pending = _pending()
    w = PendingWriter(pending)
    first, rest, everything = np.arange(4, dtype=np.uint64), np.arange(4, 8, dtype=np.uint64), \
        np.arange(PAGES, dtype=np.uint64)
    assert w.add(5, first, _hashes(first, 5))            # epoch 5, torn after one ring
    assert w.add(6, everything, _hashes(everything, 6))  # epoch 6: all of memory (carried)
    assert not w.add(5, rest, _hashes(rest, 5))          # epoch 5's other ring, late
    n = int(pending.count[0])
    assert n == PAGES
    assert (pending.pfns[:n] == everything).all()
    assert (pending.hashes[:n, 1] == 6).all()            # no hash of epoch 5 in epoch 6's


def test_each_epoch_starts_afresh() -> None:
    pending = _pending()
    w = PendingWriter(pending)
    a, b = np.array([1, 2], np.uint64), np.array([3], np.uint64)
    w.add(0, a, _hashes(a, 0))
    w.add(0, b, _hashes(b, 0))
    assert int(pending.count[0]) == 3
    w.add(1, b, _hashes(b, 1))
    assert int(pending.count[0]) == 1 and pending.pfns[0] == 3 and pending.hashes[0, 1] == 1
