"""The page path's pfn set helpers (pipeline/pfns.py: unique_pfns, union_pfns,
in_sorted_pfns) give numpy's np.unique / np.union1d / np.isin results, which they replace on
the commit's path (numpy 2.4's cost 80-160 us on 1k pfns, the helpers 9-15)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.pfns import in_sorted_pfns, union_pfns, unique_pfns

pfn_lists = st.lists(st.integers(0, 2**40), max_size=300)


@settings(max_examples=300, deadline=None)
@given(pfn_lists, pfn_lists)
def test_pfn_sets_match_numpy(a, b):
    a64, b64 = np.array(a, np.uint64), np.array(b, np.uint64)
    u = unique_pfns(a64)
    assert u.dtype == np.uint64
    assert np.array_equal(u, np.unique(a64))
    assert np.array_equal(union_pfns(a64, b64), np.union1d(a64, b64))
    got = in_sorted_pfns(a64, np.unique(b64))
    assert got.dtype == bool and np.array_equal(got, np.isin(a64, b64))
    # int64 input (what np.flatnonzero and friends give) is taken as pfns too
    assert np.array_equal(unique_pfns(np.array(a, np.int64)), np.unique(a64))
    assert np.array_equal(in_sorted_pfns(np.array(a, np.int64), np.unique(b64)),
                          np.isin(a64, b64))


def test_pfn_sets_of_nothing():
    none = np.zeros(0, np.uint64)
    assert unique_pfns(none).dtype == np.uint64 and not len(unique_pfns(none))
    assert not len(in_sorted_pfns(none, np.arange(3, dtype=np.uint64)))
    assert not in_sorted_pfns(np.arange(3, dtype=np.uint64), none).any()
    assert np.array_equal(union_pfns(none, np.array([5, 5, 1], np.uint64)), [1, 5])
