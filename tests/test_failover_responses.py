"""The sim service's answers, as a client on the clients' network gets them, across the
loss of the primary host and the failback (``node.role = "auto"``, a comparator on each
host's primary side: ``net.primary_in``, ``net.outdev``; ``net.secondary_in`` follows the
primary's address).

The client (:class:`pipeline.service_client.AnswerStream` with ``inject``) sends requests
to the primary's input socket (only the active host's is bound) and reads the answers on
``net.outdev``, a path both hosts serve in turn; it follows the service to the survivor.
A request whose answer has not come is sent again (after each reconnection, and after a
timeout): the guest answers a request it already executed from its reply cache, in guest
memory (replicated by the checkpoints), with the same bytes.

What must hold, across every failover and failback (docs/deployment.md, "What clients
see across a failover"):
- every request got exactly one answer: each request number has an answer, and every
  copy of an answer received more than once has the same bytes (no gap, no duplicate
  with different bytes); none was refused (older than the guest's cache);
- the memory proof after re-protection.
"""
from __future__ import annotations

import json

import pytest

from conftest import wait_until
from test_failover import TABLES
from test_failover_reprotect import (CLIENT_ONLY, NET, NETNS_READY, EtcdNetns,
                                     assert_executed_once, more_answers, service_client)

from pipeline.localpair import HostPair, continue_stopped

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ANSWERS = 150       # answers to wait for in each phase


def run_cycles(pair: HostPair, cycles: int) -> list[dict]:
    pair.start(("a",))
    pair.wait_info("state", "unprotected", role="a", timeout=120)
    client = service_client(pair)
    stream = client.stream
    client.start()
    records = []
    try:
        more_answers(pair, client, ANSWERS, "from the unprotected primary")
        pair.start_node("b")
        pair.wait_protected(timeout=300)
        more_answers(pair, client, ANSWERS, "while protected")
        for cycle in range(cycles):
            lost = pair.primary_host()
            survivor = pair.other(lost)
            before = pair.node(survivor).node_info()
            sent, retransmits = stream.sent, stream.retransmits
            pair.kill(lost)
            wait_until(lambda: pair.node(survivor).node_info().get("failovers", 0)
                       > before.get("failovers", 0) and pair.node(survivor).node_info()
                       .get("role") == "primary", timeout=300,
                       what=f"cycle {cycle}: {survivor} becoming the primary")
            more_answers(pair, client, ANSWERS, "from the survivor, unprotected")
            pair.start_node(lost)
            wait_until(lambda: pair.node(survivor).node_info().get("state") == "protected"
                       and not pair.node(survivor).node_info().get("awaiting_reprotection"),
                       timeout=300, what=f"cycle {cycle}: protected again")
            more_answers(pair, client, ANSWERS, "protected again")
            proof = pair.prove_memory_equal()
            assert proof["memory_equal"] is True, proof
            # the client followed the service to the survivor
            assert stream.connections >= 2 + cycle, stream.connections
            records.append({"cycle": cycle, "lost": lost, "requests_before_loss": sent,
                            "answers": len(stream.seqs), "duplicates": stream.duplicates,
                            "sent_again": stream.retransmits - retransmits})
        client.finish(check=pair.check_alive)
    finally:
        client.close()
    print("\n" + json.dumps(records + [{"requests": stream.sent,
                                        "retransmits": stream.retransmits,
                                        "duplicates": stream.duplicates}]))
    assert client.check_exactly_once() == []
    return records


