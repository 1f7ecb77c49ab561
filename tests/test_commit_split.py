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


def test_the_batches_a_checkpoint_is_dealt_in_are_counted_and_shown(tmp_path):
    """The snapshot stage counts the batches it deals a checkpoint's pages in to the digest
    workers (checkpoint_batches, over checkpoints_dealt), and `stats` shows them per
    checkpoint: a prescan bug dealt 2048 pages as 46-80 batches instead of 2 (session 17),
    seen only in a trace. pipeline.batch_pages = 32: 500-odd pages go as 16-17 batches of
    at most 32 (snapshot.checkpoint_batch: an equal share per worker, at most a slot)."""
    batch = 32
    with LocalPair({
        "guest": {"backend": "sim", "page_count": 4096},
        "guest.workload": {"seed": 3, "input_rate_hz": 0.0},
        "checkpoint": {"max_interval_ms": 3_600_000, "min_interval_ms": 0},
        "pipeline": {"batch_pages": batch},
    }, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected(timeout=300)
        # (the initial sync's last step is a checkpoint too, counted; nothing runs now:
        # no inputs, no timer)
        before = pair.node("primary").stage("snapshot").as_dict()
        count = len(pair.checkpoints())
        assert before["checkpoints_dealt"] >= 1
        seq = pair.stage_counter("client", "pvm_input_seq")
        pair.inject_input(SimDomain.write_command(500))
        wait_until(lambda: pair.stage_counter("client", "pvm_input_seq") > seq
                   and pair.stage_counter("mirror", "svm_input_seq", role="secondary") > seq,
                   120, "both guests ran the write command")
        pair.request_checkpoint()
        wait_until(lambda: any(c["pages_dirty"] >= 500 for c in pair.checkpoints()[count:]),
                   300, "the checkpoint of the 500 pages")

        def dealt_in(pages: int) -> int:       # equal shares for 2 workers, <= 32 each
            return -(-pages // max(1, min(batch, -(-pages // 2))))
        # every checkpoint since (a dirty-threshold one may have come before the asked
        # one): its batches, by its dirty set (the snapshot buffer holds all 4096 pages:
        # none overflows into the rings)
        cps = pair.checkpoints()[count:]
        assert all(c["status"] == 0 for c in cps), cps
        got = pair.node("primary").stage("snapshot").as_dict()
        assert got["checkpoints_dealt"] - before["checkpoints_dealt"] == len(cps), (got, cps)
        assert got["checkpoint_batches"] - before["checkpoint_batches"] == \
            sum(dealt_in(c["pages_dirty"]) for c in cps), (got, [c["pages_dirty"] for c in cps])
        assert max(dealt_in(c["pages_dirty"]) for c in cps) >= 16
        out = cli("stats", "--config", pair.configs["primary"])
        assert out.returncode == 0, out.stderr
        ratio = got["checkpoint_batches"] / got["checkpoints_dealt"]
        assert (f"batches to the digest workers per checkpoint {ratio:.1f} "
                f"({got['checkpoint_batches']} in {got['checkpoints_dealt']} "
                f"checkpoints)") in out.stdout, out.stdout
