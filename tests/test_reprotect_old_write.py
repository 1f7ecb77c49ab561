"""A guest write ordered before a re-protection's sync began, forwarded only after it.

The fault matrix's partition-one-way-secondary-to-primary row once failed a guest's write
with EIO: the write took its place in the write order while the pair was protected, the
pair went unprotected (the secondary's acks cut off) and was re-protected once the link
healed; the write's forward went out only after the new sync's BEGIN, the secondary
refused it as another session's ("from before this sync"), and that refusal beat the
primary's release of writes of a lost session. The sync that began after the write
carries it (each chunk is read once the earlier writes it overlaps are in the primary's
image): its refusal must release it, never fail it.

The interleaving is forced at a named point, ``PrimaryBackend.after_ordering`` (a test
hook: the write has its seq, its forward is not queued yet): both disk stages run in this
process, a real NBD client (qemu-io), real ZeroMQ over tcp://127.0.0.1.
"""
from __future__ import annotations

import shutil
import subprocess
import threading

import pytest

from test_disk_replication import BS, SIZE, _checkpoint, file_hash, wait_for

from pipeline.disk.settings import DiskSettings
from pipeline.stages.disk import PrimaryDisk, SecondaryDisk

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None,
                                reason="qemu-io (Debian qemu-utils) is not installed")


def test_a_write_of_the_lost_session_forwarded_after_the_new_sync_began_never_fails(tmp_path):
    a, b = tmp_path / "primary.img", tmp_path / "secondary.img"
    common = dict(export_size=SIZE, block_size=BS, compare="off")
    sec = SecondaryDisk(DiskSettings(image=str(b), export=f"unix:{tmp_path}/s.sock",
                                     forward="tcp://127.0.0.1:*", **common))
    pri = PrimaryDisk(DiskSettings(image=str(a), export=f"unix:{tmp_path}/p.sock",
                                   forward=sec.forward_endpoint, **common))
    writer = None
    ordered, release = threading.Event(), threading.Event()
    held: list[int] = []

    def hold_the_write(seq: int, epoch: int) -> None:      # the named point
        if not held:
            held.append(seq)
            ordered.set()
            assert release.wait(60)

    try:
        _checkpoint(pri, sec, 1)                            # protected, in sync
        pri.backend.after_ordering = hold_the_write
        writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k",
                                   pri.uri], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        assert ordered.wait(30), "the write never reached the ordering point"
        # the write has its seq in this session; now the pair goes unprotected (a
        # partition: the secondary's acks were lost) and, healed, the primary re-protects
        # the same secondary: the new sync's BEGIN is ordered after the write
        pri.on_event("role", 2, {"role": "unprotected"})
        pri.on_event("role", 2, {"role": "primary"})
        wait_for(lambda: pri.backend.session_open.is_set()
                 and sec.receiver.session_begin > held[0], 30,
                 "the secondary to take the new sync's BEGIN")
        release.set()      # the write's forward goes out now, into the new session
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "error" not in out.lower(), out
        # it reached the secondary and was refused there as the old session's ...
        wait_for(lambda: sec.counters["bad_forwards"] >= 1, 30, "the refusal counted")
        # ... which failed nothing: the sync carried the write
        assert pri.counters["forward_errors"] == 0
        _checkpoint(pri, sec, 2)
        assert pri.backend.wait_forwarded(2, 30), dict(pri.backend._inflight)
        assert file_hash(str(a)) == file_hash(str(b))
    finally:
        release.set()
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        pri.close()
        sec.close()
