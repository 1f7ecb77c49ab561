"""A node's counters as a Prometheus text endpoint (through ``prometheus-client``).

:func:`serve_metrics` starts an HTTP server thread; every scrape reads the node's
shared-memory counters (:class:`~pipeline.counters.NodeCounters`) afresh, so the
endpoint shows the same figures as ``colo-pipeline stats``. :func:`render` gives
the same text once, without a server.

What is exposed (every sample carries ``node``):

* ``colo_node_up`` 1 while the node's counters segment is there and its owner runs;
  when it is not, that is the only sample (besides ``colo_role`` being absent).
* ``colo_role{role}`` 1 for the node's current role (``primary``, ``secondary``,
  ``active``, ``unprotected``), 0 for the others; ``colo_node_info{state,dirty_log}``,
  ``colo_epoch``, ``colo_guest_pages``, ``colo_cpu_latency_held`` (1 while the node
  holds its CPU wake-up latency limit, ``node.cpu_latency_us``: 0 once its process has
  the device open no more), ``colo_cpu_latency_in_force_us`` (the machine's value at the
  scrape, every process's request counted; absent where the device cannot be read).
* The role history (pipeline/failover/roles.py): ``colo_generation`` (the generation
  of the active role this node holds or last saw), ``colo_role_changes_total``,
  ``colo_failovers_total`` (takeovers by this node), ``colo_reprotected_seconds`` (the
  last takeover to protected again) and ``colo_role_change_timestamp_seconds{role,cause}``
  (when the last change happened, and why).
* Per stage (``stage`` label, e.g. ``digest.0``): ``colo_stage_items_in_total``,
  ``..._items_out_total``, ``..._bytes_in_total``, ``..._bytes_out_total``,
  ``colo_stage_busy_seconds_total``, ``colo_stage_wait_seconds_total``,
  ``colo_stage_ring_high_water`` (slots), ``colo_stage_errors_total``, and the
  stage's extra counters under their own names (``colo_stage_pages_zero_total``,
  ``colo_stage_epochs_committed_total``...). A counter named ``*_ns`` is exposed in
  seconds (``*_seconds``).
* Checkpoints, over every record this endpoint has seen in the node's checkpoint
  log (it keeps running totals, so they only grow even after the log wraps):
  ``colo_checkpoints_total{cause,status}``, histograms
  ``colo_checkpoint_pvm_pause_seconds`` and ``colo_checkpoint_commit_seconds``
  (records with a non-zero time), ``colo_checkpoint_pages_total{kind}`` with kind
  ``dirty``, ``svm_dirty``, ``sent``, ``skipped_hash``, ``zero``, and
  ``colo_checkpoint_bytes_total{kind}`` with kind ``wire`` and ``raw``.
  ``colo_checkpoints_recorded_total`` is the node's own count of records written.
* Over the checkpoints still in the log (the last 4096), like ``stats``:
  ``colo_checkpoint_pvm_pause_recent_seconds{quantile}`` and
  ``colo_checkpoint_commit_recent_seconds{quantile}`` for 0.5 and 0.99, committed
  checkpoints only.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest, start_http_server

from pipeline import cpu_latency
from pipeline.checkpoint_api import CAUSES
from pipeline.counters import (
    STATUS_ABORTED,
    STATUS_COMMITTED,
    NodeCounters,
    NodeNotRunning,
    percentile,
    _pid_alive,
)

_log = logging.getLogger(__name__)

ROLES = ("primary", "secondary", "active", "unprotected")
STATUS_NAMES = {STATUS_COMMITTED: "committed", STATUS_ABORTED: "aborted"}

#: histogram buckets, seconds: the PVM pause is milliseconds, a commit up to the timeout
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
COMMIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
                  30.0)
QUANTILES = (0.5, 0.99)

_PAGE_KINDS = (("dirty", "pages_dirty"), ("svm_dirty", "pages_svm_dirty"),
               ("sent", "pages_sent"), ("skipped_hash", "pages_skipped_hash"),
               ("zero", "pages_zero"))
_BYTE_KINDS = (("wire", "bytes_wire"), ("raw", "bytes_raw"))
_STAGE_DOCS = {
    "items_in": "Items (batches, records, inputs) the stage took in.",
    "items_out": "Items the stage passed on.",
    "bytes_in": "Bytes the stage took in.",
    "bytes_out": "Bytes the stage passed on.",
    "busy": "Time the stage spent working.",
    "wait": "Time the stage spent waiting for input or for room downstream.",
    "ring_high_water": "Most slots ever occupied in the stage's input ring(s).",
    "errors": "Errors the stage counted (bad records, failed checks).",
    "checkpoint_batches": "Batches of a checkpoint's pages the snapshot stage dealt to the "
                          "digest workers (per checkpoint: over checkpoints_dealt).",
    "checkpoints_dealt": "Checkpoints whose pages the snapshot stage dealt.",
}


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9100"`` for IPv6; port 0 picks a free one) -> (host, port)."""
    if not isinstance(listen, str) or ":" not in listen:
        raise ValueError(f"metrics listen address {listen!r} is not HOST:PORT")
    host, _, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"metrics listen address {listen!r}: {host!r} is not an IPv6 "
                             "address") from None
    if not host:
        raise ValueError(f"metrics listen address {listen!r} has no host (use 0.0.0.0 for "
                         "every interface)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"metrics listen address {listen!r}: port {port_text!r} is not a "
                         "number from 0 to 65535")
    return host, int(port_text)


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            running += n
            out.append((bound, running))
        return out


