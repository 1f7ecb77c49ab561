"""Every host-to-host ZeroMQ socket of a node, created in one place with its options.

The channels: pages, control and inputs (``peer.address`` and the next two ports), the
heartbeat (port + 3, or ``heartbeat.address``; :func:`heartbeat`), and the disk's write
forwarding (``disk.forward``; :func:`disk_forward_out`, :func:`disk_forward_in`). Their
records: docs/wire-format.md.

The secondary binds, the primary connects (a primary can then be pointed at a new
secondary). Socket names say their role and direction: ``pages_out`` is the
primary's end of the pages channel, ``pages_in`` the secondary's.

Security (``[security]``): with ``mode = "curve"`` every channel is CurveZMQ. The
secondary is the CURVE server and a ZAP handler in each of its processes lets in
exactly one client key, the primary's; the primary checks the secondary's key. A peer
without the right key cannot connect, so not one of its messages reaches a stage.
``mode = "sealed"``: the same, but for the pages channel, which carries no CURVE: its
records' page data and vCPU state are sealed with AES-GCM by the stages that encode them
(pipeline/seal.py) under a key agreed over the CURVE control channel, so no single I/O
thread encrypts the page stream. A stranger can connect to the secondary's pages port
then, but nothing it sends opens: it is refused and counted (``seal_refused``).
``mode = "plaintext"`` must be chosen explicitly and logs a warning.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from pipeline import wire

# A node's settings (pipeline.config.Settings), only read here: the disk stage's modules
# make their sockets here too, and the config module imports their settings.
Settings = Any

log = logging.getLogger(__name__)

SEND_TIMEOUT_MS = 200   # a blocked send wakes up this often to look at the stop event


class _OnlyThePeer:
    """ZAP credentials check: the one client key this node accepts."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key == self.public_key
        if not ok:
            self.refused += 1
            log.warning("refused a connection with an unknown CURVE key %s",
                        zmq.utils.z85.encode(key).decode())
        return ok



