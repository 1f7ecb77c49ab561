"""Primary and secondary disk stages as real processes, driven by real NBD clients
(qemu-io, qemu-img), linked by real ZeroMQ over tcp://127.0.0.1, checkpointed through
a real CheckpointBus."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import blake3
import pytest
import zmq

from conftest import free_port

from pipeline.checkpoint_api import CheckpointBus
from pipeline.disk import nbd_protocol as P
from pipeline.disk import wire
from pipeline.disk.nbd_client import NbdClient
from pipeline.disk.comparator import DiskComparator
from pipeline.disk.counters import DiskCounters
from pipeline.disk import primary as primary_module
from pipeline.disk.primary import InitialSync
from pipeline.disk.progress import SYNC_FAILED
from pipeline.disk.settings import DiskSettings
from pipeline.disk.store import SecondaryStore, StoreError
from pipeline.stages.disk import (DiskControlError, PrimaryDisk, SecondaryDisk,
                                  start_disk_pair)

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None or shutil.which("qemu-img") is None,
                                reason="qemu-io/qemu-img (Debian qemu-utils) are not installed")

SIZE = 8 << 20
BS = 4096


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return blake3.blake3(f.read()).hexdigest()


def export_hash(uri: str, tmp: str) -> str:
    """Read a whole export through a real NBD client and hash it."""
    out = os.path.join(tmp, "read-back.raw")
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    h = file_hash(out)
    os.unlink(out)
    return h


def qemu_io(uri: str, commands: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run(args + [uri], capture_output=True, text=True, timeout=timeout)


def random_workload(rng: random.Random, n: int) -> list[str]:
    """Writes of random size and place (512-byte granular: qemu read-modify-writes the
    4 KiB blocks), some zeroing and discards, and a flush."""
    cmds = []
    for _ in range(n):
        length = rng.choice([512, 4096, 12288, 65536, 300 * 512])
        off = rng.randrange(0, (SIZE - length) // 512) * 512
        kind = rng.random()
        if kind < 0.1:
            cmds.append(f"write -z {off // BS * BS} {BS * 4}")
        elif kind < 0.15:
            cmds.append(f"discard {off // BS * BS} {BS * 2}")
        else:
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {length}")
    return cmds + ["flush"]


def wait_for(pred, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def publish_until(bus: CheckpointBus, check, event: str, epoch: int, **extra) -> None:
    """Publish until the stage shows it heard it (a new SUB misses what came before it joined)."""
    def attempt():
        bus.publish(event, epoch, **extra)
        return check()
    wait_for(attempt, what=f"{event} {epoch} to be seen")


@pytest.fixture
def rundir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return str(d)


def test_secondary_image_is_the_primary_at_each_checkpoint(tmp_path, rundir):
    rng = random.Random(7)
    bus = CheckpointBus(rundir)
    work = str(tmp_path / "disks")
    try:
        with start_disk_pair(work, SIZE, rundir=rundir, compare="off") as pair:
            pimg, simg = os.path.join(work, "primary.img"), os.path.join(work, "secondary.img")
            # epoch 1: the PVM and the SVM both write
            r = qemu_io(pair.primary_uri, random_workload(rng, 60))
            assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
            r = qemu_io(pair.secondary_uri, ["write -P 0xee 100k 40k", "write -P 0xdd 7M 64k"])
            assert r.returncode == 0, r.stderr
            assert pair.primary.wait_forwarded(1, 10_000)
            h1 = file_hash(pimg)
            publish_until(bus, lambda: pair.primary.stats()["counters"]["epoch"] == 2,
                          "snapshot", 1)
            # epoch 2: the PVM goes on; the SVM still reads its own writes
            r = qemu_io(pair.primary_uri, random_workload(rng, 40))
            assert r.returncode == 0, r.stderr
            r = qemu_io(pair.secondary_uri, ["read -P 0xee 100k 40k", "read -P 0xdd 7M 64k"])
            assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
            pair.secondary.commit(1)
            assert file_hash(simg) == h1  # exactly the primary at checkpoint 1...
            assert file_hash(pimg) != h1  # ...which is not the primary now
            assert export_hash(pair.secondary_uri, str(tmp_path)) == h1  # overlay dropped
            assert pair.primary.wait_forwarded(2, 10_000)
            h2 = file_hash(pimg)
            publish_until(bus, lambda: pair.primary.stats()["counters"]["epoch"] == 3,
                          "snapshot", 2)
            pair.secondary.commit(2)
            assert file_hash(simg) == h2
            stats = pair.secondary.stats()["counters"]
            assert stats["commits"] == 2 and stats["bad_forwards"] == 0
            assert stats["received"] == pair.primary.stats()["counters"]["forwarded"] >= 100
            # failover: the SVM's own writes since the checkpoint become the disk
            r = qemu_io(pair.secondary_uri, ["write -P 0x42 2M 8k"])
            assert r.returncode == 0, r.stderr
            publish_until(bus, lambda: pair.secondary.stats()["counters"]["failovers"] == 1,
                          "role", 2, role="active")
            with open(simg, "rb") as f:
                f.seek(2 << 20)
                assert f.read(8192) == b"\x42" * 8192
            r = qemu_io(pair.secondary_uri, ["write -P 0x43 3M 4k", "read -P 0x43 3M 4k"])
            assert r.returncode == 0 and "Pattern verification failed" not in r.stdout
    finally:
        bus.close()


def test_bad_forwarded_writes_are_refused_counted_and_not_applied(tmp_path, rundir):
    """Every malformed forwarded write is refused with its errno and a reason naming what is
    wrong, counted, and nothing of it applied. The primary's image has the real write and
    ours never will: the secondary gives the replication up (no commit from the next epoch
    on; it ends stale) rather than commit an epoch without it. Writes after that are
    acked as given up and not buffered."""
    work = str(tmp_path / "disks")
    ctx = zmq.Context.instance()
    # no initial sync: this test is the only sender of seqs
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off", initial_sync=False) as pair:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(pair.forward)
        try:
            good = b"G" * BS

            def send(frames):
                dealer.send_multipart(frames)
                assert dealer.poll(10_000)
                (entry,) = wire.decode_ack(dealer.recv_multipart())
                return entry

            def tamper(frames, **fields):
                h = list(wire.FORWARD_HEADER.unpack(frames[0]))
                for i, name in enumerate(("magic", "kind", "epoch", "seq", "offset", "length",
                                          "digest")):
                    h[i] = fields.get(name, h[i])
                return [wire.FORWARD_HEADER.pack(*h)] + frames[1:]

            msg = wire.encode_forward(wire.KIND_WRITE, 1, 1, 0, BS, good)
            cases = {
                "stale epoch": tamper(msg, epoch=0),
                "bad hash": tamper(msg, digest=b"\1" * 32),
                "beyond export": tamper(msg, offset=SIZE),
                "misaligned": tamper(msg, offset=100),
                "short data": [msg[0], good[:100]],
                "bad magic": tamper(msg, magic=b"XXXX"),
                "short header": [b"CDW1"],
            }
            for name, frames in cases.items():
                _seq, status, reason = send(frames)
                assert status != 0, name
                assert reason, name
            assert "epoch" in send(cases["stale epoch"])[2]
            assert "blake3" in send(cases["bad hash"])[2]
            seq, status, reason = send(msg)       # (the replication was given up already)
            assert (seq, status) == (1, 0) and reason.startswith("given up: "), reason
            # one message carrying several writes: each is judged on its own
            second = wire.encode_forward(wire.KIND_WRITE, 1, 2, BS, BS, b"H" * BS)
            bad = tamper(wire.encode_forward(wire.KIND_WRITE, 1, 3, 2 * BS, BS, b"I" * BS),
                         digest=b"\2" * 32)
            zero_with_data = [wire.encode_forward(wire.KIND_ZERO, 1, 4, 0, BS, None)[0], b"x"]
            dealer.send_multipart(second + bad + zero_with_data)
            assert dealer.poll(10_000)
            acks = wire.decode_ack(dealer.recv_multipart())
            assert [(seq, status != 0) for seq, status, _r in acks] == \
                [(2, False), (3, True), (4, True)]
            assert acks[0][2].startswith("given up: ")      # (given up: not buffered)
            dealer.send(wire.SEAL_MAGIC + bytes(8))  # a seal of the wrong size
            # epoch 1 ends at seq 4 (refused writes count as seen: they failed already)
            dealer.send(wire.encode_seal(1, 4))
        finally:
            dealer.close(0)
        # both seals handled (they have no answer): the commit does not wait, it refuses
        with pytest.raises(DiskControlError, match=r"GivenUp: commit\(1\): forwarded "
                                                   r"write seq 1 of epoch 1 could not be "
                                                   r"buffered \(refused: forwarded write"):
            pair.secondary.commit(1)
        counters = pair.secondary.stats()["counters"]
        assert counters["received"] == 0 and counters["given_up"] == 2
        assert counters["bad_forwards"] == len(cases) + 5
        with open(os.path.join(work, "secondary.img"), "rb") as f:
            assert f.read() == bytes(SIZE)       # nothing of any of them applied


def test_divergent_svm_write_requests_a_checkpoint(tmp_path, rundir):
    bus = CheckpointBus(rundir)
    work = str(tmp_path / "disks")
    try:
        with start_disk_pair(work, SIZE, rundir=rundir, compare="checkpoint") as pair:
            assert qemu_io(pair.primary_uri, ["write -P 1 0 64k", "write -P 2 1M 4k"]).returncode == 0
            assert qemu_io(pair.secondary_uri, ["write -P 1 0 64k"]).returncode == 0  # same
            assert bus.drain_requests() == []
            assert qemu_io(pair.secondary_uri, ["write -P 9 1M 4k"]).returncode == 0  # differs
            reqs = wait_for(bus.drain_requests, what="a checkpoint request")
            assert reqs[0][0] == "disk_divergence" and "1048576" in reqs[0][1]
            stats = pair.secondary.stats()["counters"]
            assert stats["divergences"] == 1 and stats["checkpoint_requests"] == 1
    finally:
        bus.close()


def test_an_svm_overlay_asks_for_a_checkpoint_at_half_and_past_its_bound_and_never_fails_a_write(
        tmp_path, rundir):
    """The SVM's overlay (64 KiB here) reaching half its bound asks for a checkpoint once
    (a commit empties it); a write past the bound is taken all the same (the SVM's guest
    would keep an ENOSPC if it took over before the checkpoint), counted, asks once
    more, and reads back."""
    bus = CheckpointBus(rundir)
    work = str(tmp_path / "disks")
    try:
        with start_disk_pair(work, SIZE, rundir=rundir, compare="off",
                             overlay_max_bytes=64 * 1024) as pair:
            assert qemu_io(pair.secondary_uri, ["write -P 1 0 16k"]).returncode == 0
            assert bus.drain_requests() == []                    # a quarter: no request
            assert qemu_io(pair.secondary_uri, ["write -P 2 64k 16k"]).returncode == 0
            reqs = wait_for(bus.drain_requests, what="a checkpoint request")
            assert [r[0] for r in reqs] == ["dirty_threshold"]
            assert "SVM overlay at 32768 of 65536 bytes" in reqs[0][1]
            assert qemu_io(pair.secondary_uri, ["write -P 3 128k 8k"]).returncode == 0
            assert pair.secondary.stats()["counters"]["checkpoint_requests"] == 1  # once
            r = qemu_io(pair.secondary_uri, ["write -P 4 256k 64k"])   # past the bound
            assert r.returncode == 0 and "error" not in r.stdout + r.stderr, \
                r.stdout + r.stderr
            reqs = wait_for(bus.drain_requests, what="the past-the-bound request")
            assert "SVM overlay (past its ceiling) at 106496 of 65536 bytes" in reqs[0][1]
            counters = pair.secondary.stats()["counters"]
            assert (counters["checkpoint_requests"], counters["overlay_over_bound"]) == (2, 1)
            r = qemu_io(pair.secondary_uri, ["read -P 4 256k 64k"])
            assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, \
                r.stdout + r.stderr
            assert qemu_io(pair.primary_uri, ["write -P 4 256k 64k"]).returncode == 0
    finally:
        bus.close()


def test_compare_off_counts_divergences_without_requesting():
    counters, requests = DiskCounters(), []
    cmp = DiskComparator("off", 100, counters, lambda *a: requests.append(a))
    cmp.record("pvm", 1, 0, BS, b"a" * 32, now_ns=0)
    assert cmp.record("svm", 1, 0, BS, b"b" * 32, now_ns=1)
    cmp.record("pvm", 1, BS, BS, b"a" * 32, now_ns=0)           # SVM never writes it
    assert cmp.check_timeouts(now_ns=50_000_000) == 0
    assert cmp.check_timeouts(now_ns=200_000_000) == 1
    cmp.record("svm", 2, 0, BS, b"c" * 32, now_ns=0)
    assert cmp.epoch_committed(2) == 1
    assert counters["divergences"] == 3 and requests == []


def test_a_stopped_secondary_holds_the_guests_writes_until_it_runs_again(tmp_path, rundir):
    """A stopped secondary holds the guest's writes (back-pressure: none is answered before
    the secondary has it) until it runs again; then every one is forwarded and acked.

    The forward timeout is far beyond the stopped window: with 4 s (as this test had until
    session 8) a loaded machine took longer than that to start qemu-img and fill the window,
    the first write timed out and was answered alone (forwarded 15, not 16), and the initial
    sync, still running when the secondary was stopped, gave up. The timeout's own
    behaviour is the next test's."""
    work = str(tmp_path / "disks")
    # no initial sync: the bench's writes are the only forwards
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off", forward_window=2,
                         forward_timeout_ms=300_000, initial_sync=False) as pair:
        secondary = pair.processes[1]
        os.kill(secondary.pid, signal.SIGSTOP)
        try:
            bench = subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-w", "-s", "4k",
                                      "-c", "16", "-d", "8", pair.primary_uri],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: pair.primary.stats()["counters"]["forward_stalls"] >= 1,
                         timeout=60, what="the forward window filling up")
                assert bench.poll() is None  # no write is answered before the secondary has it
                assert pair.primary.stats()["counters"]["forwarded"] == 0
            finally:
                os.kill(secondary.pid, signal.SIGCONT)
            assert bench.wait(timeout=60) == 0, bench.communicate()
            counters = pair.primary.stats()["counters"]
            assert (counters["forwarded"], counters["forward_errors"]) == (16, 0)
        finally:
            os.kill(secondary.pid, signal.SIGCONT)
            if bench.poll() is None:
                bench.kill()
                bench.wait()


