"""Network-namespace labs for the tests that run real kernel stacks on veths
(tests/test_net_netns.py, tests/test_failover_tcp.py): namespaces per role, veth pairs
between them, guests' addresses, processes inside, and all of it removed again.

A lab is a :class:`NetnsLab` whose ``_build`` lays out its topology with :meth:`veth` and
:meth:`guest`; :meth:`close` kills what :meth:`spawn` started and deletes the namespaces
(their links go with them), also when ``_build`` failed half-way.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

IP = shutil.which("ip")
ETHTOOL = shutil.which("ethtool")
SYSCTL = shutil.which("sysctl")
#: why a lab cannot run here, or None
MISSING = ("network namespaces need root" if os.geteuid() != 0 else
           "iproute2 (ip) is not installed" if IP is None else
           "ethtool is needed to turn veth offloads off" if ETHTOOL is None else
           "sysctl (procps) is needed to turn IPv6 off" if SYSCTL is None else None)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def wait_ready(proc: subprocess.Popen, what: str) -> None:
    """The process's first line of output must be ``ready``."""
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"{what} did not start: {line!r} {proc.stderr.read()[-3000:]}")


class NetnsLab:
    """One namespace per role, ``<tag><role>``, each with IPv6 off (no router or
    neighbour solicitations that only one of two twin guests would send) and its loopback
    up; ``tmp``: a directory for the lab's files."""

    def __init__(self, tag: str, roles: tuple[str, ...]) -> None:
        self.tag = tag
        self.ns = {r: f"{tag}{r}" for r in roles}
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix=f"colo-{tag}-")
        try:
            for ns in self.ns.values():
                sh(IP, "netns", "add", ns)
            for role in self.ns:
                self.x(role, SYSCTL, "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                       "net.ipv6.conf.default.disable_ipv6=1")
                self.x(role, IP, "link", "set", "lo", "up")
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        """The lab's links and addresses (subclasses)."""

    def x(self, role: str, *args: str) -> None:
        """Run a command in ``role``'s namespace (it must succeed)."""
        sh(IP, "netns", "exec", self.ns[role], *args)

    def veth(self, name: str, role0: str, role1: str, mac0: str | None = None) -> tuple[str, str]:
        """A veth pair ``<name>0`` in ``role0`` (with MAC ``mac0``), ``<name>1`` in
        ``role1``, both up, with checksum and segmentation offloads off: frames are moved
        as read, with real checksums and never merged, as a NIC puts them on the wire."""
        a, b = name + "0", name + "1"
        sh(IP, "link", "add", a, "netns", self.ns[role0], "type", "veth", "peer", "name", b,
           "netns", self.ns[role1])
        if mac0 is not None:
            self.x(role0, IP, "link", "set", a, "address", mac0)
        for role, dev in ((role0, a), (role1, b)):
            self.x(role, IP, "link", "set", dev, "up")
            self.x(role, ETHTOOL, "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro",
                   "off")
        return a, b

    def guest(self, role: str, dev: str, addr: str, peer_ip: str, peer_mac: str) -> None:
        """``addr``/24 on ``dev``, and the peer as a static neighbour: no ARP that only one
        of two twin guests would send."""
        self.x(role, IP, "addr", "add", addr + "/24", "dev", dev)
        self.x(role, IP, "neigh", "replace", peer_ip, "lladdr", peer_mac, "dev", dev, "nud",
               "permanent")

    def spawn(self, role: str, *args: str, stdin=None) -> subprocess.Popen:
        """A process in ``role``'s namespace, in a session of its own (close() kills it
        with everything it started), its output piped as text (``stdin``: e.g.
        subprocess.PIPE to talk to it)."""
        proc = subprocess.Popen([IP, "netns", "exec", self.ns[role], *args], stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=os.getcwd(), start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.communicate(timeout=5)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        for ns in self.ns.values():
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=20)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- a guest's TCP connection copied to another namespace (TCP_REPAIR, as CRIU does) --------
# The lab's guests are kernel stacks in namespaces, which no checkpoint copies. Where a test
# needs a new SVM that holds the survivor's connections, as a full sync of the guest's
# memory gives a real one, it copies a quiet connection's state over with TCP_REPAIR:
# sequence numbers, queues, window, MSS, window scale and timestamp clock.
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCP_REPAIR_OFF_NO_WP = -1          # leave repair mode without sending a window probe
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4


def dump_tcp(sock) -> dict:
    """A connected TCP socket's state (JSON-ready); the socket goes on as before."""
    import socket
    import struct
    tcp = socket.IPPROTO_TCP
    info = sock.getsockopt(tcp, socket.TCP_INFO, 8)
    sock.setsockopt(tcp, TCP_REPAIR, 1)
    try:
        state = {"local": list(sock.getsockname()), "peer": list(sock.getpeername()),
                 "mss": sock.getsockopt(tcp, socket.TCP_MAXSEG),
                 "options": info[5], "snd_wscale": info[6] & 15, "rcv_wscale": info[6] >> 4,
                 "timestamp": sock.getsockopt(tcp, TCP_TIMESTAMP),
                 "window": list(struct.unpack("5I", sock.getsockopt(tcp, TCP_REPAIR_WINDOW,
                                                                    20)))}
        for name, queue in (("recv", TCP_RECV_QUEUE), ("send", TCP_SEND_QUEUE)):
            sock.setsockopt(tcp, TCP_REPAIR_QUEUE, queue)
            end = struct.unpack("I", sock.getsockopt(tcp, TCP_QUEUE_SEQ, 4))[0]
            try:
                data = sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = b""
            # the queue's sequence number is its end (rcv_nxt, write_seq); restore_tcp
            # sets its start and puts the data (unread, unacknowledged) back after it
            state[name + "_seq"] = (end - len(data)) & 0xFFFFFFFF
            state[name + "_data"] = data.hex()
    finally:
        sock.setsockopt(tcp, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return state


def restore_tcp(state: dict):
    """A socket in this namespace holding the connection :func:`dump_tcp` described."""
    import socket
    import struct
    tcp = socket.IPPROTO_TCP
    sock = socket.socket()
    sock.setsockopt(tcp, TCP_REPAIR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for name, queue in (("recv", TCP_RECV_QUEUE), ("send", TCP_SEND_QUEUE)):
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, queue)
        sock.setsockopt(tcp, TCP_QUEUE_SEQ, struct.pack("I", state[name + "_seq"]))
    sock.bind(tuple(state["local"]))
    sock.connect(tuple(state["peer"]))
    for name, queue in (("recv", TCP_RECV_QUEUE), ("send", TCP_SEND_QUEUE)):
        if state[name + "_data"]:
            sock.setsockopt(tcp, TCP_REPAIR_QUEUE, queue)
            sock.sendall(bytes.fromhex(state[name + "_data"]))
    options = [(TCPOPT_MSS, state["mss"])]
    if state["options"] & TCPI_OPT_WSCALE:
        options.append((TCPOPT_WINDOW, state["snd_wscale"] | state["rcv_wscale"] << 16))
    if state["options"] & TCPI_OPT_SACK:
        options.append((TCPOPT_SACK_PERM, 0))
    if state["options"] & TCPI_OPT_TIMESTAMPS:
        options.append((TCPOPT_TIMESTAMP, 0))
    sock.setsockopt(tcp, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", *o) for o in options))
    sock.setsockopt(tcp, TCP_TIMESTAMP, state["timestamp"])
    sock.setsockopt(tcp, TCP_REPAIR_WINDOW, struct.pack("5I", *state["window"]))
    sock.setsockopt(tcp, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return sock
