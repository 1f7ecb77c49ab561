"""The Xen lab's own checks, which decide its verdict, on made-up console and log lines (the
lab itself needs a Xen hypervisor: tests/test_xen_lab.py, opt-in)."""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

from pipeline.cli import JsonLogFormatter

LAB_DOM0 = Path(__file__).resolve().parents[1] / "scripts" / "xen-lab" / "dom0" / "lab_dom0.py"


@pytest.fixture(scope="module")
def lab():
    spec = importlib.util.spec_from_file_location("lab_dom0", LAB_DOM0)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lab_dom0"] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["lab_dom0"]


def test_failover_passes_when_the_secondary_covers_the_primary_without_gaps(lab):
    prim = [(n, 0) for n in range(100, 161)]
    # the secondary was behind (paused during epochs), then ran on past the primary's last tick
    sec_after = [(n, 0) for n in range(150, 175)] + [(152, 0)]   # a repeat after a rollback is fine
    fo = lab.failover_summary(prim, sec_after)
    assert fo["gapless"] and fo["covers_primary"] and fo["err_lines"] == 0
    assert (fo["primary_last_n"], fo["secondary_first_n"], fo["secondary_last_n"]) == (160, 150, 174)


@pytest.mark.parametrize("sec_after, broken", [
    ([(n, 0) for n in range(150, 161)], "covers_primary"),            # stopped where the primary did
    ([(n, 0) for n in range(163, 175)], "covers_primary"),            # skipped ticks 161, 162
    ([(n, 0) for n in list(range(150, 158)) + list(range(159, 175))], "gapless"),
    ([], "gapless"),
])
def test_failover_fails_when_the_secondary_stops_skips_or_has_gaps(lab, sec_after, broken):
    fo = lab.failover_summary([(n, 0) for n in range(100, 161)], sec_after)
    assert not fo[broken]


def test_failover_counts_self_check_errors_after_the_kill(lab):
    fo = lab.failover_summary([(1, 0)], [(2, 0), (3, 1), (4, 0)])
    assert fo["err_lines"] == 1


def test_log_events_reads_the_nodes_json_log_lines(lab, tmp_path, monkeypatch):
    """The fields the lab takes from the primary's log, written by the CLI's own formatter."""
    fmt = JsonLogFormatter()

    def line(msg: str) -> str:
        return fmt.format(logging.LogRecord("pipeline.coordinator", logging.INFO, __file__, 1, msg, None, None))
    (tmp_path / "primary.log").write_text("\n".join([
        line("epoch=4 event=verified memory_equal=True pvm_digest=ab svm_digest=ab verify_ms=3.1"),
        "not json at all",
        line("epoch=5 event=checkpoint status=committed cause=timer"),
        line("epoch=5 event=verified memory_equal=False pvm_digest=ab svm_digest=cd verify_ms=3.0"),
        json.dumps({"level": "INFO"}),
    ]) + "\n")
    monkeypatch.setattr(lab, "RUN", tmp_path)
    rows = lab.log_events("primary", "verified")
    assert [(r["epoch"], r["memory_equal"]) for r in rows] == [("4", "True"), ("5", "False")]
    assert lab.log_events("primary", "checkpoint")[0]["cause"] == "timer"
