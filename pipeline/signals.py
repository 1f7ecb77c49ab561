"""Stop on a signal without taking a lock in the signal handler.

Python runs a signal handler in the main thread, between two bytecodes of whatever that
thread is doing. A handler that takes a lock the main thread may hold right then waits
for itself forever:

- a multiprocessing Event's ``is_set()``, ``set()``, ``clear()`` and ``wait()`` all take
  its Condition's lock (a non-reentrant semaphore), and every loop that polls the event
  calls one of them: a SIGTERM landing inside ``is_set()`` deadlocked the supervisor
  (fault matrix, session 10, fixed in 1b17283) and could deadlock every stage
  (``stage_main``, whose loops call ``ctx.stop.is_set()`` each turn);
- a threading.Event's ``set()``, ``clear()`` and ``wait()`` take its Condition's lock (a
  non-reentrant ``threading.Lock``); only ``is_set()`` reads the flag without it. So a
  handler that sets a threading.Event is safe only while the main thread never calls
  anything but ``is_set()`` on it.

:func:`stop_on_signals` is the one way the project does it: the handler writes one byte to
a non-blocking pipe (async-signal-safe, no lock) and a thread calls ``set_stop``.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Iterable

_SIGNALLED = b"s"
_QUIT = b"q"


def stop_on_signals(signals: Iterable[int], set_stop: Callable[[], None],
                    join_timeout_s: float = 5.0,
                    noted: Callable[[], None] | None = None) -> Callable[[], None]:
    """Install handlers for ``signals`` (call from the main thread) that make a thread call
    ``set_stop()``, once per signal received. Returns the function that puts the old
    handlers back and ends the thread (waiting up to ``join_timeout_s`` for a
    ``set_stop`` under way).

    ``noted`` (optional) is called in the handler itself, before the main thread goes on:
    it must take no lock (a plain assignment, e.g. ``self.signalled = True``). For a main
    thread that must know at once that it was signalled, before the thread's ``set_stop``
    ran: the supervisor, whose stages get the same SIGTERM when a whole process group is
    signalled (systemd, a test's killpg) and may exit before the stop event is set (a CI
    run at load 14: a stage's clean exit read as a failure, the node exited 1)."""
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)

    def on_signal(_signum, _frame) -> None:
        if noted is not None:
            noted()
        try:
            os.write(wfd, _SIGNALLED)
        except BlockingIOError:     # the pipe is full of earlier signals: stopping already
            pass

    def stopper() -> None:
        while os.read(rfd, 1) == _SIGNALLED:
            set_stop()

    thread = threading.Thread(target=stopper, name="stop-on-signal", daemon=True)
    thread.start()
    old = {sig: signal.signal(sig, on_signal) for sig in signals}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        # blocking now: the quit byte must get in behind any signal bytes still unread
        os.set_blocking(wfd, True)
        os.write(wfd, _QUIT)
        thread.join(join_timeout_s)
        os.close(rfd)
        os.close(wfd)
    return restore


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGTERM) -> None:
    """In a child process (a preexec_fn, or a spawned child's first call): get ``sig`` when
    the process that started it dies (Linux ``PR_SET_PDEATHSIG``), so a test, benchmark or
    demo killed by a timeout or a signal leaves nothing of its own running. ``parent_pid``
    (the starter's pid, read before the start) closes the race of a parent that died
    before this call: the child then signals itself at once.

    The signal comes when the parent *thread* that started the child ends, not the process:
    start children that must outlive a worker thread from the main thread."""
    import ctypes
    ctypes.CDLL(None).prctl(1, sig)     # PR_SET_PDEATHSIG = 1
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def report_fatal_signals(stream=None) -> bool:
    """Make a native crash of this process name itself: on SIGSEGV, SIGBUS, SIGFPE,
    SIGABRT or SIGILL, ``faulthandler`` writes the Python frames of every thread to
    ``stream`` (default ``sys.stderr``: where the process's log goes) and the process then
    dies of the same signal, so the supervisor's "killed by signal N" stays. Pure Python
    cannot segfault; native code (numpy views over shared memory, the C module
    ``_pagehash``, lz4, blake3, libzmq) can, and without this it dies without a word
    (issue 13: the restore stage "killed by signal 11" twice, no line saying where).

    Every process the pipeline starts calls it at its entry: the launcher (``cli.main``:
    the node's supervisor, the demo), every stage (``stage_main``; the handlers would also
    survive the fork, but a stage started by another parent, a test's, gets them too) and
    the redirector. Returns False, enabling nothing, when the stream has no file
    descriptor (a test's captured stderr) and ``sys.__stderr__`` has none either."""
    import faulthandler
    import sys
    for candidate in (stream if stream is not None else sys.stderr, sys.__stderr__):
        try:
            if candidate is not None and candidate.fileno() >= 0:
                faulthandler.enable(file=candidate, all_threads=True)
                return True
        except (AttributeError, ValueError, OSError):
            continue
    return False
