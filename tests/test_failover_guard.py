"""The split-brain guard against a real etcd server, real fencing commands and real
processes: exactly one node gets the active role per generation, a higher generation
only after the holder's lease ran out or it released it, and a node that cannot reach
the witness, or whose fencing fails, does not go active and says why.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time

import pytest
from conftest import free_port, wait_until

from pipeline.failover.guard import Fence, FenceError, guard_takeover, make_fence
from pipeline.failover.witness import EtcdWitness, LocalWitness, WitnessError, make_witness
from pipeline.failover.settings import FailoverSettings

FORK = multiprocessing.get_context("fork")
TTL = 2   # etcd's smallest lease


@pytest.fixture
def witnesses():
    made = []

    def make(cls, *args, **kw):
        w = cls(*args, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        try:
            w.release()
        except WitnessError:
            w.close()


# -- etcd ---------------------------------------------------------------------------------
def test_two_nodes_racing_for_a_generation_exactly_one_wins_threads(etcd, witnesses):
    for i in range(30):
        key = f"/colo/race-{i}/active"
        a = witnesses(EtcdWitness, [etcd.url], key, TTL)
        b = witnesses(EtcdWitness, [etcd.url], key, TTL)
        barrier = threading.Barrier(2)
        won = {}

        def race(w, node, barrier=barrier, won=won):
            barrier.wait()
            won[node] = w.acquire(node, 1)

        ts = [threading.Thread(target=race, args=(a, "node-a")),
              threading.Thread(target=race, args=(b, "node-b"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        winners = [n for n, ok in won.items() if ok]
        assert len(winners) == 1, won
        assert a.holder() == {"node": winners[0], "generation": 1}
        # the loser cannot take the same generation later either
        loser = b if winners[0] == "node-a" else a
        assert not loser.acquire("node-b" if loser is b else "node-a", 1)
        a.release()
        b.release()


def test_the_compare_and_swap_decides_not_the_read(etcd, witnesses):
    """Both nodes read "free" before either writes: only the first transaction wins."""
    key = "/colo/cas/active"
    a = witnesses(EtcdWitness, [etcd.url], key, TTL)
    b = witnesses(EtcdWitness, [etcd.url], key, TTL)
    stale = {k: b._get(k) for k in (b.key, b.gen_key)}      # b reads the free role...
    assert stale[b.key][0] is None
    assert a.acquire("node-a", 1)                              # ...a takes it meanwhile
    b._get = lambda k: stale[k]                                # b acts on what it read
    assert not b.acquire("node-b", 1)
    assert not b.acquire("node-b", 2)
    del b._get
    assert b.holder() == {"node": "node-a", "generation": 1}


def _contender(url: str, key: str, node: str, start: float, conn) -> None:
    w = EtcdWitness([url], key, TTL)
    while time.time() < start:
        pass
    try:
        conn.send(w.acquire(node, 1))
    except WitnessError as exc:
        conn.send(str(exc))
    w.close()


def test_four_processes_racing_exactly_one_wins(etcd):
    for i in range(10):
        key = f"/colo/prace-{i}/active"
        start = time.time() + 0.5
        pipes, procs = [], []
        for n in range(4):
            parent, child = FORK.Pipe(duplex=False)
            p = FORK.Process(target=_contender, args=(etcd.url, key, f"node-{n}", start, child))
            p.start()
            pipes.append(parent)
            procs.append(p)
        results = [conn.recv() if conn.poll(20) else "no answer" for conn in pipes]
        for p in procs:
            p.join(10)
        assert sorted(map(str, results)) == ["False", "False", "False", "True"], results
        winner = f"node-{results.index(True)}"
        assert EtcdWitness([etcd.url], key, TTL).holder() == {"node": winner, "generation": 1}


def test_higher_generation_only_after_the_holders_lease_expired_or_it_released(etcd, witnesses):
    key = "/colo/vm1/active"
    a = witnesses(EtcdWitness, [etcd.url], key, TTL)
    b = witnesses(EtcdWitness, [etcd.url], key, TTL)
    assert a.acquire("pri", 1)
    assert a.acquire("pri", 1)           # the holder renews
    assert not b.acquire("sec", 2)       # held, and kept alive by a's keepalive thread
    first = a.valid_until()
    wait_until(lambda: a.valid_until() >= first + TTL, timeout=60,
               what="a renewal after the first lease would have run out")
    assert a.held and not b.acquire("sec", 2)
    assert a.holder() == {"node": "pri", "generation": 1}
    # a stops renewing (as if its host died): the role becomes free after its lease ran out
    a.close()
    stopped = time.monotonic()
    assert not b.acquire("sec", 2)
    wait_until(lambda: b.acquire("sec", 2), timeout=60, interval=0.1,
               what="the dead holder's lease expiring")
    waited = time.monotonic() - stopped
    assert b.holder() == {"node": "sec", "generation": 2} and b.last_generation() == 2
    # generations already granted are never granted again, to anyone
    assert not a.acquire("pri", 1) and not a.acquire("pri", 2)
    # release: the next generation can be taken at once
    b.release()
    assert b.holder() is None
    assert not a.acquire("pri", 2)
    assert a.acquire("pri", 3)
    print(f"\ngeneration 2 granted {waited:.2f} s after the holder of 1 stopped renewing "
          f"(TTL {TTL} s)")


def test_the_holder_losing_etcd_cannot_renew_and_knows_it(etcd, witnesses):
    lost_reasons = []
    a = witnesses(EtcdWitness, [etcd.url], "/colo/vm2/active", TTL,
                  on_lost=lost_reasons.append)
    assert a.acquire("pri", 1) and a.held
    t_kill = time.monotonic()
    etcd.kill()
    # the role is the holder's only until its last renewal (sent before the kill) plus
    # the TTL: before etcd itself would have let the lease go
    assert a.valid_until() <= t_kill + TTL
    assert a.lost.wait(60), "the holder did not notice it lost the role"
    assert not a.held and a.claim() is None
    assert lost_reasons and etcd.url in lost_reasons[0]
    with pytest.raises(WitnessError, match=f"127.0.0.1:{etcd.client_port}"):
        a.acquire("pri", 1)


def test_unreachable_witness_raises_and_the_guard_refuses_naming_the_endpoint(witnesses):
    url = f"http://127.0.0.1:{free_port()}"
    w = witnesses(EtcdWitness, [url], "/colo/vm3/active", TTL)
    with pytest.raises(WitnessError, match=url):
        w.acquire("sec", 2)
    ok, reason = guard_takeover(None, w, "sec", 2)
    assert not ok and url in reason and "not going active" in reason
    assert not w.held


def test_a_dead_endpoint_is_skipped_for_a_live_one(etcd, witnesses):
    dead = f"http://127.0.0.1:{free_port()}"
    w = witnesses(EtcdWitness, [dead, etcd.url], "/colo/vm4/active", TTL)
    assert w.acquire("pri", 1) and w.holder() == {"node": "pri", "generation": 1}


def test_guard_refuses_while_a_live_holder_keeps_its_lease(etcd, witnesses):
    pri = witnesses(EtcdWitness, [etcd.url], "/colo/vm5/active", TTL)
    sec = witnesses(EtcdWitness, [etcd.url], "/colo/vm5/active", TTL)
    assert pri.acquire("pri", 1)
    ok, reason = guard_takeover(None, sec, "sec", 2, wait_s=1.0)
    assert not ok and "pri" in reason
    # the primary dies: its lease runs out and the secondary's guard then lets it go live
    pri.close()
    ok, reason = guard_takeover(None, sec, "sec", 2)
    assert ok, reason
    assert sec.holder() == {"node": "sec", "generation": 2}


# -- fencing ------------------------------------------------------------------------------
def test_fence_exit_1_refuses_with_its_output_and_gives_the_role_back(etcd, witnesses):
    w = witnesses(EtcdWitness, [etcd.url], "/colo/vm6/active", TTL)
    fence = Fence(["sh", "-c", "echo 'PDU says: outlet {peer} unknown' >&2; exit 1"], 5)
    ok, reason = guard_takeover(fence, w, "sec", 1, peer="host-a")
    assert not ok
    assert "exited with code 1" in reason and "PDU says: outlet host-a unknown" in reason
    assert w.holder() is None and not w.held


def test_fence_timeout_refuses_and_kills_the_whole_command():
    fence = Fence(["sh", "-c", "echo powering off; sleep 30 & sleep 30; wait"], 0.5)
    t0 = time.monotonic()
    ok, reason = guard_takeover(fence, None, "sec", 1)
    took = time.monotonic() - t0
    assert not ok and "timed out after 0.5 s" in reason and "powering off" in reason
    assert took < 25, took    # not waiting for the command's 30 s sleeps: they were killed


def test_fence_success_and_substitution(tmp_path):
    out = tmp_path / "fenced"
    fence = Fence(["sh", "-c", f"echo {{peer}} {{generation}} > {out}; echo done"], 5)
    ok, reason = guard_takeover(fence, None, "sec", 7, peer="host-a")
    assert ok and "done" in reason
    assert out.read_text().split() == ["host-a", "7"]
    with pytest.raises(FenceError, match="did not start"):
        Fence(["/nonexistent/fence-agent"]).run()


def test_nothing_configured_refuses():
    ok, reason = guard_takeover(None, None, "sec", 1)
    assert not ok and "no fencing command and no witness" in reason


def test_settings_validate_and_build_the_guard(tmp_path):
    s = FailoverSettings(fence_command=["true"], witness="local", witness_dir=str(tmp_path),
                         lease_ttl_s=2)
    assert s.fence_command == ("true",) and s.guarded
    assert isinstance(make_fence(s), Fence)
    w = make_witness(s, "demo")
    assert isinstance(w, LocalWitness) and w.key == "/colo/demo/active"
    assert make_witness(FailoverSettings(), "demo") is None
    assert not FailoverSettings().guarded
    for kw, key in ((dict(witness="zookeeper"), "failover.witness"),
                    (dict(fence_timeout_s=0), "failover.fence_timeout_s"),
                    (dict(fence_command=["sh", 1]), "failover.fence_command"),
                    (dict(lease_ttl_s=1), "failover.lease_ttl_s"),
                    (dict(witness="etcd", etcd_endpoints=()), "failover.etcd_endpoints"),
                    (dict(etcd_endpoints=["localhost"]), "failover.etcd_endpoints")):
        with pytest.raises(ValueError, match=key):
            FailoverSettings(**kw)


# -- the demo witness ---------------------------------------------------------------------
def _local_contender(directory: str, key: str, node: str, gen: int, start: float, conn,
                     hold_s: float) -> None:
    w = LocalWitness(directory, key, TTL)
    while time.time() < start:
        pass
    conn.send(w.acquire(node, gen))
    time.sleep(hold_s)
    w.close()


def test_local_witness_exactly_one_of_four_processes_wins(tmp_path):
    d = str(tmp_path)
    for i in range(15):
        start = time.time() + 0.3
        pipes, procs = [], []
        for n in range(4):
            parent, child = FORK.Pipe(duplex=False)
            p = FORK.Process(target=_local_contender,
                             args=(d, f"vm{i}", f"node-{n}", 1, start, child, 0))
            p.start()
            pipes.append(parent)
            procs.append(p)
        results = [conn.recv() if conn.poll(20) else "no answer" for conn in pipes]
        for p in procs:
            p.join(10)
        assert sorted(map(str, results)) == ["False", "False", "False", "True"], results


def test_local_witness_generations_leases_and_dead_holders(tmp_path):
    d = str(tmp_path)
    # a holder in another process that stays alive and renews
    parent, child = FORK.Pipe(duplex=False)
    holder = FORK.Process(target=_local_contender,
                          args=(d, "vm", "pri", 1, 0, child, 60), daemon=True)
    holder.start()
    assert parent.recv() is True
    sec = LocalWitness(d, "vm", TTL)
    try:
        assert sec.holder() == {"node": "pri", "generation": 1}

        def expires() -> float:   # the holder's claim in the witness file (monotonic)
            with open(sec.path) as f:
                return json.load(f)["active"]["expires"]
        first = expires()         # renewed by the holder's keepalive past its first lease
        wait_until(lambda: expires() >= first + TTL, timeout=60, interval=0.05,
                   what="the holder renewing its lease")
        assert not sec.acquire("sec", 2)
        ok, reason = guard_takeover(None, sec, "sec", 2, wait_s=0.5)
        assert not ok and "pri" in reason and "demo only" in reason
        # the holder process dies: on one machine its claim is void at once
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(5)
        assert sec.acquire("sec", 2)
        assert sec.holder() == {"node": "sec", "generation": 2}
        other = LocalWitness(d, "vm", TTL)
        assert not other.acquire("pri", 1) and not other.acquire("pri", 2)
        assert not other.acquire("pri", 3)       # held by sec
        sec.close()                              # stops renewing: expires after the TTL
        t0 = time.monotonic()
        wait_until(lambda: other.acquire("pri", 3), timeout=60, interval=0.1,
                   what="the closed holder's lease expiring")
        assert time.monotonic() - t0 > TTL - 1.0
        other.release()
        assert other.holder() is None and other.last_generation() == 3
    finally:
        if holder.is_alive():
            holder.kill()


# -- abandoning an attempt (the peer turned out to be alive) -------------------------------
def test_an_attempt_is_abandoned_only_before_the_grant(tmp_path):
    """``abandon`` is asked before every request to the witness, and its answer ends the
    attempt there; once the witness granted the role it is never asked again (nor before
    the fencing command that follows the grant): a granted takeover goes through."""
    d = str(tmp_path)
    parent, child = FORK.Pipe(duplex=False)
    holder = FORK.Process(target=_local_contender,
                          args=(d, "vm", "pri", 1, 0, child, 60), daemon=True)
    holder.start()
    assert parent.recv() is True
    sec = LocalWitness(d, "vm", TTL)
    try:
        asked = []

        def back_on_third() -> str:
            asked.append(1)
            return "the primary's heartbeat is back" if len(asked) == 3 else ""
        ok, reason = guard_takeover(None, sec, "sec", 2, wait_s=600, poll_s=0.01,
                                    abandon=back_on_third)
        assert (ok, reason, len(asked)) == (False, "the primary's heartbeat is back", 3)
        assert sec.holder() == {"node": "pri", "generation": 1}     # nothing taken
        os.kill(holder.pid, signal.SIGKILL)      # the holder dies: the role can be granted
        holder.join(5)
        asked.clear()
        fence = Fence(["true"], 5)
        ok, reason = guard_takeover(fence, sec, "sec", 2, abandon=lambda: asked.append(1) or "")
        assert ok and len(asked) == 1, reason    # asked once, before the grant; not after
        assert sec.holder() == {"node": "sec", "generation": 2}
    finally:
        sec.release()
        if holder.is_alive():
            holder.kill()


def test_fencing_alone_is_abandoned_before_the_command_runs(tmp_path):
    out = tmp_path / "fenced"
    fence = Fence(["sh", "-c", f"touch {out}"], 5)
    ok, reason = guard_takeover(fence, None, "sec", 1, abandon=lambda: "peer is back")
    assert (ok, reason) == (False, "peer is back") and not out.exists()


_FROZEN_HOLDER = """
import sys, threading
from pipeline.failover.witness import LocalWitness
lost = threading.Event()
w = LocalWitness(sys.argv[1], "vm", int(sys.argv[2]),
                 on_lost=lambda why: (print("lost:", why, flush=True), lost.set()))
