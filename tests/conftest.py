"""Fixtures and helpers shared by several test modules: the one free-port helper, the one
etcd fixture, the one CLI wrapper, the one sim-guest factory, the
hand-driven secondary, and waiting for an event instead of for time.

Test modules import the plain helpers with ``from conftest import ...`` (pytest puts
this directory on sys.path)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest
from hypothesis import HealthCheck, settings

from pipeline.localpair import free_port_base, wait_until  # noqa: F401  (tests import it from here)
from pipeline.shm import cleanup_segments, segment_prefix

# Hypothesis: "ci" (the default) draws the same examples on every run (derandomize), a
# bounded number of them, with no per-example deadline (a loaded 2-core machine is slow,
# not wrong). "fuzz" is for a longer hunt by hand:
#   HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz_*.py
# (random examples, failures kept in .hypothesis/ and replayed first on the next run).
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def node():
    """A unique node name; every segment it left in /dev/shm is removed afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    cleanup_segments(segment_prefix(name))


def free_port(count: int = 1) -> int:
    """A TCP port on 127.0.0.1 that is free together with the next ``count - 1``. Drawn
    below the kernel's ephemeral range (pipeline.localpair.free_port_base), so no outgoing
    connection of another test or process can take it between this check and the bind."""
    return free_port_base(count)


