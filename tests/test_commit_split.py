"""Where each checkpoint's commit time went (issue 13, item 3): the primary's checkpoint
log and `colo-pipeline stats` split it into PVM pause, transfer, apply and ACK, the
secondary's two durations riding in the ACK. And pages the SVM already holds (item 4):
with deterministic guests that ran the same input, they go as SVM pages, without their
content, and the memory proof still holds."""
from __future__ import annotations

import json

import pytest
from conftest import cli, wait_until

from pipeline.localpair import LocalPair
from pipeline.xen_io.sim import SimDomain

pytestmark = pytest.mark.slow  # starts real node processes


def test_each_commit_is_split_into_pause_transfer_apply_and_ack(tmp_path):
    with LocalPair({
        "guest": {"backend": "sim", "page_count": 4096},
        "guest.workload": {"seed": 3, "input_rate_hz": 0.0},
        "checkpoint": {"max_interval_ms": 3_600_000, "min_interval_ms": 0},
    }, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected(timeout=300)
        seq = pair.stage_counter("client", "pvm_input_seq")
        pair.inject_input(SimDomain.write_command(500))
        wait_until(lambda: pair.stage_counter("client", "pvm_input_seq") > seq
                   and pair.stage_counter("mirror", "svm_input_seq", role="secondary") > seq,
                   120, "both guests ran the write command")
        count = len(pair.checkpoints())
        pair.request_checkpoint()
        cp = pair.wait_checkpoints(count + 1, timeout=300)[-1]
        assert cp["status"] == 0 and cp["pages_dirty"] >= 500
        # every part was measured, and they add up to no more than the commit itself
        assert cp["pvm_pause_ns"] > 0 and cp["transfer_ns"] > 0 and cp["apply_ns"] > 0
        parts = cp["pvm_pause_ns"] + cp["transfer_ns"] + cp["apply_ns"] + cp["ack_ns"]
        assert parts <= cp["commit_ns"] + 1_000, (parts, cp)
        out = cli("stats", "--config", pair.configs["primary"], "--json")
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout.strip().splitlines()[-1])["summary"]
        assert summary["apply_ms_p50"] > 0 and "transfer_ms_p50" in summary
        # the SVM ran the same write: its pages went as SVM pages, not as content
        assert cp["pages_same_as_svm"] > 0
        assert (cp["pages_same_as_svm"] + cp["pages_zero"] + cp["pages_skipped_hash"]
                == cp["pages_dirty"]), cp
        assert summary["pages_same_as_svm"] >= cp["pages_same_as_svm"]
        info = pair.prove_memory_equal()
        assert info["memory_equal"], info
