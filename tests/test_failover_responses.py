"""The sim guest's answers, as a client on the clients' network reads them, across the
loss of the primary host and the failback (``node.role = "auto"``, a comparator on each
host's primary side: ``net.primary_in``, ``net.outdev``; ``net.secondary_in`` follows the
primary's address).

The guest's client input is the node's own stream (``input_rate_hz``): it moves with the
active guest (the survivor's mirror goes on with it, then its client stage), so no
request is lost or sent twice on the input side. The answers go out on ``net.outdev``, a
path both hosts serve in turn (the service's address moves with the active host); the
client follows it (:class:`pipeline.service_client.AnswerStream`).

What must hold, in each cycle (docs/deployment.md, "What clients see across a failover"):
- an answer received twice has the same bytes both times (a rolled-back SVM regenerates
  the answers of the inputs it replays: they equal the ones released before);
- the answers arrive in input order, and after the survivor's first answer none is
  missing: the survivor's guest output reaches the clients without a gap through the
  takeover (its comparator passing it through), the handoff from its mirror to its client
  stage and the re-protection. Answers the lost comparator held when the host died are
  lost, as on a network (a datagram service's client asks again; TCP retransmits:
  tests/test_failover_tcp.py); they can only be the ones just before the survivor's first;
- the memory proof after re-protection.
"""
from __future__ import annotations

import json
import threading

import pytest

from conftest import wait_until
from test_failover import TABLES
from test_failover_reprotect import EtcdNetns, NETNS_READY

from pipeline.localpair import HostPair
from pipeline.service_client import AnswerStream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NET = {"primary_in": "unix:{workdir}/net-pvm.sock", "outdev": "unix:{workdir}/client.sock",
       "compare_timeout_ms": 20000}
ANSWERS = 150       # answers to wait for in each phase


class Reader(threading.Thread):
    def __init__(self, stream: AnswerStream) -> None:
        super().__init__(daemon=True)
        self.stream, self.stop, self.error = stream, threading.Event(), ""

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.stream.read(0.05)
        except Exception as exc:     # noqa: BLE001 (reported by the test)
            self.error = repr(exc)

    def count(self) -> int:
        if self.error:
            raise AssertionError(f"the client: {self.error}")
        return len(self.stream.seqs)


def _more_answers(pair: HostPair, reader: Reader, n: int, what: str) -> None:
    start = reader.count()

    def look() -> bool:
        pair.check_alive()
        return reader.count() >= start + n
    wait_until(look, timeout=300, what=f"{n} answers {what}")


def run_cycles(pair: HostPair, cycles: int) -> list[dict]:
    pair.start(("a",))
    pair.wait_info("state", "unprotected", role="a", timeout=120)
    stream = AnswerStream(["unix:" + pair.workdir + "/client.sock"], timeout=120)
    reader = Reader(stream)
    reader.start()
    records = []
    try:
        _more_answers(pair, reader, ANSWERS, "from the unprotected primary")
        pair.start_node("b")
        pair.wait_protected(timeout=300)
        _more_answers(pair, reader, ANSWERS, "while protected")
        for cycle in range(cycles):
            lost = pair.primary_host()
            survivor = pair.other(lost)
            before = pair.node(survivor).node_info()
            pair.kill(lost)
            wait_until(lambda: pair.node(survivor).node_info().get("failovers", 0)
                       > before.get("failovers", 0) and pair.node(survivor).node_info()
                       .get("role") == "primary", timeout=300,
                       what=f"cycle {cycle}: {survivor} becoming the primary")
            _more_answers(pair, reader, ANSWERS, "from the survivor, unprotected")
            pair.start_node(lost)
            wait_until(lambda: pair.node(survivor).node_info().get("state") == "protected"
                       and not pair.node(survivor).node_info().get("awaiting_reprotection"),
                       timeout=300, what=f"cycle {cycle}: protected again")
            _more_answers(pair, reader, ANSWERS, "protected again")
            proof = pair.prove_memory_equal()
            assert proof["memory_equal"] is True, proof
            # the stream of the lost host ended once: the answers before and after it
            assert len(stream.breaks) == cycle + 1, stream.breaks
            last, first = stream.gaps()[cycle]
            records.append({"cycle": cycle, "lost": lost, "answers": len(stream.seqs),
                            "last_before_loss": last, "first_from_survivor": first,
                            "lost_with_the_host": max(0, first - last - 1),
                            "duplicates": stream.duplicates})
    finally:
        reader.stop.set()
        reader.join(10)
        stream.close()
    seqs = stream.seqs
    print("\n" + json.dumps(records))
    # an answer received again is the same answer
    assert stream.conflicts == [], stream.conflicts[:20]
    # in input order; the client followed the service to each survivor
    assert seqs == sorted(seqs)
    assert stream.connections >= 1 + cycles, records
    # nothing missing but what the lost comparator held at each loss: the answers just
    # before the survivor's first
    allowed = set()
    for last, first in stream.gaps():
        allowed |= set(range(last + 1, first))
    assert set(stream.missing()) <= allowed, (stream.missing(), records)
    return records


