"""Hand-off timestamps for profiling the page path (COLO_TRACE=file: every process
appends "ns pid who event epoch detail" lines; CLOCK_MONOTONIC is one clock for all
processes of this machine). Off unless the variable is set: one bool test per call."""
from __future__ import annotations

import os
import time

_PATH = os.environ.get("COLO_TRACE", "")
ON = bool(_PATH)
#: COLO_TRACE_CPU=1: each line's detail ends with "cpu=THREAD_NS/PROCESS_NS", the calling
#: thread's and its whole process's CPU time so far (what each process spent between two
#: of its events: scripts/trace_checkpoint.py --cpu)
CPU = ON and os.environ.get("COLO_TRACE_CPU", "") == "1"
_fd = -1
WHO = ""


def point(event: str, epoch: int = -1, detail: str = "") -> None:
    global _fd
    if not ON:
        return
    if _fd < 0:
        _fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if CPU:
        detail = f"{detail} cpu={time.thread_time_ns()}/{time.process_time_ns()}".lstrip()
    os.write(_fd, f"{time.monotonic_ns()} {os.getpid()} {WHO} {event} {epoch} {detail}\n".encode())


# -- per-request timelines (COLO_REQUEST_TRACE=file) -------------------------------------
# What one request of the sim service meets on its way, keyed by its input seq: the client
# sends it, the client stage feeds the PVM and mirrors it, the guests start and answer it,
# the stages hand each answer to the comparator, the client gets the released answer
# (scripts/trace_requests.py joins them). Lines "ns who event seq"; buffered per process
# (a request makes ~10 records: a write each would cost the service more than it measures)
# and written every 256 records, every 0.2 s and at a stage's end. Off unless the variable
# is set: callers test REQUESTS first (one attribute read per request when off).
_REQ_PATH = os.environ.get("COLO_REQUEST_TRACE", "")
REQUESTS = bool(_REQ_PATH)
_req_buf: list[str] = []
_req_pid = 0
_req_fd = -1
_req_flushed = 0.0


def request(event: str, seq: int, who: str = "", at_ns: int = 0) -> None:
    """Record ``event`` of the request with input ``seq`` now (or at ``at_ns``, a
    time.monotonic_ns; call only if REQUESTS)."""
    global _req_pid, _req_fd
    now = time.monotonic_ns()
    if _req_pid != os.getpid():       # forked: the parent's buffer and fd are not ours
        _req_buf.clear()
        _req_pid, _req_fd = os.getpid(), -1
    _req_buf.append(f"{at_ns or now} {who or WHO or 'main'} {event} {seq}\n")
    if len(_req_buf) >= 256 or now - _req_flushed > 200_000_000:
        flush_requests()


def flush_requests() -> None:
    global _req_fd, _req_flushed
    if not REQUESTS or _req_pid != os.getpid() or not _req_buf:
        return
    if _req_fd < 0:
        _req_fd = os.open(_REQ_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_req_fd, "".join(_req_buf).encode())   # one append: lines never interleave
    _req_buf.clear()
    _req_flushed = time.monotonic_ns()
