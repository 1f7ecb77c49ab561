"""Hand-off timestamps for profiling the page path (COLO_TRACE=file: every process
appends "ns pid who event epoch detail" lines; CLOCK_MONOTONIC is one clock for all
processes of this machine). Off unless the variable is set: one bool test per call."""
from __future__ import annotations

import os
import time

_PATH = os.environ.get("COLO_TRACE", "")
ON = bool(_PATH)
_fd = -1
WHO = ""


def point(event: str, epoch: int = -1, detail: str = "") -> None:
    global _fd
    if not ON:
        return
    if _fd < 0:
        _fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{time.monotonic_ns()} {os.getpid()} {WHO} {event} {epoch} {detail}\n".encode())
