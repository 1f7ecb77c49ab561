#!/usr/bin/env python3
"""The work of one checkpoint, in figures a busy machine does not change much.

Starts a real primary and secondary on this machine (sim guests, as
scripts/bench_pipeline.py does), takes --reps checkpoints of --pages dirty pages that PVM
and SVM both wrote, and sums over every thread of both nodes (the processes of their two
sessions: stages, ZeroMQ I/O threads, the guests) what each checkpoint cost: CPU time
(schedstat), voluntary context switches (a thread blocked: each hand-off between
processes is one) and involuntary ones (it was preempted). Prints the medians; --json one
JSON object as the last line. Commit latency on a shared 2-core machine moves 3x with the
load; these move little, so two versions of the code compare on them in any weather.

    scripts/checkpoint_work.py --pages 1000 --reps 5
    scripts/checkpoint_work.py --sync --size-mb 512     # the full sync's work instead
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bench_pipeline as bench  # noqa: E402 (this script's folder is on sys.path)


def node_work(sessions: set[int], by_thread: dict | None = None) -> tuple[float, int, int]:
    """(CPU ms, voluntary, involuntary context switches) of every thread in ``sessions``.
    ``by_thread``, if given, gets CPU ns per (session, process name/thread name) added."""
    cpu_ns = vol = inv = 0
    for stat in glob.glob("/proc/[0-9]*/task/[0-9]*/stat"):
        task = stat[:-len("stat")]
        try:
            with open(stat) as fh:
                text = fh.read()
            if int(text[text.rindex(")") + 2:].split()[3]) not in sessions:   # field 6: session
                continue
            with open(task + "schedstat") as fh:
                ns = int(fh.read().split()[0])
            cpu_ns += ns
            if by_thread is not None:
                sid = int(text[text.rindex(")") + 2:].split()[3])
                with open(os.path.dirname(os.path.dirname(task.rstrip("/"))) + "/comm") as fh:
                    proc = fh.read().strip()
                key = (sid, f"{proc}/{text[text.index('(') + 1:text.rindex(')')]}")
                by_thread[key] = by_thread.get(key, 0) + ns
            with open(task + "status") as fh:
                for line in fh:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv += int(line.split()[1])
        except (OSError, ValueError):
            pass            # a thread that ended meanwhile
    return cpu_ns / 1e6, vol, inv


def print_by_thread(threads: list[dict], what: str) -> dict[str, float]:
    """Print the median CPU ms of each (node, process/thread) over ``threads`` (one dict a
    run); returns them as {"node process/thread": ms} (the JSON's ``by_thread``)."""
    print(f"CPU ms per {what} by thread (median of {len(threads)}):")
    out = {}
    for key in sorted({k for t in threads for k in t}, key=lambda k: (str(k[0]), k[1])):
        ms = statistics.median(t.get(key, 0) for t in threads) / 1e6
        if ms >= 0.05:
            print(f"  {key[0]:>10} {key[1]:<34} {ms:9.2f}")
            out[f"{key[0]} {key[1]}"] = round(ms, 2)
    return out


def sync_work(args) -> int:
    """CPU time and context switches of both nodes over the full sync of --size-mb: from
    the primary's state "syncing" (its stages have started) until it is protected (the
    sync, pre-copy rounds and the first checkpoint)."""
    rows = []
    threads: list[dict] = []
    node_of: dict = {}
    for _ in range(args.reps):
        with bench._pair(args.size_mb * 256, 2, 2, 1 << 30, security=args.security) as pair:
            bench.start_ready(pair)
            sessions = {os.getsid(p.pid) for p in pair.procs.values()}
            node_of.update({os.getsid(p.pid): name for name, p in pair.procs.items()})
            pair.wait_info("state", "syncing", timeout=300)
            t_before: dict = {}
            before = node_work(sessions, t_before)
            pair.wait_protected(timeout=900)
            t_after: dict = {}
            after = node_work(sessions, t_after)
            sync = pair.checkpoints()[0]
            rows.append([a - b for a, b in zip(after, before)] + [sync["commit_ns"] / 1e6])
            threads.append({(node_of[k[0]], k[1]): v - t_before.get(k, 0)
                            for k, v in t_after.items()})
    if args.by_thread:
        by_thread = print_by_thread(threads, "the full sync")
    keys = ("cpu_ms", "voluntary_switches", "involuntary_switches", "sync_ms")
    result = {"size_mb": args.size_mb, "reps": args.reps,
              **{k: round(statistics.median(r[i] for r in rows), 1) for i, k in enumerate(keys)},
              "cpu_ns_per_guest_byte": round(statistics.median(r[0] for r in rows) * 1e6
                                             / (args.size_mb << 20), 2),
              "loadavg": round(os.getloadavg()[0], 1)}
    print(f"full sync of {args.size_mb} MiB, median of {args.reps}: CPU {result['cpu_ms']} ms "
          f"({result['cpu_ns_per_guest_byte']} ns per guest byte), "
          f"{result['voluntary_switches']} voluntary and {result['involuntary_switches']} "
          f"involuntary context switches, sync {result['sync_ms']} ms (load average "
          f"{result['loadavg']} on {os.cpu_count()} cores)")
    if args.by_thread:
        result["by_thread"] = by_thread
    if args.json:
        print(json.dumps(result))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=1000, help="dirty pages per checkpoint")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--sync", action="store_true",
                    help="the full sync's work (from the primary's 'syncing' to protected), "
                         "--reps pairs started afresh")
    ap.add_argument("--security", choices=("curve", "sealed", "plaintext"), default="curve",
                    help="security.mode of the pair")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--by-thread", action="store_true",
                    help="also print the median CPU per checkpoint of each thread (process "
                         "name/thread name: the stages name their processes) on each node")
    args = ap.parse_args()
    if args.sync:
        return sync_work(args)
    rows = []
    with bench._pair(args.size_mb * 256, 2, 2, args.pages * 2, security=args.security) as pair:
        pair.start()
        pair.wait_protected(timeout=900)
        sessions = {os.getsid(p.pid) for p in pair.procs.values()}
        node_of = {os.getsid(p.pid): name for name, p in pair.procs.items()}
        threads: list[dict] = []
        for _ in range(args.reps):
            bench.write_in_both_guests(pair, args.pages)
            count = len(pair.checkpoints())
            t_before: dict = {}
            before = node_work(sessions, t_before)
            pair.request_checkpoint()
            cp = pair.wait_checkpoints(count + 1, timeout=600)[-1]
            # the secondary ACKs before it has written the pages (early ACK): its work
            # counts until it recorded the epoch, applied
            deadline = time.monotonic() + 600
            while not any(s["epoch"] == cp["epoch"] for s in pair.checkpoints("secondary")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the secondary never recorded epoch {cp['epoch']}")
                time.sleep(0.005)
            t_after: dict = {}
            after = node_work(sessions, t_after)
            rows.append([a - b for a, b in zip(after, before)] + [cp["commit_ns"] / 1e6])
            threads.append({k: v - t_before.get(k, 0) for k, v in t_after.items()})
    keys = ("cpu_ms", "voluntary_switches", "involuntary_switches", "commit_ms")
    if args.by_thread:
        by_thread = print_by_thread([{(node_of.get(k[0], k[0]), k[1]): v for k, v in t.items()}
                                     for t in threads], "checkpoint")
    result = {"pages": args.pages, "reps": args.reps, "security": args.security,
              **{k: round(statistics.median(r[i] for r in rows), 1) for i, k in enumerate(keys)},
              "loadavg": round(os.getloadavg()[0], 1)}
    print(f"{args.pages} dirty pages, median of {args.reps} checkpoints: CPU "
          f"{result['cpu_ms']} ms, {result['voluntary_switches']} voluntary and "
          f"{result['involuntary_switches']} involuntary context switches, commit "
          f"{result['commit_ms']} ms (load average {result['loadavg']} on {os.cpu_count()} cores)")
    if args.by_thread:
        result["by_thread"] = by_thread
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
