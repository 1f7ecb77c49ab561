"""net.release = "commit" on a real pair across a torn epoch (issue 15): the outputs of an
epoch that never commits are not released at its end; they go out at the next commit
(the torn epoch's pages are carried into it), each exactly once and in order
(docs/config.md, net.release). The epoch is torn on the secondary at the named point
``restore.assembled`` (``errno=EIO``), not by hoping a fault lands in it."""
from __future__ import annotations

import os

import pytest
from conftest import wait_until
from test_service_pair import Client, pair_tables

from pipeline.localpair import LocalPair

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_outputs_of_a_torn_epoch_wait_for_the_next_commit_and_go_out_once_in_order(tmp_path):
    pair = LocalPair(pair_tables("commit"), workdir=str(tmp_path))
    # pass 1 of the point is the first checkpoint (the pair gets protected), pass 2 the
    # first one this test asks for
    pair.start(faults={"secondary": "restore.assembled:2:errno=EIO"})
    client = None
    try:
        pair.wait_protected()
        client = Client(os.path.join(pair.workdir, "client.sock"))
        net = pair.node("primary").stage("net_compare")
        coord = pair.node("primary").stage("coordinator")

        def counter(name: str) -> int:
            return net.as_dict()[name]
        for i in range(40):
            pair.inject_input(b"request %d" % i)
        wait_until(lambda: counter("primary_frames_in") >= 40, 60, "40 PVM outputs")
        # the SVM answered them too (the torn epoch rolls it back to before them)
        wait_until(lambda: counter("secondary_frames_in") >= 40, 60, "40 SVM outputs")
        aborted, commits = coord.as_dict()["epochs_aborted"], counter("commits")
        pair.request_checkpoint()
        wait_until(lambda: coord.as_dict()["epochs_aborted"] == aborted + 1, 120,
                   "the requested epoch torn on the secondary")
        assert pair.fault_fired("secondary", "restore.assembled", 2)
        for i in range(40, 50):
            pair.inject_input(b"request %d" % i)
        wait_until(lambda: counter("primary_frames_in") >= 50, 60, "10 more PVM outputs")
        # the comparator read past the rollback: the SVM's replay of 0..39 after its
        # ROLLED_BACK boundary, then 40..49
        wait_until(lambda: counter("secondary_frames_in") >= 90, 60,
                   "the rolled-back SVM replaying its inputs")
        # (the stage copies its counters in one go, so these are as of that copy)
        assert counter("commits") == commits and counter("frames_released") == 0
        assert client.read() == []
        pair.request_checkpoint()
        wait_until(lambda: len(client.read()) >= 50, 120, "every answer after the next commit")
        assert client.seqs == list(range(50))
        wait_until(lambda: counter("frames_released") >= 50, 60, "the counters published")
        assert counter("frames_released") == 50 and counter("commits") == commits + 1
        assert coord.as_dict()["epochs_aborted"] == aborted + 1
        assert pair.prove_memory_equal()["memory_equal"] is True
    finally:
        if client is not None:
            client.close()
        pair.stop()
