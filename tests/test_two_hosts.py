"""`colo-pipeline run --config` for both roles, as on two hosts: each node in a network
namespace of its own, joined by a veth pair, from configs generated out of the shipped
examples (config/primary.toml, config/secondary.toml), keys made with `colo-pipeline
keygen`, every channel over CURVE. The pair protects the guest and proves both memories
equal, and both nodes stop cleanly on SIGTERM.

Departure from two real hosts: /dev/shm and the filesystem are shared, so the takeover
guard is the one-machine local witness instead of the examples' etcd."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
import uuid

import pytest
from conftest import cli, free_port, wait_until

from pipeline.checkpoint_api import CheckpointClient
from pipeline.counters import NodeCounters, NodeNotRunning
from pipeline.localpair import render_toml
from pipeline.shm import cleanup_segments, list_segments, segment_prefix

IP = shutil.which("ip")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDR = {"primary": "10.98.0.1", "secondary": "10.98.0.2"}

pytestmark = [
    pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(IP is None, reason="iproute2 (ip) is not installed"),
]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


@pytest.fixture
def hosts():
    """Two network namespaces ("hosts") joined by a veth pair; their names by role."""
    tag = uuid.uuid4().hex[:6]
    ns = {role: f"colo{role[0]}{tag}" for role in ADDR}
    try:
        for role, name in ns.items():
            sh(IP, "netns", "add", name)
            sh(IP, "-n", name, "link", "set", "lo", "up")
        sh(IP, "link", "add", f"cva{tag}", "netns", ns["primary"], "type", "veth",
           "peer", "name", f"cvb{tag}", "netns", ns["secondary"])
        for role, dev in (("primary", f"cva{tag}"), ("secondary", f"cvb{tag}")):
            sh(IP, "-n", ns[role], "addr", "add", f"{ADDR[role]}/24", "dev", dev)
            sh(IP, "-n", ns[role], "link", "set", dev, "up")
        yield ns
    finally:
        for name in ns.values():
            subprocess.run([IP, "netns", "del", name], capture_output=True)


def make_config(role: str, workdir: str, name: str, port: int) -> str:
    """The shipped example of ``role``, pointed at this test's hosts, keys and guest."""
    with open(os.path.join(REPO, "config", f"{role}.toml"), "rb") as f:
        tables = tomllib.load(f)
    flat: dict[str, dict] = {}

    def walk(prefix: str, table: dict) -> None:   # dotted tables (guest.workload) apart
        flat[prefix] = {k: v for k, v in table.items() if not isinstance(v, dict)}
        for k, v in table.items():
            if isinstance(v, dict):
                walk(f"{prefix}.{k}", v)
    for key, value in tables.items():
        walk(key, value)
    peer = "secondary" if role == "primary" else "primary"
    flat["node"].update(name=name, run_dir=os.path.join(workdir, f"run-{role}"))
    flat["peer"]["address"] = f"tcp://{ADDR['secondary']}:{port}"
    flat["guest"]["page_count"] = 2048
    flat["checkpoint"].update(max_interval_ms=200, epoch_timeout_ms=60000)
    flat["security"].update(key_file=os.path.join(workdir, "keys", f"{role}.key_secret"),
                            peer_public_key_file=os.path.join(workdir, "keys", f"{peer}.key"))
    flat["failover"] = {"witness": "local", "witness_dir": os.path.join(workdir, "witness")}
    flat.pop("metrics", None)
    path = os.path.join(workdir, f"{role}.toml")
    with open(path, "w") as f:
        f.write(render_toml(dict(sorted(flat.items()))))
    return path


def test_run_config_on_two_hosts_over_curve(hosts, tmp_path):
    workdir = str(tmp_path)
    port = free_port(4)
    tag = uuid.uuid4().hex[:6]
    names = {role: f"twohost{tag}-{role}" for role in ADDR}
    for role in ADDR:
        r = cli("keygen", "--dir", os.path.join(workdir, "keys"), "--name", role)
        assert r.returncode == 0, r.stderr
    configs = {role: make_config(role, workdir, names[role], port) for role in ADDR}
    for role, path in configs.items():
        r = cli("check-config", path)
        assert r.returncode == 0, (role, r.stdout, r.stderr)
    procs: dict[str, subprocess.Popen] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
    try:
        for role in ("secondary", "primary"):   # the secondary first, as the README says
            log = open(os.path.join(workdir, f"{role}.log"), "wb")
            procs[role] = subprocess.Popen(
                [IP, "netns", "exec", hosts[role], sys.executable, "-m", "pipeline.cli",
                 "run", "--config", configs[role]], stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
            log.close()

        def attached(role: str):
            for p in procs.values():
                assert p.poll() is None, open(os.path.join(workdir, "primary.log")).read()[-3000:]
            try:
                return NodeCounters.attach(names[role])
            except NodeNotRunning:
                return None
        prim = wait_until(lambda: attached("primary"), timeout=120, what="the primary up")
        wait_until(lambda: prim.node_info().get("state") == "protected", timeout=300,
                   what="the primary protecting the guest")
        # the proof: a checkpoint where both sides hash all of guest memory
        before = prim.node_info().get("final_epoch", -1)
        client = CheckpointClient(os.path.join(workdir, "run-primary"), subscribe=False)
        client.request("request", "digest")
        client.close()
        info = wait_until(lambda: (lambda i: i if i.get("final_epoch", -1) > before else None)(
            prim.node_info()), timeout=120, what="the memory proof")
        assert info["memory_equal"] is True, info
        sec = NodeCounters.attach(names["secondary"])
        assert sec.node_info()["role"] == "secondary"
        assert sec.stage("receive").as_dict()["items_in"] > 0
        prim.close()
        sec.close()
        for role in ("primary", "secondary"):
            os.killpg(procs[role].pid, signal.SIGTERM)
        codes = {role: p.wait(60) for role, p in procs.items()}
        assert codes == {"primary": 0, "secondary": 0}, codes
        for role in ADDR:
            assert list_segments(segment_prefix(names[role])) == []
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for role in ADDR:
            cleanup_segments(segment_prefix(names[role]))
