"""The rewriter's offsets carried to another host's rewriter (re-protection after a
failover: the new secondary's redirector gets the survivor's, see
tests/test_failover_reprotect_nic.py for the whole path in the netns lab)."""
from __future__ import annotations

import json

import pytest
from test_net_rewriter import checksum_ok

from pipeline.net import build
from pipeline.net.packet import TCP_ACK, TCP_PSH, TCP_SYN, parse_frame
from pipeline.net.rewriter import SeqRewriter

G, C = "10.0.0.2", "10.0.0.1"
PVM_ISN, SVM_ISN = 1_000_000, 0xFFFFFF00


def learnt() -> SeqRewriter:
    """A rewriter that learnt one connection's offset as the secondary's host does."""
    rw = SeqRewriter()
    rw.observe_client(build.tcp_frame(C, G, 5555, 80, 100, 0, TCP_SYN))
    rw.from_secondary(build.tcp_frame(G, C, 80, 5555, SVM_ISN, 101, TCP_SYN | TCP_ACK))
    rw.observe_client(build.tcp_frame(C, G, 5555, 80, 101, PVM_ISN + 1, TCP_ACK))
    return rw


def test_another_rewriter_moves_the_connection_as_the_one_that_learnt_it():
    rows = json.loads(json.dumps(learnt().export_offsets()))      # as the file carries them
    assert len(rows) == 1 and rows[0]["guest_port"] == 80 and rows[0]["client_port"] == 5555
    other = SeqRewriter()
    assert other.load_offsets(rows) == 1
    out = other.from_secondary(build.tcp_frame(G, C, 80, 5555, SVM_ISN + 1, 101,
                                               TCP_ACK | TCP_PSH, b"resp"))
    assert parse_frame(out).seq == PVM_ISN + 1 and checksum_ok(out)
    back = other.to_secondary(build.tcp_frame(C, G, 5555, 80, 101, PVM_ISN + 5, TCP_ACK))
    assert parse_frame(back).ack == (SVM_ISN + 5) & 0xFFFFFFFF and checksum_ok(back)
    # another connection is not moved
    frame = build.tcp_frame(G, C, 81, 5555, 7, 101, TCP_ACK)
    assert other.from_secondary(frame) == frame


def test_connections_without_an_offset_are_not_exported():
    rw = SeqRewriter()
    rw.observe_client(build.tcp_frame(C, G, 5555, 80, 100, 0, TCP_SYN))   # handshake unfinished
    assert rw.export_offsets() == []


@pytest.mark.parametrize("break_row, named", [
    (lambda r: r.pop("seq_offset"), "seq_offset"),
    (lambda r: r.update(guest="0a00"), "IPv4 addresses"),
    (lambda r: r.update(ip=5), "IPv5"),
    (lambda r: r.update(seq_offset=1 << 32), "32 bits"),
    (lambda r: r.update(client_port="x"), "invalid literal"),
])
def test_a_malformed_row_is_named_and_nothing_is_loaded(break_row, named):
    good = learnt().export_offsets()[0]
    bad = dict(good, guest_port=81)
    break_row(bad)
    other = SeqRewriter()
    with pytest.raises(ValueError, match="offsets row 1") as info:
        other.load_offsets([good, bad])
    assert named in str(info.value)
    frame = build.tcp_frame(G, C, 80, 5555, SVM_ISN + 1, 101, TCP_ACK)
    assert other.from_secondary(frame) == frame          # not even the good row
    assert other.export_offsets() == []
