"""Named counters of the disk stage.

The stage keeps its own totals (so tests and ``stats()`` can read them without the
shared-memory counters) and mirrors every update onto an optional sink with
``add(name, n)`` / ``set(name, v)`` — the lead maps that onto
``pipeline.counters.StageCounters``.
"""
from __future__ import annotations

import threading
from typing import Protocol


class CounterSink(Protocol):
    def add(self, name: str, n: int) -> None: ...
    def set(self, name: str, v: int) -> None: ...


#: every counter name the disk stage uses, with what it counts
COUNTER_NAMES = {
    "reads": "NBD read requests served",
    "read_bytes": "bytes returned by NBD reads",
    "writes": "NBD write/zero/trim requests applied",
    "write_bytes": "bytes written (zero/trim count their length)",
    "flushes": "NBD flush requests",
    "fua_writes": "writes with NBD's FUA flag: made durable before the reply",
    "block_status": "NBD block status requests served (base:allocation)",
    "forwarded": "writes acknowledged by the secondary (primary side)",
    "forward_latency_ns": "sum of forward round trips, ns (primary side)",
    "forward_latency_max_ns": "largest forward round trip, ns (primary side)",
    "forward_errors": "writes the secondary refused (failed with EIO), or did not take or "
                      "ack within disk.forward_timeout_ms (answered from the primary's image "
                      "alone: the secondary cannot commit their epoch without them)",
    "forward_stalls": "times a connection stopped reading: forward window full",
    "forward_reconnects": "forwarding sockets made anew for a new session (re-protection: "
                          "none of the old session's queue or connection is used again)",
    "received": "forwarded writes accepted into the buffer (secondary side)",
    "given_up": "forwarded writes acked without being buffered: the buffer's bound was "
                "reached or its file failed, the replication was given up (secondary: "
                "stale until a new sync; primary: acks saying so)",
    "bad_requests": "NBD requests refused (bounds, alignment, size, unknown command)",
    "bad_forwards": "forwarded writes refused (epoch, bounds, hash, malformed)",
    "io_errors": "requests failed with EIO because the image/overlay/buffer files failed",
    "client_disconnects": "NBD clients that vanished mid-request",
    "relinks": "open NBD connections carried over to a new backend (the export changed "
               "role without closing)",
    "commits": "epochs committed into the secondary image",
    "superseded": "buffered writes a commit did not apply: a later write of the same "
                  "commit covered exactly the same extent",
    "discards": "uncommitted epochs discarded",
    "journal_replays": "interrupted commits/merges finished at open",
    "failovers": "overlay merges into the image (secondary became active)",
    "divergences": "PVM and SVM write streams differed (counted with compare off too)",
    "checkpoint_requests": "checkpoints requested by the disk stage",
    "overlay_bytes": "bytes held in the SVM overlay (gauge)",
    "overlay_over_bound": "SVM writes that took the overlay past disk.overlay_max_bytes "
                          "(taken all the same; a checkpoint is asked for)",
    "buffer_bytes": "bytes of uncommitted PVM writes buffered (gauge)",
    "sync_bytes": "initial sync: bytes of allocated extents sent (primary) / written (secondary)",
    "sync_total": "initial sync: bytes of allocated extents to send (primary, gauge)",
    "sync_checked": "incremental sync: bytes compared by blake3 instead of sent",
    "sync_ms": "initial sync: how long it took, every extent acked (primary; 0 until done)",
    "sync_done": "initial sync: bytes of sync_total gone through so far, sent or compared "
                 "(primary, gauge)",
    "sync_rate_kib_s": "initial sync: KiB of sync_total gone through per second (primary, "
                       "gauge)",
    "sync_incremental": "initial sync: 1 while/after an incremental one, 0 a full one "
                        "(primary, gauge)",
    "sync_state": "initial sync: 0 none, 1 running, 2 done, 3 failed (primary, gauge)",
    "syncs": "initial syncs started (the first protection and every re-protection; primary)",
    "epoch": "current epoch (primary: tag of new writes; secondary: last committed)",
}


class DiskCounters:
    """Thread-safe named counters with an optional mirror sink."""

    def __init__(self, sink: CounterSink | None = None) -> None:
        self._values = dict.fromkeys(COUNTER_NAMES, 0)
        self._sink = sink
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n
        if self._sink is not None:
            self._sink.add(name, n)

    def set(self, name: str, v: int) -> None:
        with self._lock:
            self._values[name] = v
        if self._sink is not None:
            self._sink.set(name, v)

    def max(self, name: str, v: int) -> None:
        with self._lock:
            if v <= self._values[name]:
                return
            self._values[name] = v
        if self._sink is not None:
            self._sink.set(name, v)

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
