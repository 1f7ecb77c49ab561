#!/usr/bin/env python3
"""Where one checkpoint's commit goes: a timeline of its hand-offs between processes.

Starts a real primary and secondary on this machine (sim guests, as scripts/bench_pipeline.py
does) with COLO_TRACE set, so every stage appends a timestamp at each hand-off
(pipeline/trace.py), takes --reps checkpoints of --pages dirty pages that PVM and SVM both
wrote, and prints for each checkpoint, relative to CHECKPOINT_BEGIN: per stage and event,
the first and last time it happened and how often. The clock is CLOCK_MONOTONIC, one for
all processes of the machine. Times include whatever else the machine was doing: read them
next to the load average printed at the end.

    scripts/trace_checkpoint.py --pages 1000 --reps 3
    scripts/trace_checkpoint.py --pages 16000 --reps 2 --raw   # every event, with details
    scripts/trace_checkpoint.py --pages 1000 --reps 6 --by-stage   # CPU and wake-ups per stage
    scripts/trace_checkpoint.py --pages 1000 --reps 20 --cpu   # the CPU map, hand-off to hand-off

--raw prints every event of each checkpoint in time order with its detail (pages in the
SVM's dirty log, the size of each SVM_DIRTY part, SVM pages checked) instead of the
first/last summary per stage and event. At the end, the control hops (BEGIN to each
node, each SVM_DIRTY part from coordinator to coordinator, the ACK's way back) and the
data path's (the sim guest's pause answer, each hand-off of the first batch from stage to
stage) over all checkpoints: median and max, the figures that say whether a hop waited
for a core; the number of hand-offs (trace events of distinct processes in a row) in a
checkpoint; and the stages' wake-ups per checkpoint (voluntary context switches of every
thread of both nodes' stage processes, less their rate without checkpoints) and their
CPU time per checkpoint (schedstat): figures the machine's load moves far less than the
times, to compare two trees by.

--cpu (COLO_TRACE_CPU=1: each event carries its thread's and process's CPU time so far)
prints where the CPU of the commit went: for each process, the CPU it spent between two
of its own events, summed over the commit (BEGIN to the primary taking the ACK in) and
after it (the apply's second half, the cache, the prehash), median over the checkpoints;
and each such segment ("restore: apply_start -> svm_checked") by its mean CPU per
checkpoint, with the tracing thread's share beside the process's (the rest: its ZeroMQ
I/O threads). A process's CPU from its last event of one checkpoint to its first of the
next (its wake-up, up to its first event) is in neither.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bench_pipeline as bench  # noqa: E402 (this script's folder is on sys.path)
import threadstat  # noqa: E402


def timeline(lines: list[str], commit_ms: float) -> list[tuple[str, str, float, float, int]]:
    """(process, event, first ms, last ms, count) from BEGIN, in order of first time."""
    events = [ln.split(" ", 5) for ln in lines if ln.count(" ") >= 4]
    t0 = next((int(e[0]) for e in events if e[3] == "begin"), None)
    if t0 is None:
        return []
    seen: dict[tuple[str, str], list] = {}
    for ns, _pid, who, event, *_ in events:
        dt = (int(ns) - t0) / 1e6
        if -1 <= dt <= commit_ms + 15:
            entry = seen.setdefault((who, event), [dt, dt, 0])
            entry[1] = dt
            entry[2] += 1
    return sorted(((w, e, f, last, n) for (w, e), (f, last, n) in seen.items()),
                  key=lambda r: r[2])


def events(lines: list[str], commit_ms: float) -> list[tuple[float, str, str, str, str]]:
    """(ms from BEGIN, process, event, epoch, detail) of every event, in time order."""
    rows = [ln.split(" ", 5) for ln in lines if ln.count(" ") >= 4]
    t0 = next((int(r[0]) for r in rows if r[3] == "begin"), None)
    if t0 is None:
        return []
    out = [((int(r[0]) - t0) / 1e6, r[2], r[3], r[4], r[5] if len(r) > 5 else "")
           for r in rows]
    # (to 15 ms past the commit: the SVM resumes after it, an early ACK's epoch is applied
    # and the SVM resumed after the ACK)
    return sorted(e for e in out if -1 <= e[0] <= commit_ms + 15)


#: the control hops of a checkpoint, each from one process's event to the next's (the
#: primary's and the secondary's coordinator both trace as "coordinator"; their events
#: have distinct names); an SVM_DIRTY part is matched to its arrival in order
HOPS = (("BEGIN -> snapshot stage", ("coordinator", "begin"), ("snapshot", "cmd")),
        ("BEGIN -> secondary", ("coordinator", "begin"), ("coordinator", "begin_in")),
        ("EPOCH_END sent -> restore applies", ("send", "sent_end"), ("restore", "apply_start")),
        ("verdict -> ACK sent", ("coordinator", "reply"), ("coordinator", "ack_sent")),
        ("ACK sent -> primary", ("coordinator", "ack_sent"), ("coordinator", "ack_in")),
        # the SVM's pause after the early ACK (it resumes once the epoch is applied)
        ("checked -> pages written", ("restore", "checked"), ("restore", "pages_written")),
        ("pages written -> SVM pages cached", ("restore", "pages_written"),
         ("restore", "svm_cached")),
        ("SVM pages cached -> Written", ("restore", "svm_cached"), ("restore", "written")),
        ("Written -> secondary", ("restore", "written"), ("coordinator", "written_in")),
        ("secondary -> SVM resumed", ("coordinator", "written_in"),
         ("coordinator", "svm_resumed")),
        ("checked -> SVM resumed", ("restore", "checked"), ("coordinator", "svm_resumed")),
        # the SVM's pages copied while the epoch is in transit (none past its arrival: the
        # rest are copied in the pause, "pages written -> SVM pages cached"), and the cache
        # filled beside the resumed SVM
        ("ApplyCmd -> SVM's pages copied", ("restore", "svm_copy_start"),
         ("restore", "svm_copied")),
        ("Written -> cache written", ("restore", "written"), ("restore", "cache_written")),
        ("BEGIN in -> SVM resumed", ("coordinator", "begin_in"), ("coordinator", "svm_resumed")))

#: the data path's hops: from the first time one process did something to the first time
#: the next one did something after it (a process name ending in "." stands for all the
#: workers of that stage, "digest.0", "digest.1", ...), and the sim guest's answer to the
#: PVM's pause
DATA_HOPS = (("pause asked -> PVM paused", ("snapshot", "pausing"), ("snapshot", "paused")),
             ("PVM resumed -> digest takes a batch", ("snapshot", "resumed"), ("digest.", "taken")),
             ("digest encoded -> send sends", ("digest.", "encoded"), ("send", "sent_pages")),
             # (the receive stage's work is done in the restore stage's process: its
             # events are the restore stage's, session 19)
             ("send -> receive", ("send", "sent_pages"), ("restore", "recv")),
             ("receive dealt -> verify", ("restore", "dealt"), ("verify.", "w_in")),
             ("receive/verify -> restore", ("restore", "dealt"), ("restore", "slot")))


def hops(evs: list[tuple[float, str, str, str, str]]) -> dict[str, list[float]]:
    """ms each control hop took in one checkpoint's events (:func:`events`)."""
    def at(who: str, name: str) -> list[float]:
        return [t for t, w, n, _e, _d in evs
                if (w.startswith(who) if who.endswith(".") else w == who) and n == name]
    out: dict[str, list[float]] = {}
    for label, a, b in HOPS:
        ta, tb = at(*a), at(*b)
        if ta and tb:
            out[label] = [tb[0] - ta[0]]
    for label, a, b in DATA_HOPS:
        ta = at(*a)
        tb = [t for t in at(*b) if ta and t >= ta[0]]
        if ta and tb:
            out[label] = [tb[0] - ta[0]]
    sent = sorted(at("coordinator", "svm_part_sent") + at("coordinator", "svm_hashed"))
    out["SVM_DIRTY part -> primary"] = [g - t for t, g in zip(sent, at("coordinator",
                                                                       "svm_dirty_in"))]
    return out


