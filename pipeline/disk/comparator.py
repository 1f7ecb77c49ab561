"""The disk comparator: per epoch, do the PVM and the SVM write the same things?

Each write is (offset, length, blake3 of the data). Writes are matched per epoch by
extent, in arrival order per extent (two guests may issue independent writes in a
different order; the same extent written twice must match in order). A divergence is:
the two sides wrote different data to the same extent, or a write stayed unmatched
for ``timeout_ms``, or was still unmatched when its epoch was committed.
Divergences are always counted; with ``mode == "checkpoint"`` the first one of an
epoch also requests a checkpoint (one request per epoch: the checkpoint resolves all).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from pipeline.disk.counters import DiskCounters

log = logging.getLogger(__name__)

PVM, SVM = "pvm", "svm"


class _Write:
    __slots__ = ("digest", "epoch", "key", "open", "side", "t")

    def __init__(self, side: str, epoch: int, key: tuple[int, int], digest: bytes,
                 t: int) -> None:
        self.side, self.epoch, self.key, self.digest, self.t = side, epoch, key, digest, t
        self.open = True


class DiskComparator:
    def __init__(self, mode: str, timeout_ms: int, counters: DiskCounters,
                 request_checkpoint: Callable[[str, str], None]) -> None:
        self.mode = mode
        self.timeout_ns = timeout_ms * 1_000_000
        self.counters = counters
        self._request = request_checkpoint
        self._lock = threading.Lock()
        # epoch → extent → unmatched writes of one side, oldest first
        self._pending: dict[int, dict[tuple[int, int], collections.deque]] = {}
        # every unmatched write in arrival order, so a timeout scan looks at the oldest only
        self._by_age: collections.deque[_Write] = collections.deque()
        self._requested: set[int] = set()

    def record(self, side: str, epoch: int, offset: int, length: int, digest: bytes,
               now_ns: int | None = None) -> bool:
        """Feed one write; True if it revealed a divergence."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            return self._record(side, epoch, (offset, length), digest, now_ns)

    def record_many(self, side: str, writes, now_ns: int | None = None) -> int:
        """Feed many writes of one side (each with ``epoch``, ``offset``, ``length``,
        ``digest``: a forwarded group) under one lock; how many revealed a divergence."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        found = 0
        record = self._record
        with self._lock:
            for w in writes:      # (a loop: sum() over a generator cost more per write)
                if record(side, w.epoch, (w.offset, w.length), w.digest, now_ns):
                    found += 1
        return found

    def _record(self, side: str, epoch: int, key: tuple[int, int], digest: bytes,
                now_ns: int) -> bool:
        extents = self._pending.get(epoch)
        if extents is None:
            extents = self._pending[epoch] = {}
        queue = extents.get(key)
        if queue and queue[0].side != side:
            other = queue.popleft()
            other.open = False
            if not queue:
                del extents[key]
            if other.digest != digest:
                self._diverged(epoch, f"epoch {epoch} [{key[0]}, +{key[1]}): the PVM and "
                                      f"the SVM wrote different data")
                return True
            return False
        w = _Write(side, epoch, key, digest, now_ns)
        if queue is None:
            extents[key] = collections.deque((w,))
        else:
            queue.append(w)
        self._by_age.append(w)
        return False

    def check_timeouts(self, now_ns: int | None = None) -> int:
        """Count writes unmatched for longer than the timeout as divergences; returns how many."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        found = 0
        with self._lock:
            while self._by_age:
                w = self._by_age[0]
                if w.open and now_ns - w.t <= self.timeout_ns:
                    break
                self._by_age.popleft()
                if not w.open:
                    continue
                # the oldest open write is also the oldest of its extent's queue
                w.open = False
                extents = self._pending.get(w.epoch, {})
                queue = extents.get(w.key)
                if queue:
                    queue.popleft()
                    if not queue:
                        del extents[w.key]
                found += 1
                self._diverged(w.epoch, f"epoch {w.epoch} [{w.key[0]}, +{w.key[1]}): written "
                                        f"by the {w.side.upper()} only (timeout)")
        return found

    def epoch_committed(self, epoch: int) -> int:
        """Close every epoch ≤ ``epoch``; writes still unmatched count as divergences (no
        request: the checkpoint that resolves them is happening). Returns how many."""
        found = 0
        with self._lock:
            for ep in [ep for ep in self._pending if ep <= epoch]:
                unmatched = 0
                for queue in self._pending.pop(ep).values():
                    for w in queue:
                        w.open = False
                    unmatched += len(queue)
                if unmatched:
                    found += unmatched
                    self.counters.add("divergences", unmatched)
                    log.info("disk comparator: epoch %d closed with %d unmatched writes",
                             ep, unmatched)
            self._requested = {ep for ep in self._requested if ep > epoch}
        return found

    def _diverged(self, epoch: int, detail: str) -> None:
        self.counters.add("divergences")
        log.info("disk divergence: %s", detail)
        if self.mode == "checkpoint" and epoch not in self._requested:
            self._requested.add(epoch)
            self.request_checkpoint("disk_divergence", detail)

    def request_checkpoint(self, cause: str, detail: str) -> None:
        """Ask the coordinator for a checkpoint (also used when the overlay or buffer is full)."""
        self.counters.add("checkpoint_requests")
        self._request(cause, detail)
