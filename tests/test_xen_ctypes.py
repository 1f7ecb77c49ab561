"""The Xen backend's ctypes layer, without a hypervisor.

Struct layouts are checked against the installed libxen-dev headers by compiling
a small C program that prints sizeof/offsetof; the rest pins down the pure
logic: bitmap decoding, HVM-context fix-ups, PV refusal, error text, and the
refusal on a host without /dev/xen/privcmd.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.xen_io import DomainError
from pipeline.xen_io import xen_ctypes as xc

HEADERS = Path("/usr/include/xenctrl.h")

LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <xenctrl.h>
#include <xen/hvm/save.h>
#define S(t) printf(#t " sizeof %zu\n", sizeof(t))
#define O(t, f) printf(#t " " #f " %zu\n", offsetof(t, f))
#define V(c) printf("const " #c " %lld\n", (long long)(c))
int main(void) {
    S(xc_domaininfo_t);
    O(xc_domaininfo_t, domain); O(xc_domaininfo_t, flags); O(xc_domaininfo_t, tot_pages);
    O(xc_domaininfo_t, max_pages); O(xc_domaininfo_t, outstanding_pages); O(xc_domaininfo_t, shr_pages);
    O(xc_domaininfo_t, paged_pages); O(xc_domaininfo_t, shared_info_frame); O(xc_domaininfo_t, cpu_time);
    O(xc_domaininfo_t, nr_online_vcpus); O(xc_domaininfo_t, max_vcpu_id); O(xc_domaininfo_t, ssidref);
    O(xc_domaininfo_t, handle); O(xc_domaininfo_t, cpupool); O(xc_domaininfo_t, gpaddr_bits);
    O(xc_domaininfo_t, arch_config);
    S(struct xen_arch_domainconfig); O(struct xen_arch_domainconfig, emulation_flags);
    O(struct xen_arch_domainconfig, misc_flags);
    S(xc_hypercall_buffer_t); O(xc_hypercall_buffer_t, hbuf); O(xc_hypercall_buffer_t, param_shadow);
    O(xc_hypercall_buffer_t, dir); O(xc_hypercall_buffer_t, ubuf); O(xc_hypercall_buffer_t, sz);
    S(xc_shadow_op_stats_t); O(xc_shadow_op_stats_t, fault_count); O(xc_shadow_op_stats_t, dirty_count);
    S(struct hvm_save_descriptor); O(struct hvm_save_descriptor, typecode);
    O(struct hvm_save_descriptor, instance); O(struct hvm_save_descriptor, length);
    S(xen_pfn_t); S(struct hvm_hw_lapic_regs);
    V(XEN_DOMINF_dying); V(XEN_DOMINF_hvm_guest); V(XEN_DOMINF_shutdown); V(XEN_DOMINF_paused);
    V(XEN_DOMINF_blocked); V(XEN_DOMINF_running); V(XEN_DOMINF_hap);
    V(XEN_DOMCTL_SHADOW_OP_OFF); V(XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY); V(XEN_DOMCTL_SHADOW_OP_CLEAN);
    V(XEN_DOMCTL_SHADOW_OP_PEEK); V(XEN_DOMCTL_SENDTRIGGER_NMI); V(XEN_X86_EMU_LAPIC); V(XEN_X86_EMU_ALL);
    V(XTL_ERROR); V(HVM_SAVE_CODE(END)); V(HVM_SAVE_CODE(LAPIC_REGS)); V(HVM_SAVE_CODE(CPU));
    V(HVM_PARAM_STORE_PFN); V(HVM_PARAM_CONSOLE_PFN);
    S(xc_evtchn_status_t); O(xc_evtchn_status_t, dom); O(xc_evtchn_status_t, port);
    O(xc_evtchn_status_t, status); O(xc_evtchn_status_t, vcpu);
    printf("xc_evtchn_status_t virq %zu\n", offsetof(xc_evtchn_status_t, u.virq));
    V(EVTCHNSTAT_virq); V(VIRQ_TIMER);
    printf("shared_info evtchn_pending %zu\n", offsetof(struct shared_info, evtchn_pending));
    printf("vcpu_info evtchn_pending_sel %zu\n", offsetof(struct vcpu_info, evtchn_pending_sel));
    printf("vcpu_info evtchn_upcall_pending %zu\n", offsetof(struct vcpu_info, evtchn_upcall_pending));
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """sizeof/offsetof/constant values as the installed Xen headers define them."""
    if not HEADERS.exists():
        pytest.skip("libxen-dev headers (/usr/include/xenctrl.h) are not installed")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to check struct layouts against the headers")
    work = tmp_path_factory.mktemp("xenlayout")
    (work / "layout.c").write_text(LAYOUT_PROGRAM)
    subprocess.run([cc, "-o", str(work / "layout"), str(work / "layout.c")], check=True, timeout=60,
                   capture_output=True)
    out = subprocess.run([str(work / "layout")], check=True, capture_output=True, text=True, timeout=10)
    layout = {}
    for line in out.stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        layout[key] = int(value)
    return layout


STRUCTS = [
    ("xc_domaininfo_t", xc.XenDomctlGetDomainInfo),
    ("struct xen_arch_domainconfig", xc.XenArchDomainConfig),
    ("xc_hypercall_buffer_t", xc.XcHypercallBuffer),
    ("xc_shadow_op_stats_t", xc.XenShadowOpStats),
    ("struct hvm_save_descriptor", xc.HvmSaveDescriptor),
    ("xc_evtchn_status_t", xc.EvtchnStatus),
]


@pytest.mark.parametrize("c_name,py_struct", STRUCTS, ids=[s[0] for s in STRUCTS])
def test_struct_layout_matches_installed_headers(header_layout, c_name, py_struct) -> None:
    assert ctypes.sizeof(py_struct) == header_layout[f"{c_name} sizeof"]
    for field, *_ in py_struct._fields_:
        if field.startswith("pad"):
            continue  # padding has no name worth checking; the size check covers it
        assert getattr(py_struct, field).offset == header_layout[f"{c_name} {field}"], field


def test_constants_match_installed_headers(header_layout) -> None:
    assert ctypes.sizeof(xc.xen_pfn_t) == header_layout["xen_pfn_t sizeof"]
    assert xc.LAPIC_REGS_SIZE == header_layout["struct hvm_hw_lapic_regs sizeof"]
    mine = {
        "XEN_DOMINF_dying": xc.XEN_DOMINF_dying, "XEN_DOMINF_hvm_guest": xc.XEN_DOMINF_hvm_guest,
        "XEN_DOMINF_shutdown": xc.XEN_DOMINF_shutdown, "XEN_DOMINF_paused": xc.XEN_DOMINF_paused,
        "XEN_DOMINF_blocked": xc.XEN_DOMINF_blocked, "XEN_DOMINF_running": xc.XEN_DOMINF_running,
        "XEN_DOMINF_hap": xc.XEN_DOMINF_hap, "XEN_DOMCTL_SHADOW_OP_OFF": xc.XEN_DOMCTL_SHADOW_OP_OFF,
        "XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY": xc.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
        "XEN_DOMCTL_SHADOW_OP_CLEAN": xc.XEN_DOMCTL_SHADOW_OP_CLEAN,
        "XEN_DOMCTL_SHADOW_OP_PEEK": xc.XEN_DOMCTL_SHADOW_OP_PEEK,
        "XEN_DOMCTL_SENDTRIGGER_NMI": xc.XEN_DOMCTL_SENDTRIGGER_NMI,
        "XEN_X86_EMU_LAPIC": xc.XEN_X86_EMU_LAPIC, "XEN_X86_EMU_ALL": xc.XEN_X86_EMU_ALL,
        "XTL_ERROR": xc.XTL_ERROR, "HVM_SAVE_CODE(END)": xc.HVM_SAVE_CODE_END,
        "HVM_SAVE_CODE(LAPIC_REGS)": xc.HVM_SAVE_CODE_LAPIC_REGS, "HVM_SAVE_CODE(CPU)": xc.HVM_SAVE_CODE_CPU,
        "HVM_PARAM_STORE_PFN": xc.HVM_PARAM_STORE_PFN, "HVM_PARAM_CONSOLE_PFN": xc.HVM_PARAM_CONSOLE_PFN,
    }
    for name, value in mine.items():
        assert value == header_layout[f"const {name}"], name
    assert (xc.EVTCHNSTAT_VIRQ, xc.VIRQ_TIMER) == (header_layout["const EVTCHNSTAT_virq"],
                                                   header_layout["const VIRQ_TIMER"])
    assert xc.SHARED_INFO_EVTCHN_PENDING == header_layout["shared_info evtchn_pending"]
    assert xc.VCPU_INFO_PENDING_SEL == header_layout["vcpu_info evtchn_pending_sel"]
    assert xc.VCPU_INFO_UPCALL_PENDING == header_layout["vcpu_info evtchn_upcall_pending"]


# -- bitmap decoding --------------------------------------------------------------------------
def test_bitmap_decodes_to_sorted_pfns_including_word_edges() -> None:
    nbits = 1_044_480  # a PVH guest's gpfn space (max_gpfn 0xfefff + 1)
    expected = np.array([0, 1, 63, 64, 127, 4096, 65_535, 0xFEFFC, nbits - 1], dtype=np.uint64)
    words = np.zeros((nbits + 63) // 64, dtype=np.uint64)
    for pfn in expected:
        words[int(pfn) // 64] |= np.uint64(1) << np.uint64(int(pfn) % 64)
    got = xc.bitmap_to_pfns(words, nbits)
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, expected)


def test_bitmap_ignores_bits_beyond_the_frame_count_and_empty_is_empty() -> None:
    words = np.zeros(2, dtype=np.uint64)
    assert xc.bitmap_to_pfns(words, 128).size == 0
    words[1] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    np.testing.assert_array_equal(xc.bitmap_to_pfns(words, 70), np.arange(64, 70, dtype=np.uint64))


def test_bitmap_matches_a_reference_decoder_on_random_bits() -> None:
    rng = np.random.default_rng(6)
    bits = rng.random(10_000) < 0.03
    words = np.packbits(bits, bitorder="little").view(np.uint8)
    words = np.concatenate([words, np.zeros((-words.size) % 8, np.uint8)]).view(np.uint64)
    np.testing.assert_array_equal(xc.bitmap_to_pfns(words, bits.size), np.flatnonzero(bits).astype(np.uint64))


def test_bitmap_scan_limited_to_candidate_words_sees_only_those() -> None:
    words = np.zeros(100, dtype=np.uint64)
    words[[2, 50, 99]] = np.uint64(1) << np.uint64(3)
    got = xc.bitmap_to_pfns(words, 6400, candidates=np.array([2, 3, 99], dtype=np.int64))
    np.testing.assert_array_equal(got, [2 * 64 + 3, 99 * 64 + 3])  # word 50 is not a candidate


def test_bitmap_rejects_wrong_dtype_and_short_buffer() -> None:
    with pytest.raises(ValueError, match="uint64"):
        xc.bitmap_to_pfns(np.zeros(4, dtype=np.uint32), 64)
    with pytest.raises(ValueError, match="cannot hold"):
        xc.bitmap_to_pfns(np.zeros(1, dtype=np.uint64), 65)


# -- HVM context fix-ups ----------------------------------------------------------------------
def record(typecode: int, instance: int, body: bytes) -> bytes:
    return bytes(xc.HvmSaveDescriptor(typecode, instance, len(body))) + body


def fabricated_context(vcpus: int = 1, up: int | None = None) -> bytes:
    """A context blob shaped like Xen's: a header-ish record, a CPU record per vCPU that is up
    (``up``, default all), LAPIC_REGS per vCPU, END."""
    blob = record(1, 0, b"\x11" * 24)
    for vcpu in range(vcpus if up is None else up):
        blob += record(xc.HVM_SAVE_CODE_CPU, vcpu, b"\x22" * 64)
    for vcpu in range(vcpus):
        blob += record(xc.HVM_SAVE_CODE_LAPIC_REGS, vcpu, bytes(xc.LAPIC_REGS_SIZE))
    return blob + record(xc.HVM_SAVE_CODE_END, 0, b"")


def lapic_irr_bits(blob: bytes, vcpu: int) -> set[int]:
    for typecode, instance, body, _ in xc.iter_hvm_records(blob):
        if typecode == xc.HVM_SAVE_CODE_LAPIC_REGS and instance == vcpu:
            return {32 * reg + bit for reg in range(8) for bit in range(32)
                    if int.from_bytes(blob[body + 0x200 + 16 * reg: body + 0x204 + 16 * reg], "little") >> bit & 1}
    raise AssertionError(f"no LAPIC record for vCPU {vcpu}")


def test_mark_vector_pending_sets_only_that_irr_bit_on_every_vcpu() -> None:
    blob = fabricated_context(vcpus=2)
    fixed = xc.mark_vector_pending(blob, 0xF3)
    assert len(fixed) == len(blob)
    assert lapic_irr_bits(fixed, 0) == {0xF3} and lapic_irr_bits(fixed, 1) == {0xF3}
    diff = [i for i in range(len(blob)) if blob[i] != fixed[i]]
    assert len(diff) == 2  # one byte per vCPU


def test_mark_vector_pending_one_vcpu_and_errors() -> None:
    fixed = xc.mark_vector_pending(fabricated_context(vcpus=2), 0x20, vcpu=1)
    assert lapic_irr_bits(fixed, 0) == set() and lapic_irr_bits(fixed, 1) == {0x20}
    with pytest.raises(ValueError, match="no LAPIC_REGS"):
        xc.mark_vector_pending(record(1, 0, b"x" * 8) + record(0, 0, b""), 0xF3)
    with pytest.raises(ValueError, match="16..255"):
        xc.mark_vector_pending(fabricated_context(), 300)
    truncated = fabricated_context(up=0)[:100]
    with pytest.raises(ValueError, match="claims 1024 bytes"):
        xc.mark_vector_pending(truncated, 0xF3)


def test_msi_for_vector_addresses_the_lapic() -> None:
    assert xc.msi_for_vector(0xF3, apic_id=0) == (0xFEE00000, 0xF3)
    assert xc.msi_for_vector(0x40, apic_id=2) == (0xFEE02000, 0x40)


# -- domain info and PV refusal ---------------------------------------------------------------
def fabricated_info(flags: int, emulation_flags: int) -> xc.DomainInfo:
    raw = xc.XenDomctlGetDomainInfo(domain=7, flags=flags, tot_pages=32768, shared_info_frame=0x10,
                                    nr_online_vcpus=1)
    raw.arch_config.emulation_flags = emulation_flags
    return xc.DomainInfo.from_struct(xc.XenDomctlGetDomainInfo.from_buffer_copy(bytes(raw)))


def test_guest_type_from_flags_and_emulation() -> None:
    assert fabricated_info(0, 0).guest_type == "pv"
    assert fabricated_info(xc.XEN_DOMINF_hvm_guest, xc.XEN_X86_EMU_LAPIC).guest_type == "pvh"
    assert fabricated_info(xc.XEN_DOMINF_hvm_guest, xc.XEN_X86_EMU_ALL).guest_type == "hvm"
    info = fabricated_info(xc.XEN_DOMINF_hvm_guest | xc.XEN_DOMINF_paused, xc.XEN_X86_EMU_LAPIC)
    assert info.paused and not info.dying and info.shared_info_frame == 0x10 and info.domid == 7


def test_pv_guest_is_refused_with_reason() -> None:
    with pytest.raises(DomainError, match=r"domain 'web' \(id 7\) is a PV guest.*PVH and HVM"):
        xc.check_replicable(fabricated_info(0, 0), "'web'")


def test_dying_guest_is_refused_and_pvh_hvm_accepted() -> None:
    with pytest.raises(DomainError, match="is dying"):
        xc.check_replicable(fabricated_info(xc.XEN_DOMINF_hvm_guest | xc.XEN_DOMINF_dying, 1), "d")
    xc.check_replicable(fabricated_info(xc.XEN_DOMINF_hvm_guest, xc.XEN_X86_EMU_LAPIC), "d")
    xc.check_replicable(fabricated_info(xc.XEN_DOMINF_hvm_guest, xc.XEN_X86_EMU_ALL), "d")


# -- errors and refusal -----------------------------------------------------------------------
def test_call_error_names_call_domain_and_errno_text() -> None:
    err = xc.call_error("xc_logdirty_control(CLEAN)", "prim (id 3)", errno.EOPNOTSUPP)
    assert isinstance(err, DomainError)
    text = str(err)
    assert "xc_logdirty_control(CLEAN)" in text and "prim (id 3)" in text
    assert errno.errorcode[errno.EOPNOTSUPP] in text and os.strerror(errno.EOPNOTSUPP) in text


def test_refuses_host_without_privcmd(tmp_path: Path) -> None:
    from pipeline.xen_io.xen import open_xen_domain

    missing = tmp_path / "privcmd"
    with pytest.raises(DomainError, match="this host is not a Xen dom0.*privcmd is absent"):
        open_xen_domain("prim", privcmd_path=str(missing))


def test_backend_registered_under_xen() -> None:
    import importlib

    from pipeline.xen_io import BACKENDS

    module, factory = BACKENDS["xen"].split(":")
    assert callable(getattr(importlib.import_module(module), factory))


@pytest.mark.skipif(not Path("/usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17").exists(),
                    reason="Xen runtime libraries are not installed")
def test_libraries_load_and_prototypes_resolve() -> None:
    libs = xc.load_libraries()
    assert libs.xc.xc_logdirty_control.restype is ctypes.c_longlong
    assert libs.fmem.xenforeignmemory_map.restype is ctypes.c_void_p


# -- batched copies: holes and the secondary's own frames ----------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED, _MAP_ANONYMOUS = 0x10, 0x20
_guest_fds: dict[int, int] = {}


def guest_ram(pages: np.ndarray) -> np.ndarray:
    """A copy of ``pages`` as "guest RAM" in a memfd, so that the mock's mappings alias it the
    way privcmd's foreign mappings alias a guest's frames (a write through either is seen by both)."""
    import mmap as mmap_mod

    fd = os.memfd_create("mock-guest-ram")
    os.ftruncate(fd, pages.nbytes)
    ram = np.frombuffer(mmap_mod.mmap(fd, pages.nbytes), np.uint8).reshape(pages.shape)
    ram[:] = pages
    _guest_fds[ram.ctypes.data] = fd
    return ram


class MockForeignMemory:
    """MOCK of libxenforeignmemory (named as such): per-frame map errors (holes) cannot be caused
    without a hypervisor. Maps frames of a memfd "guest RAM" (guest_ram) at consecutive
    addresses, aliasing it like privcmd does; frames in ``holes`` fail with -EINVAL and are left
    inaccessible (touching one faults, as privcmd's do)."""

    def __init__(self, ram: np.ndarray, holes: set[int], on_map=None) -> None:
        if ram.ctypes.data not in _guest_fds:
            ram = guest_ram(ram)
        self.ram, self.fd, self.holes, self.maps, self.on_map = ram, _guest_fds[ram.ctypes.data], holes, {}, on_map
        self.map_calls = 0

    def xenforeignmemory_map(self, fmem, domid, prot, n, frames_addr, errs_addr):
        self.map_calls += 1
        if self.on_map is not None:
            self.on_map()
        frames = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(frames_addr))
        errs = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(errs_addr))
        addr = _libc.mmap(None, n * 4096, 0, 0x02 | _MAP_ANONYMOUS, -1, 0)   # PROT_NONE, private
        assert addr not in (None, ctypes.c_void_p(-1).value)
        for i, pfn in enumerate(frames.tolist()):
            errs[i] = -errno.EINVAL if pfn in self.holes else 0
            if not errs[i]:
                got = _libc.mmap(addr + i * 4096, 4096, prot, 0x01 | _MAP_FIXED, self.fd, pfn * 4096)
                assert got == addr + i * 4096
        self.maps[addr] = n
        return addr

    def xenforeignmemory_unmap(self, fmem, addr, n):
        assert self.maps.pop(addr) == n
        return _libc.munmap(addr, n * 4096)


