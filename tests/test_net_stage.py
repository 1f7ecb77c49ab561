"""The net-compare stage against a real CheckpointBus (the coordinator's end of the
checkpoint API), with frames fed over the stage's unix sockets."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time

import pytest

from conftest import wait_until
from pipeline.checkpoint_api import CheckpointBus
from pipeline.net import build
from pipeline.net.adapters import StreamClient
from pipeline.net.settings import NetSettings
from pipeline.stages.net_compare import NET_COMPARE_COUNTERS, run_net_compare_stage

G, C = "10.0.0.2", "10.0.0.1"
#: how long a reply may take before a test fails: only bounds a hang (a freshly started
#: comparator on a loaded machine can take seconds to import and answer)
WAIT = 45


class Sink:
    def __init__(self, shared):
        self.shared = shared

    def add(self, name, n):
        self.shared[name] = self.shared.get(name, 0) + n


def _stage(settings, rundir, shared, ready, stop):
    run_net_compare_stage(settings, rundir, Sink(shared), ready, stop)


def _publish_until(bus, shared, event: str, epoch: int, counter: str) -> None:
    """Publish ``event`` until the stage counted it (a subscriber that joined just now may
    miss what was published before; the stage's counters reach ``shared`` 5 times a s)."""
    before = shared.get(counter, 0)

    def taken():
        bus.publish(event, epoch)
        return shared.get(counter, 0) > before
    wait_until(taken, WAIT, f"the stage took the {event} event", interval=0.05)


class ForkedStage:
    """A net-compare stage forked with ``target`` on unix sockets in a fresh run directory,
    a real CheckpointBus and counters shared with this process. As a context manager it
    stops the stage and cleans up whatever the test did; ``exitcode`` and ``counters``
    (the stage's last copy) are read after the ``with``."""

    def __init__(self, target=None, **settings):
        self.rundir = tempfile.mkdtemp(prefix="ncmp-stage-")
        ctx = multiprocessing.get_context("fork")
        self.manager = ctx.Manager()
        self.shared = self.manager.dict()
        self.bus = CheckpointBus(self.rundir)
        self.path = {r: os.path.join(self.rundir, f"net-{r}.sock") for r in ("pvm", "svm", "out")}
        net = NetSettings(primary_in="unix:" + self.path["pvm"],
                          secondary_in="unix:" + self.path["svm"],
                          outdev="unix:" + self.path["out"], **settings)
        self.parent, child = ctx.Pipe()
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=target or _stage,
                                args=(net, self.rundir, self.shared, child, self.stop))
        self.exitcode = self.counters = None

    def client(self, role: str) -> StreamClient:
        return StreamClient("unix:" + self.path[role])

    def __enter__(self) -> "ForkedStage":
        self.proc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.exitcode = self.proc.exitcode
        self.bus.close()
        self.counters = dict(self.shared)
        self.manager.shutdown()
        shutil.rmtree(self.rundir, ignore_errors=True)


@pytest.mark.timeout(240)
def test_stage_requests_checkpoint_through_coordinator_and_releases_on_commit():
    with ForkedStage(compare_timeout_ms=300, expired_scan_ms=50) as st:
        bus, shared, parent = st.bus, st.shared, st.parent
        assert parent.poll(WAIT) and parent.recv() == {"ok": True}
        # (the stage accepts each peer when it first reads or writes its socket)
        pvm, svm, out = (st.client(r) for r in ("pvm", "svm", "out"))
        same = build.udp_frame(G, C, 1, 2, b"same")
        pvm.send(same)
        svm.send(same)
        assert [f for f, _ in out.recv_until(1, WAIT)] == [same]
        diverged = build.udp_frame(G, C, 3, 4, b"pvm")
        pvm.send(diverged)
        svm.send(build.udp_frame(G, C, 3, 4, b"svm"))
        requests = wait_until(bus.drain_requests, WAIT, "a checkpoint request")
        assert [c for c, _ in requests] == ["net_divergence"]
        # the snapshot event is taken (the counter says so) before the next PVM frame comes
        _publish_until(bus, shared, "snapshot", 0, "snapshots")
        after_snapshot = build.udp_frame(G, C, 5, 6, b"epoch 1")
        pvm.send(after_snapshot)
        bus.publish("committed", 0)
        assert [f for f, _ in out.recv_until(1, WAIT)] == [diverged]
        # the epoch-1 frame is still held; unmatched it times out: one request for epoch 1
        requests = wait_until(bus.drain_requests, WAIT, "a checkpoint request")
        assert [c for c, _ in requests] == ["net_timeout"]
        bus.publish("role", 1, role="unprotected")
        assert [f for f, _ in out.recv_until(1, WAIT)] == [after_snapshot]
        for c in (pvm, svm, out):
            c.close()
    assert st.exitcode == 0
    counters = st.counters
    assert counters["checkpoint_requests"] == 2 and counters["mismatches"] == 1
    assert counters["items_out"] == counters["frames_released"] == 3
    assert set(counters) <= set(NET_COMPARE_COUNTERS) | {"items_in", "items_out", "bytes_in",
                                                        "bytes_out"}


