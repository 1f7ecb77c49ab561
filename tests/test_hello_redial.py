"""The HELLO a secondary answers went out on the connection the primary then syncs over.

An unprotected (or starting) primary says HELLO every second and dials its control channel
anew after every 3 unanswered ones (``control_redials``: an old connection may sit behind
TCP's retransmit backoff after a partition). It used to dial right after the 3rd HELLO:
a secondary that came up just then answered that HELLO, the answer still reached the
primary, and the full sync's records then went over two connections, one of them being
dropped: the secondary's SVM_DIRTY never came, the sync timed out and the pair was
re-protected a second time (the clean-clone CI's ``test_killing_the_secondary_leaves_the_
primary_serving``: reprotections 2; reproduced 3 in 12 at load ~8, each time the answered
HELLO was the 3rd). Now the new connection is dialled before the next HELLO.

Here a hand secondary (a ROUTER with the secondary's CURVE keys at the control address,
which sees which connection each record comes on) answers exactly the 3rd HELLO the
primary sent; the primary's next record must be the full sync's BEGIN on that same
connection. Before the fix it came on a new connection (or, the answer lost, another
HELLO did).
"""
from __future__ import annotations

import time

import pytest
import zmq
from conftest import wait_until

from pipeline import config, sockets, wire
from pipeline.coordinator import CONTROL_REDIAL_HELLOS
from pipeline.localpair import LocalPair

pytestmark = pytest.mark.slow   # a real primary node

TABLES = {
    "guest": {"backend": "sim", "page_count": 1024},
    # the primary says HELLO until this hand secondary answers (a few seconds)
    "peer": {"connect_timeout_ms": 600000},
}


def test_the_answered_hello_and_the_sync_share_one_connection(tmp_path):
    pair = LocalPair(TABLES, workdir=str(tmp_path))
    settings = config.load(pair.configs["secondary"])
    nctx = sockets.NodeContext(settings)        # the secondary's keys; admits the primary's
    try:
        router = nctx.socket(zmq.ROUTER, 1000, bind=True)
        router.bind(sockets._endpoint(settings, "control"))
        pair.start(roles=("primary",))
        heard = 0
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, "the primary never said HELLO number 3k"
            pair.check_alive()
            if not router.poll(100):
                continue
            ident, msg = router.recv_multipart()
            assert wire.decode_header(msg).type == wire.HELLO
            heard += 1
            # which HELLO of the primary's this is: those it could not send (no connection
            # yet: dropped, counted) and those heard here
            sent = heard + pair.stage_counter("coordinator", "control_dropped")
            if sent % CONTROL_REDIAL_HELLOS == 0:
                break
        router.send_multipart((ident, wire.encode_hello(
            4096, wire.ROLE_SECONDARY, 1024, pair.name("secondary"))))
        assert router.poll(60_000), "nothing from the primary after the answer"
        ident2, msg = router.recv_multipart()
        kind = wire.decode_header(msg).type
        assert (kind, ident2) == (wire.CHECKPOINT_BEGIN, ident), (
            f"after the answer to HELLO {sent} the primary sent {wire.RECORD_NAMES[kind]} on "
            f"{'the same' if ident2 == ident else 'another'} connection "
            f"(control_redials {pair.stage_counter('coordinator', 'control_redials')})")
        assert wire.decode_checkpoint_begin(msg).flags & wire.FLAG_SYNC
    finally:
        pair.stop()
        nctx.close()


def test_the_secondary_answers_on_the_connection_the_primary_spoke_on(tmp_path):
    """A primary that dialled its control channel anew leaves its old connection behind;
    after a partition the secondary may not see it close for minutes (its FIN is lost
    too). The secondary's records must go where the primary now speaks: here the old
    connection stays open and unread, and all six HELLOs said on a new one are answered
    on the new one. Before (a DEALER at the secondary) its records were dealt round-robin
    over both connections: half of the answers went to the old one."""
    pair = LocalPair(TABLES, workdir=str(tmp_path))
    nctx = sockets.NodeContext(config.load(pair.configs["primary"]))   # the primary's keys
    try:
        pair.start(roles=("secondary",))
        pair.node("secondary")
        old, new = sockets.control(nctx), sockets.control(nctx)   # two connections
        for s in (old, new):
            assert s.poll(60_000, zmq.POLLOUT), "no control connection to the secondary"
        hello = wire.encode_hello(4096, wire.ROLE_PRIMARY, 1024, pair.name("primary"))
        old.send(hello)                          # the primary spoke on the old one first
        assert old.poll(60_000) and wire.decode_header(old.recv()).type == wire.HELLO
        for _ in range(6):
            new.send(hello)
        answers = {"old": 0, "new": 0}

        def six_answers() -> bool:
            for name, s in (("old", old), ("new", new)):
                while s.poll(0):
                    assert wire.decode_header(s.recv()).type == wire.HELLO
                    answers[name] += 1
            pair.check_alive()
            return sum(answers.values()) >= 6
        wait_until(six_answers, timeout=120, what="six answers to six HELLOs")
        assert answers == {"old": 0, "new": 6}, answers
    finally:
        pair.stop()
        nctx.close()
