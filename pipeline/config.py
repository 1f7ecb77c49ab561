"""Node configuration: one schema in code, TOML files on disk.

The schema is a tree of frozen dataclasses written in the one style of
``pipeline/schema.py``: every field carries its documentation and its limits in its
metadata, each section checks itself on construction, so the loader, ``check-config``
and the generated reference page (docs/config.md) all read the same source. Errors
name the file and the dotted key: ``demo.toml:checkpoint.max_interval_ms: 0 is too
small (expected an integer >= 1)``.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline import wire
from pipeline.disk.settings import DiskSettings
from pipeline.failover.settings import FailoverSettings, HeartbeatSettings
from pipeline.net.settings import NetSettings
from pipeline.schema import Section, SettingError
from pipeline.schema import section as _section
from pipeline.schema import setting as _f
from pipeline.xen_io.xen_ctypes import VCPU_INFO_ITEM


class ConfigError(ValueError):
    """A config file that cannot be used. ``str()`` is ``file:key: problem (expected …)``."""

    def __init__(self, path: str, key: str, problem: str, expected: str = "") -> None:
        self.path, self.key, self.problem, self.expected = path, key, problem, expected
        where = f"{path}:{key}" if key else path
        tail = f" (expected {expected})" if expected else ""
        super().__init__(f"{where}: {problem}{tail}")


@dataclass(frozen=True)
class NodeSettings(Section):
    SECTION = "node"
    name: str = _f("colo", "Name of this node; names its shared memory (`colo-<name>-*`) and "
                   "its run directory, and is how `colo-pipeline stats` finds it.",
                   pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}",
                   pattern_doc="letters, digits, '.', '_', '-' (at most 63, not starting "
                   "with a punctuation mark)")
    role: str = _f("primary", "What this node is: a fixed primary or secondary, or `auto`: "
                   "decided at every start from the witness (a node whose peer holds the "
                   "active role becomes its secondary, otherwise it runs as primary), and the "
                   "survivor of a failover becomes the primary; the config stays valid after "
                   "any number of failovers (docs/deployment.md, \"After a failover\").",
                   choices=("primary", "secondary", "auto"))
    listen: str = _f("", "role `auto`: this host's own address, tcp://HOST:PORT, where it "
                     "listens while it is the secondary (and the next three ports; four with "
                     "a replicated disk); "
                     "`peer.address` is then the other host's.", rule="empty, or tcp://HOST:PORT")
    run_dir: str = _f("", "Directory for local sockets; default `/tmp/colo-pipeline/<name>`.")
    cpu_latency_us: int = _f(0, "The CPUs' wake-up latency limit the node holds for as long "
                             "as it runs (the kernel's PM QoS request, /dev/cpu_dma_latency: "
                             "idle CPUs take no idle state slower to leave than this, in "
                             "microseconds; the request ends with the node). 0: idle CPUs "
                             "poll instead of halting, so each of a checkpoint's ~40 "
                             "wake-ups of a stage process costs microseconds, not tens of "
                             "them (on a VM a halted vCPU's wake-up goes through the host); "
                             "the cost is CPU time (a VM's idle vCPUs look busy to the host) "
                             "or power (bare metal), as with tuned's latency-performance "
                             "profile. -1: not held (the kernel's default). Needs root (or "
                             "write access to the device); where it cannot be held the node "
                             "runs on and logs why (event=cpu_latency_not_held), and "
                             "`stats` shows it. See docs/tuning.md, \"Session 17 (wake)\".",
                             min=-1, max=2_000_000_000)


@dataclass(frozen=True)
class WorkloadSettings(Section):
    SECTION = "guest.workload"
    seed: int = _f(1, "Seed of the sim guest's deterministic workload.", min=0)
    pages_per_input: int = _f(16, "Pages the sim guest writes per input.", min=1)
    run_length: int = _f(8, "The sim guest writes pages in runs of this many consecutive pages.",
                         min=1)
    mix_zero: float = _f(0.30, "Share of written pages that are all zero.", min=0.0, max=1.0)
    mix_text: float = _f(0.40, "Share of written pages that are text-like.", min=0.0, max=1.0)
    mix_random: float = _f(0.30, "Share of written pages that are random.", min=0.0, max=1.0)
    nondeterminism: float = _f(0.0, "Probability per input that the guest mixes real randomness "
                               "into its work, so PVM and SVM diverge.", min=0.0, max=1.0)
    input_rate_hz: float = _f(200.0, "Primary: client inputs fed to the guest per second.",
                              min=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        total = self.mix_zero + self.mix_text + self.mix_random
        if abs(total - 1.0) > 1e-6:
            raise SettingError("guest.workload.mix_*",
                               f"mix_zero + mix_text + mix_random = {total:g}", "1.0")


@dataclass(frozen=True)
class GuestSettings(Section):
    SECTION = "guest"
    backend: str = _f("sim", "Hypervisor backend.", choices=("sim", "xen"))
    page_count: int = _f(16384, "sim: guest RAM in pages of 4 KiB.", min=16)
    domain: str = _f("", "xen: the domain's name or id.")
    xen_image: str = _f("", "xen: the saved image of the guest that makes the twin pair "
                        "(`colo-pipeline xen-twin`: written on the primary, restored on both). "
                        "Relative paths are relative to the config file.")
    xen_domain_config: str = _f("", "xen: this node's xl domain config, with which "
                                "`colo-pipeline xen-twin` restores the image as guest.domain. "
                                "Relative paths are relative to the config file.")
    xen_wake: str = _f("msi", "xen, secondary: how the guest's vCPUs are woken after a "
                       "checkpoint loaded their state: an MSI carrying the event upcall vector "
                       "(quiet), an NMI (the guest logs it), or not at all (the guest wakes at "
                       "its next event).", choices=("msi", "nmi", "none"))
    xen_find_written: bool = _f(True, "xen: at start, watch the running guest for a moment "
                                "to find each vCPU's vcpu_info, whose event flags and clock Xen "
                                "writes for each domain without logging the page dirty. The "
                                "secondary keeps its own values there and the memory proof "
                                "(checkpoint.verify_every) skips them. Costs two reads of guest "
                                "memory at start.")
    xen_vcpu_info: str = _f("", "xen: where the guest registered each vCPU's vcpu_info "
                            "(VCPUOP_register_vcpu_info's frame and offset), as the guest itself "
                            "reports it, e.g. `0:0x7a31+0x3c0`. When given, the node takes these "
                            "instead of watching the guest (guest.xen_find_written is then not "
                            "used), after checking each on its own domain (in its frames, a clock "
                            "record Xen wrote); the nodes compare theirs in the handshake and a "
                            "difference stops the start. Empty: watch the guest.",
                            pattern=f"({VCPU_INFO_ITEM})(,{VCPU_INFO_ITEM})*|",
                            pattern_doc="empty, or VCPU:0xGFN+0xOFFSET items separated by commas")
    input_log_slots: int = _f(16384, "sim: client inputs the guest's input log holds, "
                              "2 KiB each, on each node (the default: 32 MiB). It stands in "
                              "for the secondary's queue of mirrored client packets: the "
                              "secondary keeps every input until a checkpoint past it commits "
                              "(an SVM put back to that checkpoint replays them), and with "
                              "outputs compared the primary asks for a checkpoint (cause "
                              "`input_log_full`) once half of them arrived since the last "
                              "commit and the PVM consumed a quarter (a checkpoint frees the "
                              "log only up to the PVM's position): at R requests/s, every "
                              "input_log_slots / 2R s. Fewer: "
                              "those checkpoints come more often than the timer, and every "
                              "reply produced during one waits for it.",
                              min=16, max=1 << 17)
    dirty_log: str = _f("auto", "sim: how written pages are tracked: the kernel (userfaultfd "
                        "write-protect + PAGEMAP_SCAN), a bitmap kept by the guest, or the "
                        "kernel when it can.", choices=("auto", "uffd", "bitmap"))
    workload: WorkloadSettings = _section(WorkloadSettings, "The sim guest's workload.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend == "xen" and not self.domain:
            raise SettingError("guest.domain", "missing for backend 'xen'",
                               "the Xen domain's name or id")


@dataclass(frozen=True)
class PeerSettings(Section):
    SECTION = "peer"
    address: str = _f("tcp://127.0.0.1:7400", "Secondary: the address it listens on; primary: "
                      "the secondary's address. Pages use this port, control port + 1, "
                      "mirrored input port + 2, heartbeat port + 3.",
                      rule="tcp://HOST:PORT, the port at most "
                      f"{65535 - max(wire.CHANNEL_PORT_OFFSETS.values())}")
    connect_timeout_ms: int = _f(10000, "How long the primary waits for the secondary's HELLO.",
                                 min=100)

    def __post_init__(self) -> None:
        super().__post_init__()
        addr = self.address
        if not addr.startswith("tcp://") or ":" not in addr[6:] or addr[6:].startswith(":"):
            raise SettingError("peer.address", f"{addr!r} is not a tcp address with a host",
                               "tcp://HOST:PORT")
        try:
            port = int(addr.rsplit(":", 1)[1])
        except ValueError:
            raise SettingError("peer.address", f"{addr!r} has no numeric port",
                               "tcp://HOST:PORT") from None
        top = 65535 - max(wire.CHANNEL_PORT_OFFSETS.values())
        if not 1 <= port <= top:
            raise SettingError("peer.address", f"port {port} out of range",
                               f"a port from 1 to {top} (the next three are used too)")


@dataclass(frozen=True)
class PipelineSettings(Section):
    SECTION = "pipeline"
    digest_workers: int = _f(2, "Primary: processes that hash and compress pages.", min=1,
                             max=64)
    verify_workers: int = _f(2, "Secondary: processes that decompress and verify pages.",
                             min=1, max=64)
    batch_pages: int = _f(1024, "Pages per ring slot and per PAGES record (at most); both "
                          "nodes must have the same. Larger batches cost fewer process "
                          "hand-offs per page (256 against 64: commits of 1k-16k pages 0.6-0.7x "
                          "as long; 1024 against 256: 16k pages 0.72x, on a shared 2-core "
                          "machine). A checkpoint's dirty set is dealt in equal shares, one per "
                          "digest worker, of at most this many pages.", min=1, max=1024)
    compress: str = _f("auto", "Primary: compress the pages of each batch with lz4 (fewer bytes "
                       "on the wire, more CPU), send them as they are, or decide while running: "
                       "`auto` compresses only while that makes the transfer faster, judged "
                       "from the measured link rate (how long sends block) and the digest "
                       "workers' measured lz4 rate and ratio; the send stage logs each switch "
                       "(event=compress) and counts it (compress_switches).",
                       choices=("auto", "lz4", "none"))
    verify_pages: str = _f("sample", "Secondary: which received pages are hashed again and "
                           "compared with the primary's blake3: every data page, one in 64 (at "
                           "least one per batch) at random, or none. The channel already authenticates "
                           "every message with CURVE; with security.mode = \"plaintext\" "
                           "choose `full`. The same goes for pages sent as already held by the "
                           "SVM: the restore stage hashes all, one in 64 or none of them again "
                           "before it applies the epoch. The memory proof "
                           "(checkpoint.verify_every) compares all of memory whatever this says. On the "
                           "primary: unless `full`, the pages of the full sync and pre-copy "
                           "rounds are sent without hashes (UNHASHED) and so not checked: "
                           "hashing them was on the sync's critical path.",
                           choices=("full", "sample", "off"))
    pause_priority: str = _f("realtime", "Primary: scheduling of the snapshot stage while the "
                             "PVM is paused (the guest's downtime): real-time (SCHED_FIFO 1, "
                             "where root or CAP_SYS_NICE allows; dropped around the proof's "
                             "full-memory hash) or normal. Secondary: the same for its "
                             "coordinator's answer to BEGIN (pause the SVM, read its dirty "
                             "log, hash those pages, send SVM_DIRTY), which the primary's "
                             "digest workers wait for. Both nodes: a checkpoint's control "
                             "hops (the coordinators and their ZeroMQ I/O threads, the "
                             "snapshot stage's command) wait at the same priority, asleep "
                             "until their record comes.", choices=("realtime", "normal"))
    ring_slots: int = _f(0, "Slots per ring; 0: 16 MiB of pages per ring (at most the guest's "
                         "size). The PVM pause copies into the snapshot buffer (twice "
                         "checkpoint.dirty_threshold_pages), not into the rings.", min=0)


#: checkpoint.max_interval_ms = 0: the timer with net.release = "compare" and "commit"
COMPARE_TIMER_MS = 10_000
COMMIT_TIMER_MS = 25


@dataclass(frozen=True)
class CheckpointSettings(Section):
    SECTION = "checkpoint"
    max_interval_ms: int = _f(0, "Checkpoint at least this often. 0: by net.release, "
                              f"{COMPARE_TIMER_MS} ms with \"compare\" (COLO: the outputs "
                              "say when a checkpoint is needed; the timer bounds the dirty set, "
                              "the disk writes the secondary buffers and the inputs an SVM "
                              "put back to the last checkpoint replays; QEMU's COLO: 20 s), "
                              f"{COMMIT_TIMER_MS} ms with \"commit\" (Remus-style buffering: "
                              "every reply waits for the next commit, about half of this "
                              "plus a commit; Remus ran at 25-40 ms). See docs/tuning.md, "
                              "\"What clients see\".", min=0)
    min_interval_ms: int = _f(20, "Never checkpoint more often than this.", min=0)
    dirty_threshold_pages: int = _f(16384, "Checkpoint once the PVM has dirtied this many pages "
                                    "(bounds the snapshot buffer). Beyond the guest's pages "
                                    "(twice them with prescan_ms) it is never reached, and "
                                    "the dirty count is never looked at.", min=1)
    prescan_ms: int = _f(0, "Primary: read (and clear) the PVM's dirty log while it runs, "
                         "at most this often (and at most every 40 times what a round's read of the log costs and "
                         "2 times its copy) "
                         "while it writes fast; a slower writer's pages about 256 at a time, "
                         "an idle PVM less and less often, at least every 100 ms; never while "
                         "unprotected), and "
                         "copy those pages into the snapshot buffer once the digest workers "
                         "are done with the last checkpoint's, so that a checkpoint's pause "
                         "reads and copies only what was written since (re-protecting each "
                         "written page is most of a read of the log, the copy most of the "
                         "pause). The pages taken early go with the next checkpoint and count "
                         "toward dirty_threshold_pages. 0 (the default): the log is read and "
                         "the pages copied only in the pause. On, the pause is 2-10x shorter and "
                         "the 4k-16k commit shorter (the 1k one mostly) in the loaded A/Bs of "
                         "docs/tuning.md (Sessions 16, 17). A COLO service's checkpoints no "
                         "longer take 4x longer with it on (Session 17: its pages went to the "
                         "digest workers in a batch per round), but its rounds cost the "
                         "service's primary 10-12 ms of CPU a second at real time under a "
                         "steady trickle of writes (2000 pages/s), for a pause ~1 ms shorter "
                         "every few seconds, and its p99 was worse with it on in 6 of 7 "
                         "loaded pairs: off by default.",
                         min=0)
    epoch_timeout_ms: int = _f(30000, "A checkpoint not acknowledged within this time is torn.",
                               min=100)
    precopy_target_pages: int = _f(4096, "After the full sync, live pre-copy rounds send what "
                                   "the guest wrote meanwhile until a round has at most this "
                                   "many pages; then the first (paused) checkpoint.", min=0)
    verify_every: int = _f(0, "Every Nth checkpoint, both nodes hash all of guest memory at "
                           "the checkpoint (blake3) and compare: a proof that the secondary "
                           "holds the primary's state. The primary hashes while its guest is "
                           "paused, so that pause grows by the hash (logged apart as "
                           "verify_ms). A mismatch is logged and counted "
                           "(memory_mismatches). 0: never.", min=0)

    def timer_ms(self, release: str) -> int:
        """The periodic checkpoint's interval under ``net.release`` (``max_interval_ms``,
        or its default for that policy), never below min_interval_ms."""
        if self.max_interval_ms:
            return self.max_interval_ms
        return max(self.min_interval_ms,
                   COMMIT_TIMER_MS if release == "commit" else COMPARE_TIMER_MS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_interval_ms and self.min_interval_ms > self.max_interval_ms:
            raise SettingError("checkpoint.min_interval_ms",
                               f"{self.min_interval_ms} is above max_interval_ms "
                               f"{self.max_interval_ms}", "min_interval_ms <= max_interval_ms")


@dataclass(frozen=True)
class SecuritySettings(Section):
    SECTION = "security"
    mode: str = _f("curve", "How host-to-host channels are protected: CurveZMQ on every "
                   "channel (encrypted, and only the peer's key may connect); `sealed`: "
                   "CurveZMQ on every channel but the pages channel, whose records' page data "
                   "and vCPU state are sealed with AES-256-GCM by the digest workers and "
                   "opened by the verify workers (in parallel, not in one ZeroMQ I/O thread "
                   "per socket), under a key the two nodes agree over the CURVE control "
                   "channel at each HELLO (both nodes must say `sealed`); or plaintext (a "
                   "warning at start; only for a trusted, isolated network).",
                   choices=("curve", "sealed", "plaintext"))
    key_file: str = _f("", "curve, sealed: this node's secret key file, as written by "
                       "`colo-pipeline keygen` (mode 0600). Relative paths are relative to the "
                       "config file.",
                       rule="curve, sealed: required, a secret key file of mode 0600")
    peer_public_key_file: str = _f("", "curve, sealed: the peer's public key file (`*.key`).",
                                   rule="curve, sealed: required, a public key file")


@dataclass(frozen=True)
class MetricsSettings(Section):
    SECTION = "metrics"
    listen: str = _f("", "Serve the node's counters for Prometheus at http://HOST:PORT/metrics "
                     "(e.g. \"0.0.0.0:9464\", IPv6 \"[::]:9464\"); empty: no endpoint.",
                     pattern=r"(|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5})",
                     pattern_doc="empty, or HOST:PORT such as 0.0.0.0:9464")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.listen and not 1 <= int(self.listen.rsplit(":", 1)[1]) <= 65535:
            raise SettingError("metrics.listen", f"port of {self.listen!r} out of range",
                               "a port from 1 to 65535")


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = _section(NodeSettings, "This node.")
    guest: GuestSettings = _section(GuestSettings, "The protected guest.")
    peer: PeerSettings = _section(PeerSettings, "The other node.")
    pipeline: PipelineSettings = _section(PipelineSettings, "Stage processes and rings.")
    checkpoint: CheckpointSettings = _section(CheckpointSettings, "When to checkpoint.")
    security: SecuritySettings = _section(SecuritySettings, "Authentication and encryption "
                                          "of the channels between the two hosts.")
    metrics: MetricsSettings = _section(MetricsSettings, "The Prometheus endpoint.")
    heartbeat: HeartbeatSettings = _section(HeartbeatSettings, "Liveness of the peer, on its "
                                            "own channel.")
    failover: FailoverSettings = _section(FailoverSettings, "Taking over when the primary is "
                                          "lost, and the guard against split brain.")
    disk: DiskSettings = _section(DiskSettings, "The guest's disk, served over NBD and "
                                  "replicated with the checkpoints (no `image`: no disk).")
    net: NetSettings = _section(NetSettings, "The network comparator (primary; no "
                                "`primary_in`: no comparator).")
    source: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def run_dir(self) -> str:
        return self.node.run_dir or os.path.join("/tmp/colo-pipeline", self.node.name)

    def ring_slots(self, page_count: int | None = None) -> int:
        """Slots per ring. The PVM pause copies into the snapshot buffer, not the rings,
        so a ring only has to smooth the flow between two stages: 16 MiB of pages (at
        most the guest's size) is plenty; more only costs memory and page faults."""
        if self.pipeline.ring_slots:
            return self.pipeline.ring_slots
        pages = 4096 if page_count is None else min(4096, page_count)
        return max(4, -(-pages // self.pipeline.batch_pages))


def _build(cls: type, data: Any, path: str, prefix: str) -> Any:
    """The section ``cls`` from its table: unknown keys and non-tables are errors here,
    every value is checked by the section itself (pipeline/schema.py)."""
    if not isinstance(data, dict):
        raise ConfigError(path, prefix.rstrip("."), f"is {type(data).__name__}", "a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            raise ConfigError(path, prefix + key, "unknown key",
                              "one of " + ", ".join(sorted(fields)))
    values = {}
    for name in fields:
        if name not in data:
            continue
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], data[name], path, prefix + name + ".")
        else:
            values[name] = data[name]
    try:
        return cls(**values)
    except SettingError as exc:
        raise ConfigError(path, exc.key, exc.problem, exc.expected) from None


def _check_key_file(path: str, key: str, file: str, secret: bool) -> None:
    """A key file must exist and hold a CurveZMQ key; a secret key must not be readable by
    anyone but its owner."""
    try:
        st = os.stat(file)
        with open(file, "rb") as fh:
            text = fh.read(4096)
    except OSError as exc:
        raise ConfigError(path, key, f"cannot read {file!r}: {exc.strerror}",
                          "a key file written by `colo-pipeline keygen`") from None
    if secret and st.st_mode & 0o077:
        raise ConfigError(path, key, f"{file!r} has mode {st.st_mode & 0o777:04o}: a secret "
                          "key readable by group or others is refused",
                          "mode 0600 (chmod 600 the file)")
    needle = b"secret-key" if secret else b"public-key"
    if needle not in text:
        raise ConfigError(path, key, f"{file!r} holds no {needle.decode()}",
                          "a key file written by `colo-pipeline keygen`")


def _resolve_keys(settings: Settings, path: str) -> Settings:
    sec = settings.security
    if sec.mode == "plaintext":
        return settings
    base = os.path.dirname(os.path.abspath(path)) if os.path.exists(path) else os.getcwd()
    files = {}
    for key, secret in (("key_file", True), ("peer_public_key_file", False)):
        value = getattr(sec, key)
        if not value:
            raise ConfigError(path, f"security.{key}", f"missing for mode {sec.mode!r} (its "
                              "control channel is CURVE: the seal key is agreed over it)"
                              if sec.mode == "sealed" else "missing for mode 'curve'",
                              "a key file path (make one with `colo-pipeline keygen`), or "
                              "security.mode = 'plaintext'")
        full = value if os.path.isabs(value) else os.path.join(base, value)
        _check_key_file(path, f"security.{key}", full, secret)
        files[key] = full
    return dataclasses.replace(settings, security=dataclasses.replace(sec, **files))


def from_dict(data: dict, path: str = "<dict>") -> Settings:
    settings = _build(Settings, data, path, "")
    from pipeline.failover.roles import check_auto
    try:
        check_auto(settings)
    except SettingError as exc:
        raise ConfigError(path, exc.key, exc.problem, exc.expected) from None
    settings = dataclasses.replace(settings, source=path)
    return _resolve_keys(settings, path)


def load(path: str) -> Settings:
    """Read and validate a TOML config file. Raises ConfigError."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                          "a UTF-8 TOML file") from None
    return from_dict(data, path)

