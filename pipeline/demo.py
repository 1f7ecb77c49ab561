"""``colo-pipeline demo``: a primary and a secondary with simulated guests on this machine.

It protects the guest for ``--duration`` seconds while showing live progress and ends by
proving that the SVM's memory equals the PVM's at the last committed checkpoint; with
``--disk-mb`` it also drives the guest's replicated disk and compares both images, with
``--kill-primary-after`` it kills the primary and shows the secondary taking over. Demo
only: the nodes it starts are the real ``colo-pipeline primary/secondary``
(``pipeline/localpair.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

import blake3

from pipeline import counters
from pipeline.disk import nbd_protocol as P
from pipeline.disk.nbd_client import NbdClient
from pipeline.disk.progress import SyncBar, sync_progress
from pipeline.localpair import HostPair, LocalPair, PairError, free_port_base
from pipeline.service_client import AnswerStream, RequestLoad, ServiceClient
from pipeline.stages.inputs import INJECT_SOCKET, inject_address


def add_demo_arguments(sp: argparse.ArgumentParser) -> None:
    """The options of ``colo-pipeline demo``."""
    sp.add_argument("--duration", type=float, default=10.0, help="seconds of protected running")
    sp.add_argument("--until-checkpoints", type=int, default=0, metavar="N",
                    help="and run on until N checkpoints were taken after protection (tests: "
                    "an event to wait for instead of a time)")
    sp.add_argument("--until-cause", default="", metavar="CAUSE",
                    help="count only checkpoints of this cause for --until-checkpoints "
                    "(e.g. net_divergence)")
    sp.add_argument("--until-disk-writes", type=int, default=0, metavar="N",
                    help="with --disk-mb: and run on until the driver wrote N times")
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
    sp.add_argument("--rejoin", action="store_true",
                    help="with --kill-primary-after: the two nodes are hosts with role auto; "
                    "the killed primary's host is started again, joins the survivor as its "
                    "secondary, and the demo waits until protected again and proves the "
                    "memories equal (JSON: failovers, reprotected_ms, memory_equal); with "
                    "--disk-mb the disk too: the survivor's guest writes on, the host that "
                    "comes back gets an incremental disk sync, the images are compared "
                    "(disk_equal, disk_sync_bytes per cycle). The demo's client follows the "
                    "service to each survivor, sends the requests whose answers did not come "
                    "again, and checks that every request got exactly one answer (JSON: "
                    "client_requests, client_answers, client_sent_again, "
                    "client_exactly_once), and times each from its first send to its answer "
                    "(client_latency_ms_p50/p99/max: the max is the failover's gap)")
    sp.add_argument("--failovers", type=int, default=1, metavar="N",
                    help="with --rejoin: this many cycles (kill the primary, rejoin)")


def run_demo(args: argparse.Namespace) -> bool:
    """The demo; True if every proof held (memory equal, disks equal, the takeover
    served) and both nodes stopped cleanly."""
    if args.rejoin and args.kill_primary_after is None:
        raise SystemExit("colo-pipeline demo: --rejoin needs --kill-primary-after")
    tables = {
        # the network comparator on the primary; both guests' outputs go to it as frames
        # released frames go to the demo's client (DemoClient) on outdev
        "net": {"primary_in": "unix:{workdir}/net-pvm.sock",
                "secondary_in": "unix:{workdir}/net-svm.sock",
                "outdev": "unix:{workdir}/client.sock",
                "compare_timeout_ms": args.compare_timeout_ms},
        "guest": {"backend": "sim", "page_count": args.pages, "dirty_log": args.dirty_log},
        # the demo's client sends the PVM's inputs (and times the answers); a secondary
        # that takes over generates its own at the same rate
        "guest.workload": {"seed": 7, "pages_per_input": args.pages_per_input,
                           "nondeterminism": args.nondeterminism, "input_rate_hz": 0.0},
        "checkpoint": {"max_interval_ms": args.interval_ms, "min_interval_ms": 10,
                       "dirty_threshold_pages": max(64, args.pages // 4),
                       "epoch_timeout_ms": 20000},
    }
    role_tables: dict = {"secondary": {"guest.workload": {"input_rate_hz": args.input_rate}}}
    if args.disk_mb:
        disk = {"export_size": args.disk_mb << 20, "durable_commit": False,
                "forward": f"tcp://127.0.0.1:{free_port_base()}"}
        for role in ("primary", "secondary"):
            role_tables.setdefault(role, {})["disk"] = {
                **disk, "image": f"{{workdir}}/{role}-disk.img",
                "export": f"unix:{{workdir}}/{role}-disk.nbd"}
    if args.rejoin:
        # two hosts with node.role = "auto", so the lost one can come back; the same
        # config shape on both: the demo's client (AcrossFailoversClient) sends its
        # requests to whichever is primary and reads the answers on the outdev path both
        # serve in turn
        role_tables = None
        if args.disk_mb:   # each host its own image and export; the forwarding link
            # follows the secondary's address (role auto)
            role_tables = {h: {"disk": {"export_size": args.disk_mb << 20,
                                        "durable_commit": False,
                                        "image": f"{{workdir}}/{h}-disk.img",
                                        "export": f"unix:{{workdir}}/{h}-disk.nbd"}}
                           for h in ("a", "b")}
    pair = (HostPair if args.rejoin else LocalPair)(
        tables, log_level=args.log_level, capture_logs=not args.verbose,
        role_tables=role_tables)
    if args.disk_mb:
        # the guest's disk has data before protection; the secondary's starts empty and
        # gets it from the initial disk sync
        _prefill_disk(os.path.join(pair.workdir, f"{pair.HOSTS[0]}-disk.img"),
                      args.disk_mb << 20)
    disk_driver = None
    client = None
    summary: dict = {"memory_equal": False}
    ok = False
    try:
        if args.rejoin:
            pair.start(("a",))
            pair.wait_info("state", "unprotected", role="a")
            pair.start_node("b")
        else:
            pair.start()
        if not args.json:
            print(f"primary and secondary started (configs in {pair.workdir}); full sync of "
                  f"{args.pages * 4096 / 2**20:.0f} MiB ...", flush=True)
        # with a disk the first checkpoint waits for its initial sync: a bar on a terminal
        _wait_protected(pair, sys.stdout if args.disk_mb and not args.json else None)
        node = pair.node(pair.primary_host())
        client = (AcrossFailoversClient(pair, args.input_rate) if args.rejoin
                  else DemoClient(pair, args.input_rate))
        if args.disk_mb:
            disk_driver = GuestDiskDriver(
                os.path.join(pair.workdir, f"{pair.primary_host()}-disk.nbd"),
                args.disk_mb << 20)
        t_end = time.monotonic() + args.duration
        protected_at = len(node.checkpoints())

        def more_wanted() -> bool:
            if not args.until_checkpoints and not args.until_disk_writes:
                return False
            cps = node.checkpoints()[protected_at:]
            if args.until_cause:
                cps = [c for c in cps if c["cause_name"] == args.until_cause]
            return len(cps) < args.until_checkpoints or (
                disk_driver is not None and disk_driver.writes < args.until_disk_writes)
        # on a terminal the progress line is redrawn in place; in a log, one line a second
        tty = sys.stdout.isatty()
        period = 0.5 if tty else 1.0
        while time.monotonic() < t_end or more_wanted():
            pair.check_alive()
            client.check()
            if not args.json:
                s = counters.summarize(node.snapshot())
                p50, p99 = client.latency_ms()
                line = (f"[{args.duration - (t_end - time.monotonic()):5.1f}s] checkpoints "
                        f"{s['checkpoints']:4d}  pause p50 {s['pause_ms_p50']:6.2f} ms  "
                        f"client p50/p99 {p50:6.1f}/{p99:6.1f} ms  sent "
                        f"{s['bytes_sent'] / 1e6:8.2f} MB  causes {s['causes']}")
                print("\r" + line if tty else line, end="" if tty else "\n", flush=True)
            time.sleep(period)
        # (--rejoin: the client goes on through the failovers; its figures come after them)
        client_figures = {} if args.rejoin else client.stop()
        if disk_driver is not None:
            disk_driver.stop()
        # The proof: one more checkpoint where both sides hash all of guest memory while
        # paused (the PVM at its snapshot, the SVM right after applying it).
        info = pair.prove_memory_equal()
        summary = counters.summarize(node.snapshot())
        summary.update(memory_equal=info["memory_equal"], final_epoch=info["final_epoch"],
                       pvm_digest=info["pvm_digest"], svm_digest=info["svm_digest"],
                       dirty_log=info.get("dirty_log", ""), duration_s=args.duration,
                       **client_figures)
        ok = client_figures.get("client_lost", 0) == 0
        ok = ok and info["memory_equal"]
        if disk_driver is not None:
            # the disk committed with that checkpoint, and nothing was written since
            images = [_file_digest(os.path.join(pair.workdir, f"{host}-disk.img"))
                      for host in pair.HOSTS]
            disk = pair.node(pair.primary_host()).snapshot()["stages"].get("disk", {})
            summary.update(disk_equal=images[0] == images[1], disk_writes=disk_driver.writes,
                           disk_digest=images[0], disk_sync_bytes=disk.get("sync_bytes", 0))
            ok = ok and summary["disk_equal"]
        if args.kill_primary_after is not None and ok and args.rejoin:
            summary.update(_demo_rejoin(pair, args))
            ok = summary["memory_equal"] and summary.get("disk_equal", True)
            summary.update(client.stop())
            ok = ok and summary["client_exactly_once"]
        elif args.kill_primary_after is not None and ok:
            summary.update(_demo_failover(pair, args))
            ok = bool(summary.get("failover_ok"))
    except PairError as exc:
        summary["error"] = str(exc)
        print(f"\ncolo-pipeline demo: {exc}", file=sys.stderr)
    finally:
        if client is not None:
            client.halt()
        if disk_driver is not None:
            disk_driver.stop()
        codes = pair.stop()
        if any(codes.values()) and ok:
            ok = False
            summary["error"] = f"a node did not stop cleanly: exit codes {codes}"
        pair.cleanup()
    if args.json:
        print(json.dumps(summary))
    else:
        print()
        print(f"checkpoints {summary.get('checkpoints')}  causes {summary.get('causes')}  "
              f"pause p50/p99 {summary.get('pause_ms_p50')}/{summary.get('pause_ms_p99')} ms  "
              f"bytes sent {summary.get('bytes_sent')}")
        if args.rejoin:
            print(f"client: {summary.get('client_answers')} of "
                  f"{summary.get('client_requests')} requests answered across the failovers "
                  f"({summary.get('client_sent_again')} sent again, "
                  f"{summary.get('client_duplicates')} answers received twice, the same "
                  f"bytes); exactly one answer each: {summary.get('client_exactly_once')}; "
                  f"latency p50/p99/max {summary.get('client_latency_ms_p50')}/"
                  f"{summary.get('client_latency_ms_p99')}/"
                  f"{summary.get('client_latency_ms_max')} ms (each from the request's "
                  f"first send; the max is the failover's gap)")
        else:
            print(f"client: {summary.get('client_answers')} of "
                  f"{summary.get('client_requests')} requests answered, latency p50/p99 "
                  f"{summary.get('client_latency_ms_p50')}/"
                  f"{summary.get('client_latency_ms_p99')} ms (the comparator added p50/p99 "
                  f"<= {summary.get('net_added_ms_p50')}/{summary.get('net_added_ms_p99')} ms)")
        print(f"memory of SVM == PVM at the last committed checkpoint "
              f"(epoch {summary.get('final_epoch')}): {summary['memory_equal']}")
    return ok


class AcrossFailoversClient:
    """--rejoin: the service's client across the failovers
    (:class:`pipeline.service_client.RequestLoad`, ``rate`` requests a second, the guest's
    only input): it follows the service to each survivor and sends again the requests
    whose answers did not come; at the end every request must have exactly one answer."""

    def __init__(self, pair: HostPair, rate: float) -> None:
        stream = AnswerStream([f"unix:{pair.workdir}/client.sock"], timeout=120,
                              inject=[inject_address(pair.run_dir(h)) for h in pair.HOSTS])
        self.pair, self.load = pair, RequestLoad(stream, rate)
        self.load.start()

    def check(self) -> None:
        try:
            self.load.count()
        except ConnectionError as exc:
            raise PairError(str(exc)) from None

    def latency_ms(self) -> tuple[float, float]:
        """p50 and p99 of the answers so far (each from the request's first send)."""
        f = self.load.latency_figures()
        return f["p50_ms"] or 0.0, f["p99_ms"] or 0.0

    def halt(self) -> None:
        self.load.close()

    def stop(self) -> dict:
        """Stop sending, wait until every request was answered; the figures."""
        try:
            self.load.finish(check=self.pair.check_alive)
        except (TimeoutError, ConnectionError) as exc:
            raise PairError(str(exc)) from None
        finally:
            self.halt()
        s = self.load.stream
        problems = self.load.check_exactly_once()
        # each request timed from its first send to its one answer: the max is the
        # longest a client waited, a failover's gap (the request sent as the primary died)
        f = self.load.latency_figures()
        return {"client_requests": s.sent, "client_answers": len(s.seqs),
                "client_lost": s.sent - len(s.seqs), "client_sent_again": s.retransmits,
                "client_duplicates": s.duplicates, "client_exactly_once": not problems,
                "client_problems": problems, "client_latency_ms_p50": f["p50_ms"],
                "client_latency_ms_p99": f["p99_ms"], "client_latency_ms_max": f["max_ms"]}


class DemoClient:
    """The protected service's client: a thread sending requests at ``rate``/s through
    :class:`pipeline.service_client.ServiceClient` and timing their answers."""

    def __init__(self, pair: LocalPair, rate: float, drain: float = 10.0) -> None:
        self.client = ServiceClient(os.path.join(pair.workdir, "client.sock"),
                                    "ipc://" + os.path.join(pair.run_dir("primary"),
                                                            INJECT_SOCKET))
        self.rate, self.drain = rate, drain
        self.figures: dict | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.rate <= 0:
                return
            self.client.probe()
            self.figures = self.client.run_phase(self.rate, 0, float("inf"), self.drain,
                                                 stop=self._stop)
        except Exception as exc:             # reported by check() and stop()
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.client.close()

    def check(self) -> None:
        if self.error is not None:
            raise PairError(f"the demo's client failed: {self.error}")

    def latency_ms(self) -> tuple[float, float]:
        """p50 and p99 of the answers so far."""
        lat = sorted(self.client.latencies)
        if not lat:
            return 0.0, 0.0
        return (lat[int(0.5 * (len(lat) - 1))] * 1000, lat[int(0.99 * (len(lat) - 1))] * 1000)

    def halt(self) -> None:
        self._stop.set()
        self._thread.join()

    def stop(self) -> dict:
        """Stop sending, wait for the answers still due; the figures (``client_*``)."""
        self.halt()
        self.check()
        f = self.figures or {"sent": 0, "completed": 0, "lost": 0, "p50_ms": None,
                             "p99_ms": None, "max_ms": None}
        return {"client_requests": f["sent"], "client_answers": f["completed"],
                "client_lost": f["lost"], "client_latency_ms_p50": f["p50_ms"],
                "client_latency_ms_p99": f["p99_ms"], "client_latency_ms_max": f["max_ms"]}


def _wait_protected(pair: LocalPair, bar_stream=None, timeout: float = 300.0) -> dict:
    """Wait until the pair is protected; meanwhile the disk sync's progress bar on
    ``bar_stream`` if that is a terminal (nothing at all otherwise)."""
    bar = SyncBar(bar_stream) if bar_stream is not None else None
    if bar is None or not bar.tty:
        return pair.wait_protected(timeout)
    node = pair.node(pair.primary_host())
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = node.node_info()
            bar.show(sync_progress(node.stage("disk").as_dict()))
            if info.get("state") == "protected":
                return info
            pair.check_alive()
            if time.monotonic() > deadline:
                raise PairError(f"not protected within {timeout} s (info {info})")
            time.sleep(0.2)
    finally:
        bar.end()


def _prefill_disk(path: str, size: int) -> None:
    """Data in one MiB of every four (the rest holes), as a guest's used disk has."""
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, 4 * mib)):
            f.seek(off)
            f.write(bytes([i % 251 + 1]) * mib)


