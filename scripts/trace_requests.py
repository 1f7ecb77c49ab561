#!/usr/bin/env python3
"""Where a protected service's slow requests wait: per-request timelines from a request
trace (``COLO_REQUEST_TRACE=file``, pipeline/trace.py; ``scripts/bench_service.py
--trace-requests PREFIX`` writes one per mode).

Each request of the sim service is followed by its input seq through the hops it takes:

    client_due    the client's request was due (its latency counts from here)
    client_sent   the client handed it to the socket (late: the client waited for a CPU)
    pvm_fed       the primary's client stage fed it to the PVM
    pvm_begin     the PVM started it            pvm_emit   the PVM wrote its answer
    pvm_out       the client stage handed the PVM's answer to the comparator
    mirrored      the client stage sent it to the secondary
    svm_recv      the secondary's mirror stage took it off the wire
    svm_fed       the mirror fed it to the SVM
    svm_begin     the SVM started it            svm_emit   the SVM wrote its answer
    svm_out       the mirror handed the SVM's answer to the comparator
    client_got    the released answer reached the client

and the guests' pauses (checkpoints). For all requests and for the slowest 1 % it prints
each hop's median and 90th percentile, which side's answer reached the comparator last,
how many slow requests overlapped a pause of either guest, when in the row they came (by
second), and the slowest requests' timelines. Then the split (:func:`split`): for all requests and for those at or above the
95th and the 99th percentile, the mean ms of each segment of their critical path
(:data:`PATH`) and what each one waited for most (a checkpoint, the guest busy with an
earlier request, a guest that woke late, ...). The clock is CLOCK_MONOTONIC, one for
every process of the machine.

    scripts/trace_requests.py FILE [--slowest 0.01] [--show 10] [--json]
"""
from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import Counter, defaultdict

#: hops in path order: (name, from event, to event)
HOPS = (
    ("client->pvm_fed", "client_due", "pvm_fed"),
    ("client_due->client_sent", "client_due", "client_sent"),
    ("client_sent->pvm_fed", "client_sent", "pvm_fed"),
    ("pvm_fed->pvm_begin", "pvm_fed", "pvm_begin"),
    ("pvm_begin->pvm_emit", "pvm_begin", "pvm_emit"),
    ("pvm_emit->pvm_out", "pvm_emit", "pvm_out"),
    ("pvm_fed->mirrored", "pvm_fed", "mirrored"),
    ("mirrored->svm_recv", "mirrored", "svm_recv"),
    ("svm_recv->svm_fed", "svm_recv", "svm_fed"),
    ("svm_fed->svm_begin", "svm_fed", "svm_begin"),
    ("svm_begin->svm_emit", "svm_begin", "svm_emit"),
    ("svm_emit->svm_out", "svm_emit", "svm_out"),
    ("last_out->client_got", "last_out", "client_got"),
)
#: the whole way of each side's copy, from the request being due
SIDES = (("pvm_out", "client_due", "pvm_out"), ("svm_out", "client_due", "svm_out"),
         ("svm_lag", "pvm_out", "svm_out"))


#: a request's critical path: from the request being due to its answer at the client, over
#: the copy whose answer reached the comparator last (the one the release waited for),
#: in consecutive segments that add up to its latency:
#:   client       due -> client_sent: the client process getting to send it (it shares the
#:                CPUs with the nodes; a real client is on another machine)
#:   inject       client_sent -> pvm_fed: client-inputs.sock and the client stage taking it
#:                (traces without client_sent: client is due -> pvm_fed, inject 0)
#:   mirror       pvm_fed -> svm_fed: the inputs channel and the mirror (0 on the PVM's copy)
#:   guest_queue  fed -> begin: waiting for the guest (busy with earlier requests, paused,
#:                or not yet woken / not on a CPU)
#:   guest_work   begin -> emit: the guest's work (and any CPU it lost meanwhile)
#:   answer_out   emit -> out: the stage reading the answer and handing it to the comparator
#:   release      out -> client_got: the comparator's match and release, the client's read
PATH = ("client", "inject", "mirror", "guest_queue", "guest_work", "answer_out", "release")