def test_a_secondary_stopped_past_the_forward_timeout_never_fails_a_guest_write(tmp_path,
                                                                                  rundir):
    """One that stays stopped past the forward timeout does not fail the write (its guest's
    filesystem would go read-only): it is answered from the primary's image alone, counted
    (the secondary cannot commit its epoch without it); and once the coordinator
    unprotects, waiting writes complete at once and nothing is forwarded."""
    work = str(tmp_path / "disks")
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off", forward_window=2,
                         forward_timeout_ms=4000, initial_sync=False) as pair:
        secondary = pair.processes[1]
        try:
            os.kill(secondary.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            r = qemu_io(pair.primary_uri, ["write -P 3 0 4k", "read -P 3 0 4k"])
            assert time.monotonic() - t0 >= 3.5      # it waited for the ack that never came
            assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
            assert "Pattern verification failed" not in r.stdout
            assert pair.primary.stats()["counters"]["forward_errors"] >= 1
            # the coordinator declares the secondary lost: the waiting write completes
            writes = pair.primary.stats()["counters"]["writes"]
            writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 4 0 4k",
                                       pair.primary_uri], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            try:
                wait_for(lambda: pair.primary.stats()["counters"]["writes"] > writes,
                         timeout=60, what="the write reaching the primary")
                assert writer.poll() is None    # and waiting for the stopped secondary
                pair.primary.unprotect()
                out, _ = writer.communicate(timeout=10)
                assert writer.returncode == 0 and "error" not in out.lower(), out
            finally:
                if writer.poll() is None:
                    writer.kill()
                    writer.wait()
            before = pair.primary.stats()["counters"]
            r = qemu_io(pair.primary_uri, ["write -P 5 4k 4k", "read -P 4 0 4k"])
            assert r.returncode == 0 and "error" not in r.stdout.lower()
            assert "Pattern verification failed" not in r.stdout
            after = pair.primary.stats()["counters"]   # unprotected: nothing is forwarded
            assert (after["forwarded"], after["forward_errors"]) == \
                (before["forwarded"], before["forward_errors"])
            assert pair.primary.stats()["forwarding"] is False
        finally:
            os.kill(secondary.pid, signal.SIGCONT)


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="nbdcopy (Debian libnbd-bin) is not installed")
def test_nbdcopy_over_four_connections_replicates_exactly(tmp_path, rundir):
    """nbdcopy uses several connections at once (we advertise multi-conn) and large
    requests; every connection forwards on its own link, and the commit still matches."""
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 2))
    work = str(tmp_path / "disks")
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off") as pair:
        r = subprocess.run(["nbdcopy", "--connections=4", "--requests=8", str(src),
                            pair.primary_uri], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pair.primary.set_epoch(2)
        assert pair.primary.wait_forwarded(1, 10_000)
        pair.secondary.commit(1)
        want = file_hash(str(src))
        assert file_hash(os.path.join(work, "primary.img")) == want
        assert file_hash(os.path.join(work, "secondary.img")) == want
        assert export_hash(pair.secondary_uri, str(tmp_path)) == want


def test_a_stage_that_cannot_start_says_why(tmp_path):
    work = tmp_path / "disks"
    (work / "secondary.img").mkdir(parents=True)  # the image path is a directory
    with pytest.raises(RuntimeError, match=r"secondary stage failed to start: .*secondary\.img"):
        start_disk_pair(str(work), SIZE)


def test_a_disk_pair_ends_with_the_process_that_started_it(tmp_path):
    """A benchmark killed without a chance to clean up (SIGKILL) leaves no disk stage
    serving: each side dies with its starter (session 13: a bench_disk.py stopped by a
    signal left both stages and their images running for half an hour)."""
    import sys
    from pipeline.localpair import wait_until
    starter = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pipeline.stages.disk import start_disk_pair\n"
         f"pair = start_disk_pair({str(tmp_path / 'disks')!r}, {SIZE}, compare='off')\n"
         "print(*(p.pid for p in pair.processes), flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pids: list[int] = []
    try:
        pids = [int(x) for x in starter.stdout.readline().split()]
        assert len(pids) == 2, "the starter did not report its two disk stages"
        assert all(_alive(pid) for pid in pids)
        starter.kill()
        starter.wait()
        wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=60,
                   what="both disk stages gone after their starter was killed")
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        for pid in pids:        # a failed run leaves no stage behind either
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a dead stage stays a zombie of nobody's until
    init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- one write order, one epoch per write ------------------------------------------

