"""Dirty-page logs: run helpers, the kernel-kept log (userfaultfd async WP + PAGEMAP_SCAN,
in-process and across processes on a shared memfd) and the bitmap."""
from __future__ import annotations

import mmap
import os
import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.xen_io.sim.dirty_log import (DirtyBitmap, PagemapScanner, UffdWriteProtect,
                                       pfns_to_runs, runs_to_pfns,
                                       uffd_wp_async_unsupported_reason)

PAGE = mmap.PAGESIZE

needs_uffd = pytest.mark.skipif(
    uffd_wp_async_unsupported_reason() is not None,
    reason=f"kernel cannot keep a uffd-wp dirty log: {uffd_wp_async_unsupported_reason()}")


@given(st.sets(st.integers(0, 5000), max_size=300))
@settings(max_examples=60, deadline=None)
def test_runs_round_trip_any_pfn_set(pfn_set: set[int]) -> None:
    pfns = np.array(sorted(pfn_set), dtype=np.uint64)
    starts, lengths = pfns_to_runs(pfns)
    assert starts.dtype == np.uint64 and lengths.dtype == np.uint64
    # runs are maximal: no run ends where the next one starts
    assert np.all(starts[1:] > starts[:-1] + lengths[:-1])
    assert np.array_equal(runs_to_pfns(starts, lengths), pfns)


def test_runs_of_known_set() -> None:
    starts, lengths = pfns_to_runs(np.array([1, 2, 3, 7, 9, 10]))
    assert starts.tolist() == [1, 7, 9] and lengths.tolist() == [3, 1, 2]
    assert runs_to_pfns(np.array([], dtype=np.uint64), np.array([], dtype=np.uint64)).size == 0


class _SharedRegion:
    """A memfd mapped MAP_SHARED in this process, as the sim guest's RAM is."""

    def __init__(self, pages: int) -> None:
        fd = os.memfd_create("colo-test-dirty", os.MFD_CLOEXEC)
        os.ftruncate(fd, pages * PAGE)
        self.map = mmap.mmap(fd, pages * PAGE, flags=mmap.MAP_SHARED)
        os.close(fd)
        self.map.madvise(mmap.MADV_NOHUGEPAGE)
        self.view = np.frombuffer(self.map, dtype=np.uint8).reshape(pages, PAGE)
        self.addr = self.view.ctypes.data
        self.size = pages * PAGE

    def close(self) -> None:
        del self.view
        self.map.close()


@needs_uffd
def test_uffd_log_reports_exactly_the_written_pages_and_clears_them() -> None:
    region = _SharedRegion(512)
    wp = UffdWriteProtect(region.addr, region.size)
    scanner = PagemapScanner("self", region.addr, region.size, PAGE)
    try:
        assert scanner.read_and_clear_runs()[0].size == 0
        written = [0, 1, 2, 3, 100, 101, 300, 511]
        for pfn in written:
            region.view[pfn, 17] = 5
        region.view[200, 0]  # a read is not a write
        starts, lengths = scanner.read_and_clear_runs()
        assert runs_to_pfns(starts, lengths).tolist() == written
        assert starts.tolist() == [0, 100, 300, 511] and lengths.tolist() == [4, 2, 1, 1]
        assert scanner.read_and_clear_runs()[0].size == 0  # cleared
        region.view[2, 0] = 1  # written again after the clear: reported again
        assert runs_to_pfns(*scanner.read_and_clear_runs()).tolist() == [2]
    finally:
        scanner.close()
        wp.close()
        region.close()


@needs_uffd
def test_uffd_scan_continues_when_the_region_vector_fills() -> None:
    region = _SharedRegion(2048)
    wp = UffdWriteProtect(region.addr, region.size)
    scanner = PagemapScanner("self", region.addr, region.size, PAGE, max_regions=7)
    try:
        written = np.arange(0, 2048, 3)  # 683 isolated pages: ~100 ioctls of 7 regions
        region.view[written, 0] = 1
        assert np.array_equal(runs_to_pfns(*scanner.read_and_clear_runs()), written)
    finally:
        scanner.close()
        wp.close()
        region.close()


