"""The sim guest: a real forked process over a shared memfd, driven through SimDomain."""
from __future__ import annotations

import functools
import logging
import os
import select
import signal
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_until

from pipeline.xen_io import DomainError
from pipeline.xen_io.sim import domain as sim_module
from pipeline.xen_io.sim.dirty_log import uffd_wp_async_unsupported_reason
from pipeline.xen_io.sim.input_log import InputLog
from pipeline.xen_io.sim import BLOB_SIZE, SimDomain, WorkloadSpec, open_sim_domain

pytestmark = pytest.mark.timeout(60)

UFFD_OK = uffd_wp_async_unsupported_reason() is None
NO_UFFD_REASON = f"kernel lacks uffd-wp async: {uffd_wp_async_unsupported_reason()}"
MODES = [pytest.param("uffd", marks=pytest.mark.skipif(not UFFD_OK, reason=NO_UFFD_REASON)),
         "bitmap"]
PAGES = 2048  # 8 MiB guests keep the suite fast
#: written pages always change (no zero content), so "pages that changed" is an oracle
NO_ZERO = WorkloadSpec(mix_zero=0.0, mix_text=0.5, mix_random=0.5)


@pytest.fixture
def make_domain(make_sim_domain):
    return functools.partial(make_sim_domain, pages=PAGES)


def feed_and_wait(dom: SimDomain, payloads: list[bytes]) -> None:
    for p in payloads:
        dom.feed_input(p)
    dom.wait_for_input_seq(dom.input_head)


def inputs(n: int, start: int = 0) -> list[bytes]:
    return [b"client request %d " % i + bytes(i % 50) for i in range(start, start + n)]