def cpu_map(lines: list[str], names: dict[int, str]) -> tuple[dict, dict, dict, float]:
    """One checkpoint's CPU by process and by segment (--cpu): ({process: CPU ms before
    the ACK}, {process: after}, {"process: event -> event": (process ms, thread ms)}, ms
    of the commit by the trace) from its COLO_TRACE_CPU lines."""
    rows = []
    for ln in lines:
        f = ln.split(" ")
        cpu = [x for x in f[5:] if x.startswith("cpu=")] if len(f) > 5 else []
        if cpu:
            thread_ns, process_ns = map(int, cpu[-1][4:].split("/"))
            rows.append((int(f[0]), int(f[1]), f[2], f[3], thread_ns, process_ns))
    rows.sort()
    t0 = next((r[0] for r in rows if r[3] == "begin"), None)
    ack = next((r[0] for r in rows if r[3] == "ack_in"), None)
    if t0 is None or ack is None:
        return {}, {}, {}, 0.0
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    segments: dict[str, tuple[float, float]] = {}
    last: dict[int, tuple[str, int, int]] = {}
    for ns, pid, who, event, thread_ns, process_ns in rows:
        name = names.get(pid, who)
        if pid in last:
            prev, p_thread, p_process = last[pid]
            ms = (process_ns - p_process) / 1e6
            side = before if ns <= ack else after
            side[name] = side.get(name, 0.0) + ms
            if ns <= ack:
                key = f"{name}: {prev} -> {event}"
                got = segments.get(key, (0.0, 0.0))
                segments[key] = (got[0] + ms, got[1] + (thread_ns - p_thread) / 1e6)
        last[pid] = (event, thread_ns, process_ns)
    return before, after, segments, (ack - t0) / 1e6


