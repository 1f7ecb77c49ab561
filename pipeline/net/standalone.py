"""``colo-pipeline compare``: the comparator alone, a drop-in for QEMU's colo-compare.

Same socket roles as the colo-compare object: ``--primary-in``, ``--secondary-in``
and ``--outdev`` carry frames in QEMU's socket framing, ``--notify-dev`` speaks
Xen's notify protocol. Each ``tcp:HOST:PORT`` / ``unix:PATH`` address listens and
accepts one peer (like a ``server=on`` chardev). ``packet:IFNAME`` and
``pcap:PATH`` work too, and ``--client-in/--primary-out/--secondary-out`` mirror
client input to both guests (with ``--rewrite-secondary``, through the TCP
sequence rewriter).

Run it as ``python3 -m pipeline.net.standalone ...`` as well.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from pipeline.net.control import NoControl, XenNotify
from pipeline.net.loop import CompareLoop, tune_gc
from pipeline.net.settings import NetSettings

log = logging.getLogger(__name__)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``colo-pipeline compare``."""
    defaults = NetSettings()
    parser.add_argument("--primary-in", required=True, metavar="ADDR",
                        help="PVM frames (tcp:HOST:PORT, unix:PATH, packet:IFNAME, pcap:PATH)")
    parser.add_argument("--secondary-in", required=True, metavar="ADDR", help="SVM frames")
    parser.add_argument("--outdev", required=True, metavar="ADDR",
                        help="released PVM frames go here")
    parser.add_argument("--notify-dev", metavar="ADDR",
                        help="Xen notify channel (DO_CHECKPOINT / COLO_CHECKPOINT)")
    parser.add_argument("--vnet-hdr", action="store_true",
                        help="frames carry a vnet header length (QEMU vnet_hdr_support)")
    parser.add_argument("--compare-timeout-ms", type=int, default=defaults.compare_timeout_ms)
    parser.add_argument("--expired-scan-ms", type=int, default=defaults.expired_scan_ms)
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections)
    parser.add_argument("--max-queue-frames", type=int, default=defaults.max_queue_frames)
    parser.add_argument("--client-in", default="", metavar="ADDR",
                        help="client frames to mirror to both guests")
    parser.add_argument("--primary-out", default="", metavar="ADDR",
                        help="mirrored client frames to the PVM")
    parser.add_argument("--secondary-out", default="", metavar="ADDR",
                        help="mirrored client frames to the SVM")
    parser.add_argument("--rewrite-secondary", action="store_true",
                        help="rewrite the SVM's TCP sequence numbers (filter-rewriter)")
    parser.add_argument("--exit-at-eof", action="store_true",
                        help="stop when every input is a pcap file read to its end")


def run_compare(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (or end of pcap input); print the counters as JSON on
    stderr at exit. Returns the process exit code."""
    try:
        settings = NetSettings(
            compare_timeout_ms=args.compare_timeout_ms, expired_scan_ms=args.expired_scan_ms,
            max_connections=args.max_connections, max_queue_frames=args.max_queue_frames,
            vnet_hdr=args.vnet_hdr, rewrite_secondary=args.rewrite_secondary,
            primary_in=args.primary_in, secondary_in=args.secondary_in, outdev=args.outdev,
            client_in=args.client_in, primary_out=args.primary_out,
            secondary_out=args.secondary_out)
    except ValueError as exc:
        print(f"colo-pipeline compare: {exc}", file=sys.stderr)
        return 2
    loop = None
    control = None
    try:
        control = XenNotify(args.notify_dev, args.vnet_hdr) if args.notify_dev else NoControl()
        loop = CompareLoop(settings, control)
    except (OSError, ValueError) as exc:
        if control is not None:
            control.close()
        print(f"colo-pipeline compare: {exc}", file=sys.stderr)
        return 1
    tune_gc()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("comparing %s against %s, releasing to %s", settings.primary_in,
             settings.secondary_in, settings.outdev)
    try:
        scan = settings.expired_scan_ms / 1000.0
        while not stop.is_set():
            loop.run_once(scan)
            if args.exit_at_eof and loop.inputs_exhausted():
                loop.run_once(0)
                break
    finally:
        print(json.dumps({"counters": loop.comparator.counters}), file=sys.stderr, flush=True)
        loop.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m pipeline.net.standalone",
                                     description=__doc__.split("\n\n")[0])
    add_compare_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_compare(args)


if __name__ == "__main__":
    sys.exit(main())
