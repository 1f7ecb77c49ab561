#!/usr/bin/env python3
"""dom0's watchdog line on the serial console, run beside the lab's driver (issue 17, session 19).

Session 18's 2-vCPU `--ci` went silent after its full sync: dom0 printed nothing for 29
minutes, not even the driver's 60 s STEP lines, and it could not be told whether dom0 hung,
its one vCPU was starved by the nodes' real-time stages (SCHED_FIFO 1-2, the heartbeat
SCHED_RR 3), or Xen stalled. This process runs at SCHED_FIFO 99, above every node thread,
and every ``INTERVAL_S`` prints one ``WATCH`` line to its stdout (dom0's console, hvc0, which
Xen writes to the serial log) from /proc alone (no import beyond the stdlib, no node code):

- ``late``: how much later than asked it woke (at FIFO 99 only Xen not running dom0's vCPU,
  the kernel, or RT throttling delays it);
- dom0's CPU split over the interval from /proc/stat: user, system, idle and **steal** (time
  dom0's vCPU was runnable but Xen ran something else: Xen's word on starving dom0);
- the run queue (``procs_running``), the load, the kernel's RT budget
  (``sched_rt_runtime_us``/``period``);
- the threads that used most CPU in the interval, each with its policy and priority
  (``FIFO2``, ``RR3``, ``OTHER``), and the runnable threads at real time;
- each node's last log message (the tail of its log: its progress);
- every 3rd line, Xen's vCPUs (``xl vcpu-list``: state and CPU seconds per domain's vCPU),
  run at normal priority in the background and printed when done;
- the kernel's new log lines at warning level or worse (RT throttling, soft lockups, hung
  tasks: ``quiet`` keeps warnings off the console).

usage: watchdog.py [INTERVAL_S]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

INTERVAL_S = 30.0
#: the nodes' logs (lab_dom0.RUN)
NODE_LOGS = {"primary": Path("/run/colo-lab/primary.log"), "secondary": Path("/run/colo-lab/secondary.log")}
POLICY = {0: "OTHER", 1: "FIFO", 2: "RR", 3: "BATCH", 5: "IDLE", 6: "DL"}
XL = "/usr/lib/xen-4.17/bin/xl"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_line() -> list[int]:
    """/proc/stat's cpu line: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                return [int(v) for v in line.split()[1:]]
    return []


def threads() -> dict[int, tuple[str, str, str, int]]:
    """tid -> (comm, state, policy+prio as 'FIFO2', CPU ticks) of every thread in dom0. With
    scandir and raw reads: with a Path.glob walk this process used 2.5 s of dom0's one vCPU in
    a 20 s interval at FIFO 99 under TCG (its first boot: 13 % of dom0; the kernel then logged
    "sched: RT throttling activated")."""
    out: dict[int, tuple[str, str, str, int]] = {}
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit():
            continue
        try:
            tids = [t.name for t in os.scandir(f"/proc/{proc.name}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                fd = os.open(f"/proc/{proc.name}/task/{tid}/stat", os.O_RDONLY)
                try:
                    text = os.read(fd, 1024).decode(errors="replace")
                finally:
                    os.close(fd)
            except OSError:
                continue
            close = text.rindex(")")
            f = text[close + 2:].split()
            # after comm: state(0) ... utime(11) stime(12) ... rt_priority(37) policy(38)
            prio = int(f[37])
            out[int(tid)] = (text[text.index("(") + 1:close], f[0],
                             f"{POLICY.get(int(f[38]), f[38])}{prio if prio else ''}", int(f[11]) + int(f[12]))
    return out


def last_message(path: Path, chars: int = 110) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "-"
    last = lines[-1] if lines else ""
    try:
        last = json.loads(last)["msg"]
    except (ValueError, KeyError, TypeError):
        pass
    return repr(last[:chars])


def read_value(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def kernel_lines(fd: int) -> list[str]:
    """New /dev/kmsg records at warning level (4) or worse, since the last call."""
    out = []
    while True:
        try:
            rec = os.read(fd, 8192).decode(errors="replace")
        except BlockingIOError:
            return out
        except OSError:          # a record overwritten before it was read (EPIPE): go on
            continue
        head, _, msg = rec.partition(";")
        try:
            level = int(head.split(",")[0]) & 7
        except ValueError:
            continue
        if level <= 4:
            out.append(msg.strip()[:200])


def normal_priority() -> None:
    """For xl, started from this FIFO 99 process: it must not run at real time."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def main() -> int:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else INTERVAL_S
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))
        me = "FIFO99"
    except OSError as exc:
        me = f"normal ({exc})"
    try:
        kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(kmsg, 0, os.SEEK_END)
    except OSError:
        kmsg = -1
    print(f"WATCH start at {me}, every {interval:.0f}s; rt budget {read_value('/proc/sys/kernel/sched_rt_runtime_us')}"
          f"/{read_value('/proc/sys/kernel/sched_rt_period_us')} us", flush=True)
    prev_cpu, prev_threads = cpu_line(), threads()
    due = time.monotonic() + interval
    xl: subprocess.Popen | None = None
    n = 0
    while True:
        time.sleep(max(0.0, due - time.monotonic()))
        late = time.monotonic() - due
        due = time.monotonic() + interval
        n += 1
        cpu, ths = cpu_line(), threads()
        d = [b - a for a, b in zip(prev_cpu, cpu)]
        total = sum(d[:8]) or 1
        split = "user {:.0f} sys {:.0f} idle {:.0f} steal {:.0f}".format(
            100 * (d[0] + d[1]) / total, 100 * (d[2] + d[5] + d[6]) / total, 100 * (d[3] + d[4]) / total,
            100 * d[7] / total)
        used = sorted(((t[3] - prev_threads.get(tid, (0, 0, 0, 0))[3], tid, t) for tid, t in ths.items()),
                      reverse=True)[:5]
        top = " ".join(f"{t[0]}/{tid}:{u / TICK:.1f}s:{t[2]}" for u, tid, t in used if u > 0)
        rt_run = " ".join(f"{t[0]}/{tid}:{t[2]}" for tid, t in ths.items()
                          if t[1] == "R" and t[2].startswith(("FIFO", "RR")) and tid != os.getpid())
        prev_cpu, prev_threads = cpu, ths
        running = next((ln.split()[1] for ln in read_value("/proc/stat").splitlines() if ln.startswith("procs_running")), "?")
        nodes = " ".join(f"{role}={last_message(p)}" for role, p in NODE_LOGS.items() if p.exists())
        print(f"WATCH {time.strftime('%H:%M:%S', time.gmtime())} late={late:.1f}s load={read_value('/proc/loadavg').split(' ')[0]}"
              f" running={running} dom0 cpu% {split} (of {total / TICK:.0f}s)"
              f" | top {top or '-'} | rt runnable {rt_run or '-'} | {nodes}", flush=True)
        if xl is not None and xl.poll() is not None:
            rows = [ln.split() for ln in (xl.stdout.read() if xl.stdout else "").splitlines()[1:]]
            # Name ID VCPU CPU State Time(s) Affinity
            print("WATCH xl vcpu-list " + " ".join(f"{r[0]}.{r[2]}:{r[4]}:{r[5]}s" for r in rows if len(r) >= 6),
                  flush=True)
            xl = None
        if xl is None and n % 3 == 0 and os.path.exists(XL):
            xl = subprocess.Popen([XL, "vcpu-list"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  preexec_fn=normal_priority)
        if kmsg >= 0:
            for line in kernel_lines(kmsg)[:6]:
                print(f"WATCH kernel: {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
