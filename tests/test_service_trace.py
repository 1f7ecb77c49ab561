"""The request trace (COLO_REQUEST_TRACE, pipeline/trace.py) follows every request of the
sim service through each hop of a real pair, and scripts/trace_requests.py says which
guest's backlog the slow ones sat in. Timings are not checked."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import trace_requests  # noqa: E402

from pipeline import trace  # noqa: E402
from pipeline.net.build import GuestOutputFramer  # noqa: E402
from pipeline.service_client import ServiceClient  # noqa: E402

EVERY_HOP = ("client_due", "client_sent", "pvm_fed", "pvm_begin", "pvm_emit", "pvm_out", "mirrored",
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
        # one clock for every process (CLOCK_MONOTONIC), and each stamp of a hand-off
        # taken by its sender before it hands over, or by its receiver once it has it: so
        # each copy's hops are in path order, always. Not the SVM's copy before the
        # client's: a commit releases the PVM's answers of its epoch without their SVM
        # copies, so the answer may reach the client before the SVM's copy left the
        # secondary. (client_got < pvm_out by 3 us, once: the client stamped answers it
        # read late in one poll with the time of the poll's first read; see
        # test_an_answer_read_later_in_one_poll_is_stamped_after_it_was_sent)
        order = " ".join(f"{h}={ev[h] - ev['client_due']}" for h in
                         sorted(EVERY_HOP, key=ev.get))      # ns after client_due
        assert ev["client_due"] <= ev["client_sent"] <= ev["pvm_fed"] <= ev["mirrored"] <= ev["svm_recv"] \
            <= ev["svm_fed"] <= ev["svm_begin"] <= ev["svm_emit"] <= ev["svm_out"], order
        assert ev["pvm_fed"] <= ev["pvm_begin"] <= ev["pvm_emit"] <= ev["pvm_out"] \
            <= ev["client_got"], order
    res = trace_requests.analyse(f"{prefix}-colo-0.0.trace")
    assert res["requests"] == len(answered)


def test_an_answer_read_later_in_one_poll_is_stamped_after_it_was_sent(tmp_path, monkeypatch):
    """The client reads the released answers until the stream is empty, and an answer
    may come while it handles the ones before (or while it waits for a CPU): that one
    is timed, and stamped client_got, no earlier than it was sent. Made certain with a
    real stream: the answer to request 2 is sent (its send time taken before, as
    pvm_out is) from inside the handling of request 1's answer, within one poll."""
    monkeypatch.setattr(trace, "REQUESTS", True)
    monkeypatch.setattr(trace, "_REQ_PATH", str(tmp_path / "t.trace"))
    monkeypatch.setattr(trace, "_req_fd", -1)      # (restored after this test's own is closed)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "client.sock"))
    listener.listen(1)
    client = ServiceClient(str(tmp_path / "client.sock"),
                           "ipc://" + str(tmp_path / "client-inputs.sock"))
    server, _ = listener.accept()
    framer = GuestOutputFramer()

    def answer(seq: int) -> bytes:
        return framer.frame(seq.to_bytes(8, "little") + bytes(40))
    try:
        for _ in range(3):                  # the probe (the answer of seq 100), 1, 2
            client.send(time.monotonic())
        sent_ns, got = {}, {}

        def on_answer(n: int, latency: float, now: float) -> None:
            got[n] = now
            if n == 1:                      # the next answer comes while this one is handled
                sent_ns[2] = time.monotonic_ns()
                server.sendall(answer(102))
        client.on_answer = on_answer
        server.sendall(answer(100) + answer(101))
        deadline = time.monotonic() + 60
        while 2 not in got and time.monotonic() < deadline:
            client.poll(1.0)
        assert 2 in got, got
        assert got[2] * 1e9 >= sent_ns[2] - 1, (got, sent_ns)   # (a float's rounding)
        trace.flush_requests()
        stamps = {int(seq): int(ns) for ns, who, event, seq in
                  (line.split() for line in open(tmp_path / "t.trace"))
                  if event == "client_got"}
        assert stamps[102] >= sent_ns[2], (stamps, sent_ns)
    finally:
        if trace._req_fd >= 0:
            os.close(trace._req_fd)
        client.close()
        server.close()
        listener.close()


