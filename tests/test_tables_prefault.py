"""The primary's tables segment (HashTable, send.Pending, SvmPages: supervisor._tables_segment)
is mapped into every stage process that is handed one of them before the stage runs
(common._prefault), as the rings and guest memory are: the first checkpoints' SVM_DIRTY,
scattered into SvmPages by the coordinator and read by the digest workers, otherwise took a
page fault per page of the table it touched, on the commit's path (docs/tuning.md, Session
20 (prim)). Measured here as the minor page faults a forked process takes when it then
touches every page of the segment: a fault per 4 KiB page without the prefault."""
from __future__ import annotations

import multiprocessing
import resource

import numpy as np

from pipeline.stages.common import _prefault
from pipeline.supervisor import _tables_segment

PAGES = 8192          # a 32 MiB guest: ~940 KiB of tables, 230 pages of 4 KiB


def _faults_touching(args, prefault: bool, table, pending, svm, out) -> None:
    """(In a forked child, as a stage is.) Prefault ``args`` or not, then write every
    row of the SVM's hashes and epochs (the coordinator's publish), read the hash table's
    and the pending arrays' (the digest workers', the coordinator's); send the minor
    faults that took."""
    def touch(svm_hashes, svm_epoch, hashes, valid, pfns, pending_hashes) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        svm_hashes[:] = 7
        svm_epoch[:] = 3
        int(hashes.sum(dtype=np.uint64)) + int(valid.sum())
        int(pfns.sum()) + int(pending_hashes.sum(dtype=np.uint64))
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    if prefault:
        _prefault(args)
    shared = (svm.hashes, svm.epoch, table.hashes, table.valid, pending.pfns, pending.hashes)
    # the same work on private copies this process has touched already: the faults of
    # numpy's own temporaries, not of the tables
    private = [np.zeros_like(a) for a in shared]     # (not copies: a copy reads them)
    touch(*private)
    baseline = touch(*private)
    out.send(touch(*shared) - baseline)
    out.close()


def _faults(node, prefault: bool, which: str) -> int:
    seg, table, pending, svm = _tables_segment(node, PAGES, 2)
    try:
        fork = multiprocessing.get_context("fork")
        a, b = fork.Pipe()
        # what a stage is handed: the coordinator gets all three, a digest worker the
        # table and the SVM's hashes, the send stage the pending arrays
        args = {"coordinator": ("settings", [table], pending, svm),
                "digest": (table, "snapbuf", svm), "send": ("settings", pending)}[which]
        p = fork.Process(target=_faults_touching,
                         args=(args, prefault, table, pending, svm, b))
        p.start()
        faults = a.recv()
        p.join(30)
        assert p.exitcode == 0
        return faults
    finally:
        seg.close()
        seg.unlink()


def test_a_stage_handed_any_of_the_tables_has_the_whole_segment_mapped_before_it_runs(node):
    pages_4k = (PAGES * (32 + 1 + 8 + 32 + 32 + 8)) // 4096
    cold = _faults(node, False, "coordinator")
    assert cold >= pages_4k // 2, cold      # the fault per page that the prefault saves
    for which in ("coordinator", "digest", "send"):
        warm = _faults(node, True, which)
        assert warm < pages_4k // 10, (which, warm, cold)