def _in_process_pair(tmp_path, **settings):
    """Both stages in this process (so a test can hold a write at a named point)."""
    sec = SecondaryDisk(DiskSettings(image=str(tmp_path / "secondary.img"), export_size=SIZE,
                                     block_size=BS, export=f"unix:{tmp_path}/s.sock",
                                     forward="tcp://127.0.0.1:*", compare="off", **settings))
    pri = PrimaryDisk(DiskSettings(image=str(tmp_path / "primary.img"), export_size=SIZE,
                                   block_size=BS, export=f"unix:{tmp_path}/p.sock",
                                   forward=sec.forward_endpoint, compare="off", **settings))
    return pri, sec


def _commit_in_background(sec, epoch: int) -> tuple[threading.Thread, list[BaseException]]:
    """Commit `epoch` on the secondary from a thread, so a test can hold the commit at a
    named point and look at the state meanwhile; the errors list gets what it raised."""
    errors: list[BaseException] = []

    def commit():
        try:
            sec.commit(epoch)
        except BaseException as e:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(e)
    committer = threading.Thread(target=commit)
    committer.start()
    return committer, errors


def test_a_write_overtaken_by_a_checkpoint_stays_in_its_epoch_and_never_fails(tmp_path):
    """The race of issue 18, forced: a write takes its epoch (1), then — before its forward
    is even queued — the checkpoint's pause moves the epoch on and the secondary is told
    to commit epoch 1. The write must neither fail nor land in another epoch: the commit
    waits for it (the primary sealed epoch 1 at its seq), and the guest's write succeeds."""
    pri, sec = _in_process_pair(tmp_path, initial_sync=False)
    ordered, release = threading.Event(), threading.Event()
    held: list[tuple[int, int]] = []

    def hold_the_first_write(seq: int, epoch: int) -> None:  # the named point
        if not held:
            held.append((seq, epoch))
            ordered.set()
            assert release.wait(60)

    pri.backend.after_ordering = hold_the_first_write
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 64k", pri.uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    committer = None
    try:
        assert ordered.wait(30), "the write never reached the ordering point"
        assert held == [(1, 1)]
        pri.backend.set_epoch(2)                          # the checkpoint's pause
        assert not pri.backend.wait_forwarded(1, 0)       # counted in epoch 1 already
        committer, errors = _commit_in_background(sec, 1)
        wait_for(lambda: sec.receiver.sealed.waiting_for == 1,
                 what="the commit of epoch 1 to wait for its sealed write")
        assert sec.store.committed_epoch == 0
        release.set()
        committer.join(60)
        assert not committer.is_alive() and not errors, errors
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "error" not in out.lower(), out
        assert pri.backend.wait_forwarded(1, 60)
        assert sec.store.committed_epoch == 1
        assert file_hash(str(tmp_path / "secondary.img")) == \
            file_hash(str(tmp_path / "primary.img"))
        assert sec.counters["bad_forwards"] == 0 and pri.counters["forward_errors"] == 0
    finally:
        release.set()
        if committer is not None:
            committer.join(60)
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        pri.close()
        sec.close()


def test_the_secondary_applies_writes_in_the_primarys_order_not_their_arrival_order(
        tmp_path, rundir):
    """Two connections' overlapping writes arrive the other way round (seq 2 before seq
    1, on different sockets): the commit still ends with seq 2's data, as the primary."""
    work = str(tmp_path / "disks")
    ctx = zmq.Context.instance()
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off", initial_sync=False) as pair:
        links = [ctx.socket(zmq.DEALER) for _ in range(2)]
        try:
            for s in links:
                s.setsockopt(zmq.LINGER, 0)
                s.connect(pair.forward)
            first = wire.encode_forward(wire.KIND_WRITE, 1, 1, 0, 4 * BS, b"1" * 4 * BS)
            second = wire.encode_forward(wire.KIND_WRITE, 1, 2, BS, BS, b"2" * BS)
            third = wire.encode_forward(wire.KIND_ZERO, 2, 3, 3 * BS, BS, None)
            for link, msg in ((links[1], third), (links[1], second), (links[0], first)):
                link.send_multipart(msg)
                assert link.poll(10_000)
                assert all(st == 0 for _s, st, _r in wire.decode_ack(link.recv_multipart()))
            links[0].send(wire.encode_seal(2, 3))
            pair.secondary.commit(2)
        finally:
            for s in links:
                s.close(0)
        with open(os.path.join(work, "secondary.img"), "rb") as f:
            got = f.read(4 * BS)
        assert got == b"1" * BS + b"2" * BS + b"1" * BS + bytes(BS)