def test_stage_reports_bad_settings_on_ready():
    rundir = tempfile.mkdtemp(prefix="ncmp-stage-")
    bus = CheckpointBus(rundir)
    try:
        parent, child = multiprocessing.get_context("fork").Pipe()
        with pytest.raises(OSError):
            run_net_compare_stage(NetSettings(primary_in="packet:no-such-if0"), rundir,
                                  ready=child)
        assert "no-such-if0" in parent.recv()["error"]
    finally:
        bus.close()
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.mark.timeout(240)
def test_client_input_to_the_svm_is_held_from_snapshot_until_commit():
    rundir = tempfile.mkdtemp(prefix="ncmp-stage-")
    ctx = multiprocessing.get_context("fork")
    bus = CheckpointBus(rundir)
    path = {r: os.path.join(rundir, f"net-{r}.sock")
            for r in ("pvm", "svm", "out", "cin", "pout", "sout")}
    settings = NetSettings(primary_in="unix:" + path["pvm"], secondary_in="unix:" + path["svm"],
                           outdev="unix:" + path["out"], client_in="unix:" + path["cin"],
                           primary_out="unix:" + path["pout"],
                           secondary_out="unix:" + path["sout"])
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    manager = ctx.Manager()
    shared = manager.dict()
    proc = ctx.Process(target=_stage, args=(settings, rundir, shared, child, stop))
    proc.start()
    try:
        assert parent.poll(WAIT) and parent.recv() == {"ok": True}
        clients = {r: StreamClient("unix:" + path[r]) for r in ("cin", "pout", "sout")}
        before = build.udp_frame(C, G, 4444, 53, b"before the snapshot")
        clients["cin"].send(before)
        assert [f for f, _ in clients["pout"].recv_until(1, WAIT)] == [before]
        assert [f for f, _ in clients["sout"].recv_until(1, WAIT)] == [before]
        _publish_until(bus, shared, "snapshot", 0, "snapshots")
        during = [build.udp_frame(C, G, 4444, 53, b"after the snapshot %d" % i) for i in range(3)]
        for f in during:
            clients["cin"].send(f)
        assert [f for f, _ in clients["pout"].recv_until(3, WAIT)] == during
        # held for the restored SVM (counted as held, so not sent to it yet)
        wait_until(lambda: shared.get("mirror_frames_held", 0) == 3, 10,
                   "the SVM's copies held")
        bus.publish("committed", 0)
        assert [f for f, _ in clients["sout"].recv_until(3, WAIT)] == during
        for c in clients.values():
            c.close()
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        bus.close()
        manager.shutdown()
        shutil.rmtree(rundir, ignore_errors=True)
    assert proc.exitcode == 0


def test_counter_mirror_fills_a_real_stage_counter_block(caplog):
    import numpy as np

    from pipeline.counters import STAGE_COUNTERS, StageCounters
    from pipeline.stages.net_compare import CounterMirror

    names = STAGE_COUNTERS + tuple(n for n in NET_COMPARE_COUNTERS if n != "commits")
    block = StageCounters("net_compare", names, np.zeros(len(names), dtype=np.uint64))
    source = dict.fromkeys(NET_COMPARE_COUNTERS, 0)
    mirror = CounterMirror(source, block)
    source["primary_frames_in"] += 3
    source["secondary_frames_in"] += 2
    source["frames_released"] += 2
    source["commits"] += 1                      # not in this block: warned about, once
    mirror.sync()
    source["frames_released"] += 1
    source["commits"] += 1
    mirror.sync()
    got = block.as_dict()
    assert got["items_in"] == 5 and got["items_out"] == 3
    assert got["frames_released"] == 3 and got["primary_frames_in"] == 3
    assert caplog.text.count("has no 'commits'") == 1


class RecordingControl:
    """A control with no event channel: epochs come only in-band; requests are kept."""

    def __init__(self):
        self.requests = []

    def pollable(self):
        return None

    def request(self, cause, detail):
        self.requests.append(cause)

    def handle(self, events):
        pass

    def close(self):
        pass


