#!/usr/bin/python3
"""The Xen lab's driver inside dom0 (run by the dom0 init when the kernel command line has
``xenlab.run=1``; Debian's python3 with this project on its path).

1. create the PVH guest ``prim`` (memwork), wait until it ticks;
2. colo-pipeline: a twin pair (``colo-pipeline xen-twin save`` on the primary's config saves
   prim and restores it, ``xen-twin restore`` on the secondary's makes sec), ``colo-pipeline
   secondary`` on sec and ``colo-pipeline primary`` on prim (xen backend) until N checkpoints
   after the first, each proven by both nodes' full-memory blake3; then failover: prim's guest
   is paused and its node SIGKILLed, the secondary takes over and its guest runs on;
3. C baseline: a fresh twin pair, ``/root/crep`` for N checkpoints at the pipeline's cadence;
4. checks the guests' self-check lines and the counter after failover, prints one
   ``XENLAB-RESULT <json>`` line for the host side (scripts/xen-lab/lab.py).

Settings come from the dom0 kernel command line: ``xenlab.rounds`` (default 8),
``xenlab.interval_ms`` (1000), ``xenlab.hap`` (the guests' paging, 1 = HAP, 0 = shadow;
default: what pack.sh wrote), ``xenlab.until`` (``all``; ``first``: stop after the
pipeline's first verified checkpoint, no failover, no C baseline: the quick boot that
counts faults, ``lab.py --until-first-checkpoint``; ``stress``: no pipeline, the dirty-log
stress of both twins for ``xenlab.stress_s`` seconds, ``lab.py --logdirty-stress S``;
``twin``: no pipeline, the C baseline on the twins then ``xenlab.watch_s`` seconds of both
guests running, ``lab.py --twin-check``), ``xenlab.twin`` (``paused``: both twins restored
paused and unpaused together, see make_twin).
"""
from __future__ import annotations

import calendar
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.xen_io.xen import resolve_domain

log = logging.getLogger("xenlab")
CONSOLE_LOG = "/var/log/xen/console/guest-{}.log"
#: memwork's line (scripts/xen-lab/guest/memwork.c), one per tick on each vCPU
TICK = re.compile(r"MW cpu=(\d+) n=(\d+) err=(\d+) errtot=\d+ mono=(\d+\.\d+) on=(\d+)")
BAD_TICK = re.compile(r"MW cpu=\d+ n=\d+ err=[1-9].*")
#: xenconsoled's stamp at the start of each guest console line (dom0's init runs it with
#: --timestamp=guest): dom0's wall time, whole seconds
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] ")
STAMP_ANYWHERE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")
IMAGE = "/tmp/prim.img"


#: seconds between dom0's WATCH lines (watchdog.py; xenlab.watch_every_s, 0: no watchdog)
WATCH_EVERY_S = 30.0
#: seconds a dom0 command may take: under a loaded host (load 20-30 on 2 cores, measured) xl save
#: of the 128 MiB guest took more than 120 s
SH_TIMEOUT = 600


def step(what: str) -> None:
    """A progress line with the wall time (Xen's console lines carry it too: console_timestamps)."""
    print(f"STEP {time.strftime('%H:%M:%S', time.gmtime())}.{int(time.time() * 1000) % 1000:03d} {what}", flush=True)


def sh(cmd: str, timeout: float = SH_TIMEOUT) -> str:
    """Run a shell command in dom0; raise with its output if it fails."""
    r = subprocess.run(cmd, shell=True, check=False, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{cmd!r} failed rc={r.returncode}: {r.stdout[-800:]}{r.stderr[-800:]}")
    return r.stdout


def settings() -> dict[str, str]:
    found = dict(re.findall(r"xenlab\.(\w+)=(\S+)", Path("/proc/cmdline").read_text()))
    return {"rounds": "8", "interval_ms": "1000", "until": "all", **found}


# -- guest console ----------------------------------------------------------------------------
def console_size(name: str) -> int:
    path = Path(CONSOLE_LOG.format(name))
    return path.stat().st_size if path.exists() else 0


@dataclass(frozen=True)
class Tick:
    """One memwork line: the vCPU its instance is pinned to, its counter, the pages it found
    wrong, the guest's CLOCK_MONOTONIC (s), the CPU it printed from, and dom0's wall time when
    xenconsoled logged it (whole seconds; None on a console without stamps)."""
    cpu: int
    n: int
    err: int
    mono: float
    on: int
    stamp: float | None = None


def parse_ticks(text: str) -> list[Tick]:
    """The memwork lines of a guest's console log, in the order the guest printed them."""
    out = []
    for line in text.splitlines():
        m = TICK.search(line)
        if not m:
            continue
        st = STAMP.match(line)
        stamp = float(calendar.timegm(time.strptime(st.group(1), "%Y-%m-%d %H:%M:%S"))) if st else None
        out.append(Tick(int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4)), int(m.group(5)), stamp))
    return out


def console_text(name: str, start: int = 0, end: int | None = None) -> str:
    """Guest ``name``'s console log from byte ``start`` (to ``end``), '' when there is none."""
    path = Path(CONSOLE_LOG.format(name))
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(start)
        text = f.read(None if end is None else max(0, end - start)).decode(errors="replace")
    # a stamp always begins a line: xenconsoled stamps a domain's first output, and a twin's
    # first output after xl restore may finish a line its saved self began (seen: "...
    # registered=1[2026-12-07 07:27:36] \r\n"), which would otherwise glue the two together
    return STAMP_ANYWHERE.sub(lambda m: "\n" + m.group(0), text)


def ticks_since(name: str, offset: int, end: int | None = None) -> list[Tick]:
    """Every memwork line the guest printed after byte ``offset`` of its console log (to ``end``)."""
    return parse_ticks(console_text(name, offset, end))


def by_cpu(ticks: list[Tick]) -> dict[int, list[Tick]]:
    """The ticks of each vCPU's memwork, each in printed order."""
    out: dict[int, list[Tick]] = {}
    for t in ticks:
        out.setdefault(t.cpu, []).append(t)
    return dict(sorted(out.items()))


#: how far the guest's clock may step past the time dom0 saw pass between two of its lines
#: (issue 17, item 6): xenconsoled stamps whole seconds (up to 1 s more really passed than the
#: stamps say) and logs a line a moment after the guest printed it (up to 1 s allowed for the
#: earlier line's delay, dom0 being busy); a clock that jumps by more went ahead of real time
CLOCK_SLACK_S = 2.0


def clock_check(ticks: list[Tick], slack_s: float = CLOCK_SLACK_S) -> dict[str, object]:
    """Per vCPU, over consecutive lines of its memwork (printed order): the guest's
    CLOCK_MONOTONIC must step forward every time (a clock loaded or rolled back with the memory
    must not go back, even where the counter does) and never by more than the real time between
    the two lines, as xenconsoled's stamps give it, plus ``slack_s``: the only gap a checkpoint's
    or a failover's pause may leave is the time it really took. Also whether every line was
    printed from its own vCPU (the pinning held). Returns ``{"ok", "cpus": {cpu: {lines,
    max_step_s, max_real_s, backward, jumps, off_cpu, first_bad}}}``.

    A line without a stamp of its own (the first line after a console mark taken in the middle
    of a line: session 16's run 1 failed its SVM's clock on one, +0.277 s between n=4527 and
    4528) is bounded by the nearest stamped lines of its vCPU around it, the earlier one's stamp
    before and the later one's after: the step may not exceed the time between those. Where no
    stamped line comes before (or after) it, there is nothing to compare with and only the
    backward step is checked; a vCPU none of whose lines has a stamp fails (nothing was checked)."""
    cpus: dict[str, dict[str, object]] = {}
    for cpu, ts in by_cpu(ticks).items():
        backward = jumps = 0
        first_bad = ""
        max_step = max_real = 0.0
        before: list[float | None] = []      # the latest stamp at or before each line
        for t in ts:
            before.append(t.stamp if t.stamp is not None else before[-1] if before else None)
        after: list[float | None] = []       # the earliest stamp at or after each line
        for t in reversed(ts):
            after.append(t.stamp if t.stamp is not None else after[-1] if after else None)
        after.reverse()
        for k, (a, b) in enumerate(zip(ts, ts[1:])):
            step_s = b.mono - a.mono
            real = None if before[k] is None or after[k + 1] is None else after[k + 1] - before[k]
            max_step = max(max_step, step_s)
            if real is not None:
                max_real = max(max_real, real)
            bad = ("back" if step_s <= 0 else "no stamp" if before[k] is None and after[k + 1] is None
                   else "jump" if real is not None and step_s > real + slack_s else "")
            if bad:
                backward += bad == "back"
                jumps += bad != "back"
                first_bad = first_bad or (f"{bad}: n={a.n} mono={a.mono:.6f} -> n={b.n} mono={b.mono:.6f} "
                                          f"({step_s:+.3f}s, stamps {real}s apart)")
        cpus[str(cpu)] = {"lines": len(ts), "max_step_s": round(max_step, 3), "max_real_s": max_real,
                          "backward": backward, "jumps": jumps, "off_cpu": sum(t.on != t.cpu for t in ts),
                          "first_bad": first_bad}
    ok = bool(cpus) and all(c["backward"] == 0 and c["jumps"] == 0 and c["off_cpu"] == 0 for c in cpus.values())
    return {"ok": ok, "slack_s": slack_s, "cpus": cpus}