def domain_over(ram: np.ndarray, holes: set[int], own: list[int], on_map=None):
    """A XenDomain over MockForeignMemory: its frames are the gpfns of ``ram`` outside
    ``holes`` at open (the hypervisor-side scan runs for real against the mock); ``own`` are
    gpfns of the domain's own Xen pages. ``on_map`` runs before each map."""
    from types import SimpleNamespace

    from pipeline.xen_io.xen import XenDomain

    dom = object.__new__(XenDomain)
    fmem = MockForeignMemory(ram, holes, on_map)
    dom._h = SimpleNamespace(lib=SimpleNamespace(fmem=fmem, xc=None), fmem=1)
    dom._pid, dom._privcmd_path = os.getpid(), "/dev/null"
    dom.domid, dom.name, dom.max_gpfn = 9, "mock", fmem.ram.shape[0] - 1
    dom.info = SimpleNamespace(nr_online_vcpus=1)
    dom._mapped, dom._hole_mask, dom.map_holes = None, None, np.empty(0, np.uint64)
    dom.written_evidence = {}
    dom.frames = dom._scan_mappable()
    dom.page_count = int(dom.frames.size)
    dom.own_frames = dom.indexes_of(np.array(own, dtype=np.uint64))
    dom.xen_written = {}
    dom._bitmap = dom._bitmap_words = dom._ctx_buf = None
    dom._paused_here = False
    dom.vcpus_watched, dom._ctx_used, dom._loaded_len = None, -1, -1
    dom._watch_log_dirty = lambda on: False    # no log-dirty unless a test gives one
    fmem.holes = set()   # from here on every frame found at open maps
    return dom


