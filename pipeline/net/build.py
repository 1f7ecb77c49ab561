"""Build Ethernet frames and fix checksums: used by the TCP rewriter, the demo feed,
the tests and the benchmark (so all of them make frames one way)."""
from __future__ import annotations

import socket
import struct

from pipeline.net.packet import ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP

GUEST_MAC = bytes.fromhex("525400000002")
CLIENT_MAC = bytes.fromhex("525400000001")


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``, folded, complemented."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = initial + sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    # the sum ran over native-endian words: swap to network order
    total = socket.htons(total) if socket.htons(1) != 1 else total
    return (~total) & 0xFFFF


def _pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray) -> int:
    return checksum(_pseudo_header(src, dst, proto, len(segment)) + bytes(segment))


def ethernet(payload: bytes, ethertype: int, src_mac: bytes = GUEST_MAC,
             dst_mac: bytes = CLIENT_MAC, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return dst_mac + src_mac + tag + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ip_id: int = 0, ttl: int = 64,
         frag: int = 0) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ip_id, frag,
                                   ttl, proto, 0, s, d))
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header) + payload


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
                payload: bytes = b"", window: int = 65535) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                5 << 4, flags, window, 0, 0) + payload)
    struct.pack_into("!H", seg, 16, l4_checksum(s, d, IPPROTO_TCP, seg))
    return bytes(seg)


def tcp_frame(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
              payload: bytes = b"", ip_id: int = 0, window: int = 65535,
              vlan: int | None = None) -> bytes:
    seg = tcp_segment(src, dst, sport, dport, seq, ack, flags, payload, window)
    return ethernet(ipv4(src, dst, IPPROTO_TCP, seg, ip_id), ETH_P_IP, vlan=vlan)


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes, ip_id: int = 0,
              vlan: int | None = None) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    dgram = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    struct.pack_into("!H", dgram, 6, l4_checksum(s, d, IPPROTO_UDP, dgram) or 0xFFFF)
    return ethernet(ipv4(src, dst, IPPROTO_UDP, bytes(dgram), ip_id), ETH_P_IP, vlan=vlan)


def icmp_echo_frame(src: str, dst: str, ident: int, seq: int, payload: bytes,
                    reply: bool = True, ip_id: int = 0) -> bytes:
    msg = bytearray(struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload)
    struct.pack_into("!H", msg, 2, checksum(msg))
    return ethernet(ipv4(src, dst, IPPROTO_ICMP, bytes(msg), ip_id), ETH_P_IP)


def udp6_frame(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    dgram = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    struct.pack_into("!H", dgram, 6, l4_checksum(s, d, IPPROTO_UDP, dgram) or 0xFFFF)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(dgram), IPPROTO_UDP, 64, s, d)
    return ethernet(header + bytes(dgram), ETH_P_IPV6)


#: the addresses a simulated guest's output is wrapped in (demo; see guest_output_frame)
DEMO_GUEST_IP, DEMO_CLIENT_IP, DEMO_PORT = "10.0.0.2", "10.0.0.1", 9
MAX_UDP_PAYLOAD = 65507


def guest_output_frame(payload: bytes, flow: int = 0, ip_id: int = 0) -> bytes:
    """A simulated guest's output packet as the Ethernet/UDP frame the comparator compares.

    The PVM's and the SVM's outputs with the same ``flow`` and ``payload`` become frames
    that match (the IP id may differ, as between real guests). Each flow is its own
    connection: its datagrams are compared in order.
    """
    if len(payload) > MAX_UDP_PAYLOAD:
        raise ValueError(f"guest output of {len(payload)} bytes exceeds the "
                         f"{MAX_UDP_PAYLOAD}-byte UDP payload limit")
    if not 0 <= flow < 50000:
        raise ValueError(f"flow {flow} outside 0..49999")
    return udp_frame(DEMO_GUEST_IP, DEMO_CLIENT_IP, 10000 + flow, DEMO_PORT, payload,
                     ip_id=ip_id)


class GuestOutputFramer:
    """``encode_frame(guest_output_frame(payload))`` (flow 0, IP id 0), byte for byte, for
    every answer a sim guest's output port sends: the headers of a payload length are made
    once (a guest's answers have one or two lengths), so each frame costs the UDP
    checksum over its payload and one join. Through guest_output_frame each answer took
    ~15 us of Python (two inet_aton, three struct packs, two checksums, four copies): per
    request, on both nodes.

    The checksum: the ones' complement sum of 16-bit big-endian words is the number the
    bytes spell, modulo 0xFFFF (65536 = 1 modulo 65535), so it is one int.from_bytes
    (C) instead of a Python sum over the words; a nonzero multiple of 0xFFFF folds to
    0xFFFF (the sum is never zero: the pseudo-header's addresses are not)."""

    def __init__(self) -> None:
        #: payload length -> (length word + Ethernet + IPv4 + UDP header up to its checksum,
        #: the UDP pseudo-header and header words modulo 0xFFFF)
        self._by_length: dict[int, tuple[bytes, int]] = {}

    def _headers(self, length: int) -> tuple[bytes, int]:
        # the reference frame of a zero payload of this length gives every header byte
        # (and the length check)
        ref = guest_output_frame(bytes(length))
        s, d = socket.inet_aton(DEMO_GUEST_IP), socket.inet_aton(DEMO_CLIENT_IP)
        words = _pseudo_header(s, d, IPPROTO_UDP, 8 + length) + struct.pack(
            "!HHHH", 10000, DEMO_PORT, 8 + length, 0)
        at = len(ref) - length - 2            # the UDP checksum's place
        made = (struct.pack("!I", len(ref)) + ref[:at], int.from_bytes(words, "big") % 0xFFFF)
        self._by_length[length] = made
        return made

    def frame(self, payload: bytes) -> bytes:
        """One answer as the framed Ethernet/UDP frame the comparator reads."""
        made = self._by_length.get(len(payload))
        head, base = made if made is not None else self._headers(len(payload))
        data = payload if not len(payload) % 2 else payload + b"\0"
        folded = (base + int.from_bytes(data, "big")) % 0xFFFF or 0xFFFF
        return head + _CHECKSUM.pack(~folded & 0xFFFF or 0xFFFF) + payload


_CHECKSUM = struct.Struct("!H")
