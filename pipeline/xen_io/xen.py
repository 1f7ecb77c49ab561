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

from pipeline.pfns import in_sorted_pfns

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
    #: port -> vCPU of this domain's VIRQ_TIMER channels (found once, see _timer_ports)
    _timer_port_map: dict[int, int] | None = None
    #: xen_written came from the guest's own registration (use_registered_vcpu_info), a fact
    #: a peer's differing ranges cannot overrule
    written_registered = False
    _atomic_or: xc_.AtomicByteOr | None = None

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
        #: vCPUs up while find_xen_written watched (None: it did not run), and the length of
        #: the last HVM context, which changes when a vCPU comes up or goes down
        self.vcpus_watched: int | None = None
        self._ctx_used = -1
        #: length of the last HVM context set_vcpu_state loaded (it changes with its vCPU set)
        self._loaded_len = -1
        #: this process's mapping of every frame: (address, view, writable), see guest_memory
        self._mapped: tuple[int, np.ndarray, bool] | None = None
        self._hole_mask: np.ndarray | None = None
        #: frame indexes that did not map when guest_memory mapped them (normally none)
        self.map_holes = np.empty(0, dtype=np.uint64)
        #: the evidence find_xen_written gathered: (frame index, block) -> (rounds seen, certain)
        self.written_evidence: dict[tuple[int, int], tuple[int, bool]] = {}
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
        self.xen_written = {}
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
            self._mapped = None      # the parent's mapping is not in this process (VM_DONTCOPY)
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
            err = ctypes.get_errno()
            if err == errno.ESRCH:
                detail = "; ".join(filter(None, (detail, self._gone())))
            raise call_error(call, f"{self.name} (id {self.domid})", err, detail)
        return rc

    def _gone(self) -> str:
        """Why Xen knows no domain ``domid`` any more, as far as dom0 can tell: a guest that
        crashed or triple-faulted is shut down with "reboot" (Xen's default for HVM/PVH, see
        hvm_triple_fault) and xl's default on_reboot re-creates it under a new id; the Xen
        lab once lost its secondary that way (a running guest whose memory changed under it)."""
        try:
            now = list_domains(self._h).get(self.name)
        except DomainError:
            now = None
        again = (f"a domain named {self.name!r} now has id {now}: it was re-created (crashed or "
                 "rebooted, then restarted by its toolstack)" if now is not None and now != self.domid
                 else f"no domain named {self.name!r} exists now")
        return f"the domain is gone ({again}; Xen's log says why: xl dmesg)"

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
        # Already on (a previous run, or this node's own sync before the secondary was lost and
        # came back): restart it. Xen 4.17 says EINVAL for that (paging_log_dirty_enable); a
        # domain whose p2m is shared with an IOMMU says EINVAL too, and then says it again below.
        if rc < 0 and ctypes.get_errno() in (errno.EBUSY, errno.EINVAL):
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

    def dirty_count(self) -> int:
        """Frames the guest wrote since the last CLEAN, without clearing (log-dirty PEEK with no
        bitmap: Xen returns only its dirty_count, the bits it set since the CLEAN, and copies
        nothing; paging_log_dirty_op pauses the domain for the moment it takes). -1 while
        Xen cannot tell: log-dirty off (EINVAL) or a CLEAN of another process in progress (EBUSY)."""
        self._live()
        stats = XenShadowOpStats()
        rc = self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_PEEK,
                                          None, 0, 0, ctypes.byref(stats))
        if rc < 0 and ctypes.get_errno() in (errno.EINVAL, errno.EBUSY):
            return -1
        self._check("xc_logdirty_control(PEEK)", rc)
        return int(stats.dirty_count)

    def peek_dirty(self) -> np.ndarray:
        """Frame indexes the guest wrote since the last CLEAN, without clearing (log-dirty PEEK)."""
        self._live()
        self._ensure_bitmap()
        assert self._bitmap is not None and self._bitmap_words is not None
        stats = XenShadowOpStats()
        rc = self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_PEEK,
                                          ctypes.byref(self._bitmap), self.max_gpfn + 1, 0, ctypes.byref(stats))
        self._check("xc_logdirty_control(PEEK)", rc, "was enable_dirty_log called?")
        gpfns = bitmap_to_pfns(self._bitmap_words, self.max_gpfn + 1)
        return np.flatnonzero(np.isin(self.frames, gpfns)).astype(np.uint64)

    # -- memory ---------------------------------------------------------
    def _validate(self, pfns: np.ndarray, buf: np.ndarray, what: str) -> np.ndarray:
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        if buf.dtype != np.uint8 or buf.ndim != 2 or buf.shape[1] != PAGE_SIZE:
            raise ValueError(f"{what} must be a (n, {PAGE_SIZE}) uint8 array, got {buf.dtype} {buf.shape}")
        if buf.shape[0] < pfns.size:
            raise ValueError(f"{what} has {buf.shape[0]} rows for {pfns.size} pfns")
        if pfns.size:
            # one reading of the largest index for the test and the message: the Xen lab once
            # reported "frame index 32767 is beyond ... 32786 frames", a test that passed on one
            # computation and a message printed from another (the emulated CPU under QEMU TCG)
            top, count = int(pfns.max()), self.page_count
            if top >= count:
                raise ValueError(f"frame index {top} is beyond domain {self.name}'s {count} frames")
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

    # -- the guest's memory, mapped once -----------------------------------
    # Every frame is mapped once per process (and again only when the process changes: the
    # privcmd mapping is VM_DONTCOPY, a forked stage has none), so a checkpoint's copy is one
    # gather from memory that is already mapped: no map/unmap hypercalls in the pause. The
    # frame set is fixed for the domain's life (indexes_of refuses a frame outside it).
    def guest_memory(self, writable: bool = False) -> np.ndarray:
        """All frames as a ``(page_count, 4096)`` view of one foreign mapping, row = frame
        index; rows in :attr:`map_holes` did not map and must not be touched (privcmd faults)."""
        self._live()
        have = self._mapped
        if have is not None and (have[2] or not writable):
            return have[1]
        if have is not None:     # read-only so far and now written: map again, writable
            self._unmap()
        n = self.page_count
        frames = np.ascontiguousarray(self.frames, dtype=np.uint64)
        errs = np.zeros(n, dtype=np.int32)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = self._h.lib.fmem.xenforeignmemory_map(self._h.fmem, self.domid, prot, n,
                                                     frames.ctypes.data, errs.ctypes.data)
        if not addr:
            raise call_error("xenforeignmemory_map", f"{self.name} (id {self.domid})", ctypes.get_errno(),
                             f"all {n} frames, {'read-write' if writable else 'read-only'}")
        view = np.asarray(_RawMemory(addr, (n, PAGE_SIZE), writable))
        self.map_holes = np.flatnonzero(errs != 0).astype(np.uint64)
        self._hole_mask = errs != 0 if self.map_holes.size else None
        if self.map_holes.size:
            log.warning("%s: %d of %d frames did not map (first index %d: %s); they read as zeros",
                        self.name, self.map_holes.size, n, int(self.map_holes[0]),
                        os.strerror(-int(errs[self.map_holes[0]])))
        self._mapped = (addr, view, writable)
        return view

    def _unmap(self) -> None:
        if self._mapped is not None:
            addr = self._mapped[0]
            self._mapped = None
            if self._h.lib.fmem.xenforeignmemory_unmap(self._h.fmem, addr, self.page_count) < 0:
                log.warning("xenforeignmemory_unmap of %s's %d frames failed: %s", self.name,
                            self.page_count, os.strerror(ctypes.get_errno()))

    def _split_holes(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the indexes that mapped, the holes among ``idx``) as row masks over ``idx``."""
        if self._hole_mask is None:
            return np.ones(idx.size, bool), np.empty(0, np.uint64)
        bad = self._hole_mask[idx]
        return ~bad, idx[bad]

    def read_pages(self, pfns: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy frames (indexes) into ``out``: one gather from the persistent mapping. Frames
        that did not map are zero-filled, skipped and returned (also kept in ``last_holes``)."""
        idx = self._validate(pfns, out, "out")
        mem = self.guest_memory()
        ok, holes = self._split_holes(idx)
        dst = out[:idx.size]
        if not holes.size:
            np.take(mem, idx, axis=0, out=dst, mode="clip")   # clip: unbuffered; idx validated
        else:
            dst[ok] = mem[idx[ok]]
            dst[~ok] = 0
        self.last_holes = holes
        return holes

    def write_pages(self, pfns: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Copy ``data`` into frames (indexes), except this domain's own Xen pages
        (``own_frames``) and, within a page, the bytes Xen writes for this domain
        (``xen_written``). Frames that did not map are skipped and returned."""
        idx = self._validate(pfns, data, "data")
        rows = data[:idx.size]
        mem = self.guest_memory(writable=True)
        keep, holes = self._split_holes(idx)
        # by a binary search in the few frames, not np.isin (85-160 us on 1k frames with
        # numpy 2.4, every apply: docs/tuning.md, Session 18 (micro))
        if self.own_frames.size:
            keep &= ~in_sorted_pfns(idx, np.sort(self.own_frames))
        written = self.xen_written
        kept = []
        if written:  # this domain's own bytes where Xen writes (its vcpu_info), put back after
            frames = np.sort(np.fromiter(written, np.uint64, len(written)))
            for i in np.flatnonzero(in_sorted_pfns(idx, frames) & keep):
                frame = int(idx[i])
                kept += [(frame, a, b, mem[frame, a:b].copy()) for a, b in written[frame]]
        if keep.all():
            mem[idx] = rows
        else:
            mem[idx[keep]] = rows[keep]
        for frame, a, b, saved in kept:
            mem[frame, a:b] = saved
        self.last_holes = holes
        return holes

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

    # -- bytes Xen writes itself ------------------------------------------
    # The ranges live in a small table shared by the node and the stages it forks (an
    # anonymous shared mapping made when the domain is opened): the coordinator may adopt the
    # primary's ranges at the handshake, after the restore stage was forked, and the restore
    # stage's write_pages and both sides' digests must then use the same ranges.
    _WRITTEN_ROW = np.dtype([("frame", "<u8"), ("start", "<u4"), ("end", "<u4")])
    _WRITTEN_ROWS = 255

    def _written_table(self) -> tuple[np.ndarray, np.ndarray]:
        shm = self.__dict__.get("_written_shm")
        if shm is None:
            shm = self.__dict__["_written_shm"] = mmap.mmap(-1, 16 + 16 * self._WRITTEN_ROWS)
            self.__dict__["_written_cache"] = (-1, {})
        head = np.frombuffer(shm, np.uint32, 2, 0)             # generation, rows
        return head, np.frombuffer(shm, self._WRITTEN_ROW, self._WRITTEN_ROWS, 16)

    @property
    def xen_written(self) -> dict[int, tuple[tuple[int, int], ...]]:
        """Frame index -> byte ranges of it that Xen writes itself (each vCPU's registered
        vcpu_info fields): write_pages keeps this domain's own bytes there and memory_digest
        hashes them as zeros."""
        head, rows = self._written_table()
        gen, cached = self.__dict__["_written_cache"]
        if gen != int(head[0]):
            cached = {}
            for frame, start, end in rows[:int(head[1])].tolist():
                cached.setdefault(int(frame), []).append((int(start), int(end)))
            cached = {f: tuple(r) for f, r in cached.items()}
            self.__dict__["_written_cache"] = (int(head[0]), cached)
        return cached

    @xen_written.setter
    def xen_written(self, ranges: dict[int, tuple[tuple[int, int], ...]]) -> None:
        flat = sorted((int(f), int(a), int(b)) for f, rr in ranges.items() for a, b in rr)
        if len(flat) > self._WRITTEN_ROWS:
            raise DomainError(f"{self.name}: {len(flat)} Xen-written ranges, at most {self._WRITTEN_ROWS}")
        for f, a, b in flat:
            if not (0 <= f < self.page_count and 0 <= a < b <= PAGE_SIZE):
                raise DomainError(f"{self.name}: Xen-written range frame {f} bytes {a}..{b} is outside "
                                  f"its {self.page_count} frames of {PAGE_SIZE} bytes")
        head, rows = self._written_table()
        rows[:len(flat)] = flat
        head[1] = len(flat)
        head[0] += 1                  # last: readers in other processes see the rows complete

    def hypervisor_written(self) -> tuple[tuple[int, int, int], ...]:
        """The Xen-written ranges as sorted ``(frame index, start, end)`` (see Domain)."""
        return tuple(sorted((f, a, b) for f, rr in self.xen_written.items() for a, b in rr))

    def agree_hypervisor_written(self, peer: tuple[tuple[int, int, int], ...], peer_is_primary: bool) -> None:
        """The handshake's check that both nodes leave the same bytes out of the proof and the
        secondary keeps its own bytes exactly where the primary's Xen writes.

        On the secondary (``peer_is_primary``): the primary's ranges are adopted when they are
        whole vcpu_info field sets and this node saw every one of those blocks change the way
        a vcpu_info does while it watched its own guest (twins hold their vcpu_info at the same
        place; under TCG one side may see its clock move in fewer rounds). On the primary the
        secondary's answer must equal its own. Anything else is a DomainError naming both."""
        peer = tuple(sorted((int(f), int(a), int(b)) for f, a, b in peer))
        mine = self.hypervisor_written()
        if peer == mine:
            return
        def where(ranges: tuple) -> str:
            return ", ".join(f"gpfn {int(self.frames[f]):#x}+{a:#x}..{b:#x}" if f < self.page_count
                             else f"frame {f}+{a:#x}..{b:#x}" for f, a, b in ranges) or "none"
        refusal = (f"{self.name}: the nodes disagree where Xen writes itself (vcpu_info): "
                   f"{'primary' if peer_is_primary else 'secondary'} {where(peer)}; this node {where(mine)}")
        if not peer_is_primary:
            raise DomainError(refusal)
        if self.written_registered:
            raise DomainError(refusal + " (this node's are its guest's own registration, "
                              "guest.xen_vcpu_info: give both nodes their guest's)")
        blocks = xc_.vcpu_info_blocks_of_ranges(peer)
        if blocks is None:
            raise DomainError(refusal + " (the primary's ranges are not whole vcpu_info field sets)")
        unseen = [(f, blk) for f, blk in blocks if (f, blk) not in self.written_evidence]
        if unseen:
            raise DomainError(refusal + f" (this node never saw {where(tuple((f, b, b + 64) for f, b in unseen))} "
                              "change like a vcpu_info)")
        self.xen_written = {f: tuple(r[1:] for r in peer if r[0] == f) for f in {r[0] for r in peer}}
        log.info("%s: adopted the primary's vcpu_info ranges %s (this node had found %s)", self.name,
                 where(peer), where(mine))

    def use_registered_vcpu_info(self, registrations: dict[int, tuple[int, int]]) -> dict[int, tuple[tuple[int, int], ...]]:
        """Take each vCPU's vcpu_info from the guest's own registration (``{vcpu: (gfn,
        offset)}``, config ``guest.xen_vcpu_info``: what the guest passed to
        VCPUOP_register_vcpu_info, as it reports it) instead of watching for it: a fact, not
        a search (issue 17, item 5). Checked on this domain before it is used: every online
        vCPU has one, each lies in this domain's frames and outside its shared_info, and holds
        a clock record Xen wrote. DomainError naming the first item that fails; nothing is
        taken then."""
        self._live()
        want = max(1, self.info.nr_online_vcpus)
        top = self.info.max_vcpu_id
        where = {}
        for vcpu, (gfn, offset) in sorted(registrations.items()):
            item = f"vCPU {vcpu} at gpfn {gfn:#x}+{offset:#x}"
            if vcpu > top:
                raise DomainError(f"{self.name}: vcpu_info of {item}: the domain's highest vCPU is {top}")
            try:
                frame = int(self.indexes_of(np.array([gfn], np.uint64))[0])
            except DomainError:
                raise DomainError(f"{self.name}: vcpu_info of {item}: no such frame in the domain's "
                                  f"{self.page_count} (is it this guest's registration?)") from None
            if np.isin(frame, self.own_frames) or gfn == self.shared_info_frame:
                raise DomainError(f"{self.name}: vcpu_info of {item}: that is the domain's shared_info "
                                  "frame (a vCPU without a registration needs no entry)")
            if np.isin(frame, self.map_holes):
                raise DomainError(f"{self.name}: vcpu_info of {item}: the frame does not map")
            bad = xc_.vcpu_info_looks_live(self.guest_memory()[frame], offset)
            if bad:
                raise DomainError(f"{self.name}: vcpu_info of {item}: {bad}")
            where[vcpu] = (frame, offset)
        if len(where) < want:
            raise DomainError(f"{self.name}: {want} vCPUs are online, guest.xen_vcpu_info gives a vcpu_info "
                              f"for {len(where)} ({', '.join(map(str, sorted(where))) or 'none'})")
        if len(set(where.values())) < len(where):
            raise DomainError(f"{self.name}: two vCPUs given the same vcpu_info block: {where}")
        found: dict[int, list[tuple[int, int]]] = {}
        for frame, block in where.values():
            found.setdefault(frame, []).extend((block + lo, block + hi) for lo, hi in xc_.XEN_WRITTEN_VCPU_INFO)
        self.xen_written = {f: tuple(sorted(r)) for f, r in found.items()}
        self.written_evidence = {blk: (0, True) for blk in where.values()}
        self.written_registered = True
        self.vcpus_watched = len(where)
        log.info("%s: vcpu_info ranges from the guest's registration: %s", self.name,
                 ", ".join(f"vCPU {v} gpfn {int(self.frames[f]):#x}+{b:#x}" for v, (f, b) in sorted(where.items())))
        return self.xen_written

    def find_xen_written(self, rounds: int = 12, window_s: float = 0.3,
                         sleep=time.sleep) -> dict[int, tuple[tuple[int, int], ...]]:  # type: ignore[no-untyped-def]
        """Find each vCPU's registered vcpu_info by watching the *running* guest, and keep the
        fields Xen writes there in :attr:`xen_written`.

        Xen updates the vcpu_info a guest registered (event upcall flags, its clock) for that
        domain alone and without marking the page dirty, and does not tell dom0 where it is
        (only ``struct vcpu`` holds it; no domctl or HVM save record carries it in 4.17). So
        twins legitimately differ there: the secondary must keep its own values (its clock,
        its pending events), and a memory proof must not count them.

        Two fingerprint passes over all of memory find the pages that change; then rounds of
        two reads of those pages ``window_s`` apart show which 64-byte blocks change the way a
        vcpu_info does (see :func:`~pipeline.xen_io.xen_ctypes.vcpu_info_blocks`). Each round
        also runs between a log-dirty CLEAN and a PEEK: a block that changed on a page the
        guest did not write in that round was written by Xen itself, for certain (the guest
        cannot write a page without Xen logging it). Certain blocks are taken first, then
        blocks that passed in MIN_VCPU_INFO_ROUNDS rounds (or, unambiguously, in one), at most
        one per online vCPU; watching stops when each vCPU has a certain one, or after
        ``rounds`` rounds with enough counted ones."""
        def fingerprints() -> np.ndarray:
            mem, out = self.guest_memory(), np.empty(self.page_count, np.uint64)
            for start in range(0, self.page_count, MAP_BATCH):
                rows = np.arange(start, min(start + MAP_BATCH, self.page_count), dtype=np.uint64)
                ok, _ = self._split_holes(rows)
                out[start:start + rows.size] = 0
                out[start:start + rows.size][ok] = xc_.page_fingerprints(mem[rows[ok]])
            return out
        first = fingerprints()
        sleep(window_s)
        changed = np.flatnonzero(fingerprints() != first).astype(np.uint64)
        changed = np.setdiff1d(changed, self.own_frames)
        want = max(1, self.info.nr_online_vcpus)
        self.vcpus_watched = want
        seen: dict[tuple[int, int], tuple[int, bool]] = {}   # (frame, block) -> (rounds, certain)
        logged = self._watch_log_dirty(True) if changed.size else False
        try:
            if changed.size:
                a = np.empty((changed.size, PAGE_SIZE), np.uint8)
                b = np.empty_like(a)
                for _ in range(rounds):
                    if logged:
                        self.read_and_clear_dirty()           # the round starts with a clean log
                    self.read_pages(changed, a)
                    sleep(window_s)
                    self.read_pages(changed, b)
                    guest_wrote = self.peek_dirty() if logged else None
                    for row in np.flatnonzero((a != b).any(axis=1)):
                        frame = int(changed[row])
                        certain = guest_wrote is not None and not np.isin(frame, guest_wrote)
                        for block in xc_.vcpu_info_blocks(a[row], b[row]):
                            n, c = seen.get((frame, block), (0, False))
                            seen[(frame, block)] = (n + 1, c or bool(certain))
                    if sum(1 for _, c in seen.values() if c) >= want:
                        break
                    if not logged and sum(1 for n, _ in seen.values() if n >= MIN_VCPU_INFO_ROUNDS) >= want:
                        break
        finally:
            if logged:
                self._watch_log_dirty(False)
        self.written_evidence = dict(seen)
        # Certain blocks first; then a real vcpu_info passes in round after round, guest data
        # that happened to look like one once does not. At most one per online vCPU: a false
        # block would make the secondary keep its own bytes in guest data.
        certain = sorted((k for k, (_, c) in seen.items() if c), key=lambda k: -seen[k][0])
        counted = sorted((k for k, (n, c) in seen.items() if not c and n >= MIN_VCPU_INFO_ROUNDS),
                         key=lambda k: -seen[k][0])
        chosen = (certain + counted)[:want]
        # Under TCG, Xen may update a vCPU's clock only once in all the rounds (measured: the
        # secondary saw its vcpu_info once in 4 rounds while the primary saw its own twice, and
        # then no proof matched). A block seen once is taken when that is unambiguous.
        once = [k for k, (n, c) in seen.items() if not c and n < MIN_VCPU_INFO_ROUNDS]
        if len(chosen) < want and len(once) <= want - len(chosen):
            chosen += once
        found: dict[int, list[int]] = {}
        for i, block in sorted(chosen):
            found.setdefault(i, []).append(block)
        self.xen_written = {i: tuple((blk + lo, blk + hi) for blk in blocks
                                     for lo, hi in xc_.XEN_WRITTEN_VCPU_INFO)
                            for i, blocks in found.items()}
        def show(k: tuple[int, int]) -> str:
            n, c = seen[k]
            return f"gpfn {int(self.frames[k[0]]):#x}+{k[1]:#x} ({n} rounds{', certain' if c else ''})"
        dropped = ", ".join(show(k) for k in sorted(seen) if k not in chosen)
        (log.info if len(chosen) >= want else log.warning)(
            "%s: vcpu_info found at %s (%d vCPUs online; %d pages changed while watched; log-dirty "
            "evidence %s; not taken: %s)", self.name, ", ".join(show(k) for k in sorted(chosen)) or "nowhere",
            want, changed.size, "on" if logged else "off", dropped or "none")
        return self.xen_written

    def _watch_log_dirty(self, on: bool) -> bool:
        """Log-dirty for find_xen_written's rounds: on (True when it could be turned on), off."""
        try:
            if on:
                self.enable_dirty_log()
            else:
                self.disable_dirty_log()
            return True
        except DomainError as exc:
            log.warning("%s: log-dirty %s for the vcpu_info watch failed: %s", self.name,
                        "on" if on else "off", exc)
            return False

    def memory_digest(self, batch_pages: int = MAP_BATCH) -> bytes:
        """blake3 over every frame in index order, straight from the persistent mapping. This
        domain's own Xen frames (shared_info) and frames that did not map count as zero pages
        and the bytes Xen writes itself (``xen_written``) as zeros, so two twin domains whose
        guest memory is equal give equal digests. Pause the domain for a stable answer."""
        import blake3

        mem = self.guest_memory()
        special = np.union1d(self.own_frames, self.map_holes).astype(np.int64)
        written = self.xen_written
        h = blake3.blake3()
        fixed = np.zeros(PAGE_SIZE, np.uint8)
        at = 0
        for i in sorted(set(special.tolist()) | set(written)):
            if at < i:
                h.update(mem[at:i])
            if i in written and i not in special:
                fixed[:] = mem[i]
                for a, b in written[i]:
                    fixed[a:b] = 0
                h.update(fixed)
            else:
                h.update(np.zeros(PAGE_SIZE, np.uint8))
            at = i + 1
        if at < self.page_count:
            h.update(mem[at:])
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
        blob = buf.raw[:used]
        if used != self._ctx_used:            # a vCPU came up or went down (or the first call)
            self._ctx_used = used
            self._check_vcpus_up(blob)
        return blob

    def _check_vcpus_up(self, blob: bytes) -> None:
        """Say so when more vCPUs are up than find_xen_written watched: each one registered a
        vcpu_info after the pair was made, which no node knows of. In Xen 4.17 a vCPU registers
        its vcpu_info once (map_vcpu_info refuses another while one is mapped; only a soft reset
        unmaps them), so a vcpu_info appears later only on a vCPU first brought up later. Only
        this domain's Xen holds that registration: the secondary's Xen has none for it, so after
        a failover that vCPU's events would go nowhere. Logged, not raised: this runs while the
        guest is paused for a checkpoint, which must still end with the guest running."""
        if self.vcpus_watched is None:
            return
        up = xc_.vcpus_up(blob)
        if len(up) > self.vcpus_watched:
            log.error("%s: %d vCPUs are up (%s), %d were while its vcpu_info was found: a vCPU brought "
                      "up since registered a vcpu_info that is not replicated (the secondary's Xen knows "
                      "nothing of it, so after a failover that vCPU gets no events); re-pair the nodes "
                      "(xen-twin save/restore) with every vCPU up", self.name, len(up),
                      ", ".join(map(str, up)), self.vcpus_watched)

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

        Before the wake (msi, nmi), each vCPU's Xen timer event is made pending in this
        domain's own event state (:meth:`kick_timers`): the timer is not in the HVM context,
        and the guest's handler, run by the wake-up upcall, arms it again from its own queue.
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
        if len(blob) != self._loaded_len:     # the first load, or a vCPU came up or went down
            self._loaded_len = len(blob)
            log.info("%s: loaded HVM context with vCPUs %s (of vCPUs 0..%d; each is woken, its timer "
                     "event made pending)", self.name, ", ".join(map(str, xc_.vcpus_up(blob))) or "none",
                     self.info.max_vcpu_id)
        if self.wake != "none":
            self.kick_timers()
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

    # -- the Xen timer across a checkpoint ----------------------------------
    # A PVH/HVM Linux guest's clock events are Xen's per-vCPU singleshot timer (VCPUOP_set_
    # singleshot_timer), armed by the guest and held in Xen's struct vcpu: no HVM save record
    # carries it, so loading the primary's context leaves this domain's timer as its own last
    # run armed it. The guest then believes the primary's deadline is armed. If this domain's
    # timer fired and the guest took the event but was paused before it armed the next one (the
    # SVM runs only moments between an apply and the next BEGIN when commits are slow), nothing
    # is armed and nothing pending: the guest never gets another timer event (session 6's
    # xenlab-4 survivor printed 3 ticks, then nothing). So after every load, each vCPU's
    # VIRQ_TIMER is made pending: the guest's timer handler runs once at the wake-up upcall and
    # arms this domain's timer from its own timer queue, i.e. the primary's deadlines carry over.
    # A timer event early is harmless (nothing has expired; the handler re-arms).
    def _timer_ports(self) -> dict[int, int]:
        """Port -> vCPU of every channel of this domain bound to VIRQ_TIMER (EVTCHNOP_status over
        its ports, up to the first Xen says is beyond the domain's), found once: a guest binds its
        timer when a vCPU comes up (boot, the twin's resume) and keeps it."""
        if self._timer_port_map is None:
            self._live()
            found: dict[int, int] = {}
            st = xc_.EvtchnStatus()
            for port in range(1, xc_.EVTCHN_2L_PORTS):
                st.dom, st.port = self.domid, port
                if self._xc.xc_evtchn_status(self._h.xch, ctypes.byref(st)) < 0:
                    break
                if st.status == xc_.EVTCHNSTAT_VIRQ and st.virq == xc_.VIRQ_TIMER:
                    found[port] = int(st.vcpu)
            self._timer_port_map = found
            (log.info if found else log.warning)(
                "%s: Xen timer event channels %s", self.name,
                ", ".join(f"port {p} (vCPU {v})" for p, v in sorted(found.items())) or
                "none found: a loaded context keeps this domain's own timer state")
        return self._timer_port_map

    def kick_timers(self) -> int:
        """Make every vCPU's VIRQ_TIMER pending in this domain's own event state (2-level ABI:
        the port's bit in shared_info, its word's selector bit and the upcall flag in each
        registered vcpu_info, or in shared_info's legacy ones when none is registered), set
        with atomic byte ORs. The wake-up upcall (set_vcpu_state's MSI) then runs the guest's
        timer handler. Returns the ports marked (0: nothing to mark, said once in the log)."""
        ports = self._timer_ports()
        if not ports:
            return 0
        if not self.own_frames.size or np.isin(self.own_frames[:1], self.map_holes).any():
            if self.__dict__.get("_kick_refused") is None:
                self.__dict__["_kick_refused"] = True
                log.warning("%s: its shared_info frame is not in its mapped memory: the Xen timer is "
                            "not re-armed after a loaded context", self.name)
            return 0
        mem = self.guest_memory(writable=True)
        if XenDomain._atomic_or is None:
            XenDomain._atomic_or = xc_.AtomicByteOr()
        atomic_or = XenDomain._atomic_or
        shared_info = int(self.own_frames[0])
        blocks = xc_.vcpu_info_blocks_of_ranges(self.hypervisor_written()) or \
            [(shared_info, vcpu * xc_.VCPU_INFO_SIZE) for vcpu in sorted(set(ports.values()))]
        for port in sorted(ports):
            (pend_at, pend_bit), (sel_at, sel_bit), (up_at, up_bit) = xc_.event_pending_bits(port)
            atomic_or(mem[shared_info].ctypes.data + pend_at, pend_bit)
            # which registered vcpu_info is which vCPU's is not known here: every one gets the
            # selector bit (a vCPU scans the word and finds only its own ports pending)
            for frame, block in blocks:
                base = mem[frame].ctypes.data + block
                atomic_or(base + sel_at, sel_bit)
                atomic_or(base + up_at, up_bit)
        return len(ports)

    # -- lifetime -------------------------------------------------------
    def before_fork(self) -> None:
        """The node forks its stages after opening the domain: let no library state cross the
        fork (libxc's handles, its hypercall buffer cache, privcmd file descriptors). Every
        process, this one included, opens its own handles at its next call."""
        self.close()
        close_handles()
        self._pid = 0

    def close(self) -> None:
        if self._mapped is not None and self._pid == os.getpid():
            self._unmap()
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
    vcpu_info: str = "",
    **other_settings: object,
) -> XenDomain:
    """Open the PVH/HVM ``domain`` (a name or an id; config ``guest.domain``). Refuses PV guests
    and hosts that are not a Xen dom0. Where Xen writes each vCPU's vcpu_info: from the guest's
    own registration when ``vcpu_info`` (config ``guest.xen_vcpu_info``) gives it
    (:meth:`XenDomain.use_registered_vcpu_info`); else, with ``find_xen_written`` (config
    ``guest.xen_find_written``), by watching the running guest (:meth:`XenDomain.find_xen_written`).

    ``other_settings`` are the remaining ``[guest]`` keys meant for other backends; ignored."""
    if other_settings:
        log.debug("xen backend ignores settings %s", ", ".join(sorted(other_settings)))
    handles = xen_handles(privcmd_path)
    domid = resolve_domain(domain, handles)
    name = str(domain) if not str(domain).isdigit() else f"dom{domid}"
    dom = XenDomain(domid, name, handles=handles, keep_own_shared_info=keep_own_shared_info,
                    upcall_vector=upcall_vector, wake=wake, privcmd_path=privcmd_path)
    if vcpu_info.strip():
        try:
            registrations = xc_.parse_vcpu_info_registrations(vcpu_info)
        except ValueError as exc:
            raise DomainError(f"{dom.name}: guest.xen_vcpu_info: {exc}") from None
        dom.use_registered_vcpu_info(registrations)
    elif find_xen_written:
        if dom.refresh_info().paused:
            log.warning("%s is paused: its vcpu_info cannot be found by watching it "
                        "(guest.xen_find_written); a memory proof may then differ in its clock", dom.name)
        else:
            dom.find_xen_written()
    return dom
