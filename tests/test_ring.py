"""The shared-memory ring and segment ownership, with real forked processes and /dev/shm."""
from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import blake3
import numpy as np
import pytest

from conftest import wait_until
from pipeline import faults
from pipeline.localpair import process_state
from pipeline.ring import Ring, RingClosed, RingTimeout, SlotLayout
from pipeline.shm import (
    attach_segment,
    cleanup_segments,
    create_segment,
    list_segments,
    segment_prefix,
)

FORK = mp.get_context("fork")
SMALL = SlotLayout(batch_pages=4, page_size=4096)


@pytest.fixture
def ring(node):
    r = Ring.create(segment_prefix(node) + "ring", 4, SMALL)
    yield r
    if not r.closed:
        r.unlink()
        r.close()


def _run_child(target, *args) -> mp.Process:
    p = FORK.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _page_content(i: int, count: int, page_size: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=(count, page_size), dtype=np.uint8)


def _produce(ring: Ring, n: int) -> None:
    for i in range(n):
        slot = ring.acquire_write(timeout=10)
        count = 1 + i % ring.layout.batch_pages
        slot.kind = i % 4
        slot.epoch = i // 100
        slot.row = i
        slot.count = count
        slot.pfns[:count] = np.arange(count, dtype=np.uint64) + 1000 * i
        slot.data[:count] = _page_content(i, count, ring.layout.page_size)
        for k in range(count):
            slot.hashes[k] = np.frombuffer(blake3.blake3(slot.data[k]).digest(), np.uint8)
            slot.enc_len[k] = k + i
        ring.commit_write(slot)
    ring.close_write()


def _consume(ring: Ring, results) -> None:
    """Check every slot; report (slots seen, first problem or None)."""
    seen, problem = 0, None
    while True:
        try:
            slot = ring.acquire_read(timeout=10)
        except RingClosed:
            break
        i, count = seen, slot.count
        if problem is None:
            if (slot.row, slot.epoch, slot.kind, count) != (i, i // 100, i % 4,
                                                            1 + i % ring.layout.batch_pages):
                problem = f"slot {i}: header {slot!r}"
            elif not np.array_equal(slot.pfns[:count], np.arange(count) + 1000 * i):
                problem = f"slot {i}: pfns {slot.pfns[:count]}"
            elif list(slot.enc_len[:count]) != [k + i for k in range(count)]:
                problem = f"slot {i}: enc_len {slot.enc_len[:count]}"
            else:
                for k in range(count):
                    if blake3.blake3(slot.data[k]).digest() != slot.hashes[k].tobytes():
                        problem = f"slot {i}: page {k} does not match its hash"
                        break
        seen += 1
        ring.release_read(slot)
    results.send((seen, problem))


def test_round_trip_across_forked_processes_keeps_order_and_content(node):
    ring = Ring.create(segment_prefix(node) + "ring", 8, SMALL)
    receiver, sender = FORK.Pipe(duplex=False)
    n = 3000
    consumer = _run_child(_consume, ring, sender)
    producer = _run_child(_produce, ring, n)
    assert receiver.poll(60), "consumer reported nothing within 60 s"
    seen, problem = receiver.recv()
    producer.join(10)
    consumer.join(10)
    assert (producer.exitcode, consumer.exitcode) == (0, 0)
    assert problem is None
    assert seen == n
    assert ring.occupancy == 0
    assert 1 <= ring.high_water <= 8
    ring.unlink()
    ring.close()
    assert list_segments(segment_prefix(node)) == []


