"""SVM_DIRTY in parts (issue 13): the secondary sends the SVM's dirty pages' hashes as it
has them, in pfn order, and the primary's digest workers classify a batch once the parts
cover its pfns. A page is an SVM page only if its hash came for this epoch, whatever part
it came in; the memory proof still holds."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import wait_until

from pipeline.coordinator import SvmPrehash
from pipeline.localpair import LocalPair
from pipeline.stages.common import SvmPages
from pipeline.xen_io.sim import SimDomain


def _svm_pages(page_count: int) -> SvmPages:
    class Value:
        value = -1
    return SvmPages(np.zeros((page_count, 32), np.uint8), np.zeros(page_count, np.uint64),
                    Value(), [])


def test_a_part_covers_the_pfns_up_to_its_last():
    svm = _svm_pages(64)
    h = np.full((2, 32), 7, np.uint8)
    assert not svm.covers(5, 0)
    svm.publish(5, np.array([3, 10], np.uint64), h, more=True)
    assert svm.covers(5, 10) and not svm.covers(5, 11)
    assert not svm.covers(6, 3)                    # another epoch's part covers nothing
    # only the pages whose hash came for this epoch are SVM pages
    same = svm.same(5, np.array([3, 4, 10], np.uint64), np.full((3, 32), 7, np.uint8))
    assert same.tolist() == [True, False, True]
    svm.publish(5, np.array([40], np.uint64), h[:1])       # the last part
    assert svm.covers(5, 63) and svm.ready.value == 5


@pytest.mark.slow   # starts real node processes
def test_a_dirty_set_of_several_parts_goes_as_svm_pages_and_the_memory_proof_holds(tmp_path):
    pages = SvmPrehash.PART_FIRST * 3 + 100    # first, twice that, the rest: three parts
    with LocalPair({
        "guest": {"backend": "sim", "page_count": 8192},
        "guest.workload": {"seed": 5, "input_rate_hz": 0.0},
        "checkpoint": {"max_interval_ms": 3_600_000, "min_interval_ms": 0,
                       "dirty_threshold_pages": 8192},
    }, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected(timeout=300)
        parts = pair.stage_counter("coordinator", "svm_dirty_parts")
        seq = pair.stage_counter("client", "pvm_input_seq")
        pair.inject_input(SimDomain.write_command(pages))
        wait_until(lambda: pair.stage_counter("client", "pvm_input_seq") > seq
                   and pair.stage_counter("mirror", "svm_input_seq", role="secondary") > seq,
                   120, "both guests ran the write command")
        count = len(pair.checkpoints())
        pair.request_checkpoint()
        cp = pair.wait_checkpoints(count + 1, timeout=300)[-1]
        assert cp["status"] == 0 and cp["pages_svm_dirty"] >= pages, cp
        assert pair.stage_counter("coordinator", "svm_dirty_parts") - parts >= 2
        assert cp["pages_same_as_svm"] > 0
        assert (cp["pages_same_as_svm"] + cp["pages_zero"] + cp["pages_skipped_hash"]
                == cp["pages_dirty"]), cp
        info = pair.prove_memory_equal()
        assert info["memory_equal"], info