def print_cpu_map(maps: list[tuple[dict, dict, dict, float]]) -> None:
    """--cpu's summary over the checkpoints (:func:`cpu_map` of each)."""
    maps = [m for m in maps if m[3]]
    if not maps:
        print("CPU map: no checkpoint had CPU times in its trace (COLO_TRACE_CPU)")
        return
    print(f"CPU map over {len(maps)} checkpoints: each process's CPU between its own events, "
          "ms per checkpoint (median): before the ACK / after it")
    names = sorted({n for m in maps for n in (*m[0], *m[1])},
                   key=lambda n: -statistics.median(m[0].get(n, 0.0) for m in maps))
    total = 0.0
    for n in names:
        b = statistics.median(m[0].get(n, 0.0) for m in maps)
        a = statistics.median(m[1].get(n, 0.0) for m in maps)
        total += b
        if b >= 0.01 or a >= 0.01:
            print(f"  {n:28s} {b:6.2f} {a:6.2f}")
    print(f"  {'(sum of the medians)':28s} {total:6.2f}")
    print("segments before the ACK, ms per checkpoint (mean): the process's CPU (its tracing "
          "thread's), in how many checkpoints")
    keys = {k for m in maps for k in m[2]}
    rows = sorted(((sum(m[2].get(k, (0, 0))[0] for m in maps) / len(maps),
                    sum(m[2].get(k, (0, 0))[1] for m in maps) / len(maps),
                    sum(k in m[2] for m in maps), k) for k in keys), reverse=True)
    for ms, thread_ms, n, k in rows:
        if ms >= 0.03:
            print(f"  {ms:6.2f} ({thread_ms:5.2f}) x{n:<3d} {k}")


def wakeups(pids: list[int]) -> tuple[int, int]:
    """(voluntary context switches, ns on a CPU) so far of every thread of ``pids``. Each
    switch is a wait that blocked, so each hand-off that woke a sleeper counts one (and
    each sleep after it); the CPU time is the kernel's (schedstat), to the nanosecond."""
    times = [t for t in (threadstat.thread_times(pid, switches=True) for pid in pids) if t]
    return sum(t.switches for t in times), sum(t.cpu_ns for t in times)


def named_stage_pids(pair) -> dict[str, int]:
    """{"primary:snapshot": pid, ...}: every stage process of both nodes by name."""
    return {f"{role}:{name}": pid for role in ("primary", "secondary")
            for name, pid in pair.node(role).node_info().get("stage_pids", {}).items()}


def stage_counts(named: dict[str, int]) -> dict[str, tuple[int, int]]:
    """:func:`wakeups` of each stage process, by name (the totals are their sums)."""
    return {n: wakeups([p]) for n, p in named.items()}