class _CheckpointTotals:
    """Running totals over the checkpoint records of one node's log, each counted once."""

    def __init__(self) -> None:
        self.seen = 0                         # records numbered below this were taken in
        self.by_cause_status: dict[tuple[str, str], int] = {}
        self.pages = {kind: 0 for kind, _ in _PAGE_KINDS}
        self.bytes = {kind: 0 for kind, _ in _BYTE_KINDS}
        self.pause = _Histogram(PAUSE_BUCKETS)
        self.commit = _Histogram(COMMIT_BUCKETS)
        self.missed = 0                       # overwritten before a scrape could read them

    def take_in(self, node: NodeCounters) -> tuple[list[dict[str, Any]], int]:
        """Add the records appended since the last call; returns the whole log and the
        number of records written when it was read."""
        for _ in range(20):
            before = node.checkpoints_recorded
            log = node.checkpoints()
            if node.checkpoints_recorded == before:
                break
        else:   # records kept coming while we read: take them in at the next scrape
            return log, self.seen
        first_in_log = max(0, before - node.history)
        new = min(len(log), before - max(self.seen, first_in_log))
        if self.seen < first_in_log:
            self.missed += first_in_log - self.seen
        for record in log[len(log) - new:] if new > 0 else ():
            self._add(record)
        self.seen = max(self.seen, before)
        return log, before

    def _add(self, record: dict[str, Any]) -> None:
        cause = record.get("cause_name") or str(record.get("cause"))
        status = STATUS_NAMES.get(record.get("status"), str(record.get("status")))
        self.by_cause_status[cause, status] = self.by_cause_status.get((cause, status), 0) + 1
        for kind, field in _PAGE_KINDS:
            self.pages[kind] += record.get(field, 0)
        for kind, field in _BYTE_KINDS:
            self.bytes[kind] += record.get(field, 0)
        if record.get("pvm_pause_ns"):
            self.pause.observe(record["pvm_pause_ns"] / 1e9)
        if record.get("commit_ns"):
            self.commit.observe(record["commit_ns"] / 1e9)