def reap(pid: int) -> None:
    """Make sure a forked test helper is gone (a failed assertion must not leave it)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def all_outputs(dom: SimDomain, expected: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 10
    while len(out) < expected and time.monotonic() < deadline:
        out += dom.read_outputs(timeout=0.05)
    return out


# -- dirty log ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_dirty_set_is_exactly_the_pages_written_and_clears(make_domain, mode: str) -> None:
    dom = make_domain(workload=NO_ZERO, dirty_log=mode)
    assert dom.dirty_log_kind == mode
    dom.enable_dirty_log()
    before = dom.memory_view().copy()
    dom.resume()
    feed_and_wait(dom, inputs(20) + [SimDomain.write_command(300)])
    dom.pause()
    changed = np.flatnonzero((dom.memory_view() != before).any(axis=1))
    dirty = dom.read_and_clear_dirty()
    assert dirty.dtype == np.uint64
    assert np.array_equal(dirty, changed)
    assert len(dirty) >= 300
    assert dom.read_and_clear_dirty().size == 0  # cleared by the read
    starts, lengths = dom.read_and_clear_dirty_runs()
    assert starts.size == 0 and lengths.size == 0


@pytest.mark.parametrize("mode", MODES)
def test_reads_racing_a_running_guest_lose_no_write(make_domain, mode: str) -> None:
    """Read-and-clear while the guest writes (the epochs of a running guest): every page it
    wrote shows up in some read, and nothing else does."""
    dom = make_domain(workload=NO_ZERO, dirty_log=mode)
    dom.enable_dirty_log()
    before = dom.memory_view().copy()
    dom.resume()
    seen = np.zeros(dom.page_count, dtype=bool)
    for _ in range(6):
        dom.feed_input(SimDomain.write_command(150))
        for _ in range(5):
            seen[dom.read_and_clear_dirty()] = True
            time.sleep(0.0003)
    dom.wait_for_input_seq(6)
    dom.pause()
    seen[dom.read_and_clear_dirty()] = True
    changed = (dom.memory_view() != before).any(axis=1)
    assert np.array_equal(np.flatnonzero(seen), np.flatnonzero(changed))


@pytest.mark.parametrize("mode", MODES)
def test_write_command_dirties_exactly_n_distinct_pages_in_runs(make_domain, mode: str) -> None:
    dom = make_domain(workload=WorkloadSpec(run_length=8), dirty_log=mode, paused=False)
    dom.enable_dirty_log()
    feed_and_wait(dom, [SimDomain.write_command(1000)])
    dom.pause()
    starts, lengths = dom.read_and_clear_dirty_runs()
    assert int(lengths.sum()) == 1000
    assert len(starts) <= 1000 // 8 + 1  # runs of 8 (some merge), one cut short


@pytest.mark.parametrize("mode", MODES)
def test_fill_command_gives_pages_back_their_earlier_content(make_domain, mode: str) -> None:
    """fill_command(first, n, v): exactly those pages, every byte v, and in the dirty log;
    the same command again restores them exactly (the torn-epoch REF test needs a page back
    at its earlier content); cut at the last page."""
    dom = make_domain(dirty_log=mode, paused=False)
    dom.enable_dirty_log()
    feed_and_wait(dom, [SimDomain.fill_command(100, 20, 0x11)])
    dom.pause()
    assert np.array_equal(dom.read_and_clear_dirty(), np.arange(100, 120, dtype=np.uint64))
    first = dom.memory_view().copy()
    assert (first[100:120] == 0x11).all()
    dom.resume()
    feed_and_wait(dom, [SimDomain.fill_command(100, 20, 0x22), inputs(1)[0],
                        SimDomain.fill_command(100, 20, 0x11)])
    dom.pause()
    assert np.array_equal(dom.memory_view()[100:120], first[100:120])
    dom.resume()
    feed_and_wait(dom, [SimDomain.fill_command(PAGES - 4, 10, 0x33)])
    dom.pause()
    assert (dom.memory_view()[PAGES - 4:] == 0x33).all()
    assert dom.counters()["clamped_write_commands"] == 1


@pytest.mark.skipif(not UFFD_OK, reason="needs both dirty-log modes")
def test_uffd_and_bitmap_modes_report_the_same_pfns(make_domain) -> None:
    a = make_domain("a", dirty_log="uffd", paused=False)
    b = make_domain("b", dirty_log="bitmap", paused=False)
    for dom in (a, b):
        dom.enable_dirty_log()
    sets = []
    for batch in (inputs(10), inputs(5, 10) + [SimDomain.write_command(777)]):
        for dom in (a, b):
            feed_and_wait(dom, batch)
            dom.pause()
        sets.append((a.read_and_clear_dirty(), b.read_and_clear_dirty()))
        a.resume()
        b.resume()
    for from_uffd, from_bitmap in sets:
        assert from_uffd.size > 0
        assert np.array_equal(from_uffd, from_bitmap)


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_writes_are_not_in_the_guest_dirty_log(make_domain, mode: str) -> None:
    dom = make_domain(workload=NO_ZERO, dirty_log=mode)
    dom.enable_dirty_log()
    restored = np.array([0, 1, 2, 500, 2047], dtype=np.uint64)
    dom.write_pages(restored, np.full((5, dom.page_size), 0x5A, dtype=np.uint8))
    dom.memory_view()[1000:1010] = 7  # through the whole-RAM view as well
    assert dom.read_and_clear_dirty().size == 0
    before = dom.memory_view().copy()
    dom.resume()
    feed_and_wait(dom, inputs(10))
    dom.pause()
    changed = np.flatnonzero((dom.memory_view() != before).any(axis=1))
    assert np.array_equal(dom.read_and_clear_dirty(), changed)  # only the guest's own writes


# -- pause / resume ----------------------------------------------------------------------------

def test_pause_resume_and_nothing_moves_while_paused(make_domain) -> None:
    dom = make_domain(paused=False)
    feed_and_wait(dom, inputs(5))
    pauses, resumes = [], []
    for i in range(30):
        dom.feed_input(SimDomain.write_command(200))  # keep the guest busy writing
        t0 = time.perf_counter()
        dom.pause()
        pauses.append(time.perf_counter() - t0)
        assert dom.is_paused
        t0 = time.perf_counter()
        dom.resume()
        resumes.append(time.perf_counter() - t0)
        assert not dom.is_paused
    # how fast is a figure (scripts/bench_sim_guest.py measures it), not a pass condition
    print(f"\npause median {np.median(pauses) * 1e3:.2f} ms, "
          f"resume median {np.median(resumes) * 1e3:.2f} ms")
    dom.pause()
    seq, digest, vcpu = dom.input_seq(), dom.memory_digest(), dom.get_vcpu_state()
    written = dom.counters()["pages_written"]
    for p in inputs(20, 100):  # inputs arrive while paused: the guest must not take them
        dom.feed_input(p)
    time.sleep(0.05)
    assert dom.memory_digest() == digest
    assert dom.input_seq() == seq and dom.get_vcpu_state() == vcpu
    assert dom.counters()["pages_written"] == written
    assert all(s < seq for s, _ in dom.read_outputs())  # nothing new emitted
    dom.resume()
    dom.wait_for_input_seq(dom.input_head)  # and takes them once resumed


def test_vcpu_state_needs_a_paused_guest(make_domain) -> None:
    dom = make_domain(paused=False)
    with pytest.raises(DomainError, match="paused"):
        dom.get_vcpu_state()
    with pytest.raises(DomainError, match="paused"):
        dom.set_vcpu_state(b"")


# -- determinism -------------------------------------------------------------------------------

def test_two_guests_with_the_same_inputs_stay_identical(make_domain) -> None:
    a = make_domain("a", paused=False)
    b = make_domain("b", paused=False)
    assert a.memory_digest() == b.memory_digest()  # same seed: same fill
    payloads = inputs(40) + [SimDomain.write_command(500)] + inputs(40, 40)
    for i, p in enumerate(payloads):
        a.feed_input(p)
        if i % 7 == 0:
            time.sleep(0.001)  # different timing on the two guests
        b.feed_input(p)
        if i % 5 == 0:
            b.pause()  # and pauses at different points
            b.resume()
    a.wait_for_input_seq(len(payloads))
    b.wait_for_input_seq(len(payloads))
    out_a, out_b = all_outputs(a, len(payloads)), all_outputs(b, len(payloads))
    assert [s for s, _ in out_a] == list(range(len(payloads)))
    assert out_a == out_b
    a.pause()
    b.pause()
    assert a.memory_digest() == b.memory_digest()
    assert a.get_vcpu_state() == b.get_vcpu_state()
    assert a.counters()["nondeterministic_inputs"] == 0


def test_nondeterminism_makes_guests_diverge(make_domain) -> None:
    spec = WorkloadSpec(nondeterminism=1.0)
    a = make_domain("a", workload=spec, paused=False)
    b = make_domain("b", workload=spec, paused=False)
    feed_and_wait(a, inputs(5))
    feed_and_wait(b, inputs(5))
    out_a, out_b = all_outputs(a, 5), all_outputs(b, 5)
    assert [s for s, _ in out_a] == [s for s, _ in out_b] == list(range(5))
    assert all(fa != fb for (_, fa), (_, fb) in zip(out_a, out_b))
    a.pause()
    b.pause()
    assert a.memory_digest() != b.memory_digest()
    assert a.counters()["nondeterministic_inputs"] == 5


def test_output_frames_depend_on_memory(make_domain) -> None:
    """A guest whose RAM differs where it reads emits different output (what a comparator
    needs to notice a bad restore)."""
    a = make_domain("a")
    b = make_domain("b")
    b.memory_view()[:] ^= 0x01  # every page differs
    for dom in (a, b):
        dom.resume()
        feed_and_wait(dom, inputs(3))
    assert all(fa != fb for (_, fa), (_, fb) in zip(all_outputs(a, 3), all_outputs(b, 3)))


# -- checkpoint-style copy -------------------------------------------------------------------

@pytest.mark.parametrize("mid_input", [False, True])
def test_copy_of_ram_and_vcpu_makes_b_continue_exactly_as_a(make_domain, mid_input: bool) -> None:
    a = make_domain("a", paused=False)
    b = make_domain("b", workload=WorkloadSpec(fill=False, seed=99))  # a fresh secondary
    first = inputs(10) + [SimDomain.write_command(PAGES)]
    for p in first:
        a.feed_input(p)
        b.feed_input(p)  # mirrored into b's log; b stays paused
    a.wait_for_input_seq(10)
    a.pause()
    while mid_input:  # catch a inside a write command (it pauses between page writes)
        state = sim_module._GuestState.unpack(a.get_vcpu_state(), None, PAGES)
        if state.phase == sim_module.PHASE_INPUT and 0 < state.step < state.npages:
            break
        if state.seq == a.input_head:  # it finished before a pause caught it: once more
            first.append(SimDomain.write_command(PAGES))
            a.feed_input(first[-1])
            b.feed_input(first[-1])
        a.resume()
        time.sleep(0.0005)
        a.pause()
    if not mid_input:
        a.resume()
        a.wait_for_input_seq(len(first))
        a.pause()
    blob = a.get_vcpu_state()
    b.memory_view()[:] = a.memory_view()
    b.set_vcpu_state(blob)
    assert b.input_seq() == SimDomain.vcpu_input_seq(blob)
    assert b.memory_digest() == a.memory_digest()
    a.read_outputs()
    a.resume()
    b.resume()
    more = inputs(30, 10)
    for p in more:
        a.feed_input(p)
        b.feed_input(p)
    total = len(first) + len(more)
    a.wait_for_input_seq(total)
    b.wait_for_input_seq(total)
    out_a = all_outputs(a, total - SimDomain.vcpu_input_seq(blob))
    out_b = all_outputs(b, total - SimDomain.vcpu_input_seq(blob))
    assert out_a == out_b and out_a[-1][0] == total - 1
    a.pause()
    b.pause()
    assert a.memory_digest() == b.memory_digest()
    assert a.get_vcpu_state() == b.get_vcpu_state()


def test_a_guest_loaded_mid_input_waits_for_the_input_its_log_has_not_got_yet(make_domain) -> None:
    """The primary feeds its guest an input before it mirrors it, so a checkpoint can
    catch the PVM inside input 10 while the SVM's log holds only inputs 0..9 (at load 20
    the mirror was seen 29 inputs behind). Loaded with that state, the SVM waits for
    input 10 (counted) instead of failing with InputLogEntryGone (seq 10 beyond the log's
    head: CI, test_one_nondeterministic_reply_makes_exactly_one_net_checkpoint); fed it,
    it goes on exactly as the PVM. The interleaving is forced, not timed: the PVM stops at
    its breakpoint (page 5 of input 10), and b's log is fed up to input 9 only."""
    a = make_domain("a", paused=False)
    b = make_domain("b", workload=WorkloadSpec(fill=False, seed=99))  # a fresh secondary
    first = inputs(10) + [SimDomain.write_command(64)] + inputs(5, 11)
    a.break_at(10, 5)
    for p in first:
        a.feed_input(p)
    for p in first[:10]:
        b.feed_input(p)                  # the mirror is behind: input 10 not in b's log yet
    a.wait_break()
    blob = a.get_vcpu_state()
    assert (SimDomain.vcpu_input_seq(blob), SimDomain.vcpu_input_step(blob)) == (10, 5)
    assert [s for s, _ in all_outputs(a, 10)] == list(range(10))
    assert b.input_head == 10
    b.memory_view()[:] = a.memory_view()
    b.set_vcpu_state(blob)
    b.resume()

    def waiting() -> bool:
        problem = b._guest_problem()     # before the fix: InputLogEntryGone, at once
        assert problem is None, problem
        return b.counters()["inputs_awaited_mid_input"] == 1
    wait_until(waiting, 60, "b waiting for input 10, in the middle of it")
    assert b.input_seq() == 10 and b.read_outputs() == []
    for p in first[10:]:
        b.feed_input(p)
    a.resume()
    a.wait_for_input_seq(len(first))
    b.wait_for_input_seq(len(first))
    out_b = all_outputs(b, 6)
    assert [s for s, _ in out_b] == list(range(10, 16)) and out_b == all_outputs(a, 6)
    a.pause()
    b.pause()
    assert a.memory_digest() == b.memory_digest()
    assert a.get_vcpu_state() == b.get_vcpu_state()
    assert b.counters()["inputs_awaited_mid_input"] == 1