def wait_ticking(name: str, offset: int, timeout: float = SH_TIMEOUT, look_every_s: float = 10.0) -> float:
    """Seconds until guest ``name`` printed its first memwork line. A guest that died first
    (``xl list`` shows it shut down or crashed) fails at once, saying how, instead of after
    ``timeout``: on QEMU 10.0.2 with HAP the guest halted in its early boot and Xen powered it
    off silently, and the lab waited its 600 s for nothing (issue 17, session 17)."""
    t0 = time.monotonic()
    looked = t0
    while time.monotonic() - t0 < timeout:
        if ticks_since(name, offset):
            return time.monotonic() - t0
        if time.monotonic() - looked >= look_every_s:
            looked = time.monotonic()
            dead = dead_domains(sh("xl list", timeout=60), only=name)
            if dead:
                raise RuntimeError(f"guest {name} died before its first memwork line: {dead[0]}")
        time.sleep(0.5)
    raise RuntimeError(f"guest {name} printed no memwork line within {timeout}s")


def make_twin(save_first: bool = False, paused: bool = False) -> tuple[int, int]:
    """The product's pairing (`colo-pipeline xen-twin`, pipeline/xen_io/twin.py) from the node
    configs: with ``save_first``, save the running prim to the image and restore it; otherwise
    destroy any old pair and restore prim from the image; then restore sec from the same image.
    Both domains run the guest's resume path.

    ``paused`` (xenlab.twin=paused, issue 17 item 1's experiment): the same with xl itself, both
    restores made paused (``xl restore -p``) and both domains unpaused together after the second,
    so neither twin runs while the other is being restored. (A guest paused before ``xl save``
    cannot save: xl asks the guest to suspend itself, and a paused guest never answers.)"""
    if paused:
        if save_first:
            sh(f"xl save prim {IMAGE}")
        else:
            for name in ("prim", "sec"):
                subprocess.run(f"xl destroy {name}", shell=True, check=False, capture_output=True)
        for name in ("prim", "sec"):
            sh(f"xl restore -p /root/{name}.cfg {IMAGE}")
        for name in ("prim", "sec"):
            sh(f"xl unpause {name}")
    elif save_first:
        for attempt in range(3):  # under TCG the guest sometimes misses the suspend request's deadline
            try:
                sh(f"colo-pipeline xen-twin save --config {RUN}/primary.toml")
                break
            except RuntimeError as exc:
                if attempt == 2:
                    raise
                print(f"WARNING: xen-twin save failed, retrying: {str(exc)[-200:]}", flush=True)
                time.sleep(5)
    else:
        for name in ("prim", "sec"):
            subprocess.run(f"xl destroy {name}", shell=True, check=False, capture_output=True)  # may not exist
        sh(f"colo-pipeline xen-twin restore --config {RUN}/primary.toml")
    if not paused:
        sh(f"colo-pipeline xen-twin restore --config {RUN}/secondary.toml")
    time.sleep(3)  # let both finish their resume path before the first checkpoint
    ids = resolve_domain("prim"), resolve_domain("sec")
    DOMIDS.update({ids[0]: "prim", ids[1]: "sec"})
    step(f"twin pair made{' (both restored paused, unpaused together)' if paused else ''}: "
         f"prim id {ids[0]}, sec id {ids[1]}")
    return ids


#: every domain id the lab made, to its name: Xen's log names a guest by id only ("d3v0")
DOMIDS: dict[int, str] = {}
#: what Xen logs when a guest dies: a triple fault (shut down as "reboot", see hvm_triple_fault
#: in Xen's hvm.c), a crash, a domain_crash() of Xen's own
XEN_GUEST_FAULT = re.compile(r"\(XEN\).*(?:d(\d+)v\d+ Triple fault.*|[Dd]omain (\d+) .*crash.*|"
                             r"domain_crash called from.*|d(\d+)v\d+ .*(?:Unhandled|unexpected).*)")


#: where Xen's dump of a dying vCPU begins (vcpu_show_execution_state, which hvm_triple_fault
#: calls): the registers that follow are the guest's (RIP, rsp, cr2; the cs printed is Xen's)
XEN_VCPU_DUMP = re.compile(r"\*\*\* Dumping Dom(\d+) vcpu#(\d+) state: \*\*\*")
XEN_DUMP_REGS = re.compile(r"RIP:\s+[0-9a-f]{4}:\[<([0-9a-f]{16})>\].*?rsp: ([0-9a-f]{16}).*?cr2: ([0-9a-f]{16})", re.S)


def kernel_symbol(addr: int, kallsyms: str) -> str:
    """``function+0xoff`` of a kernel text address, from ``/proc/kallsyms`` text: dom0 boots the
    same kernel image as the guests, and neither PV dom0 nor a PVH guest (entered past the
    decompressor) is relocated by KASLR, so dom0's symbol addresses are the guests' too
    (Debian's System.map is a stub). '?' when no text symbol is at or below it."""
    best = (-1, "?")
    for line in kallsyms.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":      # not a module's (a 4th field)
            at = int(parts[0], 16)
            if best[0] < at <= addr:
                best = (at, parts[2])
    return "?" if best[0] <= 0 else f"{best[1]}+{addr - best[0]:#x}"


def guest_death_registers(xen_log: str, kallsyms: str) -> list[str]:
    """Each vCPU dump in Xen's log (one per guest death): the lab's name of the domain, RIP as a
    guest kernel symbol, rsp and cr2, e.g. ``d2v0 [prim] RIP ffffffff81171dce =
    handle_mm_fault+0x5e rsp ... cr2 ...``."""
    out = []
    for m in XEN_VCPU_DUMP.finditer(xen_log):
        regs = XEN_DUMP_REGS.search(xen_log, m.end(), m.end() + 3000)
        if not regs:
            continue
        domid = int(m.group(1))
        rip = int(regs.group(1), 16)
        out.append(f"d{domid}v{m.group(2)} [{DOMIDS.get(domid, 'not made by the lab')}] RIP {rip:016x} = "
                   f"{kernel_symbol(rip, kallsyms)} rsp {regs.group(2)} cr2 {regs.group(3)}")
    return out[:8]


def xen_guest_faults() -> list[str]:
    """Xen's log lines about guests that died, each with the lab's name for the domain id."""
    try:
        text = sh("xl dmesg", timeout=60)
    except Exception as exc:  # noqa: BLE001 - the finding is then that dom0 could not tell
        return [f"xl dmesg failed: {exc}"]
    found = []
    for m in XEN_GUEST_FAULT.finditer(text):
        domid = next((int(g) for g in m.groups() if g), None)
        name = DOMIDS.get(domid, "not made by the lab" if domid is not None else "?")
        found.append(f"{m.group(0).strip()} [{name}]")
    try:   # a guest kernel's own panic leaves no line in Xen's log: the domain is only "crashed"
        found += dead_domains(sh("xl list", timeout=60))
    except Exception as exc:  # noqa: BLE001
        found.append(f"xl list failed: {exc}")
    return found[:8]


def dead_domains(xl_list: str, only: str = "") -> list[str]:
    """The lab's domains ``xl list`` shows dead, named like Xen's death lines (``... [prim]``):
    crashed (state flag ``c``: a guest kernel that panicked, kept by the lab's on_crash =
    "preserve") or shut down by itself (flag ``s``, kept by on_poweroff = "preserve": a guest
    whose vCPUs all went down, e.g. a HLT with interrupts off after an early-boot exception,
    which a non-debug Xen powers off without a line in its log). ``only``: that domain alone."""
    out = []
    for line in xl_list.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 6 or not parts[1].isdigit() or (only and parts[0] != only):
            continue
        if "c" in parts[4]:
            out.append(f"xl list: domain {parts[1]} crashed (state {parts[4]}) [{parts[0]}]")
        elif "s" in parts[4]:
            out.append(f"xl list: domain {parts[1]} shut down by itself (state {parts[4]}, "
                       f"{parts[3]} vCPUs up) [{parts[0]}]")
    return out


