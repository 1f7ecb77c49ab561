"""A client of the sim guest's service, as the benchmark and the demo use it: it sends
requests (guest inputs, on the primary's ``client-inputs.sock``) and times each until its
answer (the guest's output frame, released by the comparator on ``net.outdev``) arrives.

The guest answers its inputs in order, one frame each, and the frame starts with the
input's seq; so the n-th request's answer is the frame whose seq is ``first + n``, where
``first`` is learnt from a probe request. That holds while this client is the guest's
only source of input (``guest.workload.input_rate_hz = 0`` on the primary).
"""
from __future__ import annotations

import select
import socket
import time

import zmq

from pipeline.net.framing import FrameDecoder

#: Ethernet + IPv4 + UDP headers before the guest's output (pipeline.net.build)
PAYLOAD_AT = 14 + 20 + 8


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class ServiceClient:
    """One connection to the released outputs, one to the inputs. Not thread-safe: one
    thread uses it (the benchmark runs it in a process of its own)."""

    def __init__(self, outdev: str, inject: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock.connect(outdev)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.setblocking(False)
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 1_000_000)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(inject)
        self.decoder = FrameDecoder(False)
        self.sent = 0                  # requests sent so far (the probe included)
        self.first_seq: int | None = None
        #: request number -> due time, for requests not answered yet
        self.waiting: dict[int, float] = {}
        self.on_answer = None
        #: seconds from due to answer of each request of the current phase, as they came
        self.latencies: list[float] = []

    def send(self, due: float) -> None:
        n = self.sent
        self.sent += 1
        self.waiting[n] = due
        self.push.send(b"request %d" % n)

    def poll(self, timeout: float) -> None:
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return
        now = time.monotonic()
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionError("the released-output stream ended")
            for item in self.decoder.feed(data):
                frame = item[0]
                seq = int.from_bytes(frame[PAYLOAD_AT:PAYLOAD_AT + 8], "little")
                if self.first_seq is None:
                    self.first_seq = seq          # the probe's answer
                n = seq - self.first_seq
                due = self.waiting.pop(n, None)
                if due is not None and self.on_answer is not None:
                    self.on_answer(n, now - due, now)

    def probe(self) -> None:
        self.send(time.monotonic())
        deadline = time.monotonic() + 60
        while self.first_seq is None:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer to the probe request within 60 s")
            self.poll(0.1)

    def close(self) -> None:
        self.sock.close()
        self.push.close()
        self.ctx.term()

    def run_phase(self, rate: float | None, outstanding: int, duration: float,
                  drain: float, stop=None) -> dict:
        """Open loop at ``rate`` requests/s (``None``: closed loop, ``outstanding`` in
        flight) for ``duration`` s or until ``stop`` (an Event) is set; then the backlog
        while answers keep coming. Figures of this phase's requests."""
        lat: list[float] = []
        self.latencies = lat
        mine: set[int] = set()
        done_in_window = [0]
        t0 = time.monotonic()
        end = t0 + duration

        def answered(n: int, latency: float, now: float) -> None:
            if n in mine:
                mine.discard(n)
                lat.append(latency)
                if now <= end:
                    done_in_window[0] += 1
        self.on_answer = answered
        sent = 0
        while True:
            now = time.monotonic()
            if now >= end or (stop is not None and stop.is_set()):
                end = min(end, now)
                break
            if rate is not None:
                while t0 + sent / rate <= now:
                    mine.add(self.sent)
                    self.send(t0 + sent / rate)
                    sent += 1
                self.poll(min(t0 + sent / rate, end, now + 0.1) - time.monotonic())
            else:
                while len(mine) < outstanding:
                    mine.add(self.sent)
                    self.send(time.monotonic())
                    sent += 1
                self.poll(min(end - now, 0.1))
        # the backlog is served as long as answers keep coming; a request still unanswered
        # ``drain`` seconds after the last answer is lost
        last = [time.monotonic()]

        def drained(n: int, latency: float, now: float) -> None:
            answered(n, latency, now)
            last[0] = now
        self.on_answer = drained
        while mine and time.monotonic() < last[0] + drain:
            self.poll(0.05)
        lost = len(mine)
        for n in mine:
            self.waiting.pop(n, None)
        ms = [x * 1000 for x in lat]
        window = max(end - t0, 1e-9)
        return {"sent": sent, "offered_per_s": round(sent / window, 1),
                "completed_per_s": round(done_in_window[0] / window, 1),
                "completed": len(lat), "lost": lost,
                "drain_s": round(time.monotonic() - end, 2),
                "p50_ms": round_ms(percentile(ms, 50)), "p99_ms": round_ms(percentile(ms, 99)),
                "p999_ms": round_ms(percentile(ms, 99.9)),
                "max_ms": round_ms(max(ms, default=None))}


def round_ms(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
