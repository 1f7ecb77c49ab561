#!/usr/bin/env python3
"""Our full sync vs QEMU 7.2 live migration of the same RAM image, on this machine.

1. The image: the sim guest's deterministic fill with seed 7 (30% zero, 40%
   text-like, 30% random pages), --size-mb MiB, written to /dev/shm. Our side's
   full sync (scripts/bench_pipeline.run_full_sync) fills its sim guest with the
   same seed, i.e. the same bytes.
2. QEMU: the image file is the source's guest RAM (memory-backend-file, share=on,
   -S, so no guest code runs and QEMU does not write it: checked by hashing it
   after start); the destination maps a separate empty file (-incoming defer).
   max-bandwidth is raised to 100 GiB/s (the default 128 MiB/s would be the limit).
   Two runs: plain, and multifd with 2 channels. Time and bytes from query-migrate;
   afterwards the destination's RAM file must have the image's blake3.
   QEMU's RAM also has its BIOS/option-ROM blocks (a few hundred KiB, not in the
   file): they are migrated too and counted in its bytes, not in guest MB/s.
   With TLS (tls-creds-x509, a CA and server and client certificates made by the
   script with openssl, both ends verifying the other): the same, plain and multifd.
3. Ours: run_full_sync(page_count, digest_workers=2, verify_workers=2), a real
   primary and secondary node on this machine: with security.mode = "plaintext"
   (the row against QEMU's plaintext migration), and the secure rows against QEMU over
   TLS: "sealed" (the pages channel's records sealed with AES-GCM by the digest and
   verify workers, pipeline/seal.py) and "curve" (CurveZMQ on every channel).

guest MB/s = image bytes / 1e6 / seconds, for every system (the ratio uses the
same formula, so it does not depend on units). JSON keys of the targets:
``ratio_vs_multifd`` (ours plaintext / QEMU multifd) and ``ratio_secure_vs_qemu_tls``
(ours sealed, the faster of our secure modes, / the faster of QEMU's two TLS runs); each
secure mode's own: ``ratio_sealed_vs_qemu_tls``, ``ratio_curve_vs_qemu_tls``.
``--ours`` chooses our rows (e.g. ``--ours-only --ours sealed,curve``: the two secure
modes alone, alternated). QEMU's seconds are its
query-migrate total-time (migrate command to source completed); the wall time to
the destination reporting completed (a little later: the source finishes first)
is shown too, with the ratio against it.
With --json the last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import blake3

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(HERE, ".."))

import qemu_migration  # noqa: E402

PAGE = 4096
SEED = 7


def build_image(page_count: int, path: str) -> tuple[str, dict]:
    """Write the seed-7 sim guest's RAM to ``path``; return (blake3 hex, page mix)."""
    import numpy as np
    from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain

    dom = open_sim_domain("img", page_count, WorkloadSpec(seed=SEED), dirty_log="bitmap")
    try:
        dom.start(paused=True)
        view = dom.memory_view()
        assert view.shape == (page_count, PAGE), view.shape
        digest = blake3.blake3(view).hexdigest()
        zero = int((~view.any(axis=1)).sum())
        with open(path, "wb") as f:
            f.write(memoryview(np.ascontiguousarray(view)).cast("B"))
    finally:
        dom.close()
    if qemu_migration.file_blake3(path) != digest:
        raise RuntimeError(f"{path}: written image does not hash like the guest's RAM")
    return digest, {"pages": page_count, "zero_pages": zero}


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds if seconds > 0 else float("nan")


QEMU_MODES = {"qemu_plain": (False, False), "qemu_multifd": (True, False),
              "qemu_tls": (False, True), "qemu_multifd_tls": (True, True)}
OURS_MODES = {"ours": "plaintext", "ours_secure": "sealed", "ours_curve": "curve"}


def qemu_once(image: str, size_mb: int, digest: str, multifd: bool, tls: bool = False) -> dict:
    r = qemu_migration.migrate_image(image, size_mb, multifd=multifd, channels=2,
                                     max_bandwidth=100 << 30, image_digest=digest, tls=tls)
    if not r["dst_equal"]:
        raise RuntimeError(f"QEMU {r['mode']}: destination RAM differs from the image")
    return r


