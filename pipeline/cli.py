"""The ``colo-pipeline`` launcher.

Exit codes: 0 success; 1 the node failed while running (a stage died, the peer broke
the protocol, the demo's memory check failed); 2 bad command line or bad config
(nothing was started).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pipeline import __version__, config

log = logging.getLogger("pipeline.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, process, logger, message, and the epoch
    when the event belongs to one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname,
               "process": record.processName, "logger": record.name,
               "msg": record.getMessage()}
        if hasattr(record, "epoch"):
            out["epoch"] = record.epoch
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _load(path: str, role: str | None = None) -> config.Settings:
    settings = config.load(path)
    if role is not None and settings.node.role != role:
        raise config.ConfigError(path, "node.role", f"is {settings.node.role!r} but this "
                                 f"command runs a {role}", repr(role))
    return settings


# -- primary / secondary -------------------------------------------------------------
def cmd_node(args: argparse.Namespace) -> int:
    settings = _load(args.config, args.command)
    from pipeline.supervisor import Supervisor
    sup = Supervisor(settings)
    try:
        code = sup.run()
    except OSError as exc:      # e.g. the metrics port is taken: say so, no traceback
        print(f"colo-pipeline {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if code:
        print(f"colo-pipeline {args.command}: {sup.exit_reason}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    """Run the node its config describes (node.role); what the systemd unit runs."""
    args.command = _load(args.config).node.role
    return cmd_node(args)


def cmd_keygen(args: argparse.Namespace) -> int:
    from pipeline.sockets import write_keypair
    public, secret = write_keypair(args.dir, args.name)
    print(f"wrote {public} (give it to the peer: security.peer_public_key_file)")
    print(f"wrote {secret} (mode 0600, keep it on this host: security.key_file)")
    return EXIT_OK


def cmd_xen_twin(args: argparse.Namespace) -> int:
    """Make this host's half of a Xen twin pair (pipeline.xen_io.twin) from the node config."""
    from pipeline.xen_io.twin import TwinError, restore, save_and_restore
    settings = _load(args.config)
    g = settings.guest
    if g.backend != "xen":
        raise config.ConfigError(args.config, "guest.backend", f"is {g.backend!r}; xen-twin "
                                 "pairs Xen domains", "backend = \"xen\"")
    base = os.path.dirname(os.path.abspath(args.config))
    paths = {}
    for key in ("domain", "xen_image", "xen_domain_config"):
        value = getattr(g, key)
        if not value:
            raise config.ConfigError(args.config, f"guest.{key}", "missing for xen-twin",
                                     "the domain's name" if key == "domain" else "a file path")
        paths[key] = value if key == "domain" or os.path.isabs(value) else os.path.join(base, value)
    try:
        if args.action == "save":
            domid = save_and_restore(paths["domain"], paths["xen_image"], paths["xen_domain_config"])
            print(f"saved {paths['domain']} to {paths['xen_image']} and restored it (domain {domid}); "
                  "restore the same image on the secondary host: colo-pipeline xen-twin restore")
        else:
            domid = restore(paths["xen_image"], paths["xen_domain_config"], paths["domain"])
            print(f"restored {paths['xen_image']} as {paths['domain']} (domain {domid})")
    except TwinError as exc:
        print(f"colo-pipeline xen-twin {args.action}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    print(f"{args.config}: ok ({settings.node.role} {settings.node.name!r}, "
          f"{settings.guest.backend} guest)")
    return EXIT_OK


# -- stats --------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def summarize(snapshot: dict) -> dict:
    """Figures a person (or a script) wants from a node's counters."""
    from pipeline.checkpoint_api import CAUSES
    cps = [c for c in snapshot["checkpoints"] if c["status"] == 0]
    pauses = [c["pvm_pause_ns"] / 1e6 for c in cps if c["pvm_pause_ns"]]
    commits = [c["commit_ns"] / 1e6 for c in cps if c["commit_ns"]]
    # the split of each commit (pause, transfer, apply, ACK): p50 of each part
    split = {part: round(_percentile([c.get(f"{part}_ns", 0) / 1e6 for c in cps
                                      if c["commit_ns"]], 50), 3)
             for part in ("transfer", "apply", "ack")}
    causes: dict[str, int] = {}
    for c in snapshot["checkpoints"]:
        name = CAUSES[c["cause"]] if c["cause"] < len(CAUSES) else str(c["cause"])
        causes[name] = causes.get(name, 0) + 1
    return {
        "checkpoints": len(cps),
        "aborted": sum(1 for c in snapshot["checkpoints"] if c["status"] != 0),
        "causes": causes,
        "pause_ms_p50": round(_percentile(pauses, 50), 3),
        "pause_ms_p99": round(_percentile(pauses, 99), 3),
        "commit_ms_p50": round(_percentile(commits, 50), 3),
        "commit_ms_p99": round(_percentile(commits, 99), 3),
        **{f"{part}_ms_p50": v for part, v in split.items()},
        "pages_dirty": sum(c["pages_dirty"] for c in cps),
        "pages_sent": sum(c["pages_sent"] for c in cps),
        "pages_skipped_hash": sum(c["pages_skipped_hash"] for c in cps),
        "pages_zero": sum(c["pages_zero"] for c in cps),
        "bytes_sent": sum(c["bytes_wire"] for c in snapshot["checkpoints"]),
        "bytes_raw": sum(c["bytes_raw"] for c in snapshot["checkpoints"]),
    }


def _stats_table(snap: dict, prev: dict | None, elapsed: float) -> str:
    """Per stage: throughput and busy/wait share over ``elapsed`` seconds (since ``prev``,
    or since the node started), ring high-water and errors; then the checkpoints."""
    def per_s(c: dict, p: dict | None, key: str) -> float:
        return (c[key] - (p[key] if p else 0)) / elapsed if elapsed > 0 else 0.0
    info = snap["info"]
    lines = [f"node {snap['node']}  " + "  ".join(f"{k}={info[k]}" for k in
                                                 ("role", "state", "epoch", "generation")
                                                 if k in info)]
    lines.append(f"{'stage':<13}{'items/s':>10}{'MB/s out':>10}{'busy %':>8}{'wait %':>8}"
                 f"{'ring hw':>8}{'errors':>8}")
    for name, c in snap["stages"].items():
        p = prev["stages"].get(name) if prev else None
        lines.append(f"{name:<13}{per_s(c, p, 'items_in') or per_s(c, p, 'items_out'):>10.0f}"
                     f"{per_s(c, p, 'bytes_out') / 1e6:>10.2f}"
                     f"{per_s(c, p, 'busy_ns') / 1e7:>8.1f}{per_s(c, p, 'wait_ns') / 1e7:>8.1f}"
                     f"{c['ring_high_water']:>8}{c['errors']:>8}")
    s = summarize(snap)
    rate = (s["checkpoints"] - (summarize(prev)["checkpoints"] if prev else 0)) / elapsed \
        if elapsed > 0 else 0.0
    lines.append(f"checkpoints {s['checkpoints']} ({rate:.1f}/s, aborted {s['aborted']})  "
                 f"causes {s['causes']}")
    lines.append(f"PVM pause p50/p99 {s['pause_ms_p50']}/{s['pause_ms_p99']} ms  commit p50/p99 "
                 f"{s['commit_ms_p50']}/{s['commit_ms_p99']} ms (p50: transfer "
                 f"{s['transfer_ms_p50']}, apply {s['apply_ms_p50']}, ACK {s['ack_ms_p50']})  "
                 f"wire {s['bytes_sent'] / 1e6:.1f} "
                 f"MB of {s['bytes_raw'] / 1e6:.1f} MB raw  pages skipped by hash "
                 f"{s['pages_skipped_hash']}, zero {s['pages_zero']}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    from pipeline.counters import NodeCounters, NodeNotRunning
    name = args.node or _load(args.config).node.name
    try:
        node = NodeCounters.attach(name)
    except NodeNotRunning as exc:
        print(f"colo-pipeline stats: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        prev, t_prev = None, node.node_info().get("started", time.time())
        while True:
            snap = node.snapshot()
            now = time.time()
            if args.json:
                snap["summary"] = summarize(snap)
                print(json.dumps(snap))
                return EXIT_OK
            if args.prometheus:
                from pipeline.metrics import render
                sys.stdout.write(render(name).decode())
                return EXIT_OK
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(_stats_table(snap, prev, now - t_prev), flush=True)
            if not args.watch:
                return EXIT_OK
            prev, t_prev = snap, now
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        node.close()


# -- demo ---------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.localpair import LocalPair, PairError
    tables = {
        # the network comparator on the primary; both guests' outputs go to it as frames
        "net": {"primary_in": "unix:{workdir}/net-pvm.sock",
                "secondary_in": "unix:{workdir}/net-svm.sock",
                "compare_timeout_ms": args.compare_timeout_ms},
        "guest": {"backend": "sim", "page_count": args.pages, "dirty_log": args.dirty_log},
        "guest.workload": {"seed": 7, "pages_per_input": args.pages_per_input,
                           "nondeterminism": args.nondeterminism,
                           "input_rate_hz": args.input_rate},
        "checkpoint": {"max_interval_ms": args.interval_ms, "min_interval_ms": 10,
                       "dirty_threshold_pages": max(64, args.pages // 4),
                       "epoch_timeout_ms": 20000},
    }
    role_tables = None
    if args.disk_mb:
        from pipeline.localpair import free_port_base
        disk = {"export_size": args.disk_mb << 20, "durable_commit": False,
                "forward": f"tcp://127.0.0.1:{free_port_base()}"}
        role_tables = {role: {"disk": {**disk, "image": f"{{workdir}}/{role}-disk.img",
                                       "export": f"unix:{{workdir}}/{role}-disk.nbd"}}
                       for role in ("primary", "secondary")}
    pair = LocalPair(tables, log_level=args.log_level, capture_logs=not args.verbose,
                     role_tables=role_tables)
    disk_driver = None
    summary: dict = {"memory_equal": False}
    code = EXIT_FAILED
    try:
        pair.start()
        if not args.json:
            print(f"primary and secondary started (configs in {pair.workdir}); full sync of "
                  f"{args.pages * 4096 / 2**20:.0f} MiB ...", flush=True)
        pair.wait_protected()
        node = pair.node("primary")
        if args.disk_mb:
            disk_driver = GuestDiskDriver(os.path.join(pair.workdir, "primary-disk.nbd"),
                                          args.disk_mb << 20)
        t_end = time.monotonic() + args.duration
        while time.monotonic() < t_end:
            pair.check_alive()
            if not args.json:
                s = summarize(node.snapshot())
                print(f"\r[{args.duration - (t_end - time.monotonic()):5.1f}s] checkpoints "
                      f"{s['checkpoints']:4d}  pause p50 {s['pause_ms_p50']:6.2f} ms  "
                      f"sent {s['bytes_sent'] / 1e6:8.2f} MB  causes {s['causes']}",
                      end="", flush=True)
            time.sleep(0.5)
        if disk_driver is not None:
            disk_driver.stop()
        # The proof: one more checkpoint where both sides hash all of guest memory while
        # paused (the PVM at its snapshot, the SVM right after applying it).
        info = pair.prove_memory_equal()
        summary = summarize(node.snapshot())
        summary.update(memory_equal=info["memory_equal"], final_epoch=info["final_epoch"],
                       pvm_digest=info["pvm_digest"], svm_digest=info["svm_digest"],
                       dirty_log=info.get("dirty_log", ""), duration_s=args.duration)
        code = EXIT_OK if info["memory_equal"] else EXIT_FAILED
        if disk_driver is not None:
            # the disk committed with that checkpoint, and nothing was written since
            images = [_file_digest(os.path.join(pair.workdir, f"{role}-disk.img"))
                      for role in ("primary", "secondary")]
            summary.update(disk_equal=images[0] == images[1], disk_writes=disk_driver.writes,
                           disk_digest=images[0])
            if not summary["disk_equal"]:
                code = EXIT_FAILED
        if args.kill_primary_after is not None and code == EXIT_OK:
            summary.update(_demo_failover(pair, args))
            code = EXIT_OK if summary.get("failover_ok") else EXIT_FAILED
    except PairError as exc:
        summary["error"] = str(exc)
        print(f"\ncolo-pipeline demo: {exc}", file=sys.stderr)
    finally:
        if disk_driver is not None:
            disk_driver.stop()
        codes = pair.stop()
        if any(codes.values()) and code == EXIT_OK:
            code = EXIT_FAILED
            summary["error"] = f"a node did not stop cleanly: exit codes {codes}"
        pair.cleanup()
    if args.json:
        print(json.dumps(summary))
    else:
        print()
        print(f"checkpoints {summary.get('checkpoints')}  causes {summary.get('causes')}  "
              f"pause p50/p99 {summary.get('pause_ms_p50')}/{summary.get('pause_ms_p99')} ms  "
              f"bytes sent {summary.get('bytes_sent')}")
        print(f"memory of SVM == PVM at the last committed checkpoint "
              f"(epoch {summary.get('final_epoch')}): {summary['memory_equal']}")
    return code


def _file_digest(path: str) -> str:
    import blake3
    with open(path, "rb") as fh:
        return blake3.blake3(fh.read()).hexdigest()


class GuestDiskDriver:
    """The demo's stand-in for the guest's disk driver: deterministic block writes to the
    PVM's NBD export from a thread (the sim guest itself has no disk)."""

    def __init__(self, socket_path: str, size: int, block: int = 4096,
                 rate_hz: float = 100.0) -> None:
        import threading
        self.path, self.size, self.block, self.period = socket_path, size, block, 1 / rate_hz
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-disk", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import random
        from pipeline.disk.nbd_client import NbdClient
        client = NbdClient(f"nbd+unix:///?socket={self.path}")
        rng = random.Random(11)
        try:
            while not self._stop.wait(self.period):
                nblocks = rng.randint(1, 16)
                offset = rng.randrange(0, self.size // self.block - nblocks) * self.block
                client.write(offset, rng.randbytes(nblocks * self.block))
                self.writes += 1
                if self.writes % 50 == 0:
                    client.flush()
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _demo_failover(pair, args: argparse.Namespace) -> dict:
    """Kill the primary node (every process, SIGKILL) and watch the secondary take over."""
    time.sleep(args.kill_primary_after)
    sec = pair.node("secondary")
    before = sec.stage("mirror").as_dict()["outputs"]
    killed_at = pair.kill("primary")
    if not args.json:
        print("\nprimary killed (SIGKILL); waiting for the secondary to take over ...",
              flush=True)
    info = pair.wait_info("role", "active", role="secondary", timeout=30)
    detect_ms = (info["failover_detected_at"] - killed_at) * 1000
    time.sleep(1.0)                       # the SVM serves on: its output keeps coming
    after = sec.stage("mirror").as_dict()
    out = {"failover_detect_ms": round(detect_ms, 1), "takeover_ms": info["takeover_ms"],
           "failover_generation": info["generation"],
           "active_outputs_after_takeover": after["outputs"] - before,
           "active_inputs_generated": after["inputs_generated"]}
    out["failover_ok"] = out["active_outputs_after_takeover"] > 0
    if not args.json:
        print(f"secondary active (generation {info['generation']}): primary loss noticed "
              f"{detect_ms:.0f} ms after the kill, SVM live {info['takeover_ms']:.0f} ms later; "
              f"{out['active_outputs_after_takeover']} outputs since")
    return out


# -- argument parsing ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="colo-pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"colo-pipeline {__version__}")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one object per line (ts, level, process, logger, msg, epoch)")
    sub = p.add_subparsers(dest="command", required=True)
    for role in ("primary", "secondary"):
        sp = sub.add_parser(role, help=f"run this host's {role} node")
        sp.add_argument("--config", required=True, help="TOML config file")
        sp.set_defaults(func=cmd_node)
    sp = sub.add_parser("run", help="run the node its config file describes (node.role); "
                        "the systemd unit runs this")
    sp.add_argument("--config", required=True, help="TOML config file")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("compare", help="the network comparator alone, a drop-in for QEMU's "
                        "colo-compare (same socket roles and framing; Xen's notify protocol)")
    from pipeline.net.standalone import add_compare_arguments, run_compare
    add_compare_arguments(sp)
    sp.set_defaults(func=run_compare)
    sp = sub.add_parser("keygen", help="write a CURVE key pair for one host")
    sp.add_argument("--dir", default=".", help="where to write the two files")
    sp.add_argument("--name", required=True, help="file name stem, e.g. the host name")
    sp.set_defaults(func=cmd_keygen)
    sp = sub.add_parser("xen-twin", help="Xen: make this host's half of a twin pair from the "
                        "node config (save+restore on the primary, restore on the secondary)")
    sp.add_argument("action", choices=["save", "restore"])
    sp.add_argument("--config", required=True, help="the node's TOML config file")
    sp.set_defaults(func=cmd_xen_twin)

    sp = sub.add_parser("check-config", help="validate a config file without starting anything")
    sp.add_argument("config")
    sp.set_defaults(func=cmd_check_config)
    sp = sub.add_parser("stats", help="print the counters of a running node")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--node", help="node name")
    g.add_argument("--config", help="the node's config file")
    sp.add_argument("--json", action="store_true", help="print one JSON object and exit")
    sp.add_argument("--prometheus", action="store_true",
                    help="print the Prometheus text exposition once and exit")
    sp.add_argument("--watch", type=float, default=0, metavar="S",
                    help="redraw every S seconds")
    sp.set_defaults(func=cmd_stats)
    sp = sub.add_parser("demo", help="a primary and a secondary with simulated guests on this "
                        "machine; ends by proving the SVM's memory equals the PVM's")
    sp.add_argument("--duration", type=float, default=10.0, help="seconds of protected running")
    sp.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    sp.add_argument("--pages", type=int, default=16384, help="guest RAM in 4 KiB pages")
    sp.add_argument("--pages-per-input", type=int, default=16)
    sp.add_argument("--input-rate", type=float, default=200.0, help="client inputs per second")
    sp.add_argument("--interval-ms", type=int, default=200, help="checkpoint.max_interval_ms")
    sp.add_argument("--nondeterminism", type=float, default=0.0)
    sp.add_argument("--dirty-log", default="auto", choices=["auto", "uffd", "bitmap"])
    sp.add_argument("--verbose", action="store_true", help="show the nodes' logs")
    sp.add_argument("--compare-timeout-ms", type=int, default=1000,
                    help="net.compare_timeout_ms: a PVM output unmatched this long requests "
                    "a checkpoint")
    sp.add_argument("--disk-mb", type=int, default=0, metavar="N",
                    help="give the guest a replicated disk of N MiB (served over NBD; a "
                    "driver thread writes to it) and check both images are equal at the end")
    sp.add_argument("--kill-primary-after", type=float, default=None, metavar="S",
                    help="after the memory proof, wait S seconds, kill the primary node with "
                    "SIGKILL and show the secondary taking over")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        return args.func(args)
    except config.ConfigError as exc:
        print(f"colo-pipeline: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
