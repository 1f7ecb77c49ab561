"""Real kernel TCP stacks: two network namespaces stand in for the PVM and the SVM
(same IP, same MAC, the same deterministic TCP and UDP server), a client namespace,
veth pairs, and our comparator in a middle namespace joined to all three with
AF_PACKET. It mirrors the client's frames to both guests (rewriting the ACKs for
the SVM, whose kernel picked another initial sequence number), compares the
guests' output and releases the PVM's to the client."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from netns_lab import IP, MISSING, NetnsLab, wait_ready

from pipeline.net.adapters import StreamClient
from pipeline.net.control import COLO_CHECKPOINT, DO_CHECKPOINT

pytestmark = [pytest.mark.root, pytest.mark.timeout(180),
              pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]

GUEST_IP, CLIENT_IP = "10.77.0.2", "10.77.0.1"
GUEST_MAC, CLIENT_MAC = "52:54:00:77:00:02", "52:54:00:77:00:01"
TCP_PORT, UDP_PORT = 7000, 7001
PAIRS = 10_000
UDP_PAIRS = 200

SERVER = r'''
import os, socket, sys, threading
nd_at, log_path = int(sys.argv[1]), sys.argv[2]
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", @UDP@))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"udp-reply " + data, peer)
threading.Thread(target=udp, daemon=True).start()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", @TCP@)); ls.listen(1)
print("ready", flush=True)
conn, _ = ls.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = conn.makefile("rb")
with open(log_path, "wb") as log:
    while True:
        line = f.readline()
        if not line:
            break
        n = int(line.split()[1])
        body = os.urandom(16).hex().encode() if n == nd_at else (b"%032d" % (n * 7919))
        reply = b"resp %d " % n + body + b"\n"
        conn.sendall(reply)
        log.write(reply)
conn.close()
'''.replace("@UDP@", str(UDP_PORT)).replace("@TCP@", str(TCP_PORT))

CLIENT = r'''
import json, socket, sys, time
pairs, udp_pairs, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
t0 = time.monotonic()
s = socket.create_connection(("@IP@", @TCP@), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
got = bytearray()
for i in range(pairs):
    s.sendall(b"req %d\n" % i)
    line = f.readline()
    if not line:
        break
    got += line
tcp_time = time.monotonic() - t0
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
udp_ok = 0
for i in range(udp_pairs):
    u.sendto(b"ping %d" % i, ("@IP@", @UDP@))
    if u.recvfrom(2048)[0] == b"udp-reply ping %d" % i:
        udp_ok += 1
# our FIN; the server closes in turn, and its FIN reaches us once the comparator matched
# it with the SVM's: end of stream here means the FINs went through the comparator
s.shutdown(socket.SHUT_WR)
got += f.read()
s.close()
open(out_path, "wb").write(got)
print(json.dumps({"tcp_time": tcp_time, "udp_ok": udp_ok}), flush=True)
'''.replace("@IP@", GUEST_IP).replace("@TCP@", str(TCP_PORT)).replace(
    "@UDP@", str(UDP_PORT))

COMPARATOR = r'''
import logging, sys
from pipeline.net.control import XenNotify
from pipeline.net.loop import CompareLoop
from pipeline.net.settings import NetSettings
logging.basicConfig(level="WARNING")
c1, p1, s1, notify = sys.argv[1:5]
settings = NetSettings(primary_in="packet:" + p1, secondary_in="packet:" + s1,
                       outdev="packet:" + c1, client_in="packet:" + c1,
                       primary_out="packet:" + p1, secondary_out="packet:" + s1,
                       rewrite_secondary=True, compare_timeout_ms=3000)
loop = CompareLoop(settings, XenNotify(notify))
# the test's "toolstack" cannot restore the SVM's kernel at a checkpoint, so the SVM keeps
# its own sequence numbers: keep the rewriter's offsets (a real restore resets them)
loop.rewriter.reset = lambda: None
import signal, threading, json
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
print("ready", flush=True)
try:
    loop.run(stop)
finally:
    print(json.dumps(loop.comparator.counters), flush=True)
    loop.close()
'''


class Lab(NetnsLab):
    """cli, pvm and svm, each joined by a veth pair to mid (the comparator's namespace);
    ``dev[role]``: (its end in role, its end in mid)."""

    def __init__(self) -> None:
        super().__init__(f"nc{os.getpid() % 100000}", ("cli", "pvm", "svm", "mid"))

    def _build(self) -> None:
        self.dev = {}
        for role in ("cli", "pvm", "svm"):
            mac, addr, peer_ip, peer_mac = ((CLIENT_MAC, CLIENT_IP, GUEST_IP, GUEST_MAC)
                                            if role == "cli" else
                                            (GUEST_MAC, GUEST_IP, CLIENT_IP, CLIENT_MAC))
            self.dev[role] = self.veth(self.tag + role[0], role, "mid", mac0=mac)
            self.guest(role, self.dev[role][0], addr, peer_ip, peer_mac)


class Toolstack(threading.Thread):
    """Plays Xen's side of notify_dev: every DO_CHECKPOINT is answered with COLO_CHECKPOINT."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.client = StreamClient(address, timeout=20)
        self.requests = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                messages = self.client.recv(0.1)
            except (ConnectionError, OSError):
                return
            for message, _ in messages:
                if message == DO_CHECKPOINT:
                    self.requests += 1
                    self.client.send(COLO_CHECKPOINT)


def run_conversation(nd_at: int) -> dict:
    lab = Lab()
    toolstack = None
    try:
        logs = {r: os.path.join(lab.tmp, r + ".log") for r in ("pvm", "svm")}
        for role in ("pvm", "svm"):
            wait_ready(lab.spawn(role, sys.executable, "-c", SERVER, str(nd_at), logs[role]),
                       role + " server")
        notify = os.path.join(lab.tmp, "notify.sock")
        comparator = lab.spawn("mid", sys.executable, "-c", COMPARATOR, lab.dev["cli"][1],
                               lab.dev["pvm"][1], lab.dev["svm"][1], "unix:" + notify)
        wait_ready(comparator, "comparator")
        toolstack = Toolstack("unix:" + notify)
        toolstack.start()
        received = os.path.join(lab.tmp, "client.out")
        client = lab.spawn("cli", sys.executable, "-c", CLIENT, str(PAIRS), str(UDP_PAIRS),
                           received)
        out, err = client.communicate(timeout=150)
        assert client.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        comparator.terminate()
        out, err = comparator.communicate(timeout=10)
        result["counters"] = json.loads(out.strip().splitlines()[-1])
        result["checkpoints"] = toolstack.requests
        with open(received, "rb") as f:
            result["received"] = f.read()
        for role in ("pvm", "svm"):
            with open(logs[role], "rb") as f:
                result[role + "_sent"] = f.read()
        return result
    finally:
        if toolstack is not None:
            toolstack.stop.set()
            toolstack.join(5)
            toolstack.client.close()
        lab.close()


def test_deterministic_servers_need_no_checkpoint_despite_different_isns():
    r = run_conversation(nd_at=-1)
    assert r["received"] == r["pvm_sent"]
    assert r["received"].count(b"\n") == PAIRS
    assert r["udp_ok"] == UDP_PAIRS
    assert r["checkpoints"] == 0, r["counters"]
    assert r["counters"]["mismatches"] == 0 and r["counters"]["timeouts"] == 0
    assert r["counters"]["malformed_frames"] == 0


def test_one_nondeterministic_reply_makes_exactly_one_checkpoint():
    k = PAIRS // 2
    r = run_conversation(nd_at=k)
    assert r["pvm_sent"] != r["svm_sent"]                 # the guests really diverged
    assert r["received"] == r["pvm_sent"]                 # the client got the PVM's bytes
    assert r["received"].count(b"\n") == PAIRS
    assert r["checkpoints"] == 1, r["counters"]
    assert r["counters"]["mismatches"] == 1
    assert r["udp_ok"] == UDP_PAIRS


def test_packet_socket_keeps_vlan_tags_and_skips_its_own_frames():
    # the kernel strips an 802.1Q tag off a received frame and hands it over beside
    # the frame (PACKET_AUXDATA); PacketSocket must put it back
    from pipeline.net.packet import parse_frame

    lab = NetnsLab(f"nc{os.getpid() % 100000}", ("vl",))
    try:
        lab.x("vl", IP, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        for dev in ("va", "vb"):
            lab.x("vl", IP, "link", "set", dev, "up")
        script = r"""
import json, sys, time
from pipeline.net import build
from pipeline.net.adapters import PacketSocket
from pipeline.net.packet import MalformedFrame, parse_frame
def payload(frame):
    try:
        return parse_frame(frame).compare
    except MalformedFrame:
        return None
a, b = PacketSocket("va"), PacketSocket("vb")
tagged = build.udp_frame("10.0.0.2", "10.0.0.1", 53, 99, b"tagged", vlan=42)
plain = build.udp_frame("10.0.0.2", "10.0.0.1", 53, 99, b"plain")
sentinel = build.udp_frame("10.0.0.1", "10.0.0.2", 99, 53, b"sentinel")
ours = {payload(tagged), payload(plain)}
a.send(tagged); a.send(plain)
# b: frames until both of ours came (other traffic on the link is skipped)
got, deadline = [], time.monotonic() + 30
while len(got) < 2:
    assert time.monotonic() < deadline, got
    got += [f.hex() for f, _ in b.recv(0.2) if payload(f) in ours]
# a: what it reads up to a frame b sends now; a copy of a's own two frames would have
# reached a's socket when they were sent, before this one
b.send(sentinel)
own = []
while not any(payload(bytes.fromhex(h)) == payload(sentinel) for h in own):
    assert time.monotonic() < deadline, own
    own += [f.hex() for f, _ in a.recv(0.2)]
print(json.dumps({"got": got, "own": own, "tagged": tagged.hex(), "plain": plain.hex()}))
"""
        proc = subprocess.run([IP, "netns", "exec", lab.ns["vl"], sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        got = [bytes.fromhex(h) for h in r["got"]]
        # a veth may pad short frames; compare what the frames say
        assert [parse_frame(f).key[0] for f in got] == [(42,), ()]
        assert [parse_frame(f).compare for f in got] == [
            parse_frame(bytes.fromhex(r[k])).compare for k in ("tagged", "plain")]
        # its own injections are not read back (other traffic may be)
        assert not {r["tagged"], r["plain"]} & set(r["own"])
    finally:
        lab.close()
