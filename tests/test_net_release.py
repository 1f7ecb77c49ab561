"""net.release = "commit": every PVM frame waits for the commit of the epoch that produced
it, then goes out in arrival order (Remus-style buffering). The comparator core, fed with
plain lists of frames (no sockets)."""
from __future__ import annotations

import pytest

from pipeline.net import build
from pipeline.net.comparator import RELEASE_DELAY_COUNTERS, Comparator, added_latency_ms
from pipeline.net.packet import TCP_ACK, TCP_PSH
from pipeline.net.settings import NetSettings
from pipeline.schema import SettingError

G, C = "10.0.0.2", "10.0.0.1"


class Harness:
    def __init__(self, **kw):
        self.released: list[bytes] = []
        self.requests: list[tuple[str, str]] = []
        self.cmp = Comparator(NetSettings(release="commit", **kw),
                              lambda f, v: self.released.append(f),
                              lambda c, d: self.requests.append((c, d)), clock=lambda: 0.0)

    def p(self, frames):
        for f in frames:
            self.cmp.push_primary(f)

    def s(self, frames):
        for f in frames:
            self.cmp.push_secondary(f)


def frames(n: int, start: int = 0) -> list[bytes]:
    """Frames of several protocols and flows, each unique (so order is checkable)."""
    out = []
    for i in range(start, start + n):
        tag = b"#%06d" % i
        kind = i % 3
        if kind == 0:
            out.append(build.udp_frame(G, C, 1000 + i % 7, 9, tag))
        elif kind == 1:
            out.append(build.tcp_frame(G, C, 80 + i % 5, 5555, 1000 + i * 7, 1,
                                       TCP_ACK | TCP_PSH, tag))
        else:
            out.append(build.icmp_echo_frame(G, C, 1, i, tag))
    return out


def test_outputs_are_held_until_their_epoch_commits_and_go_out_in_order():
    h = Harness()
    e0, e1 = frames(20), frames(15, 20)
    h.p(e0)
    h.s(e0)                                 # the SVM sends the same: not a reason to release
    assert h.released == [] and h.cmp.held_frames() == 20
    h.cmp.on_snapshot(0)
    h.p(e1)
    h.s(frames(5, 100))                     # and differs: not a reason to ask for anything
    assert h.released == []
    h.cmp.on_committed(0)
    assert h.released == e0                 # epoch 0's frames only, in arrival order
    h.cmp.on_snapshot(1)
    h.cmp.on_committed(1)
    assert h.released == e0 + e1
    assert h.requests == []                 # nothing compared, nothing requested
    c = h.cmp.counters
    assert c["frames_released"] == 35 and c["secondary_frames_dropped"] == 25
    assert c["mismatches"] == 0 and h.cmp.held_frames() == 0


def test_no_output_is_lost_across_an_aborted_epoch():
    h = Harness()
    e0, e1, e2 = frames(10), frames(10, 10), frames(10, 20)
    h.p(e0)
    h.cmp.on_snapshot(0)
    h.cmp.on_committed(0)
    assert h.released == e0
    h.p(e1)
    h.cmp.on_snapshot(1)
    h.p(e2)
    h.cmp.on_rolled_back(0, 1)              # epoch 1 was torn: its frames stay held
    assert h.released == e0
    h.cmp.on_snapshot(2)                    # its pages are carried into epoch 2
    h.cmp.on_committed(2)
    assert h.released == e0 + e1 + e2       # each exactly once, in order


def test_failover_releases_every_held_output_once_in_order():
    h = Harness()
    e0, e1, after = frames(10), frames(10, 10), frames(5, 20)
    h.p(e0)
    h.cmp.on_snapshot(0)
    h.p(e1)
    h.cmp.set_passthrough(True)             # the secondary is lost (or we took over)
    assert h.released == e0 + e1
    h.p(after)
    assert h.released == e0 + e1 + after
    h.cmp.on_committed(5)                   # a late event releases nothing twice
    assert h.released == e0 + e1 + after


def test_the_bound_holds_the_guest_back_and_loses_nothing():
    h = Harness(max_queue_frames=8)
    burst = frames(50)
    h.p(burst)
    assert h.cmp.blocked and h.cmp.held_frames() == 8 and h.cmp.stalled_frames() == 42
    assert h.requests == [("net_queue_full", "frames waiting for a commit at the bound")]
    epoch = 0
    while h.cmp.blocked or h.cmp.held_frames():
        h.cmp.on_snapshot(epoch)
        h.cmp.on_committed(epoch)
        epoch += 1
        assert epoch < 20
    assert h.released == burst
    assert h.cmp.counters["held_frames_peak"] == 8


def test_in_band_boundaries_place_each_frame_in_its_epoch():
    # The SVM's commit of epoch 0 may come before the PVM's snapshot boundary of epoch 0
    # (boundaries in-band): frames ahead of that boundary were produced in epoch 0.
    h = Harness()
    before, after = frames(5), frames(5, 5)
    h.p(before[:2])
    h.cmp.on_committed(0, snapshot_seen=False)
    assert h.released == before[:2]
    h.p(before[2:])                         # still ahead of the PVM's boundary: epoch 0
    assert h.released == before
    h.cmp.on_snapshot(0, in_band=True)      # the PVM's boundary of epoch 0
    h.p(after)                              # epoch 1: held
    assert h.released == before
    h.cmp.on_committed(1, snapshot_seen=False)
    assert h.released == before + after


def test_an_early_snapshot_event_is_corrected_by_the_in_band_boundary():
    # A snapshot event from another channel came before the PVM's frames of epoch 0 did;
    # the in-band boundary says they are epoch 0's, which has committed meanwhile.
    h = Harness()
    late = frames(4)
    h.cmp.on_snapshot(0)                    # event: frames from now on look like epoch 1
    h.p(late)
    h.cmp.on_committed(0, snapshot_seen=False)
    assert h.released == []
    h.cmp.on_snapshot(0, in_band=True)
    assert h.released == late


def test_release_setting_is_checked():
    assert NetSettings().release == "compare"
    with pytest.raises(SettingError, match="release.*'compare', 'commit'"):
        NetSettings.from_dict({"release": "eventually"})


def test_the_time_frames_were_held_is_counted_for_the_added_latency():
    now = [0.0]
    released: list[bytes] = []
    cmp = Comparator(NetSettings(), lambda f, v: released.append(f), lambda c, d: None,
                     clock=lambda: now[0])
    same = frames(4)
    for f in same[:2]:
        cmp.push_secondary(f)
    for f in same[:2]:
        cmp.push_primary(f)                 # the SVM's came first: out at once
    for f in same[2:]:
        cmp.push_primary(f)                 # held until the SVM's come, 25 ms later
    now[0] = 0.025
    for f in same[2:]:
        cmp.push_secondary(f)
    assert released == same
    c = cmp.counters
    assert c["released_after_le_0.1ms"] == 2 and c["released_after_le_30ms"] == 2
    assert sum(c[n] for n in RELEASE_DELAY_COUNTERS) == 4
    assert added_latency_ms(c, 0.5) == 0.1 and added_latency_ms(c, 0.99) == 30
    # frames the comparator never held (passthrough) count as no added latency
    cmp.set_passthrough(True)
    for f in frames(96, 10):
        cmp.push_primary(f)
    assert added_latency_ms(c, 0.5) == 0.0 and added_latency_ms(c, 0.99) == 30
    h = Harness()                           # buffered: each frame's wait for its commit
    h.p(frames(3))
    h.cmp.on_snapshot(0)
    h.cmp.on_committed(0)
    assert h.cmp.counters["released_after_le_0.1ms"] == 3