def test_frames_are_indexes_of_the_mappable_gpfns() -> None:
    """A PVH guest's RAM is a small part of its gpfn space: the pipeline sees frame indexes."""
    ram = np.random.default_rng(2).integers(0, 256, (3000, 4096), dtype=np.uint8)
    dom = domain_over(ram, holes=set(range(100, 2990)), own=[2995])
    assert dom.page_count == 110
    np.testing.assert_array_equal(dom.frames[98:102], [98, 99, 2990, 2991])
    out = np.empty((2, 4096), np.uint8)
    dom.read_pages(np.array([5, 101], np.uint64), out)
    np.testing.assert_array_equal(out[1], ram[2991])
    np.testing.assert_array_equal(dom.own_frames, [105])
    np.testing.assert_array_equal(dom.indexes_of(np.array([0, 2999], np.uint64)), [0, 109])
    with pytest.raises(DomainError, match=r"1 frames outside the 110 mapped .*gpfn 0x64.*layout changed"):
        dom.indexes_of(np.array([3, 100], np.uint64))


def test_read_pages_zero_fills_and_reports_holes_across_batches() -> None:
    ram = np.random.default_rng(1).integers(0, 256, (3000, 4096), dtype=np.uint8)
    dom = domain_over(ram, holes=set(), own=[])
    dom._h.lib.fmem.holes = {5, 2500}   # frames that stopped mapping after open
    pfns = np.array([1, 5, 7, 1500, 2500, 2999], dtype=np.uint64)
    out = np.full((6, 4096), 0xAA, np.uint8)
    holes = dom.read_pages(pfns, out)
    np.testing.assert_array_equal(holes, [5, 2500])
    for row, pfn in enumerate(pfns):
        expected = 0 if int(pfn) in (5, 2500) else ram[int(pfn)]
        np.testing.assert_array_equal(out[row], expected)
    many = np.arange(0, 3000, dtype=np.uint64)  # more than one MAP_BATCH
    big = np.empty((3000, 4096), np.uint8)
    assert dom.read_pages(many, big).tolist() == [5, 2500]
    np.testing.assert_array_equal(big[2999], ram[2999])


