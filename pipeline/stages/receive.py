"""Secondary: the receive stage. Validates every record from the ``pages`` channel and
deals PAGES batches round robin to the verify workers; EPOCH_END becomes an END marker
on every verify ring (ring 0's carries the vCPU blob).

A record that does not validate is dropped, counted and logged; it is never passed on.
The epoch it belonged to then cannot be complete (EPOCH_END announces more pages than
arrive), so the restore stage discards that epoch whole.
"""
from __future__ import annotations

import time

import numpy as np
import zmq

from pipeline import wire
from pipeline.ring import Ring
from pipeline.stages.common import SLOT_DATA, SLOT_END, StageContext, write_slot


def run(ctx: StageContext, pages_in: zmq.Socket, rings: list[Ring], page_count: int,
        page_size: int) -> None:
    c = ctx.counters
    batch = rings[0].layout.batch_pages
    rr = 0
    while not ctx.stopping():
        if not pages_in.poll(200):
            continue
        frame = pages_in.recv(copy=False)
        t0 = time.perf_counter_ns()
        msg = frame.buffer
        c.add("items_in", 1)
        c.add("bytes_in", len(msg))
        try:
            hdr = wire.decode_header(msg)
            if hdr.type == wire.PAGES:
                b = wire.decode_pages(msg, page_count, page_size, batch)
                slot = write_slot(ctx, rings[rr])
                if slot is None:
                    return
                n = b.count
                slot.pfns[:n], slot.hashes[:n] = b.pfns, b.hashes
                slot.enc_len[:n], slot.enc_kind[:n] = b.enc_len, b.enc_kind
                slot.data_flat[:len(b.data)] = b.data
                slot.kind, slot.epoch, slot.count, slot.flags = SLOT_DATA, b.epoch, n, 0
                slot.aux_len, slot.seq = len(b.data), 0
                rings[rr].commit_write(slot)
                rr = (rr + 1) % len(rings)
                c.add("items_out", n)
            elif hdr.type == wire.EPOCH_END:
                end = wire.decode_epoch_end(msg)
                for i, ring in enumerate(rings):
                    slot = write_slot(ctx, ring)
                    if slot is None:
                        return
                    blob = end.vcpu if i == 0 else b""
                    if len(blob) > slot.data_flat.size:
                        raise wire.WireError(f"EPOCH_END: vCPU blob of {len(blob)} bytes is "
                                             "larger than a ring slot")
                    slot.kind, slot.epoch, slot.count = SLOT_END, end.epoch, 0
                    slot.seq, slot.flags, slot.aux_len = end.pages, end.flags, len(blob)
                    slot.data_flat[:len(blob)] = np.frombuffer(blob, np.uint8)
                    ring.commit_write(slot)
            elif hdr.type & wire.OPTIONAL_BIT:
                c.add("skipped_optional", 1)
            else:
                raise wire.WireError(f"{hdr.name} record on the pages channel")
        except wire.WireError as exc:
            c.add("errors", 1)
            ctx.log.warning("pages channel: dropped a bad record: %s", exc)
        c.add("busy_ns", time.perf_counter_ns() - t0)
        c.max("ring_high_water", max(r.high_water for r in rings))
