"""The net-compare stage process: the network comparator driven by our coordinator.

Builds :class:`pipeline.net.loop.CompareLoop` from the ``[net]`` settings; the
adapters named there bring the PVM's and the SVM's frames; checkpoints are
requested through :class:`pipeline.checkpoint_api.CheckpointClient` (causes
``net_divergence`` / ``net_timeout`` / ``net_queue_full``) and held frames are released
on the SVM's commit: the boundary in its stream when the sim guests' output ports feed
the comparator (``in_band``), else the coordinator's ``committed`` event. A ``role``
event of ``active`` or ``unprotected`` stops comparing and releases everything held.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Protocol

from pipeline import faults
from pipeline.checkpoint_api import CheckpointClient
from pipeline.net.comparator import COUNTER_NAMES
from pipeline.net.control import CoordinatorControl
from pipeline.net.loop import CompareLoop, tune_gc
from pipeline.net.settings import NetSettings

log = logging.getLogger(__name__)

#: how often the comparator's counters are copied into the shared-memory block
COUNTER_SYNC_S = 0.2

#: the comparator's own counters; the supervisor registers them for this stage
NET_COMPARE_COUNTERS = COUNTER_NAMES

#: the generic stage counters filled from the comparator's
_GENERIC = {"items_in": ("primary_frames_in", "secondary_frames_in"),
            "bytes_in": ("primary_bytes_in", "secondary_bytes_in"),
            "items_out": ("frames_released",), "bytes_out": ("bytes_released",)}


class CounterSink(Protocol):
    def add(self, name: str, n: int) -> None: ...


class CounterMirror:
    """Copies the comparator's counters into a stage's counter block as deltas, a few
    times a second (cheaper than a shared-memory write per frame)."""

    def __init__(self, source: dict[str, int], sink: CounterSink | None) -> None:
        self.source, self.sink = source, sink
        self._last = dict.fromkeys(source, 0)
        self._missing: set[str] = set()

    def sync(self) -> None:
        if self.sink is None:
            return
        deltas = {}
        for name, value in self.source.items():
            delta = value - self._last[name]
            if delta:
                deltas[name] = delta
                self._last[name] = value
        for name, delta in deltas.items():
            self._add(name, delta)
        for generic, names in _GENERIC.items():
            n = sum(deltas.get(name, 0) for name in names)
            if n:
                self._add(generic, n)

    def _add(self, name: str, n: int) -> None:
        try:
            self.sink.add(name, n)
        except KeyError:
            # the block was made without this counter: say so once, keep running
            if name not in self._missing:
                self._missing.add(name)
                log.warning("net-compare: the counter block has no %r (register "
                            "NET_COMPARE_COUNTERS for this stage)", name)


def compare_loop(settings: NetSettings, control, in_band: bool) -> CompareLoop:
    """The stage's loop: runs of stream bytes compared in one piece (the fast path).
    ``in_band``: the streams are the node's own output ports, which carry every epoch
    boundary, so the coordinator's ``snapshot``/``committed`` events never move an epoch
    (taken before the first boundary, a snapshot event that overtook the PVM's frames made
    a spurious divergence at start; see pipeline/net/loop.py). Pair rounds in native code
    from the first frame when this process has them loaded: the node's supervisor loads
    them before it forks this stage (pipeline.net.loop.preload_native_rounds; for a role
    auto secondary at its start, for its comparator after a takeover). Else (a stage forked
    without them) they are loaded in the background (CompareLoop.load_native_in_background:
    the stage passes frames from its start, in Python rounds, meanwhile)."""
    return CompareLoop(settings, control, runs=True, in_band=in_band, native="background")


def run_net_compare_stage(settings: NetSettings, rundir: str,
                          counters_sink: CounterSink | None = None, ready: Any = None,
                          stop: threading.Event | Any | None = None,
                          in_band: bool = False, passthrough: bool = False) -> None:
    """Process entry of net-compare: run until SIGTERM or ``stop`` is set.

    ``ready`` (optional, a multiprocessing Connection) receives ``{"ok": True}`` once
    every adapter is open, or ``{"error": ...}``. ``in_band``: see :func:`compare_loop`
    (the supervisor says so when the sim guest's output ports feed the comparator).
    ``passthrough``: the node starts unprotected (role auto: a primary waiting for its
    first secondary, or the survivor of a takeover): the PVM's frames go to the clients
    at once until a ``role primary`` event (a secondary joined) starts the comparing.
    """
    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    client = CheckpointClient(rundir)
    try:
        loop = compare_loop(settings, CoordinatorControl(client), in_band)
        if passthrough:
            loop.on_role("unprotected")
    except Exception as e:
        client.close()
        if ready is not None:
            ready.send({"error": f"{type(e).__name__}: {e}"})
        raise
    mirror = CounterMirror(loop.comparator.counters, counters_sink)
    mirror.sync()            # from the start: native_rounds_loaded (inherited, or not yet)
    if ready is not None:
        ready.send({"ok": True})
    tune_gc()
    if loop.native_possible:
        log.info("net-compare: native pair rounds %s", "loaded from the start (inherited)"
                 if loop.comparator.counters["native_rounds_loaded"] else
                 "not loaded before the fork: loading them beside the Python rounds"
                 if not passthrough else "not loaded: loaded once a secondary joins")
    if not passthrough:
        # (passing through, nothing is compared: loaded once a secondary joins, on_role;
        # nothing to do when inherited loaded)
        loop.load_native_in_background()
    scan = settings.expired_scan_ms / 1000.0
    next_sync = 0.0
    try:
        while not stopping.is_set() and not (stop is not None and stop.is_set()):
            faults.point("stage.net_compare.loop")
            loop.run_once(scan)
            now = time.monotonic()
            if now >= next_sync:
                mirror.sync()
                next_sync = now + COUNTER_SYNC_S
    finally:
        mirror.sync()
        loop.close()
