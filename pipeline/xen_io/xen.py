"""The ``xen`` backend: a real Xen domain (PVH or HVM) driven through libxenctrl via ctypes.

No compiler is needed: the libraries come from Debian (``xen-utils-4.17`` at run
time, ``libxen-dev`` for the header checks in the tests). Struct layouts and pure
helpers live in :mod:`pipeline.xen_io.xen_ctypes`.

Pairing a primary with a secondary ("twin" method, see docs/xen-lab.md): save
the primary once with ``xl save``, then ``xl restore`` that image twice, under
the primary's and the secondary's names, so both domains run the guest's resume
path and Xen holds the same event-channel bindings for both.

Per checkpoint the secondary keeps its own shared_info frame (Xen's per-domain
page: event-channel pending bits and vcpu_info), and after its HVM context is
replaced its vCPU is woken with the event upcall vector pending (see
:meth:`XenDomain.set_vcpu_state`).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from . import xen_ctypes as xc_
from .base import Domain, DomainError
from .xen_ctypes import (
    DEFAULT_UPCALL_VECTOR,
    PAGE_SIZE,
    PRIVCMD_PATH,
    DomainInfo,
    XcHypercallBuffer,
    XenDomctlGetDomainInfo,
    XenShadowOpStats,
    bitmap_to_pfns,
    call_error,
    check_replicable,
    mark_vector_pending,
    msi_for_vector,
    require_dom0,
)

log = logging.getLogger(__name__)

#: frames per xenforeignmemory_map call; the probe's C replicator used the same batch
MAP_BATCH = 1024
#: rounds a 64-byte block must look like an updated vcpu_info in before it is taken for one
MIN_VCPU_INFO_ROUNDS = 2
#: how a secondary's vCPU is woken after its HVM context was replaced
WAKE_METHODS = ("msi", "nmi", "none")


class _RawMemory:
    """Exposes a foreign mapping to numpy without building a ctypes array type per call."""

    def __init__(self, addr: int, shape: tuple[int, int], writable: bool) -> None:
        self.__array_interface__ = {"data": (addr, not writable), "shape": shape, "typestr": "|u1", "version": 3}


class XenHandles:
    """The process-wide library handles (xc interface, foreign memory, device model, logger)."""

    def __init__(self, privcmd_path: str = PRIVCMD_PATH) -> None:
        require_dom0(privcmd_path)
        self.lib = xc_.load_libraries()
        stderr = ctypes.c_void_p.in_dll(self.lib.libc, "stderr").value
        # libxc reports its own errors to this logger; ours carry errno and the call name.
        self.logger = self.lib.xtl.xtl_createlogger_stdiostream(stderr, xc_.XTL_ERROR, 0)
        self.xch = self._open("xc_interface_open", self.lib.xc.xc_interface_open, self.logger, self.logger, 0)
        self.fmem = self._open("xenforeignmemory_open", self.lib.fmem.xenforeignmemory_open, self.logger, 0)
        self.dmod = self._open("xendevicemodel_open", self.lib.dm.xendevicemodel_open, self.logger, 0)

    @staticmethod
    def _open(call: str, fn, *args) -> int:  # type: ignore[no-untyped-def]
        handle = fn(*args)
        if not handle:
            raise call_error(call, "-", ctypes.get_errno(), "is this a Xen dom0 running as root?")
        return handle

    def close(self) -> None:
        if self.dmod:
            self.lib.dm.xendevicemodel_close(self.dmod)
        if self.fmem:
            self.lib.fmem.xenforeignmemory_close(self.fmem)
        if self.xch:
            self.lib.xc.xc_interface_close(self.xch)
        if self.logger:
            self.lib.xtl.xtl_logger_destroy(self.logger)
        self.dmod = self.fmem = self.xch = self.logger = 0


_handles: XenHandles | None = None
_handles_pid = 0
_handles_lock = threading.Lock()


def xen_handles(privcmd_path: str = PRIVCMD_PATH) -> XenHandles:
    """Open the library handles once per process (they are shared by all domains). A forked
    child opens its own: libxc's handles and hypercall buffers do not survive fork (the
    buffers are MADV_DONTFORK), and the pipeline's stages are forked from the node."""
    global _handles, _handles_pid
    with _handles_lock:
        if _handles is None or _handles_pid != os.getpid():
            _handles, _handles_pid = XenHandles(privcmd_path), os.getpid()
        return _handles


