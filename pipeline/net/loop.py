"""The comparator's event loop: polls the adapters and the control channel, hands
frames to the comparator (and the rewriter), flushes the sinks, runs the timeout scan.
Used by the stage process and by the standalone drop-in alike.

Epoch boundaries come in-band when the senders put them in the frame streams
(:class:`pipeline.net.framing.Boundary`; the node's output ports do): the PVM's
snapshot boundary in the PVM's stream, the SVM's commit (or rollback) boundary in
the SVM's stream. Once a side's stream has carried one, the control channel's
``snapshot`` (PVM) or ``committed`` (SVM) events are ignored for that side: they
travel on another channel and would race its frames.

A sender that always puts boundaries in its stream says so up front (``in_band``: the
node's stage, fed by its own output ports): then the events never move an epoch, not
even before the first boundary. Learning it from the first boundary leaves a window:
the coordinator publishes ``snapshot`` as soon as the PVM is paused, so the event
usually overtakes the PVM frames sent before that pause; taken as the epoch's end, it
would tag those frames with the next epoch and compare them with the restored SVM's
output (a spurious ``net_divergence``) unless the in-band boundary behind them is read
first, which the stream runs (frames waiting for the other side's) make unlikely."""
from __future__ import annotations

import gc
import logging
import select
import threading
import time

import numpy as np
import zmq

from pipeline.net.adapters import (
    FrameSink,
    FrameSource,
    PacketSocket,
    PcapReader,
    PcapWriter,
    StreamEndpoint,
    parse_address,
)
from pipeline.net.comparator import (
    PRIMARY,
    RELEASE_DELAY_BOUNDS_MS,
    SECONDARY,
    Comparator,
    CounterSink,
)
from pipeline.net.control import NoControl
from pipeline.net.framing import BOUNDARY_COMMITTED, BOUNDARY_ROLLED_BACK, BOUNDARY_SNAPSHOT, \
    Boundary
from pipeline.net.mirror import InputMirror
from pipeline.net.rewriter import SeqRewriter
from pipeline.net.settings import NetSettings

log = logging.getLogger(__name__)

#: native pair rounds (pipeline.net.native): pairs before Python gets a turn, and how
#: long a lone side's frame waits in them (asleep, every other descriptor watched) for the
#: other side's before it goes the long way. It cannot go out before its partner anyway,
#: so the wait holds nothing back; a miss costs two Python rounds. 5 ms, not 1: in the
#: node the SVM's answer comes a mirror hop after the PVM's, and on a loaded machine often
#: later than 1 ms (one request in flight at load 17-18: 96-98 % of the pairs native
#: instead of 84-90 %, the comparator 49-65 us per request instead of 79-103)
NATIVE_MAX_PAIRS = 256
NATIVE_WAIT_NS = 5_000_000
_DELAY_BOUNDS_NS = np.array([round(b * 1e6) for b in RELEASE_DELAY_BOUNDS_MS[:-1]], np.int64)

_native_module: object = None


def native_rounds():
    """pipeline.net.native, compiled and ready (None without numba: every round then runs
    in Python). Imported only here, by a loop that can use it, or by the node's supervisor
    before it forks the comparator (:func:`preload_native_rounds`): numba's import and the
    compiled code's load take ~0.5 s of CPU once per process, and a forked child inherits
    them loaded."""
    global _native_module
    if _native_module is None:
        try:
            from pipeline.net import native
            native.warm_up()
            _native_module = native
        except ImportError as exc:
            log.info("numba is missing (%s): every comparator round runs in Python", exc)
            _native_module = False
    return _native_module or None


def native_rounds_here():
    """The native rounds if this process has them loaded already (by itself, or by the
    process it was forked from: the node's supervisor), else None, without loading them."""
    return _native_module or None


def native_may_run(settings: NetSettings, runs: bool = True) -> bool:
    """A comparator with these settings can use native pair rounds: both guests' streams
    and outdev are stream endpoints (tcp:, unix:) taken whole (runs of stream bytes, no
    vnet header word, no sequence rewriter for the SVM)."""
    return runs and not settings.vnet_hdr and not settings.rewrite_secondary and all(
        address and parse_address(address)[0] in ("tcp", "unix")
        for address in (settings.primary_in, settings.secondary_in, settings.outdev))


