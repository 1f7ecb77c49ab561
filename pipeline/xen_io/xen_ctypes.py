"""ctypes declarations for the Xen 4.17 control libraries, and the pure helpers around them.

Everything here can be imported and tested on a host without Xen: loading the
libraries is deferred to :func:`load_libraries`. The struct layouts mirror the
public headers of Debian's ``libxen-dev`` 4.17 (``xen/domctl.h``,
``xenctrl.h``, ``xen/hvm/save.h``); ``tests/test_xen_ctypes.py`` compiles a C
program against the installed headers and checks every size and offset here.

Only stable hypercall-interface structs (``struct xen_domctl_getdomaininfo``)
and the small public libxc buffer struct are declared; libxc's own
``xc_dominfo_t`` (bitfields, version-specific) is deliberately not used.
"""
from __future__ import annotations

import ctypes
import struct
import ctypes.util
import os
import re
from dataclasses import dataclass

import numpy as np

from .base import DomainError

# -- constants (xen/domctl.h, xen/arch-x86/xen.h, xentoollog.h) -------------------------------
XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_blocked = 1 << 4
XEN_DOMINF_running = 1 << 5
XEN_DOMINF_hap = 1 << 8

XEN_DOMCTL_SHADOW_OP_OFF = 0
XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY = 2
XEN_DOMCTL_SHADOW_OP_CLEAN = 11
XEN_DOMCTL_SHADOW_OP_PEEK = 12

XEN_DOMCTL_SENDTRIGGER_NMI = 0

XEN_X86_EMU_LAPIC = 1 << 0
XEN_X86_EMU_ALL = 0x7FF  # LAPIC|HPET|PM|RTC|IOAPIC|PIC|VGA|IOMMU|PIT|USE_PIRQ|VPCI

XTL_ERROR = 8

# xen/hvm/params.h: frames shared with dom0 backends (xenstored, xenconsoled)
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_CONSOLE_PFN = 17

# xen/arch-x86/hvm/save.h typecodes
HVM_SAVE_CODE_END = 0
HVM_SAVE_CODE_CPU = 2
HVM_SAVE_CODE_LAPIC_REGS = 6
#: offset of the IRR (8 x 32-bit registers, each on a 16-byte stride) in the LAPIC register page
LAPIC_IRR_OFFSET = 0x200
LAPIC_REGS_SIZE = 1024

#: Linux's HYPERVISOR_CALLBACK_VECTOR: the per-vCPU event-channel upcall vector of PVH guests
DEFAULT_UPCALL_VECTOR = 0xF3

PAGE_SIZE = 4096
PRIVCMD_PATH = "/dev/xen/privcmd"

xen_pfn_t = ctypes.c_ulong


class XenArchDomainConfig(ctypes.Structure):
    """struct xen_arch_domainconfig (x86)."""

    _fields_ = [("emulation_flags", ctypes.c_uint32), ("misc_flags", ctypes.c_uint32)]


