"""CI's Xen lab step (scripts/xen-lab/ci.sh): where it runs the lab, where it skips and says why,
and how the lab's verdict becomes CI's exit status. The lab itself boots a hypervisor under
QEMU for minutes (tests/test_xen_lab.py, opt-in), so here the lab's command is a stand-in
script (a mock of the lab, named so: COLO_CI_XENLAB_RUN) and the build a set of placeholder
files; what is tested is ci.sh's own decisions."""
from __future__ import annotations

import fcntl
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

CI_SH = Path(__file__).resolve().parents[1] / "scripts" / "xen-lab" / "ci.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ci.sh runs the lab only as root; these cases need root")

#: what ci.sh takes for a lab build in $XENLAB_DIR
BUILD = ("xen-shadow", "vmlinuz", "rootfs/usr/lib/xen-4.17/bin/xl",
         "rootfs/usr/local/lib/python3.11/dist-packages/numpy")


@pytest.fixture
def lab(tmp_path: Path):
    """A lab directory, a stand-in for the lab's command and stand-ins for the host programs
    ci.sh looks for (so the cases do not depend on this host's packages)."""
    d = tmp_path / "xenlab"
    d.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("qemu-system-x86_64", "gcc", "cpio"):
        (bin_dir / prog).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / prog).chmod(0o755)
    standin = tmp_path / "lab-standin.sh"
    # the stand-in records that it ran and with what, prints $STANDIN_OUT, exits $STANDIN_RC
    standin.write_text('#!/bin/bash\necho "$@" > "$XENLAB_DIR/standin-ran"\necho $$ > "$XENLAB_DIR/standin-pid"\nprintf "%b" "$STANDIN_OUT"\n'
                       '[ -z "${STANDIN_BLOCK:-}" ] || exec sleep 600\nexit "${STANDIN_RC:-0}"\n')
    standin.chmod(0o755)

    def make_build() -> None:
        for f in BUILD:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text("placeholder")

    def run(**env: str) -> subprocess.CompletedProcess:
        full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XENLAB_DIR": str(d),
                "COLO_CI_XENLAB_RUN": str(standin), "COLO_CI_START_S": str(int(time.time())), **env}
        for k in ("COLO_CI_XENLAB", "COLO_CI_XENLAB_BUDGET_S", "COLO_CI_XENLAB_BUILD", "COLO_CI_BUDGET_S"):
            if k not in env:
                full.pop(k, None)
        return subprocess.run(["bash", str(CI_SH)], env=full, capture_output=True, text=True, timeout=120)

    run.dir = d
    run.make_build = make_build
    run.ran = lambda: (d / "standin-ran").read_text().split() if (d / "standin-ran").exists() else None
    return run


def test_turned_off_skips_and_says_so(lab) -> None:
    lab.make_build()
    r = lab(COLO_CI_XENLAB="0")
    assert r.returncode == 0
    assert "XENLAB-CI: SKIP turned off (COLO_CI_XENLAB=0)" in r.stdout
    assert lab.ran() is None


def test_without_a_build_it_skips_naming_what_is_missing_and_how_to_build(lab) -> None:
    r = lab()
    assert r.returncode == 0
    assert "XENLAB-CI: SKIP no Xen lab build" in r.stdout
    assert "xen-shadow" in r.stdout and "scripts/xen-lab/build.sh" in r.stdout
    assert lab.ran() is None


def test_too_little_of_cis_budget_left_after_the_suite_skips(lab) -> None:
    lab.make_build()
    # the suite took 18 of CI's 20 minutes
    r = lab(COLO_CI_START_S=str(int(time.time()) - 18 * 60))
    assert r.returncode == 0
    assert "left of CI's budget, less than the lab's 300s" in r.stdout
    assert lab.ran() is None


def test_a_lab_run_holding_the_lock_is_not_waited_for(lab) -> None:
    lab.make_build()
    with open(f"{lab.dir}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = lab()
    assert r.returncode == 0
    assert "SKIP another Xen lab run holds" in r.stdout
    assert lab.ran() is None


def test_a_pass_verdict_passes_and_the_lab_ran_in_ci_mode(lab) -> None:
    lab.make_build()
    r = lab(STANDIN_OUT="BOOT: dom0 ready after 30.0s\\nVERDICT: PASS colo-pipeline xen backend: 3 checkpoints\\n")
    assert r.returncode == 0, r.stdout
    assert lab.ran() == ["--ci"]
    assert "build reused=yes" in r.stdout and "BOOT: dom0 ready" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("VERDICT: PASS")


def test_a_boot_repeated_for_the_platform_is_shown_in_cis_output(lab) -> None:
    """A PVM that died after proven checkpoints earns one more boot (lab.py,
    fault_after_checkpoints); CI's output of a PASS (no log tail) says why the lab booted twice."""
    lab.make_build()
    r = lab(STANDIN_OUT="PLATFORM FAULT (boot 1, the PVM died; log x): after 14 proven checkpoints, the PVM "
                        "prim died\\nBOOT: dom0 ready after 31.0s\\nVERDICT: PASS colo-pipeline xen backend: "
                        "3 checkpoints | boots 2, repeated after early or platform faults: 1\\n")
    assert r.returncode == 0, r.stdout
    assert "PLATFORM FAULT (boot 1, the PVM died" in r.stdout


@pytest.mark.parametrize("out, rc", [
    ("VERDICT: FAIL colo-pipeline xen backend: memory-equal=3/4\\n", 1),   # the lab's own verdict
    ("Traceback (most recent call last):\\n", 1),                           # no verdict: the lab broke
    ("VERDICT: FAIL build (see build-run.log)\\n", 1),                      # packing this tree failed
])
def test_a_failed_lab_fails_ci(lab, out: str, rc: int) -> None:
    lab.make_build()
    r = lab(STANDIN_OUT=out, STANDIN_RC=str(rc))
    assert r.returncode == 1, r.stdout
    assert "SKIP" not in r.stdout


def test_a_fresh_build_that_failed_skips_when_ci_was_allowed_to_build(lab) -> None:
    (lab.dir / "build-run.log").write_text("E: Failed to fetch http://deb.debian.org/...\n")
    r = lab(COLO_CI_XENLAB_BUILD="1", STANDIN_OUT="VERDICT: FAIL build (see build-run.log)\\n", STANDIN_RC="1")
    assert r.returncode == 0
    assert "SKIP the lab's build failed: E: Failed to fetch" in r.stdout
    assert lab.ran() == ["--ci"]


def test_a_lab_over_its_budget_is_stopped_and_skipped_not_failed(lab) -> None:
    lab.make_build()
    r = lab(COLO_CI_XENLAB_BUDGET_S="3", COLO_CI_XENLAB_MIN_S="1", STANDIN_BLOCK="1")
    assert r.returncode == 0
    assert "SKIP the lab did not finish within the 3s left of CI's budget" in r.stdout
    assert lab.ran() == ["--ci"]
    # the stopped lab leaves no process behind (timeout signals the whole process group)
    pid = int((lab.dir / "standin-pid").read_text())
    try:    # a pidfd becomes readable when its process exits: an event, no polling
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None                               # already gone
    if pidfd is not None:
        try:
            select.select([pidfd], [], [], 60)
        finally:
            os.close(pidfd)
    assert not _alive(pid), f"the stand-in lab (pid {pid}) outlived ci.sh's timeout"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"   # a zombie has exited
    except (ProcessLookupError, FileNotFoundError):
        return False