def preload_native_rounds(settings: NetSettings) -> bool:
    """For the node's supervisor, before it forks a comparator with these settings: load
    the native rounds in this process (numba's import and its cached compiled code; no
    thread is started by either, so the forks that follow are safe), so that the forked
    comparator has them from its first frame: not loaded beside its Python rounds by a
    thread that holds the GIL for tens of ms at a time (docs/tuning.md, Session 18
    (native)). Then the collector's generations are frozen: numba's ~78 000 objects are
    never walked by this process's collections nor by those of the stages forked after.
    True when the rounds are loaded (False: the settings cannot use them, or no numba)."""
    if not native_may_run(settings):
        return False
    if native_rounds_here() is not None:
        return True
    loaded = native_rounds() is not None
    gc.collect()
    gc.freeze()
    return loaded


def tune_gc() -> None:
    """Keep the cyclic garbage collector out of the frame path.

    The comparator allocates a few objects per frame and makes no reference
    cycles (reference counting frees them), but a full collection walks every
    tracked object, a large connection table included, and stalls the loop for
    milliseconds: added latency on the frames held meanwhile. So: freeze what
    exists at start-up and let collections run far less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


class ZmqPoll:
    """What the loop needs of zmq.Poller (register, poll in ms), as one zmq_poll call over
    a list made once: pyzmq's Poller rebuilds that list on every poll, which cost the node's
    comparator (its control channel is a zmq socket) ~2.5 us of its ~5 per round."""

    def __init__(self) -> None:
        self.items: list[tuple[object, int]] = []

    def register(self, what, events: int) -> None:
        self.items.append((what, events))

    def poll(self, timeout_ms: int) -> list[tuple[object, int]]:
        return zmq.zmq_poll(self.items, timeout_ms)


class Adapters:
    """Creates the adapter of every address once (one interface may serve two roles,
    e.g. ``packet:eth0`` as client_in and outdev)."""

    def __init__(self, vnet_hdr: bool) -> None:
        self.vnet_hdr = vnet_hdr
        self._by_address: dict[tuple[str, str], object] = {}

    def get(self, address: str, role: str, direction: str, on_malformed=None):
        if not address:
            return None
        kind, where = parse_address(address)
        cache_key = (address, direction if kind == "pcap" else "")
        if cache_key in self._by_address:
            return self._by_address[cache_key]
        if kind in ("tcp", "unix"):
            adapter = StreamEndpoint(address, self.vnet_hdr, name=role, on_malformed=on_malformed)
        elif kind == "packet":
            adapter = PacketSocket(where)
        elif direction == "in":
            adapter = PcapReader(where)
        else:
            adapter = PcapWriter(where)
        self._by_address[cache_key] = adapter
        return adapter

    def all(self) -> list:
        return list(self._by_address.values())

    def close(self) -> None:
        for adapter in self._by_address.values():
            adapter.close()
        self._by_address.clear()


class CompareLoop:
    """Everything one comparator process runs."""

    def __init__(self, settings: NetSettings, control=None,
                 counters: CounterSink | None = None, runs: bool = True,
                 in_band: bool = False, native: bool | str = True) -> None:
        """``native``: run pair rounds in native code where they apply (True: loaded now;
        ``"background"``: at once if this process has them loaded already, as the node's
        comparator does, forked by a supervisor that loaded them
        (:func:`preload_native_rounds`), else once :meth:`load_native_in_background`
        loaded them; False: never)."""
        self.settings = settings
        self.control = control or NoControl()
        self.adapters = Adapters(settings.vnet_hdr)
        try:
            self.outdev: FrameSink | None = self.adapters.get(settings.outdev, "outdev", "out")
            release = self.outdev.send if self.outdev is not None else (lambda f, v: None)
            block = None
            if isinstance(self.outdev, StreamEndpoint):
                block = self.outdev.send_framed
            elif self.outdev is None:
                block = lambda data: None   # noqa: E731 - nowhere to send
            self.comparator = Comparator(settings, release, self.control.request, counters,
                                         release_block=block, boundary=self._stream_boundary)
            get = self.adapters.get
            self.primary_in: FrameSource | None = get(
                settings.primary_in, "primary_in", "in", self._malformed_cb(PRIMARY))
            self.secondary_in: FrameSource | None = get(
                settings.secondary_in, "secondary_in", "in", self._malformed_cb(SECONDARY))
            self.client_in: FrameSource | None = get(settings.client_in, "client_in", "in")
            self.primary_out: FrameSink | None = get(settings.primary_out, "primary_out", "out")
            self.secondary_out: FrameSink | None = get(settings.secondary_out, "secondary_out",
                                                       "out")
        except BaseException:
            self.adapters.close()
            raise
        self.rewriter = SeqRewriter(settings.max_connections) if settings.rewrite_secondary \
            else None
        self.mirror = None
        if self.secondary_out is not None:
            self.mirror = InputMirror(
                self.secondary_out,
                self.rewriter.to_secondary if self.rewriter is not None else None,
                settings.max_queue_frames, self.comparator.counters)
        # A stream source's bytes go to the comparator as they come (it compares runs of
        # frames in one piece); not with a vnet header word or the SVM's sequence rewriter,
        # which need every frame apart, nor when ``runs`` is off.
        streams = runs and not settings.vnet_hdr and self.rewriter is None
        self._roles: list[tuple[FrameSource, object]] = []
        for source, handler, stream_handler in (
                (self.primary_in, self._from_primary, self._stream_primary),
                (self.secondary_in, self._from_secondary, self._stream_secondary),
                (self.client_in, self._from_client, None)):
            if source is None:
                continue
            if streams and stream_handler is not None and isinstance(source, StreamEndpoint):
                handler = stream_handler
            self._roles.append((source, handler))
        self._handlers = {handler for _, handler in self._roles} - {
            self._stream_primary, self._stream_secondary}
        self._primary_handlers = {self._from_primary, self._stream_primary}
        self._late_sides = {self._stream_primary: PRIMARY, self._stream_secondary: SECONDARY}
        self._sinks = [a for a in self.adapters.all() if isinstance(a, FrameSink)]
        #: the side's epoch boundaries come in its own frame stream (see the module doc)
        self.in_band = [in_band, in_band]
        self._plan_key: tuple | None = None
        self._plan: tuple = ()
        self._pair_fds: frozenset | None = None
        #: native pair rounds: the module when both guests' streams and outdev are stream
        #: endpoints taken whole; the poll array for them with the current plan (or None)
        self._native = None
        self._native_plan: tuple | None = None
        self._native_tbuf: np.ndarray | None = None
        #: what the native rounds did (diagnostics and tests): pairs released, waits for a
        #: lone side's partner and how many it ended, returns to Python by status name
        self.native_stats: dict[str, int] = {"pairs": 0, "waits": 0, "wait_hits": 0}
        #: the control channel when it is a zmq socket (the node's coordinator events): native
        #: rounds poll its zmq.FD, which is edge-triggered: readable when the socket got
        #: commands since ZMQ_EVENTS was last read, not while a message waits. So EVENTS is
        #: read right before each native round (a waiting message goes to Python first);
        #: after that read any new message makes the FD readable, which ends the round.
        pollable = self.control.pollable()
        self._zmq_control = pollable if isinstance(pollable, zmq.Socket) else None
        #: native rounds may run here (both guests' streams and outdev stream endpoints
        #: taken whole); the module is loaded now (``"background"``: if this process has
        #: it already, inherited from the supervisor), or by load_native_in_background
        self.native_possible = bool(native and native_may_run(settings, runs))
        self._native_loaded = None          # set by the background loader, taken by run_once
        self._native_loader: threading.Thread | None = None
        if self.native_possible:
            self._native = native_rounds() if native != "background" \
                else native_rounds_here()
            if self._native is not None:
                self.comparator.counters["native_rounds_loaded"] = 1
        self._next_scan = 0.0
        self.stop_event = threading.Event()

    def load_native_in_background(self) -> None:
        """Load the native rounds (numba's import and the cached compiled code: ~0.5 s of
        CPU) in a thread while this loop runs its rounds in Python; run_once takes them up
        once loaded (counter ``native_rounds_loaded``). Nothing to do when they are loaded
        already: the node's comparator has them from its fork (the supervisor loaded them
        first, :func:`preload_native_rounds`), so this is the fallback of a comparator
        forked without them, which must pass frames from its first moment rather than wait
        for numba. Not free meanwhile: the loading thread holds the GIL for tens of ms at a
        time (at load 7, a 1 ms loop beside it stalled up to 85 ms, 8-20 times over 20 ms
        in its 1-2 s), and the loop's rounds wait as long (docs/tuning.md, Session 18
        (svc))."""
        if not self.native_possible or self._native is not None \
                or self._native_loader is not None:
            return

        def load() -> None:
            module = native_rounds()
            gc.freeze()        # numba's objects: no garbage collection walks them again
            self._native_loaded = module
        self._native_loader = threading.Thread(target=load, name="native-rounds-loader",
                                               daemon=True)
        self._native_loader.start()

    def _malformed_cb(self, side: int):
        return lambda reason: self.comparator.note_malformed(side, reason)

    # ------------------------------------------------------------ dispatch
    def _from_primary(self, frames) -> None:
        push = self.comparator.push_primary
        rewriter = self.rewriter
        for frame, vnet in frames:
            if rewriter is not None:
                rewriter.observe_primary(frame, vnet)
            push(frame, vnet)

    def _from_secondary(self, frames) -> None:
        push = self.comparator.push_secondary
        rewriter = self.rewriter
        for frame, vnet in frames:
            if rewriter is not None:
                frame = rewriter.from_secondary(frame, vnet)
            push(frame, vnet)

    def _stream_primary(self) -> None:
        data = self.primary_in.recv_bytes()
        if data:
            self.comparator.push_stream(PRIMARY, data, self.primary_in.generation)

    def _stream_secondary(self) -> None:
        data = self.secondary_in.recv_bytes()
        if data:
            self.comparator.push_stream(SECONDARY, data, self.secondary_in.generation)

    def _stream_boundary(self, side: int, b: Boundary) -> None:
        """A boundary the comparator read in a stream it was given whole."""
        self._boundary(self._from_primary if side == PRIMARY else self._from_secondary, b)

    def _from_stream(self, handler, items) -> None:
        """A batch with epoch boundaries in it: frames between them go to ``handler``."""
        start = 0
        for i, item in enumerate(items):
            if type(item) is Boundary:
                if start < i:
                    handler(items[start:i])
                self._boundary(handler, item)
                start = i + 1
        if start < len(items):
            handler(items[start:])

    def _boundary(self, handler, b: Boundary) -> None:
        if handler == self._from_primary and b.kind == BOUNDARY_SNAPSHOT:
            self.in_band[PRIMARY] = True
            self._snapshot(b.epoch, in_band=True)
        elif handler == self._from_secondary and b.kind == BOUNDARY_COMMITTED:
            self.in_band[SECONDARY] = True
            # the PVM's snapshot boundary of this epoch may still be ahead in its stream
            self._committed(b.epoch, snapshot_seen=False)
        elif handler == self._from_secondary and b.kind == BOUNDARY_ROLLED_BACK:
            self.in_band[SECONDARY] = True
            self.comparator.on_rolled_back(b.epoch, b.aborted)
            self._svm_restored()
        else:
            self.comparator.note_malformed(PRIMARY if handler == self._from_primary
                                           else SECONDARY, f"unexpected {b!r} in this stream")

    def _from_client(self, frames) -> None:
        for frame, vnet in frames:
            if self.primary_out is not None:
                self.primary_out.send(frame, vnet)
            if self.mirror is not None:
                self.mirror.send(frame, vnet)

    # ------------------------------------------------- checkpoint events
    # (called by the control: CoordinatorControl, XenNotify)
    def on_snapshot(self, epoch: int) -> None:
        if not self.in_band[PRIMARY]:
            self.comparator.settle()      # what came before the event is of the old epoch
            self._snapshot(epoch)

    def on_committed(self, epoch: int) -> None:
        if not self.in_band[SECONDARY]:
            self.comparator.settle()
            self._committed(epoch, snapshot_seen=not self.in_band[PRIMARY])

    def _snapshot(self, epoch: int, in_band: bool = False) -> None:
        self.comparator.on_snapshot(epoch, in_band)
        if self.mirror is not None:
            self.mirror.hold(epoch + 1)

    def _committed(self, epoch: int, snapshot_seen: bool) -> None:
        self.comparator.on_committed(epoch, snapshot_seen=snapshot_seen)
        self._svm_restored()

    def on_flush(self) -> None:
        """Xen's COLO_CHECKPOINT: the checkpoint is done, release everything held."""
        self.comparator.settle()
        self.comparator.flush()
        self._svm_restored()

    def on_role(self, role: str) -> None:
        # active (failover) or unprotected (secondary lost): stop holding output
        self.comparator.settle()
        self.comparator.set_passthrough(role in ("active", "unprotected"))
        if role == "primary":
            self.load_native_in_background()     # comparing again (if not loaded yet)
        if self.mirror is not None and self.mirror.holding is not None:
            self.mirror.release()

    def _svm_restored(self) -> None:
        if self.rewriter is not None:
            self.rewriter.reset()      # the restored SVM has the PVM's sequence numbers
        if self.mirror is not None:
            self.mirror.release()

    # ---------------------------------------------------------------- loop
    def _watched(self, blocked: bool) -> list[tuple[object, object]]:
        """(pollable, what to do when it is readable) for everything the loop waits on.
        ``blocked``: the comparator takes no PVM frames now; the PVM's source is left
        unread (its sender backs up) until a commit."""
        watched: list[tuple[object, object]] = []
        control = self.control.pollable()
        if control is not None:
            # first: a snapshot event must be seen before frames that arrived after it
            watched.append((control, self._handle_control))
        watched += [(source, handler) for source, handler in self._roles
                    if not (blocked and handler in self._primary_handlers)]
        sources = [source for source, _ in self._roles]
        for adapter in self.adapters.all():
            # an outgoing listening endpoint accepts its peer as soon as it connects
            if isinstance(adapter, StreamEndpoint) and all(adapter is not s for s in sources):
                watched.append((adapter, adapter.accept_pending))
        return watched

    def _poll_plan(self) -> tuple[object, list[tuple[object, object, object]], bool]:
        """The poller for the current descriptors; rebuilt only when a stream endpoint's
        peer came or went (its descriptor changes then) or the PVM side (un)blocked.
        A ``select.poll`` unless a zmq socket is watched (the node's control channel): woken
        with cold caches, zmq's poll took ~14 us where select.poll took ~8."""
        blocked = self.comparator.blocked
        key = (StreamEndpoint.peer_changes, blocked)
        if key != self._plan_key:
            watched = self._watched(blocked)
            use_zmq = any(isinstance(pollable, zmq.Socket) for pollable, _ in watched)
            poller = ZmqPoll() if use_zmq else select.poll()
            plan, always = [], False
            for pollable, action in watched:
                if isinstance(pollable, zmq.Socket):
                    poller.register(pollable, zmq.POLLIN)
                    fd = pollable
                elif (fd := pollable.fileno()) is None:
                    always = True                    # a pcap file: always readable
                else:
                    poller.register(fd, select.POLLIN)
                plan.append((pollable, action, fd))
            self._plan, self._plan_key = (poller, plan, always), key
            self._pair_fds = self._stream_pair_fds(plan, blocked)
            # (a zmq socket only as the control channel: its zmq.FD, see __init__)
            self._native_plan = self._native_poll(plan) \
                if self._native is not None and self._pair_fds is not None and not always \
                and all(not isinstance(p, zmq.Socket) or p is self._zmq_control
                        for p, _, _ in plan) else None
        return self._plan

    def _native_poll(self, plan) -> tuple:
        """What native pair rounds poll (every descriptor of ``plan``, a struct pollfd
        array: int32 fd, then events | revents << 16) and the indices of the guests'
        streams in it; the reads' buffers; the result array."""
        fds = [fd.getsockopt(zmq.FD) if isinstance(fd, zmq.Socket) else fd
               for _, _, fd in plan]
        pfds = np.zeros(2 * len(fds), np.int32)
        pfds[0::2] = fds
        actions = [action for _, action, _ in plan]
        return (pfds, len(fds), actions.index(self._stream_primary),
                actions.index(self._stream_secondary),
                np.frombuffer(self.primary_in.scratch(), np.uint8),
                np.frombuffer(self.secondary_in.scratch(), np.uint8),
                self._native_room(), np.zeros(self._native.RESULT_SLOTS, np.int64))

    def _native_room(self) -> np.ndarray:
        """The native comparison's copy of the SVM's bytes (as large as a read; made once)."""
        if self._native_tbuf is None:
            self._native_tbuf = np.empty(len(self.secondary_in.scratch()), np.uint8)
        return self._native_tbuf

    def _stream_pair_fds(self, plan, blocked: bool) -> frozenset | None:
        """The descriptors of both guests' streams when both are connected stream sources
        the comparator takes whole and neither is blocked (None otherwise): a round in which
        only they are readable goes the short way (_run_pair)."""
        actions = {action: fd for _, action, fd in plan}
        pfd = actions.get(self._stream_primary)
        sfd = actions.get(self._stream_secondary)
        if blocked or pfd is None or sfd is None or not self.primary_in.connected \
                or not self.secondary_in.connected:
            return None
        return frozenset((pfd, sfd))

    def _handle_control(self) -> None:
        self.control.handle(self)

    def _control_waiting(self) -> bool:
        pollable = self.control.pollable()
        if pollable is None:
            return False
        if isinstance(pollable, zmq.Socket):
            return bool(pollable.poll(0))
        fd = pollable.fileno()
        return fd is not None and bool(select.select([fd], [], [], 0)[0])

    def run_once(self, timeout: float) -> None:
        """One round: wait up to ``timeout`` s for input, then handle what is ready."""
        if self._native_loaded is not None:      # loaded in the background: re-plan
            self._native, self._native_loaded, self._plan_key = self._native_loaded, None, None
            self.comparator.counters["native_rounds_loaded"] = 1
        poller, plan, always = self._poll_plan()
        if self._native_plan is not None and self._native_ok():
            ready = self._native_rounds(self._native_plan, timeout)
            if ready:
                if ready.keys() <= self._pair_fds:
                    self._run_pair(ready)
                else:
                    self._run_plan(plan, ready)
        else:
            ready = dict(poller.poll(0 if always else int(timeout * 1000)))
            if ready and self._pair_fds is not None and ready.keys() <= self._pair_fds:
                self._run_pair(ready)
            else:
                self._run_plan(plan, ready)
        now = time.monotonic()
        if now >= self._next_scan:
            self.comparator.check_timeouts(now)
            self._next_scan = now + self.settings.expired_scan_ms / 1000.0
        for sink in self._sinks:
            sink.flush()

    def _run_pair(self, ready: dict) -> None:
        """A round in which only the guests' streams are readable (that of a comparator that
        keeps up): both read, then compared in one step (Comparator.push_pair). The same
        order as _run_plan: the side that was not readable at the poll is read anyway (its
        frame usually follows at once), after a control message that came meanwhile."""
        pin, sin = self.primary_in, self.secondary_in
        pvm = pin.recv_bytes()
        svm = sin.recv_bytes()
        self._judge_pair(pvm, len(pvm) if pin.fileno() in ready else 0,
                         svm, len(svm) if sin.fileno() in ready else 0)

    def _native_ok(self) -> bool:
        """Native pair rounds may run now (see Comparator.native_ok): nothing waits in the
        comparator nor in outdev's queue, outdev has its peer, no control message waits
        (read last: reading ZMQ_EVENTS arms the zmq control's FD for the native poll)."""
        out = self.outdev
        return out.connected and not out.queued and self.comparator.native_ok(
            self.primary_in.generation, self.secondary_in.generation) \
            and not (self._zmq_control is not None
                     and self._zmq_control.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def _native_rounds(self, native_plan: tuple, timeout: float) -> dict:
        """Pair rounds in native code until one needs Python (pipeline.net.native); then
        what it read is judged here as _run_pair would have. Returns the readiness for the
        rest of the round: the poll's when another descriptor is readable, else empty."""
        pfds, nfds, ip, is_, pbuf, sbuf, tbuf, res = native_plan
        nat = self._native
        out = self.outdev
        status = nat.pair_rounds(pfds, nfds, ip, is_, out.fileno(), pbuf, sbuf, tbuf,
                                 int(timeout * 1000), NATIVE_MAX_PAIRS, NATIVE_WAIT_NS,
                                 _DELAY_BOUNDS_NS, res)
        pairs = int(res[nat.PAIRS])
        stats = self.native_stats
        if pairs:
            self.comparator.count_released_pairs(pairs, int(res[nat.BYTES]),
                                                 res[nat.DELAYS:].tolist())
            stats["pairs"] += pairs
        if res[nat.WAITS]:
            stats["waits"] += int(res[nat.WAITS])
            stats["wait_hits"] += int(res[nat.WAIT_HITS])
        name = nat.STATUS_NAMES[status]
        stats[name] = stats.get(name, 0) + 1
        if status == nat.ST_OTHER:
            return dict(self._plan[0].poll(0))
        if status == nat.ST_INPUT:
            pvm = self.primary_in.read_result(int(res[nat.P_READ]))
            svm = self.secondary_in.read_result(int(res[nat.S_READ]))
            arrived = int(res[nat.ARRIVED_NS])
            self._judge_pair(pvm, int(res[nat.P_READY]), svm, int(res[nat.S_READY]),
                             arrived / 1e9 if arrived else None)
        elif status == nat.ST_SEND:
            out.sent_partly(self.primary_in.scratch()[:int(res[nat.P_READ])],
                            int(res[nat.SENT]))
        elif status == nat.ST_ERROR:
            raise OSError(-int(res[nat.SENT]), "poll in the native pair rounds")
        return {}

    def _judge_pair(self, pvm, pvm_ready: int, svm, svm_ready: int,
                    arrived: float | None = None) -> None:
        """What the reads of each guest's stream brought: ``*_ready`` bytes at the front
        were read while readable at the poll, the rest late (``arrived``: when the reads
        were, if not now)."""
        pin, sin = self.primary_in, self.secondary_in
        if (len(pvm) > pvm_ready or len(svm) > svm_ready) and self._control_waiting():
            comparator = self.comparator
            if pvm_ready:
                comparator.push_stream(PRIMARY, pvm[:pvm_ready], pin.generation, arrived)
            if svm_ready:
                comparator.push_stream(SECONDARY, svm[:svm_ready], sin.generation, arrived)
            self._handle_control()
            if len(pvm) > pvm_ready:
                comparator.push_stream(PRIMARY, pvm[pvm_ready:], pin.generation)
            if len(svm) > svm_ready:
                comparator.push_stream(SECONDARY, svm[svm_ready:], sin.generation)
            return
        self.comparator.push_pair(pvm, pin.generation, svm, sin.generation, arrived)

    def _run_plan(self, plan, ready: dict) -> None:
        """A round of everything readable, in the plan's order (control first)."""
        late = []
        for pollable, action, fd in plan:
            if fd is not None and fd not in ready:
                if ready and action in self._late_sides:
                    late.append((pollable, action))
                continue
            if action in self._handlers:
                if action in self._primary_handlers and self.comparator.blocked:
                    continue       # blocked by an earlier source in this round
                seen = getattr(pollable, "boundaries", 0)
                frames = pollable.recv()
                if frames:
                    if getattr(pollable, "boundaries", 0) != seen:
                        self._from_stream(action, frames)
                    else:
                        action(frames)
            elif action in self._primary_handlers and self.comparator.blocked:
                continue
            else:
                action()
        # A stream source that was not readable at the poll is read anyway when something
        # else woke the loop: the other side's frame usually follows at once, and a read
        # that finds nothing costs less than another round. Frames read so may have been
        # sent after a control message that arrived meanwhile: that message goes first.
        for source, action in late:
            side = self._late_sides[action]
            if side == PRIMARY and self.comparator.blocked:
                continue
            data = source.recv_bytes()
            if data:
                if self._control_waiting():
                    self._handle_control()
                self.comparator.push_stream(side, data, source.generation)

    def inputs_exhausted(self) -> bool:
        """True when every input is a pcap file that has been read to the end."""
        sources = [s for s, _ in self._roles]
        return bool(sources) and all(isinstance(s, PcapReader) and s.exhausted for s in sources)

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or self.stop_event
        scan = self.settings.expired_scan_ms / 1000.0
        while not stop.is_set():
            self.run_once(scan)

    def close(self) -> None:
        self.adapters.close()
        self.control.close()
