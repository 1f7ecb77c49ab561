"""Per-stage counters and per-checkpoint records in shared memory, readable live.

One segment per node, ``colo-<node>-counters``, created by the supervisor before
it forks the stages. Each stage writes only its own block (single writer per
block); ``colo-pipeline stats`` attaches read-only from another process and
reads while everything runs.

Segment layout (little-endian)::

    0   magic "COLOCNTR" (written last: a reader never sees a half-built header)
    8   version u32        12  schema_len u32
    16  owner pid u64      24  data_start u64 (offsets in the schema are relative to it)
    32  schema: JSON {"version", "node", "stages": {name: {"offset", "counters"}},
                      "info": {"offset", "size"},
                      "checkpoints": {"count_offset", "offset", "history", "fields"},
                      "rejected_offset"}
    data_start + ...   the regions named by the schema, each 64-byte aligned

The schema makes the segment self-describing, so a reader of another version
reads the stages, counters and checkpoint fields that are actually there.

Consistency: a single aligned uint64 cannot be read torn on x86-64, so stage
counters need no locking. The node-info blob and the checkpoint records are
longer, so each carries a sequence word (seqlock): the writer makes it odd,
writes, makes it even again; a reader keeps a copy only if the word was the
same, even value before and after copying. Record ``j`` of the log carries the
final sequence ``2*j + 2``, so a reader also knows which record it holds.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.checkpoint_api import CAUSES
from pipeline.shm import Segment, attach_segment, create_segment, segment_prefix

MAGIC = b"COLOCNTR"
VERSION = 1
_FIXED_HEADER = 32
_ALIGN = 64
INFO_SIZE = 4096
_SEQLOCK_RETRIES = 1000

STAGE_COUNTERS = ("items_in", "items_out", "bytes_in", "bytes_out", "busy_ns", "wait_ns",
                  "ring_high_water", "errors")
CHECKPOINT_FIELDS = ("epoch", "cause", "started_ns", "pvm_pause_ns", "commit_ns",
                     "pages_dirty", "pages_svm_dirty", "pages_sent", "pages_skipped_hash",
                     "pages_zero", "bytes_wire", "bytes_raw", "status", "pvm_verify_ns",
                     "transfer_ns", "apply_ns", "ack_ns", "pages_same_as_svm")
STATUS_COMMITTED = 0
STATUS_ABORTED = 1
_U64_MAX = (1 << 64) - 1


class NodeNotRunning(LookupError):
    """No live counters segment for the node asked for."""


def counters_segment_name(node_name: str) -> str:
    return segment_prefix(node_name) + "counters"


def _round_up(n: int, align: int = _ALIGN) -> int:
    return (n + align - 1) // align * align


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Elapsed:
    """Context manager adding the elapsed perf_counter_ns to one counter (cheaper than
    a @contextmanager generator on the hot path)."""

    __slots__ = ("_index", "_start", "_values")

    def __init__(self, values: np.ndarray, index: int) -> None:
        self._values = values
        self._index = index
        self._start = 0

    def __enter__(self) -> _Elapsed:
        self._start = time.perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        self._values[self._index] += time.perf_counter_ns() - self._start


class StageCounters:
    """The counter block of one stage: a uint64 numpy array plus its names.

    ``values`` and ``index(name)`` are public so a hot loop can do
    ``values[i] += n`` without a name lookup.
    """

    def __init__(self, name: str, counters: tuple[str, ...], values: np.ndarray) -> None:
        self.name = name
        self.counters = counters
        self.values = values
        self._index = {c: i for i, c in enumerate(counters)}

    def index(self, counter: str) -> int:
        try:
            return self._index[counter]
        except KeyError:
            raise KeyError(f"stage {self.name!r} has no counter {counter!r} "
                           f"(it has {', '.join(self.counters)})") from None

    def add(self, counter: str, n: int = 1) -> None:
        self.values[self.index(counter)] += n

    def set(self, counter: str, value: int) -> None:
        self.values[self.index(counter)] = value

    def max(self, counter: str, value: int) -> None:
        """Raise ``counter`` to ``value`` if that is higher (e.g. a ring's high-water mark)."""
        i = self.index(counter)
        if value > self.values[i]:
            self.values[i] = value

    def busy(self) -> _Elapsed:
        """``with counters.busy():`` adds the time spent inside to ``busy_ns``."""
        return _Elapsed(self.values, self.index("busy_ns"))

    def wait(self) -> _Elapsed:
        """``with counters.wait():`` adds the time spent inside to ``wait_ns``."""
        return _Elapsed(self.values, self.index("wait_ns"))

    def as_dict(self) -> dict[str, int]:
        snapshot = self.values.tolist()
        return dict(zip(self.counters, snapshot))


class NodeCounters:
    """All counters of one node in one shared segment. Create in the supervisor; attach
    read-only from ``colo-pipeline stats``."""

    def __init__(self, segment: Segment, schema: dict[str, Any], owner_pid: int,
                 data_start: int) -> None:
        self._segment: Segment | None = segment
        self.schema = schema
        self.node = schema["node"]
        self.owner_pid = owner_pid
        buf = segment.buf

        def words(offset: int, count: int) -> np.ndarray:
            return np.ndarray((count,), np.uint64, buf, data_start + offset)

        self._stages = {name: StageCounters(name, tuple(spec["counters"]),
                                            words(spec["offset"], len(spec["counters"])))
                        for name, spec in schema["stages"].items()}
        info = schema["info"]
        self._info_seq = words(info["offset"], 2)          # [seq, length]
        self._info_bytes = np.ndarray((info["size"] - 16,), np.uint8, buf,
                                      data_start + info["offset"] + 16)
        cp = schema["checkpoints"]
        self.history = cp["history"]
        self.checkpoint_fields = tuple(cp["fields"])
        self._cp_count = words(cp["count_offset"], 1)
        # a reader of an older segment without the word sees a zero
        self._rejected = (words(schema["rejected_offset"], 1) if "rejected_offset" in schema
                          else np.zeros(1, np.uint64))
        self._records = words(cp["offset"], self.history * (1 + len(self.checkpoint_fields))) \
            .reshape(self.history, 1 + len(self.checkpoint_fields))
        self._field_index = {f: i + 1 for i, f in enumerate(self.checkpoint_fields)}

    # -- creation / attachment ------------------------------------------------------
    @classmethod
    def create(cls, node_name: str, stages: dict[str, Iterable[str]],
               history: int = 4096) -> NodeCounters:
        """Create the node's counters segment (owner). ``stages`` maps each stage name
        (e.g. ``"digest.0"``) to its counter names (STAGE_COUNTERS plus extras)."""
        if not isinstance(history, int) or not 1 <= history <= 1 << 20:
            raise ValueError(f"counters of node {node_name!r}: history={history!r} must be an "
                             f"int in 1..{1 << 20}")
        if not stages:
            raise ValueError(f"counters of node {node_name!r}: no stages given")
        schema_stages: dict[str, dict[str, Any]] = {}
        offset = 0
        for stage, names in stages.items():
            names = tuple(names)
            if not isinstance(stage, str) or not stage:
                raise ValueError(f"counters of node {node_name!r}: bad stage name {stage!r}")
            bad = [n for n in names if not isinstance(n, str) or not n]
            dup = sorted({n for n in names if names.count(n) > 1})
            if not names or bad or dup:
                raise ValueError(f"counters of node {node_name!r}, stage {stage!r}: counter "
                                 f"names must be unique non-empty strings, got {names!r}")
            schema_stages[stage] = {"offset": offset, "counters": list(names)}
            offset = _round_up(offset + 8 * len(names))   # own cache line per writer
        info_offset = offset
        count_offset = _round_up(info_offset + INFO_SIZE)
        records_offset = count_offset + _ALIGN
        record_size = 8 * (1 + len(CHECKPOINT_FIELDS))
        data_size = records_offset + history * record_size
        schema = {
            "version": VERSION, "node": node_name, "stages": schema_stages,
            "info": {"offset": info_offset, "size": INFO_SIZE},
            "rejected_offset": count_offset + 8,
            "checkpoints": {"count_offset": count_offset, "offset": records_offset,
                            "history": history, "fields": list(CHECKPOINT_FIELDS)},
        }
        schema_bytes = json.dumps(schema, separators=(",", ":")).encode()
        data_start = _round_up(_FIXED_HEADER + len(schema_bytes), 4096)
        segment = create_segment(counters_segment_name(node_name), data_start + data_size)
        header = np.ndarray((4,), np.uint64, segment.buf, 0)
        header[1] = VERSION | (len(schema_bytes) << 32)
        header[2] = os.getpid()
        header[3] = data_start
        del header
        segment.buf[_FIXED_HEADER:_FIXED_HEADER + len(schema_bytes)] = schema_bytes
        segment.buf[0:8] = MAGIC
        return cls(segment, schema, os.getpid(), data_start)

    @classmethod
    def attach(cls, node_name: str, allow_stale: bool = False) -> NodeCounters:
        """Attach read-only to a running node's counters (for ``colo-pipeline stats``).

        Raises NodeNotRunning if the node has no counters segment, or if its owner
        process is gone (a crashed run's leftover) unless ``allow_stale``.
        """
        name = counters_segment_name(node_name)
        try:
            segment = attach_segment(name, readonly=True)
        except FileNotFoundError:
            raise NodeNotRunning(f"node {node_name!r} is not running: no counters segment "
                                 f"/dev/shm/{name}") from None
        except ValueError as exc:   # created but not sized yet: the node is starting up
            raise NodeNotRunning(f"node {node_name!r} is starting up: {exc}") from None
        try:
            if segment.size < _FIXED_HEADER or bytes(segment.buf[0:8]) != MAGIC:
                raise NodeNotRunning(f"/dev/shm/{name} is not an initialised counters "
                                     "segment (node starting up, or not ours)")
            header = np.ndarray((4,), np.uint64, segment.buf, 0)
            version_word, owner_pid, data_start = (int(x) for x in header[1:4])
            del header
            schema_len = version_word >> 32
            schema = json.loads(bytes(segment.buf[_FIXED_HEADER:_FIXED_HEADER + schema_len]))
            if not allow_stale and not _pid_alive(owner_pid):
                raise NodeNotRunning(f"node {node_name!r} is not running: its counters "
                                     f"segment /dev/shm/{name} was left by pid {owner_pid}, "
                                     "which is gone")
            return cls(segment, schema, owner_pid, data_start)
        except BaseException:
            segment.close()
            raise

    # -- stages -----------------------------------------------------------------
    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self._stages)

    def stage(self, name: str) -> StageCounters:
        try:
            return self._stages[name]
        except KeyError:
            raise KeyError(f"node {self.node!r} has no stage {name!r} "
                           f"(it has {', '.join(self._stages)})") from None

    # -- node info ----------------------------------------------------------------
    def set_node_info(self, info: dict[str, Any]) -> None:
        """Store a small JSON-able dict (role, pid, epoch, config path, start time...)."""
        try:
            data = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise self._reject(f"node info of {self.node!r} is not JSON-able: {e}") from None
        if len(data) > len(self._info_bytes):
            raise self._reject(f"node info of {self.node!r} is {len(data)} bytes as JSON, "
                               f"more than the {len(self._info_bytes)} allowed")
        seq = int(self._info_seq[0])
        self._info_seq[0] = seq + 1                 # odd: being written
        self._info_bytes[:len(data)] = np.frombuffer(data, np.uint8)
        self._info_seq[1] = len(data)
        self._info_seq[0] = seq + 2                 # even: complete

    def node_info(self) -> dict[str, Any]:
        deadline = time.monotonic() + 1.0
        for attempt in range(1 << 30):
            before = int(self._info_seq[0])
            if before & 1:
                # the writer is mid-update; if it was descheduled there (a loaded host),
                # spinning cannot help: yield, and give up only after a second
                if attempt >= _SEQLOCK_RETRIES:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.001)
                continue
            length = min(int(self._info_seq[1]), len(self._info_bytes))
            data = self._info_bytes[:length].tobytes()
            if int(self._info_seq[0]) == before:
                return json.loads(data) if data else {}
            if attempt >= _SEQLOCK_RETRIES and time.monotonic() > deadline:
                break
        raise TimeoutError(f"node info of {self.node!r} kept changing while being read")

    # -- checkpoint log ---------------------------------------------------------------
    def record_checkpoint(self, **fields: Any) -> None:
        """Append one checkpoint record (fields of CHECKPOINT_FIELDS; missing ones are 0).
        ``cause`` may be a name from checkpoint_api.CAUSES or its index. A bad field
        raises ValueError and writes nothing."""
        row = np.zeros(len(self.checkpoint_fields), np.uint64)
        for key, value in fields.items():
            if key == "cause" and isinstance(value, str):
                if value not in CAUSES:
                    raise self._reject(f"record_checkpoint: unknown cause {value!r} "
                                       f"(known: {', '.join(CAUSES)})")
                value = CAUSES.index(value)
            i = self._field_index.get(key)
            if i is None:
                raise self._reject(f"record_checkpoint: unknown field {key!r} "
                                   f"(fields: {', '.join(self.checkpoint_fields)})")
            if not isinstance(value, (int, np.integer)) or not 0 <= value <= _U64_MAX:
                raise self._reject(f"record_checkpoint: field {key}={value!r} must be an int "
                                   "in 0..2**64-1")
            row[i - 1] = value
        j = int(self._cp_count[0])
        record = self._records[j % self.history]
        record[0] = 2 * j + 1                       # odd: being written
        record[1:] = row
        record[0] = 2 * j + 2                       # even: record j complete
        self._cp_count[0] = j + 1

    def _reject(self, message: str) -> ValueError:
        """Count a refused write (bad input) and return the error to raise."""
        if self._rejected.flags.writeable:
            self._rejected[0] += 1
        return ValueError(message)

    @property
    def rejected_writes(self) -> int:
        """record_checkpoint / set_node_info calls refused as bad input."""
        return int(self._rejected[0])

    @property
    def checkpoints_recorded(self) -> int:
        """How many records were ever appended (the log keeps the last ``history``)."""
        return int(self._cp_count[0])

    def checkpoints(self, last: int | None = None) -> list[dict[str, Any]]:
        """The logged records, oldest first (at most ``last``). Records overwritten or being
        written while we read are left out, never returned half-written. Each dict has
        the CHECKPOINT_FIELDS as ints plus ``cause_name``."""
        count = int(self._cp_count[0])
        first = max(0, count - self.history)
        if last is not None:
            first = max(first, count - last)
        if first >= count:
            return []
        numbers = np.arange(first, count, dtype=np.uint64)
        rows = numbers % np.uint64(self.history)
        seq_before = self._records[rows, 0]         # fancy indexing: each a copy
        values = self._records[rows, 1:]
        seq_after = self._records[rows, 0]
        intact = (seq_before == seq_after) & (seq_before == 2 * numbers + 2)
        out = []
        for row in values[intact].tolist():
            record = dict(zip(self.checkpoint_fields, row))
            cause = record.get("cause", 0)
            record["cause_name"] = CAUSES[cause] if cause < len(CAUSES) else str(cause)
            out.append(record)
        return out

    # -- whole node -----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {
            "node": self.node,
            "owner_pid": self.owner_pid,
            "owner_alive": _pid_alive(self.owner_pid),
            "info": self.node_info(),
            "stages": {name: s.as_dict() for name, s in self._stages.items()},
            "checkpoints_recorded": self.checkpoints_recorded,
            "rejected_writes": self.rejected_writes,
            "checkpoints": self.checkpoints(),
        }

    def close(self) -> None:
        """Drop this process's views and mapping. Every user calls it."""
        if self._segment is None:
            return
        segment, self._segment = self._segment, None
        self._stages = {}
        self._info_seq = self._info_bytes = self._cp_count = self._records = None  # type: ignore
        self._rejected = None  # type: ignore
        segment.close()

    def unlink(self) -> None:
        """Remove the segment from /dev/shm (the creating process only)."""
        if self._segment is None:
            raise ValueError(f"counters of {self.node!r}: unlink after close")
        self._segment.unlink()

    def __reduce__(self):
        raise TypeError(f"counters of node {self.node!r} cannot be pickled: create them "
                        "before forking the stages, or NodeCounters.attach() by node name")