# -- the replicator: colo-pipeline primary + secondary with the xen backend -----------------
@dataclass
class Checkpoint:
    """One paused checkpoint of the pipeline, from the primary's checkpoint log."""
    epoch: int
    dirty_p: int
    dirty_s: int
    sent: int
    wire_bytes: int
    pause_ms: float      # the PVM pause without the proof's hashing
    verify_ms: float     # the proof's full-memory hash, inside the pause
    commit_ms: float
    equal: bool | None = None
    cause: str = ""      # what triggered it: "timer", "dirty_threshold" (log-dirty PEEK), ...


RUN = Path("/run/colo-lab")
#: dom0's scheduler weight (Xen's default, and the guests', is 256)
DOM0_WEIGHT = 1024
#: the physical CPUs (of the emulated machine's 2) the guests run on when pinned (xenlab.pin);
#: dom0's one vCPU then has pCPU 0 to itself
GUEST_PCPUS = "1"
#: seconds the lab waits for the pipeline's protection after starting the nodes
PROTECTION_WAIT_S = 2700
#: the lab's checkpoint.dirty_threshold_pages for 1-vCPU guests (see node_config)
DIRTY_THRESHOLD_PAGES = 1024
#: ... and per vCPU of a guest with 2+ (dirty_threshold_pages): half of what one memwork
#: dirties at most in an epoch (its 16 MiB buffer, 4096 pages), so the snapshot buffer (twice
#: the threshold, supervisor.py) holds a 2-vCPU checkpoint's dirty set
DIRTY_THRESHOLD_PAGES_PER_VCPU = 2048


def dirty_threshold_pages(vcpus: int) -> int:
    """The lab's checkpoint.dirty_threshold_pages for guests of ``vcpus`` vCPUs. The primary's
    snapshot buffer holds twice the threshold (at least 4096 pages); a larger dirty set overflows
    into the rings while the PVM is paused, batch by batch (supervisor.py, snapshot.py). In the
    lab every checkpoint is proven (two full-memory hashes: commits of 16-24 s with 2-vCPU
    guests), so a 2-vCPU epoch carries 4 800-8 400 pages whatever the threshold, and at 1024
    (buffer 4096) its overflow cost ~16-21 us a page against ~3 in the buffer: session 19's
    2-vCPU --ci pauses of 77-97 ms against C's 55 (issue 17, session 20). 1-vCPU epochs
    (~2 000 pages) keep 1024, whose checkpoints come from the dirty count (item 7); with 2+
    vCPUs the count is past 2048 per vCPU when a checkpoint may start (after the last commit)."""
    return DIRTY_THRESHOLD_PAGES if vcpus <= 1 else DIRTY_THRESHOLD_PAGES_PER_VCPU * vcpus


def node_config(role: str, domain: str, interval_ms: int, vcpu_info: str = "",
                vcpus: int = 1) -> dict[str, dict[str, object]]:
    """The lab's node config: the xen backend, one worker per side (dom0 has one vCPU), every
    checkpoint proven (verify_every = 1), timeouts for a hypervisor emulated by TCG;
    ``vcpu_info``: where its guest says it registered its vcpu_info (guest.xen_vcpu_info,
    from guest_vcpu_info), '' to let the node watch for it; ``vcpus``: the guests' vCPUs (the
    dirty threshold, dirty_threshold_pages)."""
    peer = "secondary" if role == "primary" else "primary"
    return {
        "node": {"name": f"lab-{role}", "role": role, "run_dir": str(RUN / role)},
        "guest": {"backend": "xen", "domain": domain, "xen_image": IMAGE,
                  "xen_domain_config": f"/root/{domain}.cfg",
                  **({"xen_vcpu_info": vcpu_info} if vcpu_info else {})},
        # the secondary's start (finding its vcpu_info by watching its guest) took over 100 s at
        # load 9 on this host, longer than the primary waited for it at first
        # (and at load 24 the primary's own took 12 minutes: the secondary, niced, may take longer)
        "peer": {"address": "tcp://127.0.0.1:7400", "connect_timeout_ms": 1800000},
        "pipeline": {"digest_workers": 1, "verify_workers": 1, "batch_pages": 64},
        # the dirty threshold below what the guest dirties in an epoch (~2100-2400 pages, the
        # proof's hashing makes epochs long), the timer 3x the interval as a backstop: most
        # checkpoints are then triggered by Xen's log-dirty PEEK count (issue 17, item 7)
        # epoch_timeout_ms 600 s (was 120 s): at load 17-21 (QEMU at ~25 % of a core) the first
        # full sync of the 128 MiB guest ran past 120 s and the start failed (session 9)
        "checkpoint": {"max_interval_ms": 3 * interval_ms, "min_interval_ms": interval_ms,
                       "epoch_timeout_ms": 600000, "precopy_target_pages": 2048,
                       "dirty_threshold_pages": dirty_threshold_pages(vcpus),
                       "verify_every": 1},
        # 4 s without a heartbeat before the peer is lost (was 1 s): at host load 8-12 (QEMU at
        # ~35 % of a core) dom0's processes went 2-2.5 s without running, and the primary gave
        # the first full sync up ("the secondary was lost") before any checkpoint (this
        # session's run 1, boot 1). A failover is then detected ~4 s after the kill.
        # Every 500 ms, not 100 (the same 4 s): under TCG each heartbeat turn (send, receive,
        # CURVE in the ZeroMQ thread) costs tens of ms, and at 100 ms the two nodes' heartbeat
        # processes took ~50 % of dom0's one vCPU (issue 17, session 18: 26 % and 23 % measured
        # per node from /proc during a full sync), starving the niced secondary's apply
        "heartbeat": {"interval_ms": 500, "miss_count": 8},
        "security": {"mode": "curve", "key_file": str(RUN / "keys" / f"{role}.key_secret"),
                     "peer_public_key_file": str(RUN / "keys" / f"{peer}.key")},
        # the lease renewed every 40 s, not every 1.7 s: at load 24 on the host, dom0's primary
        # coordinator renewed its 5 s lease late and lost the role before its first checkpoint
        # (issue 17, this session's first quick boot). The failover does not wait for it: the
        # local witness frees a claim at once when its holder process is gone (SIGKILLed)
        "failover": {"witness": "local", "witness_dir": str(RUN / "witness"), "lease_ttl_s": 120},
    }


def write_configs(interval_ms: int, vcpus: int = 1) -> None:
    """Both nodes' config files and CURVE keys in RUN (the pairing reads them too)."""
    sh(f"rm -rf {RUN} && mkdir -p {RUN}/keys")
    for role in ("primary", "secondary"):
        sh(f"colo-pipeline keygen --dir {RUN}/keys --name {role}")
    for role, domain in (("primary", "prim"), ("secondary", "sec")):
        write_node_config(role, domain, interval_ms, vcpus=vcpus)


def write_node_config(role: str, domain: str, interval_ms: int, vcpu_info: str = "", check: bool = True,
                      vcpus: int = 1) -> None:
    """One node's config file (``check``: and `colo-pipeline check-config` on it; the node's
    own start checks it too, so a rewrite skips that Python start under TCG)."""
    from pipeline.localpair import render_toml

    path = RUN / f"{role}.toml"
    path.write_text(render_toml(node_config(role, domain, interval_ms, vcpu_info, vcpus)))
    if check:
        sh(f"colo-pipeline check-config {path}")


#: the lab guest's vcpuinfo line (scripts/xen-lab/guest/vcpuinfo.c), every 5 s of guest time
VCPUINFO = re.compile(r"VCPUINFO cpu=(\d+) vcpu=(\d+) gfn=(0x[0-9a-f]+) offset=(0x[0-9a-f]+) registered=([01])")
VCPUINFO_ANY = re.compile(r"VCPUINFO [^\r\n]*")
#: the line vcpuinfo prints after a report, with the number of lines the report had (session
#: 16): dom0 takes a report once it has ended, where it slept 2 s after the first line before
VCPUINFO_END = re.compile(r"VCPUINFO end lines=(\d+)")
#: seconds to wait for a guest's vcpuinfo report (every 5 s of its time; a loaded host slows it)
VCPUINFO_WAIT_S = 300


def vcpuinfo_report(text: str) -> list[str] | None:
    """The lines of the first whole vcpuinfo report in console ``text`` (without its end line), or
    None while no report in it has ended. A report is whole when its end line counts as many lines
    as came since the previous end (or the start of ``text``): the tail of a report begun before
    ``text`` has fewer, and is skipped."""
    lines = [ln.strip() for ln in VCPUINFO_ANY.findall(text)]
    begun = 0
    for i, line in enumerate(lines):
        end = VCPUINFO_END.fullmatch(line)
        if end:
            if i - begun == int(end.group(1)):
                return lines[begun:i]
            begun = i + 1
    return None