def test_write_pages_keeps_own_frames_xen_written_bytes_and_skips_holes() -> None:
    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    dom = domain_over(ram, holes=set(), own=[0x10])
    dom._h.lib.fmem.holes = {3}
    ram[0x20, 0x3c0:0x400] = 0x77               # this domain's vcpu_info at 0x20:0x3c0
    dom.xen_written = {0x20: ((0x3c0, 0x3d0), (0x3e0, 0x400))}
    pfns = np.array([2, 3, 0x10, 0x11, 0x20], dtype=np.uint64)
    data = np.stack([np.full(4096, v, np.uint8) for v in (1, 2, 3, 4, 5)])
    assert dom.write_pages(pfns, data).tolist() == [3]
    assert ram[2, 0] == 1 and ram[0x11, 4095] == 4
    assert not ram[3].any(), "a hole must not be written"
    assert not ram[0x10].any(), "the domain's own shared_info frame must be kept"
    assert (ram[0x20, 0x3c0:0x3d0] == 0x77).all() and (ram[0x20, 0x3e0:0x400] == 0x77).all()
    assert (ram[0x20, 0x3d0:0x3e0] == 5).all() and (ram[0x20, :0x3c0] == 5).all()


def _vcpu_info_tick(page: np.ndarray, at: int, step: int) -> None:
    """What Xen does to a registered vcpu_info: event flags, and a new clock record."""
    page[at] = step & 1                                     # evtchn_upcall_pending
    rec = page[at + 0x20: at + 0x40].view(np.uint64)
    rec[0] = 2 * step                                       # version (even: complete)
    rec[1] = 3000 * step                                    # tsc_timestamp: a 3 GHz TSC ...
    rec[2] = 5_000_000 + 1000 * step                        # system_time (ns)
    rec[3] = 0xAAAA_AAAA | (-1 & 0xFF) << 32                # ... is ns = (tsc >> 1) * 2/3


def test_find_xen_written_locates_the_vcpu_info_and_not_guest_data() -> None:
    """MOCK of a running guest and of Xen's own writes (no hypervisor in CI): between the
    watch's reads the guest keeps rewriting pages, and 'Xen' ticks the vcpu_info at gpfn 40 +
    0x3c0. Only that block is found (guest data that passed the clock test in one round is not
    taken), and the digest then ignores it."""
    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    step = [0]

    def running_guest(_s: float) -> None:
        step[0] += 1
        ram[7, :64] = step[0] % 251                         # guest data in a 64-byte block
        ram[9, 0x3e8:0x3f0] = step[0] % 13                 # guest data that happens to sit at vcpu_info offsets
        if step[0] <= 2:                                    # guest data that looks like one, once:
            _vcpu_info_tick(ram[11], 0x80, step[0])        # the 1st watch round only
        _vcpu_info_tick(ram[40], 0x3c0, step[0])
    dom = domain_over(ram, holes={50}, own=[])
    found = dom.find_xen_written(window_s=0, sleep=running_guest)
    assert found == {dom.indexes_of(np.array([40], np.uint64))[0]: ((0x3c0, 0x3d0), (0x3e0, 0x400))}
    twin = domain_over(guest_ram(ram), holes={50}, own=[])
    twin.xen_written = dict(found)
    _vcpu_info_tick(twin._h.lib.fmem.ram[40], 0x3c0, 999)  # the twin's own clock differs
    assert dom.memory_digest() == twin.memory_digest()
    twin._h.lib.fmem.ram[40, 0x3d0] ^= 1                   # a guest byte of that block differs
    assert dom.memory_digest() != twin.memory_digest()


def test_log_dirty_evidence_beats_guest_data_that_looks_like_a_vcpu_info_more_often() -> None:
    """MOCK of Xen's log-dirty (no hypervisor in CI) and of the Xen lab's run-3 failure: guest
    data on a page the guest writes (logged dirty) passes the clock test in every round, the
    real vcpu_info, on a page the guest writes too, in fewer. In one round the guest left the
    real one's page alone while Xen ticked it: only Xen can have written it, so it is taken."""
    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    step, dirty = [0], [set()]

    def running_guest(_s: float) -> None:
        step[0] += 1
        _vcpu_info_tick(ram[21], 0x540, step[0])           # guest data, every round, page dirty
        dirty[0] = {21}
        if step[0] % 3 == 1:                               # Xen ticks the real one every 3rd window...
            _vcpu_info_tick(ram[40], 0x3c0, step[0])
            if step[0] != 7:                               # ...and the guest writes that page too, but in one
                ram[40, 0x100] = step[0]
                dirty[0].add(40)
    dom = domain_over(ram, holes=set(), own=[])
    dom._watch_log_dirty = lambda on: True
    dom.read_and_clear_dirty = lambda: dirty[0].clear() or np.empty(0, np.uint64)
    dom.peek_dirty = lambda: np.array(sorted(dirty[0]), np.uint64)
    step[0] = 0
    found = dom.find_xen_written(rounds=12, window_s=0, sleep=running_guest)
    assert found == {40: ((0x3c0, 0x3d0), (0x3e0, 0x400))}
    assert dom.written_evidence[(40, 0x3c0)][1] is True         # certain
    assert dom.written_evidence[(21, 0x540)] == (dom.written_evidence[(21, 0x540)][0], False)
    assert dom.written_evidence[(21, 0x540)][0] > dom.written_evidence[(40, 0x3c0)][0]


