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
    V(XTL_ERROR); V(HVM_SAVE_CODE(END)); V(HVM_SAVE_CODE(LAPIC_REGS));
    V(HVM_PARAM_STORE_PFN); V(HVM_PARAM_CONSOLE_PFN);
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
        "HVM_SAVE_CODE(LAPIC_REGS)": xc.HVM_SAVE_CODE_LAPIC_REGS,
        "HVM_PARAM_STORE_PFN": xc.HVM_PARAM_STORE_PFN, "HVM_PARAM_CONSOLE_PFN": xc.HVM_PARAM_CONSOLE_PFN,
    }
    for name, value in mine.items():
        assert value == header_layout[f"const {name}"], name


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


def fabricated_context(vcpus: int = 1) -> bytes:
    """A context blob shaped like Xen's: a header-ish record, LAPIC_REGS per vCPU, END."""
    blob = record(1, 0, b"\x11" * 24)
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
    truncated = fabricated_context()[:100]
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
class MockForeignMemory:
    """MOCK of libxenforeignmemory (named as such): per-frame map errors (holes) cannot be caused
    without a hypervisor. Maps frames of a numpy "guest RAM"; frames in ``holes`` fail with -EINVAL."""

    def __init__(self, ram: np.ndarray, holes: set[int], on_map=None) -> None:
        self.ram, self.holes, self.maps, self.on_map = ram, holes, {}, on_map

    def xenforeignmemory_map(self, fmem, domid, prot, n, frames_addr, errs_addr):
        if self.on_map is not None:
            self.on_map()
        frames = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(frames_addr))
        errs = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(errs_addr))
        window = np.zeros((n, 4096), np.uint8)
        for i, pfn in enumerate(frames):
            errs[i] = -errno.EINVAL if int(pfn) in self.holes else 0
            if not errs[i]:
                window[i] = self.ram[int(pfn)]
        self.maps[window.ctypes.data] = (window, frames.copy(), errs.copy())
        return window.ctypes.data

    def xenforeignmemory_unmap(self, fmem, addr, n):
        window, frames, errs = self.maps.pop(addr)
        for i, pfn in enumerate(frames):  # write back what the caller changed (writable mappings)
            if not errs[i]:
                self.ram[int(pfn)] = window[i]
        return 0


def domain_over(ram: np.ndarray, holes: set[int], own: list[int], on_map=None):
    """A XenDomain over MockForeignMemory: its frames are the gpfns of ``ram`` outside
    ``holes`` at open (the hypervisor-side scan runs for real against the mock); ``own`` are
    gpfns of the domain's own Xen pages. ``on_map`` runs before each map (a writer Xen would be)."""
    from types import SimpleNamespace

    from pipeline.xen_io.xen import XenDomain

    dom = object.__new__(XenDomain)
    fmem = MockForeignMemory(ram, holes, on_map)
    dom._h = SimpleNamespace(lib=SimpleNamespace(fmem=fmem, xc=None), fmem=1)
    dom._pid, dom._privcmd_path = os.getpid(), "/dev/null"
    dom.domid, dom.name, dom.max_gpfn = 9, "mock", ram.shape[0] - 1
    dom.info = SimpleNamespace(nr_online_vcpus=1)
    dom.frames = dom._scan_mappable()
    dom.page_count = int(dom.frames.size)
    dom.own_frames = dom.indexes_of(np.array(own, dtype=np.uint64))
    dom.xen_written = {}
    dom._bitmap = dom._bitmap_words = dom._ctx_buf = None
    dom._paused_here = False
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
    ram = np.zeros((64, 4096), np.uint8)
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
    """MOCK of a running guest and of Xen's own writes (no hypervisor in CI): the guest keeps
    rewriting pages (logged dirty in reality; here just changing), and 'Xen' ticks the
    vcpu_info at gpfn 40 + 0x3c0. Only that block is found (guest data that passed the clock
    test in one round is not taken), and the digest then ignores it."""
    ram = np.zeros((64, 4096), np.uint8)
    step = [0]

    def running_guest() -> None:
        step[0] += 1
        ram[7, :64] = step[0] % 251                         # guest data in a 64-byte block
        ram[9, 0x3e8:0x3f0] = step[0] % 13                 # guest data that happens to sit at vcpu_info offsets
        if step[0] <= 5:                                    # guest data that looks like one, once:
            _vcpu_info_tick(ram[11], 0x80, step[0])        # the 1st watch round only (maps 4, 5)
        _vcpu_info_tick(ram[40], 0x3c0, step[0])
    dom = domain_over(ram, holes={50}, own=[], on_map=running_guest)
    found = dom.find_xen_written(window_s=0)
    assert found == {dom.indexes_of(np.array([40], np.uint64))[0]: ((0x3c0, 0x3d0), (0x3e0, 0x400))}
    dom._h.lib.fmem.on_map = None                          # both paused at a checkpoint
    twin = domain_over(ram.copy(), holes={50}, own=[])
    twin.xen_written = dict(found)
    _vcpu_info_tick(twin._h.lib.fmem.ram[40], 0x3c0, 999)  # the twin's own clock differs
    assert dom.memory_digest() == twin.memory_digest()
    twin._h.lib.fmem.ram[40, 0x3d0] ^= 1                   # a guest byte of that block differs
    assert dom.memory_digest() != twin.memory_digest()


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
    ram = np.zeros((64, 4096), np.uint8)
    step = [0]

    def xen_ticks_once() -> None:
        step[0] += 1
        if step[0] <= 5:                                    # the fingerprint passes and round 1
            _vcpu_info_tick(ram[40], 0x3c0, step[0])
    dom = domain_over(ram, holes=set(), own=[], on_map=xen_ticks_once)
    assert dom.find_xen_written(rounds=3, window_s=0) == {40: ((0x3c0, 0x3d0), (0x3e0, 0x400))}


def test_memory_digest_counts_the_own_shared_info_frame_as_zeros() -> None:
    """MOCK (no hypervisor in CI): twins keep their own shared_info frames, which differ."""
    ram = np.random.default_rng(5).integers(0, 256, (1500, 4096), dtype=np.uint8)
    twin_ram = ram.copy()
    twin_ram[1200] ^= 0xFF                                 # the twin's own shared_info frame
    dom = domain_over(ram, holes=set(), own=[1200])
    twin = domain_over(twin_ram, holes=set(), own=[1200])
    assert dom.memory_digest(batch_pages=512) == twin.memory_digest(batch_pages=512)
    twin_ram[1199, 7] ^= 1                                 # guest memory next to it
    assert dom.memory_digest(batch_pages=512) != twin.memory_digest(batch_pages=512)