def test_slot_fields_are_views_into_shared_memory(ring):
    slot = ring.acquire_write(timeout=1)
    slot.data_flat[4096:4100] = [1, 2, 3, 4]
    assert list(slot.data[1, :4]) == [1, 2, 3, 4]
    slot.header["epoch"] = 77
    slot.count = 3
    assert slot.epoch == 77 and int(slot.header["count"]) == 3
    assert slot.data.ctypes.data % 4096 == 0, "page data should be page-aligned"
    assert slot.hashes.shape == (4, 32) and slot.pfns.dtype == np.uint64
    ring.commit_write(slot)
    view = attach_segment(ring.name, readonly=True)  # a second mapping of the same memory
    first_slot_data = np.ndarray((4, 4096), np.uint8, view.buf,
                                 4096 + ring.layout.data_offset)
    assert list(first_slot_data[1, :4]) == [1, 2, 3, 4]
    del first_slot_data
    view.close()


def test_every_header_field_has_a_word_of_its_own(ring):
    """One meaning per field: the properties and the dtype agree, no two fields share a
    byte, and reset() leaves nothing of the previous batch."""
    from pipeline.ring import SLOT_HEADER_DTYPE
    slot = ring.acquire_write(timeout=1)
    names = SLOT_HEADER_DTYPE.names
    for i, name in enumerate(names):
        setattr(slot, name, 1000 + i)
    for i, name in enumerate(names):
        assert getattr(slot, name) == 1000 + i == int(slot.header[name]), name
    slot.reset(2, 5, 1)
    assert [getattr(slot, n) for n in names] == [2 if n == "kind" else 5 if n == "epoch" else
                                                1 if n == "count" else 0 for n in names]
    ring.commit_write(slot)


def test_acquire_write_times_out_when_the_consumer_does_not_release(ring):
    for _ in range(ring.slots):
        ring.commit_write(ring.acquire_write(timeout=1))
    start = time.monotonic()
    with pytest.raises(RingTimeout, match=f"{ring.name}.*free slot"):
        ring.acquire_write(timeout=0.1)
    assert time.monotonic() - start >= 0.09   # it waited (how much longer: the scheduler)
    ring.release_read(ring.acquire_read(timeout=1))
    ring.acquire_write(timeout=1)  # a release frees exactly one slot


def _release_and_stop_in_the_window(ring: Ring) -> None:
    """A consumer that stops (SIGSTOP, by its fault point) inside its first release: the
    tail moved, the free token not posted."""
    os.environ[faults.ENV] = "ring.release_read.tail_moved:1:stop"
    importlib.reload(faults)      # (COLO_FAULT is read at import; this fork imports it again)
    ring.release_read(ring.acquire_read(timeout=10))


def _asleep_in(tid: int, calls: set[int]) -> bool:
    """Whether thread ``tid`` of this process sleeps in one of the syscalls ``calls``."""
    if process_state(tid) != "S":        # (/proc/TID/stat: a thread's own, like a process's)
        return False
    call = open(f"/proc/self/task/{tid}/syscall").read().split()[0]
    return call.isdigit() and int(call) in calls


def test_a_slot_the_counters_show_free_is_waited_for_when_its_token_is_late(ring):
    """The shared tail moves before the consumer posts the free token (module doc,
    "Ordering"). A producer that saw the slot free and asked for it without waiting, as
    the receive side does, waits for the token: in the Xen lab a verify worker preempted
    in that window made the restore stage die on ``acquire_write(0)`` (occupancy 63/64)."""
    for _ in range(ring.slots):
        ring.commit_write(ring.acquire_write(timeout=1))
    consumer = _run_child(_release_and_stop_in_the_window, ring)
    try:
        _, status = os.waitpid(consumer.pid, os.WUNTRACED)   # stopped at the fault point
        assert os.WIFSTOPPED(status), f"the consumer ended instead: status {status:#x}"
        assert ring.occupancy == ring.slots - 1     # the slot shows as free...
        # ...and its token is not there: let the consumer go on only once this thread
        # sleeps in poll() for it (before the fix, acquire_write(0) raised at once)
        main = threading.get_native_id()
        polls = {7, 271}                            # x86-64 poll, ppoll

        saw_it_wait: list[bool] = []

        def resume_when_waiting() -> None:
            try:
                saw_it_wait.append(wait_until(lambda: _asleep_in(main, polls), timeout=60,
                                              what="the producer asleep in poll() for the token"))
            finally:
                os.kill(consumer.pid, signal.SIGCONT)
        waker = threading.Thread(target=resume_when_waiting, daemon=True)
        waker.start()
        slot = ring.acquire_write(0)
        waker.join(60)
        assert saw_it_wait == [True], "the producer got its slot without waiting for the token"
        assert ring.occupancy == ring.slots - 1
        ring.commit_write(slot)
        assert ring.occupancy == ring.slots
    finally:
        os.kill(consumer.pid, signal.SIGCONT)
        consumer.join(30)
    assert consumer.exitcode == 0