def test_handshake_secondary_adopts_the_primarys_vcpu_info_only_when_it_saw_it() -> None:
    """The primary's ranges go to the secondary in HELLO. MOCK evidence (no hypervisor in CI)."""
    sec = domain_over(guest_ram(np.zeros((64, 4096), np.uint8)), holes=set(), own=[])
    prim_ranges = ((40, 0x3c0, 0x3d0), (40, 0x3e0, 0x400))
    sec.written_evidence = {(40, 0x3c0): (1, False), (21, 0x540): (3, False)}
    sec.xen_written = {21: ((0x540, 0x550), (0x560, 0x580))}   # it had taken guest data
    sec.agree_hypervisor_written(prim_ranges, peer_is_primary=True)
    assert sec.hypervisor_written() == prim_ranges
    sec.agree_hypervisor_written(prim_ranges, peer_is_primary=False)   # equal: the primary accepts
    with pytest.raises(DomainError, match=r"disagree.*secondary gpfn 0x15\+0x540.*this node gpfn 0x28\+0x3c0"):
        sec.agree_hypervisor_written(((21, 0x540, 0x550), (21, 0x560, 0x580)), peer_is_primary=False)
    with pytest.raises(DomainError, match=r"never saw gpfn 0x7\+0x0"):
        sec.agree_hypervisor_written(((7, 0, 0x10), (7, 0x20, 0x40)), peer_is_primary=True)
    with pytest.raises(DomainError, match="not whole vcpu_info field sets"):
        sec.agree_hypervisor_written(((40, 0x3c0, 0x3d0),), peer_is_primary=True)
    assert sec.hypervisor_written() == prim_ranges, "a refusal changes nothing"


def test_written_ranges_set_in_a_forked_process_reach_its_siblings() -> None:
    """The coordinator adopts the primary's ranges after the restore stage was forked: the
    ranges live in a table shared across the node's forks."""
    dom = domain_over(guest_ram(np.zeros((64, 4096), np.uint8)), holes=set(), own=[])
    dom.xen_written = {}
    pid = os.fork()
    if pid == 0:   # the "coordinator"
        try:
            dom.xen_written = {40: ((0x3c0, 0x3d0), (0x3e0, 0x400))}
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert dom.xen_written == {40: ((0x3c0, 0x3d0), (0x3e0, 0x400))}
    with pytest.raises(DomainError, match="outside"):
        dom.xen_written = {64: ((0, 16),)}


def test_guest_memory_is_mapped_once_and_a_checkpoint_copy_is_one_gather() -> None:
    """MOCK of the foreign mapping (no hypervisor in CI): many reads and writes, one map per
    process and writability; the mapping aliases the guest (a write is seen by a read)."""
    ram = guest_ram(np.random.default_rng(3).integers(0, 256, (3000, 4096), dtype=np.uint8))
    dom = domain_over(ram, holes=set(), own=[])
    fmem = dom._h.lib.fmem
    before = fmem.map_calls
    out = np.empty((2500, 4096), np.uint8)
    for k in range(5):
        pfns = np.sort(np.random.default_rng(k).choice(3000, 2500, replace=False)).astype(np.uint64)
        dom.read_pages(pfns, out)
        np.testing.assert_array_equal(out, ram[pfns.astype(np.int64)])
    assert fmem.map_calls == before + 1
    dom.write_pages(np.array([17], np.uint64), np.full((1, 4096), 9, np.uint8))
    assert fmem.map_calls == before + 2 and (ram[17] == 9).all()   # mapped again, writable
    dom.read_pages(np.array([17], np.uint64), out)
    assert (out[0] == 9).all() and fmem.map_calls == before + 2
    dom._pid = -1                      # as in a forked stage: the mapping is not inherited
    from pipeline.xen_io import xen
    real = xen.xen_handles
    try:
        xen.xen_handles = lambda path: dom._h
        dom.read_pages(np.array([17], np.uint64), out)
    finally:
        xen.xen_handles = real
    assert fmem.map_calls == before + 3
    dom.close()
    assert len(fmem.maps) == 1        # left: the "parent's", which only the parent unmaps


def test_dirty_count_is_a_log_dirty_peek_without_a_bitmap() -> None:
    """MOCK of xc_logdirty_control (no hypervisor in CI): PEEK with no bitmap and no pages
    returns Xen's dirty_count; log-dirty off or a CLEAN in progress is 'cannot tell' (-1)."""
    from types import SimpleNamespace

    dom = domain_over(np.zeros((4, 4096), np.uint8), holes=set(), own=[])
    calls, answer = [], [(0, 0, 123)]

    def logdirty(xch, domid, op, bitmap, pages, mode, stats):
        calls.append((op, bitmap, pages))
        rc, err, count = answer[0]
        ctypes.cast(stats, ctypes.POINTER(xc.XenShadowOpStats)).contents.dirty_count = count
        ctypes.set_errno(err)
        return rc
    dom._h.xch = 1
    dom._xc = SimpleNamespace(xc_logdirty_control=logdirty)
    assert dom.dirty_count() == 123
    assert calls == [(xc.XEN_DOMCTL_SHADOW_OP_PEEK, None, 0)]
    answer[0] = (-1, errno.EINVAL, 0)
    assert dom.dirty_count() == -1
    answer[0] = (-1, errno.EBUSY, 0)
    assert dom.dirty_count() == -1
    answer[0] = (-1, errno.EPERM, 0)
    with pytest.raises(DomainError, match="PEEK.*EPERM"):
        dom.dirty_count()


def test_log_dirty_already_on_is_restarted_not_an_error() -> None:
    """MOCK of xc_logdirty_control (no hypervisor in CI). Xen 4.17 answers ENABLE_LOGDIRTY with
    EINVAL when log-dirty is already on (paging_log_dirty_enable): a primary whose secondary was
    lost and came back syncs again, and its snapshot stage died on that (issue 17, session 17's
    lab run 1, shadow paging). Already on is restarted (off, then on); an error that stays is
    raised, and a hypervisor without log-dirty is named."""
    from types import SimpleNamespace

    dom = domain_over(np.zeros((4, 4096), np.uint8), holes=set(), own=[])
    calls, answers = [], []

    def logdirty(xch, domid, op, bitmap, pages, mode, stats):
        calls.append(op)
        rc, err = answers.pop(0) if answers else (0, 0)
        ctypes.set_errno(err)
        return rc
    dom._h.xch = 1
    dom._ensure_bitmap = lambda: None
    dom._xc = SimpleNamespace(xc_logdirty_control=logdirty)
    on, off = xc.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, xc.XEN_DOMCTL_SHADOW_OP_OFF
    for already_on in (errno.EINVAL, errno.EBUSY):
        calls.clear()
        answers[:] = [(-1, already_on)]
        dom.enable_dirty_log()
        assert calls == [on, off, on]
    calls.clear()
    answers[:] = [(-1, errno.EINVAL), (0, 0), (-1, errno.EINVAL)]
    with pytest.raises(DomainError, match="ENABLE_LOGDIRTY.*EINVAL"):
        dom.enable_dirty_log()
    assert calls == [on, off, on]
    answers[:] = [(-1, errno.EOPNOTSUPP)]
    with pytest.raises(DomainError, match="CONFIG_SHADOW_PAGING"):
        dom.enable_dirty_log()


def test_vcpu_info_blocks_wants_a_clock_that_moves_forward() -> None:
    before = np.zeros(4096, np.uint8)
    _vcpu_info_tick(before, 0x80, 3)
    after = before.copy()
    _vcpu_info_tick(after, 0x80, 4)
    assert xc.vcpu_info_blocks(before, after) == [0x80]
    assert xc.vcpu_info_blocks(after, before) == []        # a clock going back is not Xen's
    odd = after.copy()
    odd[0xa0] = 9                                           # version odd: an update in flight
    assert xc.vcpu_info_blocks(before, odd) == []
    other = after.copy()
    other[0x90] = 1                                         # 0x10..0x20 changed: guest data
    assert xc.vcpu_info_blocks(before, other) == []
    skewed = after.copy()
    skewed[0xb0:0xb8].view(np.uint64)[0] += 50_000          # a clock that does not follow its TSC
    assert xc.vcpu_info_blocks(before, skewed) == []


