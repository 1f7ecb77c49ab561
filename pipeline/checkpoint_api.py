"""The checkpoint request API between the coordinator and the comparators of one host.

The coordinator owns two local ZeroMQ sockets in the node's run directory:

* ``checkpoint-requests.sock`` (PULL, bound by the coordinator): comparators
  push ``{"cause": ..., "detail": ...}`` to ask for a checkpoint. The coordinator
  coalesces requests: many requests during one epoch make one checkpoint, and
  ``checkpoint.min_interval_ms`` is respected.
* ``checkpoint-events.sock`` (PUB, bound by the coordinator): every subscriber
  sees ``{"event": ..., "epoch": e, ...}`` for

  - ``snapshot``  — the PVM was paused and epoch ``e`` was snapshotted; output
    the PVM produced before this belongs to epoch ``e``, output after it to
    ``e + 1``. Published while the PVM is still paused.
  - ``committed`` — the secondary applied epoch ``e``; frames and writes held
    for ``e`` (and earlier) may be released.
  - ``aborted``   — epoch ``e`` was torn and discarded; the pair stays at the
    last committed checkpoint (``committed`` of a later epoch will follow).
  - ``role``      — this node's role changed (``role`` key: ``primary``,
    ``secondary``, ``active``, ``unprotected``).

Both sides use :class:`CheckpointClient`; the coordinator uses :class:`CheckpointBus`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import zmq

REQUESTS_SOCKET = "checkpoint-requests.sock"
EVENTS_SOCKET = "checkpoint-events.sock"

#: causes a checkpoint can have; the counters keep one histogram bucket per cause
CAUSES = (
    "timer",            # checkpoint.max_interval_ms elapsed
    "dirty_threshold",  # the PVM dirtied checkpoint.dirty_threshold_pages pages
    "net_divergence",   # the network comparator saw different output
    "net_timeout",      # a PVM frame stayed unmatched for net.compare_timeout_ms
    "disk_divergence",  # the disk comparator saw different writes
    "request",          # asked for by an operator or a test
    "initial",          # the first checkpoint after the full sync
    "net_queue_full",   # the comparator's queue bound was reached (it holds the PVM's output)
    "input_log_full",   # half the inputs the secondary can keep arrived since the last commit
                        # (and the PVM consumed a quarter: stages/inputs.py)
)


def _ipc(rundir: str, name: str) -> str:
    return "ipc://" + os.path.join(rundir, name)


@dataclass
class CheckpointEvent:
    event: str
    epoch: int
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointBus:
    """The coordinator's end: receives requests, publishes events."""

    def __init__(self, rundir: str, context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self.requests_in = self._ctx.socket(zmq.PULL)
        self.requests_in.setsockopt(zmq.LINGER, 0)
        self.requests_in.bind(_ipc(rundir, REQUESTS_SOCKET))
        self.events_out = self._ctx.socket(zmq.PUB)
        self.events_out.setsockopt(zmq.LINGER, 0)
        self.events_out.bind(_ipc(rundir, EVENTS_SOCKET))

    def drain_requests(self) -> list[tuple[str, str]]:
        """All pending (cause, detail) requests, without blocking. Unknown causes are kept
        as given so they show up in the counters rather than vanish."""
        out = []
        while True:
            try:
                raw = self.requests_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                msg = json.loads(raw)
                out.append((str(msg["cause"]), str(msg.get("detail", ""))))
            except (ValueError, KeyError, TypeError):
                out.append(("request", f"malformed request {raw[:64]!r}"))

    def publish(self, event: str, epoch: int, **extra: Any) -> None:
        self.events_out.send(json.dumps({"event": event, "epoch": epoch, **extra}).encode())

    def close(self) -> None:
        self.requests_in.close(0)
        self.events_out.close(0)


class CheckpointClient:
    """A comparator's end: ask for checkpoints, hear about snapshots and commits."""

    def __init__(self, rundir: str, context: zmq.Context | None = None,
                 subscribe: bool = True) -> None:
        self._ctx = context or zmq.Context.instance()
        self.requests_out = self._ctx.socket(zmq.PUSH)
        # a request sent just before close() still goes out (close waits up to 0.5 s)
        self.requests_out.setsockopt(zmq.LINGER, 500)
        self.requests_out.setsockopt(zmq.SNDHWM, 1000)
        self.requests_out.connect(_ipc(rundir, REQUESTS_SOCKET))
        self.events_in = None
        if subscribe:
            self.events_in = self._ctx.socket(zmq.SUB)
            self.events_in.setsockopt(zmq.LINGER, 0)
            self.events_in.setsockopt(zmq.SUBSCRIBE, b"")
            self.events_in.connect(_ipc(rundir, EVENTS_SOCKET))

    def request(self, cause: str, detail: str = "") -> None:
        """Ask for a checkpoint. Never blocks: if the coordinator is gone the request is dropped."""
        try:
            self.requests_out.send(json.dumps({"cause": cause, "detail": detail}).encode(),
                                   zmq.NOBLOCK)
        except zmq.Again:
            pass

    def poll_events(self, timeout_ms: int = 0) -> list[CheckpointEvent]:
        """Events received so far (waits up to ``timeout_ms`` for the first one)."""
        if self.events_in is None:
            return []
        out: list[CheckpointEvent] = []
        if not self.events_in.poll(timeout_ms):
            return out
        while True:
            try:
                raw = self.events_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            msg = json.loads(raw)
            out.append(CheckpointEvent(msg.pop("event"), int(msg.pop("epoch")), msg))

    def close(self) -> None:
        self.requests_out.close()   # with its LINGER: a request just sent still goes out
        if self.events_in is not None:
            self.events_in.close(0)
