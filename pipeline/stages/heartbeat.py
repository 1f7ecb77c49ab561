"""The heartbeat stage: each node tells the other it is alive, on a channel of its own.

One process per node, doing nothing else, so heartbeats keep flowing while the
coordinator, the digest workers and the page path are busy (a 1 GiB full sync or a
64k-page checkpoint never delays them): the pages and control channels are separate
sockets, and this process never waits for them.

Channel: ``heartbeat.address`` (``peer.address`` port + 3); the secondary binds a
ROUTER, the primary connects ``heartbeat.paths`` DEALERs (one TCP connection each).
The secondary answers every connection it has heard a valid heartbeat on (within the
last few timeouts), so a stray or extra connection neither receives a share of the
heartbeats nor steals them from the real primary (a DEALER would deal them out
round-robin).

Why several connections: over TCP a heartbeat is not lost but late. One lost segment
holds its connection silent until TCP retransmits it (RTO, 200 ms or more on Linux)
and every later heartbeat of that connection waits behind it, so on one connection a
single lost packet looks like 2-3 missed heartbeats at once. Each heartbeat goes out on
every path and the first copy to arrive counts (the others: ``hb_copies``); the peer is
lost only when every path was silent for the whole timeout, which one lost packet can
no longer cause (docs/tuning.md, "Heartbeat: how a loss is decided", has the figures).

Silence is counted on this process's own running time: when a turn of the loop ends
later than it asked to (the process was not scheduled, the host stalled, the node was
stopped, in its wait or in the turn's own work), the peer's deadline moves on by that
lateness (``local_pauses``,
``max_local_pause_us``), so a node that was itself not running does not declare its
peer lost for its own silence (both heartbeat stages of a loaded 2-core machine, or a
stalled VM, resumed together and each declared the other lost). A late wake-up is
logged with how much of it was spent waiting for a CPU (``/proc/thread-self/schedstat``). Both ends send a HEARTBEAT record
every ``interval_ms`` on a grid of absolute deadlines (``t0 + k * interval``): a late
wake-up sends once and goes back to the grid, so lateness never shifts or bunches
the schedule. A send that would block (no peer connected) is dropped and counted,
never queued: a heartbeat is only worth something when it is fresh.

A connection whose handshake fails (ZMTP or CURVE: a wrong or stale peer at the
address, a refused key) is one libzmq gives up on for good: the connecting socket
never tries again, so that direction would never come up even after the right peer
is there. The primary watches its socket's handshake failures and connects again
(at most once per interval, counted in ``hb_handshake_failed``).

Once the primary has lost the peer it sends on new connections (every timeout, at most
every 250 ms, while the peer stays lost: ``hb_redials``). The old ones may still be up for
TCP, the heartbeats queued behind a segment the kernel retransmits with exponential
backoff: a healed partition was heard 4-6 s late. (The control and pages channels are
still heard again only when TCP retransmits.)

Record HEARTBEAT (48 bytes, little-endian; the contract: docs/wire-format.md, "Heartbeat
channel"; the socket: ``pipeline.sockets.heartbeat``)::

    0  magic "COHB"        4  version u16      6  role u8 (1 primary, 2 secondary)
    7  reserved u8 (0)     8  interval_ms u32  12 instance u32 (random per process)
    16 generation u64      24 epoch i64        32 seq u64 (from 0 per instance)
    40 crc32 of bytes 0..39 u32               44 reserved u32 (0)

A record is accepted only if its length, magic, version, crc, role (the peer's, not
ours) and reserved fields are right; anything else is counted (``hb_bad``) and
dropped. An old or repeated ``seq`` of the same instance is counted (``hb_stale``)
and does not count as a sign of life; missing seqs are counted (``hb_missed``).

Events, sent on ``events_conn`` (a ``multiprocessing`` Connection; the coordinator
polls its fileno), as the types of pipeline/messages.py. Times are ``time.monotonic()``
seconds of this node::

    PeerUp(heard, info)            the first valid heartbeat from the peer; on the
                                   primary also the first from another secondary process
                                   (``instance``) while the peer was up: a new process that
                                   started within one timeout of the old one's death (no
                                   silence was ever decided)
    PeerLost(last_seen, detected)  no valid heartbeat for miss_count intervals
    PeerBack(heard, info)          a valid heartbeat after PeerLost

``info`` is ``{"role", "generation", "epoch", "seq", "instance", "interval_ms"}`` of
the peer's record. Nothing is reported before the peer was heard once.
"""
from __future__ import annotations

