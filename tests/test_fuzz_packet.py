"""Fuzzing the frame parsers (pipeline/net/packet.py, fragments.py) for answers.

The parsers have no encoder, so the properties are the strongest honest ones instead:

* arbitrary frames (raw bytes, and frames grown from random Ethernet / VLAN / IPv4 / IPv6 /
  extension / TCP / UDP / ICMP / ARP headers with every length right or wrong) are either
  refused with MalformedFrame naming the header and field, or parsed to exactly what
  :func:`reference_parse` (written here from the RFCs, slowly, one field at a time) reads
  from the same bytes: key, kind, compared bytes, TCP fields and payload, fragment fields
  and offsets;
* the fast path (untagged IPv4 without options) and the general path agree: the same frame
  behind a vnet header parses to the same packet;
* the repo's builders (pipeline/net/build.py) round-trip: parse(build(x)) has x's fields;
* fragments: any split of a datagram into fragments, in any order and with duplicates,
  reassembles to the packet the unfragmented datagram parses to; arbitrary fragments are
  refused with MalformedFrame or held, never anything else;
* the comparator counts every refused frame (``malformed_frames``) and drops it.
"""
from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.net import build
from pipeline.net.comparator import Comparator
from pipeline.net.fragments import MAX_DATAGRAM, Reassembler
from pipeline.net.packet import KIND_DATAGRAM, KIND_OTHER, KIND_TCP, MalformedFrame, parse_frame
from pipeline.net.settings import NetSettings

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 2**32 - 1)
IPV4 = st.binary(min_size=4, max_size=4)
IPV6 = st.binary(min_size=16, max_size=16)
#: what a refusal must name: the header it is about
HEADER_WORDS = ("vnet", "Ethernet", "VLAN", "ARP", "IPv4", "IPv6", "TCP", "UDP", "ICMP")


# -- the reference: RFC 791/8200/793/768/792/826 fields, read one at a time ---------------------
class Refused(Exception):
    pass


def u16(b: bytes, at: int) -> int:
    return b[at] << 8 | b[at + 1]


def reference_parse(frame: bytes, vnet: int = 0) -> dict:
    """What a frame holds, as the comparator is documented to key and compare it."""
    n = len(frame)
    if not 0 <= vnet <= n or n - vnet < 14:
        raise Refused
    ethertype, at, vlans = u16(frame, vnet + 12), vnet + 14, ()
    while ethertype in (0x8100, 0x88A8, 0x9100):
        if n - at < 4:
            raise Refused
        vlans += (u16(frame, at) & 0x0FFF,)
        ethertype, at = u16(frame, at + 2), at + 4
    src_mac, dst_mac = frame[vnet + 6:vnet + 12], frame[vnet:vnet + 6]
    if ethertype == 0x0800:
        if n - at < 20 or frame[at] >> 4 != 4:
            raise Refused
        ihl, total = (frame[at] & 0x0F) * 4, u16(frame, at + 2)
        if ihl < 20 or total < ihl or at + total > n:
            raise Refused
        proto, src, dst = frame[at + 9], frame[at + 12:at + 16], frame[at + 16:at + 20]
        l4, end = at + ihl, at + total
        more, offset = bool(u16(frame, at + 6) & 0x2000), (u16(frame, at + 6) & 0x1FFF) * 8
        if more or offset:
            return dict(key=(vlans, 4, proto, src, dst, 0, 0), kind=KIND_OTHER,
                        compare=frame[l4:end], l3=at, l4=l4,
                        frag=((vlans, src, dst, proto, u16(frame, at + 4)), offset, more))
        return _l4(frame, vnet, vlans, 4, proto, src, dst, at, l4, end)
    if ethertype == 0x86DD:
        if n - at < 40 or frame[at] >> 4 != 6:
            raise Refused
        end = at + 40 + u16(frame, at + 4)
        if end > n:
            raise Refused
        nxt, src, dst, l4 = frame[at + 6], frame[at + 8:at + 24], frame[at + 24:at + 40], at + 40
        while nxt in (0, 43, 60):          # hop-by-hop, routing, destination options
            if end - l4 < 8 or l4 + (frame[l4 + 1] + 1) * 8 > end:
                raise Refused
            nxt, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        if nxt == 44:                      # a fragment: compared whole
            return dict(key=(vlans, 6, 44, src, dst, 0, 0), kind=KIND_OTHER,
                        compare=frame[vnet:], l3=at, l4=l4, frag=None)
        return _l4(frame, vnet, vlans, 6, nxt, src, dst, at, l4, end)
    if ethertype == 0x0806 and n - at < 28:
        raise Refused
    return dict(key=(vlans, "l2", ethertype, src_mac, dst_mac), kind=KIND_OTHER,
                compare=frame[vnet:], l3=at, l4=0, frag=None)


