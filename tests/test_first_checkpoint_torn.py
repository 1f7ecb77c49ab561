"""A new secondary whose first checkpoint is torn keeps its SVM paused and is synced again.

Before its first checkpoint commits, the SVM has never run and holds no vCPU state: there
is no checkpoint to roll it back to. The fault matrix's partition rows caught a secondary
that resumed it anyway after a torn first checkpoint (the sim SVM then asked its mirror
for input 0, long trimmed: ``InputLogEntryGone``), and took the primary's next full sync
for a stale secondary's. The first checkpoint is torn here at the named point
``restore.assembled`` (pass 1: the first epoch that is not part of the sync), not by a
timing: the pair must end protected (the primary starts the sync over, the secondary
takes it), with equal memories and the guest's inputs intact.
"""
from __future__ import annotations

import pytest

from pipeline import faults
from pipeline.localpair import LocalPair

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_torn_first_checkpoint_leaves_the_svm_paused_and_the_sync_starts_over(tmp_path):
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": 2048},
        "guest.workload": {"seed": 5, "input_rate_hz": 250.0, "pages_per_input": 8},
        "checkpoint": {"max_interval_ms": 150, "min_interval_ms": 5,
                       "epoch_timeout_ms": 60_000},
    }, workdir=str(tmp_path), log_level="info")
    with pair:
        pair.start(faults={"secondary": "restore.assembled:1:errno=EIO"})
        pair.wait_protected(timeout=300)
        log = pair.log_tail("secondary", 1 << 24)
        assert faults.fired_line("restore.assembled", 1, "errno=EIO") in log
        assert "StaleSecondary" not in log and "InputLogEntryGone" not in log, log[-3000:]
        assert pair.stage_counter("coordinator", "sync_restarts") == 1
        assert pair.stage_counter("restore", "epochs_aborted", role="secondary") == 1
        # the SVM ran only from the checkpoint that committed: both memories equal, and
        # both nodes alive (a resumed SVM without vCPU state stopped the secondary)
        info = pair.prove_memory_equal(timeout=300)
        assert info["memory_equal"] is True, info
        pair.check_alive()
