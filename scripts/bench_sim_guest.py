#!/usr/bin/env python3
"""Benchmark the sim guest (pipeline/xen_io/sim/domain.py) against references measured in the same run.

Figures (each next to its reference, with the ratio ours / reference):
  start        start() of a guest that fills all of RAM with the content mix, vs a plain
               memcpy (np.copyto) of the same number of bytes in this process
  pause        pause() latency p50/p99 (guest busy writing pages), vs an eventfd ping-pong
               round trip between two processes (the floor of any cooperative pause)
  resume       resume() latency p50/p99, vs one eventfd write
  dirty_read   read_and_clear_dirty_runs() after the guest wrote N pages (N = 1k, 4k, 16k,
               64k), per dirty-log mode, vs a sequential memcpy of N pages of the same guest
               RAM mapping (the copy the snapshot makes next; the log read should be small
               beside it)
  read_pages   read_pages() of the N scattered dirty pages, vs that sequential memcpy
  write_pages  write_pages() of the same, vs the same memcpy
  guest_write  guest page-write rate (write_command of 64k pages), uffd vs bitmap mode: the
               cost of the kernel's write-protect faults on first write per epoch
  prefault     prefault(): mapping all RAM into a stage process's page tables, once
  digest       memory_digest() of all of RAM vs single-threaded blake3 of a copy
Also printed, not a speed: lz4 ratio of each content kind per 4 KiB page.

With --json the last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import blake3
import lz4.block
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipeline.xen_io.sim.dirty_log import runs_to_pfns, uffd_wp_async_unsupported_reason  # noqa: E402
from pipeline.xen_io.sim import SimDomain, WorkloadSpec, open_sim_domain  # noqa: E402

DIRTY_SIZES = (1024, 4096, 16384, 65536)


def memcpy_seconds(nbytes: int, repeats: int = 3) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def eventfd_round_trip(n: int) -> list[float]:
    """Parent writes eventfd A, child reads it and writes eventfd B, parent reads B."""
    a, b = os.eventfd(0), os.eventfd(0)
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(n + 10):
                os.eventfd_read(a)
                os.eventfd_write(b, 1)
        finally:
            os._exit(0)
    times = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        os.eventfd_write(a, 1)
        os.eventfd_read(b)
        if i >= 10:
            times.append(time.perf_counter() - t0)
        time.sleep(0.001)  # like a pause: the peer has gone back to sleep meanwhile
    os.waitpid(pid, 0)
    os.close(a)
    os.close(b)
    return times


def eventfd_write_seconds(n: int) -> list[float]:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        os.eventfd_write(fd, 1)
        times.append(time.perf_counter() - t0)
    os.close(fd)
    return times


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def bench_mode(mode: str, pages: int, samples: int, out: dict) -> None:
    t0 = time.perf_counter()
    dom = open_sim_domain(f"bench-{mode}", pages, WorkloadSpec(), dirty_log=mode)
    try:
        dom.start(paused=False)
        out[f"{mode}_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dom.prefault()  # what a stage pays once after fork (the full sync touches it all anyway)
        out[f"{mode}_prefault_s"] = time.perf_counter() - t0
        dom.enable_dirty_log()
        view = dom.memory_view()
        scratch = np.empty((max(DIRTY_SIZES), dom.page_size), np.uint8)
        scratch[:] = 1
        for n in DIRTY_SIZES:
            if n > pages:
                continue
            dom.pause()
            dom.read_and_clear_dirty_runs()
            dom.resume()
            t0 = time.perf_counter()
            dom.feed_input(SimDomain.write_command(n))
            dom.wait_for_input_seq(dom.input_head, timeout=120)
            guest_s = time.perf_counter() - t0
            dom.pause()
            t0 = time.perf_counter()
            starts, lengths = dom.read_and_clear_dirty_runs()
            out[f"{mode}_dirty_read_{n}_ms"] = (time.perf_counter() - t0) * 1e3
            out[f"{mode}_dirty_runs_{n}"] = int(starts.size)
            assert int(lengths.sum()) == n, (mode, n, int(lengths.sum()))
            pfns = runs_to_pfns(starts, lengths)
            t0 = time.perf_counter()
            dom.read_pages(pfns, scratch)
            out[f"{mode}_read_pages_{n}_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            dom.write_pages(pfns, scratch)
            out[f"{mode}_write_pages_{n}_ms"] = (time.perf_counter() - t0) * 1e3
            # reference: a sequential copy of as many pages of the same guest RAM mapping
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                np.copyto(scratch[:n], view[:n])
                best = min(best, time.perf_counter() - t0)
            out[f"{mode}_ref_memcpy_{n}_ms"] = best * 1e3
            if n == max(s for s in DIRTY_SIZES if s <= pages):
                out[f"{mode}_guest_write_us_per_page"] = guest_s / n * 1e6
            dom.resume()
        # pause / resume latency with the guest busy writing
        pauses, resumes = [], []
        for _ in range(samples):
            dom.feed_input(SimDomain.write_command(64))
            time.sleep(0.001)
            t0 = time.perf_counter()
            dom.pause()
            pauses.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dom.resume()
            resumes.append(time.perf_counter() - t0)
        out[f"{mode}_pause_p50_us"] = pct(pauses, 50) * 1e6
        out[f"{mode}_pause_p99_us"] = pct(pauses, 99) * 1e6
        out[f"{mode}_resume_p50_us"] = pct(resumes, 50) * 1e6
        out[f"{mode}_resume_p99_us"] = pct(resumes, 99) * 1e6
        dom.pause()
        t0 = time.perf_counter()
        dom.memory_digest()
        out[f"{mode}_digest_s"] = time.perf_counter() - t0
        copy = view.copy()
        t0 = time.perf_counter()
        blake3.blake3(copy).digest()
        out[f"{mode}_blake3_1thread_s"] = time.perf_counter() - t0
        del copy, view
    finally:
        dom.close()


def lz4_ratios(dom_pages: int = 4096) -> dict[str, float]:
    """lz4 size / raw size per 4 KiB page for each content kind of a filled guest."""
    dom = open_sim_domain("bench-lz4", dom_pages, WorkloadSpec(), dirty_log="bitmap")
    try:
        dom.start()
        ram = dom.memory_view()
        zero = ~ram.any(axis=1)
        text = ram[:, 0] == ord("#")
        random = ~zero & ~text
        out = {}
        for name, rows in (("zero", zero), ("text", text), ("random", random)):
            sample = np.flatnonzero(rows)[:500]
            size = sum(min(len(lz4.block.compress(ram[p].tobytes(), store_size=False)), 4096)
                       for p in sample)
            out[f"lz4_ratio_{name}_page"] = size / (len(sample) * dom.page_size)
        mixed = sum(min(len(lz4.block.compress(ram[p].tobytes(), store_size=False)), 4096)
                    for p in range(min(2000, dom_pages)))
        out["lz4_ratio_mix_page"] = mixed / (min(2000, dom_pages) * dom.page_size)
        return out
    finally:
        dom.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="guest RAM (default 1024)")
    ap.add_argument("--samples", type=int, default=200, help="pause/resume samples")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    pages = args.size_mb * 256
    modes = ["bitmap"] if uffd_wp_async_unsupported_reason() else ["uffd", "bitmap"]
    r: dict = {"size_mb": args.size_mb, "pages": pages, "modes": modes}
    for mode in modes:
        bench_mode(mode, pages, args.samples, r)
    r["ref_memcpy_ram_s"] = memcpy_seconds(pages * 4096, repeats=1)
    rt = eventfd_round_trip(args.samples)
    r["ref_eventfd_round_trip_p50_us"] = pct(rt, 50) * 1e6
    r["ref_eventfd_round_trip_p99_us"] = pct(rt, 99) * 1e6
    r["ref_eventfd_write_p50_us"] = statistics.median(eventfd_write_seconds(args.samples)) * 1e6
    r.update(lz4_ratios())

    print(f"sim guest, {args.size_mb} MiB ({pages} pages), dirty-log modes {modes}")
    print(f"{'figure':34} {'ours':>12} {'reference':>12} {'ratio':>8}")

    def row(label: str, ours: float, ref: float, unit: str) -> None:
        print(f"{label:34} {ours:10.3f}{unit:>2} {ref:10.3f}{unit:>2} {ours / ref:8.2f}")

    for mode in modes:
        row(f"{mode} start+fill vs memcpy RAM", r[f"{mode}_start_s"], r["ref_memcpy_ram_s"], "s")
        r[f"{mode}_start_ratio"] = r[f"{mode}_start_s"] / r["ref_memcpy_ram_s"]
        for q in ("p50", "p99"):
            row(f"{mode} pause {q} vs eventfd rtt", r[f"{mode}_pause_{q}_us"],
                r[f"ref_eventfd_round_trip_{q}_us"], "us")
        r[f"{mode}_pause_ratio"] = r[f"{mode}_pause_p50_us"] / r["ref_eventfd_round_trip_p50_us"]
        row(f"{mode} resume p50 vs eventfd write", r[f"{mode}_resume_p50_us"],
            r["ref_eventfd_write_p50_us"], "us")
        for n in DIRTY_SIZES:
            if n > pages:
                continue
            ref = r[f"{mode}_ref_memcpy_{n}_ms"]
            for what in ("dirty_read", "read_pages", "write_pages"):
                ours = r[f"{mode}_{what}_{n}_ms"]
                row(f"{mode} {what} {n // 1024}k vs memcpy", ours, ref, "ms")
                r[f"{mode}_{what}_{n}_ratio"] = ours / ref
        row(f"{mode} prefault vs memcpy RAM", r[f"{mode}_prefault_s"], r["ref_memcpy_ram_s"], "s")
        row(f"{mode} digest vs blake3 1 thread", r[f"{mode}_digest_s"],
            r[f"{mode}_blake3_1thread_s"], "s")
    if len(modes) == 2:
        row("guest write/page uffd vs bitmap", r["uffd_guest_write_us_per_page"],
            r["bitmap_guest_write_us_per_page"], "us")
        r["guest_write_uffd_vs_bitmap_ratio"] = (r["uffd_guest_write_us_per_page"]
                                                 / r["bitmap_guest_write_us_per_page"])
    print("lz4 size/raw per page: " + ", ".join(
        f"{k[10:-5]} {r[k]:.3f}" for k in r if k.startswith("lz4_ratio_")))
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
