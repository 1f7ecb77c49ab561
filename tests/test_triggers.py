"""Checkpoint triggers through real nodes: the dirty-volume threshold, the min interval,
comparator requests, and the dirty count the threshold reads."""
from __future__ import annotations

import time

import pytest

from pipeline.checkpoint_api import CAUSES, CheckpointClient
from pipeline.localpair import LocalPair
from pipeline.xen_io.sim import SimDomain, WorkloadSpec, open_sim_domain


@pytest.mark.parametrize("mode", ["uffd", "bitmap"])
def test_dirty_count_counts_without_clearing(mode):
    dom = open_sim_domain("count", 4096, WorkloadSpec(), dirty_log=mode)
    try:
        dom.start(paused=False)
        dom.enable_dirty_log()
        dom.feed_input(SimDomain.write_command(300))
        deadline = time.monotonic() + 10
        while dom.input_seq() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        dom.pause()
        assert dom.dirty_count() == 300
        assert dom.dirty_count() == 300          # counting does not clear
        assert len(dom.read_and_clear_dirty()) == 300
        assert dom.dirty_count() == 0
    finally:
        dom.close()


def test_dirty_threshold_and_min_interval(tmp_path):
    tables = {
        "guest": {"backend": "sim", "page_count": 8192},
        "guest.workload": {"input_rate_hz": 0.0},
        "checkpoint": {"max_interval_ms": 600000, "min_interval_ms": 200,
                       "dirty_threshold_pages": 500},
    }
    with LocalPair(tables, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected()
        n = len(pair.checkpoints())
        time.sleep(0.5)
        assert len(pair.checkpoints()) == n       # no timer, nothing dirty: no checkpoint
        pair.inject_input(SimDomain.write_command(2000))
        cp = pair.wait_checkpoints(n + 1, timeout=30)[n]
        assert CAUSES[cp["cause"]] == "dirty_threshold"
        assert cp["pages_dirty"] >= 500
        # a flood of comparator requests makes checkpoints no faster than min_interval_ms
        client = CheckpointClient(pair.run_dir("primary"), subscribe=False)
        start = len(pair.checkpoints())
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.2:
            client.request("net_divergence", "test flood")
            time.sleep(0.005)
        client.close()
        time.sleep(0.3)
        cps = pair.checkpoints()[start:]
        assert 1 <= len(cps) <= 8, len(cps)      # ~1.5 s / 200 ms, not one per request
        assert all(CAUSES[c["cause"]] == "net_divergence" for c in cps)
        starts = [c["started_ns"] for c in cps]
        assert all(b - a >= 150e6 for a, b in zip(starts, starts[1:]))
