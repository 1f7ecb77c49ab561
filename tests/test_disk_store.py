"""The secondary's store: overlay semantics, commit, discard, failover, bounds, and crash
safety of the commit journal (a real child process SIGKILLed at each named point of the
commit and of the failover merge, pipeline/faults.py)."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import faults
from pipeline.disk.counters import DiskCounters
from pipeline.disk.store import SecondaryStore, StoreError, StoreFull
from pipeline.disk.wire import KIND_WRITE, KIND_ZERO, ZERO_DIGEST, digest_of

BS = 4096
SIZE = 8 << 20


def open_store(d: str, counters: DiskCounters | None = None, overlay_max: int = SIZE,
               buffer_max: int = 1 << 30) -> SecondaryStore:
    return SecondaryStore(os.path.join(d, "disk.img"), SIZE, BS, os.path.join(d, "state"),
                          overlay_max, buffer_max, counters)


def image_bytes(d: str) -> bytes:
    with open(os.path.join(d, "disk.img"), "rb") as f:
        return f.read()


def buffer_write(store: SecondaryStore, model: bytearray, epoch: int, offset: int,
                 data: bytes | None, length: int = 0) -> None:
    """Buffer one PVM write and apply it to the expected-image model."""
    if data is None:
        store.buffer_pvm_write(epoch, KIND_ZERO, offset, length, ZERO_DIGEST, None)
        model[offset:offset + length] = bytes(length)
    else:
        store.buffer_pvm_write(epoch, KIND_WRITE, offset, len(data), digest_of(data), data)
        model[offset:offset + len(data)] = data


def random_writes(rng: random.Random, store: SecondaryStore, model: bytearray, epoch: int,
                  n: int, max_blocks: int = 16) -> None:
    for _ in range(n):
        blocks = rng.randint(1, max_blocks)
        off = rng.randrange(0, SIZE // BS - blocks) * BS
        if rng.random() < 0.1:
            buffer_write(store, model, epoch, off, None, blocks * BS)
        else:
            buffer_write(store, model, epoch, off, rng.randbytes(blocks * BS))


def test_svm_reads_its_own_writes_over_the_image_and_commit_drops_them(tmp_path):
    d = str(tmp_path)
    base = os.urandom(SIZE)
    with open(os.path.join(d, "disk.img"), "wb") as f:
        f.write(base)
    c = DiskCounters()
    s = open_store(d, c)
    s.svm_write(BS, b"S" * (2 * BS))
    s.svm_zero(8 * BS, BS)
    # a read spanning image, overlay, image, zeroed overlay block
    got = s.svm_read(0, 10 * BS)
    want = base[:BS] + b"S" * 2 * BS + base[3 * BS:8 * BS] + bytes(BS) + base[9 * BS:10 * BS]
    assert bytes(got) == want
    assert c["overlay_bytes"] == 3 * BS
    assert image_bytes(d) == base  # the SVM never touches the image before failover
    model = bytearray(base)
    buffer_write(s, model, 1, 2 * BS, b"P" * BS)
    assert bytes(s.svm_read(2 * BS, BS)) == b"S" * BS  # buffered PVM writes are invisible
    s.commit(1)
    assert image_bytes(d) == bytes(model)
    assert bytes(s.svm_read(0, 10 * BS)) == bytes(model[:10 * BS])  # overlay dropped
    assert c["overlay_bytes"] == 0 and c["buffer_bytes"] == 0 and c["commits"] == 1
    s.commit(1)  # again: a no-op
    assert c["commits"] == 1
    s.close()


def test_commit_applies_every_buffered_epoch_up_to_e_and_keeps_later_ones(tmp_path):
    d = str(tmp_path)
    rng = random.Random(1)
    s = open_store(d)
    models = {0: bytearray(SIZE)}
    for e in (1, 2, 3):
        models[e] = bytearray(models[e - 1])
        random_writes(rng, s, models[e], e, 50)
    s.commit(2)  # an aborted epoch 1 checkpoint never committed; 2 must include it
    assert image_bytes(d) == bytes(models[2])
    assert s.committed_epoch == 2
    s.close()
    s = open_store(d)  # epoch 3's buffer survives a restart
    s.commit(3)
    assert image_bytes(d) == bytes(models[3])
    s.close()


def test_discard_uncommitted_drops_buffered_writes_only(tmp_path):
    d = str(tmp_path)
    c = DiskCounters()
    s = open_store(d, c)
    s.buffer_pvm_write(1, KIND_WRITE, 0, BS, digest_of(b"x" * BS), b"x" * BS)
    s.svm_write(0, b"s" * BS)
    assert s.discard_uncommitted() == 1
    s.commit(1)
    assert image_bytes(d) == bytes(SIZE)
    assert c["discards"] == 1
    s.close()


@pytest.mark.parametrize("path", ["admit", "buffer"])
def test_one_batch_is_judged_write_by_write_and_a_refused_write_holds_no_room(tmp_path, path):
    """The receiver's admission before its ACK (admit_pvm_writes) and an unadmitted
    buffering judge a batch alike, each write on its own: a stale epoch and a write past
    the bound are refused with the check that failed, and the room a refused write would
    have taken stays free for the writes after it."""
    from pipeline.disk.wire import ForwardedWrite
    d = str(tmp_path)
    record = SecondaryStore.record_bytes(ForwardedWrite(KIND_WRITE, 2, 0, 0, BS, b"", b"x" * BS))
    s = open_store(d, buffer_max=3 * record)
    s.buffer_pvm_write(1, KIND_WRITE, 0, BS, digest_of(b"a" * BS), b"a" * BS)
    s.commit(1)

    def fw(seq: int, epoch: int, blocks: int, fill: bytes) -> ForwardedWrite:
        data = fill * (blocks * BS)
        return ForwardedWrite(KIND_WRITE, epoch, seq, seq * BS, len(data), digest_of(data), data)

    batch = [fw(1, 2, 1, b"b"), fw(2, 1, 1, b"c"), fw(3, 2, 4, b"d"), fw(4, 2, 1, b"e"),
             fw(5, 2, 1, b"f"), fw(6, 2, 1, b"g")]
    verdicts = (s.admit_pvm_writes(batch) if path == "admit" else s.buffer_pvm_writes(batch))
    assert verdicts[0] is None and verdicts[3] is None and verdicts[4] is None
    assert isinstance(verdicts[1], StoreError) and "already committed" in str(verdicts[1])
    assert isinstance(verdicts[2], StoreFull) and isinstance(verdicts[5], StoreFull)
    if path == "admit":         # judged, not written
        assert s.buffer_bytes == 0
    else:                       # exactly the three admitted writes land at the commit
        s.commit(2)
        image = image_bytes(d)
        assert [image[i * BS:(i + 1) * BS] for i in range(7)] == [
            b"a" * BS, b"b" * BS, bytes(BS), bytes(BS), b"e" * BS, b"f" * BS, bytes(BS)]
    s.close()


def test_a_recycled_log_never_replays_stale_records_even_of_the_same_epoch(tmp_path):
    """Emptied logs are reused; after a discard the same epoch number can come back. A
    reopen (which finds the valid end by scanning) must not pick up the old records."""
    d = str(tmp_path)
    s = open_store(d)
    for i in range(20):
        s.buffer_pvm_write(2, KIND_WRITE, i * BS, BS, digest_of(b"o" * BS), b"o" * BS)
    s.discard_uncommitted()
    assert [n for n in os.listdir(os.path.join(d, "state")) if n.startswith("spare-")]
    model = bytearray(SIZE)
    buffer_write(s, model, 2, 0, b"n" * BS)
    s.close()
    s = open_store(d)
    buffer_write(s, model, 2, 5 * BS, b"m" * BS)  # appended after the scanned end
    s.commit(2)
    assert image_bytes(d) == bytes(model)
    s.close()


def test_stale_epochs_and_the_buffer_bound_are_refused_and_nothing_is_buffered(tmp_path):
    d = str(tmp_path)
    s = open_store(d, overlay_max=4 * BS, buffer_max=3 * BS)
    s.buffer_pvm_write(1, KIND_WRITE, 0, BS, digest_of(b"a" * BS), b"a" * BS)
    s.commit(1)
    with pytest.raises(StoreError, match="epoch 1.*already committed"):
        s.buffer_pvm_write(1, KIND_WRITE, 0, BS, digest_of(b"b" * BS), b"b" * BS)
    s.buffer_pvm_write(2, KIND_WRITE, 0, 2 * BS, digest_of(b"c" * 2 * BS), b"c" * 2 * BS)
    before = s.buffer_bytes
    with pytest.raises(StoreFull, match="buffer holds"):
        s.buffer_pvm_write(2, KIND_WRITE, 0, BS, digest_of(b"d" * BS), b"d" * BS)
    assert s.buffer_bytes == before
    s.svm_write(0, b"o" * 4 * BS)
    s.svm_write(0, b"p" * 4 * BS)  # rewriting overlay blocks needs no new space
    assert s.counters["overlay_over_bound"] == 0
    # past the overlay's ceiling the SVM's write is taken all the same (an error would
    # stay with the SVM's guest if it took over before the checkpoint), and counted
    s.svm_write(8 * BS, b"q" * BS)
    assert bytes(s.svm_read(8 * BS, BS)) == b"q" * BS
    assert (s.overlay_bytes, s.counters["overlay_over_bound"]) == (5 * BS, 1)
    s.commit(2)
    assert image_bytes(d)[:2 * BS] == b"c" * 2 * BS
    s.close()


def test_a_torn_buffer_record_is_cut_off_at_reopen(tmp_path):
    d = str(tmp_path)
    s = open_store(d)
    model = bytearray(SIZE)
    buffer_write(s, model, 1, 0, b"1" * BS)
    buffer_write(s, model, 1, BS, b"2" * BS)
    s.close()
    log_path = os.path.join(d, "state", "buffer-1.log")
    with open(log_path, "ab") as f:  # the receiver died halfway through an append
        f.write(b"CBR1" + b"\x01" * 40)
    s = open_store(d)
    s.commit(1)
    assert image_bytes(d) == bytes(model)
    s.close()


def test_failover_merges_the_overlay_and_drops_uncommitted_pvm_writes(tmp_path):
    d = str(tmp_path)
    c = DiskCounters()
    s = open_store(d, c)
    s.buffer_pvm_write(1, KIND_WRITE, 0, BS, digest_of(b"P" * BS), b"P" * BS)
    s.svm_write(4 * BS, b"S" * BS)
    s.failover()
    s.failover()  # idempotent
    img = image_bytes(d)
    assert img[4 * BS:5 * BS] == b"S" * BS and img[:BS] == bytes(BS)
    assert s.active and c["failovers"] == 1
    s.svm_write(0, b"A" * BS)  # the SVM now writes the image itself
    assert image_bytes(d)[:BS] == b"A" * BS
    with pytest.raises(StoreError, match="failed over"):
        s.commit(1)
    s.close()
    s = open_store(d)
    assert s.active
    s.close()


_CHILD = textwrap.dedent("""
    import os, sys
    from pipeline.disk.store import SecondaryStore
    d, epoch, what, durable = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    s = SecondaryStore(os.path.join(d, "disk.img"), {size}, {bs}, os.path.join(d, "state"),
                       1 << 40, 1 << 40, durable=durable)
    if what == "failover":  # the overlay only means something inside the running process
        import random
        rng = random.Random(5)
        for _ in range(300):
            s.svm_write(rng.randrange(0, {blocks} - 4) * {bs},
                        rng.randbytes(rng.randint(1, 4) * {bs}))
    for attempt in (1, 2):
        try:
            s.commit(epoch) if what == "commit" else s.failover()
            print("done", flush=True)
            break
        except OSError as e:
            print("error", e.errno, flush=True)   # the coordinator retries; so do we
