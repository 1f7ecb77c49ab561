"""The request trace (COLO_REQUEST_TRACE, pipeline/trace.py) follows every request of the
sim service through each hop of a real pair, and scripts/trace_requests.py says which
guest's backlog the slow ones sat in. Timings are not checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import trace_requests  # noqa: E402

EVERY_HOP = ("client_due", "pvm_fed", "pvm_begin", "pvm_emit", "pvm_out", "mirrored",
             "svm_recv", "svm_fed", "svm_begin", "svm_emit", "svm_out", "client_got")


def test_every_answered_request_has_its_whole_timeline(tmp_path):
    prefix = str(tmp_path / "t")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_service.py"), "--modes", "colo",
         "--nondeterminism", "0", "--rates", "200", "--outstanding", "--duration", "2",
         "--pages", "2048", "--json", "--trace-requests", prefix],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "request trace" in proc.stderr and "slow requests by cause" in proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])["rows"][0]
    reqs, pauses = trace_requests.load(f"{prefix}-colo-0.0.trace")
    # every request the client timed (the probe before them is not): each one it sent
    # (~400 in 2 s at 200/s; fewer when the loaded client wakes past the window's end)
    answered = [ev for ev in reqs.values() if "client_due" in ev]
    assert row["lost"] == 0 and len(answered) == row["sent"] >= 200, row
    for ev in answered:
        assert set(EVERY_HOP) <= set(ev), sorted(ev)
        # one clock for every process: each copy's hops in path order
        # (the answer may reach the client before the SVM's copy left the secondary: a
        # commit releases the PVM's answers of its epoch without their SVM copies)
        order = " ".join(f"{h}={ev[h] - ev['client_due']}" for h in
                         sorted(EVERY_HOP, key=ev.get))      # ns after client_due
        assert ev["client_due"] <= ev["pvm_fed"] <= ev["mirrored"] <= ev["svm_recv"] \
            <= ev["svm_fed"] <= ev["svm_begin"] <= ev["svm_emit"] <= ev["svm_out"], order
        assert ev["pvm_fed"] <= ev["pvm_begin"] <= ev["pvm_emit"] <= ev["pvm_out"] \
            <= ev["client_got"], order
    res = trace_requests.analyse(f"{prefix}-colo-0.0.trace")
    assert res["requests"] == len(answered)


def _write(path, rows):
    with open(path, "w") as fh:
        for ns, who, event, seq in rows:
            fh.write(f"{ns} {who} {event} {seq}\n")


def test_a_slow_request_behind_a_checkpoint_is_told_from_one_behind_a_slow_svm(tmp_path):
    ms = 1_000_000
    rows = []
    svm = "guest:p-secondary-guest"
    # the SVM is paused 0..50 ms (a checkpoint): requests 0..4 wait for it, then it
    # catches up; request 10 finds the SVM running and idle, but it answers 60 ms late
    rows += [(0, svm, "guest_paused", 0), (50 * ms, svm, "guest_resumed", 0)]
    for seq in range(5):
        t = seq * ms
        rows += [(t, "client", "client_due", seq), (t, "client", "pvm_fed", seq),
                 (t, "client", "pvm_out", seq), (t, "mirror", "svm_fed", seq),
                 (50 * ms + seq * ms, svm, "guest_emit", seq),
                 (51 * ms + seq * ms, "mirror", "svm_out", seq),
                 (52 * ms + seq * ms, "client", "client_got", seq)]
    for seq in range(5, 100):
        t = 100 * ms + seq * ms
        late = 60 * ms if seq == 10 else 0
        rows += [(t, "client", "client_due", seq), (t, "client", "pvm_fed", seq),
                 (t, "client", "pvm_out", seq), (t, "mirror", "svm_fed", seq),
                 (t + ms // 2 + late, svm, "guest_emit", seq),
                 (t + ms // 2 + late, "mirror", "svm_out", seq),
                 (t + ms + late, "client", "client_got", seq)]
    _write(tmp_path / "t.trace", rows)
    res = trace_requests.analyse(str(tmp_path / "t.trace"), slowest=0.06)
    assert res["slow"] == 6
    assert res["slow_causes"] == {"svm behind after a pause": 5, "svm behind, no pause": 1}
    assert res["slowest"]["svm_answer_last"] == 6
    assert res["pauses"] == {"pvm": 0, "svm": 1}
