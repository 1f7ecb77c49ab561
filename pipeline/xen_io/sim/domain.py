"""The ``sim`` backend: a simulated guest that is its own process.

The guest ("the VM") is a forked process whose RAM is a memfd mapped ``MAP_SHARED``
by the guest and by the pipeline. It runs a deterministic workload: it consumes
inputs in seq order from an :class:`~pipeline.xen_io.sim.input_log.InputLog`, and for
each input reads two pages, writes pages (in runs of consecutive pfns, with a
configurable zero / text-like / random content mix) and emits one output frame
derived from what it wrote. Everything it needs to continue is in a small vCPU
blob, so a guest loaded with its peer's RAM and blob continues exactly as the peer
would. Real randomness (``os.urandom``) is mixed in with probability
``nondeterminism`` per input, which makes a pair diverge.

Processes (one user at a time per family of methods):

* the creator (supervisor) calls :func:`open_sim_domain`, :meth:`SimDomain.start`
  and finally :meth:`SimDomain.close` (only the creator reaps the guest);
* stage processes forked from the creator *after* it created the domain use it as
  inherited: the snapshot / restore stage calls ``pause``, ``resume``,
  ``read_and_clear_dirty*``, ``read_pages``, ``write_pages``, ``get/set_vcpu_state``
  and ``memory_digest``; the input forwarder calls ``feed_input``; the coordinator
  calls ``trim_inputs``; the output comparator calls ``read_outputs`` and polls
  ``output_fileno()``. Control goes through an anonymous shared mapping, two
  eventfds and a pipe, all inherited over fork, so nothing is pickled and nothing is
  left in ``/dev/shm``.

Pause is cooperative: the guest looks at a shared flag before every page it writes
and while it waits, saves its state into the shared vCPU area, acknowledges through
an eventfd and sleeps until resumed; on resume it reloads the (possibly replaced)
vCPU area.

The vCPU blob (``BLOB_SIZE`` = 128 bytes): magic ``COLOSIMV``, version, a fingerprint
of the workload and RAM size, the input seq, whether the guest is between inputs or
inside one (then how many of its pages are written), the input's key (its page plan
and contents derive from it) and the running accumulator (the next key derives from
it); a 16-byte blake3 check closes it.

An output frame (``read_outputs``): input seq (8 bytes LE) | blake3 over the seq, the
input's key and the first up to 64 pages it wrote (32 bytes) | the first 16 bytes of
the first page it wrote.

Requests with a reply cache (the sim service's retransmission protocol, as a real RPC
service has one): an input made by :func:`request_input` carries a client id and the
client's request number; its answer is the frame above followed by both (``ANSWER_SIZE``
bytes; :func:`parse_answer`). A guest of at least ``REPLY_CACHE_MIN_PAGES`` pages keeps the
answers of the last ``REPLY_CACHE_ENTRIES`` requests in its last ``REPLY_CACHE_PAGES``
pages of RAM, which its workload writes no more from the first request on (a flag in the
vCPU state; a guest that never takes a request behaves as it always did): in guest
memory, so checkpoints replicate the cache and a rolled-back SVM has the one of its
checkpoint. A request found there (a client sent it again: its answer did not come, e.g.
across a failover) is not executed again: the guest answers with the cached bytes, and
its state moves on by the input seq only (at-most-once execution; the client keeps one
answer per request number).
A request older than the cache holds for its client (its slot holds a later request of
the same client) is refused: answered with a zero digest (``answer_refused``), never
executed. PVM and SVM decide from the same replicated RAM, so a duplicate produces the
same output on both, as the comparator needs.

Output marks (``mark_outputs``, guest paused): the guest counts the bytes it wrote to
its output pipe; a mark records that count and its tag in a ring in the control
mapping (it needs no room in the pipe, so it never waits for a reader that is itself
waiting for a checkpoint), and ``read_outputs`` returns it between the frames
written before and after it.
"""
from __future__ import annotations

import ctypes
import fcntl
import gc
import logging
import mmap
import os
import random
import select
import signal
import struct
import time
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

import blake3
import numpy as np

from ... import trace
from ...signals import die_with_parent
from ..base import OUTPUT_MARK, Domain, DomainError, SimulatedIO
from .dirty_log import (DirtyBitmap, PagemapScanner, UffdWriteProtect, runs_to_pfns,
                        uffd_wp_async_unsupported_reason)
from .input_log import InputLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkloadSpec:
    """What the simulated guest does."""

    seed: int = 1
    #: pages the guest writes per input
    pages_per_input: int = 16
    #: pages are written in runs of consecutive pfns of this length
    run_length: int = 8
    #: content mix of written pages (fractions, sum 1)
    mix_zero: float = 0.30
    mix_text: float = 0.40
    mix_random: float = 0.30
    #: probability per input that the guest mixes real randomness into what it writes
    nondeterminism: float = 0.0
    #: fill all of RAM with the mix at start (primary); False = RAM starts zero
    fill: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 1 << 63:
            raise ValueError(f"workload seed must be in [0, 2**63), got {self.seed}")
        if self.pages_per_input < 0:
            raise ValueError(f"workload pages_per_input must be >= 0, got {self.pages_per_input}")
        if self.run_length < 1:
            raise ValueError(f"workload run_length must be >= 1, got {self.run_length}")
        mix = (self.mix_zero, self.mix_text, self.mix_random)
        if min(mix) < 0 or abs(sum(mix) - 1.0) > 1e-6:
            raise ValueError(f"workload mix_zero/mix_text/mix_random must be >= 0 and sum to 1, "
                             f"got {mix}")
        if not 0.0 <= self.nondeterminism <= 1.0:
            raise ValueError(f"workload nondeterminism must be in [0, 1], "
                             f"got {self.nondeterminism}")

    def mix_cdf(self) -> np.ndarray:
        cdf = np.cumsum([self.mix_zero, self.mix_text, self.mix_random])
        cdf[-1] = 1.0  # u in [0, 1) then never lands past the last kind
        return cdf


KIND_ZERO, KIND_TEXT, KIND_RANDOM = 0, 1, 2
#: a page of a fill command (SimDomain.fill_command): every byte the command's value
KIND_FILL = 3

# -- text-like content -------------------------------------------------------------

_LEVELS = ("INFO", "INFO", "INFO", "INFO", "DEBUG", "DEBUG", "WARN", "ERROR")
_SERVICES = ("api-gateway", "auth", "billing", "inventory", "search", "mailer", "scheduler",
             "cache", "orders", "profile")
_VERBS = ("GET", "GET", "GET", "POST", "PUT", "DELETE")
_PATHS = ("/api/v1/users", "/api/v1/orders", "/api/v1/items", "/healthz", "/api/v2/search",
          "/static/app.js", "/login", "/api/v1/cart", "/metrics")
_MESSAGES = ("request completed", "cache miss for key", "retrying upstream connection",
             "user session refreshed", "slow query detected", "payment authorized",
             "scheduled job finished", "connection reset by peer", "template rendered",
             "rate limit applied")
_STATUS = (200, 200, 200, 200, 201, 204, 304, 400, 404, 500)


