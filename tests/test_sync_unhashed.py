"""Full-sync hashes off the critical path (issue 13): unless pipeline.verify_pages is
"full", the primary sends the full sync's and pre-copy rounds' pages without hashing them
(PAGES_UNHASHED). Such a page is never taken for a REF afterwards, the memory proof still
holds, and a checkpoint's pages without hashes are refused."""
from __future__ import annotations

import numpy as np
import pytest
from test_secondary_faults import (PAGES, close_hand_pair, committed_pair, counters,
                                   hand_pvm)

from pipeline import wire
from pipeline.localpair import LocalPair
from pipeline.stages.common import zero_page_hash
from pipeline.stages.digest import hash_batch
from pipeline.stages.verify import check_hashes


def test_hash_batch_without_data_hashes_leaves_zero_bytes_no_blake3_equals():
    pages = np.zeros((4, 4096), np.uint8)
    pages[1, 7] = pages[3, 100] = 1
    hashes = np.full((4, 32), 0xEE, np.uint8)
    nonzero = hash_batch(pages, hashes, hash_data=False)
    assert nonzero.tolist() == [False, True, False, True]
    assert not hashes[[1, 3]].any()                  # no hash: zero bytes
    zero = np.frombuffer(zero_page_hash(4096), np.uint8)
    assert (hashes[[0, 2]] == zero).all()            # ZERO pages keep theirs (checked)


@pytest.mark.slow
@pytest.mark.parametrize("verify_pages", ["sample", "full"])
def test_the_full_sync_goes_unhashed_unless_every_page_is_checked(tmp_path, verify_pages):
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 4096},
                      "pipeline": {"verify_pages": verify_pages}},
                     workdir=str(tmp_path))
    try:
        pair.start()
        pair.wait_protected(timeout=300)
        assert pair.prove_memory_equal(timeout=300)["memory_equal"] is True
        unhashed = sum(pair.stage_counter(f"digest.{i}", "pages_unhashed", "primary")
                       for i in range(2))
        if verify_pages == "full":
            assert unhashed == 0
        else:
            assert unhashed > 1000      # the sync's non-zero pages (most of 4096)
        sec = pair.node("secondary").snapshot()["stages"]
        assert sec["restore"]["epochs_aborted"] == 0
    finally:
        pair.stop()
        pair.cleanup()


@pytest.mark.slow
def test_a_checkpoint_with_unhashed_pages_is_torn(tmp_path):
    """Only a sync's or pre-copy round's pages may come without hashes: in a checkpoint
    the secondary refuses them and rolls the epoch back."""
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": PAGES},
        "pipeline": {"verify_workers": 2, "batch_pages": 16, "verify_pages": "sample"},
        "checkpoint": {"epoch_timeout_ms": 1500, "max_interval_ms": 30000},
    }, workdir=str(tmp_path), log_level="info")
    pair.start(roles=("secondary",))
    dom = hand_pvm(pair)
    prim = None
    try:
        prim, committed = committed_pair(pair, dom)

        def strip_hashes(msgs: list[bytes]) -> list[bytes]:
            out = []
            for m in msgs:
                b = wire.decode_pages(m, PAGES, 4096, 16)
                hashes = b.hashes.copy()
                hashes[(b.enc_kind == wire.ENC_RAW) | (b.enc_kind == wire.ENC_LZ4)] = 0
                out.append(wire.encode_pages(
                    b.epoch, b.pfns, hashes, b.enc_len, b.enc_kind, b.data,
                    wire.PAGES_UNHASHED | (wire.PAGES_PACKED if b.packed else 0)))
            return out
        ack = prim.checkpoint(prim.dirty_some(32), mutate=strip_hashes, compress=False)
        assert ack.status == wire.ACK_ABORTED and "UNHASHED" in ack.reason, ack
        assert counters(pair)["restore"]["epochs_aborted"] >= 1
        assert prim.probe() == committed
    finally:
        close_hand_pair(pair, dom, prim)


def test_the_check_skips_unhashed_batches_but_not_their_zero_pages():
    class Src:      # the fields check_hashes reads from a ring slot
        count = 2
        batch_flags = wire.PAGES_UNHASHED
        pfns = np.array([5, 6], np.uint64)
        hashes = np.zeros((2, 32), np.uint8)
    out = np.zeros((2, 4096), np.uint8)
    out[0, 1] = 9
    kinds = np.array([wire.ENC_RAW, wire.ENC_ZERO], np.uint8)
    assert "ZERO page sent with a non-zero hash" in check_hashes(Src, out, kinds, 4096, "full")
    Src.hashes[1] = np.frombuffer(zero_page_hash(4096), np.uint8)
    assert check_hashes(Src, out, kinds, 4096, "full") == ""
    Src.batch_flags = 0
    assert "blake3 mismatch" in check_hashes(Src, out, kinds, 4096, "full")