# -- input log ---------------------------------------------------------------------------------

def test_input_log_wraps_around_only_after_trim_and_consumption(make_domain) -> None:
    dom = make_domain(input_slots=8, input_slot_size=64)
    for i in range(8):
        assert dom.feed_input(b"in %d" % i) == i
    with pytest.raises(TimeoutError, match="input log full"):
        dom.feed_input(b"ninth", timeout=0.05)
    dom.trim_inputs(8)  # trimmed, but the guest has not consumed them yet
    with pytest.raises(TimeoutError):
        dom.feed_input(b"ninth", timeout=0.05)
    dom.resume()
    assert dom.feed_input(b"ninth", timeout=5) == 8  # frees as the guest consumes
    seen = [s for s, _ in all_outputs(dom, 9)]
    for i in range(9, 100):  # many laps around 8 slots; the guest's progress frees slots
        dom.trim_inputs(i)
        assert dom.feed_input(b"in %d" % i, timeout=5) == i
    dom.wait_for_input_seq(100)
    seen += [s for s, _ in all_outputs(dom, 100 - len(seen))]
    assert seen == list(range(100))


def test_input_log_keeps_untrimmed_inputs_for_a_rewind(make_domain) -> None:
    """A checkpoint can move a guest back to an earlier input: untrimmed entries stay."""
    dom = make_domain(paused=False, input_slots=8, input_slot_size=64)
    feed_and_wait(dom, inputs(3))
    dom.pause()
    at_three = dom.get_vcpu_state()
    ram = dom.memory_view().copy()
    dom.resume()
    for p in inputs(5, 3):  # fills the log (8 entries, trim still 0)
        dom.feed_input(p)
    dom.wait_for_input_seq(8)
    with pytest.raises(TimeoutError):
        dom.feed_input(b"x", timeout=0.05)
    first = all_outputs(dom, 8)
    dom.pause()
    dom.memory_view()[:] = ram
    dom.set_vcpu_state(at_three)
    dom.resume()
    dom.wait_for_input_seq(8)
    assert all_outputs(dom, 5) == first[3:]  # replayed from the log, identically
    dom.trim_inputs(8)
    dom.pause()
    with pytest.raises(ValueError, match="overwritten"):
        dom.set_vcpu_state(at_three)  # below the trim point: refused