def _write(path, rows):
    with open(path, "w") as fh:
        for ns, who, event, seq in rows:
            fh.write(f"{ns} {who} {event} {seq}\n")


def _write_requests(path, rows, n, normal, late):
    """``rows`` and requests 0 .. n - 1, one every 2 ms: each event at ``normal``'s ms
    after its due time, or at ``late[seq]``'s; the guests' events under their names."""
    ms = 1_000_000
    pvm, svm = "guest:p-primary-guest", "guest:p-secondary-guest"
    names = {"pvm_begin": (pvm, "guest_begin"), "pvm_emit": (pvm, "guest_emit"),
             "svm_begin": (svm, "guest_begin"), "svm_emit": (svm, "guest_emit")}
    rows = list(rows)
    for seq in range(n):
        t = seq * 2 * ms
        for event, at in {**normal, **late.get(seq, {})}.items():
            who, name = names.get(event, ("stage", event))
            rows.append((t + round(at * ms), who, name, seq))
    _write(path, rows)


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


def test_the_split_tells_a_checkpoint_a_late_wake_a_queue_a_slow_guest_and_a_slow_release(
        tmp_path):
    """scripts/trace_requests.py's split: each slow request's critical path (the copy the
    release waited for) in segments, and its cause. Five slow requests among 500, one of
    each kind; the rest take 0.8 ms."""
    ms = 1_000_000
    svm = "guest:p-secondary-guest"
    normal = {"client_due": 0, "pvm_fed": 0.1, "mirrored": 0.1, "pvm_begin": 0.2,
              "pvm_emit": 0.3, "pvm_out": 0.35, "svm_recv": 0.3, "svm_fed": 0.3,
              "svm_begin": 0.4, "svm_emit": 0.5, "svm_out": 0.6, "client_got": 0.8}
    late = {100: {"svm_begin": 30.0, "svm_emit": 30.1, "svm_out": 30.2, "client_got": 30.4},
            200: {"svm_begin": 25.0, "svm_emit": 25.1, "svm_out": 25.2, "client_got": 25.4},
            299: {"svm_emit": 22.0, "svm_out": 22.1, "client_got": 22.6},
            300: {"svm_begin": 20.1, "svm_emit": 20.2, "svm_out": 20.3, "client_got": 20.6},
            350: {"client_got": 28.0}}
    # request 100 waits for a checkpoint: the SVM is paused from its due time for 30 ms
    rows = [(200 * ms, svm, "guest_paused", 0), (230 * ms, svm, "guest_resumed", 0)]
    _write_requests(tmp_path / "t.trace", rows, 500, normal, late)
    split = trace_requests.analyse(str(tmp_path / "t.trace"))["split"]
    p99 = split["p99"]
    assert p99["n"] == 5 and p99["svm_last"] == 5 and p99["in_pause"] == 1, p99
    # 300 came while the SVM still worked on 299 (a queue); 200 found it idle (a late wake)
    assert p99["causes"] == {"checkpoint": 1, "release": 1, "guest_wake": 1,
                             "guest_work": 1, "behind_request": 1}, p99
    assert p99["behind_request"] == 1
    # the segments add up to each request's latency: their means to the mean latency
    lat = [30.4, 25.4, 22.6, 20.6, 28.0]
    assert abs(sum(p99["mean_ms"].values()) - sum(lat) / 5) < 0.01, p99
    assert split["all"]["n"] == 500 and split["all"]["mean_ms"]["mirror"] > 0


