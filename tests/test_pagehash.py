"""The many-page blake3 kernel (pipeline._pagehash, csrc/pagehash.c): every digest is the
blake3 package's digest of that page, whatever the count, the rows picked or the content;
bad arguments are refused by name before anything is written."""
from __future__ import annotations

import blake3
import numpy as np
import pytest

from pipeline.stages import common


def _reference(pages: np.ndarray) -> np.ndarray:
    return np.array([np.frombuffer(blake3.blake3(p).digest(), np.uint8) for p in pages],
                    np.uint8).reshape(-1, 32)


def test_the_install_built_the_kernel():
    # pip install (scripts/install.sh, CI) compiles it (setup.py); without it every page
    # costs a Python call again and the page path is several times slower
    assert common._pagehash is not None, "pipeline._pagehash is not built: pip install -e ."
    assert common._pagehash.simd_degree() >= 1


@pytest.mark.parametrize("n", [0, 1, 15, 16, 63, 64, 65, 300])
def test_digests_equal_blake3s_for_every_count(n):
    rng = np.random.default_rng(n)
    pages = rng.integers(0, 256, (n, 4096), dtype=np.uint8)
    if n > 2:
        pages[2] = 0                              # a zero page
        pages[1] = np.arange(4096) % 251          # a page with a pattern
    got = common.hash_pages(pages)
    assert got.shape == (n, 32)
    assert np.array_equal(got, _reference(pages))


def test_rows_pick_pages_in_any_order_and_repeat():
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, (200, 4096), dtype=np.uint8)
    ref = _reference(pages)
    rows = np.array([199, 0, 7, 7, 150, *range(100, 170)], np.int64)
    assert np.array_equal(common.hash_pages(pages, rows), ref[rows])
    # the pipeline's row indexes come as uint64 pfns or flatnonzero's int64
    assert np.array_equal(common.hash_pages(pages, rows.astype(np.uint64)), ref[rows])
    assert np.array_equal(common.hash_pages_each(pages, rows), ref[rows])


def test_other_page_sizes_are_hashed_one_call_a_page():
    rng = np.random.default_rng(6)
    pages = rng.integers(0, 256, (10, 8192), dtype=np.uint8)
    assert np.array_equal(common.hash_pages(pages), _reference(pages))


def test_bad_arguments_are_refused_and_nothing_is_written():
    ph = common._pagehash
    pages = np.zeros((4, 4096), np.uint8)
    out = np.full((2, 32), 7, np.uint8)
    with pytest.raises(IndexError, match="row 4 out of range .4 pages"):
        ph.hash_pages(pages, np.array([0, 4], np.int64), out)
    with pytest.raises(IndexError, match="row -1 out of range"):
        ph.hash_pages(pages, np.array([-1, 0], np.int64), out)
    assert (out == 7).all(), "a refused call wrote digests"
    with pytest.raises(ValueError, match="out holds 64 bytes, not 128"):
        ph.hash_pages(pages, None, out)
    with pytest.raises(ValueError, match="not whole 4096-byte pages"):
        ph.hash_pages(np.zeros(5000, np.uint8), None, out)
    with pytest.raises(ValueError, match="not int64 indexes"):
        ph.hash_pages(pages, np.zeros(3, np.uint8), out)
    with pytest.raises(ValueError, match="not C-contiguous"):
        ph.hash_pages(pages, None, np.zeros((4, 32), np.uint8)[:, :1].T)  # not contiguous
    assert (out == 7).all()


_AT_THE_END_OF_A_MAPPING = r"""
import ctypes, mmap, sys
import blake3
import numpy as np
from pipeline.stages import common

PAGE, N = 4096, 16
# N pages, then a page nobody may read: the buffer ends where its mapping ends, as the
# SVM's memory does where the restore stage and the secondary coordinator hash it in place
region = mmap.mmap(-1, (N + 1) * PAGE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(addr + N * PAGE, PAGE, 0) == 0        # PROT_NONE
pages = np.frombuffer(region, np.uint8, N * PAGE).reshape(N, PAGE)
pages[:] = np.random.default_rng(3).integers(0, 256, pages.shape, dtype=np.uint8)
want = [blake3.blake3(p).digest() for p in pages]
for n in range(1, N + 1):                   # every count, the last page at every place
    for at in range(n):
        rows = [r for r in range(n - 1)]
        rows.insert(at, N - 1)
        got = common.hash_pages(pages, np.array(rows, np.int64))
        assert [bytes(h) for h in got] == [want[r] for r in rows], (n, at)
got = common.hash_pages(pages[N - 3:])      # no rows: the buffer's last page hashed too
assert [bytes(h) for h in got] == want[N - 3:]
print("ok")
"""


def test_the_last_page_of_a_buffer_that_ends_its_mapping_is_hashed_without_reading_past_it():
    """blake3's AVX2 kernel, for fewer than 8 inputs, loads 32 bytes where it wants the last
    16 of a block: 16 bytes past a chunk's end. Past the last page of guest memory mapped on
    its own that was unmapped memory: the restore stage died of SIGSEGV in
    blake3_hash_many_avx2 checking the SVM's pages (the fault matrix, session 14: its core
    showed the 32-byte load at the mapping's last 16 bytes; session 12's two restore
    crashes fit). A child process, so that a crash fails this test and not the run."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _AT_THE_END_OF_A_MAPPING], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", \
        (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
