"""The disk stage process of each host, its local control channel, and a one-call pair.

Primary side  (:class:`PrimaryDisk`): NBD export of the PVM's disk; every write is
applied, forwarded to the secondary tagged with the epoch, and answered after the
secondary's ack. Learns epoch boundaries from the coordinator's ``snapshot`` events.

Secondary side (:class:`SecondaryDisk`): NBD export of the SVM's disk (overlay over
the image at the last checkpoint), the receiver of the forwarded PVM writes, the
disk comparator (requests checkpoints with cause ``disk_divergence``).

Control (:class:`DiskControl`, a REQ socket to ``<rundir>/disk-<role>-control.sock``)
— what the coordinator calls:

* secondary: ``wait_sealed(epoch, timeout_ms)`` (every write sealed into e arrived: the
  coordinator applies e's memory only then), ``commit(epoch)`` (call it while the SVM is
  paused, before acking e),
  ``discard_uncommitted()``, ``failover()``, ``stats()``, ``become_primary(forward,
  first_epoch)`` (the survivor of a takeover: the same stage, the same export, the
  primary's side from now on; its control moves to the primary's address)
* primary:   ``set_epoch(epoch)``, ``wait_forwarded(epoch, timeout_ms)``,
  ``wait_synced(timeout_ms)`` (the snapshot stage, before the pause: the initial sync is
  in the checkpoint; answered when it is, the control loop goes on meanwhile),
  ``unprotect()``, ``stats()`` (its ``given_up``: why the replication was last given
  up — cause, seq, reason, session, epoch, time — or None)

Events (``checkpoint-events.sock``): primary ``snapshot e`` → new writes are tagged
e+1; primary ``role unprotected`` → stop forwarding (writes waiting for the lost
secondary are answered at once); primary ``role primary`` (re-protection) → a new
initial sync to the new secondary, then forward again; secondary ``role active`` →
failover. An ``aborted`` epoch changes nothing on disk: its PVM writes stay buffered
and are applied by the next commit (which applies every buffered epoch ≤ its own),
because the primary's image already holds them.

For ``colo-pipeline demo``: :func:`start_disk_pair` runs both sides as child
processes on this machine and returns their NBD URIs.
"""
from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import zmq

from pipeline import faults
from pipeline.checkpoint_api import CheckpointClient
from pipeline.disk.comparator import DiskComparator
from pipeline.disk.counters import CounterSink, DiskCounters
from pipeline.disk.nbd_server import NbdServer
from pipeline.disk.primary import PrimaryBackend
from pipeline.disk.secondary import ForwardReceiver, SvmBackend
from pipeline.disk.settings import DiskSettings
from pipeline.disk.store import SecondaryStore, StoreError
from pipeline.signals import die_with_parent, stop_on_signals

log = logging.getLogger(__name__)

ROLES = ("primary", "secondary")


def control_address(rundir: str, role: str) -> str:
    return "ipc://" + os.path.join(rundir, f"disk-{role}-control.sock")


