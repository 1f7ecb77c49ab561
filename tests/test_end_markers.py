"""The receive stage puts an epoch's END markers only on the rings that carried its batches
(issue 13: each marker on an idle verify ring woke a worker on the small checkpoint's
path only to pass it on). With pipeline.verify_pages = "sample", raw batches go straight
to the restore stage: an epoch of raw pages must not wake a verify worker at all, and an
epoch whose batches went both ways is still assembled whole."""
from __future__ import annotations

import pytest
from test_secondary_faults import committed_pair, counters

from pipeline import wire

pytestmark = pytest.mark.slow  # starts real node processes


def _verify_work(pair) -> int:
    c = counters(pair)
    return sum(c[name]["busy_ns"] for name in c if name.startswith("verify"))


@pytest.mark.parametrize("secondary", ["sample"], indirect=True)
def test_an_epoch_of_raw_batches_wakes_no_verify_worker(secondary):
    pair, dom = secondary
    prim, _ = committed_pair(pair, dom)
    before = _verify_work(pair)
    ack = prim.checkpoint(prim.dirty_some(64), wire.FLAG_DIGEST, compress=False)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    assert ack.memory_digest == dom.memory_digest()
    assert _verify_work(pair) == before          # not one slot went through a verify worker
    # lz4 batches (verify workers) next to raw ones (straight to restore) in one epoch
    msgs_seen = []

    def count_kinds(msgs):
        msgs_seen.extend(wire.decode_pages(m, 1024, 4096, 16).packed for m in msgs)
        return msgs
    ack = prim.checkpoint(prim.dirty_some(200), wire.FLAG_DIGEST, mutate=count_kinds)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    assert ack.memory_digest == dom.memory_digest()
    assert any(msgs_seen), "no lz4 batch: the mixed case is not tested"
    assert _verify_work(pair) > before
    prim.close()