def in_force_now() -> int | None:
    """The machine's CPU wake-up latency limit now (None: the device cannot be read)."""
    try:
        return bench.cpu_latency.in_force_us()
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=1000, help="dirty pages per checkpoint")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--batch-pages", type=int, default=0,
                    help="pipeline.batch_pages (0: the config's default)")
    ap.add_argument("--prescan-ms", type=int, default=None,
                    help="checkpoint.prescan_ms (default: the config's; 0 = off)")
    ap.add_argument("--cpu-latency-us", type=int, default=None,
                    help="node.cpu_latency_us, both nodes (default: the config's, 0; -1: "
                    "not held); the last line says what was in force during the run")
    ap.add_argument("--raw", action="store_true",
                    help="every event in time order, with its detail")
    ap.add_argument("--by-stage", action="store_true",
                    help="also each stage's CPU time and wake-ups per checkpoint (median)")
    ap.add_argument("--cpu", action="store_true",
                    help="also the CPU map: each process's CPU between its hand-offs, "
                    "before and after the ACK (COLO_TRACE_CPU)")
    args = ap.parse_args()
    fd, path = tempfile.mkstemp(prefix="colo-trace-", suffix=".txt")
    os.close(fd)
    os.environ["COLO_TRACE"] = path      # inherited by both nodes' processes
    if args.cpu:
        os.environ["COLO_TRACE_CPU"] = "1"
    marks = []
    in_force: list[tuple[int | None, int | None]] = []
    woke: list[float] = []
    cpu: list[float] = []
    per_stage: dict[str, list[tuple[float, float]]] = {}    # name: [(wake-ups, CPU ms)]
    try:
        with bench._pair(args.size_mb * 256, 2, 2, args.pages * 2,
                         batch_pages=args.batch_pages or None,
                         prescan_ms=args.prescan_ms,
                         cpu_latency_us=args.cpu_latency_us) as pair:
            pair.start()
            pair.wait_protected(timeout=900)
            named = named_stage_pids(pair)
            names = {pid: name for name, pid in named.items()}
            # each stage's wake-ups and CPU without a checkpoint (heartbeats, timeouts),
            # per second
            s0, t0 = stage_counts(named), time.monotonic()
            time.sleep(2)
            s1, t1 = stage_counts(named), time.monotonic()
            idle_of = {n: [(b - a) / (t1 - t0) for a, b in zip(s0[n], s1[n])] for n in named}
            for _ in range(args.reps):
                bench.write_in_both_guests(pair, args.pages)
                count = len(pair.checkpoints())
                mark = os.path.getsize(path)
                s0, t0 = stage_counts(named), time.monotonic()
                before = in_force_now()
                pair.request_checkpoint()
                cp = pair.wait_checkpoints(count + 1, timeout=600)[-1]
                s1, dt = stage_counts(named), time.monotonic() - t0
                # the machine's limit around this checkpoint (any process may hold it)
                in_force.append((before, in_force_now()))
                took = {n: (s1[n][0] - s0[n][0] - idle_of[n][0] * dt,
                            (s1[n][1] - s0[n][1] - idle_of[n][1] * dt) / 1e6) for n in named}
                for n, v in took.items():
                    per_stage.setdefault(n, []).append(v)
                woke.append(sum(v[0] for v in took.values()))
                cpu.append(sum(v[1] for v in took.values()))
                marks.append((mark, cp))
        with open(path) as fh:
            text = fh.read()
    finally:
        os.unlink(path)
    waits: dict[str, list[float]] = {}
    handoffs: list[int] = []
    maps = []
    ends = [m for m, _ in marks[1:]] + [len(text)]
    for (mark, cp), limit, end in zip(marks, in_force, ends):
        ms = {k: cp.get(f"{k}_ns", 0) / 1e6 for k in ("commit", "transfer", "apply", "ack")}
        evs = events(text[mark:].splitlines(), ms["commit"])
        if args.cpu:
            maps.append(cpu_map(text[mark:end].splitlines(), names))
        for label, took in hops(evs).items():
            waits.setdefault(label, []).extend(took)
        # hand-offs: how often the next event in time is another process's
        who = [w for _t, w, _n, _e, _d in evs if _t <= ms["commit"]]
        handoffs.append(sum(a != b for a, b in zip(who, who[1:])))
        print(f"--- epoch {cp['epoch']}: {cp['pages_dirty']} dirty pages, commit "
              f"{ms['commit']:.2f} ms = pause {cp['pvm_pause_ns'] / 1e6:.2f} + transfer "
              f"{ms['transfer']:.2f} + apply {ms['apply']:.2f} + ACK {ms['ack']:.2f}; "
              f"{len(set(who))} processes, {handoffs[-1]} hand-offs; CPU wake-up latency "
              f"limit in force before/after {limit[0]}/{limit[1]} us")
        if args.raw:
            for at, who, event, epoch, detail in events(text[mark:].splitlines(), ms["commit"]):
                print(f"  {at:8.2f} {who:12s} {event:16s} {epoch:>5s} {detail}")
            continue
        for who, event, first, last, n in timeline(text[mark:].splitlines(), ms["commit"]):
            print(f"  {who:12s} {event:16s} {first:8.2f} {last:8.2f}  x{n}")
    print("hops over all checkpoints, ms (median, max, count):")
    for label, took in waits.items():
        print(f"  {label:36s} {statistics.median(took):7.2f} {max(took):7.2f}  x{len(took)}")
    if handoffs:
        print(f"hand-offs per checkpoint (median): {statistics.median(handoffs):g}")
    if woke:
        print(f"stage wake-ups per checkpoint (voluntary context switches of both nodes' "
              f"stage threads, less their idle rate; median, min, max): "
              f"{statistics.median(woke):.0f} {min(woke):.0f} {max(woke):.0f}")
        print(f"stage CPU per checkpoint, ms (both nodes' stage threads, less their idle "
              f"rate; median, min, max): {statistics.median(cpu):.2f} {min(cpu):.2f} "
              f"{max(cpu):.2f}")
    if args.by_stage and per_stage:
        print("per stage process, per checkpoint (median): wake-ups, CPU ms")
        for n, vals in sorted(per_stage.items(), key=lambda kv: -statistics.median(
                v[1] for v in kv[1])):
            print(f"  {n:28s} {statistics.median(v[0] for v in vals):6.1f} "
                  f"{statistics.median(v[1] for v in vals):7.2f}")
    if args.cpu:
        print_cpu_map(maps)
    held = sum(a == b == 0 for a, b in in_force)
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU wake-up "
          f"latency limit asked {args.cpu_latency_us}: 0 in force around {held} of "
          f"{len(in_force)} checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
