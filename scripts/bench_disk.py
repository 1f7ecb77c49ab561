#!/usr/bin/env python3
"""Write throughput of our NBD export with replication on, against qemu-nbd, in one run.

Workloads, driven by the same client (``qemu-img bench -w``) against each server:

* ``seq_1m``  — sequential 1 MiB writes, 8 in flight;
* ``rand_4k`` — 4 KiB writes, 16 in flight, each ``7919`` blocks (a prime) after the
  previous one modulo the image size, so consecutive writes land far apart (qemu-img
  bench has no random mode; the stride visits every block once before repeating).

Servers (each on a fresh sparse raw image, exported on a unix socket: qemu 7.2's NBD
client does not set TCP_NODELAY, which caps small writes over TCP at ~400 IOPS for
*any* server, so TCP would measure Nagle, not the servers):

* ``qemu_nbd``          — ``qemu-nbd -f raw -t`` serving a plain file (the reference);
* ``ours_replicated``   — our primary export, forwarding every write over ZeroMQ
  tcp://127.0.0.1 to our secondary stage (another process) and answering after its ack;
* ``ours_replicated_nosync`` — the same with ``durable_commit = false``: the secondary
  commits without fsyncs (survives a killed process, not a power loss of its host);
* ``ours_unreplicated`` — our primary export with forwarding off;
* ``nbdkit_python``     — (if installed) nbdkit's Python plugin doing pread/pwrite on a
  file: the alternative to our own server, measured for the record.

During the replicated run a thread plays the coordinators: every ``--checkpoint-ms``
(default 100) it ends the epoch at the primary, waits for its writes to reach the
secondary and commits it there — so the secondary applies writes into its image while
the writes go on, as in COLO. Commit times, and a whole-image hash comparison of
primary and secondary after the last commit, are reported as well.

Initial sync (``sync_*`` figures): an image half allocated (1 GiB, quick 128 MiB: data
in 2 MiB of every 4, the rest holes) is copied to an empty secondary by our initial
sync while ``qemu-img bench`` writes 4 KiB blocks to the primary export meanwhile,
against ``nbdcopy`` of the same image between two ``qemu-nbd`` (the reference: it skips
the holes by block status too). Our figure is the sync's own time (every extent acked,
the ``sync_ms`` counter); the images are compared after the first checkpoint.

Incremental resync (``sync_incremental_*``): then the primary's image changes in one MiB of
64 and the pair starts again: the secondary's image has the same generation, so only the
changed MiBs are sent; its time against the full sync's of the same run, images compared.

Beside each throughput, the CPU time the server's processes used per MiB written
(``*_cpu_ms_per_MiB``; ours replicated: both stages; the client's is not counted) and
its ratio against qemu-nbd's (``*_cpu_ratio_*``: qemu-nbd's CPU per MiB over ours). On a
shared machine the throughput ratios follow the other jobs' load; the CPU a server
spends per MiB moves much less with it.

How a ratio is made to mean something on a shared machine: every server runs at once (each
on its own image in the same directory), each image is written whole once before
anything is measured (a fresh sparse file's first writes allocate blocks: the trial
that pays for that is slower), and ``--repeats`` trials (default 5) run every server
once each, in an order reversed every other trial, each run between two runs of
qemu-nbd seconds before and after it: its ratio is to their mean rate. Before each run
the machine's dirty pages are written back (``os.sync``), so no run pays for an
earlier one's writeback. Each figure is the median over the trials, each ratio the
median of the trials' own ratios (``*_range``: the lowest and highest). The initial
sync's trials run ours between two ``nbdcopy`` runs, from the same source image
(in the page cache for both). Why: before this, one run per server back to back (the
best of two kept) put qemu-nbd's own 1 MiB rate anywhere in 399-1126 MB/s and the sync
ratio in 0.53-1.17. Three causes, measured on qemu-nbd alone (1 MiB writes, load ~11,
medians of 3 runs, twice): a fresh sparse image 279 and 310 MB/s, the same once written
whole 353 and 453, written whole and the dirty pages written back before the run 552 and
531 (the previous runs' hundreds of MiB of dirty pages are written back by the kernel
during whichever run comes next); and the machine's load, which moves within seconds
(one run's trials still range 2x on a loaded machine: hence the medians, and the CPU
per MiB, which moves least).

Usage: ``python3 scripts/bench_disk.py [--quick] [--repeats N] [--dir DIR] [--no-sync]
[--cold] [--servers a,b] [--json]``; ``--json`` prints one JSON object with every figure as the last line.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import blake3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.disk.settings import DiskSettings
from pipeline.signals import die_with_parent
from pipeline.stages.disk import DiskControl, PrimaryDisk, start_disk_pair

STRIDE_BLOCKS = 7919


def process_cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds the processes ``pids`` used so far (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process's CPU seconds (the in-process server; the bench's own thread only
    waits for qemu-img meanwhile)."""
    t = os.times()
    return t.user + t.system


