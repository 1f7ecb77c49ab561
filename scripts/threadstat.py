"""What the kernel's scheduler says about every thread of a process, summed: its CPU time,
its time runnable without a CPU, how often it was scheduled in (/proc/PID/task/*/schedstat),
and optionally its voluntary context switches (each a wait that blocked). The benchmarks
compare two trees by these on a loaded machine, where they move far less than wall times
(scripts/bench_service.py per request, scripts/trace_checkpoint.py per checkpoint).
"""
from __future__ import annotations

import os
from typing import NamedTuple


class ThreadTimes(NamedTuple):
    cpu_ns: int         # on a CPU
    wait_ns: int        # runnable, waiting for a CPU
    runs: int           # times scheduled in (a wake-up, or a turn after being preempted)
    io_cpu_ns: int      # of cpu_ns, its ZeroMQ I/O threads' (libzmq names them ZMQbg/IO/<n>):
    io_runs: int        # a message a stage sends or receives wakes one of those as well
    switches: int       # voluntary context switches (only counted when asked for, else 0)


def thread_times(pid: int, switches: bool = False) -> ThreadTimes | None:
    """Every thread of ``pid`` so far, summed (a thread that ends meanwhile is skipped);
    None once the process is gone. ``switches``: also read each thread's status for its
    voluntary context switches."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    cpu = wait = runs = io_cpu = io_runs = volun = 0
    for tid in tids:
        task = f"/proc/{pid}/task/{tid}/"
        try:
            with open(task + "schedstat") as fh:
                t_cpu, t_wait, t_runs = (int(x) for x in fh.read().split()[:3])
            with open(task + "comm") as fh:
                io_thread = fh.read().startswith("ZMQbg/IO")
            t_volun = 0
            if switches:
                with open(task + "status") as fh:
                    for line in fh:
                        if line.startswith("voluntary_ctxt_switches:"):
                            t_volun = int(line.split()[1])
        except (OSError, ValueError):
            continue
        cpu, wait, runs, volun = cpu + t_cpu, wait + t_wait, runs + t_runs, volun + t_volun
        if io_thread:
            io_cpu, io_runs = io_cpu + t_cpu, io_runs + t_runs
    return ThreadTimes(cpu, wait, runs, io_cpu, io_runs, volun)
