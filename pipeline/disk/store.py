"""The secondary's disk: image at the last checkpoint, PVM write buffer, SVM overlay, journal.

Files in ``state_dir`` (all sparse / append-only, so RAM use does not grow with
the amount written):

* ``overlay.img``   — the SVM's own writes since the last checkpoint, at their offsets;
  an in-memory bitmap (one bit per block) says which blocks are in it.
* ``buffer-<epoch>.log`` — the PVM's forwarded writes of one epoch, in arrival order:
  a 64-byte file header (magic, epoch, nonce), then records: 80-byte header (magic,
  kind, epoch, nonce, seq, offset, length, data length, blake3) and the data. A WRITE's
  blake3 is all zero when it was not hashed (``disk.compare = "off"``: only the
  comparator needs it; every log a commit or a replay applies was fdatasynced before
  its ``committing`` state, or — not durable — is in the page cache, so no torn record
  of it needs the digest to be found); a given one is checked by the scan. ``seq``
  is the write's place in the primary's one write order; writes arrive in another
  order (one forwarding socket per NBD connection), so a commit applies them sorted by
  (epoch, seq): overlapping writes end as they did on the primary. This is also
  the commit's redo journal. Emptied logs are recycled (``spare-<n>.log``) rather than
  deleted; the fresh nonce of each reuse makes stale records beyond the valid end
  unreadable as records, so the valid end is found by scanning, not by the file size.
* ``journal.json``  — the commit state, replaced atomically (write, fsync, rename, fsync dir):
  ``{"committed": e, "committing": e2|null, "merging": bool, "active": bool}``.
* ``overlay.bitmap`` — the overlay bitmap, saved only while a failover merge runs.

Commit of epoch e: fsync the logs ≤ e; journal ``committing = e``; write every record
of those logs into the image in (epoch, seq) order; fsync the image; journal ``committed = e``;
delete the logs; drop the overlay. Redoing writes is idempotent, so a crash anywhere
is repaired at the next open by redoing the apply (``journal_replays``): the image
ends exactly at e, or — if the crash came before the ``committing`` record — exactly
at the previous checkpoint with the logs intact, so the commit can simply be retried.

Failover: save the bitmap, journal ``merging``, copy overlay blocks into the image,
fsync, journal ``active``. From then on the SVM reads and writes the image directly.

The fsyncs are what make this survive a power loss of the secondary host; with
``durable=False`` they are skipped and the ordering still holds for a killed process
(everything written is in the page cache), which is the failure COLO needs the
secondary's disk to survive: a lost secondary *host* is replaced by a full resync.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from pipeline import faults
from pipeline.disk.counters import DiskCounters
from pipeline.disk.image import ImageFile, Runs, paint
from pipeline.disk.wire import (KIND_WRITE, KIND_ZERO_ALLOC, ZERO_DIGEST, ZERO_KINDS,
                                ForwardedWrite, digest_of, zero_digest)

log = logging.getLogger(__name__)
#: tries of the failover merge before it gives up (it is idempotent)
MERGE_ATTEMPTS = 3

#: log file header: magic, epoch, nonce (fresh each time a file starts an epoch)
LOG_HEADER = struct.Struct("<4s4xQQ40x")
LOG_MAGIC = b"CBL2"
#: the log magic of versions whose records had no seq (their order cannot be recovered)
OLD_LOG_MAGICS = (b"CBL1",)
#: record: magic, kind, epoch, file nonce, seq, offset, length, data_len, blake3; then
#: the data
RECORD = struct.Struct("<4sB3xQQQQII32s")
RECORD_MAGIC = b"CBR2"
#: emptied logs kept for reuse (overwriting allocated blocks is several times faster than
#: appending to a new file), and the size each is cut down to
SPARE_LOGS = 2
SPARE_LOG_MAX_BYTES = 256 << 20
JOURNAL = "journal.json"
_LOG_NAME = re.compile(r"^buffer-(\d+)\.log$")
_SPARE_NAME = re.compile(r"^spare-[0-9a-f]+\.log$")


class StoreError(RuntimeError):
    """A store operation that cannot be done in the current state; nothing was changed."""


class StoreFull(StoreError):
    """The overlay or the buffer reached its configured bound."""


class GivenUp(StoreError):
    """This store gave the replication up (:attr:`SecondaryStore.unbuffered`): a forwarded
    write of the epoch named, or an earlier one, could not be buffered. No commit of that
    epoch or a later one can succeed here: the secondary is stale until a new sync."""


@dataclass
class _EpochLog:
    epoch: int
    path: str
    fd: int
    nonce: int
    bytes: int  # end of the last valid record: appends go here
    #: (seq, arrival, kind, offset, length, data position, data length) of each valid
    #: record: a commit sorts this instead of reading the headers back
    index: list = field(default_factory=list)


class SecondaryStore:
    """Thread-safe: the forward receiver, the SVM export's connections and the command
    handler all call in; one lock orders them (commit runs with the SVM paused anyway)."""

    def __init__(self, image_path: str, export_size: int, block_size: int, state_dir: str,
                 overlay_max_bytes: int, buffer_max_bytes: int,
                 counters: DiskCounters | None = None, durable: bool = True) -> None:
        #: fsync logs, image and journal at each step: survives a power loss of this host.
        #: Off, a commit survives a killed process (the page cache keeps the writes) —
        #: enough for COLO, where a lost secondary host is replaced by a full resync.
        self.durable = durable
        self.size = export_size
        self.block = block_size
        self.state_dir = state_dir
        self.overlay_max_bytes = overlay_max_bytes
        self.buffer_max_bytes = buffer_max_bytes
        self.counters = counters or DiskCounters()
        self._lock = threading.RLock()
        os.makedirs(state_dir, exist_ok=True)
        self.image = ImageFile(image_path, export_size)
        self.overlay = ImageFile(os.path.join(state_dir, "overlay.img"), export_size)
        self.bitmap = np.zeros(export_size // block_size, dtype=bool)
        self._overlay_blocks = 0  # bitmap.sum(), kept up to date (summing is O(disk size))
        self._logs: dict[int, _EpochLog] = {}
        self._committing: int | None = None  # epoch being applied right now (in memory)
        self._sync_end_seq: int | None = None  # the initial sync's END, once it arrived
        self._stale_logs: set[int] = set()
        #: this store's SVM went active in this process (not merely in an earlier life:
        #: a host that was active and comes back as a secondary syncs again)
        self._failed_over_here = False
        #: (epoch, seq, why) of a forwarded write this store could not buffer (its log file
        #: failed: disk full, I/O error; or the buffer reached ``buffer_max_bytes``). The
        #: write was the guest's and the primary's image has it: failing it would make the
        #: guest's filesystem go read-only for a fault or a limit of the secondary's disk.
        #: Instead no commit of that epoch or later can succeed here, so this secondary is
        #: never taken for a copy of the primary (it ends stale and is synced again); later
        #: writes of those epochs are not buffered either; a new sync session clears it.
        self.unbuffered: tuple[int, int, str] | None = None
        self._spares = sorted(os.path.join(state_dir, n) for n in os.listdir(state_dir)
                              if _SPARE_NAME.match(n))
        self._state = self._read_journal()
        self._recover()

    # -- state -----------------------------------------------------------
    @property
    def committed_epoch(self) -> int:
        return self._state["committed"]

    @property
    def active(self) -> bool:
        """True after failover: the SVM is the VM, its writes go straight to the image."""
        return self._state["active"]

    @property
    def overlay_bytes(self) -> int:
        return self._overlay_blocks * self.block

    @property
    def buffer_bytes(self) -> int:
        return sum(lg.bytes for lg in self._logs.values())

    def _read_journal(self) -> dict:
        path = os.path.join(self.state_dir, JOURNAL)
        state = {"committed": 0, "committing": None, "merging": False, "active": False,
                 "syncing": False, "generation": read_generation(self.state_dir)}
        if os.path.exists(path):
            with open(path) as f:
                try:
                    state.update(json.load(f))
                except ValueError as e:
                    # only ever replaced atomically, so this is not a torn write
                    raise StoreError(f"commit journal {path} is corrupt: {e}") from None
        return state

    def _write_journal(self, label: str = "", **changes: object) -> None:
        state = {**self._state, **changes}
        label = label or ("committed" if "committed" in changes else "active"
                          if changes.get("active") else "merging" if changes.get("merging")
                          else "syncing" if changes.get("syncing")
                          else "committing")   # fault point names
        path = os.path.join(self.state_dir, JOURNAL)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(state).encode())
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        faults.point(f"store.journal.{label}.written")
        os.replace(tmp, path)  # atomic for a killed process even without the fsyncs
        faults.point(f"store.journal.{label}.renamed")
        if self.durable:
            dfd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._state = state
        faults.point(f"store.journal.{label}.done")

    # -- open / recovery -------------------------------------------------
    def _recover(self) -> None:
        if self._state["merging"]:
            bits = np.fromfile(os.path.join(self.state_dir, "overlay.bitmap"), dtype=np.uint8)
            self.bitmap[:] = np.unpackbits(bits, count=len(self.bitmap)).astype(bool)
            self._overlay_blocks = int(self.bitmap.sum())
            log.warning("store %s: finishing an interrupted failover merge", self.state_dir)
            self.counters.add("journal_replays")
            self._merge_overlay()
            return
        # the SVM that wrote a previous overlay is gone with the process that served it
        self.overlay.reset()
        for name in sorted(os.listdir(self.state_dir)):
            m = _LOG_NAME.match(name)
            if m:
                self._open_log(int(m.group(1)), scan=True)
        # buffered by a previous life of this stage: a new sync's BEGIN drops them
        self._stale_logs = set(self._logs)
        if self._state["committing"] is not None:
            e = self._state["committing"]
            log.warning("store %s: replaying the interrupted commit of epoch %d",
                        self.state_dir, e)
            self.counters.add("journal_replays")
            self._apply_and_finish(e)
        for ep in [ep for ep in self._logs if ep <= self.committed_epoch]:
            self._drop_log(ep)  # committed, crash came before the delete
        if self._state["active"]:
            self.discard_uncommitted()
        self._update_gauges()

    def _open_log(self, epoch: int, scan: bool = False) -> _EpochLog:
        """The buffer log of ``epoch``: an existing one (``scan``: find its valid end) or a
        new one, made from a spare when there is one."""
        path = os.path.join(self.state_dir, f"buffer-{epoch}.log")
        if not scan and self._spares:
            os.replace(self._spares.pop(), path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        nonce, end, index = 0, 0, []
        if scan:
            for end, *entry in self._records(path, epoch):
                index.append(tuple(entry))
            nonce = self._log_nonce(path, epoch) or 0
            if nonce and end == 0:
                end = LOG_HEADER.size
            if end != os.fstat(fd).st_size:
                log.info("%s: valid records end at %d (torn tail or recycled space after)",
                         path, end)
        if not nonce:
            nonce = int.from_bytes(os.urandom(8), "little") or 1
            os.pwrite(fd, LOG_HEADER.pack(LOG_MAGIC, epoch, nonce), 0)
            end = LOG_HEADER.size
        lg = _EpochLog(epoch, path, fd, nonce, end, index)
        self._logs[epoch] = lg
        return lg

    def _drop_log(self, epoch: int) -> None:
        lg = self._logs.pop(epoch)
        if len(self._spares) < SPARE_LOGS:
            if os.fstat(lg.fd).st_size > SPARE_LOG_MAX_BYTES:
                os.ftruncate(lg.fd, SPARE_LOG_MAX_BYTES)
            os.pwrite(lg.fd, bytes(LOG_HEADER.size), 0)  # no longer any epoch's log
            spare = os.path.join(self.state_dir, f"spare-{os.urandom(4).hex()}.log")
            os.replace(lg.path, spare)
            self._spares.append(spare)
        else:
            os.unlink(lg.path)
        os.close(lg.fd)

    @staticmethod
    def _log_nonce(path: str, epoch: int) -> int | None:
        with open(path, "rb") as f:
            head = f.read(LOG_HEADER.size)
        if len(head) < LOG_HEADER.size:
            return None
        magic, ep, nonce = LOG_HEADER.unpack(head)
        if magic in OLD_LOG_MAGICS and ep == epoch and nonce:
            # its records carry no write order: applying them could reorder overlapping
            # writes, and skipping them would leave a commit half-applied
            raise StoreError(f"{path} was written by an older version (magic {magic!r}, "
                             f"records without a write order); the secondary needs a "
                             f"fresh image")
        return nonce if magic == LOG_MAGIC and ep == epoch and nonce else None

    @classmethod
    def _records(cls, path: str, epoch: int):
        """(end offset, seq, arrival, kind, offset, length, data position, data length) of
        each valid record, stopping at the first torn, corrupt or stale (other nonce) one."""
        nonce = cls._log_nonce(path, epoch)
        if nonce is None:
            return
        with open(path, "rb") as f:
            f.seek(LOG_HEADER.size)
            pos = LOG_HEADER.size
            arrival = 0
            while True:
                hdr = f.read(RECORD.size)
                if len(hdr) < RECORD.size:
                    return
                magic, kind, ep, n, seq, off, length, data_len, digest = RECORD.unpack(hdr)
                if magic != RECORD_MAGIC or ep != epoch or n != nonce \
                        or kind not in (KIND_WRITE, *ZERO_KINDS):
                    return
                data = f.read(data_len)
                if len(data) < data_len:
                    return
                if digest != ZERO_DIGEST and (kind != KIND_WRITE or digest_of(data) != digest):
                    return     # (all zero: a ZERO, or a WRITE not hashed)
                data_pos = pos + RECORD.size
                pos = data_pos + data_len
                yield pos, seq, arrival, kind, off, length, data_pos, data_len
                arrival += 1

    # -- PVM writes (from the forward receiver) ---------------------------
    def buffer_pvm_write(self, epoch: int, kind: int, offset: int, length: int,
                         digest: bytes, data: bytes | memoryview | None, seq: int = 0) -> None:
        """Append one validated forwarded write to its epoch's buffer log. ``seq``: its
        place in the primary's write order (records of equal seq, e.g. a caller that has
        no order, apply in arrival order)."""
        (err,) = self.buffer_pvm_writes([ForwardedWrite(kind, epoch, seq, offset, length,
                                                        digest, data)])
        if err is not None:
            raise err

    def admit_pvm_writes(self, writes: list[ForwardedWrite], pending: int = 0
                         ) -> list[StoreError | None]:
        """Would :meth:`buffer_pvm_writes` take these writes (epoch, state, bound), as far
        as can be told without writing them? Per write: None, or the error that refuses
        it. Lets the receiver ack a write before its append: only the receiver appends,
        and a commit only frees room, so an admitted write is refused later only by its
        log file failing — which gives the replication up, acked or not. ``pending``:
        bytes of records admitted before and not appended yet."""
        out: list[StoreError | None] = [None] * len(writes)
        with self._lock:
            self._check_admission(writes, self.buffer_bytes + pending, out)
        return out

    @staticmethod
    def record_bytes(w: ForwardedWrite) -> int:
        """What buffering ``w`` adds to :attr:`buffer_bytes`."""
        return RECORD.size + (0 if w.data is None else len(w.data))

    def buffer_pvm_writes(self, writes: list[ForwardedWrite], admitted: bool = False
                          ) -> list[StoreError | OSError | None]:
        """Append validated forwarded writes to their epochs' buffer logs, one pwritev per
        epoch for many of them. Per write: None, or the error that refused it (nothing of
        a refused write is buffered). ``admitted``: :meth:`admit_pvm_writes` took them
        just before (nothing but a commit, which only frees room, ran since): not checked
        again."""
        out: list[StoreError | OSError | None] = [None] * len(writes)
        with self._lock:
            if not admitted:
                self._check_admission(writes, self.buffer_bytes, out)
            by_epoch: dict[int, list[int]] = {}
            for i, w in enumerate(writes):
                if out[i] is None:
                    by_epoch.setdefault(w.epoch, []).append(i)
            for epoch, todo in by_epoch.items():
                lg = self._logs.get(epoch) or self._open_log(epoch)
                for k in range(0, len(todo), 256):  # 2 iovecs a record, IOV_MAX 1024
                    part = todo[k:k + 256]
                    try:
                        self._append(lg, [writes[i] for i in part])
                    except OSError as e:
                        for i in part:
                            out[i] = e
        return out

    def give_up(self, epoch: int, seq: int, why: str) -> bool:
        """A forwarded write of ``epoch`` (``seq``) could not be buffered (``why``): give
        the replication up from that epoch on (:attr:`unbuffered`). True the first time."""
        with self._lock:
            if self.unbuffered is not None:
                return False
            self.unbuffered = (epoch, seq, why)
            return True

    def _check_admission(self, writes: list[ForwardedWrite], held: int,
                         out: list) -> None:
        """Whether each of ``writes`` may be buffered (epoch, state, bound) with ``held``
        bytes buffered or admitted before it: its error in ``out``, or None left there.
        The caller holds ``_lock``. What decides it is taken once per batch (the epoch floor,
        whether this node takes the primary's writes at all), so a passing write costs a
        comparison; :meth:`_admit`, which names the check that failed, runs only for a
        write that may fail one. Both the receiver's admission before its ACK and an
        unadmitted buffering use it."""
        floor = max(self.committed_epoch, self._committing or 0)
        takes_writes = not self.active and self.unbuffered is None
        bound = self.buffer_max_bytes
        for i, w in enumerate(writes):
            adding = RECORD.size + (0 if w.data is None else len(w.data))
            if not (takes_writes and w.epoch > floor and held + adding <= bound):
                try:
                    self._admit(w.epoch, w.offset, w.length, held, adding)
                except StoreError as e:
                    out[i] = e
                    continue
            held += adding

    def _admit(self, epoch: int, offset: int, length: int, held: int, adding: int) -> None:
        if self.active:
            raise StoreError(f"PVM write for epoch {epoch}: this node failed over and "
                             f"no longer takes the primary's writes")
        if epoch <= max(self.committed_epoch, self._committing or 0):
            raise StoreError(f"PVM write for epoch {epoch}: epoch already committed "
                             f"(last committed {self.committed_epoch}, committing "
                             f"{self._committing})")
        if self.unbuffered is not None and epoch >= self.unbuffered[0]:
            raise GivenUp(f"PVM write for epoch {epoch}: not buffered, the replication was "
                          f"given up at seq {self.unbuffered[1]} of epoch "
                          f"{self.unbuffered[0]} ({self.unbuffered[2]})")
        if held + adding > self.buffer_max_bytes:
            raise StoreFull(f"PVM write for epoch {epoch} [{offset}, +{length}): the "
                            f"buffer holds {held} bytes, bound {self.buffer_max_bytes}")

    def _append(self, lg: _EpochLog, writes: list[ForwardedWrite]) -> None:
        """One pwritev of the records of ``writes`` at the log's valid end. A short or
        failed write leaves at most torn records past the valid end, which the next append
        overwrites and a scan stops at."""
        iov: list = []
        entries = []
        pos = lg.bytes
        for w in writes:
            data_len = 0 if w.data is None else len(w.data)
            iov.append(RECORD.pack(RECORD_MAGIC, w.kind, w.epoch, lg.nonce, w.seq, w.offset,
                                   w.length, data_len, w.digest))
            if data_len:
                iov.append(w.data)
            entries.append((w.seq, len(lg.index) + len(entries), w.kind, w.offset, w.length,
                            pos + RECORD.size, data_len))
            pos += RECORD.size + data_len
        faults.point("store.buffer.append")     # (an errno here: this pwritev failed)
        n = os.pwritev(lg.fd, iov, lg.bytes)
        if n != pos - lg.bytes:
            raise OSError(errno.ENOSPC, f"{lg.path}: short append ({n} of {pos - lg.bytes} "
                                        f"bytes)")
        lg.index += entries
        lg.bytes = pos
        self.counters.add("buffer_bytes", n)

    # -- commit / discard --------------------------------------------------
    @property
    def syncing(self) -> bool:
        """The image is being filled by the initial sync: it is no checkpoint of anything
        until a commit covers the sync's END (journal state ``syncing``)."""
        return self._state["syncing"]

    @property
    def generation(self) -> str | None:
        """The lineage of this image (hex): set by the initial sync that filled it, kept
        through commits and failover; None for an image of unknown origin."""
        return self._state.get("generation")

    def begin_sync(self, generation: bytes, first_seq: int = 0, epoch: int = 0) -> str:
        """The primary starts the initial sync of an image of ``generation``. An image of the
        same generation (the old host of a failed-over pair coming back) is kept and
        compared extent by extent ("incremental"); any other is emptied ("full": the sync
        sends only the allocated extents). Either way the journal says ``syncing`` first,
        so no crash can leave it looking like a checkpoint. An image that was active (this
        host ran the VM, in an earlier life of the store) is a secondary's again.
        ``epoch``: the BEGIN's; the session's writes are of it or later, so the committed
        epoch becomes the one before (another session's epochs mean nothing here)."""
        with self._lock:
            if self._failed_over_here:
                raise StoreError("initial sync: this node failed over; its image is the disk")
            keep = self.generation == generation.hex()
            self.unbuffered = None      # the new session re-sends whatever it covered
            committed = {"committed": epoch - 1} if epoch else {}
            self._write_journal("syncing", syncing=True, generation=generation.hex(),
                                active=False, **committed)
            for ep in self._stale_logs & set(self._logs):
                self._drop_log(ep)     # another primary's writes, of another session
            self._stale_logs = set()
            for lg in self._logs.values():   # this session's start: earlier seqs are not
                lg.index = [e for e in lg.index if e[0] >= first_seq]
            self._sync_end_seq = None
            if not keep:
                self.image.reset()
            self.counters.set("sync_bytes", 0)
            return "incremental" if keep else "full"

    def sync_check(self, offset: int, length: int, digest: bytes) -> bool:
        """Does our extent hold what the primary's does (``digest``)?"""
        if not self.syncing:
            raise StoreError(f"sync check [{offset}, +{length}): no initial sync is running")
        self.counters.add("sync_checked", length)
        if digest == zero_digest(length) and not any(
                allocated for _s, _e, allocated in self.image.extents(offset, length)):
            return True       # a hole asked about as zeros: nothing to read or hash
        return digest_of(self.image.pread(offset, length)) == digest

    def sync_write(self, offset: int, data: bytes | memoryview | None,
                   length: int = 0) -> None:
        """An extent of the initial sync, straight into the image (``data`` None: ``length``
        bytes that read as zeros, a hole punched: a kept image may hold data there)."""
        length = length if data is None else len(data)
        if not self.syncing:
            raise StoreError(f"sync extent [{offset}, +{length}): no initial sync is "
                             f"running (no SYNC_BEGIN)")
        if data is not None:
            self.image.pwrite(offset, data)
        else:
            self.image.zero(offset, length)
        self.counters.add("sync_bytes", length)

    def end_sync(self, seq: int) -> None:
        """Every extent was sent, the last ordered before ``seq``."""
        if not self.syncing:
            raise StoreError(f"SYNC_END (seq {seq}): no initial sync is running")
        self._sync_end_seq = seq

    def commit(self, epoch: int, covers_seq: int | None = None) -> None:
        """Make the image exactly the primary's disk at checkpoint ``epoch``; drop the overlay.
        Committing an epoch at or below the last committed one does nothing.
        ``covers_seq``: every write of the primary up to this seq is in ``epoch`` or before
        (its seal); a commit that covers the initial sync's END ends ``syncing``."""
        with self._lock:
            if self.active:
                raise StoreError(f"commit({epoch}): this node failed over; nothing to commit")
            if epoch <= self.committed_epoch:
                return
            if self.unbuffered is not None and epoch >= self.unbuffered[0]:
                lost_epoch, lost_seq, why = self.unbuffered
                raise GivenUp(f"commit({epoch}): forwarded write seq {lost_seq} of epoch "
                                 f"{lost_epoch} could not be buffered ({why}); this image "
                                 "cannot become the primary's disk at that checkpoint")
            # from here on writes of epochs ≤ e are refused: the logs being applied are final
            self._committing = epoch
            todo = [(ep, lg.path, list(lg.index)) for ep, lg in sorted(self._logs.items())
                    if ep <= epoch]
            fds = [self._logs[ep].fd for ep, _path, _index in todo]
        # Outside the lock: the receiver goes on buffering the next epoch meanwhile (the
        # fsyncs take long; holding the lock would hold back every forwarded write's ack).
        # Only this thread writes the journal; the receiver reads its state.
        try:
            for fd in fds:
                if self.durable:
                    os.fdatasync(fd)
                faults.point("store.commit.log_synced")
            self._write_journal(committing=epoch)
            self._apply(todo)
            synced = self.syncing and self._sync_end_seq is not None \
                and covers_seq is not None and covers_seq >= self._sync_end_seq
            self._write_journal(committed=epoch, committing=None,
                                syncing=self.syncing and not synced)
        finally:
            self._committing = None
        with self._lock:
            self._drop_committed(epoch)
        self.counters.add("commits")

    def _apply(self, todo: list[tuple[int, str, list]]) -> None:
        """Redo the writes of the given logs (epoch, path, index) into the image in the
        primary's order, (epoch, seq), and make it durable. The records were verified when
        they were appended or scanned: read only the headers' index; the kernel copies the
        data (copy_file_range), no user copy. Kept over a pwrite from a mapping of the log
        (session 9), which cost the commit's thread less for 1 MiB records (0.33-0.39 ms
        CPU per MiB against 0.43-0.51) but left the image's page cache in 1 MiB folios,
        into which later 4 KiB records cost 8.6-11.4 ms per MiB against 2.6-2.9 (ext4
        splices copy_file_range one 4 KiB page at a time: small folios)."""
        order = sorted((ep, seq, arrival, i, kind, off, length, data_pos, data_len)
                       for i, (ep, _path, index) in enumerate(todo)
                       for seq, arrival, kind, off, length, data_pos, data_len in index)
        # A record that a later one of exactly the same extent overwrites is not applied:
        # none of its bytes (or its allocation) survive it (a block rewritten within one
        # checkpoint: a journal's, metadata). Partial overlaps are applied in order.
        last = {(rec[5], rec[6]): k for k, rec in enumerate(order)}
        superseded = len(order) - len(last)
        fds = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for _ep, path, _index in todo]
        try:
            for k, (_ep, _seq, _arrival, i, kind, off, length, data_pos, data_len) in \
                    enumerate(order):
                if superseded and last[off, length] != k:
                    continue
                if kind in ZERO_KINDS:   # NO_HOLE (ZERO_ALLOC): the blocks stay allocated
                    self.image.zero(off, length, keep_allocated=kind == KIND_ZERO_ALLOC)
                    faults.point("store.commit.record")
                    continue
                done = 0
                while done < data_len:
                    n = os.copy_file_range(fds[i], self.image.fd, data_len - done,
                                           data_pos + done, off + done)
                    if n == 0:
                        raise StoreError(f"{todo[i][1]}: record at {data_pos} ends early; "
                                         f"the log was changed behind our back")
                    done += n
                faults.point("store.commit.record")
        finally:
            for fd in fds:
                os.close(fd)
        if superseded:
            self.counters.add("superseded", superseded)
        if self.durable:
            self.image.sync()
        faults.point("store.commit.image_synced")

    def _apply_and_finish(self, epoch: int) -> None:
        """Replay of an interrupted commit (at open)."""
        self._apply([(ep, self._logs[ep].path, self._logs[ep].index)
                     for ep in sorted(self._logs) if ep <= epoch])
        self._finish_commit(epoch)

    def _finish_commit(self, epoch: int) -> None:
        self._write_journal(committed=epoch, committing=None)
        self._drop_committed(epoch)

    def _drop_committed(self, epoch: int) -> None:
        """The logs of committed epochs and the SVM's overlay go (the SVM is reset to the
        checkpoint)."""
        for ep in [x for x in self._logs if x <= epoch]:
            self._drop_log(ep)
            faults.point("store.commit.log_dropped")
        self._drop_overlay()
        self._update_gauges()

    def discard_uncommitted(self) -> int:
        """Forget the buffered PVM writes of every uncommitted (torn) epoch. Returns how many
        epochs were dropped. The overlay is the SVM's state and stays."""
        with self._lock:
            epochs = [ep for ep in self._logs if ep > self.committed_epoch]
            for ep in epochs:
                self._drop_log(ep)
            if epochs:
                self.counters.add("discards", len(epochs))
            self._update_gauges()
            return len(epochs)

    def _drop_overlay(self) -> None:
        self.overlay.reset()
        self.bitmap[:] = False
        self._overlay_blocks = 0

    # -- failover ------------------------------------------------------------
    def failover(self) -> None:
        """The SVM becomes the VM: merge its overlay into the image (journalled) and drop
        the uncommitted PVM writes. Idempotent."""
        if self.syncing:
            raise StoreError("failover: the image is still being filled by the initial sync; "
                             "it holds no checkpoint to go on from")
        with self._lock:
            self._failed_over_here = True
            if self.active:
                return
            path = os.path.join(self.state_dir, "overlay.bitmap")
            with open(path, "wb") as f:
                np.packbits(self.bitmap).tofile(f)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            faults.point("store.failover.bitmap_saved")
            self._write_journal(merging=True)
            # The merge copies overlay runs over the image: doing it again is harmless, and
            # the survivor's guest depends on it (an error here stops the only node serving
            # the VM). A transient I/O error is retried; a lasting one still raises, and
            # the journal's "merging" state finishes the merge at the next open.
            for attempt in range(1, MERGE_ATTEMPTS + 1):
                try:
                    self._merge_overlay()
                    break
                except OSError as e:
                    self.counters.add("io_errors")
                    log.error("store %s: failover merge attempt %d of %d failed: %s",
                              self.state_dir, attempt, MERGE_ATTEMPTS, e)
                    if attempt == MERGE_ATTEMPTS:
                        raise
            self.counters.add("failovers")

    def _merge_overlay(self) -> None:
        for start, stop in _runs(self.bitmap):
            off, length = start * self.block, (stop - start) * self.block
            for pos in range(off, off + length, 1 << 22):
                n = min(1 << 22, off + length - pos)
                self.image.pwrite(pos, self.overlay.pread(pos, n))
            faults.point("store.merge.run")
        if self.durable:
            self.image.sync()
        faults.point("store.merge.image_synced")
        self._write_journal(merging=False, active=True)
        os.unlink(os.path.join(self.state_dir, "overlay.bitmap"))
        self._drop_overlay()
        for ep in list(self._logs):
            self._drop_log(ep)
        self._update_gauges()

    # -- SVM I/O (from the SVM's NBD export) ---------------------------------
    def svm_read(self, offset: int, length: int) -> bytes | bytearray:
        with self._lock:
            if self.active:
                return self.image.pread(offset, length)
            b0, b1 = offset // self.block, (offset + length) // self.block
            bits = self.bitmap[b0:b1]
            if not bits.any():
                return self.image.pread(offset, length)
            if bits.all():
                return self.overlay.pread(offset, length)
            out = bytearray(self.image.pread(offset, length))
            for start, stop in _runs(bits):
                lo, hi = start * self.block, stop * self.block
                out[lo:hi] = self.overlay.pread(offset + lo, hi - lo)
            return out

    def svm_extents(self, offset: int, length: int) -> Runs:
        """Allocated runs and holes of what the SVM reads at [offset, offset+length): the
        image's, with the overlay's where the SVM wrote since the checkpoint."""
        with self._lock:
            runs = self.image.extents(offset, length)
            if self.active:
                return runs
            b0 = offset // self.block
            for start, stop in _runs(self.bitmap[b0:(offset + length) // self.block]):
                lo, hi = (b0 + start) * self.block, (b0 + stop) * self.block
                runs = paint(runs, self.overlay.extents(lo, hi - lo))
            return runs

    def svm_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            if self.active:
                self.image.pwrite(offset, data)
                return
            b0, b1, new = self._reserve(offset, len(data))
            self.overlay.pwrite(offset, data)
            self.bitmap[b0:b1] = True
            self._overlay_blocks += new
            self._update_gauges()

    def svm_zero(self, offset: int, length: int, keep_allocated: bool = False) -> None:
        with self._lock:
            if self.active:
                self.image.zero(offset, length, keep_allocated)
                return
            b0, b1, new = self._reserve(offset, length)
            self.overlay.zero(offset, length)
            self.bitmap[b0:b1] = True
            self._overlay_blocks += new
            self._update_gauges()

    def _reserve(self, offset: int, length: int) -> tuple[int, int, int]:
        """Block range of a new overlay write and how many of its blocks are new. A write
        that takes the overlay past ``overlay_max_bytes`` is taken all the same (the SVM
        must not see an error for a limit: SvmLink._apply) and counted."""
        b0, b1 = offset // self.block, (offset + length) // self.block
        new = int((~self.bitmap[b0:b1]).sum())
        if new and self.overlay_bytes + new * self.block > self.overlay_max_bytes:
            self.counters.add("overlay_over_bound")
        return b0, b1, new

    def flush(self) -> None:
        with self._lock:
            (self.image if self.active else self.overlay).sync()

    # -- misc ---------------------------------------------------------------
    def _update_gauges(self) -> None:
        self.counters.set("overlay_bytes", self.overlay_bytes)
        self.counters.set("buffer_bytes", self.buffer_bytes)
        self.counters.set("epoch", self.committed_epoch)

    def close(self) -> None:
        with self._lock:
            for lg in self._logs.values():
                os.close(lg.fd)
            self._logs.clear()
            self.image.close()
            self.overlay.close()


def _runs(bits: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges where ``bits`` is True."""
    padded = np.concatenate(([False], bits, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


GENERATION_FILE = "generation"


def read_generation(state_dir: str) -> str | None:
    """The image generation recorded in ``state_dir`` (journal first, then the primary's
    own record), hex; None if there is none."""
    try:
        with open(os.path.join(state_dir, JOURNAL)) as f:
            gen = json.load(f).get("generation")
        if gen:
            return gen
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(state_dir, GENERATION_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def primary_generation(state_dir: str) -> bytes:
    """The generation of the primary's image: the recorded one (a failed-over secondary
    going on as primary keeps its lineage), else a new one, recorded."""
    gen = read_generation(state_dir)
    if gen:
        return bytes.fromhex(gen)
    new = os.urandom(32)
    os.makedirs(state_dir, exist_ok=True)
    tmp = os.path.join(state_dir, GENERATION_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(new.hex())
    os.replace(tmp, os.path.join(state_dir, GENERATION_FILE))
    return new