def test_acquire_read_times_out_when_nothing_is_published(ring):
    start = time.monotonic()
    with pytest.raises(RingTimeout, match=f"{ring.name}.*published slot"):
        ring.acquire_read(timeout=0.1)
    assert time.monotonic() - start >= 0.09   # it waited (how much longer: the scheduler)
    assert ring.try_acquire_read() is None
    ring.acquire_write(timeout=0)
    with pytest.raises(RingTimeout):  # acquired but not committed is not published
        ring.acquire_read(timeout=0)


def _wait_until_blocked(pid: int) -> None:
    """Until process ``pid`` sleeps in the kernel (state S: blocked in a wait)."""
    deadline = time.monotonic() + 60
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":
                return
        assert time.monotonic() < deadline, f"process {pid} never blocked"
        time.sleep(0.001)


def test_blocked_reader_wakes_when_another_process_publishes(ring):
    reader = os.getpid()

    def late_producer(r: Ring) -> None:
        _wait_until_blocked(reader)      # publish only once the reader waits
        slot = r.acquire_write(timeout=1)
        slot.row = 42
        r.commit_write(slot)
    child = _run_child(late_producer, ring)
    slot = ring.acquire_read(timeout=10)
    assert slot.row == 42
    child.join(5)


def test_close_write_gives_ring_closed_only_after_draining(ring):
    for i in range(3):
        slot = ring.acquire_write(timeout=1)
        slot.row = i
        ring.commit_write(slot)
    ring.close_write()
    with pytest.raises(ValueError, match="after close_write"):
        ring.acquire_write(timeout=0)
    got = []
    for _ in range(3):
        slot = ring.acquire_read(timeout=1)
        got.append(slot.row)
        ring.release_read(slot)
    assert got == [0, 1, 2]
    for _ in range(2):  # stays closed, in both the blocking and the polling call
        with pytest.raises(RingClosed, match=ring.name):
            ring.acquire_read(timeout=1)
        with pytest.raises(RingClosed):
            ring.try_acquire_read()
    assert select.select([ring.fileno()], [], [], 0)[0] == [ring.fileno()]


def test_occupancy_and_high_water(ring):
    for _ in range(3):
        ring.commit_write(ring.acquire_write(timeout=1))
    assert (ring.occupancy, ring.high_water) == (3, 3)
    for _ in range(3):
        ring.release_read(ring.acquire_read(timeout=1))
    ring.commit_write(ring.acquire_write(timeout=1))
    assert (ring.occupancy, ring.high_water) == (1, 3)


def test_out_of_order_or_foreign_slots_are_refused_counted_and_not_published(ring, node):
    first = ring.acquire_write(timeout=1)
    second = ring.acquire_write(timeout=1)
    with pytest.raises(ValueError, match="slot 1 out of order.*expected slot 0"):
        ring.commit_write(second)
    first.count = ring.layout.batch_pages + 1
    with pytest.raises(ValueError, match="count=5 > batch_pages=4"):
        ring.commit_write(first)
    assert ring.errors == 2 and ring.occupancy == 0 and ring.try_acquire_read() is None
    first.count = 1
    ring.commit_write(first)
    ring.commit_write(second)
    other = Ring.create(segment_prefix(node) + "other", 2, SMALL)
    try:
        with pytest.raises(ValueError, match="not a slot of this ring"):
            ring.release_read(other.acquire_write(timeout=1))
    finally:
        other.unlink()
        other.close()
    assert ring.acquire_read(timeout=1) is first
    with pytest.raises(ValueError, match="release_read of slot 1 out of order"):
        ring.release_read(second)
    assert ring.errors == 4


