"""The secondary's side: the SVM's export over the store, and the receiver of forwarded
PVM writes (validated, buffered, compared, acknowledged)."""
from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

import zmq

from pipeline import sockets
from pipeline.disk import nbd_protocol as P
from pipeline.disk import wire
from pipeline.disk.comparator import PVM, SVM, DiskComparator
from pipeline.disk.counters import DiskCounters
from pipeline.disk.store import GivenUp, SecondaryStore, StoreError, StoreFull

log = logging.getLogger(__name__)

#: the reason an ack of a write that was not buffered starts with (status 0: the guest's
#: write succeeds; the primary logs why the secondary gave up)
GIVEN_UP = "given up: "


class FillAlarm:
    """Asks for a checkpoint once a bounded store (the SVM's overlay, the PVM writes'
    buffer) holds ``at`` of its bound (half by default), once per committed epoch: a commit
    empties it, so a pair whose checkpoints keep up never reaches the bound — no
    replication given up for a full buffer, no SVM overlay past its ceiling."""

    def __init__(self, store: SecondaryStore, comparator: DiskComparator, what: str,
                 held: Callable[[], int], bound: int, at: float = 0.5) -> None:
        self.store, self.comparator, self.what = store, comparator, what
        self.held, self.bound, self.at = held, bound, at
        self._asked_at = -1   # the committed epoch at which it last asked

    def check(self) -> None:
        store = self.store
        if store.committed_epoch != self._asked_at and self.held() >= self.bound * self.at:
            self._asked_at = store.committed_epoch
            self.comparator.request_checkpoint(
                "dirty_threshold", f"{self.what} at {self.held()} of {self.bound} bytes")


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
        #: compare the SVM's writes with the PVM's (disk.compare): else none is hashed
        self.compare = comparator.mode != "off"
        self.overlay_alarm = FillAlarm(store, comparator, "SVM overlay",
                                       lambda: store.overlay_bytes, store.overlay_max_bytes)
        #: past the ceiling the write still goes into the overlay (see SvmLink._apply);
        #: this asks again, once per epoch, in case the first request was lost or slow
        self.overlay_over_alarm = FillAlarm(store, comparator, "SVM overlay (past its ceiling)",
                                            lambda: store.overlay_bytes,
                                            store.overlay_max_bytes, at=1.0)

    def connect(self) -> SvmLink:
        return SvmLink(self)


class SvmLink:
    poll_items: tuple = ()
    inflight = 0

    def __init__(self, backend: SvmBackend) -> None:
        self.b = backend

    def read(self, offset: int, length: int) -> bytes | bytearray:
        return self.b.store.svm_read(offset, length)

    def block_status(self, offset: int, length: int):
        return self.b.store.svm_extents(offset, length)

    def write(self, cookie: int, offset: int, data: bytearray, fua: bool = False) -> bool:
        self._apply(lambda: self.b.store.svm_write(offset, data), offset, len(data))
        if self.b.compare:
            self._compare(offset, len(data), wire.digest_of(data))
        if fua:
            self.b.store.flush()
        return True

    def zero(self, cookie: int, offset: int, length: int, fua: bool = False,
             keep_allocated: bool = False) -> bool:
        # the overlay is dropped at the next checkpoint: NO_HOLE matters once active
        self._apply(lambda: self.b.store.svm_zero(offset, length, keep_allocated),
                    offset, length)
        if self.b.compare:
            self._compare(offset, length, wire.ZERO_DIGEST)
        if fua:
            self.b.store.flush()
        return True

    def _apply(self, op, offset: int, length: int) -> None:
        """The SVM's write into its overlay. Never refused for the overlay's ceiling: the
        SVM would keep that error if the primary were lost before the next checkpoint
        (a guest filesystem goes read-only on it), and nothing else can be done with the
        write — holding it until the checkpoint would hold the checkpoint's pause of the
        SVM, after which the write belongs to a guest state that was replaced. Past the
        ceiling the overlay takes it all the same (counted in ``overlay_over_bound``) and
        asks for the checkpoint that empties it; only the file system itself (full, I/O
        error) can fail it."""
        op()
        if not self.b.store.active:   # once active the overlay is gone: writes go to the image
            self.b.overlay_alarm.check()
            self.b.overlay_over_alarm.check()

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


