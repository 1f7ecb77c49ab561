"""The memory proof names the pages that differ (pipeline/proof_pages.py, issue 11).

Session 8's one unequal proof after a re-protection said only ``memory_equal False``; the
pages behind it were found by dumping both memories by hand. LocalPair's nodes now write
every page's blake3 at each proof (the PVM's in the snapshot stage, the SVM's after the
apply), and an unequal ``prove_memory_equal`` starts its answer with the differing pages.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from conftest import wait_until

from pipeline import proof_pages
from pipeline.localpair import LocalPair
from pipeline.stages.common import domain_page_hashes


class _Memory:
    """Stands in for a guest (a pure comparison: only its memory is read)."""

    page_count, page_size = 16, 4096

    def __init__(self, fill: int) -> None:
        self.ram = np.full((self.page_count, self.page_size), fill, np.uint8)

    def memory_view(self) -> np.ndarray:
        return self.ram


def test_the_differing_pages_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(proof_pages, "DIR", str(tmp_path))
    pvm, svm = _Memory(7), _Memory(7)
    svm.ram[3, 100] = 8
    svm.ram[11, 4095] = 0
    for epoch in range(proof_pages.KEEP + 2):
        proof_pages.record(pvm, "pvm", epoch, domain_page_hashes)
        proof_pages.record(svm, "svm", epoch, domain_page_hashes)
    last = proof_pages.KEEP + 1
    assert proof_pages.differing_pages(str(tmp_path), last) == {"count": 2, "first": [3, 11]}
    # only the newest KEEP proofs of each side stay
    assert "missing" in proof_pages.differing_pages(str(tmp_path), 0)
    assert len(glob.glob(str(tmp_path / "*.npy"))) == 2 * proof_pages.KEEP
    proof_pages.forget(str(tmp_path), last)
    assert "missing" in proof_pages.differing_pages(str(tmp_path), last)


@pytest.mark.slow  # starts real node processes
def test_both_nodes_write_each_proofs_page_hashes_and_equal_ones_match(tmp_path):
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 1024},
                      # every checkpoint a proof (the first one, at protection, too), and
                      # few of them: none of the files looked at is rotated away meanwhile
                      "checkpoint": {"verify_every": 1, "max_interval_ms": 600000}},
                     workdir=str(tmp_path / "pair"))
    try:
        pair.start()
        pair.wait_protected()

        def both() -> int | None:
            pvm = {int(os.path.basename(p)[4:-4]) for p in glob.glob(
                os.path.join(pair.proof_dir, "pvm-*.npy"))}
            svm = {int(os.path.basename(p)[4:-4]) for p in glob.glob(
                os.path.join(pair.proof_dir, "svm-*.npy"))}
            return max(pvm & svm, default=None)
        epoch = wait_until(both, 120, "a proof's page hashes from both nodes")
        assert proof_pages.differing_pages(pair.proof_dir, epoch) == {"count": 0, "first": []}
        info = pair.prove_memory_equal()
        assert info["memory_equal"] is True and "differing_pages" not in info
        pair.check_alive()
    finally:
        pair.stop()
        pair.cleanup()
