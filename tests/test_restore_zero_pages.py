"""ZERO pages are written as zeros by the restore stage, whatever their staging rows hold.

The receive stage does not clear a ZERO page's row in the staging area (issue 13: a memset
in staging, then two copies out of it, for a page known to be zeros); the restore stage
writes zeros into the SVM and its cache instead. Staging rows are reused from the top by
every epoch, so a ZERO page's row holds whatever page the previous epoch put there: a
restore stage that copied it would give the SVM that page instead of zeros.

Against a real secondary node driven by a hand primary (tests/test_secondary_faults.py):
epoch A fills the first staging rows with random pages; epoch B sends pages the PVM has
zeroed in those rows, with a REF page and data pages among them (the apply's path that
writes the data and the zeros apart) and then B' with zeros only (one copy of every row).
After each, the SVM's full-memory digest must be the PVM's.
"""
from __future__ import annotations

import numpy as np
import pytest
from test_secondary_faults import BATCH, PAGES, committed_pair, counters

from pipeline import wire

pytestmark = pytest.mark.slow  # starts real node processes


def _kinds(prim, epoch: int, pfns: np.ndarray) -> np.ndarray:
    msgs, _, _ = prim.records(epoch, pfns, compress=False)
    return np.concatenate([wire.decode_pages(m, PAGES, 4096, BATCH).enc_kind for m in msgs])


def test_zero_pages_become_zeros_whatever_staging_held(secondary):
    pair, dom = secondary
    prim, _ = committed_pair(pair, dom)
    rng = np.random.default_rng(13)
    # epoch A: 3 batches of random pages, raw, in the first staging rows
    pfns_a = np.arange(100, 100 + 3 * BATCH, dtype=np.uint64)
    dom.write_pages(pfns_a, rng.integers(1, 256, (len(pfns_a), 4096), dtype=np.uint8))
    ack = prim.checkpoint(pfns_a, compress=False)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    assert prim.probe() == dom.memory_digest()

    # epoch B: the PVM zeroed pages that went out as data in A; they come first (A's rows),
    # then a page the secondary holds as committed (REF) and fresh data pages
    zeroed = pfns_a[:2 * BATCH]
    dom.write_pages(zeroed, np.zeros((len(zeroed), 4096), np.uint8))
    ref = pfns_a[2 * BATCH:2 * BATCH + 1]
    data = np.arange(300, 300 + BATCH - 1, dtype=np.uint64)
    dom.write_pages(data, rng.integers(1, 256, (len(data), 4096), dtype=np.uint8))
    pfns_b = np.concatenate((zeroed, ref, data))
    kinds = _kinds(prim, prim.epoch, pfns_b)
    assert (kinds[:len(zeroed)] == wire.ENC_ZERO).all()
    assert kinds[len(zeroed)] == wire.ENC_REF
    assert (kinds[len(zeroed) + 1:] == wire.ENC_RAW).all()
    ack = prim.checkpoint(pfns_b, compress=False)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    assert prim.probe() == dom.memory_digest()

    # epoch B': zeros only, over rows that held data pages in B
    dom.write_pages(data, np.zeros((len(data), 4096), np.uint8))
    pfns_c = np.concatenate((data, np.arange(400, 400 + BATCH, dtype=np.uint64)))
    dom.write_pages(pfns_c[len(data):], np.zeros((BATCH, 4096), np.uint8))
    assert (_kinds(prim, prim.epoch, pfns_c) == wire.ENC_ZERO).all()
    ack = prim.checkpoint(pfns_c, compress=False)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    assert prim.probe() == dom.memory_digest()
    assert counters(pair)["restore"]["errors"] == 0
