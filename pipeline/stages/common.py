"""What every stage process shares: slot kinds, the stop protocol, logging, ring helpers.

Stages are started by the supervisor with ``fork``; they inherit rings, counters
and the guest's mappings. A stage stops when its ``stop`` event is set (the
supervisor sets it on SIGTERM/SIGINT) or when its input ring is closed and drained.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import time
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from pipeline import faults, trace
from pipeline.ring import Ring, RingClosed, RingTimeout, Slot
from pipeline.shm import prefault_array
from pipeline.signals import report_fatal_signals, stop_on_signals
from pipeline.sockets import check_handshakes

# slot.kind
SLOT_DATA = 1   # a batch of pages
SLOT_END = 2    # end of an epoch's pages on this ring; ring 0's marker carries the vCPU blob

# slot.marks: stage-private bits, never sent. The wire's bits have fields of their own
# (slot.epoch_flags: wire.FLAG_*, slot.batch_flags: wire.PAGES_*), see pipeline/ring.py.
MARK_BUFFERED = 1   # the pages are in the snapshot buffer at ``slot.row``, not in the slot
MARK_BAD = 2        # a verify worker found a page that failed its hash or did not decode
MARK_LZ4 = 4        # the digest worker compressed this batch's pages, or tried to (the
                    # send stage judges pipeline.compress = "auto" by the batches' mode)
MARK_STAGED = 8     # the receive stage put the batch's pages in staging at ``slot.row``
                    # already (raw pages: nothing to decode), the slot has no data
MARK_UNSTAGED = 16  # with MARK_STAGED: a live round's raw batch whose pages the restore
                    # stage takes from the record itself (Receiver.unstaged), not staging

POLL_S = 0.2     # how often a blocked stage looks at its stop event

ZERO_PAGE_HASH: dict[int, bytes] = {}


def zero_page_hash(page_size: int) -> bytes:
    """blake3 of an all-zero page (the hash a ZERO page is sent with)."""
    h = ZERO_PAGE_HASH.get(page_size)
    if h is None:
        h = ZERO_PAGE_HASH[page_size] = blake3.blake3(bytes(page_size)).digest()
    return h


try:
    from pipeline import _pagehash     # csrc/pagehash.c, built by pip install (setup.py)
except ImportError:                    # a source tree nobody built: one blake3 call a page
    _pagehash = None

#: the page size the compiled many-page kernel hashes (blake3's four 1 KiB chunks)
MANY_PAGE_SIZE = 4096


def hash_pages(pages: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """blake3 of each row of ``pages`` (or of the rows ``rows``), as a (k, 32) uint8 array.

    One call for all of them (``pipeline._pagehash``, csrc/pagehash.c): the chunks of many
    pages go through blake3's SIMD kernel side by side (16 with AVX-512), where the blake3
    package, one call per page, filled 4 of its lanes and cost a Python call a page besides
    (scripts/bench_hash_many.py measures both). Without the compiled module, or for pages
    other than 4 KiB, :func:`hash_pages_each`."""
    if not pages.flags.c_contiguous:
        raise ValueError("hash_pages: pages must be C-contiguous rows")
    if _pagehash is None or pages.shape[1] != MANY_PAGE_SIZE:
        return hash_pages_each(pages, rows)
    idx = None if rows is None else np.ascontiguousarray(rows, np.int64)
    out = np.empty((len(pages) if idx is None else len(idx), 32), np.uint8)
    _pagehash.hash_pages(pages, idx, out)
    return out


def hash_pages_each(pages: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """:func:`hash_pages` with the blake3 package, one call per page, but nothing else per
    page: a slice of one flat memoryview, the call, one join of the digests and one
    np.frombuffer for all of them (1.5 us a page here, 0.9 of it the hash itself, against
    2.5 us with a numpy row, a digest and an np.frombuffer per page)."""
    page_size = pages.shape[1]
    if not pages.flags.c_contiguous:
        raise ValueError("hash_pages: pages must be C-contiguous rows")
    flat = memoryview(pages.reshape(-1))
    starts = range(0, len(pages) * page_size, page_size) if rows is None \
        else (np.asarray(rows, np.int64) * page_size).tolist()
    h = blake3.blake3
    digests = b"".join([h(flat[s:s + page_size]).digest() for s in starts])
    return np.frombuffer(digests, np.uint8).reshape(-1, 32)


def domain_page_hashes(domain, pfns: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """blake3 of the guest's pages ``pfns`` as they are now: hashed where they are when the
    backend maps all of guest memory (no copy: the gather cost 0.3 ms per 1k pages, on the
    secondary's path from BEGIN to SVM_DIRTY), else read ``chunk`` at a time."""
    view = domain.memory_view()
    if view is not None and view.flags.c_contiguous:
        return hash_pages(view, pfns)
    out = np.empty((len(pfns), 32), np.uint8)
    buf = np.empty((min(chunk, max(len(pfns), 1)), domain.page_size), np.uint8)
    for at in range(0, len(pfns), chunk):
        part = pfns[at:at + chunk]
        domain.read_pages(part, buf[:len(part)])
        out[at:at + len(part)] = hash_pages(buf[:len(part)])
    return out


class HashTable:
    """What the secondary holds: blake3 of every page as of the last committed checkpoint.

    On the primary it is shared memory owned by the supervisor: digest workers read it,
    the coordinator updates it when an epoch commits (never before: a torn epoch must
    not change it). On the secondary the restore stage keeps its own, for checking REFs.
    """

    def __init__(self, hashes: np.ndarray, valid: np.ndarray) -> None:
        self.hashes = hashes   # (page_count, 32) uint8
        self.valid = valid     # (page_count,) bool

    def matches(self, pfns: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        return self.valid[pfns] & held_hashes_equal(self.hashes, pfns, hashes)

    def update(self, pfns: np.ndarray, hashes: np.ndarray) -> None:
        self.hashes[pfns] = hashes
        self.valid[pfns] = True

    def prefault(self) -> None:
        """(The primary's: the tables segment, :func:`_prefault`.)"""
        prefault_array(self.hashes)


class SvmPages:
    """What the SVM holds at the pages it dirtied, from this epoch's SVM_DIRTY: the primary's
    coordinator publishes the hashes, the digest workers send pages the PVM has alike as
    SVM pages (no content). Shared memory, one epoch at a time (the next epoch begins only
    after this one's pages went through the digest workers).

    SVM_DIRTY may come in parts, in pfn order (the secondary sends hashes as it has them):
    after each part, ``covered`` says up to which pfn the epoch's hashes are all here, and a
    batch below it need not wait for the rest (:meth:`covers`)."""

    PFN_BITS = 40   # covered: (epoch + 1) << PFN_BITS | the first pfn not yet covered

    def __init__(self, hashes: np.ndarray, epoch: np.ndarray, ready, wake: list[int],
                 covered=None) -> None:
        self.hashes = hashes    # (page_count, 32) uint8
        self.epoch = epoch      # (page_count,) uint64: epoch + 1 whose SVM_DIRTY gave the hash
        self.ready = ready      # shared int: the newest epoch whose hashes are published (or
                                # that will have none)
        self.wake = wake        # an eventfd per digest worker, posted at each publish
        # made here when not given: the supervisor makes this object before the fork
        self.covered = covered if covered is not None else \
            multiprocessing.get_context("fork").Value("Q", 0, lock=False)

    def publish(self, epoch: int, pfns: np.ndarray | None, hashes: np.ndarray | None,
                more: bool = False) -> None:
        """Coordinator: the SVM's hashes for ``epoch`` (None: none will come); ``more``:
        a part of them, more (of higher pfns) follow."""
        if pfns is not None and len(pfns):
            self.hashes[pfns] = hashes
            self.epoch[pfns] = epoch + 1
        if more:
            bound = int(pfns.max()) + 1 if pfns is not None and len(pfns) else 0
            self.covered.value = (epoch + 1) << self.PFN_BITS | bound
        else:
            self.ready.value = epoch
        for fd in self.wake:
            os.eventfd_write(fd, 1)

    def prefault(self) -> None:
        """The tables segment into this process's page tables (:func:`_prefault`)."""
        prefault_array(self.hashes)

    def covers(self, epoch: int, max_pfn: int) -> bool:
        """Are all of ``epoch``'s hashes of pfns up to ``max_pfn`` here?"""
        if self.ready.value >= epoch:
            return True
        c = self.covered.value
        return c >> self.PFN_BITS == epoch + 1 and max_pfn < c & ((1 << self.PFN_BITS) - 1)

    def same(self, epoch: int, pfns: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Which of the pages (pfns, their PVM hashes) the SVM holds as they are."""
        return (self.epoch[pfns] == epoch + 1) & held_hashes_equal(self.hashes, pfns, hashes)


class PageBuffer:
    """Rows of guest pages in a shared segment the supervisor owns (the primary's
    snapshot buffer, the secondary's staging area)."""

    def __init__(self, segment, page_size: int) -> None:
        self.segment = segment
        self.pages = np.ndarray((segment.size // page_size, page_size), np.uint8, segment.buf)

    def prefault(self) -> None:
        self.segment.prefault()


class PausePriority:
    """Real-time scheduling (SCHED_FIFO, lowest priority) for the work inside the PVM pause,
    where the host allows it (root or CAP_SYS_NICE): the pause is the guest's downtime. In
    the Xen lab, with more runnable processes than CPUs, the gather was preempted inside the
    pause. The work is bounded (the snapshot buffer), the guest is already stopped when it is
    raised, and it is dropped around the proof's full-memory hash, which must not keep
    other work off the CPU for seconds. The heartbeat runs above it (SCHED_RR 3,
    stages/heartbeat.RT_PRIORITY): at equal priority this FIFO work kept it off the CPU."""

    WORK = 1    # SCHED_FIFO priority of a checkpoint's work: hashing, the data stages,
                # the prescan's rounds (they queue behind each other, never behind other
                # work)
    HOP = 2     # of a checkpoint's control hops, which do little work each (the
                # coordinators and their ZeroMQ I/O threads), and of the PVM's pause (its
                # read of the log and copy: the guest is stopped; snapshot.run): above WORK,
                # so SVM_DIRTY's parts and the ACK never wait behind a hashing stage at
                # real time (at the same priority a part waited 2.2 ms, p50, for a digest
                # worker to block); below the heartbeat's (SCHED_RR 3,
                # stages/heartbeat.RT_PRIORITY)

    def __init__(self, wanted: bool) -> None:
        self.allowed = wanted and hasattr(os, "sched_setscheduler")
        self.normal = os.sched_getparam(0) if self.allowed else None
        # what is set now: a call that changes nothing makes no system call (a drop from
        # real time cost 0.3 ms of wall time on a loaded machine, on the commit's path)
        self.level = 0      # SCHED_FIFO priority now, 0: normal scheduling
        self.threads: list[int] = []    # other threads of this process that follow urgent()
        self.threads_level = 0          # theirs (urgent's ``threads``)

    def follow(self, tids: list[int]) -> None:
        """Threads of this process (a ZeroMQ context's I/O threads: sockets.io_threads) that
        take the calling thread's urgency from now on (sched_setscheduler of 0 sets the
        calling thread only)."""
        self.threads = list(tids)
        if self.threads_level:
            self._set(self.threads, self.threads_level)

    def permitted(self) -> bool:
        """May this process run at real time? Tried (and undone) now: a host without
        CAP_SYS_NICE, or a cgroup without real-time runtime, refuses it."""
        if self.allowed and not self.level:
            self.urgent(True)
            self.urgent(False)
        return self.allowed

    def urgent(self, on: bool, level: int = WORK, threads: int | None = None) -> None:
        """SCHED_FIFO at ``level`` (WORK or HOP), or back to normal scheduling; the
        followed threads at ``threads`` if given (the secondary's prehash round hashes at
        WORK while its I/O threads stay at HOP: the BEGIN they carry is what stops it)."""
        want = level if on else 0
        want_threads = (level if threads is None else threads) if on else 0
        if not self.allowed or (want, want_threads) == (self.level, self.threads_level):
            return
        if want != self.level:
            self.level = want
            self._set([0], want)
        if want_threads != self.threads_level:
            self.threads_level = want_threads
            self._set(self.threads, want_threads)

    def _set(self, tids: list[int], level: int) -> None:
        try:
            for tid in tids:
                if level:
                    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(level))
                else:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, self.normal)
        except OSError:
            self.allowed = False      # not permitted here: the pause runs at normal priority


class StagePriority:
    """The scheduling of a data stage on the checkpoint's path (digest, send, receive,
    verify, restore): asleep waiting for work, and at work on a checkpoint's pages, at the
    pause's priority, as the control hops (:class:`PausePriority`): each hand-off between
    two of these processes is a wake-up, and at normal priority on a loaded 2-core machine
    a wake-up waited for a core, once per hop of the commit. A checkpoint's work is bounded
    by the snapshot buffer. At work on a live round's pages (a full sync or a pre-copy
    round: seconds of CPU, judged by throughput, not latency) and asleep while one is in
    flight, normal priority: hours of ZeroMQ encryption and page copies must not keep
    everything else off the CPU. ``live``: the shared word the coordinator sets to the epoch
    of the live round in flight, -1 while there is none (SharedState.live).
    Made in the supervisor, copied into each stage by the fork. ``level``: the SCHED_FIFO
    priority, PausePriority.WORK for the stages that hash or decode pages (digest,
    verify), PausePriority.HOP for the ones that hand records on, whose I/O threads carry
    them (send, receive), and for the restore stage: at WORK a record waited 1-2 ms, p50,
    for a digest worker or the secondary's hashing to block."""

    def __init__(self, wanted: bool, live, level: int = PausePriority.WORK) -> None:
        self.priority = PausePriority(wanted)
        self.live = live
        self.level = level

    def follow(self, tids: list[int]) -> None:
        self.priority.follow(tids)

    def waiting(self) -> None:
        """About to sleep until work comes."""
        self.priority.urgent(self.live.value < 0, self.level)

    def working(self, epoch: int) -> None:
        """About to work on a record or batch of ``epoch``."""
        self.priority.urgent(epoch != self.live.value, self.level)

    def background(self, epoch: int) -> None:
        """About to do work of ``epoch`` that nothing waits for yet (the restore stage's
        copy of the SVM's pages while the epoch is in transit): at WORK whatever this
        stage's level, so the hops of the checkpoint's path (SVM_DIRTY's parts, the
        records) are not held behind it; the followed threads stay at this stage's level
        (the pages channel's I/O thread takes the epoch's records in meanwhile)."""
        self.priority.urgent(epoch != self.live.value, PausePriority.WORK, threads=self.level)

    def normal(self) -> None:
        """About to do work too long for real time whatever its epoch (a proof's hash of
        all of memory)."""
        self.priority.urgent(False)


@dataclass
class StageContext:
    """Handed to every stage's ``run``: its name, counters and stop event."""
    name: str
    counters: Any            # pipeline.counters.StageCounters: this stage's block
    stop: Any                # multiprocessing.Event
    log: logging.Logger
    node: Any = None         # pipeline.counters.NodeCounters: node info, checkpoint log

    def stopping(self) -> bool:
        """Called once per turn of every stage's loop: also its fault point."""
        if faults.ACTIVE:
            faults.point(f"stage.{self.name.split('.')[0]}.loop")
        check_handshakes()
        return self.stop.is_set()


def _name_process(name: str) -> None:
    """Name this process after its stage (/proc/PID/comm, what top and ps show), so the
    CPU of each stage can be told apart (scripts/checkpoint_work.py --by-thread)."""
    try:
        with open(f"/proc/{os.getpid()}/comm", "w") as fh:
            fh.write(f"colo-{name}"[:15])
    except OSError:
        pass        # a name is a convenience, never a reason to fail


def stage_main(ctx: StageContext, run, *args: Any) -> None:
    """The body of every stage process: signals, logging, a clear line on failure."""
    # The supervisor decides when stages stop; a Ctrl-C on the terminal reaches the whole
    # process group, so stages ignore SIGINT and let the supervisor stop them in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a native crash (SIGSEGV in numpy, _pagehash, lz4, libzmq...) prints every thread's
    # Python frames into the stage's log before the stage dies of it (issue 13)
    report_fatal_signals()
    # SIGTERM straight to a stage (systemd signals the whole control group) sets its stop
    # event from a thread: ctx.stop is a multiprocessing Event whose lock the stage's loop
    # holds inside ctx.stop.is_set() every turn, so a handler calling set() could wait
    # for its own thread forever (pipeline.signals). Never put back: the handler it
    # replaces is the supervisor's, inherited through fork, which would stop the node.
    stop_on_signals((signal.SIGTERM,), ctx.stop.set)
    trace.WHO = ctx.name
    _name_process(ctx.name)
    profile = _cpu_profile()
    try:
        _prefault(args)
        run(ctx, *args)
    except (KeyboardInterrupt, RingClosed):
        pass
    except Exception:
        ctx.log.exception("stage %s failed", ctx.name)
        raise SystemExit(1)
    finally:
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.path.join(os.environ["COLO_CPU_PROFILE"],
                                            f"{os.getsid(0)}-{ctx.name}.prof"))


def _cpu_profile():
    """With COLO_CPU_PROFILE=DIR, a cProfile of this stage on its own thread's CPU time
    (time spent blocked does not count), written to DIR/<session>-<stage>.prof when the
    stage stops: where a stage's CPU goes, which wall-clock profiles of processes that
    mostly wait do not show. SIGUSR2 starts it afresh (say, once the full sync is done)."""
    if not os.environ.get("COLO_CPU_PROFILE"):
        return None
    import cProfile
    profile = cProfile.Profile(time.thread_time_ns, 1e-9)
    signal.signal(signal.SIGUSR2, lambda *_: profile.clear())
    profile.enable()
    return profile


def worker_loop(ctx: StageContext, ring_in: Ring, ring_out: Ring, process,
                priority: StagePriority | None = None) -> None:
    """The loop of a worker between two rings (verify): each DATA slot of ``ring_in``
    becomes one slot of ``ring_out`` through ``process(slot, out)``; END markers pass
    through unchanged. Stops when the stage stops or ``ring_in`` closes."""
    c = ctx.counters
    while True:
        if priority is not None:
            priority.waiting()
        slot = read_slot(ctx, ring_in)
        if slot is None:
            return
        if priority is not None:
            priority.working(slot.epoch)
        if faults.ACTIVE:
            faults.point(f"stage.{ctx.name.split('.')[0]}.loop")
        out = write_slot(ctx, ring_out)
        if out is None:
            return
        t0 = time.perf_counter_ns()
        trace.point("w_in", slot.epoch)
        if slot.kind == SLOT_END:
            copy_marker(slot, out)
        else:
            process(slot, out)
        trace.point("w_out", slot.epoch)
        ring_in.release_read(slot)
        ring_out.commit_write(out)
        c.add("busy_ns", time.perf_counter_ns() - t0)
        c.max("ring_high_water", ring_out.high_water)


def _prefault(args: tuple) -> None:
    """Map the rings, guest memory and shared tables a stage was handed into its page
    tables now: a forked process starts with none of them, and first-touch faults cost
    several times the copy they interrupt, so they must not land inside a PVM pause or a
    commit. The primary's tables segment (HashTable, SvmPages, send.Pending) was not
    mapped before session 20: the first checkpoints' SVM_DIRTY, scattered into SvmPages by
    the coordinator and read by the digest workers, took a fault per page of the table it
    touched (the coordinator's SVM_DIRTY in -> published up to 1.66 ms of CPU against
    ~0.15 warm; docs/tuning.md, Session 20 (prim)). Anything handed to a stage that has a
    ``prefault`` method is prefaulted."""
    for arg in args:
        for obj in arg if isinstance(arg, (list, tuple)) else (arg,):
            if callable(getattr(type(obj), "prefault", None)):   # (Ring, PageBuffer,
                obj.prefault()                                   # Domain and the tables)


def read_slot(ctx: StageContext, ring: Ring) -> Slot | None:
    """Wait for the next slot of ``ring``; None if the stage should stop. Counts wait time."""
    t0 = time.perf_counter_ns()
    try:
        while True:
            try:
                return ring.acquire_read(timeout=POLL_S)
            except RingTimeout:
                if ctx.stopping():
                    return None
    finally:
        ctx.counters.add("wait_ns", time.perf_counter_ns() - t0)


def write_slot(ctx: StageContext, ring: Ring) -> Slot | None:
    """Wait for a free slot of ``ring``; None if the stage should stop. Counts wait time."""
    t0 = time.perf_counter_ns()
    try:
        while True:
            try:
                return ring.acquire_write(timeout=POLL_S)
            except RingTimeout:
                if ctx.stopping():
                    return None
    finally:
        ctx.counters.add("wait_ns", time.perf_counter_ns() - t0)


def copy_marker(src: Slot, dst: Slot) -> None:
    """Forward an END marker (header and its vCPU blob) from one ring to the next."""
    dst.copy_header(src)
    if src.vcpu_len:
        dst.data_flat[:src.vcpu_len] = src.data_flat[:src.vcpu_len]


def ready_rings(rings: list[Ring], extra_fds: list[int], timeout: float) -> tuple[list[int], list[int]]:
    """Indexes of rings with a published slot and which of ``extra_fds`` are readable."""
    fds = [r.fileno() for r in rings]
    readable, _, _ = select.select(fds + extra_fds, [], [], timeout)
    rs = set(readable)
    return [i for i, fd in enumerate(fds) if fd in rs], [fd for fd in extra_fds if fd in rs]


def new_event():
    return multiprocessing.get_context("fork").Event()


def rows_unlike(rows: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Which rows of ``rows`` (n, k) differ from ``row`` (k,): ``(rows != row).any(axis=1)``
    by one comparison of each row as a whole (a k-byte void), not k bytes and a reduction:
    on 1k hashes against the zero page's, 34 against 4-9 us (the secondary's BEGIN, before
    SVM_DIRTY's last part goes)."""
    rows = np.ascontiguousarray(rows, np.uint8)
    row = np.ascontiguousarray(row, np.uint8)
    if rows.ndim != 2 or row.shape != rows.shape[1:]:
        raise ValueError(f"rows_unlike: rows of shape {rows.shape} and a row of {row.shape}")
    if not rows.shape[1]:
        return np.zeros(len(rows), bool)
    whole = np.dtype((np.void, rows.shape[1]))
    return rows.view(whole)[:, 0] != row.view(whole)[0]


def held_hashes_equal(held: np.ndarray, pfns: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Which of ``hashes`` (k, 32) are the hashes ``held`` (page_count, 32) has at ``pfns``:
    ``(held[pfns] == hashes).all(axis=1)`` as four 64-bit words a row, xor-ed and or-ed
    together, not 32 byte compares and a reduction over each row: the digest workers'
    classification makes two a batch before the ACK (a table's REFs, the SVM's pages), 22
    against 12 us on 500 pages, 42 against 15 on 1000."""
    if held.shape[1:] != hashes.shape[1:] or held.shape[1] % 8 or not held.flags.c_contiguous:
        return (held[pfns] == hashes).all(axis=1)
    x = np.take(held.view(np.uint64), pfns, axis=0)
    x ^= np.ascontiguousarray(hashes, np.uint8).view(np.uint64)
    differ = x[:, 0].copy()
    for j in range(1, x.shape[1]):
        differ |= x[:, j]
    return differ == 0