def _file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return blake3.blake3(fh.read()).hexdigest()


class GuestDiskDriver:
    """The demo's stand-in for the guest's disk driver: deterministic block writes to the
    PVM's NBD export from a thread (the sim guest itself has no disk)."""

    def __init__(self, socket_path: str, size: int, block: int = 4096,
                 rate_hz: float = 100.0) -> None:
        """``size``: the part of the disk it writes (from offset 0: a working set)."""
        self.path, self.size, self.block, self.period = socket_path, size, block, 1 / rate_hz
        self.writes = 0
        self.errors = 0      # failed writes (the driver stops at the first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-disk", daemon=True)
        self._thread.start()

    def _run(self) -> None:
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
        except (OSError, EOFError, P.NbdError, P.NbdProtocolError) as e:   # its host was
            # killed (the demo's failover), or a write failed
            self.errors += 1
            self.error = f"{type(e).__name__}: {e}"
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


def _demo_rejoin(pair, args: argparse.Namespace) -> dict:
    """``--failovers`` times: kill the primary host, let the secondary take over and
    become the primary, start the lost host again (same config) as its secondary, wait
    until the guest is protected again, and prove the memories equal."""
    out: dict = {"failovers": 0, "cycles": []}
    for _ in range(args.failovers):
        time.sleep(args.kill_primary_after)
        lost = pair.primary_host()
        survivor = pair.other(lost)
        node = pair.node(survivor)
        before = node.node_info().get("failovers", 0)
        killed_at = pair.kill(lost)
        if not args.json:
            print(f"\nhost {lost} (primary) killed; host {survivor} takes over ...", flush=True)

        def wait(pred, what: str, timeout: float = 300.0) -> dict:
            deadline = time.monotonic() + timeout
            while True:
                info = node.node_info()
                if pred(info):
                    return info
                pair.check_alive()
                if time.monotonic() > deadline:
                    raise PairError(f"host {survivor}: not {what} within {timeout} s")
                time.sleep(0.02)
        info = wait(lambda i: i.get("role") == "primary" and i.get("failovers", 0) > before,
                    "the primary")
        pair.start_node(lost)
        if not args.json:
            print(f"host {survivor} is the primary (generation {info['generation']}); host "
                  f"{lost} started again with its config, joining as secondary ...", flush=True)
        driver = None
        if args.disk_mb:   # the guest's disk driver on the survivor writes on meanwhile,
            # in a working set of a quarter of the disk: the incremental sync sends that
            # (and the MiBs of the lost host's last writes), not the disk
            driver = GuestDiskDriver(os.path.join(pair.workdir, f"{survivor}-disk.nbd"),
                                     args.disk_mb << 18)
        info = wait(lambda i: i.get("state") == "protected"
                    and not i.get("awaiting_reprotection"), "protected again")
        if driver is not None:
            driver.stop()    # nothing written after this: the proof's checkpoint has it all
        proof = pair.prove_memory_equal()
        cycle = {"lost": lost, "generation": info["generation"],
                 "failover_detect_ms": round((info["failover_detected_at"] - killed_at) * 1000, 1),
                 "takeover_ms": info["takeover_ms"], "reprotected_ms": info["reprotected_ms"],
                 "memory_equal": proof["memory_equal"]}
        if driver is not None:
            disk = node.stage("disk").as_dict()
            cycle.update(disk_equal=len({_file_digest(os.path.join(pair.workdir,
                                                                  f"{h}-disk.img"))
                                         for h in pair.HOSTS}) == 1,
                         disk_sync_bytes=disk["sync_bytes"],
                         disk_sync_total=disk["sync_total"], disk_sync_ms=disk["sync_ms"],
                         disk_sync_incremental=bool(disk["sync_incremental"]),
                         disk_writes=driver.writes, disk_write_errors=driver.errors)
            cycle["disk_equal"] = cycle["disk_equal"] and driver.errors == 0
        out["cycles"].append(cycle)
        out["failovers"] += 1
        if not args.json:
            print(f"protected again {info['reprotected_ms']:.0f} ms after the takeover; memory "
                  f"of SVM == PVM: {proof['memory_equal']}", flush=True)
            if driver is not None:
                print(f"disk: {'incremental' if cycle['disk_sync_incremental'] else 'full'} "
                      f"sync sent {cycle['disk_sync_bytes'] / 2**20:.0f} MiB of "
                      f"{args.disk_mb} MiB; images equal: {cycle['disk_equal']}", flush=True)
        if not proof["memory_equal"] or not cycle.get("disk_equal", True):
            break
    last = out["cycles"][-1]
    if args.disk_mb:
        out.update(disk_equal=all(c["disk_equal"] for c in out["cycles"]),
                   disk_sync_bytes=last["disk_sync_bytes"])
    out.update(memory_equal=all(c["memory_equal"] for c in out["cycles"]),
               reprotected_ms=last["reprotected_ms"], takeover_ms=last["takeover_ms"],
               failover_detect_ms=last["failover_detect_ms"],
               failover_generation=last["generation"])
    return out
