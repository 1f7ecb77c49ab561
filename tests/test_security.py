"""CURVE on the host-to-host channels: only the peer's key gets in.

A real secondary node (CURVE server) faces intruders on its real ports: a plaintext
peer, a peer with a key of its own, and a peer that does not know the secondary's
key. None of their messages may reach a stage; then the real primary, with the right
key, connects and protects the guest.
"""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import zmq
import zmq.auth
from conftest import cli, wait_until
from zmq.utils.monitor import recv_monitor_message

from pipeline import config, wire
from pipeline.localpair import LocalPair
from pipeline.sockets import write_keypair


def test_keygen_writes_a_private_secret_key(tmp_path):
    r = cli("keygen", "--dir", str(tmp_path), "--name", "hostA")
    assert r.returncode == 0, r.stderr
    secret = tmp_path / "hostA.key_secret"
    public = tmp_path / "hostA.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec is not None and zmq.auth.load_certificate(str(public))[0] == pub


def test_loose_secret_key_permissions_are_refused(tmp_path):
    write_keypair(str(tmp_path), "a")
    write_keypair(str(tmp_path), "b")
    cfg = tmp_path / "node.toml"
    cfg.write_text("[security]\nkey_file = 'a.key_secret'\npeer_public_key_file = 'b.key'\n")
    assert cli("check-config", str(cfg)).returncode == 0
    os.chmod(tmp_path / "a.key_secret", 0o644)
    r = cli("check-config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}:security.key_file:" in r.stderr and "0644" in r.stderr
    assert "chmod 600" in r.stderr
    # a public key where the secret key belongs is refused too
    os.chmod(tmp_path / "b.key", 0o600)
    cfg.write_text("[security]\nkey_file = 'b.key'\npeer_public_key_file = 'a.key'\n")
    r = cli("check-config", str(cfg))
    assert r.returncode == 2 and "secret-key" in r.stderr


def _pages_record() -> bytes:
    n = 2
    return wire.encode_pages(0, np.arange(n, dtype=np.uint64), np.zeros((n, 32), np.uint8),
                             np.zeros(n, np.uint32), np.full(n, wire.ENC_ZERO, np.uint8), b"")


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def _try_to_send(s: zmq.Socket, endpoint: str, msg: bytes) -> None:
    """Connect ``s``, queue ``msg`` a few times, and wait for the handshake's outcome: it
    must fail (then nothing queued on ``s`` can ever reach the other side)."""
    mon = s.get_monitor_socket(HANDSHAKE_FAILED)
    try:
        s.connect(endpoint)
        for _ in range(5):
            try:
                s.send(msg, zmq.NOBLOCK)
            except zmq.Again:
                pass
        assert mon.poll(60_000), f"no handshake outcome with {endpoint}"
        event = recv_monitor_message(mon)["event"]
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, f"an intruder got in at {endpoint}"
    finally:
        s.disable_monitor()
        mon.close(0)


def _intrude(address: str, channel_port_offset: int, curve: dict | None) -> None:
    """Connect to one of the secondary's ports and try to send a record."""
    ctx = zmq.Context()
    try:
        kind = zmq.DEALER if channel_port_offset == 1 else zmq.PUSH
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if curve:
            s.curve_publickey, s.curve_secretkey = curve["public"], curve["secret"]
            s.curve_serverkey = curve["server"]
        host, port = address.rsplit(":", 1)
        msg = (wire.encode_hello(4096, wire.ROLE_PRIMARY, 1024, "intruder")
               if channel_port_offset == 1 else _pages_record())
        _try_to_send(s, f"{host}:{int(port) + channel_port_offset}", msg)
        s.close(0)
    finally:
        # destroy, not term: term waits for every socket to be closed, and a failed assert
        # in _try_to_send (an intruder let in) leaves ``s`` open: the suite would hang
        # there instead of failing
        ctx.destroy(linger=0)


@pytest.mark.slow
def test_only_the_peer_key_gets_in(tmp_path):
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 1024}},
                     workdir=str(tmp_path), log_level="info")
    try:
        pair.start(roles=("secondary",))
        node = pair.node("secondary")
        settings = config.load(pair.configs["primary"])
        address = settings.peer.address
        server_pub, _ = zmq.auth.load_certificate(settings.security.peer_public_key_file)
        rogue_pub, rogue_sec = zmq.auth.load_certificate(
            write_keypair(str(tmp_path / "rogue"), "rogue")[1])
        for offset in (0, 1, 2):                       # pages, control, inputs
            _intrude(address, offset, None)            # plaintext peer
            _intrude(address, offset, {"public": rogue_pub, "secret": rogue_sec,
                                       "server": server_pub})            # unknown client key
            _intrude(address, offset, {"public": rogue_pub, "secret": rogue_sec,
                                       "server": rogue_pub})             # wrong server key
        stages = node.snapshot()["stages"]
        assert stages["receive"]["items_in"] == 0
        assert stages["mirror"]["items_in"] == 0 and stages["mirror"]["errors"] == 0
        assert node.node_info()["state"] == "waiting"   # no HELLO got through
        assert "refused a connection with an unknown CURVE key" in pair.log_tail(
            "secondary", 50000)
        # the real primary, with the right key, gets in and protects the guest
        pair.start_node("primary")
        pair.wait_protected(timeout=120)
        assert node.snapshot()["stages"]["receive"]["items_in"] > 0
    finally:
        codes = pair.stop()
    assert codes.get("secondary") == 0


@pytest.mark.slow
def test_plaintext_mode_warns_at_start(tmp_path):
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 1024},
                      "security": {"mode": "plaintext"}}, workdir=str(tmp_path))
    try:
        pair.start()
        pair.wait_protected(timeout=120)
    finally:
        pair.stop()
    for role in ("primary", "secondary"):
        assert "PLAINTEXT" in pair.log_tail(role, 50000)


@pytest.mark.slow
def test_disk_forwarding_link_admits_only_the_primary(tmp_path):
    """The PVM's disk writes travel over CURVE too: a peer without the primary's key
    cannot put a single write into the secondary's buffer."""
    disk = {"export_size": 4 << 20, "forward": "tcp://127.0.0.1:{fwd}"}
    from pipeline.localpair import free_port_base
    fwd = free_port_base(1)
    roles = {r: {"disk": {**disk, "forward": f"tcp://127.0.0.1:{fwd}",
                          "image": f"{{workdir}}/{r}.img",
                          "export": f"unix:{{workdir}}/{r}.nbd"}}
             for r in ("primary", "secondary")}
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 1024}},
                     workdir=str(tmp_path), role_tables=roles)
    try:
        pair.start(roles=("secondary",))
        node = pair.node("secondary")
        wait_until(lambda: "disk" in node.stage_names, timeout=60, what="the disk stage")
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            _try_to_send(s, f"tcp://127.0.0.1:{fwd}", b"\x00" * 64)   # plaintext intruder
            s.close(0)
        finally:
            ctx.destroy(linger=0)      # (as in _intrude: a failed assert leaves s open)
        d = node.stage("disk").as_dict()
        assert d["received"] == 0 and d["bad_forwards"] == 0   # nothing reached the stage
        pair.start_node("primary")
        pair.wait_protected(timeout=120)
    finally:
        codes = pair.stop()
    assert codes.get("secondary") == 0