class XenDomctlGetDomainInfo(ctypes.Structure):
    """struct xen_domctl_getdomaininfo == xc_domaininfo_t (filled by xc_domain_getinfolist)."""

    _fields_ = [
        ("domain", ctypes.c_uint16),
        ("pad1", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("tot_pages", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("shr_pages", ctypes.c_uint64),
        ("paged_pages", ctypes.c_uint64),
        ("shared_info_frame", ctypes.c_uint64),
        ("cpu_time", ctypes.c_uint64),
        ("nr_online_vcpus", ctypes.c_uint32),
        ("max_vcpu_id", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("handle", ctypes.c_uint8 * 16),
        ("cpupool", ctypes.c_uint32),
        ("gpaddr_bits", ctypes.c_uint8),
        ("pad2", ctypes.c_uint8 * 7),
        ("arch_config", XenArchDomainConfig),
    ]


class XcHypercallBuffer(ctypes.Structure):
    """struct xc_hypercall_buffer: what DECLARE_HYPERCALL_BUFFER declares in C.

    A dirty bitmap handed to xc_logdirty_control must live in hypercall-safe
    memory; libxc allocates it with xc__hypercall_buffer_alloc_pages, which fills
    ``hbuf``. ``ubuf = (void *)-1`` and ``dir = 0`` mark it as "no bounce buffer"
    (HYPERCALL_BUFFER_INIT_NO_BOUNCE).
    """

    _fields_ = [
        ("hbuf", ctypes.c_void_p),
        ("param_shadow", ctypes.c_void_p),
        ("dir", ctypes.c_int),
        ("ubuf", ctypes.c_void_p),
        ("sz", ctypes.c_size_t),
    ]

    @classmethod
    def no_bounce(cls) -> XcHypercallBuffer:
        return cls(hbuf=None, param_shadow=None, dir=0, ubuf=ctypes.c_void_p(-1).value, sz=0)


class XenShadowOpStats(ctypes.Structure):
    """struct xen_domctl_shadow_op_stats == xc_shadow_op_stats_t."""

    _fields_ = [("fault_count", ctypes.c_uint32), ("dirty_count", ctypes.c_uint32)]


class EvtchnStatus(ctypes.Structure):
    """struct evtchn_status == xc_evtchn_status_t (EVTCHNOP_status): IN dom, port; OUT status,
    vcpu and, for a channel bound to a virtual IRQ, its number (``u.virq``)."""

    _fields_ = [("dom", ctypes.c_uint16), ("port", ctypes.c_uint32), ("status", ctypes.c_uint32),
                ("vcpu", ctypes.c_uint32), ("virq", ctypes.c_uint32), ("pad_u", ctypes.c_uint32)]


class HvmSaveDescriptor(ctypes.Structure):
    """struct hvm_save_descriptor: the header of each record in an HVM context blob."""

    _fields_ = [
        ("typecode", ctypes.c_uint16),
        ("instance", ctypes.c_uint16),
        ("length", ctypes.c_uint32),
    ]


# -- domain info ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainInfo:
    """What the pipeline needs to know about a domain (from xc_domain_getinfolist)."""

    domid: int
    flags: int
    tot_pages: int
    max_pages: int
    shared_info_frame: int
    nr_online_vcpus: int
    max_vcpu_id: int
    emulation_flags: int

    @classmethod
    def from_struct(cls, raw: XenDomctlGetDomainInfo) -> DomainInfo:
        return cls(
            domid=raw.domain,
            flags=raw.flags,
            tot_pages=raw.tot_pages,
            max_pages=raw.max_pages,
            shared_info_frame=raw.shared_info_frame,
            nr_online_vcpus=raw.nr_online_vcpus,
            max_vcpu_id=raw.max_vcpu_id,
            emulation_flags=raw.arch_config.emulation_flags,
        )

    @property
    def paused(self) -> bool:
        return bool(self.flags & XEN_DOMINF_paused)

    @property
    def dying(self) -> bool:
        return bool(self.flags & XEN_DOMINF_dying)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & XEN_DOMINF_shutdown)

    @property
    def guest_type(self) -> str:
        """``"pv"``, ``"pvh"`` (HVM container, only the LAPIC emulated) or ``"hvm"``."""
        if not self.flags & XEN_DOMINF_hvm_guest:
            return "pv"
        if self.emulation_flags & XEN_X86_EMU_ALL == XEN_X86_EMU_LAPIC:
            return "pvh"
        return "hvm"


def check_replicable(info: DomainInfo, name: str) -> None:
    """Refuse domains this backend cannot replicate, with the reason.

    PV guests are refused: their memory holds machine frame numbers in page
    tables and the p2m, which must be canonicalised to be copied between
    domains (as xc_domain_save does); HVM/PVH guest frame numbers are the same
    on both domains, so frames copy as they are.
    """
    if info.guest_type == "pv":
        raise DomainError(
            f"domain {name} (id {info.domid}) is a PV guest: the xen backend replicates only "
            "PVH and HVM guests (PV page tables hold machine frame numbers that would need "
            "canonicalisation); recreate it with type=\"pvh\""
        )
    if info.dying or info.shutdown:
        state = "dying" if info.dying else "shut down"
        raise DomainError(f"domain {name} (id {info.domid}) is {state}")


# -- dirty bitmap ---------------------------------------------------------------------------
def bitmap_to_pfns(words: np.ndarray, nbits: int, candidates: np.ndarray | None = None) -> np.ndarray:
    """Decode a Xen log-dirty bitmap (array of little-endian 64-bit words, bit i = pfn i).

    Returns the set pfns below ``nbits`` as a sorted uint64 array. Only nonzero
    words are unpacked. ``candidates`` (sorted word indexes) limits the scan to
    those words: a PVH guest's bitmap spans its whole 1M-frame gpfn space, but
    only the ~2% of words that cover its RAM can have bits set.
    """
    if words.dtype != np.uint64:
        raise ValueError(f"dirty bitmap must be uint64 words, got {words.dtype}")
    if nbits > words.size * 64:
        raise ValueError(f"bitmap of {words.size} words cannot hold {nbits} bits")
    if candidates is None:
        hot = np.flatnonzero(words).astype(np.uint64)
    else:
        hot = candidates[words[candidates] != 0].astype(np.uint64)
    if hot.size == 0:
        return hot
    # bit b of hot word k is bit (64 * k + b) of the unpacked little-endian bytes
    set_bits = np.flatnonzero(np.unpackbits(words[hot].view(np.uint8), bitorder="little")).astype(np.uint64)
    pfns = hot[set_bits >> np.uint64(6)] * np.uint64(64) + (set_bits & np.uint64(63))
    return pfns[pfns < nbits]


# -- bytes Xen writes itself ---------------------------------------------------------------
#: a vcpu_info is 64 bytes; Xen writes these of them for the domain without logging the page
#: dirty: evtchn_upcall_pending, _mask, the pending selector (0x00..0x10) and the
#: vcpu_time_info clock record (0x20..0x40). The guest registers where it lives
#: (VCPUOP_register_vcpu_info) and Xen does not report it to dom0.
VCPU_INFO_SIZE = 64
XEN_WRITTEN_VCPU_INFO = ((0x00, 0x10), (0x20, 0x40))
#: EVTCHNOP_status: a channel bound to a virtual IRQ; VIRQ_TIMER, the vCPU's Xen timer
EVTCHNSTAT_VIRQ = 4
VIRQ_TIMER = 0
#: ports of the 2-level event channel ABI (64 words of 64 bits on x86_64)
EVTCHN_2L_PORTS = 64 * 64
#: the 2-level ABI in the shared_info page (x86_64, public/xen.h): 32 legacy vcpu_info blocks,
#: then ``unsigned long evtchn_pending[64]``; in a vcpu_info, ``evtchn_upcall_pending`` (byte 0)
#: and ``evtchn_pending_sel`` (the word at 8: which pending words to scan)
SHARED_INFO_EVTCHN_PENDING = 32 * VCPU_INFO_SIZE
VCPU_INFO_UPCALL_PENDING = 0x00
VCPU_INFO_PENDING_SEL = 0x08


def event_pending_bits(port: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Where the 2-level ABI marks ``port`` pending, each as (byte offset, bit mask): the port's
    bit in shared_info's ``evtchn_pending``; its word's bit in a vcpu_info's
    ``evtchn_pending_sel``; and that vcpu_info's ``evtchn_upcall_pending`` (what Xen's
    evtchn_2l_set_pending and vcpu_mark_events_pending set, little-endian words)."""
    if not 0 < port < EVTCHN_2L_PORTS:
        raise ValueError(f"event channel port {port} is outside the 2-level ABI's 1..{EVTCHN_2L_PORTS - 1}")
    word = port // 64
    return ((SHARED_INFO_EVTCHN_PENDING + port // 8, 1 << (port % 8)),
            (VCPU_INFO_PENDING_SEL + word // 8, 1 << (word % 8)),
            (VCPU_INFO_UPCALL_PENDING, 1))


class AtomicByteOr:
    """``lock or byte [addr], mask``: one byte of a page Xen writes too (shared_info, a
    vcpu_info), changed without losing a bit Xen sets in the same byte at the same moment (a
    paused domain's timer still fires; backends still notify it). Python has no atomic
    read-modify-write on foreign memory, so this is the 5-byte x86-64 routine a C compiler
    makes of ``__atomic_fetch_or(p, v, __ATOMIC_SEQ_CST)`` for a byte (``f0 40 08 37 c3``),
    in an executable page of this process, called through ctypes."""

    CODE = bytes.fromhex("f0400837c3")     # lock or %sil,(%rdi); ret

    def __init__(self) -> None:
        import mmap
        import platform

        if platform.machine() not in ("x86_64", "AMD64"):
            raise DomainError(f"the xen backend's atomic byte OR is x86-64 code; this is {platform.machine()}")
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(self.CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint8)(addr)

    def __call__(self, addr: int, mask: int) -> None:
        self._fn(addr, mask)
_XEN_WRITTEN_OFFSETS = np.r_[tuple(slice(a, b) for a, b in XEN_WRITTEN_VCPU_INFO)]


def vcpu_info_blocks_of_ranges(ranges) -> list[tuple[int, int]] | None:  # type: ignore[no-untyped-def]
    """``(frame, block offset)`` of each vcpu_info in ``(frame, start, end)`` ranges that are
    whole sets of the Xen-written fields (XEN_WRITTEN_VCPU_INFO of a 64-byte aligned block),
    or None when the ranges are anything else (a peer that sent them is not to be trusted)."""
    ranges = sorted((int(f), int(a), int(b)) for f, a, b in ranges)
    per = len(XEN_WRITTEN_VCPU_INFO)
    if len(ranges) % per:
        return None
    blocks = []
    for k in range(0, len(ranges), per):
        group = ranges[k:k + per]
        frame, block = group[0][0], group[0][1] - XEN_WRITTEN_VCPU_INFO[0][0]
        if block % VCPU_INFO_SIZE or not 0 <= block <= PAGE_SIZE - VCPU_INFO_SIZE:
            return None
        if group != [(frame, block + lo, block + hi) for lo, hi in XEN_WRITTEN_VCPU_INFO]:
            return None
        blocks.append((frame, block))
    return blocks


#: guest.xen_vcpu_info: ``VCPU:0xGFN+0xOFFSET`` items separated by commas
VCPU_INFO_ITEM = r"\s*(\d+)\s*:\s*(0x[0-9a-fA-F]+)\s*\+\s*(0x[0-9a-fA-F]+)\s*"


def parse_vcpu_info_registrations(text: str) -> dict[int, tuple[int, int]]:
    """``{vcpu: (gfn, offset)}`` of a ``guest.xen_vcpu_info`` value: where the guest says it
    registered each vCPU's vcpu_info (VCPUOP_register_vcpu_info's frame and offset). Raises
    ValueError naming the item that is malformed, repeated, or not where Xen accepts a
    vcpu_info (map_vcpu_info: a 64-byte aligned block inside the page)."""
    found: dict[int, tuple[int, int]] = {}
    for item in filter(str.strip, text.split(",")):
        m = re.fullmatch(VCPU_INFO_ITEM, item)
        if not m:
            raise ValueError(f"vcpu_info item {item.strip()!r} is not VCPU:0xGFN+0xOFFSET")
        vcpu, gfn, offset = int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)
        if vcpu in found:
            raise ValueError(f"vcpu_info of vCPU {vcpu} given twice")
        if offset % VCPU_INFO_SIZE or offset > PAGE_SIZE - VCPU_INFO_SIZE:
            raise ValueError(f"vcpu_info of vCPU {vcpu} at offset {offset:#x}: Xen registers a vcpu_info only "
                             f"at a {VCPU_INFO_SIZE}-byte aligned offset of at most {PAGE_SIZE - VCPU_INFO_SIZE:#x}")
        found[vcpu] = (gfn, offset)
    return found


def vcpu_info_looks_live(page: np.ndarray, block: int) -> str:
    """'' when the 64-byte block at ``block`` of ``page`` holds a clock record Xen has written
    (a registered vcpu_info: Xen copies the vCPU's previous vcpu_info there at registration and
    updates it at every schedule), else what is wrong with it: a scale of zero is a block Xen
    never wrote, i.e. not where this domain's vCPU is registered."""
    version, tsc, system_time, mul, shift = _time_record(page, block + 0x20)
    if not mul or not -32 < shift < 32 or not system_time:
        return (f"its clock record is not one Xen wrote (version {version}, system_time {system_time}, "
                f"tsc_to_system_mul {mul:#x}, tsc_shift {shift})")
    return ""


#: fixed odd weights of page_fingerprints, one per 64-bit word of a page
_FINGERPRINT_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 1 << 63, PAGE_SIZE // 8,
                                                              dtype=np.uint64) | np.uint64(1)


def page_fingerprints(pages: np.ndarray) -> np.ndarray:
    """One 64-bit fingerprint per page (a (n, 4096) uint8 array): a multiply-add of its 512
    words with fixed odd weights. Cheap enough to take of all of guest memory twice at start;
    any change of one word changes it."""
    with np.errstate(over="ignore"):
        return (pages.view(np.uint64) * _FINGERPRINT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def _time_record(page: np.ndarray, at: int) -> tuple[int, int, int, int, int]:
    """(version, tsc_timestamp, system_time, tsc_to_system_mul, tsc_shift) of the
    vcpu_time_info at byte ``at`` of a page."""
    version, _, tsc, system_time, mul, shift = struct.unpack_from("<IIQQIb", page, at)
    return version, tsc, system_time, mul, shift


def vcpu_info_blocks(before: np.ndarray, after: np.ndarray) -> list[int]:
    """Offsets of the 64-byte blocks of one page (two reads of it, ``before`` and ``after``)
    that were updated the way Xen updates a vcpu_info: every changed byte of the block lies in
    the fields Xen writes, and the clock record moved forward consistently with itself: both
    versions even (no update in flight) and increasing, and the system time advanced by the
    TSC delta scaled with the record's own ``tsc_to_system_mul`` and ``tsc_shift`` (within
    2 %: Xen recalibrates the scale every second). Guest data that merely changes at those
    offsets does not pass that."""
    changed = np.flatnonzero(before != after)
    found = []
    for block in np.unique(changed // VCPU_INFO_SIZE):
        at = changed[changed // VCPU_INFO_SIZE == block] % VCPU_INFO_SIZE
        if not np.isin(at, _XEN_WRITTEN_OFFSETS).all():
            continue
        base = int(block) * VCPU_INFO_SIZE
        v0, tsc0, sys0, _, _ = _time_record(before, base + 0x20)
        v1, tsc1, sys1, mul, shift = _time_record(after, base + 0x20)
        if v0 % 2 or v1 % 2 or v1 <= v0 or tsc1 <= tsc0 or sys1 <= sys0 or not mul or not -32 < shift < 32:
            continue
        dt = tsc1 - tsc0
        dt = dt << shift if shift >= 0 else dt >> -shift
        expected = (dt * mul) >> 32
        if abs((sys1 - sys0) - expected) <= (sys1 - sys0) // 50 + 1000:
            found.append(base)
    return found


# -- HVM context blob -----------------------------------------------------------------------
def iter_hvm_records(blob: bytes | bytearray | memoryview) -> list[tuple[int, int, int, int]]:
    """The records of an HVM context blob as ``(typecode, instance, body_offset, length)``.

    Stops at the END record; raises ValueError on a record running past the blob.
    """
    records = []
    offset = 0
    hdr = ctypes.sizeof(HvmSaveDescriptor)
    while offset + hdr <= len(blob):
        desc = HvmSaveDescriptor.from_buffer_copy(bytes(blob[offset : offset + hdr]))
        body = offset + hdr
        if body + desc.length > len(blob):
            raise ValueError(
                f"HVM context record type {desc.typecode} at offset {offset} claims "
                f"{desc.length} bytes but the blob has {len(blob) - body} left"
            )
        records.append((desc.typecode, desc.instance, body, desc.length))
        if desc.typecode == HVM_SAVE_CODE_END:
            break
        offset = body + desc.length
    return records


def vcpus_up(blob: bytes | bytearray | memoryview) -> list[int]:
    """The vCPUs an HVM context holds registers for: Xen saves no CPU record for a vCPU that
    is down (hvm_save_cpu_ctxt, Xen 4.17), so these are the vCPUs that were up."""
    return sorted(inst for code, inst, _, _ in iter_hvm_records(blob) if code == HVM_SAVE_CODE_CPU)


def mark_vector_pending(blob: bytes, vector: int, vcpu: int | None = None) -> bytes:
    """Return ``blob`` with ``vector`` set in the IRR of the LAPIC_REGS record(s).

    Why: with Linux's per-vCPU upcall vector, a pending event-channel upcall
    lives only as an IRR bit in the vLAPIC. Loading the primary's LAPIC into
    the secondary drops the secondary's pending upcall while its vcpu_info still
    says "pending", and Xen then never raises it again. A spurious upcall is
    harmless (the guest scans its pending bits and finds nothing).
    ``vcpu`` limits the change to one instance; ``None`` marks every vCPU.
    """
    if not 16 <= vector <= 255:
        raise ValueError(f"interrupt vector must be in 16..255, got {vector}")
    out = bytearray(blob)
    hits = 0
    for typecode, instance, body, length in iter_hvm_records(out):
        if typecode != HVM_SAVE_CODE_LAPIC_REGS or (vcpu is not None and instance != vcpu):
            continue
        if length < LAPIC_REGS_SIZE:
            raise ValueError(f"LAPIC_REGS record of vCPU {instance} is {length} bytes, expected 1024")
        reg = body + LAPIC_IRR_OFFSET + (vector // 32) * 16
        value = int.from_bytes(out[reg : reg + 4], "little") | (1 << (vector % 32))
        out[reg : reg + 4] = value.to_bytes(4, "little")
        hits += 1
    if hits == 0:
        raise ValueError("HVM context has no LAPIC_REGS record" + (f" for vCPU {vcpu}" if vcpu is not None else ""))
    return bytes(out)


def msi_for_vector(vector: int, apic_id: int) -> tuple[int, int]:
    """MSI address and data delivering ``vector`` (fixed, edge) to the LAPIC ``apic_id``."""
    if not 16 <= vector <= 255:
        raise ValueError(f"interrupt vector must be in 16..255, got {vector}")
    return 0xFEE00000 | (apic_id << 12), vector


# -- errors ---------------------------------------------------------------------------------
def call_error(call: str, domain: str, err: int, detail: str = "") -> DomainError:
    """The one error format of this backend: call, domain, errno name and text."""
    import errno as errno_mod

    name = errno_mod.errorcode.get(err, "E?")
    extra = f" ({detail})" if detail else ""
    return DomainError(f"{call} on domain {domain} failed{extra}: {name} {err}: {os.strerror(err)}")


def require_dom0(privcmd_path: str = PRIVCMD_PATH) -> None:
    """Raise a DomainError saying this is not a Xen dom0 unless ``privcmd_path`` exists."""
    if not os.path.exists(privcmd_path):
        raise DomainError(
            f"this host is not a Xen dom0: {privcmd_path} is absent (the xen backend needs a "
            "Xen hypervisor, the xen-privcmd driver loaded and root); use backend \"sim\" elsewhere"
        )


# -- libraries ------------------------------------------------------------------------------
_LIBRARY_CANDIDATES = {
    "xenctrl": ["libxenctrl.so.4.17", "libxenctrl.so"],
    "xenforeignmemory": ["libxenforeignmemory.so.1", "libxenforeignmemory.so"],
    "xentoollog": ["libxentoollog.so.1", "libxentoollog.so"],
    "xendevicemodel": ["libxendevicemodel.so.1", "libxendevicemodel.so"],
    "xenstore": ["libxenstore.so.4", "libxenstore.so"],
    "c": ["libc.so.6"],
}


def _load(short: str) -> ctypes.CDLL:
    names = [n for n in [ctypes.util.find_library(short)] if n] + _LIBRARY_CANDIDATES[short]
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            errors.append(str(exc))
    raise DomainError(
        f"cannot load lib{short} (tried {', '.join(names)}): {'; '.join(errors)}; "
        "install Debian's xen-utils-4.17 (runtime) or libxen-dev"
    )


@dataclass
class XenLibraries:
    xc: ctypes.CDLL
    fmem: ctypes.CDLL
    xtl: ctypes.CDLL
    dm: ctypes.CDLL
    xs: ctypes.CDLL
    libc: ctypes.CDLL


_libraries: XenLibraries | None = None


def load_libraries() -> XenLibraries:
    """Load the Xen libraries once and declare the prototypes used by the backend."""
    global _libraries
    if _libraries is not None:
        return _libraries
    xc, fmem, xtl = _load("xenctrl"), _load("xenforeignmemory"), _load("xentoollog")
    dm, xs, libc = _load("xendevicemodel"), _load("xenstore"), _load("c")
    vp, u32, i32, ul = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_ulong

    def proto(fn, restype, *argtypes):  # type: ignore[no-untyped-def]
        fn.restype = restype
        fn.argtypes = list(argtypes)

    proto(xtl.xtl_createlogger_stdiostream, vp, vp, i32, ctypes.c_uint)
    proto(xtl.xtl_logger_destroy, None, vp)
    proto(xc.xc_interface_open, vp, vp, vp, ctypes.c_uint)
    proto(xc.xc_interface_close, i32, vp)
    proto(xc.xc_domain_getinfolist, i32, vp, u32, ctypes.c_uint, ctypes.POINTER(XenDomctlGetDomainInfo))
    proto(xc.xc_domain_pause, i32, vp, u32)
    proto(xc.xc_domain_unpause, i32, vp, u32)
    proto(xc.xc_domain_maximum_gpfn, i32, vp, u32, ctypes.POINTER(xen_pfn_t))
    proto(xc.xc_logdirty_control, ctypes.c_longlong, vp, u32, ctypes.c_uint,
          ctypes.POINTER(XcHypercallBuffer), ul, ctypes.c_uint, ctypes.POINTER(XenShadowOpStats))
    proto(xc.xc__hypercall_buffer_alloc_pages, vp, vp, ctypes.POINTER(XcHypercallBuffer), i32)
    proto(xc.xc__hypercall_buffer_free_pages, None, vp, ctypes.POINTER(XcHypercallBuffer), i32)
    proto(xc.xc_domain_hvm_getcontext, i32, vp, u32, vp, u32)
    proto(xc.xc_domain_hvm_setcontext, i32, vp, u32, vp, u32)
    proto(xc.xc_domain_send_trigger, i32, vp, u32, u32, u32)
    proto(xc.xc_hvm_param_get, i32, vp, u32, u32, ctypes.POINTER(ctypes.c_uint64))
    proto(xc.xc_evtchn_status, i32, vp, ctypes.POINTER(EvtchnStatus))
    proto(fmem.xenforeignmemory_open, vp, vp, ctypes.c_uint)
    proto(fmem.xenforeignmemory_close, i32, vp)
    proto(fmem.xenforeignmemory_map, vp, vp, u32, i32, ctypes.c_size_t, vp, vp)
    proto(fmem.xenforeignmemory_unmap, i32, vp, vp, ctypes.c_size_t)
    proto(dm.xendevicemodel_open, vp, vp, ctypes.c_uint)
    proto(dm.xendevicemodel_close, i32, vp)
    proto(dm.xendevicemodel_inject_msi, i32, vp, ctypes.c_uint16, ctypes.c_uint64, u32)
    proto(xs.xs_open, vp, ul)
    proto(xs.xs_close, None, vp)
    proto(xs.xs_read, vp, vp, u32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint))
    proto(libc.free, None, vp)
    _libraries = XenLibraries(xc=xc, fmem=fmem, xtl=xtl, dm=dm, xs=xs, libc=libc)
    return _libraries
