"""Settings of failover: the heartbeat and the split-brain guard (DESIGN.md, "Failover").

Two frozen dataclasses, written like the sections of :mod:`pipeline.config` (every
field carries its documentation and bounds in ``field(metadata=...)``), so they can
become ``[heartbeat]`` and ``[failover]`` sections of the node's config. Each
validates itself on construction: a bad value raises ``ValueError`` naming the key,
e.g. ``heartbeat.interval_ms: 0 is too small (expected an integer >= 10)``.
Lists (from TOML) are accepted for the tuple fields and stored as tuples.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, doc: str, **meta: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **meta})


def _bad(section: str, key: str, problem: str, expected: str) -> ValueError:
    return ValueError(f"{section}.{key}: {problem} (expected {expected})")


def _int(section: str, key: str, value: Any, lo: int, hi: int) -> None:
    if type(value) is not int:
        raise _bad(section, key, f"{value!r} is {type(value).__name__}", "an integer")
    if value < lo:
        raise _bad(section, key, f"{value} is too small", f"an integer >= {lo}")
    if value > hi:
        raise _bad(section, key, f"{value} is too large", f"an integer <= {hi}")


def _number(section: str, key: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise _bad(section, key, f"{value!r} is not a finite number", "a number")
    if not lo <= value <= hi:
        raise _bad(section, key, f"{value} is out of range", f"a number from {lo} to {hi}")


def _tuple_of_str(obj: Any, section: str, key: str) -> tuple[str, ...]:
    value = getattr(obj, key)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(obj, key, value)
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise _bad(section, key, f"{value!r} is not a list of strings", "a list of strings")
    return value


_TCP = re.compile(r"tcp://([^:/\s]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
_HTTP = re.compile(r"https?://([^:/\s]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})/?")


PRIORITIES = ("realtime", "nice", "normal")


@dataclass(frozen=True)
class HeartbeatSettings:
    interval_ms: int = _f(100, "Each node sends a heartbeat this often, on its own channel "
                          "(peer.address port + 3).", min=10, max=10000)
    miss_count: int = _f(3, "The peer is lost after this many intervals without a valid "
                         "heartbeat (default: noticed 200-300 ms after it stopped).",
                         min=2, max=100)
    address: str = _f("", "The heartbeat channel, tcp://HOST:PORT (the secondary binds, the "
                      "primary connects); empty: derived from peer.address.")
    priority: str = _f("realtime", "Scheduling of the heartbeat process: real-time (SCHED_RR "
                       "at the lowest real-time priority, as corosync does; falls back to "
                       "nice -10, then normal, where not allowed), nice -10, or normal. "
                       "Measured with every CPU busy: normal and nice let heartbeats stall "
                       "for up to 460 ms (false losses at the default 300 ms timeout); "
                       "real-time kept every gap under 120 ms.", choices=PRIORITIES)

    def __post_init__(self) -> None:
        _int("heartbeat", "interval_ms", self.interval_ms, 10, 10000)
        _int("heartbeat", "miss_count", self.miss_count, 2, 100)
        if self.priority not in PRIORITIES:
            raise _bad("heartbeat", "priority", f"{self.priority!r} is not allowed",
                       "one of " + ", ".join(repr(p) for p in PRIORITIES))
        if not isinstance(self.address, str):
            raise _bad("heartbeat", "address", f"{self.address!r} is not a string",
                       "tcp://HOST:PORT")
        if self.address:
            m = _TCP.fullmatch(self.address)
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                raise _bad("heartbeat", "address", f"{self.address!r} is not a tcp address "
                           "with a host and a port", "tcp://HOST:PORT")

    @property
    def timeout_s(self) -> float:
        """Silence after which the peer counts as lost."""
        return self.interval_ms * self.miss_count / 1000


def heartbeat_address(peer_address: str) -> str:
    """The heartbeat channel's address: ``peer.address`` with its port + 3."""
    base, port = peer_address.rsplit(":", 1)
    return f"{base}:{int(port) + 3}"


WITNESSES = ("none", "local", "etcd")


@dataclass(frozen=True)
class FailoverSettings:
    fence_command: tuple[str, ...] = _f((), "argv of a command that makes sure the other node "
                                        "is down (e.g. powers its host off); it must exit 0 "
                                        "before the secondary goes live. `{peer}`, `{node}`, "
                                        "`{vm}` and `{generation}` in an argument are replaced. "
                                        "Empty: no fencing command.")
    fence_timeout_s: float = _f(10, "The fencing command is killed and counts as failed after "
                                "this many seconds.", min=0.1, max=3600)
    witness: str = _f("none", "Who grants the active role, to exactly one node per "
                      "generation: an etcd cluster (production), a lock file on this machine "
                      "(the one-machine demo only), or nobody.", choices=WITNESSES)
    etcd_endpoints: tuple[str, ...] = _f(("http://127.0.0.1:2379",),
                                         "etcd: client URLs, tried in order.")
    witness_key: str = _f("", "The key (etcd) or name (local) of the protected VM's active "
                          "role; empty: `/colo/<node name of the primary>/active`.")
    witness_dir: str = _f("/tmp/colo-pipeline/witness", "local: directory of the lock files "
                          "(one machine only).")
    lease_ttl_s: int = _f(5, "The active node's lease: it is renewed every third of this; a "
                          "node that stops renewing loses the role after it, and only then "
                          "can the other node take over.", min=2, max=3600)

    def __post_init__(self) -> None:
        s = "failover"
        argv = _tuple_of_str(self, s, "fence_command")
        if argv and not argv[0]:
            raise _bad(s, "fence_command", "the program name is empty", "a program and its "
                       "arguments")
        _number(s, "fence_timeout_s", self.fence_timeout_s, 0.1, 3600)
        if self.witness not in WITNESSES:
            raise _bad(s, "witness", f"{self.witness!r} is not allowed",
                       "one of " + ", ".join(repr(w) for w in WITNESSES))
        eps = _tuple_of_str(self, s, "etcd_endpoints")
        for ep in eps:
            m = _HTTP.fullmatch(ep)
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                raise _bad(s, "etcd_endpoints", f"{ep!r} is not an http(s) URL with a host "
                           "and a port", "http://HOST:PORT")
        if self.witness == "etcd" and not eps:
            raise _bad(s, "etcd_endpoints", "empty for witness 'etcd'", "at least one URL")
        if not isinstance(self.witness_key, str) or "\n" in self.witness_key:
            raise _bad(s, "witness_key", f"{self.witness_key!r} is not allowed", "a key")
        if not isinstance(self.witness_dir, str) or (self.witness == "local"
                                                     and not self.witness_dir):
            raise _bad(s, "witness_dir", f"{self.witness_dir!r} is not allowed", "a directory")
        _int(s, "lease_ttl_s", self.lease_ttl_s, 2, 3600)

    @property
    def guarded(self) -> bool:
        """Whether anything (a fencing command or a witness) guards a takeover."""
        return bool(self.fence_command) or self.witness != "none"

