"""The secondary's hashing of a forwarded group (pipeline/disk/wire.py ``hashed_all``): the
4 KiB writes of a burst are hashed in one call of pipeline._pagehash, every other write as
before; each write comes out with the blake3 of its data, in its place, whatever the mix."""
from __future__ import annotations

import os

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.disk import wire

KINDS = st.sampled_from([wire.KIND_WRITE, wire.KIND_WRITE, wire.KIND_ZERO, wire.KIND_SYNC])
LENGTHS = st.sampled_from([wire.PAGE, wire.PAGE, wire.PAGE, 512, 2 * wire.PAGE, 3 * wire.PAGE])


@st.composite
def groups(draw) -> list:
    """A decoded group as the receiver holds it: data views into one data frame, digests
    UNHASHED (as the primary sends them) or already given."""
    shape = draw(st.lists(st.tuples(KINDS, LENGTHS, st.booleans()), min_size=0, max_size=40))
    frame = memoryview(os.urandom(sum(n for kind, n, _h in shape if kind in wire.DATA_KINDS)))
    writes, pos = [], 0
    for seq, (kind, n, given_digest) in enumerate(shape, 1):
        data = None
        if kind in wire.DATA_KINDS:
            data, pos = frame[pos:pos + n], pos + n
        digest = wire.digest_of(data) if given_digest and data is not None else wire.UNHASHED
        writes.append(wire.ForwardedWrite(kind, 3, seq, seq * 8 * wire.PAGE, n, digest, data))
    return writes


@settings(max_examples=200, deadline=None)
@given(groups())
def test_hashed_all_is_hashed_of_each_write(writes):
    out = wire.hashed_all(writes)
    assert out == [wire.hashed(w) for w in writes]
    for w, h in zip(writes, out):
        if w.kind == wire.KIND_WRITE:    # every WRITE with its data's blake3, in its place
            assert h.digest == blake3.blake3(bytes(w.data)).digest()
            assert h.data is w.data and (h.seq, h.offset, h.length) == (w.seq, w.offset, w.length)
        else:                            # the rest as they came (a SYNC is never hashed)
            assert h is w


@pytest.mark.skipif(wire._pagehash is None, reason="pipeline._pagehash is not built")
def test_a_burst_of_pages_is_hashed_in_one_call(monkeypatch):
    """16 writes of 4 KiB (the benchmark's burst): one call of the page hasher, no blake3
    call per write."""
    calls = []
    real = wire._pagehash.hash_pages
    monkeypatch.setattr(wire._pagehash, "hash_pages",
                        lambda *a: (calls.append(len(a[0])), real(*a))[1], raising=False)
    monkeypatch.setattr(wire, "digest_of", lambda data, parallel=True: (_ for _ in ()).throw(
        AssertionError("a 4 KiB write hashed on its own")))
    frame = memoryview(os.urandom(16 * wire.PAGE))
    writes = [wire.ForwardedWrite(wire.KIND_WRITE, 3, i + 1, i * wire.PAGE, wire.PAGE,
                                  wire.UNHASHED, frame[i * wire.PAGE:(i + 1) * wire.PAGE])
              for i in range(16)]
    out = wire.hashed_all(writes)
    assert calls == [16]
    assert [w.digest for w in out] == [blake3.blake3(bytes(w.data)).digest() for w in writes]