def test_copies_reject_bad_buffers_and_frames_beyond_the_domain() -> None:
    dom = domain_over(np.zeros((8, 4096), np.uint8), holes=set(), own=[])
    with pytest.raises(ValueError, match=r"\(n, 4096\) uint8"):
        dom.read_pages(np.array([1], np.uint64), np.zeros((1, 4096), np.uint16))
    with pytest.raises(ValueError, match="2 rows for 3 pfns"):
        dom.read_pages(np.array([1, 2, 3], np.uint64), np.zeros((2, 4096), np.uint8))
    with pytest.raises(ValueError, match="frame index 8 is beyond domain mock's 8 frames"):
        dom.write_pages(np.array([8], np.uint64), np.zeros((1, 4096), np.uint8))


def test_pause_is_a_state_although_xen_counts_pauses() -> None:
    """MOCK of libxenctrl's pause calls (no hypervisor in CI): Xen nests controller pauses, so
    the secondary's coordinator, which pauses at each sync epoch's BEGIN and resumes once, would
    leave its guest paused for good if every pause() reached Xen."""
    from types import SimpleNamespace

    dom = domain_over(np.zeros((4, 4096), np.uint8), holes=set(), own=[])
    count = [0]

    def pause(xch, domid):
        count[0] += 1
        return 0

    def unpause(xch, domid):
        count[0] -= 1
        return 0 if count[0] >= 0 else -1
    dom._h.xch = 1
    dom._xc = SimpleNamespace(xc_domain_pause=pause, xc_domain_unpause=unpause)
    dom._paused_here = False
    for _ in range(3):           # the sync epoch and two pre-copy rounds
        dom.pause()
    dom.resume()                 # the first checkpoint is applied: the guest runs
    assert count[0] == 0
    dom.resume()                 # resuming a running guest changes nothing
    assert count[0] == 0


def test_a_domain_gone_from_xen_is_named_with_its_new_id(monkeypatch) -> None:
    """MOCK of libxenctrl's pause call and of the name lookup (no hypervisor in CI): the Xen lab
    lost its secondary domain "sec" (id 3) to a triple fault, xl re-created it as id 4, and the
    pause failed with only "ESRCH". The error now says the domain is gone and what id its name
    has now."""
    from types import SimpleNamespace

    from pipeline.xen_io import xen

    dom = domain_over(np.zeros((4, 4096), np.uint8), holes=set(), own=[])
    dom.name, dom.domid = "sec", 3

    def pause(xch, domid):
        ctypes.set_errno(errno.ESRCH)
        return -1
    dom._h.xch = 1
    dom._xc = SimpleNamespace(xc_domain_pause=pause)
    monkeypatch.setattr(xen, "list_domains", lambda handles=None: {"Domain-0": 0, "sec": 4})
    with pytest.raises(DomainError, match=r"xc_domain_pause on domain sec \(id 3\).*now has id 4.*ESRCH"):
        dom.pause()
    monkeypatch.setattr(xen, "list_domains", lambda handles=None: {"Domain-0": 0})
    with pytest.raises(DomainError, match=r"no domain named 'sec' exists now.*ESRCH"):
        dom.pause()
    assert not dom._paused_here


def test_a_vcpu_brought_up_after_the_vcpu_info_watch_is_reported(caplog) -> None:
    """MOCK of libxenctrl's getcontext (no hypervisor in CI). Issue 17, item 6: in Xen 4.17 a
    vCPU registers its vcpu_info once (map_vcpu_info refuses a second), so a vcpu_info appears
    after the pair was made only on a vCPU brought up later; the checkpoint that first sees
    that vCPU's registers says so (and still returns the context: the guest must resume)."""
    import logging
    from types import SimpleNamespace

    dom = domain_over(np.zeros((4, 4096), np.uint8), holes=set(), own=[])
    blobs = [fabricated_context(vcpus=2, up=1)] * 2 + [fabricated_context(vcpus=2, up=2)] * 2

    def getcontext(xch, domid, buf, size):
        blob = blobs[0]
        if buf is None:
            return len(fabricated_context(vcpus=2))
        ctypes.memmove(buf, blob, len(blob))
        blobs.pop(0)
        return len(blob)
    dom._h.xch = 1
    dom._xc = SimpleNamespace(xc_domain_hvm_getcontext=getcontext)
    dom.vcpus_watched = 1
    with caplog.at_level(logging.ERROR, logger="pipeline.xen_io.xen"):
        assert xc.vcpus_up(dom.get_vcpu_state()) == [0]
        dom.get_vcpu_state()
        assert not caplog.records
        assert xc.vcpus_up(dom.get_vcpu_state()) == [0, 1]
        dom.get_vcpu_state()                  # said once, when the context changed
    assert len(caplog.records) == 1
    assert "2 vCPUs are up (0, 1), 1 were while its vcpu_info was found" in caplog.records[0].getMessage()


def test_no_library_handle_crosses_the_nodes_fork(monkeypatch) -> None:
    """MOCK of the library handles (no hypervisor in CI): after before_fork, the node's
    process and every forked stage open their own handles at their next call."""
    from pipeline.xen_io import xen

    ram = np.arange(8 * 4096, dtype=np.uint32).view(np.uint8)[: 8 * 4096].reshape(8, 4096).copy()
    dom = domain_over(ram, holes=set(), own=[])
    mock_handles = dom._h
    opened = []

    def fresh_handles(privcmd_path):
        opened.append(os.getpid())
        return mock_handles
    monkeypatch.setattr(xen, "xen_handles", fresh_handles)
    dom.before_fork()
    assert dom._pid == 0
    out = np.empty((1, 4096), np.uint8)
    dom.read_pages(np.array([3], np.uint64), out)
    dom.read_pages(np.array([4], np.uint64), out)
    np.testing.assert_array_equal(out[0], ram[4])
    assert opened == [os.getpid()]


def test_a_vcpu_info_seen_in_one_round_only_is_taken_when_unambiguous() -> None:
    """MOCK (no hypervisor in CI): Xen ticks the clock once in all the watch rounds, as the
    Xen lab saw on a secondary; the twin's proof then never matched while the block was left out."""
    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    step = [0]

    def xen_ticks_once(_s: float) -> None:
        step[0] += 1
        if step[0] <= 2:                                    # the fingerprint passes and round 1
            _vcpu_info_tick(ram[40], 0x3c0, step[0])
    dom = domain_over(ram, holes=set(), own=[])
    assert dom.find_xen_written(rounds=3, window_s=0, sleep=xen_ticks_once) == {40: ((0x3c0, 0x3d0), (0x3e0, 0x400))}


def test_memory_digest_counts_the_own_shared_info_frame_as_zeros() -> None:
    """MOCK (no hypervisor in CI): twins keep their own shared_info frames, which differ."""
    ram = guest_ram(np.random.default_rng(5).integers(0, 256, (1500, 4096), dtype=np.uint8))
    twin_ram = guest_ram(ram)
    twin_ram[1200] ^= 0xFF                                 # the twin's own shared_info frame
    dom = domain_over(ram, holes=set(), own=[1200])
    twin = domain_over(twin_ram, holes=set(), own=[1200])
    assert dom.memory_digest(batch_pages=512) == twin.memory_digest(batch_pages=512)
    twin_ram[1199, 7] ^= 1                                 # guest memory next to it
    assert dom.memory_digest(batch_pages=512) != twin.memory_digest(batch_pages=512)


