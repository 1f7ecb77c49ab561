"""A client of the sim guest's service, as the benchmark and the demo use it: it sends
requests (guest inputs, on the primary's ``client-inputs.sock``) and times each until its
answer (the guest's output frame, released by the comparator on ``net.outdev``) arrives.

The guest answers its inputs in order, one frame each, and the frame starts with the
input's seq; so the n-th request's answer is the frame whose seq is ``first + n``, where
``first`` is learnt from a probe request. That holds while this client is the guest's
only source of input (``guest.workload.input_rate_hz = 0`` on the primary).

:class:`AnswerStream` follows the service across a failover: when the stream ends (the
primary's host is gone) it connects to the service's address again, which the survivor
serves now (or to the next of several addresses), and it keeps one answer per key as a
client's TCP stack keeps one copy of each byte: an answer the survivor sends again (a
rolled-back SVM regenerates the answers of the inputs it replays) is dropped, and counted
as a duplicate, or as a conflict if its bytes differ from the copy already received
(docs/deployment.md, "What clients see across a failover"). Without ``inject`` it only
reads, and the key is the input seq (the node's own input stream). With ``inject`` it is
the service's client, with the sim service's retransmission protocol, as a real RPC
service has one: it sends requests (:func:`pipeline.xen_io.sim.request_input`, its client
id and a request number), none numbered ``window`` or more past the oldest unanswered one
(the guest keeps the answer of request n in slot n mod its cache: a request that far on
would take the slot of one still unanswered, and that one, sent again, would be refused),
and sends a request again when
its answer has not come ``retransmit_after`` seconds after it was sent (twice that after
it was sent again, and so on up to 8x), and every
unanswered one after each reconnection (the lost comparator held their answers, or the
lost primary never passed them on). The guest answers a request it already executed from
its reply cache, in guest memory, with the same bytes; so every request gets exactly one
answer after the client dropped the duplicates. The key is then the request number, and
each request is timed from its first send (made while no connection is up, from when it
was made) to its one counted answer: what the service's client waited, a failover's gap
included (``latencies``).
"""
from __future__ import annotations

import select
import socket
import threading
import time
from collections import deque

import zmq

from pipeline import trace
from pipeline.net.framing import FrameDecoder
from pipeline.net.zmtp import ZmtpPush, connect_stream  # noqa: F401  (this module's API too)
from pipeline.xen_io.sim import REPLY_CACHE_ENTRIES, answer_refused, parse_answer, request_input

