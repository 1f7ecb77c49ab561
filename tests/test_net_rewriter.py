"""The SVM's TCP sequence rewriting (filter-rewriter's job)."""
from __future__ import annotations

import socket
import struct

from pipeline.net import build
from pipeline.net.build import l4_checksum
from pipeline.net.packet import TCP_ACK, TCP_PSH, TCP_SYN, parse_frame
from pipeline.net.rewriter import SeqRewriter

G, C = "10.0.0.2", "10.0.0.1"
PVM_ISN, SVM_ISN = 1_000_000, 0xFFFFFF00          # the SVM's wraps past 2**32


def with_options(frame: bytes, options: bytes) -> bytes:
    """Insert TCP options into a built frame (fixing lengths and checksums)."""
    ip = bytearray(frame[14:34])
    seg = bytearray(frame[34:54])
    payload = frame[54:]
    seg[12] = ((20 + len(options)) // 4) << 4
    seg = seg + options + payload
    struct.pack_into("!H", ip, 2, 20 + len(seg))
    struct.pack_into("!H", ip, 10, 0)
    struct.pack_into("!H", ip, 10, build.checksum(ip))
    struct.pack_into("!H", seg, 16, 0)
    struct.pack_into("!H", seg, 16, l4_checksum(bytes(ip[12:16]), bytes(ip[16:20]), 6, seg))
    return frame[:14] + bytes(ip) + bytes(seg)


def checksum_ok(frame: bytes) -> bool:
    p = parse_frame(frame)
    end = 14 + struct.unpack_from("!H", frame, 16)[0]
    return l4_checksum(p.key[3], p.key[4], 6, frame[p.l4_offset:end]) == 0


def ts(val: int, ecr: int) -> bytes:
    return b"\x01\x01" + struct.pack("!BBII", 8, 10, val, ecr)


def handshake(rw: SeqRewriter) -> None:
    rw.observe_primary(with_options(build.tcp_frame(G, C, 80, 5555, PVM_ISN, 101,
                                                    TCP_SYN | TCP_ACK), ts(5000, 77)))
    rw.from_secondary(with_options(build.tcp_frame(G, C, 80, 5555, SVM_ISN, 101,
                                                   TCP_SYN | TCP_ACK), ts(9000, 77)))


def test_svm_output_moves_into_the_pvm_sequence_space():
    rw = SeqRewriter()
    handshake(rw)
    out = rw.from_secondary(build.tcp_frame(G, C, 80, 5555, SVM_ISN + 1, 101,
                                            TCP_ACK | TCP_PSH, b"data"))
    assert parse_frame(out).seq == PVM_ISN + 1
    assert parse_frame(out).payload == b"data"
    assert checksum_ok(out)


def test_client_acks_sack_and_timestamp_echo_move_into_the_svm_space():
    rw = SeqRewriter()
    handshake(rw)
    sack = struct.pack("!BBII", 5, 10, PVM_ISN + 100, PVM_ISN + 200)
    client = with_options(build.tcp_frame(C, G, 5555, 80, 101, PVM_ISN + 50, TCP_ACK),
                          ts(123, 5010) + b"\x01\x01" + sack)
    out = rw.to_secondary(client)
    p = parse_frame(out)
    assert p.ack == (SVM_ISN + 50) & 0xFFFFFFFF
    assert p.seq == 101                                        # the client's own seq untouched
    opts = out[p.l4_offset + 20:p.l4_offset + (out[p.l4_offset + 12] >> 4) * 4]
    assert struct.unpack_from("!II", opts, 4) == (123, 9010)   # TSval kept, TSecr moved
    left, right = struct.unpack_from("!II", opts, 16)          # after NOP NOP kind len
    assert (left, right) == ((SVM_ISN + 100) & 0xFFFFFFFF, (SVM_ISN + 200) & 0xFFFFFFFF)
    assert checksum_ok(out)


def test_offsets_are_learned_whichever_syn_ack_comes_first():
    rw = SeqRewriter()
    rw.from_secondary(build.tcp_frame(G, C, 80, 5555, SVM_ISN, 101, TCP_SYN | TCP_ACK))
    rw.observe_primary(build.tcp_frame(G, C, 80, 5555, PVM_ISN, 101, TCP_SYN | TCP_ACK))
    out = rw.from_secondary(build.tcp_frame(G, C, 80, 5555, SVM_ISN + 1, 101, TCP_ACK, b"x"))
    assert parse_frame(out).seq == PVM_ISN + 1


def test_reset_after_checkpoint_stops_rewriting():
    rw = SeqRewriter()
    handshake(rw)
    rw.reset()
    frame = build.tcp_frame(G, C, 80, 5555, PVM_ISN + 1, 101, TCP_ACK, b"x")
    assert rw.from_secondary(frame) is frame
    client = build.tcp_frame(C, G, 5555, 80, 101, PVM_ISN + 2, TCP_ACK)
    assert rw.to_secondary(client) is client


def test_other_flows_and_non_tcp_pass_untouched():
    rw = SeqRewriter()
    handshake(rw)
    other = build.tcp_frame(G, C, 81, 5555, SVM_ISN + 1, 101, TCP_ACK, b"x")
    assert rw.from_secondary(other) is other
    udp = build.udp_frame(G, C, 80, 5555, b"x")
    assert rw.from_secondary(udp) is udp and rw.to_secondary(udp) is udp
    assert rw.from_secondary(b"garbage") == b"garbage"


def test_ipv6_tcp_is_rewritten_too():
    rw = SeqRewriter()

    def tcp6(src, dst, sport, dport, seq, ack, flags, payload=b""):
        s6, d6 = (socket.inet_pton(socket.AF_INET6, a) for a in (src, dst))
        seg = build.tcp_segment("0.0.0.0", "0.0.0.0", sport, dport, seq, ack, flags, payload)
        seg = bytearray(seg)
        struct.pack_into("!H", seg, 16, 0)
        struct.pack_into("!H", seg, 16, l4_checksum(s6, d6, 6, seg))
        hdr = struct.pack("!IHBB16s16s", 6 << 28, len(seg), 6, 64, s6, d6)
        return build.ethernet(hdr + bytes(seg), 0x86DD)

    rw.observe_primary(tcp6("fd00::2", "fd00::1", 80, 5555, PVM_ISN, 1, TCP_SYN | TCP_ACK))
    rw.from_secondary(tcp6("fd00::2", "fd00::1", 80, 5555, SVM_ISN, 1, TCP_SYN | TCP_ACK))
    out = rw.from_secondary(tcp6("fd00::2", "fd00::1", 80, 5555, SVM_ISN + 1, 1, TCP_ACK, b"v6"))
    p = parse_frame(out)
    assert p.seq == PVM_ISN + 1
    end = p.l3_offset + 40 + struct.unpack_from("!H", out, p.l3_offset + 4)[0]
    assert l4_checksum(p.key[3], p.key[4], 6, out[p.l4_offset:end]) == 0