def test_answers_across_failover_and_failback_one_machine(tmp_path):
    pair = HostPair(dict(TABLES, net=NET), workdir=str(tmp_path / "pair"))
    try:
        run_cycles(pair, cycles=2)
    finally:
        pair.stop()


@pytest.mark.root
@pytest.mark.skipif(not NETNS_READY, reason="needs root, iproute2 and etcd")
def test_answers_across_failover_and_failback_netns_etcd(tmp_path):
    """The hosts in network namespaces, etcd as the witness; the SVM's output travels to
    the primary's comparator over the hosts' network (net.secondary_in follows the
    primary's address)."""
    pair = None
    with EtcdNetns(tmp_path) as net:
        try:
            pair = HostPair(dict(TABLES, net=NET, failover=net.failover),
                            workdir=str(tmp_path / "pair"), addresses=net.addresses,
                            netns=net.netns)
            run_cycles(pair, cycles=2)
        finally:
            if pair is not None:
                pair.stop()


def rolled_back_survivor(pair: HostPair) -> dict:
    """The primary's host dies while the secondary is inside a checkpoint: the secondary's
    coordinator stops right after it handled a BEGIN (``secondary.begin``: SVM paused,
    SVM_DIRTY sent), the primary's host is killed, the coordinator goes on. If the epoch's
    pages had not all arrived, it ends torn (the survivor goes on from its last committed
    checkpoint); if they had, it commits. Torn, the survivor replays the inputs since
    that checkpoint: answers the comparator had released for them (the SVM's first run
    agreed with the PVM's) come again, each with the bytes already received (the guest
    is deterministic on its inputs). Either way nothing is missing after the survivor's
    first answer."""
    import os
    import signal

    from pipeline.counters import STATUS_ABORTED
    stream = AnswerStream(["unix:" + pair.workdir + "/client.sock"], timeout=120)
    reader = Reader(stream)
    try:
        pair.start_node("a")
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        reader.start()
        # (pass 16: a checkpoint of the protected pair, answers flowing)
        pair.start_node("b", fault="secondary.begin:16:stop")
        wait_until(lambda: "COLO_FAULT fired: secondary.begin" in pair.log_tail("b", 1 << 20),
                   timeout=300, what="b's coordinator stopped inside a checkpoint")
        coordinator = pair.node("b").node_info()["stage_pids"]["coordinator"]
        pair.kill("a")
        os.kill(coordinator, signal.SIGCONT)
        wait_until(lambda: pair.node("b").node_info().get("role") == "primary",
                   timeout=300, what="b becoming the primary")
        _more_answers(pair, reader, ANSWERS, "from the survivor")
        torn = pair.checkpoints("b")[-1]["status"] == STATUS_ABORTED
    finally:
        reader.stop.set()
        reader.join(10)
        stream.close()
        pair.stop()
    print("\n" + json.dumps({"torn": torn, "gaps": stream.gaps(),
                             "duplicates": stream.duplicates, "missing": stream.missing(),
                             "answers": len(stream.seqs)}))
    assert stream.conflicts == [], stream.conflicts[:20]
    assert stream.seqs == sorted(stream.seqs)
    assert len(stream.breaks) == 1
    (last, first), = stream.gaps()
    assert set(stream.missing()) <= set(range(last + 1, first)), stream.missing()
    return {"torn": torn, "duplicates": stream.duplicates, "missing": len(stream.missing())}


#: long epochs: the SVM's first run of the torn epoch answers many inputs the comparator
#: releases (at 250 inputs/s, ~250 an epoch), which the survivor sends again
LONG_EPOCHS = dict(TABLES, net=NET, checkpoint=dict(TABLES["checkpoint"], max_interval_ms=1000))


def test_answers_regenerated_by_a_rolled_back_svm_equal_the_released_ones(tmp_path):
    rolled_back_survivor(HostPair(LONG_EPOCHS, workdir=str(tmp_path / "pair")))


@pytest.mark.root
@pytest.mark.skipif(not NETNS_READY, reason="needs root, iproute2 and etcd")
def test_answers_regenerated_by_a_rolled_back_svm_netns_etcd(tmp_path):
    """The same with etcd (TTL 2 s) as the witness: the takeover waits for the lost
    primary's lease."""
    with EtcdNetns(tmp_path) as net:
        rolled_back_survivor(HostPair(dict(LONG_EPOCHS, failover=net.failover),
                                      workdir=str(tmp_path / "pair"),
                                      addresses=net.addresses, netns=net.netns))
