"""A node that gets SIGTERM stops, whatever its main thread is doing when it lands.

The fault matrix (session 10, partition-one-way-primary-to-secondary) saw a secondary
that got SIGTERM go on running: its stages never got their stop events, its heartbeat
declared the primary lost 300 ms later, it took over, and it was SIGKILLed 30 s on with
its /dev/shm segments left. The supervisor's SIGTERM handler set a multiprocessing Event;
Python runs a handler in the main thread between two bytecodes, and when the signal lands
while that thread is inside ``stop_event.is_set()`` (the watch loop calls it every 50 ms)
the handler waits for a lock its own thread holds: forever.

The moment cannot be hit from outside at a named point (it is inside the standard
library's Event), so this test makes it: ``Supervisor.run`` runs for real (its signal
handling, its watch loop); its ``start``/``wait``/``stop`` are replaced (a mock, named as
one) by a ``wait`` that takes the stop event's lock and sends the process SIGTERM while
it holds it. The old handler deadlocked there; the node must instead stop its stages
(their events set) and return.
"""
import os
import subprocess
import sys

CHILD = r'''
import os, signal, time
from pipeline import supervisor

sup = supervisor.Supervisor.__new__(supervisor.Supervisor)   # no stages: the mock below
sup.stop_event = supervisor._event()
sup.stage_stops = {"heartbeat": supervisor._event(), "coordinator": supervisor._event()}
sup.auto, sup.redirector, sup.name = False, None, "signal-test"
sup.start = lambda: None
sup._draw_disk_sync = lambda: None
stopped = []
sup.stop = lambda: stopped.append(True)
signalled = []

def wait(timeout):
    if not signalled:
        signalled.append(True)
        with sup.stop_event._cond:          # the lock is_set()/set() take
            os.kill(os.getpid(), signal.SIGTERM)
            print("SIGTERM sent while the stop event's lock is held", flush=True)
    else:
        sup.stop_event.wait(timeout)
    return 0

sup.wait = wait
code = sup.run()
print("run returned", code, "stop called", bool(stopped),
      "stages told", sorted(n for n, ev in sup.stage_stops.items() if ev.is_set()),
      "handler", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
'''


def test_sigterm_while_the_main_thread_holds_the_stop_events_lock_stops_the_node():
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=60)     # a generous deadline for the exit
    except subprocess.TimeoutExpired:
        proc.kill()                               # SIGTERM is what it fails to act on
        out, _ = proc.communicate()
        raise AssertionError(f"the node did not stop on SIGTERM (deadlocked in its handler); "
                             f"its output: {out!r}") from None
    assert proc.returncode == 0, out
    assert "SIGTERM sent while the stop event's lock is held" in out, out
    assert "run returned 0 stop called True stages told ['coordinator', 'heartbeat'] " \
           "handler True" in out, out