def qemu_img_bench(uri: str, size: int, count: int, depth: int, step: int | None) -> float:
    """Seconds qemu-img bench needed for ``count`` writes of ``size`` bytes."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-w", "-s", str(size), "-c", str(count),
           "-d", str(depth)]
    if step is not None:
        cmd += ["-S", str(step)]
    r = subprocess.run(cmd + [uri], capture_output=True, text=True, timeout=900)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} {uri} failed: {r.stdout}{r.stderr}")
    return float(m.group(1))


@contextlib.contextmanager
def qemu_nbd(workdir: str, image_size: int, checkpoint_ms: int):
    img, sock = os.path.join(workdir, "qemu-nbd.img"), os.path.join(workdir, "qemu-nbd.sock")
    with open(img, "wb") as f:
        f.truncate(image_size)
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-k", sock, img],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-nbd did not start: {p.stderr.read().decode()}")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}", {"_cpu": functools.partial(process_cpu_seconds,
                                                                        p.pid)}
    finally:
        p.terminate()
        p.wait(timeout=10)


class Checkpointer(threading.Thread):
    """Plays the coordinators' part in the disk's checkpoint protocol every ``interval``
    seconds while :attr:`active` is set: end epoch e at the primary, wait until its writes
    reached the secondary, commit e there (applying the buffered writes into the
    secondary's image). Idle while another server is measured (a durable commit of
    nothing still fsyncs the journal: disk traffic under the other server's trial)."""

    def __init__(self, rundir: str, interval: float) -> None:
        super().__init__(name="bench-checkpointer", daemon=True)
        self.rundir, self.interval = rundir, interval
        self.epoch = 1
        self.commit_seconds: list[float] = []
        self.stopping = threading.Event()
        self.active = threading.Event()
        self._lock = threading.Lock()    # one checkpoint at a time (the timer, settle)
        self._controls: tuple[DiskControl, DiskControl] | None = None

    def _control(self) -> tuple[DiskControl, DiskControl]:
        if self._controls is None:
            self._controls = (DiskControl(self.rundir, "primary"),
                              DiskControl(self.rundir, "secondary"))
        return self._controls

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            if self.active.is_set():
                with self._lock:
                    self.checkpoint(*self._control())

    def checkpoint(self, primary: DiskControl, secondary: DiskControl) -> None:
        e = self.epoch
        primary.set_epoch(e + 1)
        if not primary.wait_forwarded(e, 60_000):
            raise RuntimeError(f"writes of epoch {e} did not reach the secondary")
        t0 = time.perf_counter()
        secondary.commit(e)
        self.commit_seconds.append(time.perf_counter() - t0)
        self.epoch = e + 1

    def settle(self) -> None:
        """Stop the timer and commit everything written so far (between trials: the next
        trial starts with nothing buffered, as every trial does)."""
        self.active.clear()
        with self._lock:
            self.checkpoint(*self._control())

    def finish(self) -> None:
        """Stop the timer and commit everything written so far, for good."""
        self.settle()
        self.stopping.set()
        self.join()
        for ctl in self._controls or ():
            ctl.close()


@contextlib.contextmanager
def ours_replicated(workdir: str, image_size: int, checkpoint_ms: int, durable: bool = True):
    d = os.path.join(workdir, "pair")
    pair = start_disk_pair(d, image_size, compare="off", durable_commit=durable,
                           primary_export=f"unix:{d}-primary.sock",
                           secondary_export=f"unix:{d}-secondary.sock")
    extra: dict = {"_cpu": functools.partial(process_cpu_seconds,
                                             *(x.pid for x in pair.processes))}
    checkpointer = Checkpointer(pair.rundir, checkpoint_ms / 1e3 if checkpoint_ms else 1e9)
    checkpointer.start()
    extra["_begin"], extra["_end"] = checkpointer.active.set, checkpointer.settle
    try:
        yield pair.primary_uri, extra
        checkpointer.finish()
        stats = pair.primary.stats()["counters"]
        extra["forward_latency_avg_us"] = stats["forward_latency_ns"] / max(1, stats["forwarded"]) / 1e3
        extra["checkpoints"] = len(checkpointer.commit_seconds)   # (settles included)
        extra["commit_avg_ms"] = 1e3 * sum(checkpointer.commit_seconds) / len(checkpointer.commit_seconds)
        extra["commit_max_ms"] = 1e3 * max(checkpointer.commit_seconds)
        hashes = []
        for name in ("primary.img", "secondary.img"):
            with open(os.path.join(d, name), "rb") as f:
                hashes.append(blake3.blake3(f.read()).hexdigest())
        extra["images_identical_after_commit"] = hashes[0] == hashes[1]
    finally:
        checkpointer.stopping.set()
        pair.stop()


@contextlib.contextmanager
def ours_unreplicated(workdir: str, image_size: int, checkpoint_ms: int):
    s = DiskSettings(image=os.path.join(workdir, "plain.img"), export_size=image_size,
                     export=f"unix:{workdir}/plain.sock")
    disk = PrimaryDisk(s, forward=False)
    try:
        yield disk.uri, {"_cpu": own_cpu_seconds}
    finally:
        disk.close()


#: the nbdkit Python plugin we measured against before writing our own server: the
#: same job as ours_unreplicated (pread/pwrite on a file), in nbdkit's embedded Python
NBDKIT_PLUGIN = """
import os
import nbdkit
API_VERSION = 2
path = None
def config(key, value):
    global path
    if key == "file":
        path = value
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def open(readonly):
    return os.open(path, os.O_RDWR)
def get_size(h):
    return os.fstat(h).st_size
def pread(h, buf, offset, flags):
    buf[:] = os.pread(h, len(buf), offset)
def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)
def flush(h, flags):
    os.fdatasync(h)
def close(h):
    os.close(h)
"""


def nbdkit_python_available() -> bool:
    return shutil.which("nbdkit") is not None and subprocess.run(
        ["nbdkit", "python", "--version"], capture_output=True).returncode == 0


@contextlib.contextmanager
def nbdkit_python(workdir: str, image_size: int, checkpoint_ms: int):
    img, sock = os.path.join(workdir, "nbdkit.img"), os.path.join(workdir, "nbdkit.sock")
    plugin = os.path.join(workdir, "plugin.py")
    with open(plugin, "w") as f:
        f.write(NBDKIT_PLUGIN)
    with open(img, "wb") as f:
        f.truncate(image_size)
    p = subprocess.Popen(["nbdkit", "-f", "-U", sock, "python", plugin, f"file={img}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start: {p.stderr.read().decode()}")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}", {"_cpu": functools.partial(process_cpu_seconds,
                                                                        p.pid)}
    finally:
        p.terminate()
        p.wait(timeout=10)


