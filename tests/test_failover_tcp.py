"""A client's TCP connection across the loss of the primary host: every response once.

Real kernel TCP stacks stand in for the guests, as in tests/test_net_netns.py (two
namespaces with the same IP, MAC and deterministic server), but on two hosts:

    client --- clients' network (a bridge) ---+--- primary host: comparator --- PVM
                                              |        | secondary_in/_out (TCP, the
                                              |        | replication link)
                                              +--- secondary host: redirector --- SVM

The primary host runs our comparator: client frames in from its uplink, mirrored to the
PVM and (over TCP) to the secondary host, the PVM's frames released to the clients once
the SVM sent the same. The secondary host runs :mod:`pipeline.net.redirector` (QEMU's
filter-redirector and filter-rewriter): the mirrored frames into the SVM, the SVM's
frames to the comparator, the sequence offsets learnt on that host.

The client sends requests continuously on one TCP connection. Mid-stream every process
of the primary host is killed (the comparator and the PVM's server) and its namespaces
are deleted (its links go down); the redirector fails over (SIGUSR1, QEMU's
``x-colo-lost-heartbeat``; here the test sends it, as there is no node: the node's takeover
sending it is test_the_nodes_takeover_tells_the_redirector): the SVM's interface is
bridged to the clients' network. The client's stream must hold every response exactly
once, in order, nothing missing, nothing repeated, and the connection must not break.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from netns_lab import IP, MISSING, NetnsLab, wait_ready
from test_net_netns import CLIENT_IP, CLIENT_MAC, GUEST_IP, GUEST_MAC, SERVER, TCP_PORT

LAB = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300),
       pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]

REQUESTS = 3000
KILL_AFTER = 1000
REPL = {"primary": "10.88.0.1", "secondary": "10.88.0.2"}

CLIENT = r'''
import json, socket, sys, time
n, out_path = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("@IP@", @TCP@), timeout=120)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
got = bytearray()
waits = []
for i in range(n):
    t = time.monotonic()
    s.sendall(b"req %d\n" % i)
    line = f.readline()
    if not line:
        break
    waits.append(time.monotonic() - t)
    got += line
    if i % 100 == 0:
        print("progress %d" % i, flush=True)
s.shutdown(socket.SHUT_WR)
got += f.read()
s.close()
open(out_path, "wb").write(got)
print(json.dumps({"answered": len(waits), "longest_wait_s": max(waits)}), flush=True)
'''.replace("@IP@", GUEST_IP).replace("@TCP@", str(TCP_PORT))

COMPARATOR = r'''
import json, logging, signal, sys, threading
from pipeline.net.loop import CompareLoop
from pipeline.net.settings import NetSettings
logging.basicConfig(level="WARNING")
uplink, pvm, repl = sys.argv[1:4]
settings = NetSettings(primary_in="packet:" + pvm, primary_out="packet:" + pvm,
                       client_in="packet:" + uplink, outdev="packet:" + uplink,
                       secondary_in="tcp:%s:9000" % repl, secondary_out="tcp:%s:9001" % repl,
                       rewrite_secondary=False, compare_timeout_ms=3000)
loop = CompareLoop(settings)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
print("ready", flush=True)
try:
    loop.run(stop)
finally:
    loop.close()
'''


class TwoHostLab(NetnsLab):
    """Namespaces: cli (the client), lan (the clients' switch), ph and pvm (the primary
    host and its guest), sh and svm (the secondary host and its guest)."""

    def __init__(self, more: tuple[str, ...] = ()) -> None:
        super().__init__(f"ft{os.getpid() % 10000}",
                         ("cli", "lan", "ph", "pvm", "sh", "svm") + more)

    def _build(self) -> None:
        t = self.tag
        self.x("lan", IP, "link", "add", "br0", "type", "bridge")
        self.x("lan", IP, "link", "set", "br0", "up")
        cli, cli_port = self.veth(t + "c", "cli", "lan", mac0=CLIENT_MAC)
        self.guest("cli", cli, CLIENT_IP, GUEST_IP, GUEST_MAC)
        self.uplink = {}
        ports = [cli_port]
        for host, key in (("ph", "u"), ("sh", "v")):
            self.uplink[host], port = self.veth(t + key, host, "lan")
            ports.append(port)
        for port in ports:
            self.x("lan", IP, "link", "set", port, "master", "br0")
        self.tap = {}
        for guest, host, key in (("pvm", "ph", "p"), ("svm", "sh", "s")):
            inner, self.tap[guest] = self.veth(t + key, guest, host, mac0=GUEST_MAC)
            self.guest(guest, inner, GUEST_IP, CLIENT_IP, CLIENT_MAC)
        a, b = self.veth(t + "r", "ph", "sh")
        self.x("ph", IP, "addr", "add", REPL["primary"] + "/24", "dev", a)
        self.x("sh", IP, "addr", "add", REPL["secondary"] + "/24", "dev", b)

    def lose_primary_host(self, procs: list[subprocess.Popen]) -> None:
        """Every process of the primary host SIGKILLed, then its namespaces (and so its
        links) removed, as when the machine dies."""
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        for ns in ("ph", "pvm"):
            subprocess.run([IP, "netns", "del", self.ns[ns]], capture_output=True, timeout=20)


def _lab(test):
    for mark in LAB:
        test = mark(test)
    return test


def test_the_secondary_host_learns_the_offsets_from_the_clients_handshake_ack():
    """The PVM's SYN-ACK never reaches the secondary's host: the client's ACK that ends
    the handshake gives the PVM's ISN (ack - 1) and TSval (its echo). Then the SVM's
    segments carry the PVM's sequence numbers and timestamps (what the client sees after
    a failover) and the client's ACKs reach the SVM in its own space."""
    from test_net_rewriter import checksum_ok, ts, with_options

    from pipeline.net import build
    from pipeline.net.packet import TCP_ACK, TCP_PSH, TCP_SYN, parse_frame
    from pipeline.net.rewriter import SeqRewriter
    g, c = "10.0.0.2", "10.0.0.1"
    pvm_isn, svm_isn, pvm_ts, svm_ts = 1_000_000, 0xFFFFFF00, 5000, 0xFFFFFFF0
    rw = SeqRewriter()
    syn = with_options(build.tcp_frame(c, g, 5555, 80, 100, 0, TCP_SYN), ts(77, 0))
    rw.observe_client(syn)
    assert rw.to_secondary(syn) == syn
    rw.from_secondary(with_options(build.tcp_frame(g, c, 80, 5555, svm_isn, 101,
                                                   TCP_SYN | TCP_ACK), ts(svm_ts, 77)))
    ack = with_options(build.tcp_frame(c, g, 5555, 80, 101, pvm_isn + 1, TCP_ACK),
                       ts(78, pvm_ts))
    rw.observe_client(ack)
    to_svm = rw.to_secondary(ack)
    assert parse_frame(to_svm).ack == (svm_isn + 1) & 0xFFFFFFFF and checksum_ok(to_svm)
    assert to_svm.endswith(struct.pack("!II", 78, svm_ts))
    out = rw.from_secondary(with_options(build.tcp_frame(
        g, c, 80, 5555, svm_isn + 1, 101, TCP_ACK | TCP_PSH, b"resp"), ts(svm_ts + 3, 78)))
    p = parse_frame(out)
    assert p.seq == pvm_isn + 1 and p.payload == b"resp" and checksum_ok(out)
    assert struct.pack("!II", pvm_ts + 3, 78) in out
    # a later client ACK (not the handshake's) teaches nothing new
    rw.observe_client(with_options(build.tcp_frame(c, g, 5555, 80, 105, pvm_isn + 99,
                                                   TCP_ACK), ts(79, pvm_ts + 3)))
    out = rw.from_secondary(build.tcp_frame(g, c, 80, 5555, svm_isn + 5, 105, TCP_ACK))
    assert parse_frame(out).seq == pvm_isn + 5


