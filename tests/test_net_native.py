"""The comparator's native pair rounds (pipeline.net.native, numba) against its Python
rounds: a real CompareLoop in this process, fed over its unix sockets by client threads."""
from __future__ import annotations

import dataclasses
import random
import shutil
import struct
import tempfile
import threading

import pytest

from conftest import wait_until
from pipeline.net import build
from pipeline.net.adapters import StreamClient
from pipeline.net.comparator import RELEASE_DELAY_COUNTERS
from pipeline.net.control import COLO_CHECKPOINT, XenNotify, encode_notify
from pipeline.net.framing import FrameDecoder, encode_frame
from pipeline.net import loop as loop_module
from pipeline.net.loop import CompareLoop, native_rounds, preload_native_rounds
from pipeline.net.packet import TCP_ACK, TCP_PSH
from pipeline.net.settings import NetSettings

pytestmark = pytest.mark.skipif(native_rounds() is None, reason="numba is not installed")

G, C = "10.2.0.2", "10.2.0.1"
#: bounds a hang only (a loaded 2-core machine)
WAIT = 60


class Running:
    """A CompareLoop (with a Xen notify channel, as colo-pipeline compare has) run by a
    thread, and a client on each socket."""

    def __init__(self, native: bool, threaded: bool = True, control=None,
                 round_s: float = 0.02) -> None:
        d = tempfile.mkdtemp(prefix="ncmp-native-")
        settings = NetSettings(primary_in=f"unix:{d}/p", secondary_in=f"unix:{d}/s",
                               outdev=f"unix:{d}/o", compare_timeout_ms=10 ** 8,
                               max_queue_frames=100_000)
        self.dir = d
        self.round_s = round_s
        self.loop = CompareLoop(settings, control(d) if control is not None
                                else XenNotify(f"unix:{d}/n"), native=native)
        self.pin, self.sin, self.out = (StreamClient(f"unix:{d}/{r}") for r in "pso")
        self.ntf = StreamClient(f"unix:{d}/n") if control is None else None
        self._decoder = FrameDecoder(False)
        self._ahead: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if threaded:
            self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.loop.run_once(self.round_s)

    def released(self, count: int) -> list[bytes]:
        """The next ``count`` frames out of outdev (fails the test after WAIT s)."""
        out, self._ahead = self._ahead, []
        self.out.sock.settimeout(WAIT)
        while len(out) < count:
            data = self.out.sock.recv(1 << 20)
            assert data, "outdev closed"
            out += [f for f, _ in self._decoder.feed(data)]
        out, self._ahead = out[:count], out[count:]
        return out

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(WAIT)
        for c in (self.pin, self.sin, self.out, self.ntf):
            if c is not None:
                c.close()
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def tcp(i: int, flow: int, ip_id: int, seq: int = 1, window: int = 512,
        payload: bytes | None = None):
    body = payload or (b"reply %06d " % i) * (1 + i % 7)
    return build.tcp_frame(G, C, 20000 + flow, 80, seq, 1, TCP_ACK | TCP_PSH, body,
                           window=window, ip_id=ip_id)


def udp(i: int, ip_id: int, payload: bytes | None = None):
    return build.udp_frame(G, C, 3000 + i % 500, 53, payload or b"answer %d" % i, ip_id=ip_id)


def case(seed: int, n: int = 1500):
    """PVM/SVM frame pairs equal outside the masks (IPv4 id, TCP window) on many flows,
    and the indices of a few whose payloads differ (same length)."""
    rng = random.Random(seed)
    pairs, differ = [], set()
    seq = [1] * 40
    for i in range(n):
        odd = rng.random() < 0.01
        if rng.random() < 0.5:
            flow = i % 40
            p = tcp(i, flow, i & 0xFFFF, seq[flow])
            s = tcp(i, flow, (7 * i) & 0xFFFF, seq[flow], window=99)
            if odd:
                s = tcp(i, flow, 3, seq[flow], payload=b"X" * (len(p) - 54))
            seq[flow] += len(p) - 54
        else:
            p, s = udp(i, i & 0xFFFF), udp(i, (5 * i) & 0xFFFF)
            if odd:
                s = udp(i, 1, payload=b"different %d" % i)
        pairs.append((p, s))
        if odd:
            differ.add(i)
    return pairs, frozenset(differ)