def test_wait_empty_sleeps_until_the_consumer_released_every_slot(ring):
    """The producer's wait for a drained ring (the receive stage's, after a torn epoch)
    returns once the last slot is released by another process, not before, and leaves
    every free slot to acquire again."""
    ring.wait_empty(timeout=0)            # empty: at once
    for i in range(3):
        slot = ring.acquire_write(timeout=1)
        slot.row = i
        ring.commit_write(slot)
    with pytest.raises(RingTimeout, match=f"{ring.name}.*release every slot.*3/4"):
        ring.wait_empty(timeout=0.05)
    assert ring.occupancy == 3
    producer = os.getpid()

    def release_one_at_a_time(r: Ring) -> None:
        for _ in range(3):
            _wait_until_blocked(producer)     # release only while the producer sleeps
            r.release_read(r.acquire_read(timeout=10))
    child = _run_child(release_one_at_a_time, ring)
    ring.wait_empty(timeout=60)
    assert ring.occupancy == 0
    child.join(10)
    assert child.exitcode == 0
    for _ in range(ring.slots):           # every free-slot token was given back
        ring.commit_write(ring.acquire_write(timeout=0))
    with pytest.raises(RingTimeout):
        ring.acquire_write(timeout=0)


def test_wait_empty_refuses_a_producer_holding_a_slot(ring):
    ring.acquire_write(timeout=1)
    with pytest.raises(ValueError, match="wait_empty while 1 acquired"):
        ring.wait_empty(timeout=0)


def test_fileno_lets_a_consumer_wait_on_several_rings(node):
    rings = [Ring.create(segment_prefix(node) + f"r{i}", 2, SMALL) for i in range(2)]

    waiter = os.getpid()

    def publish_on_second(r: Ring) -> None:
        _wait_until_blocked(waiter)      # publish only once the select() waits
        r.commit_write(r.acquire_write(timeout=1))
    child = _run_child(publish_on_second, rings[1])
    readable, _, _ = select.select([r.fileno() for r in rings], [], [], 10)
    assert readable == [rings[1].fileno()]
    assert rings[0].try_acquire_read() is None
    assert rings[1].try_acquire_read() is not None
    child.join(5)
    for r in rings:
        r.unlink()
        r.close()


def test_ring_cannot_be_pickled_and_children_cannot_unlink(ring):
    with pytest.raises(TypeError, match="fork"):
        pickle.dumps(ring)

    def try_unlink(r: Ring, results) -> None:
        try:
            r.unlink()
            results.send("unlinked")
        except PermissionError as e:
            results.send(str(e))
    receiver, sender = FORK.Pipe(duplex=False)
    child = _run_child(try_unlink, ring, sender)
    assert receiver.poll(10)
    assert "may only close it" in receiver.recv()
    child.join(5)
    assert list_segments(ring.name) == [ring.name]


def test_bad_arguments_are_rejected_with_the_value(node):
    with pytest.raises(ValueError, match="batch_pages=0"):
        SlotLayout(batch_pages=0)
    with pytest.raises(ValueError, match="slots=0"):
        Ring.create(segment_prefix(node) + "x", 0)
    with pytest.raises(ValueError, match="invalid segment name 'a/b'"):
        create_segment("a/b", 10)
    with pytest.raises(ValueError, match="refusing"):
        cleanup_segments("colo-")
    assert list_segments(segment_prefix(node)) == []


# -- lifetimes: no segment of the node survives a clean stop, Ctrl-C, or a killed stage ----

