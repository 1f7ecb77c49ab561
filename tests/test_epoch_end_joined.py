"""A small checkpoint's last PAGES record and its EPOCH_END go as one ZeroMQ message (issue
13: every message is a send, a wake-up of the I/O thread on each side and of the receive
stage, on the commit's path). The records stay the same records, each validated alone by
the receive stage: only their framing changes.

The send stage runs here in a thread on real rings and a real PUSH/PULL pair, with the whole
epoch already in the rings as the digest workers leave it (each worker's batch and its END
marker published together), so what it sends does not depend on timing."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import types
import uuid

import numpy as np
import zmq

from pipeline import messages, wire
from pipeline.counters import STAGE_COUNTERS, NodeCounters
from pipeline.ring import Ring, SlotLayout
from pipeline.stages import send
from pipeline.stages.common import SLOT_DATA, SLOT_END, StageContext, new_event
from pipeline.supervisor import EXTRA_COUNTERS

BATCH = 16
PAGE = 4096


def _fill(ring: Ring, epoch: int, pfns: list[int], announced: int, vcpu: bytes) -> None:
    """One raw batch of ``pfns`` and the END marker behind it, published at once."""
    batch = ring.acquire_write(0)
    n = len(pfns)
    batch.reset(SLOT_DATA, epoch, n)
    batch.pfns[:n] = pfns
    batch.hashes[:n] = np.array(pfns, np.uint8)[:, None]
    batch.enc_kind[:n] = wire.ENC_RAW
    batch.enc_len[:n] = PAGE
    batch.data_flat[:n * PAGE] = np.repeat(np.array(pfns, np.uint8), PAGE)
    batch.data_len = n * PAGE
    end = ring.acquire_write(0)
    end.reset(SLOT_END, epoch, 0)
    end.epoch_pages, end.vcpu_len = announced, len(vcpu)
    end.data_flat[:len(vcpu)] = np.frombuffer(vcpu, np.uint8)
    ring.commit_write(batch, end)


def test_the_last_pages_record_and_epoch_end_go_as_one_message():
    name = f"eej-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    layout = SlotLayout(BATCH, PAGE, wire.pages_prefix_size(BATCH))
    rings = [Ring.create(f"{name}-r{i}", 4, layout) for i in range(2)]
    node = NodeCounters.create(name, {"send": STAGE_COUNTERS + EXTRA_COUNTERS["send"]})
    zctx = zmq.Context()
    pull = zctx.socket(zmq.PULL)
    push = zctx.socket(zmq.PUSH)
    stop = new_event()
    ctrl_in, ctrl_out = multiprocessing.get_context("fork").Pipe(duplex=False)
    worker = None
    try:
        pull.bind(f"inproc://{name}")
        push.connect(f"inproc://{name}")
        push.setsockopt(zmq.SNDTIMEO, 100)
        _fill(rings[0], 7, [1, 2, 3], 5, b"vcpu-state")
        _fill(rings[1], 7, [8, 9], 5, b"")
        pending = send.Pending(np.zeros(16, np.uint64), np.zeros((16, 32), np.uint8),
                               np.zeros(1, np.uint64))
        shared = types.SimpleNamespace(unprotected=multiprocessing.Value("b", 0))
        ctx = StageContext("send", node.stage("send"), stop, logging.getLogger("send-test"))
        worker = threading.Thread(target=send.run, args=(ctx, rings, ctrl_out, push, pending,
                                                         shared, "none"))
        worker.start()
        messages_in = []
        while not any(wire.decode_header(f).type == wire.EPOCH_END
                      for m in messages_in for f in m):
            assert pull.poll(60_000), f"no EPOCH_END within 60 s; got {messages_in}"
            messages_in.append(pull.recv_multipart())
        assert ctrl_in.poll(60), "the send stage never reported the epoch sent"
        sent = ctrl_in.recv()
        joined = node.stage("send").as_dict()["epoch_end_joined"]
    finally:
        stop.set()
        if worker is not None:
            worker.join(30)
        push.close(0)
        pull.close(0)
        zctx.term()
        for r in rings:
            r.unlink()
            r.close()
        node.unlink()
    # everything was in the rings: the first PAGES record alone (the receive stage takes
    # it while the next is on the wire), the last one and EPOCH_END as one message
    assert [[wire.decode_header(f).type for f in m] for m in messages_in] == \
        [[wire.PAGES], [wire.PAGES, wire.EPOCH_END]]
    frames = messages_in[0] + messages_in[1]
    batches = [wire.decode_pages(f, 64, PAGE, BATCH) for f in frames[:2]]
    assert sorted(int(p) for b in batches for p in b.pfns) == [1, 2, 3, 8, 9]
    end = wire.decode_epoch_end(frames[2])
    assert (end.epoch, end.pages, end.records, end.vcpu) == (7, 5, 2, b"vcpu-state")
    assert isinstance(sent, messages.Sent) and (sent.epoch, sent.pages, sent.records) == (7, 5, 2)
    assert int(pending.count[0]) == 5
    assert joined == 1
