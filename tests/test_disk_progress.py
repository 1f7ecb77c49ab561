"""The disk sync's progress: the entry node info and ``stats`` show, and the bar a command
that waits for the sync draws on a terminal only (a pty here, a pipe for the log case)."""
from __future__ import annotations

import os

from pipeline.disk.progress import (SYNC_DONE, SYNC_RUNNING, NodeInfoNote, SyncBar,
                                    describe, sync_progress)

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
