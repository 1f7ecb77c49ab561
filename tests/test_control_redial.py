"""An unprotected primary's HELLO goes out on a new control connection (issue 11, item 4).

After a partition heals, the primary's HELLO waited on its old control connection until
TCP retransmitted there (4-6 s of backoff in the fault matrix's partition rows, longer
the longer the partition). Here the two nodes run in two network namespaces and every
packet of the control connection the pair was protected over is dropped for good (a
backoff that never ends); new connections are not. The primary's next checkpoint times
out, it goes unprotected and says HELLO: over a new connection (``control_redials``) the
secondary hears it and stops as stale; started again it is re-protected and the memories
are proven equal. Before, the HELLOs stayed on the dead connection and the secondary never
heard one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))

pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0 or not all(
                  shutil.which(t) for t in ("ip", "nft", "ss")),
                  reason="network namespaces and nftables need root, ip, nft and ss")]

TABLES = {
    "guest": {"backend": "sim", "page_count": 1024},
    # a checkpoint whose BEGIN is lost ends at its timeout: the primary goes unprotected
    "checkpoint": {"max_interval_ms": 100, "epoch_timeout_ms": 3000},
    "heartbeat": {"interval_ms": 100, "miss_count": 10},
}


def _ns(ns: str, *cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True,
                          text=True, check=True, timeout=60).stdout


def test_the_unprotected_primary_says_hello_on_a_new_control_connection(tmp_path):
    import faultnet
    from pipeline.wire import CHANNEL_PORT_OFFSETS
    port = faultnet.free_port_base()
    control = port + CHANNEL_PORT_OFFSETS["control"]
    link = faultnet.NetLink("veth", workdir=str(tmp_path / "net"))
    pair = None
    try:
        pair = faultnet.NetnsPair(link, TABLES, workdir=str(tmp_path / "pair"), port=port)
        pair.start()
        pair.wait_protected(timeout=300)
        ns = link.ns["a"]
        out = _ns(ns, "ss", "-tnH", "state", "established", f"( dport = :{control} )")
        ports = [int(line.split()[-2].rsplit(":", 1)[1]) for line in out.splitlines()
                 if line.strip()]
        assert len(ports) == 1, out
        rules = (f"add rule inet ctltest out tcp sport {ports[0]} drop\n"
                 f"add rule inet ctltest in tcp dport {ports[0]} drop\n")
        _ns(ns, "nft", "-f", "-", stdin="add table inet ctltest\n"
            "add chain inet ctltest out { type filter hook output priority 0; }\n"
            "add chain inet ctltest in { type filter hook input priority 0; }\n" + rules)
        pair.wait_info("state", "unprotected", role="primary", timeout=120)
        code = pair.wait_exit("secondary", timeout=120)
        log = pair.log_tail("secondary", 1 << 24)
        assert code == 1 and "StaleSecondary" in log, log[-2000:]
        assert pair.stage_counter("coordinator", "control_redials", "primary") >= 1
        pair.start_node("secondary")
        pair.wait_protected(timeout=300)
        assert pair.prove_memory_equal(timeout=180).get("memory_equal") is True
        assert pair.node("primary").node_info()["role"] == "primary"
    finally:
        if pair is not None:
            pair.stop()
            pair.cleanup()
        link.close()