@pytest.mark.parametrize("compare", ["checkpoint", "off"])
def test_an_unhashed_write_is_hashed_by_the_secondary_and_survives_a_killed_stage(
        tmp_path, rundir, compare):
    """The primary forwards guest writes unhashed (wire.UNHASHED); with the comparator on
    the secondary hashes them itself: the comparator matches the SVM's same write, and the
    buffer record carries the real blake3 (a record with a wrong digest would end the
    log's scan there and be lost). With ``disk.compare = "off"`` nothing needs the digest:
    the record says UNHASHED (no blake3 of the write on the receiver). Either way a stage
    killed before the commit reopens with the write."""
    from pipeline.disk.store import LOG_HEADER, RECORD
    work = str(tmp_path / "disks")
    ctx = zmq.Context.instance()
    data = b"\x5a" * 2 * BS
    with start_disk_pair(work, SIZE, rundir=rundir, compare=compare,
                         initial_sync=False) as pair:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(pair.forward)
        try:
            dealer.send_multipart(wire.encode_forward(wire.KIND_WRITE, 1, 1, BS, 2 * BS, data,
                                                      digest=wire.UNHASHED))
            assert dealer.poll(10_000)
            assert wire.decode_ack(dealer.recv_multipart()) == [(1, 0, "")]
        finally:
            dealer.close(0)
        # acked once admitted; hashed and buffered right after the ack
        wait_for(lambda: pair.secondary.stats()["counters"]["received"] == 1,
                 what="the acked write to be buffered")
        # the SVM writes the same bytes: no divergence (the secondary's digest is right)
        assert qemu_io(pair.secondary_uri, [f"write -P 0x5a {BS} {2 * BS}"]).returncode == 0
        assert pair.secondary.stats()["counters"]["divergences"] == 0
        pair.processes[1].kill()
        pair.processes[1].join(10)
    state = os.path.join(work, "secondary.img.colo")
    with open(os.path.join(state, "buffer-1.log"), "rb") as f:
        record = RECORD.unpack(f.read(LOG_HEADER.size + RECORD.size)[LOG_HEADER.size:])
    assert record[-1] == (wire.digest_of(data) if compare == "checkpoint" else wire.UNHASHED)
    store = SecondaryStore(os.path.join(work, "secondary.img"), SIZE, BS, state,
                           1 << 30, 1 << 30)
    try:
        store.commit(1)
        assert store.image.pread(0, 4 * BS) == bytes(BS) + data + bytes(BS)
    finally:
        store.close()


def test_overlapping_writes_in_one_burst_of_one_connection_apply_in_order(tmp_path, rundir):
    """A connection writes its small forwarded writes into the primary's image after the
    burst's forwards are sent. Three overlapping writes sent in one packet form one
    burst: each later one must first write the connection's held-back copies (it would
    otherwise wait for itself), and both images end as the last writes left them."""
    work = str(tmp_path / "disks")
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off", initial_sync=False,
                         primary_export=f"unix:{tmp_path}/p.sock") as pair:
        c = NbdClient(pair.primary_uri, timeout=60)
        try:
            writes = [(1, 0, b"\1" * 2 * BS), (2, BS, b"\2" * 2 * BS), (3, 0, b"\3" * BS)]
            c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, cookie,
                                                   off, len(data)) + data
                                    for cookie, off, data in writes))
            assert sorted(c.reply()[:2] for _ in writes) == [(0, 1), (0, 2), (0, 3)]
        finally:
            c.close()
        pair.primary.set_epoch(2)
        assert pair.primary.wait_forwarded(1, 30_000)
        pair.secondary.commit(1)
        want = b"\3" * BS + b"\2" * 2 * BS + bytes(BS)
        for name in ("primary.img", "secondary.img"):
            with open(os.path.join(work, name), "rb") as f:
                assert f.read(4 * BS) == want, name


def test_a_client_gone_mid_burst_still_has_its_ordered_writes_forwarded(tmp_path):
    """A client sends a burst of writes and a request cut short, and closes: its
    connection ends with the burst's writes ordered (seqs taken, in the primary's image)
    but their forwards not sent. They must still reach the secondary: else the commit
    of their epoch waits for seqs that never come, and the secondary lacks blocks the
    primary has. The burst is one send on a unix socket (one read on the server); the
    first write is held at its ordering until the client has closed, so the cut-short
    request ends the very burst that ordered the writes."""
    pri, sec = _in_process_pair(tmp_path, initial_sync=False)
    ordered, closed = threading.Event(), threading.Event()

    def hold_until_closed(seq: int, epoch: int) -> None:  # the named point
        ordered.set()
        assert closed.wait(60)

    pri.backend.after_ordering = hold_until_closed
    c = NbdClient(pri.uri, timeout=60)
    try:
        writes = [(P.CMD_WRITE, 1, 0, b"\1" * 2 * BS), (P.CMD_WRITE, 2, BS, b"\2" * 2 * BS),
                  (P.CMD_WRITE_ZEROES, 3, 0, BS)]
        c.sock.sendall(b"".join(
            P.REQUEST.pack(P.REQUEST_MAGIC, 0, cmd, cookie, off,
                           arg if isinstance(arg, int) else len(arg))
            + (b"" if isinstance(arg, int) else arg) for cmd, cookie, off, arg in writes)
            # a fourth write: its header and half its data, then the client is gone
            + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 4, 4 * BS, BS) + b"\4" * 2048)
        assert ordered.wait(30), "the first write never reached the ordering point"
        c.sock.close()
        closed.set()
        wait_for(lambda: pri.counters["client_disconnects"] == 1, 30,
                 "the server to see the client gone mid-request")
        pri.backend.set_epoch(2)                      # the next checkpoint's pause
        assert pri.backend.last_seq == 3              # the cut-short write took no seq
        assert pri.backend.wait_forwarded(1, 60)
        sec.commit(1)                                 # every sealed seq arrived
        assert sec.store.committed_epoch == 1
        want = bytes(BS) + b"\2" * 2 * BS + bytes(2 * BS)
        for name in ("primary.img", "secondary.img"):
            with open(tmp_path / name, "rb") as f:
                assert f.read(5 * BS) == want, name
        assert file_hash(str(tmp_path / "secondary.img")) == \
            file_hash(str(tmp_path / "primary.img"))
        assert pri.counters["forward_errors"] == 0 and sec.counters["bad_forwards"] == 0
    finally:
        closed.set()
        c.sock.close()
        pri.close()
        sec.close()


