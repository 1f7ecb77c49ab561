"""Differential test: the same PVM/SVM frame streams go to QEMU 7.2's colo-compare and
to our standalone comparator (both real processes over the same socket framing); on
the protocols QEMU compares, the released frames and the checkpoint requests agree.

Where QEMU 7.2 is knowingly different, the streams avoid it (and the core tests pin
our behaviour): its UDP/other queues are compared newest-first (``g_queue_pop_tail``),
so two datagrams of one flow in flight make it request a checkpoint; its ICMP
connection key is not stable (a lone matching echo reply is never compared). So
UDP flows carry one datagram at a time here, and ICMP is left out."""
from __future__ import annotations

import fcntl
import struct
import termios
import threading
import time

import pytest
from conftest import wait_until

from pipeline.net import build
from pipeline.net.control import COLO_CHECKPOINT, DO_CHECKPOINT, PROXY_INIT, PROXY_INIT_REPLY
from pipeline.net.packet import TCP_ACK, TCP_PSH
from pipeline.net.qemu_peer import QEMU, READY_PROBE, running_peer

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300),
              pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")]

G, C = "10.0.0.2", "10.0.0.1"
VNET = bytes(10)     # a virtio-net header (no offloads) in front of each frame
SENTINEL = b"sentinel-kick-"


def tcp(sport, seq, payload, ip_id=0):
    return build.tcp_frame(G, C, sport, 40000, seq, 500, TCP_ACK | TCP_PSH, payload, ip_id=ip_id)


def udp(sport, payload, ip_id=0):
    return build.udp_frame(G, C, sport, 40000, payload, ip_id=ip_id)


def _send(peer, frames, vnet_hdr, side="both"):
    vlen = len(VNET) if vnet_hdr else 0
    for f in frames:
        for sock in ((peer.pin, peer.sin) if side == "both" else
                     (peer.pin,) if side == "pvm" else (peer.sin,)):
            sock.send(VNET + f if vnet_hdr else f, vlen)


def _unread(client) -> int:
    """Bytes ``client`` sent on its unix stream socket that the peer has not read yet
    (SIOCOUTQ: a sent buffer counts until the reader consumed all of it)."""
    return struct.unpack("i", fcntl.ioctl(client.sock.fileno(), termios.TIOCOUTQ,
                                          b"\0\0\0\0"))[0]


def _through(client, is_marker, what: str, timeout: float = 60.0) -> list:
    """Everything ``client`` receives up to the first item ``is_marker`` accepts (and what
    came with it). The deadline only bounds a hang."""
    out: list = []
    deadline = time.monotonic() + timeout
    while True:
        got = client.recv(0.05)
        out += got
        if any(is_marker(item) for item in got):
            return out
        assert time.monotonic() < deadline, f"no {what} within {timeout} s: {out}"


def _flush_frames(peer, n, vnet_hdr):
    """Everything released so far: a matching sentinel datagram (a flow of its own, one
    datagram in flight) follows everything sent so far on both inputs; it is compared
    after every frame read before it, and a comparator writes what it releases in the
    order it released it, so once it comes out every frame released before it did too.
    Returns what came out; the sentinel is filtered by _strip."""
    payload = SENTINEL + b"%d" % n
    _send(peer, [udp(10 + n, payload)], vnet_hdr)
    return _through(peer.out, lambda item: item[0].endswith(payload), f"sentinel frame {n}")


def _flush_notify(peer):
    """The notify channel in order up to the reply to one PROXY_INIT sent now: the
    messages sent before it were handled once the reply comes, and what the comparator
    wrote before the reply came with it.

    Exactly one PROXY_INIT, so no reply is ever left unread. This used to send two and
    stop at the first reply; under load the second reply (written a moment later) was
    read by the next flush, after COLO_CHECKPOINT, as proof that the checkpoint had been
    handled when QEMU had not read it yet (strace: QEMU read and released the next
    sentinel, then read COLO_CHECKPOINT and wrote the held frame at once), so the held
    frame came out after the sentinel and the test failed though QEMU was right."""
    peer.ntf.send(PROXY_INIT)
    return _through(peer.ntf, lambda item: item[0] == PROXY_INIT_REPLY, "PROXY_INIT_REPLY")


def _strip(frames):
    """Without the test's sentinels and running_peer's readiness probes."""
    return [(f, v) for f, v in frames if SENTINEL not in f and READY_PROBE not in f]


def _requests(messages):
    assert all(m in (DO_CHECKPOINT, PROXY_INIT_REPLY) for m, _ in messages), messages
    return any(m == DO_CHECKPOINT for m, _ in messages)