def cli(*args: str, timeout: float = 180, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``colo-pipeline ARGS`` (this tree's, via ``python -m pipeline.cli``) and capture
    its output; its whole process group is killed if it outlives ``timeout``."""
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], text=True,
                         stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, env=env)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"colo-pipeline {' '.join(args)} still ran after {timeout} s:\n"
                             f"{out[-2000:]}\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


class Etcd:
    """A one-member etcd on 127.0.0.1 with its data in a temporary directory."""

    def __init__(self, data_dir: str) -> None:
        self.client_port = free_port(2)
        self.peer_port = self.client_port + 1
        self.url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(os.path.join(os.path.dirname(data_dir), "etcd.log"), "wb")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "witness", "--data-dir", data_dir,
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"witness={peer}", "--log-level", "error"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"etcd did not become healthy at {self.url}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def etcd(tmp_path):
    """A running etcd (``.url``), killed afterwards."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: scripts/install.sh --test must install the Debian "
                    "package etcd-server")
    server = Etcd(str(tmp_path / "etcd-data"))
    try:
        yield server
    finally:
        server.kill()


class StaleListener:
    """A listener on 127.0.0.1:``port`` that answers every connection with a ZMTP greeting
    for another security mechanism (PLAIN), as a stale or misconfigured peer would: a
    CURVE client's handshake fails on its side with a protocol error (after which
    libzmq would never connect to that endpoint again). ``conns``: connections taken."""

    GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"PLAIN".ljust(20, b"\0") + bytes(32)

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted(c)

    def accepted(self, c: socket.socket) -> None:
        """What the stale peer does with a connection it took."""
        c.sendall(self.GREETING)
        self.conns.append(c)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept(): the port is free
        except OSError:
            pass
        self.thread.join(10)
        self.sock.close()
        for c in self.conns:
            c.close()


def shutdown_both(*socks: socket.socket) -> None:
    """Shut down both directions of each relayed connection (either end may be gone)."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def checkpoint_of_writes(pair, pages: int) -> None:
    """The PVM of a running ``pair`` writes ``pages`` pages (one sim input), then one
    requested checkpoint commits."""
    from pipeline.xen_io.sim import SimDomain
    seq = pair.stage_counter("client", "pvm_input_seq")
    pair.inject_input(SimDomain.write_command(pages))
    wait_until(lambda: pair.stage_counter("client", "pvm_input_seq") > seq, 120,
               "the PVM consumed the write command")
    count = len(pair.checkpoints())
    pair.request_checkpoint()
    pair.wait_checkpoints(count + 1, timeout=300)


class Relay:
    """Forwards 127.0.0.1:listen+i to 127.0.0.1:target+i (i = 0..3: pages, control, inputs,
    heartbeat): a link between the primary (pointed at ``listen``) and the secondary made of
    real TCP connections this process can slow down or break.

    ``rate``: bytes from the primary on the pages channel are paced to that many bytes/s
    while it is set. ``cut_pages_after``: once that many bytes went from the primary on the
    pages channel, the next chunk is dropped and the connection closed at both ends, once
    (``cuts`` counts it): what was in flight is lost, as when a link breaks and comes back;
    the primary's socket connects again by itself."""

    def __init__(self) -> None:
        self.listen = free_port(4)
        self.target = 0           # the secondary's base port, set before anyone connects
        self.rate: float | None = None
        self.cut_pages_after: int | None = None
        self.cuts = 0
        self.stopped = threading.Event()
        self.socks: list[socket.socket] = []
        for i in range(4):
            srv = socket.create_server(("127.0.0.1", self.listen + i))
            srv.settimeout(0.2)
            self.socks.append(srv)
            threading.Thread(target=self._accept, args=(srv, i), daemon=True).start()

    def _accept(self, srv: socket.socket, channel: int) -> None:
        while not self.stopped.is_set():
            try:
                a, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            b = self._connect(channel)
            if b is None:
                a.close()
                continue
            self.socks += [a, b]
            threading.Thread(target=self._pump, args=(a, b, channel == 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _connect(self, channel: int) -> socket.socket | None:
        """The secondary's end; it may not listen yet (the nodes start together): a relay
        that dropped the primary's connection then would look like a broken link."""
        deadline = time.monotonic() + 60
        while not self.stopped.is_set() and time.monotonic() < deadline:
            try:
                return socket.create_connection(("127.0.0.1", self.target + channel))
            except OSError:
                time.sleep(0.05)
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, pages: bool) -> None:
        forwarded = 0
        try:
            while not self.stopped.is_set():
                data = src.recv(16384)
                if not data:
                    break
                cut = self.cut_pages_after if pages else None
                if cut is not None and forwarded >= cut:
                    self.cut_pages_after = None
                    self.cuts += 1
                    break                   # this chunk is lost, the connection closed
                rate = self.rate if pages else None
                if rate:
                    time.sleep(len(data) / rate)
                dst.sendall(data)
                forwarded += len(data)
        except OSError:
            pass
        finally:
            shutdown_both(src, dst)

    def close(self) -> None:
        self.stopped.set()
        for s in self.socks:
            s.close()


@pytest.fixture
def make_sim_domain():
    """Open and start sim guests for a test (8 MiB each by default, paused unless asked),
    closed at its end whatever happened: ``make_sim_domain(name, pages, workload, ...)``."""
    from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain
    made = []

    def make(name: str = "g", pages: int = 2048, workload: WorkloadSpec | None = None,
             dirty_log: str = "auto", paused: bool = True, **kw):
        dom = open_sim_domain(name, pages, workload or WorkloadSpec(), dirty_log, **kw)
        made.append(dom)
        dom.start(paused=paused)
        return dom

    yield make
    for dom in made:
        dom.close()


def start_hand_secondary(tmp_path, verify_pages: str, epoch_timeout_ms: int,
                         max_interval_ms: int, input_log_slots: int | None = None):
    """A real secondary node alone (its primary is a test's HandPrimary,
    tests/test_secondary_faults.py), started; the caller closes it. ``input_log_slots``:
    the SVM's input log (the schema's default when None)."""
    from test_secondary_faults import BATCH, PAGES

    from pipeline.localpair import LocalPair
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": PAGES,
                  **({} if input_log_slots is None else {"input_log_slots": input_log_slots})},
        "pipeline": {"verify_workers": 2, "batch_pages": BATCH, "verify_pages": verify_pages},
        # the hand primary sends no heartbeats; a long interval keeps the secondary's
        # control-silence fallback from taking over between the test's steps
        "checkpoint": {"epoch_timeout_ms": epoch_timeout_ms,
                       "max_interval_ms": max_interval_ms},
    }, workdir=str(tmp_path), log_level="info")
    pair.start(roles=("secondary",))
    return pair


@pytest.fixture
def secondary(tmp_path, request):
    """A real secondary node and the PVM of a hand-driven primary
    (tests/test_secondary_faults.py's HandPrimary), closed at the end; ``indirect``
    parametrization sets ``pipeline.verify_pages``."""
    from test_secondary_faults import close_hand_pair, hand_pvm

    # every page re-hashed unless a test asks otherwise: the corrupt-page test sends a bad
    # page over an authentic channel, which only the full check catches for certain (the
    # default samples one per batch)
    pair = start_hand_secondary(tmp_path, getattr(request, "param", "full"),
                                epoch_timeout_ms=1500, max_interval_ms=30000)
    dom = hand_pvm(pair)
    try:
        yield pair, dom
    finally:
        close_hand_pair(pair, dom)
