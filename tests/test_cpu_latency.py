"""node.cpu_latency_us: a node holds the CPUs' wake-up latency limit (the kernel's PM QoS
request on /dev/cpu_dma_latency) for as long as it runs (pipeline/cpu_latency.py).

Real device, real nodes. Another process on this machine (a benchmark, another pair) may
hold the device at the same time, and the value in force is the lowest of all requests:
so the tests assert on what THIS node holds (its supervisor's open file in /proc, what its
node info says it wrote) and only that the machine's value is at most it."""
from __future__ import annotations

import os

import pytest
from conftest import cli, wait_until

from pipeline import config, cpu_latency
from pipeline.localpair import LocalPair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the tests that hold the real device (it is root's, mode 0600)
device = pytest.mark.skipif(not os.path.exists(cpu_latency.DEVICE),
                            reason=f"this kernel has no {cpu_latency.DEVICE} (PM QoS)")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason=f"{cpu_latency.DEVICE} is root's")

SMALL = {
    "guest": {"backend": "sim", "page_count": 1024},
    "guest.workload": {"input_rate_hz": 100.0, "pages_per_input": 4},
    "checkpoint": {"max_interval_ms": 100, "min_interval_ms": 5},
}


def holders(pid: int) -> list[str]:
    """The fds of process ``pid`` open on the PM QoS device."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == cpu_latency.DEVICE:
                out.append(fd)
        except FileNotFoundError:       # closed while we looked
            pass
    return out


@pytest.mark.slow
@device
@pytest.mark.root
@as_root
def test_a_node_holds_its_limit_for_its_life_and_its_stages_do_not():
    """The primary (cpu_latency_us = 7) holds the device from start to stop, in its
    supervisor only (its stages, forked after the hold, closed their copies); the
    secondary (-1) holds nothing; stats and node info say so; the stop releases it."""
    with LocalPair({**SMALL, "node": {"cpu_latency_us": 7}}, log_level="info",
                   role_tables={"secondary": {"node": {"cpu_latency_us": -1}}}) as pair:
        pair.start()
        pair.wait_protected(timeout=120)
        info = pair.node("primary").node_info()
        supervisor = pair.procs["primary"].pid
        assert info["pid"] == supervisor
        wake = info["cpu_latency"]
        assert wake["held"] is True and wake["requested_us"] == 7, wake
        assert wake["device"] == cpu_latency.DEVICE and wake["in_force_us"] <= 7, wake
        assert len(holders(supervisor)) == 1, "the supervisor holds one request"
        assert cpu_latency.in_force_us() <= 7       # the machine's: ours, or lower
        stages = info["stage_pids"]
        assert stages and all(not holders(pid) for pid in stages.values()), \
            {name: holders(pid) for name, pid in stages.items()}

        sec = pair.node("secondary").node_info()
        assert sec["cpu_latency"]["held"] is False
        assert "-1" in sec["cpu_latency"]["why_not"]
        assert not holders(pair.procs["secondary"].pid)

        r = cli("stats", "--node", pair.name("primary"))
        assert r.returncode == 0, r.stderr
        assert "CPU wake-up latency held at 7 us" in r.stdout, r.stdout
        # stats reads the machine's value when it runs: another process asking for less
        # (this one, 3 us; others on the machine may ask for less still)
        mine = cpu_latency.hold(3)
        try:
            assert mine.held
            r = cli("stats", "--node", pair.name("primary"))
            prom = cli("stats", "--node", pair.name("primary"), "--prometheus").stdout
        finally:
            mine.release()
        line = next(ln for ln in r.stdout.splitlines() if "wake-up latency" in ln)
        now = int(line.split("in force now: ")[1].split()[0])
        assert now <= 3 and line.endswith("(another process asks for less)"), line
        assert "LOST" not in line, line
        node = pair.name("primary")
        assert f'colo_cpu_latency_held{{node="{node}"}} 1.0' in prom, prom
        gauge = [ln for ln in prom.splitlines()
                 if ln.startswith(f'colo_cpu_latency_in_force_us{{node="{node}"}}')]
        assert len(gauge) == 1 and float(gauge[0].split()[-1]) <= 3, gauge
        codes = pair.stop()
        assert codes == {"primary": 0, "secondary": 0}, codes
        log = pair.log_tail("primary", 200_000)
        assert "event=cpu_latency_held 7 us" in log
        assert "event=cpu_latency_released" in log, log[-3000:]


@pytest.mark.slow
@device
@pytest.mark.root
@as_root
def test_a_node_that_cannot_hold_it_runs_on_and_says_why():
    """The open fails (fault point ``cpu_latency.open`` with errno EACCES, as for a node
    that is not root): one line names the device and the error, node info shows
    held = false with the reason, and the node runs on: the pair gets protected."""
    with LocalPair(SMALL) as pair:
        pair.start(faults={"primary": "cpu_latency.open:errno=EACCES"})
        pair.wait_protected(timeout=120)
        assert pair.fault_fired("primary", "cpu_latency.open", 1)
        info = pair.node("primary").node_info()
        wake = info["cpu_latency"]
        assert wake["held"] is False and wake["requested_us"] == 0, wake
        assert cpu_latency.DEVICE in wake["why_not"], wake
        assert "Permission denied" in wake["why_not"], wake
        assert not holders(pair.procs["primary"].pid)
        lines = [ln for ln in pair.log_tail("primary", 200_000).splitlines()
                 if "event=cpu_latency_not_held" in ln]
        assert len(lines) == 1, lines
        assert f"cannot hold {cpu_latency.DEVICE} at 0 us: Permission denied" in lines[0]
        # the secondary, without the fault, holds the default (0)
        sec = pair.node("secondary").node_info()["cpu_latency"]
        assert sec["held"] is True and sec["requested_us"] == 0, sec
        r = cli("stats", "--node", pair.name("primary"))
        assert "CPU wake-up latency not held: cannot hold" in r.stdout, r.stdout
        # what is in force all the same: the secondary's 0, on the same machine
        assert "; in force now: 0 us" in r.stdout, r.stdout


@pytest.mark.slow
@device
@pytest.mark.root
@as_root
def test_the_survivor_of_a_failover_holds_on_and_a_dead_stage_releases_it():
    """The hold's other ways: the secondary that takes over (the primary node killed whole,
    as a lost host) still holds its request in its supervisor; a node stopped by a dead
    stage (fault point stage.snapshot.loop, SIGKILL) releases it before it exits."""
    with LocalPair({**SMALL, "node": {"cpu_latency_us": 9}}, log_level="info") as pair:
        pair.start()
        pair.wait_protected(timeout=120)
        wait_until(lambda: pair.stage_counter("heartbeat", "items_in", "secondary") > 0,
                   timeout=60, what="the secondary hearing the primary's heartbeat")
        pair.kill("primary")
        info = pair.wait_info("role", "active", role="secondary")
        assert info["cpu_latency"]["held"] is True, info["cpu_latency"]
        assert len(holders(pair.procs["secondary"].pid)) == 1
        r = cli("stats", "--node", pair.name("secondary"))
        assert "CPU wake-up latency held at 9 us" in r.stdout and "LOST" not in r.stdout, \
            r.stdout
    with LocalPair(SMALL, log_level="info") as pair:
        pair.start(faults={"primary": "stage.snapshot.loop:20:kill"})
        assert pair.wait_exit("primary") == 1
        log = pair.log_tail("primary", 200_000)
        assert "stage snapshot killed by signal 9" in log, log[-3000:]
        assert "event=cpu_latency_released" in log, log[-3000:]


@pytest.mark.parametrize("value", [-2, 2_000_000_001, "0", 1.5, True])
def test_a_bad_value_is_refused_naming_the_key(value, tmp_path):
    with pytest.raises(config.ConfigError, match=r"node\.cpu_latency_us"):
        config.from_dict({"node": {"cpu_latency_us": value},
                          "security": {"mode": "plaintext"}}, "x.toml")
    path = tmp_path / "bad.toml"
    path.write_text(f"[node]\ncpu_latency_us = {value!r}\n".replace("True", "true")
                    + "[security]\nmode = \"plaintext\"\n")
    r = cli("check-config", str(path))
    assert r.returncode == 2 and f"{path}:node.cpu_latency_us" in r.stderr + r.stdout, \
        (r.stdout, r.stderr)


@device
@pytest.mark.root
@as_root
def test_the_hold_in_one_process_is_released_on_close_and_not_inherited():
    """The module alone: a request is in force while its file is open, a forked child
    has no copy, and release() closes it."""
    h = cpu_latency.hold(5)
    try:
        assert h.held and h.in_force_us <= 5 and cpu_latency.in_force_us() <= 5
        assert len(holders(os.getpid())) == 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, str(len(holders(os.getpid()))).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(r, 16) == b"0", "a forked child inherited the request"
        os.close(r)
        os.close(w)
    finally:
        h.release()
    assert not h.held and not holders(os.getpid())
    h.release()     # idempotent


def test_the_bench_flag_reaches_both_nodes_and_every_row():
    """--cpu-latency-us of bench_service sets node.cpu_latency_us in both nodes' config (read
    back through the node's parser) and each row names it; without it the default. The
    benchmarks' JSON says what was in force during the run (cpu_latency_in_force). Plumbing
    only: no pair is started."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_service
    default = config.Settings().node.cpu_latency_us
    for argv, want in ((["--quick", "--cpu-latency-us", "-1"], -1), (["--quick"], default)):
        args = bench_service.parse_args(argv)
        for mode in bench_service.MODES:
            assert bench_service.mode_settings(mode, args)["cpu_latency_us"] == want
            assert bench_service.row_head(mode, 0, 1000, args)["cpu_latency_us"] == want
    with pytest.raises(config.ConfigError, match=r"node\.cpu_latency_us"):
        bench_service.mode_settings("colo", bench_service.parse_args(
            ["--cpu-latency-us", "-2"]))


