"""node.role = "auto": the settings of each role, and the role a starting node takes from
what the witness says (the demo's local witness here; the end-to-end cycles with etcd
are tests/test_failover_reprotect.py)."""
from __future__ import annotations

import threading

from conftest import cli

from pipeline import config, sockets
from pipeline.failover.roles import decide_role, effective_settings
from pipeline.failover.witness import LocalWitness

KEY = "/colo/vm1/active"


def auto_settings(tmp_path, name: str = "a", listen: str = "tcp://10.0.0.1:7400",
                  peer: str = "tcp://10.0.0.2:7400", **heartbeat):
    return config.from_dict({
        "node": {"name": name, "role": "auto", "listen": listen},
        "peer": {"address": peer},
        "security": {"mode": "plaintext"},
        "heartbeat": heartbeat,
        "failover": {"witness": "local", "witness_dir": str(tmp_path / "w"),
                     "witness_key": KEY, "lease_ttl_s": 2}})


def test_each_role_uses_the_secondarys_address(tmp_path):
    s = auto_settings(tmp_path)
    sec, prim = effective_settings(s, "secondary"), effective_settings(s, "primary")
    assert (sec.node.role, sec.peer.address) == ("secondary", "tcp://10.0.0.1:7400")
    assert (prim.node.role, prim.peer.address) == ("primary", "tcp://10.0.0.2:7400")
    assert sockets.peer_endpoints(sec)["heartbeat"] == "tcp://10.0.0.1:7403"


def test_a_node_whose_peer_is_active_becomes_its_secondary(tmp_path):
    s = auto_settings(tmp_path)
    assert decide_role(s)[0] == "primary"            # nobody holds the role
    peer = LocalWitness(str(tmp_path / "w"), KEY, 2)
    assert peer.acquire("b", 1)
    try:
        role, why = decide_role(s)
        assert role == "secondary" and "'b'" in why
    finally:
        peer.release()
    # the peer released it and held it last: nothing to wait for
    assert decide_role(s)[0] == "primary"


def test_a_restarted_last_holder_leaves_the_role_to_the_peer(tmp_path):
    """Node a held the role and restarts (its old claim still runs): its guest starts
    afresh, so it waits for its claim to lapse and for the peer to take over, and joins
    the peer as its secondary. The grace is made long, so only the peer's takeover can
    end the wait."""
    s = auto_settings(tmp_path, interval_ms=10000, miss_count=100)
    old = LocalWitness(str(tmp_path / "w"), KEY, 2)
    assert old.acquire("a", 1)
    assert decide_role(s, wait=False)[0] == "primary"   # check-config: one look
    result = {}
    t = threading.Thread(target=lambda: result.update(role=decide_role(s, poll_s=0.01)))
    t.start()
    peer = LocalWitness(str(tmp_path / "w"), KEY, 2)
    try:
        old.release()                       # a's old run is gone
        assert peer.acquire("b", 2)         # the peer takes over
        t.join(60)
        assert not t.is_alive()
        assert result["role"][0] == "secondary", result
    finally:
        peer.release()


def _auto_toml(tmp_path) -> str:
    """Host a's config file with role auto and a local witness (what check-config reads)."""
    return f"""
[node]
name = "a"
role = "auto"
listen = "tcp://127.0.0.1:7400"
[peer]
address = "tcp://127.0.0.1:7500"
[security]
mode = "plaintext"
[failover]
witness = "local"
witness_dir = "{tmp_path / 'w'}"
witness_key = "{KEY}"
"""


def test_check_config_explains_role_auto(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text(_auto_toml(tmp_path))
    r = cli("check-config", str(path))
    assert r.returncode == 0, r.stderr
    assert "role auto" in r.stdout and "becomes its secondary" in r.stdout
    assert "would run as primary" in r.stdout


def test_a_replicated_disk_follows_the_secondarys_address_and_check_config_says_so(tmp_path):
    """Role auto with a disk: each role's forwarding link is the secondary's address,
    port + 4 (the secondary binds it, the primary connects); a disk.forward in the file
    would be right for one role only, so it is refused naming the key."""
    disk = {"image": str(tmp_path / "a.img"), "export_size": 1 << 20,
            "export": f"unix:{tmp_path}/a.nbd"}
    s = config.from_dict({
        "node": {"name": "a", "role": "auto", "listen": "tcp://10.0.0.1:7400"},
        "peer": {"address": "tcp://10.0.0.2:7400"}, "security": {"mode": "plaintext"},
        "failover": {"witness": "local", "witness_dir": str(tmp_path / "w"),
                     "witness_key": KEY}, "disk": disk})
    assert effective_settings(s, "secondary").disk.forward == "tcp://10.0.0.1:7404"
    assert effective_settings(s, "primary").disk.forward == "tcp://10.0.0.2:7404"
    path = tmp_path / "a.toml"
    path.write_text(_auto_toml(tmp_path) + f"""[disk]
image = "{tmp_path / 'a.img'}"
export_size = 1048576
""")
    r = cli("check-config", str(path))
    assert r.returncode == 0, r.stderr
    assert "tcp://127.0.0.1:7504" in r.stdout and "only the MiBs that differ" in r.stdout
    path.write_text(path.read_text() + 'forward = "tcp://127.0.0.1:9000"\n')
    r = cli("check-config", str(path))
    assert r.returncode == 2 and "disk.forward" in r.stderr, r.stderr


def test_the_svm_output_stream_follows_the_primary(tmp_path):
    """With a comparator (net.primary_in), the SVM's frames go to whichever host is the
    primary, at its address's port + 5; a fixed tcp: net.secondary_in would be right for
    one of the two roles only and is refused, naming the key."""
    import pytest

    from pipeline.schema import SettingError

    def with_net(**net):
        d = {"node": {"name": "a", "role": "auto", "listen": "tcp://10.0.0.1:7400"},
             "peer": {"address": "tcp://10.0.0.2:7400"}, "security": {"mode": "plaintext"},
             "failover": {"witness": "local", "witness_dir": str(tmp_path / "w"),
                          "witness_key": KEY}, "net": net}
        return config.from_dict(d)
    s = with_net(primary_in="unix:/run/colo/pvm.sock", outdev="tcp:0.0.0.0:7000")
    assert effective_settings(s, "primary").net.secondary_in == "tcp:10.0.0.1:7405"
    assert effective_settings(s, "secondary").net.secondary_in == "tcp:10.0.0.2:7405"
    one_machine = with_net(primary_in="unix:/run/pvm.sock", secondary_in="unix:/run/svm.sock")
    assert effective_settings(one_machine, "secondary").net.secondary_in == "unix:/run/svm.sock"
    with pytest.raises((SettingError, config.ConfigError), match="net.secondary_in"):
        with_net(primary_in="unix:/run/pvm.sock", secondary_in="tcp:10.0.0.1:7405")
    path = tmp_path / "a.toml"
    path.write_text(_auto_toml(tmp_path) + '[net]\nprimary_in = "unix:/run/pvm.sock"\n'
                    'outdev = "tcp:0.0.0.0:7000"\n')
    r = cli("check-config", str(path))
    assert r.returncode == 0, r.stderr
    assert "tcp:127.0.0.1:7405" in r.stdout and "tcp:127.0.0.1:7505" in r.stdout, r.stdout
    path.write_text(path.read_text() + 'secondary_in = "tcp:127.0.0.1:9000"\n')
    r = cli("check-config", str(path))
    assert r.returncode == 2 and "net.secondary_in" in r.stderr, r.stderr
