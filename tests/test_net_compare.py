"""The comparator core, fed with plain lists of frames (no sockets)."""
from __future__ import annotations

import struct

import pytest

from pipeline.net import build
from pipeline.net.comparator import Comparator
from pipeline.net.packet import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, parse_frame
from pipeline.net.settings import NetSettings

G, C = "10.0.0.2", "10.0.0.1"
ISN = 1000


class Harness:
    def __init__(self, **kw):
        self.now = 0.0
        self.released: list[bytes] = []
        self.requests: list[tuple[str, str]] = []
        self.cmp = Comparator(NetSettings(**kw), lambda f, v: self.released.append(f),
                              lambda c, d: self.requests.append((c, d)), clock=lambda: self.now)

    def p(self, frame):
        self.cmp.push_primary(frame)

    def s(self, frame):
        self.cmp.push_secondary(frame)


def seg(seq, payload=b"", flags=TCP_ACK | TCP_PSH, sport=80, ip_id=0, window=65535):
    return build.tcp_frame(G, C, sport, 5555, seq, 1, flags, payload, ip_id=ip_id, window=window)


def udp(payload, sport=53, ip_id=0):
    return build.udp_frame(G, C, sport, 4444, payload, ip_id=ip_id)


def test_matching_tcp_segments_are_released_and_ignore_window_ipid():
    h = Harness()
    a = seg(ISN, b"hello", ip_id=1, window=100)
    h.p(a)
    assert h.released == []
    h.s(seg(ISN, b"hello", ip_id=999, window=7))
    assert h.released == [a]
    assert h.requests == []
    assert h.cmp.counters["secondary_frames_dropped"] == 1


def test_tcp_compared_by_byte_range_across_different_splits():
    h = Harness()
    data = bytes(range(256)) * 8
    pvm = [seg(ISN + o, data[o:o + 500]) for o in range(0, 2048, 500)]
    svm = [seg(ISN + o, data[o:o + 300]) for o in range(0, 2048, 300)]
    for f in pvm:
        h.p(f)
    for f in svm[:2]:            # 600 bytes: covers the first PVM segment only
        h.s(f)
    assert h.released == pvm[:1]
    for f in svm[2:]:
        h.s(f)
    assert h.released == pvm
    assert h.requests == []


def test_one_svm_segment_may_cover_several_pvm_segments():
    h = Harness()
    h.s(seg(ISN, b"abcdefgh"))
    h.p(seg(ISN, b"abc"))
    h.p(seg(ISN + 3, b"defgh"))
    assert len(h.released) == 2 and h.requests == []


def test_tcp_payload_difference_requests_one_checkpoint_and_commit_releases():
    h = Harness()
    h.p(seg(ISN, b"aaaa"))
    h.s(seg(ISN, b"aaab"))
    assert h.released == []
    assert h.requests and h.requests[0][0] == "net_divergence"
    assert "relative seq" in h.requests[0][1]
    # more divergent traffic in the same epoch: still one request
    h.p(udp(b"x"))
    h.s(udp(b"y"))
    h.p(seg(ISN + 4, b"zz"))
    assert len(h.requests) == 1
    assert h.cmp.counters["requests_coalesced"] >= 1
    h.cmp.on_snapshot(0)
    h.cmp.on_committed(0)
    assert len(h.released) == 3
    assert h.cmp.held_frames() == 0


def test_frames_after_snapshot_stay_held_until_matched_by_restored_svm():
    h = Harness()
    h.p(seg(ISN, b"aaaa"))
    h.s(seg(ISN, b"bbbb"))
    assert len(h.requests) == 1
    h.cmp.on_snapshot(0)
    later = seg(ISN + 4, b"cccc")
    h.p(later)                   # epoch 1
    h.cmp.on_committed(0)
    assert len(h.released) == 1  # only the epoch-0 frame
    h.s(seg(ISN + 4, b"cccc"))   # the restored SVM produces the same bytes
    assert h.released[-1] == later
    # a new divergence in epoch 1 may request again
    h.p(seg(ISN + 8, b"dd"))
    h.s(seg(ISN + 8, b"ee"))
    assert len(h.requests) == 2


