#!/usr/bin/env python3
"""Benchmark: our network comparator against QEMU 7.2's colo-compare, same run, same framing.

Both run as separate processes with the same four unix-socket roles (QEMU:
``qemu-system-x86_64 -machine none`` with a colo-compare object; ours:
``python3 -m pipeline.net.standalone``). The same streams of matching PVM/SVM
frame pairs go to each:

* ``tcp``: 1000-byte TCP payloads over 64 connections;
* ``udp``: 64-byte UDP payloads (one datagram per flow: QEMU compares a flow's
  datagrams newest-first, so several in flight would make it ask for checkpoints).

Figures: frames/s (PVM frames released per second, PVM and SVM streams sent as fast
as possible from two threads), the comparator process's CPU time per frame pair in
that run (steadier than frames/s on a shared machine) and the added latency PVM frame in -> released frame
out (p50/p99), measured open-loop at ``--rate`` pairs/s. QEMU's max_queue_size is
raised to the stream length so it drops nothing.

QEMU 7.2 writes each frame out when it releases it (strace of its iothread: the length
word and the frame go out right after the comparison; its send coroutine only queues
while a write would block).

Streams are 200 000 pairs by default: short streams flatter whichever comparator has the
smaller start-up cost. Each figure is the median of ``--trials`` runs that alternate
which comparator goes first (the machine's load drifts). With ``--json`` the last line is one JSON object with every figure and the ratios
(ours / QEMU for frames/s; QEMU / ours for latency: > 1 means ours is better).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.net import build
from pipeline.net.framing import FrameDecoder, encode_frame
from pipeline.net.packet import TCP_ACK, TCP_PSH
from pipeline.net.qemu_peer import QEMU, running_peer

G, C = "10.1.0.2", "10.1.0.1"


def tcp_stream(n: int, connections: int, size: int) -> tuple[list[bytes], list[bytes]]:
    pvm, svm, seq = [], [], [1] * connections
    for i in range(n):
        c = i % connections
        payload = (i.to_bytes(4, "big") * (size // 4 + 1))[:size]
        args = (G, C, 10000 + c, 80, seq[c], 1, TCP_ACK | TCP_PSH, payload)
        pvm.append(build.tcp_frame(*args, ip_id=i & 0xFFFF))
        svm.append(build.tcp_frame(*args, ip_id=(i * 7) & 0xFFFF))
        seq[c] += size
    return pvm, svm


def udp_stream(n: int, size: int) -> tuple[list[bytes], list[bytes]]:
    pvm, svm = [], []
    for i in range(n):
        payload = (i.to_bytes(4, "big") * (size // 4 + 1))[:size]
        src = f"10.1.{1 + (i // 60000) % 200}.2"
        args = (src, C, 1024 + i % 60000, 53, payload)
        pvm.append(build.udp_frame(*args, ip_id=i & 0xFFFF))
        svm.append(build.udp_frame(*args, ip_id=(i * 7) & 0xFFFF))
    return pvm, svm


class Receiver(threading.Thread):
    """Reads the outdev stream; notes when each PVM frame came out."""

    def __init__(self, client, index: dict[bytes, int], expected: int) -> None:
        super().__init__(daemon=True)
        self.client, self.index, self.expected = client, index, expected
        self.times: list[float | None] = [None] * len(index)
        self.count = 0
        self.done = threading.Event()

    def run(self) -> None:
        decoder = FrameDecoder(False)
        sock = self.client.sock
        sock.settimeout(0.5)
        # one reused buffer: recv(1 MiB) would allocate (mmap) 1 MiB per read, ~10 us
        # added to every frame's measured latency, QEMU's and ours alike
        buf = memoryview(bytearray(1 << 20))
        while self.count < self.expected:
            try:
                n = sock.recv_into(buf)
            except (TimeoutError, OSError):
                if self.done.is_set():
                    break
                continue
            if not n:
                break
            now = time.perf_counter()
            for frame, _ in decoder.feed(buf[:n]):
                i = self.index.get(frame)
                if i is not None and self.times[i] is None:
                    self.times[i] = now
                    self.count += 1
        self.done.set()


def _chunks(frames: list[bytes], size: int = 1 << 18) -> list[bytes]:
    """The framed stream cut into sendall()-sized pieces (encoded before the clock starts)."""
    out, chunk, n = [], [], 0
    for f in frames:
        chunk.append(encode_frame(f))
        n += len(f) + 4
        if n >= size:
            out.append(b"".join(chunk))
            chunk, n = [], 0
    if chunk:
        out.append(b"".join(chunk))
    return out


def _send_all(client, chunks: list[bytes]) -> None:
    for chunk in chunks:
        client.sock.sendall(chunk)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_quiet(rx: Receiver, timeout: float, quiet: float = 1.0) -> None:
    """Wait until every frame came out, or none came for ``quiet`` s (a comparator that
    dropped some), at most ``timeout`` s."""
    end = time.monotonic() + timeout
    seen, since = rx.count, time.monotonic()
    while not rx.done.is_set() and time.monotonic() < end:
        rx.join(0.05)
        if rx.count != seen:
            seen, since = rx.count, time.monotonic()
        elif time.monotonic() - since > quiet:
            break
    rx.done.set()


def throughput(kind: str, pvm: list[bytes], svm: list[bytes], timeout: float) -> dict:
    with running_peer(kind, timeout_ms=60_000, scan_ms=1000,
                      max_queue=len(pvm) + 16) as peer:
        rx = Receiver(peer.out, {f: i for i, f in enumerate(pvm)}, len(pvm))
        rx.start()
        pvm_chunks, svm_chunks = _chunks(pvm), _chunks(svm)
        cpu0 = _cpu_seconds(peer.proc.pid)
        t0 = time.perf_counter()
        senders = [threading.Thread(target=_send_all, args=(peer.pin, pvm_chunks)),
                   threading.Thread(target=_send_all, args=(peer.sin, svm_chunks))]
        for s in senders:
            s.start()
        for s in senders:
            s.join()
        _wait_quiet(rx, timeout)
        cpu = _cpu_seconds(peer.proc.pid) - cpu0
        last = max((t for t in rx.times if t is not None), default=t0)
        elapsed = last - t0
    return {"frames": rx.count, "seconds": round(elapsed, 4),
            "frames_per_s": round(rx.count / elapsed, 1) if elapsed > 0 else 0.0,
            "cpu_us_per_pair": round(cpu / len(pvm) * 1e6, 2)}


def latency(kind: str, pvm: list[bytes], svm: list[bytes], rate: float) -> dict:
    with running_peer(kind, timeout_ms=60_000, scan_ms=1000,
                      max_queue=len(pvm) + 16) as peer:
        rx = Receiver(peer.out, {f: i for i, f in enumerate(pvm)}, len(pvm))
        rx.start()
        sent = [0.0] * len(pvm)
        gap = 1.0 / rate
        start = time.perf_counter()
        for i, (p, s) in enumerate(zip(pvm, svm)):
            # sleep, not spin: the receiver thread needs the GIL to timestamp releases
            delay = start + i * gap - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[i] = time.perf_counter()
            peer.pin.sock.sendall(encode_frame(p))
            peer.sin.sock.sendall(encode_frame(s))
        _wait_quiet(rx, 10)
    lat = sorted((t - s) * 1e6 for t, s in zip(rx.times, sent) if t is not None)
    if not lat:
        return {"frames": 0, "p50_us": None, "p99_us": None}
    return {"frames": len(lat), "p50_us": round(lat[len(lat) // 2], 1),
            "p99_us": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)}


def _median_row(runs: list[dict]) -> dict:
    """Each figure's median over the trials (None where a trial had none)."""
    out = {}
    for key in runs[0]:
        values = sorted(r[key] for r in runs if r[key] is not None)
        out[key] = values[len(values) // 2] if values else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200_000, help="frame pairs per stream")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--tcp-payload", type=int, default=1000)
    parser.add_argument("--udp-payload", type=int, default=64)
    parser.add_argument("--latency-frames", type=int, default=10_000,
                        help="pairs per latency run (p99 is the 100th slowest of 10 000)")
    parser.add_argument("--rate", type=float, default=2000.0, help="pairs/s in the latency run")
    parser.add_argument("--trials", type=int, default=3,
                        help="alternating runs per implementation; figures are medians")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if QEMU is None:
        print("qemu-system-x86_64 not found: the reference cannot run", file=sys.stderr)
        return 2
    streams = {"tcp": tcp_stream(args.frames, args.connections, args.tcp_payload),
               "udp": udp_stream(args.frames, args.udp_payload)}
    lat_streams = {"tcp": tcp_stream(args.latency_frames, args.connections, args.tcp_payload),
                   "udp": udp_stream(args.latency_frames, args.udp_payload)}
    result: dict = {"frames": args.frames, "latency_frames": args.latency_frames,
                    "rate": args.rate, "trials": args.trials}
    for name in ("tcp", "udp"):
        runs: dict[str, list[dict]] = {"qemu": [], "ours": []}
        for trial in range(args.trials):
            # alternate who goes first: the machine's load drifts during a run
            order = ("qemu", "ours") if trial % 2 == 0 else ("ours", "qemu")
            for kind in order:
                tp = throughput(kind, *streams[name], timeout=120)
                lt = latency(kind, *lat_streams[name], rate=args.rate)
                runs[kind].append({**tp, **{k: v for k, v in lt.items() if k != "frames"},
                                   "latency_frames": lt["frames"]})
        row = {kind: _median_row(rs) for kind, rs in runs.items()}
        q, o = row["qemu"], row["ours"]
        row["ratio_frames_per_s"] = round(o["frames_per_s"] / q["frames_per_s"], 3) \
            if q["frames_per_s"] else None
        for p in ("p50_us", "p99_us", "cpu_us_per_pair"):
            row[f"ratio_{p}"] = round(q[p] / o[p], 3) if q[p] and o[p] else None
        result[name] = row
        print(f"{name}: frames/s ours {o['frames_per_s']:>10.0f}  qemu {q['frames_per_s']:>10.0f}"
              f"  ratio {row['ratio_frames_per_s']}  (released ours {o['frames']}/"
              f"{args.frames}, qemu {q['frames']}/{args.frames}; median of {args.trials})")
        print(f"{name}: latency p50 ours {o['p50_us']} us  qemu {q['p50_us']} us  "
              f"(qemu/ours {row['ratio_p50_us']});  p99 ours {o['p99_us']} us  "
              f"qemu {q['p99_us']} us  (qemu/ours {row['ratio_p99_us']})")
        print(f"{name}: comparator CPU per frame pair ours {o['cpu_us_per_pair']} us  "
              f"qemu {q['cpu_us_per_pair']} us  (qemu/ours {row['ratio_cpu_us_per_pair']})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
