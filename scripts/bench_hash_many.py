#!/usr/bin/env python3
"""Does a blake3 call over many pages pay? (issue 13, item 2.)

The page path hashes 4 KiB pages one blake3 call each (pipeline/stages/common.hash_pages):
a 4 KiB input fills 4 of the 16 lanes of blake3's AVX-512 kernel, and the call costs
about as much again in Python. This measures, in one run, on the same pages:

* ``blake3``: the library, one call per page (hash_pages, what the pipeline does);
* ``many``: one numba call for all the pages, blake3 computed 16 chunks side by side:
  the 4 chunks of each of 4+ pages at once (every chunk's 16 blocks in turn), then the
  two levels of parents. The compression function is written out once per round
  (straight-line code over the lanes' scalars), so LLVM vectorizes the loop over lanes.

It checks that both give the same digests (the kernel is blake3 or it is nothing), and
prints us/page for each and the ratio many/blake3 measured in this run, for batches of
256 pages (a ring slot) and 16k pages (a large checkpoint). JSON last line with --json.

    scripts/bench_hash_many.py --pages 16384 --reps 5 --json

Session 9, load 19 on 2 cores (shared): digests equal; many x3.07 (256 pages) and x4.34
(16k pages) of blake3's time (blake3 2.09 and 2.27 us/page), compiled in 217 s. It does
not pay: the page path keeps one library call per page. LLVM does not turn the lane loop
into 16-wide code here (strided message loads from 4 KiB rows, 64-bit integer promotion in
numba); what would pay is blake3's own many-input SIMD kernel (its C hash_many), reachable
only through a C extension.
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

from pipeline.stages.common import hash_pages  # noqa: E402

IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
      0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)


def _schedule() -> list[list[int]]:
    rows = [list(range(16))]
    for _ in range(6):
        rows.append([rows[-1][i] for i in PERMUTATION])
    return rows


def _rounds() -> list[str]:
    """The 7 rounds of the compression function over scalars s0..s15, message m0..m15
    (uint32 locals; every result truncated to 32 bits by np.uint32)."""
    out = []

    def g(a, b, c, d, x, y):
        return [f"s{a} = u32(s{a} + s{b} + m{x})",
                f"s{d} = u32(s{d} ^ s{a}); s{d} = u32((s{d} >> 16) | (s{d} << 16))",
                f"s{c} = u32(s{c} + s{d})",
                f"s{b} = u32(s{b} ^ s{c}); s{b} = u32((s{b} >> 12) | (s{b} << 20))",
                f"s{a} = u32(s{a} + s{b} + m{y})",
                f"s{d} = u32(s{d} ^ s{a}); s{d} = u32((s{d} >> 8) | (s{d} << 24))",
                f"s{c} = u32(s{c} + s{d})",
                f"s{b} = u32(s{b} ^ s{c}); s{b} = u32((s{b} >> 7) | (s{b} << 25))"]
    for r in _schedule():
        for i, (a, b, c, d) in enumerate(((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14),
                                          (3, 7, 11, 15), (0, 5, 10, 15), (1, 6, 11, 12),
                                          (2, 7, 8, 13), (3, 4, 9, 14))):
            out += g(a, b, c, d, r[2 * i], r[2 * i + 1])
    return out


def _source() -> str:
    body = "\n".join("        " + ln for ln in _rounds())
    init = "\n".join(f"        s{8 + i} = u32({IV[i]})" for i in range(4))
    fin = "\n".join(f"        h[{i}, l] = u32(s{i} ^ s{i + 8})" for i in range(8))
    return f'''
def chunk_blocks(pw, rows, h, b, flags):
    """Block b of every chunk lane: lane l is chunk l & 3 of page rows[l >> 2]."""
    for l in range(h.shape[1]):
        base = (l & 3) * 256 + b * 16
        p = rows[l >> 2]
{chr(10).join(f"        m{w} = pw[p, base + {w}]" for w in range(16))}
{chr(10).join(f"        s{i} = h[{i}, l]" for i in range(8))}
{init}
        s12 = u32(l & 3)
        s13 = u32(0)
        s14 = u32(64)
        s15 = u32(flags)
{body}
{fin}


def parents(cv, h, flags):
    """Lane l: the parent of child CVs 2l and 2l + 1 of ``cv`` (8, 2L) into h (8, L)."""
    for l in range(h.shape[1]):
{chr(10).join(f"        m{w} = cv[{w}, 2 * l]" for w in range(8))}
{chr(10).join(f"        m{8 + w} = cv[{w}, 2 * l + 1]" for w in range(8))}
{chr(10).join(f"        s{i} = u32({IV[i]})" for i in range(8))}
{init}
        s12 = u32(0)
        s13 = u32(0)
        s14 = u32(64)
        s15 = u32(flags)
{body}
{fin}
'''


def build():
    """The kernel, compiled by numba (this takes a while the first time in a process)."""
    import numba
    ns: dict = {"u32": np.uint32}
    exec(compile(_source(), "<blake3_many>", "exec"), ns)
    jit = numba.njit(nogil=True, fastmath=False)
    chunk_blocks, parents = jit(ns["chunk_blocks"]), jit(ns["parents"])

    @numba.njit(nogil=True)
    def hash_many(pw, rows, out):
        n = rows.shape[0]
        h = np.empty((8, 4 * n), np.uint32)
        for i in range(8):
            h[i, :] = IV[i]
        for b in range(16):
            flags = (CHUNK_START if b == 0 else 0) | (CHUNK_END if b == 15 else 0)
            chunk_blocks(pw, rows, h, b, flags)
        mid = np.empty((8, 2 * n), np.uint32)
        parents(h, mid, PARENT)
        root = np.empty((8, n), np.uint32)
        parents(mid, root, PARENT | ROOT)
        for i in range(8):
            out[:, i] = root[i, :]

    def hash_pages_many(pages: np.ndarray) -> np.ndarray:
        """blake3 of each 4 KiB row of ``pages``, as (n, 32) uint8."""
        n = len(pages)
        out = np.empty((n, 8), np.uint32)
        hash_many(pages.view(np.uint32).reshape(n, 1024), np.arange(n, dtype=np.int64), out)
        return out.view(np.uint8).reshape(n, 32)
    return hash_pages_many


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
    t0 = time.monotonic()
    many = build()
    pages = pages_of(args.pages)
    equal = bool((many(pages[:256]) == hash_pages(pages[:256])).all())  # (compiles it)
    compile_s = time.monotonic() - t0
    equal &= bool((many(pages) == hash_pages(pages)).all())
    rows = {}
    for n in (256, args.pages):
        sub = pages[:n]
        t_lib = timed(hash_pages, sub, args.reps)
        t_many = timed(many, sub, args.reps)
        rows[n] = {"pages": n, "blake3_us_per_page": t_lib / n * 1e6,
                   "many_us_per_page": t_many / n * 1e6, "ratio_many_vs_blake3": t_many / t_lib}
        print(f"{n:6d} pages: blake3 {t_lib / n * 1e6:.2f} us/page, many {t_many / n * 1e6:.2f}"
              f" us/page: x{t_many / t_lib:.2f} of blake3's time (same run)")
    print(f"digests equal to blake3's: {equal}; compile {compile_s:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)")
    if args.json:
        print(json.dumps({"equal": equal, "compile_s": round(compile_s, 1),
                          "by_size": list(rows.values()), "loadavg": os.getloadavg()}))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