import math
import os
import random
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from pipeline import messages, sockets
from pipeline.stages.common import StageContext

MAGIC = b"COHB"
VERSION = 1
ROLE_PRIMARY, ROLE_SECONDARY = 1, 2   # the same numbers as pipeline.wire
ROLES = {"primary": ROLE_PRIMARY, "secondary": ROLE_SECONDARY}
_RECORD = struct.Struct("<4sHBBIIQqQ")     # up to the crc
_TAIL = struct.Struct("<II")               # crc32, reserved
RECORD_SIZE = _RECORD.size + _TAIL.size    # 48

# counters of the heartbeat stage, besides pipeline.counters.STAGE_COUNTERS
# (items_out: heartbeats sent, items_in: valid heartbeats received, errors: bad records)
# max_gap_us: the longest silence between two valid heartbeats heard (any path);
# max_send_gap_us: the longest time between two heartbeats this stage sent; max_runq_us:
# the longest time it waited for a CPU within one turn of its loop; max_local_pause_us:
# the latest it resumed from a wait (local_pauses: how often by more than half an interval)
COUNTERS = ("hb_bad", "hb_stale", "hb_missed", "hb_copies", "send_dropped", "late_wakeups",
            "max_late_us", "max_gap_us", "max_send_gap_us", "max_runq_us", "local_pauses",
            "max_local_pause_us", "peer_lost", "peer_back", "hb_handshake_failed",
            "peer_new_instance", "hb_redials")

_U64_MAX, _I64_MAX = (1 << 64) - 1, (1 << 63) - 1
MAX_WAIT_S = 0.2   # how often an idle loop looks at its stop event
REDIAL_MIN_S = 0.25  # the primary, its peer lost: new connections at most this often
COPY_WINDOW = 64   # a seq this close below the newest one heard is another path's copy
# Real-time priority of the heartbeat: one above the node's own real-time work (a
# checkpoint's work runs SCHED_FIFO 1, its hops 2: stages/common.PausePriority). At the
# same priority a FIFO task is never preempted by it: measured with a SCHED_FIFO 1 task spinning 400 ms
# in every 500 on the heartbeat's CPU, a heartbeat at SCHED_RR 1 waited for that CPU up to
# 400 ms (both sides of a pair silent at once: the fault matrix's "both heartbeat stages
# silent for 300 ms"), at SCHED_RR 2 at most 0.2 ms (issue 11; docs/tuning.md).
RT_PRIORITY = 3


class HeartbeatError(ValueError):
    """A heartbeat record that does not validate; the message says which field."""


@dataclass(frozen=True)
class Heartbeat:
    role: int
    interval_ms: int
    instance: int
    generation: int
    epoch: int
    seq: int

    def info(self) -> dict[str, Any]:
        return {"role": "primary" if self.role == ROLE_PRIMARY else "secondary",
                "generation": self.generation, "epoch": self.epoch, "seq": self.seq,
                "instance": self.instance, "interval_ms": self.interval_ms}


def encode_heartbeat(hb: Heartbeat) -> bytes:
    head = _RECORD.pack(MAGIC, VERSION, hb.role, 0, hb.interval_ms, hb.instance,
                        hb.generation, hb.epoch, hb.seq)
    return head + _TAIL.pack(zlib.crc32(head), 0)


