"""Starts, watches and stops the stage processes of one node.

The supervisor owns every shared resource of the node: the guest handle, the rings,
the counters and the primary's hash tables. It creates them all, then forks the
stages (which inherit them), and it alone unlinks them: on a clean stop, on
SIGINT/SIGTERM, and when any stage dies (a node with a dead stage cannot keep its
promise, so it stops whole and says which stage died and how).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline import cpu_latency, sockets, wire
from pipeline.config import Settings
from pipeline.coordinator import PrimaryCoordinator, SecondaryCoordinator
from pipeline.failover.roles import decide_role, effective_settings, survivor_settings
from pipeline.failover.takeover import PrimaryStart
from pipeline.counters import STAGE_COUNTERS, NodeCounters
from pipeline.disk.counters import COUNTER_NAMES as DISK_COUNTERS
from pipeline.net.comparator import COUNTER_NAMES as NET_COUNTERS
from pipeline.ring import Ring, SlotLayout
from pipeline.seal import SealKeys
from pipeline.shm import Segment, cleanup_segments, create_segment, segment_prefix
from pipeline.signals import stop_on_signals
from pipeline.stages import digest, heartbeat, inputs, restore, send, snapshot, verify
from pipeline.stages.common import (HashTable, PageBuffer, PausePriority, StageContext,
                                    StagePriority, SvmPages, stage_main)
from pipeline.stages.send import Pending
from pipeline.xen_io import BACKENDS
from pipeline.xen_io.base import Domain

log = logging.getLogger(__name__)
FORK = multiprocessing.get_context("fork")


def _event() -> Any:
    """A multiprocessing Event: its semaphores live in /dev/shm (sem_open), so a full
    /dev/shm fails here, before any segment is made; say where, not only ENOSPC."""
    try:
        return FORK.Event()
    except OSError as e:
        raise OSError(e.errno, f"cannot create the node's semaphores in /dev/shm: "
                               f"{e.strerror} (is /dev/shm full?)") from None

STOP_GRACE_S = 5.0
VCPU_BLOB_MAX = 64 * 1024   # room for the vCPU blob in an END marker (Xen HVM context ~5 KiB)   # how long stages get to finish after SIGTERM before SIGKILL

@dataclass
class SharedState:
    """Small values the stages of one node share (fork-inherited, lock-free words)."""
    epoch: Any          # the epoch whose output the PVM now produces (inputs are tagged with it)
    generation: Any     # this node's generation of the active role (heartbeats carry it)
    unprotected: Any    # primary: 1 while no secondary protects the guest (send drops pages,
                        # the client does not mirror input)
    active: Any         # secondary: 1 once it took over (the mirror becomes the client)
    hold_inputs: Any    # 1 while the coordinator wants the guest's input stream held
    compress: Any       # primary, pipeline.compress = "auto": 1 while the digest workers
                        # compress (decided by the send stage)
    live: Any           # the epoch of the live round in flight (a full sync or pre-copy
                        # round), -1 while there is none: its pages are worked on at normal
                        # priority, a checkpoint's at the pause's (common.StagePriority)
    seal: Any = None    # security.mode = "sealed": the session's key (seal.SealKeys; the
                        # coordinator installs it at HELLO, the data stages read it)

    @classmethod
    def create(cls, sealed: bool = False) -> "SharedState":
        return cls(FORK.Value("q", 0, lock=False), FORK.Value("Q", 0, lock=False),
                   FORK.Value("b", 0, lock=False), FORK.Value("b", 0, lock=False),
                   FORK.Value("b", 0, lock=False), FORK.Value("b", 0, lock=False),
                   FORK.Value("q", -1, lock=False), SealKeys() if sealed else None)


EXTRA_COUNTERS = {
    "coordinator": ("epochs_committed", "epochs_aborted", "requests", "stale_records",
                    "control_dropped", "peer_lost", "takeovers", "takeovers_refused",
                    "takeovers_abandoned", "torn_by_conn_drop", "losses_abandoned",
                    "reprotections", "memory_mismatches", "sync_restarts", "svm_prehashed",
                    "svm_prehash_rounds", "svm_prehashed_again",
                    "acked_early", "svm_dirty_parts", "secondaries_replaced",
                    "unsynced_refused", "control_redials", "svm_resumes"),
    "snapshot": ("prescans", "pages_prescanned", "prescan_held", "pages_precopied",
                 "pages_recopied", "checkpoint_batches", "checkpoints_dealt"),
    "digest": ("pages_zero", "pages_ref", "pages_packed", "pages_raw", "lz4_ns",
               "lz4_bytes_in", "lz4_bytes_out", "pages_same_as_svm", "svm_wait_ns",
               "pages_unhashed", "svm_early_batches", "seal_ns"),
    "receive": ("skipped_optional", "stale_records", "staging_wait_ns", "conn_drops",
                "conn_crypto_errors", "verify_drain_waits", "seal_refused"),
    "verify": ("seal_refused", "open_ns"),
    "send": ("dropped_unprotected", "compress_switches", "windows_lz4", "windows_raw",
             "link_mb_s", "lz4_mb_s", "stale_batches", "records_in_place"),
    "restore": ("epochs_applied", "epochs_aborted", "torn_epochs", "stale_records",
                "pages_same_as_svm", "svm_refs_refused", "inputs_awaited", "inputs_missing",
                "cache_populated", "svm_copied_in_transit", "svm_cached_paused",
                "zero_pages_held"),
    "client": ("outputs", "input_full", "pvm_input_seq"),
    "mirror": ("outputs", "input_full", "inputs_generated", "svm_input_seq"),
    "heartbeat": heartbeat.COUNTERS,
    "disk": tuple(DISK_COUNTERS),
    "net_compare": tuple(NET_COUNTERS),
}


def open_domain(settings: Settings) -> Domain:
    """The guest of this node, through the backend the config names."""
    g = settings.guest
    module, factory = BACKENDS[g.backend].split(":")
    make = getattr(importlib.import_module(module), factory)
    if g.backend == "sim":
        from pipeline.xen_io.sim import WorkloadSpec
        w = g.workload
        spec = WorkloadSpec(seed=w.seed, pages_per_input=w.pages_per_input,
                            run_length=w.run_length, mix_zero=w.mix_zero, mix_text=w.mix_text,
                            mix_random=w.mix_random, nondeterminism=w.nondeterminism,
                            fill=settings.node.role == "primary")
        dom = make(f"{settings.node.name}-guest", g.page_count, spec, dirty_log=g.dirty_log,
                   input_slots=g.input_log_slots)
        dom.start(paused=settings.node.role == "secondary")
        return dom
    return make(g.domain, wake=g.xen_wake, find_xen_written=g.xen_find_written, vcpu_info=g.xen_vcpu_info)


@dataclass
class StageSpec:
    name: str
    target: Callable[..., None]
    args: tuple
    also: tuple[str, ...] = ()      # counter blocks it keeps besides its own (its process
                                    # does another stage's work: restore's "receive")


def _tables_segment(node: str, page_count: int, workers: int) -> tuple[Segment, HashTable,
                                                                      Pending, SvmPages]:
    """The primary's hash table, pending arrays and the SVM's page hashes, in one segment."""
    sizes = [page_count * 32, page_count, page_count * 8, page_count * 32, 8,
             page_count * 32, page_count * 8]
    offsets = np.cumsum([0] + [(s + 63) // 64 * 64 for s in sizes])
    seg = create_segment(f"{segment_prefix(node)}tables", int(offsets[-1]))
    buf = seg.buf

    def view(i: int, dtype, shape) -> np.ndarray:
        return np.ndarray(shape, dtype, buf, int(offsets[i]))
    table = HashTable(view(0, np.uint8, (page_count, 32)), view(1, np.bool_, (page_count,)))
    pending = Pending(view(2, np.uint64, (page_count,)), view(3, np.uint8, (page_count, 32)),
                      view(4, np.uint64, (1,)))
    svm = SvmPages(view(5, np.uint8, (page_count, 32)), view(6, np.uint64, (page_count,)),
                   FORK.Value("q", -1, lock=False),
                   [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(workers)])
    return seg, table, pending, svm


# -- stage entry points that need sockets (ZeroMQ contexts must be made after fork) ----------
def _send_entry(ctx: StageContext, settings: Settings, rings, ctrl, pending, shared,
                priority=None) -> None:
    nctx = sockets.NodeContext(settings)
    sock = sockets.pages_out(nctx)
    try:
        send.run(ctx, rings, ctrl, sock, pending, shared, settings.pipeline.compress, priority,
                 shared.seal)
    finally:
        nctx.close()


def _restore_entry(ctx: StageContext, settings: Settings, domain, to_verify, from_verify,
                   direct, ctrl, staging, priority=None, seal_keys=None) -> None:
    """The restore stage, which also reads the pages channel and does the receive stage's
    work (pipeline/stages/receive.py), counted in the ``receive`` block."""
    rctx = StageContext("receive", ctx.node.stage("receive"), ctx.stop,
                        logging.getLogger("pipeline.receive"), ctx.node)
    nctx = sockets.NodeContext(settings)
    sock = sockets.pages_in(nctx, rctx.counters)
    try:
        restore.run(ctx, domain, [*from_verify, direct], ctrl, staging,
                    settings.pipeline.verify_pages, priority, pages_in=sock,
                    receive_ctx=rctx, to_verify=to_verify, direct=direct,
                    seal_keys=seal_keys)
    finally:
        nctx.close()


def _disk_entry(ctx: StageContext, settings: Settings, protected: bool = True) -> None:
    """The replicated disk: an NBD export of this side's image, forwarding (primary) or
    buffering and committing (secondary) the PVM's writes with the checkpoints.
    ``protected=False``: a primary that waits for its first secondary (role auto)."""
    from pipeline.stages.disk import run_disk_stage
    nctx = sockets.NodeContext(settings)      # the forwarding link is CURVE like the others
    try:
        run_disk_stage(settings.node.role, settings.disk, settings.run_dir, ctx.counters,
                       stop=ctx.stop, context=nctx.ctx, secure=nctx.secure,
                       protected=protected)
    finally:
        nctx.close()


def _net_compare_entry(ctx: StageContext, settings: Settings, in_band: bool,
                       passthrough: bool = False) -> None:
    """The network comparator: the PVM's and the SVM's output frames, compared.
    ``in_band``: they come from the sim guests' output ports, with every epoch boundary.
    ``passthrough``: the primary starts unprotected (role auto)."""
    from pipeline.stages.net_compare import run_net_compare_stage
    run_net_compare_stage(settings.net, settings.run_dir, counters_sink=ctx.counters,
                          stop=ctx.stop, in_band=in_band, passthrough=passthrough)


def sim_ports_settings(settings: Settings) -> Settings:
    """The settings the sim guest's input stages (client, mirror) run with. Its output
    ports are its NIC: they feed the comparator's ``primary_in``/``secondary_in``. Not when
    the guest has a real NIC behind the redirector (``net.redirector_in``: the
    network-namespace lab, where a sim guest stands in for a real VM's memory and kernel
    stacks in namespaces for its network): those streams are the real interface's and the
    redirector's then, so the sim guest's output goes nowhere but its counters."""
    if not settings.net.redirector_in:
        return settings
    return dataclasses.replace(settings, net=dataclasses.replace(
        settings.net, primary_in="", secondary_in=""))


def _primary_coordinator(ctx, settings, domain, snap_ctrl, send_ctrl, table, pending,
                         shared, hb_events, svm, start) -> None:
    PrimaryCoordinator(ctx, settings, ctx.node, domain, snap_ctrl, send_ctrl, table, pending,
                       shared, hb_events, svm, start).run()


def _secondary_coordinator(ctx, settings, domain, restore_ctrl, shared, hb_events) -> None:
    SecondaryCoordinator(ctx, settings, ctx.node, domain, restore_ctrl, shared, hb_events).run()


def _heartbeat_entry(ctx: StageContext, settings: Settings, events, shared: SharedState) -> None:
    hb = dataclasses.replace(settings.heartbeat,
                             address=sockets.peer_endpoints(settings)["heartbeat"])

    def make_socket(kind: int, bind: bool):
        # one CURVE context for this process, made here (after fork)
        nonlocal nctx
        nctx = nctx or sockets.NodeContext(settings)
        return sockets.heartbeat(nctx, settings.node.role)
    nctx = None
    try:
        heartbeat.run(ctx, hb, settings.node.role, events, shared.generation, shared.epoch,
                      socket_factory=make_socket)
    finally:
        if nctx is not None:
            nctx.close()


#: open files a node's processes need at least (rings' eventfds, ZeroMQ contexts and
#: their sockets, the guest): libzmq aborts the process when epoll cannot get a file
NOFILE_NEEDED = 256


def ensure_open_files(needed: int = NOFILE_NEEDED) -> None:
    """Raise RLIMIT_NOFILE's soft limit to what the node needs (as far as the hard limit
    allows); OSError(EMFILE) naming the limit if the hard limit is lower."""
    import errno
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise OSError(errno.EMFILE, f"RLIMIT_NOFILE is {soft} (hard limit {hard}); a node "
                                        f"needs at least {needed} open files: raise it "
                                        f"(ulimit -n, LimitNOFILE= in the systemd unit)")
        new = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, 4096))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        log.info("RLIMIT_NOFILE raised from %d to %d (hard limit %s)", soft, new, hard)


def stage_names(settings: Settings, role: str, has_inputs: bool) -> list[str]:
    """The stages a node of ``role`` runs, by their counter blocks (what ``Supervisor._plan``
    starts; the secondary's "receive" is done in its restore stage's process)."""
    s = settings
    if role == "primary":
        names = ["coordinator", "snapshot",
                 *(f"digest.{i}" for i in range(s.pipeline.digest_workers)), "send"]
        names += ["client"] if has_inputs else []
    else:
        names = ["coordinator", "receive",
                 *(f"verify.{i}" for i in range(s.pipeline.verify_workers)), "restore"]
        names += ["mirror"] if has_inputs else []
    names.append("heartbeat")
    names += ["disk"] if s.disk.enabled else []
    names += ["net_compare"] if role == "primary" and s.net.primary_in else []
    return names


def address_space_hint(code: int | None, what: str = "a stage that cannot map its "
                        "memory dies like this") -> str:
    """Why a stage may have died, when the node runs under a finite RLIMIT_AS: an
    allocation that fails there aborts (SIGABRT) or kills the process inside a C library
    (numpy, libzmq, lz4) with nothing in the log naming the limit (the fault matrix's
    rlimit-as-too-low row). "" when no such limit is set or the stage exited cleanly.
    ``what``: the failure the limit explains (the node's own ENOMEM: cli.cmd_node)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if code is None or code == 0 or soft == resource.RLIM_INFINITY:
        return ""
    return f" (RLIMIT_AS is {soft >> 20} MiB: {what}; raise the limit)"

#: signals faulthandler reports (pipeline.signals.report_fatal_signals): a stage dead of one
#: wrote its threads' Python frames into the log first
FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT, signal.SIGILL)


