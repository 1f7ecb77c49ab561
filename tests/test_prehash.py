"""The secondary hashes what its SVM dirtied while the SVM runs (coordinator.SvmPrehash):
the hashes BEGIN then sends must be those of the pages as the paused SVM holds them, also
for pages the SVM wrote again after a round hashed them."""
from __future__ import annotations

import contextlib
import time

import numpy as np

from conftest import wait_until

from pipeline.config import PipelineSettings
from pipeline.coordinator import SvmPrehash
from pipeline.stages.common import domain_page_hashes, hash_pages
from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain

PAGES = 1024


@contextlib.contextmanager
def _svm_and_its_rounds(name: str, pages: int):
    """A paused sim SVM with its dirty log on and the prehash rounds over it."""
    dom = open_sim_domain(name, pages, WorkloadSpec(seed=7), dirty_log="auto")
    dom.start(paused=True)
    try:
        dom.enable_dirty_log()
        yield dom, SvmPrehash(dom)
    finally:
        dom.close()


def _run_input(dom, pages: int) -> None:
    """The guest writes ``pages`` pages (one write command), then is paused again."""
    seq = dom.feed_input(dom.write_command(pages))
    dom.resume()
    wait_until(lambda: dom.input_seq() > seq, timeout=60, what="the guest ran its input")
    dom.pause()


def _assert_hashes_of_the_pages_now(dom, pfns: np.ndarray, hashes: np.ndarray) -> None:
    """Every hash is blake3 of its page as the guest holds it now."""
    pages = np.empty((len(pfns), dom.page_size), np.uint8)
    dom.read_pages(pfns, pages)
    assert (hash_pages(pages) == hashes).all()


def test_pages_written_again_after_a_round_get_their_new_hash():
    with _svm_and_its_rounds("prehash-svm", PAGES) as (dom, pre):
        _run_input(dom, 600)
        pre.round()                       # (paused here, so the test knows what it hashed)
        first = set(pre.pfns.tolist())
        assert len(first) >= 600
        before = dict(zip(pre.pfns.tolist(), map(bytes, pre.hashes)))
        _run_input(dom, 600)              # 600 + 600 > 1024: some pages written twice
        now = dom.read_and_clear_dirty()
        assert first & set(now.tolist()), "no page was written in both inputs"
        pfns, hashes = pre.take(now, domain_page_hashes(dom, now))
        assert set(pfns.tolist()) == first | set(now.tolist())
        assert np.all(np.diff(pfns.astype(np.int64)) > 0)
        _assert_hashes_of_the_pages_now(dom, pfns, hashes)
        changed = [p for p, h in zip(pfns.tolist(), hashes) if p in before
                   and bytes(h) != before[p]]
        assert changed, "no pre-hashed page changed: the test proves nothing"
        assert not len(pre.pfns)                        # handed over


def test_a_round_interrupted_by_a_begin_leaves_its_pages_to_begin():
    """A round stops hashing when a BEGIN waits (it held BEGIN back by its whole dirty
    set); the pages it took off the log but did not hash are hashed at BEGIN, so SVM_DIRTY
    still names every page the SVM wrote, each with its hash as the paused SVM holds it."""
    with _svm_and_its_rounds("prehash-cut", PAGES) as (dom, pre):
        _run_input(dom, 900)
        asked = []
        # asked before the round and before each chunk: a BEGIN after the first chunk
        pre.round(lambda: asked.append(1) or len(asked) > 2)
        assert asked == [1, 1, 1]
        assert len(pre.pfns) == SvmPrehash.CHUNK
        assert len(pre.todo) >= 900 - SvmPrehash.CHUNK
        wrote = set(pre.pfns.tolist()) | set(pre.todo.tolist())
        _run_input(dom, 100)
        pfns, hashes = pre.begin(dom.read_and_clear_dirty())
        assert wrote <= set(pfns.tolist())
        _assert_hashes_of_the_pages_now(dom, pfns, hashes)
        assert not len(pre.todo) and not len(pre.pfns)


def test_a_begin_waiting_stops_a_round_before_its_first_chunk():
    """A round that finds a BEGIN waiting after its log read hashes nothing (a round of up
    to a chunk never asked, and held the BEGIN back by its hashing); one that finds it
    before it begins does not read the log either: BEGIN gets every page."""
    with _svm_and_its_rounds("prehash-first", PAGES) as (dom, pre):
        _run_input(dom, 100)                  # less than a chunk
        pre.round(lambda: True)               # waiting before the round: not begun
        assert not len(pre.pfns) and not len(pre.todo)
        asked = []
        pre.round(lambda: asked.append(1) or len(asked) > 1)   # came during the read
        assert asked == [1, 1]
        assert not len(pre.pfns) and len(pre.todo) >= 100
        pfns, hashes = pre.begin(dom.read_and_clear_dirty())
        assert len(pfns) >= 100
        _assert_hashes_of_the_pages_now(dom, pfns, hashes)


