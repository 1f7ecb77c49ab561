#!/usr/bin/env python3
"""Benchmark the shared-memory ring against references measured in the same run.

Round trip (two processes ping-pong, one slot each way):
  ring     acquire_write/commit_write on ring A, the peer acquire_read/release_read,
           then the same back on ring B (the call pattern of two stages, timeouts on)
  eventfd  the bare EFD_SEMAPHORE eventfd post/wait the ring is built on (its floor)
  mp_sem   the same ping-pong with multiprocessing.Semaphore (the alternative we measured)
  pipe     multiprocessing.Pipe send_bytes/recv_bytes of 8 bytes
Stream (producer fills each slot with batch_pages pages by memcpy, consumer releases it):
  ring     GB/s of page data through the ring
  pipe     multiprocessing.Pipe send_bytes/recv_bytes of the same batches
  memcpy   np.copyto of the same batches into as many rotating buffers as the ring has
           slots, in one process (the producer's own copy, no consumer, no sync)

Every figure is the median of --repeats runs, the measurements interleaved.
With --json the last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import statistics
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipeline.ring import Ring, RingClosed, SlotLayout
from pipeline.shm import cleanup_segments

FORK = mp.get_context("fork")
PREFIX = f"colo-bench{uuid.uuid4().hex[:8]}-"
TIMEOUT = 30.0


def _in_child(target, *args) -> mp.Process:
    p = FORK.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _finish(child: mp.Process) -> None:
    child.join(TIMEOUT)
    if child.exitcode != 0:
        raise RuntimeError(f"benchmark child {child.pid} ended with exit code {child.exitcode}")


# -- round trips (seconds per round trip) ---------------------------------------------
def roundtrip_ring(n: int) -> float:
    a = Ring.create(PREFIX + "ping", 2, SlotLayout(1, 4096))
    b = Ring.create(PREFIX + "pong", 2, SlotLayout(1, 4096))

    def echo() -> None:
        for _ in range(n):
            got = a.acquire_read(TIMEOUT)
            seq = got.row
            a.release_read(got)
            out = b.acquire_write(TIMEOUT)
            out.row = seq
            b.commit_write(out)
    child = _in_child(echo)
    start = time.perf_counter()
    for i in range(n):
        out = a.acquire_write(TIMEOUT)
        out.row = i
        a.commit_write(out)
        got = b.acquire_read(TIMEOUT)
        assert got.row == i
        b.release_read(got)
    elapsed = time.perf_counter() - start
    _finish(child)
    for r in (a, b):
        r.unlink()
        r.close()
    return elapsed / n


def roundtrip_eventfd(n: int) -> float:
    ping, pong = (os.eventfd(0, os.EFD_SEMAPHORE) for _ in range(2))

    def echo() -> None:
        poller = select.poll()
        poller.register(ping, select.POLLIN)
        for _ in range(n):
            poller.poll(int(TIMEOUT * 1000))
            os.eventfd_read(ping)
            os.eventfd_write(pong, 1)
    child = _in_child(echo)
    poller = select.poll()
    poller.register(pong, select.POLLIN)
    start = time.perf_counter()
    for _ in range(n):
        os.eventfd_write(ping, 1)
        poller.poll(int(TIMEOUT * 1000))
        os.eventfd_read(pong)
    elapsed = time.perf_counter() - start
    _finish(child)
    os.close(ping)
    os.close(pong)
    return elapsed / n


def roundtrip_mp_semaphore(n: int) -> float:
    ping, pong = FORK.Semaphore(0), FORK.Semaphore(0)

    def echo() -> None:
        for _ in range(n):
            ping.acquire(timeout=TIMEOUT)
            pong.release()
    child = _in_child(echo)
    start = time.perf_counter()
    for _ in range(n):
        ping.release()
        pong.acquire(timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    _finish(child)
    return elapsed / n


def roundtrip_pipe(n: int) -> float:
    here, there = FORK.Pipe()

    def echo() -> None:
        for _ in range(n):
            there.send_bytes(there.recv_bytes())
    child = _in_child(echo)
    message = b"12345678"
    start = time.perf_counter()
    for _ in range(n):
        here.send_bytes(message)
        here.recv_bytes()
    elapsed = time.perf_counter() - start
    _finish(child)
    return elapsed / n


# -- streams (bytes of page data per second) ----------------------------------------
def _batch(layout: SlotLayout) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (layout.batch_pages, layout.page_size),
                                             dtype=np.uint8)


def stream_ring(n: int, slots: int, layout: SlotLayout) -> float:
    ring = Ring.create(PREFIX + "stream", slots, layout)
    source = _batch(layout)
    go = FORK.Event()

    def produce() -> None:
        go.wait(TIMEOUT)
        for i in range(n):
            slot = ring.acquire_write(TIMEOUT)
            np.copyto(slot.data, source)
            slot.count = layout.batch_pages
            slot.row = i
            ring.commit_write(slot)
        ring.close_write()
    child = _in_child(produce)
    go.set()   # time the stream, not the fork
    start = time.perf_counter()
    received = 0
    while True:
        try:
            slot = ring.acquire_read(TIMEOUT)
        except RingClosed:
            break
        received += slot.count
        ring.release_read(slot)
    elapsed = time.perf_counter() - start
    _finish(child)
    ring.unlink()
    ring.close()
    assert received == n * layout.batch_pages
    return received * layout.page_size / elapsed


def stream_pipe(n: int, layout: SlotLayout) -> float:
    receiver, sender = FORK.Pipe(duplex=False)
    source = _batch(layout).tobytes()
    go = FORK.Event()

    def produce() -> None:
        go.wait(TIMEOUT)
        for _ in range(n):
            sender.send_bytes(source)
        sender.send_bytes(b"")
    child = _in_child(produce)
    sender.close()  # so a dead producer shows up as EOF here, not as a hang
    go.set()
    start = time.perf_counter()
    received = 0
    while data := receiver.recv_bytes():
        received += len(data)
    elapsed = time.perf_counter() - start
    _finish(child)
    assert received == n * len(source)
    return received / elapsed


def stream_memcpy(n: int, slots: int, layout: SlotLayout) -> float:
    """The producer's copy alone: the same batch into ``slots`` rotating buffers."""
    source = _batch(layout)
    targets = np.ones((slots, layout.batch_pages, layout.page_size), np.uint8)
    start = time.perf_counter()
    for i in range(n):
        np.copyto(targets[i % slots], source)
    return n * source.nbytes / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roundtrips", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=4000, help="slots streamed per run")
    parser.add_argument("--slots", type=int, default=16, help="ring size for the stream")
    parser.add_argument("--batch-pages", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    for key in ("roundtrips", "batches", "slots", "batch_pages", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    layout = SlotLayout(batch_pages=args.batch_pages)

    runs: dict[str, list[float]] = {}
    tests = {
        "roundtrip_ring_us": lambda: roundtrip_ring(args.roundtrips) * 1e6,
        "roundtrip_eventfd_us": lambda: roundtrip_eventfd(args.roundtrips) * 1e6,
        "roundtrip_mp_semaphore_us": lambda: roundtrip_mp_semaphore(args.roundtrips) * 1e6,
        "roundtrip_pipe_us": lambda: roundtrip_pipe(args.roundtrips) * 1e6,
        "stream_ring_gbps": lambda: stream_ring(args.batches, args.slots, layout) / 1e9,
        "stream_pipe_gbps": lambda: stream_pipe(args.batches, layout) / 1e9,
        "memcpy_gbps": lambda: stream_memcpy(args.batches, args.slots, layout) / 1e9,
    }
    try:
        for _ in range(args.repeats):
            for name, run in tests.items():
                runs.setdefault(name, []).append(run())
    finally:
        cleanup_segments(PREFIX)
    fig = {name: round(statistics.median(values), 3) for name, values in runs.items()}
    fig["ratio_roundtrip_ring_vs_eventfd"] = round(fig["roundtrip_ring_us"]
                                                   / fig["roundtrip_eventfd_us"], 2)
    fig["ratio_roundtrip_ring_vs_mp_semaphore"] = round(fig["roundtrip_ring_us"]
                                                        / fig["roundtrip_mp_semaphore_us"], 2)
    fig["ratio_roundtrip_ring_vs_pipe"] = round(fig["roundtrip_ring_us"]
                                                / fig["roundtrip_pipe_us"], 2)
    fig["ratio_stream_ring_vs_pipe"] = round(fig["stream_ring_gbps"] / fig["stream_pipe_gbps"], 2)
    fig["ratio_stream_ring_vs_memcpy"] = round(fig["stream_ring_gbps"] / fig["memcpy_gbps"], 2)
    fig.update(batch_bytes=layout.data_size, roundtrips=args.roundtrips, batches=args.batches,
               repeats=args.repeats, cpus=os.cpu_count())

    print(f"ring benchmark (median of {args.repeats}; {os.cpu_count()} CPUs; "
          f"batch {layout.batch_pages} x {layout.page_size} B)")
    print(f"  round trip, 2 processes  ring {fig['roundtrip_ring_us']:8.2f} us   "
          f"eventfd {fig['roundtrip_eventfd_us']:.2f} us (x{fig['ratio_roundtrip_ring_vs_eventfd']})"
          f"   mp.Semaphore {fig['roundtrip_mp_semaphore_us']:.2f} us "
          f"(x{fig['ratio_roundtrip_ring_vs_mp_semaphore']})   "
          f"Pipe {fig['roundtrip_pipe_us']:.2f} us (x{fig['ratio_roundtrip_ring_vs_pipe']})")
    print(f"  stream of page batches   ring {fig['stream_ring_gbps']:8.2f} GB/s "
          f"Pipe {fig['stream_pipe_gbps']:.2f} GB/s (x{fig['ratio_stream_ring_vs_pipe']})   "
          f"memcpy alone {fig['memcpy_gbps']:.2f} GB/s (x{fig['ratio_stream_ring_vs_memcpy']})")
    if args.json:
        print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
