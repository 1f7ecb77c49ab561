"""stages.common.held_hashes_equal (HashTable.matches and SvmPages.same, the digest workers'
classification) gives ``(held[pfns] == hashes).all(axis=1)``, the expression it replaced
(session 18, issue 13), whatever the pfns (repeated, any order) and however a hash differs."""
from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.stages.common import HashTable, held_hashes_equal


@given(st.integers(1, 64), st.data())
def test_held_hashes_equal_matches_numpy(pages, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    held = rng.integers(0, 256, (pages, 32), dtype=np.uint8)
    pfns = np.array(data.draw(st.lists(st.integers(0, pages - 1), max_size=80)), np.uint64)
    hashes = held[pfns].copy()
    for i in range(len(pfns)):
        how = data.draw(st.sampled_from(["same", "one byte", "other"]))
        if how == "one byte":
            hashes[i, data.draw(st.integers(0, 31))] ^= data.draw(st.integers(1, 255))
        elif how == "other":
            hashes[i] = rng.integers(0, 256, 32, dtype=np.uint8)
    want = (held[pfns] == hashes).all(axis=1)
    assert held_hashes_equal(held, pfns, hashes).tolist() == want.tolist()
    # hashes as the digest worker has them: the first rows of a larger output array
    out = np.zeros((len(pfns) + 5, 32), np.uint8)
    out[:len(pfns)] = hashes
    assert held_hashes_equal(held, pfns, out[:len(pfns)]).tolist() == want.tolist()


def test_a_table_matches_only_valid_pages_with_their_hash():
    t = HashTable(np.zeros((8, 32), np.uint8), np.zeros(8, bool))
    h = np.arange(64, dtype=np.uint8).reshape(2, 32)
    t.update(np.array([3, 5], np.uint64), h)
    other = h.copy()
    other[1, 31] ^= 0x80                        # the last bit of the last word
    pfns = np.array([3, 5, 6], np.uint64)
    assert t.matches(pfns, np.vstack((h, h[:1]))).tolist() == [True, True, False]
    assert t.matches(pfns[:2], other).tolist() == [True, False]
