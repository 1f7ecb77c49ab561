"""The Xen lab end to end: on a real Xen 4.17 hypervisor booted under QEMU TCG, `colo-pipeline
primary` and `colo-pipeline secondary` (xen backend) replicate a running PVH guest, prove every
checkpoint by both nodes' full-memory blake3, and fail over. Opt-in (``pytest -m xenlab``): it needs root, network access
to the Debian mirrors on a clean machine, and 5-60 minutes (a loaded host: up to two boots of 40 minutes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "scripts" / "xen-lab" / "run.sh"

def asked_for(markexpr: str) -> bool:
    """Whether pytest's ``-m`` expression asks for the lab: it names ``xenlab`` and does not
    exclude it. pyproject's ``addopts = -m 'not xenlab'`` keeps it out only while no other ``-m``
    is given: the fast subset's ``-m "not slow and not root and not qemu"`` replaced it, and on a
    machine with the lab's build a developer's fast subset booted the lab for real beside the lab
    helper's own run (issue 17, session 19)."""
    expr = " ".join(markexpr.split())
    return "xenlab" in expr and "not xenlab" not in expr


@pytest.mark.xenlab
@pytest.mark.timeout(7500)
def test_lab_replicates_a_pvh_guest_and_fails_over(request) -> None:
    if not asked_for(request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: pytest -m xenlab (another -m replaced pyproject's 'not xenlab')")
    if os.geteuid() != 0:
        pytest.skip("the Xen lab needs root (apt-get, debootstrap, chroot)")
    if shutil.which("apt-get") is None:
        pytest.skip("the Xen lab builds its images with apt-get (Debian hosts only)")
    r = subprocess.run([str(RUN), "--ci"], check=False, capture_output=True, text=True, timeout=7400)
    if r.returncode == 75:      # run.sh: another lab run holds the lab's lock
        pytest.skip(r.stdout.strip().splitlines()[-1])
    lines = r.stdout.strip().splitlines()
    assert lines, f"the lab printed nothing; stderr:\n{r.stderr[-3000:]}"
    verdict = lines[-1]
    assert verdict.startswith("VERDICT: PASS"), f"{verdict}\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    assert r.returncode == 0


@pytest.mark.parametrize("expr, asked", [
    ("xenlab", True), ("xenlab and not slow", True),
    ("not slow and not root and not qemu", False),     # the fast subset (docs/testing.md)
    ("not xenlab", False), ("not  xenlab", False), ("", False),
])
def test_the_lab_runs_only_when_asked_for_by_name(expr: str, asked: bool) -> None:
    assert asked_for(expr) is asked