def test_begin_answers_in_ascending_parts_that_grow():
    """SVM_DIRTY goes in parts as they are hashed: sorted, disjoint, ascending, the first
    PART_FIRST pages, then twice as many each time up to PART_MAX; together the whole
    dirty set, pages the rounds hashed (and not written since) with their round's hash."""
    first = SvmPrehash.PART_FIRST
    with _svm_and_its_rounds("prehash-parts", 16384) as (dom, pre):
        _run_input(dom, 700)
        pre.round()
        _run_input(dom, first * 3 + 200)         # more than the first two parts
        parts = list(pre.parts(dom.read_and_clear_dirty()))
        sizes = [len(p) for p, _, _ in parts]
        assert [more for _, _, more in parts] == [True] * (len(parts) - 1) + [False]
        most = SvmPrehash.PART_MAX
        assert len(parts) >= 3
        assert sizes[:-1] == [min(first << i, most) for i in range(len(parts) - 1)]
        pfns = np.concatenate([p for p, _, _ in parts])
        assert np.all(np.diff(pfns.astype(np.int64)) > 0)     # ascending, disjoint
        hashes = np.concatenate([h for _, h, _ in parts])
        _assert_hashes_of_the_pages_now(dom, pfns, hashes)


def test_a_dirty_set_of_one_digest_batch_goes_in_one_part():
    """A digest batch (pipeline.batch_pages, the default) waits for the part that reaches
    its highest pfn, and each part is a record both coordinators and their I/O threads
    wake for while the PVM is paused: a dirty set of one batch goes in one part (it went in
    three, 256 + 512 + the rest, and the first batch of a larger set waited for the third)."""
    batch = PipelineSettings().batch_pages
    with _svm_and_its_rounds("prehash-one-part", 8192) as (dom, pre):
        _run_input(dom, batch)
        dirty = dom.read_and_clear_dirty()
        assert len(dirty) >= batch
        parts = list(pre.parts(dirty[:batch]))
        assert [(len(p), more) for p, _, more in parts] == [(batch, False)]
        parts = list(pre.parts(dirty))            # more than a batch: the first part is one
        assert len(parts[0][0]) == batch


def test_begin_with_every_page_hashed_by_the_rounds_sends_their_hashes_in_parts():
    """The rounds kept up: BEGIN's log is empty, and SVM_DIRTY is the rounds' pages and
    hashes as they are (no union with an empty set), still in parts of PART_FIRST, twice
    as many, ...; the rounds start afresh after it."""
    first = SvmPrehash.PART_FIRST
    with _svm_and_its_rounds("prehash-kept-up", 16384) as (dom, pre):
        _run_input(dom, first * 3 + 100)     # three parts: 1024, 2048, the rest
        while True:                          # (ROUND_MAX pages a round)
            pre.round()
            if not len(pre.todo):
                break
        held = pre.pfns.copy()
        parts = list(pre.parts(dom.read_and_clear_dirty()))
        assert [len(p) for p, _, _ in parts] == [first, 2 * first, len(held) - 3 * first]
        assert [more for _, _, more in parts] == [True, True, False]
        pfns = np.concatenate([p for p, _, _ in parts])
        assert (pfns == held).all()
        hashes = np.concatenate([h for _, h, _ in parts])
        _assert_hashes_of_the_pages_now(dom, pfns, hashes)
        assert not len(pre.pfns) and not len(pre.todo)
        # nothing held, nothing dirty: one empty part
        assert [(len(p), more) for p, _, more in pre.parts(np.zeros(0, np.uint64))] \
            == [(0, False)]


def test_rounds_that_find_the_pages_they_hashed_written_again_come_less_often():
    """A service writes the same pages over and over between two checkpoints seconds apart:
    a round whose log holds mostly pages an earlier round hashed wasted that hashing, so
    the next one waits twice as long, up to GAP_MAX_S (90-118 rounds a second at 1000
    requests/s were 37-40 ms of a real-time core). Fresh pages, and BEGIN, bring the
    rounds back to MIN_S; an empty log leaves the spacing as it is. The hashes stay those
    of the pages as the paused SVM holds them."""
    gaps = []
    with _svm_and_its_rounds("prehash-gap", PAGES) as (dom, pre):
        def fill(first: int, value: int) -> None:
            seq = dom.feed_input(dom.fill_command(first, 100, value))
            dom.resume()
            wait_until(lambda: dom.input_seq() > seq, timeout=60, what="the guest's fill")
            dom.pause()
            began = time.monotonic()
            pre.round()
            gaps.append(pre.gap)
            assert pre.next_round >= began + pre.gap    # the next round that far off

        fill(0, 1)                          # fresh
        for value in range(2, 8):           # the same pages again, six times
            fill(0, value)
        least, most = SvmPrehash.MIN_S, SvmPrehash.GAP_MAX_S
        assert gaps == [least] + [min(most, least * 2 ** i) for i in range(1, 7)]
        assert gaps[-1] == SvmPrehash.GAP_MAX_S
        pre.round()                         # nothing written: the spacing stays
        assert pre.gap == SvmPrehash.GAP_MAX_S
        fill(500, 9)                        # fresh pages: back to MIN_S
        assert gaps[-1] == SvmPrehash.MIN_S
        fill(0, 10)
        fill(0, 11)
        assert pre.gap > SvmPrehash.MIN_S
        pfns, hashes = pre.begin(dom.read_and_clear_dirty())
        assert pre.gap == SvmPrehash.MIN_S  # a new epoch
        assert set(range(100)) | set(range(500, 600)) <= set(pfns.tolist())
        _assert_hashes_of_the_pages_now(dom, pfns, hashes)