def test_the_watch_of_the_value_in_force_says_what_it_saw(tmp_path):
    """InForceWatch (the benchmarks' record of the machine's value): reads the device's
    int32 until stopped; a device it cannot read gives no summary, not an error."""
    fake = tmp_path / "latency"
    fake.write_bytes((12).to_bytes(4, "little", signed=True))
    with cpu_latency.InForceWatch(0.001, str(fake)) as watch:
        wait_until(lambda: len(watch.values) >= 3, 30, "three samples of the value in force")
    s = watch.summary()
    assert s["min_us"] == s["max_us"] == 12 and s["share_held"] == 1.0, s
    with cpu_latency.InForceWatch(0.001, str(tmp_path / "none")) as missing:
        pass
    assert missing.summary() is None and "none" in missing.unreadable


def test_stats_says_when_a_node_has_lost_its_hold_or_the_value_cannot_be_read(tmp_path):
    """stats' line (cli._cpu_latency_line) from node info and the machine as they are when
    it runs, on a stand-in device file (not root's): a node whose process no longer has
    the device open, or whose value is not in force, has LOST its hold; a device that
    cannot be read says why instead of a value; nobody holding it says so."""
    from pipeline.cli import _cpu_latency_line
    fake = tmp_path / "latency"
    fake.write_bytes((12).to_bytes(4, "little", signed=True))
    info = {"held": True, "requested_us": 7, "device": str(fake), "in_force_us": 7}
    # this process stands for the node: it does not have the file open
    line = _cpu_latency_line(info, os.getpid())
    assert line.startswith("CPU wake-up latency held at 7 us (in force at start: 7 us); "
                           "in force now: 12 us"), line
    assert "LOST: its process has the device open no more" in line, line
    with open(fake, "rb"):          # it has: still lost, 12 is above what it asked
        assert cpu_latency.holds(os.getpid(), str(fake)) is True
        line = _cpu_latency_line(info, os.getpid())
        assert "LOST: the value in force is above what it asked" in line, line
        fake.write_bytes((7).to_bytes(4, "little", signed=True))
        line = _cpu_latency_line(info, os.getpid())
        assert line.endswith("in force now: 7 us"), line
        fake.write_bytes((0).to_bytes(4, "little", signed=True))
        assert _cpu_latency_line(info, os.getpid()).endswith(
            "in force now: 0 us (another process asks for less)")
    assert cpu_latency.holds(os.getpid(), str(fake)) is False
    assert cpu_latency.holds(2 ** 22 + 1, str(fake)) is False      # no such process
    off = {"held": False, "requested_us": -1, "device": str(fake),
           "why_not": "off (node.cpu_latency_us = -1)"}
    fake.write_bytes(cpu_latency.NOBODY_US.to_bytes(4, "little", signed=True))
    assert _cpu_latency_line(off, os.getpid()) == (
        "CPU wake-up latency not held: off (node.cpu_latency_us = -1); in force now: none "
        "(2000000000: nobody holds it)")
    gone = dict(off, device=str(tmp_path / "none"))
    line = _cpu_latency_line(gone, os.getpid())
    assert line.endswith(f"in force now: unknown (cannot read {tmp_path / 'none'}: No such "
                         f"file or directory)"), line
