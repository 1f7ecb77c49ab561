"""The disk stage process of each host, its local control channel, and a one-call pair.

Primary side  (:class:`PrimaryDisk`): NBD export of the PVM's disk; every write is
applied, forwarded to the secondary tagged with the epoch, and answered after the
secondary's ack. Learns epoch boundaries from the coordinator's ``snapshot`` events.

Secondary side (:class:`SecondaryDisk`): NBD export of the SVM's disk (overlay over
the image at the last checkpoint), the receiver of the forwarded PVM writes, the
disk comparator (requests checkpoints with cause ``disk_divergence``).

Control (:class:`DiskControl`, a REQ socket to ``<rundir>/disk-<role>-control.sock``)
— what the coordinator calls:

* secondary: ``commit(epoch)`` (call it while the SVM is paused, before acking e),
  ``discard_uncommitted()``, ``failover()``, ``stats()``
* primary:   ``set_epoch(epoch)``, ``wait_forwarded(epoch, timeout_ms)``,
  ``wait_synced(timeout_ms)`` (the snapshot stage, before the pause: the initial sync is
  in the checkpoint), ``unprotect()``, ``stats()``

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

import json
import logging
import multiprocessing
import os
import signal
import threading
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

log = logging.getLogger(__name__)

ROLES = ("primary", "secondary")


def control_address(rundir: str, role: str) -> str:
    return "ipc://" + os.path.join(rundir, f"disk-{role}-control.sock")


class PrimaryDisk:
    """The primary's disk stage, in-process (the process entry is :func:`run_disk_stage`)."""

    def __init__(self, settings: DiskSettings, counters: DiskCounters | None = None,
                 forward: bool = True, context=None, secure=None) -> None:
        self.counters = counters or DiskCounters()
        self.backend = PrimaryBackend(settings, self.counters, context=context,
                                      forward=forward, secure=secure)
        if settings.initial_sync:
            self.backend.start_sync()  # its BEGIN is ordered before any guest write
        self.server = NbdServer(self.backend, settings.export, self.counters, "primary").start()
        self.uri = self.server.uri

    def command(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd == "set_epoch":
            self.backend.set_epoch(int(args["epoch"]))
            return {"epoch": self.backend.epoch}
        if cmd == "wait_forwarded":
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
                    "forwarding": self.backend.forward_address is not None}
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

    def command(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
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


def run_disk_stage(role: str, settings: DiskSettings, rundir: str,
                   counters_sink: CounterSink | None = None, ready: Any = None,
                   stop: threading.Event | Any | None = None, context: Any = None,
                   secure: Any = None) -> None:
    """Process entry of the disk stage: serve until SIGTERM, a ``stop`` command or ``stop``.

    ``ready`` (optional, a multiprocessing Connection) receives
    ``{"uri": ..., "forward": ...}`` once the export listens, or ``{"error": ...}``.
    """
    if role not in ROLES:
        raise ValueError(f"disk stage role {role!r}: expected one of {ROLES}")
    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    counters = DiskCounters(counters_sink)
    checkpoints = CheckpointClient(rundir)
    try:
        side: PrimaryDisk | SecondaryDisk = (
            PrimaryDisk(settings, counters, context=context, secure=secure)
            if role == "primary"
            else SecondaryDisk(settings, counters, checkpoints, context=context, secure=secure))
    except Exception as e:
        if ready is not None:
            ready.send({"error": f"{type(e).__name__}: {e}"})
        checkpoints.close()
        raise
    ctx = zmq.Context.instance()
    control = ctx.socket(zmq.REP)
    control.setsockopt(zmq.LINGER, 0)
    control.bind(control_address(rundir, role))
    if ready is not None:
        ready.send({"uri": side.uri, "forward": getattr(side, "forward_endpoint", None)})
    poller = zmq.Poller()
    poller.register(control, zmq.POLLIN)
    poller.register(checkpoints.events_in, zmq.POLLIN)
    try:
        while not stopping.is_set() and not (stop is not None and stop.is_set()):
            faults.point("stage.disk.loop")
            events = dict(poller.poll(200))
            if checkpoints.events_in in events:
                for ev in checkpoints.poll_events(0):
                    side.on_event(ev.event, ev.epoch, ev.extra)
            if control in events:
                msg = control.recv()
                try:
                    req = json.loads(msg)
                    cmd = req.pop("cmd")
                    if cmd == "stop":
                        stopping.set()
                        reply = {"ok": True}
                    else:
                        reply = {"ok": True, **side.command(cmd, req)}
                except (ValueError, KeyError, TypeError, StoreError, OSError) as e:
                    log.error("disk %s: control request %r failed: %s", role, msg[:200], e)
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                control.send(json.dumps(reply).encode())
    finally:
        control.close(0)
        side.close()
        checkpoints.close()


class DiskControlError(RuntimeError):
    pass


class DiskControl:
    """The coordinator's handle on a disk stage process (synchronous, with a timeout)."""

    def __init__(self, rundir: str, role: str, timeout_ms: int = 30_000) -> None:
        self.address = control_address(rundir, role)
        self.timeout_ms = timeout_ms
        self._sock: zmq.Socket | None = None

    def call(self, cmd: str, reply_timeout_ms: int | None = None, **args: Any) -> dict[str, Any]:
        if self._sock is None:
            self._sock = zmq.Context.instance().socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        self._sock.send(json.dumps({"cmd": cmd, **args}).encode())
        if not self._sock.poll(reply_timeout_ms or self.timeout_ms):
            self._sock.close(0)  # a REQ socket without its reply is stuck: start afresh
            self._sock = None
            raise DiskControlError(f"disk control {cmd} at {self.address}: no reply in "
                                   f"{self.timeout_ms} ms")
        reply = json.loads(self._sock.recv())
        if not reply.pop("ok"):
            raise DiskControlError(f"disk control {cmd} {args}: {reply['error']}")
        return reply

    def commit(self, epoch: int) -> None:
        self.call("commit", epoch=epoch)

    def discard_uncommitted(self) -> int:
        return self.call("discard_uncommitted")["discarded_epochs"]

    def failover(self) -> None:
        self.call("failover")

    def set_epoch(self, epoch: int) -> None:
        self.call("set_epoch", epoch=epoch)

    def unprotect(self) -> None:
        self.call("unprotect")

    def wait_synced(self, timeout_ms: int = 600_000) -> bool:
        """Wait until the initial disk sync has ordered its last extent (a checkpoint after
        this holds the whole disk); True, or False after ``timeout_ms``."""
        return self.call("wait_synced", reply_timeout_ms=timeout_ms + self.timeout_ms,
                         timeout_ms=timeout_ms)["synced"]

    def wait_forwarded(self, epoch: int, timeout_ms: int = 5000) -> bool:
        return self.call("wait_forwarded", epoch=epoch, timeout_ms=timeout_ms)["done"]

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


def _start_stage(ctx, role: str, settings: DiskSettings, rundir: str, timeout: float):
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_disk_stage, args=(role, settings, rundir, None, child),
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
