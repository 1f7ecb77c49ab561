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


# -- carried with the full sync (pipeline/failover/offsets.py, wire NET_OFFSETS) ------------
def _conf(tables: dict):
    from pipeline.config import from_dict
    return from_dict({"security": {"mode": "plaintext"}, **tables})


def test_net_offsets_record_round_trip_and_bad_bodies():
    from pipeline import wire
    rows = learnt().export_offsets()
    msg = wire.encode_net_offsets(rows)
    assert wire.decode_header(msg).name == "NET_OFFSETS"
    assert wire.decode_net_offsets(msg) == rows
    for body, what in ((b"\xff", "not UTF-8 JSON"), (b"{}", "not a JSON list of objects"),
                       (b"[1]", "not a JSON list of objects")):
        bad = wire._record(wire.NET_OFFSETS, 0, body)
        with pytest.raises(wire.WireError, match=what):
            wire.decode_net_offsets(bad)


def _settings(tmp_path, pid_file: str = ""):
    return _conf({
        "net": {"primary_in": "packet:eth9", "redirector_in": "tcp:127.0.0.1:9100",
                "redirector_out": "tcp:127.0.0.1:9101",
                "redirector_offsets": str(tmp_path / "offsets.json")},
        "failover": {"redirector_pid_file": pid_file}})