def _l4(frame, vnet, vlans, ipver, proto, src, dst, l3, l4, end) -> dict:
    avail = end - l4
    if proto == 6:
        doff = (frame[l4 + 12] >> 4) * 4 if avail >= 20 else 0
        if avail < 20 or not 20 <= doff <= avail:
            raise Refused
        return dict(key=(vlans, ipver, 6, src, dst, u16(frame, l4), u16(frame, l4 + 2)),
                    kind=KIND_TCP, compare=b"", l3=l3, l4=l4, frag=None,
                    seq=int.from_bytes(frame[l4 + 4:l4 + 8], "big"),
                    ack=int.from_bytes(frame[l4 + 8:l4 + 12], "big"), flags=frame[l4 + 13],
                    payload=frame[l4 + doff:end])
    if proto == 17:
        if avail < 8 or not 8 <= u16(frame, l4 + 4) <= avail:
            raise Refused
        # the whole datagram and what follows it, as QEMU's colo-compare compares UDP
        return dict(key=(vlans, ipver, 17, src, dst, u16(frame, l4), u16(frame, l4 + 2)),
                    kind=KIND_DATAGRAM, compare=frame[l4:], l3=l3, l4=l4, frag=None)
    if proto in (1, 58):
        if avail < 4:
            raise Refused
        return dict(key=(vlans, ipver, proto, src, dst, 0, 0), kind=KIND_DATAGRAM,
                    compare=frame[l4:], l3=l3, l4=l4, frag=None)
    return dict(key=(vlans, ipver, proto, src, dst, 0, 0), kind=KIND_OTHER,
                compare=frame[vnet:], l3=l3, l4=l4, frag=None)


def check_frame(frame: bytes, vnet: int = 0):
    """parse_frame agrees with the reference: same refusal, or the same fields."""
    try:
        want = reference_parse(frame, vnet)
    except Refused:
        want = None
    try:
        got = parse_frame(frame, vnet)
    except MalformedFrame as exc:
        assert any(w in str(exc) for w in HEADER_WORDS), f"names no header: {exc}"
        assert want is None, f"refused ({exc}) but the reference reads {want}"
        return None
    assert want is not None, f"accepted {got} but the reference refuses {frame.hex()}"
    assert (got.frame, got.vnet_hdr_len) == (frame, vnet)
    assert (got.key, got.kind, got.compare, got.l3_offset) == (
        want["key"], want["kind"], want["compare"], want["l3"])
    if want["l4"]:
        assert got.l4_offset == want["l4"]
    if want["kind"] == KIND_TCP:
        assert (got.seq, got.ack, got.flags, got.payload) == (
            want["seq"], want["ack"], want["flags"], want["payload"])
    frag = (got.frag_id, got.frag_offset, got.frag_more) if got.frag_id is not None else None
    assert frag == want["frag"]
    return got


# -- frames grown from random headers ---------------------------------------------------------
def either(draw, right: int, wrong):
    """Mostly the right value of a field, sometimes any."""
    return draw(st.one_of(st.just(right), st.just(right), wrong))