@given(st.lists(st.tuples(st.sampled_from(["append", "trim", "consume"]),
                          st.integers(0, 12)), max_size=120))
@settings(max_examples=60, deadline=None)
def test_input_log_keeps_every_entry_still_needed(ops: list[tuple[str, int]]) -> None:
    """Against a model: entries at or above min(trim, consumer) read back intact; an append
    is refused exactly when it would overwrite one of them."""
    log = InputLog(slot_count=4, slot_size=16)
    model: dict[int, bytes] = {}
    try:
        for op, arg in ops:
            if op == "append":
                payload = b"p%d-%d" % (log.head, arg)
                if log.head - log.free_below() >= 4:
                    with pytest.raises(TimeoutError):
                        log.append(payload, timeout=0)
                else:
                    model[log.append(payload, timeout=0)] = payload
            elif op == "trim":
                log.trim(log.trim_seq + arg % 3)
            else:
                log.set_consumer(min(log.consumer_seq + arg % 3, log.head))
            for seq in range(log.free_below(), log.head):
                assert log.get(seq) == model[seq]
    finally:
        log.close()


def test_bad_inputs_are_refused_counted_and_change_nothing(make_domain) -> None:
    dom = make_domain(input_slot_size=64)
    assert dom.feed_input(b"a", seq=0) == 0
    with pytest.raises(ValueError, match="seq 5 out of order.*expects seq 1"):
        dom.feed_input(b"b", seq=5)
    with pytest.raises(ValueError, match="100 bytes exceeds.*64"):
        dom.feed_input(bytes(100))
    assert dom.input_head == 1
    assert dom.counters()["rejected_inputs"] == 2
    assert dom.feed_input(b"b", seq=1) == 1
    with pytest.raises(ValueError, match="npages"):
        SimDomain.write_command(-1)


