"""Run QEMU's colo-compare (the reference) or our standalone comparator as a process with
the same four socket roles, and talk to it: used by the differential test and by
scripts/bench_compare.py."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from pipeline.net import build
from pipeline.net.adapters import StreamClient
from pipeline.net.control import PROXY_INIT, PROXY_INIT_REPLY

QEMU = shutil.which("qemu-system-x86_64")
ROLES = ("pin", "sin", "out", "ntf")
#: in the payload of the frames :meth:`Peer.wait_ready` sends (callers filter them out)
READY_PROBE = b"colo-peer-ready-probe-"
VNET_HDR = bytes(10)     # a virtio-net header (no offloads), for vnet_hdr peers


def qemu_command(paths: dict[str, str], timeout_ms: int, scan_ms: int, vnet_hdr: bool,
                 max_queue: int) -> list[str]:
    cmd = [QEMU, "-machine", "none", "-nodefaults", "-display", "none",
           "-object", "iothread,id=io1"]
    for role in ROLES:
        cmd += ["-chardev", f"socket,id={role},path={paths[role]},server=on,wait=off"]
    cmd += ["-object", ("colo-compare,id=c0,primary_in=pin,secondary_in=sin,outdev=out,"
                        f"notify_dev=ntf,iothread=io1,compare_timeout={timeout_ms},"
                        f"expired_scan_cycle={scan_ms},max_queue_size={max_queue},"
                        f"vnet_hdr_support={'on' if vnet_hdr else 'off'}")]
    return cmd


def ours_command(paths: dict[str, str], timeout_ms: int, scan_ms: int, vnet_hdr: bool,
                 max_queue: int) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.net.standalone",
           "--primary-in", "unix:" + paths["pin"], "--secondary-in", "unix:" + paths["sin"],
           "--outdev", "unix:" + paths["out"], "--notify-dev", "unix:" + paths["ntf"],
           "--compare-timeout-ms", str(timeout_ms), "--expired-scan-ms", str(scan_ms),
           "--max-queue-frames", str(max_queue), "--max-connections", str(max(4096, max_queue)),
           "--log-level", "WARNING"]
    if vnet_hdr:
        cmd.append("--vnet-hdr")
    return cmd


class Peer:
    """One running comparator (QEMU's or ours) with a client on each of its four sockets."""

    def __init__(self, name: str, proc: subprocess.Popen, paths: dict[str, str],
                 vnet_hdr: bool) -> None:
        self.name, self.proc = name, proc
        self.pin = StreamClient("unix:" + paths["pin"], vnet_hdr, timeout=20)
        self.sin = StreamClient("unix:" + paths["sin"], vnet_hdr, timeout=20)
        self.out = StreamClient("unix:" + paths["out"], vnet_hdr, timeout=20)
        self.ntf = StreamClient("unix:" + paths["ntf"], False, timeout=20)
        # QEMU reads notify_dev with a vnet length word when vnet_hdr_support is on (and
        # writes DO_CHECKPOINT without one): send with it, read without
        self.ntf.vnet_hdr = vnet_hdr
        self.vnet_hdr = vnet_hdr

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once the comparator took its four peers: a PROXY_INIT was answered and
        a matching probe pair (a UDP flow of its own) came out of outdev.

        A client's connect() succeeds before the server accepts it, and what it sends
        waits; but QEMU drops a frame it releases to an outdev it has not accepted yet
        (its chardev is not connected), which on a loaded machine happened after the
        1 s this used to sleep. A lost probe is why one is sent again after a second of
        silence; probes that come out late carry READY_PROBE for callers to filter."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} comparator did not take its peers within "
                                   f"{timeout} s (exit code {self.proc.poll()})")
            return remaining

        self.ntf.send(PROXY_INIT)
        while not any(m == PROXY_INIT_REPLY for m, _ in self.ntf.recv(min(0.1, left()))):
            pass
        for k in itertools.count():
            payload = READY_PROBE + b"%d" % k
            frame = build.udp_frame("10.255.255.2", "10.255.255.1", 1024 + k, 9, payload)
            for sock in (self.pin, self.sin):
                if self.vnet_hdr:
                    sock.send(VNET_HDR + frame, len(VNET_HDR))
                else:
                    sock.send(frame)
            resend = time.monotonic() + 1.0
            while time.monotonic() < resend:
                if any(READY_PROBE in f for f, _ in self.out.recv(min(0.1, left()))):
                    return

    def close(self) -> None:
        for c in (self.pin, self.sin, self.out, self.ntf):
            c.close()


@contextmanager
def running_peer(kind: str, timeout_ms: int = 1000, scan_ms: int = 100, vnet_hdr: bool = False,
                 max_queue: int = 1024):
    """QEMU's colo-compare (kind "qemu") or ours ("ours"), always stopped at exit."""
    tmp = tempfile.mkdtemp(prefix=f"ncmp-{kind}-")
    paths = {role: os.path.join(tmp, role + ".sock") for role in ROLES}
    make = qemu_command if kind == "qemu" else ours_command
    proc = subprocess.Popen(make(paths, timeout_ms, scan_ms, vnet_hdr, max_queue),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peer = None
    try:
        deadline = time.monotonic() + 20
        while not all(os.path.exists(p) for p in paths.values()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} comparator did not start: "
                                   f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.02)
        peer = Peer(kind, proc, paths, vnet_hdr)
        peer.wait_ready()
        yield peer
    finally:
        if peer is not None:
            peer.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()
        shutil.rmtree(tmp, ignore_errors=True)


def collect(client: StreamClient, quiet: float = 0.3, limit: float = 3.0) -> list:
    """Frames until ``quiet`` seconds pass without one (at most ``limit`` seconds)."""
    out: list = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = client.recv(min(quiet, max(0.0, end - time.monotonic())))
        if not got:
            break
        out += got
    return out
