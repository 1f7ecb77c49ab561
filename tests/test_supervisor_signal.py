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

Every stage process has the same hazard (``stage_main``: its loops call
``ctx.stop.is_set()``, a multiprocessing Event, each turn; a SIGTERM straight to a stage,
systemd signalling the whole control group, lands there), and so has the disk stage, whose
main thread sets its threading.Event itself on the "stop" command (its set() holds the lock
a handler's set() would wait for). All of them go through ``pipeline.signals``; the tests
below make the same moment for ``stage_main`` (for real: the stage's run function is the
one taking the lock) and for ``stop_on_signals`` with a threading.Event.
"""
import os
import subprocess
import sys

CHILD = r'''
import os, signal, time
from pipeline import supervisor

sup = supervisor.Supervisor.__new__(supervisor.Supervisor)   # no stages: the mock below
sup.stop_event = supervisor._event()
sup.signalled = False
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


STAGE_CHILD = r'''
import logging, multiprocessing, os, signal
from pipeline.stages.common import StageContext, stage_main

def run(ctx):
    with ctx.stop._cond:                    # the lock is_set()/set() take
        os.kill(os.getpid(), signal.SIGTERM)
        print("SIGTERM sent while the stop event's lock is held", flush=True)
    print("stop set", ctx.stop.wait(60), flush=True)

stop = multiprocessing.get_context("fork").Event()
stage_main(StageContext("signal-test", None, stop, logging.getLogger("signal-test")), run)
print("stage_main returned", flush=True)
'''

THREADING_EVENT_CHILD = r'''
import os, signal, threading
from pipeline.signals import stop_on_signals

stopping = threading.Event()                # as the disk stage's
restore = stop_on_signals((signal.SIGTERM,), stopping.set)
with stopping._cond:                        # held by the disk stage's own stopping.set()
    os.kill(os.getpid(), signal.SIGTERM)
    print("SIGTERM sent while the stop event's lock is held", flush=True)
print("stop set", stopping.wait(60), flush=True)
restore()
print("handler", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
'''


LATE_STOPPER_CHILD = r'''
import multiprocessing, os, signal, threading, time
from pipeline import supervisor

def stage():
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))   # a stage stops cleanly on it
    print("stage up", flush=True)
    while True:
        signal.pause()

sup = supervisor.Supervisor.__new__(supervisor.Supervisor)   # one stage: the mock below
sup.stop_event = supervisor._event()
sup.signalled = False
sup.stage_stops = {"mirror": supervisor._event()}
sup.auto, sup.redirector, sup.name, sup.exit_reason = False, None, "signal-test", ""
late = threading.Event()
real_stop_all = sup._stop_all
def stop_all():                 # the stop-on-signal thread, late: held until stop()
    late.wait()
    real_stop_all()
sup._stop_all = stop_all
def start():
    p = multiprocessing.get_context("fork").Process(target=stage)
    p.start()
    sup.procs = {"mirror": p}
sup.start = start
stopped = []
sup.stop = lambda: (stopped.append(True), late.set())
signalled = []
def group_sigterm():            # systemd or a test's killpg: the stage and the node at once
    if not signalled:
        signalled.append(True)
        os.kill(sup.procs["mirror"].pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        print("SIGTERM sent to the stage and the node", flush=True)
sup._draw_disk_sync = group_sigterm
code = sup.run()
print("run returned", code, "reason", repr(sup.exit_reason), "stop called", bool(stopped),
      flush=True)
'''


def run_child(code: str) -> str:
    """Runs ``code`` in a fresh interpreter with this tree first on the path; its output,
    once it exits 0 (a generous deadline: a child deadlocked in its handler never does)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()                               # SIGTERM is what it fails to act on
        out, _ = proc.communicate()
        raise AssertionError(f"the process did not stop on SIGTERM (deadlocked in its "
                             f"handler); its output: {out!r}") from None
    assert proc.returncode == 0, out
    return out


def test_sigterm_while_the_main_thread_holds_the_stop_events_lock_stops_the_node():
    out = run_child(CHILD)
    assert "SIGTERM sent while the stop event's lock is held" in out, out
    assert "run returned 0 stop called True stages told ['coordinator', 'heartbeat'] " \
           "handler True" in out, out


def test_sigterm_while_a_stage_holds_its_stop_events_lock_stops_the_stage():
    out = run_child(STAGE_CHILD)
    assert "SIGTERM sent while the stop event's lock is held" in out, out
    assert "stop set True" in out and "stage_main returned" in out, out


def test_sigterm_while_the_main_thread_holds_a_threading_events_lock_sets_it():
    out = run_child(THREADING_EVENT_CHILD)
    assert "SIGTERM sent while the stop event's lock is held" in out, out
    assert "stop set True" in out and "handler True" in out, out


def test_a_stage_that_exits_on_the_groups_sigterm_before_the_stop_event_is_set_is_no_failure():
    """A SIGTERM to the node's whole process group (systemd's stop, a test's killpg) reaches
    a stage too; it exits 0 at once, and the watch loop may see that exit before the
    stop-on-signal thread has set the stop event. That is a stop, not a stage failure:
    the node exits 0 (a CI run at load 14: test_run_config_on_two_hosts_over_curve's
    secondary exited 1, "stage mirror exited with code 0; stopping the node"). Here the
    stop-on-signal thread is held until ``stop()`` (a mock, named as one, of a thread that
    a loaded machine runs late), so the old loop always saw the exit first."""
    out = run_child(LATE_STOPPER_CHILD)
    assert "SIGTERM sent to the stage and the node" in out, out
    assert "run returned 0 reason '' stop called True" in out, out
