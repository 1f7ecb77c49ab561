"""The comparator inside a real primary/secondary pair of sim guests: epoch boundaries
travel in-band with each guest's output, so deterministic guests never diverge under
sustained load, and one nondeterministic reply makes exactly one checkpoint."""
from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import cli, wait_until
from pipeline.checkpoint_api import CAUSES
from pipeline.localpair import LocalPair
from pipeline.xen_io.sim import SimDomain

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _tables(rate: float) -> dict:
    return {
        "net": {"primary_in": "unix:{workdir}/net-pvm.sock",
                "secondary_in": "unix:{workdir}/net-svm.sock",
                "compare_timeout_ms": 20000},
        "guest": {"backend": "sim", "page_count": 4096},
        "guest.workload": {"seed": 3, "pages_per_input": 4, "input_rate_hz": rate},
        # short epochs: many commits while frames are in flight on both sides
        "checkpoint": {"max_interval_ms": 40, "min_interval_ms": 10,
                       "dirty_threshold_pages": 100000, "epoch_timeout_ms": 20000},
    }


def _causes(pair: LocalPair, since: int = 0) -> dict[str, int]:
    out: dict[str, int] = {}
    for cp in pair.checkpoints()[since:]:
        name = CAUSES[cp["cause"]]
        out[name] = out.get(name, 0) + 1
    return out


def _wait_counter(pair: LocalPair, name: str, at_least: int, timeout: float = 180) -> int:
    def reached() -> int | None:
        pair.check_alive()
        value = pair.stage_counter("net_compare", name)
        return value if value >= at_least else None
    return wait_until(reached, timeout, f"net_compare {name} >= {at_least}", interval=0.02)


