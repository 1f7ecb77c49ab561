"""A corrupted segment on the CURVE pages channel tears the epoch in flight at once
(issue 11, the fault matrix's page-stream-corrupt-curve row).

The corruption is real: the two nodes run in two network namespaces joined by
``scripts/faultnet.py``'s TUN forwarder, which flips one byte in one TCP segment of the
pages channel and fixes its TCP checksum up (a faulty middlebox), so the bytes reach
libzmq. The message then fails CURVE authentication, and libzmq 4.3 leaves that
connection open and silent: before, the epoch in flight waited for its timeout, the
primary went unprotected and the secondary stopped as stale at the new full sync.

Now the secondary's pages socket notices (sockets.DropWatch: counted, logged, the
connection reset so the primary reconnects) and its coordinator tears the epoch at once
with a reason naming the cause; the primary carries the epoch's pages into the next one
and the pair stays protected. The epoch timeout here is ten minutes: only the tear can
end that epoch within the test's deadlines.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from conftest import wait_until

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))

pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                 reason="network namespaces and a TUN device need root")]

TABLES = {
    "guest": {"backend": "sim", "page_count": 2048},
    "guest.workload": {"seed": 5, "input_rate_hz": 250.0, "pages_per_input": 8},
    "checkpoint": {"max_interval_ms": 150, "min_interval_ms": 5, "epoch_timeout_ms": 600000},
    # the test is about the pages channel: a loaded machine's heartbeat stays out of it
    "heartbeat": {"interval_ms": 100, "miss_count": 10},
    "security": {"mode": "curve"},
}


def test_a_curve_corrupted_segment_tears_the_epoch_at_once_and_the_pair_stays_protected(
        tmp_path):
    import faultnet
    port = faultnet.free_port_base()
    link = faultnet.NetLink("tun", {"corrupt_dport": port, "corrupt_count": 1,
                                    "corrupt_every": 50, "seed": 5},
                            workdir=str(tmp_path / "net"))
    pair = None
    try:
        pair = faultnet.NetnsPair(link, TABLES, workdir=str(tmp_path / "pair"), port=port)
        pair.start()
        pair.wait_protected(timeout=300)
        coord = pair.node("primary").stage("coordinator")
        link.start_corrupting()
        wait_until(lambda: link.forwarder_stats().get("a2b_corrupted", 0) >= 1, timeout=120,
                   what="one corrupted segment on the pages channel")
        wait_until(lambda: pair.stage_counter("coordinator", "torn_by_conn_drop",
                                              "secondary") >= 1,
                   timeout=120, what="the secondary tearing the epoch in flight")
        assert pair.stage_counter("receive", "conn_crypto_errors", "secondary") == 1
        assert pair.stage_counter("receive", "conn_drops", "secondary") == 1
        done = coord.as_dict()["epochs_committed"]
        wait_until(lambda: coord.as_dict()["epochs_committed"] >= done + 10, timeout=180,
                   what="10 checkpoints after the torn epoch (the primary reconnected)")
        primary_log = pair.log_tail("primary", 1 << 24)
        assert "failed CURVE authentication" in primary_log      # the ACK's reason
        assert "incomplete after" not in primary_log + pair.log_tail("secondary", 1 << 24)
        assert pair.node("primary").node_info()["state"] == "protected"
        for role in ("primary", "secondary"):
            assert pair.stage_counter("coordinator", "peer_lost", role) == 0, role
        assert pair.stage_counter("coordinator", "sync_restarts", "primary") == 0
        assert pair.stage_counter("coordinator", "torn_by_conn_drop", "secondary") == 1
        assert pair.prove_memory_equal(timeout=180).get("memory_equal") is True
    finally:
        if pair is not None:
            pair.stop()
            pair.cleanup()
        link.close()
