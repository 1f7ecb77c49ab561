"""The primary's export: apply each PVM write to the primary image, forward it to the
secondary tagged with its epoch and its place in the write order, and answer the guest
once the secondary acked.

One write order (:meth:`PrimaryBackend.order`): every write of every NBD connection
takes its epoch and its seq (1, 2, 3... without gaps) under one lock, the same lock
:meth:`PrimaryBackend.set_epoch` takes when the checkpoint's pause moves the epoch on
(the snapshot stage calls it with the PVM paused). So a write is either ordered before
the boundary (epoch e, and counted in flight before set_epoch returns) or after it
(e+1): none is tagged with an epoch that is already being committed. Overlapping writes
reach the primary image in seq order (each waits for the earlier ones it overlaps), and
the secondary applies its buffered writes in seq order, so both images end the same
whatever order the forwards arrive in. set_epoch also sends the secondary a SEAL (the
last seq of the closed epoch), so it commits e only once every write of e arrived.

Epochs start at 1. :meth:`PrimaryBackend.wait_forwarded` lets the coordinator wait
until every write of epoch e was acknowledged by the secondary.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zmq

from pipeline import faults, sockets
from pipeline.disk import nbd_protocol as P
from pipeline.disk import wire
from pipeline.disk.counters import DiskCounters
from pipeline.disk.image import ImageFile, block_runs
from pipeline.disk.progress import SYNC_DONE, SYNC_FAILED, SYNC_RUNNING
from pipeline.disk.settings import DiskSettings
from pipeline.disk.store import primary_generation

log = logging.getLogger(__name__)

#: a burst's forwards are sent early once they carry this much data
FORWARD_BATCH_BYTES = 256 * 1024
#: writes at least this large travel as a group of their own, without a copy (below,
#: a copy into the group is cheaper than a frame of their own: pyzmq's own advice)
FORWARD_ZERO_COPY_MIN = 64 * 1024
#: how long set_epoch waits for a running initial sync to order its END
SET_EPOCH_SYNC_WAIT_S = 600
#: writes at least this large go through the pwrite pool; smaller ones are done inline
POOLED_WRITE_MIN = 256 * 1024
POOL_THREADS = 4
_pack_forward_header = wire.FORWARD_HEADER.pack


class PrimaryBackend:
    """Export backend of the PVM's disk. ``forward=False`` serves the image unreplicated
    (the PVM running unprotected, and the benchmark's forwarding-off figure)."""

    def __init__(self, settings: DiskSettings, counters: DiskCounters,
                 context: zmq.Context | None = None, forward: bool = True,
                 secure=None, protected: bool = True, first_epoch: int = 1) -> None:
        """``secure(socket, bind)``, if given, puts a forwarding socket under the node's
        CURVE keys (pipeline.sockets.NodeContext.secure) before it connects.
        ``protected=False``: start unprotected (role auto: no secondary yet, or the
        survivor of a takeover); :meth:`reprotect` syncs the first secondary that comes.
        ``first_epoch``: the epoch new writes are tagged with until the first checkpoint
        (the survivor goes on from its SVM's epochs: a secondary that comes back with an
        image of this lineage has committed epochs below them)."""
        self.settings = settings
        self.counters = counters
        self.image = ImageFile(settings.image, settings.export_size)
        self.size = settings.export_size
        self.block_size = settings.block_size
        self.max_request = settings.max_request
        self.window = settings.forward_window
        #: where the secondary listens (None: unreplicated); ``forward_address`` is it
        #: while protected, None while running unprotected
        self.forward_to = settings.forward if forward else None
        self.forward_address = self.forward_to if protected else None
        self.context = context or zmq.Context.instance()
        self.secure = secure
        self.epoch = max(1, first_epoch)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # the write order: epoch and seq of each write, and set_epoch, under one lock
        self._order_lock = threading.Lock()
        self._applied = threading.Condition(self._order_lock)
        #: epoch → writes not yet acked. Under the order lock too: order() counts a write
        #: in the lock it already holds (a lock of its own cost each write a second one)
        self._inflight = collections.Counter()
        self._cond = threading.Condition(self._order_lock)
        self._waiting = 0   # threads waiting in wait_applied
        self.last_seq = 0
        #: writes ordered but not yet in our image: seq → (start, end)
        self._applying: dict[int, tuple[int, int]] = {}
        #: Test hook (None in service): called on the connection's thread with
        #: (seq, epoch) right after a write took its place in the order and before its
        #: forward is queued — where a checkpoint can overtake the write.
        self.after_ordering = None
        self._sync: InitialSync | None = None
        #: set while no sync's BEGIN is waiting for the secondary's answer: forwards of
        #: guest writes ordered after a BEGIN are sent only once the secondary has taken
        #: it (the BEGIN starts its session: its committed epoch, its seqs)
        self.session_open = threading.Event()
        self.session_open.set()
        #: the seq of the current session's BEGIN: a write ordered before it that still
        #: waits for an ack was forwarded to a secondary that is gone (the new one refuses
        #: it as another session's), so none will come — the sync carries it instead
        self.session_seq = 0
        #: the session in which the replication was last given up, and why
        #: (:meth:`replication_given_up`; None: never)
        self._gave_up_session = -1
        self.given_up: dict | None = None
        #: called (on the sync's thread) once the initial sync ordered its END, or failed:
        #: the disk stage's control loop answers waiting ``wait_synced`` requests then
        self.wakeup = None
        #: the lineage of this image: a secondary holding the same one syncs incrementally
        self.generation = primary_generation(settings.resolved_state_dir) \
            if self.forward_to is not None else b""
        self._seal_socket: zmq.Socket | None = None
        if self.forward_to is not None:
            self._seal_socket = sockets.disk_forward_out(self.context, self.forward_to, secure)
        counters.set("epoch", self.epoch)

    def pool(self) -> ThreadPoolExecutor:
        """Threads that write large requests into the image (shared by all connections)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="disk-pwrite")
            return self._pool

    def unprotect(self) -> None:
        """The secondary is gone: stop forwarding and answer writes waiting for its ack
        (they are in our image; nobody else will ever have them). :meth:`reprotect` undoes
        it when a new secondary comes."""
        with self._order_lock:
            if self.forward_address is not None:
                log.warning("primary disk: running unprotected, writes are no longer "
                            "forwarded")
            self.forward_address = None

    def reprotect(self) -> bool:
        """A new secondary: forward again, after a new initial sync (incremental if it holds
        an image of our generation). Its BEGIN is ordered at the moment forwarding
        resumes, so every write after it is forwarded and every one before is in what
        the sync reads. False if we were protected already (or never replicate)."""
        with self._order_lock:
            if self.forward_address is not None or self.forward_to is None:
                return False
            self.forward_address = self.forward_to
            self.session_open.clear()
            begin = self._order_marker_locked()
            self.session_seq = begin[0]
            # the seals of the new session on a connection of their own, like each NBD
            # connection's forwards (PrimaryLink._renew_socket): the old one may be to a
            # secondary gone unnoticed (a host replaced at its address, before a
            # retransmit drew an RST), which swallows what is written into it: the new
            # secondary's first commit would wait for a seal that never comes
            old_seal, self._seal_socket = self._seal_socket, sockets.disk_forward_out(
                self.context, self.forward_to, self.secure)
            if old_seal is not None:
                old_seal.close(0)
        old, self._sync = self._sync, InitialSync(self, begin)
        if old is not None:
            old.stop()
        self._sync.start()
        log.info("primary disk: re-protecting, a new initial sync (BEGIN seq %d)", begin[0])
        return True

    def secondary_gave_up(self, seq: int, reason: str) -> None:
        """The secondary acked write ``seq`` without buffering it (``reason``: its buffer's
        bound reached, its buffer file failing): the guest's write stands, in our image
        only; the secondary stops at its next commit and the pair goes unprotected (the
        coordinator hears it lost). Said once per session."""
        self.counters.add("given_up")
        if self.replication_given_up("buffer", seq, reason):
            log.error("primary disk: the secondary gave the replication up at write seq %d "
                      "(%s); it stops at its next commit and the guest runs on "
                      "unprotected until a secondary rejoins (a new sync)", seq, reason)

    def replication_given_up(self, cause: str, seq: int, reason: str) -> bool:
        """Record why this session's replication was given up (:attr:`given_up`, which
        ``stats`` returns and the coordinator copies into the node info as
        ``disk_given_up`` when it sees the secondary lost): ``cause`` "buffer" (the
        secondary could not buffer write ``seq``), "refused" (it refused write ``seq`` of
        its session, so it commits nothing from there on) or "sync" (the initial sync
        failed). True the first time in a session (the first reason is the one kept)."""
        with self._order_lock:
            if self._gave_up_session == self.session_seq:
                return False
            self._gave_up_session = self.session_seq
            self.given_up = {"cause": cause, "seq": seq, "reason": reason,
                             "session": self.session_seq, "epoch": self.epoch,
                             "at": round(time.time(), 3)}
        return True

    def set_epoch(self, epoch: int) -> None:
        """Tag writes from now on with ``epoch`` (never moves backwards), and seal the
        epochs before it at the secondary. Writes ordered before this returns are counted
        in flight (:meth:`wait_forwarded` sees them). While an initial sync runs it first
        waits for the sync's END to be ordered, so the sealed epoch holds the whole disk
        (the snapshot stage waits for that before the pause: then this wait is nil)."""
        sync = self._sync
        if sync is not None and not sync.ordered_end.wait(SET_EPOCH_SYNC_WAIT_S):
            log.error("primary disk: the initial sync is not done after %d s; sealing "
                      "epoch %d without it (its commit will say so)",
                      SET_EPOCH_SYNC_WAIT_S, epoch - 1)
        with self._order_lock:
            if epoch <= self.epoch:
                return
            self.epoch = epoch
            self.counters.set("epoch", epoch)
            if self._seal_socket is not None and self.forward_address is not None:
                try:
                    faults.point("disk.primary.seal")
                except OSError as exc:   # COLO_FAULT errno=...: this seal is lost on the way
                    log.error("primary disk: the seal of epoch %d was lost: %s", epoch - 1, exc)
                    self.counters.add("forward_errors")
                    return
                try:  # never blocks the pause: a secondary that takes nothing is lost anyway
                    self._seal_socket.send(wire.encode_seal(epoch - 1, self.last_seq),
                                           zmq.NOBLOCK)
                except zmq.Again:
                    log.error("primary disk: the secondary takes no seal of epoch %d",
                              epoch - 1)
                    self.counters.add("forward_errors")

    def order(self, start: int, end: int, can_forward: bool = True
              ) -> tuple[int, int, list[int], bool]:
        """Give a write of [start, end) its seq and epoch: (seq, epoch, the seqs of the
        earlier writes it overlaps that are not in our image yet — pass them to
        :meth:`wait_applied` before writing, then call :meth:`applied` —, and whether it
        is forwarded: decided here, under the lock that (un)protecting takes too)."""
        with self._order_lock:
            self.last_seq += 1
            seq, epoch = self.last_seq, self.epoch
            earlier = [q for q, (s, e) in self._applying.items() if s < end and start < e] \
                if self._applying else []
            self._applying[seq] = (start, end)
            forwarded = can_forward and self.forward_address is not None
            if forwarded:
                self._inflight[epoch] += 1     # (_track, in the lock held here)
        return seq, epoch, earlier, forwarded

    def _order_marker_locked(self) -> tuple[int, int]:
        """A sync marker's (seq, epoch), counted in flight; the order lock is held."""
        self.last_seq += 1
        self._inflight[self.epoch] += 1        # (_track, in the lock held here)
        return self.last_seq, self.epoch

    def wait_applied(self, seqs: list[int]) -> None:
        """Return once the writes ``seqs`` are in our image (or failed)."""
        with self._applied:
            self._waiting += 1
            try:
                self._applied.wait_for(lambda: not any(q in self._applying for q in seqs))
            finally:
                self._waiting -= 1

    def applied(self, seq: int) -> None:
        """The write ``seq`` is in our image (or failed): overlapping later ones may go."""
        with self._applied:
            del self._applying[seq]
            if self._waiting:
                self._applied.notify_all()

    def applied_all(self, seqs: list[int]) -> None:
        """:meth:`applied` for each of ``seqs`` (a burst's writes: one lock, not one each)."""
        with self._applied:
            for seq in seqs:
                del self._applying[seq]
            if self._waiting:
                self._applied.notify_all()

    def wait_forwarded(self, epoch: int, timeout_s: float) -> bool:
        """Wait until no write tagged ``epoch`` or earlier is still in flight. False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not any(n for e, n in self._inflight.items() if e <= epoch), timeout_s)

    def _track(self, epoch: int, delta: int) -> None:
        """Count ``delta`` writes of ``epoch`` in flight (never with the order lock held:
        it is the condition's)."""
        with self._cond:
            self._inflight[epoch] += delta
            if self._inflight[epoch] <= 0:
                del self._inflight[epoch]
                self._cond.notify_all()

    def connect(self) -> PrimaryLink:
        return PrimaryLink(self)

    # -- the initial sync -------------------------------------------------------
    def start_sync(self) -> None:
        """Stream the image's allocated extents to the secondary (which empties its own
        image first). Call before the export takes writes: the sync's BEGIN is ordered
        first, so the secondary commits nothing before it has emptied its image."""
        with self._order_lock:
            if self.forward_address is None or self._sync is not None:
                return
            self.session_open.clear()
            begin = self._order_marker_locked()
            self.session_seq = begin[0]
        self._sync = InitialSync(self, begin)
        self._sync.start()

    def wait_synced(self, timeout_s: float) -> bool:
        """True once the initial sync ordered its END (or there is none): a checkpoint
        sealed after that holds the whole disk."""
        return self._sync is None or self._sync.ordered_end.wait(timeout_s)

    def ready_for_checkpoint(self) -> bool:
        """May a checkpoint be taken now, as far as the disk goes? Unreplicated: always.
        Unprotected: no (the checkpoint would be for a secondary that has not had its
        sync: the coordinator's ``role primary`` comes first). Else once the sync (if
        one runs) ordered its END. Never blocks (the disk stage's control loop asks)."""
        if self.forward_to is None:
            return True
        if self.forward_address is None:
            return False
        sync = self._sync
        return sync is None or sync.ordered_end.is_set()

    def forward_socket(self) -> zmq.Socket:
        """A new DEALER to the secondary's forward receiver (CURVE when the node is)."""
        return sockets.disk_forward_out(self.context, self.forward_to, self.secure,
                                        hwm=self.window * 2 + 16,
                                        send_timeout_ms=self.settings.forward_timeout_ms)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._seal_socket is not None:
            self._seal_socket.close(0)
        self.image.close()


class InitialSync(threading.Thread):
    """The initial disk sync: every allocated extent of the primary's image (SEEK_DATA /
    SEEK_HOLE; holes are not sent, all-zero chunks go as SYNC_ZERO markers without data), in
    chunks that take their place in the one write order like writes.

    Incremental when the secondary holds an image of the same generation (the old host
    of a failed-over pair, back as the secondary with its old image): every extent of
    the disk is asked about by its blake3 (SYNC_CHECK) and only those that differ are
    sent. That covers the blocks written since the failover and those of the torn
    epoch — including writes the old primary applied but never got to forward, which
    no bitmap kept by the survivor could know about.

    Guest writes go on meanwhile and are forwarded as usual. A chunk is read only after
    the earlier writes it overlaps are in our image, and writes ordered after it wait
    for the read, so the secondary — which writes chunks straight into its image and
    applies buffered writes in seq order at each commit — ends with every byte as the
    primary has it: the last write to it, or the chunk read after all earlier writes.
    No dirty bitmap is needed: nothing written during the sync goes unsent."""

    CHUNK = 1 << 20
    WINDOW = 8          # chunks in flight to the secondary
    #: Test hook (None in service): called with a chunk's offset before the chunk takes
    #: its place in the order — where guest writes can overtake the sync.
    before_chunk = None

    def __init__(self, backend: PrimaryBackend, begin: tuple[int, int]) -> None:
        """``begin``: the (seq, epoch) the BEGIN was ordered at (before any write it
        must precede)."""
        super().__init__(name="disk-initial-sync", daemon=True)
        self.b = backend
        self.ordered_end = threading.Event()
        self._stopping = threading.Event()
        #: seq → epoch of every marker and chunk this sync ordered and the secondary has not
        #: acked: each is counted in the backend's in-flight writes from the moment it is
        #: ordered (before it is sent), and the ``finally`` of :meth:`run` gives back the
        #: count of each one left — a sync that ends on an error between ordering a chunk
        #: and sending it must not leave a count that no ack will ever take back (every
        #: later ``wait_forwarded`` would wait for it: the coordinator's epochs time out)
        self._inflight: dict[int, int] = {begin[0]: begin[1]}
        #: incremental: extents asked about, kept until answered: seq → (offset, n, data)
        self._checking: dict[int, tuple[int, int, bytes]] = {}
        self._begin_answer = ""
        self._extent_seqs: list[int] = []    # (for the log: the seqs of its extents)
        self._sent = 0
        self.failed = ""
        self._begin = begin

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)

    def _open_session(self) -> None:
        """Let the guest's forwards go (unless a newer sync replaced this one: its BEGIN
        is the one they wait for)."""
        if self.b._sync is self:
            self.b.session_open.set()

    def _order_marker(self) -> tuple[int, int]:
        with self.b._order_lock:
            return self.b._order_marker_locked()

    def run(self) -> None:
        b = self.b
        sock = b.forward_socket()
        self._sent = 0
        t0 = time.monotonic()
        completed = False
        for name, value in (("sync_total", 0), ("sync_done", 0), ("sync_ms", 0),
                            ("sync_rate_kib_s", 0), ("sync_state", SYNC_RUNNING)):
            b.counters.set(name, value)
        b.counters.add("syncs")
        try:
            seq, epoch = self._begin
            self._send(sock, epoch, seq, wire.KIND_SYNC_BEGIN, 0, 0, None,
                       digest=b.generation)
            self._drain(sock, 0)          # its answer: "full" or "incremental"
            self._open_session()          # the guest's forwards may follow it now
            incremental = self._begin_answer == "incremental"
            if incremental:  # the secondary kept its image: compare every extent
                runs = [(0, b.size)]
            else:
                runs = [(s, e) for s, e, allocated in
                        block_runs(b.image.extents(0, b.size), b.block_size) if allocated]
            total = sum(e - s for s, e in runs)
            b.counters.set("sync_total", total)
            b.counters.set("sync_incremental", int(incremental))
            log.info("primary disk: %s initial sync of %d bytes in %d extents",
                     "incremental" if incremental else "full", total, len(runs))
            done, said = 0, time.monotonic()
            for start, end in runs:
                for off in range(start, end, self.CHUNK):
                    if self._stopping.is_set() or b.forward_address is None:
                        return
                    n = min(self.CHUNK, end - off)
                    if self.before_chunk is not None:
                        self.before_chunk(off)
                    seq, epoch, earlier, forwarded = b.order(off, off + n)
                    if not forwarded:           # unprotected meanwhile: the sync is over
                        b.applied(seq)
                        return
                    self._inflight[seq] = epoch
                    self._extent_seqs.append(seq)
                    try:
                        if earlier:
                            b.wait_applied(earlier)
                        # incremental: a hole (most of a sparse disk) is not read or hashed
                        hole = incremental and not any(
                            allocated for _s, _e, allocated in b.image.extents(off, n))
                        data = None if hole else b.image.pread(off, n)
                    finally:
                        b.applied(seq)
                    if incremental:
                        # the data waits here for the answer: it is the extent as of seq
                        self._checking[seq] = (off, n, data)
                        self._send(sock, epoch, seq, wire.KIND_SYNC_CHECK, off, n, None,
                                   digest=wire.zero_digest(n) if hole
                                   else wire.digest_of(data))
                    else:
                        self._send_extent(sock, epoch, seq, off, n, data)
                    done += n
                    b.counters.set("sync_done", done)
                    if time.monotonic() - said >= 1.0:
                        said = time.monotonic()
                        b.counters.set("sync_rate_kib_s",
                                       round(done / 1024 / max(1e-3, said - t0)))
                        log.info("primary disk: initial sync %.0f%% (%d of %d MiB)",
                                 100 * done / max(1, total), done >> 20, total >> 20)
            seq, epoch = self._order_marker()
            self._inflight[seq] = epoch
            self.ordered_end.set()
            if b.wakeup is not None:
                b.wakeup()
            self._send(sock, epoch, seq, wire.KIND_SYNC_END, 0, 0, None)
            self._drain(sock, 0)
            elapsed = time.monotonic() - t0
            b.counters.set("sync_rate_kib_s", round(done / 1024 / max(1e-3, elapsed)))
            b.counters.set("sync_ms", max(1, round(elapsed * 1e3)))
            b.counters.set("sync_state", SYNC_DONE)
            completed = True
            log.info("primary disk: initial sync done, %d bytes sent in %.2f s (seqs: BEGIN "
                     "%d, %d extents %s, END %d)", self._sent, time.monotonic() - t0,
                     self._begin[0], len(self._extent_seqs),
                     _seq_ranges(self._extent_seqs), seq)
        except (OSError, zmq.ZMQError, RuntimeError) as e:
            self.failed = str(e)
            log.error("primary disk: the initial sync failed: %s", e)
            b.counters.add("forward_errors")
            if not self._stopping.is_set() and b.forward_address is not None:
                # (stopped, or the secondary lost: a consequence, not a reason)
                b.replication_given_up("sync", 0, f"the initial sync failed: {e}")
        finally:
            if not completed:      # failed, or given up (stopped, unprotected meanwhile)
                b.counters.set("sync_state", SYNC_FAILED)
            self.ordered_end.set()   # a failed sync fails the first commit, loudly
            self._open_session()
            if b.wakeup is not None:
                b.wakeup()
            for epoch in self._inflight.values():
                b._track(epoch, -1)
            sock.close(0)

    def _send_extent(self, sock, epoch: int, seq: int, off: int, n: int, data: bytes | None,
                     drain: bool = True) -> None:
        """The extent's data (None, a hole, or all zeros: a SYNC_ZERO without data)."""
        if data is not None and np.frombuffer(data, np.uint64).any():
            self._send(sock, epoch, seq, wire.KIND_SYNC, off, n, data,
                       digest=wire.UNHASHED, drain=drain)
        else:
            self._send(sock, epoch, seq, wire.KIND_SYNC_ZERO, off, n, None, drain=drain)
        self._sent += n
        self.b.counters.set("sync_bytes", self._sent)

    def _send(self, sock, epoch: int, seq: int, kind: int, offset: int, length: int,
              data, digest: bytes | None = None, drain: bool = True) -> None:
        if drain:   # (``seq`` itself is in _inflight already: it is not sent yet)
            self._drain(sock, self.WINDOW - 1 + (seq in self._inflight))
        frames = wire.encode_forward(kind, epoch, seq, offset, length, data, digest)
        sock.send(frames[0], zmq.SNDMORE)
        sock.send(frames[1], copy=len(frames[1]) < FORWARD_ZERO_COPY_MIN)
        self._inflight[seq] = epoch

    def _drain(self, sock, most: int) -> None:
        """Take answers until at most ``most`` are awaited. A checked extent that differs
        is sent (with its seq) and awaited in turn."""
        timeout = self.b.settings.forward_timeout_ms
        while len(self._inflight) > most:
            deadline = time.monotonic() + timeout / 1e3
            while not sock.poll(min(200, timeout)):   # slices: a stop is heard meanwhile
                if self._stopping.is_set():
                    raise RuntimeError("the sync was stopped")
                if self.b.forward_address is None:   # no ack will come from a lost one
                    raise RuntimeError("the secondary was lost (running unprotected)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no ack from the secondary within {timeout} ms")
            for seq, status, reason in wire.decode_ack(sock.recv_multipart()):
                epoch = self._inflight.pop(seq, None)
                if epoch is None:
                    continue
                checked = self._checking.pop(seq, None)
                if checked is not None and status == errno.ENODATA:
                    self._send_extent(sock, epoch, seq, *checked, drain=False)
                    continue
                self.b._track(epoch, -1)
                if status:
                    raise RuntimeError(f"the secondary refused sync seq {seq}: {reason}")
                if seq == self._begin[0]:
                    self._begin_answer = reason

