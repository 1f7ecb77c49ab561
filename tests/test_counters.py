"""Node counters in shared memory: written by forked stages, read live by other processes."""
from __future__ import annotations

import json
import os
import multiprocessing as mp
import subprocess
import sys
import time

import pytest

from pipeline.checkpoint_api import CAUSES
from pipeline.counters import (
    CHECKPOINT_FIELDS,
    STAGE_COUNTERS,
    NodeCounters,
    NodeNotRunning,
    counters_segment_name,
)
from pipeline.shm import list_segments, segment_prefix

FORK = mp.get_context("fork")

# Run in a separate interpreter: attach by node name, take snapshots until the live stage
# counted more (the deadline only bounds a hang).
READER = """
import json, sys, time
from pipeline.counters import NodeCounters
c = NodeCounters.attach(sys.argv[1])
first = c.snapshot()
deadline = time.monotonic() + 60
while True:
    second = c.snapshot()
    if sys.argv[2:] != ["live"]:
        break
    if second["stages"]["digest.0"]["items_in"] > first["stages"]["digest.0"]["items_in"] \
            or time.monotonic() > deadline:
        break
    time.sleep(0.01)
try:
    c.stage("digest.0").add("items_in")
    wrote = "write allowed"
except ValueError as e:
    wrote = str(e)
c.close()
print(json.dumps({"first": first, "second": second, "write": wrote}))
"""


@pytest.fixture
def counters(node):
    c = NodeCounters.create(node, {"snapshot": STAGE_COUNTERS,
                                   "digest.0": STAGE_COUNTERS + ("pages_zero",)}, history=5)
    yield c
    c.unlink()
    c.close()


