"""Settings of failover: the heartbeat and the split-brain guard (docs/config.md,
``[heartbeat]`` and ``[failover]``).

Two sections in the one style of :mod:`pipeline.schema`: every field carries its
documentation and limits in its metadata, checked on construction; a bad value raises
``SettingError`` naming the key, e.g. ``heartbeat.interval_ms: 0 is too small (expected
an integer >= 10)``. Lists (from TOML) are accepted for the tuple fields and stored as
tuples.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.schema import Section, SettingError
from pipeline.schema import setting as _f

_TCP = re.compile(r"tcp://([^:/\s]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
_HTTP = re.compile(r"https?://([^:/\s]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})/?")


PRIORITIES = ("realtime", "nice", "normal")


@dataclass(frozen=True)
class HeartbeatSettings(Section):
    SECTION = "heartbeat"
    interval_ms: int = _f(100, "Each node sends a heartbeat this often, on its own channel "
                          "(peer.address port + 3).", min=10, max=10000)
    miss_count: int = _f(3, "The peer is lost after this many intervals without a valid "
                         "heartbeat (default: noticed 200-300 ms after it stopped).",
                         min=2, max=100)
    paths: int = _f(2, "The primary sends every heartbeat over this many TCP connections "
                    "and the peer is lost only when all of them were silent: one lost packet "
                    "holds a TCP connection silent until its retransmission (200 ms or more), "
                    "longer than an interval (docs/tuning.md, \"Heartbeat: how a loss is "
                    "decided\").", min=1, max=4)
    address: str = _f("", "The heartbeat channel, tcp://HOST:PORT (the secondary binds, the "
                      "primary connects); empty: derived from peer.address.",
                      rule="empty, or tcp://HOST:PORT")
    priority: str = _f("realtime", "Scheduling of the heartbeat process: real-time (SCHED_RR "
                       "3, one above the node's own real-time work, a checkpoint's at "
                       "SCHED_FIFO 1 and its hops at 2, as corosync runs real-time; falls "
                       "back to nice -10, "
                       "then normal, where not allowed), nice -10, or normal. Measured with "
                       "every CPU busy: normal and nice let heartbeats stall for up to 460 "
                       "ms (false losses at the default 300 ms timeout); real-time kept every "
                       "gap under 120 ms, and at 2 a SCHED_FIFO 1 task spinning on its CPU "
                       "no longer holds it back (up to 400 ms at 1).", choices=PRIORITIES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.address:
            m = _TCP.fullmatch(self.address)
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                raise SettingError("heartbeat.address", f"{self.address!r} is not a tcp "
                                   "address with a host and a port", "tcp://HOST:PORT")

    @property
    def timeout_s(self) -> float:
        """Silence after which the peer counts as lost."""
        return self.interval_ms * self.miss_count / 1000


WITNESSES = ("none", "local", "etcd")


@dataclass(frozen=True)
class FailoverSettings(Section):
    SECTION = "failover"
    fence_command: tuple[str, ...] = _f((), "argv of a command that makes sure the other node "
                                        "is down (e.g. powers its host off); it must exit 0 "
                                        "before the secondary goes live. `{peer}`, `{node}`, "
                                        "`{vm}` and `{generation}` in an argument are replaced. "
                                        "Empty: no fencing command.")
    fence_timeout_s: float = _f(10, "The fencing command is killed and counts as failed after "
                                "this many seconds.", min=0.1, max=3600)
    witness: str = _f("none", "Who grants the active role, to exactly one node per "
                      "generation: an etcd cluster (production), state files on this machine "
                      "(the one-machine demo only), or nobody.", choices=WITNESSES)
    etcd_endpoints: tuple[str, ...] = _f(("http://127.0.0.1:2379",),
                                         "etcd: client URLs, tried in order.",
                                         rule="http(s)://HOST:PORT each")
    witness_key: str = _f("", "The key (etcd) or name (local) of the protected VM's active "
                          "role; empty: `/colo/<node name of the primary>/active`.")
    witness_dir: str = _f("/tmp/colo-pipeline/witness", "local: directory of the state files "
                          "(one machine only).")
    lease_ttl_s: int = _f(5, "The active node's lease: it is renewed every third of this; a "
                          "node that stops renewing loses the role after it, and only then "
                          "can the other node take over.", min=2, max=3600)
    redirector_pid_file: str = _f("", "A real guest NIC: the pid file of this host's "
                                  "redirector (`python -m pipeline.net.redirector "
                                  "--pid-file`); the takeover sends it SIGUSR1, which bridges "
                                  "the SVM's interface to the clients' network, and a "
                                  "survivor that becomes the primary (role auto) SIGUSR2 "
                                  "once its stages run, which hands the interface to its "
                                  "comparator. Empty: no redirector (the sim guest).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fence_command and not self.fence_command[0]:
            raise SettingError("failover.fence_command", "the program name is empty",
                               "a program and its arguments")
        for ep in self.etcd_endpoints:
            m = _HTTP.fullmatch(ep)
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                raise SettingError("failover.etcd_endpoints", f"{ep!r} is not an http(s) URL "
                                   "with a host and a port", "http://HOST:PORT")
        if self.witness == "etcd" and not self.etcd_endpoints:
            raise SettingError("failover.etcd_endpoints", "empty for witness 'etcd'",
                               "at least one URL")
        if "\n" in self.witness_key:
            raise SettingError("failover.witness_key", f"{self.witness_key!r} is not allowed",
                               "a key")
        if self.witness == "local" and not self.witness_dir:
            raise SettingError("failover.witness_dir", f"{self.witness_dir!r} is not allowed",
                               "a directory")

    @property
    def guarded(self) -> bool:
        """Whether anything (a fencing command or a witness) guards a takeover."""
        return bool(self.fence_command) or self.witness != "none"