def critical_path(reqs: dict[int, dict[str, int]], seq: int) -> dict[str, float] | None:
    """ms of each :data:`PATH` segment of request ``seq`` (None if a stamp is missing),
    with ``side`` (the copy that came last) and ``behind`` (True: the guest was still
    busy with an earlier request when this one was fed, so its guest_queue was a queue)."""
    ev = reqs[seq]
    side = "svm" if ev.get("svm_out", 0) > ev.get("pvm_out", 0) else "pvm"
    fed = f"{side}_fed"
    sent = ev.get("client_sent", ev.get("pvm_fed"))
    stamps = ["client_due", "client_sent", "pvm_fed", fed, f"{side}_begin", f"{side}_emit",
              f"{side}_out", "client_got"]
    if any(s not in ev for s in stamps if s != "client_sent") or sent is None:
        return None
    ev = {**ev, "client_sent": min(max(sent, ev["client_due"]), ev["pvm_fed"])}
    out: dict = {name: max(0.0, (ev[b] - ev[a]) / 1e6)
                 for name, a, b in zip(PATH, stamps, stamps[1:])}
    prev = reqs.get(seq - 1, {})
    out["side"] = side
    out["behind"] = prev.get(f"{side}_emit", 0) > ev[fed]
    return out


def _side(who: str) -> str:
    """A guest's records name it (guest:NAME, NAME from the node): primary or secondary."""
    return "svm" if "secondary" in who else "pvm"


def load(path: str) -> tuple[dict[int, dict[str, int]], dict[str, list[tuple[int, int]]]]:
    """(seq -> event -> ns, first occurrence) and each guest's pauses as (start, end) ns."""
    reqs: dict[int, dict[str, int]] = defaultdict(dict)
    pauses: dict[str, list[tuple[int, int]]] = {"pvm": [], "svm": []}
    paused_at: dict[str, int] = {}
    rows = []
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) != 4:
                continue
            rows.append((int(parts[0]), parts[1], parts[2], int(parts[3])))
    rows.sort()
    for ns, who, event, seq in rows:
        if event.startswith("guest_"):
            side = _side(who)
            kind = event[6:]
            if kind == "paused":
                paused_at[side] = ns
                continue
            if kind == "resumed":
                if side in paused_at:
                    pauses[side].append((paused_at.pop(side), ns))
                continue
            event = f"{side}_{kind}"
        reqs[seq].setdefault(event, ns)
    return reqs, pauses


def backlog_episodes(reqs: dict[int, dict[str, int]], pauses: list[tuple[int, int]],
                     side: str) -> dict[int, tuple[int, int, bool]]:
    """seq -> (start ns, inputs behind at most, a pause of the guest in it) of the episode
    in which ``side``'s guest got input ``seq``: a stretch during which that guest had
    inputs fed and not yet answered. A slow request in an episode that began with a pause
    waited for a checkpoint (and the catch-up after it); in one without, the guest fell
    behind while it ran (it had too little CPU, or it stalled)."""
    fed, emit = f"{side}_fed", f"{side}_emit"
    points = sorted([(ev[fed], 1, seq) for seq, ev in reqs.items() if fed in ev]
                    + [(ev[emit], -1, seq) for seq, ev in reqs.items() if emit in ev])
    starts = [s for s, _ in pauses]
    out: dict[int, tuple[int, int, bool]] = {}
    members: list[int] = []
    pending, start, peak = 0, 0, 0

    def close(end: int) -> None:
        paused = bool(members) and _overlaps(pauses, starts, start, end) > 0
        for seq in members:
            out[seq] = (start, peak, paused)
        members.clear()
    for ns, step, seq in points:
        if step > 0:
            if pending <= 0:
                close(ns)
                start, peak, pending = ns, 0, 0
            members.append(seq)
        pending += step
        peak = max(peak, pending)
    close(points[-1][0] if points else 0)
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))], 3)


def _overlaps(pauses: list[tuple[int, int]], starts: list[int], a: int, b: int) -> float:
    """ms of [a, b] during which the guest was paused."""
    i = max(0, bisect.bisect_right(starts, a) - 1)
    total = 0
    while i < len(pauses) and pauses[i][0] < b:
        s, e = pauses[i]
        total += max(0, min(b, e) - max(a, s))
        i += 1
    return total / 1e6


