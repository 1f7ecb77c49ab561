#!/usr/bin/env python3
"""Time to go live after the primary host is lost, per split-brain guard.

For each guard the script starts a protected pair on this machine (real node processes,
CURVE), SIGKILLs every process of the primary and measures, from the kill:
- ``detect_ms``: until the secondary declared the primary lost (heartbeat);
- ``live_ms``: until the SVM was live (the guard passed and the guest runs).

Guards: the local (demo) witness, which sees the dead holder at once; etcd with lease
TTL 2 s and 5 s, where going live waits for the dead primary's lease to lapse; and a
fencing command that succeeds (``true``) with no witness, where nothing waits for a
lease. The reference printed with each row is the heartbeat's own detection time
(``heartbeat.interval_ms * miss_count``), measured in the same run.

    PYTHONPATH=. .venv/bin/python scripts/bench_failover.py [--runs 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.localpair import LocalPair, free_port_base  # noqa: E402

TABLES = {
    "guest": {"backend": "sim", "page_count": 2048},
    "guest.workload": {"seed": 5, "input_rate_hz": 250.0, "pages_per_input": 8},
    "checkpoint": {"max_interval_ms": 150, "min_interval_ms": 5, "epoch_timeout_ms": 5000},
}


def start_etcd(workdir: str) -> tuple[subprocess.Popen, str]:
    port = free_port_base(2)
    url, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    proc = subprocess.Popen(
        ["etcd", "--name", "w", "--data-dir", os.path.join(workdir, "etcd"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"w={peer}", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if b'"true"' in r.read():
                    return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("etcd did not start")


def one_run(failover: dict) -> dict:
    pair = LocalPair(dict(TABLES, failover=failover))
    try:
        pair.start()
        pair.wait_protected()
        # a few committed checkpoints so the lease has been renewed at least once
        pair.wait_checkpoints(len(pair.checkpoints()) + 5)
        killed = pair.kill("primary")
        info = pair.wait_info("role", "active", role="secondary", timeout=120)
        detect = (info["failover_detected_at"] - killed) * 1000
        return {"detect_ms": round(detect, 1), "live_ms": round(detect + info["takeover_ms"], 1)}
    finally:
        pair.stop()
        pair.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-failover-")
    etcd = None
    rows = {}
    try:
        guards = {"local witness": {"witness": "local",
                                    "witness_dir": os.path.join(workdir, "witness")},
                  "fence (succeeds), no witness": {"witness": "none",
                                                   "fence_command": ["true"]}}
        if shutil.which("etcd"):
            etcd, url = start_etcd(workdir)
            for ttl in (2, 5):
                guards[f"etcd TTL {ttl} s"] = {"witness": "etcd", "etcd_endpoints": [url],
                                               "lease_ttl_s": ttl}
        reference_ms = 100 * 3     # heartbeat.interval_ms * miss_count (defaults)
        for name, failover in guards.items():
            runs = [one_run(failover) for _ in range(args.runs)]
            rows[name] = {
                "detect_ms_median": statistics.median(r["detect_ms"] for r in runs),
                "live_ms_median": statistics.median(r["live_ms"] for r in runs),
                "live_ms_max": max(r["live_ms"] for r in runs),
                "live_vs_heartbeat_timeout": round(statistics.median(
                    r["live_ms"] for r in runs) / reference_ms, 2),
                "runs": runs}
            r = rows[name]
            print(f"{name:32s} detected {r['detect_ms_median']:7.1f} ms  live "
                  f"{r['live_ms_median']:7.1f} ms (max {r['live_ms_max']:.1f})  "
                  f"= {r['live_vs_heartbeat_timeout']}x the heartbeat timeout "
                  f"({reference_ms} ms)", flush=True)
    finally:
        if etcd is not None:
            etcd.kill()
            etcd.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({"runs_per_guard": args.runs, "guards": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