def test_answers_across_failover_and_failback_one_machine(tmp_path):
    pair = HostPair(dict(TABLES, net=NET, **CLIENT_ONLY), workdir=str(tmp_path / "pair"))
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
            pair = HostPair(dict(TABLES, net=NET, failover=net.failover, **CLIENT_ONLY),
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
    is deterministic on its inputs), and the requests the client sends again are answered
    from the replayed guest's cache. Either way every request gets exactly one answer."""
    from pipeline.counters import STATUS_ABORTED
    client = service_client(pair)
    stream = client.stream
    try:
        pair.start_node("a")
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        client.start()
        # (pass 16: a checkpoint of the protected pair, answers flowing)
        pair.start_node("b", fault="secondary.begin:16:stop")

        def stopped_inside_a_checkpoint() -> bool:
            # a node that died meanwhile says why at once, instead of this wait running
            # out its deadline and saying only "not within" (CI, load 20: 308 s, where b
            # gets here in ~20 s at load 20-25: its sync, pre-copy, 15 epochs of 1 s)
            pair.check_alive()
            return pair.fault_fired("b", "secondary.begin")
        try:
            wait_until(stopped_inside_a_checkpoint, timeout=300,
                       what="b's coordinator stopped inside a checkpoint")
        except AssertionError as exc:   # both alive, yet no 16th BEGIN: say where b is
            raise AssertionError(f"{exc}; b's info: {pair.node('b').node_info()}\n"
                                 f"b's log:\n{pair.log_tail('b')}") from None
        coordinator = pair.node("b").node_info()["stage_pids"]["coordinator"]
        pair.kill("a")
        # once stopped: its "fired" line comes before its SIGSTOP, and a SIGCONT that
        # came first would leave it stopped for good ("b becoming the primary" never)
        continue_stopped(coordinator)
        wait_until(lambda: pair.node("b").node_info().get("role") == "primary",
                   timeout=300, what="b becoming the primary")
        more_answers(pair, client, ANSWERS, "from the survivor")
        client.finish(check=pair.check_alive)
        torn = pair.checkpoints("b")[-1]["status"] == STATUS_ABORTED
    finally:
        client.close()
        pair.stop()
    print("\n" + json.dumps({"torn": torn, "requests": stream.sent,
                             "retransmits": stream.retransmits,
                             "duplicates": stream.duplicates}))
    assert client.check_exactly_once() == []
    return {"torn": torn, "duplicates": stream.duplicates}


#: long epochs: the SVM's first run of the torn epoch answers many requests the comparator
#: releases (at 150 requests/s, ~150 an epoch), which the survivor sends again
LONG_EPOCHS = dict(TABLES, net=NET, checkpoint=dict(TABLES["checkpoint"], max_interval_ms=1000),
                   **CLIENT_ONLY)


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


def test_answers_lost_with_the_primary_come_from_the_reply_cache(tmp_path):
    """Answers released at commit (``net.release = "commit"``, Remus's buffering) wait for
    the ACK of their epoch; the primary's host dies right as that ACK arrives
    (``primary.acked``, the whole node), so the SVM committed the epoch (it executed the
    requests and cached their answers) and the clients never got them. The client sends
    them again to the survivor, which answers them from the cache in guest memory: every
    request has exactly one answer, and the survivor's memory (after the lost host rejoined
    and the proof) is that of a guest that executed each request once, at the input seq
    its answer names (executed again, the requests would show at a second seq)."""
    tables = dict(TABLES, net=dict(NET, release="commit"), **CLIENT_ONLY)
    pair = HostPair(tables, workdir=str(tmp_path / "pair"))
    client = service_client(pair)
    stream = client.stream
    try:
        # epoch 20 of a's coordinator: a checkpoint of the protected pair (epoch 0 is the
        # sync, then at most 8 pre-copy rounds)
        pair.start(("a",), faults={"a": "primary.acked:20:killgroup"})
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        client.start()
        more_answers(pair, client, 50, "from the unprotected primary")
        pair.start_node("b")
        pair.wait_exit("a", timeout=300)
        assert pair.fault_fired("a", "primary.acked")
        lost_at = stream.sent
        wait_until(lambda: pair.node("b").node_info().get("role") == "primary",
                   timeout=300, what="b becoming the primary")
        more_answers(pair, client, ANSWERS, "from the survivor")
        pair.start_node("a")
        wait_until(lambda: pair.node("b").node_info().get("state") == "protected"
                   and not pair.node("b").node_info().get("awaiting_reprotection"),
                   timeout=300, what="protected again")
        more_answers(pair, client, ANSWERS, "protected again")
        proof = pair.prove_memory_equal()
        assert proof["memory_equal"] is True, proof
        client.finish(check=pair.check_alive)
    finally:
        client.close()
        pair.stop()
    assert client.check_exactly_once() == []
    # the answers of the acked epoch were lost with the host: asked again
    assert stream.retransmits > 0, (lost_at, stream.sent)
    assert_executed_once(client, [(proof["final_input_seq"], proof["final_input_step"],
                                   proof["pvm_digest"])])
