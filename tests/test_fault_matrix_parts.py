"""Parts of the fault matrix that must be right for its verdicts to mean anything: the
disk-prefix check that tells one checkpoint from a half-applied epoch, and the named
point ``store.buffer.append`` that its buffering row fails (scripts/fault_matrix.py)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

from pipeline import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import fault_matrix as fm  # noqa: E402


def _image(indices: list[int]) -> bytes:
    """The disk after exactly the writes of the stream at ``indices`` (in that order)."""
    img = bytearray(fm.DISK_MIB << 20)
    rng = random.Random(fm.SEED)
    writes = [fm.disk_write(rng) for _ in range(max(indices) + 1)] if indices else []
    for i in indices:
        offset, data = writes[i]
        img[offset:offset + len(data)] = data
    return bytes(img)


def test_disk_prefix_names_the_checkpoint_a_disk_holds():
    assert fm.disk_prefix(_image([]), 10) == 0
    assert fm.disk_prefix(_image(list(range(37))), 100) == 37
    assert fm.disk_prefix(_image(list(range(37))), 36) is None     # more than allowed


def test_disk_prefix_refuses_a_half_applied_epoch():
    # writes 0..29 and 35..39: an epoch (30..39) applied in part, never a checkpoint
    assert fm.disk_prefix(_image(list(range(30)) + list(range(35, 40))), 100) is None
    # one write of the middle missing (a record lost from a replayed log)
    assert fm.disk_prefix(_image([i for i in range(40) if i != 17]), 100) is None


_CHILD = textwrap.dedent("""
    import os, sys
    from pipeline.disk.store import SecondaryStore
    from pipeline.disk.wire import KIND_WRITE, ForwardedWrite, digest_of
    d = sys.argv[1]
    s = SecondaryStore(os.path.join(d, "disk.img"), 1 << 20, 4096, os.path.join(d, "state"),
                       1 << 30, 1 << 30, durable=False)
    def w(seq):
        data = bytes([seq]) * 4096
        return ForwardedWrite(KIND_WRITE, 1, seq, seq * 4096, 4096, digest_of(data), data)
    for batch in ([w(1), w(2)], [w(3), w(4)], [w(5)]):
        print(" ".join(type(e).__name__ + (f"({e.errno})" if isinstance(e, OSError) else "")
                       for e in s.buffer_pvm_writes(batch)), flush=True)
    print("buffered", s.buffer_bytes, flush=True)
""")


def test_store_buffer_append_fails_one_append_with_the_errno():
    """``store.buffer.append:2:errno=ENOSPC``: the second append of forwarded writes fails
    with ENOSPC for each of its writes and buffers nothing of them; the first and third
    go in (the row's fault is exactly one failed append)."""
    import errno
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, COLO_FAULT="store.buffer.append:2:errno=ENOSPC",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-c", _CHILD, d], capture_output=True,
                           text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert faults.fired_line("store.buffer.append", 2, "errno=ENOSPC") in p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "NoneType NoneType"
    assert lines[1] == f"OSError({errno.ENOSPC}) OSError({errno.ENOSPC})"
    assert lines[2] == "NoneType"
    from pipeline.disk.store import LOG_HEADER, RECORD     # one log: its header, 3 records
    assert lines[3] == f"buffered {LOG_HEADER.size + 3 * (RECORD.size + 4096)}"
