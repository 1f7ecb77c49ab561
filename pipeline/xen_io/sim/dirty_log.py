"""Dirty-page logs for the sim guest.

Two implementations with one result shape, *runs* of written pages
(``start_pfns``, ``lengths``, both ``uint64``, sorted, non-adjacent):

* :class:`UffdWriteProtect` + :class:`PagemapScanner` — the kernel keeps the log.
  The guest process registers its RAM mapping with a userfaultfd in
  *asynchronous write-protect* mode (``UFFD_FEATURE_WP_ASYNC``): a write to a
  protected page is resolved by the kernel itself (no fault message, ~0.8 µs),
  which clears the page's uffd-wp bit. Any process allowed to read
  ``/proc/<guest>/pagemap`` then gets-and-clears the written pages with the
  ``PAGEMAP_SCAN`` ioctl (``PM_SCAN_WP_MATCHING`` re-protects what it reports).
  Linux >= 6.7. Writes made through *another* process's mapping of the same
  memfd do not touch the guest's page tables, so they are not reported.
* :class:`DirtyBitmap` — the fallback: a byte per page in shared memory that the
  workload sets after it writes a page.

What a read costs, and why the kernel's log stays the default (``guest.dirty_log =
"auto"``). Measured on 256 MiB (65 536 pages), one process, this 2-core machine at load
14-20 (session 12; CPU time of the call, median of 15): ``PAGEMAP_SCAN`` 0.1-0.2 ms with
nothing written, 0.38-0.55 ms with 1 000 pages written, 0.7-1.5 ms with 4 000, 4.3-8.9
ms with 16 000; the bitmap 0.02-0.04, 0.22-0.26, 0.34-0.35, 0.49-0.61 ms. So the walk of
all of memory is the small part: most of a read is re-protecting each written page
(0.3-0.5 us a page), which already follows the dirty set. Xen's log-dirty (HAP) pays
that differently: ``SHADOW_OP_CLEAN`` copies and clears its bitmap and re-arms the whole
p2m with one lazy type change; each page's protection comes back at its next write, in
the guest's time, not in the pause. The bitmap has that cost's shape (a copy and clear,
the writes' cost left to the writer) and the sim's workload marks every page it writes
at the same boundaries where it can be paused, so no write is lost; but it is the
guest's own account, where the kernel's log (like Xen's) sees every write whoever makes
it: that independent witness is why it stays the default for the sim, tests and
benchmarks, and ``"bitmap"`` is the setting that models Xen's pause cost (pause p50 of a
1k-page checkpoint 1.72-1.75 against 2.24-2.62 ms, session 11).

Constants and struct layouts are from the upstream uapi headers
(``linux/userfaultfd.h``, ``linux/fs.h`` >= 6.7); Debian 12's headers are too old
to have them.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

#: userfaultfd(2) syscall number per architecture
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
UFFD_USER_MODE_ONLY = 1

UFFD_API = 0xAA
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
#: everything the sim guest needs: async WP, unpopulated pages count as protected, shmem
UFFD_FEATURES_NEEDED = (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
                        | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

PAGE_IS_WRITTEN = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _iowr(kind: int, nr: int, size: int) -> int:
    return _ioc(3, kind, nr, size)


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


UFFDIO_API = _iowr(0xAA, 0x3F, ctypes.sizeof(_UffdioApi))                    # 0xc018aa3f
UFFDIO_REGISTER = _iowr(0xAA, 0x00, ctypes.sizeof(_UffdioRegister))          # 0xc020aa00
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, ctypes.sizeof(_UffdioWriteprotect))  # 0xc018aa06
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_PmScanArg))                # 0xc0606610

#: one struct page_region {u64 start, end, categories} per returned range
_REGION_WORDS = 3


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


# -- run helpers ---------------------------------------------------------------

def runs_to_pfns(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Expand runs ``(starts[i], lengths[i])`` into a ``uint64`` array of pfns (vectorized)."""
    starts = np.asarray(starts, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.uint64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.uint64)
    # pfn at output index k of run i = starts[i] + (k - first_index_of_run_i)
    first = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.uint64) + np.repeat(starts - first, lengths.astype(np.int64))