def guest_vcpu_info(name: str, offset: int, timeout: float = VCPUINFO_WAIT_S) -> str:
    """Where guest ``name`` says it registered each vCPU's vcpu_info, as guest.xen_vcpu_info
    (``VCPU:0xGFN+0xOFFSET,...``), from its first whole vcpuinfo report after console byte
    ``offset`` (waited for until its end line, ``timeout`` s at most): the domain's own kernel's
    word (issue 17, item 5), read for each twin from its own console. RuntimeError when the
    guest reports an error or no registration, or no report ends in time."""
    t0 = time.monotonic()
    while (report := vcpuinfo_report(console_text(name, offset))) is None:
        if time.monotonic() - t0 >= timeout:
            seen = VCPUINFO_ANY.findall(console_text(name, offset))
            raise RuntimeError(f"guest {name} printed no whole VCPUINFO report (its end line) within "
                               f"{timeout:.0f}s" + (f"; seen {seen[-4:]}" if seen else ""))
        time.sleep(1)
    items = []
    for line in report:
        m = VCPUINFO.fullmatch(line)
        if not m or m.group(5) != "1":
            raise RuntimeError(f"guest {name}: vcpuinfo said {line!r} (no registered vcpu_info)")
        items.append(f"{m.group(2)}:{m.group(3)}+{m.group(4)}")
    if not items:
        raise RuntimeError(f"guest {name}: an empty vcpuinfo report (no online CPU)")
    return ",".join(items)


def start_node(role: str) -> subprocess.Popen:
    path = RUN / f"{role}.toml"
    out = open(RUN / f"{role}.log", "wb")
    # Both nodes share dom0's one vCPU here; in a real pair the secondary has a host of its
    # own. Niced, its BEGIN handling (pause S, CLEAN S, SVM_DIRTY) does not stretch the
    # primary's pause, as the C baseline's secondary side (run after the pause) does not.
    # Its heartbeat keeps its real-time priority.
    nice = ["nice", "-n", "10"] if role == "secondary" else []
    return subprocess.Popen([*nice, "colo-pipeline", "--log-format", "json", "--log-level", "info", role,
                             "--config", str(path)], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


#: each node's start, as milestones: (name, what its first log line that marks it contains; ''
#: = any line, the node's Python is up and logging). Where the time to protection goes, per boot
#: (issue 17, session 18: shadow paging's protection time against HAP's, for CI's budget)
START_MILESTONES = {
    "primary": (("up", ""), ("domain_opened", "domain prim (id"), ("connected", "secondary 'lab-secondary' connected"),
                ("full_sync_queued", "event=sync_queued "), ("first_commit", "event=checkpoint status=committed "),
                ("protected", "event=protected ")),
    "secondary": (("up", ""), ("domain_opened", "domain sec (id"), ("connected", "primary 'lab-primary' connected"),
                  ("first_applied", "event=applied ")),
}
#: time.time() when replicate_pipeline started the nodes (None: not yet)
NODES_STARTED_AT: float | None = None


def start_milestones(role: str, log_text: str, t0: float) -> dict[str, float]:
    """Seconds from ``t0`` (time.time() when the nodes were started) to the first line of
    ``role``'s json log (``log_text``) that marks each of START_MILESTONES[role]; a milestone not
    reached is left out."""
    out: dict[str, float] = {}
    todo = list(START_MILESTONES[role])
    for line in log_text.splitlines():
        try:
            rec = json.loads(line)
            ts, msg = float(rec["ts"]), str(rec["msg"])
        except (ValueError, KeyError, TypeError):
            continue
        for name, marker in [m for m in todo if m[1] in msg]:
            out[name] = round(ts - t0, 1)
            todo.remove((name, marker))
        if not todo:
            break
    return out


def node_start_phases() -> dict[str, dict[str, float]]:
    """start_milestones of both nodes' logs, {} before the nodes were started."""
    if NODES_STARTED_AT is None:
        return {}
    return {role: start_milestones(role, (RUN / f"{role}.log").read_text(errors="replace"), NODES_STARTED_AT)
            for role in START_MILESTONES if (RUN / f"{role}.log").exists()}


def log_events(role: str, event: str) -> list[dict[str, str]]:
    """``key=value`` fields of the node's log lines that say ``event=<event>``."""
    rows = []
    for line in (RUN / f"{role}.log").read_text(errors="replace").splitlines():
        try:
            msg = json.loads(line)["msg"]
        except (ValueError, KeyError):
            continue
        if f"event={event} " in msg + " ":
            rows.append(dict(re.findall(r"(\w+)=(\S+)", msg)))
    return rows


def log_tails(chars: int = 6000) -> str:
    return "".join(f"\n--- {role}.log (end) ---\n" + (RUN / f"{role}.log").read_text(errors="replace")[-chars:]
                   for role in ("secondary", "primary") if (RUN / f"{role}.log").exists())


def last_log_lines(chars: int = 160) -> str:
    """Each node's last log message, for the STEP line of a start that takes long (where the
    time goes: finding the vcpu_info, the full sync, the proof's hashing)."""
    out = []
    for role in ("primary", "secondary"):
        lines = (RUN / f"{role}.log").read_text(errors="replace").splitlines() if (RUN / f"{role}.log").exists() else []
        last = lines[-1] if lines else ""
        try:
            last = json.loads(last)["msg"]
        except (ValueError, KeyError, TypeError):
            pass
        out.append(f"{role}: {last[:chars]!r}")
    return "; ".join(out)


#: processes session_cpu names whatever their rank: the heartbeat's cost in dom0 under TCG
#: (issue 17, sessions 18-20: 43 % of dom0's CPU until protection at 100 ms, 24 % at 500 ms in a
#: loaded boot), which the three largest showed only when it was among them
ALWAYS_NAMED = ("colo-heartbeat",)


def session_cpu(sid: int, proc: Path = Path("/proc")) -> tuple[float, list[tuple[str, float]]]:
    """CPU seconds (user + system) of the processes alive in session ``sid`` (a node started with
    start_new_session: its stages and workers), and the three that used most, as (name, s),
    then each of ALWAYS_NAMED that is not among them: which side of dom0's one vCPU a slow start
    went to (issue 17, session 18: a niced secondary that took minutes to log its first line
    while the primary ran)."""
    tick = os.sysconf("SC_CLK_TCK")
    per: list[tuple[str, float]] = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:           # gone meanwhile
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        # after the name: state ppid pgrp session ... utime (the 14th field) stime (15th)
        if int(rest[3]) == sid:
            per.append((name, (int(rest[11]) + int(rest[12])) / tick))
    per.sort(key=lambda x: -x[1])
    named = per[:3] + [p for p in per[3:] if p[0] in ALWAYS_NAMED]
    return round(sum(s for _, s in per), 1), [(n, round(s, 1)) for n, s in named]


def nodes_cpu(procs: dict[str, subprocess.Popen]) -> str:
    """session_cpu of each node, for the STEP lines of a start that takes long."""
    out = []
    for role, p in procs.items():
        total, top = session_cpu(p.pid)
        out.append(f"{role} {total}s (" + ", ".join(f"{n} {s}s" for n, s in top) + ")")
    return "; ".join(out)


def wait_for(what: str, check, procs: dict[str, subprocess.Popen], timeout: float, progress=None):
    """``check()``'s first true value, looked at every 0.5 s; RuntimeError when a node exits or
    ``timeout`` s pass. With ``progress`` (a callable whose value changes while the nodes get on,
    e.g. the count of checkpoints made), ``timeout`` counts from its last change: a slow run that
    keeps making checkpoints is waited for, one that stalls is not (issue 17, session 18: a 2-vCPU
    shadow-paged run at host load 6-8 made a proven checkpoint every ~2 minutes and failed on the
    fixed 243 s for all 4)."""
    t0 = next_note = time.monotonic()
    last = progress() if progress else None
    while time.monotonic() - t0 < timeout:
        got = check()
        if got:
            return got
        if progress and (now := progress()) != last:
            last, t0 = now, time.monotonic()
        if time.monotonic() >= next_note:     # where the primary is, for a run that takes long
            info = node_info("primary")
            step(f"waiting for {what}: primary {info.get('state')} epoch {info.get('epoch')} "
                 f"sync {info.get('sync_progress')} | dom0 CPU so far: {nodes_cpu(procs)} | {last_log_lines()}")
            next_note += 60
        for role, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"the {role} node exited with {p.returncode} while waiting for {what}"
                                   + log_tails())
        time.sleep(0.5)
    raise RuntimeError(f"no {what} within {timeout}s" + (f" of the last progress ({last})" if progress else "")
                       + log_tails())


def proofs_logged() -> dict[str, int]:
    """The primary's proofs so far, from its log (which outlives the node): how many epochs were
    proven memory-equal, how many unequal, the last one proven. dom0 gives them with every
    result, so a run that stopped says how far it got (session 10: a PVM that died after 14
    proven checkpoints was taken for a fault "before any checkpoint", because ``pipeline`` is
    filled only when the checkpoints asked for are all in)."""
    if not (RUN / "primary.log").exists():
        return {"equal": 0, "unequal": 0, "last_epoch": -1}
    verdicts = {int(v["epoch"]): v.get("memory_equal") == "True" for v in log_events("primary", "verified")}
    return {"equal": sum(verdicts.values()), "unequal": sum(not ok for ok in verdicts.values()),
            "last_epoch": max(verdicts, default=-1)}