#: Ethernet + IPv4 + UDP headers before the guest's output (pipeline.net.build)
PAYLOAD_AT = 14 + 20 + 8


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class AnswerStream:
    """The service's answers as a client on the clients' network reads them, across
    failovers (see the module's docstring). ``addresses``: where the service may be
    (one address that moves with the active host, or one per host, tried in turn).
    ``inject``: where requests go (every host's input socket; only the primary's is bound,
    and a request goes only over a connection that is up). Not thread-safe: one thread
    calls :meth:`request` and :meth:`read`."""

    def __init__(self, addresses: list[str], timeout: float = 60.0,
                 inject: list[str] | None = None, client_id: int = 1,
                 window: int = REPLY_CACHE_ENTRIES, retransmit_after: float = 3.0) -> None:
        self.addresses, self.timeout = list(addresses), timeout
        self.inject = list(inject or [])
        if self.inject and not 0 < window <= REPLY_CACHE_ENTRIES:
            raise ValueError(f"window must be in 1..{REPLY_CACHE_ENTRIES} (the guest's reply "
                             f"cache), got {window}")
        self.client_id, self.window, self.retransmit_after = client_id, window, retransmit_after
        self.sent = 0                         # requests made (numbers 0 .. sent - 1)
        self.outstanding: dict[int, float] = {}   # request number -> when last sent
        self._made: dict[int, float] = {}     # request number -> when first sent
        #: request number -> seconds from its first send to its one counted answer
        #: (only added to: another thread may copy its values while it grows)
        self.latencies: dict[int, float] = {}
        self._tries: dict[int, int] = {}      # request number -> times sent again
        self.retransmits = 0                  # requests sent again
        self.refused: list[int] = []          # requests the guest refused (older than its cache)
        self.foreign = 0                      # answers to no request of this client
        self._queue: deque[int] = deque()     # requests to send when a connection is up
        self._zmq: zmq.Context | None = None
        self._push: zmq.Socket | None = None
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder(False)
        self.seqs: list[int] = []             # each seq once, in the order first received
        self.first: dict[int, bytes] = {}     # seq -> the answer's bytes as first received
        self.duplicates = 0                   # answers received again, the same bytes
        self.conflicts: list[int] = []        # seqs received again with other bytes
        self.connections = 0
        #: len(seqs) each time a stream that brought answers ended (a connection made
        #: while the lost host's processes were still dying ends with none)
        self.breaks: list[int] = []
        self._at_connect = 0
        self._next = 0

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            address = self.addresses[self._next % len(self.addresses)]
            try:
                self.sock = connect_stream(address, timeout=0.2)
                self.decoder = FrameDecoder(False)
                self.connections += 1
                self._at_connect = len(self.seqs) + self.duplicates + len(self.conflicts)
                if self.inject:
                    self._new_push()
                return
            except OSError:
                self._next += 1
                if time.monotonic() > deadline:
                    raise ConnectionError(f"no service at {self.addresses} within "
                                          f"{self.timeout} s") from None

    # -- requests (with ``inject``) --------------------------------------------------------
    def _new_push(self) -> None:
        """A fresh request socket at each (re)connection: requests queued towards the lost
        host are dropped with it, and every unanswered request goes again (its answer was
        lost with the host, or the request itself was)."""
        if self._zmq is None:
            self._zmq = zmq.Context()
        if self._push is not None:
            self._push.close(linger=0)
        self._push = self._zmq.socket(zmq.PUSH)
        self._push.setsockopt(zmq.IMMEDIATE, 1)    # only over a connection that is up
        self._push.setsockopt(zmq.SNDHWM, 100_000)
        self._push.setsockopt(zmq.LINGER, 0)
        for address in self.inject:
            self._push.connect(address)
        if self.connections > 1:
            self._resend(lambda n, age: True)

    def request(self) -> int | None:
        """Send the next request; its number, or None while the oldest unanswered one is
        ``window`` requests back (the dict's first key: numbers go in in order, a resend
        only updates its time). A count of unanswered requests is not enough: one answer
        lost with the primary, asked for again only ``retransmit_after`` later, while the
        others come: the client went 256 on and the guest refused the resend (CI, load 14)."""
        if self.outstanding and self.sent - next(iter(self.outstanding)) >= self.window:
            return None
        n = self.sent
        self.sent += 1
        self.outstanding[n] = self._made[n] = time.monotonic()
        self._queue.append(n)
        self._flush()
        return n

    def _resend(self, due) -> None:  # type: ignore[no-untyped-def]
        """Queue again each unanswered request for which ``due(number, seconds since it was
        last sent)``."""
        now = time.monotonic()
        queued = set(self._queue)
        for n, at in self.outstanding.items():
            if n not in queued and due(n, now - at):
                self.outstanding[n] = now
                self._tries[n] = self._tries.get(n, 0) + 1
                self._queue.append(n)
                self.retransmits += 1

    def _timed_out(self, n: int, age: float) -> bool:
        """The answer is overdue: ``retransmit_after``, doubled at each time the request
        was sent again (up to 8x), so a slow service is not flooded with copies."""
        return age > self.retransmit_after * (1 << min(self._tries.get(n, 0), 3))

    def _flush(self) -> None:
        if self._push is None:
            return
        while self._queue:
            try:
                self._push.send(request_input(self.client_id, self._queue[0]), zmq.NOBLOCK)
            except zmq.Again:           # no connection up (the service is moving): later
                return
            self._queue.popleft()

    def unanswered(self) -> list[int]:
        return sorted(self.outstanding)

    # -- answers ----------------------------------------------------------------------------
    def read(self, timeout: float) -> int:
        """Take what arrives within ``timeout`` s; the number of new answers. With
        ``inject``, requests due for sending again go first."""
        if self.sock is None:
            self._connect()
        if self.inject:
            self._resend(self._timed_out)
            self._flush()
        if not select.select([self.sock], [], [], max(0.0, timeout))[0]:
            return 0
        new = 0
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return new
            except OSError:
                data = b""
            now = time.monotonic()    # after each read: see ServiceClient.poll
            if not data:                       # the host serving it is gone: follow
                if len(self.seqs) + self.duplicates + len(self.conflicts) > self._at_connect:
                    self.breaks.append(len(self.seqs))
                self.sock.close()
                self.sock = None
                return new
            for item in self.decoder.feed(data):
                frame = bytes(item[0][PAYLOAD_AT:])
                if self.inject:
                    answers = parse_answer(frame)
                    if answers is None or answers[0] != self.client_id:
                        self.foreign += 1
                        continue
                    seq = answers[1]
                    self._tries.pop(seq, None)
                    if self.outstanding.pop(seq, None) is not None and answer_refused(frame):
                        self.refused.append(seq)
                else:
                    seq = int.from_bytes(frame[:8], "little")
                had = self.first.get(seq)
                if had is None:
                    self.first[seq] = frame
                    self.seqs.append(seq)
                    new += 1
                    made = self._made.pop(seq, None) if self.inject else None
                    if made is not None:
                        self.latencies[seq] = now - made
                elif had == frame:
                    self.duplicates += 1
                else:
                    self.conflicts.append(seq)

    def gaps(self) -> list[tuple[int, int]]:
        """At each end of a stream: (the last seq before it, the first seq after it)."""
        return [(self.seqs[b - 1], self.seqs[b]) for b in self.breaks
                if 0 < b < len(self.seqs)]

    def missing(self) -> list[int]:
        """Seqs between the first and the last answer received that never came."""
        if not self.seqs:
            return []
        got = set(self.seqs)
        return [q for q in range(min(got), max(got)) if q not in got]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._push is not None:
            self._push.close(linger=0)
            self._push = None
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None