class PrimaryDisk:
    """The primary's disk stage, in-process (the process entry is :func:`run_disk_stage`).

    ``protected=False``: no secondary yet (role auto): writes are not forwarded until the
    coordinator's ``role primary`` (re-protection) starts a sync to the first one.
    ``server``: an export that already serves the guest (the SVM's, on the survivor of a
    takeover): it is handed to this side without closing (see :meth:`from_secondary`)."""

    def __init__(self, settings: DiskSettings, counters: DiskCounters | None = None,
                 forward: bool = True, context=None, secure=None, protected: bool = True,
                 first_epoch: int = 1, server: NbdServer | None = None) -> None:
        self.counters = counters or DiskCounters()
        self.backend = PrimaryBackend(settings, self.counters, context=context,
                                      forward=forward, secure=secure, protected=protected,
                                      first_epoch=first_epoch)
        if settings.initial_sync and protected:
            self.backend.start_sync()  # its BEGIN is ordered before any guest write
        if server is None:
            self.server = NbdServer(self.backend, settings.export, self.counters,
                                    "primary").start()
        else:
            server.set_backend(self.backend, "primary")
            self.server = server
        self.uri = self.server.uri

    @classmethod
    def from_secondary(cls, side: "SecondaryDisk", forward: str, first_epoch: int,
                       context=None, secure=None) -> "PrimaryDisk":
        """The survivor of a takeover: its SVM is the VM and its disk becomes the primary's,
        unprotected, forwarding to ``forward`` once a secondary joins. The export goes on
        serving the guest's open connections (no gap): their next request is the
        primary's; the store's image (the disk, merged at failover) is the primary's
        image and keeps its generation, so the old host coming back with its image gets
        an incremental sync."""
        side.store.failover()         # idempotent: the 'role active' event may not be in yet
        side.receiver.stop()          # the forwarding link's secondary end
        settings = replace(side.settings, forward=forward)
        primary = cls(settings, side.counters, context=context, secure=secure,
                      protected=False, first_epoch=first_epoch, server=side.server)
        side.store.close()            # no old link uses it any more (set_backend waited)
        log.warning("disk: the secondary's disk is the primary's now (unprotected, epochs "
                    "from %d, forwarding to %s once a secondary joins)", first_epoch, forward)
        return primary

    def command(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd == "set_epoch":
            self.backend.set_epoch(int(args["epoch"]))
            return {"epoch": self.backend.epoch}
        if cmd == "wait_forwarded":
            faults.point("disk.primary.wait_forwarded")
            return {"done": self.backend.wait_forwarded(int(args["epoch"]),
                                                        int(args.get("timeout_ms", 5000)) / 1e3)}
        if cmd == "wait_synced":
            return {"synced": self.backend.wait_synced(int(args.get("timeout_ms", 600_000))
                                                       / 1e3)}
        if cmd == "unprotect":
            self.backend.unprotect()
            return {"forwarding": False}
        if cmd == "stats":
            return {"counters": self.counters.snapshot(), "uri": self.uri,
                    "forwarding": self.backend.forward_address is not None,
                    "given_up": self.backend.given_up}
        raise ValueError(f"unknown primary disk command {cmd!r}")

    def on_event(self, event: str, epoch: int, extra: dict) -> None:
        if event == "snapshot":
            self.backend.set_epoch(epoch + 1)
        elif event == "role" and extra.get("role") == "unprotected":
            self.backend.unprotect()
        elif event == "role" and extra.get("role") == "primary":
            self.backend.reprotect()   # a new secondary: sync it, then forward again

    def close(self) -> None:
        self.server.stop()
        self.backend.close()


class NewSyncSession(StoreError):
    """A commit of an epoch from before the primary's new initial sync: the primary started
    over with this secondary (its reply names this class: the coordinator stops as stale)."""


class SecondaryDisk:
    """The secondary's disk stage, in-process."""

    def __init__(self, settings: DiskSettings, counters: DiskCounters | None = None,
                 checkpoints: CheckpointClient | None = None, context=None,
                 secure=None) -> None:
        self.counters = counters or DiskCounters()
        self.settings = settings
        self.store = SecondaryStore(settings.image, settings.export_size, settings.block_size,
                                    settings.resolved_state_dir, settings.overlay_max_bytes,
                                    settings.buffer_max_bytes, self.counters,
                                    durable=settings.durable_commit)
        request = checkpoints.request if checkpoints else (lambda cause, detail: None)
        self.comparator = DiskComparator(settings.compare, settings.compare_timeout_ms,
                                         self.counters, request)
        self.receiver = ForwardReceiver(settings.forward, self.store, self.comparator,
                                        self.counters, context=context, secure=secure)
        self.forward_endpoint = self.receiver.endpoint
        self.receiver.start()
        self.server = NbdServer(SvmBackend(self.store, self.comparator, settings.max_request,
                                           self.counters),
                                settings.export, self.counters, "secondary").start()
        self.uri = self.server.uri

    def commit(self, epoch: int) -> None:
        began = self.receiver.session_epoch
        if self.store.syncing and began > epoch:
            # an epoch of the old session, committed after a re-protecting primary's new
            # sync began (a partition healed while this one still held the epoch's BEGIN)
            raise NewSyncSession(f"commit({epoch}): the primary began a new initial disk "
                                 f"sync at epoch {began}: this secondary's session is over")
        # the pages of e can be complete before the last writes of e arrived (they travel
        # on other sockets): wait for every write the primary sealed into e
        if epoch > self.store.committed_epoch:
            self.receiver.sealed.wait(epoch, self.settings.forward_timeout_ms / 1e3)
            self.store.commit(epoch, covers_seq=self.receiver.sealed.need(epoch))
            self.comparator.epoch_committed(epoch)
        if self.store.syncing:  # (a retried commit of the same epoch says so again)
            # the checkpoint holds only part of the disk: the SVM must not run on it
            raise StoreError(f"commit({epoch}): the initial disk sync was not complete "
                             f"before checkpoint {epoch} (the primary orders its END "
                             f"before the first checkpoint's pause)")

    def sealed(self, epoch: int, timeout_s: float) -> bool:
        """Whether every write the primary sealed into ``epoch`` (and before) arrived,
        waiting up to ``timeout_s``: the coordinator applies the epoch's memory only then.
        True for an epoch committed already, or of an old session (its commit says why)."""
        if epoch <= self.store.committed_epoch or \
                self.store.syncing and self.receiver.session_epoch > epoch:
            return True
        return self.receiver.sealed.complete(epoch, timeout_s)

    def command(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd == "wait_sealed":
            return {"sealed": self.sealed(int(args["epoch"]),
                                          int(args.get("timeout_ms", 0)) / 1e3)}
        if cmd == "commit":
            self.commit(int(args["epoch"]))
            return {"committed": self.store.committed_epoch}
        if cmd == "discard_uncommitted":
            return {"discarded_epochs": self.store.discard_uncommitted()}
        if cmd == "failover":
            self.store.failover()
            return {"active": True}
        if cmd == "stats":
            return {"counters": self.counters.snapshot(), "uri": self.uri,
                    "forward": self.forward_endpoint, "committed": self.store.committed_epoch}
        raise ValueError(f"unknown secondary disk command {cmd!r}")

    def on_event(self, event: str, epoch: int, extra: dict) -> None:
        if event == "role" and extra.get("role") == "active":
            self.store.failover()

    def close(self) -> None:
        self.server.stop()
        self.receiver.stop()
        self.store.close()


class _Requests:
    """The control socket of a disk stage (a ROUTER, so a request can be answered later:
    ``wait_synced`` is parked until the sync is far enough, and the loop meanwhile
    answers every other request and sees its stop)."""

    def __init__(self, rundir: str, role: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(control_address(rundir, role))
        #: parked wait_synced requests: (envelope, deadline)
        self.parked: list[tuple[list[bytes], float]] = []

    def recv(self) -> tuple[list[bytes], bytes]:
        frames = self.socket.recv_multipart()
        return frames[:-1], frames[-1]     # the REQ envelope (identity, empty), the body

    def reply(self, envelope: list[bytes], reply: dict) -> None:
        self.socket.send_multipart(envelope + [json.dumps(reply).encode()])

    def answer_parked(self, ready: bool, now: float) -> None:
        """Answer the parked waits: synced once ``ready``, not synced past their deadline."""
        keep = []
        for envelope, deadline in self.parked:
            if ready or now >= deadline:
                self.reply(envelope, {"ok": True, "synced": ready})
            else:
                keep.append((envelope, deadline))
        self.parked = keep

    def close(self) -> None:
        self.socket.close(0)


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: buffers up to this size come from the heap and are reused once freed (glibc's ceiling
#: for the mmap threshold; every NBD request fits: disk.max_request is at most 32 MiB)
MALLOC_MMAP_THRESHOLD = 32 << 20
#: free heap memory kept for reuse before any of it is given back to the kernel
MALLOC_TRIM_THRESHOLD = 128 << 20


def keep_freed_buffers() -> bool:
    """Make this process reuse the memory of the request and message buffers it frees
    (glibc). Each write's payload is a new buffer on both sides: the primary's receive
    buffer, ZeroMQ's message buffer on the secondary. glibc served the 1 MiB ones by
    fresh mmaps or trimmed them back to the kernel, so every write faulted its pages in
    again and the kernel zeroed them first: 25-100 minor faults per MiB written on each
    side. With these, 0-7; both stages' CPU per MiB of 1 MiB replicated writes 2.07 ->
    1.96 ms (-5 %; medians of 4 runs each, alternating, load 9-11); 4 KiB writes
    unchanged (11.5 / 11.8 ms, within noise). The cost: up to MALLOC_TRIM_THRESHOLD of
    freed memory stays with the process. False where mallopt is not glibc's (nothing
    changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def run_disk_stage(role: str, settings: DiskSettings, rundir: str,
                   counters_sink: CounterSink | None = None, ready: Any = None,
                   stop: threading.Event | Any | None = None, context: Any = None,
                   secure: Any = None, protected: bool = True) -> None:
    """Process entry of the disk stage: serve until SIGTERM, a ``stop`` command or ``stop``.

    ``ready`` (optional, a multiprocessing Connection) receives
    ``{"uri": ..., "forward": ...}`` once the export listens, or ``{"error": ...}``.
    ``protected=False`` (primary, role auto): no secondary yet, see :class:`PrimaryDisk`.

    A secondary's stage becomes the primary's on the ``become_primary`` command (the
    survivor of a takeover, ``Supervisor.become_primary``): same process, same export,
    its control socket moves to the primary's address.
    """
    if role not in ROLES:
        raise ValueError(f"disk stage role {role!r}: expected one of {ROLES}")
    keep_freed_buffers()
    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Not a handler calling stopping.set(): the "stop" command below sets it in this
        # thread, holding its lock, and a SIGTERM landing then would wait for that lock
        # forever. Kept until the process ends, as the handler it replaces was.
        stop_on_signals((signal.SIGTERM,), stopping.set)
    counters = DiskCounters(counters_sink)
    checkpoints = CheckpointClient(rundir)
    try:
        side: PrimaryDisk | SecondaryDisk = (
            PrimaryDisk(settings, counters, context=context, secure=secure,
                        protected=protected)
            if role == "primary"
            else SecondaryDisk(settings, counters, checkpoints, context=context, secure=secure))
    except Exception as e:
        if ready is not None:
            ready.send({"error": f"{type(e).__name__}: {e}"})
        checkpoints.close()
        raise
    # the sync thread wakes the loop when a parked wait_synced can be answered
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def on_sync_progress() -> None:
        os.eventfd_write(wake, 1)
    if isinstance(side, PrimaryDisk):
        side.backend.wakeup = on_sync_progress
    control = _Requests(rundir, role)
    if ready is not None:
        ready.send({"uri": side.uri, "forward": getattr(side, "forward_endpoint", None)})
    poller = zmq.Poller()
    poller.register(control.socket, zmq.POLLIN)
    poller.register(checkpoints.events_in, zmq.POLLIN)
    poller.register(wake, zmq.POLLIN)
    try:
        while not stopping.is_set() and not (stop is not None and stop.is_set()):
            faults.point("stage.disk.loop")
            now = time.monotonic()
            timeout = 200 if not control.parked else \
                max(0.0, min(200.0, (min(d for _e, d in control.parked) - now) * 1000))
            events = dict(poller.poll(timeout))
            if wake in events:
                try:
                    os.eventfd_read(wake)
                except BlockingIOError:
                    pass
            if checkpoints.events_in in events:
                for ev in checkpoints.poll_events(0):
                    side.on_event(ev.event, ev.epoch, ev.extra)
            if control.socket in events:
                envelope, msg = control.recv()
                reply: dict | None
                try:
                    req = json.loads(msg)
                    cmd = req.pop("cmd")
                    if cmd == "stop":
                        stopping.set()
                        reply = {"ok": True}
                    elif cmd == "wait_synced" and isinstance(side, PrimaryDisk):
                        # parked, never waited for here: the loop must go on answering
                        wait_s = int(req.get("timeout_ms", 600_000)) / 1e3
                        control.parked.append((envelope, time.monotonic() + wait_s))
                        reply = None
                    elif cmd == "become_primary" and isinstance(side, SecondaryDisk):
                        side = PrimaryDisk.from_secondary(
                            side, str(req["forward"]), int(req.get("first_epoch", 1)),
                            context=context, secure=secure)
                        side.backend.wakeup = on_sync_progress
                        control.reply(envelope, {"ok": True, "role": "primary",
                                                 "uri": side.uri})
                        # the primary's stages call the primary's address
                        poller.unregister(control.socket)
                        control.close()
                        control = _Requests(rundir, "primary")
                        poller.register(control.socket, zmq.POLLIN)
                        role = "primary"
                        reply = None
                    else:
                        reply = {"ok": True, **side.command(cmd, req)}
                        if cmd == "stats":
                            reply["parked_waits"] = len(control.parked)
                except (ValueError, KeyError, TypeError, StoreError, OSError) as e:
                    log.error("disk %s: control request %r failed: %s", role, msg[:200], e)
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                if reply is not None:
                    control.reply(envelope, reply)
            if control.parked:
                control.answer_parked(side.backend.ready_for_checkpoint()
                                      if isinstance(side, PrimaryDisk) else True,
                                      time.monotonic())
    finally:
        control.answer_parked(False, float("inf"))   # stopping: not synced, say so
        control.close()
        os.close(wake)
        side.close()
        checkpoints.close()


class DiskControlError(RuntimeError):
    pass


class DiskControl:
    """The coordinator's handle on a disk stage process (synchronous, with a timeout)."""

    #: what a failed call raises (named here so that a holder of the handle, such as the
    #: takeover in pipeline/failover/, catches it without importing the stages)
    Error = DiskControlError

    def __init__(self, rundir: str, role: str, timeout_ms: int = 30_000,
                 context: zmq.Context | None = None) -> None:
        self.address = control_address(rundir, role)
        self.timeout_ms = timeout_ms
        self.context = context
        self._sock: zmq.Socket | None = None

    def call(self, cmd: str, reply_timeout_ms: int | None = None, give_up=None,
             **args: Any) -> dict[str, Any]:
        """One request; its reply (DiskControlError if it failed, or none came within
        ``reply_timeout_ms``, or ``give_up()`` became true meanwhile)."""
        if self._sock is None:
            self._sock = (self.context or zmq.Context.instance()).socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        self._sock.send(json.dumps({"cmd": cmd, **args}).encode())
        wait_ms = reply_timeout_ms or self.timeout_ms
        deadline = time.monotonic() + wait_ms / 1e3
        while not self._sock.poll(200 if give_up is not None else wait_ms):
            if give_up is None or time.monotonic() > deadline or give_up():
                self._sock.close(0)  # a REQ socket without its reply is stuck: start afresh
                self._sock = None
                raise DiskControlError(f"disk control {cmd} at {self.address}: no reply in "
                                       f"{wait_ms} ms" if give_up is None or not give_up()
                                       else f"disk control {cmd}: given up (stopping)")
        reply = json.loads(self._sock.recv())
        if not reply.pop("ok"):
            raise DiskControlError(f"disk control {cmd} {args}: {reply['error']}")
        return reply

    def commit(self, epoch: int) -> None:
        self.call("commit", epoch=epoch)

    def wait_sealed(self, epoch: int, timeout_ms: int) -> bool:
        """Secondary: True once every write the primary sealed into ``epoch`` arrived,
        False after ``timeout_ms`` (a short slice: the caller looks at its peer between)."""
        return self.call("wait_sealed", epoch=epoch, timeout_ms=timeout_ms)["sealed"]

    def discard_uncommitted(self) -> int:
        return self.call("discard_uncommitted")["discarded_epochs"]

    def failover(self) -> None:
        self.call("failover")

    def set_epoch(self, epoch: int) -> None:
        self.call("set_epoch", epoch=epoch)

    def unprotect(self) -> None:
        self.call("unprotect")

    def become_primary(self, forward: str, first_epoch: int, give_up=None) -> dict[str, Any]:
        """Secondary side, after a takeover: become the primary's disk stage in place
        (see :meth:`PrimaryDisk.from_secondary`); its control moves to the primary's
        address. Waits long: the failover's merge of a large overlay may still run."""
        return self.call("become_primary", reply_timeout_ms=600_000, give_up=give_up,
                         forward=forward, first_epoch=first_epoch)

    def wait_synced(self, timeout_ms: int = 600_000) -> bool:
        """Wait until the initial disk sync has ordered its last extent (a checkpoint after
        this holds the whole disk); True, or False after ``timeout_ms``."""
        return self.call("wait_synced", reply_timeout_ms=timeout_ms + self.timeout_ms,
                         timeout_ms=timeout_ms)["synced"]

    def wait_forwarded(self, epoch: int, timeout_ms: int = 5000,
                       reply_timeout_ms: int | None = None) -> bool:
        """True once every write of ``epoch`` and before was acked by the secondary, False
        after ``timeout_ms``. ``reply_timeout_ms``: how long to wait for the stage's
        answer at all (default: ``timeout_ms`` plus the control timeout)."""
        return self.call("wait_forwarded", epoch=epoch, timeout_ms=timeout_ms,
                         reply_timeout_ms=reply_timeout_ms or timeout_ms + self.timeout_ms
                         )["done"]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


@dataclass
class DiskPair:
    """A primary and a secondary disk stage running as child processes of this one."""

    primary_uri: str
    secondary_uri: str
    forward: str
    rundir: str
    primary: DiskControl
    secondary: DiskControl
    processes: tuple

    def stop(self, timeout: float = 10) -> None:
        for ctl in (self.primary, self.secondary):
            ctl.close()
        for p in self.processes:
            if p.is_alive():
                p.terminate()  # SIGTERM: the stage closes its exports and files
        for p in self.processes:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(timeout)

    def __enter__(self) -> DiskPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _disk_child(parent_pid: int, role: str, settings: DiskSettings, rundir: str,
                ready: Any) -> None:
    """A :func:`start_disk_pair` side: ends when the process that started it dies (a
    benchmark killed by SIGTERM or SIGKILL left both sides serving, with their images)."""
    die_with_parent(parent_pid)
    run_disk_stage(role, settings, rundir, None, ready)


def _start_stage(ctx, role: str, settings: DiskSettings, rundir: str, timeout: float):
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_disk_child, args=(os.getpid(), role, settings, rundir, child),
                       name=f"colo-disk-{role}", daemon=True)
    proc.start()
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        raise RuntimeError(f"disk {role} stage did not start within {timeout} s")
    try:
        info = parent.recv()
    except EOFError:
        proc.join(timeout)
        raise RuntimeError(f"disk {role} stage exited with {proc.exitcode} before it "
                           f"was ready") from None
    if "error" in info:
        proc.join(timeout)
        raise RuntimeError(f"disk {role} stage failed to start: {info['error']}")
    return proc, info


def start_disk_pair(workdir: str, export_size: int, block_size: int = 4096,
                    compare: str = "checkpoint", rundir: str | None = None,
                    primary_export: str = "127.0.0.1:0", secondary_export: str = "127.0.0.1:0",
                    timeout: float = 30, **settings: Any) -> DiskPair:
    """Start a replicated disk on this machine: ``<workdir>/primary.img`` exported at
    ``primary_uri`` (give it to the PVM), ``<workdir>/secondary.img`` (+ its state dir)
    at ``secondary_uri`` (give it to the SVM), linked over tcp://127.0.0.1 on a free port.
    ``rundir`` is where the coordinator's checkpoint sockets live (default: workdir).
    Extra keyword arguments are DiskSettings fields for both sides. Stop with ``.stop()``."""
    rundir = rundir or workdir
    os.makedirs(workdir, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    sec_settings = DiskSettings(image=os.path.join(workdir, "secondary.img"),
                                export_size=export_size, block_size=block_size,
                                export=secondary_export, forward="tcp://127.0.0.1:*",
                                compare=compare, **settings)
    sec_proc, sec_info = _start_stage(ctx, "secondary", sec_settings, rundir, timeout)
    try:
        pri_settings = replace(sec_settings, image=os.path.join(workdir, "primary.img"),
                               export=primary_export, forward=sec_info["forward"])
        pri_proc, pri_info = _start_stage(ctx, "primary", pri_settings, rundir, timeout)
    except BaseException:
        sec_proc.kill()
        sec_proc.join(timeout)
        raise
    return DiskPair(pri_info["uri"], sec_info["uri"], sec_info["forward"], rundir,
                    DiskControl(rundir, "primary"), DiskControl(rundir, "secondary"),
                    (pri_proc, sec_proc))
