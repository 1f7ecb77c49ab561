#!/usr/bin/env python3
"""False "peer lost" on a lossy link: heartbeat pairs over one TCP connection and over
several (``heartbeat.paths``), side by side on the same link, for a while.

Needs root: the two sides run in two network namespaces joined by
``scripts/faultnet.py``'s TUN forwarder, which drops ``--loss`` of the IP packets both
ways (seeded), so both kernels' TCP see real loss and retransmit. Every heartbeat pair
(one per ``--paths`` value, each on its own port, all on the same link at once) runs
with ``--interval-ms`` and ``--miss-count``; at the end each side's counters say how
often it declared the live peer lost, its longest silence (``max_gap_us``) and the
longest it was itself late (``max_local_pause_us``).

``python3 scripts/bench_heartbeat_loss.py --seconds 600 --loss 0.02 --paths 1 2 3
--json``: a table, and with ``--json`` one JSON object as the last line
(``{"rows": [{"paths", "false_losses", "per_hour", ...}]}``). The machine is shared:
the forwarder is a Python process, so a loaded machine adds delay of its own; the
paths compare against each other in the same run, on the same link.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import faultnet  # noqa: E402

from pipeline.counters import STAGE_COUNTERS, NodeCounters  # noqa: E402
from pipeline.failover.settings import HeartbeatSettings  # noqa: E402
from pipeline.localpair import free_port_base  # noqa: E402
from pipeline.stages import heartbeat  # noqa: E402
from pipeline.stages.common import StageContext, new_event, stage_main  # noqa: E402

FORK = multiprocessing.get_context("fork")


def _side(ns: str, ctx: StageContext, settings: HeartbeatSettings, role: str, conn) -> None:
    faultnet.enter_netns(ns)
    stage_main(ctx, lambda c: heartbeat.run(c, settings, role, conn, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--loss", type=float, default=0.02)
    ap.add_argument("--paths", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--miss-count", type=int, default=3)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_heartbeat_loss: needs root (network namespaces)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    faultnet.sweep()
    workdir = f"/tmp/bench-hb-{os.getpid()}"
    link = faultnet.NetLink("tun", {"loss": args.loss, "seed": args.seed}, workdir=workdir)
    base = free_port_base(len(args.paths))
    procs, nodes, rows = [], [], []
    try:
        for i, paths in enumerate(args.paths):
            settings = HeartbeatSettings(address=f"tcp://{link.ip['b']}:{base + i}",
                                         interval_ms=args.interval_ms,
                                         miss_count=args.miss_count, paths=paths)
            sides = {}
            for role, ns in (("secondary", link.ns["b"]), ("primary", link.ns["a"])):
                node = NodeCounters.create(f"benchhb-{os.getpid()}-{i}-{role}",
                                           {"heartbeat": STAGE_COUNTERS + heartbeat.COUNTERS})
                nodes.append(node)
                events, child = FORK.Pipe(duplex=False)
                stop = new_event()
                ctx = StageContext(f"heartbeat-{role}", node.stage("heartbeat"), stop,
                                   logging.getLogger(f"hb.{paths}.{role}"))
                p = FORK.Process(target=_side, args=(ns, ctx, settings, role, child),
                                 daemon=True)
                p.start()
                procs.append((p, stop))
                sides[role] = (node, events)
            rows.append((paths, sides))
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1.0)
            link.check_forwarder()
        out = []
        for paths, sides in rows:
            row = {"paths": paths, "false_losses": 0}
            for role, (node, _events) in sides.items():
                c = node.stage("heartbeat").as_dict()
                row[role] = {k: c[k] for k in ("peer_lost", "items_in", "hb_missed",
                                                 "hb_copies", "max_gap_us",
                                                 "max_send_gap_us", "max_local_pause_us",
                                                 "local_pauses", "max_runq_us")}
                row["false_losses"] += c["peer_lost"]
            row["per_hour"] = round(row["false_losses"] * 3600 / args.seconds, 1)
            out.append(row)
        stats = link.forwarder_stats()
    finally:
        for p, stop in procs:
            stop.set()
        for p, _stop in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for node in nodes:
            node.unlink()
            node.close()
        link.close()
    dropped = stats.get("a2b_dropped", 0) + stats.get("b2a_dropped", 0)
    packets = stats.get("a2b_packets", 0) + stats.get("b2a_packets", 0)
    print(f"{args.seconds:.0f} s at {args.loss:.1%} loss ({dropped} of {packets} packets "
          f"dropped), heartbeat every {args.interval_ms} ms, lost after {args.miss_count} "
          f"intervals (shared machine, load {os.getloadavg()[0]:.1f})")
    print(f"{'paths':>5} {'false losses':>13} {'per hour':>9} {'max gap ms (pri/sec)':>21} "
          f"{'max local pause ms':>19}")
    for r in out:
        gap = f"{r['primary']['max_gap_us'] / 1000:.0f}/{r['secondary']['max_gap_us'] / 1000:.0f}"
        pause = max(r[s]["max_local_pause_us"] for s in ("primary", "secondary")) / 1000
        print(f"{r['paths']:>5} {r['false_losses']:>13} {r['per_hour']:>9} {gap:>21} "
              f"{pause:>19.0f}")
    if args.json:
        print(json.dumps({"seconds": args.seconds, "loss": args.loss,
                          "interval_ms": args.interval_ms, "miss_count": args.miss_count,
                          "packets": packets, "dropped": dropped, "rows": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