# -- figures ------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest rank on the sorted values; ``q`` from 0 to 1."""
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summarize(snapshot: dict) -> dict:
    """Figures a person (or a script) wants from a node's counters (``snapshot()``).
    Commit times and the dirty/skipped/same-as-SVM/zero page counts are those of the
    checkpoints, not of the initial full sync and pre-copy rounds (cause "initial": seconds
    and all of memory, which would swamp them; the checkpoint log has their records).
    pages_sent and the bytes count everything that went to the secondary."""
    cps = [c for c in snapshot["checkpoints"] if c["status"] == 0]
    initial = CAUSES.index("initial")
    steady = [c for c in cps if c["cause"] != initial]
    pauses = [c["pvm_pause_ns"] / 1e6 for c in cps if c["pvm_pause_ns"]]
    commits = [c["commit_ns"] / 1e6 for c in steady if c["commit_ns"]]
    # the split of each commit (pause, transfer, apply, ACK): p50 of each part
    split = {part: round(percentile([c.get(f"{part}_ns", 0) / 1e6 for c in steady
                                     if c["commit_ns"]], 0.5), 3)
             for part in ("transfer", "apply", "ack")}
    causes: dict[str, int] = {}
    for c in snapshot["checkpoints"]:
        name = CAUSES[c["cause"]] if c["cause"] < len(CAUSES) else str(c["cause"])
        causes[name] = causes.get(name, 0) + 1
    net = snapshot.get("stages", {}).get("net_compare")
    if net is not None:
        # the latency the comparator added to the guest's output (held until matched or
        # committed), from its histogram counters
        from pipeline.net.comparator import added_latency_ms
        net_figures = {"net_added_ms_p50": added_latency_ms(net, 0.5),
                       "net_added_ms_p99": added_latency_ms(net, 0.99),
                       "net_frames_released": net.get("frames_released", 0)}
    else:
        net_figures = {}
    return {
        **net_figures,
        "checkpoints": len(cps),
        "aborted": sum(1 for c in snapshot["checkpoints"] if c["status"] != 0),
        "causes": causes,
        "pause_ms_p50": round(percentile(pauses, 0.5), 3),
        "pause_ms_p99": round(percentile(pauses, 0.99), 3),
        "commit_ms_p50": round(percentile(commits, 0.5), 3),
        "commit_ms_p99": round(percentile(commits, 0.99), 3),
        **{f"{part}_ms_p50": v for part, v in split.items()},
        "pages_dirty": sum(c["pages_dirty"] for c in steady),
        "pages_sent": sum(c["pages_sent"] for c in cps),     # all that went, like bytes_sent
        "pages_skipped_hash": sum(c["pages_skipped_hash"] for c in steady),
        "pages_same_as_svm": sum(c.get("pages_same_as_svm", 0) for c in steady),
        "pages_zero": sum(c["pages_zero"] for c in steady),
        "bytes_sent": sum(c["bytes_wire"] for c in snapshot["checkpoints"]),
        "bytes_raw": sum(c["bytes_raw"] for c in snapshot["checkpoints"]),
    }