def test_a_joining_secondary_log_starts_at_the_primary_seq(make_domain) -> None:
    pvm = make_domain("pvm", paused=False)
    feed_and_wait(pvm, inputs(50))
    svm = make_domain("svm", workload=WorkloadSpec(fill=False))
    svm.start_inputs_at(50)
    with pytest.raises(ValueError, match="expects seq 50"):
        svm.feed_input(b"x", seq=0)
    pvm.pause()
    svm.memory_view()[:] = pvm.memory_view()
    svm.set_vcpu_state(pvm.get_vcpu_state())
    pvm.read_outputs()
    pvm.resume()
    svm.resume()
    for i, p in enumerate(inputs(5, 50)):
        assert pvm.feed_input(p) == svm.feed_input(p, seq=50 + i) == 50 + i
    pvm.wait_for_input_seq(55)
    svm.wait_for_input_seq(55)
    assert all_outputs(pvm, 5) == all_outputs(svm, 5)
    with pytest.raises(ValueError, match="still needed"):
        svm.start_inputs_at(60)  # it holds inputs a rewind may need


def test_a_secondary_that_never_ran_may_start_its_log_over(make_domain) -> None:
    """A new secondary mirrored a few inputs (the primary still took it for the one it
    lost), then nothing while the primary ran unprotected, then the primary re-protects
    it from its guest's input position: the log starts over there, since the SVM was
    never positioned in it (the fault matrix's re-protection after a restarted secondary).
    Once the SVM was positioned (a checkpoint's vCPU state loaded) it may not."""
    pvm = make_domain("pvm", paused=False)
    feed_and_wait(pvm, inputs(80))
    svm = make_domain("svm", workload=WorkloadSpec(fill=False))
    svm.start_inputs_at(30)
    for i, p in enumerate(inputs(3, 30)):
        svm.feed_input(p, seq=30 + i)
    svm.start_inputs_at(80)                 # a gap: inputs 33..79 were never mirrored
    assert svm.input_head == 80
    pvm.pause()
    svm.memory_view()[:] = pvm.memory_view()
    svm.set_vcpu_state(pvm.get_vcpu_state())   # positioned at 80
    svm.feed_input(inputs(1, 80)[0], seq=80)
    with pytest.raises(ValueError, match="still needed"):
        svm.start_inputs_at(90)


# -- bad vCPU blobs ----------------------------------------------------------------------------

