#!/usr/bin/env python3
"""Does a blake3 call over many pages pay? (issue 13, items 2 and 3.)

The page path hashes 4 KiB pages: the primary's digest workers every dirty page, the
secondary every page its SVM dirtied (SVM_DIRTY), the verify workers and the restore
stage a sample. A 4 KiB input is four blake3 chunks, which fill 4 of the 16 lanes of
blake3's AVX-512 kernel, and one call per page costs about as much again in Python. This
measures, in one run, on the same pages:

* ``blake3``: the blake3 package, one call per page (``hash_pages_each``: what the page
  path did until session 10, and what it still does without the compiled module);
* ``many``: ``pipeline._pagehash`` (csrc/pagehash.c), one call for all the pages over the
  official C implementation's ``blake3_hash_many``: the chunks of many pages side by side
  (16 at a time with AVX-512, 8 with AVX2), then each page's parents and root the same way.

It checks that both give the same digests (the kernel is blake3 or it is nothing), and
prints us/page of CPU for each and the ratio many/blake3 measured in this run, for batches
of 256 pages (a ring slot) and --pages (a large checkpoint). JSON last line with --json.

    scripts/bench_hash_many.py --pages 16384 --reps 5 --json

Session 9 tried the same idea in numba (16 lanes of the compression function written out,
commit a10cbc6): x3.07 (256 pages) and x4.34 (16k pages) of blake3's time at load 19,
compiled in 217 s: LLVM did not turn the lane loop into 16-wide code. Hence the C kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.stages.common import hash_pages_each  # noqa: E402


def pages_of(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 4096), dtype=np.uint8)


def timed(fn, arg, reps: int) -> float:
    """Median seconds of ``reps`` calls (thread CPU time: less load-sensitive)."""
    took = []
    for _ in range(reps):
        t0 = time.thread_time_ns()
        fn(arg)
        took.append((time.thread_time_ns() - t0) / 1e9)
    return statistics.median(took)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from pipeline import _pagehash     # the compiled module (pip install builds it)

    def many(pages: np.ndarray) -> np.ndarray:
        out = np.empty((len(pages), 32), np.uint8)
        _pagehash.hash_pages(pages, None, out)
        return out
    pages = pages_of(args.pages)
    pages[::5] = 0       # zero pages hash like any other here (the digest skips them)
    equal = bool((many(pages) == hash_pages_each(pages)).all())
    rows = {}
    for n in (256, args.pages):
        sub = pages[:n]
        t_lib = timed(hash_pages_each, sub, args.reps)
        t_many = timed(many, sub, args.reps)
        rows[n] = {"pages": n, "blake3_us_per_page": t_lib / n * 1e6,
                   "many_us_per_page": t_many / n * 1e6, "ratio_many_vs_blake3": t_many / t_lib}
        print(f"{n:6d} pages: blake3 {t_lib / n * 1e6:.2f} us/page, many {t_many / n * 1e6:.2f}"
              f" us/page: x{t_many / t_lib:.2f} of blake3's time (same run)")
    print(f"digests equal to blake3's: {equal}; SIMD lanes {_pagehash.simd_degree()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)")
    if args.json:
        print(json.dumps({"equal": equal, "simd_degree": _pagehash.simd_degree(),
                          "by_size": list(rows.values()), "loadavg": os.getloadavg()}))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