def per_flow(frames):
    out: dict[bytes, list[bytes]] = {}
    for f in frames:
        out.setdefault(f[26:38], []).append(f)
    return out


def send_pairs(run: Running, chunk, pvm_first: bool) -> None:
    """The pairs' frames as two live guests send them: all of one side, then the other's."""
    p = b"".join(encode_frame(f) for f, _ in chunk)
    s = b"".join(encode_frame(f) for _, f in chunk)
    for client, data in ((run.pin, p), (run.sin, s)) if pvm_first else \
            ((run.sin, s), (run.pin, p)):
        client.sock.sendall(data)


def feed(run: Running, pairs, seed: int, differ=frozenset()) -> list[bytes]:
    """The pairs a burst at a time (mostly one pair, now and then several), either side
    first, each burst once what came before is out. A burst with a pair that differs (index
    in ``differ``) is followed, once the loop took it, by a checkpoint (Xen's
    COLO_CHECKPOINT), as the toolstack answers the comparator's request. Returns what came
    out of outdev."""
    rng = random.Random(seed)
    comparator = run.loop.comparator
    out: list[bytes] = []
    i = 0
    while i < len(pairs):
        k = min(rng.choice((1, 1, 1, 1, 1, 1, 2, 5, 30)), len(pairs) - i)
        send_pairs(run, pairs[i:i + k], rng.random() < 0.6)
        i += k
        if differ & set(range(i - k, i)):
            wait_until(lambda: comparator.counters["primary_frames_in"] == i
                       and comparator.counters["secondary_frames_in"] == i
                       and comparator.stream_frames() == 0, WAIT, "the burst taken")
            run.ntf.sock.sendall(encode_notify(COLO_CHECKPOINT))
        out += run.released(i - len(out))
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("seed", range(2))
def test_pairs_through_native_or_python_rounds_come_out_once_in_order(seed, native):
    """Frame pairs (a few differing, each followed by a checkpoint) through the loop with
    native rounds and without: every PVM frame out once, per flow in the order sent, none
    of the SVM's; every release counted once; with native rounds, pairs went that way."""
    pairs, differ = case(seed)
    run = Running(native)
    try:
        out = feed(run, pairs, seed, differ)
    finally:
        run.close()
    # (read once the loop stopped: native rounds add their counts when they return)
    counters, stats = run.loop.comparator.counters, run.loop.native_stats
    assert per_flow(out) == per_flow(p for p, _ in pairs)
    assert len(out) == len(pairs) == counters["frames_released"]
    assert counters["mismatches"] >= 1
    assert sum(counters[c] for c in RELEASE_DELAY_COUNTERS) == counters["frames_released"]
    if native:
        # (how many depends on how soon each burst's second half follows its first)
        assert stats["pairs"] > 0
    else:
        assert stats["pairs"] == 0


@pytest.mark.timeout(300)
def test_a_full_outdev_queues_the_rest_of_a_native_write_and_loses_nothing():
    """outdev's reader does not read: pair after pair is released by native rounds until
    a native write takes only part of a pair (or none); the rest waits in outdev's queue,
    whose flush blocks until the reader, started by that queue, reads. Every frame comes
    out once, in order. (The loop runs in the test's thread: each pair is whole on both
    sockets before the round that takes it.)"""
    run = Running(True, threaded=False)
    pairs = [(tcp(i, 0, i & 0xFFFF, 1 + 1400 * i, payload=bytes(1400)),
              tcp(i, 0, 77, 1 + 1400 * i, payload=bytes(1400))) for i in range(30_000)]
    got: list[list[bytes]] = []

    def reader():
        wait_until(lambda: run.loop.outdev.queued, WAIT, "a write outdev did not take")
        got.append(run.released(len(pairs)))
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for pair in pairs:
            send_pairs(run, [pair], True)
            run.loop.run_once(0)
        thread.join(WAIT)
        assert got and got[0] == [p for p, _ in pairs]
        assert run.loop.native_stats.get("send", 0) >= 1
        assert run.loop.native_stats["pairs"] > len(pairs) // 2
    finally:
        run.close()


