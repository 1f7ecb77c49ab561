"""A digest worker's batch encoding decodes back to the pages it was given.

Pages that carry data go into the record in one copy (np.take straight into the slot's
data; raw) or as one lz4 block; zero pages are told apart from data pages by their first
word and, where it is zero, by the whole page: a page whose first word is zero and whose
last byte is not must carry its data. Encoded by ``digest.encode_batch`` and decoded by
the verify worker's ``decode_batch`` (the secondary's path), every page comes back.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import wire
from pipeline.stages import digest, verify
from pipeline.stages.common import HashTable, hash_pages

PAGE = 4096


def _batch(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pages = np.zeros((n, PAGE), np.uint8)
    kinds = rng.integers(0, 4, n)
    for i, k in enumerate(kinds):
        if k == 1:                                  # random data
            pages[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        elif k == 2:                                # first word zero, data further on
            pages[i, -1] = 1 + i % 255
        elif k == 3:                                # text-like: compresses
            text = (b"page %d " % i) * PAGE
            pages[i] = np.frombuffer(text[:PAGE], np.uint8)
    return pages


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("with_refs", [False, True])
def test_encoded_batch_decodes_to_the_same_pages(compress, with_refs):
    n = 257
    pages = _batch(n, seed=11 + compress + 2 * with_refs)
    pfns = np.arange(1000, 1000 + n, dtype=np.uint64)
    table = None
    if with_refs:       # every third page is held by the secondary already (REF)
        table = HashTable(np.zeros((2000, 32), np.uint8), np.zeros(2000, bool))
        held = pfns[::3]
        table.update(held, hash_pages(np.ascontiguousarray(pages[::3])))
    hashes = np.zeros((n, 32), np.uint8)
    enc_len = np.zeros(n, np.uint32)
    enc_kind = np.zeros(n, np.uint8)
    data = np.zeros(n * PAGE, np.uint8)
    nbytes, packed, counts = digest.encode_batch(pfns, pages, table, hashes, enc_len,
                                                 enc_kind, data, compress)
    zero = ~pages.any(axis=1)
    assert counts[wire.ENC_ZERO] == int(zero.sum())
    assert not (enc_kind[~zero] == wire.ENC_ZERO).any(), "a page with data sent as ZERO"
    assert (hashes == hash_pages(pages)).all()
    if with_refs:
        assert counts[wire.ENC_REF] == int((~zero[::3]).sum())
    src = SimpleNamespace(count=n, enc_kind=enc_kind, enc_len=enc_len, marks=0,
                          batch_flags=wire.PAGES_PACKED if packed else 0, data_flat=data,
                          data_len=nbytes, pfns=pfns, hashes=hashes)
    out = np.full((n, PAGE), 0xAA, np.uint8)
    assert verify.decode_batch(src, out, PAGE, "full") == ""
    carried = (enc_kind == wire.ENC_RAW) | (enc_kind == wire.ENC_ZERO)
    assert np.array_equal(out[carried], pages[carried])