def test_syn_fin_rst_must_agree():
    h = Harness()
    synack = build.tcp_frame(G, C, 80, 5555, ISN - 1, 1, TCP_SYN | TCP_ACK)
    h.p(synack)
    assert h.released == []
    # SVM's SYN-ACK with another ISN still matches: SYNs sit at relative 0
    h.s(build.tcp_frame(G, C, 80, 5555, 77777, 1, TCP_SYN | TCP_ACK))
    assert h.released == [synack]
    fin = seg(ISN, b"bye", flags=TCP_ACK | TCP_FIN)
    h.p(fin)
    h.s(seg(ISN, b"bye", flags=TCP_ACK | TCP_PSH))
    assert h.released == [synack] and not h.requests   # bytes match, FIN not seen yet
    h.s(seg(ISN + 3, flags=TCP_ACK | TCP_FIN))
    assert h.released == [synack, fin]
    h2 = Harness()
    h2.p(seg(ISN, b"x", flags=TCP_ACK | TCP_RST))
    h2.s(seg(ISN, b"x"))
    h2.s(seg(ISN + 1, b"more"))
    assert h2.released == []
    h2.s(seg(ISN + 5, flags=TCP_RST))
    assert len(h2.released) == 1


def test_svm_closing_early_is_a_divergence():
    h = Harness()
    h.s(seg(ISN, b"ab", flags=TCP_ACK | TCP_FIN))
    h.p(seg(ISN, b"abcd"))
    assert h.requests[0][0] == "net_divergence"


def test_pure_acks_pass_without_comparison():
    h = Harness()
    ack = seg(ISN, flags=TCP_ACK)
    h.p(ack)
    assert h.released == [ack]


def test_out_of_order_svm_segments_are_reassembled():
    h = Harness()
    h.p(seg(ISN, b"0123456789"))
    h.s(seg(ISN + 5, b"56789"))
    assert h.released == []
    h.s(seg(ISN, b"01234"))
    assert len(h.released) == 1 and not h.requests


def test_retransmitted_pvm_segment_below_verified_is_released():
    h = Harness()
    a = seg(ISN, b"abc")
    h.p(a)
    h.s(seg(ISN, b"abc"))
    h.p(a)
    assert h.released == [a, a]


def test_sequence_wraparound():
    h = Harness()
    start = 0xFFFFFFFF - 2
    h.p(seg(start, b"abcdef"))
    h.p(seg(start + 6, b"gh"))
    h.s(seg(start, b"abcdefgh"))
    assert len(h.released) == 2 and not h.requests


def test_udp_and_icmp_compared_on_payload_not_ip_id():
    h = Harness()
    a = udp(b"query", ip_id=5)
    h.p(a)
    h.s(udp(b"query", ip_id=6))
    assert h.released == [a]
    e = build.icmp_echo_frame(G, C, 7, 1, b"ping", ip_id=1)
    h.p(e)
    h.s(build.icmp_echo_frame(G, C, 7, 1, b"ping", ip_id=2))
    assert h.released == [a, e]
    h.p(udp(b"one"))
    h.s(udp(b"two"))
    assert len(h.requests) == 1 and h.released == [a, e]


def test_udp_matches_any_queued_svm_frame_like_qemu():
    h = Harness()
    h.s(udp(b"B"))
    h.s(udp(b"A"))
    h.p(udp(b"A"))
    h.p(udp(b"B"))
    assert len(h.released) == 2 and not h.requests


def test_other_protocols_compare_the_whole_frame():
    h = Harness()
    arp = build.ethernet(bytes(28), 0x0806)
    h.p(arp)
    h.s(arp)
    assert h.released == [arp]
    gre = build.ethernet(build.ipv4(G, C, 47, b"payload", ip_id=1), 0x0800)
    h.p(gre)
    h.s(build.ethernet(build.ipv4(G, C, 47, b"payload", ip_id=2), 0x0800))
    assert h.released == [arp] and len(h.requests) == 1


def test_ipv6_udp_and_vlan_tags_are_part_of_the_key():
    h = Harness()
    f6 = build.udp6_frame("fd00::2", "fd00::1", 53, 999, b"v6")
    h.p(f6)
    h.s(f6)
    assert h.released == [f6]
    v10 = build.udp_frame(G, C, 53, 4444, b"tagged", vlan=10)
    h.p(v10)
    h.s(build.udp_frame(G, C, 53, 4444, b"tagged", vlan=20))
    assert h.released == [f6]             # different VLAN: different connection
    h.s(v10)
    assert h.released == [f6, v10]