def _stop_monitor(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    """End a watch's socket monitor (HandshakeWatch, DropWatch): the monitored socket may
    already be closed, which is fine."""
    if monitor is None:
        return
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(0)

class HandshakeWatch:
    """Connects a socket again after a failed handshake.

    libzmq gives up on a connected endpoint for good when its ZMTP or CURVE handshake
    fails with a protocol error (a stale or misconfigured peer at the address, a TCP
    self-connection while nothing listens on a port of the ephemeral range): the socket
    never tries again, so that channel would never come up, even once the right peer is
    there. This watches the socket's handshake failures and connects it again, at most
    once per ``retry_s``. Call :meth:`check` from the thread that uses the socket.

    Not every failure is for good: when the peer closes the connection mid-handshake
    (``NO_DETAIL``: a peer restarting, a listener not yet serving) libzmq connects again
    by itself. A handshake that succeeds after the failures cancels the reconnect: done
    anyway, it tore down a working connection, and ``disconnect`` drops what the socket
    had queued for it (the pages channel lost up to its 32 queued PAGES records of the
    full sync that way)."""

    FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    EVENTS = FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED

    def __init__(self, sock: zmq.Socket, endpoint: str, retry_s: float = 0.1,
                 logger: logging.Logger | None = None) -> None:
        self.sock, self.endpoint, self.retry_s = sock, endpoint, retry_s
        self.log = logger or log
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self.pid = os.getpid()
        self.failures = 0
        self.recovered = 0      # reconnects called off: libzmq's own retry succeeded first
        self.reconnect_at: float | None = None

    def check(self, now: float | None = None) -> bool:
        """Note failed handshakes; connect again when one is due. True if it did."""
        now = time.monotonic() if now is None else now
        while self.monitor.poll(0):
            event = self.monitor.recv_multipart()     # (event id + value, endpoint)
            if struct.unpack_from("<H", event[0])[0] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self.reconnect_at is not None:
                    self.recovered += 1
                    self.reconnect_at = None
                continue
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                self.log.warning("handshake with %s failed (event %#x, %d so far); "
                                 "connecting again", self.endpoint,
                                 struct.unpack_from("<H", event[0])[0], self.failures)
            if self.reconnect_at is None:
                self.reconnect_at = now + self.retry_s
        if self.reconnect_at is None or now < self.reconnect_at:
            return False
        self.reconnect_at = None
        self.sock.disconnect(self.endpoint)
        self.sock.connect(self.endpoint)
        return True

    def close(self) -> None:
        _stop_monitor(self.sock, self.monitor)
        self.monitor = None


class DropWatch:
    """Notices when an established connection of a bound socket breaks mid-stream, and
    cuts it if libzmq would not.

    A message that fails its CURVE authentication (a corrupted segment that TCP's checksum
    let through, a forged one) ends that connection's stream inside libzmq, but libzmq
    4.3 neither closes the TCP connection nor says more than one
    ``HANDSHAKE_FAILED_PROTOCOL`` event (ZMTP_CRYPTOGRAPHIC): the connection stays open
    and silent, so the peer never reconnects and every record it sends from then on is
    lost. This watch tells such a failure on an established connection (no connection is
    in its handshake, one is established) from a stranger's failed handshake, counts it
    (``counters``: ``conn_drops``, and ``conn_crypto_errors`` for a message that failed
    CURVE authentication), logs it naming the cause, and unbinds and binds the socket
    again, which resets the connections it accepted: the peer connects again at once. A
    plain disconnect of an established connection counts as a drop too. The secondary's
    coordinator tears the epoch in flight on a drop (its records are gone) instead of
    waiting for the epoch timeout. Call :meth:`check` from the thread that uses the
    socket (:func:`check_handshakes` does, from every stage loop)."""

    EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
              | HandshakeWatch.FAILED)

    def __init__(self, sock: zmq.Socket, endpoint: str, channel: str, counters: Any = None,
                 logger: logging.Logger | None = None) -> None:
        self.sock, self.endpoint, self.channel = sock, endpoint, channel
        self.counters, self.log = counters, logger or log
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self.pid = os.getpid()
        self.handshaking: list[int] = []     # accepted connections (fds), in order
        self.established: set[int] = set()
        self.failed: tuple[int, float] | None = None   # (code, when): not judged yet
        self.drops = 0

    def _count(self, name: str) -> None:
        if self.counters is not None:
            self.counters.add(name, 1)

    def _drop(self, why: str, crypto: bool) -> None:
        self.drops += 1
        self._count("conn_drops")
        if crypto:
            self._count("conn_crypto_errors")
        self.log.error("%s channel: the connection from the peer broke mid-stream: %s (%d "
                       "so far); records in flight on it are lost", self.channel, why,
                       self.drops)

    def check(self, now: float | None = None) -> bool:
        """Take in the socket's events; True if an established connection broke.

        Which connection a failed handshake event is about, libzmq does not say. A
        connection still in its handshake that fails is closed in the same step: its
        DISCONNECTED is the very next event. A failure not followed by one is the
        established connection's (libzmq leaves that one open). So a failure waits for the
        next event (at most ``SETTLE_S``) before it is judged."""
        now = time.monotonic() if now is None else now
        broke = False
        while self.monitor.poll(0):
            frames = self.monitor.recv_multipart()
            event, value = struct.unpack_from("<HI", frames[0])
            if self.failed is not None:
                code, self.failed = self.failed[0], None
                if event == zmq.EVENT_DISCONNECTED and value in self.handshaking:
                    self.handshaking.remove(value)     # a stranger's failed handshake
                    continue
                broke = self._broken(code) or broke
            if event == zmq.EVENT_ACCEPTED:
                self.handshaking.append(value)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self.handshaking:
                    self.established.add(self.handshaking.pop(0))
            elif event == zmq.EVENT_DISCONNECTED:
                if value in self.established:
                    self.established.discard(value)
                    self._drop("the connection was closed", False)
                    broke = True
                elif value in self.handshaking:
                    self.handshaking.remove(value)
            elif event & HandshakeWatch.FAILED:
                self.failed = (value, now)
        if self.failed is not None and now - self.failed[1] >= self.SETTLE_S:
            code, self.failed = self.failed[0], None
            broke = self._broken(code) or broke
        return broke

    SETTLE_S = 0.2

    def _broken(self, code: int) -> bool:
        """A failure that was not a handshake's: the established connection's stream
        broke. Counted, and the connection reset (libzmq keeps it open and silent)."""
        if not self.established:
            return False
        crypto = code == getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", 0x11000001)
        self._drop("a message failed CURVE authentication (corrupted or forged on the way; "
                   "ZMTP cryptographic error)" if crypto else
                   f"protocol error {code:#x} in an established stream", crypto)
        self.established.clear()
        self._rebind()
        return True

    REBIND_S = 5.0

    def _rebind(self) -> None:
        """Unbind (which resets the connections the listener accepted) and bind again.
        libzmq closes the listener in its I/O thread, after unbind returned: until then
        the address is in use, so the bind is retried for a while."""
        self.sock.unbind(self.endpoint)
        deadline = time.monotonic() + self.REBIND_S
        while True:
            try:
                self.sock.bind(self.endpoint)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise OSError(exc.errno, f"the {self.channel} channel cannot listen on "
                                  f"{self.endpoint} again after resetting a broken "
                                  f"connection: {exc.strerror}") from None
                time.sleep(0.005)

    def close(self) -> None:
        _stop_monitor(self.sock, self.monitor)
        self.monitor = None


