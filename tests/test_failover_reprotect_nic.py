"""Re-protecting a pair whose guest has a real NIC: a TCP connection the client opened
before the failover goes on after the survivor is protected again, and the new
secondary's frames on it are compared.

The lab of tests/test_failover_tcp.py (client, the clients' switch, the primary host and
its PVM, the secondary host and its SVM; real kernel stacks in namespaces) and a third
host, ``nh``, with the new SVM:

1. protected: the client's connection goes through the primary host's comparator; the
   secondary host's redirector learns the connection's sequence offset (the SVM's ISN
   differs from the PVM's);
2. the primary host is lost, the redirector fails over (SIGUSR1): the survivor's guest
   serves the client directly, its segments moved into the old PVM's space;
3. re-protection: a comparator starts on the survivor's host (the clients' network, the
   guest's streams on this host, the new secondary's over a replication link),
   unprotected; the redirector hands the guest's interface over to it while the client
   sends without a pause (SIGUSR2, no restart: the guest's connection stays up) and
   writes the connection's offset; 200 more answers pass the comparator; the client
   pauses, the new SVM gets the guest's connection (TCP_REPAIR, the lab's stand-in for
   the full sync of the guest's memory: netns_lab.dump_tcp), its redirector starts with
   the offset (``--offsets-in``) and the comparator compares from then on.

4. the survivor's host is lost in turn: the new secondary's redirector fails over and
   its SVM serves the connection, moved into the clients' space by the carried offset.

The client's stream must hold every response once, in order, across both failovers, and
the comparator must have matched the new SVM's segments against the guest's, with no
mismatch: without the carried offset the new SVM's sequence numbers (the survivor guest's
own) would differ.

That first test runs the parts by hand (a standalone comparator, the offsets file copied).
``test_the_nodes_reprotect_a_real_nic_pair_and_carry_the_offsets`` runs the same story as
an operator would: two nodes, the survivor's own comparator on the redirector's streams,
the offsets carried with the full sync, the redirectors run by the nodes (or beside them).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import wait_until
from netns_lab import IP, wait_ready
from test_failover_tcp import COMPARATOR, LAB, REPL, TwoHostLab
from test_net_netns import CLIENT_IP, CLIENT_MAC, GUEST_IP, GUEST_MAC, TCP_PORT

pytestmark = LAB
PHASE = 300                                 # requests in each of the three phases
REPL2 = {"survivor": "10.89.0.1", "new": "10.89.0.2"}
TESTS = os.path.dirname(os.path.abspath(__file__))

#: the guests' server: one connection, deterministic answers; "serve" accepts it (SIGUSR1
#: writes the connection's state to STATE), "restore" takes it over from STATE
SERVER = r'''
import json, os, signal, socket, sys
sys.path.insert(0, @TESTS@)
from netns_lab import dump_tcp, restore_tcp
mode, state = sys.argv[1:3]
if mode == "serve":
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", @TCP@)); ls.listen(1)
    print("ready", flush=True)
    conn, _ = ls.accept()
else:
    with open(state) as fh:
        conn = restore_tcp(json.load(fh))
    print("ready", flush=True)
def dump(*_):
    with open(state + ".tmp", "w") as fh:
        json.dump(dump_tcp(conn), fh)
    os.replace(state + ".tmp", state)
signal.signal(signal.SIGUSR1, dump)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = conn.makefile("rb")
while True:
    line = f.readline()
    if not line:
        break
    n = int(line.split()[1])
    conn.sendall(b"resp %d %032d\n" % (n, n * 7919))
conn.close()
'''.replace("@TESTS@", repr(TESTS)).replace("@TCP@", str(TCP_PORT))

#: the client: one connection; each line on stdin, N, sends the next N requests (one at a
#: time, each answer read before the next), "go" sends them until a line "stop" comes
#: (saying "progress I" every 50, and "marked I" when a line "mark" comes), "end" closes it
CLIENT = r'''
import json, os, select, socket, sys, time
out_path = sys.argv[1]
longest = {}     # the longest wait for an answer in each command (diagnostics, printed)
s = socket.create_connection(("@IP@", @TCP@), timeout=120)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
got, i = bytearray(), 0
def one(phase):
    global got, i
    t = time.monotonic()
    s.sendall(b"req %d\n" % i)
    line = f.readline()
    longest[phase] = max(longest.get(phase, 0), round(time.monotonic() - t, 4))
    if not line:
        sys.exit("the connection closed at request %d" % i)
    got += line
    i += 1
print("ready %d" % s.getsockname()[1], flush=True)
phase = 0
while True:
    command = sys.stdin.readline().strip()
    phase += 1
    if command == "end":
        break
    if command == "go":
        while True:
            if select.select([sys.stdin], [], [], 0)[0]:
                command = sys.stdin.readline().strip()
                if command == "stop":
                    break
                print("marked %d" % i, flush=True)
            one(phase)
            if i % 50 == 0:
                print("progress %d" % i, flush=True)
    else:
        for _ in range(int(command)):
            one(phase)
    print("answered %d" % i, flush=True)
s.shutdown(socket.SHUT_WR)
got += f.read()
s.close()
open(out_path, "wb").write(got)
print(json.dumps({"answered": i, "longest_wait_s": list(longest.values())}), flush=True)
'''.replace("@IP@", GUEST_IP).replace("@TCP@", str(TCP_PORT))

#: the survivor's new primary comparator: the clients' network, the guest's streams on
#: this host (from the redirector), the new secondary's over the replication link. It
#: starts unprotected (passing the guest's output through, as the node's does until a
#: secondary is synced); SIGUSR1: the secondary is in place, compare (the node's role
#: "primary")
NEW_PRIMARY_COMPARATOR = r'''
import json, logging, signal, sys, threading
from pipeline.net.loop import CompareLoop
from pipeline.net.settings import NetSettings
logging.basicConfig(level="WARNING")
uplink, repl = sys.argv[1:3]
settings = NetSettings(primary_in="tcp:127.0.0.1:9100", primary_out="tcp:127.0.0.1:9101",
                       client_in="packet:" + uplink, outdev="packet:" + uplink,
                       secondary_in="tcp:%s:9000" % repl, secondary_out="tcp:%s:9001" % repl,
                       rewrite_secondary=False, compare_timeout_ms=3000)
loop = CompareLoop(settings)
loop.on_role("unprotected")
stop, protect = threading.Event(), threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
signal.signal(signal.SIGUSR1, lambda *a: protect.set())
print("ready", flush=True)
try:
    while not stop.is_set():
        if protect.is_set():
            protect.clear()
            loop.on_role("primary")
            print("comparing", flush=True)
        loop.run_once(0.05)
finally:
    print(json.dumps(loop.comparator.counters), flush=True)
    loop.close()
'''


class ReprotectLab(TwoHostLab):
    """TwoHostLab and the new secondary host ``nh`` (on the clients' switch) with its SVM
    ``nsvm`` and a replication link to the survivor's host."""

    def __init__(self) -> None:
        super().__init__(("nh", "nsvm"))

    def _build(self) -> None:
        super()._build()
        t = self.tag
        self.uplink["nh"], port = self.veth(t + "w", "nh", "lan")
        self.x("lan", IP, "link", "set", port, "master", "br0")
        inner, self.tap["nsvm"] = self.veth(t + "n", "nsvm", "nh", mac0=GUEST_MAC)
        self.guest("nsvm", inner, GUEST_IP, CLIENT_IP, CLIENT_MAC)
        a, b = self.veth(t + "q", "sh", "nh")
        self.x("sh", IP, "addr", "add", REPL2["survivor"] + "/24", "dev", a)
        self.x("nh", IP, "addr", "add", REPL2["new"] + "/24", "dev", b)


def _ask(client: subprocess.Popen, command: str, answered: int | None = None) -> None:
    client.stdin.write(command + "\n")
    client.stdin.flush()
    if answered is not None:
        line = client.stdout.readline()
        assert line.strip() == f"answered {answered}", (line, client.stderr.read()[-3000:])


def _progress(client: subprocess.Popen, at_least: int) -> int:
    """The client's answers, once its progress says at least ``at_least``."""
    while True:
        line = client.stdout.readline()
        assert line.startswith("progress"), (line, client.stderr.read()[-3000:])
        if int(line.split()[1]) >= at_least:
            return int(line.split()[1])


def _counters(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert out.strip(), err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_a_connection_opened_before_the_failover_is_compared_again_after_reprotection():
    lab = ReprotectLab()
    try:
        state = {g: os.path.join(lab.tmp, g + ".conn") for g in ("pvm", "svm")}
        servers = {g: lab.spawn(g, sys.executable, "-c", SERVER, "serve", state[g])
                   for g in ("pvm", "svm")}
        for g, p in servers.items():
            wait_ready(p, g + " server")
        comparator = lab.spawn("ph", sys.executable, "-c", COMPARATOR, lab.uplink["ph"],
                               lab.tap["pvm"], REPL["primary"])
        wait_ready(comparator, "comparator")
        offsets = os.path.join(lab.tmp, "offsets.json")
        redirector = lab.spawn("sh", sys.executable, "-m", "pipeline.net.redirector",
                               "--svm", lab.tap["svm"], "--uplink", lab.uplink["sh"],
                               "--mirror-from", f"tcp:{REPL['primary']}:9001",
                               "--compare-to", f"tcp:{REPL['primary']}:9000",
                               "--primary-in", "tcp:127.0.0.1:9100",
                               "--primary-out", "tcp:127.0.0.1:9101", "--offsets-out", offsets)
        wait_ready(redirector, "redirector")
        received = os.path.join(lab.tmp, "client.out")
        client = lab.spawn("cli", sys.executable, "-c", CLIENT, received, stdin=subprocess.PIPE)
        line = client.stdout.readline()
        assert line.startswith("ready"), (line, client.stderr.read()[-3000:])
        client_port = int(line.split()[1])
        # 1. protected; a re-protection asked of a redirector that never failed over is
        # refused (its SVM is compared already) and changes nothing
        _ask(client, str(PHASE // 2), PHASE // 2)
        redirector.send_signal(signal.SIGUSR2)
        _ask(client, str(PHASE // 2), PHASE)
        # 2. the primary host is lost; the survivor's guest serves the client directly
        lab.lose_primary_host([comparator, servers["pvm"]])
        redirector.send_signal(signal.SIGUSR1)
        _ask(client, str(PHASE), 2 * PHASE)
        # 3. re-protection: the survivor's new comparator (unprotected: passing the
        # guest's output through), the guest handed over to it while the client sends
        new_comparator = lab.spawn("sh", sys.executable, "-c", NEW_PRIMARY_COMPARATOR,
                                   lab.uplink["sh"], REPL2["survivor"])
        wait_ready(new_comparator, "the new primary's comparator")
        _ask(client, "go")
        _progress(client, 2 * PHASE + 100)
        redirector.send_signal(signal.SIGUSR2)
        wait_until(lambda: os.path.exists(offsets), timeout=60,
                   what="the re-protected redirector's offsets")
        _ask(client, "mark")                    # how many were answered once it was done
        line = client.stdout.readline()
        while line.startswith("progress"):
            line = client.stdout.readline()
        assert line.startswith("marked"), (line, client.stderr.read()[-3000:])
        _progress(client, int(line.split()[1]) + 200)   # ... and 200 more through it
        client.stdin.write("stop\n")
        client.stdin.flush()
        line = ""
        while not line.startswith("answered"):
            line = client.stdout.readline()
            assert line, client.stderr.read()[-3000:]
        done = int(line.split()[1])
        with open(offsets) as fh:
            rows = json.load(fh)
        # the connection's offset: the survivor's guest is in its own sequence space
        assert [(r["client_port"], r["seq_offset"] != 0) for r in rows] == [
            (client_port, True)], rows
        # the new SVM: the guest's connection (the full sync's stand-in), its redirector
        # with the carried offset
        servers["svm"].send_signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(state["svm"]), timeout=60,
                   what="the survivor guest's connection state")
        new_svm = lab.spawn("nsvm", sys.executable, "-c", SERVER, "restore", state["svm"])
        wait_ready(new_svm, "the new SVM's server")
        new_redirector = lab.spawn("nh", sys.executable, "-m", "pipeline.net.redirector",
                                   "--svm", lab.tap["nsvm"], "--uplink", lab.uplink["nh"],
                                   "--mirror-from", f"tcp:{REPL2['survivor']}:9001",
                                   "--compare-to", f"tcp:{REPL2['survivor']}:9000",
                                   "--offsets-in", offsets)
        wait_ready(new_redirector, "the new secondary's redirector")
        new_comparator.send_signal(signal.SIGUSR1)
        assert new_comparator.stdout.readline().strip() == "comparing"
        _ask(client, str(PHASE), done + PHASE)
        # 4. the survivor's host is lost (its processes end, then its namespaces go; the
        # comparator and the redirector first, so that the guest's server's end reaches
        # no one): the new secondary takes over
        compared = _counters(new_comparator)
        survivor = _counters(redirector)
        servers["svm"].kill()
        servers["svm"].wait(10)
        for ns in ("sh", "svm"):
            subprocess.run([IP, "netns", "del", lab.ns[ns]], capture_output=True, timeout=20)
        new_redirector.send_signal(signal.SIGUSR1)
        total = done + 2 * PHASE
        _ask(client, str(PHASE), total)
        _ask(client, "end")
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["answered"] == total, result
        new_side = _counters(new_redirector)
        # the longest wait for one answer in each client command: protected (2), the
        # first failover, the handover under load, compared again, the second failover
        print(json.dumps({"client": result, "comparator": compared,
                          "new_redirector": new_side, "survivor_redirector": survivor}))
        with open(received, "rb") as f:
            got = f.read()
        # every response once, in order, the connection never broken
        assert got == b"".join(b"resp %d %032d\n" % (i, i * 7919) for i in range(total))
        assert survivor["failovers"] == 1 and survivor["reprotections"] == 1, survivor
        assert survivor["reprotect_refused"] == 1 and survivor["offsets_exported"] == 1
        # the handover's answers went through the comparator unprotected, the next phase's
        # came out of it with the guest's segments matched by the new SVM's, moved by the
        # carried offset
        assert compared["passthrough_frames"] >= 200, compared
        assert compared["mismatches"] == 0 and compared["timeouts"] == 0, compared
        assert compared["primary_frames_in"] >= PHASE, compared
        assert compared["secondary_frames_in"] >= PHASE, compared
        assert compared["frames_released"] >= PHASE, compared
        # the fourth's straight from the new SVM, still moved by it
        assert new_side["offsets_loaded"] == 1 and new_side["failovers"] == 1, new_side
        assert new_side["frames_to_clients"] >= PHASE and new_side["client_frames_direct"] >= PHASE
        assert new_side["frames_rewritten"] >= 4 * PHASE, new_side
    finally:
        lab.close()


def test_the_survivor_node_hands_the_guest_to_its_comparator(tmp_path):
    """The node's part: a survivor that becomes the primary (``node.role = "auto"``), with
    ``failover.redirector_pid_file``, tells the redirector to fail over at the takeover
    (SIGUSR1) and, once its primary's stages run, to hand the guest's interface to its
    comparator (SIGUSR2): the redirector connects to the comparator's PVM streams. The
    pair is two sim nodes on this machine; the redirector runs in a namespace on real
    veths; the test plays the streams (unix sockets): the old primary's comparator's two
    and the new one's two."""
    import socket as socketlib

    from test_failover import TABLES

    from netns_lab import NetnsLab
    from pipeline.localpair import HostPair
    lab = NetnsLab(f"rp{os.getpid() % 10000}", ("h",))
    listeners = {}
    pair = None
    try:
        lab.veth("g", "h", "h", mac0=GUEST_MAC)        # the SVM's interface g1
        lab.veth("u", "h", "h")                        # the uplink u0
        for name in ("mirror", "compare", "pvm_in", "pvm_out"):
            lst = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            lst.bind(str(tmp_path / f"{name}.sock"))
            lst.listen(1)
            lst.settimeout(180)
            listeners[name] = lst
        address = {name: "unix:" + str(tmp_path / f"{name}.sock") for name in listeners}
        pid_file, offsets = str(tmp_path / "redirector.pid"), str(tmp_path / "offsets.json")
        redirector = lab.spawn("h", sys.executable, "-m", "pipeline.net.redirector",
                               "--svm", "g1", "--uplink", "u0",
                               "--mirror-from", address["mirror"],
                               "--compare-to", address["compare"],
                               "--primary-in", address["pvm_in"],
                               "--primary-out", address["pvm_out"],
                               "--offsets-out", offsets, "--pid-file", pid_file)
        conns = [listeners[n].accept()[0] for n in ("mirror", "compare")]
        wait_ready(redirector, "redirector")
        pair = HostPair(dict(TABLES, failover={
            "witness": "local", "witness_dir": "{workdir}/witness",
            "redirector_pid_file": pid_file}), workdir=str(tmp_path / "pair"))
        pair.start(("a",))
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        pair.start_node("b")
        pair.wait_protected(timeout=240)
        assert pair.roles() == {"a": "primary", "b": "secondary"}
        pair.kill("a")
        # the handover: the redirector connects to the new primary comparator's streams
        conns += [listeners[n].accept()[0] for n in ("pvm_in", "pvm_out")]
        wait_until(lambda: os.path.exists(offsets), timeout=60,
                   what="the re-protected redirector's offsets")
        info = pair.wait_info("role", "primary", role="b", timeout=120)
        assert info["redirector"] == f"SIGUSR1 sent to the redirector (pid {redirector.pid})"
        wait_until(lambda: "event=redirector_reprotect SIGUSR2 sent to the redirector "
                           f"(pid {redirector.pid})" in pair.log_tail("b", 100_000),
                   timeout=60, what="the survivor's log line of the SIGUSR2")
        counters = _counters(redirector)
        assert counters["failovers"] == 1 and counters["reprotections"] == 1, counters
        assert counters["reprotect_refused"] == 0, counters
        for conn in conns:
            conn.close()
    finally:
        if pair is not None:
            pair.stop()
        for lst in listeners.values():
            lst.close()
        lab.close()


class NodeLab(TwoHostLab):
    """TwoHostLab for two nodes: ``ph`` is host a, ``sh`` host b. A host's guest can be
    made again (:meth:`new_guest`): the repaired host's new SVM, on the same interface."""

    def new_guest(self, role: str, host: str, key: str) -> None:
        """A guest namespace ``role`` on ``host``'s interface ``<tag><key>1`` (the name the
        lost guest's had), with the guest's MAC and address."""
        self.ns[role] = f"{self.tag}{role}"
        subprocess.run([IP, "netns", "add", self.ns[role]], check=True, capture_output=True,
                       timeout=20)
        self.x(role, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        self.x(role, IP, "link", "set", "lo", "up")
        # the lost guest's interface on the host: its deleted namespace lives on while the
        # guest's orphaned TCP socket retransmits its FIN, and the veth with it
        subprocess.run([IP, "-n", self.ns[host], "link", "del", f"{self.tag}{key}1"],
                       capture_output=True, timeout=20)
        inner, _ = self.veth(self.tag + key, role, host, mac0=GUEST_MAC)
        self.guest(role, inner, GUEST_IP, CLIENT_IP, CLIENT_MAC)


#: the nodes' ports in their hosts' namespaces: the node's own (PORT .. PORT + 5), the
#: comparator's mirror to the secondary (PORT + 6), the redirector's streams (+ 7, + 8)
PORT = 7100


def _node_tables(lab: NodeLab, host: str, ns: str, guest: str, by_node: bool,
                 control: bool = False) -> dict:
    """Host ``host``'s own config tables: its guest's interface and its uplink, the
    redirector's files and streams (``by_node``: the node runs the redirector;
    ``control``: the secondary node tells it of each checkpoint)."""
    return {
        "net": {"primary_in": "packet:" + lab.tap[guest], "primary_out": "packet:" + lab.tap[guest],
                "client_in": "packet:" + lab.uplink[ns], "outdev": "packet:" + lab.uplink[ns],
                "secondary_out": f"tcp:0.0.0.0:{PORT + 6}",
                "redirector_in": f"tcp:127.0.0.1:{PORT + 7}",
                "redirector_out": f"tcp:127.0.0.1:{PORT + 8}",
                "redirector_offsets": os.path.join(lab.tmp, f"{host}.offsets"),
                "compare_timeout_ms": 3000, "redirector_by_node": by_node,
                "redirector_control": os.path.join(lab.tmp, f"{host}.ctl") if control else ""},
        "failover": {"redirector_pid_file": os.path.join(lab.tmp, f"{host}.redirector.pid")},
    }


def _redirector(lab: NodeLab, host: str, ns: str, guest: str, peer_ip: str):
    """The operator's redirector on host ``host``: the SVM's interface, the uplink, the
    peer's comparator's streams, this node's comparator's for a re-protection, the files
    the node names (net.redirector_offsets, failover.redirector_pid_file)."""
    offsets = os.path.join(lab.tmp, f"{host}.offsets")
    proc = lab.spawn(ns, sys.executable, "-m", "pipeline.net.redirector",
                     "--svm", lab.tap[guest], "--uplink", lab.uplink[ns],
                     "--mirror-from", f"tcp:{peer_ip}:{PORT + 6}",
                     "--compare-to", f"tcp:{peer_ip}:{PORT + 5}",
                     "--primary-in", f"tcp:127.0.0.1:{PORT + 7}",
                     "--primary-out", f"tcp:127.0.0.1:{PORT + 8}",
                     "--offsets-out", offsets, "--offsets-in", offsets,
                     "--pid-file", os.path.join(lab.tmp, f"{host}.redirector.pid"))
    wait_ready(proc, f"host {host}'s redirector")
    return proc


def _compared(pair, host: str, at_least: dict | None = None) -> dict:
    """Host ``host``'s comparator counters, once they reached ``at_least`` (the stage
    copies them into shared memory a few times a second)."""
    names = ("primary_frames_in", "secondary_frames_in", "frames_released", "mismatches",
             "timeouts", "passthrough_frames")

    def now() -> dict:
        stage = pair.node(host).stage("net_compare").as_dict()
        return {n: stage[n] for n in names}
    wait_until(lambda: all(now()[k] >= v for k, v in (at_least or {}).items()), timeout=60,
               what=f"host {host}'s comparator counters at {at_least}")
    return now()


def _log_json(pair, host: str, marker: str) -> dict:
    """The JSON after the last ``marker`` in the node's log."""
    tail = pair.log_tail(host, 1_000_000)
    assert marker in tail, tail[-3000:]
    return json.loads(tail.rsplit(marker, 1)[1].splitlines()[0])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("by_node", [True, False], ids=["node_runs_redirector",
                                                        "operator_runs_redirector"])
def test_the_nodes_reprotect_a_real_nic_pair_and_carry_the_offsets(tmp_path, by_node):
    """Job 1 and 2 of issue 16 as an operator runs it: two nodes (``node.role = "auto"``,
    a sim guest standing in for the VM's memory, kernel stacks in namespaces for its
    network), and on each host the redirector the operator starts beside the node when
    it is to be a secondary. No standalone comparator, no file copied by hand:

    ``by_node``: each node runs its redirector itself (``net.redirector_by_node``), else
    the test starts it beside the node, as an operator would.

    1. a primary, b secondary: the client's connection is compared (a's comparator on its
       PVM's interface, b's redirector learns the offset);
    2. host a lost: b takes over (its redirector bridges the guest) and becomes the
       primary: its own comparator takes the guest's frames from the redirector's streams
       (net.redirector_in/out) and the clients' network, and the node hands the guest over
       to it (SIGUSR2); the redirector writes the offsets to net.redirector_offsets;
    3. a repaired, with a new SVM holding the guest's connection (TCP_REPAIR, the lab's
       stand-in for the full sync of its memory) and its redirector: node a joins as the
       secondary; b sends the offsets with the full sync (NET_OFFSETS), node a writes them
       and tells its redirector (SIGHUP); b's comparator compares the new SVM's segments
       with 0 mismatches;
    4. host b lost: a takes over with the carried offsets and becomes the primary in turn.

    Every answer once, in order, on the one connection. Without the carried offsets the
    new SVM's segments are in the wrong space and the connection stalls (the test of the
    standalone parts above shows it)."""
    from test_failover import TABLES

    from pipeline.localpair import HostPair
    lab = NodeLab()
    pair = None
    try:
        state = os.path.join(lab.tmp, "svm.conn")
        servers = {g: lab.spawn(g, sys.executable, "-c", SERVER, "serve",
                                os.path.join(lab.tmp, g + ".conn")) for g in ("pvm", "svm")}
        for g, p in servers.items():
            wait_ready(p, g + " server")
        tables = dict(TABLES, failover={"witness": "local", "witness_dir": "{workdir}/witness"})
        tables["guest.workload"] = dict(TABLES["guest.workload"], input_rate_hz=0.0)
        # no periodic checkpoint while the test runs: the comparator releases an answer only
        # once the other guest sent the same (a commit would release unmatched ones too)
        tables["checkpoint"] = dict(TABLES["checkpoint"], max_interval_ms=600_000)
        pair = HostPair(tables, workdir=str(tmp_path / "pair"),
                        addresses={"a": f"tcp://{REPL['primary']}:{PORT}",
                                   "b": f"tcp://{REPL['secondary']}:{PORT}"},
                        netns={"a": lab.ns["ph"], "b": lab.ns["sh"]},
                        # a's redirector is told of the checkpoints (the full sync's, when a
                        # is the new secondary): it keeps the carried offset through them.
                        # (Not b's: the lab's guests are kernel stacks no checkpoint copies,
                        # so a connection's learnt offset must never be dropped here.)
                        role_tables={"a": _node_tables(lab, "a", "ph", "pvm", by_node, by_node),
                                     "b": _node_tables(lab, "b", "sh", "svm", by_node)})
        pair.start(("a",))
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        redirectors = {} if by_node else {
            "b": _redirector(lab, "b", "sh", "svm", REPL["primary"])}
        pair.start_node("b")
        pair.wait_protected(timeout=240)
        assert pair.roles() == {"a": "primary", "b": "secondary"}
        received = os.path.join(lab.tmp, "client.out")
        client = lab.spawn("cli", sys.executable, "-c", CLIENT, received, stdin=subprocess.PIPE)
        line = client.stdout.readline()
        assert line.startswith("ready"), (line, client.stderr.read()[-3000:])
        client_port = int(line.split()[1])
        n = PHASE // 2
        # 1. protected by the nodes: compared by a's comparator
        _ask(client, str(n), n)
        first = _compared(pair, "a", {"secondary_frames_in": n, "primary_frames_in": n})
        assert first["mismatches"] == 0 and first["timeouts"] == 0, first
        # 2. host a lost (its node and its guest; the guest's interface goes with it)
        pair.kill("a")
        servers["pvm"].kill()
        servers["pvm"].wait(10)
        subprocess.run([IP, "netns", "del", lab.ns.pop("pvm")], capture_output=True, timeout=20)
        _ask(client, str(n), 2 * n)
        pair.wait_info("role", "primary", role="b", timeout=120)
        wait_until(lambda: "event=redirector_reprotect" in pair.log_tail("b", 100_000),
                   timeout=60, what="b's SIGUSR2 to its redirector")
        offsets_b = os.path.join(lab.tmp, "b.offsets")
        wait_until(lambda: os.path.exists(offsets_b), timeout=60,
                   what="b's redirector's offsets at the re-protection")
        _ask(client, str(n), 3 * n)              # through b's own comparator, unprotected
        with open(offsets_b) as fh:
            rows = json.load(fh)
        assert [(r["client_port"], r["seq_offset"] != 0) for r in rows] == [
            (client_port, True)], rows
        survivor = _compared(pair, "b", {"passthrough_frames": n, "primary_frames_in": n})
        # 3. host a repaired: a new SVM with the guest's connection (the client is quiet),
        # the operator's redirector, the node with its unchanged config
        servers["svm"].send_signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(state), timeout=60,
                   what="the survivor guest's connection state")
        lab.new_guest("pvm2", "ph", "p")
        servers["pvm2"] = lab.spawn("pvm2", sys.executable, "-c", SERVER, "restore", state)
        wait_ready(servers["pvm2"], "the new SVM's server")
        if not by_node:
            redirectors["a"] = _redirector(lab, "a", "ph", "pvm", REPL["secondary"])
        pair.start_node("a")
        info = pair.wait_info("net_offsets", role="a", timeout=240)
        with open(os.path.join(lab.tmp, "a.redirector.pid")) as fh:
            pid_a = int(fh.read())
        assert by_node or pid_a == redirectors["a"].pid
        assert info["net_offsets"] == (
            f"1 connections' offsets written to {os.path.join(lab.tmp, 'a.offsets')}; "
            f"SIGHUP sent to the redirector (pid {pid_a})"), info
        pair.wait_protected(timeout=240)
        assert pair.roles() == {"a": "secondary", "b": "primary"}
        _ask(client, str(PHASE), 3 * n + PHASE)
        compared = _compared(pair, "b", {
            "secondary_frames_in": PHASE,
            "frames_released": survivor["frames_released"] + PHASE})
        # the new SVM's segments, moved by the carried offset, matched the guest's: every
        # answer released as matched, none held until a timeout (without the offsets each
        # one is, and the connection crawls at one answer per compare_timeout_ms)
        assert compared["mismatches"] == 0 and compared["timeouts"] == 0, compared
        # 4. host b lost: a takes over with the carried offsets, and becomes the primary
        if by_node:         # its log lines are in b's node's log (and lost with the host)
            log_b = pair.log_tail("b", 1_000_000)
            survivor_redirector = {
                "failovers": log_b.count("redirector: failover: the SVM's interface is bridged"),
                "reprotections": log_b.count("redirector: re-protected:")}
            assert "(1 connections' offsets kept)" in log_b, log_b[-3000:]
        else:
            survivor_redirector = _counters(redirectors["b"])
        offsets_a = os.path.join(lab.tmp, "a.offsets")
        written_by_node = os.stat(offsets_a).st_ino
        pair.kill("b")
        servers["svm"].kill()
        servers["svm"].wait(10)
        subprocess.run([IP, "netns", "del", lab.ns.pop("svm")], capture_output=True, timeout=20)
        total = 3 * n + 2 * PHASE
        _ask(client, str(PHASE), total)
        pair.wait_info("role", "primary", role="a", timeout=120)
        wait_until(lambda: "event=redirector_reprotect" in pair.log_tail("a", 100_000),
                   timeout=60, what="a's SIGUSR2 to its redirector")
        # the redirector re-protected: it wrote its offsets afresh (a new file)
        wait_until(lambda: os.stat(offsets_a).st_ino != written_by_node, timeout=60,
                   what="a's redirector's offsets at its re-protection")
        total += n
        _ask(client, str(n), total)              # through a's own comparator
        _compared(pair, "a", {"passthrough_frames": n})
        _ask(client, "end")
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        if by_node:
            pair.stop()         # a's redirector stops with its node: its counters in the log
            new_side = _log_json(pair, "a", "event=redirector_stopped counters ")
        else:
            new_side = _counters(redirectors["a"])
        print(json.dumps({"client": result, "compared_b": compared,
                          "redirector_a": new_side, "redirector_b": survivor_redirector}))
        with open(received, "rb") as f:
            got = f.read()
        assert got == b"".join(b"resp %d %032d\n" % (i, i * 7919) for i in range(total))
        assert survivor_redirector["failovers"] == 1, survivor_redirector
        assert survivor_redirector["reprotections"] == 1, survivor_redirector
        assert new_side["offsets_loaded"] == 1 and new_side["offsets_refused"] == 0, new_side
        if by_node:         # told of the sync's checkpoints; the carried offset kept
            assert new_side["checkpoints"] >= 1 and new_side["offsets_reset"] == 0, new_side
        assert new_side["failovers"] == 1 and new_side["reprotections"] == 1, new_side
        assert new_side["frames_rewritten"] >= 2 * PHASE, new_side
    finally:
        if pair is not None:
            pair.stop()
        lab.close()


@pytest.mark.timeout(600)
def test_a_node_whose_redirector_dies_stops_naming_it(tmp_path):
    """``net.redirector_by_node``: the secondary node runs its redirector; if that process
    ends on its own the node's guest is off its NIC's path, so the node stops (exit 1, its
    log naming the redirector and its exit) and the primary runs on unprotected."""
    from test_failover import TABLES

    from pipeline.localpair import HostPair
    lab = NodeLab()
    pair = None
    try:
        tables = dict(TABLES, failover={"witness": "local", "witness_dir": "{workdir}/witness"})
        tables["guest.workload"] = dict(TABLES["guest.workload"], input_rate_hz=0.0)
        pair = HostPair(tables, workdir=str(tmp_path / "pair"),
                        addresses={"a": f"tcp://{REPL['primary']}:{PORT}",
                                   "b": f"tcp://{REPL['secondary']}:{PORT}"},
                        netns={"a": lab.ns["ph"], "b": lab.ns["sh"]},
                        role_tables={"a": _node_tables(lab, "a", "ph", "pvm", True),
                                     "b": _node_tables(lab, "b", "sh", "svm", True)})
        pair.start(("a",))
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        pair.start_node("b")
        pair.wait_protected(timeout=240)
        assert "event=redirector_started" in pair.log_tail("b", 1_000_000)
        assert "event=redirector_started" not in pair.log_tail("a", 1_000_000)
        with open(os.path.join(lab.tmp, "b.redirector.pid")) as fh:
            pid = int(fh.read())
        os.kill(pid, signal.SIGKILL)
        assert pair.wait_exit("b", timeout=120) == 1
        assert f"the redirector (pid {pid}) exited with code -9" in pair.log_tail("b", 1_000_000)
        pair.wait_info("state", "unprotected", role="a", timeout=120)
    finally:
        if pair is not None:
            pair.stop()
        lab.close()