@lru_cache(maxsize=1)
def text_pool(size: int = 1 << 18) -> np.ndarray:
    """Deterministic ASCII log lines from a small vocabulary (so lz4 compresses them like
    real logs). Uses only ``random.random()``, whose sequence Python keeps stable."""
    rng = random.Random(20261126)

    def pick(options: tuple) -> object:
        return options[int(rng.random() * len(options))]

    lines = []
    total = 0
    t_ms = 0
    while total < size:
        t_ms += int(rng.random() * 900)
        s, ms = divmod(t_ms, 1000)
        m, s = divmod(s, 60)
        h, m = divmod(m, 60)
        line = (f"2026-11-26T{h % 24:02d}:{m:02d}:{s:02d}.{ms:03d}Z {pick(_LEVELS):<5} "
                f"[{pick(_SERVICES)}-{int(rng.random() * 8)}] {pick(_VERBS)} {pick(_PATHS)}/"
                f"{int(rng.random() * 100000)} status={pick(_STATUS)} "
                f"bytes={int(rng.random() * 20000)} latency_ms={int(rng.random() * 250)} "
                f"msg=\"{pick(_MESSAGES)}\"\n")
        lines.append(line)
        total += len(line)
    return np.frombuffer("".join(lines).encode("ascii")[:size], dtype=np.uint8).copy()


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_columns(values: np.ndarray, width: int) -> np.ndarray:
    """ASCII hex of each value, ``width`` digits, as a (len(values), width) uint8 array."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    return _HEX_DIGITS[(values.astype(np.uint64)[:, None] >> shifts) & np.uint64(15)]


# -- inputs ------------------------------------------------------------------------

_WRITE_COMMAND = struct.Struct("<16sQ")
_WRITE_MAGIC = b"COLO-SIM-WRITE\x00\x01"
#: magic, first pfn, pages, byte value
_FILL_COMMAND = struct.Struct("<16sQQB")
_FILL_MAGIC = b"COLO-SIM-FILL\x00\x00\x01"
#: an input the guest answers with real randomness (one reply its peer cannot reproduce)
_NONDET_COMMAND = b"COLO-SIM-NONDET\x01"


#: a request of the sim service: this magic, the client id and its request number (u64 LE
#: each), then the request's body
_REQUEST_MAGIC = b"COLO-SIM-REQ\x00\x00\x01"
_REQUEST_HEAD = struct.Struct("<16sQQ")
_ANSWER_ID = struct.Struct("<QQ")
#: the answer to a request: the output frame (56 bytes) + client id + request number
ANSWER_SIZE = 8 + 32 + 16 + _ANSWER_ID.size
#: the reply cache: entries of _CACHE_SLOT bytes in the last REPLY_CACHE_PAGES pages of RAM
REPLY_CACHE_PAGES = 8
REPLY_CACHE_MIN_PAGES = 1024
_CACHE_SLOT = 128
_CACHE_HEAD = struct.Struct("<8sQQI")     # magic, client id, request number, answer length
_CACHE_MAGIC = b"COLOREPL"


def reply_cache_entries(page_count: int, page_size: int = 4096) -> int:
    """How many answers a guest of this size keeps (0: too small for a cache; its requests
    are executed every time they come)."""
    if page_count < REPLY_CACHE_MIN_PAGES:
        return 0
    return REPLY_CACHE_PAGES * page_size // _CACHE_SLOT


#: what a client of a 4 KiB-page guest big enough for a cache may have outstanding at most
REPLY_CACHE_ENTRIES = reply_cache_entries(REPLY_CACHE_MIN_PAGES)


def request_input(client: int, number: int, body: bytes = b"") -> bytes:
    """The input that asks the sim service for request ``number`` of ``client``; the same
    bytes each time it is sent again."""
    return _REQUEST_HEAD.pack(_REQUEST_MAGIC, client, number) + body


def parse_request(payload: bytes) -> tuple[int, int] | None:
    """(client id, request number) of a request input, or None for any other input."""
    if len(payload) >= _REQUEST_HEAD.size and payload.startswith(_REQUEST_MAGIC):
        return _REQUEST_HEAD.unpack_from(payload)[1:]
    return None


def parse_answer(frame: bytes) -> tuple[int, int] | None:
    """(client id, request number) an output frame answers, or None if it answers no
    request (an input of another kind)."""
    if len(frame) != ANSWER_SIZE:
        return None
    return _ANSWER_ID.unpack_from(frame, ANSWER_SIZE - _ANSWER_ID.size)


def answer_refused(frame: bytes) -> bool:
    """The guest refused the request: older than its reply cache holds (never executed)."""
    return frame[8:40] == bytes(32)


def _command_pages(payload: bytes) -> int | None:
    if len(payload) == _WRITE_COMMAND.size and payload.startswith(_WRITE_MAGIC):
        return _WRITE_COMMAND.unpack(payload)[1]
    fill = _fill_command(payload)
    return fill[1] if fill is not None else None


def _fill_command(payload: bytes) -> tuple[int, int, int] | None:
    """(first pfn, pages, byte value) of a fill command, or None for any other input."""
    if len(payload) == _FILL_COMMAND.size and payload.startswith(_FILL_MAGIC):
        return _FILL_COMMAND.unpack(payload)[1:]
    return None


# -- vCPU state ----------------------------------------------------------------------

_BLOB_MAGIC = b"COLOSIMV"
_BLOB_VERSION = 1
# magic, version, flags (FLAG_REPLY_CACHE), workload fingerprint, seq, phase, step, npages,
# key, acc
_BLOB_BODY = struct.Struct("<8sHH16sQB3xII32s32s")
_BLOB_CHECK_LEN = 16
BLOB_SIZE = _BLOB_BODY.size + _BLOB_CHECK_LEN

#: PHASE_REPLAY: the current input is a request answered from the reply cache (or refused)
PHASE_IDLE, PHASE_INPUT, PHASE_REPLAY = 0, 1, 2
#: the guest keeps a reply cache (set by the first request it took; see reply_cache_entries)
FLAG_REPLY_CACHE = 1


@dataclass
class _GuestState:
    """Everything the guest needs to continue exactly."""

    seq: int          # the input the guest is on (PHASE_INPUT) or will start next (PHASE_IDLE)
    phase: int
    step: int         # pages of the current input already written; == npages: output pending
    npages: int       # pages the current input writes
    key: bytes        # the current input's key: its plan and contents derive from it
    acc: bytes        # the guest's running state; the next input's key derives from it
    flags: int = 0    # FLAG_REPLY_CACHE

    def pack(self, fingerprint: bytes) -> bytes:
        body = _BLOB_BODY.pack(_BLOB_MAGIC, _BLOB_VERSION, self.flags, fingerprint, self.seq,
                               self.phase, self.step, self.npages, self.key, self.acc)
        return body + blake3.blake3(body).digest(_BLOB_CHECK_LEN)

    @classmethod
    def unpack(cls, blob: bytes, fingerprint: bytes | None, page_count: int) -> "_GuestState":
        """Parse and check a blob; ``fingerprint`` None skips the workload check."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise ValueError(f"sim vCPU blob must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) != BLOB_SIZE:
            raise ValueError(f"sim vCPU blob has {len(blob)} bytes, expected {BLOB_SIZE}")
        body, check = blob[:_BLOB_BODY.size], blob[_BLOB_BODY.size:]
        magic, version, flags, fp, seq, phase, step, npages, key, acc = _BLOB_BODY.unpack(body)
        if magic != _BLOB_MAGIC:
            raise ValueError(f"sim vCPU blob has magic {magic!r}, expected {_BLOB_MAGIC!r}")
        if version != _BLOB_VERSION:
            raise ValueError(f"sim vCPU blob version {version} unsupported "
                             f"(this is {_BLOB_VERSION})")
        if blake3.blake3(body).digest(_BLOB_CHECK_LEN) != check:
            raise ValueError(f"sim vCPU blob checksum mismatch (corrupt blob {blob[:24].hex()}...)")
        if fingerprint is not None and fp != fingerprint:
            raise ValueError(f"sim vCPU blob is from a guest with another workload or size "
                             f"(fingerprint {fp.hex()}, this guest {fingerprint.hex()})")
        if phase not in (PHASE_IDLE, PHASE_INPUT, PHASE_REPLAY):
            raise ValueError(f"sim vCPU blob has phase {phase}, expected 0, 1 or 2")
        if step > npages or npages > page_count:
            raise ValueError(f"sim vCPU blob has step {step} / npages {npages} "
                             f"(page count {page_count})")
        if flags & ~FLAG_REPLY_CACHE:
            raise ValueError(f"sim vCPU blob has unknown flags {flags:#x}")
        return cls(seq, phase, step, npages, key, acc, flags)


def _fingerprint(page_count: int, page_size: int, spec: WorkloadSpec) -> bytes:
    """What must match between two guests for one to continue from the other's state.
    Seed, fill and nondeterminism only shape the start or the randomness, so they may differ."""
    text = (f"{page_count}:{page_size}:{spec.pages_per_input}:{spec.run_length}:"
            f"{spec.mix_zero!r}:{spec.mix_text!r}:{spec.mix_random!r}")
    return blake3.blake3(text.encode()).digest(16)


# -- shared control block ---------------------------------------------------------------

# uint64 words
W_PAUSE_REQ = 0      # 1 while the pipeline wants the guest paused
W_PAUSE_EPOCH = 1    # incremented by every pause()
W_PAUSE_ACK = 2      # the epoch the guest acknowledged (it is paused and its state saved)
W_RAM_ADDR = 3       # the guest's address of its RAM mapping (for PAGEMAP_SCAN)
W_GUEST_STATUS = 4   # 0 starting, 1 running, 2 failed
W_VCPU_LEN = 5
W_ERROR_LEN = 6
W_GUEST_PID = 7      # so users forked before start() know the guest too
# counters
W_INPUTS = 8
W_PAGES_WRITTEN = 9
W_OUTPUTS = 10
W_PAUSES = 11
W_BAD_BLOBS = 12
W_NONDET_INPUTS = 13
W_CLAMPED_COMMANDS = 14
W_OUTPUT_STALLS = 15
W_BAD_PAGE_REQUESTS = 16
W_OUT_WRITTEN = 17   # bytes the guest wrote into its output pipe
W_OUT_READ = 18      # bytes read out of it (by whichever process reads outputs)
W_MARKS = 19         # output marks made so far
W_MARKS_READ = 20    # output marks returned by read_outputs so far
W_BREAK = 21         # a breakpoint: (seq << 32 | page) + 1, or 0 for none (see break_at)
W_REQUESTS = 22      # request inputs executed (their answers cached)
W_REPLAYED = 23      # requests answered from the reply cache, not executed again
W_REFUSED = 24       # requests older than the reply cache holds, refused
W_INPUT_AWAITED = 25  # resumed in the middle of an input its log does not hold yet: waited
_WORDS = 32
_COUNTERS = {"inputs_consumed": W_INPUTS, "pages_written": W_PAGES_WRITTEN,
             "outputs_emitted": W_OUTPUTS, "pauses": W_PAUSES, "bad_vcpu_blobs": W_BAD_BLOBS,
             "nondeterministic_inputs": W_NONDET_INPUTS,
             "clamped_write_commands": W_CLAMPED_COMMANDS, "output_stalls": W_OUTPUT_STALLS,
             "bad_page_requests": W_BAD_PAGE_REQUESTS, "requests_executed": W_REQUESTS,
             "requests_replayed": W_REPLAYED, "requests_refused": W_REFUSED,
             "inputs_awaited_mid_input": W_INPUT_AWAITED}

