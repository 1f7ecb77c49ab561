"""A full sync and a pre-copy round are told apart on the wire (issue 11).

Both are live epochs with the SYNC flag; a pre-copy round carries only the pages written
since the last round, as much a delta as a checkpoint. A secondary that counted a
committed pre-copy round as its full sync (a new process the primary's sockets reconnected
to, unnoticed by its heartbeat) then took ordinary checkpoints on top of a memory that was
no copy of the PVM. A pre-copy round has the PRECOPY flag too, and a secondary without a
committed full sync refuses it as it refuses a checkpoint.
"""
from __future__ import annotations

import pytest
from test_secondary_faults import BATCH, PAGES, HandPrimary, hand_pvm

from pipeline import wire
from pipeline.localpair import LocalPair


def test_checkpoint_begin_names_its_flags_when_refused():
    ok = wire.encode_checkpoint_begin(4, 0, wire.FLAG_SYNC | wire.FLAG_PRECOPY)
    assert wire.decode_checkpoint_begin(ok).flags == wire.FLAG_SYNC | wire.FLAG_PRECOPY
    for flags, words in ((wire.FLAG_PRECOPY, "PRECOPY (a pre-copy round) without SYNC"),
                         (wire.FLAG_SYNC | 0x10, "unknown flags 0x10"),
                         (1 << 31, "unknown flags 0x80000000")):
        with pytest.raises(wire.WireError) as err:
            wire.decode_checkpoint_begin(wire.encode_checkpoint_begin(4, 0, flags))
        assert str(err.value).startswith("CHECKPOINT_BEGIN: ") and "flags" in str(err.value)
        assert words in str(err.value)


@pytest.mark.slow  # starts a real secondary node
def test_a_pre_copy_round_is_no_full_sync_for_a_new_secondary(tmp_path):
    """A fresh secondary's first epoch is a pre-copy round (the primary took it for the
    one it had synced): refused, never applied, logged; the secondary stops as stale."""
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": PAGES},
        "pipeline": {"verify_workers": 2, "batch_pages": BATCH, "verify_pages": "full"},
        "checkpoint": {"epoch_timeout_ms": 60000, "max_interval_ms": 60000},
    }, workdir=str(tmp_path), log_level="info")
    pair.start(roles=("secondary",))
    dom = hand_pvm(pair)
    # its aborted ACK is the secondary's last word: kept for the test after it stopped
    prim = HandPrimary(pair, dom, first_epoch=1, keep_last_words=True)
    try:
        prim.hello()
        prim.control.send(wire.encode_checkpoint_begin(
            1, 0, wire.FLAG_SYNC | wire.FLAG_PRECOPY))
        # refused at the BEGIN, before any page (none is sent: the secondary is stopping)
        ack = wire.decode_ack(prim.recv(wire.ACK, timeout=60))
        assert (ack.epoch, ack.status) == (1, wire.ACK_ABORTED), ack
        assert "epoch 1: a pre-copy round" in ack.reason and "never received a full sync" \
            in ack.reason, ack.reason
        assert pair.wait_exit("secondary", timeout=120) == 1
        assert "event=unsynced_refused" in pair.log_tail("secondary", 1 << 20)
    finally:
        prim.close()
        dom.close()
        pair.stop()