print("held" if w.acquire("pri", 1) else "refused", flush=True)
lost.wait(300)
"""


def test_a_holder_frozen_mid_renewal_blocks_no_one_and_loses_its_role_when_it_wakes(tmp_path):
    """A holder stopped (SIGSTOP, a frozen host) in the middle of renewing its lease, at
    the named point ``witness.local.swap`` (its new state written, not yet in place): the
    other node reads the witness at once, is granted the next generation once the frozen
    lease expired, and the holder, continued, finds its role gone (``on_lost``) instead of
    renewing over the grant. With the old fcntl lock held across the renewal, the
    secondary's takeover waited on the lock until the primary was continued (a full
    fault-matrix run: 180 s)."""
    import subprocess
    import sys
    d = str(tmp_path)
    env = dict(os.environ, COLO_FAULT="witness.local.swap:2:stop",   # 1: the grant
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen([sys.executable, "-c", _FROZEN_HOLDER, d, str(TTL)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        fired = child.stderr.readline()          # written just before it stops itself
        assert "COLO_FAULT fired: witness.local.swap pass 2 stop" in fired, fired
        def state() -> str:
            with open(f"/proc/{child.pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0]
        wait_until(lambda: state() == "T", timeout=30, interval=0.01, what="the holder stopped")
        sec = LocalWitness(d, "vm", TTL)
        answers: list = []
        asker = threading.Thread(target=lambda: answers.append(
            (sec.holder(), guard_takeover(None, sec, "sec", 2))), daemon=True)
        asker.start()
        asker.join(60)          # the frozen lease runs out after TTL; nothing else to wait for
        assert not asker.is_alive(), "the witness made the other node wait for the frozen one"
        (seen, (ok, why)), = answers
        assert seen == {"node": "pri", "generation": 1}
        assert ok, why
        assert state() == "T"   # granted while the holder was still frozen mid-renewal
        os.kill(child.pid, signal.SIGCONT)
        line = child.stdout.readline()
        assert line.startswith("lost:") and "no longer this node's" in line, line
        assert child.wait(30) == 0
        assert sec.holder() == {"node": "sec", "generation": 2}
        sec.release()
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait()
