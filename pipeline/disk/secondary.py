"""The secondary's side: the SVM's export over the store, and the receiver of forwarded
PVM writes (validated, buffered, compared, acknowledged)."""
from __future__ import annotations

import logging
import threading
import time

import zmq

from pipeline.disk import nbd_protocol as P
from pipeline.disk import wire
from pipeline.disk.comparator import PVM, SVM, DiskComparator
from pipeline.disk.counters import DiskCounters
from pipeline.disk.store import SecondaryStore, StoreError, StoreFull

log = logging.getLogger(__name__)


class SvmBackend:
    """Export backend of the SVM's disk: reads see the overlay, then the image."""

    window = 1  # writes complete at once; nothing is ever in flight

    def __init__(self, store: SecondaryStore, comparator: DiskComparator,
                 max_request: int, counters: DiskCounters) -> None:
        self.store = store
        self.comparator = comparator
        self.size = store.size
        self.block_size = store.block
        self.max_request = max_request
        self.counters = counters

    def connect(self) -> SvmLink:
        return SvmLink(self)


class SvmLink:
    poll_items: tuple = ()
    inflight = 0

    def __init__(self, backend: SvmBackend) -> None:
        self.b = backend

    def read(self, offset: int, length: int) -> bytes | bytearray:
        return self.b.store.svm_read(offset, length)

    def write(self, cookie: int, offset: int, data: bytearray) -> bool:
        self._apply(lambda: self.b.store.svm_write(offset, data), offset, len(data))
        self._compare(offset, len(data), wire.digest_of(data))
        return True

    def zero(self, cookie: int, offset: int, length: int) -> bool:
        self._apply(lambda: self.b.store.svm_zero(offset, length), offset, length)
        self._compare(offset, length, wire.ZERO_DIGEST)
        return True

    def _apply(self, op, offset: int, length: int) -> None:
        try:
            op()
        except StoreFull as e:
            # the overlay is full: a checkpoint empties it; the guest sees ENOSPC meanwhile
            self.b.comparator.request_checkpoint("dirty_threshold", str(e))
            raise P.NbdError(P.ENOSPC, str(e)) from None

    def _compare(self, offset: int, length: int, digest: bytes) -> None:
        store = self.b.store
        if not store.active:
            self.b.comparator.record(SVM, store.committed_epoch + 1, offset, length, digest)

    def flush(self) -> None:
        self.b.store.flush()

    def completions(self, now_ns: int) -> list[tuple[int, int]]:
        return []

    outbox_full = False

    def end_of_burst(self) -> None:
        pass

    def close(self) -> None:
        pass


class ForwardReceiver(threading.Thread):
    """Binds the ROUTER end of the forwarding link and serves it until :meth:`stop`."""

    def __init__(self, address: str, store: SecondaryStore, comparator: DiskComparator,
                 counters: DiskCounters, context: zmq.Context | None = None,
                 secure=None) -> None:
        super().__init__(name="disk-forward-receiver", daemon=True)
        self.store = store
        self.comparator = comparator
        self.counters = counters
        ctx = context or zmq.Context.instance()
        self.writes_in = ctx.socket(zmq.ROUTER)
        self.writes_in.setsockopt(zmq.LINGER, 0)
        if secure is not None:          # CURVE server: only the primary's key gets in
            secure(self.writes_in, True)
        self.writes_in.bind(address)
        #: the bound address (a ``tcp://host:*`` request resolved to its port)
        self.endpoint = self.writes_in.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def run(self) -> None:
        last_check = 0
        try:
            while not self._stop_event.is_set():
                if self.writes_in.poll(100):
                    # a burst: everything queued (up to a bound), then one ACK per peer
                    acks: dict[bytes, list[tuple[int, int, str]]] = {}
                    for _ in range(256):
                        try:
                            frames = self.writes_in.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        entries = acks.setdefault(frames[0].bytes, [])
                        body = frames[1:]
                        if not body or len(body) % 2:
                            entries.append(self._refuse(0, P.EINVAL, f"FORWARD message of "
                                                                     f"{len(body)} frames"))
                            continue
                        for i in range(0, len(body), 2):
                            entries.append(self._handle(body[i:i + 2]))
                    for identity, entries in acks.items():
                        self.writes_in.send_multipart([identity] + wire.encode_ack(entries))
                now = time.monotonic_ns()
                if now - last_check > 50_000_000:
                    self.comparator.check_timeouts(now)
                    last_check = now
        finally:
            self.writes_in.close(0)

    def _handle(self, frames: list) -> tuple[int, int, str]:
        """Validate, buffer and compare one FORWARD; its (seq, status, reason) answer."""
        body = [f.buffer for f in frames]
        seq = 0
        try:
            if body and len(body[0]) == wire.FORWARD_HEADER.size:
                seq = wire.FORWARD_HEADER.unpack(body[0])[3]
            fw = wire.decode_forward(body, self.store.size, self.store.block,
                                     self.store.committed_epoch)
            self.store.buffer_pvm_write(fw.epoch, fw.kind, fw.offset, fw.length, fw.digest,
                                        fw.data)
        except wire.ForwardError as e:
            return self._refuse(seq, e.status, str(e))
        except StoreFull as e:
            self.comparator.request_checkpoint("dirty_threshold", str(e))
            return self._refuse(seq, P.ENOSPC, str(e))
        except StoreError as e:
            return self._refuse(seq, P.EIO, str(e))
        except OSError as e:  # the buffer file failed (disk full, I/O error)
            return self._refuse(seq, P.EIO, f"buffering seq {seq}: {e}", counter="io_errors")
        self.counters.add("received")
        self.comparator.record(PVM, fw.epoch, fw.offset, fw.length, fw.digest)
        return fw.seq, 0, ""

    def _refuse(self, seq: int, status: int, reason: str,
                counter: str = "bad_forwards") -> tuple[int, int, str]:
        log.warning("secondary disk: refused a forwarded write: %s", reason)
        self.counters.add(counter)
        return seq, status, reason