def test_the_split_tells_the_client_from_the_inject_hop_a_checkpoint_s_phase_and_a_catch_up(
        tmp_path):
    """The client's own lateness (due -> client_sent: it shares the CPUs with the nodes)
    is told from the inject hop (client_sent -> pvm_fed: client-inputs.sock and the client
    stage); a request that overlapped the PVM's pause from one that overlapped only the
    SVM's (the commit's transfer, apply and the SVM's resume); and a request that came
    after the SVM resumed but still waited behind the backlog the pause left (catch_up)
    from one behind a backlog no pause began (behind_request)."""
    ms = 1_000_000
    pvm, svm = "guest:p-primary-guest", "guest:p-secondary-guest"
    normal = {"client_due": 0, "client_sent": 0.05, "pvm_fed": 0.1, "mirrored": 0.1,
              "pvm_begin": 0.2, "pvm_emit": 0.3, "pvm_out": 0.35, "svm_recv": 0.3,
              "svm_fed": 0.3, "svm_begin": 0.4, "svm_emit": 0.5, "svm_out": 0.6,
              "client_got": 0.8}
    # a request every 2 ms. 100: the client sent it 20 ms late; 150: client-inputs.sock
    # and the client stage took 20 ms. A checkpoint pauses the PVM 400-402 ms and the
    # SVM 400-420 ms; from 420 the SVM answers what waited, 1 ms each (200 due at 400,
    # in the PVM's pause; 201-209 in the SVM's alone; 210-219 after it resumed, behind
    # the backlog it left: catch-ups). 299 takes the SVM 15 ms with no pause; 300 is
    # fed meanwhile and waits behind it
    late = {100: {k: v + 20 for k, v in normal.items() if k != "client_due"},
            150: {k: v + 20 for k, v in normal.items() if k not in ("client_due",
                                                                     "client_sent")},
            299: {"svm_emit": 15.0, "svm_out": 15.1, "client_got": 15.3},
            300: {"svm_begin": 13.1, "svm_emit": 13.2, "svm_out": 13.3, "client_got": 13.5}}
    for seq in range(200, 220):
        at = 420 + (seq - 200) - 2 * seq       # ms after its due time
        late[seq] = {"svm_begin": at, "svm_emit": at + 0.9, "svm_out": at + 1.0,
                     "client_got": at + 1.2}
    rows = [(400 * ms, pvm, "guest_paused", 0), (402 * ms, pvm, "guest_resumed", 0),
            (400 * ms, svm, "guest_paused", 0), (420 * ms, svm, "guest_resumed", 0)]
    _write_requests(tmp_path / "t.trace", rows, 1000, normal, late)
    reqs, pauses = trace_requests.load(str(tmp_path / "t.trace"))
    each = trace_requests.classify(reqs, pauses, [100, 150, 200, 205, 215, 299, 300])
    causes = {seq: (cause, phase) for seq, (_, _, cause, phase) in each.items()}
    assert causes == {100: ("client", ""), 150: ("inject", ""),
                      200: ("checkpoint", "pvm_paused"), 205: ("checkpoint", "svm_paused"),
                      215: ("catch_up", ""), 299: ("guest_work", ""),
                      300: ("behind_request", "")}, causes
    # the client's lateness and the inject hop are segments of their own, which with the
    # others still add up to the latency
    path = each[150][0]
    assert path["client"] == 0.05 and abs(path["inject"] - 20.05) < 1e-6, path
    assert abs(sum(path[k] for k in trace_requests.PATH) - 20.8) < 1e-6, path
    split = trace_requests.analyse(str(tmp_path / "t.trace"))["split"]["p99"]
    # (the 10 slowest: 200-206 behind the pause, 100, 150, 299)
    assert split["checkpoint_phase"] == {"pvm_paused": 1, "svm_paused": 6}, split
    assert split["causes"] == {"checkpoint": 7, "client": 1, "inject": 1, "guest_work": 1}


def test_the_slow_requests_are_counted_by_second_of_the_row(tmp_path):
    """``slow_by_second``: the slowest requests by whole seconds since the row's first
    request was due (a burst in the row's first second: a stage still starting)."""
    ms = 1_000_000
    rows = []
    # 300 requests over 3 s (one every 10 ms, due from 5 s on the clock); 3 slow ones in
    # the first second, 1 in the third, the rest answered in 1 ms
    slow = {2: 40, 7: 45, 50: 30, 260: 35}
    for seq in range(300):
        t = 5000 * ms + seq * 10 * ms
        took = slow.get(seq, 1) * ms
        rows += [(t, "client", "client_due", seq), (t, "client", "pvm_fed", seq),
                 (t + took // 2, "client", "pvm_out", seq),
                 (t + took, "client", "client_got", seq)]
    _write(tmp_path / "t.trace", rows)
    res = trace_requests.analyse(str(tmp_path / "t.trace"), slowest=4 / 300)
    assert res["slow"] == 4
    assert res["slow_by_second"] == {0: 3, 2: 1}