def test_deterministic_guests_under_load_take_no_net_checkpoint(tmp_path):
    with LocalPair(_tables(rate=400.0), workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected()
        start = len(pair.checkpoints())
        released = pair.stage_counter("net_compare", "frames_released")
        # thousands of frame pairs across dozens of commits
        _wait_counter(pair, "frames_released", released + 2000, timeout=240)
        pair.wait_checkpoints(start + 40)
        causes = _causes(pair, start)
        # (net_queue_full may show: on a machine this busy the SVM can fall a queue's worth
        # behind; that is back-pressure, not a divergence)
        assert "net_divergence" not in causes and "net_timeout" not in causes, causes
        assert pair.stage_counter("net_compare", "mismatches") == 0
        assert pair.stage_counter("net_compare", "timeouts") == 0
        assert pair.stage_counter("net_compare", "malformed_frames") == 0
        # the node compares runs of frames in one piece (the fast path is on)
        assert pair.stage_counter("net_compare", "run_matched_frames") > 0


def test_the_demo_with_deterministic_guests_shows_no_net_checkpoint():
    """The issue's own check, as a user runs it: ``colo-pipeline demo --json`` with the
    default (deterministic) guests compares their output (frames released) and its causes
    name no net_divergence and no net_timeout. (The compare timeout is raised from the
    demo's 1 s: a loaded CI machine can leave the SVM's answer that far behind, which is a
    timeout, not a divergence; the held-time p99 was seen at 1 s at load 17.)"""
    import json
    r = cli("demo", "--duration", "0", "--until-checkpoints", "25", "--pages", "4096",
            "--compare-timeout-ms", "20000", "--json", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["net_frames_released"] > 0, summary
    assert summary["checkpoints"] >= 25, summary
    causes = summary["causes"]
    assert "net_divergence" not in causes and "net_timeout" not in causes, causes


def test_one_nondeterministic_reply_makes_exactly_one_net_checkpoint(tmp_path):
    """A reply the SVM answers differently is a mismatch, and each mismatch makes exactly
    one net_divergence checkpoint. The reply is compared only if the SVM answers it before
    a checkpoint takes the PVM's state past that input: a commit releases the PVM's held
    frames of its epoch matched or not and puts the SVM at the PVM's state, so an SVM
    lagging behind a timer checkpoint (one every 40 ms here) never answers it (the official
    CI saw it once: no mismatch in 180 s). So the command is given again until one is
    compared, each time after its input was either compared or swallowed by commits."""
    with LocalPair(_tables(rate=200.0), workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected()
        _wait_counter(pair, "frames_released", 200)
        assert pair.stage_counter("net_compare", "mismatches") == 0
        for attempt in range(20):
            commits = pair.stage_counter("net_compare", "commits")
            pair.inject_input(SimDomain.nondeterministic_command())

            def decided() -> bool:
                pair.check_alive()
                # compared, or five commits later (40 ms apart: both guests consumed it
                # long before, and a commit after the PVM's answer swallowed it)
                return (pair.stage_counter("net_compare", "mismatches") >= 1 or
                        pair.stage_counter("net_compare", "commits") >= commits + 5)
            wait_until(decided, 180, "the nondeterministic reply compared or swallowed",
                       interval=0.02)
            if pair.stage_counter("net_compare", "mismatches") >= 1:
                break
        else:
            raise AssertionError("20 nondeterministic replies, none compared: the SVM's "
                                 "answer came after a commit every time")
        # the pair goes on: many more matched frames and commits after it
        released = pair.stage_counter("net_compare", "frames_released")
        _wait_counter(pair, "frames_released", released + 600)
        commits = pair.stage_counter("net_compare", "commits")
        _wait_counter(pair, "commits", commits + 20)
        causes = _causes(pair)
        mismatches = pair.stage_counter("net_compare", "mismatches")
        # (a reply swallowed while undecided could still be compared later: then it too
        # made its one checkpoint)
        assert 1 <= mismatches <= attempt + 1, (mismatches, attempt)
        assert causes.get("net_divergence") == mismatches, (causes, mismatches)
        assert "net_timeout" not in causes, causes
        assert pair.stage_counter("net_compare", "mismatches") == 1


def test_answers_held_when_the_secondary_is_lost_go_out_once_in_order(tmp_path):
    """The secondary node dies, as its host would, at the BEGIN of a checkpoint (SVM
    paused): the PVM answers on and the comparator holds its answers (nothing matches them,
    nothing commits) until the primary sees the secondary lost. Then every held answer goes
    out once, in arrival order, and the primary serves on unprotected: the client gets each
    input's answer exactly once, none missing, across the failover."""
    import re

    from pipeline.net.adapters import StreamClient
    from pipeline.service_client import PAYLOAD_AT
    tables = _tables(rate=200.0)
    tables["net"]["outdev"] = "unix:{workdir}/client.sock"
    with LocalPair(tables, workdir=str(tmp_path)) as pair:
        # (pass 40: well after the sync and the first checkpoints, answers flowing)
        pair.start(faults={"secondary": "secondary.begin:40:killgroup"})
        # (attached while both nodes run: the primary's counters exist before its first
        # BEGIN, so before the secondary can reach the fault; later reads need no peer)
        primary = pair.node("primary")
        client = StreamClient("unix:" + str(tmp_path / "client.sock"), timeout=60)
        seqs: list[int] = []

        def read(until):
            """Read answers (the input seq each answers) until ``until()`` is true."""
            def done():
                if pair.procs["primary"].poll() is not None:
                    raise AssertionError("the primary exited:\n" + pair.log_tail("primary"))
                seqs.extend(int.from_bytes(f[PAYLOAD_AT:PAYLOAD_AT + 8], "little")
                            for f, _ in client.recv(0.01))
                return until()
            return done
        try:
            wait_until(read(lambda: len(seqs) >= 100), 240, "answers while protected")
            # the release that ends this failover's holding, not an earlier one (a loaded
            # pair may have gone unprotected once before, e.g. in its first sync, and logged
            # "0 held" then: a clean-clone CI run took that line). Counted here, ~1 s of
            # checkpoints before the fault at the 40th BEGIN (max_interval_ms 40)
            note = re.compile(r"no longer comparing: (\d+) held PVM frames released")
            before = len(note.findall(pair.log_tail("primary", 1 << 22)))
            wait_until(read(lambda: pair.fault_fired("secondary", "secondary.begin")), 120,
                       "the secondary's fault")

            def released_since_the_fault():
                found = note.findall(pair.log_tail("primary", 1 << 22))
                return found[-1] if len(found) > before else None
            held = wait_until(read(released_since_the_fault), 120,
                              "the primary to stop comparing")
            assert int(held) > 0        # answers were held at the failover
            last = seqs[-1]
            wait_until(read(lambda: seqs[-1] >= last + 100), 120, "answers unprotected")
        finally:
            client.close()
        assert pair.wait_exit("secondary") == -9      # (and its shared memory is removed)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "lost or repeated answers"
        assert primary.stage("net_compare").as_dict()["mismatches"] == 0
        assert primary.node_info().get("state") == "unprotected"


def test_sim_output_marks_sit_between_the_frames_before_and_after_them():
    from pipeline.xen_io.base import OUTPUT_MARK
    from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain
    dom = open_sim_domain("marks", 256, WorkloadSpec(pages_per_input=1))
    try:
        dom.start(paused=False)
        seen: list[tuple[int, bytes]] = []
        for round_ in range(3):
            for _ in range(5):
                dom.feed_input(b"x")
            dom.wait_for_input_seq(5 * (round_ + 1))
            if round_ == 1:
                seen += dom.read_outputs(0.0)      # some read before the mark, some after
            dom.pause()
            dom.mark_outputs(b"mark %d" % round_)
            dom.mark_outputs(b"again %d" % round_)
            dom.resume()
        deadline = time.monotonic() + 10
        while sum(1 for s, _ in seen if s != OUTPUT_MARK) < 15:
            assert time.monotonic() < deadline
            seen += dom.read_outputs(0.1)
        order = [f.decode() if s == OUTPUT_MARK else s for s, f in seen]
        assert order == [0, 1, 2, 3, 4, "mark 0", "again 0", 5, 6, 7, 8, 9, "mark 1",
                         "again 1", 10, 11, 12, 13, 14, "mark 2", "again 2"]
        with pytest.raises(Exception, match="paused"):
            dom.mark_outputs(b"running")
    finally:
        dom.close()


@pytest.mark.parametrize("lost", ["host", "stage"])
def test_answers_held_when_the_primary_is_lost_never_reach_the_client(tmp_path, lost):
    """Outputs released only on commit (``net.release = "commit"``); the primary is lost
    while its comparator holds answers no checkpoint has committed: its whole node killed
    (``host``), or one of its stages (the coordinator) killed, so that its supervisor stops
    the other stages, the comparator included, the ordinary way (``stage``). The client
    gets every committed answer once, in order, then the end of the stream: none of the
    held ones (the secondary never committed them; they are not the survivor's to give),
    whether the comparator died at once or was stopped."""
    from pipeline.net.adapters import StreamClient
    from pipeline.service_client import PAYLOAD_AT
    tables = _tables(rate=0.0)
    tables["net"].update(outdev="unix:{workdir}/client.sock", release="commit")
    # no timer: only the test's request commits
    tables["checkpoint"].update(max_interval_ms=600_000, dirty_threshold_pages=1 << 30)
    with LocalPair(tables, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected()
        client = StreamClient("unix:" + str(tmp_path / "client.sock"), timeout=60)
        seqs: list[int] = []
        ended = []

        def read(until):
            def done():
                try:
                    frames = client.recv(0.01)
                except ConnectionError:           # the primary's end of the stream
                    ended.append(True)
                    frames = []
                seqs.extend(int.from_bytes(f[PAYLOAD_AT:PAYLOAD_AT + 8], "little")
                            for f, _ in frames)
                return until()
            return done
        try:
            net = lambda name: pair.stage_counter("net_compare", name)   # noqa: E731
            for i in range(20):
                pair.inject_input(b"committed %d" % i)
            wait_until(lambda: net("primary_frames_in") >= 20, 60, "20 PVM answers")
            pair.request_checkpoint()
            wait_until(read(lambda: len(seqs) >= 20), 60, "the 20 committed answers")
            # (the stage publishes its counters every 0.2 s: on a fast machine the 20 more
            # below can come in the same publication as this release, primary_frames_in
            # written first, and a look between the two saw frames_released 0)
            wait_until(lambda: net("frames_released") >= 20, 60, "the release counted")
            for i in range(20, 40):
                pair.inject_input(b"held %d" % i)
            wait_until(lambda: net("primary_frames_in") >= 40, 60, "20 more PVM answers")
            assert net("frames_released") == 20     # held: no checkpoint since
            if lost == "host":
                pair.kill("primary")
            else:
                pid = pair.node("primary").node_info()["stage_pids"]["coordinator"]
                os.kill(pid, signal.SIGKILL)
                assert pair.wait_exit("primary") != 0
            wait_until(read(lambda: bool(ended)), 60, "the end of the primary's stream")
        finally:
            client.close()
        assert seqs == list(range(20)), "an uncommitted answer reached the client, or a " \
                                        "committed one was lost or repeated"
        # the pair failed over: the secondary's guest runs on from the last commit
        assert pair.wait_info("role", "active", role="secondary")["role"] == "active"
