"""A primary and a secondary node on this machine, as real processes.

``colo-pipeline demo``, the benchmarks and the end-to-end tests all use this: it
writes the two config files, starts ``colo-pipeline primary`` and ``colo-pipeline
secondary`` as separate processes, and talks to them only the way an operator or a
client would: through their config, their counters (``NodeCounters.attach``), the
checkpoint request socket and the client input socket.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

import zmq

from pipeline import faults, proof_pages
from pipeline.checkpoint_api import CheckpointClient
from pipeline.counters import NodeCounters, NodeNotRunning
from pipeline.shm import cleanup_segments, list_segments, segment_prefix
from pipeline.signals import die_with_parent
from pipeline.sockets import write_keypair
from pipeline.stages.inputs import inject_address


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "",
               interval: float = 0.01, error: type[Exception] = AssertionError) -> Any:
    """Poll ``predicate`` until it returns something true; that value. The deadline is
    generous on purpose: it only bounds a hang, it never decides a pass. ``error`` is what
    a hang raises (tests: AssertionError; the fault matrix: its own failure type)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise error(f"not within {timeout} s: {what or predicate}")
        time.sleep(interval)


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (its main thread) from /proc/PID/stat: R
    running, S asleep (in a poll, a sleep), T stopped (SIGSTOP), t traced, Z a zombie."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()[0].decode()


def continue_stopped(pid: int, timeout: float = 60.0,
                     error: type[Exception] = AssertionError) -> None:
    """SIGCONT a process that stops itself at a named fault point (COLO_FAULT ``stop``),
    once it is stopped. Its "COLO_FAULT fired" line is written before its SIGSTOP: a
    SIGCONT sent on seeing the line can come first, and the SIGSTOP after it would leave
    the process stopped for good (the fault matrix's failover-merge row, once)."""
    wait_until(lambda: process_state(pid) in ("T", "t"), timeout,
               f"process {pid} stopped at its fault point", error=error)
    os.kill(pid, signal.SIGCONT)


#: what :func:`private_shm_command` prints after its command, then the names left there
SHM_LEFT = "private /dev/shm left:"


def private_shm_command(cmd: list[str], size: str) -> list[str]:
    """``cmd`` run in a mount namespace of its own whose /dev/shm is a fresh tmpfs of
    ``size`` (e.g. "2m"), so a test can fill it without touching the machine's (needs
    root and util-linux ``unshare``; its processes inherit the namespace). Afterwards it
    prints :data:`SHM_LEFT` and what is left there, and exits with ``cmd``'s code."""
    script = (f"mount -t tmpfs -o size={size} tmpfs /dev/shm || exit 99; \"$@\"; rc=$?; "
              f"echo {SHM_LEFT} $(ls /dev/shm); exit $rc")
    return ["unshare", "-m", "sh", "-c", script, "sh", *cmd]


def _limits(rlimits: dict[str, tuple[int, int]]) -> Callable[[], None]:
    """A preexec_fn: die with the parent, and the given resource limits
    ({"NOFILE": (soft, hard)}: resource.RLIMIT_<name>)."""
    import resource

    def preexec() -> None:
        die_with_parent()
        for name, (soft, hard) in rlimits.items():
            resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (soft, hard))
    return preexec


class PairError(RuntimeError):
    """A node of the pair failed or did not do what was asked in time."""


