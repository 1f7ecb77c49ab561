#!/usr/bin/env python3
"""Benchmark the checkpoint page path on a sim guest (issue 2).

In one run, on a guest of --size-mb (30% zero, 40% text-like, 30% random pages):
  * references measured now on this machine: memcpy of the guest, single-core lz4
    (per page, as the digest workers use it) and blake3 (per page) over the mix;
  * the full sync between a real primary and secondary node on this machine, in guest
    MB/s, next to those references;
  * checkpoints of 1k, 4k, 16k and 64k dirty pages, --reps of each: PVM pause (target
    <= 2.5x a sequential memcpy of the same bytes + 2 ms), time to commit (p50/p99 per
    size, issue 13's targets: 1k <= 5 ms, 16k <= 60 ms) split into pause, transfer,
    apply and ACK, bytes on the wire, pages skipped by hash and zero pages. PVM and SVM
    run the same inputs (the write commands are mirrored like every input, and a
    checkpoint is asked for once both guests ran it); pages the SVM already holds go as
    SVM pages, without content (pages_same_as_svm); the SVM's hashes come in parts
    (svm_dirty_parts) and batches below a part go on before the rest came
    (svm_early_batches); the share of the SVM's dirty pages the secondary hashed while the
    SVM ran, before BEGIN (svm_prehashed_share); the batches the snapshot stage dealt each
    checkpoint's pages in to the digest workers (batches_per_checkpoint: one per worker is
    the aim).
--json prints one JSON object with every figure as the last line ("by_size": one entry
per dirty-set size).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import blake3
import lz4.block
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import cpu_latency  # noqa: E402
from pipeline.localpair import LocalPair  # noqa: E402
from pipeline.xen_io.sim import SimDomain, WorkloadSpec, open_sim_domain  # noqa: E402

SEED = 7
PAGE = 4096


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def references(page_count: int, sample_pages: int = 16384) -> dict:
    """memcpy, lz4 and blake3 rates on the same content the guest starts with."""
    dom = open_sim_domain("bench-ref", page_count, WorkloadSpec(seed=SEED), dirty_log="bitmap")
    dom.start(paused=True)
    try:
        ram = np.array(dom.memory_view())   # a private copy of the guest's memory
    finally:
        dom.close()
    dst = np.empty_like(ram)
    t_memcpy = _best(lambda: np.copyto(dst, ram))
    sample = ram[np.linspace(0, page_count - 1, min(sample_pages, page_count)).astype(int)]

    def lz4_pages() -> None:
        for page in sample:
            lz4.block.compress(page, store_size=False)

    def blake3_pages() -> None:
        for page in sample:
            blake3.blake3(page).digest()
    t_lz4 = _best(lz4_pages)
    t_b3 = _best(blake3_pages)
    mb = ram.nbytes / 1e6
    smb = sample.nbytes / 1e6
    return {
        "memcpy_mb_s": round(mb / t_memcpy, 1),
        "lz4_page_mb_s": round(smb / t_lz4, 1),
        "blake3_page_mb_s": round(smb / t_b3, 1),
        "memcpy_s_per_page": t_memcpy / page_count,
    }


def _pair(page_count: int, digest_workers: int, verify_workers: int,
          threshold: int, compress: str | None = None, dirty_log: str = "auto",
          security: str = "curve", batch_pages: int | None = None,
          prescan_ms: int | None = None, cpu_latency_us: int | None = None) -> LocalPair:
    """``compress``: None for the config's default (auto); ``security``: "curve" (the
    default), "sealed" or "plaintext"; ``batch_pages``, ``prescan_ms`` (checkpoint.prescan_ms): None
    for the config's default."""
    pipeline = {"digest_workers": digest_workers, "verify_workers": verify_workers}
    if batch_pages:
        pipeline["batch_pages"] = batch_pages
    if compress is not None:
        pipeline["compress"] = compress
    checkpoint = {"max_interval_ms": 3_600_000, "min_interval_ms": 0,
                  "dirty_threshold_pages": threshold, "epoch_timeout_ms": 300_000}
    if prescan_ms is not None:
        checkpoint["prescan_ms"] = prescan_ms
    return LocalPair({
        **({"node": {"cpu_latency_us": cpu_latency_us}} if cpu_latency_us is not None else {}),
        "guest": {"backend": "sim", "page_count": page_count, "dirty_log": dirty_log},
        "guest.workload": {"seed": SEED, "input_rate_hz": 0.0},
        "security": {"mode": security},
        "pipeline": pipeline,
        "checkpoint": checkpoint,
    })


