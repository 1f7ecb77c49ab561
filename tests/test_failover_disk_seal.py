"""A primary lost between the end of an epoch and its disk seal (issue: the demo's
secondary stopped in epoch 10, its commit waiting 3 x 10 s for a seal that could never
come). The primary's seal of epoch e is lost on the way (``disk.primary.seal``,
``errno``: never sent, as with a primary killed while it was still queued): the
secondary has e's pages and END but no seal; once it waits for it, the primary's host is
lost. The secondary must give e up whole (memory and disk) and take over from the last
committed checkpoint; its guest's disk writes go on without one failing.

Every wait is for an event (a fault line, a log line, a node-info state), never for time.
"""
from __future__ import annotations

import os
import re

import pytest

from conftest import wait_until
from test_failover import TABLES
from test_failover_disk import SVM_WRITES, GuestDisk, became_primary, disk_tables

from pipeline.localpair import HostPair

pytestmark = pytest.mark.slow

#: the seal lost: the k-th the primary sends (a few checkpoints after the sync)
LOST_SEAL = 6
#: no epoch is torn by its timeout while the test looks (the loss tears it)
SLOW_TABLES = {**TABLES, "checkpoint": {**TABLES["checkpoint"], "epoch_timeout_ms": 120_000}}


def test_a_primary_lost_before_its_disk_seal_is_taken_over_from_the_last_checkpoint(tmp_path):
    pair = HostPair(SLOW_TABLES, workdir=str(tmp_path / "pair"), role_tables=disk_tables())
    exports = {h: os.path.join(pair.workdir, f"{h}-disk.nbd") for h in ("a", "b")}
    drivers: list[GuestDisk] = []
    try:
        pair.start_node("a", fault=f"disk.primary.seal:{LOST_SEAL}:errno=EIO")
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        pair.start_node("b")
        pair.wait_protected(timeout=240)
        guest_b = GuestDisk(exports["b"], 2)      # the SVM's disk driver
        drivers.append(guest_b)
        guest_b.wait_done(guest_b.allow(SVM_WRITES), "b's guest writes (SVM)")
        guest_a = GuestDisk(exports["a"], 1)      # the PVM's: its writes go into epochs
        drivers.append(guest_a)
        guest_a.allow(1 << 30)
        pair.wait_fault_fired("a", "disk.primary.seal", LOST_SEAL, timeout=240)
        lost = wait_until(lambda: re.search(r"the seal of epoch (\d+) was lost",
                                            pair.log_tail("a", 1 << 24)),
                          timeout=60, what="a's log naming the epoch of the lost seal")
        held = int(lost.group(1))
        waiting = f"waiting for the primary's seal of epoch {held} "
        wait_until(lambda: waiting in pair.log_tail("b", 1 << 24), timeout=240,
                   what=f"b waiting for the seal of epoch {held}")
        pair.kill("a")                            # the primary's host is lost
        info = became_primary(pair, "b", 1, "b taking over and becoming the primary")
        log = pair.log_tail("b", 1 << 24)
        # the epoch was given up whole (the restore stage's discard: memory), and nothing
        # of it was committed (no disk commit failed, no half-applied SVM)
        gave_up = re.search(rf"epoch {held} discarded: .*the SVM stays at epoch (\d+)", log)
        assert gave_up, log[-3000:]
        # ... and the takeover went on from the checkpoint the SVM was rolled back to
        assert f"epoch={gave_up.group(1)} event=takeover " in log, log[-3000:]
        assert "disk_commit_failed" not in log and "StaleSecondary" not in log, log[-3000:]
        assert info.get("state") == "unprotected", info
        # the survivor's guest writes on through all of it
        guest_b.wait_done(guest_b.allow(SVM_WRITES), "b's guest writes after the takeover")
        assert not guest_b.errors, guest_b.errors
    finally:
        for d in drivers:
            d.stop()
        pair.stop()
