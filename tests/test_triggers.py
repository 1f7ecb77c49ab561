"""Checkpoint triggers through real nodes: the dirty-volume threshold, the min interval,
comparator requests, and the dirty count the threshold reads."""
from __future__ import annotations

import time

import pytest
from conftest import wait_until

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


@pytest.mark.slow
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
        # no timer, nothing dirty: no checkpoint comes before a sentinel request's
        pair.request_checkpoint("sentinel")
        cp = pair.wait_checkpoints(n + 1, timeout=60)[n]
        assert CAUSES[cp["cause"]] == "request" and cp["pages_dirty"] < 500
        pair.inject_input(SimDomain.write_command(2000))
        cp = pair.wait_checkpoints(n + 2, timeout=60)[n + 1]
        assert CAUSES[cp["cause"]] == "dirty_threshold"
        assert cp["pages_dirty"] >= 500
        # a flood of comparator requests makes checkpoints no faster than min_interval_ms
        coordinator = pair.node("primary").stage("coordinator")
        asked = coordinator.as_dict()["requests"]
        client = CheckpointClient(pair.run_dir("primary"), subscribe=False)
        start = len(pair.checkpoints())
        for _ in range(200):
            client.request("net_divergence", "test flood")
        wait_until(lambda: coordinator.as_dict()["requests"] >= asked + 200, timeout=120,
                   what="the coordinator taking all 200 requests")
        client.close()
        wait_until(lambda: len(pair.checkpoints()) > start, timeout=120)
        cps = pair.checkpoints()[start:]
        assert 1 <= len(cps) < 200, len(cps)     # many requests in one epoch make one checkpoint
        assert all(CAUSES[c["cause"]] == "net_divergence" for c in cps)
        starts = [c["started_ns"] for c in cps]
        assert all(b - a >= 150e6 for a, b in zip(starts, starts[1:]))   # min_interval_ms 200