def close_handles() -> None:
    """Close this process's library handles (the next use opens new ones)."""
    global _handles
    with _handles_lock:
        if _handles is not None and _handles_pid == os.getpid():
            _handles.close()
        _handles = None


def domain_info(domid: int, handles: XenHandles | None = None) -> DomainInfo:
    """xc_domain_getinfolist for one domain; DomainError if it does not exist."""
    h = handles or xen_handles()
    raw = XenDomctlGetDomainInfo()
    n = h.lib.xc.xc_domain_getinfolist(h.xch, domid, 1, ctypes.byref(raw))
    if n < 0:
        raise call_error("xc_domain_getinfolist", str(domid), ctypes.get_errno())
    if n == 0 or raw.domain != domid:
        raise DomainError(f"no Xen domain with id {domid}")
    return DomainInfo.from_struct(raw)


def list_domains(handles: XenHandles | None = None) -> dict[str, int]:
    """Names (from xenstore ``/local/domain/<id>/name``) to domain ids of all domains."""
    h = handles or xen_handles()
    infos = (XenDomctlGetDomainInfo * 1024)()
    n = h.lib.xc.xc_domain_getinfolist(h.xch, 0, 1024, infos)
    if n < 0:
        raise call_error("xc_domain_getinfolist", "*", ctypes.get_errno())
    xs = h.lib.xs.xs_open(0)
    if not xs:
        raise call_error("xs_open", "*", ctypes.get_errno(), "is xenstored running?")
    try:
        names = {}
        for raw in infos[:n]:
            length = ctypes.c_uint(0)
            ptr = h.lib.xs.xs_read(xs, 0, f"/local/domain/{raw.domain}/name".encode(), ctypes.byref(length))
            if ptr:
                names[ctypes.string_at(ptr, length.value).decode()] = raw.domain
                h.lib.libc.free(ptr)
        return names
    finally:
        h.lib.xs.xs_close(xs)


def resolve_domain(name_or_id: str | int, handles: XenHandles | None = None) -> int:
    """A domain id from a name (looked up in xenstore) or a numeric id."""
    if isinstance(name_or_id, int) or str(name_or_id).isdigit():
        return int(name_or_id)
    names = list_domains(handles)
    if name_or_id not in names:
        raise DomainError(f"no Xen domain named {name_or_id!r} (domains: {', '.join(sorted(names)) or 'none'})")
    return names[name_or_id]