def _role_history_families(n: str, info: dict) -> list[Metric]:
    """The role history of the node info as samples (see the module doc)."""
    out: list[Metric] = []
    for key, name, doc, cls in (
            ("generation", "colo_generation", "The generation of the active role this node "
             "holds or last saw.", GaugeMetricFamily),
            ("role_changes", "colo_role_changes", "Role changes of this node.",
             CounterMetricFamily),
            ("failovers", "colo_failovers", "Takeovers by this node.", CounterMetricFamily),
            ("reprotected_ms", "colo_reprotected_seconds", "From the last takeover until a "
             "new secondary protected the guest again.", GaugeMetricFamily)):
        value = info.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fam = cls(name, doc, labels=["node"])
            fam.add_metric([n], value / 1000 if key.endswith("_ms") else value)
            out.append(fam)
    history = info.get("role_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        last = history[-1]
        fam = GaugeMetricFamily("colo_role_change_timestamp_seconds", "When the node's last "
                                "role change happened (Unix time), with the role and cause.",
                                labels=["node", "role", "cause"])
        fam.add_metric([n, str(last.get("role", "")), str(last.get("cause", ""))[:200]],
                       float(last.get("at", 0)))
        out.append(fam)
    return out


def _node_info(node: NodeCounters, budget_s: float = 1.0) -> dict[str, Any]:
    """``node.node_info()``, retried while the writer is in the middle of an update (a
    writer descheduled mid-write on a busy host outlasts node_info's own spinning)."""
    deadline = time.monotonic() + budget_s
    while True:
        try:
            return node.node_info()
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


class NodeCollector:
    """A prometheus-client collector reading one node's counters on every scrape.

    Attaches to the node by name (read-only) on the first scrape and again whenever
    the node it holds has gone (a restarted node makes a new segment). ``counters``
    may be given instead by the process that owns them; they are then never closed
    here.
    """

    def __init__(self, node_name: str, counters: NodeCounters | None = None) -> None:
        self.node_name = node_name
        self._node = counters
        self._own = counters is None
        self._lock = threading.Lock()
        self._totals = _CheckpointTotals()

    # -- attachment ---------------------------------------------------------------
    def _attached(self) -> NodeCounters | None:
        node = self._node
        if node is not None and self._own and not _pid_alive(node.owner_pid):
            node.close()
            self._node = node = None
        if node is None and self._own:
            try:
                node = self._node = NodeCounters.attach(self.node_name)
            except NodeNotRunning:
                return None
            self._totals = _CheckpointTotals()    # a new run: its counters start at 0
        return node

    def close(self) -> None:
        with self._lock:
            if self._node is not None and self._own:
                self._node.close()
            self._node = None

    # -- scraping ---------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        return []       # no fixed description: families depend on the node's stages

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            node = self._attached()
            up = GaugeMetricFamily("colo_node_up", "1 if the node runs and its counters "
                                   "can be read.", labels=["node"])
            up.add_metric([self.node_name], 1 if node is not None else 0)
            if node is None:
                return iter([up])
            try:
                families = [up]
                families += self._node_families(node)
                families += self._stage_families(node)
                families += self._checkpoint_families(node)
            except Exception:   # counters closed under us, a record we cannot read...
                _log.warning("metrics of node %s: cannot read the counters", self.node_name,
                            exc_info=True)
                up.samples.clear()
                up.add_metric([self.node_name], 0)
                return iter([up])
            return iter(families)

    def _node_families(self, node: NodeCounters) -> list[Metric]:
        n = self.node_name
        info = _node_info(node)
        role = str(info.get("role", ""))
        roles = GaugeMetricFamily("colo_role", "1 for the node's current role.",
                                  labels=["node", "role"])
        for r in ROLES + ((role,) if role and role not in ROLES else ()):
            roles.add_metric([n, r], 1 if r == role else 0)
        about = GaugeMetricFamily("colo_node_info", "Always 1; the labels say what the node "
                                  "is doing.", labels=["node", "role", "state", "dirty_log"])
        about.add_metric([n, role, str(info.get("state", "")), str(info.get("dirty_log", ""))],
                         1)
        out = [roles, about]
        if isinstance(info.get("epoch"), int):
            g = GaugeMetricFamily("colo_epoch", "The epoch the node is at (-1 before the "
                                  "first).", labels=["node"])
            g.add_metric([n], info["epoch"])
            out.append(g)
        if isinstance(info.get("page_count"), int):
            g = GaugeMetricFamily("colo_guest_pages", "Guest RAM in pages of 4 KiB.",
                                  labels=["node"])
            g.add_metric([n], info["page_count"])
            out.append(g)
        wake = info.get("cpu_latency")
        if isinstance(wake, dict):
            device = wake.get("device", cpu_latency.DEVICE)
            g = GaugeMetricFamily("colo_cpu_latency_held", "1 while the node holds its CPU "
                                  "wake-up latency limit (node.cpu_latency_us), else 0.",
                                  labels=["node"])
            lost = wake.get("held") and isinstance(info.get("pid"), int) and \
                cpu_latency.holds(info["pid"], device) is False
            g.add_metric([n], 1 if wake.get("held") and not lost else 0)
            out.append(g)
            try:
                now = cpu_latency.in_force_us(device)
            except OSError:
                pass            # (not root: the device is root's)
            else:
                g = GaugeMetricFamily("colo_cpu_latency_in_force_us", "The CPU wake-up "
                                      "latency limit in force on the machine now (the "
                                      "lowest of every process's request; 2000000000: "
                                      "nobody holds one).", labels=["node"])
                g.add_metric([n], now)
                out.append(g)
        out += _role_history_families(n, info)
        rejected = CounterMetricFamily("colo_counter_rejected_writes", "Checkpoint records "
                                       "or node info refused as bad input.", labels=["node"])
        rejected.add_metric([n], node.rejected_writes)
        out.append(rejected)
        return out

    def _stage_families(self, node: NodeCounters) -> list[Metric]:
        families: dict[str, Metric] = {}
        for stage in node.stage_names:
            for counter, value in node.stage(stage).as_dict().items():
                base, scale = counter, 1.0
                if counter.endswith("_ns"):
                    base, scale = counter[:-3] + "_seconds", 1e-9
                gauge = "high_water" in counter or counter.endswith("_seq")
                name = "colo_stage_" + "".join(c if c.isalnum() or c == "_" else "_"
                                               for c in base)
                fam = families.get(name)
                if fam is None:
                    doc = _STAGE_DOCS.get(counter.removesuffix("_ns"),
                                          f"The stage's {counter!r} counter.")
                    cls = GaugeMetricFamily if gauge else CounterMetricFamily
                    fam = families[name] = cls(name, doc, labels=["node", "stage"])
                fam.add_metric([self.node_name, stage], value * scale if scale != 1.0
                               else value)
        return list(families.values())

    def _checkpoint_families(self, node: NodeCounters) -> list[Metric]:
        n = self.node_name
        t = self._totals
        log, written = t.take_in(node)
        out: list[Metric] = []
        recorded = CounterMetricFamily("colo_checkpoints_recorded", "Checkpoint records the "
                                       "node wrote (committed or aborted).", labels=["node"])
        recorded.add_metric([n], written)
        out.append(recorded)
        by = CounterMetricFamily("colo_checkpoints", "Checkpoints by cause and outcome.",
                                 labels=["node", "cause", "status"])
        for cause in CAUSES:
            for status in STATUS_NAMES.values():
                by.add_metric([n, cause, status], t.by_cause_status.get((cause, status), 0))
        for (cause, status), count in sorted(t.by_cause_status.items()):
            if cause not in CAUSES or status not in STATUS_NAMES.values():
                by.add_metric([n, cause, status], count)
        out.append(by)
        missed = CounterMetricFamily("colo_checkpoints_unread", "Records overwritten in the "
                                     "node's log before this endpoint read them (scrape more "
                                     "often if this grows).", labels=["node"])
        missed.add_metric([n], t.missed)
        out.append(missed)
        for name, doc, hist in (
                ("colo_checkpoint_pvm_pause_seconds", "How long the PVM was paused for the "
                 "snapshot.", t.pause),
                ("colo_checkpoint_commit_seconds", "From the snapshot to the secondary's "
                 "acknowledgement.", t.commit)):
            h = HistogramMetricFamily(name, doc, labels=["node"])
            h.add_metric([n], hist.buckets(), hist.sum)
            out.append(h)
        pages = CounterMetricFamily("colo_checkpoint_pages", "Pages per kind, summed over "
                                    "checkpoints: dirty on the PVM, dirty on the SVM, sent, "
                                    "skipped because the secondary had the same hash, zero.",
                                    labels=["node", "kind"])
        for kind, _ in _PAGE_KINDS:
            pages.add_metric([n, kind], t.pages[kind])
        out.append(pages)
        sent = CounterMetricFamily("colo_checkpoint_bytes", "Bytes of checkpoint pages: on "
                                   "the wire (compressed) and raw (4 KiB a page sent).",
                                   labels=["node", "kind"])
        for kind, _ in _BYTE_KINDS:
            sent.add_metric([n, kind], t.bytes[kind])
        out.append(sent)
        committed = [r for r in log if r.get("status") == STATUS_COMMITTED]
        for name, field, doc in (
                ("colo_checkpoint_pvm_pause_recent_seconds", "pvm_pause_ns",
                 "PVM pause over the committed checkpoints still in the log."),
                ("colo_checkpoint_commit_recent_seconds", "commit_ns",
                 "Commit time over the committed checkpoints still in the log.")):
            values = [r[field] / 1e9 for r in committed if r.get(field)]
            g = GaugeMetricFamily(name, doc, labels=["node", "quantile"])
            for q in QUANTILES:
                g.add_metric([n, repr(q)], percentile(values, q))
            out.append(g)
        return out


class MetricsServer:
    """A running endpoint: ``url``, ``host``, ``port``; ``close()`` stops it."""

    def __init__(self, node_name: str, host: str, port: int,
                 counters: NodeCounters | None = None) -> None:
        self.node_name = node_name
        self.collector = NodeCollector(node_name, counters)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        try:
            self._httpd, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics endpoint of node {node_name!r}: cannot listen "
                          f"on {host}:{port}: {exc.strerror}") from None
        self._thread.name = f"colo-{node_name}-metrics"
        self.host = host
        self.port = self._httpd.server_port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, free the port and detach from the counters. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            self._thread.join(5.0)
        self.collector.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(node_name: str, listen: str,
                  counters: NodeCounters | None = None) -> MetricsServer:
    """Serve the node's counters at ``http://HOST:PORT/metrics`` from a daemon thread.

    ``listen`` is ``"HOST:PORT"`` (port 0: any free port, see ``.port``). The node
    need not be up yet: until it is, a scrape shows ``colo_node_up 0``. The process
    that owns the counters may pass them as ``counters``. Start it after forking
    the stage processes (a fork would copy the listening socket into each).
    """
    host, port = parse_listen(listen)
    return MetricsServer(node_name, host, port, counters)


def render(node_name: str, counters: NodeCounters | None = None) -> bytes:
    """The node's metrics once, in the Prometheus text format (0.0.4)."""
    collector = NodeCollector(node_name, counters)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        return generate_latest(registry)
    finally:
        collector.close()