OWNER_SCRIPT = textwrap.dedent("""
    # A supervisor-like owner: creates a ring and counters, forks a producer and a
    # consumer, waits for them, and cleans up whatever way the run ends.
    import signal, sys, time, multiprocessing as mp
    from multiprocessing.connection import wait
    # Ctrl-C reaches a terminal's foreground job even when this test runs under a background
    # job, whose commands start with SIGINT ignored (and Python then keeps it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pipeline.ring import Ring, SlotLayout, RingClosed, RingTimeout
    from pipeline.counters import NodeCounters, STAGE_COUNTERS
    from pipeline.shm import segment_prefix

    node, items = sys.argv[1], int(sys.argv[2])   # items < 0: run until stopped

    def producer(ring, counters):
        stage = counters.stage("producer")
        try:
            i = 0
            while items < 0 or i < items:
                try:
                    slot = ring.acquire_write(timeout=0.2)
                except RingTimeout:
                    continue
                slot.row, slot.count = i, 1
                slot.data[0, :8] = i % 256
                ring.commit_write(slot)
                stage.add("items_out")
                i += 1
            ring.close_write()
        except KeyboardInterrupt:
            pass

    def consumer(ring, counters):
        stage = counters.stage("consumer")
        try:
            while True:
                try:
                    slot = ring.acquire_read(timeout=0.2)
                except RingTimeout:
                    continue
                except RingClosed:
                    return
                stage.add("items_in")
                time.sleep(0.001)
                ring.release_read(slot)
        except KeyboardInterrupt:
            pass

    ctx = mp.get_context("fork")
    ring = Ring.create(segment_prefix(node) + "ring", 4, SlotLayout(4, 4096))
    counters = NodeCounters.create(node, {"producer": STAGE_COUNTERS,
                                          "consumer": STAGE_COUNTERS})
    children = [ctx.Process(target=producer, args=(ring, counters)),
                ctx.Process(target=consumer, args=(ring, counters))]
    try:
        for child in children:
            child.start()
        print("ready", *(c.pid for c in children), flush=True)
        pending = {c.sentinel: c for c in children}
        while pending:
            for sentinel in wait(list(pending)):
                child = pending.pop(sentinel)
                child.join()
                if child.exitcode != 0:
                    print("stage", child.pid, "died with", child.exitcode, flush=True)
                    for other in pending.values():
                        other.terminate()
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join(5)
        ring.unlink(); ring.close()
        counters.unlink(); counters.close()
        print("cleaned up", flush=True)
""")


@pytest.fixture
def owner(tmp_path, node):
    """Start the owner script in its own session (like a terminal's foreground job)."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    procs = []

    def start(items: int) -> tuple[subprocess.Popen, list[int]]:
        proc = subprocess.Popen([sys.executable, str(script), node, str(items)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        procs.append(proc)
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], (line, proc.stderr.read() if proc.poll() else "")
        return proc, [int(p) for p in line[1:]]
    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def _segments_while_running(node: str) -> list[str]:
    return [n[len(segment_prefix(node)):] for n in list_segments(segment_prefix(node))]


def _wait_flowing(node: str) -> None:
    """Until the owner's consumer stage has taken items: both stages run their loops."""
    from pipeline.counters import NodeCounters
    c = NodeCounters.attach(node)
    try:
        wait_until(lambda: c.stage("consumer").as_dict()["items_in"] >= 3, 60,
                   "the owner's stages running", interval=0.005)
    finally:
        c.close()


def test_clean_stop_leaves_no_segment(owner, node):
    proc, _ = owner(500)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "cleaned up" in out and "died" not in out
    assert list_segments(segment_prefix(node)) == []


def test_ctrl_c_leaves_no_segment(owner, node):
    proc, _ = owner(-1)
    assert _segments_while_running(node) == ["counters", "ring"]
    _wait_flowing(node)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=30)
    assert "cleaned up" in out, err
    assert proc.returncode != 0  # interrupted, not finished
    assert list_segments(segment_prefix(node)) == []


