"""End to end with real node processes: the demo's proof, stats, and shared-memory
lifetimes of a node on a clean stop, a Ctrl-C and a killed stage."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket

import pytest
from conftest import cli, wait_until

from pipeline.localpair import LocalPair
from pipeline.xen_io.sim import SimDomain
from pipeline.shm import list_segments, segment_prefix

pytestmark = pytest.mark.slow  # starts real node processes

SMALL = {
    "guest": {"backend": "sim", "page_count": 2048},
    "guest.workload": {"input_rate_hz": 300.0, "pages_per_input": 8},
    "checkpoint": {"max_interval_ms": 100, "min_interval_ms": 5},
}



def test_demo_comparator_requests_checkpoints_on_divergent_output():
    """The guests' outputs go to the network comparator as frames; a nondeterministic
    guest makes it request checkpoints through the coordinator (cause net_divergence),
    and the pair still ends with equal memory."""
    r = cli("demo", "--duration", "0", "--until-checkpoints", "5", "--until-cause",
            "net_divergence", "--pages", "2048", "--nondeterminism", "0.1",
            "--interval-ms", "600000", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["causes"].get("net_divergence", 0) >= 5, summary["causes"]
    assert summary["causes"].get("timer", 0) == 0
    assert summary["memory_equal"] is True


@pytest.mark.parametrize("dirty_log", ["uffd", "bitmap"])
def test_demo_proves_memory_equality(dirty_log):
    r = cli("demo", "--duration", "0", "--until-checkpoints", "4", "--pages", "4096",
            "--dirty-log", dirty_log, "--nondeterminism", "0.3", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["memory_equal"] is True
    assert summary["pvm_digest"] == summary["svm_digest"]
    assert summary["dirty_log"] == dirty_log
    assert summary["checkpoints"] >= 4
    # the proof's digest request may ride on a checkpoint the comparator asked for first
    assert summary["causes"]["initial"] == 2
    assert sum(summary["causes"].values()) == summary["checkpoints"] + summary["aborted"]
    assert summary["bytes_sent"] > 0 and summary["pause_ms_p50"] > 0


def test_stats_json_agrees_between_sender_and_receiver(tmp_path):
    # checkpoints only on request, so that between two of them nothing is in flight; no
    # client load either (its input log filling up would ask for checkpoints): the test
    # gives the guest its inputs
    quiet = dict(SMALL, checkpoint={"max_interval_ms": 600000, "min_interval_ms": 0,
                                    "dirty_threshold_pages": 1 << 20},
                 **{"guest.workload": {"input_rate_hz": 0.0}})
    with LocalPair(quiet, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected()
        client = pair.node("primary").stage("client")
        for n in range(3, 6):
            fed = client.as_dict()["outputs"]
            pair.inject_input(SimDomain.write_command(100))
            wait_until(lambda: client.as_dict()["outputs"] > fed, what="the guest's writes")
            pair.request_checkpoint()
            pair.wait_checkpoints(n)
        r = cli("stats", "--config", pair.configs["primary"], "--json")
        assert r.returncode == 0, r.stderr
        prim = json.loads(r.stdout)
        assert prim["info"]["role"] == "primary" and prim["info"]["state"] == "protected"
        assert prim["summary"]["checkpoints"] == 5, prim["summary"]
        assert prim["summary"]["causes"] == {"initial": 2, "request": 3}
        assert all(prim["stages"][f"digest.{i}"]["items_in"] > 0 for i in range(2))
        sec = json.loads(cli("stats", "--node", pair.name("secondary"), "--json").stdout)
        assert sec["info"]["role"] == "secondary"
        sent = prim["stages"]["send"]["items_in"]
        # pages the receive stage placed (raw batches skip the verify workers)
        received = sec["stages"]["receive"]["items_out"]
        assert sent > 2048                                   # the full sync and more
        assert sent == received == prim["summary"]["pages_sent"]
        assert sent == sum(prim["stages"][f"digest.{i}"]["items_out"] for i in range(2))
        table = cli("stats", "--node", pair.name("primary")).stdout
        assert "snapshot" in table and "checkpoints 5" in table
    r = cli("stats", "--node", pair.name("primary"), "--json")
    assert r.returncode == 1 and "not running" in r.stderr.lower()


def _node_segments(pair, role):
    return list_segments(segment_prefix(pair.name(role)))


def test_clean_stop_leaves_no_shared_memory(tmp_path):
    pair = LocalPair(SMALL, workdir=str(tmp_path)).start()
    try:
        pair.wait_protected()
        assert _node_segments(pair, "primary") and _node_segments(pair, "secondary")
    finally:
        codes = pair.stop()
    assert codes == {"primary": 0, "secondary": 0}
    assert _node_segments(pair, "primary") == [] and _node_segments(pair, "secondary") == []


def test_ctrl_c_leaves_no_shared_memory(tmp_path):
    pair = LocalPair(SMALL, workdir=str(tmp_path)).start()
    try:
        pair.wait_protected()
        for p in pair.procs.values():           # Ctrl-C reaches the whole process group
            os.killpg(p.pid, signal.SIGINT)
        for role, p in pair.procs.items():
            assert p.wait(30) == 0, pair.log_tail(role)
    finally:
        pair.stop()
    assert _node_segments(pair, "primary") == [] and _node_segments(pair, "secondary") == []


@pytest.mark.parametrize("victim", ["digest.1", "verify.0"])
def test_killed_stage_stops_the_node_and_frees_shared_memory(tmp_path, victim):
    pair = LocalPair(SMALL, workdir=str(tmp_path)).start()
    role = "primary" if victim.startswith("digest") else "secondary"
    try:
        pair.wait_protected()
        info = pair.node(role).node_info()
        pids = info.get("stage_pids", {})
        assert victim in pids, info
        os.kill(pids[victim], signal.SIGKILL)
        code = pair.procs[role].wait(30)
        assert code == 1
        log = pair.log_tail(role, 20000)
        assert f"stage {victim} killed by signal 9" in log
    finally:
        pair.stop()
    assert _node_segments(pair, role) == []


def test_demo_with_a_replicated_disk():
    """The guest's disk (NBD, written by the demo's driver thread) is committed with the
    checkpoints: after the final one the secondary's image equals the primary's. The
    secondary's image starts empty: the initial disk sync sends the primary's data (one
    MiB in four of the 32)."""
    r = cli("demo", "--duration", "0", "--until-checkpoints", "4", "--until-disk-writes",
            "25", "--pages", "2048", "--disk-mb", "32", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["memory_equal"] is True
    assert summary["disk_writes"] > 20
    assert summary["disk_equal"] is True
    assert summary["disk_sync_bytes"] == 8 << 20


def test_sigterm_during_an_epoch_exits_cleanly(tmp_path):
    """SIGTERM while a big checkpoint is in flight: exit 0 and no shared memory left."""
    tables = {"guest": {"backend": "sim", "page_count": 16384},
              "guest.workload": {"input_rate_hz": 0.0},
              "checkpoint": {"max_interval_ms": 600000, "min_interval_ms": 0,
                             "dirty_threshold_pages": 1 << 20}}
    pair = LocalPair(tables, workdir=str(tmp_path)).start()
    try:
        pair.wait_protected()
        from pipeline.xen_io.sim import SimDomain
        client = pair.node("primary").stage("client")
        fed = client.as_dict()["outputs"]
        pair.inject_input(SimDomain.write_command(12000))
        wait_until(lambda: client.as_dict()["outputs"] > fed, timeout=60,
                   what="the guest writing its 12000 pages")
        n = len(pair.checkpoints())
        send = pair.node("primary").stage("send")
        sent = send.as_dict()["items_in"]
        pair.request_checkpoint()
        # the big epoch's pages are on their way
        wait_until(lambda: send.as_dict()["items_in"] > sent, timeout=60, interval=0.001)
        for p in pair.procs.values():          # both nodes, mid-epoch
            p.send_signal(signal.SIGTERM)
        codes = {role: p.wait(30) for role, p in pair.procs.items()}
        assert codes == {"primary": 0, "secondary": 0}, (codes, pair.log_tail("primary"))
        assert n >= 2
    finally:
        pair.stop()
    assert _node_segments(pair, "primary") == [] and _node_segments(pair, "secondary") == []


def test_stats_table_and_prometheus_text(tmp_path):
    with LocalPair(SMALL, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected()
        pair.wait_checkpoints(4)
        table = cli("stats", "--node", pair.name("primary")).stdout
        for word in ("items/s", "busy %", "wait %", "ring hw", "PVM pause p50/p99",
                     "skipped by hash", "digest.0", "send"):
            assert word in table, table
        prom = cli("stats", "--node", pair.name("primary"), "--prometheus").stdout
        assert "colo_role" in prom and "colo_checkpoints_total" in prom


def test_verify_every_proves_every_other_checkpoint_on_both_nodes():
    """checkpoint.verify_every = 2: every second paused checkpoint carries a full-memory
    blake3 from both nodes; they agree, the hash time is recorded apart from the pause, and
    the checkpoints in between carry none."""
    tables = dict(SMALL, checkpoint={**SMALL["checkpoint"], "verify_every": 2})
    with LocalPair(tables, log_level="info") as pair:
        pair.start()
        pair.wait_protected()
        rows = [r for r in pair.wait_checkpoints(8) if r["status"] == 0]
        info = pair.node("primary").node_info()
        mismatches = pair.stage_counter("coordinator", "memory_mismatches")
        log = pair.log_tail("primary", 200000)
    paused = [r for r in rows if r["pvm_pause_ns"] > 0]
    verified = [r for r in paused if r["pvm_verify_ns"] > 0]
    assert verified, rows
    assert all(r["pvm_verify_ns"] < r["pvm_pause_ns"] for r in verified)
    assert len(verified) <= len(paused) // 2 + 1
    assert log.count("event=verified memory_equal=True") >= len(verified) - 1
    assert "memory_equal=False" not in log
    assert info["memory_equal"] is True and info["pvm_digest"] == info["svm_digest"]
    assert mismatches == 0


@pytest.mark.parametrize("offset,channel", [(0, "pages"), (1, "control"), (2, "inputs")])
def test_a_port_in_use_stops_the_node_naming_the_channel(tmp_path, offset, channel):
    pair = LocalPair(SMALL, workdir=str(tmp_path))
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", pair.port + offset))
        taken.listen(1)
        pair.start_node("secondary")
        pair.expect_refused("secondary", f"the {channel} channel cannot listen on "
                                         f"tcp://127.0.0.1:{pair.port + offset}")
    finally:
        taken.close()
        pair.stop()


def test_a_low_open_files_limit_is_raised_or_refused_by_name(tmp_path):
    """RLIMIT_NOFILE too low: a soft limit under the hard one is raised and the pair
    protects the guest; a hard limit too low is refused at start with a line naming it
    (nothing created). Before, libzmq aborted a stage (epoll: too many open files)."""
    pair = LocalPair(SMALL, workdir=str(tmp_path))
    try:
        pair.start_node("secondary", rlimits={"NOFILE": (32, 4096)})
        pair.start_node("primary")
        pair.wait_protected()
        assert pair.stop() == {"secondary": 0, "primary": 0}
        pair.start_node("secondary", rlimits={"NOFILE": (32, 32)})
        pair.expect_refused("secondary", "RLIMIT_NOFILE is 32 (hard limit 32)")
    finally:
        pair.stop()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a private /dev/shm needs root and unshare (util-linux)")
@pytest.mark.parametrize("size", ["2m", "40m"])
def test_a_full_dev_shm_is_refused_by_name_and_leaves_nothing(tmp_path, size):
    """/dev/shm too small for the node's rings and staging (a private tmpfs in a mount
    namespace of its own, so the machine's /dev/shm is not touched): the node exits 1
    with a line naming the segment and /dev/shm, and no segment is left behind."""
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 4096}}, workdir=str(tmp_path))
    try:
        pair.start_node("secondary", shm_size=size)
        log = pair.expect_refused("secondary", "No space left on device")
        assert "in /dev/shm" in log, log
    finally:
        pair.stop()
