"""The disk stage keeps the memory of the request buffers it frees (glibc mallopt): a
1 MiB write's buffer comes from the heap, not from a fresh mmap whose every page the
kernel must fault in and zero again (pipeline.stages.disk.keep_freed_buffers)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent("""
    import ctypes, sys
    from pipeline.stages.disk import keep_freed_buffers
    if sys.argv[1] == "keep":
        assert keep_freed_buffers()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(1 << 20)
    # glibc's chunk header, just below the pointer: its size field's bit 1 is IS_MMAPPED
    size_field = ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value
    libc.free(p)
    print("mmapped" if size_field & 2 else "heap")
""")


def _where_1mib_comes_from(mode: str) -> str:
    p = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_a_stage_process_takes_1_mib_buffers_from_the_heap_not_fresh_mmaps():
    if _where_1mib_comes_from("default") != "mmapped":
        pytest.skip("this C library does not mmap a fresh process's 1 MiB allocations")
    assert _where_1mib_comes_from("keep") == "heap"
