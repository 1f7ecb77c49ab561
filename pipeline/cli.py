"""The ``colo-pipeline`` launcher.

Exit codes: 0 success; 1 the node failed while running (a stage died, the peer broke
the protocol, the demo's memory check failed); 2 bad command line or bad config
(nothing was started).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time

from pipeline import __version__, config, counters
from pipeline.disk.progress import describe as describe_sync, describe_given_up, sync_progress

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
    from pipeline.supervisor import Supervisor, address_space_hint
    try:
        sup = Supervisor(settings)
        code = sup.run()
    except OSError as exc:      # e.g. the metrics port is taken: say so, no traceback
        # ENOMEM under a finite RLIMIT_AS: the limit, not the machine (the fault matrix's
        # rlimit-as-too-low row; the node's own allocations, before any stage runs)
        hint = address_space_hint(1 if exc.errno == errno.ENOMEM else None,
                                  "the node could not map its memory")
        print(f"colo-pipeline {args.command}: {exc}{hint}", file=sys.stderr)
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
    if settings.node.role == "auto":
        from pipeline.failover.roles import decide_role
        from pipeline.failover.witness import WitnessError
        print(f"role auto: the witness ({settings.failover.witness}, key "
              f"{settings.failover.witness_key}) decides at every start. If the peer holds "
              f"the active role this node becomes its secondary and listens on "
              f"{settings.node.listen}; otherwise it runs the guest as primary and connects "
              f"to the peer's {settings.peer.address}. After a takeover the survivor becomes "
              "the primary; start the lost host again with this same file.")
        if settings.disk.enabled:
            from pipeline.failover.roles import disk_forward_address
            print(f"disk {settings.disk.image}: forwarded writes go to the secondary at "
                  f"{disk_forward_address(settings.peer.address)} (this host, as secondary: "
                  f"{disk_forward_address(settings.node.listen)}). After a takeover the "
                  "survivor's disk is the primary's; a host that comes back with its image "
                  "gets only the MiBs that differ (an image of another lineage: a full "
                  "sync).")
        if settings.net.primary_in and not settings.net.secondary_in:
            from pipeline.failover.roles import net_secondary_address
            print(f"comparator: while this host is the primary it takes the SVM's frames at "
                  f"{net_secondary_address(settings.node.listen)} and releases answers to "
                  f"net.outdev {settings.net.outdev or '(none)'}; while secondary its SVM's "
                  f"go to {net_secondary_address(settings.peer.address)}. After a takeover "
                  "the survivor's guest output goes to its own comparator, which passes it "
                  "through to net.outdev until a secondary joins.")
        if settings.net.redirector_in:
            from pipeline.failover.roles import redirector_command
            who = ("this node runs it while it is the secondary: " + " ".join(
                redirector_command(settings)[1:]) if settings.net.redirector_by_node
                   else "the operator runs it while this host is the secondary")
            print(f"redirector (a real guest NIC): {who}. After a takeover this host's "
                  f"comparator takes the guest's frames at net.redirector_in "
                  f"{settings.net.redirector_in}, and a new secondary gets the carried "
                  f"offsets ({settings.net.redirector_offsets or 'none: no file set'}) with "
                  "the full sync.")
        try:
            role, why = decide_role(settings, wait=False)
            print(f"started now, it would run as {role}: {why}")
        except (WitnessError, ValueError) as exc:
            print(f"the witness cannot be asked now: {exc}")
    return EXIT_OK


# -- stats --------------------------------------------------------------------------
def _cpu_latency_line(wake: dict, pid: int | None) -> str:
    """What the node asked at start, beside the machine's value in force now (read when
    stats runs: another process may hold less, or the node may have lost its hold)."""
    from pipeline import cpu_latency
    device = wake.get("device", cpu_latency.DEVICE)
    try:
        now, unreadable = cpu_latency.in_force_us(device), ""
    except OSError as exc:
        now, unreadable = None, f"cannot read {device}: {exc.strerror or exc}"
    still = cpu_latency.holds(pid, device) if wake.get("held") and pid else None
    return cpu_latency.describe(wake, now, unreadable, still)


def _stats_table(snap: dict, prev: dict | None, elapsed: float) -> str:
    """Per stage: throughput and busy/wait share over ``elapsed`` seconds (since ``prev``,
    or since the node started), ring high-water and errors; then the checkpoints."""
    def per_s(c: dict, p: dict | None, key: str) -> float:
        return (c[key] - (p[key] if p else 0)) / elapsed if elapsed > 0 else 0.0
    info = snap["info"]
    lines = [f"node {snap['node']}  " + "  ".join(f"{k}={info[k]}" for k in
                                                 ("role", "state", "epoch", "generation")
                                                 if k in info)]
    wake = info.get("cpu_latency")      # node.cpu_latency_us (pipeline/cpu_latency.py)
    if wake:
        lines.append(_cpu_latency_line(wake, info.get("pid")))
    for h in info.get("role_history", [])[-6:]:
        when = time.strftime("%H:%M:%S", time.localtime(h.get("at", 0)))
        extra = "".join(f"  {k}={h[k]}" for k in ("takeover_ms", "reprotected_ms") if k in h)
        lines.append(f"  {when} {h.get('role', '?'):<9} generation {h.get('generation', 0)}"
                     f"  {h.get('cause', '')}{extra}")
    lines.append(f"{'stage':<13}{'items/s':>10}{'MB/s out':>10}{'busy %':>8}{'wait %':>8}"
                 f"{'ring hw':>8}{'errors':>8}")
    for name, c in snap["stages"].items():
        p = prev["stages"].get(name) if prev else None
        lines.append(f"{name:<13}{per_s(c, p, 'items_in') or per_s(c, p, 'items_out'):>10.0f}"
                     f"{per_s(c, p, 'bytes_out') / 1e6:>10.2f}"
                     f"{per_s(c, p, 'busy_ns') / 1e7:>8.1f}{per_s(c, p, 'wait_ns') / 1e7:>8.1f}"
                     f"{c['ring_high_water']:>8}{c['errors']:>8}")
    s = counters.summarize(snap)
    rate = (s["checkpoints"] - (counters.summarize(prev)["checkpoints"] if prev else 0)) / elapsed \
        if elapsed > 0 else 0.0
    lines.append(f"checkpoints {s['checkpoints']} ({rate:.1f}/s, aborted {s['aborted']})  "
                 f"causes {s['causes']}")
    snap_c = snap["stages"].get("snapshot", {})
    if snap_c.get("checkpoints_dealt"):
        # one batch per digest worker is the aim (snapshot.checkpoint_batch); many more
        # means many hand-offs on every commit's path (a prescan bug of session 17)
        n, m = snap_c["checkpoint_batches"], snap_c["checkpoints_dealt"]
        lines.append(f"batches to the digest workers per checkpoint {n / m:.1f} ({n} in {m} "
                     f"checkpoints)")
    lines.append(f"PVM pause p50/p99 {s['pause_ms_p50']}/{s['pause_ms_p99']} ms  commit p50/p99 "
                 f"{s['commit_ms_p50']}/{s['commit_ms_p99']} ms (p50: transfer "
                 f"{s['transfer_ms_p50']}, apply {s['apply_ms_p50']}, ACK {s['ack_ms_p50']})  "
                 f"wire {s['bytes_sent'] / 1e6:.1f} "
                 f"MB of {s['bytes_raw'] / 1e6:.1f} MB raw  pages skipped by hash "
                 f"{s['pages_skipped_hash']}, held by the SVM {s['pages_same_as_svm']}, zero "
                 f"{s['pages_zero']}")
    hb = snap["stages"].get("heartbeat")
    if hb is not None and "max_send_gap_us" in hb:
        lines.append(f"heartbeat: longest gap heard {hb['max_gap_us'] / 1000:.0f} ms, sent "
                     f"{hb['max_send_gap_us'] / 1000:.0f} ms; this process late by up to "
                     f"{hb['max_local_pause_us'] / 1000:.0f} ms ({hb['local_pauses']} times, "
                     f"waited for a CPU up to {hb['max_runq_us'] / 1000:.0f} ms); peer lost "
                     f"{hb['peer_lost']}, back {hb['peer_back']}")
    disk_sync = sync_progress(snap["stages"].get("disk", {}))
    if disk_sync is not None:
        lines.append(describe_sync(disk_sync))
    if info.get("disk_given_up"):
        lines.append(describe_given_up(info["disk_given_up"]))
    if "net_added_ms_p50" in s:
        lines.append(f"comparator: {s['net_frames_released']} frames released, added latency "
                     f"p50/p99 <= {s['net_added_ms_p50']}/{s['net_added_ms_p99']} ms")
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
                snap["summary"] = counters.summarize(snap)
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
    from pipeline.demo import run_demo
    return EXIT_OK if run_demo(args) else EXIT_FAILED


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
    from pipeline.demo import add_demo_arguments
    add_demo_arguments(sp)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    # a native crash of the node (its supervisor) or the demo names its Python frames in
    # the log; the stages it forks enable it again themselves (stage_main)
    from pipeline.signals import report_fatal_signals
    report_fatal_signals()
    try:
        return args.func(args)
    except config.ConfigError as exc:
        print(f"colo-pipeline: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
