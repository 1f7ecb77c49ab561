#!/usr/bin/env python3
"""A canary for the emulated platform's faults, run in dom0 beside the lab (issue 17, item 1).

Dom0's programs faulted in about one boot in three under QEMU 7.2 TCG: segfaults, Python
rejecting the standard library's own code, and once a comparison that was false taken as true
(``frame index 32767 is beyond ... 32786 frames``). All of them fit SSE registers that change
under a program's feet. Xen switches the FPU lazily on this emulated (AMD) CPU: a vCPU's SSE
state is loaded at its first SSE instruction after a switch, on the #NM trap raised while
CR0.TS is set. This loop runs SSE-heavy checks with known answers (numpy's uint64 max of the
run-1 failure, glibc's SSE string functions, a float sum) many times a second, sleeping in
between so that the guests' vCPUs run in between and each check starts after a switch. It
writes its counts to ``argv[1]`` every second and on SIGTERM.

usage: fpu_canary.py OUT.json
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np


def main() -> int:
    out = sys.argv[1]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    frames = np.arange(32786, dtype=np.uint64)
    hay = bytes(range(256)) * 256
    ones = np.ones(4096)
    checks = wrong = 0
    first: list[str] = []
    last_write = 0.0

    def record() -> None:
        with open(out + ".tmp", "w") as f:
            json.dump({"checks": checks, "wrong": wrong, "first": first}, f)
        os.replace(out + ".tmp", out)
    while not stop:
        for k in range(0, 32, 8):   # 4 checks, then a sleep: a small share of dom0's one vCPU
            lo, hi = k * 1024, min((k + 1) * 1024, frames.size)
            got = [int(frames[lo:hi].max()), hay.find(b"\xfd\xfe\xff\x00\x01", 1000), float(ones.sum()),
                   int(hay == bytes(hay))]
            want = [hi - 1, 1021, 4096.0, 1]
            checks += 1
            if got != want:
                wrong += 1
                if len(first) < 5:
                    first.append(f"{time.strftime('%H:%M:%S')} batch {k}: got {got}, want {want}")
        time.sleep(0.1)
        if time.monotonic() - last_write > 1:
            record()
            last_write = time.monotonic()
    record()
    return 0


if __name__ == "__main__":
    sys.exit(main())