def half_allocated_image(path: str, size: int) -> int:
    """Data (incompressible) in 2 MiB of every 4, holes between; the allocated bytes."""
    run = 2 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * run):
            f.seek(off)
            f.write(os.urandom(run))
    return size // 2


def nbdcopy_between_qemu_nbds(workdir: str, src: str, size: int) -> float:
    """Seconds nbdcopy needs to copy ``src`` from one qemu-nbd to another (empty) one."""
    workdir = tempfile.mkdtemp(prefix="nbdcopy-", dir=workdir)   # its own sockets
    dst = os.path.join(workdir, "nbdcopy-dst.img")
    with open(dst, "wb") as f:
        f.truncate(size)
    socks = [os.path.join(workdir, n) for n in ("src.sock", "dst.sock")]
    procs = [subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-k", sock, img],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=die_with_parent)
             for sock, img in zip(socks, (src, dst))]
    try:
        deadline = time.monotonic() + 10
        while not all(os.path.exists(x) for x in socks):
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)
        uris = [f"nbd+unix:///?socket={x}" for x in socks]
        t0 = time.perf_counter()
        r = subprocess.run(["nbdcopy", uris[0], uris[1]], capture_output=True, text=True,
                           timeout=900)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"nbdcopy failed: {r.stderr}")
        return secs
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def our_initial_sync(workdir: str, src: str, size: int) -> tuple[float, bool, int]:
    """(seconds of our initial sync with a guest writing meanwhile, images equal at the
    first checkpoint, sync bytes)."""
    d = os.path.join(workdir, "sync-pair")
    os.makedirs(d)
    subprocess.run(["cp", "--sparse=always", src, os.path.join(d, "primary.img")],
                   check=True)
    settle()     # the copy's dirty pages: written back now, not during the sync
    pair = start_disk_pair(d, size, compare="off", durable_commit=False,
                           primary_export=f"unix:{d}-primary.sock",
                           secondary_export=f"unix:{d}-secondary.sock")
    try:
        writer = subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-w", "-s", "4096",
                                   "-c", "20000", "-d", "4", "-S", str(4096 * STRIDE_BLOCKS),
                                   pair.primary_uri], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        deadline = time.monotonic() + 900
        while not (c := pair.primary.stats()["counters"])["sync_ms"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the initial sync did not finish")
            time.sleep(0.05)
        if writer.wait(timeout=900) != 0:
            raise RuntimeError(f"the guest writer failed: {writer.stderr.read().decode()}")
        pair.primary.set_epoch(2)
        pair.primary.wait_forwarded(1, 60_000)
        pair.secondary.commit(1)
        hashes = []
        for name in ("primary.img", "secondary.img"):
            with open(os.path.join(d, name), "rb") as f:
                hashes.append(blake3.blake3(f.read()).hexdigest())
        return c["sync_ms"] / 1e3, hashes[0] == hashes[1], c["sync_bytes"]
    finally:
        pair.stop()


def our_incremental_resync(workdir: str, size: int) -> tuple[float, bool, int, int]:
    """After :func:`our_initial_sync` in ``workdir``: the primary's image changes in one
    MiB of every 64 (its host went on alone, as a survivor does), the pair starts again,
    and the secondary, holding an image of the same generation, gets an incremental
    sync (every MiB compared by blake3, holes without reading them; only what differs
    sent). (seconds, images equal at the first checkpoint, bytes sent, MiB changed)."""
    d = os.path.join(workdir, "sync-pair")
    changed = 0
    with open(os.path.join(d, "primary.img"), "r+b") as f:
        for mib in range(0, size >> 20, 64):
            f.seek((mib << 20) + 8192)
            f.write(os.urandom(4096))
            changed += 1
    pair = start_disk_pair(d, size, compare="off", durable_commit=False,
                           primary_export=f"unix:{d}-primary2.sock",
                           secondary_export=f"unix:{d}-secondary2.sock")
    try:
        deadline = time.monotonic() + 900
        while not (c := pair.primary.stats()["counters"])["sync_ms"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the incremental sync did not finish")
            time.sleep(0.02)
        if not c["sync_incremental"]:
            raise RuntimeError("the resync was not incremental")
        pair.primary.set_epoch(2)
        pair.secondary.commit(1)
        hashes = []
        for name in ("primary.img", "secondary.img"):
            with open(os.path.join(d, name), "rb") as f:
                hashes.append(blake3.blake3(f.read()).hexdigest())
        return c["sync_ms"] / 1e3, hashes[0] == hashes[1], c["sync_bytes"], changed
    finally:
        pair.stop()


SERVERS = {"qemu_nbd": qemu_nbd, "ours_replicated": ours_replicated,
           "ours_replicated_nosync": functools.partial(ours_replicated, durable=False),
           "ours_unreplicated": ours_unreplicated}
if nbdkit_python_available():
    SERVERS["nbdkit_python"] = nbdkit_python


def settle(*uncache: str) -> None:
    """Write every dirty page of the machine back before a measured run: a run must not
    pay for an earlier one's writeback (the kernel starts it when dirty pages pass
    dirty_background_ratio or age past dirty_expire_centisecs, which a few runs of
    hundreds of MiB reach). With ``uncache`` directories (``--cold``: the servers'
    images, logs) drop the page cache of every file under them too: each run starts
    with its image's blocks allocated and none of them cached. Why it matters: a cached
    page is in the folio the write that cached it made; since ext4 has large folios
    (Linux 6.16; 6.18 here) a 4 KiB write into a 1 MiB folio costs 2-3x one into a page
    of its own (qemu-nbd's CPU per 4 KiB write after 1 MiB writes: 27-50 us, on an
    uncached image 14-20; perf of our pair: 20 % of a 4 KiB run in
    ext4_block_write_begin). By default every image is cached whole in 1 MiB folios
    (the warm-up and each trial's 1 MiB run write all of it before the 4 KiB run), the
    same for every server. Data a run reads and that is not under ``uncache`` (the
    sync's source image) stays cached: both sides find it there."""
    os.sync()
    for top in uncache:
        for d, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(d, name)
                if not os.path.isfile(path):
                    continue       # (sockets)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue       # (gone meanwhile)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="alternating trials: every server (and nbdcopy/our sync) once per "
                         "trial, the order reversed every other trial; each figure is the "
                         "median over the trials, each ratio the median of the trials' "
                         "ratios (default 5, quick 2)")
    ap.add_argument("--checkpoint-ms", type=int, default=100,
                    help="replicated run: commit an epoch this often during the writes "
                         "(0: once at the end)")
    ap.add_argument("--dir", default=None,
                    help="where the images go (default: the system's temporary directory; "
                         "a tmpfs such as /dev/shm takes the disk out of the figures)")
    ap.add_argument("--no-sync", action="store_true",
                    help="skip the initial-sync figures (the throughput figures only)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the servers' files from the page cache before each run (each "
                         "run starts with its image allocated, none of it cached; by default "
                         "the image is cached as the warm-up's and the earlier runs' 1 MiB "
                         "writes left it, in large folios: see settle())")
    ap.add_argument("--servers", default=None,
                    help="comma-separated servers to run (default all; qemu_nbd always: "
                         f"the reference): {', '.join(SERVERS)}")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    # a SIGTERM ends the run as Ctrl-C does: the servers stop and the images go (before,
    # a benchmark stopped by SIGTERM left its disk pair and qemu-nbd serving, session 13)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.servers:
        wanted = {"qemu_nbd", *args.servers.split(",")}
        unknown = wanted - set(SERVERS)
        if unknown:
            sys.exit(f"bench_disk: unknown servers {sorted(unknown)}; known: {list(SERVERS)}")
        for name in [x for x in SERVERS if x not in wanted]:
            del SERVERS[name]
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_disk: {tool} is not installed (Debian package qemu-utils)")
    trials = args.repeats or (2 if args.quick else 5)
    image_size = (64 if args.quick else 256) << 20
    workloads = {
        "seq_1m": dict(size=1 << 20, count=64 if args.quick else 512, depth=8, step=None),
        "rand_4k": dict(size=4096, count=2000 if args.quick else 20000, depth=16,
                        step=4096 * STRIDE_BLOCKS),
    }
    secs: dict[str, dict[str, list[float]]] = {w: {s: [] for s in SERVERS} for w in workloads}
    cpus: dict[str, dict[str, list[float]]] = {w: {s: [] for s in SERVERS} for w in workloads}
    extras: dict[str, dict] = {}
    ratios: dict[str, dict[str, list[float]]] = {w: {s: [] for s in SERVERS} for w in workloads}
    cpu_ratios: dict[str, dict[str, list[float]]] = {w: {s: [] for s in SERVERS}
                                                     for w in workloads}
    with contextlib.ExitStack() as stack:
        # every server up at once, each on its own image in the same place, so that the
        # trials can alternate between them within seconds: a change of the machine's
        # load hits qemu-nbd's run and ours alike
        running = {}
        workdirs = []
        for server, start in SERVERS.items():
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-disk-",
                                                                  dir=args.dir))
            workdirs.append(tmp)
            uri, extra = stack.enter_context(start(tmp, image_size, args.checkpoint_ms))
            extras[server] = extra
            running[server] = (uri, extra.pop("_cpu"), extra.pop("_begin", None),
                               extra.pop("_end", None))
        # warm-up, not measured: each image written whole once, so that every trial
        # overwrites allocated blocks (a fresh sparse file's first writes allocate them;
        # the first trial would pay for that and the others not)
        for server, (uri, _cpu, begin, end) in running.items():
            if begin:
                begin()
            qemu_img_bench(uri, 1 << 20, image_size >> 20, 8, None)
            if end:
                end()
        def run(server: str, w: str, p: dict) -> float:
            uri, cpu_seconds, begin, end = running[server]
            settle(*(workdirs if args.cold else ()))
            if begin:
                begin()
            c0 = cpu_seconds()
            t = qemu_img_bench(uri, **p)
            cpus[w][server].append((cpu_seconds() - c0) / (p["size"] * p["count"] / 2**20))
            if end:
                end()
            secs[w][server].append(t)
            return t

        others = [x for x in running if x != "qemu_nbd"]
        for trial in range(trials):
            order = others if trial % 2 == 0 else list(reversed(others))
            for w, p in workloads.items():
                # each server's run between two runs of qemu-nbd, seconds before and after
                # it: its ratio is to their mean rate (the machine's load moves within
                # seconds; a reference runs further away measured another machine)
                before = run("qemu_nbd", w, p)
                for server in order:
                    t = run(server, w, p)
                    after = run("qemu_nbd", w, p)
                    ratios[w][server].append((1 / t) / ((1 / before + 1 / after) / 2))
                    cpu_ratios[w][server].append(
                        statistics.mean(cpus[w]["qemu_nbd"][-2:]) / max(1e-9,
                                                                       cpus[w][server][-1]))
                    before = after
    result: dict[str, object] = {"image_MiB": image_size >> 20, "repeats": trials,
                                 "checkpoint_ms": args.checkpoint_ms, "cold": args.cold,
                                 "dir": args.dir or tempfile.gettempdir()}
    if shutil.which("nbdcopy") is not None and not args.no_sync:
        sync_size = (128 if args.quick else 1024) << 20
        refs, ours_s, incs, ratios_sync = [], [], [], []
        equal, sync_bytes = True, 0
        with tempfile.TemporaryDirectory(prefix="bench-disk-sync-", dir=args.dir) as tmp:
            src = os.path.join(tmp, "half.img")
            half_allocated_image(src, sync_size)
            for trial in range(trials):
                work = os.path.join(tmp, f"trial-{trial}")
                os.makedirs(work)
                # ours between two nbdcopy runs (each into a fresh image), its ratio to
                # their mean rate; the source stays in the page cache for all three
                settle()
                before = nbdcopy_between_qemu_nbds(work, src, sync_size)
                ours, same, sync_bytes = our_initial_sync(work, src, sync_size)
                equal = equal and same
                settle()
                after = nbdcopy_between_qemu_nbds(work, src, sync_size)
                settle()
                inc, same, inc_bytes, changed = our_incremental_resync(work, sync_size)
                equal = equal and same
                refs += [before, after]
                ours_s.append(ours)
                incs.append(inc)
                ratios_sync.append((1 / ours) / ((1 / before + 1 / after) / 2))
                shutil.rmtree(work)
        result.update(sync_image_MiB=sync_size >> 20, sync_allocated_MiB=sync_size >> 21,
                      sync_nbdcopy_s=round(median(refs), 3), sync_ours_s=round(median(ours_s), 3),
                      sync_bytes=sync_bytes, sync_images_equal=equal,
                      sync_ratio_ours_vs_nbdcopy=round(median(ratios_sync), 3),
                      sync_ratio_range=[round(min(ratios_sync), 3),
                                        round(max(ratios_sync), 3)],
                      sync_nbdcopy_s_range=[round(min(refs), 3), round(max(refs), 3)],
                      sync_incremental_s=round(median(incs), 3),
                      sync_incremental_changed_MiB=changed,
                      sync_incremental_sent_MiB=round(inc_bytes / 2**20, 1),
                      sync_incremental_ratio_vs_full=round(
                          median([o / i for o, i in zip(ours_s, incs)]), 3))
    rows = []
    for w, p in workloads.items():
        for server in SERVERS:
            t = median(secs[w][server])
            mbps = p["size"] * p["count"] / t / 1e6
            result[f"{w}_{server}_MBps"] = round(mbps, 1)
            result[f"{w}_{server}_IOPS"] = round(p["count"] / t, 1)
            result[f"{w}_{server}_cpu_ms_per_MiB"] = round(median(cpus[w][server]) * 1e3, 3)
            rates = [p["size"] * p["count"] / x / 1e6 for x in secs[w][server]]
            result[f"{w}_{server}_MBps_range"] = [round(min(rates), 1), round(max(rates), 1)]
        for server in [x for x in SERVERS if x != "qemu_nbd"]:
            r = ratios[w][server]     # per trial: to the qemu-nbd runs around this one
            result[f"{w}_ratio_{server}_vs_qemu_nbd"] = round(median(r), 3)
            result[f"{w}_ratio_{server}_vs_qemu_nbd_range"] = [round(min(r), 3),
                                                               round(max(r), 3)]
            result[f"{w}_cpu_ratio_{server}_vs_qemu_nbd"] = round(
                median(cpu_ratios[w][server]), 3)
        rows.append(w)
    for server, extra in sorted(extras.items()):
        for k, v in extra.items():
            result[f"{server}_{k}"] = round(v, 3) if isinstance(v, float) else v
    print(f"{trials} alternating trials, medians (ratio range over the trials); images in "
          f"{result['dir']}")
    print(f"{'workload':10} {'server':22} {'MB/s':>9} {'IOPS':>9} {'vs qemu-nbd':>12} "
          f"{'(range)':>13} {'CPU ms/MiB':>11} {'CPU vs qemu-nbd':>16}")
    for w in rows:
        for server in SERVERS:
            if server == "qemu_nbd":
                lo, hi = result[f"{w}_{server}_MBps_range"]
                ratio, rng, cpu_ratio = "1.000 (ref)", f"{lo:.0f}-{hi:.0f}MB/s", "1.000 (ref)"
            else:
                lo, hi = result[f"{w}_ratio_{server}_vs_qemu_nbd_range"]
                ratio, rng, cpu_ratio = (f"{result[f'{w}_ratio_{server}_vs_qemu_nbd']:.3f}",
                                         f"{lo:.2f}-{hi:.2f}",
                                         f"{result[f'{w}_cpu_ratio_{server}_vs_qemu_nbd']:.3f}")
            print(f"{w:10} {server:22} {result[f'{w}_{server}_MBps']:9.1f} "
                  f"{result[f'{w}_{server}_IOPS']:9.1f} {ratio:>12} {rng:>13} "
                  f"{result[f'{w}_{server}_cpu_ms_per_MiB']:11.2f} {cpu_ratio:>16}")
    for k, v in result.items():
        if k.startswith(("ours_replicated", "sync_")) and not k.startswith(tuple(workloads)):
            print(f"{k}: {v}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
