#!/usr/bin/python3
"""The Xen lab's driver inside dom0 (run by the dom0 init when the kernel command line has
``xenlab.run=1``; Debian's python3 with this project on its path).

1. create the PVH guest ``prim`` (memwork), wait until it ticks, ``xl save`` it once;
2. C baseline: twin pair (``xl restore`` the image as prim and as sec), ``/root/crep`` for N checkpoints;
3. Python: a fresh twin pair, the replicator REPLICATORS[xenlab.replicator] for N checkpoints,
   each followed (both domains still paused) by a full-memory blake3 comparison; then failover:
   the primary stays paused, the secondary runs on;
4. checks the guests' self-check lines and the counter after failover, prints one
   ``XENLAB-RESULT <json>`` line for the host side (scripts/xen-lab/lab.py).

Settings come from the dom0 kernel command line: ``xenlab.rounds`` (default 8),
``xenlab.interval_ms`` (1000), ``xenlab.replicator`` (python).
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3
import numpy as np

from pipeline.xen_io.xen import MAP_BATCH, XenDomain, open_xen_domain, resolve_domain

log = logging.getLogger("xenlab")
CONSOLE_LOG = "/var/log/xen/console/guest-{}.log"
TICK = re.compile(r"MW n=(\d+) err=(\d+)")
BAD_TICK = re.compile(r"MW n=\d+ err=[1-9].*")
IMAGE = "/tmp/prim.img"


def sh(cmd: str, timeout: float = 120) -> str:
    """Run a shell command in dom0; raise with its output if it fails."""
    r = subprocess.run(cmd, shell=True, check=False, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{cmd!r} failed rc={r.returncode}: {r.stdout[-800:]}{r.stderr[-800:]}")
    return r.stdout


def settings() -> dict[str, str]:
    found = dict(re.findall(r"xenlab\.(\w+)=(\S+)", Path("/proc/cmdline").read_text()))
    return {"rounds": "8", "interval_ms": "1000", "replicator": "python", **found}


# -- guest console ----------------------------------------------------------------------------
def console_size(name: str) -> int:
    path = Path(CONSOLE_LOG.format(name))
    return path.stat().st_size if path.exists() else 0


def ticks_since(name: str, offset: int) -> list[tuple[int, int]]:
    """(n, err) of every memwork line the guest printed after byte ``offset`` of its console log."""
    path = Path(CONSOLE_LOG.format(name))
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [(int(n), int(e)) for n, e in TICK.findall(text)]


def wait_ticking(name: str, offset: int, timeout: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ticks_since(name, offset):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"guest {name} printed no memwork line within {timeout}s")


def make_twin() -> tuple[int, int]:
    """Destroy any old pair, restore the saved image twice (prim, sec). Both run the resume path."""
    for name in ("prim", "sec"):
        subprocess.run(f"xl destroy {name}", shell=True, check=False, capture_output=True)  # may not exist
    sh(f"xl restore /root/prim.cfg {IMAGE}")
    sh(f"xl restore /root/sec.cfg {IMAGE}")
    time.sleep(3)  # let both finish their resume path before the first checkpoint
    return resolve_domain("prim"), resolve_domain("sec")


# -- the replication loop (the function the lead swaps for colo-pipeline primary/secondary) ---
@dataclass
class Checkpoint:
    index: int
    dirty_p: int
    dirty_s: int
    copied: int
    pause_ms: float
    clean_ms: float
    copy_ms: float
    ctx_ms: float
    verify_ms: float = 0.0
    equal: bool | None = None
    equal_except_vcpu_info: bool | None = None
    differing: list[int] = field(default_factory=list)


#: bytes of a vcpu_info (64 bytes) that Xen writes itself: evtchn_upcall_pending, _mask, the
#: pending selector (0x00..0x10) and the vcpu_time_info clock record (0x20..0x40)
XEN_WRITTEN_VCPU_INFO = np.r_[0:0x10, 0x20:0x40]


def is_vcpu_info(offsets: np.ndarray) -> bool:
    """Do the differing bytes of a page lie in the Xen-written fields of one vcpu_info?
    Xen updates each domain's registered vcpu_info (event upcall flags, its own clock) without
    marking the page dirty, so twins legitimately differ there (see docs/xen-lab.md)."""
    block = int(offsets[0]) // 64
    return bool(np.all(offsets // 64 == block) and np.isin(offsets % 64, XEN_WRITTEN_VCPU_INFO).all())


def compare_memory(p: XenDomain, s: XenDomain, pfns: np.ndarray, skip: np.ndarray) -> tuple[bool, bool, list[str]]:
    """blake3 over all of ``pfns`` in both domains (frames in ``skip`` hashed as zero pages).
    Returns (digests equal, equal apart from Xen-written vcpu_info fields, differing frames with
    the differing byte range)."""
    hp, hs = blake3.blake3(), blake3.blake3()
    a = np.empty((MAP_BATCH, p.page_size), np.uint8)
    b = np.empty_like(a)
    differing: list[str] = []
    only_vcpu_info = True
    for start in range(0, pfns.size, MAP_BATCH):
        chunk = pfns[start : start + MAP_BATCH]
        p.read_pages(chunk, a)
        s.read_pages(chunk, b)
        zero = np.isin(chunk, skip)
        a[: chunk.size][zero] = 0
        b[: chunk.size][zero] = 0
        hp.update(a[: chunk.size])
        hs.update(b[: chunk.size])
        for row in np.flatnonzero(np.any(a[: chunk.size] != b[: chunk.size], axis=1)):
            at = np.flatnonzero(a[row] != b[row])
            in_vcpu_info = is_vcpu_info(at)
            only_vcpu_info &= in_vcpu_info
            differing.append(f"{int(chunk[row]):#x}[{int(at[0]):#x}:{int(at[-1]) + 1:#x}]"
                             + ("(vcpu_info)" if in_vcpu_info else ""))
    return hp.digest() == hs.digest(), only_vcpu_info, differing


def replicate_python(rounds: int, interval_ms: int, failover: bool) -> list[Checkpoint]:
    """COLO checkpoints of prim into sec with pipeline.xen_io.xen, split as the pipeline splits them.

    The secondary is paused first (DESIGN.md step 2). Primary side (the PVM pause): pause P, CLEAN P, read P's dirty frames into a buffer
    (the pipeline's ring), read P's HVM context, resume P. Secondary side: CLEAN S, update the
    checkpoint cache with P's frames, write P's dirty frames plus the frames S dirtied itself
    (restored from the cache) into S, then compare S with P (full-memory blake3), load the
    context with the fix-ups of set_vcpu_state, resume S. Round 0 copies every mappable frame.

    So that the comparison sees P exactly as it was at the checkpoint, the lab holds P paused
    until the comparison is done; the PVM pause reported is the primary side plus the unpause
    call, i.e. what P would be paused without the lab's check. With ``failover`` P stays paused
    after the last round.
    """
    p, s = open_xen_domain("prim"), open_xen_domain("sec")
    p.enable_dirty_log()
    s.enable_dirty_log()
    mappable = p.mappable_pfns()
    skip = np.union1d(p.own_frames, s.own_frames)
    log.info("prim %r sec %r: %d mappable frames; hashed as zero: %s", p, s, mappable.size,
             [hex(int(x)) for x in skip])
    cache = np.empty((mappable.size, p.page_size), np.uint8)  # P's frames at the last checkpoint
    ring = np.zeros((8 * MAP_BATCH, p.page_size), np.uint8)
    ring.fill(1)  # touch every page now: first-touch faults (expensive in a PV dom0) stay out of the pause
    results = []
    for r in range(rounds + 1):
        if r:
            time.sleep(interval_ms / 1000)
        last = r == rounds
        # the secondary stops first (DESIGN.md step 2), then the primary: the PVM pause starts here
        s.pause()
        # -- primary side: this is the PVM pause
        t0 = time.perf_counter()
        p.pause()
        dirty_p = p.read_and_clear_dirty()
        t1 = time.perf_counter()
        if r == 0:
            p.read_pages(mappable, cache)
        else:
            if dirty_p.size > ring.shape[0]:
                ring = np.ones((dirty_p.size, p.page_size), np.uint8)
            p.read_pages(dirty_p, ring)
        t2 = time.perf_counter()
        blob = p.get_vcpu_state()
        t3 = time.perf_counter()
        # -- secondary side (in the pipeline the primary runs again by now)
        dirty_s = s.read_and_clear_dirty()
        # the cache has rows for the frames found mappable at the start only; a dirty frame outside
        # them would land in another frame's row, so it is reported and left out instead
        outside = np.setdiff1d(np.union1d(dirty_p, dirty_s), mappable)
        if outside.size:
            print(f"WARNING: checkpoint {r}: dirty frames outside the mappable set: "
                  f"{[hex(int(x)) for x in outside[:8]]}", flush=True)
        if r:
            known = np.isin(dirty_p, mappable)
            cache[np.searchsorted(mappable, dirty_p[known])] = ring[: dirty_p.size][known]
        restore = mappable if r == 0 else np.setdiff1d(np.union1d(dirty_p, dirty_s), outside)
        s.write_pages(restore, cache[np.searchsorted(mappable, restore)])
        t4 = time.perf_counter()
        equal, equal_but_vcpu_info, differing = compare_memory(p, s, mappable, skip)
        t5 = time.perf_counter()
        s.set_vcpu_state(blob)
        t6 = time.perf_counter()
        if not (last and failover):
            p.resume()
        t7 = time.perf_counter()
        if last and failover:
            print(f"FAILOVER: primary dom{p.domid} left paused, secondary dom{s.domid} resumed", flush=True)
        s.resume()
        ck = Checkpoint(r, int(dirty_p.size), int(dirty_s.size), int(restore.size),
                        pause_ms=((t3 - t0) + (t7 - t6)) * 1e3, clean_ms=(t1 - t0) * 1e3,
                        copy_ms=(t2 - t1) * 1e3, ctx_ms=(t3 - t2) * 1e3, verify_ms=(t5 - t4) * 1e3,
                        equal=equal, equal_except_vcpu_info=equal_but_vcpu_info, differing=differing[:8])
        print("PYREP " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in asdict(ck).items() if k != "differing")
              + (f" apply_ms={(t4 - t3 + t6 - t5) * 1e3:.2f}")
              + (f" differing={','.join(differing[:8])}" if differing else ""), flush=True)
        results.append(ck)
    p.disable_dirty_log()
    s.disable_dirty_log()
    p.close()
    s.close()
    return results


#: name -> replicator(rounds, interval_ms, failover) -> checkpoints; the one place to swap in
#: ``colo-pipeline primary/secondary --backend xen`` when it is ready.
REPLICATORS = {"python": replicate_python}


def bad_lines(name: str, offset: int, limit: int = 4) -> list[str]:
    """The first self-check failures the guest printed after ``offset`` (with the bad page)."""
    path = Path(CONSOLE_LOG.format(name))
    with path.open("rb") as f:
        f.seek(offset)
        return BAD_TICK.findall(f.read().decode(errors="replace"))[:limit]


def summarize(ticks: list[tuple[int, int]]) -> dict[str, int]:
    """Lines printed, lines with a self-check error, highest counter."""
    return {"lines": len(ticks), "err_lines": sum(1 for _, e in ticks if e), "max_n": max((n for n, _ in ticks), default=-1)}


def failover_summary(prim: list[tuple[int, int]], sec: list[tuple[int, int]]) -> dict[str, object]:
    """Did the secondary go on from the primary's last counter? Its lines beyond that counter must
    start at last+1, run without gaps and report no self-check error."""
    last = max((n for n, _ in prim), default=-1)
    after = sorted({n: e for n, e in sec if n > last}.items())
    ns = [n for n, _ in after]
    return {"primary_last_n": last, "secondary_first_n": ns[0] if ns else -1,
            "secondary_last_n": ns[-1] if ns else -1, "lines": len(ns),
            "gapless": ns == list(range(last + 1, last + 1 + len(ns))),
            "err_lines": sum(1 for _, e in after if e)}


def run_c_baseline(rounds: int, interval_ms: int) -> list[dict[str, float]]:
    pd, sd = make_twin()
    out = sh(f"/root/crep -r {rounds} -i {interval_ms} {pd} {sd}", timeout=600)
    print(out, end="", flush=True)
    return [{k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
            for line in out.splitlines() if line.startswith("CREP ")]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = settings()
    rounds, interval = int(cfg["rounds"]), int(cfg["interval_ms"])
    result: dict[str, object] = {"settings": cfg}
    t_start = time.monotonic()
    try:
        sh("mkdir -p /run/lock")
        t0 = time.monotonic()
        sh("xl create /root/prim.cfg")
        result["guest_ticking_s"] = round(time.monotonic() - t0 + wait_ticking("prim", 0), 1)
        time.sleep(2)
        sh(f"xl save prim {IMAGE}")

        marks = {n: console_size(n) for n in ("prim", "sec")}
        result["c_baseline"] = run_c_baseline(rounds, interval)
        time.sleep(2)
        result["c_phase"] = {n: summarize(ticks_since(n, marks[n])) for n in marks}
        for n, mark in marks.items():
            for line in bad_lines(n, mark):
                print(f"GUESTERR C-phase {n}: {line.strip()}", flush=True)

        marks = {n: console_size(n) for n in ("prim", "sec")}
        make_twin()
        checkpoints = REPLICATORS[cfg["replicator"]](rounds, interval, True)
        result["python"] = [asdict(c) for c in checkpoints]
        time.sleep(5)  # the secondary runs on alone
        ticks = {n: ticks_since(n, marks[n]) for n in marks}
        result["py_phase"] = {n: summarize(t) for n, t in ticks.items()}
        result["failover"] = failover_summary(ticks["prim"], ticks["sec"])
        for n, mark in marks.items():
            for line in bad_lines(n, mark):
                print(f"GUESTERR Python-phase {n}: {line.strip()}", flush=True)
        result["xl_list"] = sh("xl list")
        result["dmesg_tail"] = sh("xl dmesg | tail -n 15")
    except Exception as exc:  # the host side reports it; dom0 stays up for a look
        log.exception("lab failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["dom0_s"] = round(time.monotonic() - t_start, 1)
    print("XENLAB-RESULT " + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