def decode_heartbeat(msg: bytes | memoryview, expect_role: int | None = None) -> Heartbeat:
    """Validate one HEARTBEAT record; raises HeartbeatError naming the bad field."""
    if len(msg) != RECORD_SIZE:
        raise HeartbeatError(f"HEARTBEAT: length {len(msg)}, expected {RECORD_SIZE}")
    magic, version, role, res0, interval, instance, gen, epoch, seq = _RECORD.unpack_from(msg)
    crc, res1 = _TAIL.unpack_from(msg, _RECORD.size)
    if magic != MAGIC:
        raise HeartbeatError(f"HEARTBEAT: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise HeartbeatError(f"HEARTBEAT: unsupported version {version} (this node speaks "
                             f"{VERSION})")
    if crc != zlib.crc32(bytes(msg[:_RECORD.size])):
        raise HeartbeatError("HEARTBEAT: crc32 does not match")
    if role not in (ROLE_PRIMARY, ROLE_SECONDARY):
        raise HeartbeatError(f"HEARTBEAT: role {role} is neither primary (1) nor secondary (2)")
    if expect_role is not None and role != expect_role:
        raise HeartbeatError(f"HEARTBEAT: role {role} is this node's own role, not the peer's")
    if res0 or res1:
        raise HeartbeatError("HEARTBEAT: reserved fields are not zero")
    if interval == 0:
        raise HeartbeatError("HEARTBEAT: interval_ms is 0")
    return Heartbeat(role, interval, instance, gen, epoch, seq)


def _value(v: Any) -> int:
    """An int, or a shared ``multiprocessing.Value`` read now."""
    return int(v.value) if hasattr(v, "value") else int(v)


class _Peer:
    """What this node knows about the peer's heartbeats."""

    def __init__(self) -> None:
        self.state = "unknown"   # -> "up" -> "lost" -> "up" ...
        self.last_seen = 0.0   # when the silence started, on this process's running time
        self.heard_at = 0.0    # when the last valid heartbeat was heard
        self.instance: int | None = None
        self.seq = -1


class _RunQueue:
    """How long this thread waited for a CPU (``/proc/thread-self/schedstat``'s second
    field, run delay in ns), for telling a starved heartbeat from a blocked one."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = None
        self.last = self.read()

    def read(self) -> int:
        if self.fd is None:
            return 0
        try:
            return int(os.pread(self.fd, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    def since_last(self) -> int:
        """ns waited for a CPU since the previous call."""
        now = self.read()
        waited, self.last = max(0, now - self.last), now
        return waited

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run(ctx: StageContext, settings: Any, role: str, events_conn: Any,
        generation: Any = 0, epoch: Any = -1, *,
        socket_factory: Callable[[int, bool], zmq.Socket] | None = None,
        priority: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
    """The heartbeat stage's body (started through ``stage_main``).

    ``settings``: anything with ``interval_ms``, ``miss_count``, ``address`` (and
    optionally ``priority`` and ``paths``; :class:`pipeline.failover.settings.HeartbeatSettings`).
    ``role``: this node's, "primary" (connects) or "secondary" (binds). ``generation`` and
    ``epoch``: ints or shared ``multiprocessing.Value`` s, read at every send.
    ``socket_factory(kind, bind)``, called in this process (once per path on the
    primary), returns an unbound, unconnected socket of ``kind``
    (:func:`pipeline.sockets.heartbeat_kind`; e.g. with CURVE keys); default: a plain
    :func:`pipeline.sockets.heartbeat` socket.
    """
    if role not in ROLES:
        raise ValueError(f"heartbeat: role {role!r} is neither 'primary' nor 'secondary'")
    if not settings.address:
        raise ValueError("heartbeat.address: empty (expected tcp://HOST:PORT)")
    my_role = ROLES[role]
    peer_role = ROLE_SECONDARY if my_role == ROLE_PRIMARY else ROLE_PRIMARY
    interval = settings.interval_ms / 1000
    timeout = interval * settings.miss_count
    bind = role == "secondary"
    paths = 1 if bind else max(1, int(getattr(settings, "paths", 1)))
    c = ctx.counters
    prio = raise_priority(priority or getattr(settings, "priority", "realtime"))
    zctx = None
    if socket_factory is None:
        zctx = zmq.Context()
        socks = [sockets.heartbeat(zctx, role) for _ in range(paths)]
    else:
        socks = [socket_factory(sockets.heartbeat_kind(role), bind) for _ in range(paths)]
        for s in socks:
            sockets.heartbeat_options(s, role)
    # the connecting side: connect again after a failed handshake (libzmq would not)
    watches = [] if bind or not hasattr(socks[0], "get_monitor_socket") else \
        [sockets.HandshakeWatch(s, settings.address, interval, ctx.log) for s in socks]
    for s in socks:
        if bind:
            s.bind(settings.address)
        else:
            s.connect(settings.address)
    poller = None
    if len(socks) > 1:
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
    runq = _RunQueue()
    instance = random.getrandbits(32)
    seq = 0
    peer = _Peer()
    routes: dict[bytes, float] = {}   # secondary: connection id -> last valid heartbeat
    route_ttl = max(4 * timeout, 1.0)
    bad_logged = 0
    pauses_logged = 0
    last_sent: float | None = None
    ctx.log.info("heartbeat: %s %s every %d ms%s, peer lost after %d missed (%.0f ms), %s",
                 "listening on" if bind else "sending to", settings.address,
                 settings.interval_ms, f" on {paths} connections" if paths > 1 else "",
                 settings.miss_count, timeout * 1000, prio)

    def emit(event: Any) -> None:
        events_conn.send(event)

    def send(msg: bytes, now: float) -> None:
        nonlocal last_sent
        if last_sent is not None:
            c.max("max_send_gap_us", int((now - last_sent) * 1e6))
        last_sent = now
        if not bind:
            for s in socks:
                try:
                    s.send(msg, zmq.NOBLOCK)
                    c.add("items_out", 1)
                except zmq.Again:
                    c.add("send_dropped", 1)
            return
        sock = socks[0]
        for ident, heard in list(routes.items()):
            if now - heard > route_ttl:
                del routes[ident]
                continue
            try:
                sock.send_multipart((ident, msg), zmq.NOBLOCK)
                c.add("items_out", 1)
            except zmq.ZMQError as exc:      # EHOSTUNREACH: gone; EAGAIN: not keeping up
                c.add("send_dropped", 1)
                if exc.errno == zmq.EHOSTUNREACH:
                    del routes[ident]

    def receive(now: float) -> None:
        for sock in socks:
            receive_one(sock, now)

    def receive_one(sock: Any, now: float) -> None:
        nonlocal bad_logged
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            ident = frames[0] if bind else b""
            try:
                if len(frames) != (2 if bind else 1):
                    raise HeartbeatError(f"HEARTBEAT: {len(frames) - bind} frames, expected 1")
                hb = decode_heartbeat(frames[-1], expect_role=peer_role)
            except HeartbeatError as exc:
                c.add("hb_bad", 1)
                c.add("errors", 1)
                bad_logged += 1
                if bad_logged <= 10 or bad_logged % 1000 == 0:
                    ctx.log.warning("heartbeat: dropped a bad record (%d so far): %s",
                                    bad_logged, exc)
                continue
            if bind:
                routes[ident] = now
            if hb.instance == peer.instance and hb.seq <= peer.seq:
                # the peer sends each heartbeat on every path: a copy (or an old one held
                # behind a retransmit) is no news
                c.add("hb_copies" if peer.seq - hb.seq < COPY_WINDOW else "hb_stale", 1)
                continue
            if hb.instance == peer.instance and hb.seq > peer.seq + 1:
                c.add("hb_missed", hb.seq - peer.seq - 1)
            c.add("items_in", 1)
            if peer.state != "unknown":
                c.max("max_gap_us", int((now - peer.heard_at) * 1e6))
            # (the primary's side only: a secondary's takeover attempt would take a new
            # primary process's PeerUp for the lost primary back, PeerBackWatch)
            replaced = my_role == ROLE_PRIMARY and peer.state == "up" and \
                hb.instance != peer.instance
            peer.instance, peer.seq, peer.last_seen, peer.heard_at = \
                hb.instance, hb.seq, now, now
            if replaced:
                # another process at the peer's address (the old one died and a new one
                # started within one timeout): it holds nothing of the old one's state,
                # and no PeerLost/PeerBack will ever tell (issue 11)
                c.add("peer_new_instance", 1)
                ctx.log.warning("heartbeat: peer %s is a new process (instance %d, "
                                "generation %d)", hb.info()["role"], hb.instance,
                                hb.generation)
                emit(messages.PeerUp(now, hb.info()))
            elif peer.state == "unknown":
                peer.state = "up"
                ctx.log.info("heartbeat: peer %s is up (generation %d)", hb.info()["role"],
                             hb.generation)
                emit(messages.PeerUp(now, hb.info()))
            elif peer.state == "lost":
                peer.state = "up"
                c.add("peer_back", 1)
                ctx.log.warning("heartbeat: peer %s is back (generation %d)",
                                hb.info()["role"], hb.generation)
                emit(messages.PeerBack(now, hb.info()))

    def local_pause(now: float, resume_by: float) -> None:
        """This loop resumed at ``now`` though it asked to by ``resume_by``: the peer's
        silence meanwhile is (partly) this process's own, so its deadline moves on."""
        nonlocal pauses_logged
        late = now - resume_by
        waited = runq.since_last()
        c.max("max_runq_us", waited // 1000)
        if late <= 0:
            return
        c.max("max_local_pause_us", int(late * 1e6))
        if late <= interval / 2:
            return
        c.add("local_pauses", 1)
        if peer.state == "up":
            peer.last_seen = min(now, peer.last_seen + late)
        pauses_logged += 1
        if pauses_logged <= 10 or pauses_logged % 100 == 0:
            ctx.log.warning("heartbeat: this process resumed %.0f ms late (%.0f ms of it "
                            "waiting for a CPU; %d such pauses): the peer's silence "
                            "meanwhile does not count", late * 1000, waited / 1e6,
                            pauses_logged)

    def redial(now: float) -> None:
        """The primary, the peer lost: every path on a new TCP connection. The old ones may
        be alive for TCP with heartbeats queued behind a segment it retransmits with
        exponential backoff: after a partition heals, the first retransmit came 4-6 s
        later (the fault matrix's partition rows), every heartbeat of that connection
        waiting behind it. A new connection's SYN goes through as soon as the path does
        (one every timeout while the peer is lost; ZeroMQ's own retries when it is gone)."""
        for s in socks:
            try:
                s.disconnect(settings.address)
            except zmq.ZMQError:     # (not connected: nothing to let go)
                pass
            s.connect(settings.address)
        c.add("hb_redials", 1)
        if c.as_dict()["hb_redials"] in (1, 10) or c.as_dict()["hb_redials"] % 100 == 0:
            ctx.log.info("heartbeat: the peer is lost: heartbeats on new connections to %s "
                         "(%d times so far)", settings.address, c.as_dict()["hb_redials"])

    t0 = clock()
    next_send = t0
    resume_by = t0
    redial_at = t0
    try:
        while not ctx.stopping():
            now = clock()
            local_pause(now, resume_by)
            if now >= next_send:
                late = now - next_send
                if late > interval / 2:
                    c.add("late_wakeups", 1)
                c.max("max_late_us", int(late * 1e6))
                msg = encode_heartbeat(Heartbeat(
                    my_role, settings.interval_ms, instance, min(max(_value(generation), 0),
                                                                 _U64_MAX),
                    min(max(_value(epoch), -1), _I64_MAX), seq))
                seq += 1
                send(msg, now)
                # the next point of the grid after now: a late wake-up does not shift it
                k = math.floor((now - t0) / interval) + 1
                if t0 + k * interval <= now:   # (now - t0) / interval rounded down a slot
                    k += 1
                next_send = t0 + k * interval
            # what arrived while we were away counts before we judge the silence
            receive(now)
            reconnect_at = None
            for watch in watches:
                failures = watch.failures
                watch.check(now)
                c.add("hb_handshake_failed", watch.failures - failures)
                if watch.reconnect_at is not None:
                    reconnect_at = min(reconnect_at or watch.reconnect_at, watch.reconnect_at)
            if peer.state == "up" and now - peer.last_seen > timeout:
                peer.state = "lost"
                c.add("peer_lost", 1)
                ctx.log.warning("heartbeat: peer lost: nothing valid for %.0f ms (limit %.0f)",
                                (now - peer.heard_at) * 1000, timeout * 1000)
                emit(messages.PeerLost(peer.heard_at, now))
                redial_at = now
            if not bind and peer.state == "lost" and now >= redial_at:
                redial(now)
                redial_at = now + max(timeout, REDIAL_MIN_S)
            wake = next_send if reconnect_at is None else min(next_send, reconnect_at)
            if not bind and peer.state == "lost":
                wake = min(wake, redial_at)
            if peer.state == "up":
                wake = min(wake, peer.last_seen + timeout + 0.0005)
            before = clock()
            wait = max(0.0, min(wake - before, MAX_WAIT_S))
            # from this turn's start, not from ``before``: the turn's own work counts as
            # time away, so a stop anywhere in it (between ``now`` and the poll: in an
            # event's send, a receive) shows as lateness at the next turn. Measured from
            # ``before``, a node stopped right after it reported PeerUp never knew it was
            # stopped (the official CI: local_pauses 0 after a 0.9 s SIGSTOP)
            resume_by = now + math.ceil(wait * 1000) / 1000
            if poller is None:
                socks[0].poll(math.ceil(wait * 1000), zmq.POLLIN)
            else:
                poller.poll(math.ceil(wait * 1000))
    finally:
        for watch in watches:
            watch.close()
        for s in socks:
            s.close(0)
        runq.close()
        if zctx is not None:
            zctx.term()


def raise_priority(how: str) -> str:
    """Make this process win the CPU over busy processes, like corosync does: "realtime"
    (SCHED_RR at :data:`RT_PRIORITY`; it sleeps between heartbeats and does very little
    work when awake, so it cannot starve anything), "nice" (nice -10) or "normal".
    Falls back to what is allowed. Call before the ZeroMQ context is made: its I/O
    thread inherits the policy. Returns what was done, for the log."""
    if how == "realtime":
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(RT_PRIORITY))
            return f"SCHED_RR {RT_PRIORITY}"
        except (OSError, AttributeError):
            how = "nice"
    if how == "nice":
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
            return "nice -10"
        except OSError:
            pass
    return "normal priority"