def _seq_ranges(seqs: list[int]) -> str:
    """"3..7 9 12..13": a sorted list of seqs, as runs."""
    runs: list[list[int]] = []
    for q in seqs:
        if runs and q == runs[-1][1] + 1:
            runs[-1][1] = q
        else:
            runs.append([q, q])
    return " ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


def _then_sync(image: ImageFile, op, *args) -> None:
    """``op(*args)`` on the image, then make the image durable (a FUA write)."""
    op(*args)
    image.sync()


class _Pending:
    """A write the client has not been answered for: waiting for the secondary's ack,
    for our own pooled pwrite, or both."""
    __slots__ = ("cookie", "epoch", "error", "forwarded", "local", "sent")

    def __init__(self, cookie: int, epoch: int, sent: int) -> None:
        self.cookie, self.epoch, self.sent = cookie, epoch, sent
        self.forwarded = self.local = False
        self.error = 0


class PrimaryLink:
    """One NBD connection's forwarding socket and its in-flight writes.

    Large writes go to the primary image through a small thread pool so that writing
    our copy (page-cache block allocation is slow on a fresh sparse file) overlaps with
    reading the next request and with the forward; small writes are done inline (a
    pool hand-off costs more than the pwrite). A write waits for the earlier writes
    (of any connection) it overlaps, so our image applies them in seq order, as the
    secondary does.
    """

    def __init__(self, backend: PrimaryBackend) -> None:
        self.b = backend
        self.socket: zmq.Socket | None = None
        self.inflight = 0
        self._pending: dict[int, _Pending] = {}
        self._writing: dict[int, Future] = {}  # seq → its pooled pwrite
        self._local_done: collections.deque[int] = collections.deque()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._timeout_ns = backend.settings.forward_timeout_ms * 1_000_000
        #: when completions() last looked through every pending write for timeouts (a
        #: look per turn cost as much as the acks: every turn, every write in flight)
        self._scanned_ns = 0
        # forwards of the current burst of requests, sent as one message by end_of_burst
        self._outbox: list = []
        self._group_headers: list[bytes] = []   # the open group of small writes
        self._group_data: list = []
        self._outbox_seqs: list[int] = []
        self._outbox_bytes = 0
        self._send_failed: list[int] = []
        #: small forwarded writes whose copy in our image waits for the end of the burst:
        #: (seq, pending, op, args), in seq order
        self._deferred: list[tuple[int, _Pending, object, tuple]] = []
        #: deferred writes whose ack came before our copy was written (none in practice:
        #: acks are read only after the burst's copies are written) — answered next turn
        self._late: list[int] = []
        #: the session (its sync's BEGIN seq) this link's socket was made in
        self._socket_session = backend.session_seq
        if backend.forward_to:  # also while unprotected: re-protection forwards again
            self.socket = backend.forward_socket()
        #: what the connection loop polls for completions
        self.poll_items: list = [self._wakeup] + ([self.socket] if self.socket else [])

    def read(self, offset: int, length: int) -> bytes:
        return self.b.image.pread(offset, length)

    def block_status(self, offset: int, length: int):
        return self.b.image.extents(offset, length)

    def write(self, cookie: int, offset: int, data: bytearray, fua: bool = False) -> bool:
        return self._submit(cookie, wire.KIND_WRITE, offset, len(data), data, fua)

    def zero(self, cookie: int, offset: int, length: int, fua: bool = False,
             keep_allocated: bool = False) -> bool:
        # NO_HOLE travels as its own kind: the secondary's image, which serves the guest
        # after a failover, keeps those blocks allocated too
        kind = wire.KIND_ZERO_ALLOC if keep_allocated else wire.KIND_ZERO
        return self._submit(cookie, kind, offset, length, None, fua, keep_allocated)

    def _submit(self, cookie: int, kind: int, offset: int, length: int,
                data: bytearray | None, fua: bool = False, keep_allocated: bool = False
                ) -> bool:
        """Order the write, queue its forward, write our copy (``fua``: and make our image
        durable before the write completes); True if it is complete. The secondary's
        copy needs no fsync for FUA: it lives on the other host, which is what survives
        the loss of this one."""
        b = self.b
        seq, epoch, earlier, forwarding = b.order(offset, offset + length,
                                                  self.socket is not None)
        p = _Pending(cookie, epoch, time.monotonic_ns())
        try:
            if b.after_ordering is not None:
                b.after_ordering(seq, epoch)
            # forward first: ZeroMQ's I/O thread ships the data while we write our copy
            p.forwarded = not forwarding
            if forwarding:
                self._queue_forward(seq, p, kind, offset, length, data)
            if earlier:
                # never wait while holding unwritten copies: the writes we wait for may
                # belong to a connection that waits for ours (each writes its own first)
                self._write_deferred()
                b.wait_applied(earlier)
        except BaseException:
            b.applied(seq)
            raise
        if kind == wire.KIND_WRITE:
            op, args = b.image.pwrite, (offset, data)
        else:
            op, args = b.image.zero, (offset, length, keep_allocated)
        if fua:
            op, args = _then_sync, (b.image, op, *args)
            b.counters.add("fua_writes")
        if kind == wire.KIND_WRITE and length >= POOLED_WRITE_MIN:
            fut = b.pool().submit(op, *args)
            self._writing[seq] = fut
            fut.add_done_callback(lambda _f, seq=seq: self._pooled_done(seq))
            return self._complete_or_hold(seq, p)
        if forwarding and not fua:
            # written once the burst's forwards are sent (end_of_burst): the secondary
            # buffers them while we write our copies, instead of after
            self._deferred.append((seq, p, op, args))
            return self._complete_or_hold(seq, p)
        try:
            return self._apply_inline(seq, p, op, *args)
        finally:
            b.applied(seq)

    def _apply_inline(self, seq: int, p: _Pending, op, *args) -> bool:
        """Write our copy now. If that fails after the forward went out, the failure is
        answered with the ack (the pending entry must stay to account for the forward)."""
        try:
            op(*args)
        except OSError as e:
            if p.forwarded:  # nothing in flight: fail the request right here
                raise
            log.error("primary disk: writing our image failed: %s", e)
            self.b.counters.add("io_errors")
            p.error = P.EIO
        else:
            if faults.ACTIVE:   # in our image; its forward not sent before the burst ends
                faults.point("disk.primary.applied")
        p.local = True
        return self._complete_or_hold(seq, p)

    def _write_deferred(self) -> None:
        """Write the copies held back for the end of the burst into our image, in seq
        order. A failure is answered with the write's ack (its forward went out)."""
        deferred, self._deferred = self._deferred, []
        if not deferred:
            return
        try:
            for seq, p, op, args in deferred:
                try:
                    op(*args)
                except OSError as e:
                    log.error("primary disk: writing our image failed: %s", e)
                    self.b.counters.add("io_errors")
                    p.error = P.EIO
                if faults.ACTIVE:   # in our image; its forward maybe still in ZeroMQ
                    self.b.applied_all([seq])      # (one by one, as a fault point sees it)
                    faults.point("disk.primary.applied")
                p.local = True
                if p.forwarded:
                    self._late.append(seq)
        finally:
            # written (or failed, or cut short by a fault): later overlapping writes of any
            # connection may go; one lock for the burst (only this thread removes its seqs)
            applying = self.b._applying
            self.b.applied_all([d[0] for d in deferred if d[0] in applying])

    def flush(self) -> None:
        # acked writes are at the secondary and in our page cache: make our copy durable
        self._write_deferred()
        self.b.image.sync()

    def _complete_or_hold(self, seq: int, p: _Pending) -> bool:
        if p.local and p.forwarded:
            return True
        self._pending[seq] = p
        self.inflight += 1
        return False

    def _pooled_done(self, seq: int) -> None:  # runs on a pool thread
        if faults.ACTIVE:
            faults.point("disk.primary.applied")
        self.b.applied(seq)
        self._local_done.append(seq)
        os.eventfd_write(self._wakeup, 1)

    def _queue_forward(self, seq: int, p: _Pending, kind: int, offset: int, length: int,
                       data: bytearray | None) -> None:
        """Queue the write for the secondary (sent by end_of_burst); order() counted it.
        Small writes join the burst's open group (their data is copied once into it); a
        large one is a group of its own, sent without a copy."""
        # unhashed: the secondary hashes what it needs (wire.UNHASHED); the header packed
        # here rather than by wire.forward_header (a call less per write)
        header = _pack_forward_header(wire.FORWARD_MAGIC, kind, p.epoch, seq, offset, length,
                                      wire.UNHASHED)
        if data is not None and length >= FORWARD_ZERO_COPY_MIN:
            self._close_group()
            self._outbox += (header, data)
        else:
            self._group_headers.append(header)
            if data is not None:
                self._group_data.append(data)
        self._outbox_seqs.append(seq)
        self._outbox_bytes += length

    def _close_group(self) -> None:
        if self._group_headers:
            self._outbox += (b"".join(self._group_headers), b"".join(self._group_data))
            self._group_headers, self._group_data = [], []

    @property
    def outbox_full(self) -> bool:
        """Enough collected to send now rather than at the end of the burst."""
        return self._outbox_bytes >= FORWARD_BATCH_BYTES

    def end_of_burst(self) -> None:
        """Send the forwards collected while handling one burst of requests as one message
        (one wakeup of the link and of the secondary for many small writes)."""
        self._close_group()
        if self._outbox:
            self._send_outbox()
        self._write_deferred()

    def _send_outbox(self) -> None:
        if not self.b.session_open.is_set():
            # a sync's BEGIN is on its way: the secondary starts the session with it
            # (one round trip, at re-protection only); a BEGIN that gets no answer
            # fails the sync, which opens the session anyway
            self.b.session_open.wait(self.b.settings.forward_timeout_ms / 1e3)
        if self._socket_session != self.b.session_seq:
            self._renew_socket(self.b.session_seq)
        frames, seqs = self._outbox, self._outbox_seqs
        self._outbox, self._outbox_seqs, self._outbox_bytes = [], [], 0
        try:
            for i, frame in enumerate(frames):
                # zero-copy pays off only for large frames (pyzmq's own advice)
                self.socket.send(frame, zmq.SNDMORE if i < len(frames) - 1 else 0,
                                 copy=len(frame) < FORWARD_ZERO_COPY_MIN)
        except zmq.Again:
            log.error("primary disk: the secondary took nothing for %d ms; %d writes are "
                      "answered from our image alone (the secondary cannot commit their "
                      "epoch without them)", self.b.settings.forward_timeout_ms, len(seqs))
            self._send_failed += seqs

    def _renew_socket(self, session: int | None) -> None:
        """A forwarding socket of its own for each session: made anew once the pair is
        seen unprotected (``session`` None: its queue, the old session's forwards, is
        dropped; ZeroMQ delivered it to whatever process bound the address next, and the
        new secondary had to refuse it) and before the first forward of a new session
        (the old connection may be to a secondary that is gone without ZeroMQ having
        noticed: what was written into it was lost; the fault matrix's partition rows: the
        new secondary never saw a guest write ordered during the BEGIN's round trip, and
        its first commit waited for it). The old session's writes need no ack (the new
        sync carries them: completions)."""
        old = self.socket
        self.socket = self.b.forward_socket()
        self._socket_session = session
        self.poll_items[self.poll_items.index(old)] = self.socket
        old.close(0)
        self.b.counters.add("forward_reconnects")

    def completions(self, now_ns: int) -> list[tuple[int, int]]:
        """(cookie, NBD error) of every write now complete: acked by the secondary (or
        given up on) and written to our image."""
        done: list[tuple[int, int]] = []
        try:
            os.eventfd_read(self._wakeup)
        except BlockingIOError:
            pass
        for seq in self._late:
            self._finish_if_done(seq, self._pending[seq], done)
        self._late.clear()
        for seq in self._send_failed:   # (never sent: see _unreplicated)
            p = self._pending[seq]
            p.forwarded = True
            self.b._track(p.epoch, -1)
            self.b.counters.add("forward_errors")
            self._finish_if_done(seq, p, done)
        self._send_failed.clear()
        while self._local_done:
            seq = self._local_done.popleft()
            fut = self._writing.pop(seq)
            p = self._pending[seq]
            p.local = True
            if fut.exception() is not None:
                log.error("primary disk: writing our image failed: %s", fut.exception())
                self.b.counters.add("io_errors")
                p.error = P.EIO
            self._finish_if_done(seq, p, done)
        # (asking EVENTS costs less than the zmq.Again a recv with nothing to read raises)
        while self.socket is not None and self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
            try:
                entries = wire.decode_ack(frames)
            except ValueError as e:
                log.error("primary disk: %s from the secondary", e)
                continue
            # counted per ack message, not per write (each count takes a lock)
            acked: collections.Counter = collections.Counter()   # epoch → writes
            ok = latency_sum = latency_max = 0
            now = time.monotonic_ns()
            pending = self._pending
            for seq, status, reason in entries:
                p = pending.get(seq)
                if p is None or p.forwarded:
                    continue  # ack after we gave up on it (already answered EIO)
                p.forwarded = True
                acked[p.epoch] += 1
                latency = now - p.sent
                latency_sum += latency
                if latency > latency_max:
                    latency_max = latency
                if not status and not reason:      # the common case, _finish_if_done inline
                    ok += 1
                    if p.local:
                        del pending[seq]
                        self.inflight -= 1
                        done.append((p.cookie, p.error))
                    continue
                if status and seq < self.b.session_seq:
                    # another session's write, refused by the secondary of the new one:
                    # the new session's sync reads our image after it, so carries it
                    ok += 1
                elif status:
                    # the guest's write stands (our image has it); a secondary that
                    # refuses one of its session's writes gives the replication up (it
                    # commits no epoch from there on), so it never passes for our copy
                    log.error("primary disk: the secondary refused write seq %d: %s; "
                              "answered from our image alone", seq, reason)
                    self.b.counters.add("forward_errors")
                    self.b.replication_given_up("refused", seq, reason)
                else:
                    ok += 1
                    if reason:   # acked, not buffered: the secondary gave the pair up
                        self.b.secondary_gave_up(seq, reason)
                self._finish_if_done(seq, p, done)
            for epoch, n in acked.items():
                self.b._track(epoch, -n)
            if acked:
                self.b.counters.add("forwarded", ok)
                self.b.counters.add("forward_latency_ns", latency_sum)
                self.b.counters.max("forward_latency_max_ns", latency_max)
        unprotected = self.b.forward_address is None
        if not unprotected and now_ns - self._scanned_ns < min(self._timeout_ns, 50_000_000):
            return done
        self._scanned_ns = now_ns
        old_session = self.b.session_seq
        for seq, p in list(self._pending.items()):
            # unprotected, or re-protected since this write was forwarded to the lost one
            # (before this turn saw the pair unprotected): no ack will ever come for it
            if not p.forwarded and (unprotected or seq < old_session):
                p.forwarded = True  # no secondary any more: our own copy is the only one
                self.b._track(p.epoch, -1)
                self._finish_if_done(seq, p, done)
            elif not p.forwarded and now_ns - p.sent > self._timeout_ns:
                self._unreplicated(seq, p, now_ns)
                self._finish_if_done(seq, p, done)
        if unprotected and self._socket_session is not None and self.socket is not None:
            self._renew_socket(None)
        return done

    def _unreplicated(self, seq: int, p: _Pending, now_ns: int) -> None:
        """No ack for write ``seq`` within the forward timeout: the guest's write succeeds
        all the same (it is in our image; failing it would make the guest's filesystem go
        read-only for a fault of the replication). Safe: the secondary commits the
        write's epoch only once it has seen every seq sealed into it, so it either gets
        this write late (and acks it: ignored) or never commits that epoch (it stops as
        stale, the pair goes unprotected, a new sync carries the write)."""
        self._acked(p, now_ns)
        self.b.counters.add("forward_errors")
        log.error("primary disk: no ack for write seq %d (epoch %d) within %d ms; answered "
                  "from our image alone (the secondary cannot commit epoch %d without it)",
                  seq, p.epoch, self.b.settings.forward_timeout_ms, p.epoch)

    def _acked(self, p: _Pending, now_ns: int) -> None:
        p.forwarded = True
        self.b._track(p.epoch, -1)
        latency = time.monotonic_ns() - p.sent
        self.b.counters.add("forward_latency_ns", latency)
        self.b.counters.max("forward_latency_max_ns", latency)

    def _finish_if_done(self, seq: int, p: _Pending, done: list) -> None:
        if p.local and p.forwarded:
            del self._pending[seq]
            self.inflight -= 1
            done.append((p.cookie, p.error))

    def close(self) -> None:
        """End the link. A client gone mid-burst (EOF inside a request, a reset) leaves
        writes that took their seq and their epoch but whose forwards were not sent and
        whose copies are not in our image yet: both are done here (the secondary's commit
        of that epoch waits for every seq sealed into it, and another connection's write
        may wait for one of them here), and their acks are waited for, as for any write
        in flight (closing the socket drops what ZeroMQ has not sent yet), up to the
        forward timeout after which a write counts as lost, as in :meth:`completions`."""
        self.end_of_burst()
        poller = zmq.Poller()
        for item in self.poll_items:
            poller.register(item, zmq.POLLIN)
        while self._pending:
            poller.poll(100)
            self.completions(time.monotonic_ns())
        for fut in list(self._writing.values()):
            fut.exception()
        self._pending.clear()
        self.inflight = 0
        os.close(self._wakeup)
        if self.socket is not None:
            self.socket.close(0)