def start_ready(pair: LocalPair, timeout: float = 900) -> None:
    """Start the secondary, wait until its restore stage has populated its cache (and so
    mapped staging and guest memory), then the primary: the full sync is then timed
    against a secondary that is up and waiting, as QEMU's destination is. Started
    together, the sync's first page waited 1.2-1.5 s for the restore stage's startup
    (512 MiB, load 17-23 on 2 cores), in the sync's time (and read by compress = "auto"
    as a slow link); a CURVE primary, whose first HELLO often went unanswered (the next
    comes 1 s later), began after more of that startup than a plaintext one."""
    pair.start(roles=("secondary",))
    deadline = time.monotonic() + timeout
    while not pair.stage_counter("restore", "cache_populated", role="secondary"):
        pair.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError("the secondary's restore stage did not start up")
        time.sleep(0.02)
    pair.start(roles=("primary",))


def run_full_sync(page_count: int, digest_workers: int = 2, verify_workers: int = 2,
                  compress: str | None = None, security: str = "curve") -> dict:
    """Full sync of a seed-7 sim guest between a real primary and secondary on this machine."""
    with _pair(page_count, digest_workers, verify_workers, 16384, compress,
               security=security) as pair:
        start_ready(pair)
        pair.wait_protected(timeout=900)
        sync = pair.checkpoints()[0]
    seconds = sync["commit_ns"] / 1e9
    return {"seconds": round(seconds, 3), "guest_mb_s": round(page_count * PAGE / 1e6 / seconds, 1),
            "bytes_wire": sync["bytes_wire"], "pages_zero": sync["pages_zero"],
            "security": security}


def write_in_both_guests(pair, pages: int) -> None:
    """Make PVM and SVM both write ``pages`` pages (one input, so the same pages and bytes)
    and return once both guests ran it: the SVM then holds the pages the PVM dirtied, and
    the next checkpoint sends them as SVM pages. Shared by the commit benchmarks."""
    seq = pair.stage_counter("client", "pvm_input_seq")
    pair.inject_input(SimDomain.write_command(pages))
    deadline = time.monotonic() + 300
    while (pair.stage_counter("client", "pvm_input_seq") <= seq
           or pair.stage_counter("mirror", "svm_input_seq", role="secondary") <= seq):
        if time.monotonic() > deadline:
            raise RuntimeError("the PVM or the SVM did not consume the write command")
        time.sleep(0.005)


