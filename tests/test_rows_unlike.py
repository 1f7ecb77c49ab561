"""stages.common.rows_unlike (the secondary's BEGIN: which SVM_DIRTY pages the SVM does not
hold as zeros, by their hashes) gives ``(rows != row).any(axis=1)``, the expression it
replaced (session 18, issue 13), on any rows, contiguous or not."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.stages.common import rows_unlike, zero_page_hash


@given(st.integers(1, 40), st.integers(0, 60), st.data())
def test_rows_unlike_matches_numpy(k, n, data):
    row = np.frombuffer(data.draw(st.binary(min_size=k, max_size=k)), np.uint8)
    rows = np.empty((n, k), np.uint8)
    for i in range(n):
        how = data.draw(st.sampled_from(["same", "one byte", "random"]))
        rows[i] = row
        if how == "one byte":
            rows[i, data.draw(st.integers(0, k - 1))] ^= data.draw(st.integers(1, 255))
        elif how == "random":
            rows[i] = np.frombuffer(data.draw(st.binary(min_size=k, max_size=k)), np.uint8)
    want = (rows != row).any(axis=1)
    assert rows_unlike(rows, row).tolist() == want.tolist()
    # not contiguous: every other row, and rows of a wider array
    assert rows_unlike(rows[::2], row).tolist() == want[::2].tolist()
    wide = np.zeros((n, k + 3), np.uint8)
    wide[:, 1:k + 1] = rows
    assert rows_unlike(wide[:, 1:k + 1], row).tolist() == want.tolist()


def test_rows_unlike_on_page_hashes():
    zero = np.frombuffer(zero_page_hash(4096), np.uint8)
    hashes = np.random.default_rng(3).integers(0, 256, (1000, 32), dtype=np.uint8)
    hashes[::7] = zero
    hashes[1::7] = zero
    hashes[1::7, 31] ^= 1    # the zero page's hash but for the last bit
    assert rows_unlike(hashes, zero).tolist() == (hashes != zero).any(axis=1).tolist()
    assert rows_unlike(hashes[:0], zero).tolist() == []


def test_rows_unlike_refuses_a_row_of_another_width():
    with pytest.raises(ValueError, match="rows of shape"):
        rows_unlike(np.zeros((3, 32), np.uint8), np.zeros(31, np.uint8))
