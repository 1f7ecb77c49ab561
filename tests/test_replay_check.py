"""The replay check of the failover tests is exact when a pause catches the guest inside
an input: the sim guest looks at the pause request before each page write, so a paused
guest may have written some of its current input's pages (its vCPU blob says how many),
and its memory is then the replay of the inputs before plus those pages, not the replay
of either whole neighbour. sim_replay_digest(seq, step=k) reproduces exactly that state.

The mid-input state is made with the sim's breakpoint (SimDomain.break_at): the guest
stops itself before page k of input seq through the same path a pause request there
takes, so no test waits for a random moment to land inside an input."""
from __future__ import annotations

import pytest

from test_failover import PAGES, SEED, replay_digest

from pipeline.stages.inputs import client_input
from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain

SEQ, STEP = 20, 3


@pytest.fixture
def guest():
    dom = open_sim_domain("midinput", PAGES, WorkloadSpec(seed=SEED, pages_per_input=8),
                          dirty_log="bitmap")
    try:
        yield dom
    finally:
        dom.close()


def test_a_pause_inside_an_input_is_replayed_exactly(guest):
    guest.start()
    guest.break_at(SEQ, STEP)
    guest.resume()
    for i in range(SEQ + 2):
        guest.feed_input(client_input(SEED, i))
    guest.wait_break()
    assert guest.is_paused
    blob = guest.get_vcpu_state()
    assert (guest.vcpu_input_seq(blob), guest.vcpu_input_step(blob)) == (SEQ, STEP)
    digest = guest.memory_digest()
    # the old check (replay of the inputs before) fails here, and so does the next one
    assert digest != replay_digest(SEQ)
    assert digest != replay_digest(SEQ + 1)
    # the reference stopped at the same page of the same input equals it
    assert digest == replay_digest(SEQ, STEP)
    # and the guest resumed from there goes on to the whole inputs' replay
    guest.resume()
    guest.wait_for_input_seq(SEQ + 2, timeout=60)
    guest.pause()
    blob = guest.get_vcpu_state()
    assert (guest.vcpu_input_seq(blob), guest.vcpu_input_step(blob)) == (SEQ + 2, 0)
    assert guest.memory_digest() == replay_digest(SEQ + 2)


def test_all_pages_written_is_the_next_inputs_replay():
    """step == pages_per_input (output still pending): the memory holds all of the input."""
    assert replay_digest(SEQ, 8) == replay_digest(SEQ + 1)


def test_a_breakpoint_out_of_range_is_refused(guest):
    guest.start()
    with pytest.raises(ValueError, match="out of range"):
        guest.break_at(SEQ, 0)
    with pytest.raises(ValueError, match="out of range"):
        guest.break_at(-1, 1)