def test_the_secondary_writes_the_rows_whole_and_tells_the_redirector(tmp_path):
    """The secondary node's side: all rows written (what the primary's redirector
    exported), then SIGHUP to the redirector of the pid file; the redirector (a real
    process) loads them."""
    import os
    import signal
    import subprocess
    import sys

    from pipeline.failover.offsets import carried_offsets, take_carried_offsets
    pid_file = str(tmp_path / "redirector.pid")
    settings = _settings(tmp_path, pid_file)
    # a redirector on two unix streams the test listens on, its interfaces a veth pair in
    # a namespace of its own (no frames pass in this test)
    from netns_lab import IP, MISSING, NetnsLab
    if MISSING is not None:
        pytest.skip(MISSING)
    listeners = _redirector_streams(tmp_path)
    lab = NetnsLab(f"ro{os.getpid() % 10000}", ("h",))
    lab.veth("g", "h", "h")
    proc = subprocess.Popen(
        [IP, "netns", "exec", lab.ns["h"],
         sys.executable, "-m", "pipeline.net.redirector", "--svm", "g0", "--uplink", "g1",
         "--mirror-from", "unix:" + str(tmp_path / "mirror.sock"),
         "--compare-to", "unix:" + str(tmp_path / "compare.sock"),
         "--offsets-in", settings.net.redirector_offsets, "--pid-file", pid_file],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conns = [lst.accept()[0] for lst in listeners]
        assert proc.stdout.readline().strip() == "ready"
        rows = learnt().export_offsets()
        what = take_carried_offsets(settings, rows)
        assert what == (f"1 connections' offsets written to {settings.net.redirector_offsets}; "
                        f"SIGHUP sent to the redirector (pid {proc.pid})")
        assert carried_offsets(settings.net.redirector_offsets)[0] == rows
        line = proc.stderr.readline()        # (its log: warnings and errors only)
        assert "1 connections' offsets loaded from" in line, line
        # a malformed row: nothing written, the file keeps the good rows
        with pytest.raises(ValueError, match="offsets row 0"):
            take_carried_offsets(settings, [{"ip": 4}])
        assert carried_offsets(settings.net.redirector_offsets)[0] == rows
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        counters = json.loads(out.strip().splitlines()[-1])
        assert counters["offsets_loaded"] == 1 and counters["offsets_refused"] == 0, (counters,
                                                                                      err)
        for c in conns:
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for lst in listeners:
            lst.close()
        lab.close()


def test_offsets_without_a_place_for_them_are_refused(tmp_path):
    from pipeline.failover.offsets import carried_offsets, take_carried_offsets
    with pytest.raises(ValueError, match="net.redirector_offsets is not set"):
        take_carried_offsets(_conf({}), learnt().export_offsets())
    assert carried_offsets(str(tmp_path / "none.json"))[0] is None    # never failed over
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be read"):
        carried_offsets(str(tmp_path / "bad.json"))


def test_the_redirector_settings_go_together():
    from pipeline.config import ConfigError
    for net, key in (({"redirector_in": "tcp:127.0.0.1:1"}, "net.redirector_out"),
                     ({"redirector_offsets": "/x"}, "net.redirector_offsets"),
                     ({"redirector_in": "packet:eth0", "redirector_out": "tcp:h:2"},
                      "net.redirector_in")):
        with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
            _conf({"net": net})


def test_a_survivor_s_comparator_takes_the_guest_from_the_redirector():
    from pipeline.failover.roles import survivor_settings
    from pipeline.supervisor import sim_ports_settings
    s = _conf({
        "node": {"role": "auto", "listen": "tcp://10.0.0.1:7000", "name": "a"},
        "peer": {"address": "tcp://10.0.0.2:7000"},
        "failover": {"witness": "local", "witness_key": "/colo/vm/active"},
        "net": {"primary_in": "packet:tap0", "primary_out": "packet:tap0",
                "client_in": "packet:eth0", "outdev": "packet:eth0",
                "redirector_in": "tcp:127.0.0.1:9100", "redirector_out": "tcp:127.0.0.1:9101"}})
    net = survivor_settings(s).net
    assert (net.primary_in, net.primary_out) == ("tcp:127.0.0.1:9100", "tcp:127.0.0.1:9101")
    assert (net.client_in, net.outdev) == ("packet:eth0", "packet:eth0")
    assert net.secondary_in == "tcp:10.0.0.1:7005"
    # a sim guest standing in for the memory: its output ports feed no comparator stream
    ports = sim_ports_settings(survivor_settings(s)).net
    assert ports.primary_in == "" and ports.secondary_in == ""


def test_the_node_s_redirector_command_and_its_rules():
    """``net.redirector_by_node``: the redirector's command line from the host's config
    (the peer the primary), and the keys it needs, each named when missing."""
    from pipeline.config import ConfigError
    from pipeline.failover.roles import redirector_command
    auto = {"node": {"role": "auto", "listen": "tcp://10.0.0.1:7400", "name": "a"},
            "peer": {"address": "tcp://10.0.0.2:7400"},
            "failover": {"witness": "local", "witness_key": "/colo/vm/active",
                         "redirector_pid_file": "/run/r.pid"}}
    net = {"primary_in": "packet:tap0", "primary_out": "packet:tap0",
           "client_in": "packet:eth0", "outdev": "packet:eth0",
           "secondary_out": "tcp:0.0.0.0:7406", "redirector_in": "tcp:127.0.0.1:7407",
           "redirector_out": "tcp:127.0.0.1:7408", "redirector_offsets": "/var/o.json",
           "redirector_by_node": True}
    cmd = redirector_command(_conf(dict(auto, net=net)))
    assert cmd[1:] == ["-m", "pipeline.net.redirector", "--svm", "tap0", "--uplink", "eth0",
                       "--mirror-from", "tcp:10.0.0.2:7406", "--compare-to", "tcp:10.0.0.2:7405",
                       "--primary-in", "tcp:127.0.0.1:7407", "--primary-out",
                       "tcp:127.0.0.1:7408", "--pid-file", "/run/r.pid",
                       "--offsets-out", "/var/o.json", "--offsets-in", "/var/o.json"]
    for change, key in (({"client_in": "tcp:h:1"}, "net.client_in"),
                        ({"secondary_out": ""}, "net.secondary_out"),
                        ({"primary_in": "unix:/x"}, "net.primary_in")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _conf(dict(auto, net=dict(net, **change)))
    with pytest.raises(ConfigError, match=r"failover\.redirector_pid_file"):
        _conf(dict(auto, net=net, failover=dict(auto["failover"], redirector_pid_file="")))
    with pytest.raises(ConfigError, match=r"net\.redirector_by_node"):
        _conf({"net": net, "failover": {"redirector_pid_file": "/run/r.pid"}})


# -- checkpoints on a re-protected pair (net.redirector_control) ----------------------------
def test_a_checkpoint_drops_the_learnt_offsets_and_keeps_the_carried():
    """After a checkpoint the SVM holds the PVM's state: a connection opened while protected
    (offset learnt here) is in the PVM's space, one carried from before a failover is still
    in the survivor guest's, which the clients' differs from."""
    carried = learnt().export_offsets()
    rw = SeqRewriter()
    rw.load_offsets(carried)
    # a second connection, opened while protected: its offset learnt from the handshake
    rw.observe_client(build.tcp_frame(C, G, 6666, 80, 100, 0, TCP_SYN))
    rw.from_secondary(build.tcp_frame(G, C, 80, 6666, SVM_ISN, 101, TCP_SYN | TCP_ACK))
    rw.observe_client(build.tcp_frame(C, G, 6666, 80, 101, PVM_ISN + 1, TCP_ACK))
    assert sorted(r["client_port"] for r in rw.export_offsets()) == [5555, 6666]
    assert rw.reset_learnt() == (1, 1)
    assert rw.export_offsets() == carried
    # the learnt one goes out as the SVM sends it now (in the PVM's space), the carried
    # one still moved
    out = rw.from_secondary(build.tcp_frame(G, C, 80, 6666, PVM_ISN + 9, 105, TCP_ACK | TCP_PSH,
                                            b"x"))
    assert parse_frame(out).seq == PVM_ISN + 9
    out = rw.from_secondary(build.tcp_frame(G, C, 80, 5555, SVM_ISN + 9, 105, TCP_ACK | TCP_PSH,
                                            b"x"))
    assert parse_frame(out).seq == PVM_ISN + 9 and checksum_ok(out)


def test_the_redirector_answers_a_checkpoint_on_its_control_socket(tmp_path):
    """The secondary node's notice (CheckpointNotice) to a real redirector process:
    answered, counted, the carried offsets kept; with no redirector there, the notice says
    why and the caller goes on."""
    import os
    import signal
    import sys

    from netns_lab import MISSING, NetnsLab

    from pipeline.failover.offsets import CheckpointNotice
    if MISSING is not None:
        pytest.skip(MISSING)
    control = str(tmp_path / "redirector.ctl")
    assert "redirector.ctl" in CheckpointNotice(control).notify()     # nobody listens
    offsets = tmp_path / "offsets.json"
    offsets.write_text(json.dumps(learnt().export_offsets()))
    listeners = _redirector_streams(tmp_path)
    lab = NetnsLab(f"rc{os.getpid() % 10000}", ("h",))
    notice = None
    try:
        lab.veth("g", "h", "h")
        proc = lab.spawn("h", sys.executable, "-m", "pipeline.net.redirector", "--svm", "g0",
                         "--uplink", "g1", "--mirror-from", "unix:" + str(tmp_path / "mirror.sock"),
                         "--compare-to", "unix:" + str(tmp_path / "compare.sock"),
                         "--offsets-in", str(offsets), "--control", control)
        conns = [lst.accept()[0] for lst in listeners]
        assert proc.stdout.readline().strip() == "ready"
        notice = CheckpointNotice(control)
        assert notice.notify() == "" and notice.notify() == ""
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        counters = json.loads(out.strip().splitlines()[-1])
        assert counters["checkpoints"] == 2 and counters["offsets_reset"] == 0, (counters, err)
        assert counters["offsets_loaded"] == 1, counters
        # the redirector is gone: the next notice says so
        assert "redirector" in notice.notify()
        for c in conns:
            c.close()
    finally:
        if notice is not None:
            notice.close()
        for lst in listeners:
            lst.close()
        lab.close()


def _redirector_streams(tmp_path) -> list:
    """The two unix streams a redirector connects to (its mirror and compare sides),
    listening in ``tmp_path`` as mirror.sock and compare.sock."""
    import socket
    listeners = []
    for name in ("mirror", "compare"):
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(str(tmp_path / f"{name}.sock"))
        lst.listen(1)
        lst.settimeout(60)
        listeners.append(lst)
    return listeners
