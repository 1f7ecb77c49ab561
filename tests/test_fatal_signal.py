"""A native crash names itself (issue 13).

The secondary's restore stage was "killed by signal 11" twice in session 12 and nothing
in the node's log said where: pure Python cannot segfault, native code under it did
(numpy over shared memory, ``_pagehash``, lz4, blake3, libzmq), and a process killed by
SIGSEGV prints nothing by itself. Every process the pipeline starts now enables
``faulthandler`` for all its threads (``pipeline.signals.report_fatal_signals``), so the
Python frames of each thread are in the log before the process dies.

The crash here is real: a real node (``colo-pipeline run``, its supervisor forking its
stages), whose restore stage raises a real SIGSEGV in itself at a named point
(``COLO_FAULT=stage.restore.loop:2:segv``, ``faulthandler._sigsegv``: raise(SIGSEGV)
from C). Without the faulthandler line the log has the fault's line and the
supervisor's "killed by signal 11", and no frame.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from pipeline.localpair import LocalPair

FRAME = r'File "[^"]*{path}", line \d+ in {function}'


@pytest.mark.slow   # starts a real node
def test_a_stage_killed_by_sigsegv_leaves_its_python_frames_in_the_node_log(tmp_path):
    with LocalPair({"guest": {"backend": "sim", "page_count": 256}},
                   workdir=str(tmp_path), log_level="info") as pair:
        # the secondary alone: its restore stage turns its loop (pass 1) and crashes at
        # the next turn (pass 2), whether or not a primary ever comes
        pair.start(roles=("secondary",), faults={"secondary": "stage.restore.loop:2:segv"})
        code = pair.wait_exit("secondary", timeout=120)
        log = pair.log_tail("secondary", 1 << 22)
    assert "COLO_FAULT fired: stage.restore.loop pass 2 segv pid" in log, log[-3000:]
    # the supervisor still says which stage died and how, and stops the node
    assert code == 1, log[-3000:]
    assert "stage restore killed by signal 11 (SIGSEGV: a crash in native code; the Python " \
           "frames of its threads are above in this log" in log, log[-3000:]
    # faulthandler's dump: the crashing thread names the restore stage's function ...
    assert "Fatal Python error: Segmentation fault" in log, log[-3000:]
    crash = log[log.index("Fatal Python error: Segmentation fault"):]
    current = crash[crash.index("Current thread"):]
    assert re.search(FRAME.format(path="pipeline/stages/restore.py", function="run"),
                     current), crash[:3000]
    assert re.search(FRAME.format(path="pipeline/stages/common.py", function="stage_main"),
                     current), crash[:3000]
    # ... and the stage's other threads are dumped too (its SIGTERM thread, signals.py)
    assert re.search(FRAME.format(path="pipeline/signals.py", function="stopper"),
                     crash[:crash.index("Current thread")]), crash[:3000]


def test_the_segv_action_raises_a_real_sigsegv_at_the_nth_pass():
    child = ("from pipeline import faults\n"
             "for i in range(1, 4):\n"
             "    faults.point('demo.step')\n"
             "    print('passed', i, flush=True)\n")
    env = dict(os.environ, COLO_FAULT="demo.step:2:segv")
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == -signal.SIGSEGV, p
    assert p.stdout.split() == ["passed", "1"]
    assert "COLO_FAULT fired: demo.step pass 2 segv pid" in p.stderr