#: the connecting sockets' watches of this process (every NodeContext), and the pages
#: channel's DropWatch, checked by :func:`check_handshakes` from the stage loops
_WATCHES: list[HandshakeWatch | DropWatch] = []
_next_check = 0.0
CHECK_EVERY_S = 0.05


def check_handshakes() -> None:
    """Connect again whatever channel of this process failed its handshake (cheap: looks
    at most every CHECK_EVERY_S; every stage loop calls it through ctx.stopping())."""
    global _next_check
    if not _WATCHES:
        return
    if _WATCHES[0].pid != os.getpid():   # inherited through a fork: not this process's
        _WATCHES.clear()
        return
    now = time.monotonic()
    if now < _next_check:
        return
    _next_check = now + CHECK_EVERY_S
    for w in _WATCHES:
        w.check(now)


def io_threads(wait_s: float = 2.0) -> list[int]:
    """Thread ids of this process's ZeroMQ I/O threads (libzmq names them ZMQbg/IO/<n>).
    They start with a context's first socket and name themselves a moment later: looked
    for until one has, for up to ``wait_s`` (right after the socket, the first look found
    none)."""
    deadline = time.monotonic() + wait_s
    while True:
        out = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as fh:
                    if fh.read().startswith("ZMQbg/IO"):
                        out.append(int(tid))
            except OSError:
                pass
        if out or time.monotonic() >= deadline:
            return out
        time.sleep(0.001)