def run_scenario(kind, pvm, svm, timeout=False, vnet_hdr=False):
    """Feed the streams; returns (released before COLO_CHECKPOINT, checkpoint requested,
    released by COLO_CHECKPOINT). ``timeout``: a PVM frame is never matched; wait for the
    comparator's timeout to ask for a checkpoint."""
    with running_peer(kind, timeout_ms=1000, scan_ms=100, vnet_hdr=vnet_hdr) as peer:
        # the PVM's frames first, as a guest's replies race ahead: the SVM's go once the
        # comparator read all of the PVM's
        _send(peer, pvm, vnet_hdr, "pvm")
        wait_until(lambda: _unread(peer.pin) == 0, 60, f"{kind} read the PVM's frames")
        _send(peer, svm, vnet_hdr, "svm")
        notes = []
        if timeout:          # asked for once the compare timeout ran out

            def asked():
                notes.extend(_flush_notify(peer))
                return _requests(notes)
            wait_until(asked, 60, f"{kind} asked for a checkpoint", interval=0.05)
        before = _strip(_flush_frames(peer, 1, vnet_hdr))
        requests = _requests(notes + _flush_notify(peer))
        peer.ntf.send(COLO_CHECKPOINT)
        _flush_notify(peer)  # handled in order: the checkpoint's release is done
        after = _strip(_flush_frames(peer, 2, vnet_hdr))
    return before, requests, after


def differential(pvm, svm, timeout=False, vnet_hdr=False):
    results = {}

    def one(kind):
        results[kind] = run_scenario(kind, pvm, svm, timeout, vnet_hdr)

    threads = [threading.Thread(target=one, args=(k,)) for k in ("qemu", "ours")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert set(results) == {"qemu", "ours"}, "a comparator run did not finish"
    return results["qemu"], results["ours"]


def test_matching_streams_release_everything_without_checkpoint():
    pvm = [udp(1000 + i, b"reply %d" % i, ip_id=i) for i in range(20)]
    pvm += [tcp(2000 + c, 1000 + 100 * i, bytes([c]) * 100, ip_id=i)
            for c in range(4) for i in range(5)]
    svm = [udp(1000 + i, b"reply %d" % i, ip_id=900 + i) for i in range(20)]
    svm += [tcp(2000 + c, 1000 + 100 * i, bytes([c]) * 100, ip_id=777) for c in range(4)
            for i in range(5)]
    qemu, ours = differential(pvm, svm)
    assert sorted(f for f, _ in qemu[0]) == sorted(pvm)       # QEMU agrees with the input
    assert sorted(f for f, _ in ours[0]) == sorted(pvm)
    assert qemu[1] is False and ours[1] is False
    assert qemu[2] == ours[2] == []


def test_split_tcp_segments_match_by_byte_range():
    data = bytes(range(250)) * 6                         # 1500 bytes
    pvm = [tcp(3000, 1 + o, data[o:o + 500]) for o in range(0, 1500, 500)]
    pvm += [tcp(3001, 1 + o, data[o:o + 300]) for o in range(0, 1500, 300)]
    svm = [tcp(3000, 1 + o, data[o:o + 300]) for o in range(0, 1500, 300)]
    svm += [tcp(3001, 1, data)]
    qemu, ours = differential(pvm, svm)
    assert [f for f, _ in qemu[0]] == [f for f, _ in ours[0]]
    assert sorted(f for f, _ in ours[0]) == sorted(pvm)
    assert qemu[1] is ours[1] is False


@pytest.mark.parametrize("which", ["tcp", "udp"])
def test_diverging_payload_requests_a_checkpoint_and_commit_releases(which):
    if which == "tcp":
        good = [tcp(4000, 1, b"same")]
        pvm, svm = good + [tcp(4001, 1, b"PVM says this")], good + [tcp(4001, 1, b"SVM says that")]
    else:
        good = [udp(4000, b"same")]
        pvm, svm = good + [udp(4001, b"PVM!")], good + [udp(4001, b"SVM?")]
    qemu, ours = differential(pvm, svm)
    assert [f for f, _ in qemu[0]] == [f for f, _ in ours[0]] == pvm[:1]
    assert qemu[1] is ours[1] is True
    assert [f for f, _ in qemu[2]] == [f for f, _ in ours[2]] == pvm[1:]


def test_unmatched_pvm_frame_times_out():
    pvm = [udp(5000, b"matched"), tcp(5001, 1, b"the SVM never sends this")]
    svm = [udp(5000, b"matched")]
    qemu, ours = differential(pvm, svm, timeout=True)
    assert [f for f, _ in qemu[0]] == [f for f, _ in ours[0]] == pvm[:1]
    assert qemu[1] is ours[1] is True
    assert [f for f, _ in qemu[2]] == [f for f, _ in ours[2]] == pvm[1:]


def test_vnet_header_framing():
    pvm = [udp(6000 + i, b"v%d" % i) for i in range(5)] + [tcp(6100, 1, b"tcp with vnet")]
    svm = list(pvm)
    svm[2] = udp(6002, b"different")
    qemu, ours = differential(pvm, svm, vnet_hdr=True)
    assert qemu[0] == ours[0]                          # frames and vnet lengths
    assert all(v == len(VNET) for _, v in ours[0])
    assert sorted(f[len(VNET):] for f, _ in ours[0]) == sorted(pvm[:2] + pvm[3:])
    assert qemu[1] is ours[1] is True
    assert qemu[2] == ours[2]