def median_run(runs: list[dict], key: str) -> dict:
    """The median run by ``key`` (for an even count, the faster of the middle two)."""
    runs = sorted(runs, key=lambda r: r[key])
    med = dict(runs[(len(runs) - 1) // 2])
    med["runs_" + key] = [r[key] for r in runs]
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="RAM image size in MiB")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--qemu-only", action="store_true", help="skip our full sync")
    ap.add_argument("--ours-only", action="store_true", help="skip QEMU")
    ap.add_argument("--compress", default=None,
                    help="passed to run_full_sync(compress=...) (lz4 | none); "
                         "default: run_full_sync's own default")
    ap.add_argument("--ours", default="plaintext,sealed,curve",
                    help="our security modes to run, comma-separated (default: all three)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per system, interleaved; the median is reported (default 3)")
    args = ap.parse_args(argv)
    if args.size_mb < 1 or args.repeats < 1:
        ap.error("--size-mb and --repeats must be >= 1")
    if args.qemu_only and args.ours_only:
        ap.error("--qemu-only and --ours-only exclude each other")
    wanted = set(args.ours.split(","))
    if not wanted <= set(OURS_MODES.values()):
        ap.error(f"--ours: modes are {', '.join(OURS_MODES.values())}")
    ours_modes = {k: v for k, v in OURS_MODES.items() if v in wanted}

    run_full_sync = None
    if not args.qemu_only:  # fail before any QEMU runs if our side is missing
        try:
            run_full_sync = importlib.import_module("bench_pipeline").run_full_sync
        except (ImportError, AttributeError) as exc:
            print(f"bench_vs_qemu: cannot use scripts/bench_pipeline.run_full_sync ({exc}); "
                  f"run with --qemu-only to measure QEMU alone", file=sys.stderr)
            return 2

    page_count = args.size_mb * (1 << 20) // PAGE
    image_bytes = page_count * PAGE
    out: dict = {"size_mb": args.size_mb, "image_bytes": image_bytes, "seed": SEED,
                 "loadavg_start": list(os.getloadavg()), "ncpu": os.cpu_count()}
    image = f"/dev/shm/colo-bench-ram-{os.getpid()}"
    try:
        if not args.ours_only:
            t = time.perf_counter()
            digest, mix = build_image(page_count, image)
            out["image_blake3"] = digest
            out["image_zero_pages"] = mix["zero_pages"]
            print(f"image: {args.size_mb} MiB, {mix['zero_pages'] / page_count:.1%} zero pages, "
                  f"blake3 {digest[:16]}…, built in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr, flush=True)
        runs: dict[str, list[dict]] = {k: [] for k in (*QEMU_MODES, *OURS_MODES)}
        ours_errors: list[str] = []
        for i in range(args.repeats):  # interleaved, so a load change hits all alike
            if not args.ours_only:
                for name, (multifd, tls) in QEMU_MODES.items():
                    r = qemu_once(image, args.size_mb, digest, multifd, tls)
                    runs[name].append(r)
                    print(f"[{i + 1}/{args.repeats}] {name}: {r['total_time_ms'] / 1000:.3f}s "
                          f"{mb_s(image_bytes, r['total_time_ms'] / 1000):.0f} MB/s, "
                          f"{r['ram_transferred']} bytes, dst equal {r['dst_equal']}",
                          file=sys.stderr, flush=True)
            if not args.qemu_only:
                for name, security in ours_modes.items():
                    try:
                        kw = {} if args.compress is None else {"compress": args.compress}
                        r = dict(run_full_sync(page_count, digest_workers=2, verify_workers=2,
                                               security=security, **kw))
                    except Exception as exc:  # noqa: BLE001 - report it, keep QEMU's figures
                        ours_errors.append(f"{name}: {type(exc).__name__}: {exc}")
                        print(f"[{i + 1}/{args.repeats}] {name} FAILED: {ours_errors[-1]}",
                              file=sys.stderr, flush=True)
                        continue
                    runs[name].append(r)
                    print(f"[{i + 1}/{args.repeats}] {name} ({security}): "
                          f"{float(r['seconds']):.3f}s "
                          f"{mb_s(image_bytes, float(r['seconds'])):.0f} MB/s, "
                          f"{r['bytes_wire']} bytes", file=sys.stderr, flush=True)
    finally:
        try:
            os.unlink(image)
        except FileNotFoundError:
            pass

    for name in QEMU_MODES:
        if not runs[name]:
            continue
        r = median_run(runs[name], "total_time_ms")
        secs = r["total_time_ms"] / 1000.0
        out[name] = {
            "seconds": secs,
            "guest_mb_s": mb_s(image_bytes, secs),
            "wall_to_dst_completed_s": r["wall_to_dst_completed_s"],
            "guest_mb_s_to_dst_completed": mb_s(image_bytes, r["wall_to_dst_completed_s"]),
            "bytes_wire": r["ram_transferred"],
            "ram_total": r["ram_total"],
            "normal_pages": r["ram_normal_pages"],
            "zero_pages": r["ram_duplicate_pages"],
            "multifd_bytes": r["ram_multifd_bytes"],
            "downtime_ms": r["downtime_ms"],
            "channels": r["channels"],
            "max_bandwidth": r["max_bandwidth"],
            "dst_equal": all(x["dst_equal"] for x in runs[name]),
            "source_untouched": all(x["source_untouched_at_start"]
                                    and x["source_untouched_after"] for x in runs[name]),
            "runs_total_time_ms": r["runs_total_time_ms"],
        }
    for name, security in ours_modes.items():
        if not runs[name]:
            continue
        for x in runs[name]:
            x["seconds"] = float(x["seconds"])
        r = median_run(runs[name], "seconds")
        secs = r["seconds"]
        ours = {"seconds": secs, "guest_mb_s": mb_s(image_bytes, secs),
                "guest_mb_s_reported": r.get("guest_mb_s"),
                "bytes_wire": int(r["bytes_wire"]), "runs_seconds": r["runs_seconds"],
                "compress": args.compress or "default", "security": security}
        # anything else it reports (digests, memory equality, worker counts) goes along
        for k, v in r.items():
            if k not in ("seconds", "guest_mb_s", "bytes_wire", "runs_seconds") \
                    and isinstance(v, (int, float, str, bool, type(None))):
                ours.setdefault(k, v)
        for k in ("memory_digest", "digest", "secondary_digest", "primary_digest"):
            v = r.get(k)
            if isinstance(v, bytes):
                v = v.hex()
            if isinstance(v, str) and len(v) == 64 and "image_blake3" in out:
                ours["same_image_as_qemu"] = v == out["image_blake3"]
                break
        if "pages_zero" in r and "image_zero_pages" in out:
            # a cheap cross-check that our guest started from the same image
            ours["pages_zero_equal_image"] = int(r["pages_zero"]) == out["image_zero_pages"]
        out[name] = ours
    if "ours" in out and "qemu_multifd" in out:
        ours = out["ours"]
        out["ratio_vs_multifd"] = ours["guest_mb_s"] / out["qemu_multifd"]["guest_mb_s"]
        out["ratio_ours_vs_multifd"] = out["ratio_vs_multifd"]    # the key's older name
        out["ratio_ours_vs_plain"] = ours["guest_mb_s"] / out["qemu_plain"]["guest_mb_s"]
        out["target_met"] = out["ratio_vs_multifd"] >= 1.0
        # QEMU's source reports completed before the destination has loaded the
        # last pages; end to end (to the destination's completed) is the fairer peer
        # of a full sync that ends when the secondary holds the memory
        out["ratio_ours_vs_multifd_to_dst_completed"] = (
            ours["guest_mb_s"] / out["qemu_multifd"]["guest_mb_s_to_dst_completed"])
    if "qemu_tls" in out:
        best = max(("qemu_tls", "qemu_multifd_tls"), key=lambda k: out[k]["guest_mb_s"])
        out["qemu_tls_best"] = best
        for name, key in (("ours_secure", "ratio_sealed_vs_qemu_tls"),
                          ("ours_curve", "ratio_curve_vs_qemu_tls")):
            if name in out:
                out[key] = out[name]["guest_mb_s"] / out[best]["guest_mb_s"]
        if "ours_secure" in out:
            out["ratio_secure_vs_qemu_tls"] = out["ratio_sealed_vs_qemu_tls"]
            out["secure_target_met"] = out["ratio_secure_vs_qemu_tls"] >= 1.0
    if "ours_secure" in out and "ours_curve" in out:
        out["ratio_sealed_vs_curve"] = (out["ours_secure"]["guest_mb_s"]
                                        / out["ours_curve"]["guest_mb_s"])
    if ours_errors:
        out["ours_errors"] = ours_errors
    out["loadavg_end"] = list(os.getloadavg())

    # side by side
    cols = [("QEMU plain", "qemu_plain"), ("QEMU multifd×2", "qemu_multifd"),
            ("ours plaintext", "ours"), ("QEMU TLS", "qemu_tls"),
            ("QEMU mfd×2 TLS", "qemu_multifd_tls"), ("ours sealed", "ours_secure"),
            ("ours CURVE", "ours_curve")]
    cols = [(t, k) for t, k in cols if k in out]
    print(f"\n{args.size_mb} MiB RAM image (sim fill, seed {SEED}), guest MB/s = "
          f"image bytes / 1e6 / s; loadavg {out['loadavg_start'][0]:.2f} at start")
    print(f"{'':22}" + "".join(f"{t:>16}" for t, _ in cols))
    print(f"{'seconds':22}" + "".join(f"{out[k]['seconds']:>16.3f}" for _, k in cols))
    print(f"{'guest MB/s':22}" + "".join(f"{out[k]['guest_mb_s']:>16.1f}" for _, k in cols))
    print(f"{'bytes on the wire':22}" + "".join(f"{out[k]['bytes_wire']:>16,}" for _, k in cols))
    print(f"{'wire / image bytes':22}"
          + "".join(f"{out[k]['bytes_wire'] / image_bytes:>16.3f}" for _, k in cols))
    if "qemu_multifd" in out:
        print(f"{'MB/s to dst completed':22}"
              + "".join(f"{out[k]['guest_mb_s_to_dst_completed']:>16.1f}"
                        if k.startswith("qemu") else f"{'':>16}" for _, k in cols))
        print(f"QEMU destination RAM == image (blake3): plain {out['qemu_plain']['dst_equal']}, "
              f"multifd {out['qemu_multifd']['dst_equal']}")
    if "ratio_secure_vs_qemu_tls" in out:
        print(f"ratio ours sealed / QEMU over TLS ({out['qemu_tls_best']}): "
              f"{out['ratio_secure_vs_qemu_tls']:.2f}  (target >= 1.0: "
              f"{'met' if out['secure_target_met'] else 'NOT met'})")
    if "ratio_curve_vs_qemu_tls" in out:
        print(f"ratio ours CURVE / QEMU over TLS: {out['ratio_curve_vs_qemu_tls']:.2f}")
    if "ratio_sealed_vs_curve" in out:
        print(f"ratio ours sealed / ours CURVE: {out['ratio_sealed_vs_curve']:.2f}")
    if "ratio_vs_multifd" in out:
        print(f"ratio ours plaintext / QEMU multifd: {out['ratio_vs_multifd']:.2f}  "
              f"(target >= 1.0: {'met' if out['target_met'] else 'NOT met'}); "
              f"ours / plain: {out['ratio_ours_vs_plain']:.2f}; ours / multifd to destination "
              f"completed: {out['ratio_ours_vs_multifd_to_dst_completed']:.2f}")
    for e in ours_errors:
        print(f"our full sync failed in a run: {e}")
    if args.json:
        print(json.dumps(out))
    return 1 if (ours_errors and not any(runs[k] for k in ours_modes)) else 0


if __name__ == "__main__":
    sys.exit(main())
