#!/usr/bin/env python3
"""Network faults for the fault matrix (``scripts/fault_matrix.py``): two network
namespaces ("hosts") joined by a link the matrix can break, and a pair of nodes in them.

Test tooling, not part of the product (nothing in ``pipeline/`` imports it). Needs root.

* :class:`NetLink` with ``kind="veth"``: the namespaces joined by a veth pair. Partitions
  are nftables rules in the primary's namespace (:meth:`NetLink.partition`), removed again
  by :meth:`NetLink.heal`; a bandwidth limit is ``tc`` TBF on both ends
  (:meth:`NetLink.limit_rate`).
* ``kind="tun"``: each namespace gets a TUN device, and this module's ``forward`` command
  (a process of its own) carries every IP packet between the two, dropping, delaying,
  duplicating or reordering packets as told (seeded), so the kernel's TCP sees real loss;
  or, after SIGUSR1 (:meth:`NetLink.start_corrupting`), flipping one byte in each of a
  number of TCP segments to one port with their checksum fixed up (a faulty middlebox),
  so the bytes reach the application.
  The kernel here has no netem; this stands in for it. The TUN devices are not persistent:
  they go when the forwarder exits.
* :class:`NetnsPair`: ``LocalPair`` with each node run inside its namespace (``ip netns
  exec``), the secondary listening on its link address. /dev/shm, the run directories and
  the local witness's lock files stay shared, as in ``tests/test_two_hosts.py``: the
  witness is reachable from both sides whatever the link does, like an etcd on a third
  network.

Everything made here has a name starting with ``cfm`` and this process's pid;
:meth:`NetLink.close` removes it (also after a failure), and :func:`sweep` removes what a
killed matrix left behind (namespaces whose creator is gone).

``python3 scripts/faultnet.py forward --ns-a A --ns-b B --dev-a D --dev-b E --stats FILE
[--loss P] [--delay-ms MS] [--duplicate P] [--reorder P] [--seed N]``: the forwarder.
It prints ``ready`` once both devices exist and writes its counters (``packets``,
``dropped``, ``duplicated``, ``reordered``, ``delayed``, per direction ``a2b``/``b2a``)
as JSON to FILE (replaced atomically) whenever they changed, at most every 50 ms.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pipeline.localpair import LocalPair, free_port_base  # noqa: E402,F401 (fault_matrix uses faultnet.free_port_base)

PREFIX = "cfm"
NFT_TABLE = "colo_fault"
CHANNELS = ("pages", "control", "inputs", "heartbeat")

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000


class NetError(RuntimeError):
    """A namespace, device, nft or tc command failed (the message has its output)."""


def sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise NetError(f"`{' '.join(cmd)}` exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep() -> list[str]:
    """Remove the namespaces of matrix runs whose process is gone (a killed run could not
    clean up); the TUN devices and nft tables inside go with them. Returns their names."""
    gone = []
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "p" not in name[len(PREFIX):]:
            continue
        pid = name[len(PREFIX):].split("p", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            sh("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


class NetLink:
    """Two namespaces, ``a`` (the primary's host) and ``b`` (the secondary's), joined by a
    veth pair or by TUN devices and the forwarder. Addresses 10.77.<n>.1 and .2."""

    _count = 0

    def __init__(self, kind: str = "veth", impair: dict[str, Any] | None = None,
                 workdir: str = "/tmp") -> None:
        if kind not in ("veth", "tun"):
            raise ValueError(f"link kind {kind!r}: veth or tun")
        NetLink._count += 1
        n = NetLink._count
        self.kind = kind
        self.tag = f"{PREFIX}{os.getpid()}p{n}"
        self.ns = {"a": f"{self.tag}a", "b": f"{self.tag}b"}
        self.dev = {"a": f"{self.tag}A", "b": f"{self.tag}B"}
        subnet = (os.getpid() * 7 + n) % 250 + 1
        self.ip = {"a": f"10.77.{subnet}.1", "b": f"10.77.{subnet}.2"}
        self.forwarder: subprocess.Popen | None = None
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.stats_path = os.path.join(workdir, f"{self.tag}-forwarder.json")
        self.limited = False
        try:
            for side in "ab":
                sh("ip", "netns", "add", self.ns[side])
                sh("ip", "link", "set", "lo", "up", ns=self.ns[side])
            if kind == "veth":
                sh("ip", "link", "add", self.dev["a"], "netns", self.ns["a"], "type", "veth",
                   "peer", "name", self.dev["b"], "netns", self.ns["b"])
            else:
                self._start_forwarder(impair or {})
            mtu = "1500" if kind == "veth" else "16000"
            for side in "ab":
                sh("ip", "addr", "add", f"{self.ip[side]}/24", "dev", self.dev[side],
                   ns=self.ns[side])
                sh("ip", "link", "set", self.dev[side], "mtu", mtu, "up", ns=self.ns[side])
        except BaseException:
            self.close()
            raise

    def _start_forwarder(self, impair: dict[str, Any]) -> None:
        args = [sys.executable, os.path.abspath(__file__), "forward",
                "--ns-a", self.ns["a"], "--ns-b", self.ns["b"], "--dev-a", self.dev["a"],
                "--dev-b", self.dev["b"], "--stats", self.stats_path]
        for key, value in impair.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.forwarder_log = os.path.join(self.workdir, f"{self.tag}-forwarder.log")
        with open(self.forwarder_log, "wb") as log:
            self.forwarder = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log,
                                              text=True)
        line = self.forwarder.stdout.readline().strip()
        if line != "ready":
            self.forwarder.kill()
            self.forwarder.wait()
            with open(self.forwarder_log) as f:
                raise NetError(f"the forwarder did not start: {line} {f.read()[-2000:]}")

    def check_forwarder(self) -> None:
        """NetError if the forwarder died (the link would be gone with it)."""
        if self.forwarder is not None and self.forwarder.poll() is not None:
            with open(self.forwarder_log) as f:
                raise NetError(f"the forwarder exited {self.forwarder.returncode}: "
                               f"{f.read()[-2000:]}")

    def start_corrupting(self) -> None:
        """The forwarder starts corrupting (``corrupt_count`` segments, see ``forward``)."""
        self.forwarder.send_signal(signal.SIGUSR1)

    def forwarder_stats(self) -> dict[str, int]:
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    # -- faults -----------------------------------------------------------------------------
    def partition(self, port: int, direction: str = "both",
                  channels: tuple[str, ...] | None = None) -> None:
        """Drop packets between the hosts (nftables in ``a``, the primary's namespace).
        ``direction``: "both", "a2b" (only what the primary sends is lost) or "b2a".
        ``channels``: only those channels' TCP ports (``port`` is peer.address's; their
        offsets are pipeline.wire's), else every packet of the link."""
        from pipeline.wire import CHANNEL_PORT_OFFSETS
        peer = self.ip["b"]
        if channels:
            ports = ", ".join(str(port + CHANNEL_PORT_OFFSETS[c]) for c in channels)
            out_match, in_match = f"tcp dport {{ {ports} }}", f"tcp sport {{ {ports} }}"
        else:
            out_match = in_match = ""
        rules = []
        if direction in ("both", "a2b"):
            rules.append(f"add rule inet {NFT_TABLE} out ip daddr {peer} {out_match} counter drop")
        if direction in ("both", "b2a"):
            rules.append(f"add rule inet {NFT_TABLE} in ip saddr {peer} {in_match} counter drop")
        if not rules:
            raise ValueError(f"partition direction {direction!r}: both, a2b or b2a")
        script = "\n".join([
            f"add table inet {NFT_TABLE}",
            f"add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}",
            f"add chain inet {NFT_TABLE} in {{ type filter hook input priority 0; }}",
            *rules, ""])
        p = subprocess.run(["ip", "netns", "exec", self.ns["a"], "nft", "-f", "-"],
                           input=script, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise NetError(f"nft in {self.ns['a']}: {p.stderr.strip()}\n{script}")

    def dropped(self) -> int:
        """Packets the partition's rules dropped so far (their nft counters); 0 if there
        is no partition (healed)."""
        out = sh("nft", "-j", "list", "table", "inet", NFT_TABLE, ns=self.ns["a"], check=False)
        try:
            items = json.loads(out)["nftables"] if out.strip() else []
        except (ValueError, KeyError):
            return 0
        return sum(e["counter"]["packets"] for item in items for e in
                   item.get("rule", {}).get("expr", []) if isinstance(e, dict) and "counter" in e)

    def partitioned(self) -> bool:
        return NFT_TABLE in sh("nft", "list", "tables", ns=self.ns["a"], check=False)

    def heal(self) -> None:
        """Remove the partition (the nft table); a no-op if there is none."""
        if self.partitioned():
            sh("nft", "delete", "table", "inet", NFT_TABLE, ns=self.ns["a"])

    def limit_rate(self, rate: str, burst: str = "64kb", latency: str = "500ms") -> None:
        """``tc`` TBF on both ends of the veth: each direction at most ``rate``."""
        if self.kind != "veth":
            raise ValueError("a rate limit needs the veth link")
        for side in "ab":
            sh("tc", "qdisc", "add", "dev", self.dev[side], "root", "tbf", "rate", rate,
               "burst", burst, "latency", latency, ns=self.ns[side])
        self.limited = True

    def tbf_stats(self) -> str:
        return sh("tc", "-s", "qdisc", "show", "dev", self.dev["a"], ns=self.ns["a"],
                  check=False)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.terminate()
            try:
                self.forwarder.wait(10)
            except subprocess.TimeoutExpired:
                self.forwarder.kill()
                self.forwarder.wait()
        for side in "ab":
            sh("ip", "netns", "del", self.ns[side], check=False)
        try:
            os.unlink(self.stats_path)
        except OSError:
            pass

    def leftovers(self) -> list[str]:
        """What of this link still exists (after close(): must be nothing)."""
        names = [ln.split()[0] for ln in sh("ip", "netns", "list", check=False).splitlines()
                 if ln.split()]
        left = [n for n in names if n.startswith(self.tag)]
        links = sh("ip", "-o", "link", "show", check=False)
        left += [d for d in self.dev.values() if d + ":" in links or d + "@" in links]
        return left

    def __enter__(self) -> "NetLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetnsPair(LocalPair):
    """A LocalPair whose primary runs in ``link.ns["a"]`` and secondary in ``link.ns["b"]``,
    talking over the link (the secondary listens on its link address)."""

    def __init__(self, link: NetLink, tables: dict, port: int | None = None,
                 **kw: Any) -> None:
        """``port``: peer.address's port (else a free one, as LocalPair draws it)."""
        self.link = link
        self._peer_ip = link.ip["b"]
        self._fixed_port = port
        super().__init__(tables, **kw)

    def _place(self, role: str, t: dict) -> None:
        if self._fixed_port is not None:
            self.port = self._fixed_port
        t.setdefault("peer", {}).setdefault("address", f"tcp://{self._peer_ip}:{self.port}")
        super()._place(role, t)

    def check_alive(self) -> None:
        self.link.check_forwarder()
        super().check_alive()

    def _wrap(self, role: str, cmd: list[str]) -> list[str]:
        ns = self.link.ns["a" if role == "primary" else "b"]
        return ["ip", "netns", "exec", ns, *cmd]



def enter_netns(ns: str) -> None:
    """Move the calling process (a forked child: setns changes the thread that calls it)
    into network namespace ``ns`` for good."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)

# -- the forwarder ----------------------------------------------------------------------------
def _open_tun(ns: str, dev: str) -> int:
    """A TUN device named ``dev`` inside namespace ``ns`` (setns for the open: a device
    belongs to the namespace of the process that made it); its fd."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", dev.encode(), _IFF_TUN | _IFF_NO_PI))
        if libc.setns(own, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.set_blocking(fd, False)
        return fd
    finally:
        os.close(own)
        os.close(target)


def _csum_adjust(cs: int, old: int, new: int) -> int:
    """A one's complement checksum with one 16-bit word changed (RFC 1624)."""
    x = (~cs & 0xFFFF) + (~old & 0xFFFF) + new
    x = (x & 0xFFFF) + (x >> 16)
    x = (x & 0xFFFF) + (x >> 16)
    return ~x & 0xFFFF


def corrupt_tcp_payload(pkt: bytes, dport: int, rng: random.Random) -> bytes | None:
    """``pkt`` (IPv4) with one byte of its TCP payload flipped and the TCP checksum fixed
    up, as a faulty middlebox would pass it; None if it is not a TCP segment to ``dport``
    with at least 512 payload bytes."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[9] != 6:
        return None
    ihl = (pkt[0] & 0xF) * 4
    if len(pkt) < ihl + 20 or int.from_bytes(pkt[ihl + 2:ihl + 4], "big") != dport:
        return None
    start = ihl + (pkt[ihl + 12] >> 4) * 4
    if len(pkt) - start < 512:
        return None
    b = bytearray(pkt)
    i = rng.randrange(start + 64, len(b))
    w = ihl + ((i - ihl) & ~1)          # the 16-bit word holding byte i, from the TCP header
    old = int.from_bytes(b[w:w + 2], "big")
    b[i] ^= rng.randrange(1, 256)
    new = int.from_bytes(b[w:w + 2], "big")
    cs = int.from_bytes(b[ihl + 16:ihl + 18], "big")
    b[ihl + 16:ihl + 18] = _csum_adjust(cs, old, new).to_bytes(2, "big")
    return bytes(b)


def forward(args: argparse.Namespace) -> int:
    fd_a = _open_tun(args.ns_a, args.dev_a)
    fd_b = _open_tun(args.ns_b, args.dev_b)
    out = {fd_a: fd_b, fd_b: fd_a}
    name = {fd_a: "a2b", fd_b: "b2a"}
    rng = random.Random(args.seed)
    stats: dict[str, int] = {f"{d}_{k}": 0 for d in ("a2b", "b2a")
                             for k in ("packets", "dropped", "duplicated", "reordered",
                                       "delayed")}
    stats.update(max_run_delay_ms=0, max_turn_ms=0)
    held: dict[int, tuple[float, bytes]] = {}   # reorder: a packet waits for the next one
    timed: list[tuple[float, int, int, bytes]] = []   # delay: (due, seq, fd, packet)
    seq = 0
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True
    corrupt_left = 0
    eligible = 0

    def on_usr1(*_: object) -> None:
        nonlocal corrupt_left
        corrupt_left = args.corrupt_count
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        # the forwarder is the network: on a loaded machine a normal-priority forwarder
        # held heartbeats back past the 300 ms limit (the nodes' heartbeat stages are
        # real-time already)
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
    except OSError:
        pass
    print("ready", flush=True)

    def write_stats() -> None:
        """Every 50 ms, from a thread of its own: a file write (a rename waits for the
        file system's journal on a busy disk) never holds a packet back."""
        last = None
        while True:
            now_stats = dict(stats)
            if now_stats != last:
                tmp = args.stats + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(now_stats, f)
                os.replace(tmp, args.stats)
                last = now_stats
            if stop:
                return
            time.sleep(0.05)
    writer = threading.Thread(target=write_stats, name="stats", daemon=True)
    writer.start()
    # how long this process was runnable but not running (its scheduler's run_delay) in
    # one turn of the loop: packets wait that long. A row that saw a peer lost over an
    # impaired link tells a starved forwarder from the link's own faults by it
    schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def run_delay_ns() -> int:
        return int(os.pread(schedstat, 128, 0).split()[1])
    last_delay = run_delay_ns()

    def emit(fd: int, pkt: bytes) -> None:
        nonlocal seq
        if args.delay_ms > 0:
            seq += 1
            heapq.heappush(timed, (time.monotonic() + args.delay_ms / 1000, seq, fd, pkt))
            return
        try:
            os.write(fd, pkt)
        except (BlockingIOError, OSError):
            pass    # the device's queue is full: a real link drops too

    while not stop:
        now = time.monotonic()
        wait = 0.05
        if timed:
            wait = min(wait, max(0.0, timed[0][0] - now))
        if held:
            wait = min(wait, max(0.0, min(t for t, _ in held.values()) + 0.02 - now))
        try:
            ready, _, _ = select.select([fd_a, fd_b], [], [], wait)
        except InterruptedError:
            continue
        woke = time.monotonic()
        for fd in ready:
            for _ in range(64):
                try:
                    pkt = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:   # EIO while the device is not up yet
                    stats["read_errors"] = stats.get("read_errors", 0) + 1
                    break
                d, dst = name[fd], out[fd]
                stats[f"{d}_packets"] += 1
                if rng.random() < args.loss:
                    stats[f"{d}_dropped"] += 1
                    continue
                if corrupt_left and d == "a2b":
                    bad = corrupt_tcp_payload(pkt, args.corrupt_dport, rng)
                    if bad is not None:
                        eligible += 1
                        if eligible % args.corrupt_every == 0:
                            pkt = bad
                            corrupt_left -= 1
                            stats["a2b_corrupted"] = stats.get("a2b_corrupted", 0) + 1
                if args.delay_ms > 0:
                    stats[f"{d}_delayed"] += 1
                if dst in held:          # the held packet goes after this one
                    emit(dst, pkt)
                    emit(dst, held.pop(dst)[1])
                elif rng.random() < args.reorder:
                    stats[f"{d}_reordered"] += 1
                    held[dst] = (time.monotonic(), pkt)
                    continue
                else:
                    emit(dst, pkt)
                if rng.random() < args.duplicate:
                    stats[f"{d}_duplicated"] += 1
                    emit(dst, pkt)
        delay = run_delay_ns()
        if (delay - last_delay) // 1_000_000 > stats.get("max_run_delay_ms", 0):
            stats["max_run_delay_ms"] = (delay - last_delay) // 1_000_000
        last_delay = delay
        now = time.monotonic()
        if (now - woke) * 1000 > stats.get("max_turn_ms", 0):   # (packets held that long)
            stats["max_turn_ms"] = int((now - woke) * 1000)
        for dst, (t, pkt) in list(held.items()):   # no next packet came: send it anyway
            if now - t >= 0.02:
                del held[dst]
                emit(dst, pkt)
        while timed and timed[0][0] <= now:
            _, _, fd, pkt = heapq.heappop(timed)
            try:
                os.write(fd, pkt)
            except OSError:
                pass
    writer.join(10)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fw = sub.add_parser("forward", help="carry IP packets between two namespaces' TUN devices")
    fw.add_argument("--ns-a", required=True)
    fw.add_argument("--ns-b", required=True)
    fw.add_argument("--dev-a", required=True)
    fw.add_argument("--dev-b", required=True)
    fw.add_argument("--stats", required=True, help="JSON counters, replaced as they change")
    fw.add_argument("--loss", type=float, default=0.0, help="drop probability per packet")
    fw.add_argument("--delay-ms", type=float, default=0.0, help="added one-way delay")
    fw.add_argument("--duplicate", type=float, default=0.0, help="duplicate probability")
    fw.add_argument("--reorder", type=float, default=0.0,
                    help="probability a packet is held back behind the next one")
    fw.add_argument("--corrupt-dport", type=int, default=0,
                    help="flip a byte in TCP segments to this port (a->b), TCP checksum fixed")
    fw.add_argument("--corrupt-count", type=int, default=0,
                    help="how many segments to corrupt once SIGUSR1 arrived")
    fw.add_argument("--corrupt-every", type=int, default=50,
                    help="corrupt every n-th segment of >= 512 payload bytes to that port")
    fw.add_argument("--seed", type=int, default=1)
    sub.add_parser("sweep", help="remove namespaces of matrix runs that are gone")
    args = ap.parse_args()
    if args.cmd == "forward":
        return forward(args)
    print("\n".join(sweep()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
