"""LocalPair, the test harness's own behaviour (no node processes)."""
from __future__ import annotations

import os

import zmq

from pipeline.localpair import LocalPair
from pipeline.stages.inputs import inject_address


def test_injected_inputs_reach_the_primary_in_the_order_given(tmp_path):
    """The failover tests compare the survivor with a reference guest that consumed the
    injected inputs in the order the test gave them. Each inject_input once opened a socket
    of its own: separate connections race, and the PVM took e.g. inputs 0, 4, 1, 2, 3
    (its memory, and the SVM's, then equal no in-order replay). Here the primary's
    client-input socket is a plain PULL bound where the client stage binds it."""
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 64}}, workdir=str(tmp_path))
    os.makedirs(pair.run_dir("primary"), exist_ok=True)
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(inject_address(pair.run_dir("primary")))
    try:
        sent = [b"input %d" % i for i in range(200)]
        for payload in sent:
            pair.inject_input(payload)
        got = []
        while len(got) < len(sent) and pull.poll(10000):
            got.append(pull.recv())
        assert got == sent
    finally:
        pair.stop()
        pull.close()