def analyse(path: str, slowest: float = 0.01, show: int = 10) -> dict:
    reqs, pauses = load(path)
    starts = {side: [s for s, _ in p] for side, p in pauses.items()}
    done = []
    for seq, ev in reqs.items():
        if "client_due" not in ev or "client_got" not in ev:
            continue
        if "pvm_out" in ev or "svm_out" in ev:
            ev["last_out"] = max(ev.get("pvm_out", 0), ev.get("svm_out", 0))
        done.append((ev["client_got"] - ev["client_due"], seq))
    done.sort()
    if not done:
        return {"requests": 0}
    cut = max(1, int(round(len(done) * slowest)))
    slow = [seq for _, seq in done[-cut:]]
    out: dict = {"requests": len(done), "slow": len(slow),
                 "slow_from_ms": round(done[-cut][0] / 1e6, 3),
                 "pauses": {side: len(p) for side, p in pauses.items()},
                 "pause_ms_p50": {side: _pct([(e - s) / 1e6 for s, e in p], 0.5)
                                  for side, p in pauses.items()}}
    for name, seqs in (("all", [seq for _, seq in done]), ("slowest", slow)):
        hops = {}
        for hop, a, b in HOPS + SIDES:
            vals = [(reqs[s][b] - reqs[s][a]) / 1e6 for s in seqs
                    if a in reqs[s] and b in reqs[s]]
            hops[hop] = {"p50": _pct(vals, 0.5), "p90": _pct(vals, 0.9), "n": len(vals)}
        svm_last = sum(1 for s in seqs if reqs[s].get("svm_out", 0) > reqs[s].get("pvm_out", 0))
        in_pause = {side: sum(1 for s in seqs if _overlaps(
            pauses[side], starts[side], reqs[s]["client_due"], reqs[s]["client_got"]) > 0)
            for side in pauses}
        out[name] = {"hops_ms": hops, "svm_answer_last": svm_last, "n": len(seqs),
                     "overlapping_a_pause": in_pause}
    timelines = []
    for seq in slow[::-1][:show]:
        ev = reqs[seq]
        t0 = ev["client_due"]
        line = {e: round((ns - t0) / 1e6, 2) for e, ns in sorted(ev.items(), key=lambda x: x[1])
                if e != "last_out"}
        line["seq"] = seq
        line["pvm_paused_ms"] = round(_overlaps(pauses["pvm"], starts["pvm"], t0,
                                                ev["client_got"]), 2)
        line["svm_paused_ms"] = round(_overlaps(pauses["svm"], starts["svm"], t0,
                                                ev["client_got"]), 2)
        timelines.append(line)
    out["slowest_timelines"] = timelines
    # which guest's backlog each slow request sat in, and whether a checkpoint began it
    episodes = {side: backlog_episodes(reqs, pauses[side], side) for side in ("pvm", "svm")}
    why: dict[str, int] = defaultdict(int)
    for seq in slow:
        ev = reqs[seq]
        side = "svm" if ev.get("svm_out", 0) > ev.get("pvm_out", 0) else "pvm"
        ep = episodes[side].get(seq)
        if ep is None:
            why[f"{side}: no backlog"] += 1
        else:
            why[f"{side} behind after a pause" if ep[2] else f"{side} behind, no pause"] += 1
    out["slow_causes"] = dict(why)
    # when in the row they came, by whole seconds since its first request was due: the
    # slow 1 % of a loaded machine comes in bursts of a second or less, and a row begun
    # while a stage was still starting shows them in its first second (session 18: the
    # comparator loading its native rounds)
    first = min(reqs[s]["client_due"] for _, s in done)
    out["slow_by_second"] = dict(sorted(Counter(
        int((reqs[s]["client_due"] - first) // 1_000_000_000) for s in slow).items()))
    peaks = {}
    for side in ("pvm", "svm"):
        eps = {}
        for start, peak, paused in episodes[side].values():
            eps[start] = (peak, paused)
        peaks[side] = {"episodes_behind_10": sum(1 for p, _ in eps.values() if p >= 10),
                       "with_pause": sum(1 for p, z in eps.values() if p >= 10 and z),
                       "max_behind": max((p for p, _ in eps.values()), default=0)}
    out["backlog"] = peaks
    out["split"] = split(reqs, pauses, done)
    return out


def classify(reqs: dict[int, dict[str, int]], pauses: dict[str, list[tuple[int, int]]],
             seqs) -> dict[int, tuple[dict[str, float], bool, str, str]]:
    """seq -> (its :func:`critical_path`, whether it overlapped a pause, its cause, the
    checkpoint's phase or ""), for each of ``seqs`` with a whole critical path. The cause:
    ``checkpoint`` if it overlapped a pause of either guest (phase ``pvm_paused`` if the
    PVM's pause was in it, else ``svm_paused``: only the SVM's was, from the primary's
    BEGIN until its pages were written and it resumed); ``catch_up`` if its guest was
    still busy with an earlier request, in a backlog a pause began
    (:func:`backlog_episodes`); else its longest segment (``guest_queue`` as
    ``behind_request`` when the guest was busy with an earlier one, ``guest_wake`` when
    it was not)."""
    starts = {side: [s for s, _ in p] for side, p in pauses.items()}
    episodes = {side: backlog_episodes(reqs, pauses[side], side) for side in ("pvm", "svm")}
    out = {}
    for seq in seqs:
        path = critical_path(reqs, seq)
        if path is None:
            continue
        ev = reqs[seq]
        overlap = {side: _overlaps(pauses[side], starts[side], ev["client_due"],
                                   ev["client_got"]) > 0 for side in pauses}
        ep = episodes[path["side"]].get(seq)
        phase = ""
        if any(overlap.values()):
            cause = "checkpoint"
            phase = "pvm_paused" if overlap.get("pvm") else "svm_paused"
        elif path["behind"] and ep is not None and ep[2]:
            cause = "catch_up"
        else:
            cause = max(PATH, key=lambda k: path[k])
            if cause == "guest_queue":
                cause = "behind_request" if path["behind"] else "guest_wake"
        out[seq] = (path, bool(phase), cause, phase)
    return out


def split(reqs: dict[int, dict[str, int]], pauses: dict[str, list[tuple[int, int]]],
          done: list[tuple[int, int]]) -> dict:
    """Where the time of all requests, of those at or above the 95th and of those at or
    above the 99th percentile went: the mean ms of each :data:`PATH` segment; how many
    of them the SVM's copy came last for, overlapped a pause of either guest (a
    checkpoint), found their guest busy with an earlier request; and how many had each
    cause (:func:`classify`), the checkpoints' by phase."""
    each = classify(reqs, pauses, [seq for _, seq in done])
    out = {}
    for name, q in (("all", 0.0), ("p95", 0.95), ("p99", 0.99)):
        cut = min(len(done) - 1, int(q * len(done)))
        rows, causes, phases = [], defaultdict(int), defaultdict(int)
        for _, seq in done[cut:]:
            if seq not in each:
                continue
            path, paused, cause, phase = each[seq]
            rows.append((path, paused))
            causes[cause] += 1
            if phase:
                phases[phase] += 1
        n = len(rows)
        out[name] = {
            "from_ms": round(done[cut][0] / 1e6, 3), "n": n,
            "mean_ms": {k: round(sum(p[k] for p, _ in rows) / n, 3) if n else None
                        for k in PATH},
            "svm_last": sum(1 for p, _ in rows if p["side"] == "svm"),
            "in_pause": sum(1 for _, z in rows if z),
            "behind_request": sum(1 for p, _ in rows if p["behind"]),
            "causes": dict(sorted(causes.items(), key=lambda kv: -kv[1])),
            "checkpoint_phase": dict(phases)}
    return out


def report(res: dict, out=sys.stdout) -> None:
    if not res.get("requests"):
        print("no request with both client_due and client_got in the trace", file=out)
        return
    print(f"{res['requests']} requests; the slowest {res['slow']} took >= "
          f"{res['slow_from_ms']} ms; guest pauses {res['pauses']} (p50 ms "
          f"{res['pause_ms_p50']})", file=out)
    print(f"{'hop (ms)':<24}{'all p50':>9}{'all p90':>9}{'slow p50':>10}{'slow p90':>10}",
          file=out)
    for hop, _, _ in HOPS + SIDES:
        a, s = res["all"]["hops_ms"][hop], res["slowest"]["hops_ms"][hop]
        print(f"{hop:<24}{a['p50']!s:>9}{a['p90']!s:>9}{s['p50']!s:>10}{s['p90']!s:>10}",
              file=out)
    for name in ("all", "slowest"):
        r = res[name]
        print(f"{name}: the SVM's answer reached the comparator last for {r['svm_answer_last']}"
              f" of {r['n']}; overlapping a guest pause: {r['overlapping_a_pause']}", file=out)
    print(f"slow requests by cause: {res['slow_causes']}; backlogs (>= 10 inputs behind): "
          f"{res['backlog']}", file=out)
    print(f"slow requests by second of the row (since its first request was due): "
          f"{res['slow_by_second']}", file=out)
    print("where the time went (critical path: the copy the release waited for), mean ms:",
          file=out)
    print(f"{'':<5}{'n':>7}{'from':>10}" + "".join(f"{k:>12}" for k in PATH)
          + "  svm_last in_pause behind", file=out)
    for name, r in res["split"].items():
        print(f"{name:<5}{r['n']:>7}{r['from_ms']:>10}"
              + "".join(f"{r['mean_ms'][k]!s:>12}" for k in PATH)
              + f"  {r['svm_last']:>8} {r['in_pause']:>8} {r['behind_request']:>6}", file=out)
    for name in ("p95", "p99"):
        print(f"{name} causes: {res['split'][name]['causes']}; the checkpoint ones by phase: "
              f"{res['split'][name]['checkpoint_phase']}", file=out)
    print("slowest requests (ms from due):", file=out)
    for t in res["slowest_timelines"]:
        print("  " + " ".join(f"{k}={v}" for k, v in t.items()), file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="a COLO_REQUEST_TRACE file")
    p.add_argument("--slowest", type=float, default=0.01, help="share of requests called slow")
    p.add_argument("--show", type=int, default=10, help="timelines of this many slowest")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    res = analyse(args.trace, args.slowest, args.show)
    if args.json:
        print(json.dumps(res))
    else:
        report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