def node_info(role: str) -> dict:
    from pipeline.counters import NodeCounters, NodeNotRunning

    try:
        return NodeCounters.attach(f"lab-{role}").node_info()
    except NodeNotRunning:
        return {}
    except TimeoutError:
        # the node was descheduled for over a second mid-update of its info (this session's
        # 2-vCPU run at host load 8: dom0's one vCPU shared by both nodes): not known this poll
        return {}


#: the survivor's deadline to run 10 ticks past the primary's last one after a failover: an
#: event (its console line) ends the wait; at load 20 a tick took up to 1 s of the host's time,
#: and the survivor may start ~100 ticks back (at the last committed checkpoint)
SURVIVOR_WAIT_S = 600
#: ticks past the primary's last one the survivor must print
SURVIVOR_TICKS_PAST = 10
XEN_BIN = Path("/usr/lib/xen-4.17/bin")


def errors_between(name: str, start: int, end: int | None = None) -> list[str]:
    """The self-check failures the guest printed between console bytes ``start`` and ``end``."""
    return BAD_TICK.findall(console_text(name, start, end))


def early_guest_errors(marks: dict[str, int], sec_until: int) -> str:
    """Self-check failures before the pipeline's first checkpoint that no replication can have
    caused: the primary's guest (the pipeline only reads and pauses it) from the twin pairing
    to now, the secondary's until its node paused it. '' when there were none."""
    found = {"prim": errors_between("prim", marks["prim"]), "sec": errors_between("sec", marks["sec"], sec_until)}
    if not any(found.values()):
        return ""
    return ("platform: guest self-check errors before the first checkpoint: "
            + "; ".join(f"{n} {len(v)} lines, first {v[0].strip()!r}" for n, v in found.items() if v))


#: the nodes' log events printed as EVENT lines after the checkpoints (replicate_pipeline)
EPOCH_EVENTS = ("aborted", "discarded", "loss_abandoned", "secondary_lost", "sync_restart",
                "takeover_attempt", "takeover_abandoned", "torn", "secondary_replaced")


def node_messages(role: str, since: float) -> list[str]:
    """The node's log messages from wall time ``since`` on (its JSON lines carry ``ts``)."""
    out = []
    path = RUN / f"{role}.log"
    for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("ts", 0) >= since:
            out.append(f"{row.get('level', '?')} {row.get('msg', '')}"[:300])
    return out


def xen_key_dump(key: str) -> str:
    """What Xen prints for debug key ``key`` (``xl debug-keys``), cut out of its console ring."""
    before = sh("xl dmesg", timeout=60)
    sh(f"xl debug-keys {key}", timeout=60)
    after = sh("xl dmesg", timeout=60)
    tail = before[-300:]
    at = after.rfind(tail) if tail else -1
    return after[at + len(tail):] if at >= 0 else after[-8000:]


def survivor_stall_report(name: str) -> None:
    """The survivor did not run on: print what Xen and dom0 know of its vCPU (lines 'STALL ...'):
    its state (running, blocked, paused), its registers and LAPIC (xen-hvmctx), its event
    channels' pending and mask bits (Xen key 'e'), its vCPU's upcall flags and pause count
    (key 'q'), the timers Xen has armed (key 'a': a vCPU blocked with no singleshot timer
    armed waits forever)."""
    def out(what: str, text: str, limit: int = 6000) -> None:
        for line in text[-limit:].splitlines():
            print(f"STALL {what}: {line.rstrip()}", flush=True)
    try:
        domid = resolve_domain(name)
        out("xl list", sh("xl list", timeout=60))
        out("vcpu-list", sh(f"xl vcpu-list {name}", timeout=60))
        if (XEN_BIN / "xen-hvmctx").exists():
            out("hvmctx", sh(f"{XEN_BIN}/xen-hvmctx {domid}", timeout=60), 5000)
        for key, what in (("q", "domains"), ("e", "evtchn"), ("a", "timers")):
            dump = xen_key_dump(key)
            if key == "e":     # one domain's ports only
                keep, mine = [], False
                for line in dump.splitlines():
                    if "Event channel information for domain" in line:
                        mine = line.rstrip().endswith(f" {domid}:") or f"domain {domid}:" in line
                    if mine:
                        keep.append(line)
                dump = "\n".join(keep) or dump
            out(f"xen-{what}", dump)
    except Exception as exc:  # noqa: BLE001 - a report that failed says so
        print(f"STALL report failed: {type(exc).__name__}: {exc}", flush=True)


#: what the secondary's backend logs when the HVM contexts it loads change their vCPU set
#: (XenDomain.set_vcpu_state): "... loaded HVM context with vCPUs 0, 1 ..."
LOADED_CONTEXT = "loaded HVM context with vCPUs"


def loaded_context_vcpus() -> list[int]:
    """The vCPUs of the last HVM context the secondary's backend said it loaded ([] if none)."""
    found: list[int] = []
    for msg in node_messages("secondary", 0):
        m = re.search(LOADED_CONTEXT + r" ([\d, ]+)", msg)
        if m:
            found = [int(v) for v in m.group(1).replace(" ", "").split(",") if v]
    return found