@st.composite
def l4_segments(draw, proto: int) -> bytes:
    payload = draw(st.binary(max_size=40))
    if proto == 6:
        opts = draw(st.binary(max_size=12).map(lambda b: b[:len(b) // 4 * 4]))
        doff = either(draw, (20 + len(opts)) // 4, st.integers(0, 15))
        head = struct.pack("!HHIIBBHHH", draw(U16), draw(U16), draw(U32), draw(U32),
                           doff << 4, draw(st.integers(0, 255)), draw(U16), 0, 0)
        return head + opts + payload
    if proto == 17:
        return struct.pack("!HHHH", draw(U16), draw(U16),
                           either(draw, 8 + len(payload), U16), 0) + payload
    if proto in (1, 58):
        return struct.pack("!BBH", draw(st.integers(0, 255)), 0, 0) + payload
    return payload


@st.composite
def ipv4_packets(draw) -> bytes:
    proto = draw(st.sampled_from([6, 17, 1, 58, 47, 0]))
    body = draw(l4_segments(proto))
    opts = draw(st.binary(max_size=8).map(lambda b: b[:len(b) // 4 * 4]))
    ihl = either(draw, (20 + len(opts)) // 4, st.integers(0, 15))
    version = either(draw, 4, st.integers(0, 15))
    total = either(draw, 20 + len(opts) + len(body), U16)
    frag = draw(st.sampled_from([0, 0x4000, 0x2000, 0x2001, 0x0003, 0x1FFF])
                | st.integers(0, 0xFFFF))
    head = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, total, draw(U16), frag, 64,
                       proto, 0, draw(IPV4), draw(IPV4))
    return head + opts + body


@st.composite
def ipv6_packets(draw) -> bytes:
    proto = draw(st.sampled_from([6, 17, 58, 1, 59]))
    body = draw(l4_segments(proto))
    chain = draw(st.lists(st.sampled_from([0, 43, 60, 44]), max_size=3))
    nxt = proto
    for ext in reversed(chain):   # each extension header: next header, length, data
        units = draw(st.integers(0, 2))
        body = bytes([nxt, either(draw, units, st.integers(0, 255))]) \
            + draw(st.binary(min_size=6 + 8 * units, max_size=6 + 8 * units)) + body
        nxt = ext
    version = either(draw, 6, st.integers(0, 15))
    head = struct.pack("!IHBB16s16s", version << 28, either(draw, len(body), U16), nxt, 64,
                       draw(IPV6), draw(IPV6))
    return head + body


@st.composite
def frames(draw) -> tuple[bytes, int]:
    """(frame, vnet header length): any header stack, then maybe cut or padded."""
    kind = draw(st.sampled_from(["ipv4", "ipv4", "ipv6", "arp", "other"]))
    if kind == "ipv4":
        ethertype, l3 = 0x0800, draw(ipv4_packets())
    elif kind == "ipv6":
        ethertype, l3 = 0x86DD, draw(ipv6_packets())
    elif kind == "arp":
        ethertype, l3 = 0x0806, draw(st.binary(min_size=20, max_size=40))
    else:
        ethertype, l3 = draw(U16), draw(st.binary(max_size=30))
    eth = draw(st.binary(min_size=12, max_size=12))        # destination, source MAC
    tags = draw(st.lists(st.tuples(st.sampled_from([0x8100, 0x88A8, 0x9100]), U16), max_size=2))
    frame = eth + b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in tags) \
        + struct.pack("!H", ethertype)
    frame += l3 + draw(st.binary(max_size=8))          # Ethernet padding / trailer
    if draw(st.integers(0, 4)) == 0:
        frame = frame[:draw(st.integers(0, len(frame)))]
    vnet = draw(st.sampled_from([0, 0, 0, 10, 12]))
    return draw(st.binary(min_size=vnet, max_size=vnet)) + frame, vnet


# -- properties ---------------------------------------------------------------------------
@given(st.binary(max_size=120), st.integers(-2, 20))
def test_arbitrary_bytes_are_refused_or_parsed_as_the_reference_reads_them(data, vnet):
    check_frame(data, vnet)


@given(frames())
def test_header_stacks_are_refused_or_parsed_as_the_reference_reads_them(fv):
    check_frame(*fv)


@given(frames())
def test_fast_and_general_paths_agree(fv):
    """The same frame behind a vnet header takes the general path; same packet, shifted."""
    frame, vnet = fv
    bare = frame[vnet:]
    try:
        fast = parse_frame(bare)
    except MalformedFrame:
        fast = None
    try:
        slow = parse_frame(b"\xaa" * 12 + bare, 12)
    except MalformedFrame:
        slow = None
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert (fast.key, fast.kind, fast.seq, fast.ack, fast.flags, fast.payload) == (
            slow.key, slow.kind, slow.seq, slow.ack, slow.flags, slow.payload)
        assert slow.l3_offset == fast.l3_offset + 12
        # "other" kinds compare the frame from its Ethernet header on, vnet header excluded
        assert fast.compare == slow.compare


addr4 = st.builds(socket.inet_ntoa, IPV4)
addr6 = st.builds(lambda b: socket.inet_ntop(socket.AF_INET6, b), IPV6)
vlan = st.one_of(st.none(), st.integers(0, 4095))


@given(addr4, addr4, U16, U16, U32, U32, st.integers(0, 255), st.binary(max_size=64), U16,
       vlan)
def test_tcp_frames_built_parse_to_their_fields(src, dst, sport, dport, seq, ack, flags,
                                                payload, ip_id, tag):
    frame = build.tcp_frame(src, dst, sport, dport, seq, ack, flags, payload, ip_id, vlan=tag)
    p = check_frame(frame)
    vlans = () if tag is None else (tag,)
    assert p.key == (vlans, 4, 6, socket.inet_aton(src), socket.inet_aton(dst), sport, dport)
    assert (p.kind, p.seq, p.ack, p.flags, p.payload) == (KIND_TCP, seq, ack, flags, payload)
    ip = frame[p.l3_offset:]
    assert build.checksum(ip[:20]) == 0                       # the builder's checksums hold
    assert build.l4_checksum(ip[12:16], ip[16:20], 6, ip[20:]) == 0


@given(addr4, addr4, U16, U16, st.binary(max_size=64), U16, vlan)
def test_udp_frames_built_parse_to_their_fields(src, dst, sport, dport, payload, ip_id, tag):
    frame = build.udp_frame(src, dst, sport, dport, payload, ip_id, vlan=tag)
    p = check_frame(frame)
    vlans = () if tag is None else (tag,)
    assert p.key == (vlans, 4, 17, socket.inet_aton(src), socket.inet_aton(dst), sport, dport)
    assert p.kind == KIND_DATAGRAM and p.compare[8:] == payload


@given(addr6, addr6, U16, U16, st.binary(max_size=64))
def test_udp6_frames_built_parse_to_their_fields(src, dst, sport, dport, payload):
    p = check_frame(build.udp6_frame(src, dst, sport, dport, payload))
    assert p.key == ((), 6, 17, socket.inet_pton(socket.AF_INET6, src),
                     socket.inet_pton(socket.AF_INET6, dst), sport, dport)
    assert p.compare[8:] == payload


@given(addr4, addr4, U16, U16, st.binary(max_size=64), st.booleans())
def test_icmp_frames_built_parse_to_their_fields(src, dst, ident, seq, payload, reply):
    p = check_frame(build.icmp_echo_frame(src, dst, ident, seq, payload, reply))
    assert p.key[1:3] == (4, 1) and p.kind == KIND_DATAGRAM
    assert p.compare[4:] == struct.pack("!HH", ident, seq) + payload


@given(st.binary(min_size=28, max_size=28), vlan)
def test_arp_frames_built_parse_whole(arp, tag):
    frame = build.ethernet(arp, 0x0806, vlan=tag)
    p = check_frame(frame)
    assert p.kind == KIND_OTHER and p.compare == frame and p.key[1:3] == ("l2", 0x0806)
    with pytest.raises(MalformedFrame, match="ARP"):
        parse_frame(build.ethernet(arp[:27], 0x0806, vlan=tag))


# -- fragments ---------------------------------------------------------------------------
G, C = "10.0.0.2", "10.0.0.1"


@st.composite
def fragmented(draw):
    """(the whole datagram's frame, its fragments in arrival order)."""
    proto = draw(st.sampled_from([6, 17, 1]))
    if proto == 6:
        whole = build.tcp_frame(G, C, draw(U16), draw(U16), draw(U32), draw(U32), 0x18,
                                draw(st.binary(max_size=200)))
    elif proto == 17:
        whole = build.udp_frame(G, C, draw(U16), draw(U16), draw(st.binary(max_size=200)))
    else:
        whole = build.icmp_echo_frame(G, C, draw(U16), draw(U16), draw(st.binary(max_size=200)))
    body = whole[14 + 20:]
    ip_id = draw(U16)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, (len(body) - 1) // 8)), max_size=5))))
    bounds = [0] + [8 * c for c in cuts if 8 * c < len(body)] + [len(body)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        more = b < len(body)
        pieces.append(build.ethernet(build.ipv4(G, C, proto, body[a:b], ip_id=ip_id,
                                                frag=(a // 8) | (0x2000 if more else 0)),
                                     0x0800))
    if len(pieces) < 2:     # a datagram in one piece is not a fragment: split the 8 first bytes
        return draw(fragmented())
    order = draw(st.permutations(pieces))
    dups = draw(st.lists(st.sampled_from(pieces), max_size=2))
    return whole, [*dups, *order]


@given(fragmented())
def test_any_fragmentation_reassembles_to_the_whole_datagram(case):
    whole, pieces = case
    r = Reassembler(4)
    results = [r.add(parse_frame(f), 0.0, 0) for f in pieces]
    done = [i for i, x in enumerate(results) if x is not None]
    assert done, "the datagram was never completed"
    packet, frames = results[done[0]]
    want = parse_frame(whole)
    assert (packet.key, packet.kind, packet.seq, packet.ack, packet.payload, packet.frag_id) \
        == (want.key, want.kind, want.seq, want.ack, want.payload, None)
    if want.kind != KIND_TCP:
        assert packet.compare == want.compare
    assert [f for f, _ in frames] == pieces[:done[0] + 1]     # every frame it held, in order


@st.composite
def any_fragments(draw):
    """Fragments of one datagram id with any offsets, sizes, flags and header lengths."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        opts = draw(st.sampled_from([b"", bytes(4), bytes(40)]))
        size = draw(st.sampled_from([0, 1, 7, 8, 16, 100]))
        frag = draw(st.sampled_from([0x2000, 0, 0x1FFF, 0x3FFF, 0x2001, 1]) | U16)
        head = struct.pack("!BBHHHBBH4s4s", 0x40 | (20 + len(opts)) // 4, 0,
                           20 + len(opts) + size, 7, frag, 64, 17, 0,
                           socket.inet_aton(G), socket.inet_aton(C))
        out.append(build.ethernet(head + opts + bytes(size), 0x0800))
    return out


def ip_fragment(offset: int, size: int, more: bool, options: bytes = b"") -> bytes:
    """A UDP fragment of datagram id 7 from G to C (zero bytes of data)."""
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | (20 + len(options)) // 4, 0,
                       20 + len(options) + size, 7, offset // 8 | (0x2000 if more else 0), 64,
                       17, 0, socket.inet_aton(G), socket.inet_aton(C))
    return build.ethernet(head + options + bytes(size), 0x0800)


#: fragments whose data ends at byte 65535 of the datagram: with the IP header in front
#: the datagram is 65555 bytes, longer than a total length can say
PAST_65535 = [ip_fragment(0, 65512, True), ip_fragment(65512, 23, False)]


@given(any_fragments())
@example(PAST_65535)
def test_arbitrary_fragments_are_refused_or_held_never_anything_else(pieces):
    r = Reassembler(4)
    for f in pieces:
        try:
            p = parse_frame(f)
            if p.frag_id is None:
                continue
            done = r.add(p, 0.0, 0)
        except MalformedFrame as exc:
            assert "IPv4" in str(exc) or "UDP" in str(exc), exc
            continue
        if done is not None:
            packet, frames = done
            assert packet.frag_id is None and frames
            total = struct.unpack_from("!H", packet.frame, 14 + 2)[0]
            assert 14 + total <= len(packet.frame) and total <= MAX_DATAGRAM


# -- the regressions the fuzzing found ---------------------------------------------------
def test_a_reassembled_datagram_is_parsed_as_the_datagram_it_is():
    """The reassembled frame kept the first fragment's more-fragments flag (the id was
    zeroed instead of the flags), so it parsed as a fragment again: keyed without ports and
    compared as 'other', not as the UDP/TCP datagram it is."""
    whole = build.udp_frame(G, C, 0, 0, bytes(1))
    body = whole[14 + 20:]
    pieces = [build.ethernet(build.ipv4(G, C, 17, body[:8], frag=0x2000), 0x0800),
              build.ethernet(build.ipv4(G, C, 17, body[8:], frag=1), 0x0800)]
    r = Reassembler(4)
    assert r.add(parse_frame(pieces[0]), 0.0, 0) is None
    packet, frames = r.add(parse_frame(pieces[1]), 0.0, 0)
    want = parse_frame(whole)
    assert (packet.kind, packet.key, packet.frag_id) == (KIND_DATAGRAM, want.key, None)
    assert packet.compare == want.compare and [f for f, _ in frames] == pieces


def test_fragments_that_reassemble_past_65535_bytes_are_refused():
    """They passed the per-fragment check (which left out the IP header) and then failed
    with struct.error when the total length was written: a crash, not a counted refusal."""
    r = Reassembler(4)
    assert r.add(parse_frame(PAST_65535[0]), 0.0, 0) is None
    with pytest.raises(MalformedFrame, match="IPv4 fragments reassemble to a total length "
                                             "of 65555 bytes"):
        r.add(parse_frame(PAST_65535[1]), 0.0, 0)


#: two fragments of a datagram whose UDP header is refused once it is reassembled
REFUSED_DATAGRAM = [
    build.ethernet(build.ipv4(G, C, 17, struct.pack("!HHHH", 1, 2, 3, 0) + bytes(8), ip_id=7,
                              frag=0x2000), 0x0800),
    build.ethernet(build.ipv4(G, C, 17, bytes(8), ip_id=7, frag=2), 0x0800)]


def test_a_refused_datagram_counts_every_fragment_dropped():
    """Only the fragment that completed a refused datagram was counted; the others held
    for it were dropped without a count (2 PVM frames in, 1 counted, none released)."""
    cmp = Comparator(NetSettings(), lambda f, v: None, lambda c, d: None, clock=lambda: 0.0)
    for f in REFUSED_DATAGRAM:
        cmp.push_primary(f, 0, now=0.0)
    assert cmp.counters["primary_frames_dropped"] == cmp.counters["malformed_frames"] == 2


# -- the comparator counts what it refuses ---------------------------------------------------
@given(st.lists(frames(), max_size=12))
def test_comparator_counts_every_refused_frame(batch):
    released: list = []
    cmp = Comparator(NetSettings(), lambda f, v: released.append(f), lambda c, d: None,
                     clock=lambda: 0.0)
    refused = 0
    for frame, vnet in batch:
        try:
            p = parse_frame(frame, vnet)
            if p.frag_id is not None:
                continue        # fragments: the reassembly's own test above
        except MalformedFrame:
            refused += 1
        cmp.push_primary(frame, vnet, now=0.0)
    assert cmp.counters["malformed_frames"] == refused
    assert cmp.counters["primary_frames_dropped"] >= refused


@given(st.lists(st.one_of(frames(), any_fragments().map(lambda fs: [(f, 0) for f in fs])),
                max_size=8))
@example([[(f, 0) for f in REFUSED_DATAGRAM]])
def test_every_pvm_frame_is_released_once_or_counted_dropped(batch):
    """After a flush (Xen's COLO_CHECKPOINT releases all held), every PVM frame, whole or a
    fragment, was released once or counted in primary_frames_dropped."""
    pushed = [x for item in batch for x in (item if isinstance(item, list) else [item])]
    released: list = []
    cmp = Comparator(NetSettings(), lambda f, v: released.append(f), lambda c, d: None,
                     clock=lambda: 0.0)
    for frame, vnet in pushed:
        cmp.push_primary(frame, vnet, now=0.0)
    cmp.flush()
    assert cmp.counters["primary_frames_in"] == len(pushed)
    assert len(released) + cmp.counters["primary_frames_dropped"] == len(pushed)
    remaining = [f for f, _ in pushed]
    for f in released:
        remaining.remove(f)          # each released frame was pushed, and at most once