@_lab
def test_a_tcp_client_gets_every_response_once_across_the_loss_of_the_primary_host():
    lab = TwoHostLab()
    try:
        logs = {g: os.path.join(lab.tmp, g + ".log") for g in ("pvm", "svm")}
        servers = {g: lab.spawn(g, sys.executable, "-c", SERVER, "-1", logs[g])
                   for g in ("pvm", "svm")}
        for g, p in servers.items():
            wait_ready(p, g + " server")
        comparator = lab.spawn("ph", sys.executable, "-c", COMPARATOR, lab.uplink["ph"],
                               lab.tap["pvm"], REPL["primary"])
        wait_ready(comparator, "comparator")
        redirector = lab.spawn("sh", sys.executable, "-m", "pipeline.net.redirector",
                               "--svm", lab.tap["svm"], "--uplink", lab.uplink["sh"],
                               "--mirror-from", f"tcp:{REPL['primary']}:9001",
                               "--compare-to", f"tcp:{REPL['primary']}:9000")
        wait_ready(redirector, "redirector")
        received = os.path.join(lab.tmp, "client.out")
        client = lab.spawn("cli", sys.executable, "-c", CLIENT, str(REQUESTS), received)

        def progress() -> int | None:
            line = client.stdout.readline()
            if not line:
                raise AssertionError("the client ended early: " + client.stderr.read()[-3000:])
            return int(line.split()[1]) if line.startswith("progress") else None
        wait_until(lambda: (progress() or 0) >= KILL_AFTER, timeout=120,
                   what=f"{KILL_AFTER} responses through the comparator", interval=0)
        lab.lose_primary_host([comparator, servers["pvm"]])
        t_lost = time.monotonic()
        redirector.send_signal(signal.SIGUSR1)
        out, err = client.communicate(timeout=240)
        assert client.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        redirector.send_signal(signal.SIGTERM)
        r_out, r_err = redirector.communicate(timeout=20)
        counters = json.loads(r_out.strip().splitlines()[-1])
        with open(received, "rb") as f:
            got = f.read()
        expected = b"".join(b"resp %d %032d\n" % (i, i * 7919) for i in range(REQUESTS))
        print(json.dumps({"client": result, "redirector": counters,
                          "after_loss_s": round(time.monotonic() - t_lost, 2)}))
        # every response once, in order: nothing lost in the dead host, nothing repeated
        assert result["answered"] == REQUESTS
        assert got == expected, (len(got), len(expected))
        # ... and the responses after the loss came from the SVM, straight to the client
        assert counters["failovers"] == 1 and counters["announcements"] == 1, counters
        assert counters["frames_to_clients"] > 0 and counters["client_frames_direct"] > 0
        servers["svm"].wait(20)                # (it closes its log when the client left)
        with open(logs["svm"], "rb") as f:
            assert f.read() == expected        # the SVM answered every request once
    finally:
        lab.close()


