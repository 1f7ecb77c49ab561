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
from pipeline.coordinator import (PrimaryCoordinator, SecondaryCoordinator,
                                  dirty_threshold_reachable, poll_ms)


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
        coord.dirty_countable = True
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


def test_no_dirty_count_look_where_the_threshold_is_beyond_the_guest():
    """A dirty count is at most the guest's pages (twice that with the prescan, whose pages
    are counted apart): a threshold beyond it is never reached, so the primary never looks
    (a look walks the whole dirty log; at 1000 requests/s the looks were most of the
    coordinator's CPU) and its idle wait has no look to wake for."""
    s = config.from_dict({"security": {"mode": "plaintext"},
                          "checkpoint": {"dirty_threshold_pages": 16384}})
    assert not dirty_threshold_reachable(s.checkpoint, 8192)
    assert dirty_threshold_reachable(s.checkpoint, 16384)
    on = config.from_dict({"security": {"mode": "plaintext"},
                           "checkpoint": {"dirty_threshold_pages": 16384, "prescan_ms": 5}})
    assert dirty_threshold_reachable(on.checkpoint, 8192)
    assert not dirty_threshold_reachable(on.checkpoint, 8191)
    zctx = zmq.Context()
    requests = _quiet_socket(zctx)
    try:
        coord = object.__new__(PrimaryCoordinator)
        coord.settings = s
        coord.bus = SimpleNamespace(drain_requests=lambda: [])
        looks = []
        coord.domain = SimpleNamespace(dirty_count=lambda: looks.append(1) or 20000)
        coord.pending_request = None
        coord.dirty_countable = False
        coord.last_checkpoint = time.monotonic() - 1.0
        coord.next_dirty_check = 0.0
        assert coord.next_trigger() is None and not looks
        coord.idle_poller = RecordingPoller()
        coord.idle_poller.register(requests, zmq.POLLIN)
        coord.next_dirty_check = time.monotonic() + 0.0006   # not a due time now
        coord._idle_wait()
        (timeout, _), = coord.idle_poller.calls
        assert timeout >= 15, f"the idle wait woke for a look it never takes: {timeout!r}"
        coord.dirty_countable = True                          # (the same, reachable: looks)
        coord.next_dirty_check = 0.0
        coord.c = SimpleNamespace(add=lambda *a: None)
        coord.prescan_held = lambda: 0
        assert coord.next_trigger() == ("dirty_threshold", 0) and looks == [1]
    finally:
        requests.close(0)
        zctx.term()