class RequestLoad(threading.Thread):
    """A client of the sim service across failovers, in a thread of its own: sends
    ``rate`` requests a second through ``stream`` (an :class:`AnswerStream` with
    ``inject``; never more than its window unanswered, and no burst after the window was
    full) and reads the answers, until :meth:`close`. :meth:`finish` stops the requests
    and waits until every one was answered; :meth:`check_exactly_once` then says whether
    each got exactly one answer."""

    def __init__(self, stream: AnswerStream, rate: float) -> None:
        super().__init__(daemon=True)
        self.stream, self.rate = stream, rate
        self.stop, self.sending, self.error = threading.Event(), threading.Event(), ""
        self.sending.set()

    def run(self) -> None:
        try:
            t0, made = time.monotonic(), 0
            while not self.stop.is_set():
                if self.sending.is_set():
                    while made < (time.monotonic() - t0) * self.rate:
                        if self.stream.request() is None:
                            t0 = time.monotonic() - made / self.rate
                            break
                        made += 1
                self.stream.read(0.02)
        except Exception as exc:     # noqa: BLE001 (the caller reports it: count, finish)
            self.error = repr(exc)

    def count(self) -> int:
        """Requests answered so far (ConnectionError if the client failed)."""
        if self.error:
            raise ConnectionError(f"the service's client failed: {self.error}")
        return len(self.stream.seqs)

    def finish(self, timeout: float = 300.0, check=None) -> None:  # type: ignore[no-untyped-def]
        """Stop sending new requests; wait until every one was answered (the client sends
        the unanswered ones again meanwhile). ``check()`` is called while waiting (e.g.
        to fail at once if a node died)."""
        self.sending.clear()
        deadline = time.monotonic() + timeout
        while self.stream.outstanding:
            self.count()
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.stream.outstanding)} requests unanswered "
                                   f"after {timeout} s: {self.stream.unanswered()[:20]}")
            time.sleep(0.05)
        self.count()

    def latency_figures(self) -> dict:
        """p50/p99/p99.9/max in ms of the answers so far, each from the request's first
        send (:class:`AnswerStream`); safe while the client runs."""
        return latency_figures(list(self.stream.latencies.values()))

    def check_exactly_once(self) -> list[str]:
        """What is wrong with "every request got exactly one answer" (empty: nothing): an
        answer received again with other bytes, a refused request, an unanswered one."""
        s, problems = self.stream, []
        if s.conflicts:
            problems.append(f"answers received again with other bytes: {s.conflicts[:20]}")
        if s.refused:
            problems.append(f"requests refused (older than the guest's cache): {s.refused[:20]}")
        if sorted(s.seqs) != list(range(s.sent)):
            missing = sorted(set(range(s.sent)) - set(s.seqs))
            problems.append(f"{len(missing)} of {s.sent} requests unanswered: {missing[:20]}")
        return problems

    def executions(self) -> dict[int, int]:
        """Input seq -> request number, of each request the guest executed, from the
        answers (the first 8 bytes of an answer are the seq of the input that computed
        it; an answer from the reply cache is those same bytes). ValueError if two
        requests name one input (an answer not from the guest's one history)."""
        out: dict[int, int] = {}
        for number, frame in self.stream.first.items():
            seq = int.from_bytes(frame[:8], "little")
            if out.setdefault(seq, number) != number:
                raise ValueError(f"requests {out[seq]} and {number} both answered by input "
                                 f"seq {seq}")
        return out

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        self.stream.close()


