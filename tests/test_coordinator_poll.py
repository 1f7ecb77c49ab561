"""The coordinators' waits between checkpoints sleep, never spin: pyzmq's ``Poller.poll``
cuts a float timeout to whole milliseconds, so a wait of less than one polled without
waiting, and the loop around it turned until its due time at real-time priority (the
secondary's loop before each prehash round, the primary's idle wait before each look at the
dirty count). ``poll_ms`` rounds up; these tests give each wait a fraction of a millisecond
and check the timeout zmq got, and (a lower bound only, which holds on any machine) that the
poll slept."""
from __future__ import annotations

import time
from types import SimpleNamespace

import zmq

from pipeline import config
from pipeline.coordinator import PrimaryCoordinator, SecondaryCoordinator, poll_ms


class RecordingPoller(zmq.Poller):
    """A real zmq.Poller that keeps each timeout it was given (and how long it slept)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, float]] = []

    def poll(self, timeout=None):
        t0 = time.monotonic()
        got = super().poll(timeout)
        self.calls.append((timeout, time.monotonic() - t0))
        return got


def test_poll_ms_rounds_up():
    assert poll_ms(0.0) == 0
    assert poll_ms(-0.5) == 0
    assert poll_ms(0.0001) == 1
    assert poll_ms(0.0007) == 1
    assert poll_ms(0.004) == 4
    assert poll_ms(0.0041) == 5
    assert isinstance(poll_ms(0.0007), int)


def _quiet_socket(zctx: zmq.Context) -> zmq.Socket:
    sock = zctx.socket(zmq.PAIR)
    sock.bind(f"inproc://quiet-{id(sock)}")
    return sock


def test_secondary_poll_sleeps_a_fraction_of_a_millisecond():
    zctx = zmq.Context()
    control = _quiet_socket(zctx)
    hb, restore = _quiet_socket(zctx), _quiet_socket(zctx)
    try:
        coord = object.__new__(SecondaryCoordinator)
        coord.poller = RecordingPoller()
        for s in (control, hb, restore):
            coord.poller.register(s, zmq.POLLIN)
        # (the real ones are pipes with a fileno; nothing arrives on any of them here)
        coord.control = control
        coord.hb_events = SimpleNamespace(fileno=lambda: -1)
        coord.restore_ctrl = SimpleNamespace(fileno=lambda: -2)
        coord._poll(0.0007)
        (timeout, slept), = coord.poller.calls
        # pyzmq cuts a float to whole ms: 0.7 polled without waiting (the loop then spun)
        assert int(timeout) >= 1, f"0.7 ms became a poll timeout of {timeout!r}"
        assert slept >= 0.0007
    finally:
        for s in (control, hb, restore):
            s.close(0)
        zctx.term()


def test_primary_idle_wait_sleeps_until_a_due_time_under_a_millisecond():
    zctx = zmq.Context()
    requests = _quiet_socket(zctx)
    try:
        coord = object.__new__(PrimaryCoordinator)
        coord.settings = config.from_dict({"security": {"mode": "plaintext"}})
        coord.idle_poller = RecordingPoller()
        coord.idle_poller.register(requests, zmq.POLLIN)
        coord.pending_request = None
        # the last checkpoint 1 s ago (the timer: 10 s; min_interval_ms long past), the
        # next look at the dirty count due in 0.6 ms: the wait's shortest due time
        coord.last_checkpoint = time.monotonic() - 1.0
        coord.next_dirty_check = time.monotonic() + 0.0006
        coord._idle_wait()
        (timeout, slept), = coord.idle_poller.calls
        assert int(timeout) >= 1, f"a wait under 1 ms became a poll timeout of {timeout!r}"
        assert slept >= 0.0005
    finally:
        requests.close(0)
        zctx.term()