WATCH_RARP = r'''
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
s.bind((sys.argv[1], 0))
print("ready", flush=True)
frame = s.recv(2048)
print(frame[6:12].hex(":"), flush=True)
'''

GUEST_FRAME = r'''
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
mac = bytes.fromhex(sys.argv[2].replace(":", ""))
s.send(b"\xff" * 6 + mac + b"\x08\x00" + bytes(46))
'''


@_lab
def test_the_nodes_takeover_tells_the_redirector(tmp_path):
    """The secondary node's takeover sends the redirector its SIGUSR1 itself
    (``failover.redirector_pid_file``): the SVM's interface goes onto the clients' network
    and the guest's MAC is announced there (a RARP, seen on the clients' side of the
    uplink). The redirector runs in a network namespace on real veths (svm: the SVM's
    interface, uplink: the clients' network); the pair is two sim nodes on this machine,
    the test plays the comparator's two streams (unix sockets)."""
    import socket as socketlib

    from test_failover import TABLES

    from pipeline.localpair import LocalPair
    # the SVM's interface g1 (its guest's NIC g0), the uplink u0 (the clients' side u1)
    lab = NetnsLab(f"rd{os.getpid() % 10000}", ("h",))
    listeners = []
    pair = None
    try:
        lab.veth("g", "h", "h", mac0=GUEST_MAC)
        lab.veth("u", "h", "h")
        streams = {}
        for name in ("mirror", "compare"):
            path = str(tmp_path / f"{name}.sock")
            lst = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            lst.bind(path)
            lst.listen(1)
            listeners.append(lst)
            streams[name] = "unix:" + path
        watcher = lab.spawn("h", sys.executable, "-c", WATCH_RARP, "u1")
        wait_ready(watcher, "the RARP watcher")
        pid_file = str(tmp_path / "redirector.pid")
        redirector = lab.spawn("h", sys.executable, "-m", "pipeline.net.redirector",
                               "--svm", "g1", "--uplink", "u0", "--mirror-from", streams["mirror"],
                               "--compare-to", streams["compare"], "--pid-file", pid_file)
        conns = [lst.accept()[0] for lst in listeners]
        wait_ready(redirector, "redirector")
        # the SVM's first frame: the redirector learns the guest's MAC from it and sends
        # it to the comparator
        lab.x("h", sys.executable, "-c", GUEST_FRAME, "g0", GUEST_MAC)
        conns[1].settimeout(60)
        assert conns[1].recv(4096), "the SVM's frame never reached the comparator's stream"
        pair = LocalPair(dict(TABLES, failover={
            "witness": "local", "witness_dir": str(tmp_path / "witness"),
            "redirector_pid_file": pid_file}), workdir=str(tmp_path / "pair"))
        pair.start()
        pair.wait_protected()
        pair.kill("primary")
        info = pair.wait_info("role", "active", role="secondary", timeout=120)
        assert info["redirector"] == f"SIGUSR1 sent to the redirector (pid {redirector.pid})"
        out, _ = watcher.communicate(timeout=60)
        assert out.split()[-1] == GUEST_MAC, out
        redirector.send_signal(signal.SIGTERM)
        r_out, r_err = redirector.communicate(timeout=20)
        counters = json.loads(r_out.strip().splitlines()[-1])
        assert counters["failovers"] == 1 and counters["announcements"] == 1, (counters, r_err)
        assert not os.path.exists(pid_file)
    finally:
        if pair is not None:
            pair.stop()
        for lst in listeners:
            lst.close()
        lab.close()
