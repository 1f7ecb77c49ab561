"""QEMU's socket framing, the stream/pcap adapters, Xen's notify protocol and the
standalone drop-in as a real process."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import free_port
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.net import build
from pipeline.net.adapters import PcapReader, StreamClient, write_pcap
from pipeline.net.control import COLO_CHECKPOINT, DO_CHECKPOINT, PROXY_INIT, PROXY_INIT_REPLY
from pipeline.net.framing import FrameDecoder, encode_frame
from pipeline.net.settings import MAX_FRAME_BYTES, NetSettings

G, C = "10.0.0.2", "10.0.0.1"
#: how long a reply may take before a test fails: only bounds a hang (a freshly started
#: comparator on a loaded machine can take seconds to import and answer)
WAIT = 45


@hsettings(max_examples=50, deadline=None)
@given(frames=st.lists(st.binary(min_size=0, max_size=300), max_size=8),
       cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=30),
       vnet=st.booleans())
def test_decoder_yields_the_same_frames_however_the_stream_is_cut(frames, cuts, vnet):
    stream = b"".join(encode_frame(f, min(2, len(f)), vnet) for f in frames)
    decoder = FrameDecoder(vnet)
    out, pos = [], 0
    for cut in cuts:
        out += decoder.feed(stream[pos:pos + cut])
        pos += cut
    out += decoder.feed(stream[pos:])
    assert [f for f, _ in out] == frames
    if vnet:
        assert [v for _, v in out] == [min(2, len(f)) for f in frames]


def test_oversized_frame_is_counted_skipped_and_the_stream_stays_in_step():
    reasons = []
    decoder = FrameDecoder(False, on_malformed=reasons.append)
    big = struct.pack("!I", MAX_FRAME_BYTES + 1) + bytes(MAX_FRAME_BYTES + 1)
    stream = encode_frame(b"one") + big + encode_frame(b"two")
    out = []
    for i in range(0, len(stream), 4096):
        out += decoder.feed(stream[i:i + 4096])
    assert [f for f, _ in out] == [b"one", b"two"]
    assert decoder.malformed == 1 and "69633 exceeds 69632" in reasons[0]


def test_vnet_length_beyond_frame_is_counted_and_skipped():
    decoder = FrameDecoder(True)
    stream = struct.pack("!II", 4, 9) + b"abcd" + encode_frame(b"ok", 0, True)
    assert decoder.feed(stream) == [(b"ok", 0)]
    assert decoder.malformed == 1


@pytest.mark.parametrize("table, key", [
    ({"compare_timeout_ms": 0}, "net.compare_timeout_ms"),
    ({"max_connections": -1}, "net.max_connections"),
    ({"vnet_hdr": "yes"}, "net.vnet_hdr"),
    ({"outdev": "udp:1.2.3.4:5"}, "net.outdev"),
    ({"no_such_key": 1}, "net.no_such_key"),
    ({"primary_in": "unix:/x", "secondary_in": "unix:/x"}, "net.secondary_in"),
])
def test_settings_name_the_bad_key(table, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        NetSettings.from_dict(table)


class Standalone:
    """Our comparator as a real process on unix sockets in a temp dir."""

    def __init__(self, *extra: str, inputs=("pin", "sin"), outdev="out"):
        self.tmp = tempfile.mkdtemp(prefix="ncmp-sa-")
        self.path = {r: os.path.join(self.tmp, r + ".sock") for r in ("pin", "sin", "out", "ntf")}
        self.cmd = [sys.executable, "-m", "pipeline.net.standalone",
                    "--primary-in", "unix:" + self.path["pin"],
                    "--secondary-in", "unix:" + self.path["sin"],
                    "--outdev", "unix:" + self.path["out"],
                    "--notify-dev", "unix:" + self.path["ntf"], "--log-level", "WARNING", *extra]
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True)
        self.pin = StreamClient("unix:" + self.path["pin"], timeout=20)
        self.sin = StreamClient("unix:" + self.path["sin"], timeout=20)
        self.out = StreamClient("unix:" + self.path["out"], timeout=20)
        self.ntf = StreamClient("unix:" + self.path["ntf"], timeout=20)

    def stop(self) -> tuple[dict, str]:
        for c in (self.pin, self.sin, self.out, self.ntf):
            c.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        counters = json.loads(err.strip().splitlines()[-1])["counters"]
        return counters, err


@pytest.fixture
def standalone():
    procs = []

    def start(*extra):
        s = Standalone(*extra)
        procs.append(s)
        return s
    yield start
    for s in procs:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(5)
        import shutil
        shutil.rmtree(s.tmp, ignore_errors=True)


@pytest.mark.timeout(240)
def test_standalone_counts_malformed_frames_and_keeps_comparing(standalone):
    s = standalone()
    good = build.udp_frame(G, C, 53, 999, b"fine")
    garbage = [b"", b"\x01" * 5, build.ethernet(b"\x45" + bytes(3), 0x0800), os.urandom(200)]
    for g in garbage:
        s.pin.send(g)
    s.pin.sock.sendall(struct.pack("!I", 70000) + bytes(70000))        # over 69632
    s.pin.send(good)
    s.sin.send(good)
    assert [f for f, _ in s.out.recv_until(1, WAIT)] == [good]
    counters, err = s.stop()
    assert counters["malformed_frames"] >= len(garbage)           # random bytes may parse
    assert "70000 exceeds 69632" in err
    assert counters["frames_released"] == 1
    assert s.proc.returncode == 0


@pytest.mark.timeout(240)
def test_xen_notify_protocol(standalone):
    s = standalone("--compare-timeout-ms", "300", "--expired-scan-ms", "50")
    s.ntf.send(PROXY_INIT)
    assert s.ntf.recv_until(1, WAIT) == [(PROXY_INIT_REPLY, 0)]
    # a PVM frame the SVM never sends: its timeout asks for a checkpoint
    held = build.udp_frame(G, C, 53, 999, b"the SVM never sends this")
    s.pin.send(held)
    assert s.ntf.recv_until(1, WAIT) == [(DO_CHECKPOINT, 0)]
    # in the same epoch a divergence (and the held frame's timeout, on every scan) does not
    # ask again; a matching pair behind the diverging one on both streams comes out once the
    # divergence was seen, and nothing held comes out before the checkpoint
    diverged = build.udp_frame(G, C, 54, 999, b"pvm")
    s.pin.send(diverged)
    s.sin.send(build.udp_frame(G, C, 54, 999, b"svm"))
    sentinel = build.udp_frame(G, C, 55, 999, b"matched")
    s.pin.send(sentinel)
    s.sin.send(sentinel)
    assert [f for f, _ in s.out.recv_until(1, WAIT)] == [sentinel]
    s.ntf.send(COLO_CHECKPOINT)
    assert [f for f, _ in s.out.recv_until(2, WAIT)] == [held, diverged]
    s.ntf.send(b"NONSENSE")
    late = build.udp_frame(G, C, 56, 999, b"never matched")
    s.pin.send(late)                                               # new epoch: may ask again
    assert s.ntf.recv_until(1, WAIT) == [(DO_CHECKPOINT, 0)]
    counters, err = s.stop()
    assert counters["checkpoint_requests"] == 2 and counters["timeouts"] == 2
    assert counters["mismatches"] == 1 and counters["requests_coalesced"] == 1
    assert "unsupported message b'NONSENSE'" in err


@pytest.mark.timeout(240)
def test_pcap_replay_to_pcap(tmp_path):
    pvm = [build.udp_frame(G, C, 1000 + i, 53, b"q%d" % i) for i in range(10)]
    pvm += [build.tcp_frame(G, C, 80, 4000, 1 + 100 * i, 1, 0x18, bytes([i]) * 100)
            for i in range(10)]
    svm = [build.udp_frame(G, C, 1000 + i, 53, b"q%d" % i, ip_id=7) for i in range(10)]
    svm += [build.tcp_frame(G, C, 80, 4000, 1, 1, 0x18, b"".join(bytes([i]) * 100
                                                                  for i in range(10)))]
    write_pcap(str(tmp_path / "pvm.pcap"), pvm)
    write_pcap(str(tmp_path / "svm.pcap"), svm)
    out = tmp_path / "out.pcap"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.net.standalone", "--primary-in",
         f"pcap:{tmp_path / 'pvm.pcap'}", "--secondary-in", f"pcap:{tmp_path / 'svm.pcap'}",
         "--outdev", f"pcap:{out}", "--exit-at-eof", "--log-level", "WARNING"],
        capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(PcapReader(str(out)).frames) == sorted(pvm)


def test_pcap_reader_rejects_non_pcap(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a pcap file at all, sorry")
    with pytest.raises(ValueError, match="not a pcap file"):
        PcapReader(str(bad))


def test_standalone_rejects_bad_settings():
    proc = subprocess.run([sys.executable, "-m", "pipeline.net.standalone", "--primary-in",
                           "unix:/tmp/x", "--secondary-in", "unix:/tmp/y", "--outdev",
                           "carrier-pigeon:1", "--compare-timeout-ms", "5"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "net.outdev" in proc.stderr


def test_guest_output_frames_match_across_ip_ids_and_name_bad_input():
    from pipeline.net.comparator import Comparator
    released = []
    cmp = Comparator(NetSettings(), lambda f, v: released.append(f), lambda c, d: None)
    pvm = build.guest_output_frame(b"out-1", flow=3, ip_id=1)
    cmp.push_primary(pvm)
    cmp.push_secondary(build.guest_output_frame(b"out-1", flow=3, ip_id=2))
    assert released == [pvm]
    with pytest.raises(ValueError, match="70000 bytes"):
        build.guest_output_frame(bytes(70000))
    with pytest.raises(ValueError, match="flow 50000"):
        build.guest_output_frame(b"x", flow=50000)


@pytest.mark.timeout(240)
def test_standalone_over_tcp_addresses():
    base = free_port(4)     # below the ephemeral range: nothing takes them before the bind
    ports = [base + i for i in range(4)]
    addr = [f"tcp:127.0.0.1:{p}" for p in ports]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.net.standalone", "--primary-in",
                             addr[0], "--secondary-in", addr[1], "--outdev", addr[2],
                             "--notify-dev", addr[3], "--log-level", "WARNING"],
                            stderr=subprocess.PIPE, text=True)
    try:
        pin, sin, out, ntf = (StreamClient(a, timeout=20) for a in addr)
        frame = build.tcp_frame(G, C, 80, 4000, 1, 1, 0x18, b"over tcp")
        pin.send(frame)
        sin.send(frame)
        assert [f for f, _ in out.recv_until(1, WAIT)] == [frame]
        ntf.send(PROXY_INIT)
        assert ntf.recv_until(1, WAIT) == [(PROXY_INIT_REPLY, 0)]
        for c in (pin, sin, out, ntf):
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


@pytest.mark.timeout(120)
def test_standalone_holds_the_pvm_back_at_its_bound_and_loses_nothing(standalone):
    """`colo-pipeline compare` with a queue bound of 16 and a PVM burst of 3000 frames
    (TCP, UDP, ICMP, GRE) the SVM never answers: the notify peer answers every
    DO_CHECKPOINT; every PVM frame comes out once, in order."""
    # the burst's last frames (fewer than the bound) are released by the compare
    # timeout's checkpoint, as the SVM never answers: 5 s, not 60, keeps the test short
    s = standalone("--max-queue-frames", "16", "--compare-timeout-ms", "5000")
    s.ntf.send(PROXY_INIT)
    assert s.ntf.recv_until(1, WAIT) == [(PROXY_INIT_REPLY, 0)]
    pvm = []
    for i in range(750):
        body = i.to_bytes(4, "big") * 8
        pvm.append(build.tcp_frame(G, C, 80, 4000, 1 + 32 * i, 1, 0x18, body, ip_id=i))
        pvm.append(build.udp_frame(G, C, 53, 999, body, ip_id=i))
        pvm.append(build.icmp_echo_frame(G, C, 9, i, body, ip_id=i))
        pvm.append(build.ethernet(build.ipv4(G, C, 47, body, ip_id=i), 0x0800))
    sender = threading.Thread(target=s.pin.send_many, args=(pvm,), daemon=True)
    sender.start()
    got: list[bytes] = []
    answered = 0
    deadline = time.monotonic() + 90
    while len(got) < len(pvm) and time.monotonic() < deadline:
        for message, _ in s.ntf.recv(0.01):
            assert message == DO_CHECKPOINT
            s.ntf.send(COLO_CHECKPOINT)
            answered += 1
        got += [f for f, _ in s.out.recv(0.01)]
    sender.join(10)
    assert got == pvm
    counters, _ = s.stop()
    assert counters["primary_frames_dropped"] == 0 and counters["frames_released"] == len(pvm)
    assert counters["backpressures"] >= 1 and counters["held_frames_peak"] <= 4 * 16
    assert answered >= 1 and counters["checkpoint_requests"] == answered


def test_epoch_boundaries_decode_in_place_however_the_stream_is_cut():
    from pipeline.net.framing import (BOUNDARY_COMMITTED, BOUNDARY_ROLLED_BACK,
                                      BOUNDARY_SNAPSHOT, Boundary, encode_boundary)
    a, b = build.udp_frame(G, C, 1, 2, b"a"), build.udp_frame(G, C, 1, 2, b"b")
    stream = (encode_frame(a) + encode_boundary(BOUNDARY_SNAPSHOT, 7) + encode_frame(b)
              + encode_boundary(BOUNDARY_COMMITTED, 7) + encode_boundary(BOUNDARY_ROLLED_BACK,
                                                                        7, 9))
    want = [(a, 0), Boundary(BOUNDARY_SNAPSHOT, 7), (b, 0), Boundary(BOUNDARY_COMMITTED, 7),
            Boundary(BOUNDARY_ROLLED_BACK, 7, 9)]
    for step in (1, 3, 7, len(stream)):
        d = FrameDecoder(False)
        got = []
        for i in range(0, len(stream), step):
            got += d.feed(stream[i:i + step])
        assert got == want and d.boundaries == 3 and d.malformed == 0
    bad = FrameDecoder(False)
    assert bad.feed(struct.pack("!IIQQ", 0xFFFFFFFF, 9, 1, 0) + encode_frame(a)) == [(a, 0)]
    assert bad.malformed == 1
    with pytest.raises(ValueError, match="unknown boundary kind"):
        encode_boundary(9, 1)