def test_killed_stage_is_noticed_and_its_segments_removed(owner, node):
    proc, (_producer_pid, consumer_pid) = owner(-1)
    _wait_flowing(node)
    os.kill(consumer_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert f"stage {consumer_pid} died with -9" in out, err
    assert "cleaned up" in out
    assert list_segments(segment_prefix(node)) == []


def test_segments_of_a_killed_owner_are_removed_by_the_next_run(owner, node, caplog):
    proc, _ = owner(-1)
    os.killpg(proc.pid, signal.SIGKILL)  # owner crashed: nobody could clean up
    proc.wait(10)
    assert _segments_while_running(node) == ["counters", "ring"]
    with caplog.at_level(logging.WARNING, logger="pipeline.shm"):
        ring = Ring.create(segment_prefix(node) + "ring", 2, SMALL)
    assert "stale" in caplog.text
    assert ring.occupancy == 0 and ring.high_water == 0  # a fresh ring, not the old one
    ring.unlink()
    ring.close()
    assert cleanup_segments(segment_prefix(node)) == [segment_prefix(node) + "counters"]
    assert list_segments(segment_prefix(node)) == []


def test_an_attaching_process_that_exits_does_not_unlink(ring):
    code = ("import sys; from pipeline.shm import attach_segment; "
            "s = attach_segment(sys.argv[1]); s.buf[4096] = 7; s.close()")
    subprocess.run([sys.executable, "-c", code, ring.name], check=True, timeout=30)
    assert list_segments(ring.name) == [ring.name]
    slot = ring.acquire_write(timeout=1)
    assert slot.header["kind"] == 7  # the attacher really wrote into the same memory


def _first_pass_minor_faults(ring: Ring, prefault: bool, results) -> None:
    import resource
    if prefault:
        ring.prefault()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for slot in ring._slots:
        slot.data[:, 0] = 1      # touch every page of every slot
    results.send(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)


def test_prefault_spares_a_forked_stage_the_first_pass_page_faults(node):
    ring = Ring.create(segment_prefix(node) + "ring", 8, SlotLayout(batch_pages=64))
    pages = 8 * 64
    ring._slots[3].data[:, 1] = 7   # prefaulting must leave the contents alone
    faults = {}
    for prefault in (False, True):
        receiver, sender = FORK.Pipe(duplex=False)
        child = _run_child(_first_pass_minor_faults, ring, prefault, sender)
        assert receiver.poll(30)
        faults[prefault] = receiver.recv()
        child.join(10)
    assert faults[False] >= pages
    assert faults[True] < pages // 10, faults
    assert (ring._slots[3].data[:, 1] == 7).all()
    ring.unlink()
    ring.close()


def test_a_slot_array_kept_past_close_points_at_mapped_memory(node):
    """A ring slot's numpy arrays are made with ``np.ndarray(shape, dtype, seg.buf,
    offset)``: they keep the segment's mmap object but hold no buffer export on it, so a
    close that called ``mmap.close()`` unmapped the memory under them and their next use
    was a SIGSEGV in numpy (no traceback: a stage "killed by signal 11", issue 13).
    Segment.close now only drops this process's reference: the mapping goes with the
    last view. In a child process, so the old code's crash is an exit status here."""
    name = segment_prefix(node) + "ring"
    child = textwrap.dedent(f"""
        import numpy as np
        from pipeline.ring import Ring, SlotLayout
        from pipeline.shm import create_segment
        ring = Ring.create({name!r}, 2, SlotLayout(batch_pages=4, page_size=4096))
        slot = ring.acquire_write()
        pfns, data = slot.pfns, slot.data
        ring.unlink()
        ring.close()
        pfns[:] = 7
        data[1, 5] = 9
        print("slot arrays", int(pfns.sum()), int(data.sum()), flush=True)
        seg = create_segment({name!r} + "-seg", 4096)
        words = np.ndarray((8,), np.uint64, seg.buf, 64)
        seg.unlink()
        seg.close()
        words[3] = 11
        print("segment view", int(words.sum()), flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-2000:])
    assert p.stdout.split("\n")[:2] == ["slot arrays 28 9", "segment view 11"]
    assert not list_segments(segment_prefix(node))