def test_concurrent_overlapping_writes_on_several_connections_leave_equal_images(
        tmp_path, rundir):
    """Four qemu-io clients, each with its writes in flight at once (aio), hammer the same
    1 MiB while checkpoints commit epochs continuously: after every round the secondary's
    image is exactly the primary's."""
    rng = random.Random(18)
    work = str(tmp_path / "disks")
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off") as pair:
        stop, epoch, failures = threading.Event(), [1], []

        def checkpointer():
            try:
                while not stop.is_set():
                    checkpoint()
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                failures.append(e)

        def checkpoint():
            e = epoch[0]
            pair.primary.set_epoch(e + 1)
            pair.secondary.commit(e)
            epoch[0] = e + 1

        for round_ in range(4):
            clients = []
            for c in range(4):
                cmds = []
                for _ in range(60):
                    length = rng.choice([4096, 16384, 65536, 300 * 1024])
                    off = rng.randrange(0, (1 << 20) // BS) * BS
                    cmds += ["-c", f"aio_write -P {rng.randrange(1, 256)} {off} {length}"]
                clients.append(subprocess.Popen(
                    ["qemu-io", "-f", "raw"] + cmds + ["-c", "aio_flush", pair.primary_uri],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            stop.clear()
            t = threading.Thread(target=checkpointer)
            t.start()
            outs = [p.communicate(timeout=120)[0] for p in clients]
            stop.set()
            t.join(60)
            assert not failures, failures
            for p, out in zip(clients, outs):
                assert p.returncode == 0 and "error" not in out.lower(), out
            checkpoint()  # the last writes' epoch
            assert file_hash(os.path.join(work, "secondary.img")) == \
                file_hash(os.path.join(work, "primary.img")), f"round {round_}"
        stats = pair.secondary.stats()["counters"]
        assert stats["bad_forwards"] == 0 and stats["received"] == 4 * 4 * 60
        assert pair.primary.stats()["counters"]["forward_errors"] == 0


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo (libnbd-bin) is not installed")
def test_the_svm_export_maps_its_overlay_over_the_checkpoint_image(tmp_path, rundir):
    """Block status on the SVM's export: the committed image's extents, with the SVM's
    own writes since the checkpoint (the overlay) laid over them — data it wrote into a
    hole, a hole where it zeroed data."""
    work = str(tmp_path / "disks")
    with start_disk_pair(work, SIZE, rundir=rundir, compare="off") as pair:
        assert qemu_io(pair.primary_uri, ["write -P 1 0 64k", "write -P 2 1M 64k"]).returncode == 0
        pair.primary.set_epoch(2)
        pair.secondary.commit(1)
        r = qemu_io(pair.secondary_uri, ["write -P 3 2M 8k", "discard 1M 64k"])
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["nbdinfo", "--map", "--json", pair.secondary_uri],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        data = [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["type"] == 0]
        assert data == [(0, 64 * 1024), (2 << 20, 8192)]


# -- the initial sync ----------------------------------------------------------------

def _fill(path, extents: dict[int, bytes]) -> None:
    with open(path, "r+b" if os.path.exists(path) else "w+b") as f:
        f.truncate(SIZE)
        for off, data in extents.items():
            f.seek(off)
            f.write(data)


def test_the_initial_sync_fills_an_empty_secondary_while_the_guest_writes(tmp_path,
                                                                          monkeypatch):
    """The secondary starts with a stale image; the primary's allocated extents (data,
    an allocated all-zero MiB, holes between) are streamed while qemu-io writes into
    regions already sent, not yet sent and the chunk being sent. The sync is held at a
    named point (InitialSync.before_chunk, a test hook) so the writes land mid-sync every
    time. A checkpoint sealed before the sync's END leaves the image 'syncing' (and the
    commit says so); the first one after it makes the images equal."""
    MiB = 1 << 20
    _fill(tmp_path / "primary.img", {0: os.urandom(3 * MiB), 4 * MiB: bytes(MiB),
                                     6 * MiB: os.urandom(MiB)})
    _fill(tmp_path / "secondary.img", {0: os.urandom(SIZE)})   # stale: must go
    held, release = threading.Event(), threading.Event()

    def hold_at_the_third_chunk(offset: int) -> None:
        if offset == 2 * MiB:
            held.set()
            assert release.wait(60)

    monkeypatch.setattr(InitialSync, "before_chunk", staticmethod(hold_at_the_third_chunk))
    pri, sec = _in_process_pair(tmp_path)
    try:
        assert held.wait(30), "the sync never reached its third chunk"
        wait_for(lambda: sec.store.syncing, what="the secondary to take the sync's BEGIN")
        with open(tmp_path / "secondary.img.colo" / "journal.json") as f:
            assert json.load(f)["syncing"] is True
        with pytest.raises(StoreError, match="initial sync"):
            sec.store.failover()               # half an image is no disk to go on with
        r = qemu_io(pri.uri, ["write -P 0x11 512k 64k",        # already sent
                              "write -P 0x22 2624k 64k",       # the held chunk
                              "write -P 0x33 6148k 8k",        # not sent yet
                              "write -z 0 4k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        # a checkpoint now, had set_epoch not waited for the sync's END (it gives up here
        # at once): its seal does not cover the sync, so its commit says so
        monkeypatch.setattr(primary_module, "SET_EPOCH_SYNC_WAIT_S", 0)
        pri.backend.set_epoch(2)
        with pytest.raises(StoreError, match="initial disk sync was not complete"):
            sec.commit(1)
        with pytest.raises(StoreError, match="initial disk sync was not complete"):
            sec.commit(1)                       # the coordinator's retry: still not
        assert sec.store.syncing
        release.set()
        monkeypatch.setattr(primary_module, "SET_EPOCH_SYNC_WAIT_S", 600)
        pri.backend.set_epoch(3)                # waits for the sync's END to be ordered
        sec.commit(2)
        assert not sec.store.syncing
        assert file_hash(str(tmp_path / "secondary.img")) == \
            file_hash(str(tmp_path / "primary.img"))
        allocated = 5 * MiB   # 3 + 1 (zeros) + 1; the holes were not sent
        assert pri.counters["sync_total"] == pri.counters["sync_bytes"] == allocated
        assert sec.counters["sync_bytes"] == allocated
        # the all-zero MiB went without data: the secondary did not allocate it
        blocks = os.stat(tmp_path / "secondary.img").st_blocks * 512
        assert blocks <= 4 * MiB + 64 * 1024
        assert sec.counters["bad_forwards"] == 0 and pri.counters["forward_errors"] == 0
    finally:
        release.set()
        pri.close()
        sec.close()


def _pair_on(tmp_path, primary_img, secondary_img, tag: str):
    sec = SecondaryDisk(DiskSettings(image=str(secondary_img), export_size=SIZE,
                                     block_size=BS, export=f"unix:{tmp_path}/{tag}-s.sock",
                                     forward="tcp://127.0.0.1:*", compare="off"))
    pri = PrimaryDisk(DiskSettings(image=str(primary_img), export_size=SIZE, block_size=BS,
                                   export=f"unix:{tmp_path}/{tag}-p.sock",
                                   forward=sec.forward_endpoint, compare="off"))
    return pri, sec


def _checkpoint(pri, sec, epoch: int) -> None:
    assert pri.backend.wait_synced(120)
    pri.backend.set_epoch(epoch + 1)
    sec.commit(epoch)


def test_reprotection_after_failover_sends_only_the_extents_that_differ(tmp_path):
    """A (primary) and B (secondary) are in sync; A writes an epoch that never commits
    (and one write it never got to forward), A's host dies, B takes over and its guest
    writes. A comes back as B's secondary with its old image: the images share a
    generation, so the sync compares every MiB by blake3 and sends just the three that
    differ. An image of another lineage gets a full sync instead."""
    MiB = 1 << 20
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _fill(a, {0: os.urandom(2 * MiB), 6 * MiB: os.urandom(MiB)})
    pri, sec = _pair_on(tmp_path, a, b, "first")
    try:
        _checkpoint(pri, sec, 1)                                   # the full sync
        assert pri.counters["sync_bytes"] == 3 * MiB
        r = qemu_io(pri.uri, ["write -P 0x61 1M 64k"])            # epoch 2: torn
        assert r.returncode == 0, r.stderr
        sec.store.failover()                                        # B takes over
        r = qemu_io(sec.uri, ["write -P 0x62 5M 8k"])             # B's guest writes
        assert r.returncode == 0, r.stderr
    finally:
        pri.close()
        sec.close()
    _fill(a, {3 * MiB + 4096: b"\x63" * 4096})   # applied by A, never forwarded
    assert file_hash(str(a)) != file_hash(str(b))
    pri, sec = _pair_on(tmp_path, b, a, "again")                    # B primary, A secondary
    try:
        _checkpoint(pri, sec, 1)
        assert file_hash(str(a)) == file_hash(str(b))
        assert pri.counters["sync_total"] == SIZE == sec.counters["sync_checked"]
        assert pri.counters["sync_bytes"] == 3 * MiB   # the MiBs at 1, 3 and 5 MiB
        assert sec.counters["bad_forwards"] == 0
    finally:
        pri.close()
        sec.close()
    stranger = tmp_path / "c.img"
    _fill(stranger, {0: os.urandom(SIZE)})
    pri, sec = _pair_on(tmp_path, b, stranger, "stranger")
    try:
        _checkpoint(pri, sec, 1)
        assert file_hash(str(stranger)) == file_hash(str(b))
        assert sec.counters["sync_checked"] == 0
        allocated = sum(e - s for s, e, data in pri.backend.image.extents(0, SIZE) if data)
        assert pri.counters["sync_bytes"] == allocated
    finally:
        pri.close()
        sec.close()


def test_a_primary_reprotects_with_a_new_secondary_on_the_same_address(tmp_path):
    """The secondary's stage dies; the primary runs unprotected (the coordinator's 'role
    unprotected') while its guest writes; a new secondary stage comes up on the same
    address with the old image and the primary re-protects ('role primary'): an
    incremental sync sends just what was written meanwhile, its seqs go on from where
    they were, and writes the lost secondary never took are refused as another
    session's. The first checkpoint after it leaves equal images."""
    MiB = 1 << 20
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _fill(a, {0: os.urandom(2 * MiB)})
    sec = SecondaryDisk(DiskSettings(image=str(b), export_size=SIZE, block_size=BS,
                                     export=f"unix:{tmp_path}/s1.sock",
                                     forward="tcp://127.0.0.1:*", compare="off"))
    address = sec.forward_endpoint
    pri = PrimaryDisk(DiskSettings(image=str(a), export_size=SIZE, block_size=BS,
                                   export=f"unix:{tmp_path}/p.sock", forward=address,
                                   compare="off"))
    sec2 = None
    try:
        _checkpoint(pri, sec, 1)
        assert file_hash(str(a)) == file_hash(str(b))
        sec.close()                                   # the secondary is lost
        pri.on_event("role", 2, {"role": "unprotected"})
        r = qemu_io(pri.uri, ["write -P 0x71 4M 64k", "write -P 0x72 7M 4k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        sec2 = SecondaryDisk(DiskSettings(image=str(b), export_size=SIZE, block_size=BS,
                                          export=f"unix:{tmp_path}/s2.sock", forward=address,
                                          compare="off"))
        pri.on_event("role", 2, {"role": "primary"})  # re-protection
        assert pri.backend.wait_synced(120)   # (a write mid-sync may add a MiB to send)
        r = qemu_io(pri.uri, ["write -P 0x73 64k 4k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        _checkpoint(pri, sec2, 2)
        assert file_hash(str(a)) == file_hash(str(b))
        assert sec2.counters["sync_checked"] == SIZE
        assert pri.counters["sync_bytes"] == 2 * MiB   # this sync: the MiBs at 4 and 7
        assert not sec2.store.syncing
    finally:
        pri.close()
        if sec2 is not None:
            sec2.close()


def test_a_sync_cut_off_by_a_lost_secondary_leaves_no_write_in_flight(tmp_path, monkeypatch):
    """The secondary is lost in the middle of the initial sync: a window of chunks was sent
    and never acked, and the next chunk is ordered (counted in flight) and waits for room.
    The pair goes unprotected: the sync ends at once (not at the forward timeout, ten
    minutes here) and gives back the count of every chunk it ordered, sent or not. Else
    a chunk no ack will ever come for holds every later wait_forwarded: in the
    partition-heartbeat row of scripts/fault_matrix.py the first checkpoint after the
    re-protection waited for it until the epoch timed out, and the pair never protected
    the guest again. Here the re-protection's first checkpoint finds nothing in flight."""
    MiB = 1 << 20
    size = 16 * MiB                 # 12 allocated MiB: more chunks than the sync's window
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    with open(a, "w+b") as f:
        f.truncate(size)
        f.write(os.urandom(12 * MiB))
    held, release = threading.Event(), threading.Event()

    def hold_at_the_first_chunk(offset: int) -> None:
        if offset == 0 and not held.is_set():
            held.set()
            assert release.wait(60)

    monkeypatch.setattr(InitialSync, "before_chunk", staticmethod(hold_at_the_first_chunk))
    common = dict(export_size=size, block_size=BS, compare="off", forward_timeout_ms=600_000)
    sec = SecondaryDisk(DiskSettings(image=str(b), export=f"unix:{tmp_path}/s1.sock",
                                     forward="tcp://127.0.0.1:*", **common))
    address = sec.forward_endpoint
    pri = PrimaryDisk(DiskSettings(image=str(a), export=f"unix:{tmp_path}/p.sock",
                                   forward=address, **common))
    sec2 = None
    try:
        assert held.wait(30), "the sync never reached its first chunk"   # BEGIN answered
        sync = pri.backend._sync
        sec.close()                                   # the secondary is lost
        release.set()
        window = InitialSync.WINDOW
        wait_for(lambda: len(sync._inflight) == window + 1, 60,
                 "a window of chunks sent (never acked) and the next one ordered")
        assert sum(pri.backend._inflight.values()) == window + 1
        pri.on_event("role", 1, {"role": "unprotected"})
        sync.join(60)
        assert not sync.is_alive(), "the sync to the lost secondary did not end"
        assert pri.counters["sync_state"] == SYNC_FAILED
        assert pri.backend.wait_forwarded(1, 60), dict(pri.backend._inflight)
        # a new secondary on the same address: its first checkpoint waits for nothing old
        sec2 = SecondaryDisk(DiskSettings(image=str(b), export=f"unix:{tmp_path}/s2.sock",
                                          forward=address, **common))
        pri.on_event("role", 1, {"role": "primary"})
        _checkpoint(pri, sec2, 1)
        assert pri.backend.wait_forwarded(1, 60), dict(pri.backend._inflight)
        assert file_hash(str(a)) == file_hash(str(b))
    finally:
        release.set()
        pri.close()
        if sec2 is not None:
            sec2.close()


def test_a_commit_from_before_a_new_sync_says_the_primary_started_over(tmp_path, monkeypatch):
    """The primary seals epoch 2 and loses the secondary before it committed it (a
    partition); healed, the primary re-protects: its new sync's BEGIN (epoch 3) reaches
    the secondary's disk. The secondary's coordinator, still holding epoch 2's BEGIN,
    commits it: the disk refuses as NewSyncSession (its coordinator stops as stale), not
    as a sync that was incomplete before a first checkpoint (a failure)."""
    from pipeline.stages.disk import NewSyncSession
    MiB = 1 << 20
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _fill(a, {0: os.urandom(2 * MiB)})
    pri, sec = _pair_on(tmp_path, a, b, "first")
    held, release = threading.Event(), threading.Event()
    try:
        _checkpoint(pri, sec, 1)
        pri.backend.set_epoch(3)                       # epoch 2 sealed, not committed
        pri.on_event("role", 3, {"role": "unprotected"})

        def hold_the_new_sync(offset: int) -> None:
            held.set()
            assert release.wait(60)
        monkeypatch.setattr(InitialSync, "before_chunk", staticmethod(hold_the_new_sync))
        pri.on_event("role", 3, {"role": "primary"})   # re-protection: BEGIN at epoch 3
        assert held.wait(30), "the new sync never reached its first chunk"
        assert sec.store.syncing and sec.receiver.session_epoch == 3
        with pytest.raises(NewSyncSession, match="new initial disk sync at epoch 3"):
            sec.commit(2)
    finally:
        release.set()
        pri.close()
        sec.close()


def _allocated_bytes(path) -> int:
    """Bytes the file has allocated (st_blocks: a ZERO_RANGE leaves unwritten extents,
    which SEEK_DATA on ext4 reports as holes but which stay allocated)."""
    return os.stat(path).st_blocks * 512


def test_the_secondary_keeps_no_hole_zeroes_allocated_and_punches_the_others(tmp_path):
    """NBD's NO_HOLE (qemu-io ``write -z`` without ``-u``) asks that zeroed blocks stay
    allocated; a zero without it may punch a hole. The forward says which (ZERO_ALLOC),
    and the secondary's commit does the same as the primary: both ranges read as zeros,
    the NO_HOLE one still allocated on both images, the other a hole on both."""
    pri, sec = _in_process_pair(tmp_path, initial_sync=False)
    try:
        r = qemu_io(pri.uri, ["write -P 0x55 0 256k", "write -P 0x66 1M 256k"])
        assert r.returncode == 0, r.stderr
        _checkpoint(pri, sec, 1)
        r = qemu_io(pri.uri, ["write -z 0 256k", "write -z -u 1M 256k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        assert pri.backend.wait_forwarded(2, 60)
        _checkpoint(pri, sec, 2)
        for img in (tmp_path / "primary.img", tmp_path / "secondary.img"):
            # the NO_HOLE range still allocated, the other punched (nothing else written)
            assert _allocated_bytes(img) == 256 * 1024, img
        assert file_hash(str(tmp_path / "primary.img")) == \
            file_hash(str(tmp_path / "secondary.img"))
    finally:
        pri.close()
        sec.close()


def test_the_control_loop_answers_while_wait_synced_waits_for_the_sync(tmp_path, rundir):
    """The snapshot stage's wait_synced is parked, not waited for in the disk stage's
    control loop: while the initial sync cannot end (the secondary's stage is stopped
    with SIGSTOP, so not even the sync's BEGIN is answered) the loop answers stats, and
    the parked wait is answered once the sync ordered its END (the secondary resumed).
    A stop while a wait is parked ends the stage and answers the wait (not synced)."""
    import multiprocessing
    from pipeline.stages.disk import DiskControl, _start_stage
    ctx = multiprocessing.get_context("spawn")
    work = tmp_path / "disks"
    work.mkdir()
    _fill(work / "primary.img", {0: os.urandom(1 << 20)})
    common = dict(export_size=SIZE, block_size=BS, compare="off", forward_timeout_ms=600_000)
    sec_settings = DiskSettings(image=str(work / "secondary.img"), forward="tcp://127.0.0.1:*",
                                export=f"unix:{work}/s.sock", **common)
    sec, info = _start_stage(ctx, "secondary", sec_settings, str(work), 30)
    os.kill(sec.pid, signal.SIGSTOP)
    pri = None
    waiter = DiskControl(rundir, "primary")
    asker = DiskControl(rundir, "primary")
    try:
        pri, _ = _start_stage(ctx, "primary", DiskSettings(
            image=str(work / "primary.img"), forward=info["forward"],
            export=f"unix:{work}/p.sock", **common), rundir, 30)
        answer = {}
        t = threading.Thread(target=lambda: answer.update(synced=waiter.wait_synced(600_000)))
        t.start()
        # every stats call is answered while the wait is parked
        wait_for(lambda: asker.stats()["parked_waits"] == 1, 60, "wait_synced parked")
        assert asker.stats()["counters"]["sync_state"] == 1 and t.is_alive()
        os.kill(sec.pid, signal.SIGCONT)
        t.join(120)
        assert not t.is_alive() and answer == {"synced": True}
        wait_for(lambda: asker.stats()["counters"]["sync_state"] == 2, 60, "the sync done")
        # parked again (a sync that never ends this time: the secondary stopped for
        # good); a stop is still heard, and the parked wait gets its answer
        asker.call("unprotect")
        t = threading.Thread(target=lambda: answer.update(synced=waiter.wait_synced(600_000)))
        t.start()
        wait_for(lambda: asker.stats()["parked_waits"] == 1, 60, "wait_synced parked")
        short = DiskControl(rundir, "primary")
        try:   # a parked wait past its own deadline is answered: not synced
            assert short.wait_synced(200) is False
        finally:
            short.close()
        asker.call("stop")
        t.join(60)
        assert not t.is_alive() and answer == {"synced": False}
        pri.join(60)
        assert pri.exitcode == 0
    finally:
        waiter.close()
        asker.close()
        os.kill(sec.pid, signal.SIGCONT)
        for p in (pri, sec):
            if p is not None and p.is_alive():
                p.terminate()
                p.join(30)


def test_a_sync_begin_is_judged_by_its_own_epoch_not_the_old_sessions_window():
    """A BEGIN starts the secondary's session: one far past (or below) the epochs the
    secondary committed before is taken; a guest write there is not; epoch 0 never is."""
    def one(kind: int, epoch: int):
        frames = wire.encode_forward(kind, epoch, 9, 0, 0 if kind == wire.KIND_SYNC_BEGIN
                                     else BS, None if kind == wire.KIND_SYNC_BEGIN
                                     else bytes(BS), digest=os.urandom(32)
                                     if kind == wire.KIND_SYNC_BEGIN else None)
        return wire.decode_forward_group(frames, SIZE, BS, committed_epoch=40)[0]
    for epoch in (3, 40, 40 + wire.MAX_EPOCH_LEAD + 5):
        assert isinstance(one(wire.KIND_SYNC_BEGIN, epoch), wire.ForwardedWrite), epoch
    assert isinstance(one(wire.KIND_WRITE, 3), wire.ForwardError)
    assert isinstance(one(wire.KIND_WRITE, 40 + wire.MAX_EPOCH_LEAD + 5), wire.ForwardError)
    refused = one(wire.KIND_SYNC_BEGIN, 0)
    assert isinstance(refused, wire.ForwardError) and "epoch 0" in str(refused)


def test_the_survivors_export_becomes_the_primarys_without_closing_a_connection(tmp_path):
    """A takeover in the disk stage: the SVM's export, with a guest connection open,
    becomes the primary's (PrimaryDisk.from_secondary). The connection is carried over,
    not closed: a write before goes to the SVM's overlay, one after into the image,
    unprotected (nothing forwarded); re-protection ('role primary') then syncs a new
    secondary, and the writes on that same connection are forwarded to it."""
    from pipeline.disk.nbd_client import NbdClient
    MiB = 1 << 20
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _fill(a, {0: os.urandom(MiB)})
    pri, sec = _pair_on(tmp_path, a, b, "first")
    guest = NbdClient(sec.uri, timeout=60)        # the SVM's disk driver
    survivor = sec2 = None
    try:
        _checkpoint(pri, sec, 1)
        guest.write(2 * MiB, b"\x01" * BS)        # the SVM's, into its overlay
        pri.close()                                # the primary's host is lost
        sec.on_event("role", 1, {"role": "active"})
        address = f"tcp://127.0.0.1:{free_port()}"
        survivor = PrimaryDisk.from_secondary(sec, address, first_epoch=5)
        assert survivor.uri == sec.uri and survivor.backend.epoch == 5
        guest.write(3 * MiB, b"\x02" * BS)        # same connection: the primary's now
        assert survivor.counters["relinks"] == 1 and survivor.counters["forwarded"] == 0
        with open(b, "rb") as f:
            f.seek(2 * MiB)
            assert f.read(BS) == b"\x01" * BS      # the overlay merged at failover
            f.seek(3 * MiB)
            assert f.read(BS) == b"\x02" * BS
        # a new secondary where the survivor forwards to; re-protection syncs it
        sec2 = SecondaryDisk(DiskSettings(image=str(a), export_size=SIZE, block_size=BS,
                                          export=f"unix:{tmp_path}/s2.sock", forward=address,
                                          compare="off"))
        survivor.on_event("role", 5, {"role": "primary"})
        assert survivor.backend.wait_synced(120)
        guest.write(4 * MiB, b"\x03" * BS)
        assert survivor.backend.wait_forwarded(5, 60)
        assert survivor.counters["forwarded"] >= 1
        _checkpoint(survivor, sec2, 5)
        assert file_hash(str(a)) == file_hash(str(b))
        assert survivor.counters["sync_incremental"] == 1
    finally:
        guest.close()
        for side in (survivor, sec2):
            if side is not None:
                side.close()


def test_a_full_buffer_gives_the_secondary_up_and_never_fails_a_guest_write(tmp_path):
    """The secondary's buffer bound (256 KiB here) is reached inside one epoch: qemu-io's
    1 MiB of writes (64 KiB each, several in flight) all succeed — a replication limit
    never fails the guest's write; the primary's image has every byte. The secondary
    acks the writes it cannot buffer as given up (counted on both sides), and its commit
    of that epoch fails naming the bound (GivenUp: the coordinator stops it as stale),
    never leaving an image that lacks the writes. The pair goes unprotected, the guest
    writes on; the secondary rejoins on the same image and state and a new sync (its
    image is of our lineage: incremental) makes it the primary's at the next checkpoint."""
    from pipeline.disk.store import GivenUp
    MiB = 1 << 20
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _fill(a, {0: os.urandom(MiB)})
    bound = dict(buffer_max_bytes=256 * 1024)
    sec = SecondaryDisk(DiskSettings(image=str(b), export_size=SIZE, block_size=BS,
                                     export=f"unix:{tmp_path}/s1.sock",
                                     forward="tcp://127.0.0.1:*", compare="off", **bound))
    address = sec.forward_endpoint
    pri = PrimaryDisk(DiskSettings(image=str(a), export_size=SIZE, block_size=BS,
                                   export=f"unix:{tmp_path}/p.sock", forward=address,
                                   compare="off", **bound))
    sec2 = None
    try:
        _checkpoint(pri, sec, 1)
        assert file_hash(str(a)) == file_hash(str(b))
        writes = [f"aio_write -P {0x40 + i} {2 * MiB + i * 64 * 1024} 64k" for i in range(16)]
        r = qemu_io(pri.uri, writes + ["aio_flush"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        with open(a, "rb") as f:
            f.seek(2 * MiB)
            assert f.read(MiB) == b"".join(bytes([0x40 + i]) * 65536 for i in range(16))
        assert pri.counters["forward_errors"] == 0 and sec.counters["bad_forwards"] == 0
        assert sec.counters["given_up"] >= 1 and pri.counters["given_up"] >= 1
        assert sec.store.unbuffered is not None and "bound 262144" in sec.store.unbuffered[2]
        given_up = pri.command("stats", {})["given_up"]    # the node info's disk_given_up
        assert given_up["cause"] == "buffer" and "bound 262144" in given_up["reason"] \
            and given_up["seq"] == sec.store.unbuffered[1], given_up
        pri.backend.set_epoch(3)
        for _attempt in range(3):                  # the coordinator's retries: never
            with pytest.raises(GivenUp, match=r"could not be buffered .*bound 262144"):
                sec.commit(2)
        assert sec.store.committed_epoch == 1      # still checkpoint 1, whole
        sec.close()                                # stops as stale
        pri.on_event("role", 3, {"role": "unprotected"})
        r = qemu_io(pri.uri, ["write -P 0x71 5M 64k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        sec2 = SecondaryDisk(DiskSettings(image=str(b), export_size=SIZE, block_size=BS,
                                          export=f"unix:{tmp_path}/s2.sock", forward=address,
                                          compare="off", **bound))
        pri.on_event("role", 3, {"role": "primary"})   # the rejoin: a new sync
        _checkpoint(pri, sec2, 3)
        assert file_hash(str(a)) == file_hash(str(b))
        assert sec2.store.unbuffered is None and not sec2.store.syncing
        assert sec2.counters["sync_checked"] == SIZE   # incremental: the same lineage
        assert pri.counters["sync_bytes"] == 2 * MiB   # the MiBs at 2 and 5 differ
    finally:
        pri.close()
        if sec2 is not None:
            sec2.close()


def test_a_write_is_acked_before_it_is_buffered_and_its_commit_waits_for_the_buffer(
        tmp_path, monkeypatch):
    """The secondary acks a forwarded write once it is admitted (epoch, bounds, room) and
    buffers it (hash, append) after the ACK went, so the primary answers its guest
    meanwhile. Held at that point (the store's append, a test hook), the guest's write
    has completed while nothing is in the secondary's buffer; the commit of its epoch
    waits for the append (the seal's seqs are seen only once buffered), then the images
    are equal. Without the wait the commit would apply an epoch missing the write."""
    pri, sec = _in_process_pair(tmp_path, initial_sync=False)
    held, release = threading.Event(), threading.Event()
    append = SecondaryStore.buffer_pvm_writes

    def hold_the_append(self, writes, admitted=False):
        held.set()
        assert release.wait(60)
        return append(self, writes, admitted)

    monkeypatch.setattr(SecondaryStore, "buffer_pvm_writes", hold_the_append)
    committer = None
    try:
        r = qemu_io(pri.uri, ["write -P 0x3c 128k 8k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        # acked, not buffered: the receiver reaches the append after its ACK went, so on
        # a loaded machine the client may hear back first (waited for, not assumed)
        assert held.wait(60) and sec.counters["received"] == 0
        assert pri.backend.wait_forwarded(1, 0)
        pri.backend.set_epoch(2)
        committer, errors = _commit_in_background(sec, 1)
        wait_for(lambda: sec.receiver.sealed.waiting_for == 1,
                 what="the commit of epoch 1 to wait for the write's append")
        assert sec.store.committed_epoch == 0
        release.set()
        committer.join(60)
        assert not committer.is_alive() and not errors, errors
        assert sec.store.committed_epoch == 1 and sec.counters["received"] == 1
        assert file_hash(str(tmp_path / "secondary.img")) == \
            file_hash(str(tmp_path / "primary.img"))
    finally:
        release.set()
        if committer is not None:
            committer.join(60)
        pri.close()
        sec.close()


def test_a_write_the_secondary_never_took_succeeds_and_its_epoch_never_commits(
        tmp_path, monkeypatch):
    """The forwarding socket refuses a burst (zmq.Again: the secondary took nothing for the
    forward timeout; mocked: a stand-in for PrimaryLink._send_outbox leaves the first
    burst as its zmq.Again branch does, the one way to cause it on demand):
    the guest's write succeeds from the primary's image (counted in forward_errors), and
    the secondary, which never saw its seq, refuses to commit its epoch (the seal covers
    it): it can never pass for a copy of the primary without the write."""
    pri, sec = _in_process_pair(tmp_path, initial_sync=False, forward_timeout_ms=500)
    real_send = primary_module.PrimaryLink._send_outbox
    refused: list[bool] = []

    def refuse_the_first_burst(self):
        if not refused:
            refused.append(True)
            self._send_failed += self._outbox_seqs     # what zmq.Again leaves behind
            self._outbox, self._outbox_seqs, self._outbox_bytes = [], [], 0
            return
        real_send(self)

    monkeypatch.setattr(primary_module.PrimaryLink, "_send_outbox", refuse_the_first_burst)
    try:
        r = qemu_io(pri.uri, ["write -P 0x2d 256k 4k", "read -P 0x2d 256k 4k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        assert refused and pri.counters["forward_errors"] == 1
        assert pri.backend.wait_forwarded(1, 60)          # nothing left in flight
        pri.backend.set_epoch(2)
        with pytest.raises(StoreError, match=r"sealed, seen only up to 0"):
            sec.commit(1)
        assert sec.store.committed_epoch == 0
    finally:
        pri.close()
        sec.close()


def test_a_write_the_secondary_refuses_succeeds_and_the_secondary_gives_up(
        tmp_path, monkeypatch):
    """The secondary refuses a forwarded write of its session (mocked: the first write's
    decoding says its blake3 does not match, as a corrupted forward would): the guest's
    write succeeds from the primary's image (counted in forward_errors: EIO before), and
    the secondary gives the replication up: its commit refuses naming the write instead
    of committing an epoch without it."""
    from pipeline.disk.store import GivenUp
    pri, sec = _in_process_pair(tmp_path, initial_sync=False)
    decode = wire.decode_forward_group
    spoiled: list[int] = []

    def spoil_the_first_write(frames, *args, **kwargs):
        out = decode(frames, *args, **kwargs)
        if not spoiled and out and not isinstance(out[0], wire.ForwardError):
            spoiled.append(out[0].seq)
            out[0] = wire.refusal(errno.EBADMSG, f"forwarded write seq {out[0].seq}: blake3 "
                                                 f"of the data does not match", out[0].seq)
        return out

    monkeypatch.setattr(wire, "decode_forward_group", spoil_the_first_write)
    try:
        r = qemu_io(pri.uri, ["write -P 0x4e 512k 4k", "write -P 0x4f 1M 4k",
                              "read -P 0x4e 512k 4k"])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        assert spoiled == [1] and pri.counters["forward_errors"] == 1
        given_up = pri.command("stats", {})["given_up"]    # the node info's disk_given_up
        assert given_up["cause"] == "refused" and given_up["seq"] == 1 \
            and "blake3 of the data does not match" in given_up["reason"], given_up
        assert pri.backend.wait_forwarded(1, 60)
        pri.backend.set_epoch(2)
        with pytest.raises(GivenUp, match=r"seq 1 of epoch 1 could not be buffered \(refused"):
            sec.commit(1)
        assert sec.store.committed_epoch == 0
    finally:
        pri.close()
        sec.close()