def run_checkpoints(page_count: int, sizes: list[int], digest_workers: int, verify_workers: int,
                    memcpy_s_per_page: float, dirty_log: str = "auto", reps: int = 5,
                    security: str = "curve", compress: str | None = None,
                    batch_pages: int | None = None,
                    prescan_ms: int | None = None,
                    cpu_latency_us: int | None = None) -> tuple[dict, list[dict]]:
    rows = []
    with _pair(page_count, digest_workers, verify_workers, max(sizes) * 2, compress,
               dirty_log=dirty_log, security=security, batch_pages=batch_pages,
               prescan_ms=prescan_ms, cpu_latency_us=cpu_latency_us) as pair:
        start_ready(pair)
        pair.wait_protected(timeout=900)
        sync = pair.checkpoints()[0]
        seconds = sync["commit_ns"] / 1e9
        full = {"seconds": round(seconds, 3),
                "guest_mb_s": round(page_count * PAGE / 1e6 / seconds, 1),
                "bytes_wire": sync["bytes_wire"]}
        def parts_counts() -> tuple[int, int]:
            """SVM_DIRTY parts the primary took in (more to come), and checkpoint batches
            the digest workers classified on a part (before the last one came)."""
            early = sum(pair.stage_counter(f"digest.{i}", "svm_early_batches")
                        for i in range(digest_workers))
            return pair.stage_counter("coordinator", "svm_dirty_parts"), early

        def prescanned() -> int:
            """Pages the snapshot stage took off the PVM's dirty log while it ran (before
            the pause: snapshot.Prescan)."""
            return pair.stage_counter("snapshot", "pages_prescanned")

        def batches() -> int:
            """Batches the snapshot stage dealt the digest workers checkpoints' pages in."""
            return pair.stage_counter("snapshot", "checkpoint_batches")

        def svm_prehashed() -> int:
            """SVM pages the secondary hashed while the SVM ran (coordinator.SvmPrehash)."""
            return pair.stage_counter("coordinator", "svm_prehashed", role="secondary")

        for n in sizes:
            for _ in range(reps):         # later rounds also show pages skipped by hash
                early = prescanned()
                svm_early = svm_prehashed()
                dealt = batches()
                write_in_both_guests(pair, n)
                count = len(pair.checkpoints())
                before = parts_counts()
                pair.request_checkpoint()
                cp = pair.wait_checkpoints(count + 1, timeout=600)[-1]
                early_pages = prescanned() - early
                dealt = batches() - dealt
                svm_early = svm_prehashed() - svm_early
                parts, early = (a - b for a, b in zip(parts_counts(), before))
                if cp["status"] != 0:
                    raise RuntimeError(f"checkpoint of {n} pages aborted")
                raw = cp["pages_dirty"] * PAGE
                memcpy_ms = cp["pages_dirty"] * memcpy_s_per_page * 1e3
                rows.append({
                    "dirty_target": n,
                    "pages_dirty": cp["pages_dirty"],
                    "pages_svm_dirty": cp["pages_svm_dirty"],
                    "pause_ms": round(cp["pvm_pause_ns"] / 1e6, 3),
                    "memcpy_ms": round(memcpy_ms, 3),
                    "pause_budget_ms": round(2.5 * memcpy_ms + 2, 3),
                    "pause_ok": cp["pvm_pause_ns"] / 1e6 <= 2.5 * memcpy_ms + 2,
                    "commit_ms": round(cp["commit_ns"] / 1e6, 3),
                    "transfer_ms": round(cp.get("transfer_ns", 0) / 1e6, 3),
                    "apply_ms": round(cp.get("apply_ns", 0) / 1e6, 3),
                    "ack_ms": round(cp.get("ack_ns", 0) / 1e6, 3),
                    "bytes_wire": cp["bytes_wire"],
                    "wire_ratio": round(cp["bytes_wire"] / raw, 3) if raw else None,
                    "pages_skipped_hash": cp["pages_skipped_hash"],
                    "pages_same_as_svm": cp.get("pages_same_as_svm", 0),
                    "pages_zero": cp["pages_zero"],
                    "svm_dirty_parts": parts + 1,
                    "svm_early_batches": early,
                    # (the rounds after the previous checkpoint and before this one's pause)
                    "pages_prescanned": early_pages,
                    # SVM pages hashed by the secondary's rounds from the write to the
                    # commit (before BEGIN, but for a round after the SVM resumed)
                    "svm_prehashed": svm_early,
                    # one per digest worker is the aim (snapshot.checkpoint_batch)
                    "batches": dealt,
                })
        # the heartbeat must not have declared anyone lost during the 1 GiB sync and the
        # big checkpoints (issue 5: no false failover under load)
        full["peer_lost"] = sum(pair.stage_counter("coordinator", "peer_lost", role=r)
                                for r in ("primary", "secondary"))
        # SVM pages the secondary hashed while the SVM ran, before BEGIN (off the commit's
        # path): how much of the SVM's hashing the checkpoints above did not wait for
        full["svm_prehashed"] = pair.stage_counter("coordinator", "svm_prehashed",
                                                   role="secondary")
    return full, rows


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))] if v else 0.0