def test_ipv4_fragments_are_reassembled_before_comparison():
    payload = bytes(range(200)) * 10          # 2000 bytes of UDP payload
    whole = udp(payload)
    ip = whole[14:]
    body = ip[20:]                           # UDP header + payload

    def fragments(split, ip_id):
        out, off = [], 0
        for size in split:
            more = off + size < len(body)
            frag = (off // 8) | (0x2000 if more else 0)
            out.append(build.ethernet(build.ipv4(G, C, 17, body[off:off + size], ip_id=ip_id,
                                                 frag=frag), 0x0800))
            off += size
        return out

    h = Harness()
    pvm = fragments([1480, len(body) - 1480], ip_id=11)
    svm = fragments([800, 800, len(body) - 1600], ip_id=22)
    for f in pvm:
        h.p(f)
    for f in reversed(svm):
        h.s(f)
    assert h.released == pvm and not h.requests
    h.p(fragments([1480, len(body) - 1480], 12)[0])
    assert h.released == pvm and h.cmp.counters["fragments_held"] >= 1


def test_unmatched_pvm_frame_times_out_once_per_epoch():
    h = Harness(compare_timeout_ms=100)
    h.p(seg(ISN, b"late"))
    h.now = 0.05
    h.cmp.check_timeouts()
    assert h.requests == []
    h.now = 0.2
    h.cmp.check_timeouts()
    h.now = 0.3
    h.cmp.check_timeouts()
    assert [c for c, _ in h.requests] == ["net_timeout"]
    assert h.cmp.counters["timeouts"] == 1
    h.cmp.flush()
    assert len(h.released) == 1


def test_unmatched_svm_output_also_times_out():
    h = Harness(compare_timeout_ms=100)
    h.s(udp(b"only the svm said this"))
    h.now = 1.0
    h.cmp.check_timeouts()
    assert [c for c, _ in h.requests] == ["net_timeout"]


def test_connection_table_is_bounded_and_evicts_idle_first():
    h = Harness(max_connections=2)
    h.p(seg(ISN, b"a", sport=1))
    h.s(seg(ISN, b"a", sport=1))       # TCP connection 1 now idle (kept for its seq state)
    h.p(udp(b"b", sport=2))            # connection 2 holds a frame
    h.p(udp(b"c", sport=3))            # evicts 1
    assert h.cmp.counters["connections_evicted"] == 1
    d = udp(b"d", sport=4)
    h.p(d)                             # 2 and 3 both hold frames: table full
    assert h.cmp.counters["table_full"] == 1
    assert h.cmp.counters["primary_frames_dropped"] == 0
    assert h.cmp.blocked and h.cmp.stalled_frames() == 1
    assert len(h.cmp.connections) == 2
    assert h.requests == [("net_queue_full", "table_full on primary side")]
    h.cmp.on_snapshot(0)
    h.cmp.on_committed(0)
    assert not h.cmp.blocked
    assert h.released[-3:] == [udp(b"b", sport=2), udp(b"c", sport=3), d]


def test_queue_bound_holds_the_pvm_back_instead_of_dropping():
    h = Harness(max_queue_frames=3)
    frames = [udp(bytes([i])) for i in range(5)]
    for f in frames:
        h.p(f)
    assert h.cmp.counters["queue_full"] == 1
    assert h.cmp.counters["primary_frames_dropped"] == 0
    assert h.cmp.held_frames() == 3 and h.cmp.stalled_frames() == 2
    assert h.cmp.blocked and h.cmp.counters["held_frames_peak"] == 3
    assert h.requests == [("net_queue_full", "queue_full on primary side")]
    h.now = 0.25
    h.cmp.on_snapshot(0)               # waits behind the kept frames
    h.cmp.on_committed(0)
    assert h.released == frames
    assert not h.cmp.blocked and h.cmp.held_frames() == 0
    assert h.cmp.counters["backpressure_ns"] == 250_000_000
    assert h.cmp.counters["backpressures"] == 1


def _proto_frames(proto: str, n: int, side: str) -> list[bytes]:
    """``n`` PVM (or SVM) frames of one flow; the SVM's copies differ where they may."""
    ip_id = 1 if side == "pvm" else 2
    out = []
    for i in range(n):
        body = i.to_bytes(4, "big") * 10
        if proto == "tcp":
            out.append(seg(ISN + 40 * i, body, ip_id=ip_id + i))
        elif proto == "udp":
            out.append(udp(body, ip_id=ip_id + i))
        elif proto == "icmp":
            out.append(build.icmp_echo_frame(G, C, 7, i, body, ip_id=ip_id + i))
        else:   # GRE: an IP protocol the comparator compares whole
            out.append(build.ethernet(build.ipv4(G, C, 47, body, ip_id=5), 0x0800))
    return out


class Peer:
    """Stands in for the coordinator and both guests: the guests emit their frames in
    bursts, the PVM's sender stops while the comparator is blocked, every checkpoint
    request is answered by a checkpoint, and a restored SVM goes on from the PVM's state."""

    def __init__(self, h: Harness, pvm: list[bytes], svm: list[bytes]) -> None:
        self.h, self.pvm, self.svm = h, pvm, svm
        self.i = self.j = 0          # next PVM / SVM frame to emit
        self.answered = 0

    def checkpoint(self) -> None:
        cmp = self.h.cmp
        epoch = cmp.epoch
        cmp.on_snapshot(epoch)       # the PVM had emitted frames [0, i): the SVM restarts at i
        self.j = max(self.j, self.i)
        cmp.on_committed(epoch)
        self.answered += 1

    def run(self, pvm_burst: int, svm_burst: int) -> None:
        h = self.h
        while self.i < len(self.pvm) or self.j < len(self.svm) or \
                h.cmp.held_frames() or h.cmp.stalled_frames():
            if len(h.requests) > self.answered:
                self.checkpoint()
                continue
            progressed = False
            for _ in range(pvm_burst):
                if h.cmp.blocked or self.i == len(self.pvm):
                    break
                h.p(self.pvm[self.i])
                self.i += 1
                progressed = True
            for _ in range(svm_burst):
                if self.j == len(self.svm):
                    break
                h.s(self.svm[self.j])
                self.j += 1
                progressed = True
            if not progressed:
                h.cmp.check_timeouts(h.now + 3600)   # nothing left to come: ask by timeout
                if len(h.requests) == self.answered:
                    self.checkpoint()


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp", "other"])
@pytest.mark.parametrize("pvm_burst, svm_burst", [(200, 1), (1, 200), (50, 50)])
def test_bursts_far_beyond_the_bounds_lose_no_pvm_frame(proto, pvm_burst, svm_burst):
    """Bursts 25x the queue bound on each side: every PVM frame out once, in order; no SVM
    frame ever out."""
    bound = 8
    h = Harness(max_queue_frames=bound, compare_timeout_ms=1000)
    pvm, svm = _proto_frames(proto, 200, "pvm"), _proto_frames(proto, 200, "svm")
    Peer(h, pvm, svm).run(pvm_burst, svm_burst)
    assert h.released == pvm
    if proto != "other":             # GRE frames of the SVM are byte-equal to the PVM's
        assert not set(h.released) & set(svm)
    c = h.cmp.counters
    assert c["frames_released"] == len(pvm) and c["primary_frames_dropped"] == 0
    assert c["held_frames_peak"] <= bound
    if pvm_burst > bound:
        assert c["backpressures"] >= 1 and c["primary_frames_stalled"] > 0
    if svm_burst > bound:
        assert c["secondary_overflow_frames"] > 0
    assert h.cmp.held_frames() == 0 and not h.cmp.blocked


@pytest.mark.parametrize("frame, reason", [
    (b"", "shorter than an Ethernet header"),
    (b"\x00" * 13, "shorter than an Ethernet header"),
    (build.ethernet(b"\x45" + bytes(10), 0x0800), "IPv4 header truncated"),
    (build.ethernet(b"\x65" + bytes(19), 0x0800), "IP version 6"),
    (build.ethernet(bytes.fromhex("4500ffff") + bytes(16), 0x0800), "total length 65535"),
    (build.ethernet(build.ipv4(G, C, 6, bytes(10)), 0x0800), "TCP header truncated"),
    (build.ethernet(build.ipv4(G, C, 17, bytes.fromhex("00010002ffff0000")), 0x0800),
     "UDP length 65535"),
    (build.ethernet(b"garbage", 0x86DD), "IPv6 header truncated"),
    (build.ethernet(b"\x81\x00", 0x8100), "VLAN tag truncated"),
])
def test_malformed_frames_are_counted_dropped_and_named(frame, reason, caplog):
    h = Harness()
    h.p(frame)
    h.s(frame)
    assert h.cmp.counters["malformed_frames"] == 2
    assert h.released == [] and h.requests == []
    assert reason in caplog.text
    good = udp(b"still running")
    h.p(good)
    h.s(good)
    assert h.released == [good]


def test_passthrough_releases_everything_held():
    h = Harness()
    a = seg(ISN, b"held")
    h.p(a)
    h.cmp.set_passthrough(True)
    b = udp(b"direct")
    h.p(b)
    assert h.released == [a, b]


def test_closed_connections_are_forgotten():
    h = Harness()
    h.p(seg(ISN, b"x", flags=TCP_ACK | TCP_FIN))
    h.s(seg(ISN, b"x", flags=TCP_ACK | TCP_FIN))
    assert len(h.released) == 1
    assert h.cmp.connections == {} or h.cmp.counters["connections_closed"] == 1


def test_idle_datagram_flows_are_forgotten_at_once():
    h = Harness()
    for i in range(100):
        h.p(udp(b"x", sport=1000 + i))
        h.s(udp(b"x", sport=1000 + i))
    assert len(h.released) == 100 and len(h.cmp.connections) == 0


def test_parse_keys_ignore_ip_id():
    a = parse_frame(seg(ISN, b"x", ip_id=1))
    b = parse_frame(seg(ISN, b"x", ip_id=2))
    assert a.key == b.key and a.payload == b"x"


def test_ipv6_tcp_compared_by_byte_range():
    import socket
    import struct

    def tcp6(seq, payload):
        s6, d6 = (socket.inet_pton(socket.AF_INET6, a) for a in ("fd00::2", "fd00::1"))
        seg = bytearray(build.tcp_segment(G, C, 80, 5555, seq, 1, TCP_ACK | TCP_PSH, payload))
        hdr = struct.pack("!IHBB16s16s", 6 << 28, len(seg), 6, 64, s6, d6)
        return build.ethernet(hdr + bytes(seg), 0x86DD)

    h = Harness()
    h.p(tcp6(ISN, b"abcdef"))
    h.s(tcp6(ISN, b"abc"))
    assert h.released == []
    h.s(tcp6(ISN + 3, b"def"))
    assert len(h.released) == 1 and not h.requests
    h.p(tcp6(ISN + 6, b"x"))
    h.s(tcp6(ISN + 6, b"y"))
    assert h.requests[0][0] == "net_divergence"


def test_vlan_tagged_tcp():
    h = Harness()
    a = build.tcp_frame(G, C, 80, 5555, ISN, 1, TCP_ACK, b"tagged", vlan=7)
    h.p(a)
    h.s(build.tcp_frame(G, C, 80, 5555, ISN, 1, TCP_ACK, b"tagged", vlan=8))
    assert h.released == []
    h.s(build.tcp_frame(G, C, 80, 5555, ISN, 1, TCP_ACK, b"tagged", vlan=7))
    assert h.released == [a]


def test_out_of_order_pvm_segments_wait_for_their_bytes():
    h = Harness()
    late, early = seg(ISN + 3, b"def"), seg(ISN, b"abc")
    h.p(late)                       # the PVM retransmits / reorders
    h.p(early)
    h.s(seg(ISN, b"abcdef"))
    assert sorted(h.released) == sorted([late, early]) and not h.requests


def test_exact_and_split_svm_segments_mix():
    h = Harness()
    pvm = [seg(ISN + o, bytes([65 + o]) * 3) for o in range(0, 30, 3)]
    for f in pvm:
        h.p(f)
    h.s(seg(ISN, b"AAA"))                      # exactly the PVM's first segment
    h.s(seg(ISN + 3, b"DD"))                   # then split differently
    h.s(seg(ISN + 5, b"DGGG"))
    h.s(seg(ISN + 9, b"JJJ"))                  # exact again
    assert h.released == pvm[:4]
    h.s(seg(ISN + 15, b"PPPSSS"))              # a gap: [12, 15) comes later
    assert h.released == pvm[:4]
    h.s(seg(ISN + 12, b"MMM"))
    h.s(seg(ISN + 21, b"VVVYYY\\\\\\___"))
    assert h.released == pvm and not h.requests


# ------------------------------------------------------------------ streams
def _stream_case(seed: int, n: int = 400) -> tuple[list, list]:
    """PVM and SVM items for one run: frames of many kinds, mostly pairs the per-frame path
    matches (some equal outside the masked fields, some differing in fields it ignores),
    a few the SVM splits or leaves out, epoch boundaries in both streams."""
    import random

    from pipeline.net.framing import BOUNDARY_COMMITTED, BOUNDARY_SNAPSHOT, Boundary
    rng = random.Random(seed)
    pvm, svm = [], []
    seq = {sport: ISN for sport in range(80, 84)}
    epoch = 0
    for i in range(n):
        kind = rng.choice(["tcp", "tcp", "tcp", "udp", "udp", "icmp", "gre", "arp", "split",
                           "ttl", "ack"])
        body = rng.randbytes(rng.randint(1, 300))
        if kind in ("tcp", "split", "ttl", "ack"):
            sport = rng.choice(list(seq))
            p = seg(seq[sport], body, sport=sport, ip_id=i, window=100)
            if kind == "split":
                cut = len(body) // 2
                s = [seg(seq[sport], body[:cut], sport=sport, ip_id=7),
                     seg(seq[sport] + cut, body[cut:], sport=sport, ip_id=8)]
            elif kind == "ttl":      # the IPv4 TTL is not masked: the per-frame path decides
                f = bytearray(seg(seq[sport], body, sport=sport, ip_id=9))
                f[22] = 17
                s = [bytes(f)]
            elif kind == "ack":      # a pure ACK only the PVM sends
                pvm.append(seg(seq[sport], flags=TCP_ACK, sport=sport))
                s = [seg(seq[sport], body, sport=sport, ip_id=i + 1, window=5)]
            else:
                s = [seg(seq[sport], body, sport=sport, ip_id=i + 1, window=5)]
            seq[sport] += len(body)
        elif kind == "udp":
            p = udp(body, sport=1000 + i % 7, ip_id=i)
            s = [udp(body, sport=1000 + i % 7, ip_id=i * 3)]
        elif kind == "icmp":
            p = build.icmp_echo_frame(G, C, 5, i, body, ip_id=i)
            s = [build.icmp_echo_frame(G, C, 5, i, body, ip_id=i + 9)]
        elif kind == "gre":
            p = build.ethernet(build.ipv4(G, C, 47, body, ip_id=3), 0x0800)
            s = [p]
        else:
            p = build.ethernet(bytes(28) + body[:4], 0x0806)
            s = [p]
        pvm.append(p)
        svm += s
        if rng.random() < 0.03:
            # a checkpoint: the PVM's snapshot boundary, then the SVM's commit one
            pvm.append(Boundary(BOUNDARY_SNAPSHOT, epoch))
            svm.append(Boundary(BOUNDARY_COMMITTED, epoch))
            epoch += 1
    return pvm, svm


def _encode(items) -> bytes:
    from pipeline.net.framing import Boundary, encode_boundary, encode_frame
    return b"".join(encode_boundary(i.kind, i.epoch, i.aborted) if isinstance(i, Boundary)
                    else encode_frame(i) for i in items)


def _per_frame(pvm, svm) -> Harness:
    from pipeline.net.comparator import PRIMARY, SECONDARY
    from pipeline.net.framing import Boundary
    h = Harness(max_queue_frames=100000, compare_timeout_ms=10 ** 9)
    for side, items in ((PRIMARY, pvm), (SECONDARY, svm)):
        for item in items:
            if isinstance(item, Boundary):
                h.cmp.on_boundary(side, item)
            elif side == PRIMARY:
                h.p(item)
            else:
                h.s(item)
    return h


def _push_cut_anywhere(h, rng, streams) -> None:
    from pipeline.net.comparator import PRIMARY, SECONDARY
    pos = {PRIMARY: 0, SECONDARY: 0}
    while pos[PRIMARY] < len(streams[PRIMARY]) or pos[SECONDARY] < len(streams[SECONDARY]):
        # mostly the side that is behind (as two live guests), now and then the other
        behind = min((PRIMARY, SECONDARY), key=lambda s: pos[s] / len(streams[s]))
        side = behind if rng.random() < 0.8 else 1 - behind
        cut = rng.choice([1, 5, 60, 700, 5000, 40000])
        data = streams[side][pos[side]:pos[side] + cut]
        pos[side] += len(data)
        if data:
            h.cmp.push_stream(side, data)


def _push_item_by_item(h, rng, items) -> None:
    """One whole item per read (a comparator that keeps up with two live guests): through
    push_stream one side at a time, or push_pair with the next item of each side (either
    may be missing), as the loop does."""
    from pipeline.net.comparator import PRIMARY, SECONDARY
    pos = {PRIMARY: 0, SECONDARY: 0}
    left = lambda side: pos[side] < len(items[side])   # noqa: E731

    def take(side) -> bytes:
        if not left(side):
            return b""
        pos[side] += 1
        return _encode(items[side][pos[side] - 1:pos[side]])
    while left(PRIMARY) or left(SECONDARY):
        roll = rng.random()
        if roll < 0.5:
            h.cmp.push_pair(take(PRIMARY), 0, take(SECONDARY), 0)
        elif roll < 0.7:
            h.cmp.push_pair(take(PRIMARY), 0, b"", 0)
        elif roll < 0.9:
            h.cmp.push_pair(b"", 0, take(SECONDARY), 0)
        else:
            side = rng.choice((PRIMARY, SECONDARY))
            if data := take(side):
                h.cmp.push_stream(side, data)


@pytest.mark.parametrize("cut", ["anywhere", "items"])
@pytest.mark.parametrize("seed", range(12))
def test_streams_compared_in_runs_release_what_frame_by_frame_does(seed, cut):
    """The same items as framed byte streams, cut anywhere and interleaved (or one whole
    item per read, a pair of them at a time: the one-pair shortcut): the same PVM frames
    come out (per flow in order, each once) with the same checkpoint requests as frame by
    frame; no SVM frame comes out; runs of equal frames were used."""
    import random

    from pipeline.net.comparator import PRIMARY, SECONDARY
    from pipeline.net.framing import FrameDecoder
    pvm, svm = _stream_case(seed)
    ref = _per_frame(pvm, svm)
    rng = random.Random(seed)
    h = Harness(max_queue_frames=100000, compare_timeout_ms=10 ** 9)
    # runs released in one piece go into the same list, in release order
    h.cmp._release_block_cb = lambda b: h.released.extend(f for f, _ in FrameDecoder().feed(b))
    if cut == "anywhere":
        _push_cut_anywhere(h, rng, {PRIMARY: _encode(pvm), SECONDARY: _encode(svm)})
    else:
        _push_item_by_item(h, rng, {PRIMARY: pvm, SECONDARY: svm})
    h.cmp.settle()
    released = h.released
    assert sorted(released) == sorted(ref.released)
    frames = [f for f in pvm if isinstance(f, bytes)]
    assert sorted(released) == sorted(frames)  # every PVM frame once (commits cover the rest)

    def flows(seq):
        """Per flow, in release order (pure ACKs go out at once, wherever they are)."""
        out = {}
        for f in seq:
            if not (len(f) == 54 and f[23] == 6 and f[47] == TCP_ACK):
                out.setdefault(f[26:38], []).append(f)
        return out
    assert flows(released) == flows(ref.released)
    assert h.requests == ref.requests
    assert not set(released) & (set(f for f in svm if isinstance(f, bytes)) - set(frames))
    assert h.cmp.counters["run_matched_frames"] > 0
    assert h.cmp.stream_frames() == 0


def test_stream_with_an_oversized_frame_counts_it_and_keeps_comparing():
    from pipeline.net.comparator import PRIMARY, SECONDARY
    from pipeline.net.framing import encode_frame
    h = Harness()
    good = [udp(b"%d" % i, ip_id=i) for i in range(40)]
    bad = struct.pack("!I", 70000) + bytes(70000)
    h.cmp.push_stream(PRIMARY, _encode(good[:20]) + bad[:1000])
    h.cmp.push_stream(PRIMARY, bad[1000:] + _encode(good[20:]))
    h.cmp.push_stream(SECONDARY, b"".join(encode_frame(udp(b"%d" % i, ip_id=99))
                                          for i in range(40)))
    h.cmp.settle()
    assert h.cmp.counters["malformed_frames"] == 1
    assert h.cmp.counters["frames_released"] == 40 and h.requests == []


def test_a_stream_the_other_side_never_quite_catches_up_with_does_not_time_out():
    """The PVM's stream one frame ahead of the SVM's for longer than the compare timeout
    (the PVM answers first: it gets each input first), so the PVM's stream is never empty:
    every frame waits 1 ms, none times out, and the added latency counts from each frame's
    own arrival. (Counted from the oldest item since the stream was last empty, every frame
    looked as old as the first: a spurious net_timeout after compare_timeout_ms.)"""
    from pipeline.net.comparator import PRIMARY, SECONDARY, RELEASE_DELAY_COUNTERS
    from pipeline.net.framing import encode_frame
    h = Harness(compare_timeout_ms=1000)
    n = 3000
    pvm = [udp(b"answer %d" % i, sport=1000 + i % 50, ip_id=i) for i in range(n)]
    svm = [udp(b"answer %d" % i, sport=1000 + i % 50, ip_id=7 * i) for i in range(n)]
    h.cmp.push_stream(PRIMARY, encode_frame(pvm[0]))
    for i in range(1, n):
        h.now += 0.001
        h.cmp.push_stream(PRIMARY, encode_frame(pvm[i]))
        h.cmp.push_stream(SECONDARY, encode_frame(svm[i - 1]))
        h.cmp.check_timeouts()
    assert h.requests == []
    assert h.released == pvm[:-1]
    assert h.cmp.counters["run_matched_frames"] == n - 1
    waited = dict(zip(RELEASE_DELAY_COUNTERS, (h.cmp.counters[c] for c in
                                               RELEASE_DELAY_COUNTERS)))
    assert sum(waited[f"released_after_le_{b}ms"] for b in ("0.1", "0.3", "1", "3")) == n - 1


@pytest.mark.parametrize("how", ["pair", "pvm_first", "svm_first"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_one_frame_from_each_side_goes_out_only_when_equal_outside_the_masks(proto, how):
    """The one-pair shortcut (a frame read from each side while nothing is held: push_pair,
    or one side's frame meeting the other's single waiting one): a pair that differs only in
    IPv4 id/checksum (and TCP window) goes out at once; one that differs in a byte the
    shortcut keeps but the per-frame path ignores (the TTL) goes out too, through that path;
    one that differs in a payload byte, same length, is not released and asks for a
    checkpoint, whose commit releases it."""
    from pipeline.net.comparator import PRIMARY, SECONDARY
    from pipeline.net.framing import FrameDecoder, encode_frame

    def frame(i, ip_id, window=100, payload=None):
        body = payload or b"answer %04d" % i
        return seg(ISN + 11 * i, body, ip_id=ip_id, window=window) if proto == "tcp" \
            else udp(body, sport=1000 + i, ip_id=ip_id)

    def push(p, s):
        if how == "pair":
            h.cmp.push_pair(encode_frame(p), 0, encode_frame(s), 0)
        else:
            first, second = ((PRIMARY, p), (SECONDARY, s)) if how == "pvm_first" \
                else ((SECONDARY, s), (PRIMARY, p))
            h.cmp.push_stream(first[0], encode_frame(first[1]))
            h.cmp.push_stream(second[0], encode_frame(second[1]))
    h = Harness()
    h.cmp._release_block_cb = lambda b: h.released.extend(f for f, _ in FrameDecoder().feed(b))
    equal = [(frame(i, ip_id=i), frame(i, ip_id=7 * i + 1, window=9)) for i in range(3)]
    for p, s in equal:
        push(p, s)
    assert h.released == [p for p, _ in equal] and not h.requests
    assert h.cmp.counters["run_matched_frames"] == 3
    ttl = bytearray(frame(3, ip_id=50))
    ttl[22] = 17
    push(frame(3, ip_id=3), bytes(ttl))
    out = [p for p, _ in equal] + [frame(3, ip_id=3)]
    assert h.released == out and not h.requests
    assert h.cmp.counters["run_matched_frames"] == 3
    differs = frame(4, ip_id=1, payload=b"answer 0004"), frame(4, ip_id=2, payload=b"answer 0005")
    push(*differs)
    assert h.released == out and [c for c, _ in h.requests] == ["net_divergence"]
    h.cmp.on_snapshot(0)
    h.cmp.on_committed(0)
    assert h.released == out + [differs[0]]
    assert h.cmp.counters["frames_released"] == 5