def test_a_backend_without_hypervisor_written_bytes_refuses_a_peer_with_some() -> None:
    """The base rule (sim and any backend without such bytes), as the coordinator applies it:
    equal ranges pass, others are a ProtocolError at the handshake naming both."""
    from pipeline import wire
    from pipeline.coordinator import ProtocolError, _agree_written
    from pipeline.xen_io.base import Domain

    class Plain(Domain):   # only what the handshake calls
        name, page_size, page_count = "plain", 4096, 8
        pause = resume = enable_dirty_log = read_and_clear_dirty = read_pages = write_pages = None
        get_vcpu_state = set_vcpu_state = None
        is_paused = False
    Plain.__abstractmethods__ = frozenset()
    dom = Plain()
    _agree_written(dom, wire.Hello(4096, wire.ROLE_PRIMARY, 8, "p"))
    with pytest.raises(ProtocolError, match=r"peer 'p': plain: the nodes disagree .*\(1, 0, 16\)"):
        _agree_written(dom, wire.Hello(4096, wire.ROLE_PRIMARY, 8, "p", ((1, 0, 16),)))


def test_event_pending_bits_are_the_2_level_abis_bits_of_the_port() -> None:
    """Port 70: word 1, bit 6 of shared_info's evtchn_pending (byte 0x808, bit 6); word 1 is
    bit 1 of the selector (byte 8 of the vcpu_info)."""
    assert xc.event_pending_bits(70) == ((0x800 + 8, 1 << 6), (8, 1 << 1), (0, 1))
    assert xc.event_pending_bits(3) == ((0x800, 1 << 3), (8, 1), (0, 1))
    for bad in (0, xc.EVTCHN_2L_PORTS):
        with pytest.raises(ValueError, match="outside the 2-level ABI"):
            xc.event_pending_bits(bad)


def test_atomic_byte_or_sets_bits_and_keeps_the_others() -> None:
    page = np.zeros(4096, np.uint8)
    page[5] = 0b1000_0001
    xc.AtomicByteOr()(page.ctypes.data + 5, 0b0000_0100)
    assert page[5] == 0b1000_0101 and not page[:5].any() and not page[6:].any()


def _timer_domain(own_shared_info: bool = True, vcpus: int = 1):
    """A domain over mock guest RAM whose mock libxenctrl knows its event channels (MOCK: what
    EVTCHNOP_status reports cannot be caused without a hypervisor): port 1 console
    (interdomain), 2 xenstore, 3 VIRQ_TIMER of vCPU 0, 4 an IPI, 5 VIRQ_DEBUG; with ``vcpus``
    2, port 6 VIRQ_TIMER of vCPU 1 (bound when that vCPU came up); the next port and up are
    beyond the domain's (EINVAL)."""
    from types import SimpleNamespace

    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    dom = domain_over(ram, holes=set(), own=[0x10] if own_shared_info else [])
    bound = {1: (2, 0, 0), 2: (2, 0, 0), 3: (4, 0, 0), 4: (5, 0, 0), 5: (4, 0, 1)}   # status, vcpu, virq
    if vcpus == 2:
        bound[6] = (4, 1, 0)
    calls = []

    def evtchn_status(xch, st):
        st = st._obj
        calls.append(st.port)
        if st.port not in bound:
            ctypes.set_errno(errno.EINVAL)
            return -1
        st.status, st.vcpu, st.virq = bound[st.port]
        return 0
    dom._h.xch = 1
    dom._xc = SimpleNamespace(xc_evtchn_status=evtchn_status)
    dom._timer_port_map = None
    return dom, ram, calls


def test_a_loaded_context_makes_each_vcpus_timer_event_pending_in_the_domains_own_event_state() -> None:
    """Issue 17, item 6 (session 6's stalled survivor): Xen's singleshot timer is not in the
    HVM context, so after a load the secondary's own timer may be disarmed while the guest
    believes the primary's deadline is armed. kick_timers marks VIRQ_TIMER pending (shared_info
    bit, the registered vcpu_info's selector and upcall flag), so the wake-up upcall runs the
    guest's timer handler, which arms the timer again; other bytes and pages stay as they were."""
    dom, ram, calls = _timer_domain()
    dom.xen_written = {0x20: ((0x3c0, 0x3d0), (0x3e0, 0x400))}    # vcpu_info at 0x20+0x3c0
    ram[0x10, 0x800] = 0b0000_0010          # xenstore's port 1 pending already: kept
    ram[0x20, 0x3c8] = 0b0000_0001
    before = ram.copy()
    assert dom.kick_timers() == 1
    assert ram[0x10, 0x800] == 0b0000_1010                       # port 3 now pending, port 1 kept
    assert ram[0x20, 0x3c0] == 1 and ram[0x20, 0x3c8] == 1        # upcall flag; word 0 selected
    changed = np.argwhere(ram != before)
    assert {tuple(x) for x in changed.tolist()} == {(0x10, 0x800), (0x20, 0x3c0)}
    assert calls == [1, 2, 3, 4, 5, 6]                           # the scan stops where Xen said EINVAL
    dom.kick_timers()
    assert calls == [1, 2, 3, 4, 5, 6], "the ports are found once"


def test_without_a_registered_vcpu_info_the_legacy_one_in_shared_info_is_marked() -> None:
    dom, ram, _ = _timer_domain()
    assert dom.kick_timers() == 1
    assert ram[0x10, 0x800] == 0b1000 and ram[0x10, 0] == 1 and ram[0x10, 8] == 1


def test_no_timer_is_marked_when_the_shared_info_frame_is_not_mapped(caplog) -> None:
    dom, ram, _ = _timer_domain(own_shared_info=False)
    assert dom.kick_timers() == 0 and not ram.any()
    assert "not re-armed" in caplog.text


def test_set_vcpu_state_marks_the_timers_before_the_wake_up_msi() -> None:
    """MOCK of setcontext and the MSI injection: the order matters, the upcall the MSI causes
    must find the timer pending."""
    from types import SimpleNamespace

    dom, ram, _ = _timer_domain()
    order = []
    dom._xc.xc_domain_hvm_setcontext = lambda xch, domid, buf, n: order.append("setcontext") or 0
    dom._h.dmod = 1
    dom._h.lib.dm = SimpleNamespace(xendevicemodel_inject_msi=lambda *a: order.append(("msi", ram[0x10, 0x800])) or 0)
    dom.info = SimpleNamespace(nr_online_vcpus=1, max_vcpu_id=0)
    dom.wake, dom.upcall_vector = "msi", xc.DEFAULT_UPCALL_VECTOR
    dom.set_vcpu_state(b"blob")
    assert order == ["setcontext", ("msi", 0b1000)]


