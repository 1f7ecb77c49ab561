"""The sim service's reply cache: a request sent again is answered with the cached answer,
not executed again; the cache lives in guest memory, so a copy of the guest's RAM and vCPU
state (a checkpoint) carries it, and a duplicate produces the same output on two guests
with the same state (what the comparator needs)."""
from __future__ import annotations

import functools

import pytest

from pipeline.xen_io.sim import (ANSWER_SIZE, REPLY_CACHE_ENTRIES, SimDomain, WorkloadSpec,
                                 answer_refused, parse_answer, request_input)
from pipeline.xen_io.sim.domain import REPLY_CACHE_MIN_PAGES, REPLY_CACHE_PAGES

pytestmark = pytest.mark.timeout(60)

PAGES = 2048


@pytest.fixture
def make_domain(make_sim_domain):
    """These guests run (not paused) and log dirty pages in the bitmap, which every
    kernel has."""
    return functools.partial(make_sim_domain, pages=PAGES, dirty_log="bitmap", paused=False)


def answers(dom: SimDomain, payloads: list[bytes]) -> list[bytes]:
    """Feed ``payloads``; the frames they were answered with, in order."""
    start = dom.input_head
    for p in payloads:
        dom.feed_input(p)
    dom.wait_for_input_seq(start + len(payloads))
    out = [f for seq, f in dom.read_outputs(1.0) if seq >= 0]
    while len(out) < len(payloads):
        out += [f for seq, f in dom.read_outputs(1.0) if seq >= 0]
    return out


def test_a_request_sent_again_gets_the_same_answer_and_is_not_executed_again(make_domain):
    dom = make_domain("g")
    first = answers(dom, [request_input(7, n) for n in range(5)])
    assert [parse_answer(f) for f in first] == [(7, n) for n in range(5)]
    assert all(len(f) == ANSWER_SIZE and not answer_refused(f) for f in first)
    dom.pause()
    before = dom.memory_digest()
    dom.resume()
    again = answers(dom, [request_input(7, 3), request_input(7, 1)])
    assert again == [first[3], first[1]]     # the cached bytes, the original input seq
    dom.pause()
    assert dom.memory_digest() == before     # a replay writes nothing
    c = dom.counters()
    assert (c["requests_executed"], c["requests_replayed"], c["requests_refused"]) == (5, 2, 0)
    # the next execution is what it would have been without the duplicates but for the
    # input seq (the guest's running state did not move)
    dom.resume()
    nxt = answers(dom, [request_input(7, 5)])[0]
    assert parse_answer(nxt) == (7, 5) and int.from_bytes(nxt[:8], "little") == 7


def test_other_inputs_are_untouched_and_never_write_the_cache_pages(make_domain):
    dom = make_domain("g", workload=WorkloadSpec(fill=False, pages_per_input=64))
    first = answers(dom, [request_input(1, 0)])[0]       # sets the cache up
    outs = answers(dom, [b"plain input %d" % i for i in range(200)]
                   + [SimDomain.write_command(PAGES)])
    assert all(len(f) == ANSWER_SIZE - 16 and parse_answer(f) is None for f in outs)
    dom.pause()
    cache = dom.memory_view()[PAGES - REPLY_CACHE_PAGES:].reshape(-1)
    assert first in cache[:128].tobytes() and not cache[128:].any()   # one entry, in slot 0
    assert dom.counters()["clamped_write_commands"] == 1   # its pages are not the workload's


def test_a_guest_without_requests_writes_all_of_its_ram(make_domain):
    """No request, no cache: the workload is what it was (its page plans cover all RAM)."""
    dom = make_domain("g", workload=WorkloadSpec(fill=False, mix_zero=0.0, mix_text=0.5,
                                                 mix_random=0.5))
    answers(dom, [SimDomain.write_command(PAGES)])
    dom.pause()
    assert dom.memory_view().any(axis=1).all()
    assert dom.counters()["clamped_write_commands"] == 0


def test_a_copy_of_the_guest_has_the_cache_and_answers_as_the_original(make_domain):
    """A checkpoint copies RAM and the vCPU state. A copy taken before requests 4..7 (a
    rolled-back SVM) executes them again with the same answers, then answers the
    duplicates from its cache exactly as the original guest did (PVM and SVM agree)."""
    a = make_domain("a")
    b = make_domain("b", workload=WorkloadSpec(fill=False, seed=99), paused=True)
    reqs = [request_input(1, n, b"body %d" % n) for n in range(8)]
    dups = [reqs[6], reqs[2], reqs[7]]
    for p in reqs + dups:
        b.feed_input(p)                      # b's log mirrors what a is fed
    first = answers(a, reqs[:4])
    a.pause()
    ram, blob = a.memory_view().copy(), a.get_vcpu_state()
    a.resume()
    rest = answers(a, reqs[4:])
    on_a = answers(a, dups)
    assert on_a == [rest[2], first[2], rest[3]]
    b.memory_view()[:] = ram
    b.set_vcpu_state(blob)
    b.resume()
    b.wait_for_input_seq(len(reqs) + len(dups))
    on_b: list[bytes] = []
    while len(on_b) < len(rest) + len(dups):
        on_b += [f for seq, f in b.read_outputs(1.0) if seq >= 0]
    assert on_b == rest + on_a
    a.pause()
    b.pause()
    assert a.memory_digest() == b.memory_digest()


def test_a_request_older_than_the_cache_is_refused_not_executed(make_domain):
    dom = make_domain("g")
    n = REPLY_CACHE_ENTRIES
    first = answers(dom, [request_input(3, 0), request_input(3, n)])   # the same slot
    old = answers(dom, [request_input(3, 0)])[0]
    assert parse_answer(old) == (3, 0) and answer_refused(old) and old != first[0]
    assert not answer_refused(first[0])
    # another client's request in that slot is no reason to refuse: executed
    other = answers(dom, [request_input(4, 0)])[0]
    assert parse_answer(other) == (4, 0) and not answer_refused(other)
    c = dom.counters()
    assert (c["requests_executed"], c["requests_refused"]) == (3, 1)


def test_a_guest_too_small_for_a_cache_executes_every_request(make_domain):
    dom = make_domain("g", pages=REPLY_CACHE_MIN_PAGES - 1)
    one, two = answers(dom, [request_input(1, 0), request_input(1, 0)])
    assert parse_answer(one) == parse_answer(two) == (1, 0) and one != two
    assert dom.counters()["requests_executed"] == 2
