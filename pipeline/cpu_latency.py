"""The CPUs' wake-up latency limit, held for as long as a node runs (the kernel's PM QoS).

What it does: a process that opens ``/dev/cpu_dma_latency``, writes a native int32 (a
latency in microseconds) and keeps the file open asks every CPU's idle governor not to
enter an idle state that takes longer than that to leave. The request lives as long as
the open file: closing it (or the process's death, however it dies: the kernel closes
its files) drops it. Reading the file gives the value in force, the lowest request of
all processes (2000000000 while nobody asks). At 0 an idle CPU polls instead of halting.

Why a node holds it: a checkpoint is about 40 wake-ups of the node's stage processes
(BEGIN, the pause, each batch's hand-offs, the ACK: docs/tuning.md, "Session 14
(commit)"), most of them of a process asleep on an idle CPU. When that CPU halts, each
wake-up costs the CPU's exit from its idle state; in a VM (cpuidle driver ``haltpoll``
with polling off, as on the project's 2-core VM) a halted vCPU is a VM exit, and its
wake-up an IPI through the host and the host's scheduling: a pipe ping-pong between two
processes on two CPUs took 77 us round trip (p50; p99 190) with the CPUs halting, 6.7 us
(p99 31) with the limit held at 0; a benchmark pair at load ~1.5 committed 1k dirty pages in
~7.4-8 ms instead of ~9.5 and 4k in ~15-16 instead of ~20 (session 17's start). It acts on
idle CPUs only: at load 4-10, where the CPUs never idled, it changed nothing either way
(docs/tuning.md, "Session 17 (wake)").

What it costs: an idle CPU polls (runs) instead of sleeping. On a VM the host sees the
vCPUs busy all the time: it cannot give that CPU time to other guests, nor save it. On
bare metal the cores stay out of their deep C-states: more power and heat, and less
turbo headroom for the busy cores. That is the same trade as tuned's
``latency-performance`` profile (``force_latency``) and the low-latency setups of
real-time and packet-processing systems; a node that protects a service for its
clients' latency makes it by default (``node.cpu_latency_us = 0``), ``-1`` leaves the
CPUs to the kernel's default.

Only the process that holds the request keeps it: a child forked by it closes its copy
of the file at once (:func:`os.register_at_fork`), so the node's stages never carry the
request past their supervisor, and the supervisor's exit alone ends it.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from pipeline import faults

DEVICE = "/dev/cpu_dma_latency"
#: what the device reads while no process holds a request (PM_QOS_CPU_LATENCY_DEFAULT_VALUE)
NOBODY_US = 2_000_000_000
_INT32 = struct.Struct("=i")        # native byte order, as the kernel reads it

#: the files of the holds this process made, closed in every child it forks
_held_fds: set[int] = set()


def _close_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


def in_force_us(device: str = DEVICE) -> int:
    """The limit in force now, for the whole machine (every process's request counts)."""
    with open(device, "rb") as fh:
        return _INT32.unpack(fh.read(_INT32.size))[0]


def holds(pid: int, device: str = DEVICE) -> bool | None:
    """Whether process ``pid`` has ``device`` open now (a request lives as long as its open
    file); ``None`` where its files cannot be looked at (another user's process, not root)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False            # the process is gone, and its request with it
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == device:
                return True
        except OSError:         # closed while we looked, or not ours to read
            pass
    return False


def describe(status: dict[str, Any], now_us: int | None, unreadable: str = "",
             still_holds: bool | None = None) -> str:
    """One line for ``colo-pipeline stats``: what the node asked at start (``status``, its
    node info's ``cpu_latency``) and the machine's value in force now (``now_us``, None
    with ``unreadable`` saying why): another process may hold a lower value, and a node that
    held it may have lost it (``still_holds``: its process's open file, :func:`holds`)."""
    if now_us is None:
        now = f"in force now: unknown ({unreadable or 'cannot read ' + DEVICE})"
    elif now_us >= NOBODY_US:
        now = f"in force now: none ({now_us}: nobody holds it)"
    else:
        now = f"in force now: {now_us} us"
    if not status.get("held"):
        return f"CPU wake-up latency not held: {status.get('why_not', '')}; {now}"
    asked = status["requested_us"]
    line = (f"CPU wake-up latency held at {asked} us (in force at start: "
            f"{status.get('in_force_us', '?')} us); {now}")
    if still_holds is False or (now_us is not None and now_us > asked):
        return line + " -- this node's hold is LOST: " + (
            "its process has the device open no more" if still_holds is False
            else "the value in force is above what it asked")
    if now_us is not None and now_us < asked:
        return line + " (another process asks for less)"
    return line


@dataclass
class CpuLatencyHold:
    """One request on the device: ``held`` while its file is open. ``why_not`` says why a
    request could not be made (the device missing, no permission, ...)."""
    requested_us: int
    device: str = DEVICE
    fd: int = -1
    in_force_us: int | None = None      # read back right after the request was made
    why_not: str = ""

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def status(self) -> dict[str, Any]:
        """For the node info (``colo-pipeline stats``, the Prometheus endpoint)."""
        out: dict[str, Any] = {"held": self.held, "requested_us": self.requested_us,
                               "device": self.device}
        if self.in_force_us is not None:
            out["in_force_us"] = self.in_force_us
        if self.why_not:
            out["why_not"] = self.why_not
        return out

    def release(self) -> None:
        """Close the file: the kernel drops the request (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _held_fds.discard(fd)
            os.close(fd)


def hold(us: int, device: str = DEVICE) -> CpuLatencyHold:
    """Ask for a wake-up latency of at most ``us`` microseconds and keep asking until
    :meth:`CpuLatencyHold.release`. Never raises for a request the system refuses: the
    hold comes back not held, ``why_not`` naming the file and the error. Fault point
    ``cpu_latency.open`` (with ``errno=NAME``: the open fails so)."""
    h = CpuLatencyHold(us, device)
    fd = -1
    try:
        faults.point("cpu_latency.open")
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        os.write(fd, _INT32.pack(us))
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        h.why_not = f"cannot hold {device} at {us} us: {exc.strerror or exc}" + (
            " (the kernel has no PM QoS device: no CONFIG_CPU_IDLE, or a dom0 kernel "
            "without it)" if isinstance(exc, FileNotFoundError) else
            " (root or write access to it is needed)" if isinstance(exc, PermissionError)
            else "")
        return h
    h.fd = fd
    _held_fds.add(fd)
    try:
        h.in_force_us = in_force_us(device)
    except OSError:
        pass        # held all the same; the value in force is only shown
    return h


class InForceWatch:
    """The value in force, sampled every ``interval_s`` in a thread while a benchmark runs:
    the limit is the whole machine's (any process's request counts), so an A/B of it is
    valid only where each arm's runs had the value the arm says throughout. ``summary()``:
    ``None`` where the device cannot be read (not root), else the lowest and highest value
    seen, the samples and the share of them with some process holding a limit."""

    def __init__(self, interval_s: float = 0.1, device: str = DEVICE) -> None:
        import threading
        self.interval_s, self.device = interval_s, device
        self.values: list[int] = []
        self.unreadable = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-latency-watch",
                                        daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.values.append(in_force_us(self.device))
            except OSError as exc:
                self.unreadable = f"{self.device}: {exc.strerror or exc}"
                return
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "InForceWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any] | None:
        if not self.values:
            return None
        return {"min_us": min(self.values), "max_us": max(self.values),
                "samples": len(self.values),
                "share_held": round(sum(v < NOBODY_US for v in self.values)
                                    / len(self.values), 3)}