""").format(size=SIZE, bs=BS, blocks=SIZE // BS)


def _run_child(d: str, epoch: int, what: str, fault: str, durable: bool = True) -> list[str]:
    """A commit (or failover) in a real child process with ``COLO_FAULT=fault``; returns
    the lines it printed. A kill fault must have fired (SIGKILL, and its line on stderr)."""
    env = dict(os.environ, COLO_FAULT=fault)
    p = subprocess.run([sys.executable, "-c", _CHILD, d, str(epoch), what,
                        "1" if durable else "0"], capture_output=True, text=True, env=env,
                       timeout=120)
    if ":errno=" not in fault:
        assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr)
        assert faults.fired_line(fault.split(":")[0]) in p.stderr, p.stderr
    else:
        assert p.returncode == 0, p.stderr
    return p.stdout.split("\n")[:-1]


@pytest.fixture(scope="module")
def commit_template(tmp_path_factory):
    """A store with epoch 1 committed, epochs 2 and 3 buffered (two logs) and an overlay;
    and the expected image at each epoch."""
    rng = random.Random(4)
    template = str(tmp_path_factory.mktemp("commit-template"))
    base = bytearray(rng.randbytes(SIZE))
    with open(os.path.join(template, "disk.img"), "wb") as f:
        f.write(base)
    s = open_store(template)
    models = {0: base}
    for e in (1, 2, 3):
        models[e] = bytearray(models[e - 1])
        random_writes(rng, s, models[e], e, 60 if e > 1 else 20)
    s.commit(1)
    s.svm_write(0, b"S" * 64 * BS)  # an overlay that commit must drop
    s.close()
    return template, models


# (point, the epoch the image is at after the restart, journal_replays at the restart).
# A kill before the "committing" journal state is durable leaves epoch 1 and the logs; from
# the rename of that state until the "committed" state is renamed in, the reopen redoes the
# commit; after that the commit is done and the reopen only tidies up.
COMMIT_POINTS = [
    ("store.commit.log_synced:1", 1, 0),
    ("store.commit.log_synced:2", 1, 0),
    ("store.journal.committing.written", 1, 0),
    ("store.journal.committing.renamed", 3, 1),
    ("store.journal.committing.done", 3, 1),
    ("store.commit.record:1", 3, 1),
    ("store.commit.record:70", 3, 1),
    ("store.commit.image_synced", 3, 1),
    ("store.journal.committed.written", 3, 1),
    ("store.journal.committed.renamed", 3, 0),
    ("store.journal.committed.done", 3, 0),
    ("store.commit.log_dropped:1", 3, 0),
]


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "no-fsync"])
@pytest.mark.parametrize("fault,at_epoch,replays", COMMIT_POINTS,
                         ids=[p[0] for p in COMMIT_POINTS])
def test_commit_killed_at_each_point_reopens_at_exactly_one_checkpoint(
        tmp_path, commit_template, fault, at_epoch, replays, durable):
    """SIGKILL at each named step of a commit of epochs 2..3 (the fsync-free mode must
    survive a killed process just as well): the reopened image is exactly epoch 1 or 3,
    the one the journal says, and the retried commit ends exactly at epoch 3."""
    template, models = commit_template
    work = str(tmp_path / "work")
    shutil.copytree(template, work)
    assert _run_child(work, 3, "commit", fault, durable) == []
    c = DiskCounters()
    s = open_store(work, c)  # the restart: replays an interrupted commit
    assert (s.committed_epoch, c["journal_replays"]) == (at_epoch, replays)
    assert image_bytes(work) == bytes(models[at_epoch])
    logs = sorted(n for n in os.listdir(os.path.join(work, "state")) if n.startswith("buffer"))
    assert logs == ([] if at_epoch == 3 else ["buffer-2.log", "buffer-3.log"])
    s.commit(3)  # the coordinator retries the commit it never heard back about
    assert image_bytes(work) == bytes(models[3])
    assert bytes(s.svm_read(0, BS)) == bytes(models[3][:BS])  # the overlay is gone
    assert c["commits"] == (1 if at_epoch == 1 else 0)
    s.close()


@pytest.mark.parametrize("fault", ["store.commit.log_synced:1:errno=EIO",
                                   "store.journal.committing.written:errno=ENOSPC",
                                   "store.commit.record:30:errno=EIO",
                                   "store.journal.committed.written:errno=EIO"])
def test_a_commit_that_fails_with_an_io_error_can_be_retried(tmp_path, commit_template, fault):
    """A commit whose fsync, journal or image write fails raises the error; the same
    process retries it and ends exactly at the epoch, and a reopen finds it there."""
    template, models = commit_template
    work = str(tmp_path / "work")
    shutil.copytree(template, work)
    code = "5" if "ENOSPC" not in fault else "28"
    assert _run_child(work, 3, "commit", fault) == [f"error {code}", "done"]
    assert image_bytes(work) == bytes(models[3])
    c = DiskCounters()
    s = open_store(work, c)
    assert (s.committed_epoch, c["journal_replays"]) == (3, 0)
    assert not [n for n in os.listdir(os.path.join(work, "state")) if n.startswith("buffer")]
    s.close()


def _failover_model() -> bytearray:
    """The image after the child's failover: zeros plus the SVM's 300 writes."""
    rng = random.Random(5)
    model = bytearray(SIZE)
    for _ in range(300):
        off = rng.randrange(0, SIZE // BS - 4) * BS
        data = rng.randbytes(rng.randint(1, 4) * BS)
        model[off:off + len(data)] = data
    return model


# (point, active after the restart, journal_replays at the restart, merge cut short)
MERGE_POINTS = [
    ("store.failover.bitmap_saved", False, 0, False),
    ("store.journal.merging.written", False, 0, False),
    ("store.journal.merging.renamed", True, 1, False),
    ("store.journal.merging.done", True, 1, False),
    ("store.merge.run:1", True, 1, True),
    ("store.merge.run:100", True, 1, True),
    ("store.merge.image_synced", True, 1, False),
    ("store.journal.active.written", True, 1, False),
    ("store.journal.active.renamed", True, 0, False),
    ("store.journal.active.done", True, 0, False),
]


@pytest.mark.parametrize("fault,active,replays,mid_merge", MERGE_POINTS,
                         ids=[p[0] for p in MERGE_POINTS])
def test_failover_killed_at_each_point_finishes_or_never_began(tmp_path, fault, active,
                                                              replays, mid_merge):
    """SIGKILL at each named step of the failover merge: once the "merging" journal state
    is in place the reopen finishes the merge (the image holds all of the SVM's writes);
    before it, nothing of the overlay reached the image."""
    model = _failover_model()
    work = str(tmp_path / "work")
    os.makedirs(work)
    open_store(work).close()
    assert _run_child(work, 0, "failover", fault) == []
    if mid_merge:   # the kill really landed between runs: part of the overlay is merged
        assert image_bytes(work) not in (bytes(model), bytes(SIZE))
    c = DiskCounters()
    s = open_store(work, c)
    assert (s.active, c["journal_replays"]) == (active, replays)
    assert image_bytes(work) == bytes(model if active else SIZE)
    s.close()


_block = st.integers(0, 63)
_op = st.one_of(
    st.tuples(st.just("pvm"), _block, st.integers(1, 4), st.integers(0, 255)),
    st.tuples(st.just("pvm_zero"), _block, st.integers(1, 4), st.just(0)),
    st.tuples(st.just("svm"), _block, st.integers(1, 4), st.integers(0, 255)),
    st.tuples(st.just("svm_zero"), _block, st.integers(1, 4), st.just(0)),
    st.tuples(st.just("snapshot"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("commit"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=40))
def test_store_matches_a_model_of_image_buffer_and_overlay(tmp_path_factory, ops):
    """Any mix of PVM writes, SVM writes, epoch ends and commits: the image is the PVM's
    disk at the last committed epoch, and the SVM reads image + its own writes."""
    d = str(tmp_path_factory.mktemp("model"))
    size = 64 * BS + 4 * BS
    s = SecondaryStore(os.path.join(d, "disk.img"), size, BS, os.path.join(d, "state"),
                       1 << 30, 1 << 30)
    pvm = bytearray(size)             # the primary's disk, as it is now
    at_snapshot = {0: bytes(size)}    # the primary's disk at the end of each epoch
    svm = bytearray(size)             # what the SVM should read
    epoch, committed = 1, 0
    overlay_blocks: set[int] = set()
    for kind, block, n, byte in ops:
        off, length = block * BS, n * BS
        if kind in ("pvm", "pvm_zero"):
            data = bytes([byte]) * length if kind == "pvm" else None
            buffer_write(s, pvm, epoch, off, data, length)
        elif kind in ("svm", "svm_zero"):
            if kind == "svm":
                s.svm_write(off, bytes([byte]) * length)
            else:
                s.svm_zero(off, length)
            svm[off:off + length] = bytes([byte]) * length
            overlay_blocks.update(range(block, block + n))
        elif kind == "snapshot":
            at_snapshot[epoch] = bytes(pvm)
            epoch += 1
        else:  # commit the newest finished epoch (again: a repeated commit changes nothing)
            e = epoch - 1
            s.commit(e)
            with open(os.path.join(d, "disk.img"), "rb") as f:
                assert f.read() == at_snapshot[e]
            if e > committed:  # the SVM is reset to the checkpoint: its overlay is gone
                svm[:] = at_snapshot[e]
                committed = e
                overlay_blocks.clear()
        assert bytes(s.svm_read(0, size)) == bytes(svm)
        assert s.overlay_bytes == len(overlay_blocks) * BS
    s.close()


def test_a_buffer_log_without_write_order_is_refused_not_half_applied(tmp_path):
    """Logs of the version whose records had no seq cannot be applied in the primary's
    order: opening the store says so instead of committing some order."""
    d = str(tmp_path)
    s = open_store(d)
    buffer_write(s, bytearray(SIZE), 1, 0, b"x" * BS)
    s.close()
    path = os.path.join(d, "state", "buffer-1.log")
    with open(path, "r+b") as f:
        f.write(b"CBL1")
    with pytest.raises(StoreError, match=r"buffer-1\.log was written by an older version"):
        open_store(d)


def test_a_sync_begins_a_new_session_on_an_image_that_was_active_before(tmp_path):
    """The old host of a failed-over pair comes back as a secondary: its store was active
    (its journal says so) and committed epochs of another session. A sync BEGIN (same
    generation: incremental) makes it a secondary's again, with the BEGIN's epoch as the
    base (lower than its old committed epoch here, as after a restarted primary), so the
    new session's writes are buffered and committed. A store that failed over in this
    same process refuses a sync: its image is the running VM's disk."""
    from pipeline.disk.store import StoreError
    d = str(tmp_path)
    gen = os.urandom(32)
    store = open_store(d)
    assert store.begin_sync(gen, 1, 1) == "full"
    store.end_sync(2)
    model = bytearray(SIZE)
    for epoch in range(1, 41):
        buffer_write(store, model, epoch, epoch * BS, bytes([epoch]) * BS)
        store.commit(epoch, covers_seq=2)
    store.failover()
    assert store.active and store.committed_epoch == 40
    with pytest.raises(StoreError, match="failed over"):
        store.begin_sync(gen, 100, 5)
    store.close()
    store = open_store(d)                      # the host comes back
    assert store.active                        # (as its journal says)
    assert store.begin_sync(gen, 100, 5) == "incremental"
    assert not store.active and store.syncing and store.committed_epoch == 4
    store.end_sync(101)
    buffer_write(store, model, 5, 0, b"\x55" * BS)
    store.commit(5, covers_seq=101)
    assert store.committed_epoch == 5 and not store.syncing
    assert image_bytes(d) == bytes(model)
    store.close()


def test_a_write_that_could_not_be_buffered_blocks_every_commit_of_its_epoch_until_a_new_sync(
        tmp_path):
    """The receiver acks a forwarded write its log file could not take (the guest's write
    stands: the primary's image has it) and records it as ``unbuffered``: from then on no
    commit of that epoch or later succeeds here (the secondary ends stale, never a copy
    missing the write); a new sync session clears it. The whole pair: the fault matrix's
    disk-buffer-enospc row."""
    s = open_store(str(tmp_path))
    s.commit(3)
    s.unbuffered = (5, 812, "[Errno 28] No space left on device")
    s.commit(4)                          # before the lost write: still a true checkpoint
    for epoch in (5, 6):
        with pytest.raises(StoreError, match=r"seq 812 of epoch 5 could not be buffered"):
            s.commit(epoch)
    assert s.committed_epoch == 4        # nothing half-committed
    s.begin_sync(b"\x01" * 16, first_seq=900, epoch=7)
    assert s.unbuffered is None


def test_a_commit_skips_a_write_that_a_later_one_of_the_same_extent_overwrites(tmp_path):
    """A block rewritten within the epochs of one commit is applied once (the last write),
    counted; partial overlaps and zeroes still apply in order: the image is the model."""
    c = DiskCounters()
    s = open_store(str(tmp_path), c)
    model = bytearray(SIZE)
    for byte in range(1, 6):                           # the same 8 KiB five times
        buffer_write(s, model, 2 if byte > 3 else 1, 4 * BS, bytes([byte]) * 2 * BS)
    buffer_write(s, model, 2, 5 * BS, b"\x77" * BS)    # overlaps the rewritten extent
    buffer_write(s, model, 2, 8 * BS, None, 2 * BS)    # a ZERO, then data over it
    buffer_write(s, model, 2, 8 * BS, b"\x99" * 2 * BS)
    s.commit(2)
    assert image_bytes(str(tmp_path)) == bytes(model)
    assert c["superseded"] == 4 + 1 and c["commits"] == 1
    s.close()