def test_a_two_vcpu_guests_load_wakes_both_vcpus_with_both_timers_pending(caplog) -> None:
    """Issue 17, item 4: MOCK of setcontext, the MSI injection and EVTCHNOP_status (no
    hypervisor in CI). Each vCPU's own VIRQ_TIMER port is made pending, each registered
    vcpu_info gets its selector and upcall flag (a vCPU scans only its own ports), an MSI goes
    to each vCPU's LAPIC (Xen's APIC id = 2 x vCPU), and the backend says once which vCPUs the
    loaded context held."""
    import logging
    from types import SimpleNamespace

    dom, ram, _ = _timer_domain(vcpus=2)
    dom.xen_written = {0x20: ((0x3c0, 0x3d0), (0x3e0, 0x400)), 0x21: ((0x0, 0x10), (0x20, 0x40))}
    msis = []
    dom._xc.xc_domain_hvm_setcontext = lambda xch, domid, buf, n: 0
    dom._h.dmod = 1
    dom._h.lib.dm = SimpleNamespace(xendevicemodel_inject_msi=lambda h, domid, addr, data: msis.append((addr, data)) or 0)
    dom.info = SimpleNamespace(nr_online_vcpus=2, max_vcpu_id=1)
    dom.wake, dom.upcall_vector = "msi", xc.DEFAULT_UPCALL_VECTOR
    with caplog.at_level(logging.INFO, logger="pipeline.xen_io.xen"):
        dom.set_vcpu_state(fabricated_context(vcpus=2))
        dom.set_vcpu_state(fabricated_context(vcpus=2))
    assert ram[0x10, 0x800] == 0b0100_1000                          # ports 3 and 6 pending
    for frame, block in ((0x20, 0x3c0), (0x21, 0x0)):              # both vcpu_infos: upcall, word 0
        assert ram[frame, block] == 1 and ram[frame, block + 8] == 1
    assert msis == [(0xFEE00000, 0xF3), (0xFEE02000, 0xF3)] * 2
    loaded = [r.getMessage() for r in caplog.records if "loaded HVM context" in r.getMessage()]
    assert len(loaded) == 1 and "loaded HVM context with vCPUs 0, 1 (of vCPUs 0..1" in loaded[0]


# -- where Xen writes, from the guest's own registration (issue 17, item 5) ----------------------
def test_vcpu_info_registrations_parse_and_bad_items_are_named() -> None:
    assert xc.parse_vcpu_info_registrations("0:0x7a31+0x3c0, 1:0x10+0x40") == {0: (0x7a31, 0x3c0), 1: (0x10, 0x40)}
    assert xc.parse_vcpu_info_registrations("") == {}
    for text, why in (("0:7a31+0x3c0", r"'0:7a31\+0x3c0' is not VCPU:0xGFN\+0xOFFSET"),
                      ("0:0x1+0x0,0:0x2+0x40", "vCPU 0 given twice"),
                      ("1:0x1+0x3c8", r"offset 0x3c8: Xen registers a vcpu_info only at a 64-byte aligned"),
                      ("1:0x1+0x1000", "offset 0x1000")):
        with pytest.raises(ValueError, match=why):
            xc.parse_vcpu_info_registrations(text)


def test_the_config_takes_vcpu_info_items_and_names_a_bad_one(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load

    good = tmp_path / "good.toml"
    good.write_text('[security]\nmode = "plaintext"\n[guest]\nbackend = "xen"\ndomain = "prim"\n'
                    'xen_vcpu_info = "0:0x7a31+0x3c0"\n')
    assert load(str(good)).guest.xen_vcpu_info == "0:0x7a31+0x3c0"
    bad = tmp_path / "bad.toml"
    bad.write_text('[security]\nmode = "plaintext"\n[guest]\nbackend = "xen"\ndomain = "prim"\n'
                   'xen_vcpu_info = "0:7a31"\n')
    with pytest.raises(ConfigError, match=r"guest.xen_vcpu_info: '0:7a31' is not allowed .*VCPU:0xGFN\+0xOFFSET"):
        load(str(bad))


def _registered_domain(ram: np.ndarray, vcpus: int = 1):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    dom = domain_over(ram, holes=set(), own=[0x10])
    dom.shared_info_frame = 0x10
    dom.info = SimpleNamespace(nr_online_vcpus=vcpus, max_vcpu_id=vcpus - 1)
    return dom


def test_the_guests_registration_is_taken_without_watching_and_checked_on_the_domain() -> None:
    """MOCK of guest RAM (no hypervisor in CI): the registered block holds a clock Xen wrote;
    the node takes its fields as Xen-written with no watch at all (the guest does not run here:
    a watch would find nothing), and the twins' proof then ignores their own clocks there."""
    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    _vcpu_info_tick(ram[40], 0x3c0, 5)
    dom = _registered_domain(ram)
    dom.find_xen_written = lambda *a, **k: pytest.fail("a registration given must not be searched for")
    assert dom.use_registered_vcpu_info({0: (40, 0x3c0)}) == {40: ((0x3c0, 0x3d0), (0x3e0, 0x400))}
    assert dom.vcpus_watched == 1 and dom.written_registered
    twin = _registered_domain(guest_ram(ram))
    _vcpu_info_tick(twin._h.lib.fmem.ram[40], 0x3c0, 9)    # the twin's own clock
    twin.use_registered_vcpu_info({0: (40, 0x3c0)})
    assert dom.memory_digest() == twin.memory_digest()


def test_a_registration_that_is_not_this_domains_is_refused_naming_it() -> None:
    """MOCK of guest RAM (no hypervisor in CI). Nothing is taken from a refused list."""
    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    _vcpu_info_tick(ram[40], 0x3c0, 5)
    _vcpu_info_tick(ram[41], 0x0, 5)
    dom = _registered_domain(ram, vcpus=2)
    for regs, why in (({0: (40, 0x3c0), 1: (99, 0)}, r"vCPU 1 at gpfn 0x63\+0x0: no such frame"),
                      ({0: (40, 0x3c0), 1: (40, 0x380)}, r"vCPU 1 at gpfn 0x28\+0x380: its clock record is not one Xen wrote"),
                      ({0: (40, 0x3c0), 1: (0x10, 0)}, "shared_info frame"),
                      ({0: (40, 0x3c0), 2: (41, 0)}, "highest vCPU is 1"),
                      ({0: (40, 0x3c0)}, r"2 vCPUs are online, guest.xen_vcpu_info gives a vcpu_info for 1 \(0\)"),
                      ({0: (40, 0x3c0), 1: (40, 0x3c0)}, "same vcpu_info block")):
        with pytest.raises(DomainError, match=why):
            dom.use_registered_vcpu_info(regs)
        assert dom.xen_written == {} and not dom.written_registered
    dom.use_registered_vcpu_info({0: (40, 0x3c0), 1: (41, 0)})
    assert dom.hypervisor_written() == ((40, 0x3c0, 0x3d0), (40, 0x3e0, 0x400), (41, 0, 0x10), (41, 0x20, 0x40))


def test_a_secondary_with_its_guests_registration_refuses_a_different_primary_at_start() -> None:
    """The handshake with facts on both sides: equal ranges pass; the secondary never adopts
    the primary's differing ones (even where it saw a block change), the start stops naming both."""
    ram = guest_ram(np.zeros((64, 4096), np.uint8))
    _vcpu_info_tick(ram[40], 0x3c0, 5)
    sec = _registered_domain(ram)
    sec.use_registered_vcpu_info({0: (40, 0x3c0)})
    sec.agree_hypervisor_written(((40, 0x3c0, 0x3d0), (40, 0x3e0, 0x400)), peer_is_primary=True)
    sec.written_evidence[(21, 0x540)] = (5, True)
    with pytest.raises(DomainError, match=r"disagree .*primary gpfn 0x15\+0x540.*this node gpfn 0x28\+0x3c0.*"
                                          r"its guest's own registration"):
        sec.agree_hypervisor_written(((21, 0x540, 0x550), (21, 0x560, 0x580)), peer_is_primary=True)
    assert sec.hypervisor_written() == ((40, 0x3c0, 0x3d0), (40, 0x3e0, 0x400))
