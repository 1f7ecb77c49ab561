#!/usr/bin/env python3
"""Fuzz the wire decoder (pipeline/wire.py) for a bounded time, checking answers.

Every input goes through :func:`pipeline.wire_roundtrip.check_message`, the oracle the
hypothesis tests use (tests/test_fuzz_wire.py): it must be refused with a WireError naming
the record and a field, or decode to a value that encodes back to the same bytes (reserved
and padding bytes zeroed). Anything else is a crash: another exception, or an accepted
message that reads differently from what was sent.

Engines:
  atheris  coverage-guided (libFuzzer through atheris, ``pip install '.[fuzz]'``), started
           from a seed corpus of one valid message of every record type. It stops at the
           first crash and writes the input to ``--artifacts`` (crash-<sha1>).
  random   a plain random mutation loop over the same seeds (not coverage-guided; no
           extra dependency). It goes on after a crash and writes each one likewise.
The default is atheris when it imports, else random.

  scripts/fuzz_wire.py --seconds 60 [--json]
  scripts/fuzz_wire.py --runs 20000 --seed 1      # a fixed amount of work (CI)
  scripts/fuzz_wire.py --reproduce crash-...      # run the oracle on saved inputs

Exit code 0 when no crash was found, 1 when one was. With --json the last line is one
JSON object: engine, seconds, executions, crashes, crash_files, and (random) accepted and
refused counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def child_main(argv: list[str]) -> None:
    """The atheris engine's process: the wire modules imported instrumented (so before any
    other import of them), then libFuzzer, which ends this process when it is done."""
    import atheris
    with atheris.instrument_imports(include=["pipeline"]):
        from pipeline.wire_roundtrip import check_message as target

    def one_input(data: bytes) -> None:
        target(data)

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child_main([sys.argv[0], *sys.argv[2:]])

import numpy as np  # noqa: E402

from pipeline import wire  # noqa: E402
from pipeline.wire_roundtrip import PAGE_COUNT, PAGE_SIZE, check_message  # noqa: E402


def seeds() -> list[bytes]:
    """One valid message of every record type (and an unknown optional one)."""
    n = 3
    pfns = np.array([0, 7, PAGE_COUNT - 1], np.uint64)
    hashes = np.arange(32 * n, dtype=np.uint8).reshape(n, 32)
    raw = bytes(range(PAGE_SIZE))
    return [
        wire.encode_hello(PAGE_SIZE, wire.ROLE_PRIMARY, PAGE_COUNT, "primary",
                          ((1, 8, 16), (PAGE_COUNT - 1, 0, PAGE_SIZE))),
        wire.encode_checkpoint_begin(5, 1, wire.FLAG_SYNC | wire.FLAG_DIGEST),
        wire.encode_svm_dirty(5, pfns, hashes),
        wire.encode_svm_dirty(5, pfns, hashes, more=True),
        wire.encode_pages(5, pfns, hashes, np.array([PAGE_SIZE, 10, 0], np.uint32),
                          np.array([wire.ENC_RAW, wire.ENC_LZ4, wire.ENC_ZERO], np.uint8),
                          raw + bytes(10)),
        wire.encode_pages(5, pfns, hashes, np.array([PAGE_SIZE, 0, 0], np.uint32),
                          np.array([wire.ENC_RAW, wire.ENC_REF, wire.ENC_SVM], np.uint8),
                          raw[:20], wire.PAGES_PACKED),
        wire.encode_epoch_end(5, 3, 1, wire.FLAG_SYNC, b"vcpu-state"),
        *sealed_seeds(pfns),
        wire.encode_ack(5, wire.ACK_ABORTED, 3, "torn epoch", bytes(range(32)), 10, 20),
        wire.encode_input(5, 42, b"input payload"),
        wire.encode_shutdown(5),
        struct.pack("<4sHHQII", wire.MARKER, wire.VERSION, 0x8009, 5, 3, 0) + b"opt",
    ]


def sealed_seeds(pfns: np.ndarray) -> list[bytes]:
    """security.mode = "sealed" (pipeline/seal.py): a HELLO with its share, a sealed PAGES
    record and a sealed EPOCH_END (which a decoder without the key refuses, naming it)."""
    from pipeline import seal
    keys = seal.SealKeys()
    keys.install(*seal.derive_key(bytes(32), bytes(range(32))))
    sealer = seal.Sealer(keys, 0)
    n = len(pfns)
    hashes = np.arange(32 * n, dtype=np.uint8).reshape(n, 32)
    enc_len = np.array([PAGE_SIZE, 0, 0], np.uint32)
    kinds = np.array([wire.ENC_RAW, wire.ENC_ZERO, wire.ENC_SVM], np.uint8)
    data = bytes(range(PAGE_SIZE))
    sealed_len = len(data) + wire.sealed_pages_extra(n)
    prefix = wire.pages_aad(np.empty(wire.pages_prefix_size(n), np.uint8), 5, pfns, hashes,
                            enc_len, kinds, sealed_len, wire.PAGES_SEALED)
    out = bytearray(sealed_len)
    sealer.seal(5, prefix, [hashes, data], out)
    return [
        wire.encode_hello(PAGE_SIZE, wire.ROLE_SECONDARY, PAGE_COUNT, "s", (), bytes(32)),
        wire.encode_pages(5, pfns, hashes, enc_len, kinds, out, wire.PAGES_SEALED),
        wire.encode_epoch_end(5, 3, 1, 0, b"vcpu-state", seal.Sealer(keys, seal.SEND_SEALER)),
    ]


def save(artifacts: str, data: bytes) -> str:
    os.makedirs(artifacts, exist_ok=True)
    path = os.path.join(artifacts, "crash-" + hashlib.sha1(data).hexdigest())
    with open(path, "wb") as f:
        f.write(data)
    return path


# -- random: a plain mutation loop ---------------------------------------------------------
def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    msg = bytearray(rng.choice(corpus))
    for _ in range(rng.randint(1, 4)):
        how = rng.randrange(6)
        if how == 0 and msg:                                 # a byte
            msg[rng.randrange(len(msg))] = rng.randrange(256)
        elif how == 1 and len(msg) >= 8:                     # a field set to a boundary value
            size = rng.choice([1, 2, 4, 8])
            at = rng.randrange(len(msg) - size + 1)
            value = rng.choice([0, 1, 2**(8 * size) - 1, rng.getrandbits(8 * size)])
            msg[at:at + size] = value.to_bytes(size, "little")
        elif how == 2 and msg:                               # truncate
            del msg[rng.randrange(len(msg)):]
        elif how == 3:                                       # extend
            msg += rng.randbytes(rng.randint(1, 64))
        elif how == 4:                                       # splice with another seed
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            msg = msg[:min(cut, len(msg))] + other[cut:]
        if len(msg) >= wire.HEADER_SIZE and rng.random() < 0.7:   # body_length made to agree
            msg[16:20] = (len(msg) - wire.HEADER_SIZE).to_bytes(4, "little")
    return bytes(msg)


def run_random(args) -> dict:
    rng = random.Random(args.seed)
    corpus = seeds()
    stats = {"executions": 0, "accepted": 0, "refused": 0, "crashes": 0, "crash_files": []}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and (not args.runs or stats["executions"] < args.runs):
        data = mutate(rng, corpus)
        stats["executions"] += 1
        try:
            if check_message(data):
                stats["accepted"] += 1
                if len(corpus) < 1000:
                    corpus.append(data)      # accepted variants make deeper seeds
            else:
                stats["refused"] += 1
        except Exception:                    # noqa: BLE001 - every failure is a finding
            stats["crashes"] += 1
            if len(stats["crash_files"]) < 20:
                path = save(args.artifacts, data)
                stats["crash_files"].append(path)
                print(f"crash: {path}\n{traceback.format_exc()}", file=sys.stderr)
    return stats


# -- atheris: coverage-guided, in a child process (libFuzzer ends its process) ----------------
def run_atheris(args) -> dict:
    corpus = tempfile.mkdtemp(prefix="fuzz-wire-corpus-")
    for i, s in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
            f.write(s)
    os.makedirs(args.artifacts, exist_ok=True)
    flags = [f"-max_total_time={max(1, int(args.seconds))}", f"-seed={args.seed}",
             "-max_len=4096", "-print_final_stats=1", "-timeout=10",
             f"-artifact_prefix={os.path.join(args.artifacts, '')}"]
    if args.runs:
        flags.append(f"-runs={args.runs}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *flags, corpus]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 120)
    finally:
        for name in os.listdir(corpus):
            os.unlink(os.path.join(corpus, name))
        os.rmdir(corpus)
        if not os.listdir(args.artifacts):
            os.rmdir(args.artifacts)       # made for libFuzzer; nothing found
    log = p.stderr
    executed = re.findall(r"stat::number_of_executed_units:\s+(\d+)", log)
    done = re.findall(r"Done (\d+) runs", log)
    crash_files = re.findall(r"Test unit written to (\S+)", log)
    crashed = p.returncode != 0
    if crashed:
        tail = log[log.find("=== Uncaught Python exception"):] if "Uncaught" in log else log
        print(tail[-4000:], file=sys.stderr)
    cov = re.findall(r"cov: (\d+)", log)
    return {"executions": int((executed or done or ["0"])[-1]),
            "crashes": int(crashed), "crash_files": crash_files,
            "coverage_edges": int(cov[-1]) if cov else 0, "exit_code": p.returncode}


def reproduce(paths: list[str]) -> int:
    bad = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            verdict = "accepted" if check_message(data) else "refused"
            print(f"{path}: {verdict} (the oracle holds)")
        except Exception:                    # noqa: BLE001
            bad += 1
            print(f"{path}: FAILS\n{traceback.format_exc()}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="fuzzing time (default 60)")
    ap.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0: no "
                    "limit but --seconds)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    ap.add_argument("--artifacts", default="fuzz-artifacts",
                    help="where crashing inputs are written (default ./fuzz-artifacts)")
    ap.add_argument("--reproduce", nargs="+", metavar="FILE",
                    help="run the oracle on saved inputs and exit")
    ap.add_argument("--json", action="store_true", help="a JSON summary as the last line")
    args = ap.parse_args()
    if args.reproduce:
        return reproduce(args.reproduce)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    started = time.monotonic()
    stats = run_atheris(args) if engine == "atheris" else run_random(args)
    elapsed = time.monotonic() - started
    summary = {"engine": engine, "seconds": round(elapsed, 1), **stats,
               "exec_per_s": round(stats["executions"] / elapsed) if elapsed else 0}
    print(f"fuzz_wire ({engine}): {stats['executions']} inputs in {elapsed:.1f} s "
          f"({summary['exec_per_s']}/s), {stats['crashes']} crash(es)"
          + "".join(f"\n  {p}" for p in stats["crash_files"]))
    if args.json:
        print(json.dumps(summary))
    return 1 if stats["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
