"""XenDomain.write_pages finds the domain's own frames and the frames Xen writes bytes of by a
binary search (session 18, issue 13: np.isin cost 85-160 us on every apply). What it must
keep doing, with several of each, in any order (the mock of libxenforeignmemory from
test_xen_ctypes, named there): own frames untouched, Xen's bytes kept, the rest written."""
from __future__ import annotations

import numpy as np
import pytest
from test_xen_ctypes import domain_over, guest_ram


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_write_pages_keeps_several_own_frames_and_xen_bytes_in_any_order(seed):
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 256, (256, 4096), dtype=np.uint8)
    ram = guest_ram(before.copy())
    own = [0x90, 0x10, 0x50]                       # not sorted
    dom = domain_over(ram, holes=set(), own=own)
    written = {0xF0: ((8, 9),), 0xA0: ((0x3c0, 0x3d0),), 0x08: ((100, 300),),
               0x30: ((0, 16), (0x20, 0x40)), 0xC8: ((4000, 4096),)}
    dom.xen_written = dict(written)
    pfns = rng.permutation(np.concatenate((
        rng.choice(np.setdiff1d(np.arange(256), own + list(written)), 60, replace=False),
        own, [0xA0, 0x08, 0x30, 0xC8]))).astype(np.uint64)   # 0xF0: Xen's, not written
    data = rng.integers(0, 256, (len(pfns), 4096), dtype=np.uint8)
    assert dom.write_pages(pfns, data).tolist() == []
    want = before.copy()
    for row, frame in enumerate(pfns.tolist()):
        if frame in own:
            continue
        want[frame] = data[row]
        for a, b in written.get(frame, ()):
            want[frame, a:b] = before[frame, a:b]
    np.testing.assert_array_equal(ram, want)
