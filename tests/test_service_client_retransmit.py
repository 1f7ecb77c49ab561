"""The sim service's client (``AnswerStream`` with ``inject``) against a real sim guest
behind a stand-in host: requests in on a ZeroMQ PULL socket (the client stage's
``client-inputs.sock``), answers out as frames on a unix stream (``net.outdev``). The host
can lose answers (as a lost comparator does) and go away and come back (a failover to a
survivor with the same guest state): the client sends the requests again, the guest
answers them from its reply cache, and every request gets exactly one answer."""
from __future__ import annotations

import os
import socket
import threading

import pytest
import zmq

from conftest import wait_until

from pipeline.net.build import guest_output_frame
from pipeline.net.framing import encode_frame
from pipeline.service_client import AnswerStream, RequestLoad
from pipeline.xen_io.sim import REPLY_CACHE_ENTRIES, SimDomain, open_sim_domain, parse_answer

pytestmark = pytest.mark.timeout(120)


class Host(threading.Thread):
    """Feeds the guest what arrives on ``inject``, sends its answers to whoever is
    connected on ``outdev``, except those of requests in ``drop`` (lost with the host)."""

    def __init__(self, guest: SimDomain, inject: str, outdev: str, drop=()) -> None:
        super().__init__(daemon=True)
        self.guest, self.drop = guest, set(drop)
        self.stop = threading.Event()
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(inject)
        if os.path.exists(outdev):
            os.unlink(outdev)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(outdev)
        self.listener.listen(1)
        self.dropped: list[int] = []

    def run(self) -> None:
        conn = self.listener.accept()[0]
        try:
            while not self.stop.is_set():
                if self.pull.poll(10):
                    self.guest.trim_inputs(self.guest.input_seq())   # (no checkpoints here)
                    self.guest.feed_input(self.pull.recv())
                out = b""
                for seq, frame in self.guest.read_outputs(0.0):
                    number = parse_answer(frame)[1]
                    if number in self.drop:
                        self.drop.discard(number)      # lost once, as with the host
                        self.dropped.append(number)
                        continue
                    out += encode_frame(guest_output_frame(frame))
                if out:
                    conn.sendall(out)
        finally:
            conn.close()

    def close(self) -> None:
        """The host goes: its sockets close (the client's stream ends)."""
        self.stop.set()
        self.join(10)
        self.pull.close()
        self.ctx.term()
        self.listener.close()


@pytest.fixture
def guest():
    dom = open_sim_domain("svc", 2048, dirty_log="bitmap")
    dom.start(paused=False)
    yield dom
    dom.close()


def client(tmp_path, **kw) -> RequestLoad:
    stream = AnswerStream(["unix:" + str(tmp_path / "out.sock")], timeout=30,
                          inject=["ipc://" + str(tmp_path / "in.sock")], client_id=9, **kw)
    return RequestLoad(stream, rate=500.0)


def test_answers_lost_on_the_way_are_asked_for_again_and_come_from_the_cache(tmp_path, guest):
    host = Host(guest, "ipc://" + str(tmp_path / "in.sock"), str(tmp_path / "out.sock"),
                drop=range(10, 20))
    host.start()
    load = client(tmp_path, retransmit_after=0.3)
    load.start()
    try:
        wait_until(lambda: load.count() >= 100, timeout=60, what="100 answers")
        load.finish(timeout=60)
    finally:
        load.close()
        host.close()
    assert host.dropped == list(range(10, 20))
    assert load.check_exactly_once() == []
    assert load.stream.retransmits >= 10
    # each request timed once, from its first send: a request whose answer was lost waited
    # at least until it was sent again (retransmit_after) and answered from the cache
    lat = load.stream.latencies
    assert sorted(lat) == list(range(load.stream.sent)), sorted(lat)[:20]
    assert all(lat[n] >= 0.3 for n in range(10, 20)), {n: lat[n] for n in range(10, 20)}
    assert all(x > 0 for x in lat.values())
    figures = load.latency_figures()
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], figures
    assert figures["max_ms"] == round(max(lat.values()) * 1000, 3) >= 300, figures
    guest.wait_for_input_seq(guest.input_head)      # (copies sent again may still be in)
    c = guest.counters()
    # each request executed once; the ten lost answers came from the cache
    assert c["requests_executed"] == load.stream.sent
    assert c["requests_replayed"] >= 10


