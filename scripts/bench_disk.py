#!/usr/bin/env python3
"""Write throughput of our NBD export with replication on, against qemu-nbd, in one run.

Workloads, driven by the same client (``qemu-img bench -w``) against each server:

* ``seq_1m``  — sequential 1 MiB writes, 8 in flight;
* ``rand_4k`` — 4 KiB writes, 16 in flight, each ``7919`` blocks (a prime) after the
  previous one modulo the image size, so consecutive writes land far apart (qemu-img
  bench has no random mode; the stride visits every block once before repeating).

Servers (each on a fresh sparse raw image, exported on a unix socket: qemu 7.2's NBD
client does not set TCP_NODELAY, which caps small writes over TCP at ~400 IOPS for
*any* server, so TCP would measure Nagle, not the servers):

* ``qemu_nbd``          — ``qemu-nbd -f raw -t`` serving a plain file (the reference);
* ``ours_replicated``   — our primary export, forwarding every write over ZeroMQ
  tcp://127.0.0.1 to our secondary stage (another process) and answering after its ack;
* ``ours_unreplicated`` — our primary export with forwarding off.

After the replicated run the secondary commits everything it buffered; the commit time
and a whole-image hash comparison of primary and secondary are reported as well.

Usage: ``python3 scripts/bench_disk.py [--quick] [--repeats N] [--json]``; ``--json``
prints one JSON object with every figure as the last line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import blake3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.disk.settings import DiskSettings
from pipeline.stages.disk import PrimaryDisk, start_disk_pair

STRIDE_BLOCKS = 7919


def qemu_img_bench(uri: str, size: int, count: int, depth: int, step: int | None) -> float:
    """Seconds qemu-img bench needed for ``count`` writes of ``size`` bytes."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-w", "-s", str(size), "-c", str(count),
           "-d", str(depth)]
    if step is not None:
        cmd += ["-S", str(step)]
    r = subprocess.run(cmd + [uri], capture_output=True, text=True, timeout=900)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} {uri} failed: {r.stdout}{r.stderr}")
    return float(m.group(1))


@contextlib.contextmanager
def qemu_nbd(workdir: str, image_size: int):
    img, sock = os.path.join(workdir, "qemu-nbd.img"), os.path.join(workdir, "qemu-nbd.sock")
    with open(img, "wb") as f:
        f.truncate(image_size)
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-k", sock, img],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-nbd did not start: {p.stderr.read().decode()}")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}", {}
    finally:
        p.terminate()
        p.wait(timeout=10)


@contextlib.contextmanager
def ours_replicated(workdir: str, image_size: int):
    d = os.path.join(workdir, "pair")
    pair = start_disk_pair(d, image_size, compare="off",
                           primary_export=f"unix:{d}-primary.sock",
                           secondary_export=f"unix:{d}-secondary.sock")
    extra: dict = {}
    try:
        yield pair.primary_uri, extra
        assert pair.primary.wait_forwarded(1, 60_000)
        stats = pair.primary.stats()["counters"]
        extra["forward_latency_avg_us"] = stats["forward_latency_ns"] / max(1, stats["forwarded"]) / 1e3
        extra["commit_MB"] = pair.secondary.stats()["counters"]["buffer_bytes"] / 1e6
        t0 = time.perf_counter()
        pair.secondary.commit(1)
        extra["commit_s"] = time.perf_counter() - t0
        hashes = []
        for name in ("primary.img", "secondary.img"):
            with open(os.path.join(d, name), "rb") as f:
                hashes.append(blake3.blake3(f.read()).hexdigest())
        extra["images_identical_after_commit"] = hashes[0] == hashes[1]
    finally:
        pair.stop()


@contextlib.contextmanager
def ours_unreplicated(workdir: str, image_size: int):
    s = DiskSettings(image=os.path.join(workdir, "plain.img"), export_size=image_size,
                     export=f"unix:{workdir}/plain.sock")
    disk = PrimaryDisk(s, forward=False)
    try:
        yield disk.uri, {}
    finally:
        disk.close()


SERVERS = {"qemu_nbd": qemu_nbd, "ours_replicated": ours_replicated,
           "ours_unreplicated": ours_unreplicated}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per server, best kept (default 2, quick 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_disk: {tool} is not installed (Debian package qemu-utils)")
    repeats = args.repeats or (1 if args.quick else 2)
    image_size = (64 if args.quick else 256) << 20
    workloads = {
        "seq_1m": dict(size=1 << 20, count=64 if args.quick else 512, depth=8, step=None),
        "rand_4k": dict(size=4096, count=2000 if args.quick else 20000, depth=16,
                        step=4096 * STRIDE_BLOCKS),
    }
    best: dict[str, dict[str, float]] = {w: {} for w in workloads}
    extras: dict[str, dict] = {}
    for _ in range(repeats):
        for server, start in SERVERS.items():  # interleaved: load changes hit all alike
            with tempfile.TemporaryDirectory(prefix="bench-disk-") as tmp:
                with start(tmp, image_size) as (uri, extra):
                    for w, p in workloads.items():
                        secs = qemu_img_bench(uri, **p)
                        best[w][server] = min(best[w].get(server, secs), secs)
                extras.setdefault(server, {}).update(extra)
    result: dict[str, object] = {"image_MiB": image_size >> 20, "repeats": repeats}
    rows = []
    for w, p in workloads.items():
        for server, secs in best[w].items():
            mbps = p["size"] * p["count"] / secs / 1e6
            iops = p["count"] / secs
            result[f"{w}_{server}_MBps"] = round(mbps, 1)
            result[f"{w}_{server}_IOPS"] = round(iops, 1)
        for server in ("ours_replicated", "ours_unreplicated"):
            ratio = best[w]["qemu_nbd"] / best[w][server]
            result[f"{w}_ratio_{server}_vs_qemu_nbd"] = round(ratio, 3)
        rows.append(w)
    for server, extra in extras.items():
        for k, v in extra.items():
            result[f"{server}_{k}"] = round(v, 3) if isinstance(v, float) else v
    print(f"{'workload':10} {'server':18} {'MB/s':>9} {'IOPS':>9} {'vs qemu-nbd':>12}")
    for w in rows:
        for server in SERVERS:
            ratio = "1.000 (ref)" if server == "qemu_nbd" else \
                f"{result[f'{w}_ratio_{server}_vs_qemu_nbd']:.3f}"
            print(f"{w:10} {server:18} {result[f'{w}_{server}_MBps']:9.1f} "
                  f"{result[f'{w}_{server}_IOPS']:9.1f} {ratio:>12}")
    for k, v in result.items():
        if k.startswith("ours_replicated_"):
            print(f"{k}: {v}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