def fatal_signal_note(signum: int) -> str:
    """After "killed by signal N": for a crash in native code, which signal, and that the
    stage's Python frames are above in the log (faulthandler's "Fatal Python error")."""
    if signum not in FATAL_SIGNALS:
        return ""
    return f" ({signal.Signals(signum).name}: a crash in native code; the Python frames " \
           f"of its threads are above in this log, after 'Fatal Python error')"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.config = settings          # as the file says (node.role may be "auto")
        self.settings = settings        # this node's role now (effective_settings)
        self.auto = settings.node.role == "auto"
        self.shared: SharedState | None = None
        self.stage_stops: dict[str, Any] = {}
        self.start_as = PrimaryStart()
        self.name = settings.node.name
        self.rings: list[Ring] = []
        self.segments: list[Segment] = []
        self.procs: dict[str, Any] = {}
        self.stop_event = _event()
        self.signalled = False      # SIGINT/SIGTERM received (set in the handler: _signalled)
        self.domain: Domain | None = None
        self.node: NodeCounters | None = None
        self.exit_reason = ""
        self.metrics = None
        self.redirector = None          # net.redirector_by_node: its process (subprocess.Popen)
        self.disk_bar = None            # the disk sync's bar on a terminal (primary, a disk)
        self.disk_bars_ended = 0        # syncs whose bar was drawn to its end
        # node.cpu_latency_us: the CPUs' wake-up latency request, held from start to stop
        self.cpu_latency: cpu_latency.CpuLatencyHold | None = None

    # -- building ---------------------------------------------------------
    def _ring(self, label: str, slots: int, layout: SlotLayout) -> Ring:
        ring = Ring.create(f"{segment_prefix(self.name)}{label}", slots, layout)
        self.rings.append(ring)
        return ring

    def _plan(self) -> list[StageSpec]:
        s = self.settings
        dom = self.domain
        layout = SlotLayout(batch_pages=s.pipeline.batch_pages, page_size=dom.page_size)
        slots = s.ring_slots(dom.page_count)
        shared = self.shared = SharedState.create(s.security.mode == "sealed")
        shared.generation.value = self.start_as.generation
        shared.epoch.value = self.start_as.first_epoch
        hb_in, hb_out = FORK.Pipe(duplex=False)
        # the data stages' scheduling (each stage gets its own copy through the fork): the
        # ones that hash or decode pages below the ones that hand records on; the restore
        # stage with the latter (each batch it takes is a hop of the commit, 0.9 ms p50 at
        # the workers' level, 0.12 at the hops', load 24; its apply is bounded by the epoch)
        rt = s.pipeline.pause_priority == "realtime"
        hops = StagePriority(rt, shared.live)
        relays = StagePriority(rt, shared.live, PausePriority.HOP)
        if s.node.role == "primary":
            n = s.pipeline.digest_workers
            to_digest = [self._ring(f"snap-digest{i}", slots, layout) for i in range(n)]
            framed = dataclasses.replace(layout, wire_prefix=wire.pages_prefix_size(
                s.pipeline.batch_pages))     # the send stage sends records from the slots
            to_send = [self._ring(f"digest{i}-send", slots, framed) for i in range(n)]
            seg, table, pending, svm = _tables_segment(self.name, dom.page_count, n)
            self.segments.append(seg)
            # room for a checkpoint's dirty set twice over (a timer checkpoint may overshoot
            # the threshold; torn epochs add their pages), never more than the guest
            snap_pages = min(dom.page_count, max(2 * s.checkpoint.dirty_threshold_pages, 4096))
            snap_seg = create_segment(f"{segment_prefix(self.name)}snapshot",
                                      snap_pages * dom.page_size)
            self.segments.append(snap_seg)
            snapbuf = PageBuffer(snap_seg, dom.page_size)
            snap_a, snap_b = FORK.Pipe()
            send_a, send_b = FORK.Pipe()
            plan = [StageSpec("coordinator", _primary_coordinator,
                              (s, dom, snap_a, send_a, table, pending, shared, hb_in, svm,
                               self.start_as)),
                    StageSpec("snapshot", snapshot.run,
                              (dom, to_digest, snap_b, snapbuf,
                               s.run_dir if s.disk.enabled else "",
                               s.pipeline.pause_priority == "realtime",
                               s.checkpoint.prescan_ms, shared.unprotected))]
            plan += [StageSpec(f"digest.{i}", digest.run,
                               (to_digest[i], to_send[i], table, snapbuf,
                                s.pipeline.compress, shared.compress, svm, i,
                                s.pipeline.verify_pages == "full", hops, shared.seal))
                     for i in range(n)]
            plan.append(StageSpec("send", _send_entry,
                                  (s, to_send, send_b, pending, shared, relays)))
            if dom.simulated_io() is not None:   # the sim guest's clients (a real VM has its own)
                plan.append(StageSpec("client", inputs.run_client,
                                      (sim_ports_settings(s), dom, shared)))
        else:
            n = s.pipeline.verify_workers
            to_verify = [self._ring(f"recv-verify{i}", slots, layout) for i in range(n)]
            # verify workers decode into the shared staging area; the rings to the restore
            # stage carry metadata and END markers only (the vCPU blob rides in a marker)
            meta = SlotLayout(batch_pages=s.pipeline.batch_pages,
                              page_size=max(512, -(-VCPU_BLOB_MAX // s.pipeline.batch_pages)))
            to_restore = [self._ring(f"verify{i}-restore", slots, meta) for i in range(n)]
            # raw batches the receive side placed and checked itself skip the verify
            # workers (pipeline/stages/receive.py), and END markers of an epoch without
            # lz4 batches: both its ends are the restore stage's process
            direct = self._ring("recv-restore", slots, meta)
            staging_seg = create_segment(f"{segment_prefix(self.name)}staging",
                                         dom.page_count * dom.page_size)
            self.segments.append(staging_seg)
            # a PageBuffer, so each stage that maps it prefaults it at start
            staging = PageBuffer(staging_seg, dom.page_size)
            ctl_a, ctl_b = FORK.Pipe()
            plan = [StageSpec("coordinator", _secondary_coordinator,
                              (s, dom, ctl_a, shared, hb_in))]
            plan += [StageSpec(f"verify.{i}", verify.run,
                               (to_verify[i], to_restore[i], staging,
                                s.pipeline.verify_pages, hops, shared.seal)) for i in range(n)]
            # the restore stage's process reads the pages channel (the receive stage's work)
            plan.append(StageSpec("restore", _restore_entry,
                                  (s, dom, to_verify, to_restore, direct, ctl_b, staging,
                                   relays, shared.seal), also=("receive",)))
            if dom.simulated_io() is not None:
                plan.append(StageSpec("mirror", inputs.run_mirror,
                                      (sim_ports_settings(s), dom, shared, self.auto)))
        plan.append(StageSpec("heartbeat", _heartbeat_entry, (s, hb_out, shared)))
        if s.disk.enabled:
            plan.append(StageSpec("disk", _disk_entry,
                                  (s, not self.start_as.wait_for_secondary)))
        if s.node.role == "primary" and s.net.primary_in:
            # boundaries in the streams only from the sim guest's own output ports
            in_band = dom.simulated_io() is not None and not s.net.redirector_in
            plan.append(StageSpec("net_compare", _net_compare_entry,
                                  (s, in_band, self.start_as.wait_for_secondary)))
        return plan

    def start(self) -> None:
        s = self.settings
        ensure_open_files()      # before anything is created: a refusal leaves nothing behind
        os.makedirs(s.run_dir, exist_ok=True)
        self._hold_cpu_latency()
        sockets.warn_if_plaintext(s)
        if s.net.redirector_offsets:
            # the carried offsets describe the connections of the guest this host ran
            # before; a node that starts runs a fresh guest or one a sync fills
            try:
                os.unlink(s.net.redirector_offsets)
                log.info("removed the carried offsets %s of an earlier guest",
                         s.net.redirector_offsets)
            except FileNotFoundError:
                pass
        stale = cleanup_segments(segment_prefix(self.name))
        if stale:
            log.warning("removed %d shared-memory segments left by an earlier run of node %r",
                        len(stale), self.name)
        try:
            role, why = decide_role(self.config)
            if self.auto:
                log.info("node %s: runs as %s: %s", self.name, role, why)
                s = self.settings = effective_settings(self.config, role)
                self.start_as = PrimaryStart(wait_for_secondary=True)
            if s.node.role == "secondary" and s.net.redirector_by_node:
                self._start_redirector()
            self.domain = open_domain(s)
            plan = self._plan()
            names = [n for spec in plan for n in (spec.name, *spec.also)]
            if self.auto:   # counters for both roles' stages: the node may change its role
                has_inputs = self.domain.simulated_io() is not None
                names += [n for r in ("primary", "secondary")
                          for n in stage_names(self.config, r, has_inputs) if n not in names]
            self.node = NodeCounters.create(self.name, {
                name: STAGE_COUNTERS + tuple(
                    c for c in EXTRA_COUNTERS.get(name.split(".")[0], ())
                    if c not in STAGE_COUNTERS) for name in dict.fromkeys(names)})
            self.node.set_node_info({"role": s.node.role, "pid": os.getpid(),
                                     "config": s.source, "started": time.time(),
                                     "page_count": self.domain.page_count,
                                     "dirty_log": self.domain.dirty_log_kind,
                                     "configured_role": self.config.node.role,
                                     "role_cause": why,
                                     "cpu_latency": self._cpu_latency_status()})
            # node info has one writer at a time: the supervisor until the coordinator
            # starts (last), then the coordinator (which adds its own pid)
            self.domain.before_fork()
            for spec in [p for p in plan if p.name != "coordinator"]:
                if spec.name == "net_compare":
                    self._load_native_rounds(s.net, "its start")
                self._start_stage(spec)
            info = self.node.node_info()
            info["stage_pids"] = {name: p.pid for name, p in self.procs.items()}
            self.node.set_node_info(info)
            self._start_stage(next(p for p in plan if p.name == "coordinator"))
            if self.auto and s.node.role == "secondary" and s.net.primary_in:
                # a takeover forks the survivor's comparator (become_primary) while its
                # guest serves on: it inherits them loaded now, at the secondary's start
                self._load_native_rounds(survivor_settings(self.config).net,
                                         "a takeover (the survivor's comparator)")
            # after the forks, or every stage would inherit the listening socket
            if s.metrics.listen:
                from pipeline.metrics import serve_metrics
                self.metrics = serve_metrics(self.name, s.metrics.listen, counters=self.node)
                log.info("node %s: metrics at %s", self.name, self.metrics.url)
        except BaseException:
            self.stop()
            raise
        log.info("node %s (%s) started %d stage processes", self.name, s.node.role,
                 len(self.procs))

    def _load_native_rounds(self, net, why: str) -> None:
        """Load the comparator's native pair rounds (numba) in this process, before it
        forks the comparator, which then has them compiled and loaded from its first frame
        (pipeline.net.loop.preload_native_rounds: numba starts no thread, the child's first
        call runs the inherited code). Loaded beside the comparator's first rounds instead,
        a thread held its GIL for tens of ms at a time: a live service's answers stalled up
        to ~85 ms for 1-2 s (docs/tuning.md, Session 18 (native))."""
        from pipeline.net.loop import preload_native_rounds
        t0, cpu0 = time.monotonic(), time.process_time()
        if preload_native_rounds(net):
            log.info("node %s: the comparator's native rounds loaded for %s in %.0f ms "
                     "(%.0f ms of CPU)", self.name, why, (time.monotonic() - t0) * 1000,
                     (time.process_time() - cpu0) * 1000)

    def _start_stage(self, spec: StageSpec) -> None:
        # each stage has its own stop event: a change of role stops some stages only
        stop = self.stage_stops[spec.name] = _event()
        if self.stop_event.is_set():
            stop.set()
        ctx = StageContext(spec.name, self.node.stage(spec.name), stop,
                           logging.getLogger(f"pipeline.{spec.name}"), self.node)
        p = FORK.Process(target=stage_main, args=(ctx, spec.target, *spec.args),
                         name=f"colo-{self.name}-{spec.name}", daemon=False)
        p.start()
        self.procs[spec.name] = p

    def _stop_stages(self, procs: dict[str, Any], stops: dict[str, Any]) -> None:
        """Stop these stages (their stop events, then SIGKILL after the grace period)."""
        for name in procs:
            stops[name].set()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for name, p in procs.items():
            if p.is_alive():
                log.warning("stage %s did not stop in %.0f s; killing it", name, STOP_GRACE_S)
                p.kill()
                p.join(1.0)

    def _free(self, rings: list[Ring], segments: list[Segment]) -> None:
        for ring in rings:
            ring.unlink()
            ring.close()
        for seg in segments:
            seg.unlink()
            seg.close()

    # -- the redirector (net.redirector_by_node) -------------------------------
    def _start_redirector(self) -> None:
        """This host's redirector, before any stage: it must hold the guest's interface
        and its pid file must be there before a takeover can signal it. It stays in the
        node's process group (lost with the host, as the node is) and runs until the node
        stops, whatever the node's role becomes. Its log lines go to the node's log."""
        import subprocess
        from pipeline.failover.roles import redirector_command
        cmd = redirector_command(self.config)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()       # "ready" once both streams are connected
        if line.strip() != "ready":
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the redirector did not start (exit code {proc.returncode}; "
                               f"its log is above): {' '.join(cmd)}")
        self.redirector = proc
        log.warning("node %s: event=redirector_started pid %d: %s", self.name, proc.pid,
                    " ".join(cmd[1:]))

    def _redirector_exited(self) -> str:
        """Why the node must stop: its redirector ended on its own ("" while it runs)."""
        if self.redirector is None or self.redirector.poll() is None:
            return ""
        return f"the redirector (pid {self.redirector.pid}) exited with code " \
               f"{self.redirector.returncode}"

    def _stop_redirector(self) -> None:
        """SIGTERM; its counters (its last line) into the node's log."""
        import subprocess
        proc, self.redirector = self.redirector, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            out, _ = proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        last = (out or "").strip().splitlines()[-1:] or [""]
        log.warning("node %s: event=redirector_stopped counters %s", self.name, last[0])

    # -- the survivor becomes the primary (node.role = "auto") -------------------
    def become_primary(self) -> int:
        """The secondary took over: its guest runs (the active SVM). Start the primary's
        stages around it, never pausing it: the secondary's data path stops; the primary's
        stages start; the old coordinator (it holds the role at the witness) and the
        mirror (it feeds the guest its input) run on until the new coordinator holds the
        role in the same generation; then the client stage takes over the input stream
        where the mirror stopped. The disk stage is not stopped either: it becomes the
        primary's in place, so the guest's disk export serves on without a gap (its
        image, the disk since the failover, is what a new secondary is synced from).
        Returns 0, or 1 if the new coordinator or the disk stage failed."""
        t0 = time.monotonic()
        info = self.node.node_info()
        generation = int(self.shared.generation.value)
        first_epoch = int(info.get("active_since_epoch", -1)) + 1
        log.warning("node %s: the survivor becomes the primary (generation %d, epochs from "
                    "%d)", self.name, generation, first_epoch)
        retiring = {n: self.procs.pop(n) for n in ("coordinator", "mirror") if n in self.procs}
        retiring_stops = {n: self.stage_stops.pop(n) for n in retiring}
        staying = {n: self.procs.pop(n) for n in ("disk",) if n in self.procs}
        staying_stops = {n: self.stage_stops.pop(n) for n in staying}
        self._stop_stages(self.procs, self.stage_stops)
        self.procs.clear()
        self.procs.update(staying)
        self.stage_stops.update(staying_stops)
        self._free(self.rings, self.segments)
        self.rings, self.segments = [], []
        self.settings = survivor_settings(self.config)
        if "disk" in staying:
            try:
                self._disk_becomes_primary(first_epoch)
            except Exception as exc:   # DiskControlError, or a reply that is not one
                self.exit_reason = f"the disk stage did not become the primary's: {exc}"
                log.error("node %s: %s", self.name, self.exit_reason)
                self._stop_stages(retiring, retiring_stops)
                return 1
        self.start_as = PrimaryStart(wait_for_secondary=True, generation=generation,
                                     first_epoch=first_epoch)
        plan = self._plan()
        self.shared.unprotected.value = 1
        self.domain.before_fork()
        for spec in plan:
            if spec.name not in ("coordinator", "client") and spec.name not in self.procs:
                self._start_stage(spec)
        self.node.set_node_info({**self.node.node_info(), "stage_pids": {
            name: p.pid for name, p in self.procs.items()}})
        self._start_stage(next(p for p in plan if p.name == "coordinator"))
        coordinator = self.procs["coordinator"]
        deadline = time.monotonic() + 60
        while True:
            info = self.node.node_info()
            if info.get("role") == "primary" and info.get("state") == "unprotected" \
                    and info.get("stage_pids", {}).get("coordinator") == coordinator.pid:
                break
            if self.stop_event.is_set():    # the node is told to stop: no role to wait for
                self._stop_stages(retiring, retiring_stops)
                return 0
            if not coordinator.is_alive() or time.monotonic() > deadline:
                self.exit_reason = "the new primary coordinator did not take the role"
                self._stop_stages(retiring, retiring_stops)
                return 1
            time.sleep(0.01)
        self._stop_stages(retiring, retiring_stops)
        client = [p for p in plan if p.name == "client"]
        if client:
            self._start_stage(client[0])
        if self.config.failover.redirector_pid_file:
            self._redirector_to_comparator(self.config.failover.redirector_pid_file)
        log.warning("node %s: primary's stages running around the guest after %.0f ms; "
                    "waiting for a secondary at %s", self.name,
                    (time.monotonic() - t0) * 1000, self.settings.peer.address)
        return 0

    def _redirector_to_comparator(self, path: str) -> None:
        """A real guest NIC: the redirector that bridged the guest since the takeover
        hands its interface to this node's comparator (SIGUSR2; it connects to the
        comparator's ``net.primary_in``/``primary_out``, its ``--primary-in``/``-out``).
        One that cannot be told is logged; the guest stays bridged, unprotected. (Logged
        only: the node info has one writer, the coordinator, running by now.)"""
        from pipeline.failover.takeover import signal_redirector
        ok, why = signal_redirector(path, signal.SIGUSR2)
        if ok:
            log.warning("node %s: event=redirector_reprotect %s", self.name, why)
        else:
            log.error("node %s: event=redirector_not_reprotected the guest's interface stays "
                      "bridged to the clients, its output uncompared: %s", self.name, why)

    def _disk_becomes_primary(self, first_epoch: int) -> None:
        """Tell the running disk stage (the secondary's) that it is the primary's now:
        unprotected, writes tagged from the epoch after the survivor's last, forwarded to
        the peer's address once a secondary joins there."""
        import zmq
        from pipeline.stages.disk import DiskControl
        context = zmq.Context()     # its own: the supervisor forks stages after this
        ctl = DiskControl(self.settings.run_dir, "secondary", context=context)
        try:
            ctl.become_primary(self.settings.disk.forward, first_epoch + 1,
                               give_up=self.stop_event.is_set)
        finally:
            ctl.close()
            context.term()

    # -- watching and stopping ---------------------------------------------
    def wait(self, timeout: float | None = None) -> int:
        """Block until a stage exits or ``timeout``; returns 0 while all run, else an exit code."""
        sentinels = {p.sentinel: name for name, p in self.procs.items()}
        ready = multiprocessing.connection.wait(list(sentinels), timeout)
        for sentinel in ready:
            name = sentinels[sentinel]
            self.procs[name].join(1.0)   # exitcode is only known once the child is reaped
            code = self.procs[name].exitcode
            if not self._stopping():
                how = f"killed by signal {-code}{fatal_signal_note(-code)}" \
                    if code is not None and code < 0 else f"exited with code {code}"
                self.exit_reason = f"stage {name} {how}{address_space_hint(code)}"
                log.error("node %s: %s; stopping the node", self.name, self.exit_reason)
                return 1
        return 0

    def stop(self) -> None:
        """Stop every stage (SIGTERM, then SIGKILL after a grace period) and free everything."""
        self.stop_event.set()
        for ev in self.stage_stops.values():
            ev.set()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for name, p in self.procs.items():
            if p.is_alive():
                log.warning("stage %s did not stop in %.0f s; killing it", name, STOP_GRACE_S)
                p.kill()
                p.join(1.0)
        self.procs.clear()
        self._stop_redirector()
        for ring in self.rings:
            ring.unlink()
            ring.close()
        self.rings.clear()
        for seg in self.segments:
            seg.unlink()
            seg.close()
        self.segments.clear()
        if self.node is not None:
            self.node.unlink()
            self.node.close()
            self.node = None
        if self.domain is not None:
            self.domain.close()
            self.domain = None
        if self.cpu_latency is not None and self.cpu_latency.held:
            self.cpu_latency.release()      # last: the stages ran with it to their end
            log.info("node %s: event=cpu_latency_released", self.name)
        self.cpu_latency = None

    def _hold_cpu_latency(self) -> None:
        """node.cpu_latency_us: hold the CPUs' wake-up latency limit for the node's life
        (pipeline/cpu_latency.py). The supervisor holds it, the one process that lives as
        long as the node, whatever its role becomes; its stages do not inherit it. Where
        it cannot be held the node runs on: one line says why, node info shows it."""
        us = self.config.node.cpu_latency_us
        if us < 0:
            return
        h = self.cpu_latency = cpu_latency.hold(us)
        if h.held:
            log.info("node %s: event=cpu_latency_held %d us on %s (in force: %s us)",
                     self.name, us, h.device, h.in_force_us)
        else:
            log.warning("node %s: event=cpu_latency_not_held %s; the node runs on, its "
                        "stages' wake-ups may be slower (node.cpu_latency_us)", self.name,
                        h.why_not)

    def _cpu_latency_status(self) -> dict[str, Any]:
        if self.cpu_latency is None:
            return {"held": False, "requested_us": self.config.node.cpu_latency_us,
                    "why_not": "off (node.cpu_latency_us = -1)"}
        return self.cpu_latency.status()

    def _draw_disk_sync(self) -> None:
        """A primary with a disk, on a terminal: the disk sync's bar
        (pipeline/disk/progress.py), redrawn while a sync runs. Not while the memory's full
        sync draws its own on the same line (the coordinator's, in node info
        ``sync_progress``)."""
        if self.node is None or not self.settings.disk.enabled \
                or self.settings.node.role != "primary":
            return
        if self.disk_bar is None:
            from pipeline.disk.progress import SyncBar
            self.disk_bar = SyncBar(sys.stderr)
        if not self.disk_bar.tty or self.node.node_info().get("sync_progress", 1.0) < 1.0:
            return
        from pipeline.disk.progress import sync_progress
        p = sync_progress(self.node.stage("disk").as_dict())
        if p is None:
            return
        if p["state"] == "running":
            self.disk_bar.show(p)
        elif p["syncs"] > self.disk_bars_ended:
            # each sync's last state (done, or failed) once, then a new line: also for a
            # sync that ran between two looks
            self.disk_bar.show(p)
            self.disk_bar.end()
            self.disk_bars_ended = p["syncs"]

    def run(self) -> int:
        """Start, watch until a signal or a stage failure, stop. Returns the exit code."""
        restore_signals = stop_on_signals((signal.SIGINT, signal.SIGTERM), self._stop_all,
                                          STOP_GRACE_S, noted=self._signalled)
        try:
            self.start()
            code = 0
            while not self._stopping():
                code = self.wait(0.05 if self.auto else 0.5)
                if code:
                    break
                why = self._redirector_exited()
                if why and not self._stopping():
                    self.exit_reason = why
                    log.error("node %s: %s; stopping the node", self.name, why)
                    code = 1
                    break
                self._draw_disk_sync()
                if self.auto and self.settings.node.role == "secondary" \
                        and self.shared.active.value:
                    code = self.become_primary()
                    if code:
                        break
            return code
        finally:
            self.stop()
            restore_signals()

    def _stopping(self) -> bool:
        """Told to stop: the stop event, or a signal whose handler ran before the
        stop-on-signal thread set the event (the flag first: it takes no lock)."""
        return self.signalled or self.stop_event.is_set()

    def _signalled(self) -> None:
        """In the signal handler itself (no lock: a plain assignment). A SIGTERM to the
        node's whole process group reaches its stages too, and one may exit before the
        stop-on-signal thread has set the stop event: the watch loop must not read that
        clean exit as a stage failure."""
        self.signalled = True

    def _stop_all(self) -> None:
        """Set the stop event and every stage's (SIGINT/SIGTERM, through
        :func:`pipeline.signals.stop_on_signals`, from its thread, never from the handler:
        the watch loop's ``stop_event.is_set()`` holds the lock ``set()`` takes; fault
        matrix, session 10: the node deadlocked in its own handler, a secondary that got
        SIGTERM took over and was SIGKILLed 30 s on with its segments left)."""
        self.stop_event.set()
        for ev in list(self.stage_stops.values()):   # every stage stops at once, as
            ev.set()                                 # with one shared event
