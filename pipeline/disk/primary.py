"""The primary's export: apply each PVM write to the primary image, forward it to the
secondary tagged with the current epoch, and answer the guest once the secondary acked.

Epochs start at 1. The stage moves ``epoch`` to e+1 when the coordinator publishes the
``snapshot`` event of epoch e (published while the PVM is paused, so no write of the
guest straddles the boundary). :meth:`PrimaryBackend.wait_forwarded` lets the
coordinator make sure every write of epoch e reached the secondary before it asks the
secondary to commit e.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import zmq

from pipeline.disk import nbd_protocol as P
from pipeline.disk import wire
from pipeline.disk.counters import DiskCounters
from pipeline.disk.image import ImageFile
from pipeline.disk.settings import DiskSettings

log = logging.getLogger(__name__)


class PrimaryBackend:
    """Export backend of the PVM's disk. ``forward=False`` serves the image unreplicated
    (the PVM running unprotected, and the benchmark's forwarding-off figure)."""

    def __init__(self, settings: DiskSettings, counters: DiskCounters,
                 context: zmq.Context | None = None, forward: bool = True) -> None:
        self.settings = settings
        self.counters = counters
        self.image = ImageFile(settings.image, settings.export_size)
        self.size = settings.export_size
        self.block_size = settings.block_size
        self.max_request = settings.max_request
        self.window = settings.forward_window
        self.forward_address = settings.forward if forward else None
        self.context = context or zmq.Context.instance()
        self.epoch = 1
        self._inflight = collections.Counter()   # epoch → writes not yet acked
        self._cond = threading.Condition()
        counters.set("epoch", self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Tag writes from now on with ``epoch`` (never moves backwards)."""
        if epoch > self.epoch:
            self.epoch = epoch
            self.counters.set("epoch", epoch)

    def wait_forwarded(self, epoch: int, timeout_s: float) -> bool:
        """Wait until no write tagged ``epoch`` or earlier is still in flight. False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not any(n for e, n in self._inflight.items() if e <= epoch), timeout_s)

    def _track(self, epoch: int, delta: int) -> None:
        with self._cond:
            self._inflight[epoch] += delta
            if self._inflight[epoch] <= 0:
                del self._inflight[epoch]
                self._cond.notify_all()

    def connect(self) -> "PrimaryLink":
        return PrimaryLink(self)

    def close(self) -> None:
        self.image.close()


class PrimaryLink:
    """One NBD connection's forwarding socket and its in-flight writes."""

    def __init__(self, backend: PrimaryBackend) -> None:
        self.b = backend
        self.socket: zmq.Socket | None = None
        self.inflight = 0
        self._seq = itertools.count(1)
        self._pending: dict[int, tuple[int, int, int]] = {}  # seq → (cookie, epoch, sent ns)
        self._timeout_ns = backend.settings.forward_timeout_ms * 1_000_000
        if backend.forward_address:
            s = backend.context.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, backend.window * 2 + 16)
            s.setsockopt(zmq.RCVHWM, backend.window * 2 + 16)
            s.setsockopt(zmq.SNDTIMEO, backend.settings.forward_timeout_ms)
            s.connect(backend.forward_address)
            self.socket = s

    def read(self, offset: int, length: int) -> bytes:
        return self.b.image.pread(offset, length)

    def write(self, cookie: int, offset: int, data: bytearray) -> bool:
        self.b.image.pwrite(offset, data)
        return self._forward(cookie, wire.KIND_WRITE, offset, len(data), data)

    def zero(self, cookie: int, offset: int, length: int) -> bool:
        self.b.image.zero(offset, length)
        return self._forward(cookie, wire.KIND_ZERO, offset, length, None)

    def flush(self) -> None:
        # every acked write is at the secondary already; make the primary's copy durable
        self.b.image.sync()

    def _forward(self, cookie: int, kind: int, offset: int, length: int,
                 data: bytearray | None) -> bool:
        if self.socket is None:
            return True
        seq, epoch = next(self._seq), self.b.epoch
        try:
            self.socket.send_multipart(wire.encode_forward(kind, epoch, seq, offset, length, data),
                                       copy=False)
        except zmq.Again:
            self.b.counters.add("forward_errors")
            raise P.NbdError(P.EIO, f"forwarding [{offset}, +{length}) epoch {epoch}: the "
                                    f"secondary took nothing for "
                                    f"{self.b.settings.forward_timeout_ms} ms") from None
        self._pending[seq] = (cookie, epoch, time.monotonic_ns())
        self.inflight += 1
        self.b._track(epoch, +1)
        return False

    def completions(self, now_ns: int) -> list[tuple[int, int]]:
        """(cookie, NBD error) of every write whose ack arrived or whose wait timed out."""
        done = []
        while self.socket is not None:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                seq, status, reason = wire.decode_ack(frames)
            except ValueError as e:
                log.error("primary disk: %s from the secondary", e)
                continue
            entry = self._pending.pop(seq, None)
            if entry is None:
                continue  # ack after we gave up on it (already answered EIO)
            cookie, epoch, sent = entry
            self._finish(epoch)
            latency = time.monotonic_ns() - sent
            self.b.counters.add("forward_latency_ns", latency)
            self.b.counters.max("forward_latency_max_ns", latency)
            if status:
                log.error("primary disk: the secondary refused write seq %d: %s", seq, reason)
                self.b.counters.add("forward_errors")
                done.append((cookie, P.EIO))
            else:
                self.b.counters.add("forwarded")
                done.append((cookie, 0))
        for seq, (cookie, epoch, sent) in list(self._pending.items()):
            if now_ns - sent > self._timeout_ns:
                del self._pending[seq]
                self._finish(epoch)
                self.b.counters.add("forward_errors")
                log.error("primary disk: no ack for write seq %d (epoch %d) within %d ms",
                          seq, epoch, self.b.settings.forward_timeout_ms)
                done.append((cookie, P.EIO))
        return done

    def _finish(self, epoch: int) -> None:
        self.inflight -= 1
        self.b._track(epoch, -1)

    def close(self) -> None:
        for _cookie, epoch, _sent in self._pending.values():
            self.b._track(epoch, -1)
        self._pending.clear()
        self.inflight = 0
        if self.socket is not None:
            self.socket.close(0)