@pytest.mark.timeout(300)
def test_a_lone_frame_goes_to_python_with_its_arrival_and_meets_its_partner_there():
    """A PVM frame whose SVM frame does not come within the native wait goes to the
    comparator's stream (Python); the SVM frame sent later releases it."""
    run = Running(True)
    try:
        for i in range(2, 12):          # the first pairs go through Python (new peers)
            run.pin.send(udp(i, i))
            run.sin.send(udp(i, 3 * i))
            run.released(1)
        wait_until(lambda: run.loop.native_stats["pairs"] > 0, WAIT, "native rounds")
        p, s = udp(1, 1), udp(1, 2)
        run.pin.send(p)
        wait_until(lambda: run.loop.comparator.stream_frames() == 1, WAIT,
                   "the lone PVM frame in the comparator's stream")
        assert run.loop.native_stats["waits"] >= 1
        run.sin.send(s)
        assert run.released(1) == [p]
        # then pairs again go the native way
        before = run.loop.native_stats["pairs"]
        for i in range(12, 50):
            run.pin.send(udp(i, i))
            run.sin.send(udp(i, 3 * i))
            run.released(1)
        wait_until(lambda: run.loop.native_stats["pairs"] > before, WAIT, "native rounds")
    finally:
        run.close()
    counters = run.loop.comparator.counters
    assert counters["frames_released"] == 49
    assert sum(counters[c] for c in RELEASE_DELAY_COUNTERS) == 49


@pytest.mark.timeout(300)
def test_a_side_that_hangs_up_during_native_rounds_is_listened_for_again():
    """The PVM's sender closes its stream: the endpoint drops the peer and listens; a new
    sender's pairs are compared (and released natively) as before."""
    run = Running(True)
    try:
        for i in range(20):
            run.pin.send(udp(i, i))
            run.sin.send(udp(i, 2 * i))
            run.released(1)
        generation = run.loop.primary_in.generation
        run.pin.close()
        wait_until(lambda: not run.loop.primary_in.connected, WAIT, "the PVM's stream dropped")
        run.pin = StreamClient(f"unix:{run.dir}/p")
        wait_until(lambda: run.loop.primary_in.generation > generation, WAIT,
                   "the new PVM sender accepted")
        before = run.loop.native_stats["pairs"]
        for i in range(20, 60):
            run.pin.send(udp(i, i))
            run.sin.send(udp(i, 2 * i))
            assert run.released(1) == [udp(i, i)]
        wait_until(lambda: run.loop.native_stats["pairs"] > before, WAIT, "native rounds")
    finally:
        run.close()


@pytest.mark.timeout(300)
def test_native_rounds_run_beside_the_coordinators_zmq_events_and_wake_for_them():
    """The node's comparator hears its coordinator on a zmq SUB socket: pairs still go the
    native way, and an event published while the loop sleeps in a native round's poll (its
    rounds far longer than the test waits) is handled at once, through the socket's zmq.FD
    (or, published as a round begins, the ZMQ_EVENTS look before it): a role event that
    stops comparing lets a lone PVM frame out."""
    from pipeline.checkpoint_api import CheckpointBus, CheckpointClient
    from pipeline.net.control import CoordinatorControl
    bus: list[CheckpointBus] = []

    def control(d: str) -> CoordinatorControl:
        bus.append(CheckpointBus(d))
        return CoordinatorControl(CheckpointClient(d))
    # rounds of 10 * WAIT s: only the events' descriptor (or a frame) ends one in time
    run = Running(True, threaded=False, control=control, round_s=10 * WAIT)
    events = run.loop.control.client.events_in
    try:
        # the subscription is through once a published event arrives (before the loop runs)
        wait_until(lambda: bus[0].publish("hello", 0) or events.poll(50), WAIT,
                   "the events subscription")
        run.loop.control.client.poll_events(0)
        run.thread.start()
        for i in range(40):
            run.pin.send(udp(i, i))
            run.sin.send(udp(i, 3 * i))
            assert run.released(1) == [udp(i, i)]
        bus[0].publish("role", 0, role="unprotected")
        wait_until(lambda: run.loop.comparator.passthrough, WAIT,
                   "the role event handled while native rounds run")
        p = udp(99, 99)
        run.pin.send(p)
        assert run.released(1) == [p]
    finally:
        run.stop.set()
        bus[0].publish("wake", 0)          # the loop's round ends on it
        run.close()
        bus[0].close()
    # (counted as each native round returns: the last one on the role event)
    assert run.loop.native_stats["pairs"] > 0
    assert run.loop.comparator.counters["native_matched_frames"] == \
        run.loop.native_stats["pairs"]