def _accept_all(loop) -> None:
    """Run ``loop`` until it accepted the peers of its PVM, SVM and outdev endpoints."""
    endpoints = (loop.primary_in, loop.secondary_in, loop.outdev)

    def accepted():
        loop.run_once(0.01)
        return all(e.connected for e in endpoints)
    wait_until(accepted, WAIT, "the comparator accepted its three peers")


def _in_band_run(order: str) -> tuple[list[bytes], list[str], list[bytes]]:
    from pipeline.net.framing import BOUNDARY_COMMITTED, BOUNDARY_SNAPSHOT, encode_boundary, \
        encode_frame
    from pipeline.net.loop import CompareLoop
    rundir = tempfile.mkdtemp(prefix="ncmp-inband-")
    path = {r: os.path.join(rundir, f"{r}.sock") for r in ("pvm", "svm", "out")}
    settings = NetSettings(primary_in="unix:" + path["pvm"], secondary_in="unix:" + path["svm"],
                           outdev="unix:" + path["out"], compare_timeout_ms=60000)
    control = RecordingControl()
    loop = CompareLoop(settings, control)
    clients = []
    try:
        pvm, svm, out = (StreamClient("unix:" + path[r]) for r in ("pvm", "svm", "out"))
        clients = [pvm, svm, out]
        _accept_all(loop)
        d_pvm = build.udp_frame(G, C, 7, 8, b"the PVM's reply", ip_id=1)
        d_svm = build.udp_frame(G, C, 7, 8, b"the SVM's reply", ip_id=2)
        later = [build.udp_frame(G, C, 7, 8, b"after the checkpoint %d" % i, ip_id=i)
                 for i in range(3)]
        pvm_stream = (encode_frame(d_pvm) + encode_boundary(BOUNDARY_SNAPSHOT, 0)
                      + b"".join(encode_frame(f) for f in later))
        svm_stream = (encode_frame(d_svm) + encode_boundary(BOUNDARY_COMMITTED, 0)
                      + b"".join(encode_frame(f[:18] + b"\x00\x63" + f[20:]) for f in later))
        first, second = (pvm, svm) if order == "pvm first" else (svm, pvm)
        streams = {pvm: pvm_stream, svm: svm_stream}
        first.send_bytes(streams[first])
        released: list[bytes] = []
        cmp = loop.comparator
        # all of the first stream read (compared, or waiting for the other side's frames)
        while cmp.counters[("primary" if first is pvm else "secondary") + "_frames_in"] \
                + cmp.stream_frames() < 4:
            loop.run_once(0.05)
        second.send_bytes(streams[second])
        deadline = time.monotonic() + 20
        while len(released) < 4 and time.monotonic() < deadline:
            loop.run_once(0.05)
            released += [f for f, _ in out.recv(0.01)]
        return released, control.requests, [d_pvm, *later]
    finally:
        for c in clients:
            c.close()
        loop.close()
        shutil.rmtree(rundir, ignore_errors=True)


def test_in_band_boundaries_judge_each_frame_against_its_epoch():
    """The SVM's commit boundary and the restored SVM's frames arrive before the PVM's
    snapshot boundary, or after every PVM frame: either way the frames after the boundary
    are compared with the restored SVM's and the ones before it with the old SVM's."""
    released, requests, pvm = _in_band_run("svm first")
    assert released == pvm
    assert requests == []           # the commit covered the PVM's differing reply
    released, requests, pvm = _in_band_run("pvm first")
    assert released == pvm
    assert requests == ["net_divergence"]      # the old SVM's reply differed: one request


