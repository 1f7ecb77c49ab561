"""Sets of page frame numbers as sorted uint64 arrays: the page path's set operations.

np.unique, np.union1d and np.isin cost 80-160 us each on 1k pfns with numpy 2.4 (a hash table
for unique, a sort of both arrays for isin), against 9-15 us for one sort and one compare, or a
binary search: the secondary's BEGIN made three of them, the restore stage's apply one and the
Xen domain's write_pages two, on the commit's path (docs/tuning.md, Session 18 (path)).
Numpy only: the stages, the coordinators and the hypervisor boundary (pipeline/xen_io) all use
it, so it sits below them.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def as_pfns(a: Any) -> np.ndarray:
    """``a`` as a contiguous uint64 array (no copy when it is one)."""
    return np.ascontiguousarray(a, dtype=np.uint64)


def unique_pfns(pfns: Any) -> np.ndarray:
    """``pfns`` sorted, each once, as uint64 (np.unique's result)."""
    a = np.sort(as_pfns(pfns))
    if len(a) < 2:
        return a
    keep = np.empty(len(a), bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def union_pfns(a: Any, b: Any) -> np.ndarray:
    """The pfns of ``a`` or ``b``, sorted, each once, as uint64 (np.union1d's result)."""
    return unique_pfns(np.concatenate((as_pfns(a), as_pfns(b))))


def in_sorted_pfns(pfns: Any, sorted_pfns: np.ndarray) -> np.ndarray:
    """Which of ``pfns`` are in ``sorted_pfns`` (ascending uint64): np.isin's result, by
    a binary search."""
    pfns = as_pfns(pfns)
    if not len(sorted_pfns):
        return np.zeros(len(pfns), bool)
    at = np.searchsorted(sorted_pfns, pfns)
    np.minimum(at, len(sorted_pfns) - 1, out=at)
    return sorted_pfns[at] == pfns
