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
from typing import Callable

from pipeline.disk.counters import DiskCounters

log = logging.getLogger(__name__)

PVM, SVM = "pvm", "svm"


class DiskComparator:
    def __init__(self, mode: str, timeout_ms: int, counters: DiskCounters,
                 request_checkpoint: Callable[[str, str], None]) -> None:
        self.mode = mode
        self.timeout_ns = timeout_ms * 1_000_000
        self.counters = counters
        self._request = request_checkpoint
        self._lock = threading.Lock()
        # epoch → extent → queue of (side, digest, arrival ns) not yet matched
        self._pending: dict[int, dict[tuple[int, int], collections.deque]] = {}
        self._requested: set[int] = set()

    def record(self, side: str, epoch: int, offset: int, length: int, digest: bytes,
               now_ns: int | None = None) -> bool:
        """Feed one write; True if it revealed a divergence."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            extents = self._pending.setdefault(epoch, {})
            queue = extents.setdefault((offset, length), collections.deque())
            if queue and queue[0][0] != side:
                _other, other_digest, _t = queue.popleft()
                if not queue:
                    del extents[(offset, length)]
                if other_digest != digest:
                    self._diverged(epoch, f"epoch {epoch} [{offset}, +{length}): the PVM and "
                                          f"the SVM wrote different data")
                    return True
                return False
            queue.append((side, digest, now_ns))
            return False

    def check_timeouts(self, now_ns: int | None = None) -> int:
        """Count writes unmatched for longer than the timeout as divergences; returns how many."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        found = 0
        with self._lock:
            for epoch, extents in self._pending.items():
                for key in list(extents):
                    queue = extents[key]
                    while queue and now_ns - queue[0][2] > self.timeout_ns:
                        side = queue.popleft()[0]
                        found += 1
                        self._diverged(epoch, f"epoch {epoch} [{key[0]}, +{key[1]}): written by "
                                              f"the {side.upper()} only (timeout)")
                    if not queue:
                        del extents[key]
        return found

    def epoch_committed(self, epoch: int) -> int:
        """Close every epoch ≤ ``epoch``; writes still unmatched count as divergences (no
        request: the checkpoint that resolves them is happening). Returns how many."""
        found = 0
        with self._lock:
            for ep in [ep for ep in self._pending if ep <= epoch]:
                unmatched = sum(len(q) for q in self._pending.pop(ep).values())
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
