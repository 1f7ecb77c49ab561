"""The primary's snapshot stage reads the PVM's dirty log while the PVM runs (issue 13:
snapshot.Prescan), so that a checkpoint's pause reads only what was written since. A page
written after a round, even one the round took, must be in the pause's read, and the
checkpoint must send every page of both; the dirty-threshold trigger counts the pages
taken early. Sim guests with the kernel's dirty log (and the bitmap), real node processes
for the last test."""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
from conftest import wait_until

from pipeline.checkpoint_api import CAUSES
from pipeline.localpair import LocalPair
from pipeline.ring import Ring, SlotLayout
from pipeline.shm import segment_prefix
from pipeline.stages.common import MARK_BUFFERED, StageContext
from pipeline.stages.snapshot import Prescan, _dispatch_buffered
from pipeline.xen_io.sim import SimDomain, WorkloadSpec, open_sim_domain

PAGES = 4096


class _Counters:
    """The snapshot stage's counters, in this process."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n

    def set(self, name: str, value: int) -> None:
        self.values[name] = value


def _run(dom, command: bytes) -> None:
    """The guest runs one input, then is paused again (the test knows what it wrote)."""
    seq = dom.feed_input(command)
    dom.resume()
    wait_until(lambda: dom.input_seq() > seq, timeout=60, what="the guest ran its input")
    dom.pause()


@pytest.mark.parametrize("mode", ["auto", "bitmap"])
def test_a_page_written_after_the_prescan_is_in_the_pause_and_copied_as_it_is_then(mode):
    dom = open_sim_domain(f"prescan-{mode}", PAGES, WorkloadSpec(seed=7), dirty_log=mode)
    dom.start(paused=True)
    try:
        dom.enable_dirty_log()
        c = _Counters()
        pre = Prescan(dom, c, prescan_ms=5)
        pre.start()
        _run(dom, SimDomain.fill_command(100, 300, 0x11))      # pages 100-399
        pre.round(lambda: False)
        first = set(np.flatnonzero(pre.held).tolist())
        assert set(range(100, 400)) <= first
        assert c.values["prescan_held"] == len(first) == c.values["pages_prescanned"]
        # written again after the round (300-399, taken by it) and for the first time
        # (400-599): the log has them again, the pause reads them
        _run(dom, SimDomain.fill_command(300, 300, 0x22))
        after = dom.read_and_clear_dirty()
        assert set(range(300, 600)) <= set(after.tolist())
        dirty, copied = pre.take(after)
        assert copied == 0                   # (no snapshot buffer: the pause copies all)
        assert set(dirty.tolist()) == first | set(after.tolist())
        assert dirty.dtype == np.uint64 and np.all(np.diff(dirty.astype(np.int64)) > 0)
        assert c.values["prescan_held"] == 0 and not pre.held.any()
        # the pause copies them as they are now
        pages = np.empty((len(dirty), dom.page_size), np.uint8)
        dom.read_pages(dirty, pages)
        at = {int(p): i for i, p in enumerate(dirty)}
        assert all((pages[at[p]] == 0x11).all() for p in range(100, 300))
        assert all((pages[at[p]] == 0x22).all() for p in range(300, 600))
        # handed over: the next pause has only its own pages
        _run(dom, SimDomain.fill_command(700, 5, 0x33))
        assert set(range(700, 705)) <= set(pre.take(dom.read_and_clear_dirty())[0].tolist())
        assert not {100, 300, 599} & set(pre.take(dom.read_and_clear_dirty())[0].tolist())
    finally:
        dom.close()


class _Buffer:
    """The snapshot buffer (stages.common.PageBuffer's rows), in this process."""

    def __init__(self, rows: int) -> None:
        self.pages = np.zeros((rows, 4096), np.uint8)


class _Ring:
    """A digest ring as the prescan sees it: how many slots the workers still hold."""

    def __init__(self) -> None:
        self.occupancy = 0


@pytest.mark.parametrize("mode", ["auto", "bitmap"])
def test_pages_copied_early_are_copied_again_if_written_after_and_the_buffer_holds_the_pause(
        mode):
    """With the snapshot buffer, a round also copies what it took; the pause copies again
    those written since (the log has them again), and only the pages no round took are
    left to copy: the rows then hold every page as the paused PVM has it."""
    dom = open_sim_domain(f"precopy-{mode}", PAGES, WorkloadSpec(seed=7), dirty_log=mode)
    dom.start(paused=True)
    try:
        dom.enable_dirty_log()
        c, buf, ring = _Counters(), _Buffer(2048), _Ring()
        pre = Prescan(dom, c, prescan_ms=5, snapbuf=buf, rings=[ring])
        pre.start()
        _run(dom, SimDomain.fill_command(100, 300, 0x11))       # 100-399
        pre.round(lambda: False)
        early = set(np.flatnonzero(pre.held).tolist())
        assert set(range(100, 400)) <= early and c.values["pages_precopied"] == len(early)
        # the digest workers hold a slot of the last checkpoint: a round copies nothing
        ring.occupancy = 1
        _run(dom, SimDomain.fill_command(1000, 10, 0x77))       # 1000-1009
        pre.round(lambda: False)
        assert not pre.held[1000:1010].any() and c.values["pages_precopied"] == len(early)
        ring.occupancy = 0
        _run(dom, SimDomain.fill_command(350, 100, 0x22))       # 350-449: some again
        pre.round(lambda: False)            # 350-399 to their rows, 400-449 and the
        assert pre.held[1000:1010].all()    # pages the last round left to new ones
        _run(dom, SimDomain.fill_command(380, 40, 0x33))        # 380-419 after the round
        _run(dom, SimDomain.fill_command(1500, 5, 0x44))        # 1500-1504: only now
        now = dom.read_and_clear_dirty()
        assert set(range(380, 420)) | set(range(1500, 1505)) <= set(now.tolist())
        pfns, copied = pre.take(now)
        assert len(set(pfns.tolist())) == len(pfns)
        every = set(range(100, 450)) | set(range(1000, 1010)) | set(range(1500, 1505))
        assert every <= set(pfns.tolist())
        assert set(range(100, 450)) | set(range(1000, 1010)) <= set(pfns[:copied].tolist())
        assert not set(range(1500, 1505)) & set(pfns[:copied].tolist())
        # the pause copies the rest (snapshot.run: rows copied.. of the buffer)
        dom.read_pages(pfns[copied:], buf.pages[copied:len(pfns)])
        want = np.empty((len(pfns), dom.page_size), np.uint8)
        dom.read_pages(pfns, want)
        assert (buf.pages[:len(pfns)] == want).all()
        value = {**{p: 0x11 for p in range(100, 350)}, **{p: 0x22 for p in range(350, 450)},
                 **{p: 0x33 for p in range(380, 420)}, **{p: 0x77 for p in range(1000, 1010)},
                 **{p: 0x44 for p in range(1500, 1505)}}
        at = {int(p): i for i, p in enumerate(pfns)}
        assert all((buf.pages[at[p]] == v).all() for p, v in value.items())
        assert c.values["pages_recopied"] >= 40
        # handed over: rows start again at 0 with the next round
        assert pre.rows == 0 and (pre.row_of == -1).all() and not pre.held.any()
    finally:
        dom.close()


def test_a_copy_stopped_by_a_waiting_command_leaves_its_rewritten_pages_to_the_pause(
        monkeypatch):
    """A round copies in parts and stops when a command waits: pages it took off the log
    again but did not copy again (their rows hold an older content, and the log no longer
    has them) are copied again by the pause; new pages it did not reach, too."""
    monkeypatch.setattr(Prescan, "COPY_PART", 100)
    monkeypatch.setattr(SimDomain, "PRESCAN_PART_PAGES", 1 << 20)    # (the log in one part)
    dom = open_sim_domain("precopy-cut", PAGES, WorkloadSpec(seed=7), dirty_log="auto")
    dom.start(paused=True)
    try:
        dom.enable_dirty_log()
        buf = _Buffer(2048)
        pre = Prescan(dom, _Counters(), prescan_ms=5, snapbuf=buf, rings=[_Ring()])
        pre.start()
        _run(dom, SimDomain.fill_command(100, 300, 0x11))        # 100-399 get rows
        pre.round(lambda: False)
        _run(dom, SimDomain.fill_command(100, 300, 0x22))        # written again, and
        _run(dom, SimDomain.fill_command(2000, 500, 0x33))       # 2000-2499 new
        asked = []
        pre.round(lambda: asked.append(1) or True)               # stops after 100 pages
        assert asked == [1] and pre.rows == 300
        pfns, copied = pre.take(dom.read_and_clear_dirty())
        assert set(range(100, 400)) | set(range(2000, 2500)) <= set(pfns.tolist())
        dom.read_pages(pfns[copied:], buf.pages[copied:len(pfns)])
        at = {int(p): i for i, p in enumerate(pfns)}
        assert all((buf.pages[at[p]] == 0x22).all() for p in range(100, 400))
        assert all((buf.pages[at[p]] == 0x33).all() for p in range(2000, 2500))
    finally:
        dom.close()


def test_a_prescan_stopped_by_a_waiting_command_leaves_the_rest_in_the_log():
    """A round reads the kernel's log in parts and stops when the snapshot stage's command
    waits: the pages it did not reach stay in the log, and the pause reads them."""
    dom = open_sim_domain("prescan-cut", PAGES, WorkloadSpec(seed=7), dirty_log="auto")
    dom.start(paused=True)
    try:
        dom.enable_dirty_log()
        pre = Prescan(dom, _Counters(), prescan_ms=5)
        pre.start()
        _run(dom, SimDomain.fill_command(0, 3000, 0x44))
        asked = []
        pre.round(lambda: asked.append(1) or True)       # a command after the first part
        assert asked == [1]
        taken = set(np.flatnonzero(pre.held).tolist())
        assert len(taken) == SimDomain.PRESCAN_PART_PAGES
        rest = set(dom.read_and_clear_dirty().tolist())
        assert not taken & rest
        assert set(range(3000)) <= taken | rest
    finally:
        dom.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pages_taken_early_count_for_the_threshold_and_reach_the_secondary(tmp_path):
    """Real nodes: the pages a round took count toward checkpoint.dirty_threshold_pages
    (without them the log alone never reaches it: the rounds keep emptying it), and the
    checkpoint sends them and the ones written after the round: memory proof equal."""
    tables = {
        "guest": {"backend": "sim", "page_count": PAGES},
        "guest.workload": {"seed": 5, "input_rate_hz": 0.0},
        "checkpoint": {"max_interval_ms": 3_600_000, "min_interval_ms": 0,
                       "dirty_threshold_pages": 700, "epoch_timeout_ms": 300_000,
                       "prescan_ms": 5},
    }

    def run(command: bytes, what: str) -> None:
        seq = pair.stage_counter("client", "pvm_input_seq")
        pair.inject_input(command)
        wait_until(lambda: pair.stage_counter("client", "pvm_input_seq") > seq
                   and pair.stage_counter("mirror", "svm_input_seq", role="secondary") > seq,
                   120, what)

    with LocalPair(tables, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected(timeout=300)
        n = len(pair.checkpoints())
        run(SimDomain.fill_command(100, 400, 0x55), "both guests filled 400 pages")
        wait_until(lambda: pair.stage_counter("snapshot", "prescan_held") >= 400, 120,
                   "a prescan taking the 400 pages off the PVM's dirty log")
        # 100 of these again (already taken), 300 new: 700 distinct pages
        run(SimDomain.fill_command(400, 400, 0x66), "both guests filled 400 more pages")
        cps = pair.wait_checkpoints(n + 1, timeout=120)
        cp = cps[n]
        assert CAUSES[cp["cause"]] == "dirty_threshold", cp
        # the trigger may fire while the second fill is under way, and it counts a page
        # taken by a round and written again twice (100 here): at least 600 distinct,
        # more than the log alone ever held (the rounds keep taking its pages)
        assert cp["status"] == 0 and cp["pages_dirty"] >= 600, cp
        assert pair.stage_counter("snapshot", "pages_prescanned") >= 400
        info = pair.prove_memory_equal(timeout=240)
        assert info["memory_equal"] is True, info


def test_batches_of_pages_copied_in_several_rounds_go_out_in_order_of_their_highest_pfn():
    """Pages copied early sit in the buffer in sorted runs, one per round: each batch is
    cut from one run, and the batches go to the digest workers in the order of their
    highest pfn (a worker classifies a batch once SVM_DIRTY's parts, ascending, reach it)."""
    layout = SlotLayout(batch_pages=4, page_size=4096)
    name = f"prescan-order-{os.getpid()}"
    rings = [Ring.create(segment_prefix(name) + f"r{i}", 8, layout) for i in range(2)]
    try:
        ctx = StageContext("snapshot", _Counters(), threading.Event(),
                           logging.getLogger("test.prescan"))
        # round 1 took 10-17 (rows 0-7), round 2 took 2-5 and 40-41 (rows 8-13), the
        # pause 1 and 30 (rows 14-15)
        pfns = np.array([10, 11, 12, 13, 14, 15, 16, 17, 2, 3, 4, 5, 40, 41, 1, 30],
                        np.uint64)
        assert _dispatch_buffered(ctx, rings, pfns, 7, [0, 8, 14])
        assert ctx.counters.values["checkpoint_batches"] == 5
        got = []
        for n in range(5):
            slot = rings[n % 2].acquire_read(timeout=5)
            assert slot.marks & MARK_BUFFERED and slot.epoch == 7
            batch = slot.pfns[:slot.count].tolist()
            assert batch == pfns[slot.row:slot.row + slot.count].tolist()
            got.append(batch)
            rings[n % 2].release_read(slot)
        assert got == [[2, 3, 4, 5], [10, 11, 12, 13], [14, 15, 16, 17], [1, 30], [40, 41]]
    finally:
        for r in rings:
            r.unlink()
            r.close()


def test_a_trickle_taken_by_many_rounds_goes_to_the_digest_workers_in_few_batches():
    """A service writes a few pages a request: each prescan round takes a few new ones, so
    the buffer holds one short sorted run per round. A checkpoint's pages still go out as
    one batch per digest worker (each batch is a hand-off at every stage of the commit's
    path; cut at every round, a service's 2048 pages went as 46-80 batches and its commit
    took 32-63 ms against 10-19 without the prescan), every page once, its row the page's,
    in the order of the batches' highest pfn."""
    layout = SlotLayout(batch_pages=1024, page_size=4096)
    name = f"prescan-trickle-{os.getpid()}"
    rings = [Ring.create(segment_prefix(name) + f"r{i}", 64, layout) for i in range(2)]
    dom = open_sim_domain("prescan-trickle", PAGES, WorkloadSpec(seed=7), dirty_log="auto")
    dom.start(paused=True)
    try:
        dom.enable_dirty_log()
        c, buf = _Counters(), _Buffer(2048)
        pre = Prescan(dom, c, prescan_ms=5, snapbuf=buf, rings=rings)
        pre.start()
        # 30 rounds, each taking 16 new pages (spread over memory) and some old ones again
        for n in range(30):
            _run(dom, SimDomain.fill_command(64 * n + 7, 16, n + 1))
            if n:
                _run(dom, SimDomain.fill_command(64 * (n - 1) + 7, 4, 0x80 + n))
            pre.round(lambda: False)
        _run(dom, SimDomain.fill_command(3000, 8, 0x55))        # only the pause's
        pfns, copied = pre.take(dom.read_and_clear_dirty())
        assert copied == 30 * 16 and len(pre.runs) >= 30
        ctx = StageContext("snapshot", _Counters(), threading.Event(),
                           logging.getLogger("test.prescan"))
        dom.read_pages(pfns[copied:], buf.pages[copied:len(pfns)])
        assert _dispatch_buffered(ctx, rings, pfns, 9, pre.runs)
        batches = []
        for ring in rings:
            while ring.occupancy:
                slot = ring.acquire_read(timeout=5)
                assert slot.marks & MARK_BUFFERED and slot.epoch == 9
                got = slot.pfns[:slot.count].copy()
                assert (got == pfns[slot.row:slot.row + slot.count]).all()
                batches.append(got)
                ring.release_read(slot)
        assert len(batches) == len(rings)
        # counted as stats shows them (checkpoint_batches): 31 before the fix
        assert ctx.counters.values["checkpoint_batches"] == len(batches)
        assert batches[0].max() < batches[1].max()      # (dealt round robin from ring 0)
        assert sorted(np.concatenate(batches).tolist()) == sorted(pfns.tolist())
        assert len(set(pfns.tolist())) == len(pfns) == 30 * 16 + 8
    finally:
        dom.close()
        for r in rings:
            r.unlink()
            r.close()


def test_the_rounds_come_as_often_as_the_pvm_writes_enough_to_take():
    """The cadence (Prescan._next_wait): a burst is taken every prescan_ms, a steady
    trickle about LEFT_PAGES pages at a time (a service writing ~2000 pages a second: one
    round per ~100 ms, not one per 5-20 ms for ~10 pages each, at real time above its
    request path), a few pages after a long wait are looked at again soon (a burst may have
    begun), an idle PVM less and less often."""
    dom = open_sim_domain("prescan-cadence", PAGES, WorkloadSpec(seed=7), dirty_log="auto")
    try:
        pre = Prescan(dom, _Counters(), prescan_ms=5)
        floor, cheap = 0.005, 0.00001
        # a burst: as often as allowed, and never more often than 40x a round's read of
        # the log and 2x its copy (work the pause would do anyway: a round that copied half
        # of a 1k burst must not put the next one past the pause)
        assert pre._next_wait(Prescan.LEFT_PAGES, 0.005, cheap) == floor
        assert pre._next_wait(1000, 0.005, 0.001) == pytest.approx(0.040)
        assert pre._next_wait(500, 0.005, 0.0001, 0.001) == floor
        assert pre._next_wait(16000, 0.005, 0.0001, 0.03) == pytest.approx(0.06)
        # a trickle of 2000 pages/s seen over a short wait: ~LEFT_PAGES at a time, at most
        # IDLE_MAX_S apart
        assert pre._next_wait(10, 0.005, cheap) == Prescan.IDLE_MAX_S
        assert pre._next_wait(40, 0.005, cheap) == pytest.approx(0.032)
        # the same few pages after a long wait: a look again soon, then the trickle's pace
        assert pre._next_wait(200, 0.1, cheap) == floor
        pre.wait_s = floor
        assert pre._next_wait(10, floor, cheap) == Prescan.IDLE_MAX_S
        # a steady trickle (a service: ~3300 pages/s into the same pages) is taken at its
        # pace, whether a round after the long wait took LEFT_PAGES or more (not a burst)
        # or fewer (not a burst's first pages): not every other round a look at floor
        pre.rate = 0.0
        assert pre._next_wait(30, 0.009, cheap) == pytest.approx(0.0768)    # (a first look)
        assert pre._next_wait(300, 0.09, cheap) == pytest.approx(0.0768)
        assert pre._next_wait(230, 0.075, cheap) == pytest.approx(0.0835, abs=1e-4)
        # ... and a burst beginning in it (4x the rate) gets the floor again
        assert pre._next_wait(1200, 0.08, cheap) == floor
        # nothing: twice the last wait, up to IDLE_MAX_S
        pre.wait_s = 0.02
        assert pre._next_wait(0, 0.02, cheap) == pytest.approx(0.04)
        pre.wait_s = 0.08
        assert pre._next_wait(0, 0.08, cheap) == Prescan.IDLE_MAX_S
    finally:
        dom.close()


def test_no_rounds_while_no_secondary_protects_the_guest():
    """While the node's ``unprotected`` word is 1 no checkpoint will take the rounds'
    pages (the next protection starts with a full sync): no round is due and the stage
    waits for its commands only; once protected again, the rounds go on."""
    import multiprocessing
    unprotected = multiprocessing.get_context("fork").Value("i", 1, lock=False)
    dom = open_sim_domain("prescan-unprot", PAGES, WorkloadSpec(seed=7), dirty_log="auto")
    dom.start(paused=True)
    try:
        dom.enable_dirty_log()
        c = _Counters()
        pre = Prescan(dom, c, prescan_ms=5, unprotected=unprotected)
        pre.start()
        pre.next_at = 0.0           # (the round's time came)
        assert not pre.due() and pre.timeout(0.2) == 0.2
        unprotected.value = 0
        assert pre.due() and pre.timeout(0.2) == 0.0
        _run(dom, SimDomain.fill_command(0, 30, 0x21))
        pre.round(lambda: False)
        assert c.values["prescans"] == 1 and c.values["prescan_held"] == 30
    finally:
        dom.close()
