"""A replication limit never fails the guest's write (issue 18): the whole pair, real
processes, a real NBD client on the primary's export.

The secondary's disk buffer is bounded at 256 KiB; the guest writes 1 MiB in one request
inside one epoch, so the bound is reached whatever the checkpoints' timing. The write
succeeds (the primary's image has it); the secondary acks it as given up, its commit of
that epoch fails naming the bound, and its coordinator stops it as stale (never an image
without the write taken for a checkpoint, no retry that cannot help). The primary hears
its secondary lost and runs on unprotected, the guest writing on (its node info and
``stats`` say why: ``disk_given_up`` names the bound); the secondary, started
again on its image and state, rejoins with a new disk sync: memories and both images
equal."""
from __future__ import annotations

import os

import blake3
import pytest

from conftest import free_port, wait_until
from test_failover import TABLES

from pipeline.cli import _stats_table
from pipeline.disk.nbd_client import NbdClient
from pipeline.localpair import LocalPair

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MiB = 1 << 20
BOUND = 256 * 1024


def _image_hash(pair: LocalPair, role: str) -> str:
    with open(os.path.join(pair.workdir, f"{role}.img"), "rb") as f:
        return blake3.blake3(f.read()).hexdigest()


def test_a_full_secondary_buffer_unprotects_the_pair_and_the_write_succeeds(tmp_path):
    disk = {"export_size": 8 * MiB, "durable_commit": False, "buffer_max_bytes": BOUND,
            "forward": f"tcp://127.0.0.1:{free_port()}"}
    roles = {r: {"disk": {**disk, "image": f"{{workdir}}/{r}.img",
                          "export": f"unix:{{workdir}}/{r}.nbd"}}
             for r in ("primary", "secondary")}
    pair = LocalPair(TABLES, workdir=str(tmp_path), role_tables=roles)
    client = None
    try:
        pair.start()
        pair.wait_protected(timeout=300)
        client = NbdClient(f"nbd+unix:///?socket={tmp_path}/primary.nbd", timeout=120)
        big = os.urandom(MiB)
        client.write(MiB, big)                   # more than the bound in one epoch
        client.write(4 * MiB, b"\x5a" * 65536)
        sec = pair.procs["secondary"]
        wait_until(lambda: sec.poll() is not None, 240, "the secondary stopping as stale")
        pair.wait_exit("secondary", timeout=60)
        log = pair.log_tail("secondary", 1 << 22)
        assert "gave the disk replication up" in log and f"bound {BOUND}" in log, log[-3000:]
        assert "disk_commit_failed" not in log, log[-3000:]    # no pointless retries
        wait_until(lambda: pair.stage_counter("coordinator", "peer_lost", "primary") > 0,
                   240, "the primary giving its secondary up")
        # the primary's node info (and stats) says why the disk replication ended
        node = pair.node("primary")
        wait_until(lambda: "disk_given_up" in node.node_info(), 60,
                   "the primary's node info naming the disk's give-up")
        given_up = node.node_info()["disk_given_up"]
        assert given_up["cause"] == "buffer" and f"bound {BOUND}" in given_up["reason"], \
            given_up
        table = _stats_table(node.snapshot(), None, 1.0)
        assert "disk replication given up" in table and f"bound {BOUND}" in table, table
        plog = pair.log_tail("primary", 1 << 22)
        assert "the secondary gave the replication up" in plog, plog[-3000:]
        disk = pair.node("primary").stage("disk").as_dict()
        assert disk["forward_errors"] == 0 and disk["given_up"] >= 1
        client.write(6 * MiB, b"\x6b" * 65536)     # unprotected: the guest writes on
        client.flush()
        pair.start_node("secondary")               # the rejoin: a new disk sync
        pair.wait_protected(timeout=300)
        assert pair.prove_memory_equal(timeout=240).get("memory_equal") is True
        assert _image_hash(pair, "primary") == _image_hash(pair, "secondary")
        with open(tmp_path / "secondary.img", "rb") as f:
            f.seek(MiB)
            assert f.read(MiB) == big
    finally:
        if client is not None:
            client.close()
        pair.stop()
