"""config/systemd/colo-pipeline@.service: valid for systemd, and runs a real subcommand."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "config", "systemd", "colo-pipeline@.service")


def parse_unit(path: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = pending + raw.rstrip("\n")
            pending = ""
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            if stripped.endswith("\\"):
                pending = stripped[:-1] + " "
                continue
            if stripped.startswith("[") and stripped.endswith("]"):
                current = sections.setdefault(stripped[1:-1], {})
                continue
            assert current is not None, f"{path}: {stripped!r} before any section"
            key, sep, value = stripped.partition("=")
            assert sep, f"{path}: {stripped!r} is not KEY=VALUE"
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values and len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def _subcommands() -> set[str]:
    r = cli("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^positional arguments:\n\s+\{([a-z0-9_,-]+)\}", r.stdout, re.MULTILINE)
    assert m, r.stdout
    return set(m.group(1).split(","))


def test_exec_start_runs_an_existing_subcommand():
    unit = parse_unit(UNIT)
    argv = shlex.split(_one(unit, "Service", "ExecStart"))
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) == "colo-pipeline"
    args = argv[1:]
    # global options (e.g. --log-level LEVEL) may come before the subcommand
    while args and args[0].startswith("-"):
        args = args[2:] if "=" not in args[0] else args[1:]
    assert args, argv
    sub = args[0]
    assert sub in _subcommands(), (f"ExecStart runs `colo-pipeline {sub}`, which "
                                   f"`colo-pipeline --help` does not list (`run --config F` "
                                   "runs the role F's node.role names)")
    assert args[1:] == ["--config", "/etc/colo-pipeline/%i.toml"], argv
    # and the subcommand takes those options
    r = cli(sub, "--help", timeout=60)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr


def test_stop_and_restart_policy():
    unit = parse_unit(UNIT)
    s = unit["Service"]
    assert _one(unit, "Service", "Type") == "simple"
    assert _one(unit, "Service", "KillSignal") == "SIGTERM"
    # SIGTERM to the supervisor only: it stops its own stages and unlinks shared memory
    assert _one(unit, "Service", "KillMode") == "mixed"
    from pipeline.supervisor import STOP_GRACE_S
    assert int(_one(unit, "Service", "TimeoutStopSec")) > STOP_GRACE_S + 10
    assert _one(unit, "Service", "Restart") == "on-failure"
    # a bad config (exit 2) must not restart-loop
    assert "2" in " ".join(s["RestartPreventExitStatus"]).split()
    assert "SuccessExitStatus" not in s or "2" not in " ".join(s["SuccessExitStatus"]).split()
    assert s["LimitMEMLOCK"] == ["infinity"]
    assert int(_one(unit, "Unit", "StartLimitBurst")) >= 1
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    with open(UNIT, encoding="utf-8") as fh:
        text = fh.read()
    assert "split brain" in text                  # the comment that says why restart is safe


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    exe = shutil.which("colo-pipeline") or os.path.join(os.path.dirname(sys.executable),
                                                        "colo-pipeline")
    if not os.access(exe, os.X_OK):
        pytest.skip("no colo-pipeline executable to point ExecStart at (package not installed)")
    # verify checks that ExecStart's program exists: point it at this installation's
    with open(UNIT, encoding="utf-8") as fh:
        text = fh.read()
    assert "/usr/local/bin/colo-pipeline" in text
    copy = tmp_path / "colo-pipeline@.service"
    copy.write_text(text.replace("/usr/local/bin/colo-pipeline", os.path.realpath(exe)))
    for target in (copy, tmp_path / "colo-pipeline@primary.service"):
        if target != copy:
            os.symlink(copy, target)
        r = subprocess.run([analyze, "verify", "--man=no", str(target)], capture_output=True,
                           text=True, timeout=120, cwd=str(tmp_path))
        ours = [line for line in (r.stdout + r.stderr).splitlines() if "colo-pipeline@" in line]
        assert r.returncode == 0 and not ours, r.stdout + r.stderr