def free_port_base(count: int = 4, bases: Iterable[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 such that it and the next ``count - 1`` are free (a node uses
    peer.address's port and the next three). Drawn below the kernel's ephemeral range, so
    the outgoing connections of other tests cannot take them between check and bind.
    ``bases``: the candidates in order (a test draws lowest first, to be deterministic);
    default 500 random ones."""
    if bases is None:
        rng = random.Random()
        bases = (rng.randrange(20000, 32000 - count) for _ in range(500))
    for base in bases:
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise PairError(f"no {count} free consecutive TCP ports on 127.0.0.1")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def render_toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for table, values in tables.items():
        out.append(f"[{table}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


class LocalPair:
    #: the nodes' keys (configs, logs, run directories); a subclass may name hosts instead
    HOSTS = ("primary", "secondary")
    PORTS = 4       # consecutive free ports the pair needs

    def __init__(self, tables: dict[str, dict[str, Any]] | None = None,
                 workdir: str | None = None, log_level: str = "warning",
                 capture_logs: bool = True,
                 role_tables: dict[str, dict[str, dict[str, Any]]] | None = None) -> None:
        """``tables`` are config tables shared by both nodes (e.g. {"guest": {...}});
        ``role_tables`` add per-node ones ({"primary": {"disk": {...}}}). String values
        may say ``{workdir}``. Unless they say otherwise, the channels use CURVE with keys
        made here and takeovers are guarded by a local (demo-only) witness."""
        self.own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="colo-pair-")
        self.tag = f"pair{os.getpid()}x{int(time.monotonic() * 1000) % 100000}"
        self.port = free_port_base(self.PORTS)
        self.log_level = log_level
        self.capture_logs = capture_logs
        self.configs: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}
        self.counters: dict[str, NodeCounters] = {}
        self._inject: dict[str, zmq.Socket] = {}   # inject_input's socket per address
        self.ttys: dict[str, int] = {}   # start_node(tty=True): the terminal's master side
        # each proof's page hashes, both sides (pipeline/proof_pages.py): an unequal proof
        # names the pages that differ
        self.proof_dir = os.path.join(self.workdir, "proof")
        os.makedirs(self.proof_dir, exist_ok=True)
        keys = os.path.join(self.workdir, "keys")
        for role in self.HOSTS:
            write_keypair(keys, role)
        for role in self.HOSTS:
            peer = self.HOSTS[1] if role == self.HOSTS[0] else self.HOSTS[0]
            t = {k: dict(v) for k, v in (tables or {}).items()}
            for k, v in (role_tables or {}).get(role, {}).items():
                t.setdefault(k, {}).update(v)
            t = {k: {kk: vv.replace("{workdir}", self.workdir) if isinstance(vv, str) else vv
                     for kk, vv in v.items()} for k, v in t.items()}
            # one machine: the demo-only witness in the pair's directory guards takeovers
            t.setdefault("failover", {"witness": "local",
                                      "witness_dir": os.path.join(self.workdir, "witness")})
            sec = t.setdefault("security", {})
            if sec.get("mode", "curve") in ("curve", "sealed"):
                sec.setdefault("key_file", os.path.join(keys, f"{role}.key_secret"))
                sec.setdefault("peer_public_key_file", os.path.join(keys, f"{peer}.key"))
            self._place(role, t)
            # dotted tables (guest.workload) must come after their parent table
            ordered = dict(sorted(t.items(), key=lambda kv: kv[0]))
            path = os.path.join(self.workdir, f"{role}.toml")
            with open(path, "w") as fh:
                fh.write(render_toml(ordered))
            self.configs[role] = path

    def _place(self, role: str, t: dict[str, dict[str, Any]]) -> None:
        """The node's own name, role and run directory, and where its peer is."""
        t.setdefault("node", {}).update(name=self.name(role), role=role,
                                        run_dir=self.run_dir(role))
        # a role table may point one node elsewhere (e.g. the primary at a relay)
        t.setdefault("peer", {}).setdefault("address", f"tcp://127.0.0.1:{self.port}")

    def primary_host(self) -> str:
        """Which of :attr:`HOSTS` is the primary now."""
        return "primary"

    def name(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def run_dir(self, role: str) -> str:
        return os.path.join(self.workdir, role)

    # -- lifetime -------------------------------------------------------------
    def start(self, roles: tuple[str, ...] = ("secondary", "primary"),
              faults: dict[str, str] | None = None) -> "LocalPair":
        """``faults``: COLO_FAULT of a role's node (pipeline/faults.py), e.g.
        ``{"primary": "primary.acked:5:killgroup"}``."""
        for role in roles:
            self.start_node(role, (faults or {}).get(role))
        return self

    def start_node(self, role: str, fault: str | None = None, *,
                   rlimits: dict[str, tuple[int, int]] | None = None,
                   shm_size: str | None = None, tty: bool = False) -> subprocess.Popen:
        """``rlimits``: resource limits of the node ({"NOFILE": (soft, hard)}, names as
        in ``resource.RLIMIT_*``); ``shm_size``: the node gets a /dev/shm of its own of
        that size (:func:`private_shm_command`; its counters are out of this process's
        sight: for a node that is to be refused at start). ``tty``: the node's stdout and
        stderr are a terminal (a pty) whose master side is ``self.ttys[role]`` (what an
        operator running it by hand sees: its progress bars)."""
        cmd = [sys.executable, "-m", "pipeline.cli", "--log-level", self.log_level, "run",
               "--config", self.configs[role]]
        if shm_size:
            cmd = private_shm_command(cmd, shm_size)
        env = dict(os.environ)
        env.pop("COLO_FAULT", None)
        env[proof_pages.ENV] = self.proof_dir
        if fault:
            env["COLO_FAULT"] = fault
        log_path = os.path.join(self.workdir, f"{role}.log")
        self.logs[role] = log_path
        out = open(log_path, "ab") if self.capture_logs and not tty else None
        if tty:
            import pty
            self.ttys[role], out = pty.openpty()
        p = subprocess.Popen(self._wrap(role, cmd), stdout=out, stderr=subprocess.STDOUT if out else None,
                             start_new_session=True, env=env,
                             preexec_fn=_limits(rlimits) if rlimits else die_with_parent)
        if tty:
            os.close(out)
        elif out:
            out.close()
        self.procs[role] = p
        return p

    def _wrap(self, role: str, cmd: list[str]) -> list[str]:
        """The command line that runs a node (a subclass may run it elsewhere)."""
        return cmd

    def log_tail(self, role: str, chars: int = 3000) -> str:
        try:
            with open(self.logs[role], "rb") as fh:
                return fh.read().decode(errors="replace")[-chars:]
        except (KeyError, OSError):
            return ""

    def fault_fired(self, role: str, point: str, n: int | None = None) -> bool:
        """Did ``role``'s node fire the named fault point (pass ``n``; any pass when None)?
        Its "COLO_FAULT fired" line is in the node's log (pipeline/faults.py)."""
        return faults.fired_line(point, n) in self.log_tail(role, 1 << 24)

    def wait_fault_fired(self, role: str, point: str, n: int | None = None,
                         timeout: float = 120.0, what: str = "",
                         error: type[Exception] = AssertionError) -> None:
        """Wait until :meth:`fault_fired`; ``what`` names the moment for the error."""
        wait_until(lambda: self.fault_fired(role, point, n), timeout,
                   what or f"the {role}'s fault point {point}"
                           + (f" firing at pass {n}" if n is not None else " firing"),
                   error=error)

    def kill(self, role: str) -> float:
        """SIGKILL every process of a node (its process group); returns the wall time."""
        p = self.procs.pop(role)
        t = time.time()
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        c = self.counters.pop(role, None)
        if c is not None:
            c.close()
        # a killed supervisor could not unlink its segments; a restarted node would remove
        # them at start, here nobody restarts it
        cleanup_segments(segment_prefix(self.name(role)))
        return t

    def wait_exit(self, role: str, timeout: float = 120.0) -> int:
        """Wait until a node exits by itself (e.g. killed by its COLO_FAULT); returns its
        exit code and removes what it could not (like :meth:`kill`)."""
        p = self.procs.pop(role)
        try:
            code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs[role] = p
            raise PairError(f"the {role} node did not exit within {timeout} s:\n"
                            f"{self.log_tail(role)}") from None
        c = self.counters.pop(role, None)
        if c is not None:
            c.close()
        try:   # a fault that killed only the supervisor's children leaves none behind
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        cleanup_segments(segment_prefix(self.name(role)))
        return code

    def expect_refused(self, role: str, why: str, timeout: float = 120.0) -> str:
        """The node (just started) refuses to run: it exits 1 by itself, its log says
        ``why``, and it left nothing behind (no /dev/shm segment: in a private /dev/shm,
        :data:`SHM_LEFT` names none). Returns its log; PairError if not so."""
        try:
            self.procs[role].wait(timeout)
        except subprocess.TimeoutExpired:
            pass                      # (wait_exit says so)
        left = list_segments(segment_prefix(self.name(role)))   # before wait_exit's cleanup
        code = self.wait_exit(role, 0)
        log = self.log_tail(role, 1 << 20)
        if SHM_LEFT in log:
            left += log.rsplit(SHM_LEFT, 1)[1].split()
        if code != 1 or why not in log or left:
            raise PairError(f"the {role} node was to refuse to start naming {why!r}: exit "
                            f"{code}, segments left {left}:\n{log[-3000:]}")
        return log

    def check_alive(self) -> None:
        for role, p in self.procs.items():
            if p.poll() is not None:
                raise PairError(f"the {role} node exited with code {p.returncode}:\n"
                                f"{self.log_tail(role)}")

    def node(self, role: str = "primary", timeout: float = 60.0) -> NodeCounters:
        """The node's live counters (attached once it is up)."""
        if role in self.counters:
            return self.counters[role]
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                self.counters[role] = NodeCounters.attach(self.name(role))
                return self.counters[role]
            except NodeNotRunning:
                if time.monotonic() > deadline:
                    raise PairError(f"the {role} node did not start within {timeout} s") \
                        from None
                time.sleep(0.05)

    def wait_info(self, key: str, value: Any = None, role: str = "primary",
                  timeout: float = 120.0) -> dict:
        """Wait until the node's info has ``key`` (equal to ``value`` if given)."""
        node = self.node(role)
        deadline = time.monotonic() + timeout
        while True:
            info = node.node_info()
            if key in info and (value is None or info[key] == value):
                return info
            self.check_alive()
            if time.monotonic() > deadline:
                raise PairError(f"{role}: {key}={value!r} not reached within {timeout} s "
                                f"(info {info})")
            time.sleep(0.02)

    def wait_protected(self, timeout: float = 300.0) -> dict:
        return self.wait_info("state", "protected", role=self.primary_host(), timeout=timeout)

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM both nodes and wait; returns their exit codes."""
        for s in self._inject.values():
            s.close()           # lingers until the injected inputs are delivered (2 s)
        self._inject.clear()
        for c in self.counters.values():
            c.close()
        self.counters.clear()
        codes = {}
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for role, p in self.procs.items():
            try:
                codes[role] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes[role] = p.wait()
        return codes

    def cleanup(self) -> None:
        for fd in self.ttys.values():
            os.close(fd)
        self.ttys.clear()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalPair":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

    # -- driving ------------------------------------------------------------
    def request_checkpoint(self, detail: str = "") -> None:
        client = CheckpointClient(self.run_dir(self.primary_host()), subscribe=False)
        client.requests_out.setsockopt(zmq.LINGER, 5000)   # deliver before closing
        client.request("request", detail)
        client.close()

    def prove_memory_equal(self, timeout: float = 120.0) -> dict:
        """Ask for a checkpoint where both sides hash all of guest memory; returns the
        primary's info with ``memory_equal``. Asks again if that checkpoint was torn.
        Unequal, the info starts with ``differing_pages`` (their count and the first pfns;
        pipeline/proof_pages.py), and that proof's page hashes stay in ``proof_dir``."""
        node = self.node(self.primary_host())
        deadline = time.monotonic() + timeout
        while True:
            before = node.node_info().get("final_epoch", -1)
            self.request_checkpoint("digest")
            retry_at = time.monotonic() + 15
            while time.monotonic() < min(retry_at, deadline):
                info = node.node_info()
                if info.get("final_epoch", -1) > before:
                    epoch = info["final_epoch"]
                    if info.get("memory_equal") is False:
                        # first: a failed assertion shows the start of a long dict only
                        return {"differing_pages": proof_pages.differing_pages(
                            self.proof_dir, epoch), **info}
                    proof_pages.forget(self.proof_dir, epoch)
                    return info
                self.check_alive()
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                raise PairError(f"no digest checkpoint completed within {timeout} s")

    def inject_input(self, payload: bytes) -> None:
        """Give the PVM one client input (mirrored to the SVM like any other). Inputs reach
        it in the order of the calls: all go through one connection per primary (a socket
        per call made a connection per input, and connections race: the PVM took inputs
        0, 4, 1, 2, 3, which no in-order replay matches)."""
        address = inject_address(self.run_dir(self.primary_host()))
        s = self._inject.get(address)
        if s is None:
            s = zmq.Context.instance().socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(address)
            self._inject[address] = s
        s.send(payload)

    def checkpoints(self, role: str = "primary") -> list[dict]:
        return self.node(role).checkpoints()

    def wait_checkpoints(self, count: int, timeout: float = 120.0) -> list[dict]:
        """Wait until the primary has recorded at least ``count`` checkpoints."""
        deadline = time.monotonic() + timeout
        while True:
            cps = self.checkpoints()
            if len(cps) >= count:
                return cps
            self.check_alive()
            if time.monotonic() > deadline:
                raise PairError(f"only {len(cps)} of {count} checkpoints within {timeout} s")
            time.sleep(0.01)

    def stage_counter(self, stage: str, counter: str, role: str = "primary") -> int:
        return self.node(role).stage(stage).as_dict()[counter]

    def active_digest(self, timeout: float = 60.0) -> tuple[bytes, int]:
        """The active (failed-over) SVM's full-memory digest and the input position it was
        taken at (the secondary hashes between two inputs, on request)."""
        node = self.node("secondary")
        before = node.node_info().get("active_digests", 0)
        client = CheckpointClient(self.run_dir("secondary"), subscribe=False)
        client.requests_out.setsockopt(zmq.LINGER, 5000)   # deliver before closing
        client.request("request", "digest")
        client.close()
        info = self.wait_info("active_digests", before + 1, role="secondary", timeout=timeout)
        return bytes.fromhex(info["active_digest"]), info["active_input_seq"]


def sim_replay_digest(upto_seq: int, page_count: int, seed: int, pages_per_input: int,
                      timeout: float = 120.0, step: int = 0,
                      payload: Callable[[int], bytes] | None = None) -> bytes:
    """The memory digest of a sim guest that consumed client inputs 0 .. upto_seq-1 (the
    stream the primary's client stage feeds) and then wrote the first ``step`` pages of
    input ``upto_seq``: with no nondeterminism, a guest's memory is a function of the
    inputs it took, so a failed-over SVM must equal this at its input position; an epoch
    applied by halves could not. ``step`` is where a pause caught the guest inside an
    input (a proof's ``final_input_step``): the reference stops at the same page.
    ``payload(seq)``: the input at ``seq`` when it is not the client stage's stream (a
    client's requests)."""
    if step >= pages_per_input:     # all of the input's pages written, its output pending
        upto_seq, step = upto_seq + 1, 0
    from pipeline.stages.inputs import client_input
    from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain
    ref = open_sim_domain("replay", page_count,
                          WorkloadSpec(seed=seed, pages_per_input=pages_per_input),
                          dirty_log="bitmap")
    deadline = time.monotonic() + timeout
    try:
        ref.start()
        if step > 0:
            ref.break_at(upto_seq, step)
        ref.resume()
        for i in range(upto_seq + (step > 0)):
            # the input log has room for ~1000 inputs: stay well behind the guest
            while i - ref.input_seq() >= 256:
                if time.monotonic() > deadline:
                    raise PairError("the reference guest did not consume its inputs")
                ref.trim_inputs(ref.input_seq())
                time.sleep(0.001)
            ref.trim_inputs(ref.input_seq())
            ref.feed_input(client_input(seed, i) if payload is None else payload(i))
        if step > 0:
            ref.wait_break(max(1.0, deadline - time.monotonic()))
        while ref.input_seq() < upto_seq:
            if time.monotonic() > deadline:
                raise PairError("the reference guest did not catch up")
            time.sleep(0.005)
        ref.pause()
        return ref.memory_digest()
    finally:
        ref.close()


class HostPair(LocalPair):
    """Two hosts, ``a`` and ``b``, each with ``node.role = "auto"``: its own address
    (``node.listen``), the other's (``peer.address``) and the witness decide which runs
    as primary; after a takeover the survivor becomes the primary and the other host,
    started again with the same config, its secondary (pipeline/failover/roles.py).

    ``addresses`` ({"a": "tcp://IP:PORT", ...}) and ``netns`` ({"a": "ns-a", ...}) put
    the hosts in network namespaces. By default each host listens on an address of its
    own in 127.0.0.0/8 (127.R.S.1 and 127.R.S.2, R and S drawn per pair): a host's ports
    stay unbound while it is the primary or down, and on 127.0.0.1 another program could
    take them in the meantime."""

    HOSTS = ("a", "b")
    PORTS = 6       # and port + 4: the disk's forwarding link (wire.DISK_FORWARD_PORT_OFFSET),
    #                 port + 5: the comparator's SVM stream (wire.NET_SECONDARY_PORT_OFFSET)

    def __init__(self, tables: dict[str, dict[str, Any]] | None = None, *,
                 addresses: dict[str, str] | None = None,
                 netns: dict[str, str] | None = None, **kw: Any) -> None:
        self.addresses = addresses
        self.netns = netns or {}
        self.loopback = f"127.{random.randrange(1, 255)}.{random.randrange(0, 256)}"
        super().__init__(tables, **kw)

    def address(self, host: str) -> str:
        if self.addresses:
            return self.addresses[host]
        return f"tcp://{self.loopback}.{self.HOSTS.index(host) + 1}:{self.port}"

    def _place(self, host: str, t: dict[str, dict[str, Any]]) -> None:
        peer = self.HOSTS[1] if host == self.HOSTS[0] else self.HOSTS[0]
        t.setdefault("node", {}).update(name=self.name(host), role="auto",
                                        run_dir=self.run_dir(host), listen=self.address(host))
        t.setdefault("peer", {})["address"] = self.address(peer)
        t["failover"] = {"witness_key": f"/colo/{self.tag}/active", **t["failover"]}

    def _wrap(self, host: str, cmd: list[str]) -> list[str]:
        ns = self.netns.get(host)
        return ["ip", "netns", "exec", ns, *cmd] if ns else cmd

    def roles(self) -> dict[str, str]:
        """The role each running host's node info says it has now."""
        out = {}
        for host in list(self.procs):
            try:
                out[host] = str(self.node(host, timeout=0).node_info().get("role", ""))
            except PairError:
                out[host] = ""
        return out

    def primary_host(self) -> str:
        prim = [h for h, r in self.roles().items() if r in ("primary", "active")]
        if len(prim) != 1:
            raise PairError(f"not exactly one primary among the hosts: {self.roles()}")
        return prim[0]

    def other(self, host: str) -> str:
        return self.HOSTS[1] if host == self.HOSTS[0] else self.HOSTS[0]
