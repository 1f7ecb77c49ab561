"""The disk sync's progress: the entry node info and ``stats`` show, and the bar a command
that waits for the sync draws on a terminal only (a pty here, a pipe for the log case);
why a sync that failed gave the replication up."""
from __future__ import annotations

import os

from conftest import free_port, wait_until

from pipeline.disk.progress import (SYNC_DONE, SYNC_RUNNING, NodeInfoNote, SyncBar,
                                    describe, describe_given_up, sync_progress)
from pipeline.disk.settings import DiskSettings
from pipeline.stages.disk import PrimaryDisk

MiB = 1 << 20


def counters(**kw) -> dict:
    base = {"syncs": 1, "sync_total": 16 * MiB, "sync_done": 4 * MiB, "sync_bytes": 2 * MiB,
            "sync_rate_kib_s": 100 * 1024, "sync_incremental": 1, "sync_state": SYNC_RUNNING,
            "sync_ms": 0}
    return {**base, **kw}


def test_the_entry_has_total_done_sent_rate_and_state():
    assert sync_progress({"syncs": 0, "sync_total": 0}) is None   # never synced
    p = sync_progress(counters())
    assert p == {"kind": "incremental", "state": "running", "total": 16 * MiB,
                 "done": 4 * MiB, "sent": 2 * MiB, "rate_mb_s": 104.9, "ms": 0, "syncs": 1}
    line = describe(p)
    assert "incremental running: 4 of 16 MiB (25%)" in line and "104.9 MB/s" in line
    done = sync_progress(counters(sync_done=16 * MiB, sync_state=SYNC_DONE, sync_ms=150,
                                  sync_incremental=0))
    assert done["kind"] == "full" and done["state"] == "done"
    assert describe(done).endswith("150 ms")


def test_the_node_info_note_writes_only_changes():
    seen = []
    current = counters()
    note = NodeInfoNote(lambda: current, period_s=0)
    note.update(lambda **kw: seen.append(kw))
    note.update(lambda **kw: seen.append(kw))          # unchanged: not written again
    current = counters(sync_done=8 * MiB)
    note.update(lambda **kw: seen.append(kw))
    assert [s["disk_sync"]["done"] for s in seen] == [4 * MiB, 8 * MiB]


def test_the_bar_is_drawn_on_a_terminal_and_nowhere_else():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = SyncBar(tty)
        bar.show(sync_progress(counters()))
        bar.show(sync_progress(counters(sync_done=16 * MiB)))
        bar.end()
    chunks = []
    while True:            # a pty hands out what was written in pieces; EIO once drained
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    out = b"".join(chunks).decode()
    assert out.count("\rdisk sync") == 2 and "[##########" in out and "100.0%" in out
    assert out.endswith("\n") or out.endswith("\r\n")
    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe:
        bar = SyncBar(pipe)
        bar.show(sync_progress(counters()))
        bar.end()
    with os.fdopen(r) as f:
        assert f.read() == ""


def test_a_sync_the_secondary_never_answers_is_given_up_with_its_reason(tmp_path):
    """The initial sync's BEGIN gets no answer (nothing listens at the secondary's
    address) within the forward timeout: the sync fails and the primary disk stage keeps
    why, which ``stats`` returns (the coordinator copies it into the node info as
    ``disk_given_up`` when it sees the secondary lost) and ``stats`` prints."""
    pri = PrimaryDisk(DiskSettings(image=str(tmp_path / "p.img"), export_size=MiB,
                                   export=f"unix:{tmp_path}/p.sock",
                                   forward=f"tcp://127.0.0.1:{free_port()}",
                                   forward_timeout_ms=300))
    try:
        wait_until(lambda: pri.backend.given_up is not None, 60, "the sync given up")
        given_up = pri.command("stats", {})["given_up"]
        assert given_up["cause"] == "sync" and "no ack from the secondary within 300 ms" \
            in given_up["reason"], given_up
        line = describe_given_up(given_up)
        assert line.startswith("disk replication given up") and "(sync, epoch 1)" in line \
            and "no ack from the secondary" in line, line
    finally:
        pri.close()