class XenDomain(Domain):
    """One PVH/HVM domain.

    Frames at this interface are *frame indexes*: positions in :attr:`frames`, the guest
    frame numbers that map (RAM plus special pages), found when the domain is opened. A PVH
    guest of 128 MiB has ~32.8k of them in a gpfn space of 1M (its special pages sit just
    below 4 GiB), so the pipeline's per-frame tables, caches and staging areas are sized by
    the guest's memory, not by its gpfn space. Twin domains have the same frames.
    """

    page_size = PAGE_SIZE

    def __init__(
        self,
        domid: int,
        name: str,
        *,
        handles: XenHandles,
        keep_own_shared_info: bool = True,
        upcall_vector: int = DEFAULT_UPCALL_VECTOR,
        wake: str = "msi",
        privcmd_path: str = PRIVCMD_PATH,
    ) -> None:
        if wake not in WAKE_METHODS:
            raise DomainError(f"wake method {wake!r} is not one of {', '.join(WAKE_METHODS)}")
        self._h = handles
        self._pid = os.getpid()
        self._privcmd_path = privcmd_path
        self._paused_here = False
        self._xc = handles.lib.xc
        self.domid = domid
        self.name = name
        self.info = domain_info(domid, handles)
        check_replicable(self.info, f"{name!r}")
        self.guest_type = self.info.guest_type
        max_gpfn = xc_.xen_pfn_t(0)
        self._check("xc_domain_maximum_gpfn", self._xc.xc_domain_maximum_gpfn(handles.xch, domid, ctypes.byref(max_gpfn)))
        self.max_gpfn = int(max_gpfn.value)
        self.shared_info_frame = int(self.info.shared_info_frame)
        self.upcall_vector = upcall_vector
        self.wake = wake
        self._bitmap: XcHypercallBuffer | None = None
        self._bitmap_pages = 0
        self._bitmap_words: np.ndarray | None = None
        #: dirty statistics of the last CLEAN (Xen's fault_count / dirty_count)
        self.last_dirty_stats = (0, 0)
        #: pfns of the last read_pages/write_pages that could not be mapped (holes)
        self.last_holes = np.empty(0, dtype=np.uint64)
        self._ctx_buf: ctypes.Array[ctypes.c_char] | None = None
        #: gpfn of each frame index: every frame of 0..max_gpfn that maps, found once here
        #: (mapping the whole gpfn space: seconds under TCG)
        self.frames = self._scan_mappable()
        self.page_count = int(self.frames.size)
        #: bitmap words that cover the frames: the short scan of the dirty bitmap
        self._ram_words = np.unique(self.frames >> np.uint64(6))
        own = [self.shared_info_frame] if keep_own_shared_info else []
        #: frame indexes write_pages never overwrites: Xen's per-domain pages of *this* domain
        own = np.array(own, dtype=np.uint64)
        self.own_frames = self.indexes_of(own[np.isin(own, self.frames)])
        #: frame index -> byte ranges of it that Xen writes itself (the vcpu_info fields found
        #: by find_xen_written): write_pages keeps this domain's own bytes there, and
        #: memory_digest hashes them as zeros
        self.xen_written: dict[int, tuple[tuple[int, int], ...]] = {}
        log.info("opened %s domain %s (id %d): %d frames mapped of max_gpfn=%#x, shared_info_frame=%#x "
                 "vcpus=%d paging=%s", self.guest_type, name, domid, self.page_count, self.max_gpfn,
                 self.shared_info_frame, self.info.nr_online_vcpus,
                 "hap" if self.info.flags & xc_.XEN_DOMINF_hap else "shadow")

    # -- helpers --------------------------------------------------------
    def _live(self) -> None:
        """In a process forked after the domain was opened (the pipeline's stages), open this
        process's own library handles and forget the parent's hypercall buffers."""
        if self._pid != os.getpid():
            self._h = xen_handles(self._privcmd_path)
            self._xc = self._h.lib.xc
            self._bitmap, self._bitmap_words, self._ctx_buf = None, None, None
            self._paused_here = False
            self._pid = os.getpid()

    def indexes_of(self, gpfns: np.ndarray) -> np.ndarray:
        """Frame indexes of guest frame numbers; DomainError for a gpfn that was not mapped
        when the domain was opened (the guest's memory layout changed since)."""
        gpfns = np.asarray(gpfns, dtype=np.uint64)
        at = np.searchsorted(self.frames, gpfns)
        known = at < self.frames.size
        known[known] = self.frames[at[known]] == gpfns[known]
        if not known.all():
            raise DomainError(
                f"domain {self.name} (id {self.domid}): {int((~known).sum())} frames outside the "
                f"{self.frames.size} mapped when it was opened (first gpfn {int(gpfns[~known][0]):#x}): "
                "its memory layout changed (ballooning, memory hotplug); replicating it needs a "
                "restart of the pair (a new full sync)")
        return at.astype(np.uint64)

    def _check(self, call: str, rc: int, detail: str = "") -> int:
        if rc < 0:
            raise call_error(call, f"{self.name} (id {self.domid})", ctypes.get_errno(), detail)
        return rc

    def refresh_info(self) -> DomainInfo:
        self._live()
        self.info = domain_info(self.domid, self._h)
        return self.info

    # -- execution ------------------------------------------------------
    # Xen counts a controller's pauses (a domain paused twice needs two unpauses); in the
    # Domain interface pausing is a state. So this process pauses the domain at most once and
    # unpauses only what it paused: the secondary's coordinator pauses at every epoch's BEGIN,
    # and resumes only once the guest may run (not after the sync epochs).
    def pause(self) -> None:
        self._live()
        if not self._paused_here:
            self._check("xc_domain_pause", self._xc.xc_domain_pause(self._h.xch, self.domid))
            self._paused_here = True

    def resume(self) -> None:
        self._live()
        if self._paused_here:
            self._check("xc_domain_unpause", self._xc.xc_domain_unpause(self._h.xch, self.domid))
            self._paused_here = False

    @property
    def is_paused(self) -> bool:
        return self.refresh_info().paused

    # -- dirty log ------------------------------------------------------
    def enable_dirty_log(self) -> None:
        self._live()
        self._ensure_bitmap()
        rc = self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
                                          None, 0, 0, None)
        if rc < 0 and ctypes.get_errno() == errno.EBUSY:  #: already on (e.g. a previous run); restart it
            self.disable_dirty_log()
            rc = self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
                                              None, 0, 0, None)
        if rc < 0 and ctypes.get_errno() == errno.EOPNOTSUPP:
            self._check("xc_logdirty_control(ENABLE_LOGDIRTY)", rc,
                        "the hypervisor lacks log-dirty support: build it with CONFIG_SHADOW_PAGING=y")
        self._check("xc_logdirty_control(ENABLE_LOGDIRTY)", rc)

    def disable_dirty_log(self) -> None:
        self._live()
        self._check("xc_logdirty_control(OFF)",
                    self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_OFF,
                                                 None, 0, 0, None))

    def _ensure_bitmap(self) -> None:
        """Allocate the bitmap in hypercall-safe memory (libxc's page allocator), once."""
        if self._bitmap is not None:
            return
        words = (self.max_gpfn + 1 + 63) // 64
        pages = (words * 8 + PAGE_SIZE - 1) // PAGE_SIZE
        buf = XcHypercallBuffer.no_bounce()
        ptr = self._xc.xc__hypercall_buffer_alloc_pages(self._h.xch, ctypes.byref(buf), pages)
        if not ptr:
            raise call_error("xc_hypercall_buffer_alloc_pages", f"{self.name} (id {self.domid})",
                             ctypes.get_errno(), f"{pages} pages for a {self.max_gpfn + 1}-bit bitmap")
        self._bitmap, self._bitmap_pages = buf, pages
        self._bitmap_words = np.ctypeslib.as_array((ctypes.c_uint64 * words).from_address(ptr))
        self._bitmap_words[:] = 0  # the bits past page_count in the last word are never written by Xen

    def read_and_clear_dirty(self) -> np.ndarray:
        """Frame indexes written since the last call (see Domain)."""
        self._live()
        self._ensure_bitmap()
        assert self._bitmap is not None and self._bitmap_words is not None
        # No memset per call: Xen writes every byte of the requested range, copying dirty chunks
        # and clearing the others (paging_log_dirty_op, xen/arch/x86/mm/paging.c).
        stats = XenShadowOpStats()
        rc = self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_CLEAN,
                                          ctypes.byref(self._bitmap), self.max_gpfn + 1, 0, ctypes.byref(stats))
        self._check("xc_logdirty_control(CLEAN)", rc, "was enable_dirty_log called?")
        self.last_dirty_stats = (stats.fault_count, stats.dirty_count)
        # Xen's dirty_count is the number of bits it set since the last CLEAN, so a short scan
        # over the words covering the frames is checked against it; on a mismatch, scan all
        # (and indexes_of names the frames that are not ours).
        gpfns = bitmap_to_pfns(self._bitmap_words, self.max_gpfn + 1, self._ram_words)
        if gpfns.size != stats.dirty_count:
            gpfns = bitmap_to_pfns(self._bitmap_words, self.max_gpfn + 1)
        return self.indexes_of(gpfns)

    # -- memory ---------------------------------------------------------
    def _validate(self, pfns: np.ndarray, buf: np.ndarray, what: str) -> np.ndarray:
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        if buf.dtype != np.uint8 or buf.ndim != 2 or buf.shape[1] != PAGE_SIZE:
            raise ValueError(f"{what} must be a (n, {PAGE_SIZE}) uint8 array, got {buf.dtype} {buf.shape}")
        if buf.shape[0] < pfns.size:
            raise ValueError(f"{what} has {buf.shape[0]} rows for {pfns.size} pfns")
        if pfns.size and int(pfns.max()) >= self.page_count:
            raise ValueError(f"frame index {int(pfns.max())} is beyond domain {self.name}'s "
                             f"{self.page_count} frames")
        return pfns

    @contextmanager
    def map_frames(self, gpfns: np.ndarray, writable: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Map guest frame numbers ``gpfns`` (at most MAP_BATCH) and yield ``(pages, errs)``: a
        ``(n, 4096)`` view of the mapping (valid only inside the ``with``) and per-frame error
        codes (0 = mapped, else a negative errno)."""
        self._live()
        n = int(gpfns.size)
        if not 0 < n <= MAP_BATCH:
            raise ValueError(f"map_frames maps 1..{MAP_BATCH} frames at a time, got {n}")
        frames = np.ascontiguousarray(gpfns, dtype=np.uint64)  # xen_pfn_t is unsigned long (64-bit)
        errs = np.zeros(n, dtype=np.int32)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = self._h.lib.fmem.xenforeignmemory_map(self._h.fmem, self.domid, prot, n,
                                                     frames.ctypes.data, errs.ctypes.data)
        if not addr:
            raise call_error("xenforeignmemory_map", f"{self.name} (id {self.domid})", ctypes.get_errno(),
                             f"{n} frames {int(gpfns[0]):#x}..{int(gpfns[-1]):#x}, frames array {frames.shape}")
        try:
            yield np.asarray(_RawMemory(addr, (n, PAGE_SIZE), writable)), errs
        finally:
            if self._h.lib.fmem.xenforeignmemory_unmap(self._h.fmem, addr, n) < 0:
                log.warning("xenforeignmemory_unmap of %d frames of %s failed: %s", n, self.name,
                            os.strerror(ctypes.get_errno()))

    def _note_holes(self, idx: np.ndarray, errs: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
        bad = errs != 0
        if bad.any():
            holes.append(idx[bad])
            log.debug("%s: %d frames unmappable, first index %d: %s", self.name, int(bad.sum()),
                      int(idx[bad][0]), os.strerror(-int(errs[bad][0])))
        return ~bad

    def read_pages(self, pfns: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy frames (indexes) into ``out``. Frames that no longer map are zero-filled,
        skipped and returned (also kept in ``last_holes``)."""
        idx = self._validate(pfns, out, "out")
        holes: list[np.ndarray] = []
        for start in range(0, idx.size, MAP_BATCH):
            batch = idx[start : start + MAP_BATCH]
            with self.map_frames(self.frames[batch], writable=False) as (pages, errs):
                ok = self._note_holes(batch, errs, holes)
                dst = out[start : start + batch.size]
                if ok.all():
                    dst[:] = pages
                else:
                    dst[ok] = pages[ok]
                    dst[~ok] = 0
        self.last_holes = np.concatenate(holes) if holes else np.empty(0, dtype=np.uint64)
        return self.last_holes

    def write_pages(self, pfns: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Copy ``data`` into frames (indexes), except this domain's own Xen pages
        (``own_frames``) and, within a page, the bytes Xen writes for this domain
        (``xen_written``). Frames that no longer map are skipped and returned."""
        idx = self._validate(pfns, data, "data")
        holes: list[np.ndarray] = []
        for start in range(0, idx.size, MAP_BATCH):
            batch = idx[start : start + MAP_BATCH]
            rows = data[start : start + batch.size]
            if self.own_frames.size:
                keep = ~np.isin(batch, self.own_frames)
                if not keep.all():  # rare: copies only in that case
                    batch, rows = batch[keep], rows[keep]
                    if batch.size == 0:
                        continue
            with self.map_frames(self.frames[batch], writable=True) as (pages, errs):
                ok = self._note_holes(batch, errs, holes)
                kept = self._save_xen_written(batch, pages, ok)
                if ok.all():
                    pages[:] = rows
                else:
                    pages[ok] = rows[ok]
                for row, start_b, end_b, saved in kept:
                    pages[row, start_b:end_b] = saved
        self.last_holes = np.concatenate(holes) if holes else np.empty(0, dtype=np.uint64)
        return self.last_holes

    def _save_xen_written(self, batch: np.ndarray, pages: np.ndarray, ok: np.ndarray) -> list:
        """This domain's own bytes in the Xen-written ranges of the mapped ``batch``."""
        if not self.xen_written:
            return []
        kept = []
        for row in np.flatnonzero(np.isin(batch, list(self.xen_written)) & ok):
            for a, b in self.xen_written[int(batch[row])]:
                kept.append((row, a, b, pages[row, a:b].copy()))
        return kept

    def _scan_mappable(self) -> np.ndarray:
        """Every gpfn of 0..max_gpfn that maps (the guest's RAM plus special pages)."""
        found = []
        for start in range(0, self.max_gpfn + 1, MAP_BATCH):
            batch = np.arange(start, min(start + MAP_BATCH, self.max_gpfn + 1), dtype=np.uint64)
            with self.map_frames(batch, writable=False) as (_, errs):
                found.append(batch[errs == 0])
        frames = np.concatenate(found) if found else np.empty(0, np.uint64)
        if not frames.size:
            raise DomainError(f"domain {self.name} (id {self.domid}): no frame of 0..{self.max_gpfn:#x} maps")
        return frames

    def mappable_pfns(self) -> np.ndarray:
        """The guest frame number of every frame index (see :attr:`frames`)."""
        return self.frames

    def find_xen_written(self, rounds: int = 12, window_s: float = 0.3) -> dict[int, tuple[tuple[int, int], ...]]:
        """Find each vCPU's registered vcpu_info by watching the *running* guest, and keep the
        fields Xen writes there in :attr:`xen_written`.

        Xen updates the vcpu_info a guest registered (event upcall flags, its clock) for that
        domain alone and without marking the page dirty, and does not tell dom0 where it is.
        So twins legitimately differ there: the secondary must keep its own values (its
        clock, its pending events), and a memory proof must not count them. Two fingerprint
        passes over all of memory find the pages that change; two reads of those pages
        ``window_s`` apart show which 64-byte blocks change the way a vcpu_info does (see
        :func:`~pipeline.xen_io.xen_ctypes.vcpu_info_blocks`). A block counts when it passed
        in MIN_VCPU_INFO_ROUNDS rounds (or, unambiguously, in one), at most one per online vCPU;
        watching stops when each vCPU has one, after at most ``rounds`` rounds. Costs two reads
        of guest memory and the rounds' reads of the pages that changed."""
        def fingerprints() -> np.ndarray:
            out = np.empty(self.page_count, np.uint64)
            for start, pages in self.iter_pages(MAP_BATCH):
                out[start:start + len(pages)] = xc_.page_fingerprints(pages)
            return out
        first = fingerprints()
        time.sleep(window_s)
        changed = np.flatnonzero(fingerprints() != first).astype(np.uint64)
        changed = np.setdiff1d(changed, self.own_frames)
        want = max(1, self.info.nr_online_vcpus)
        seen: dict[tuple[int, int], int] = {}      # (frame index, block) -> rounds it passed in
        if changed.size:
            a = np.empty((changed.size, PAGE_SIZE), np.uint8)
            b = np.empty_like(a)
            for _ in range(rounds):
                self.read_pages(changed, a)
                time.sleep(window_s)
                self.read_pages(changed, b)
                for row in np.flatnonzero((a != b).any(axis=1)):
                    for block in xc_.vcpu_info_blocks(a[row], b[row]):
                        key = (int(changed[row]), block)
                        seen[key] = seen.get(key, 0) + 1
                if sum(1 for n in seen.values() if n >= MIN_VCPU_INFO_ROUNDS) >= want:
                    break
        # A real vcpu_info passes in round after round; guest data that happened to look like
        # one once does not. At most one per online vCPU, the most often seen first: a false
        # block would make the secondary keep its own bytes in guest data.
        ranked = sorted((k for k, n in seen.items() if n >= MIN_VCPU_INFO_ROUNDS), key=lambda k: -seen[k])
        chosen = ranked[:want]
        # Under TCG, Xen may update a vCPU's clock only once in all the rounds (measured: the
        # secondary saw its vcpu_info once in 4 rounds while the primary saw its own twice, and
        # then no proof matched). A block seen once is taken when that is unambiguous.
        once = [k for k, n in seen.items() if n < MIN_VCPU_INFO_ROUNDS]
        if len(chosen) < want and len(once) <= want - len(chosen):
            chosen += once
        found: dict[int, list[int]] = {}
        for i, block in sorted(chosen):
            found.setdefault(i, []).append(block)
        self.xen_written = {i: tuple((blk + lo, blk + hi) for blk in blocks
                                     for lo, hi in xc_.XEN_WRITTEN_VCPU_INFO)
                            for i, blocks in found.items()}
        where = ", ".join(f"gpfn {int(self.frames[i]):#x}+{blk:#x} ({seen[(i, blk)]} rounds)" for i, blk in sorted(chosen))
        dropped = ", ".join(f"gpfn {int(self.frames[i]):#x}+{blk:#x} ({n})" for (i, blk), n in sorted(seen.items())
                            if (i, blk) not in chosen)
        (log.info if len(chosen) >= want else log.warning)(
            "%s: vcpu_info found at %s (%d vCPUs online; %d pages changed while watched; not taken: %s)",
            self.name, where or "nowhere", want, changed.size, dropped or "none")
        return self.xen_written

    def memory_digest(self, batch_pages: int = MAP_BATCH) -> bytes:
        """blake3 over every frame in index order. This domain's own Xen frames (shared_info)
        count as zero pages and the bytes Xen writes itself (``xen_written``) as zeros, so two
        twin domains whose guest memory is equal give equal digests. Pause the domain for a
        stable answer."""
        import blake3

        h = blake3.blake3()
        for start, pages in self.iter_pages(batch_pages):
            end = start + len(pages)
            for i in self.own_frames[(self.own_frames >= start) & (self.own_frames < end)]:
                pages[int(i) - start] = 0
            for i, ranges in self.xen_written.items():
                if start <= i < end:
                    for a, b in ranges:
                        pages[i - start, a:b] = 0
            h.update(pages)
        return h.digest()

    def hvm_param(self, index: int) -> int:
        """xc_hvm_param_get (e.g. HVM_PARAM_CONSOLE_PFN: the console ring frame shared with dom0)."""
        self._live()
        value = ctypes.c_uint64(0)
        self._check(f"xc_hvm_param_get({index})",
                    self._xc.xc_hvm_param_get(self._h.xch, self.domid, index, ctypes.byref(value)))
        return int(value.value)

    def backend_frames(self) -> np.ndarray:
        """Frames dom0's backends write asynchronously (xenstore and console rings)."""
        return np.array(sorted({self.hvm_param(xc_.HVM_PARAM_STORE_PFN),
                                self.hvm_param(xc_.HVM_PARAM_CONSOLE_PFN)}), dtype=np.uint64)

    # -- vCPU / platform state -----------------------------------------
    def get_vcpu_state(self) -> bytes:
        self._live()
        # The context size is fixed for a domain's life (vCPU count); ask Xen once, reuse the buffer.
        if self._ctx_buf is None:
            size = self._check("xc_domain_hvm_getcontext(size)",
                               self._xc.xc_domain_hvm_getcontext(self._h.xch, self.domid, None, 0))
            self._ctx_buf = ctypes.create_string_buffer(size)
        buf = self._ctx_buf
        used = self._check("xc_domain_hvm_getcontext",
                           self._xc.xc_domain_hvm_getcontext(self._h.xch, self.domid, buf, len(buf)))
        return buf.raw[:used]

    def set_vcpu_state(self, blob: bytes) -> None:
        """Load the peer's HVM context, then make sure this domain's vCPUs see an event upcall.

        Fix-ups (see PVH.md and docs/xen-lab.md): this domain keeps its own shared_info
        frame (write_pages skips it). The event upcall must be pending in the loaded LAPIC
        and a blocked vCPU must be woken:
        - ``wake="msi"`` (default): after setcontext, inject an MSI carrying the upcall vector
          to each vCPU's LAPIC (XEN_DMOP_inject_msi). Xen's vlapic_set_irq sets the IRR bit
          and kicks (unblocks) the vCPU: the guest takes one spurious upcall, no NMI.
        - ``wake="nmi"``: mark the vector in the IRR of the blob, then send an NMI trigger
          (the probe's method; the guest logs "NMI ... Dazed and confused").
        - ``wake="none"``: only mark the vector in the IRR (S wakes at its next event).
        """
        self._live()
        if not blob:
            raise DomainError(f"empty HVM context for domain {self.name} (id {self.domid})")
        if self.wake != "msi":
            blob = mark_vector_pending(blob, self.upcall_vector)
        buf = ctypes.create_string_buffer(blob, len(blob))
        self._check("xc_domain_hvm_setcontext",
                    self._xc.xc_domain_hvm_setcontext(self._h.xch, self.domid, buf, len(blob)),
                    f"{len(blob)}-byte context")
        vcpus = range(self.info.max_vcpu_id + 1)
        if self.wake == "msi":
            for vcpu in vcpus:
                addr, data = msi_for_vector(self.upcall_vector, apic_id=2 * vcpu)  # Xen: APIC id = 2 * vcpu
                self._check("xendevicemodel_inject_msi",
                            self._h.lib.dm.xendevicemodel_inject_msi(self._h.dmod, self.domid, addr, data),
                            f"vector {self.upcall_vector:#x} to vCPU {vcpu}")
        elif self.wake == "nmi":
            for vcpu in vcpus:
                self._check("xc_domain_send_trigger(NMI)",
                            self._xc.xc_domain_send_trigger(self._h.xch, self.domid, xc_.XEN_DOMCTL_SENDTRIGGER_NMI, vcpu))

    # -- lifetime -------------------------------------------------------
    def before_fork(self) -> None:
        """The node forks its stages after opening the domain: let no library state cross the
        fork (libxc's handles, its hypercall buffer cache, privcmd file descriptors). Every
        process, this one included, opens its own handles at its next call."""
        self.close()
        close_handles()
        self._pid = 0

    def close(self) -> None:
        if self._bitmap is not None and self._pid == os.getpid():
            self._bitmap_words = None
            self._xc.xc__hypercall_buffer_free_pages(self._h.xch, ctypes.byref(self._bitmap), self._bitmap_pages)
            self._bitmap = None

    def __repr__(self) -> str:
        return f"XenDomain({self.name!r}, id={self.domid}, {self.guest_type}, max_gpfn={self.max_gpfn:#x})"


def open_xen_domain(
    domain: str | int,
    *,
    privcmd_path: str = PRIVCMD_PATH,
    keep_own_shared_info: bool = True,
    upcall_vector: int = DEFAULT_UPCALL_VECTOR,
    wake: str = "msi",
    find_xen_written: bool = True,
    **other_settings: object,
) -> XenDomain:
    """Open the PVH/HVM ``domain`` (a name or an id; config ``guest.domain``). Refuses PV guests
    and hosts that are not a Xen dom0. With ``find_xen_written`` (config
    ``guest.xen_find_written``), watch the running guest for its vcpu_info
    (:meth:`XenDomain.find_xen_written`).

    ``other_settings`` are the remaining ``[guest]`` keys meant for other backends; ignored."""
    if other_settings:
        log.debug("xen backend ignores settings %s", ", ".join(sorted(other_settings)))
    handles = xen_handles(privcmd_path)
    domid = resolve_domain(domain, handles)
    name = str(domain) if not str(domain).isdigit() else f"dom{domid}"
    dom = XenDomain(domid, name, handles=handles, keep_own_shared_info=keep_own_shared_info,
                    upcall_vector=upcall_vector, wake=wake, privcmd_path=privcmd_path)
    if find_xen_written:
        if dom.refresh_info().paused:
            log.warning("%s is paused: its vcpu_info cannot be found by watching it "
                        "(guest.xen_find_written); a memory proof may then differ in its clock", dom.name)
        else:
            dom.find_xen_written()
    return dom
