"""The initial disk sync's progress, read from the primary disk stage's counters: one entry
for the node info (``disk_sync``) and ``stats``, and a bar for a terminal.

The counters (``pipeline/disk/counters.py``) are written by the sync's thread in the disk
stage; the node info has one writer, the coordinator, which copies the entry there with
:class:`NodeInfoNote` while it waits for a checkpoint (the first checkpoint after a
secondary joins waits for the sync).
"""
from __future__ import annotations

import time
from typing import Any, Callable, TextIO

#: the ``sync_state`` gauge
SYNC_NONE, SYNC_RUNNING, SYNC_DONE, SYNC_FAILED = 0, 1, 2, 3
STATE_NAMES = {SYNC_NONE: "none", SYNC_RUNNING: "running", SYNC_DONE: "done",
               SYNC_FAILED: "failed"}


def sync_progress(counters: dict[str, int]) -> dict[str, Any] | None:
    """The last (or running) sync of a primary disk stage, from its counters: kind (full or
    incremental), total and done bytes (gone through: sent or compared), bytes sent, rate
    (MB/s over the disk gone through), state and, once done, how long it took. None if
    this stage never synced (a secondary, or a primary with no secondary yet)."""
    if not counters.get("syncs"):
        return None
    return {"kind": "incremental" if counters.get("sync_incremental") else "full",
            "state": STATE_NAMES.get(counters.get("sync_state", 0), "none"),
            "total": counters.get("sync_total", 0), "done": counters.get("sync_done", 0),
            "sent": counters.get("sync_bytes", 0),
            "rate_mb_s": round(counters.get("sync_rate_kib_s", 0) * 1024 / 1e6, 1),
            "ms": counters.get("sync_ms", 0), "syncs": counters["syncs"]}


def _fraction(p: dict[str, Any]) -> float:
    return min(1.0, p["done"] / p["total"]) if p["total"] else 1.0


def describe(p: dict[str, Any]) -> str:
    """One line for ``stats``."""
    line = (f"disk sync {p['kind']} {p['state']}: {p['done'] / 2**20:.0f} of "
            f"{p['total'] / 2**20:.0f} MiB ({_fraction(p) * 100:.0f}%), sent "
            f"{p['sent'] / 2**20:.1f} MiB, {p['rate_mb_s']:.1f} MB/s")
    return line + (f", {p['ms']} ms" if p["ms"] else "")


def describe_given_up(g: dict[str, Any]) -> str:
    """One line for ``stats``: why the disk replication was last given up (the node info's
    ``disk_given_up``, from the primary disk stage's ``given_up``)."""
    when = time.strftime("%H:%M:%S", time.localtime(g.get("at", 0)))
    where = f" at write seq {g['seq']}" if g.get("seq") else ""
    return (f"disk replication given up {when} ({g.get('cause', '?')}{where}, epoch "
            f"{g.get('epoch', '?')}): {g.get('reason', '')}")


def bar(p: dict[str, Any], width: int = 40) -> str:
    frac = _fraction(p)
    return (f"disk sync ({p['kind']}) [{'#' * int(frac * width):<{width}}] "
            f"{frac * 100:5.1f}%  {p['done'] / 2**20:.0f}/{p['total'] / 2**20:.0f} MiB  "
            f"{p['rate_mb_s']:.1f} MB/s")


class SyncBar:
    """The sync's progress bar on ``stream``, redrawn in place; nothing at all unless
    ``stream`` is a terminal (a log or a pipe gets no control characters)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = False

    def show(self, p: dict[str, Any] | None) -> None:
        if not self.tty or p is None:
            return
        self.stream.write("\r" + bar(p))
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class NodeInfoNote:
    """Keeps the node info's ``disk_sync`` entry up to date: ``update(info)`` (``info(**kw)``
    writes the node info) at most every ``period_s`` and only when it changed."""

    def __init__(self, read_counters: Callable[[], dict[str, int]],
                 period_s: float = 0.5) -> None:
        self.read_counters = read_counters
        self.period_s = period_s
        self.last: dict[str, Any] | None = None
        self.next = 0.0

    def update(self, info: Callable[..., None], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next:
            return
        self.next = now + self.period_s
        p = sync_progress(self.read_counters())
        if p is not None and p != self.last:
            info(disk_sync=p)
            self.last = p
