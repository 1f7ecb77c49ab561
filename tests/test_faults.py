"""The fault hook (pipeline/faults.py): COLO_FAULT parsing and what each action does, in
real child processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline import faults

CHILD = """
from pipeline import faults
for i in range(1, 6):
    try:
        faults.point("demo.step")
        print("passed", i, flush=True)
    except OSError as e:
        print("error", i, e.errno, flush=True)
"""


def run_child(spec: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COLO_FAULT", None)
    if spec is not None:
        env["COLO_FAULT"] = spec
    return subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          env=env, timeout=60)


def test_parse_reads_points_passes_and_actions():
    assert faults.parse("") == {}
    assert faults.parse("a.b") == {"a.b": (1, "kill")}
    assert faults.parse("a.b:3, c:errno=EIO:2 ,d:killgroup,e:stop") == {
        "a.b": (3, "kill"), "c": (2, "errno=EIO"), "d": (1, "killgroup"), "e": (1, "stop")}


@pytest.mark.parametrize("spec,what", [(":3", "no point name"), ("a:0", "count from 1"),
                                       ("a:errno=EWHAT", "not an errno name"),
                                       ("a:explode", "neither a pass number"),
                                       ("a,a:2", "named twice")])
def test_a_malformed_spec_names_what_is_wrong(spec, what):
    with pytest.raises(faults.FaultSpecError, match=what):
        faults.parse(spec)
    p = run_child(spec)   # a process started with it stops at import, naming COLO_FAULT
    assert p.returncode == 1 and "COLO_FAULT" in p.stderr and p.stdout == ""


def test_unset_every_point_is_a_no_op():
    p = run_child(None)
    assert p.returncode == 0 and p.stdout.split() == \
        "passed 1 passed 2 passed 3 passed 4 passed 5".split()
    if not os.environ.get("COLO_FAULT"):
        assert faults.ACTIVE is False and faults.point is faults._nothing


def test_kill_fires_at_exactly_the_nth_pass():
    p = run_child("demo.step:3")
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.split() == "passed 1 passed 2".split()
    assert "COLO_FAULT fired: demo.step pass 3 kill pid" in p.stderr


def test_errno_fails_the_nth_pass_only():
    p = run_child("demo.step:2:errno=EIO,other.point")
    assert p.returncode == 0
    assert p.stdout.split("\n")[:-1] == ["passed 1", "error 2 5", "passed 3", "passed 4",
                                         "passed 5"]


def test_stop_stops_the_process_until_sigcont():
    env = dict(os.environ, COLO_FAULT="demo.step:2:stop")
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                         env=env)
    try:
        assert p.stdout.readline() == "passed 1\n"
        # the stop is an event we can wait for: the process state turns to T
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        os.kill(p.pid, signal.SIGCONT)
        assert p.stdout.read().split() == "passed 2 passed 3 passed 4 passed 5".split()
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