def _items(frames) -> bytes:
    return b"".join(encode_frame(f) for f in frames)


def _python_judges(p: bytes, s: bytes) -> int:
    """How many items of p the Python path releases at once against s, when that is all of
    them (0 otherwise): each item a frame _equal_outside_masks accepts against s's."""
    from pipeline.net.comparator import _equal_outside_masks
    from pipeline.net.settings import MAX_FRAME_BYTES
    at = k = 0
    while at < len(p):
        (length,) = struct.unpack_from("!I", p, at)
        end = at + 4 + length
        if len(p) - at < 42 or length > MAX_FRAME_BYTES or end > len(p) \
                or p[at:at + 4] != s[at:at + 4] \
                or not _equal_outside_masks(p[at:end], s[at:end], 4):
            return 0
        at, k = end, k + 1
    return k


@pytest.mark.parametrize("seed", range(4))
def test_the_native_comparison_takes_exactly_the_pairs_the_python_one_does(seed):
    """releasable_run (numba) against _equal_outside_masks: runs of TCP/UDP/ICMP frames and
    frames it must leave to the per-frame path (IPv4 options, fragments, VLAN tags, IPv6,
    ARP, short frames), the SVM's copy changed in one byte anywhere (a masked field or
    not), or its length word: the same verdict, always."""
    import numpy as np

    from pipeline.net import native
    rng = random.Random(seed)
    kinds = [
        lambda i: tcp(i, i % 3, rng.randrange(65536), 1 + 999 * i, window=rng.randrange(65536)),
        lambda i: udp(i, rng.randrange(65536)),
        lambda i: build.icmp_echo_frame(G, C, 7, i, b"ping %d" % i),
        lambda i: build.udp_frame(G, C, 1, 2, b"x" * 20, vlan=5),
        lambda i: build.tcp_frame(G, C, 1, 2, 1, 1, TCP_ACK, b""),
        lambda i: bytes(rng.randrange(256) for _ in range(rng.choice((20, 41, 60)))),
    ]

    def variant(frame: bytes) -> bytes:
        f = bytearray(frame)
        roll = rng.random()
        if roll < 0.15 and len(f) > 34:
            f[14] = 0x46                                        # IPv4 options
        elif roll < 0.25 and len(f) > 34:
            f[20] |= 0x20                                       # more fragments
        elif roll < 0.3:
            f[12:14] = b"\x86\xdd"                              # not IPv4
        return bytes(f)
    buffers = [np.zeros(1 << 16, np.uint8) for _ in range(3)]
    verdicts = {True: 0, False: 0}
    for _ in range(400):
        count = rng.choice((1, 1, 2, 7))
        frames = [variant(rng.choice(kinds)(i)) for i in range(count)]
        svm = bytearray(_items(frames))
        pvm = _items(frames)
        for item in range(count):             # the SVM's own IP id / window, as guests do
            base = sum(len(f) + 4 for f in frames[:item]) + 4
            if len(frames[item]) > 52 and rng.random() < 0.8:
                for j in (18, 19, 24, 25, 48, 49, 50, 51):
                    svm[base + j] = rng.randrange(256)
        if rng.random() < 0.6:
            svm[rng.randrange(len(svm))] ^= 1 << rng.randrange(8)
        p, s, t = buffers
        n = len(pvm)
        p[:n] = np.frombuffer(pvm, np.uint8)
        s[:n] = np.frombuffer(bytes(svm), np.uint8)
        k = native.releasable_run(p, s, t, n)
        assert k == _python_judges(pvm, bytes(svm)), (pvm.hex(), bytes(svm).hex())
        verdicts[k > 0] += 1
    assert min(verdicts.values()) > 40          # both verdicts, many times