def _read_from_another_process(node: str, live: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", READER, node] + (["live"] if live else []),
                         capture_output=True, text=True,
                         check=False,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def _busy_stage(counters: NodeCounters, stop) -> None:
    """A stage process: counts items until told to stop."""
    stage = counters.stage("digest.0")
    items = stage.index("items_in")
    counters.set_node_info({"role": "primary", "epoch": 3})
    counters.record_checkpoint(epoch=3, cause="net_divergence", pages_sent=17, status=1)
    stage.add("pages_zero", 5)
    stage.max("ring_high_water", 9)
    stage.max("ring_high_water", 4)
    while not stop.is_set():
        with stage.busy():
            stage.values[items] += 1
        time.sleep(0.001)


def test_counters_written_by_a_forked_stage_are_read_live_by_another_process(counters, node):
    stop = FORK.Event()
    child = FORK.Process(target=_busy_stage, args=(counters, stop), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + 10
        while counters.stage("digest.0").as_dict()["items_in"] < 10:
            assert time.monotonic() < deadline, "stage process did not count"
            time.sleep(0.01)
        seen = _read_from_another_process(node, live=True)
    finally:
        stop.set()
        child.join(10)
    first, second = seen["first"], seen["second"]
    digest = first["stages"]["digest.0"]
    assert digest["pages_zero"] == 5 and digest["ring_high_water"] == 9
    assert digest["busy_ns"] > 0
    assert second["stages"]["digest.0"]["items_in"] > digest["items_in"] >= 10  # live
    assert first["stages"]["snapshot"] == dict.fromkeys(STAGE_COUNTERS, 0)
    assert first["info"] == {"role": "primary", "epoch": 3}
    assert first["owner_alive"] is True
    [record] = first["checkpoints"]
    assert (record["epoch"], record["cause_name"], record["pages_sent"], record["status"]) == \
        (3, "net_divergence", 17, 1)
    assert record["cause"] == CAUSES.index("net_divergence")
    assert "read-only" in seen["write"]


def test_an_attaching_process_that_exits_does_not_unlink(counters, node):
    _read_from_another_process(node)
    _read_from_another_process(node)
    assert list_segments(counters_segment_name(node)) == [counters_segment_name(node)]
    counters.stage("snapshot").add("items_in")  # the owner's mapping still works
    assert counters.stage("snapshot").as_dict()["items_in"] == 1


def test_attach_to_a_node_that_is_not_running_names_it(node):
    with pytest.raises(NodeNotRunning, match=f"node '{node}' is not running.*no counters"):
        NodeCounters.attach(node)


def test_attach_to_a_crashed_nodes_leftover_is_refused_unless_asked(node):
    def crashed_owner() -> None:
        c = NodeCounters.create(node, {"s": STAGE_COUNTERS})
        c.stage("s").add("errors", 2)  # ...and the process ends without unlink
    child = FORK.Process(target=crashed_owner)
    child.start()
    child.join(10)
    with pytest.raises(NodeNotRunning, match=f"left by pid {child.pid}, which is gone"):
        NodeCounters.attach(node)
    stale = NodeCounters.attach(node, allow_stale=True)
    snap = stale.snapshot()
    stale.close()
    assert snap["owner_alive"] is False and snap["stages"]["s"]["errors"] == 2


def test_checkpoint_log_wraps_around_keeping_the_newest(counters):
    for epoch in range(12):
        counters.record_checkpoint(epoch=epoch, cause=epoch % len(CAUSES), bytes_wire=epoch * 10)
    assert counters.checkpoints_recorded == 12
    assert [r["epoch"] for r in counters.checkpoints()] == [7, 8, 9, 10, 11]
    assert [r["bytes_wire"] for r in counters.checkpoints(last=2)] == [100, 110]
    assert counters.checkpoints(last=0) == []
    assert set(counters.checkpoints()[0]) == set(CHECKPOINT_FIELDS) | {"cause_name"}


def test_a_record_being_written_is_never_returned(counters):
    for epoch in range(3):
        counters.record_checkpoint(epoch=epoch)
    # freeze the log as a writer stopped half-way through record 1 would leave it
    counters._records[1, 0] = 2 * (1 + counters.history) + 1
    assert [r["epoch"] for r in counters.checkpoints()] == [0, 2]


def _write_records(counters: NodeCounters, stop) -> None:
    j = 0
    while not stop.is_set():
        counters.record_checkpoint(**dict.fromkeys(CHECKPOINT_FIELDS, j))
        j += 1


def test_seqlock_never_yields_torn_records_under_concurrent_writing(node):
    # history=2: the writer overwrites the records the reader copies all the time.
    # Without the sequence check this reader sees ~200 torn records per second here.
    counters = NodeCounters.create(node, {"s": STAGE_COUNTERS}, history=2)
    stop = FORK.Event()
    writer = FORK.Process(target=_write_records, args=(counters, stop), daemon=True)
    writer.start()
    reads = 0
    try:
        deadline = time.monotonic() + 120   # bounds a hang only
        # enough work on both sides, however busy the machine is
        while counters.checkpoints_recorded <= 1000 or reads <= 1000:
            assert time.monotonic() < deadline, (counters.checkpoints_recorded, reads)
            records = counters.checkpoints()
            reads += 1
            for r in records:
                values = {r[f] for f in CHECKPOINT_FIELDS}
                assert len(values) == 1, f"torn record {r}"
            epochs = [r["epoch"] for r in records]
            assert epochs == sorted(epochs)
    finally:
        stop.set()
        writer.join(10)
    assert not writer.is_alive()
    assert counters.checkpoints_recorded > 1000 and reads > 1000
    # Once nobody writes, both kept records come back whole: a reader that left out every
    # record would pass the loop above. (Whether a read *during* the writing returns any
    # record is up to the scheduler: on a loaded machine the writer can overwrite every
    # row during every copy, so that was not asserted.)
    count = counters.checkpoints_recorded
    assert [r["epoch"] for r in counters.checkpoints()] == [count - 2, count - 1]
    counters.unlink()
    counters.close()


def test_bad_checkpoint_fields_raise_and_write_nothing(counters):
    for bad, message in (({"epochs": 1}, "unknown field 'epochs'"),
                         ({"cause": "cosmic_ray"}, "unknown cause 'cosmic_ray'"),
                         ({"pages_sent": -1}, "pages_sent=-1"),
                         ({"bytes_wire": 1 << 64}, "bytes_wire="),
                         ({"epoch": 1.5}, "epoch=1.5")):
        with pytest.raises(ValueError, match=message):
            counters.record_checkpoint(**bad)
    assert counters.checkpoints_recorded == 0 and counters.checkpoints() == []
    assert counters.rejected_writes == 5
    assert counters.snapshot()["rejected_writes"] == 5


def test_stage_counter_operations(counters):
    stage = counters.stage("digest.0")
    stage.add("items_in")
    stage.add("bytes_in", 4096)
    stage.set("errors", 7)
    stage.max("ring_high_water", 3)
    stage.max("ring_high_water", 2)
    with stage.wait():
        time.sleep(0.02)
    got = stage.as_dict()
    assert (got["items_in"], got["bytes_in"], got["errors"], got["ring_high_water"]) == \
        (1, 4096, 7, 3)
    assert got["wait_ns"] >= 20_000_000 and got["busy_ns"] == 0
    assert stage.values[stage.index("bytes_in")] == 4096
    with pytest.raises(KeyError, match="stage 'digest.0' has no counter 'item_in'"):
        stage.add("item_in")
    with pytest.raises(KeyError, match="no stage 'digest.9'"):
        counters.stage("digest.9")


def test_node_info_is_bounded(counters):
    counters.set_node_info({"role": "secondary", "config": "/etc/colo.toml"})
    with pytest.raises(ValueError, match="more than the 4080 allowed"):
        counters.set_node_info({"blob": "x" * 5000})
    with pytest.raises(ValueError, match="not JSON-able"):
        counters.set_node_info({"when": object()})
    assert counters.rejected_writes == 2
    assert counters.node_info() == {"role": "secondary", "config": "/etc/colo.toml"}


def test_bad_stage_definitions_are_rejected(node):
    with pytest.raises(ValueError, match="stage 'a'.*unique"):
        NodeCounters.create(node, {"a": ("items_in", "items_in")})
    with pytest.raises(ValueError, match="history=0"):
        NodeCounters.create(node, {"a": STAGE_COUNTERS}, history=0)
    assert list_segments(segment_prefix(node)) == []


def test_prometheus_text_parses_and_carries_the_values(counters):
    """The counters through the one Prometheus renderer (pipeline.metrics.render)."""
    parser = pytest.importorskip("prometheus_client.parser",
                                 reason="prometheus-client checks our exposition format")
    from pipeline.metrics import render
    counters.stage("digest.0").add("bytes_out", 123)
    counters.stage("digest.0").max("ring_high_water", 6)
    counters.record_checkpoint(epoch=9, cause="timer", pvm_pause_ns=1500)
    text = render(counters.node, counters).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in parser.text_string_to_metric_families(text)
               for s in family.samples}
    node, digest = ("node", counters.node), ("stage", "digest.0")
    assert samples[("colo_stage_bytes_out_total", (node, digest))] == 123
    assert samples[("colo_stage_ring_high_water", (node, digest))] == 6
    assert samples[("colo_stage_items_in_total", (node, ("stage", "snapshot")))] == 0
    assert samples[("colo_checkpoints_recorded_total", (node,))] == 1
    assert samples[("colo_checkpoint_pvm_pause_seconds_sum", (node,))] == 1500e-9
    assert samples[("colo_node_up", (node,))] == 1


def test_attach_to_a_node_still_creating_its_counters_says_not_running():
    """Between creating and sizing its segment a starting node must read as 'not running
    yet' (a caller retries), not as a broken segment."""
    from pipeline.counters import NodeCounters, NodeNotRunning, counters_segment_name
    name = f"starting{os.getpid()}"
    path = f"/dev/shm/{counters_segment_name(name)}"
    open(path, "wb").close()                  # exists, size 0: what a creator has at first
    try:
        with pytest.raises(NodeNotRunning, match="starting up"):
            NodeCounters.attach(name)
    finally:
        os.unlink(path)
