"""A node's comparator has its native pair rounds (numba) from its first round: the
supervisor loads them before it forks the comparator, at a primary's start and, for a
role-auto secondary, at its start for the comparator a takeover forks. Loaded beside the
comparator's first rounds instead, the loading thread held its GIL for tens of ms at a
time (docs/tuning.md, Session 18 (native)).

Each test stops the comparator at its first loop turn (COLO_FAULT ``stop`` at
``stage.net_compare.loop``, before it reads any frame) and reads its counters there: the
stage copies them to the node's counter block once before that turn."""
from __future__ import annotations

import pytest

from pipeline.localpair import HostPair, LocalPair, continue_stopped, wait_until
from pipeline.net.loop import native_rounds

from test_failover import TABLES

pytestmark = pytest.mark.skipif(native_rounds() is None, reason="numba is not installed")

POINT = "stage.net_compare.loop"
NET = {"primary_in": "unix:{workdir}/net-pvm.sock", "outdev": "unix:{workdir}/client.sock"}


def loaded_at_first_turn(pair: LocalPair, host: str) -> int:
    """The comparator of ``host`` stopped at its first turn: its native_rounds_loaded
    there; then it runs on."""
    pair.wait_fault_fired(host, POINT, 1, what=f"{host}'s comparator at its first turn")
    loaded = pair.stage_counter("net_compare", "native_rounds_loaded", host)
    continue_stopped(pair.node(host).node_info()["stage_pids"]["net_compare"])
    return loaded


@pytest.mark.timeout(300)
def test_a_primarys_comparator_has_its_native_rounds_at_its_first_turn(tmp_path):
    tables = dict(TABLES, net=dict(NET, secondary_in="unix:{workdir}/net-svm.sock"))
    with LocalPair(tables, workdir=str(tmp_path), log_level="info") as pair:
        pair.start(("primary",), faults={"primary": f"{POINT}:1:stop"})
        assert loaded_at_first_turn(pair, "primary") == 1
        assert "native rounds loaded for its start" in pair.log_tail("primary", 1 << 20)


@pytest.mark.timeout(600)
def test_a_survivors_comparator_has_its_native_rounds_at_its_first_turn(tmp_path):
    """Role auto: ``b``, the secondary, takes over; the comparator the takeover forks
    (Supervisor.become_primary, the guest serving on) has the rounds its supervisor
    loaded at the secondary's start."""
    with HostPair(dict(TABLES, net=NET), workdir=str(tmp_path), log_level="info") as pair:
        pair.start_node("a")
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        pair.start_node("b", f"{POINT}:1:stop")
        pair.wait_protected(timeout=240)
        assert pair.roles() == {"a": "primary", "b": "secondary"}
        # (loaded after the secondary's stages are forked: it may be protected before)
        wait_until(lambda: "native rounds loaded for a takeover" in pair.log_tail("b", 1 << 20),
                   120, "b's supervisor loading the rounds")
        pair.kill("a")
        pair.wait_info("role", "primary", role="b", timeout=240)
        assert loaded_at_first_turn(pair, "b") == 1