def test_native_rounds_give_python_its_turn_while_pairs_trickle_in():
    """Pairs that keep coming, each well before the poll's timeout: the native rounds come
    back to Python once the round's time (run_once's timeout) is up, not only after
    NATIVE_MAX_PAIRS pairs, so the stage's counters (what ``stats`` shows), the timeout
    scan and the stop flag get their turn. Before, at 20 requests/s a node's ``stats``
    showed none of 256 pairs for 13 s."""
    from pipeline.net.loop import NATIVE_MAX_PAIRS
    run = Running(native=True, threaded=False)
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        run.out.sock.setblocking(False)
        while not stop.is_set():
            send_pairs(run, [(udp(i, i & 0xFFFF), udp(i, (3 * i) & 0xFFFF))], pvm_first=True)
            i += 1
            try:
                while run.out.sock.recv(1 << 20):       # (what came out: nobody reads it)
                    pass
            except BlockingIOError:
                pass
            stop.wait(0.005)
    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    stats = run.loop.native_stats
    turns: list[tuple[int, int]] = []          # (pairs, ended by its budget) of each call

    def a_turn_on_time() -> bool:
        pairs, budget = stats["pairs"], stats.get("max", 0)
        run.loop.run_once(0.1)
        turns.append((stats["pairs"] - pairs, stats.get("max", 0) - budget))
        # a native call that released pairs and ended on its budget before max_pairs
        return any(0 < n < NATIVE_MAX_PAIRS and ended for n, ended in turns)
    try:
        wait_until(a_turn_on_time, WAIT, "a native call ended by its time, before max_pairs")
    finally:
        stop.set()
        feeder.join(WAIT)
        run.close()


def test_native_rounds_loaded_counts_a_background_load_once_taken_up(monkeypatch):
    """``native_rounds_loaded`` (what scripts/bench_service.py waits for before a row: a
    background load holds the GIL for tens of ms at a time) is 0 until the loop has taken up
    the rounds a background load brought, then 1; a loop that loaded them at its start says
    1 at once. (A process that has not loaded them: this one's loaded module forgotten, as
    in a comparator forked by a supervisor that did not load them; the background load
    then finds numba imported already.)"""
    monkeypatch.setattr(loop_module, "_native_module", None)
    run = Running(native="background", threaded=False)
    try:
        counters = run.loop.comparator.counters
        assert counters["native_rounds_loaded"] == 0
        run.loop.run_once(0.001)
        assert counters["native_rounds_loaded"] == 0      # no load asked for yet
        run.loop.load_native_in_background()
        wait_until(lambda: (run.loop.run_once(0.001), counters["native_rounds_loaded"])[1]
                   == 1, WAIT, "the background load taken up")
        # and the pairs then go the native way
        pairs, differ = case(3, n=300)
        run.thread.start()
        out = feed(run, pairs, 3, differ)
    finally:
        run.close()
    # (read once the loop stopped: native rounds add their counts when they return)
    assert per_flow(out) == per_flow(p for p, _ in pairs)
    assert run.loop.native_stats["pairs"] > 0
    eager = Running(native=True, threaded=False)
    try:
        assert eager.loop.comparator.counters["native_rounds_loaded"] == 1
    finally:
        eager.close()


def test_a_loop_in_a_process_with_the_rounds_loaded_takes_them_at_once():
    """The node's comparator is forked by a supervisor that loaded the rounds
    (preload_native_rounds): with ``native="background"`` it takes them at its start,
    counts them loaded before its first round, and starts no loading thread; its pairs go
    the native way."""
    run = Running(native="background", threaded=False)
    try:
        assert preload_native_rounds(run.loop.settings)         # (loaded in this process)
        assert run.loop.comparator.counters["native_rounds_loaded"] == 1
        run.loop.load_native_in_background()
        assert run.loop._native_loader is None
        pairs, _ = case(4, n=100)
        run.thread.start()
        out = feed(run, pairs, 4)
    finally:
        run.close()
    assert per_flow(out) == per_flow(p for p, _ in pairs)
    assert run.loop.native_stats["pairs"] > 0


def test_the_supervisor_loads_the_rounds_only_for_a_comparator_that_can_use_them():
    """preload_native_rounds says False (and loads nothing) for settings whose streams the
    comparator cannot take whole: a packet socket, a vnet header word, the SVM's rewriter."""
    d = "/nonexistent"
    ok = NetSettings(primary_in=f"unix:{d}/p", secondary_in="tcp:127.0.0.1:9",
                     outdev=f"unix:{d}/o")
    assert preload_native_rounds(ok)
    for bad in (dict(primary_in="packet:eth0"), dict(outdev=f"pcap:{d}/o.pcap"),
                dict(vnet_hdr=True), dict(rewrite_secondary=True), dict(secondary_in="")):
        assert not preload_native_rounds(dataclasses.replace(ok, **bad)), bad