def test_bad_vcpu_blob_is_refused_and_guest_state_unchanged(make_domain) -> None:
    a = make_domain("a", paused=False)
    control = make_domain("c", paused=False)
    other_size = make_domain("o", pages=PAGES // 2)
    feed_and_wait(a, inputs(4))
    feed_and_wait(control, inputs(4))
    a.pause()
    good = a.get_vcpu_state()
    assert len(good) == BLOB_SIZE
    flipped = bytearray(good)
    flipped[30] ^= 0xFF
    bad = {
        "truncated": (good[:-1], "bytes, expected"),
        "magic": (b"XXXXXXXX" + good[8:], "magic"),
        "checksum": (bytes(flipped), "checksum"),
        "other guest size": (other_size.get_vcpu_state(), "fingerprint"),
        "not bytes": (12345, "must be bytes"),
    }
    for name, (blob, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            a.set_vcpu_state(blob)  # type: ignore[arg-type]
        assert a.get_vcpu_state() == good, name
    assert a.counters()["bad_vcpu_blobs"] == len(bad)
    a.resume()
    feed_and_wait(a, inputs(4, 4))
    feed_and_wait(control, inputs(4, 4))
    a.pause()
    control.pause()
    assert a.memory_digest() == control.memory_digest()  # it went on as if nothing happened


# -- memory access -----------------------------------------------------------------------------

def test_read_and_write_pages_vectorized_and_checked(make_domain) -> None:
    dom = make_domain()
    pfns = np.array([7, 3, 2000], dtype=np.uint64)
    data = np.random.default_rng(1).integers(0, 256, (3, dom.page_size), dtype=np.uint8)
    dom.write_pages(pfns, data)
    out = np.zeros((4, dom.page_size), np.uint8)
    dom.read_pages(pfns, out)
    assert np.array_equal(out[:3], data) and not out[3].any()
    assert np.array_equal(dom.memory_view()[3], data[1])
    before = dom.memory_digest()
    with pytest.raises(ValueError, match="pfn 2048 out of range"):
        dom.write_pages(np.array([1, 2048]), data[:2])
    with pytest.raises(ValueError, match="pfn -1 out of range"):
        dom.read_pages(np.array([-1]), out)
    with pytest.raises(ValueError, match="shape"):
        dom.read_pages(pfns, np.zeros((2, dom.page_size), np.uint8))
    assert dom.memory_digest() == before
    assert dom.counters()["bad_page_requests"] == 3


# -- processes ---------------------------------------------------------------------------------

def test_forked_stage_process_drives_the_guest(make_domain) -> None:
    """Stages are forked from the creator and use the inherited SimDomain."""
    dom = make_domain(workload=NO_ZERO, paused=False)
    dom.enable_dirty_log()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            for p in inputs(6):
                dom.feed_input(p)
            dom.wait_for_input_seq(6)
            dom.pause()
            dirty = dom.read_and_clear_dirty()
            blob = dom.get_vcpu_state()
            outs = all_outputs(dom, 6)
            dom.resume()
            ok = (len(dirty) == 6 * 16 and SimDomain.vcpu_input_seq(blob) == 6
                  and [s for s, _ in outs] == list(range(6)))
            os.write(w, b"ok" if ok else repr((len(dirty), len(outs))).encode())
            dom.close()  # a user's close does not stop the guest
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 100) == b"ok"
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(r)
        reap(pid)
    assert not dom.is_paused
    feed_and_wait(dom, inputs(1, 6))  # the guest still runs for the creator
    dom.pause()
    assert dom.input_seq() == 7


def test_process_forked_before_start_sees_the_guest() -> None:
    dom = open_sim_domain("early", 256, dirty_log="auto")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            deadline = time.monotonic() + 20
            while not dom.guest_pid and time.monotonic() < deadline:
                time.sleep(0.001)
            dom.wait_for_input_seq(1, timeout=20)
            dom.pause()
            os.write(w, b"%d" % SimDomain.vcpu_input_seq(dom.get_vcpu_state()))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        dom.start(paused=False)
        dom.feed_input(b"one")
        assert os.read(r, 10) == b"1"
        assert os.waitpid(pid, 0)[1] == 0
        assert dom.is_paused  # paused by the other process
    finally:
        os.close(r)
        reap(pid)
        dom.close()


def test_guest_started_and_closed_by_a_forked_process() -> None:
    """The creator may hand start() to a forked supervisor process; that one owns the guest."""
    dom = open_sim_domain("handed", 256, dirty_log="auto")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            dom.start(paused=False)
            feed_and_wait(dom, inputs(2))
            guest = dom.guest_pid
            dom.close()
            code = 0 if not os.path.exists(f"/proc/{guest}") else 2
        finally:
            os._exit(code)
    try:
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        reap(pid)
        dom.close()


def test_pickling_is_refused_with_the_reason(make_domain) -> None:
    import pickle
    with pytest.raises(TypeError, match="fork inheritance"):
        pickle.dumps(make_domain())


def test_output_fileno_is_readable_when_outputs_are_pending(make_domain) -> None:
    dom = make_domain(paused=False)
    assert select.select([dom.output_fileno()], [], [], 0)[0] == []
    dom.feed_input(b"ping")
    assert select.select([dom.output_fileno()], [], [], 5)[0] == [dom.output_fileno()]
    assert [s for s, _ in dom.read_outputs()] == [0]


def test_pause_works_while_the_guest_waits_for_room_in_the_output_pipe(make_domain) -> None:
    import fcntl
    dom = make_domain(paused=False)
    fcntl.fcntl(dom.output_fileno(), fcntl.F_SETPIPE_SZ, 4096)  # ~50 frames fill it
    for i in range(100):  # nobody reads outputs: the guest ends up blocked emitting one
        dom.feed_input(b"%d" % i)
    deadline = time.monotonic() + 10
    while dom.counters()["output_stalls"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    stuck_at = dom.input_seq()
    assert 0 < stuck_at < 100 and dom.counters()["output_stalls"] > 0
    dom.pause()  # answered although the guest was blocked on the pipe
    assert dom.input_seq() == stuck_at
    dom.resume()
    got = []
    while len(got) < 100 and time.monotonic() < deadline:
        got += dom.read_outputs(timeout=0.05)  # draining lets it go on, in order, none lost
    assert [s for s, _ in got] == list(range(100))


def test_dead_guest_gives_a_clear_error_not_a_hang(make_domain) -> None:
    dom = make_domain(paused=False)
    os.kill(dom.guest_pid, signal.SIGKILL)
    # a pause that waited for its timeout instead of noticing the death would outlast
    # the test's own timeout (pytest-timeout): the error must come from the exit
    with pytest.raises(DomainError, match=f"guest process {dom.guest_pid} exited"):
        dom.pause(timeout=3600)


def _pause_in_a_stage(dom, out) -> None:
    """(A forked process, as a stage is: it does not own the guest.)"""
    try:
        dom.pause(timeout=3600)
        out.send("paused")
    except DomainError as exc:
        out.send(str(exc))


def test_a_stage_pausing_a_dead_guest_gets_a_clear_error_not_a_hang(make_domain) -> None:
    """A stage (not the guest's owner) asks whether the guest process is there only once
    the answer is late (reading /proc before every pause's first wait cost each pause ~30 us
    of CPU, the PVM's inside its downtime): a dead guest is still named, not waited for."""
    import multiprocessing
    dom = make_domain(paused=False)
    fork = multiprocessing.get_context("fork")
    a, b = fork.Pipe()
    p = fork.Process(target=_pause_in_a_stage, args=(dom, b))
    p.start()
    try:
        assert a.poll(60) and a.recv() == "paused"      # alive: answered
        p.join(30)
        dom.resume()
        os.kill(dom.guest_pid, signal.SIGKILL)
        wait_until(lambda: open(f"/proc/{dom.guest_pid}/stat", "rb").read()
                   .rsplit(b")", 1)[1].split()[0] == b"Z", what="the guest's death")
        p = fork.Process(target=_pause_in_a_stage, args=(dom, b))
        p.start()
        assert a.poll(60), "the stage's pause of a dead guest did not return"
        assert a.recv() == f"sim domain {dom.name}: pause failed: guest process " \
            f"{dom.guest_pid} is dead"
    finally:
        p.join(30)


def _shm_entries_of_others_excluded(before: set[str]) -> set[str]:
    """/dev/shm entries made since ``before`` by this process: on a shared machine other
    processes (a node of another test run) make segments at any time; theirs carry their
    creator's pid (colo-pair<pid>x..., hbtest-<pid>-...) and are left out."""
    import re
    new = set(os.listdir("/dev/shm")) - before
    mine = str(os.getpid())

    def others(name: str) -> bool:
        pids = [p for p in re.findall(r"\d+", name) if p != mine and os.path.exists(f"/proc/{p}")]
        return bool(pids) and mine not in re.findall(r"\d+", name)
    return {n for n in new if not others(n)}


def test_close_leaves_no_process_fd_or_shm_behind() -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    shm_before = set(os.listdir("/dev/shm"))
    dom = open_sim_domain("closing", PAGES, dirty_log="auto")
    dom.start(paused=False)
    pid = dom.guest_pid
    feed_and_wait(dom, inputs(3))
    dom.read_outputs()
    if dom.dirty_log_kind == "uffd":
        dom.read_and_clear_dirty()  # opens the pagemap fd
    dom.close()
    dom.close()  # idempotent
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped: not even a zombie
    assert set(os.listdir("/proc/self/fd")) <= fds_before
    assert _shm_entries_of_others_excluded(shm_before) == set()
    with pytest.raises(DomainError, match="after close"):
        dom.pause()


def test_guest_dies_with_a_creator_that_never_closed_it() -> None:
    import subprocess
    import sys
    script = ("import os\n"
              "from pipeline.xen_io.sim import open_sim_domain\n"
              "d = open_sim_domain('orphan', 64)\n"
              "d.start(paused=False)\n"
              "print(d.guest_pid, flush=True)\n"
              "os._exit(0)\n")  # no close(), no atexit: as if the supervisor crashed
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    guest = int(out.split()[0])

    def alive() -> bool:  # a zombie is dead: reaping an orphan is init's job, not ours
        try:
            with open(f"/proc/{guest}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
        except OSError:
            return False
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive()


def test_guest_start_failure_is_reported(make_domain, monkeypatch) -> None:
    # a mock: the guest's userfaultfd registration failing cannot be caused on a kernel
    # that supports it, so the registration is replaced by one that raises
    def failing_register(addr: int, size: int) -> None:
        raise OSError(1, "UFFDIO_REGISTER: simulated failure")
    monkeypatch.setattr(sim_module, "UffdWriteProtect", failing_register)
    dom = open_sim_domain("failing", 256, dirty_log="bitmap")
    dom.dirty_log_kind = "uffd"  # force the guest down the uffd path
    try:
        with pytest.raises(DomainError, match="simulated failure"):
            dom.start()
    finally:
        dom.close()


# -- configuration -----------------------------------------------------------------------------

def test_auto_falls_back_to_bitmap_with_a_reason_mocked_kernel(monkeypatch, caplog) -> None:
    # a mock: a kernel without uffd-wp async cannot be had on this machine
    monkeypatch.setattr(sim_module, "uffd_wp_async_unsupported_reason",
                        lambda: "simulated: kernel older than 6.7")
    with caplog.at_level(logging.WARNING, logger="pipeline.xen_io.sim.domain"):
        dom = open_sim_domain("old-kernel", 64, dirty_log="auto")
    try:
        assert dom.dirty_log_kind == "bitmap"
        assert "kernel older than 6.7" in caplog.text
        with pytest.raises(DomainError, match="kernel older than 6.7"):
            open_sim_domain("old-kernel", 64, dirty_log="uffd")
    finally:
        dom.close()


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        WorkloadSpec(mix_zero=0.5, mix_text=0.5, mix_random=0.5)
    with pytest.raises(ValueError, match="seed"):
        WorkloadSpec(seed=-1)
    with pytest.raises(ValueError, match="run_length"):
        WorkloadSpec(run_length=0)
    with pytest.raises(ValueError, match="nondeterminism"):
        WorkloadSpec(nondeterminism=1.5)
    with pytest.raises(ValueError, match="dirty_log"):
        open_sim_domain("x", 16, dirty_log="soft-dirty")
    with pytest.raises(ValueError, match="page_count"):
        open_sim_domain("x", 0)
    with pytest.raises(ValueError, match="page_size"):
        open_sim_domain("x", 16, page_size=3000)


def test_simulated_io_is_reached_through_the_domain_interface_only(make_domain) -> None:
    """What only a simulated guest does (inputs, outputs, the input seq of a vCPU blob) is
    the SimulatedIO interface, reached by Domain.simulated_io(); the Domain interface every
    backend implements has none of it, and the Xen backend offers none (its clients are
    real)."""
    from pipeline.xen_io.base import Domain, SimulatedIO
    from pipeline.xen_io.xen import XenDomain
    dom = make_domain()
    assert dom.simulated_io() is dom and isinstance(dom, SimulatedIO)
    assert XenDomain.simulated_io is Domain.simulated_io
    for name in SimulatedIO.__abstractmethods__:
        assert not hasattr(Domain, name), name
    dom.feed_input(b"x" * 8)
    blob = dom.get_vcpu_state()
    assert dom.simulated_io().vcpu_input_seq(blob) == dom.input_seq()


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), npages=st.integers(0, 300),
       page_count=st.integers(1, 20000), run_length=st.sampled_from([1, 3, 8, 64]))
def test_the_small_plan_is_make_plan_exactly(key: bytes, npages: int, page_count: int,
                                             run_length: int) -> None:
    """The guest makes its per-input plan in plain Python (plan_lists); a peer on either path
    writes the same pages with the same contents, so it must be make_plan's, value for value."""
    npages = min(npages, page_count)
    cdf = WorkloadSpec().mix_cdf()
    want = tuple(a.tolist() for a in sim_module.make_plan(key, npages, page_count, run_length,
                                                          cdf, 1000))
    assert sim_module.plan_lists(key, npages, page_count, run_length, cdf.tolist(), 1000) == want