class NodeContext:
    """A ZeroMQ context for one process of a node, with its CURVE keys and, on the
    secondary, the ZAP handler that admits only the primary's key."""

    def __init__(self, settings: Settings, io_realtime: int = 0) -> None:
        """``io_realtime``: the context's I/O threads run at SCHED_FIFO at that priority
        (0: normal scheduling; the caller has made sure this process may: libzmq aborts the
        process when it may not). For the coordinators' small control records, each a hop
        on the commit's path: at normal priority a record waited for a core, ~2 ms per
        SVM_DIRTY part on a loaded 2-core machine, behind the very hashing the part
        reports."""
        self.settings = settings
        self.ctx = zmq.Context()
        if io_realtime:
            # before the first socket: libzmq starts its threads with it
            self.ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_FIFO)
            self.ctx.set(zmq.THREAD_PRIORITY, io_realtime)
        self.watches: list[HandshakeWatch] = []
        self.auth: ThreadAuthenticator | None = None
        self.curve = settings.security.mode in ("curve", "sealed")
        # sealed: the pages channel's records are sealed by the stages, not by CURVE
        self.curve_pages = settings.security.mode == "curve"
        if self.curve:
            self.public, self.secret = zmq.auth.load_certificate(settings.security.key_file)
            self.peer_public, _ = zmq.auth.load_certificate(
                settings.security.peer_public_key_file)
            if self.secret is None:
                raise ValueError(f"{settings.security.key_file}: no secret key in this file")
            if settings.node.role == "secondary":
                self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("pipeline.zap"))
                self.auth.start()
                self.auth.configure_curve_callback(
                    domain="*", credentials_provider=_OnlyThePeer(self.peer_public))

    def socket(self, kind: int, hwm: int, bind: bool, curve: bool = True) -> zmq.Socket:
        """``curve=False``: no CURVE whatever the mode (the pages channel when sealed)."""
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        if curve:
            self.secure(s, bind)
        if not bind:
            # queue only for a connected peer: a secondary that dies takes what was queued
            # for it along, so a new secondary at the same address never gets an old
            # epoch's pages or an old input replayed into its fresh guest
            s.setsockopt(zmq.IMMEDIATE, 1)
        return s

    def secure(self, s: zmq.Socket, bind: bool) -> None:
        """Give a socket of this context the node's CURVE role (server if it binds)."""
        if not self.curve:
            return
        s.curve_secretkey = self.secret
        s.curve_publickey = self.public
        if bind:
            s.curve_server = True
        else:
            s.curve_serverkey = self.peer_public

    def watch(self, sock: zmq.Socket, endpoint: str) -> HandshakeWatch:
        """Connect ``sock`` to ``endpoint`` again whenever a handshake fails there."""
        w = HandshakeWatch(sock, endpoint)
        self.watches.append(w)
        _WATCHES.append(w)
        return w

    def watch_drops(self, sock: zmq.Socket, endpoint: str, channel: str,
                    counters: Any) -> DropWatch:
        """Count (and cut) broken established connections of the bound ``sock``."""
        w = DropWatch(sock, endpoint, channel, counters)
        self.watches.append(w)
        _WATCHES.append(w)
        return w

    def close(self) -> None:
        for w in self.watches:
            _WATCHES.remove(w)
            w.close()
        self.watches.clear()
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.destroy(linger=0)


def warn_if_plaintext(settings: Settings) -> None:
    if settings.security.mode == "plaintext":
        log.warning("node %s: host-to-host channels are PLAINTEXT (security.mode = "
                    "'plaintext'): anyone who reaches %s can read and inject pages",
                    settings.node.name, settings.peer.address)


def peer_endpoints(settings: Settings) -> dict[str, str]:
    """The host-to-host channels' addresses (pages, control, inputs, heartbeat)."""
    out = {ch: wire.channel_address(settings.peer.address, ch)
           for ch in wire.CHANNEL_PORT_OFFSETS}
    if settings.heartbeat.address:
        out["heartbeat"] = settings.heartbeat.address
    return out


def _endpoint(settings: Settings, channel: str) -> str:
    return peer_endpoints(settings)[channel]


def _open(nctx: NodeContext, kind: int, hwm: int, channel: str, bind: bool) -> zmq.Socket:
    s = nctx.socket(kind, hwm, bind=bind, curve=channel != "pages" or nctx.curve_pages)
    addr = _endpoint(nctx.settings, channel)
    if bind:
        try:
            s.bind(addr)
        except zmq.ZMQError as exc:
            s.close(0)
            raise OSError(exc.errno, f"the {channel} channel cannot listen on {addr} "
                                     f"(peer.address): {exc.strerror}") from None
    else:
        nctx.watch(s, addr)      # before connecting: the first handshake counts too
        s.connect(addr)
    return s