def test_after_the_host_is_gone_every_unanswered_request_goes_to_the_next(tmp_path, guest):
    """The first host answers requests 0..29 and loses the rest of what it took; it goes.
    The next serves the same addresses with the same guest (the survivor has the state):
    the client reconnects, sends every unanswered request again, and gets each answer
    once. No timeout is involved (``retransmit_after`` is far away)."""
    first = Host(guest, "ipc://" + str(tmp_path / "in.sock"), str(tmp_path / "out.sock"),
                 drop=range(30, 1000))
    first.start()
    load = client(tmp_path, retransmit_after=600.0)
    load.start()
    second = None
    try:
        wait_until(lambda: len(first.dropped) >= 20, timeout=60, what="answers lost")
        first.close()
        second = Host(guest, "ipc://" + str(tmp_path / "in.sock"), str(tmp_path / "out.sock"))
        second.start()
        wait_until(lambda: load.stream.connections >= 2, timeout=60, what="a reconnection")
        wait_until(lambda: load.count() >= 30 + len(first.dropped), timeout=60,
                   what="the lost answers")
        load.finish(timeout=60)
    finally:
        load.close()
        (second or first).close()
    assert load.check_exactly_once() == []
    # executed once each (the lost ones' answers from the cache) or, sent into the first
    # host's queue and lost before the guest took them, executed by the next
    guest.wait_for_input_seq(guest.input_head)
    c = guest.counters()
    assert c["requests_executed"] == load.stream.sent
    assert c["requests_replayed"] >= len(first.dropped)


def test_no_request_goes_a_window_past_the_oldest_unanswered_one(tmp_path, guest):
    """Request 10's answer is lost and not asked for again for now; every other answer comes.
    The client stops at request 10 + window - 1: one more would take request 10's slot in
    the guest's reply cache (slot n mod its size), and request 10, sent again, would be
    refused (the old client counted unanswered requests: one of them, it went on for ever,
    and a CI run at load 14 saw request 1274 refused)."""
    window = 32
    host = Host(guest, "ipc://" + str(tmp_path / "in.sock"), str(tmp_path / "out.sock"),
                drop=[10])
    host.start()
    load = client(tmp_path, window=window, retransmit_after=600.0)
    stream = load.stream
    load.start()
    try:
        # either it went a cache past request 10 (the old client) or it stopped where it
        # must, with every other answer in
        wait_until(lambda: stream.sent > 10 + REPLY_CACHE_ENTRIES
                   or (stream.sent == 10 + window and load.count() == stream.sent - 1),
                   timeout=60, what="the client at its window or past the guest's cache")
        assert stream.sent == 10 + window, stream.sent
        assert stream.unanswered() == [10]
        assert stream.request() is None             # (the load thread's call, once more)
        stream.retransmit_after = 0.2               # now ask for it again
        wait_until(lambda: load.count() >= 10 + 2 * window, timeout=60,
                   what="the window moving on once request 10 was answered")
        load.finish(timeout=60)
    finally:
        load.close()
        host.close()
    assert host.dropped == [10]
    assert stream.refused == []
    assert load.check_exactly_once() == []


def test_a_request_sent_again_waits_twice_as_long_each_time(tmp_path):
    """Backoff: overdue after retransmit_after, then 2x, 4x, 8x at most."""
    stream = AnswerStream(["unix:/nonexistent"], inject=["ipc:///nonexistent"],
                          retransmit_after=1.0)
    stream._tries[5] = 0
    assert not stream._timed_out(5, 0.9) and stream._timed_out(5, 1.1)
    stream._tries[5] = 2
    assert not stream._timed_out(5, 3.9) and stream._timed_out(5, 4.1)
    stream._tries[5] = 9
    assert not stream._timed_out(5, 7.9) and stream._timed_out(5, 8.1)
    with pytest.raises(ValueError, match="window"):
        AnswerStream(["unix:/x"], inject=["ipc:///x"], window=10_000)