_STATUS_STARTING, _STATUS_RUNNING, _STATUS_FAILED = 0, 1, 2
_VCPU_OFF, _VCPU_CAP = 512, 512
_ERROR_OFF, _ERROR_CAP = 1024, 1024
_MARKS_OFF, _MARK_SLOT, _MARK_SLOTS = 2048, 64, 256   # ring of (offset u64, len u64, tag)
_MARK_TAG_CAP = _MARK_SLOT - 16
_BITMAP_OFF = _MARKS_OFF + _MARK_SLOT * _MARK_SLOTS

_OUTPUT_HEADER = struct.Struct("<IQ")   # frame length, input seq
#: one read of the output pipe (its size: F_SETPIPE_SZ 1 MiB)
_OUT_READ = 1 << 20
#: the output frame hashes at most this many of the pages an input wrote
_OUTPUT_SAMPLE_PAGES = 64

#: this process's id, kept by a fork hook: every feed and read of a guest's inputs and
#: outputs checks which process it is in, and os.getpid() is a system call each time
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PR_SET_NAME = 15
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


class SimDomain(Domain, SimulatedIO):
    """A simulated guest process; see the module docstring for who calls what."""

    def __init__(self, name: str, page_count: int, workload: WorkloadSpec, dirty_log_kind: str,
                 page_size: int, input_slots: int, input_slot_size: int) -> None:
        self.name = name
        self.page_count = page_count
        self.page_size = page_size
        self.workload = workload
        self.dirty_log_kind = dirty_log_kind
        self._fingerprint = _fingerprint(page_count, page_size, workload)
        self._owner_pid = os.getpid()
        self._closed_in: int | None = None
        self._exit_status: int | None = None

        size = page_count * page_size
        memfd = os.memfd_create(f"colo-sim-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, size)
            # mmap keeps its own dup of the fd; the guest inherits this very mapping
            self._ram_map = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(memfd)
        self._ram_map.madvise(mmap.MADV_NOHUGEPAGE)  # dirty granularity stays one page
        self._ram = np.frombuffer(self._ram_map, dtype=np.uint8).reshape(page_count, page_size)

        bitmap_size = DirtyBitmap.size_for(page_count) if dirty_log_kind == "bitmap" else 0
        self._ctl_map = mmap.mmap(-1, _BITMAP_OFF + max(bitmap_size, 8))
        self._words = memoryview(self._ctl_map)[:_WORDS * 8].cast("Q")
        self._bitmap = (DirtyBitmap(memoryview(self._ctl_map)[_BITMAP_OFF:], page_count)
                        if bitmap_size else None)
        self._inputs = InputLog(input_slots, input_slot_size)
        # doorbell: pipeline -> guest (input fed, pause, resume); ack: guest -> pipeline
        self._doorbell = os.eventfd(0, os.EFD_CLOEXEC)
        self._ack = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._out_r, self._out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(self._out_r, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:  # above pipe-max-size for this user: the default 64 KiB works too
            pass
        # per-process state of the users: a forked user starts afresh (the *_pid fields)
        self._scanner: PagemapScanner | None = None
        self._scanner_pid = 0
        self._out_pending = b""
        self._out_pid = 0
        self._prefaulted_pid = 0

    @property
    def guest_pid(self) -> int:
        """The guest process id (0 before start())."""
        return int(self._words[W_GUEST_PID]) if self._closed_in != _PID[0] else 0

    def __reduce__(self) -> tuple:
        raise TypeError(f"sim domain {self.name}: a SimDomain is shared with stage processes by "
                        f"fork inheritance (multiprocessing 'fork' context), not by pickling")

    def __repr__(self) -> str:
        return (f"SimDomain({self.name!r}, pages={self.page_count}, "
                f"dirty_log={self.dirty_log_kind}, guest_pid={self.guest_pid})")

    # -- lifetime -------------------------------------------------------------
    def start(self, paused: bool = True, timeout: float = 120.0) -> None:
        """Fork the guest. It fills RAM (``workload.fill``), sets up its dirty log and waits
        paused; with ``paused=False`` it is resumed before this returns.

        The guest dies with the *thread* that calls this (``PR_SET_PDEATHSIG``), so call it
        from the supervisor's main thread; only this process can reap it (:meth:`close`).
        """
        if self.guest_pid:
            raise DomainError(f"sim domain {self.name}: already started "
                              f"(guest pid {self.guest_pid})")
        self._words[W_PAUSE_EPOCH] = 1
        self._words[W_PAUSE_REQ] = 1
        self._owner_pid = os.getpid()  # before fork: the guest checks it is still its parent
        pid = os.fork()
        if pid == 0:  # the guest
            code = 0
            try:
                _Guest(self).run()
            except BaseException as exc:  # noqa: BLE001 - report whatever killed the guest
                self._guest_failed(f"{type(exc).__name__}: {exc}")
                code = 70
            os._exit(code)
        self._words[W_GUEST_PID] = pid
        os.close(self._out_w)  # only the guest writes outputs
        self._out_w = -1
        self._wait_ack(1, timeout, "start")
        log.info("sim domain %s: guest pid %d up, %d pages of %d bytes, dirty log %s",
                 self.name, pid, self.page_count, self.page_size, self.dirty_log_kind)
        if not paused:
            self.resume()

    def close(self) -> None:
        """Stop the guest (creator only; it is killed and reaped) and drop this process's
        mappings and fds. Idempotent per process."""
        me = os.getpid()
        if self._closed_in == me:
            return
        pid = self.guest_pid
        self._closed_in = me
        if pid and me == self._owner_pid and self._exit_status is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self._exit_status = os.waitpid(pid, 0)[1]
            except ChildProcessError:  # someone else reaped it (a SIGCHLD handler)
                self._exit_status = -1
        if self._scanner is not None and self._scanner_pid == me:
            self._scanner.close()
        self._scanner = None
        for fd in (self._doorbell, self._ack, self._out_r, self._out_w):
            if fd >= 0:
                os.close(fd)
        self._doorbell = self._ack = self._out_r = self._out_w = -1
        self._inputs.close()
        self._bitmap = None
        self._words.release()
        self._ram = None  # type: ignore[assignment]
        for region in (self._ctl_map, self._ram_map):
            try:
                region.close()
            except BufferError:  # a caller still holds a view: unmapped when it goes
                log.debug("sim domain %s: a mapping is still viewed; it goes with the view",
                          self.name)

    def _check_open(self) -> None:
        if self._closed_in == _PID[0]:
            raise DomainError(f"sim domain {self.name}: used after close()")
        if not self._words[W_GUEST_PID]:
            raise DomainError(f"sim domain {self.name}: not started")

    def _guest_failed(self, message: str) -> None:
        """In the guest: leave the reason where the pipeline finds it."""
        data = message.encode("utf-8", "replace")[:_ERROR_CAP]
        self._ctl_map[_ERROR_OFF:_ERROR_OFF + len(data)] = data
        self._words[W_ERROR_LEN] = len(data)
        self._words[W_GUEST_STATUS] = _STATUS_FAILED
        try:
            os.write(2, f"sim guest {self.name} (pid {os.getpid()}) failed: {message}\n".encode())
        except OSError:
            pass

    def _guest_problem(self, alive: bool = True) -> str | None:
        """Why the guest cannot answer, or None if it is alive and not failed. ``alive``:
        also whether its process is still there (else only its status word)."""
        if self._words[W_GUEST_STATUS] == _STATUS_FAILED:
            n = self._words[W_ERROR_LEN]
            return self._ctl_map[_ERROR_OFF:_ERROR_OFF + n].decode("utf-8", "replace")
        if not alive:
            return None
        if os.getpid() == self._owner_pid:
            if self._exit_status is None:
                try:
                    pid, status = os.waitpid(self.guest_pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = self.guest_pid, -1
                if pid:
                    self._exit_status = status
            if self._exit_status is not None:
                return f"guest process {self.guest_pid} exited (wait status {self._exit_status})"
            return None
        try:
            with open(f"/proc/{self.guest_pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return f"guest process {self.guest_pid} is gone"
        return f"guest process {self.guest_pid} is dead" if state in (b"Z", b"X") else None

    # -- execution ----------------------------------------------------------------
    def pause(self, timeout: float = 5.0) -> None:
        """Stop the guest; returns once its whole state is in RAM and the vCPU area."""
        self._check_open()
        w = self._words
        if w[W_PAUSE_REQ] and w[W_PAUSE_ACK] == w[W_PAUSE_EPOCH]:
            return
        # The guest answers at the pauser's priority: a pauser at real time (the PVM's
        # pause, the SVM's at BEGIN: pipeline.pause_priority) raises the guest to it until
        # the guest has acknowledged (it drops itself back, _Guest._paused). At normal
        # priority the guest's answer waited for a core on a loaded machine, inside the
        # pause. Raised before the request is posted: raised after it, a guest running on
        # the other core could see the request and acknowledge first, still at normal
        # priority, and the raise then came after its drop: it served its clients at
        # SCHED_FIFO until its next pause (issue 15: the bimodal p99).
        if os.sched_getscheduler(0) == os.SCHED_FIFO:
            try:
                os.sched_setscheduler(self.guest_pid, os.SCHED_FIFO, os.sched_getparam(0))
            except OSError:
                pass        # (not permitted: it answers at normal priority)
        epoch = w[W_PAUSE_EPOCH] + 1
        w[W_PAUSE_EPOCH] = epoch  # the epoch first: the guest reads the request, then it
        w[W_PAUSE_REQ] = 1
        os.eventfd_write(self._doorbell, 1)
        self._wait_ack(epoch, timeout, "pause")

    def _wait_ack(self, epoch: int, timeout: float, what: str) -> None:
        w = self._words
        # No spinning on the ack: measured on 2 shared cores, a spinning pauser steals the
        # core the guest needs to answer (p50 34 µs sleeping on the eventfd, 75-260 µs spinning).
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._ack, select.POLLIN)
        waited = False
        while w[W_PAUSE_ACK] != epoch:
            # whether the guest process is still there (a stage reads /proc/<pid>/stat: ~30
            # us of CPU) only after a wait that brought no answer: asked before the first
            # wait too, it was in every pause of both nodes, the PVM's inside its downtime
            # (docs/tuning.md, Session 20 (prim)); a dead guest is named after one wait
            # (0.1 s), a failed one (its status word) at once
            problem = self._guest_problem(alive=waited)
            waited = True
            if problem:
                raise DomainError(f"sim domain {self.name}: {what} failed: {problem}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DomainError(f"sim domain {self.name}: {what} not acknowledged by guest pid "
                                  f"{self.guest_pid} within {timeout}s")
            if poller.poll(min(left, 0.1) * 1000):
                self._drain_ack()
        self._drain_ack()

    def _drain_ack(self) -> None:
        try:
            os.eventfd_read(self._ack)
        except BlockingIOError:
            pass

    def resume(self) -> None:
        """Let the paused guest run; returns at once (the guest picks up within µs)."""
        self._check_open()
        if not self._words[W_PAUSE_REQ]:
            return
        self._words[W_PAUSE_REQ] = 0
        os.eventfd_write(self._doorbell, 1)

    @property
    def is_paused(self) -> bool:
        w = self._words
        return bool(w[W_PAUSE_REQ]) and w[W_PAUSE_ACK] == w[W_PAUSE_EPOCH]

    def _require_paused(self, what: str) -> None:
        self._check_open()
        if not self.is_paused:
            raise DomainError(f"sim domain {self.name}: {what} needs the guest paused")

    # -- dirty log ----------------------------------------------------------------
    def enable_dirty_log(self) -> None:
        """Every page counts as clean from here on (the guest tracks from its start)."""
        self.read_and_clear_dirty_runs()

    def dirty_count(self) -> int:
        """Pages written since the last read_and_clear_dirty, without clearing them (for
        the dirty-threshold trigger; approximate while the guest runs)."""
        return self._dirty_log("count")

    def read_and_clear_dirty_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Pages the guest wrote since the last call, as runs (start pfns, lengths), both
        ``uint64``, sorted; and clear them. Exact when the guest is paused."""
        return self._dirty_log("read_and_clear_runs")

    def _dirty_log(self, op: str):  # type: ignore[no-untyped-def]
        """``op`` of whichever dirty log this guest has: the bitmap it keeps, or the kernel's
        (this process's scanner); a failing kernel read names the guest's state."""
        self._check_open()
        if self._bitmap is not None:
            return getattr(self._bitmap, op)()
        try:
            return getattr(self._my_scanner(), op)()
        except OSError as exc:
            raise DomainError(f"sim domain {self.name}: reading the dirty log failed: {exc}"
                              f" ({self._guest_problem() or 'guest alive'})") from exc

    def read_and_clear_dirty(self) -> np.ndarray:
        # as pfns from the log itself, not runs expanded again (both nodes' pauses read it)
        return self._dirty_log("read_and_clear_pfns")

    #: pages a prescan takes off the kernel's log between two looks at ``interrupted``
    #: (re-protecting them is most of a read: ~0.3-0.5 ms for 1 024 on this 2-core machine)
    PRESCAN_PART_PAGES = 1024

    def prescan_dirty(self, interrupted=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        """The kernel's log in parts of PRESCAN_PART_PAGES written pages, ``interrupted()``
        asked between two (a checkpoint waiting: the pause reads the rest); the bitmap
        (a copy and a clear) at once."""
        if self._bitmap is not None or interrupted is None:
            return self.read_and_clear_dirty()
        self._check_open()
        pieces, at = [], 0
        try:
            while at < self.page_count:
                starts, lengths, at = self._my_scanner().read_and_clear_part(
                    at, self.PRESCAN_PART_PAGES)
                if len(starts):
                    pieces.append(runs_to_pfns(starts, lengths))
                if at < self.page_count and interrupted():
                    break
        except OSError as exc:
            raise DomainError(f"sim domain {self.name}: reading the dirty log failed: {exc}"
                              f" ({self._guest_problem() or 'guest alive'})") from exc
        if not pieces:
            return np.empty(0, np.uint64)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _my_scanner(self) -> PagemapScanner:
        me = os.getpid()
        if self._scanner is None or self._scanner_pid != me:
            if self._scanner is not None:  # inherited: close our copy of the parent's fd
                self._scanner.close()
            self._scanner =  PagemapScanner(self.guest_pid, self._words[W_RAM_ADDR],
                                           self.page_count * self.page_size, self.page_size)
            self._scanner_pid = me
        return self._scanner

    # -- memory ---------------------------------------------------------------------
    def memory_view(self) -> np.ndarray:
        """All of RAM through this process's mapping. Call :meth:`prefault` once per process
        before timing-critical use."""
        return self._ram

    def prefault(self) -> None:
        """Map all of RAM into this process's page tables now. A forked process starts with
        none of them (fork does not copy the PTEs of shared file mappings), and a first touch
        costs ~10x a copy, so pay it once here rather than inside a pause. read_pages and
        write_pages call it on their first use in each process."""
        me = os.getpid()
        if self._prefaulted_pid == me:
            return
        self._prefaulted_pid = me
        if _libc.madvise(self._ram.ctypes.data, self._ram.nbytes, _MADV_POPULATE_WRITE) != 0:
            # kernel < 5.14: touch a byte per page (a read maps a shmem page as well)
            int(self._ram[:, 0].sum())

    def _check_pfns(self, pfns: np.ndarray, pages: np.ndarray, what: str) -> np.ndarray:
        try:
            return self._valid_pfns(pfns, pages, what)
        except ValueError:
            self._words[W_BAD_PAGE_REQUESTS] += 1
            raise

    def _valid_pfns(self, pfns: np.ndarray, pages: np.ndarray, what: str) -> np.ndarray:
        pfns = np.asarray(pfns)
        if pfns.ndim != 1 or (pfns.size and pfns.dtype.kind not in "ui"):
            raise ValueError(f"{what}: pfns must be a 1-d integer array, got {pfns.dtype} "
                             f"shape {pfns.shape}")
        if pfns.size:
            bad = (pfns >= self.page_count) | (pfns < 0) if pfns.dtype.kind == "i" \
                else pfns >= self.page_count
            if bad.any():
                raise ValueError(f"{what}: pfn {int(pfns[np.argmax(bad)])} out of range "
                                 f"(page count {self.page_count})")
        if (pages.ndim != 2 or pages.shape[1] != self.page_size or pages.dtype != np.uint8
                or pages.shape[0] < pfns.size):
            raise ValueError(f"{what}: page array must be uint8 of shape (>= {pfns.size}, "
                             f"{self.page_size}), got {pages.dtype} {pages.shape}")
        return pfns

    def read_pages(self, pfns: np.ndarray, out: np.ndarray) -> None:
        self._check_open()
        pfns = self._check_pfns(pfns, out, "read_pages")
        self.prefault()
        # bounds are checked above, so 'clip' only avoids np.take's buffered 'raise' path
        np.take(self._ram, pfns, axis=0, out=out[:pfns.size], mode="clip")

    def write_pages(self, pfns: np.ndarray, data: np.ndarray) -> None:
        self._check_open()
        pfns = self._check_pfns(pfns, data, "write_pages")
        self.prefault()
        self._ram[pfns] = data[:pfns.size]

    def memory_digest(self, batch_pages: int = 1024) -> bytes:
        self._check_open()
        # blake3 gives the same digest with any number of threads; use them on big guests
        threads = blake3.blake3.AUTO if self._ram.nbytes >= (64 << 20) else 1
        return blake3.blake3(self._ram, max_threads=threads).digest()

    # -- vCPU state --------------------------------------------------------------------
    def get_vcpu_state(self) -> bytes:
        self._require_paused("get_vcpu_state")
        n = self._words[W_VCPU_LEN]
        return bytes(self._ctl_map[_VCPU_OFF:_VCPU_OFF + n])

    def set_vcpu_state(self, blob: bytes) -> None:
        """Load a blob from this guest or its peer (same workload and size). Checked fully
        before anything changes: a bad blob raises ValueError and is counted."""
        self._require_paused("set_vcpu_state")
        try:
            state = _GuestState.unpack(blob, self._fingerprint, self.page_count)
            oldest = self._inputs.free_below()
            if state.seq < oldest:
                raise ValueError(f"sim vCPU blob is at input seq {state.seq}, but inputs below "
                                 f"{oldest} may already be overwritten in the input log")
        except ValueError:
            self._words[W_BAD_BLOBS] += 1
            raise
        self._ctl_map[_VCPU_OFF:_VCPU_OFF + BLOB_SIZE] = bytes(blob)
        self._words[W_VCPU_LEN] = BLOB_SIZE
        self._inputs.set_consumer(state.seq)

    def simulated_io(self) -> SimulatedIO:
        return self

    @property
    def input_capacity(self) -> int:
        return self._inputs.slot_count

    def input_limit(self) -> int:
        return self._inputs.free_below() + self._inputs.slot_count

    @staticmethod
    def vcpu_input_seq(blob: bytes) -> int:
        """The input seq a guest in this vCPU state will consume next (or is in the middle of)."""
        return _GuestState.unpack(blob, None, 1 << 62).seq

    @staticmethod
    def vcpu_inputs_taken(blob: bytes) -> int:
        """Inputs below this seq were begun: ``vcpu_input_seq``, plus one inside an input
        (any phase but idle: a request answered from the reply cache reads it too)."""
        state = _GuestState.unpack(blob, None, 1 << 62)
        return state.seq + (state.phase != PHASE_IDLE)

    @staticmethod
    def vcpu_input_step(blob: bytes) -> int:
        """Pages of input ``vcpu_input_seq`` the guest already wrote (0 between inputs)."""
        state = _GuestState.unpack(blob, None, 1 << 62)
        return state.step if state.phase == PHASE_INPUT else 0

    def break_at(self, seq: int, page: int) -> None:
        """A breakpoint: the running guest pauses itself just before it writes page
        ``page`` (0 < page) of input ``seq``, as a pause request arriving there would stop
        it; :meth:`wait_break` waits for that. It reproduces a state a pause caught in the
        middle of an input (sim_replay_digest). Set it (guest started) before the guest
        reaches it."""
        self._check_open()
        if seq < 0 or not 0 < page < (1 << 32):
            raise ValueError(f"break_at: seq {seq} / page {page} out of range")
        self._words[W_BREAK] = (seq << 32 | page) + 1

    def wait_break(self, timeout: float = 60.0) -> None:
        """Wait until the guest stopped at its breakpoint (and is paused); clears it."""
        deadline = time.monotonic() + timeout
        while not (self.is_paused and self._words[W_BREAK] == 0):
            problem = self._guest_problem()
            if problem:
                raise DomainError(f"sim domain {self.name}: {problem}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sim domain {self.name}: breakpoint not reached after "
                                   f"{timeout}s (guest at input seq {self.input_seq()})")
            time.sleep(0.001)

    # -- inputs / outputs -----------------------------------------------------------------
    def feed_input(self, payload: bytes, seq: int | None = None, timeout: float = 5.0,
                   wake: bool = True) -> int:
        """Append one input for the guest and return its seq. ``seq`` (mirroring) must be
        the next expected one (ValueError). Blocks while the log is full (TimeoutError).
        ``wake=False``: no doorbell yet (:meth:`wake_guest`); a guest already running
        finds the input anyway, one asleep sleeps on."""
        self._check_open()
        seq = self._inputs.append(payload, seq, timeout)
        if wake:
            os.eventfd_write(self._doorbell, 1)
        return seq

    def wake_guest(self) -> None:
        """The doorbell for inputs fed with ``wake=False``. The woken guest often takes
        the caller's CPU at once (the kernel's wake-up preemption), so a caller with more
        to do for the input first (the primary's client stage mirrors it) rings after."""
        os.eventfd_write(self._doorbell, 1)

    def trim_inputs(self, below_seq: int) -> None:
        """Inputs below ``below_seq`` may be overwritten (after a commit)."""
        self._inputs.trim(below_seq)

    def start_inputs_at(self, seq: int) -> None:
        """Let the input log continue at ``seq`` (a secondary joining a primary whose inputs
        are at ``seq``; load the primary's vCPU state before feeding more than the log holds).
        ValueError if the log still holds inputs the guest or a rewind may need."""
        self._check_open()
        self._inputs.restart_at(seq)

    def input_payload(self, seq: int) -> bytes:
        """The input ``seq`` as it was fed (it must still be in the log: not trimmed)."""
        self._check_open()
        return self._inputs.get(seq)

    def input_seq(self) -> int:
        """The input the guest is on or will consume next (all below are done)."""
        return self._inputs.consumer_seq

    @property
    def input_head(self) -> int:
        """The seq the next :meth:`feed_input` gets."""
        return self._inputs.head

    def wait_for_input_seq(self, seq: int, timeout: float = 10.0) -> None:
        """Wait until the guest has consumed every input below ``seq`` (tests, demos)."""
        deadline = time.monotonic() + timeout
        while self.input_seq() < seq:
            problem = self._guest_problem()
            if problem:
                raise DomainError(f"sim domain {self.name}: {problem}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sim domain {self.name}: guest at input seq "
                                   f"{self.input_seq()}, not {seq}, after {timeout}s")
            time.sleep(0.0005)

    def output_fileno(self) -> int:
        """Readable while output frames are pending."""
        return self._out_r

    def read_outputs(self, timeout: float = 0.0) -> list[tuple[int, bytes]]:
        """Output frames ``(input seq, frame)`` emitted since the last call, oldest first;
        waits up to ``timeout`` seconds for the first one."""
        self._check_open()
        if self._out_pid != _PID[0]:
            self._out_pending, self._out_pid = b"", _PID[0]
        if timeout > 0 and not self._out_pending:
            select.select([self._out_r], [], [], timeout)
        chunks = [self._out_pending]
        while True:
            try:
                chunk = os.read(self._out_r, _OUT_READ)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if len(chunk) < _OUT_READ:   # the pipe is empty now: no read that fails
                break
        w = self._words
        if len(chunks) == 1 and w[W_MARKS] == w[W_MARKS_READ]:
            return []                    # nothing new (a partial frame stays pending)
        data = b"".join(chunks)
        # where data[0] sits in the guest's output stream
        base = w[W_OUT_READ] - len(self._out_pending)
        w[W_OUT_READ] += len(data) - len(self._out_pending)
        marks = self._new_marks()       # read after the pipe: a mark precedes what follows it
        frames: list[tuple[int, bytes]] = []
        pos = 0
        while len(data) - pos >= _OUTPUT_HEADER.size:
            while marks and marks[0][0] <= base + pos:
                frames.append((OUTPUT_MARK, marks.pop(0)[1]))
                w[W_MARKS_READ] += 1
            length, seq = _OUTPUT_HEADER.unpack_from(data, pos)
            end = pos + _OUTPUT_HEADER.size + length
            if end > len(data):
                break
            frames.append((seq, data[pos + _OUTPUT_HEADER.size:end]))
            pos = end
        while marks and marks[0][0] <= base + pos:
            frames.append((OUTPUT_MARK, marks.pop(0)[1]))
            w[W_MARKS_READ] += 1
        self._out_pending = data[pos:]
        return frames

    def _new_marks(self) -> list[tuple[int, bytes]]:
        w = self._words
        made, read = int(w[W_MARKS]), int(w[W_MARKS_READ])
        if made - read > _MARK_SLOTS:
            raise DomainError(f"sim domain {self.name}: {made - read} output marks not read; "
                              f"the ring holds {_MARK_SLOTS}")
        out = []
        for n in range(read, made):
            at = _MARKS_OFF + (n % _MARK_SLOTS) * _MARK_SLOT
            offset, length = struct.unpack_from("<QQ", self._ctl_map, at)
            out.append((offset, bytes(self._ctl_map[at + 16:at + 16 + length])))
        return out

    def mark_outputs(self, tag: bytes) -> None:
        """Put ``tag`` in the output stream after every frame emitted so far (guest paused);
        read_outputs returns it as ``(OUTPUT_MARK, tag)``."""
        self._require_paused("mark_outputs")
        if len(tag) > _MARK_TAG_CAP:
            raise ValueError(f"output mark of {len(tag)} bytes exceeds {_MARK_TAG_CAP}")
        w = self._words
        n = int(w[W_MARKS])
        if n - int(w[W_MARKS_READ]) >= _MARK_SLOTS:
            raise DomainError(f"sim domain {self.name}: {_MARK_SLOTS} output marks not read "
                              "yet (is the output reader stuck?)")
        at = _MARKS_OFF + (n % _MARK_SLOTS) * _MARK_SLOT
        struct.pack_into("<QQ", self._ctl_map, at, int(w[W_OUT_WRITTEN]), len(tag))
        self._ctl_map[at + 16:at + 16 + len(tag)] = tag
        w[W_MARKS] = n + 1              # last: a reader sees the mark only once it is whole

    @staticmethod
    def nondeterministic_command() -> bytes:
        """An input whose reply mixes in real randomness: a peer fed the same input diverges
        exactly once."""
        return _NONDET_COMMAND

    @staticmethod
    def write_command(npages: int) -> bytes:
        """An input that makes the guest write exactly ``npages`` distinct pages (in runs)."""
        if npages < 0:
            raise ValueError(f"write_command: npages must be >= 0, got {npages}")
        return _WRITE_COMMAND.pack(_WRITE_MAGIC, npages)

    @staticmethod
    def fill_command(first: int, npages: int, value: int) -> bytes:
        """An input that makes the guest fill the pages ``first`` .. ``first + npages - 1``
        with the byte ``value`` (cut at the workload's last page): the same command again
        gives those pages back exactly their earlier content (no other input does: the
        workload's pages derive from the guest's history)."""
        if first < 0 or npages < 0 or not 0 <= value < 256:
            raise ValueError(f"fill_command: first and npages must be >= 0 and value a byte, "
                             f"got {first}, {npages}, {value}")
        return _FILL_COMMAND.pack(_FILL_MAGIC, first, npages, value)

    def counters(self) -> dict[str, int]:
        """Guest counters (inputs, pages written, outputs, pauses, rejected blobs/inputs)."""
        out = {name: int(self._words[i]) for name, i in _COUNTERS.items()}
        out["rejected_inputs"] = self._inputs.rejected
        return out


# -- the guest process ----------------------------------------------------------------------

class _Guest:
    """Runs in the forked guest process; never returns normally."""

    def __init__(self, dom: SimDomain) -> None:
        self.dom = dom
        self.spec = dom.workload
        self.w = dom._words
        self.inputs = dom._inputs
        self.ram = dom._ram
        self.page_count = dom.page_count
        self.page_size = dom.page_size
        self.bitmap = dom._bitmap.bytes if dom._bitmap is not None else None
        self.pool = text_pool()
        self.windows = np.lib.stride_tricks.sliding_window_view(self.pool, dom.page_size)
        self.cdf = self.spec.mix_cdf()
        seed = self.spec.seed.to_bytes(8, "little")
        self.state = _GuestState(0, PHASE_IDLE, 0, 0, bytes(32),
                                 blake3.blake3(b"colo-sim-acc" + seed).digest())
        self._plan_for: tuple[bytes, int, int] | None = None
        self._plan_lists: tuple[list, list, list] = ([], [], [])
        self._cdf_list = self.cdf.tolist()
        self._ram_bytes = memoryview(self.ram.reshape(-1))
        self._pool_bytes = memoryview(self.pool)
        self._bitmap_bytes = memoryview(self.bitmap) if self.bitmap is not None else None
        self._zero_page = bytes(self.page_size)
        # the reply cache's slots sit in the last pages; once it is set up (the first
        # request), the workload writes only below them
        self.cache_entries = reply_cache_entries(self.page_count, self.page_size)
        self.cache_at = (self.page_count - REPLY_CACHE_PAGES) * self.page_size  # slot 0
        self._request_for: tuple[int, bytes] | None = None
        self._request: tuple[int, int] | None = None
        self._uffd: UffdWriteProtect | None = None
        self._last_digest = bytes(32)  # of the output frame just sent
        self._last_frame = b""
        self._awaited = -1             # the input seq last waited for mid-input (counted once)
        self.who = f"guest:{dom.name}"  # in the request trace (pipeline/trace.py)

    # -- set-up ----------------------------------------------------------------------
    def _become_guest_process(self) -> None:
        # Objects inherited from the creator must never be finalized here: a finalizer
        # could close an fd number that this process has reused by then.
        gc.freeze()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        # dies with its creator (SIGKILL: nothing of it to tidy), also one that died first
        die_with_parent(self.dom._owner_pid, signal.SIGKILL)
        _libc.prctl(_PR_SET_NAME, b"colo-sim-guest", 0, 0, 0)  # what ps/top show
        # Keep only our fds: copies of the creator's sockets and pipes held here would
        # keep its ports bound and its pipes open after it closed them.
        keep = {0, 1, 2, self.dom._doorbell, self.dom._ack, self.dom._out_w}
        for fd in [int(f) for f in os.listdir("/proc/self/fd")]:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:  # the listing's own fd, already gone
                    pass
        os.set_blocking(self.dom._doorbell, True)

    def run(self) -> None:
        self._become_guest_process()
        if self.spec.fill:
            self._fill()
        addr = self.ram.ctypes.data
        if self.dom.dirty_log_kind == "uffd":
            self._uffd = UffdWriteProtect(addr, self.page_count * self.page_size)
        self.w[W_RAM_ADDR] = addr
        self.inputs.set_consumer(0)
        self._save_state()
        self.w[W_GUEST_STATUS] = _STATUS_RUNNING
        self._loop()

    def _fill(self) -> None:
        """All of RAM with the content mix, vectorized in chunks; depends only on the seed."""
        rng = np.random.Generator(np.random.PCG64(self.spec.seed))
        ps = self.page_size
        chunk = 4096
        for base in range(0, self.page_count, chunk):
            n = min(chunk, self.page_count - base)
            kinds = np.searchsorted(self.cdf, rng.random(n), side="right")
            block = self.ram[base:base + n]
            rand_rows = np.flatnonzero(kinds == KIND_RANDOM)
            if rand_rows.size:
                words = rng.bit_generator.random_raw(rand_rows.size * ps // 8)
                block[rand_rows] = words.view(np.uint8).reshape(rand_rows.size, ps)
            text_rows = np.flatnonzero(kinds == KIND_TEXT)
            if text_rows.size:
                block[text_rows] = self.windows[rng.integers(0, len(self.windows), text_rows.size)]
                # a line naming the page, so that no two text pages are identical
                block[text_rows, 0] = ord("#")
                block[text_rows, 1:9] = _hex_columns(base + text_rows, 8)
                block[text_rows, 9] = ord(" ")

    # -- state -----------------------------------------------------------------------
    def _save_state(self) -> None:
        blob = self.state.pack(self.dom._fingerprint)
        self.dom._ctl_map[_VCPU_OFF:_VCPU_OFF + len(blob)] = blob
        self.w[W_VCPU_LEN] = len(blob)
        self.inputs.set_consumer(self.state.seq)

    def _load_state(self) -> None:
        n = self.w[W_VCPU_LEN]
        blob = bytes(self.dom._ctl_map[_VCPU_OFF:_VCPU_OFF + n])
        self.state = _GuestState.unpack(blob, self.dom._fingerprint, self.page_count)
        self.inputs.set_consumer(self.state.seq)

    # -- main loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        w = self.w
        while True:
            if w[W_PAUSE_REQ]:
                self._paused()
                continue
            st = self.state
            if not self.inputs.available(st.seq):
                # Between inputs: wait for the next one. In the middle of one: this guest
                # was loaded with its peer's state (a checkpoint caught the PVM inside
                # input seq) before its own log got that input: the primary feeds its
                # guest before it mirrors the input, and the mirror may lag by many
                # inputs. The input's payload is needed (its output names the request),
                # so the guest waits for it here as it would between inputs (asked for
                # it, it failed with InputLogEntryGone: seq beyond the log's head).
                if st.phase != PHASE_IDLE and self._awaited != st.seq:
                    self._awaited = st.seq
                    w[W_INPUT_AWAITED] += 1
                if trace.REQUESTS:
                    trace.flush_requests()     # a guest is killed, never stopped
                os.eventfd_read(self.dom._doorbell)  # sleeps until fed, paused or resumed
                continue
            if st.phase == PHASE_IDLE:
                begin_ns = time.monotonic_ns() if trace.REQUESTS else 0
                self._begin_input(self.inputs.get(st.seq))
                if trace.REQUESTS:
                    trace.request("guest_begin", st.seq, self.who, begin_ns)
            if st.step < st.npages and not self._write_pages():
                continue  # interrupted by a pause request
            if not self._emit_output():
                continue
            self._finish_input()

    def _paused(self) -> None:
        w = self.w
        self._save_state()
        w[W_PAUSES] += 1
        if trace.REQUESTS:
            trace.request("guest_paused", self.state.seq, self.who)
            trace.flush_requests()
        while True:
            if not w[W_PAUSE_REQ]:
                break
            epoch = w[W_PAUSE_EPOCH]
            if w[W_PAUSE_ACK] != epoch:
                w[W_PAUSE_ACK] = epoch
                os.eventfd_write(self.dom._ack, 1)
                # raised to the pauser's real-time priority for the answer (pause): the
                # guest itself runs at normal priority
                self._normal_priority()
            os.eventfd_read(self.dom._doorbell)
        # and once more on the way out: whatever raised it while it was paused (a pauser
        # whose raise came after the answer), it runs its clients' requests at normal
        # priority, never above the stages that feed it and read its answers
        self._normal_priority()
        self._load_state()  # the pipeline may have loaded a peer's state meanwhile
        if trace.REQUESTS:
            trace.request("guest_resumed", self.state.seq, self.who)

    @staticmethod
    def _normal_priority() -> None:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

    # -- one input -----------------------------------------------------------------------
    def _begin_input(self, payload: bytes) -> None:
        st = self.state
        request = parse_request(payload)
        if request is not None and self.cache_entries and not st.flags & FLAG_REPLY_CACHE:
            self._set_up_cache()
        if request is not None and self._cached(*request)[0] != "new":
            # answered from the cache (or refused): nothing executes, nothing is written
            st.phase, st.step, st.npages = PHASE_REPLAY, 0, 0
            st.key = blake3.blake3(payload).digest()   # names the input (_current_request)
            return
        p = self.spec.nondeterminism
        salt = bytes(16)
        if payload == _NONDET_COMMAND or (
                p > 0 and int.from_bytes(os.urandom(4), "little") < p * (1 << 32)):
            salt = os.urandom(16)  # real randomness: a peer cannot reproduce this input
            self.w[W_NONDET_INPUTS] += 1
        # the key depends on the guest's history (acc), the input, and two pages it reads,
        # so a guest whose memory differs anywhere it reads soon behaves differently
        r1 = int.from_bytes(st.acc[0:8], "little") % self.page_count
        r2 = int.from_bytes(st.acc[8:16], "little") % self.page_count
        h = blake3.blake3(st.acc)
        h.update(st.seq.to_bytes(8, "little"))
        h.update(salt)
        h.update(len(payload).to_bytes(4, "little"))
        h.update(payload)
        h.update(self.ram[r1])
        h.update(self.ram[r2])
        npages = _command_pages(payload)
        if npages is None:
            npages = self.spec.pages_per_input
        work = self._work_pages()
        fill = _fill_command(payload)
        if fill is not None:
            work = max(0, work - fill[0])      # its pages start at its first pfn
        if npages > work:
            self.w[W_CLAMPED_COMMANDS] += 1
            npages = work
        st.phase, st.step, st.npages, st.key = PHASE_INPUT, 0, npages, h.digest()

    def _get_plan(self) -> tuple[list, list, list]:
        """(pfns, kinds, text offsets) of the current input, as lists (for the write loop):
        a pure function of its key; a fill command's: its pages, KIND_FILL, its value (as
        the offset), from the input itself (in the log: the loop waited for it)."""
        st = self.state
        work = self._work_pages()
        if self._plan_for != (st.key, st.npages, work):
            fill = _fill_command(self.inputs.get(st.seq)) if st.npages else None
            if fill is not None:
                first, _, value = fill
                self._plan_lists = (list(range(first, first + st.npages)),
                                    [KIND_FILL] * st.npages, [value] * st.npages)
            else:
                self._plan_lists = plan_lists(st.key, st.npages, work, self.spec.run_length,
                                              self._cdf_list, len(self.windows))
            self._plan_for = (st.key, st.npages, work)
        return self._plan_lists

    def _write_pages(self) -> bool:
        """Write the rest of the current input's pages, looking at the pause flag before each;
        False if a pause interrupted (``step`` says where). Page content depends only on
        (key, seq, page index), so a resumed or peer guest writes exactly the same."""
        st = self.state
        pfns, kinds, offsets = self._get_plan()
        # memoryview slice copies: ~4x cheaper per page than numpy indexing (measured)
        w, ram, pool, bitmap = self.w, self._ram_bytes, self._pool_bytes, self._bitmap_bytes
        key, seq, ps = st.key, st.seq, self.page_size
        start = st.step
        brk = w[W_BREAK]
        stop_at = brk - 1 - (seq << 32) if brk else -1   # this input's breakpoint page
        for i in range(start, st.npages):
            if w[W_PAUSE_REQ] or i == stop_at:
                if i == stop_at:
                    # the breakpoint: pause as pause() would have us do (epoch, then request)
                    w[W_BREAK] = 0
                    w[W_PAUSE_EPOCH] += 1
                    w[W_PAUSE_REQ] = 1
                st.step = i
                w[W_PAGES_WRITTEN] += i - start
                return False
            at = pfns[i] * ps
            kind = kinds[i]
            if kind == KIND_ZERO:
                ram[at:at + ps] = self._zero_page
            elif kind == KIND_TEXT:
                ram[at:at + ps] = pool[offsets[i]:offsets[i] + ps]
                stamp = b"@%010x.%08x " % (seq, i)  # a log-line prefix unique to this write
                ram[at:at + len(stamp)] = stamp
            elif kind == KIND_FILL:
                ram[at:at + ps] = bytes((offsets[i],)) * ps
            else:
                ram[at:at + ps] = blake3.blake3(key + i.to_bytes(4, "little")).digest(ps)
            if bitmap is not None:
                bitmap[pfns[i]] = 1  # after the write: see DirtyBitmap
        w[W_PAGES_WRITTEN] += st.npages - start
        st.step = st.npages
        return True

    # -- the reply cache -------------------------------------------------------------------
    def _work_pages(self) -> int:
        """The pages the workload writes: all of RAM but the reply cache's, once set up (a
        guest that never took a request writes as it always did)."""
        if self.state.flags & FLAG_REPLY_CACHE:
            return self.page_count - REPLY_CACHE_PAGES
        return self.page_count

    def _set_up_cache(self) -> None:
        """The first request: the cache's pages become empty slots and the workload's writes
        stay below them from now on (in the state, so a peer loading it does the same)."""
        first = self.page_count - REPLY_CACHE_PAGES
        self.ram[first:] = 0
        if self._bitmap_bytes is not None:
            self._bitmap_bytes[first:self.page_count] = b"\x01" * REPLY_CACHE_PAGES
        self.state.flags |= FLAG_REPLY_CACHE

    def _current_request(self) -> tuple[int, int] | None:
        """(client, number) if the current input is a request (from the input log: the
        guest's own memo of it may predate a state loaded from its peer)."""
        st = self.state
        if self._request_for != (st.seq, st.key):
            self._request = parse_request(self.inputs.get(st.seq))
            self._request_for = (st.seq, st.key)
        return self._request

    def _cached(self, client: int, number: int) -> tuple[str, bytes]:
        """("hit", the cached answer), ("refused", b"": the slot holds a later request of
        this client), or ("new", b"")."""
        if not self.cache_entries:
            return "new", b""
        at = self.cache_at + (number % self.cache_entries) * _CACHE_SLOT
        magic, c, n, length = _CACHE_HEAD.unpack_from(self._ram_bytes, at)
        if (magic != _CACHE_MAGIC or c != client or n < number
                or length > _CACHE_SLOT - _CACHE_HEAD.size):
            return "new", b""
        if n > number:
            return "refused", b""
        start = at + _CACHE_HEAD.size
        return "hit", bytes(self._ram_bytes[start:start + length])

    def _store_answer(self, client: int, number: int, frame: bytes) -> None:
        if not self.cache_entries:
            return
        at = self.cache_at + (number % self.cache_entries) * _CACHE_SLOT
        entry = _CACHE_HEAD.pack(_CACHE_MAGIC, client, number, len(frame)) + frame
        self._ram_bytes[at:at + len(entry)] = entry
        if self._bitmap_bytes is not None:
            self._bitmap_bytes[at // self.page_size] = 1  # after the write: see DirtyBitmap

    def _replay_frame(self) -> bytes:
        client, number = self._current_request()  # type: ignore[misc]
        kind, frame = self._cached(client, number)
        if kind == "hit":
            return frame
        # refused: a zero digest says so (a computed one is never all zeros)
        return (self.state.seq.to_bytes(8, "little") + bytes(48)
                + _ANSWER_ID.pack(client, number))

    def _output_frame(self) -> bytes:
        st = self.state
        if st.phase == PHASE_REPLAY:
            return self._replay_frame()
        pfns = self._get_plan()[0][:_OUTPUT_SAMPLE_PAGES]
        h = blake3.blake3(st.seq.to_bytes(8, "little"))
        h.update(st.key)
        if pfns:
            h.update(self.ram[pfns])
            sample = self.ram[pfns[0], :16].tobytes()
        else:
            sample = bytes(16)
        frame = st.seq.to_bytes(8, "little") + h.digest() + sample
        request = self._current_request()
        return frame if request is None else frame + _ANSWER_ID.pack(*request)

    def _emit_output(self) -> bool:
        """Send the current input's output frame; False if a pause interrupted the wait
        for room in the output pipe (the frame is then recomputed after the pause)."""
        frame = self._output_frame()
        message = _OUTPUT_HEADER.pack(len(frame), self.state.seq) + frame
        out_w, doorbell = self.dom._out_w, self.dom._doorbell
        while True:
            try:
                # (timed before the write: its reader may take the frame before we go on)
                emit_ns = time.monotonic_ns() if trace.REQUESTS else 0
                os.write(out_w, message)  # < PIPE_BUF: all or nothing
                self.w[W_OUT_WRITTEN] += len(message)   # before any pause: marks count it
                self._last_digest = frame[8:40]
                self._last_frame = frame
                if trace.REQUESTS:
                    trace.request("guest_emit", self.state.seq, self.who, emit_ns)
                return True
            except BlockingIOError:
                self.w[W_OUTPUT_STALLS] += 1
            readable, _, _ = select.select([doorbell], [out_w], [])
            if readable:
                os.eventfd_read(doorbell)
                if self.w[W_PAUSE_REQ]:
                    return False

    def _finish_input(self) -> None:
        st = self.state
        if st.phase == PHASE_REPLAY:
            # nothing executed: the guest's running state stays as it was (only the input
            # seq moves), so a replay changes neither memory nor what follows
            self.w[W_REFUSED if answer_refused(self._last_frame) else W_REPLAYED] += 1
        else:
            st.acc = blake3.blake3(st.key + self._last_digest).digest()
            request = self._current_request()
            if request is not None:
                self._store_answer(*request, self._last_frame)
                self.w[W_REQUESTS] += 1
        st.seq += 1
        st.phase, st.step, st.npages, st.key = PHASE_IDLE, 0, 0, bytes(32)
        self.w[W_INPUTS] += 1
        self.w[W_OUTPUTS] += 1
        self.inputs.set_consumer(st.seq)


#: one generator per process, re-seeded from each input's key (seeding through numpy's
#: SeedSequence costs ~40 µs; setting the PCG64 state directly ~5 µs)
_PLAN_BITGEN = np.random.PCG64(0)
_PLAN_RNG = np.random.Generator(_PLAN_BITGEN)


def make_plan(key: bytes, npages: int, page_count: int, run_length: int, cdf: np.ndarray,
              text_windows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which pages an input writes and with what: ``npages`` distinct pfns made of runs of
    ``run_length`` consecutive pages (aligned blocks in random order, the last one cut),
    a content kind per page, and a text-pool offset per page. A pure function of its
    arguments."""
    if npages == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.astype(np.uint8), empty
    _PLAN_BITGEN.state = {"bit_generator": "PCG64",
                          "state": {"state": int.from_bytes(key[:16], "little"),
                                    "inc": int.from_bytes(key[16:32], "little") | 1},
                          "has_uint32": 0, "uinteger": 0}
    raw = _PLAN_BITGEN.random_raw(2 * npages)
    uniform = (raw[:npages] >> np.uint64(11)) * (1.0 / (1 << 53))  # [0, 1), 53 bits
    kinds = np.searchsorted(cdf, uniform, side="right").astype(np.uint8)
    offsets = (raw[npages:] % np.uint64(text_windows)).astype(np.int64)
    run_length = min(run_length, page_count)
    nblocks = -(-page_count // run_length)
    # one extra block covers a short last block of RAM
    blocks = _distinct_blocks(min(nblocks, -(-npages // run_length) + 1), nblocks)
    starts = blocks.astype(np.int64) * run_length
    lengths = np.minimum(run_length, page_count - starts)
    pfns = runs_to_pfns(starts, lengths)[:npages].astype(np.int64)
    return pfns, kinds, offsets


#: plans of at most this many pages are made in plain Python (plan_lists): numpy's per-call
#: cost made a 2-page plan ~45 % of a guest's CPU per request (profiled at 1000 requests/s)
SMALL_PLAN_PAGES = 256


def plan_lists(key: bytes, npages: int, page_count: int, run_length: int, cdf: list,
               text_windows: int) -> tuple[list, list, list]:
    """:func:`make_plan` as lists, the same values (``cdf`` as a list); a small plan
    without numpy arrays (a few µs instead of ~50), a large one through make_plan."""
    if npages > SMALL_PLAN_PAGES:
        return tuple(a.tolist() for a in make_plan(  # type: ignore[return-value]
            key, npages, page_count, run_length, np.asarray(cdf), text_windows))
    if npages == 0:
        return [], [], []
    _PLAN_BITGEN.state = {"bit_generator": "PCG64",
                          "state": {"state": int.from_bytes(key[:16], "little"),
                                    "inc": int.from_bytes(key[16:32], "little") | 1},
                          "has_uint32": 0, "uinteger": 0}
    raw = _PLAN_BITGEN.random_raw(2 * npages).tolist()
    scale = 1.0 / (1 << 53)
    kinds = [bisect_right(cdf, (r >> 11) * scale) for r in raw[:npages]]
    offsets = [r % text_windows for r in raw[npages:]]
    run_length = min(run_length, page_count)
    nblocks = -(-page_count // run_length)
    k = min(nblocks, -(-npages // run_length) + 1)
    blocks: list[int] | None = None
    if 4 * k <= nblocks:      # as _distinct_blocks: the first k distinct of 2k + 8 draws
        seen: dict[int, None] = {}
        for c in _PLAN_BITGEN.random_raw(2 * k + 8).tolist():
            seen.setdefault(c % nblocks)
            if len(seen) == k:
                blocks = list(seen)
                break
    if blocks is None:
        blocks = _PLAN_RNG.choice(nblocks, size=k, replace=False).tolist()
    pfns: list[int] = []
    for b in blocks:
        start = b * run_length
        pfns.extend(range(start, min(start + run_length, page_count)))
        if len(pfns) >= npages:
            break
    return pfns[:npages], kinds, offsets


def _distinct_blocks(k: int, nblocks: int) -> np.ndarray:
    """``k`` distinct block numbers below ``nblocks``, in random order, from the plan stream."""
    if 4 * k <= nblocks:
        # few out of many: draw a few spare candidates and keep the first k distinct ones
        candidates = _PLAN_BITGEN.random_raw(2 * k + 8) % np.uint64(nblocks)
        _, first = np.unique(candidates, return_index=True)
        if first.size >= k:
            first.sort()
            return candidates[first[:k]]
    return _PLAN_RNG.choice(nblocks, size=k, replace=False)


def open_sim_domain(name: str, page_count: int, workload: WorkloadSpec = WorkloadSpec(),
                    dirty_log: str = "auto", page_size: int = 4096, *,
                    input_slots: int = 1024, input_slot_size: int = 2048) -> SimDomain:
    """A sim guest (not started: call :meth:`SimDomain.start`).

    ``dirty_log``: ``"uffd"`` (kernel-tracked; DomainError if the kernel cannot),
    ``"bitmap"`` (kept by the workload), or ``"auto"`` (uffd when possible, else bitmap,
    with a log line saying why).
    """
    if page_count < 1:
        raise ValueError(f"sim domain {name}: page_count must be >= 1, got {page_count}")
    if page_size < 256 or page_size & (page_size - 1):
        raise ValueError(f"sim domain {name}: page_size must be a power of two >= 256, "
                         f"got {page_size}")
    if not isinstance(workload, WorkloadSpec):
        raise ValueError(f"sim domain {name}: workload must be a WorkloadSpec, "
                         f"got {type(workload).__name__}")
    if dirty_log not in ("auto", "uffd", "bitmap"):
        raise ValueError(f"sim domain {name}: dirty_log must be 'auto', 'uffd' or 'bitmap', "
                         f"got {dirty_log!r}")
    kind = dirty_log
    if dirty_log in ("auto", "uffd"):
        reason = uffd_wp_async_unsupported_reason()
        if reason is None and page_size != mmap.PAGESIZE:
            reason = f"page size {page_size} is not the system page size {mmap.PAGESIZE}"
        if reason is None:
            kind = "uffd"
            log.info("sim domain %s: dirty log kept by the kernel (userfaultfd async "
                     "write-protect + PAGEMAP_SCAN)", name)
        elif dirty_log == "uffd":
            raise DomainError(f"sim domain {name}: dirty_log 'uffd' unavailable: {reason}")
        else:
            kind = "bitmap"
            log.warning("sim domain %s: dirty log falls back to a workload-kept bitmap: %s",
                        name, reason)
    return SimDomain(name, page_count, workload, kind, page_size, input_slots, input_slot_size)