def _pages_queue(nctx: NodeContext, pages: int) -> int:
    """Records of pipeline.batch_pages pages that hold about ``pages`` pages."""
    return max(4, pages // nctx.settings.pipeline.batch_pages)


def pages_out(nctx: NodeContext) -> zmq.Socket:
    # a short queue (2048 pages, 8 MiB): a send blocks soon after the link falls behind,
    # which is how pipeline.compress = "auto" sees a saturated link
    return _open(nctx, zmq.PUSH, _pages_queue(nctx, 2048), "pages", bind=False)


def pages_in(nctx: NodeContext, counters: Any = None) -> zmq.Socket:
    """The secondary's end of the pages channel. ``counters`` (the receive stage's): a
    connection that breaks mid-stream is counted there (``conn_drops``,
    ``conn_crypto_errors``; :class:`DropWatch`) and cut, so the primary reconnects."""
    s = _open(nctx, zmq.PULL, _pages_queue(nctx, 16384), "pages", bind=True)
    if counters is not None:
        nctx.watch_drops(s, _endpoint(nctx.settings, "pages"), "pages", counters)
    return s


def control(nctx: NodeContext) -> zmq.Socket:
    """Both ways: checkpoint begin/acks and hello. The primary connects a DEALER; the
    secondary binds a ROUTER and sends each record to the connection the primary's last
    one came on (its coordinator keeps that route). A DEALER there dealt its records
    round-robin over every connection it had, one the primary had already dropped
    (dialled anew: ``control_redials``) included, where they were lost."""
    if nctx.settings.node.role != "secondary":
        return _open(nctx, zmq.DEALER, 1000, "control", bind=False)
    s = _open(nctx, zmq.ROUTER, 1000, "control", bind=True)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)     # a gone route raises instead of dropping
    return s


def inputs_out(nctx: NodeContext) -> zmq.Socket:
    return _open(nctx, zmq.PUSH, 100000, "inputs", bind=False)


def inputs_in(nctx: NodeContext) -> zmq.Socket:
    return _open(nctx, zmq.PULL, 100000, "inputs", bind=True)


def heartbeat_kind(role: str) -> int:
    """ROUTER for the secondary (binds), DEALER for the primary (connects)."""
    return zmq.ROUTER if role == "secondary" else zmq.DEALER


def heartbeat_options(s: zmq.Socket, role: str) -> None:
    """The heartbeat channel's options: a heartbeat is only worth something fresh."""
    if role == "secondary":
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a gone peer raises instead of dropping
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 4)      # never a backlog of old heartbeats
    s.setsockopt(zmq.RCVHWM, 1000)
    s.setsockopt(zmq.RECONNECT_IVL, 50)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
    if role == "primary":
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected


def heartbeat(nctx: NodeContext | zmq.Context, role: str) -> zmq.Socket:
    """This node's end of the heartbeat channel, not yet bound or connected (the heartbeat
    stage does that, to ``heartbeat.address``). With a NodeContext it is CURVE like every
    channel; with a bare zmq.Context plaintext (the heartbeat stage's tests)."""
    if isinstance(nctx, NodeContext):
        s = nctx.socket(heartbeat_kind(role), 1000, bind=role == "secondary")
    else:
        s = nctx.socket(heartbeat_kind(role))
    heartbeat_options(s, role)
    return s


def disk_forward_out(context: zmq.Context, address: str, secure=None, hwm: int = 0,
                     send_timeout_ms: int = -1) -> zmq.Socket:
    """The primary's end of the disk's write forwarding link: a DEALER connected to
    ``address`` (``disk.forward``). ``secure(socket, bind)`` gives it the node's CURVE
    keys (NodeContext.secure); ``hwm``/``send_timeout_ms`` 0/-1: ZeroMQ's defaults."""
    s = context.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if hwm:
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
    if send_timeout_ms >= 0:
        s.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    if secure is not None:
        secure(s, False)
    s.connect(address)
    return s


def disk_forward_in(context: zmq.Context, address: str, secure=None) -> zmq.Socket:
    """The secondary's end of the disk's write forwarding link: a ROUTER bound to
    ``address``; with ``secure`` a CURVE server that admits only the primary's key."""
    s = context.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    if secure is not None:
        secure(s, True)
    s.bind(address)
    return s


def send_until_stopped(sock: zmq.Socket, msg, stop, copy: bool = True,
                       give_up=lambda: False, track: bool = False):
    """Send, retrying while the peer is slow or away; False if ``stop`` was set (or
    ``give_up()`` became true, e.g. the peer was declared lost) first. ``track`` (with
    ``copy=False``): returns the zmq.MessageTracker that says when ZeroMQ is done with
    ``msg``'s memory, instead of True."""
    while True:
        try:
            sent = sock.send(msg, copy=copy, track=track)
            return sent if track else True
        except zmq.Again:
            if stop.is_set() or give_up():
                return False
            check_handshakes()    # a peer we would wait for forever otherwise


def write_keypair(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    old = os.umask(0o077)   # the secret file is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret
