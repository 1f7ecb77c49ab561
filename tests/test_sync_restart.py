"""A full sync that loses records on the way is started over, not given up.

The pages channel breaks once mid-sync (a real TCP relay drops what it holds and closes
the connection; the primary's socket connects again by itself): the secondary finds the
sync epoch short of pages and discards it whole, the primary, whose secondary still
answers, starts the sync over, and the pair ends protected with equal memories.
"""
from __future__ import annotations

import pytest

from conftest import Relay

from pipeline.localpair import LocalPair

pytestmark = pytest.mark.slow  # starts real node processes

PAGES = 16384          # 64 MiB guest


def test_a_sync_that_lost_records_is_started_over(tmp_path):
    relay = Relay()
    relay.cut_pages_after = 8 << 20      # about an eighth of the sync's bytes (raw pages)
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": PAGES},
        "guest.workload": {"seed": 7, "input_rate_hz": 0.0},
        "pipeline": {"compress": "none"},
        "checkpoint": {"max_interval_ms": 3_600_000, "min_interval_ms": 0,
                       "epoch_timeout_ms": 300_000},
    }, workdir=str(tmp_path), log_level="info",
        role_tables={"primary": {"peer": {"address": f"tcp://127.0.0.1:{relay.listen}"}}})
    relay.target = pair.port
    try:
        with pair:
            pair.start()
            pair.wait_protected(timeout=600)
            assert relay.cuts == 1
            assert pair.stage_counter("coordinator", "sync_restarts") == 1
            assert pair.stage_counter("restore", "epochs_aborted", role="secondary") >= 1
            log = pair.log_tail("primary", 10_000_000)
            assert "event=sync_restart attempt=2" in log
            assert "event=protected" in log
            info = pair.prove_memory_equal()
            assert info["memory_equal"], info
    finally:
        relay.close()
