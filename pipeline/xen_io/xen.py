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
_handles_lock = threading.Lock()


def xen_handles(privcmd_path: str = PRIVCMD_PATH) -> XenHandles:
    """Open the library handles once per process (they are shared by all domains)."""
    global _handles
    with _handles_lock:
        if _handles is None:
            _handles = XenHandles(privcmd_path)
        return _handles


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
    """One PVH/HVM domain. Frames are guest frame numbers (identical on twin domains)."""

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
    ) -> None:
        if wake not in WAKE_METHODS:
            raise DomainError(f"wake method {wake!r} is not one of {', '.join(WAKE_METHODS)}")
        self._h = handles
        self._xc = handles.lib.xc
        self.domid = domid
        self.name = name
        self.info = domain_info(domid, handles)
        check_replicable(self.info, f"{name!r}")
        self.guest_type = self.info.guest_type
        max_gpfn = xc_.xen_pfn_t(0)
        self._check("xc_domain_maximum_gpfn", self._xc.xc_domain_maximum_gpfn(handles.xch, domid, ctypes.byref(max_gpfn)))
        self.max_gpfn = int(max_gpfn.value)
        self.page_count = self.max_gpfn + 1
        self.shared_info_frame = int(self.info.shared_info_frame)
        #: frames write_pages never overwrites: Xen's per-domain pages of *this* domain
        self.own_frames = np.array([self.shared_info_frame] if keep_own_shared_info else [], dtype=np.uint64)
        self.upcall_vector = upcall_vector
        self.wake = wake
        self._bitmap: XcHypercallBuffer | None = None
        self._bitmap_pages = 0
        self._bitmap_words: np.ndarray | None = None
        #: dirty statistics of the last CLEAN (Xen's fault_count / dirty_count)
        self.last_dirty_stats = (0, 0)
        #: pfns of the last read_pages/write_pages that could not be mapped (holes)
        self.last_holes = np.empty(0, dtype=np.uint64)
        self._mappable: np.ndarray | None = None
        #: bitmap words that cover mappable frames (known once mappable_pfns ran): the short scan
        self._ram_words: np.ndarray | None = None
        self._ctx_buf: ctypes.Array[ctypes.c_char] | None = None
        log.info("opened %s domain %s (id %d): max_gpfn=%#x shared_info_frame=%#x vcpus=%d paging=%s",
                 self.guest_type, name, domid, self.max_gpfn, self.shared_info_frame, self.info.nr_online_vcpus,
                 "hap" if self.info.flags & xc_.XEN_DOMINF_hap else "shadow")

    # -- helpers --------------------------------------------------------
    def _check(self, call: str, rc: int, detail: str = "") -> int:
        if rc < 0:
            raise call_error(call, f"{self.name} (id {self.domid})", ctypes.get_errno(), detail)
        return rc

    def refresh_info(self) -> DomainInfo:
        self.info = domain_info(self.domid, self._h)
        return self.info

    # -- execution ------------------------------------------------------
    def pause(self) -> None:
        self._check("xc_domain_pause", self._xc.xc_domain_pause(self._h.xch, self.domid))

    def resume(self) -> None:
        self._check("xc_domain_unpause", self._xc.xc_domain_unpause(self._h.xch, self.domid))

    @property
    def is_paused(self) -> bool:
        return self.refresh_info().paused

    # -- dirty log ------------------------------------------------------
    def enable_dirty_log(self) -> None:
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
        self._check("xc_logdirty_control(OFF)",
                    self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_OFF,
                                                 None, 0, 0, None))

    def _ensure_bitmap(self) -> None:
        """Allocate the bitmap in hypercall-safe memory (libxc's page allocator), once."""
        if self._bitmap is not None:
            return
        words = (self.page_count + 63) // 64
        pages = (words * 8 + PAGE_SIZE - 1) // PAGE_SIZE
        buf = XcHypercallBuffer.no_bounce()
        ptr = self._xc.xc__hypercall_buffer_alloc_pages(self._h.xch, ctypes.byref(buf), pages)
        if not ptr:
            raise call_error("xc_hypercall_buffer_alloc_pages", f"{self.name} (id {self.domid})",
                             ctypes.get_errno(), f"{pages} pages for a {self.page_count}-bit bitmap")
        self._bitmap, self._bitmap_pages = buf, pages
        self._bitmap_words = np.ctypeslib.as_array((ctypes.c_uint64 * words).from_address(ptr))
        self._bitmap_words[:] = 0  # the bits past page_count in the last word are never written by Xen

    def read_and_clear_dirty(self) -> np.ndarray:
        self._ensure_bitmap()
        assert self._bitmap is not None and self._bitmap_words is not None
        # No memset per call: Xen writes every byte of the requested range, copying dirty chunks
        # and clearing the others (paging_log_dirty_op, xen/arch/x86/mm/paging.c).
        stats = XenShadowOpStats()
        rc = self._xc.xc_logdirty_control(self._h.xch, self.domid, xc_.XEN_DOMCTL_SHADOW_OP_CLEAN,
                                          ctypes.byref(self._bitmap), self.page_count, 0, ctypes.byref(stats))
        self._check("xc_logdirty_control(CLEAN)", rc, "was enable_dirty_log called?")
        self.last_dirty_stats = (stats.fault_count, stats.dirty_count)
        if self._ram_words is not None:
            # Xen's dirty_count is the number of bits it set since the last CLEAN, so a short scan
            # over the words covering RAM is checked against it; on a mismatch, scan everything.
            pfns = bitmap_to_pfns(self._bitmap_words, self.page_count, self._ram_words)
            if pfns.size == stats.dirty_count:
                return pfns
            log.info("%s: %d dirty frames outside the RAM found at start (Xen counted %d); full scan",
                     self.name, stats.dirty_count - pfns.size, stats.dirty_count)
        return bitmap_to_pfns(self._bitmap_words, self.page_count)

    # -- memory ---------------------------------------------------------
    def _validate(self, pfns: np.ndarray, buf: np.ndarray, what: str) -> np.ndarray:
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        if buf.dtype != np.uint8 or buf.ndim != 2 or buf.shape[1] != PAGE_SIZE:
            raise ValueError(f"{what} must be a (n, {PAGE_SIZE}) uint8 array, got {buf.dtype} {buf.shape}")
        if buf.shape[0] < pfns.size:
            raise ValueError(f"{what} has {buf.shape[0]} rows for {pfns.size} pfns")
        if pfns.size and int(pfns.max()) >= self.page_count:
            raise ValueError(f"pfn {int(pfns.max()):#x} is beyond domain {self.name}'s last frame {self.max_gpfn:#x}")
        return pfns

    @contextmanager
    def map_frames(self, pfns: np.ndarray, writable: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Map ``pfns`` (at most MAP_BATCH) and yield ``(pages, errs)``: a ``(n, 4096)`` view of
        the mapping (valid only inside the ``with``) and per-frame error codes (0 = mapped, else a
        negative errno)."""
        n = int(pfns.size)
        if not 0 < n <= MAP_BATCH:
            raise ValueError(f"map_frames maps 1..{MAP_BATCH} frames at a time, got {n}")
        frames = np.ascontiguousarray(pfns, dtype=np.uint64)  # xen_pfn_t is unsigned long (64-bit)
        errs = np.zeros(n, dtype=np.int32)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = self._h.lib.fmem.xenforeignmemory_map(self._h.fmem, self.domid, prot, n,
                                                     frames.ctypes.data, errs.ctypes.data)
        if not addr:
            raise call_error("xenforeignmemory_map", f"{self.name} (id {self.domid})", ctypes.get_errno(),
                             f"{n} frames {int(pfns[0]):#x}..{int(pfns[-1]):#x}, frames array {frames.shape}")
        try:
            yield np.asarray(_RawMemory(addr, (n, PAGE_SIZE), writable)), errs
        finally:
            if self._h.lib.fmem.xenforeignmemory_unmap(self._h.fmem, addr, n) < 0:
                log.warning("xenforeignmemory_unmap of %d frames of %s failed: %s", n, self.name,
                            os.strerror(ctypes.get_errno()))

    def _note_holes(self, pfns: np.ndarray, errs: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
        bad = errs != 0
        if bad.any():
            holes.append(pfns[bad])
            log.debug("%s: %d frames unmappable, first %#x: %s", self.name, int(bad.sum()),
                      int(pfns[bad][0]), os.strerror(-int(errs[bad][0])))
        return ~bad

    def read_pages(self, pfns: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy frames into ``out``. Holes (unmappable frames) are zero-filled, skipped and
        returned (also kept in ``last_holes``)."""
        pfns = self._validate(pfns, out, "out")
        holes: list[np.ndarray] = []
        for start in range(0, pfns.size, MAP_BATCH):
            batch = pfns[start : start + MAP_BATCH]
            with self.map_frames(batch, writable=False) as (pages, errs):
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
        """Copy ``data`` into frames, except this domain's own Xen pages (``own_frames``).
        Holes are skipped and returned (also kept in ``last_holes``)."""
        pfns = self._validate(pfns, data, "data")
        holes: list[np.ndarray] = []
        for start in range(0, pfns.size, MAP_BATCH):
            batch = pfns[start : start + MAP_BATCH]
            rows = data[start : start + batch.size]
            if self.own_frames.size:
                keep = ~np.isin(batch, self.own_frames)
                if not keep.all():  # rare: copies only in that case
                    batch, rows = batch[keep], rows[keep]
                    if batch.size == 0:
                        continue
            with self.map_frames(batch, writable=True) as (pages, errs):
                ok = self._note_holes(batch, errs, holes)
                if ok.all():
                    pages[:] = rows
                else:
                    pages[ok] = rows[ok]
        self.last_holes = np.concatenate(holes) if holes else np.empty(0, dtype=np.uint64)
        return self.last_holes

    def mappable_pfns(self) -> np.ndarray:
        """Every frame of ``range(page_count)`` that maps (the guest's RAM plus special pages).
        Found once by mapping the whole gpfn space (seconds under TCG), then cached."""
        if self._mappable is None:
            found = []
            for start in range(0, self.page_count, MAP_BATCH):
                batch = np.arange(start, min(start + MAP_BATCH, self.page_count), dtype=np.uint64)
                with self.map_frames(batch, writable=False) as (_, errs):
                    found.append(batch[errs == 0])
            self._mappable = np.concatenate(found)
            self._ram_words = np.unique(self._mappable >> np.uint64(6))
        return self._mappable

    def memory_digest(self, batch_pages: int = MAP_BATCH) -> bytes:
        """blake3 over every mappable frame in pfn order. This domain's own Xen frames
        (shared_info, not replicated) count as zero pages, so two twin domains whose guest
        memory is equal give equal digests. Pause the domain for a stable answer."""
        import blake3

        pfns = self.mappable_pfns()
        h = blake3.blake3()
        buf = np.empty((batch_pages, PAGE_SIZE), np.uint8)
        for start in range(0, pfns.size, batch_pages):
            chunk = pfns[start : start + batch_pages]
            self.read_pages(chunk, buf)
            buf[: chunk.size][np.isin(chunk, self.own_frames)] = 0
            h.update(buf[: chunk.size])
        return h.digest()

    def hvm_param(self, index: int) -> int:
        """xc_hvm_param_get (e.g. HVM_PARAM_CONSOLE_PFN: the console ring frame shared with dom0)."""
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
    def close(self) -> None:
        if self._bitmap is not None:
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
    **other_settings: object,
) -> XenDomain:
    """Open the PVH/HVM ``domain`` (a name or an id; config ``guest.domain``). Refuses PV guests
    and hosts that are not a Xen dom0.

    ``other_settings`` are the remaining ``[guest]`` keys meant for other backends; ignored."""
    if other_settings:
        log.debug("xen backend ignores settings %s", ", ".join(sorted(other_settings)))
    handles = xen_handles(privcmd_path)
    domid = resolve_domain(domain, handles)
    name = str(domain) if not str(domain).isdigit() else f"dom{domid}"
    return XenDomain(domid, name, handles=handles, keep_own_shared_info=keep_own_shared_info,
                     upcall_vector=upcall_vector, wake=wake)