def test_node_loop_keeps_pre_snapshot_frames_in_their_epoch_when_the_event_overtakes_them():
    """The node's start, as it made a spurious divergence with the fast path on: the
    coordinator's ``committed`` (the sync) and ``snapshot`` events reach the comparator
    before the PVM frame sent before that snapshot (the event overtakes it); the PVM's
    stream (that frame, the in-band snapshot boundary, the next frame) is read and waits
    for the SVM's, which then brings its commit boundary and the restored SVM's first
    frame. The frame before the snapshot is covered by the commit; the one after it
    matches the restored SVM's: no request. (Had the event ended the PVM's epoch, the
    frame before the snapshot would have been compared with the restored SVM's output.)"""
    from pipeline.localpair import wait_until
    from pipeline.net.framing import BOUNDARY_COMMITTED, BOUNDARY_SNAPSHOT, encode_boundary, \
        encode_frame
    from pipeline.stages.net_compare import compare_loop
    rundir = tempfile.mkdtemp(prefix="ncmp-start-")
    path = {r: os.path.join(rundir, f"{r}.sock") for r in ("pvm", "svm", "out")}
    settings = NetSettings(primary_in="unix:" + path["pvm"], secondary_in="unix:" + path["svm"],
                           outdev="unix:" + path["out"], compare_timeout_ms=60000)
    control = RecordingControl()
    loop = compare_loop(settings, control, in_band=True)
    clients = []
    try:
        pvm, svm, out = (StreamClient("unix:" + path[r]) for r in ("pvm", "svm", "out"))
        clients = [pvm, svm, out]
        _accept_all(loop)
        cmp = loop.comparator
        before = build.udp_frame(G, C, 10000, 9, b"reply to input 7", ip_id=1)
        after = build.udp_frame(G, C, 10000, 9, b"reply to input 8", ip_id=2)
        after_svm = build.udp_frame(G, C, 10000, 9, b"reply to input 8", ip_id=99)
        loop.on_committed(0)             # the sync epoch
        loop.on_snapshot(1)              # before the PVM's frames of epoch 1 were read
        pvm.send_bytes(encode_frame(before) + encode_boundary(BOUNDARY_SNAPSHOT, 1)
                       + encode_frame(after))

        def pvm_read():
            loop.run_once(0.01)
            return cmp.stream_frames() == 3        # waiting for the SVM's side
        wait_until(pvm_read, WAIT, "the PVM's stream read")
        svm.send_bytes(encode_boundary(BOUNDARY_COMMITTED, 1) + encode_frame(after_svm))
        released: list[bytes] = []

        def decided():
            loop.run_once(0.01)
            released.extend(f for f, _ in out.recv(0.001))
            return len(released) >= 2 or control.requests
        wait_until(decided, WAIT, "both PVM frames released or a checkpoint requested")
        assert control.requests == []
        assert released == [before, after]
        assert cmp.counters["run_matched_frames"] == 1       # the fast path compared it
    finally:
        for c in clients:
            c.close()
        loop.close()
        shutil.rmtree(rundir, ignore_errors=True)


def _stage_without_numba(settings, rundir, shared, ready, stop):
    """The stage in a process without numba: its import fails as when it is not installed
    (this test process may have imported it, and the fork inherited the loaded rounds)."""
    import sys

    import pipeline.net
    from pipeline.net import loop
    sys.modules["numba"] = None
    sys.modules["pipeline.net.native"] = None
    if hasattr(pipeline.net, "native"):       # (else 'from pipeline.net import native' finds it)
        del pipeline.net.native
    loop._native_module = None
    assert loop.native_rounds() is None
    _stage(settings, rundir, shared, ready, stop)


def _one_pair_through_a_forked_stage(target) -> tuple[dict, dict]:
    """Fork the stage (``target``), pass one equal frame pair; the counters it had copied
    out when it said ready, and its counters at the end."""
    with ForkedStage(target) as st:
        assert st.parent.poll(WAIT) and st.parent.recv() == {"ok": True}
        at_ready = dict(st.shared)
        pvm, svm, out = (st.client(r) for r in ("pvm", "svm", "out"))
        same = build.udp_frame(G, C, 1, 2, b"same")
        pvm.send(same)
        svm.send(same)
        assert [f for f, _ in out.recv_until(1, WAIT)] == [same]
        for c in (pvm, svm, out):
            c.close()
    assert st.exitcode == 0
    return at_ready, st.counters


@pytest.mark.timeout(240)
def test_a_stage_forked_with_the_native_rounds_loaded_has_them_before_its_first_frame():
    """The supervisor loads the rounds before it forks the stage
    (pipeline.net.loop.preload_native_rounds): the stage counts them loaded in the first
    counters it copies out, before it says ready, not once a background load is done."""
    from pipeline.net.loop import native_rounds
    if native_rounds() is None:          # (loads them in this process: the fork inherits)
        pytest.skip("numba is not installed")
    at_ready, at_end = _one_pair_through_a_forked_stage(_stage)
    assert at_ready.get("native_rounds_loaded") == 1, at_ready
    assert at_end["native_rounds_loaded"] == 1 and at_end["frames_released"] == 1


@pytest.mark.timeout(240)
def test_a_stage_without_numba_compares_in_python():
    at_ready, at_end = _one_pair_through_a_forked_stage(_stage_without_numba)
    assert at_end.get("native_rounds_loaded", 0) == 0, at_end
    assert at_end.get("native_matched_frames", 0) == 0 and at_end["frames_released"] == 1