@needs_uffd
def test_uffd_log_of_another_process_excludes_writes_through_our_mapping() -> None:
    """The guest registers in its own process; the pipeline scans its pagemap and writes the
    same memfd through its own mapping, which must not show up in the guest's log."""
    region = _SharedRegion(256)
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            child_wp = UffdWriteProtect(region.addr, region.size)
            os.write(to_parent_w, b"r")
            assert os.read(to_child_r, 1) == b"w"
            for pfn in (5, 6, 7, 90):
                region.view[pfn, 0] = 9
            os.write(to_parent_w, b"d")
            os.read(to_child_r, 1)  # hold the uffd open until the parent has scanned
            child_wp.close()
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(to_child_r)
    os.close(to_parent_w)
    scanner = None
    try:
        assert os.read(to_parent_r, 1) == b"r"
        scanner = PagemapScanner(pid, region.addr, region.size, PAGE)
        region.view[40:44] = 3  # the "pipeline" restores pages through its own mapping
        os.write(to_child_w, b"w")
        assert os.read(to_parent_r, 1) == b"d"
        assert runs_to_pfns(*scanner.read_and_clear_runs()).tolist() == [5, 6, 7, 90]
        assert region.view[5, 0] == 9  # same memory: the child's writes are visible here
        assert scanner.read_and_clear_runs()[0].size == 0
        os.write(to_child_w, b"x")
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        if scanner is not None:
            scanner.close()
        for fd in (to_parent_r, to_child_w):
            os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        region.close()


def test_pagemap_scanner_rejects_a_foreign_page_size() -> None:
    with pytest.raises(ValueError, match="8192"):
        PagemapScanner("self", 0, 8192, 8192)


def test_bitmap_reads_and_clears_marked_pages_as_runs() -> None:
    region = mmap.mmap(-1, 1000)
    bitmap = DirtyBitmap(region, 1000)
    for pfn in (3, 4, 5, 999, 10):
        bitmap.mark(pfn)
    starts, lengths = bitmap.read_and_clear_runs()
    assert starts.tolist() == [3, 10, 999] and lengths.tolist() == [3, 1, 1]
    assert bitmap.read_and_clear_runs()[0].size == 0
    del bitmap
    region.close()


@needs_uffd
def test_uffd_log_read_in_parts_gives_each_page_once_and_says_where_it_stopped() -> None:
    """read_and_clear_part (the snapshot stage's prescan of a running PVM): at most
    ``max_pages`` written pages a call, from where the last one stopped; together every
    written page once, and the log clean after."""
    region = _SharedRegion(2048)
    wp = UffdWriteProtect(region.addr, region.size)
    scanner = PagemapScanner("self", region.addr, region.size, PAGE)
    try:
        written = np.unique(np.r_[np.arange(0, 300), np.arange(500, 2048, 7), [2047]])
        region.view[written, 0] = 1
        parts, at = [], 0
        while at < 2048:
            starts, lengths, stop = scanner.read_and_clear_part(at, 64)
            part = runs_to_pfns(starts, lengths)
            assert len(part) <= 64 and at < stop <= 2048
            assert (part >= at).all() and (part < stop).all()
            parts.append(part)
            at = stop
        assert len(parts) == -(-len(written) // 64)
        assert np.array_equal(np.concatenate(parts), written)
        assert scanner.read_and_clear_runs()[0].size == 0
    finally:
        scanner.close()
        wp.close()
        region.close()


@needs_uffd
@pytest.mark.parametrize("max_regions", [7, 1 << 16])
def test_uffd_log_read_as_pfns_gives_the_written_pages_sorted_once(max_regions) -> None:
    """read_and_clear_pfns (SimDomain.read_and_clear_dirty, both nodes' pauses) expands the
    kernel's ranges as they come, unmerged: the same pfns as the runs, each once, sorted,
    also when a full region vector splits a run of pages between two ioctls."""
    region = _SharedRegion(2048)
    wp = UffdWriteProtect(region.addr, region.size)
    scanner = PagemapScanner("self", region.addr, region.size, PAGE, max_regions=max_regions)
    try:
        rng = np.random.default_rng(max_regions)
        blocks = rng.choice(256, 40, replace=False)
        written = np.unique(np.concatenate([np.arange(b * 8, b * 8 + 8) for b in blocks]
                                           + [rng.choice(2048, 100, replace=False)]))
        region.view[written, 5] = 1
        got = scanner.read_and_clear_pfns()
        assert got.dtype == np.uint64 and got.tolist() == written.tolist()
        assert scanner.read_and_clear_pfns().size == 0       # cleared
        region.view[written[:3], 0] = 2
        assert scanner.read_and_clear_pfns().tolist() == written[:3].tolist()
    finally:
        scanner.close()
        wp.close()
        region.close()


def test_bitmap_reads_and_clears_marked_pages_as_pfns() -> None:
    region = mmap.mmap(-1, 1000)
    bitmap = DirtyBitmap(region, 1000)
    for pfn in (3, 4, 5, 999, 10):
        bitmap.mark(pfn)
    pfns = bitmap.read_and_clear_pfns()
    assert pfns.dtype == np.uint64 and pfns.tolist() == [3, 4, 5, 10, 999]
    assert bitmap.read_and_clear_pfns().size == 0
    del bitmap, pfns
    region.close()
