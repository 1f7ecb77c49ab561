"""Parse Ethernet frames into what the comparator needs: a connection key and the
bytes that must agree between the PVM and the SVM.

Only what comparison needs is parsed; everything is validated against the
frame's real length so a truncated or lying header raises :class:`MalformedFrame`
(never an IndexError deep in the comparator).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
#: IPv6 extension headers walked over to find the transport header
IPV6_EXT_HEADERS = (0, 43, 60)
IPV6_FRAGMENT = 44

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

#: what the comparator does with a packet
KIND_TCP, KIND_DATAGRAM, KIND_OTHER = "tcp", "datagram", "other"

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")
_TCP = struct.Struct("!HHIIBB")
_UDP = struct.Struct("!HHH")


class MalformedFrame(ValueError):
    """A frame that cannot be parsed; the message says which field was wrong."""


@dataclass(slots=True)
class Packet:
    """One parsed frame. ``frame`` holds the vnet header (if any) followed by Ethernet."""

    frame: bytes
    vnet_hdr_len: int
    #: connection key: guest -> client direction, includes VLAN tags
    key: tuple
    kind: str
    #: bytes compared for datagram/other kinds (after the IP header, or the whole frame)
    compare: bytes = b""
    # TCP only
    seq: int = 0
    ack: int = 0
    flags: int = 0
    payload: bytes = b""
    # IPv4 fragments: (src, dst, proto, id), offset in bytes, more-fragments flag
    frag_id: tuple | None = None
    frag_offset: int = 0
    frag_more: bool = False
    l3_offset: int = 0
    l4_offset: int = 0


_ETH_IPV4 = struct.Struct("!6s6sHBBHHHBBH4s4s")
_FAST_MIN = ETH_HLEN + 20 + 20


def parse_frame(frame: bytes, vnet_hdr_len: int = 0) -> Packet:
    """Parse one frame (``vnet_hdr_len`` bytes of vnet header, then Ethernet)."""
    size = len(frame)
    if vnet_hdr_len == 0 and size >= _FAST_MIN and frame[12:14] == b"\x08\x00" \
            and frame[14] == 0x45:
        # the common case, untagged IPv4 without options: one unpack for both headers
        (_d, _s, _t, _vi, _tos, total_len, _id, frag, _ttl, proto, _c, src,
         dst) = _ETH_IPV4.unpack_from(frame, 0)
        if not frag & 0x3FFF and total_len >= 20 and ETH_HLEN + total_len <= size:
            return _parse_l4(frame, 0, (), 4, proto, src, dst, ETH_HLEN, ETH_HLEN + 20,
                             ETH_HLEN + total_len)
    if vnet_hdr_len < 0 or vnet_hdr_len > size:
        raise MalformedFrame(f"vnet header length {vnet_hdr_len} outside frame of {size} bytes")
    off = vnet_hdr_len
    if size - off < ETH_HLEN:
        raise MalformedFrame(f"frame of {size - off} bytes is shorter than an Ethernet header")
    dst_mac, src_mac, ethertype = _ETH.unpack_from(frame, off)
    off += ETH_HLEN
    vlans: tuple = ()
    while ethertype in VLAN_TPIDS:
        if size - off < 4:
            raise MalformedFrame(f"VLAN tag truncated at byte {off} of {size}")
        tci, ethertype = struct.unpack_from("!HH", frame, off)
        vlans += (tci & 0x0FFF,)
        off += 4
    if ethertype == ETH_P_IP:
        return _parse_ipv4(frame, vnet_hdr_len, off, vlans)
    if ethertype == ETH_P_IPV6:
        return _parse_ipv6(frame, vnet_hdr_len, off, vlans)
    if ethertype == ETH_P_ARP and size - off < 28:
        raise MalformedFrame(f"ARP packet of {size - off} bytes is shorter than 28")
    # ARP and any other L2 protocol: the whole frame must agree
    return Packet(frame, vnet_hdr_len, (vlans, "l2", ethertype, src_mac, dst_mac), KIND_OTHER,
                  compare=frame[vnet_hdr_len:], l3_offset=off)


def _parse_ipv4(frame: bytes, vnet: int, l3: int, vlans: tuple) -> Packet:
    size = len(frame)
    if size - l3 < 20:
        raise MalformedFrame(f"IPv4 header truncated: {size - l3} bytes, need 20")
    ver_ihl, _tos, total_len, ip_id, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(frame, l3)
    if ver_ihl >> 4 != 4:
        raise MalformedFrame(f"IPv4 ethertype but IP version {ver_ihl >> 4}")
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < 20:
        raise MalformedFrame(f"IPv4 header length {ihl} is below 20")
    if total_len < ihl or l3 + total_len > size:
        raise MalformedFrame(f"IPv4 total length {total_len} does not fit header {ihl} "
                             f"and frame ({size - l3} bytes after Ethernet)")
    l4 = l3 + ihl
    end = l3 + total_len
    frag_offset = (frag & 0x1FFF) * 8
    more = bool(frag & 0x2000)
    if frag_offset or more:
        # a fragment: keyed by datagram until reassembled (see fragments.py)
        return Packet(frame, vnet, (vlans, 4, proto, src, dst, 0, 0), KIND_OTHER,
                      compare=frame[l4:end], frag_id=(vlans, src, dst, proto, ip_id),
                      frag_offset=frag_offset, frag_more=more, l3_offset=l3, l4_offset=l4)
    return _parse_l4(frame, vnet, vlans, 4, proto, src, dst, l3, l4, end)


def _parse_ipv6(frame: bytes, vnet: int, l3: int, vlans: tuple) -> Packet:
    size = len(frame)
    if size - l3 < 40:
        raise MalformedFrame(f"IPv6 header truncated: {size - l3} bytes, need 40")
    vtf, payload_len, next_hdr, _hop, src, dst = _IPV6.unpack_from(frame, l3)
    if vtf >> 28 != 6:
        raise MalformedFrame(f"IPv6 ethertype but IP version {vtf >> 28}")
    end = l3 + 40 + payload_len
    if end > size:
        raise MalformedFrame(f"IPv6 payload length {payload_len} exceeds frame "
                             f"({size - l3 - 40} bytes after the header)")
    l4 = l3 + 40
    while next_hdr in IPV6_EXT_HEADERS:
        if end - l4 < 8:
            raise MalformedFrame(f"IPv6 extension header {next_hdr} truncated")
        nh, hlen = frame[l4], (frame[l4 + 1] + 1) * 8
        if l4 + hlen > end:
            raise MalformedFrame(f"IPv6 extension header {next_hdr} of {hlen} bytes exceeds payload")
        next_hdr, l4 = nh, l4 + hlen
    if next_hdr == IPV6_FRAGMENT:
        # IPv6 fragments are compared whole (no reassembly for v6)
        return Packet(frame, vnet, (vlans, 6, next_hdr, src, dst, 0, 0), KIND_OTHER,
                      compare=frame[vnet:], l3_offset=l3, l4_offset=l4)
    return _parse_l4(frame, vnet, vlans, 6, next_hdr, src, dst, l3, l4, end)


def _parse_l4(frame: bytes, vnet: int, vlans: tuple, ipver: int, proto: int, src: bytes,
              dst: bytes, l3: int, l4: int, end: int) -> Packet:
    avail = end - l4
    if proto == IPPROTO_TCP:
        if avail < 20:
            raise MalformedFrame(f"TCP header truncated: {avail} bytes, need 20")
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(frame, l4)
        hlen = (doff >> 4) * 4
        if hlen < 20 or hlen > avail:
            raise MalformedFrame(f"TCP data offset {hlen} outside segment of {avail} bytes")
        return Packet(frame, vnet, (vlans, ipver, proto, src, dst, sport, dport), KIND_TCP,
                      b"", seq, ack, flags, frame[l4 + hlen:end], None, 0, False, l3, l4)
    if proto == IPPROTO_UDP:
        if avail < 8:
            raise MalformedFrame(f"UDP header truncated: {avail} bytes, need 8")
        sport, dport, ulen = _UDP.unpack_from(frame, l4)
        if ulen < 8 or ulen > avail:
            raise MalformedFrame(f"UDP length {ulen} outside datagram of {avail} bytes")
        return Packet(frame, vnet, (vlans, ipver, proto, src, dst, sport, dport), KIND_DATAGRAM,
                      frame[l4:], 0, 0, 0, b"", None, 0, False, l3, l4)
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if avail < 4:
            raise MalformedFrame(f"ICMP header truncated: {avail} bytes, need 4")
        return Packet(frame, vnet, (vlans, ipver, proto, src, dst, 0, 0), KIND_DATAGRAM,
                      compare=frame[l4:], l3_offset=l3, l4_offset=l4)
    # other IP protocols: the whole frame must agree
    return Packet(frame, vnet, (vlans, ipver, proto, src, dst, 0, 0), KIND_OTHER,
                  compare=frame[vnet:], l3_offset=l3, l4_offset=l4)
