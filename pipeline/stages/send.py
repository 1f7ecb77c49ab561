"""Primary: the send stage. Turns encoded batches into PAGES records on the ``pages``
channel and closes each epoch with an EPOCH_END record once every digest worker's
END marker has arrived (so every page of the epoch was sent before it).

It also records the (pfn, hash) of every page of the epoch in the shared
``pending`` arrays; the coordinator applies them to the hash table when the
secondary acknowledges the epoch, and re-sends those pfns if the epoch was torn.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from pipeline import faults, messages, wire
from pipeline.sockets import send_until_stopped
from pipeline.ring import Ring
from pipeline.stages.common import SLOT_END, StageContext, ready_rings


@dataclass
class Pending:
    """Shared arrays: the pages of the epoch in flight (written by send, read by coordinator)."""
    pfns: np.ndarray       # (page_count,) uint64
    hashes: np.ndarray     # (page_count, 32) uint8
    count: np.ndarray      # (1,) uint64


@dataclass
class EpochStats:
    pages: int = 0
    records: int = 0
    bytes_wire: int = 0
    kinds: dict[int, int] = field(default_factory=lambda: dict.fromkeys(wire.ENC_KINDS, 0))
    markers: int = 0
    vcpu: bytes = b""
    epoch_flags: int = 0


def run(ctx: StageContext, rings: list[Ring], ctrl, pages_out: zmq.Socket,
        pending: Pending, shared) -> None:
    """While ``shared.unprotected`` is set (the secondary is lost) batches are drained and
    dropped, so the snapshot stage never waits on a ring that nobody empties."""
    c = ctx.counters
    epochs: dict[int, EpochStats] = {}

    def deliver(msg, copy: bool = True) -> bool:
        if shared.unprotected.value:
            c.add("dropped_unprotected", 1)
            return True
        return send_until_stopped(pages_out, msg, ctx.stop, copy,
                                  give_up=lambda: bool(shared.unprotected.value)) \
            or not ctx.stopping()

    while not ctx.stopping():
        ready, _ = ready_rings(rings, [], 0.2)
        for i in ready:
            slot = rings[i].try_acquire_read()
            if slot is None:
                continue
            t0 = time.perf_counter_ns()
            e = slot.epoch
            st = epochs.get(e)
            if st is None:
                st = epochs[e] = EpochStats()
                pending.count[0] = 0
            if slot.kind == SLOT_END:
                st.markers += 1
                if slot.vcpu_len:
                    st.vcpu = slot.data_flat[:slot.vcpu_len].tobytes()
                st.epoch_flags = slot.epoch_flags
                announced = slot.epoch_pages
                rings[i].release_read(slot)
                if st.markers == len(rings):
                    if st.pages != announced:
                        raise RuntimeError(f"epoch {e}: {st.pages} pages went through the "
                                           f"digest workers but {announced} were snapshotted")
                    msg = wire.encode_epoch_end(e, st.pages, st.records,
                                                st.epoch_flags & wire.EPOCH_END_FLAGS, st.vcpu)
                    if not deliver(msg):
                        return
                    faults.point("send.epoch_end")
                    st.bytes_wire += len(msg)
                    c.add("bytes_out", len(msg))
                    del epochs[e]
                    ctrl.send(messages.Sent(
                        e, pages=st.pages, records=st.records, bytes_wire=st.bytes_wire,
                        pages_data=st.kinds[wire.ENC_RAW] + st.kinds[wire.ENC_LZ4],
                        pages_zero=st.kinds[wire.ENC_ZERO], pages_ref=st.kinds[wire.ENC_REF]))
            else:
                n = slot.count
                msg = wire.encode_pages(e, slot.pfns[:n], slot.hashes[:n], slot.enc_len[:n],
                                        slot.enc_kind[:n], slot.data_flat[:slot.data_len],
                                        slot.batch_flags)
                k = int(pending.count[0])
                pending.pfns[k:k + n] = slot.pfns[:n]
                pending.hashes[k:k + n] = slot.hashes[:n]
                pending.count[0] = k + n
                kinds = np.bincount(slot.enc_kind[:n], minlength=len(wire.ENC_KINDS))
                for kind in wire.ENC_KINDS:
                    st.kinds[kind] += int(kinds[kind])
                rings[i].release_read(slot)
                if not deliver(msg, copy=False):
                    return
                faults.point("send.pages")
                st.pages += n
                st.records += 1
                st.bytes_wire += len(msg)
                c.add("items_in", n)
                c.add("items_out", 1)
                c.add("bytes_out", len(msg))
            c.add("busy_ns", time.perf_counter_ns() - t0)
