"""The quick fault matrix (scripts/fault_matrix.py --quick: the rows tests/test_failover.py
does not cover) runs in CI: every row's run passes its invariants and no data is lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "fault_matrix.py")


def test_quick_fault_matrix_passes_with_no_data_lost():
    proc = subprocess.Popen([sys.executable, SCRIPT, "--quick", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=1100)
    except subprocess.TimeoutExpired:
        proc.terminate()            # the matrix unwinds on SIGTERM: its runs clean up
        out, err = proc.communicate(timeout=60)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    print(p.stdout)
    # the network row needs root (namespaces, nftables); CI runs as root
    net = {"partition-heartbeat", "partition-pages-healed"} if os.geteuid() == 0 else set()
    assert {r["name"] for r in result["rows"]} == {"primary@primary.reprotect",
                                                   "secondary@restore.pages_written:12",
                                                   "sigstop-primary",
                                                   "failover-merge@store.merge.run",
                                                   "failover-merge-eio@store.merge.run",
                                                   "disk-buffer-enospc@store.buffer.append",
                                                   "rlimit-as-too-low@start"
                                                   } | net
    for row in result["rows"]:
        assert row["runs"] == row["passed"] == 1 and row["data_lost"] == 0, (row, p.stderr[-3000:])
    assert result["all_passed"] is True and p.returncode == 0
    if net:     # every namespace the network row made is gone (names: cfm<matrix pid>p<n>)
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"cfm{proc.pid}p" not in names, names


def test_the_disk_forward_port_is_none_of_the_pairs_ports(monkeypatch, tmp_path):
    """The disk's forwarding port (drawn first, for the role tables) stays bound until the
    pair drew its own 4 ports, so they cannot include it (a full matrix run failed once:
    the forward port was the pair's heartbeat port, 'Address already in use' in the
    secondary's disk stage). Free ports are drawn deterministically here, lowest first,
    so the old code draws the same port twice."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import fault_matrix
    from pipeline import localpair

    lowest_first = localpair.free_port_base

    def lowest(count: int = 4) -> int:
        return lowest_first(count, bases=range(31000, 32000))
    monkeypatch.setattr(localpair, "free_port_base", lowest)
    tables = fault_matrix.disk_role_tables()
    try:
        pair = localpair.LocalPair({}, workdir=str(tmp_path), role_tables=tables)
    finally:
        getattr(fault_matrix, "_release_held", lambda: None)()
    forward = int(tables["secondary"]["disk"]["forward"].rsplit(":", 1)[1])
    assert forward not in range(pair.port, pair.port + pair.PORTS), (forward, pair.port)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="a veth pair and tc need root")
def test_the_rate_rows_queue_delays_a_heartbeat_less_than_its_timeout():
    """A heartbeat shares the shaped link with the pages: it waits behind the whole queue.
    The rate row's real TBF (read back from the kernel) must delay a packet by less than
    the default heartbeat's timeout minus one interval, or the row tests the queue, not
    the product (a full run lost the peer for a 301 ms silence at tc's 500 ms)."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import re

    import fault_matrix
    import faultnet
    from pipeline.failover.settings import HeartbeatSettings

    link = faultnet.NetLink("veth", workdir="/tmp")
    try:
        fault_matrix.shape(link, "20mbit")
        shown = link.tbf_stats()
    finally:
        link.close()
    queue = re.search(r"\blat (\d+(?:\.\d+)?)(us|ms|s)\b", shown)
    assert queue, shown
    queue_ms = float(queue.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[queue.group(2)]
    hb = HeartbeatSettings()
    assert queue_ms + hb.interval_ms < hb.interval_ms * hb.miss_count, shown