class ServiceClient:
    """One connection to the released outputs, one to the inputs. Not thread-safe: one
    thread uses it (the benchmark runs it in a process of its own)."""

    def __init__(self, outdev: str, inject: str, direct: bool = False) -> None:
        """``direct``: requests go out on a :class:`ZmtpPush` (written by this thread, no
        I/O thread woken per request; no reconnection), else on a libzmq PUSH socket."""
        self.sock = connect_stream(outdev)
        self.ctx = None
        if direct:
            self.push = ZmtpPush(inject)
        else:
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
        if trace.REQUESTS and self.first_seq is not None:
            # due: when the open loop meant to send it (its latency counts from there);
            # sent: when this process, which shares the CPUs with the nodes it measures,
            # got to hand it to the socket (a request sent late waited for the client).
            # Stamped before the send: the client stage may take it (and this CPU) first
            trace.request("client_due", self.first_seq + n, "client", int(due * 1e9))
            trace.request("client_sent", self.first_seq + n, "client")
        self.push.send(b"request %d" % n)

    def poll(self, timeout: float) -> None:
        queued = isinstance(self.push, ZmtpPush) and bool(self.push.pending)
        r, w, _ = select.select([self.sock], [self.push] if queued else [], [],
                                max(0.0, timeout))
        if w:
            self.push.flush()
        if not r:
            return
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            # the answers in ``data`` were in the socket by now, and no earlier stamp is
            # certain: a time taken once before the first read was earlier than the
            # answers this loop reads later (they came while the earlier ones were being
            # handled, or while this process waited for a CPU), which then seemed to
            # arrive before they were sent (client_got < pvm_out in the request trace)
            # and were timed short
            now_ns = time.monotonic_ns()
            now = now_ns / 1e9
            if not data:
                raise ConnectionError("the released-output stream ended")
            for item in self.decoder.feed(data):
                frame = item[0]
                seq = int.from_bytes(frame[PAYLOAD_AT:PAYLOAD_AT + 8], "little")
                if self.first_seq is None:
                    self.first_seq = seq          # the probe's answer
                n = seq - self.first_seq
                due = self.waiting.pop(n, None)
                if trace.REQUESTS and due is not None:
                    trace.request("client_got", seq, "client", now_ns)
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
        if self.ctx is not None:
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
        trace.flush_requests()
        window = max(end - t0, 1e-9)
        return {"sent": sent, "offered_per_s": round(sent / window, 1),
                "completed_per_s": round(done_in_window[0] / window, 1),
                "completed": len(lat), "lost": lost,
                "drain_s": round(time.monotonic() - end, 2), **latency_figures(lat)}


def round_ms(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def latency_figures(seconds: list[float]) -> dict:
    """p50, p99, p99.9 and the largest of ``seconds``, in ms (None each without any)."""
    ms = [x * 1000 for x in seconds]
    return {"p50_ms": round_ms(percentile(ms, 50)), "p99_ms": round_ms(percentile(ms, 99)),
            "p999_ms": round_ms(percentile(ms, 99.9)), "max_ms": round_ms(max(ms, default=None))}