#: a seal awaited this long is logged (once an epoch): the primary's seal goes out in its
#: pause, normally long before the epoch's last page
LATE_SEAL_LOG_S = 1.0


class SealedEpochs:
    """Which of the primary's writes the receiver has seen, and what the primary sealed.

    The primary numbers its writes 1, 2, 3... without gaps and seals epoch e with the
    last seq tagged e or earlier (wire.SEAL). A commit of e waits here until every seq up
    to that seal was seen (buffered, or refused — a refused write already failed at the
    guest, and waiting for it would never end): a write of e still travelling on its
    connection's socket when the pages of e are complete must not be refused as late."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.seen_upto = 0              # every seq ≤ this was seen
        self._seen_above: set[int] = set()
        self._seals: dict[int, int] = {}  # epoch → last seq tagged ≤ epoch
        #: the epoch a commit is waiting for right now (tests watch it), else None
        self.waiting_for: int | None = None
        #: the epoch whose seal was last awaited in vain, since when, and whether said
        self._late: tuple[int, float, bool] = (-1, 0.0, False)

    def seen_all(self, seqs: list[int]) -> None:
        with self._cond:
            self._seen_above.update(q for q in seqs if q > self.seen_upto)
            advanced = False
            while self.seen_upto + 1 in self._seen_above:
                self.seen_upto += 1
                self._seen_above.discard(self.seen_upto)
                advanced = True
            if advanced:
                self._cond.notify_all()

    def restart_at(self, seq: int) -> None:
        """A sync's BEGIN at ``seq``: the primary's session starts there (a primary that
        re-protects goes on numbering; seqs before it are another session's)."""
        with self._cond:
            if seq - 1 > self.seen_upto:
                self.seen_upto = seq - 1
            self._seen_above = {q for q in self._seen_above if q > self.seen_upto}
            while self.seen_upto + 1 in self._seen_above:
                self.seen_upto += 1
                self._seen_above.discard(self.seen_upto)
            self._cond.notify_all()

    def seal(self, epoch: int, last_seq: int) -> None:
        with self._cond:
            self._seals[epoch] = max(last_seq, self._seals.get(epoch, 0))
            self._cond.notify_all()

    def need(self, epoch: int) -> int | None:
        """The last seq sealed into ``epoch`` or an epoch after it (None: none sealed)."""
        with self._cond:
            return self._need(epoch)

    def _need(self, epoch: int) -> int | None:
        """The seq every write of ``epoch`` is at or below (None: not sealed yet)."""
        later = [e for e in self._seals if e >= epoch]
        return self._seals[min(later)] if later else None

    def complete(self, epoch: int, timeout_s: float) -> bool:
        """Whether every write of ``epoch`` and earlier was seen (sealed and arrived),
        waiting up to ``timeout_s`` for it."""
        with self._cond:
            return self._complete(epoch, timeout_s)

    def _complete(self, epoch: int, timeout_s: float) -> bool:
        self.waiting_for = epoch
        try:
            if self._cond.wait_for(lambda: (need := self._need(epoch)) is not None
                                   and self.seen_upto >= need, timeout_s):
                return True
            # said once an epoch (the coordinator asks in short slices), once it is late
            now = time.monotonic()
            if self._late[0] != epoch:
                self._late = (epoch, now - timeout_s, False)
            if not self._late[2] and now - self._late[1] >= LATE_SEAL_LOG_S:
                self._late = (epoch, self._late[1], True)
                log.warning("secondary disk: waiting for the primary's seal of epoch %d "
                            "(sealed: %s, seen up to seq %d) for %.0f ms", epoch,
                            self._need(epoch), self.seen_upto, (now - self._late[1]) * 1e3)
            return False
        finally:
            self.waiting_for = None

    def wait(self, epoch: int, timeout_s: float) -> None:
        """Return once every write of ``epoch`` and earlier was seen; StoreError naming
        what is missing after ``timeout_s``."""
        with self._cond:
            if not self._complete(epoch, timeout_s):
                need = self._need(epoch)
                missing = [] if need is None else [
                    q for q in range(self.seen_upto + 1, need + 1)
                    if q not in self._seen_above]
                raise StoreError(
                    f"commit({epoch}): " + (f"the primary never sealed epoch {epoch}"
                                            if need is None else
                                            f"writes up to seq {need} were sealed, seen only "
                                            f"up to {self.seen_upto} (missing seq "
                                            f"{', '.join(map(str, missing[:10]))}"
                                            f"{'...' if len(missing) > 10 else ''})")
                    + f" within {timeout_s * 1e3:.0f} ms")
            for e in [e for e in self._seals if e < epoch]:
                del self._seals[e]


class ForwardReceiver(threading.Thread):
    """Binds the ROUTER end of the forwarding link and serves it until :meth:`stop`."""

    def __init__(self, address: str, store: SecondaryStore, comparator: DiskComparator,
                 counters: DiskCounters, context: zmq.Context | None = None,
                 secure=None) -> None:
        super().__init__(name="disk-forward-receiver", daemon=True)
        self.store = store
        self.comparator = comparator
        self.counters = counters
        #: disk.compare on: each forwarded write is hashed (blake3) for the comparator and
        #: its buffer record. Off, neither: its record says UNHASHED (the store's log
        #: format); 1 MiB writes cost the receiver ~0.3 ms CPU per MiB less
        self.compare = comparator.mode != "off"
        self.sealed = SealedEpochs()
        #: the seq of the last sync's BEGIN: writes before it belong to another session
        #: (a re-protecting primary's queue to its lost secondary) and are refused
        self.session_begin = 0
        #: the epoch of that BEGIN: a commit of an earlier epoch while its sync runs is
        #: of another session (the primary started over: this secondary is stale)
        self.session_epoch = 0
        #: (answers, admitted writes) of the groups admitted and not yet buffered
        self._admitted: list[tuple[list, list]] = []
        self._admitted_bytes = 0   # what buffering them will add
        self.buffer_alarm = FillAlarm(store, comparator, "disk buffer",
                                          lambda: store.buffer_bytes, store.buffer_max_bytes)
        ctx = context or zmq.Context.instance()
        # with ``secure`` a CURVE server: only the primary's key gets in
        self.writes_in = sockets.disk_forward_in(ctx, address, secure)
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
                    # a burst: everything queued (up to a bound), one ACK per peer, then
                    # the writes are buffered (hashed, appended, compared) — the primary
                    # answers its guest meanwhile (see _admit_group)
                    acks: dict[bytes, list[tuple[int, int, str]]] = {}
                    for _ in range(256):
                        try:
                            frames = self.writes_in.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        body = frames[1:]
                        if len(body) == 1 and wire.is_seal([body[0].buffer]):
                            self._seal(body[0].buffer)
                            continue
                        entries = acks.setdefault(frames[0].bytes, [])
                        if not body or len(body) % 2:
                            entries.append(self._refuse(0, P.EINVAL, f"FORWARD message of "
                                                                     f"{len(body)} frames"))
                            continue
                        for i in range(0, len(body), 2):
                            entries += self._admit_group(body[i].buffer, body[i + 1].buffer)
                    for identity, entries in acks.items():
                        self.writes_in.send_multipart([identity, wire.encode_ack(entries)])
                    self._buffer_admitted()
                now = time.monotonic_ns()
                if now - last_check > 50_000_000:
                    self.comparator.check_timeouts(now)
                    last_check = now
        finally:
            self.writes_in.close(0)

    def _seal(self, frame) -> None:
        try:
            epoch, last_seq = wire.decode_seal(frame)
        except wire.ForwardError as e:
            log.warning("secondary disk: refused a seal: %s", e)
            self.counters.add("bad_forwards")
            return
        self.sealed.seal(epoch, last_seq)

    def _admit_group(self, headers, data) -> list[tuple[int, int, str]]:
        """Validate one group of writes of a FORWARD and decide each one's (seq, status,
        reason) answer, before anything is written; the admitted writes wait in
        ``_admitted`` for :meth:`_buffer_admitted`. The ACK goes before they are buffered:
        what it promises — the write is the secondary's to apply at its epoch's commit,
        or the replication is given up — holds from admission on (a log file that fails
        later gives the replication up, as it does before an ack; a commit waits until
        every sealed write was buffered, not acked), and the primary answers its guest
        while the secondary hashes and appends (traced at 4 KiB: the ACK left ~45 us of
        a ~120 us group earlier; the forward round trip 819 -> 750 us, median of 6 runs).
        A sync group is applied before its answer (its answers carry what the sync goes
        on with), after the writes admitted before it are buffered (a BEGIN drops what
        came before its seq: it must find them)."""
        # unhashed writes are hashed once acked (_buffer_group): not on the round trip
        decoded = wire.decode_forward_group([headers, data], self.store.size, self.store.block,
                                            self.store.committed_epoch, hash_unhashed=False)
        valid, sync, other_session = [], False, set()
        for i, w in enumerate(decoded):
            # Another session's write (the primary's queue to a lost secondary, delivered
            # to this process when its socket reconnected): refused as such, never a
            # give-up, and judged so before its own checks: its epoch is the old
            # session's and may be outside this one's window (a "wrong epoch" refusal
            # gave the replication up: the fault matrix's dev-shm-full@mid-run row).
            # (One that comes before this process's first BEGIN is refused or buffered
            # as it is: the BEGIN drops both.)
            if w.seq and w.seq < self.session_begin:
                decoded[i] = wire.refusal(errno.ESTALE, f"forwarded write seq {w.seq}: from "
                                          f"before this sync (BEGIN seq "
                                          f"{self.session_begin})", w.seq)
                other_session.add(w.seq)
                continue
            if isinstance(w, wire.ForwardError):
                continue
            sync = sync or w.kind in wire.SYNC_KINDS
            valid.append(w)
        if sync:        # (a sync group has no unhashed WRITE: only SYNC extents are)
            self._buffer_admitted()
            return self._handle_sync(decoded)
        outcome = iter(self.store.admit_pvm_writes(valid, self._admitted_bytes)
                       if valid else [])
        answers, admitted = [], []
        for w in decoded:
            if isinstance(w, wire.ForwardError):
                answers.append(self._refuse(w.seq, w.status, str(w)))
                if w.seq and w.seq not in other_session:
                    self._refused(w.seq, str(w))
                continue
            err = next(outcome)
            if err is None:
                answers.append((w.seq, 0, ""))
                admitted.append(w)
                self._admitted_bytes += self.store.record_bytes(w)
            elif isinstance(err, (StoreFull, GivenUp)):
                answers.append(self._give_up(w, err))
            else:
                answers.append(self._refuse(w.seq, P.EIO, str(err)))
                self._refused(w.seq, str(err))
        self._admitted.append((answers, admitted))
        return answers

    def _refused(self, seq: int, reason: str) -> None:
        """A write of this session refused (malformed, or not admissible): the primary's
        image has it, ours never will, and it counts as seen (waiting for it would hold
        every later commit). So no commit from the next epoch on succeeds here (the
        replication is given up: this secondary ends stale, a new sync fills it), rather
        than one committing the epoch without the write: a silent difference."""
        epoch = self.store.committed_epoch + 1
        if self.store.give_up(epoch, seq, f"refused: {reason}"):
            log.error("secondary disk: refused forwarded write seq %d (%s): replication "
                      "given up from epoch %d (this secondary ends stale)", seq, reason, epoch)

    def _buffer_admitted(self) -> None:
        """Buffer (hash, append) and compare the writes :meth:`_admit_group` admitted (and
        acked), then count their groups' writes as seen (a commit waits for that). A write
        that cannot be buffered now gives the replication up (it was acked)."""
        admitted, self._admitted, self._admitted_bytes = self._admitted, [], 0
        for answers, writes in admitted:
            self._buffer_group(answers, writes)

    def _buffer_group(self, answers: list[tuple[int, int, str]], writes: list) -> None:
        if writes:
            if self.compare:
                writes = wire.hashed_all(writes)
            errors = self.store.buffer_pvm_writes(writes, admitted=True)
            buffered = [w for w, err in zip(writes, errors) if err is None]
            if buffered:   # one lock and one clock read for the group
                if self.compare:
                    self.comparator.record_many(PVM, buffered)
                self.counters.add("received", len(buffered))
                self.buffer_alarm.check()
            for w, err in zip(writes, errors):
                if err is not None:
                    self._give_up(w, err)
        # buffered or refused: either way no longer on its way
        self.sealed.seen_all([seq for seq, _st, _r in answers if seq])

    def _give_up(self, w: wire.ForwardedWrite, err: Exception) -> tuple[int, int, str]:
        """A write this store cannot buffer: its bound is reached (StoreFull), its buffer
        file failed (disk full, I/O error), or the replication was given up already. The
        guest's write stands (the primary's image has it): a limit or a fault of the
        secondary must never fail it (a guest filesystem goes read-only on an error). So
        this secondary gives the replication up (SecondaryStore.unbuffered): no commit of
        that epoch or later succeeds here, the coordinator stops it as stale, the primary
        runs on unprotected, and a new sync fills it when it rejoins. Acked with status 0
        and the reason, so the primary says why."""
        if isinstance(err, OSError):
            self.counters.add("io_errors")
        if self.store.give_up(w.epoch, w.seq, str(err)):
            log.error("secondary disk: could not buffer forwarded write seq %d of epoch %d "
                      "(%s): replication given up, no commit of that epoch will succeed "
                      "here (this secondary ends stale and is synced again when it rejoins)",
                      w.seq, w.epoch, err)
            # the commit that fails ends this secondary: the sooner, the fewer writes go
            # to a secondary that can no longer hold them
            self.comparator.request_checkpoint("dirty_threshold", f"disk replication "
                                               f"given up: {err}")
        self.counters.add("given_up")
        return w.seq, 0, f"{GIVEN_UP}{err}"

    def _handle_sync(self, decoded: list) -> list[tuple[int, int, str]]:
        """A group of the initial sync: applied one by one, in order (BEGIN empties the
        image, extents go straight into it, END records where the sync ends)."""
        answers = []
        unseen = set()   # checked extents that differ: their data comes with the same seq
        for w in decoded:
            if isinstance(w, wire.ForwardError):
                answers.append(self._refuse(w.seq, w.status, str(w)))
                continue
            reason = ""
            try:
                if w.kind == wire.KIND_SYNC_BEGIN:
                    self.session_begin, self.session_epoch = w.seq, w.epoch
                    reason = self.store.begin_sync(w.digest, w.seq, w.epoch)
                    self.sealed.restart_at(w.seq)
                    log.info("secondary disk: %s initial sync begins (seq %d)", reason, w.seq)
                elif w.kind == wire.KIND_SYNC_CHECK:
                    if not self.store.sync_check(w.offset, w.length, w.digest):
                        answers.append((w.seq, errno.ENODATA, "differs"))
                        unseen.add(w.seq)
                        continue
                elif w.kind == wire.KIND_SYNC:
                    self.store.sync_write(w.offset, w.data)
                elif w.kind == wire.KIND_SYNC_ZERO:
                    self.store.sync_write(w.offset, None, w.length)
                elif w.kind == wire.KIND_SYNC_END:
                    self.store.end_sync(w.seq)
                    log.info("secondary disk: initial sync sent (seq %d, %d bytes)", w.seq,
                             self.counters["sync_bytes"])
                else:
                    raise StoreError(f"seq {w.seq}: a {w.kind} write in a sync group")
            except StoreError as e:
                answers.append(self._refuse(w.seq, P.EIO, str(e)))
                continue
            except OSError as e:
                answers.append(self._refuse(w.seq, P.EIO, f"sync seq {w.seq}: {e}",
                                            counter="io_errors"))
                continue
            answers.append((w.seq, 0, reason))
        self.sealed.seen_all([seq for seq, _st, _r in answers if seq and seq not in unseen])
        return answers

    def _refuse(self, seq: int, status: int, reason: str,
                counter: str = "bad_forwards") -> tuple[int, int, str]:
        log.warning("secondary disk: refused a forwarded write: %s", reason)
        self.counters.add(counter)
        return seq, status, reason