def pfns_to_runs(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group a sorted, duplicate-free pfn array into maximal runs of consecutive pfns."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    if pfns.size == 0:
        empty = np.empty(0, dtype=np.uint64)
        return empty, empty.copy()
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    bounds = np.concatenate(([0], breaks, [pfns.size]))
    return pfns[bounds[:-1]], np.diff(bounds).astype(np.uint64)


def _merge_adjacent(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs [start, end) where one ends exactly where the next starts; returns
    (starts, lengths). Input sorted and non-overlapping (as PAGEMAP_SCAN returns them)."""
    if starts.size == 0:
        return starts, ends - starts
    keep = np.ones(starts.size, dtype=bool)
    keep[1:] = starts[1:] != ends[:-1]
    new_starts = starts[keep]
    # the end of a merged run is the end of the last piece before the next kept start
    last_piece = np.concatenate((np.flatnonzero(keep)[1:] - 1, [starts.size - 1]))
    return new_starts, ends[last_piece] - new_starts


# -- kernel support probe ---------------------------------------------------------

def _open_userfaultfd() -> int:
    nr = _SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        raise OSError(0, f"userfaultfd syscall number unknown for {platform.machine()}")
    flags = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY
    return _check(_libc.syscall(nr, flags), "userfaultfd(UFFD_USER_MODE_ONLY)")


@lru_cache(maxsize=1)
def uffd_wp_async_unsupported_reason() -> str | None:
    """``None`` if this kernel can keep a sim guest's dirty log (userfaultfd async
    write-protect on a shared memfd + PAGEMAP_SCAN); otherwise why not.

    Tries the real thing on a 4-page memfd in this process: register, write two
    pages, scan, expect exactly those two pages, scan again, expect none.
    """
    if mmap.PAGESIZE != 4096 and platform.machine() == "x86_64":
        return f"unexpected system page size {mmap.PAGESIZE}"
    try:
        fd = os.memfd_create("colo-uffd-probe", os.MFD_CLOEXEC)
    except OSError as exc:
        return f"memfd_create failed: {exc}"
    size = 4 * mmap.PAGESIZE
    try:
        os.ftruncate(fd, size)
        region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except OSError as exc:
        os.close(fd)
        return f"mapping a memfd failed: {exc}"
    view = np.frombuffer(region, dtype=np.uint8)
    addr = view.ctypes.data
    wp = None
    scanner = None
    try:
        try:
            wp = UffdWriteProtect(addr, size)
        except OSError as exc:
            return f"userfaultfd async write-protect unavailable (needs Linux >= 6.7): {exc}"
        view[1 * mmap.PAGESIZE] = 1
        view[3 * mmap.PAGESIZE] = 1
        try:
            scanner = PagemapScanner("self", addr, size, mmap.PAGESIZE, max_regions=16)
            starts, lengths = scanner.read_and_clear_runs()
            again = scanner.read_and_clear_runs()
        except OSError as exc:
            return f"PAGEMAP_SCAN on /proc/self/pagemap failed (needs Linux >= 6.7): {exc}"
        got = runs_to_pfns(starts, lengths).tolist()
        if got != [1, 3] or again[0].size != 0:
            return (f"PAGEMAP_SCAN reported pages {got} then {again[0].tolist()}, "
                    f"expected [1, 3] then []")
        return None
    finally:
        if scanner is not None:
            scanner.close()
        if wp is not None:
            wp.close()
        del view
        region.close()
        os.close(fd)


# -- kernel-kept log ----------------------------------------------------------------

class UffdWriteProtect:
    """The guest side: a userfaultfd that write-protects ``[addr, addr + size)`` of *this*
    process asynchronously. Keep it open for as long as the log is wanted."""

    def __init__(self, addr: int, size: int) -> None:
        self.fd = _open_userfaultfd()
        try:
            api = _UffdioApi(UFFD_API, UFFD_FEATURES_NEEDED, 0)
            _check(_libc.ioctl(self.fd, UFFDIO_API, ctypes.byref(api)),
                   f"UFFDIO_API(features={UFFD_FEATURES_NEEDED:#x})")
            reg = _UffdioRegister(_UffdioRange(addr, size), UFFDIO_REGISTER_MODE_WP, 0)
            _check(_libc.ioctl(self.fd, UFFDIO_REGISTER, ctypes.byref(reg)),
                   f"UFFDIO_REGISTER({addr:#x}, {size})")
            self.protect(addr, size)
        except OSError:
            os.close(self.fd)
            raise

    def protect(self, addr: int, size: int) -> None:
        """Mark the whole range clean (write-protected)."""
        wp = _UffdioWriteprotect(_UffdioRange(addr, size), UFFDIO_WRITEPROTECT_MODE_WP)
        _check(_libc.ioctl(self.fd, UFFDIO_WRITEPROTECT, ctypes.byref(wp)),
               f"UFFDIO_WRITEPROTECT({addr:#x}, {size})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PagemapScanner:
    """Reads and clears the written pages of ``[addr, addr + size)`` in process ``pid``
    (which registered that range with :class:`UffdWriteProtect`). One per reading process."""

    def __init__(self, pid: int | str, addr: int, size: int, page_size: int,
                 max_regions: int = 1 << 16) -> None:
        if page_size != mmap.PAGESIZE:
            raise ValueError(f"PAGEMAP_SCAN works in {mmap.PAGESIZE}-byte pages, not {page_size}")
        self.path = f"/proc/{pid}/pagemap"
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.addr = addr
        self.size = size
        self.page_size = page_size
        # page_region vector, decoded with numpy in place (no per-region Python objects)
        self._vec = np.zeros((max_regions, _REGION_WORDS), dtype=np.uint64)
        self._arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg),
                               flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                               vec=self._vec.ctypes.data, vec_len=max_regions,
                               category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)

    def read_and_clear_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Runs of pages written since the last call, as (start pfns, lengths); re-protects them."""
        starts, lengths, _ = self._scan(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC)
        return starts, lengths

    def read_and_clear_pfns(self) -> np.ndarray:
        """:meth:`read_and_clear_runs` as a sorted ``uint64`` array of pfns: the kernel's
        ranges expanded as they come (merged first, then expanded, cost ~15 us more a read
        of 1000 pages, on each node's pause, for the same pfns)."""
        starts, ends, _ = self._scan_ranges(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC)
        return runs_to_pfns(starts, ends - starts)

    def read_and_clear_part(self, from_pfn: int, max_pages: int
                            ) -> tuple[np.ndarray, np.ndarray, int]:
        """:meth:`read_and_clear_runs` of at most ``max_pages`` written pages from page
        ``from_pfn`` on: (start pfns, lengths, the page the walk stopped at, page_count
        when it reached the end). The pages after it stay in the log. Reading a running
        guest's log in parts lets the reader look for other work between them."""
        return self._scan(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, from_pfn, max_pages)

    def count(self) -> int:
        """Pages written since the last read_and_clear_runs, without clearing them."""
        _, lengths, _ = self._scan(PM_SCAN_CHECK_WPASYNC)
        return int(lengths.sum())

    def _scan(self, flags: int, from_pfn: int = 0, max_pages: int = 0
              ) -> tuple[np.ndarray, np.ndarray, int]:
        """(start pfns, lengths) of the written runs, adjacent ones merged, and where the
        walk stopped (:meth:`_scan_ranges`)."""
        starts, ends, next_pfn = self._scan_ranges(flags, from_pfn, max_pages)
        return (*_merge_adjacent(starts, ends), next_pfn)

    def _scan_ranges(self, flags: int, from_pfn: int = 0, max_pages: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, int]:
        """The kernel's ranges of written pages as (start pfns, end pfns), sorted and
        disjoint, and the page the walk stopped at."""
        self._arg.flags = flags
        end = self.addr + self.size
        start = self.addr + from_pfn * self.page_size
        pieces = []
        arg = self._arg
        arg.max_pages = max_pages       # (0: no limit)
        shift = self.page_size.bit_length() - 1
        stopped = end
        while start < end:
            arg.start, arg.end, arg.walk_end = start, end, 0
            n = _check(_libc.ioctl(self.fd, PAGEMAP_SCAN, ctypes.byref(arg)),
                       f"PAGEMAP_SCAN on {self.path} [{start:#x}, {end:#x})")
            if n:
                pieces.append(self._vec[:n, :2].copy())
            if max_pages:
                # one call only: it stops at max_pages pages (walk_end: where), at a full
                # vector, or at the end
                stopped = min(end, arg.walk_end or end)
                break
            if n < arg.vec_len or arg.walk_end >= end:
                break
            start = arg.walk_end  # the vector filled up: go on where the walk stopped
        next_pfn = (stopped - self.addr) >> shift
        if not pieces:
            empty = np.empty(0, dtype=np.uint64)
            return empty, empty.copy(), next_pfn
        ranges = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        starts = (ranges[:, 0] - np.uint64(self.addr)) >> np.uint64(shift)
        ends = (ranges[:, 1] - np.uint64(self.addr)) >> np.uint64(shift)
        return starts, ends, next_pfn

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- workload-kept log ---------------------------------------------------------------

class DirtyBitmap:
    """A byte per page in shared memory; the guest sets it *after* writing the page, the
    pipeline reads and clears. Setting after the write makes a read-and-clear racing with
    a running guest err on the side of reporting a page again, never of losing a write."""

    def __init__(self, buffer: memoryview | mmap.mmap, page_count: int) -> None:
        self.bytes = np.frombuffer(buffer, dtype=np.uint8, count=page_count)

    @staticmethod
    def size_for(page_count: int) -> int:
        return page_count

    def mark(self, pfn: int) -> None:
        self.bytes[pfn] = 1

    def clear_all(self) -> None:
        self.bytes[:] = 0

    def count(self) -> int:
        return int(np.count_nonzero(self.bytes))

    def read_and_clear_runs(self) -> tuple[np.ndarray, np.ndarray]:
        return pfns_to_runs(self.read_and_clear_pfns())

    def read_and_clear_pfns(self) -> np.ndarray:
        # a copy first: numpy refuses to count non-zeros in a buffer another process is
        # writing. A mark set again between the copy and the clear is lost, but harmless:
        # the caller reads the page's content after this returns, so that write is in it.
        pfns = np.flatnonzero(self.bytes.copy()).astype(np.uint64)
        self.bytes[pfns] = 0
        return pfns