def by_size(rows: list[dict]) -> list[dict]:
    """Per dirty-set size: commit p50/p99 and the p50 of each part of the split."""
    out = []
    for n in dict.fromkeys(r["dirty_target"] for r in rows):
        rs = [r for r in rows if r["dirty_target"] == n]
        entry = {"dirty_target": n, "checkpoints": len(rs),
                 "pages_dirty": int(_pct([r["pages_dirty"] for r in rs], 50)),
                 "commit_ms_p50": _pct([r["commit_ms"] for r in rs], 50),
                 "commit_ms_p99": _pct([r["commit_ms"] for r in rs], 99)}
        for part in ("pause", "transfer", "apply", "ack"):
            entry[f"{part}_ms_p50"] = _pct([r[f"{part}_ms"] for r in rs], 50)
        entry["pause_ok"] = all(r["pause_ok"] for r in rs)
        entry["wire_ratio_p50"] = _pct([r["wire_ratio"] or 0 for r in rs], 50)
        entry["pages_skipped_hash"] = sum(r["pages_skipped_hash"] for r in rs)
        entry["pages_zero"] = sum(r["pages_zero"] for r in rs)
        entry["pages_same_as_svm"] = sum(r["pages_same_as_svm"] for r in rs)
        # SVM_DIRTY came in this many parts (p50), and so many batches went before the last
        entry["svm_dirty_parts_p50"] = _pct([r["svm_dirty_parts"] for r in rs], 50)
        entry["svm_early_batches"] = sum(r["svm_early_batches"] for r in rs)
        entry["pages_prescanned_p50"] = _pct([r["pages_prescanned"] for r in rs], 50)
        entry["batches_per_checkpoint"] = round(sum(r["batches"] for r in rs) / len(rs), 2)
        # the share of the SVM's dirty pages its BEGIN did not have to hash (at most 1)
        entry["svm_prehashed_share"] = round(min(1.0, sum(r["svm_prehashed"] for r in rs)
                                                 / max(1, sum(r["pages_svm_dirty"]
                                                              for r in rs))), 3)
        entry["pages_eliminated_share"] = round(
            (entry["pages_skipped_hash"] + entry["pages_same_as_svm"])
            / max(1, sum(r["pages_dirty"] for r in rs)), 3)
        target = {1024: 5.0, 1000: 5.0, 16384: 60.0, 16000: 60.0}.get(n)
        if target is not None:
            entry["commit_target_ms"] = target
            entry["commit_target_met"] = entry["commit_ms_p50"] <= target
        out.append(entry)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--sizes", default="1024,4096,16384,65536",
                    help="dirty pages per checkpoint, comma separated")
    ap.add_argument("--digest-workers", type=int, default=2)
    ap.add_argument("--verify-workers", type=int, default=2)
    ap.add_argument("--dirty-log", default="auto", choices=["auto", "uffd", "bitmap"],
                    help="the sim guest's dirty log (uffd: the kernel's, a PAGEMAP_SCAN walk "
                    "of all of guest memory per checkpoint; bitmap: kept by the guest)")
    # 15, not 5: the first checkpoints after the full sync are the slowest (the tables and
    # caches warm up: 1k medians of checkpoints 1-5, 6-10, 11-15 were 5.06, 4.49, 4.29 ms,
    # docs/tuning.md Session 20 (prim)), so a p50 of 5 reported the warm-up, not the run
    ap.add_argument("--reps", type=int, default=15, help="checkpoints per dirty-set size")
    ap.add_argument("--security", default="curve", choices=["curve", "sealed", "plaintext"])
    ap.add_argument("--compress", default=None, choices=["auto", "lz4", "none"],
                    help="pipeline.compress (default: the config's, auto)")
    ap.add_argument("--batch-pages", type=int, default=0,
                    help="pipeline.batch_pages (0: the config's default)")
    ap.add_argument("--prescan-ms", type=int, default=None,
                    help="checkpoint.prescan_ms (default: the config's; 0 = off)")
    ap.add_argument("--cpu-latency-us", type=int, default=None,
                    help="node.cpu_latency_us, both nodes (default: the config's, 0; -1: "
                    "not held); the JSON says what was in force during the run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    page_count = args.size_mb * 1024 * 1024 // PAGE
    sizes = [min(int(s), page_count // 2) for s in args.sizes.split(",")]
    ref = references(page_count)
    with cpu_latency.InForceWatch() as in_force:   # the machine's: anyone may hold it
        full, rows = run_checkpoints(page_count, sizes, args.digest_workers,
                                     args.verify_workers, ref["memcpy_s_per_page"],
                                     args.dirty_log, args.reps, args.security, args.compress,
                                     args.batch_pages or None, args.prescan_ms,
                                     args.cpu_latency_us)
    sizes_out = by_size(rows)
    result = {"size_mb": args.size_mb, "dirty_log": args.dirty_log, "references": ref,
              "full_sync": full,
              "full_sync_vs_memcpy": round(full["guest_mb_s"] / ref["memcpy_mb_s"], 4),
              "full_sync_vs_lz4": round(full["guest_mb_s"] / ref["lz4_page_mb_s"], 3),
              "full_sync_vs_blake3": round(full["guest_mb_s"] / ref["blake3_page_mb_s"], 3),
              "security": args.security, "compress": args.compress or "auto",
              "batch_pages": args.batch_pages or "default",
              "prescan_ms": "default" if args.prescan_ms is None else args.prescan_ms,
              "cpu_latency_us": "default" if args.cpu_latency_us is None
              else args.cpu_latency_us, "cpu_latency_in_force": in_force.summary(),
              "loadavg": list(os.getloadavg()), "by_size": sizes_out, "checkpoints": rows}
    print(f"guest {args.size_mb} MiB, {args.digest_workers} digest / {args.verify_workers} "
          f"verify workers, {os.cpu_count()} cores")
    print(f"references: memcpy {ref['memcpy_mb_s']} MB/s, lz4 per page {ref['lz4_page_mb_s']} "
          f"MB/s, blake3 per page {ref['blake3_page_mb_s']} MB/s (one core)")
    print(f"full sync: {full['guest_mb_s']} guest MB/s in {full['seconds']} s "
          f"(x{result['full_sync_vs_memcpy']} memcpy, x{result['full_sync_vs_lz4']} lz4, "
          f"x{result['full_sync_vs_blake3']} blake3), {full['bytes_wire'] / 1e6:.1f} MB on "
          f"the wire; heartbeat losses during the run: {full['peer_lost']}")
    print(f"{'dirty':>7}{'pause ms':>10}{'budget':>9}{'memcpy':>9}{'commit ms':>11}"
          f"{'wire/raw':>10}{'by hash':>9}{'zero':>7}")
    for r in rows:
        print(f"{r['pages_dirty']:>7}{r['pause_ms']:>10.2f}{r['pause_budget_ms']:>9.2f}"
              f"{r['memcpy_ms']:>9.2f}{r['commit_ms']:>11.1f}{r['wire_ratio']:>10.3f}"
              f"{r['pages_skipped_hash']:>9}{r['pages_zero']:>7}")
    print(f"\ncommit per dirty-set size ({args.reps} checkpoints each, {args.security}), p50 "
          "of each part:")
    print(f"{'dirty':>7}{'p50 ms':>9}{'p99 ms':>9}{'pause':>8}{'transfer':>10}{'apply':>8}"
          f"{'ACK':>7}{'target':>8}{'eliminated':>11}")
    for e in sizes_out:
        target = (f"{e['commit_target_ms']:.0f} " + ("met" if e["commit_target_met"] else "NOT")
                  if "commit_target_ms" in e else "")
        print(f"{e['pages_dirty']:>7}{e['commit_ms_p50']:>9.1f}{e['commit_ms_p99']:>9.1f}"
              f"{e['pause_ms_p50']:>8.1f}{e['transfer_ms_p50']:>10.1f}{e['apply_ms_p50']:>8.1f}"
              f"{e['ack_ms_p50']:>7.1f}{target:>8}{e['pages_eliminated_share']:>11.2f}")
    print(f"(shared machine: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