def replicate_pipeline(rounds: int, interval_ms: int, failover: bool,
                       twin_marks: dict[str, int] | None = None) -> tuple[list[Checkpoint], dict]:
    """``colo-pipeline secondary`` (guest ``sec``) and ``colo-pipeline primary`` (guest
    ``prim``) in dom0 with the xen backend, over CURVE on 127.0.0.1, until ``rounds`` paused
    checkpoints after the first one committed, each proven by both nodes' full-memory blake3
    (checkpoint.verify_every = 1). Then the primary host "dies": its guest is paused and its
    node SIGKILLed; the secondary must take over and its guest run on."""
    global NODES_STARTED_AT
    sec_at_start = console_size("sec")    # the secondary's node pauses it before its first checkpoint
    NODES_STARTED_AT = time.time()
    procs = {"secondary": start_node("secondary")}
    procs["primary"] = start_node("primary")
    step("nodes started")
    t0 = time.monotonic()
    # at load 15-25 on the host the nodes' start alone (Python under TCG, each finding its
    # guest's vcpu_info) took 12-20 minutes; a loaded host is not a fault of the pipeline
    wait_for("protection", lambda: node_info("primary").get("state") == "protected", procs, PROTECTION_WAIT_S)
    protected_s = time.monotonic() - t0
    # the guests' clocks are checked from here on (issue 17, item 6): before the first checkpoint
    # the SVM's clock is its own restore's, seconds behind the PVM's, and its first load takes
    # it to the PVM's; from then on both run on one clock
    protected_marks = {n: console_size(n) for n in ("prim", "sec")}
    step("protected")
    early = early_guest_errors(twin_marks, sec_at_start) if twin_marks else ""
    if early:       # issue 17, item 1: a fault before the first checkpoint earns another boot
        for p in procs.values():
            os.killpg(p.pid, signal.SIGKILL)
        raise RuntimeError(early)
    print(f"PIPELINE: protected after {protected_s:.1f}s (full sync, pre-copy, first checkpoint)", flush=True)
    for role, phases in node_start_phases().items():
        print(f"START {role} (s after the nodes started): "
              + " ".join(f"{k}={v}" for k, v in phases.items()), flush=True)
    print(f"START dom0 CPU until protection: {nodes_cpu(procs)}", flush=True)
    from pipeline.counters import NodeCounters

    primary = NodeCounters.attach("lab-primary")

    def paused_checkpoints() -> list[dict]:
        return [r for r in primary.checkpoints() if r["pvm_pause_ns"] and r["status"] == 0]
    wait_for(f"{rounds + 1} checkpoints", lambda: len(paused_checkpoints()) > rounds, procs,
             60 + rounds * (interval_ms / 1000 + 60), progress=lambda: len(paused_checkpoints()))
    rows = paused_checkpoints()[: rounds + 1]
    last = rows[-1]["epoch"]       # the primary logs the proof's verdict after the record
    wait_for(f"the proof of epoch {last}",
             lambda: any(int(v["epoch"]) == last for v in log_events("primary", "verified")), procs, 120)
    verified = {int(v["epoch"]): v["memory_equal"] == "True" for v in log_events("primary", "verified")}
    results = [Checkpoint(int(r["epoch"]), int(r["pages_dirty"]), int(r["pages_svm_dirty"]),
                          int(r["pages_sent"]), int(r["bytes_wire"]),
                          pause_ms=(r["pvm_pause_ns"] - r["pvm_verify_ns"]) / 1e6,
                          verify_ms=r["pvm_verify_ns"] / 1e6, commit_ms=r["commit_ns"] / 1e6,
                          equal=verified.get(int(r["epoch"])), cause=r.get("cause_name", "")) for r in rows]
    for role in ("primary", "secondary"):             # where each node found its guest's vcpu_info
        for line in (RUN / f"{role}.log").read_text(errors="replace").splitlines():
            if ("vcpu_info found" in line or "vcpu_info ranges" in line or "disagree where Xen" in line
                    or "Xen timer event channels" in line or LOADED_CONTEXT in line):
                print(f"FOUND {role}: {json.loads(line)['msg']}", flush=True)
    epochs = {c.epoch for c in results}
    for row in log_events("primary", "paused"):   # the snapshot stage's breakdown of each pause
        if int(row["epoch"]) in epochs:
            print("PAUSED " + " ".join(f"{k}={v}" for k, v in row.items() if k != "event"), flush=True)
    # every epoch given up, loss declared or given up, takeover tried: why a checkpoint is
    # missing from the PIPE lines (session 9's loaded run gave epoch 10 up and only its
    # absence was seen)
    for role in ("primary", "secondary"):
        for msg in node_messages(role, 0):
            if any(f"event={e}" in msg for e in EPOCH_EVENTS) or "peer lost:" in msg:
                print(f"EVENT {role}: {msg}", flush=True)
    for c in results:
        print("PIPE " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in asdict(c).items()), flush=True)
    starts = [r["started_ns"] for r in rows]
    extra: dict[str, object] = {"protected_s": round(protected_s, 1), "protected_marks": protected_marks,
                                "svm_context_vcpus": loaded_context_vcpus(), "epoch_spacing_ms": round(
        statistics.median(b - a for a, b in zip(starts, starts[1:])) / 1e6) if len(starts) > 1 else 0}
    if failover:
        extra["console_mark"] = console_size("sec")
        killed_at = time.time()
        sh("xl pause prim")
        os.killpg(procs["primary"].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs["primary"].wait()
        print("FAILOVER: primary guest paused and its node SIGKILLed; waiting for the secondary", flush=True)
        def active() -> dict | None:
            info = node_info("secondary")
            return info if info.get("role") == "active" else None
        info = wait_for("takeover", active, {"secondary": procs["secondary"]}, 60)
        extra.update(takeover_after_s=round(time.monotonic() - killed, 2),
                     failover_detect_ms=info.get("failover_detect_ms"), takeover_ms=info.get("takeover_ms"),
                     detected_by=info.get("failover_detected_by"))
        print(f"FAILOVER: secondary active {extra['takeover_after_s']}s after the kill "
              f"(detected in {extra['failover_detect_ms']} ms by {extra['detected_by']}, "
              f"takeover {extra['takeover_ms']} ms)", flush=True)
    extra["primary_errors"] = [e["msg"] for e in map(json.loads, filter(None, (RUN / "primary.log").read_text().splitlines()))
                               if e.get("level") in ("ERROR", "CRITICAL")][:5]
    procs_left = [p for p in procs.values() if p.poll() is None]
    if failover:
        extra["survivor"] = wait_for_survivor(int(extra["console_mark"]), killed_at)
    time.sleep(2)
    for p in procs_left:
        p.terminate()
    for p in procs_left:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    return results, extra


def wait_for_survivor(mark: int, killed_at: float) -> dict[str, object]:
    """After the kill, the secondary's guest runs on alone until every vCPU's memwork is
    SURVIVOR_TICKS_PAST ticks past the primary's last one on that vCPU (its counter restarts at
    the last committed checkpoint, which a commit of 7-12 s under a loaded host puts ~100 ticks
    back). Progress is each vCPU's latest line (not its highest: before the takeover's rollback
    the SVM may have run ahead of the primary). The wait ends on that console line, or after
    SURVIVOR_WAIT_S; a progress line every 30 s says where the survivor is. Not reached: the
    survivor stalled (xenlab-4 of session 6: it printed 3 ticks in 120 s; with 2 vCPUs a vCPU
    whose timer was lost stalls alone), and what Xen knows of its vCPUs is printed
    (survivor_stall_report)."""
    prim_last = {cpu: max(t.n for t in ts) for cpu, ts in by_cpu(ticks_since("prim", 0)).items()} or {0: 0}
    target = {cpu: n + SURVIVOR_TICKS_PAST for cpu, n in prim_last.items()}
    t0 = time.monotonic()
    next_note, last_n, last_change = t0 + 30, {cpu: -1 for cpu in target}, t0
    reached = None
    while True:
        latest = {cpu: ts[-1].n for cpu, ts in by_cpu(ticks_since("sec", mark)).items()}
        now_n = {cpu: latest.get(cpu, -1) for cpu in target}
        if now_n != last_n:
            last_n, last_change = now_n, time.monotonic()
        if all(now_n[cpu] >= target[cpu] for cpu in target):
            reached = round(time.monotonic() - t0, 1)
            break
        if time.monotonic() - t0 >= SURVIVOR_WAIT_S:
            break
        if time.monotonic() >= next_note:
            next_note += 30
            step(f"survivor: n per vCPU {now_n}, target {target}, last new tick "
                 f"{time.monotonic() - last_change:.0f}s ago")
        time.sleep(0.5)
    # the guest kernel's own words (an oops, a panic)
    said = [ln for ln in console_text("sec", mark).splitlines() if ln.strip() and not TICK.search(ln)]
    for line in said[:30]:
        print(f"SURVIVOR console: {line[:300]}", flush=True)
    took_over = node_messages("secondary", killed_at - 1)
    for line in took_over[:40]:
        print(f"SURVIVOR secondary log: {line}", flush=True)
    print(f"SURVIVOR: {'reached' if reached is not None else 'did NOT reach'} n={target} per vCPU (primary's last "
          f"{prim_last} + {SURVIVOR_TICKS_PAST}) {f'after {reached}s' if reached is not None else f'in {SURVIVOR_WAIT_S}s'}"
          f"; its last n={last_n}, {time.monotonic() - last_change:.0f}s after its last new tick", flush=True)
    if reached is None:
        survivor_stall_report("sec")
    return {"target": {str(c): n for c, n in target.items()}, "reached_s": reached,
            "last_n": {str(c): n for c, n in last_n.items()},
            "rolled_back": any("event=discarded" in m or "epoch discarded" in m or " discarded:" in m for m in took_over)}


def bad_lines(name: str, offset: int, limit: int = 4) -> list[str]:
    """The first self-check failures the guest printed after ``offset`` (with the bad page)."""
    return BAD_TICK.findall(console_text(name, offset))[:limit]


def summarize(ticks: list[Tick]) -> dict[str, object]:
    """Lines printed, lines with a self-check error, highest counter; per vCPU, its lines and
    highest counter (a vCPU whose memwork printed nothing is missing from ``cpus``)."""
    return {"lines": len(ticks), "err_lines": sum(1 for t in ticks if t.err),
            "max_n": max((t.n for t in ticks), default=-1),
            "cpus": {str(c): {"lines": len(ts), "max_n": max(t.n for t in ts)} for c, ts in by_cpu(ticks).items()}}


def own_ticks(ticks: list[Tick], pvm: list[Tick]) -> list[Tick]:
    """The SVM's ``ticks`` less the lines that are the PVM's own, printed again: a line still in
    prim's console ring when a checkpoint was taken (xenconsoled had not read it yet) is in the
    SVM's copy of that ring after the load, and sec's xenconsoled prints it (the ring's indexes
    come with the memory). Such a line has the PVM's counter *and* clock to the microsecond,
    which no tick of the SVM's own has; in the clock check it looked like the survivor's clock
    going back 26.6 s (issue 17, session 19, boot 04)."""
    seen = {(t.cpu, t.n, t.mono) for t in pvm}
    return [t for t in ticks if (t.cpu, t.n, t.mono) not in seen]


def counter_steps(ticks: list[Tick]) -> list[tuple[int, int]]:
    """(n, next n) wherever a vCPU's counter did not go on by one, in printed order: a load of a
    checkpoint or the takeover's rollback, which set the memory, and so the counter, to a
    checkpoint's (the primary's guest has none: it is never loaded)."""
    return [(a.n, b.n) for ts in by_cpu(ticks).values() for a, b in zip(ts, ts[1:]) if b.n != a.n + 1]


def failover_summary(prim: list[Tick], sec_after: list[Tick]) -> dict[str, object]:
    """Did the secondary's guest go on where the primary's stopped, on every vCPU? The primary
    died between checkpoints, so the secondary (running since the last one) may repeat a few
    counters the primary printed; per vCPU, its counters after the kill must cover the primary's
    last one, run on without gaps, report no self-check error, and every place the counter did
    not go on by one (the takeover's rollback, a checkpoint's load) must land on a state the
    primary had (at most its last counter + 1: a tick under way when it was paused): the
    survivor never jumps ahead. The top-level figures are vCPU 0's; ``cpus`` has each one's,
    and the booleans hold for all."""
    sec = by_cpu(sec_after)
    cpus: dict[str, dict[str, object]] = {}
    for cpu, pts in (by_cpu(prim) or {0: []}).items():
        last = max((t.n for t in pts), default=-1)
        st = sec.get(cpu, [])
        ns = sorted({t.n for t in st})
        steps = counter_steps(st)
        cpus[str(cpu)] = {"primary_last_n": last, "secondary_first_n": ns[0] if ns else -1,
                          "secondary_last_n": ns[-1] if ns else -1, "lines": len(ns),
                          "gapless": ns == list(range(ns[0], ns[0] + len(ns))) if ns else False,
                          "covers_primary": bool(ns) and ns[0] <= last + 1 and ns[-1] > last,
                          "counter_steps": steps[:4], "ahead": sum(b > last + 1 for _, b in steps),
                          "err_lines": sum(1 for t in st if t.err)}
    first = next(iter(cpus.values()))
    return {**{k: first[k] for k in ("primary_last_n", "secondary_first_n", "secondary_last_n")},
            "lines": min(c["lines"] for c in cpus.values()),
            "gapless": all(c["gapless"] for c in cpus.values()),
            "covers_primary": all(c["covers_primary"] for c in cpus.values()),
            "ahead": sum(c["ahead"] for c in cpus.values()),
            "err_lines": sum(c["err_lines"] for c in cpus.values()), "cpus": cpus}


def run_c_baseline(rounds: int, interval_ms: int, paused_twin: bool = False,
                   ids: tuple[int, int] | None = None) -> list[dict[str, float]]:
    pd, sd = ids or make_twin(paused=paused_twin)
    out = sh(f"/root/crep -r {rounds} -i {interval_ms} {pd} {sd}", timeout=600)
    print(out, end="", flush=True)
    return [{k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
            for line in out.splitlines() if line.startswith("CREP ")]


def twin_check(marks: dict[str, int], rounds: int, interval_ms: int, watch_s: float) -> dict[str, object]:
    """xenlab.until=twin (lab.py --twin-check): the cheapest boot that met issue 17's memwork
    fault (a page read back as zeros right after the guest wrote it, in the C baseline's phase
    as well as the pipeline's, first errors soon after the twin pairing): after the pairing,
    the C baseline alone (no Python in the loop) for ``rounds`` checkpoints on the running
    twins, then both guests run ``watch_s`` seconds more; every self-check line is counted."""
    ids = resolve_domain("prim"), resolve_domain("sec")
    rows = run_c_baseline(rounds, interval_ms, ids=ids)
    step(f"twin check: C baseline done ({len(rows)} checkpoints); watching the guests {watch_s:.0f}s")
    time.sleep(watch_s)
    guests = {n: summarize(ticks_since(n, m)) for n, m in marks.items()}
    for n, mark in marks.items():
        for line in bad_lines(n, mark):
            print(f"GUESTERR twin-check {n}: {line.strip()}", flush=True)
    reported = {}
    for n, mark in marks.items():       # each twin's own word on its vcpu_info (issue 17, item 5)
        try:
            reported[n] = guest_vcpu_info(n, mark, timeout=60)
        except RuntimeError as exc:
            reported[n] = f"error: {exc}"
    step(f"twin check: vcpu_info the guests report: {reported}")
    return {"crep_rows": len(rows), "watch_s": watch_s, "guests": guests, "vcpu_info": reported}


#: the dirty-log stress's rounds per cycle: each a CLEAN, a wait, a PEEK (the vcpu_info watch's
#: pattern), then one checkpoint-like pause/CLEAN/copy/context/unpause
STRESS_ROUNDS = 5


def logdirty_stress(seconds: float) -> dict[str, object]:
    """xenlab.until=stress: for ``seconds``, do to both running twins, over and over, what the
    pipeline does to the primary's guest, without the pipeline (so a boot tries it hundreds of
    times, where a quick boot of the pipeline does it a few times in 10-30 minutes): log-dirty
    on, rounds of CLEAN/PEEK, a paused CLEAN + copy of the dirty frames + HVM context, log-dirty
    off. Issue 17: ``prim`` triple-faulted with nothing else done to it than this and xl
    save/restore; whether the guests die here, with which Xen/QEMU options, is the test."""
    import numpy as np

    from pipeline.xen_io.xen import open_xen_domain

    doms = [open_xen_domain(name, find_xen_written=False) for name in ("prim", "sec")]
    marks = {d.name: console_size(d.name) for d in doms}
    cycles = {d.name: 0 for d in doms}
    copied = {d.name: 0 for d in doms}
    died: dict[str, str] = {}
    t0 = time.monotonic()
    next_note = t0 + 60
    while time.monotonic() - t0 < seconds and len(died) < len(doms):
        for d in doms:
            if d.name in died:
                continue
            try:
                d.enable_dirty_log()
                for _ in range(STRESS_ROUNDS):
                    d.read_and_clear_dirty()
                    time.sleep(0.2)
                    d.dirty_count()
                d.pause()
                try:
                    dirty = d.read_and_clear_dirty()
                    buf = np.empty((dirty.size, d.page_size), dtype=np.uint8)
                    d.read_pages(dirty, buf)
                    d.get_vcpu_state()
                    copied[d.name] += int(dirty.size)
                finally:
                    d.resume()
                d.disable_dirty_log()
                cycles[d.name] += 1
            except Exception as exc:   # noqa: BLE001 - a domain gone (a triple fault destroys it: on_reboot) is the finding
                try:
                    alive = resolve_domain(d.name) == d.domid
                except Exception:  # noqa: BLE001
                    alive = False
                if alive:
                    raise
                died[d.name] = f"{type(exc).__name__}: {exc}"[:300]
                step(f"stress: {d.name} gone after {cycles[d.name]} cycles: {exc}")
        if time.monotonic() >= next_note:
            next_note += 60
            step(f"stress: cycles {cycles}, frames copied {copied}, Xen: {xen_guest_faults()}")
    ticks = {n: ticks_since(n, m) for n, m in marks.items()}
    for n, mark in marks.items():
        for line in bad_lines(n, mark):
            print(f"GUESTERR stress {n}: {line.strip()}", flush=True)
    return {"seconds": round(time.monotonic() - t0, 1), "cycles": cycles, "frames_copied": copied,
            "rounds_per_cycle": STRESS_ROUNDS, "died": died,
            "guests": {n: summarize(t) for n, t in ticks.items()}}


class FirstCheckpointDone(Exception):
    """xenlab.until=first (the pipeline's first checkpoint is proven) or =stress (the dirty-log
    stress is over): the boot ends there."""


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = settings()
    rounds, interval = int(cfg["rounds"]), int(cfg["interval_ms"])
    result: dict[str, object] = {"settings": cfg}
    t_start = time.monotonic()
    canary_out = Path("/run/fpu-canary.json")      # outside RUN, which write_configs makes afresh
    canary = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fpu_canary.py")), str(canary_out)])
    # the WATCH lines (watchdog.py, at SCHED_FIFO 99): what dom0 does when the driver goes
    # silent (session 18's 2-vCPU run printed nothing for 29 minutes); xenlab.watch_every_s=0: none
    every = float(cfg.get("watch_every_s", WATCH_EVERY_S))
    watchdog = subprocess.Popen([sys.executable, str(Path(__file__).with_name("watchdog.py")), str(every)]) \
        if every > 0 else None
    try:
        sh("mkdir -p /run/lock")
        # dom0 first: at load 10-18 on this host (QEMU got ~30 % of a core) the nodes, sharing
        # dom0's one vCPU with two guests busy at equal weight, had not finished starting after
        # 20 minutes while both guests ticked on; 4x the guests' weight gives the nodes (and the
        # C baseline) the emulated CPUs when they need them, and the guests the rest
        for sched in ("sched-credit2", "sched-credit"):
            try:
                sh(f"xl {sched} -d Domain-0 -w {DOM0_WEIGHT}", timeout=60)
                step(f"dom0 scheduler weight {DOM0_WEIGHT} ({sched}; guests 256)")
                break
            except RuntimeError:
                continue
        if cfg.get("hap") in ("0", "1"):   # the guests' paging: HAP (nested paging) or shadow
            for name in ("prim", "sec"):
                sh(f"sed -i 's/^hap = .*/hap = {cfg['hap']}/' /root/{name}.cfg")
        result["hap"] = sh("sed -n 's/^hap = //p' /root/prim.cfg").strip()
        if cfg.get("vcpus", "").isdigit():   # vCPUs per guest (issue 17, item 4; lab.py --vcpus)
            for name in ("prim", "sec"):
                sh(f"sed -i 's/^vcpus = .*/vcpus = {int(cfg['vcpus'])}/' /root/{name}.cfg")
        result["vcpus"] = int(sh("sed -n 's/^vcpus = //p' /root/prim.cfg").strip())
        # dom0 alone on pCPU 0, every guest vCPU on pCPU 1 (xenlab.pin: 1, 0, auto = with 2+
        # guest vCPUs). Session 19's 2-vCPU boot: with dom0 at 4x the guests' weight on shared
        # pCPUs, dom0's vCPU was runnable but not run (steal) 62-91 % of each 30 s from the
        # twin pairing on: 4 guest vCPUs on shadow paging, whose faults Xen handles in their
        # time, left the nodes a tenth of a pCPU
        pin = cfg.get("pin", "auto")
        result["pinned"] = pin == "1" or (pin == "auto" and result["vcpus"] > 1)
        if result["pinned"]:
            sh("xl vcpu-pin Domain-0 all 0", timeout=60)
            for name in ("prim", "sec"):
                sh(f"sed -i '/^cpus = /d' /root/{name}.cfg && echo 'cpus = \"{GUEST_PCPUS}\"' >> /root/{name}.cfg")
            step(f"pinned: dom0 on pCPU 0, the guests on pCPU {GUEST_PCPUS}")
        if cfg.get("x2apic") == "1":         # lab.py --x2apic: the guests' APIC as before session 16
            for name in ("prim", "sec"):
                sh(f"sed -i '/^extra = /s/ nox2apic//' /root/{name}.cfg")
        result["guest_extra"] = sh("sed -n 's/^extra = //p' /root/prim.cfg").strip().strip('"')
        step(f"guests' kernel command line: {result['guest_extra']}")
        step(f"guests' vCPUs: {result['vcpus']}")
        step(f"guests' paging: {'HAP' if result['hap'] == '1' else 'shadow'}")
        t0 = time.monotonic()
        sh("xl create /root/prim.cfg")
        result["guest_ticking_s"] = round(time.monotonic() - t0 + wait_ticking("prim", 0), 1)
        # the guest's own word on its APIC mode (pack.sh's init prints it before memwork starts)
        result["guest_apic"] = [ln.split("GUEST-APIC ", 1)[1].strip()
                                for ln in console_text("prim").splitlines() if "GUEST-APIC " in ln]
        step(f"guest prim's APIC: {result['guest_apic']}")
        time.sleep(2)
        write_configs(interval, result["vcpus"])
        # colo-pipeline first: the C baseline then checkpoints at the pipeline's own cadence, so
        # both pause for about the same number of dirty pages (the pipeline's epochs are longer
        # than interval_ms when every checkpoint is proven by two full-memory hashes)
        marks = {n: console_size(n) for n in ("prim", "sec")}
        paused_twin = cfg.get("twin") == "paused"
        result["twin"] = "paused" if paused_twin else "running"
        t0 = time.monotonic()
        make_twin(save_first=True, paused=paused_twin)
        result["twin_s"] = round(time.monotonic() - t0, 1)
        paired = {n: console_size(n) for n in ("prim", "sec")}
        if cfg["until"] == "stress":
            result["stress"] = logdirty_stress(float(cfg.get("stress_s", "300")))
            raise FirstCheckpointDone
        if cfg["until"] == "twin":
            result["twin_check"] = twin_check(marks, rounds, interval, float(cfg.get("watch_s", "60")))
            raise FirstCheckpointDone
        first_only = cfg["until"] == "first"
        if cfg.get("vcpu_info", "guest") == "guest":
            # each node is told where its own guest registered its vcpu_info, from that twin's
            # own report after the pairing (a fact; xenlab.vcpu_info=watch: the nodes watch)
            result["vcpu_info"] = {}
            for role, name in (("primary", "prim"), ("secondary", "sec")):
                result["vcpu_info"][name] = guest_vcpu_info(name, paired[name])
                write_node_config(role, name, interval, result["vcpu_info"][name], check=False,
                                  vcpus=result["vcpus"])
            step(f"vcpu_info from the guests' own registrations: {result['vcpu_info']}")
        checkpoints, extra = replicate_pipeline(0 if first_only else rounds, interval, not first_only, marks)
        result["pipeline"] = [asdict(c) for c in checkpoints]
        result["pipeline_extra"] = extra
        ticks = {n: ticks_since(n, marks[n]) for n in marks}
        result["pipeline_phase"] = {n: summarize(t) for n, t in ticks.items()}
        for n, mark in marks.items():
            for line in bad_lines(n, mark):
                print(f"GUESTERR pipeline-phase {n}: {line.strip()}", flush=True)
        if first_only:
            raise FirstCheckpointDone
        result["failover"] = failover_summary(ticks["prim"], ticks_since("sec", int(extra["console_mark"])))
        # issue 17, item 6, per vCPU: the PVM's clock from protection to the kill (never loaded:
        # its counter goes on by one), the SVM's through every load and the takeover, and the
        # survivor's from the kill on (its largest step is the failover's gap)
        pm = extra["protected_marks"]
        prim_after = ticks_since("prim", int(pm["prim"]))
        prim_all = ticks_since("prim", 0)
        result["clock"] = {"prim": {**clock_check(prim_after), "counter_steps": counter_steps(prim_after)[:4]},
                           "sec": clock_check(own_ticks(ticks_since("sec", int(pm["sec"])), prim_all)),
                           "survivor": clock_check(own_ticks(ticks_since("sec", int(extra["console_mark"])),
                                                             prim_all))}
        for who, c in result["clock"].items():
            print(f"CLOCK {who}: ok={c['ok']} {c['cpus']}" + (f" counter steps {c['counter_steps']}"
                                                              if c.get("counter_steps") else ""), flush=True)

        marks = {n: console_size(n) for n in ("prim", "sec")}
        # the pipeline's primary guest runs between two checkpoints for the spacing less the
        # proof's hashing (paused): the C baseline sleeps that long, so both copy as many pages
        verify = statistics.median(c.verify_ms for c in checkpoints) if checkpoints else 0
        c_interval = max(interval, int(extra["epoch_spacing_ms"] - verify))
        result["c_interval_ms"] = c_interval
        result["c_baseline"] = run_c_baseline(rounds, c_interval, paused_twin)
        time.sleep(2)
        result["c_phase"] = {n: summarize(ticks_since(n, marks[n])) for n in marks}
        for n, mark in marks.items():
            for line in bad_lines(n, mark):
                print(f"GUESTERR C-phase {n}: {line.strip()}", flush=True)
    except FirstCheckpointDone:
        pass
    except Exception as exc:  # the host side reports it; dom0 stays up for a look
        log.exception("lab failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["node_start"] = node_start_phases()      # also when the start failed: how far each got
    result["domids"] = {str(k): v for k, v in DOMIDS.items()}
    result["proofs"] = proofs_logged()
    result["xen_guest_faults"] = xen_guest_faults()
    if result["xen_guest_faults"]:        # where each dying guest was, as its kernel's symbol
        try:
            result["xen_guest_rips"] = guest_death_registers(sh("xl dmesg", timeout=60),
                                                             Path("/proc/kallsyms").read_text())
        except Exception as exc:  # noqa: BLE001 - the finding is then that dom0 could not tell
            result["xen_guest_rips"] = [f"not read: {type(exc).__name__}: {exc}"]
    if "error" in result or result["xen_guest_faults"]:
        for name in ("prim", "sec"):         # where each guest's own console stopped
            path = Path(CONSOLE_LOG.format(name))
            # the guest kernel's last words without memwork's lines: a panic's trace is ~3000 bytes
            said = [ln for ln in path.read_bytes()[-200000:].decode(errors="replace").splitlines()
                    if not TICK.search(ln)] if path.exists() else ["(no console log)"]
            tail = "\n".join(said)[-3000:]
            print(f"CONSOLE {name} (end): {tail!r}", flush=True)
    try:
        result["xl_list"] = sh("xl list", timeout=60)
        result["dmesg_tail"] = sh("xl dmesg | tail -n 15", timeout=60)
    except Exception as exc:  # noqa: BLE001
        result["xl_list"] = f"{type(exc).__name__}: {exc}"
    if watchdog is not None:
        watchdog.terminate()
    canary.terminate()
    try:
        canary.wait(timeout=30)
        result["fpu_canary"] = {**json.loads(canary_out.read_text()), "rc": canary.returncode}
    except Exception as exc:  # noqa: BLE001 - a canary that died is itself the finding
        result["fpu_canary"] = {"error": f"{type(exc).__name__}: {exc}", "rc": canary.poll()}
    result["dom0_s"] = round(time.monotonic() - t_start, 1)
    print("XENLAB-RESULT " + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
