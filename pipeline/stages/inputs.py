"""Guest input, both sides.

Primary (``run_client``): stands in for the clients of the protected service: feeds
the PVM a deterministic stream of inputs at ``guest.workload.input_rate_hz``, plus any
input pushed to ``client-inputs.sock`` in the run directory (benchmarks and tests use
it to make the guest do exact work), mirrors every input to the secondary tagged with
its epoch, and drains the PVM's output. The secondary keeps each input until a commit
past it, in a log of ``input_capacity``: when the outputs are compared, once half of that
arrived since the last commit and the PVM consumed a quarter of it, the client stage asks
for a checkpoint (cause ``input_log_full``; :func:`input_log_checkpoint_due`); otherwise a
fast client fills the SVM's log, the SVM stops, and the comparator holds the PVM's
answers until the timer. (Without a comparator a full log only holds the inputs back
until the next checkpoint.)
Secondary (``run_mirror``): feeds the mirrored inputs to the SVM in sequence order
and keeps them until a checkpoint past them commits, so an SVM rolled back to a
checkpoint finds exactly the input that followed the snapshot.

(The network comparator replaces the output draining with real frame comparison.)
"""
from __future__ import annotations

import os
import time

import blake3
import zmq

from pipeline import sockets, trace, wire
from pipeline.checkpoint_api import CheckpointClient
from pipeline.config import Settings
from pipeline.net.build import GuestOutputFramer
from pipeline.net.zmtp import ZmtpPull
from pipeline.stages.common import StageContext
from pipeline.xen_io.base import OUTPUT_MARK, Domain, SimulatedIO

INPUT_SIZE = 64
INJECT_SOCKET = "client-inputs.sock"


def client_input(seed: int, seq: int) -> bytes:
    """The seq-th client request: deterministic, so a test can recompute it."""
    return blake3.blake3(b"input %d %d" % (seed, seq)).digest(length=INPUT_SIZE)


class Tally:
    """Items and their bytes since the last :meth:`flush`, added to the stage's shared
    counters ``items_name`` and ``bytes_name`` only then: the counters are shared memory,
    written once per look (LOOK_S), not per item."""

    __slots__ = ("ctx", "items_name", "bytes_name", "items", "nbytes")

    def __init__(self, ctx: StageContext, items_name: str, bytes_name: str) -> None:
        self.ctx, self.items_name, self.bytes_name = ctx, items_name, bytes_name
        self.items = self.nbytes = 0

    def add(self, items: int, nbytes: int) -> None:
        self.items += items
        self.nbytes += nbytes

    def flush(self) -> None:
        if self.items:
            self.ctx.counters.add(self.items_name, self.items)
            self.ctx.counters.add(self.bytes_name, self.nbytes)
            self.items = self.nbytes = 0


class OutputPort:
    """Where a guest's output goes: to the network comparator as Ethernet/UDP frames
    (``address`` is its primary_in or secondary_in), or nowhere but the counters.

    After a takeover the survivor's guest is on the clients' network (:meth:`to_clients`):
    its frames go to this node's own comparator, which passes them through to
    ``net.outdev`` while no secondary protects the guest. None is dropped then: frames
    that cannot go yet (that comparator is still starting) are kept, and no more are read
    from the guest until they went (its output backs up, as a NIC's ring would)."""

    def __init__(self, ctx: StageContext, address: str, side: str = "") -> None:
        self.ctx, self.address, self.client = ctx, address, None
        self.side = side           # "pvm" or "svm": the request trace's name for the guest
        self.keep = False          # to_clients: keep what could not be sent
        self.pending = b""
        self._failing = False
        self._polls: dict[tuple[int, bool], list] = {}
        self.framer = GuestOutputFramer()
        #: the guest's output pipe was readable at the last wait (or is unknown: True)
        self.output_ready = True
        #: outputs and their bytes read (flushed to the counters once per look)
        self.tally = Tally(ctx, "outputs", "bytes_out")

    def to_clients(self, address: str) -> None:
        """The takeover: from now on the frames go to ``address`` (this node's comparator,
        the guest's client-facing port), without the epoch boundaries of the old pair."""
        if self.client is not None:
            self.client.close()
        self.client, self.address, self.keep, self._failing = None, address, True, False
        self.ctx.log.warning("guest output: the takeover puts the guest on the clients' "
                             "network: its frames go to %s", address)

    def deliver(self, io: SimulatedIO, compare: bool = True) -> None:
        if self.pending:
            if not self._send(self.pending):
                return
            self.pending = b""
        outs = io.read_outputs(0.0)
        self.output_ready = False      # read to the end: the next wait says when more came
        if not outs:
            return
        # one pass: counted, and framed for the comparator. Epoch boundaries the node
        # marked in the guest's output go in the same stream, in place (their tags are
        # already framed): the comparator sees them in order. On the clients' network
        # there are none (the old pair's would read as the PVM's).
        send = compare and bool(self.address)
        frame, keep, parts = self.framer.frame, self.keep, []
        n = nbytes = 0
        for seq, f in outs:
            if seq != OUTPUT_MARK:
                n += 1
                nbytes += len(f)
                if send:
                    parts.append(frame(f))
            elif send and not keep:
                parts.append(f)
        self.tally.add(n, nbytes)
        if not send:
            return
        data = b"".join(parts)
        sent_ns = time.monotonic_ns() if trace.REQUESTS else 0   # (before: see run_client)
        sent = self._send(data)
        if not sent and self.keep:
            self.pending = data
        if sent and trace.REQUESTS:
            for seq, _ in outs:
                trace.request(f"{self.side}_out" if seq != OUTPUT_MARK else
                              f"{self.side}_mark", seq if seq != OUTPUT_MARK else -1,
                              at_ns=sent_ns)

    def wait(self, io: SimulatedIO, sock: zmq.Socket | ZmtpPull | None,
             timeout_ms: int) -> bool:
        """Sleep until ``sock`` has a message, the guest wrote output, or ``timeout_ms``
        passed; whether ``sock`` is readable (``output_ready``: whether the output is, or
        the wait timed out: then a look costs nothing, and finds epoch marks that came
        without a frame). A stage that slept on its input alone left
        the guest's answers in the pipe until the next input came (at 200 requests/s, up
        to 5 ms on every answer; the SVM's commit boundary, which releases the PVM's held
        answers, as long). Not while frames are kept back: those are retried at the next
        turn, not in a spin. One zmq_poll (pyzmq's Poller costs twice as much per call).
        A :class:`ZmtpPull` is read in this same wait (its peers' descriptors are in the
        poll): True once it holds a message."""
        watch = not self.pending
        pull = sock if isinstance(sock, ZmtpPull) else None
        key = (id(sock), pull.generation if pull is not None else 0, watch)
        items = self._polls.get(key)
        if items is None:
            if pull is not None:
                self._polls = {k: v for k, v in self._polls.items() if k[0] != id(sock)}
            items = self._polls[key] = (
                (pull.poll_items() if pull is not None else
                 [(sock, zmq.POLLIN)] if sock is not None else [])
                + ([(io.output_fileno(), zmq.POLLIN)] if watch else []))
        if not items:
            time.sleep(timeout_ms / 1000)
            self.output_ready = True
            return False
        ready = zmq.zmq_poll(items, timeout_ms)
        sock_ready = False
        self.output_ready = not ready
        out_fd = io.output_fileno() if watch else -1
        pulled = []
        for what, _ in ready:
            if what is sock:
                sock_ready = True
            elif what == out_fd:
                self.output_ready = True
            else:
                pulled.append(what)
        if pulled:
            pull.take_ready(pulled)
            sock_ready = bool(pull.messages)
        return sock_ready

    def _send(self, data: bytes) -> bool:
        from pipeline.net.adapters import StreamClient
        try:
            if self.client is None:
                self.client = StreamClient(self.address, timeout=0.5)
            # the comparator stops reading while it holds as much as it may (until the
            # next commit): wait for it, as a guest's full NIC ring would, but not past a stop
            self.client.send_bytes(data, give_up=self.ctx.stopping)
            self._failing = False
            return True
        except (OSError, ConnectionError) as exc:
            # the comparator is not there (yet, or any more): compared, the frames are lost
            # to it, which it sees as unmatched frames (a checkpoint), never as a wrong match
            self.ctx.counters.add("errors", 1)
            if not (self.keep and self._failing):   # kept frames are retried: say it once
                self.ctx.log.warning("guest output: comparator at %s unreachable: %s",
                                     self.address, exc)
            self._failing = True
            if self.client is not None:
                self.client.close()
            self.client = None
            return False

    def close(self) -> None:
        self.tally.flush()
        if self.client is not None:
            self.client.close()


#: how often the client stage and the mirror look at the checkpoint events (and the
#: client stage at its guest's input position) while busy: a commit's trim or an
#: input_log_full request a few ms later changes nothing (the log holds thousands)
LOOK_S = 0.005

#: how long the secondary waits for the input a checkpoint caught the PVM inside before it
#: discards the epoch: the primary mirrors an input right after feeding it, so only a
#: primary that died in between (or an inputs channel that broke) leaves it missing; the
#: coordinator tears the epoch sooner when it knows the primary is lost
CHECKPOINT_INPUT_WAIT_S = 10.0


def await_checkpoint_input(io: SimulatedIO, vcpu: bytes, give_up, counters=None,
                           timeout_s: float = CHECKPOINT_INPUT_WAIT_S) -> str:
    """Secondary, before a checkpoint's vCPU state is loaded into the SVM: wait until the
    SVM's input log holds the input the checkpoint caught the PVM inside. The primary
    feeds its guest an input before it mirrors it, so the log may lag; a primary that dies
    in between never sends it, and an SVM loaded with the state waited for it for good
    (after a takeover the new primary's client stage filled that seq, maybe with another
    payload than the one the guest had begun). "" once the log holds it (or the PVM was
    between inputs: nothing it began is missing), else why not: not mirrored within
    ``timeout_s``, ``give_up()`` (the epoch torn meanwhile), or a gap in the log. A blob
    the guest refuses is left to ``set_vcpu_state`` to refuse. ``counters``:
    ``inputs_awaited`` counts the checkpoints that had to wait."""
    try:
        seq = io.vcpu_input_seq(vcpu)
        if io.vcpu_inputs_taken(vcpu) == seq:
            return ""
    except ValueError:
        return ""

    def held() -> bool:
        try:
            io.input_payload(seq)
            return True
        except LookupError:
            return False
    if io.input_head > seq and held():
        return ""
    if seq >= io.input_limit():
        # the log cannot take it before this commit trims it: it keeps every input since
        # the last commit (a rollback replays them) and the SVM, paused, moves past none.
        # The mirror holds it back meanwhile; waiting would only tear the epoch after
        # timeout_s, the SVM paused and the PVM's answers held all that time (a fast
        # client: a checkpoint asked for at half the log caught the PVM beyond it). Applied
        # as before: the SVM waits for it once the commit made room. (The bound is the
        # log's, the last commit's position on, not the SVM's own position on: that let
        # every such checkpoint wait the whole timeout and be torn.)
        return ""
    if counters is not None:
        counters.add("inputs_awaited", 1)
    t0 = time.monotonic()
    delay = 0.0002
    while io.input_head <= seq:
        waited, torn = time.monotonic() - t0, give_up()
        if torn or waited >= timeout_s:
            return (f"input seq {seq}, which the checkpoint caught the PVM in the middle of, "
                    f"is not in the SVM's input log (its head is {io.input_head}) after "
                    f"{waited:.1f} s" + (" (the epoch was torn meanwhile)" if torn else ""))
        time.sleep(delay)
        delay = min(delay * 2, 0.005)
    if not held():
        return (f"input seq {seq}, which the checkpoint caught the PVM in the middle of, is "
                f"missing from the SVM's input log (a gap: head {io.input_head})")
    return ""


def input_log_checkpoint_due(head: int, consumed: int, committed: int,
                             keep_limit: int) -> bool:
    """Whether the client stage asks for a checkpoint for the SVM's input log (cause
    ``input_log_full``): ``keep_limit`` inputs (half the log) arrived since the last
    commit, and the PVM consumed at least half as many since. ``head``: the next input's
    seq; ``consumed``: the PVM's input position; ``committed``: its position at the last
    committed checkpoint.

    A checkpoint frees the SVM's log only up to the PVM's position at its snapshot (the
    SVM, put at that state, needs every input from there on). So while the PVM has a
    backlog of half the log or more (a client offering more than the guest serves),
    asking after every commit freed next to nothing, and paused both guests each time:
    at 5000 requests/s on a 2-core machine whose PVM served ~1400/s, 12-15 checkpoints a
    second. The SVM does not starve meanwhile: it needs only the inputs the PVM consumed
    since the last commit (its log holds those), and the mirror holds back newer ones
    until a commit makes room."""
    return head - committed >= keep_limit and consumed - committed >= max(1, keep_limit // 2)


def inject_address(run_dir: str) -> str:
    return "ipc://" + os.path.join(run_dir, INJECT_SOCKET)


def resend_unconsumed(out: zmq.Socket, io: SimulatedIO, epoch: int, stop, give_up) -> bool:
    """Send a secondary that just joined every input the PVM has not consumed yet, in
    order; False if ``stop`` was set or ``give_up()`` became true (the secondary was lost
    again) first. The inputs channel queues only for a connected peer, so a send to a
    secondary that went away waits until one of the two: a resend that waited for ``stop``
    alone kept the client stage, and so the PVM's service, stalled for as long as the
    node ran (fault matrix, partition-pages: the re-joining secondary stopped as stale
    mid-resend and the PVM served nothing more)."""
    for seq in range(io.input_seq(), io.input_head):
        if not sockets.send_until_stopped(out, wire.encode_input(epoch, seq,
                                                                 io.input_payload(seq)),
                                          stop, give_up=give_up):
            return False
    return True


def run_client(ctx: StageContext, settings: Settings, domain: Domain, shared) -> None:
    io = domain.simulated_io()
    nctx = sockets.NodeContext(settings)
    out = sockets.inputs_out(nctx)
    # client-inputs.sock, read by this thread in its own wait (pipeline/net/zmtp.py: as
    # a libzmq PULL socket it was read by the context's I/O thread, which then woke this
    # one: a wake-up and a hop more on every request's way to the guest)
    injected = ZmtpPull(inject_address(settings.run_dir), on_error=lambda why: (
        ctx.counters.add("errors", 1), ctx.log.warning("client inputs: %s", why)))
    rate = settings.guest.workload.input_rate_hz
    period = 1.0 / rate if rate > 0 else None
    next_at = time.monotonic()
    # the client's stream goes on where the guest is: a survivor of a takeover became the
    # primary around a guest that consumed inputs 0 .. input_head - 1 already
    n = io.input_head
    payload: bytes | None = None
    was_unprotected = False
    port = OutputPort(ctx, settings.net.primary_in, "pvm")
    events = CheckpointClient(settings.run_dir, nctx.ctx)
    committed_seq = 0         # inputs below it are in a committed checkpoint: trimmed there
    asked = False             # input_log_full asked for since the last commit
    keep_limit = max(1, io.input_capacity // 2) if settings.net.primary_in else None
    next_look = 0.0           # the next look at the checkpoint events
    tally = Tally(ctx, "items_out", "bytes_out")   # inputs fed to the PVM
    try:
        while True:
            # per turn only what this turn needs: the output when the wait saw it or timed
            # out; every LOOK_S the stop flag (ctx.stopping: this stage's turn, its fault
            # point; a lock), the events (and the output then too: an epoch mark comes
            # without a frame), the counters (shared memory) and whether the SVM's input
            # log asks for a checkpoint. Each of those looks is a zmq poll, a read or a
            # lock, and a request made three turns of all of them. (Not before each wait
            # either: a wait ends within 50 ms, and the turn after it looks.)
            now = time.monotonic()
            look = now >= next_look
            if look and ctx.stopping():
                break
            if port.output_ready or port.pending or look:
                port.deliver(io)
            if look:
                next_look = now + LOOK_S
                port.tally.flush()
                tally.flush()
                ctx.counters.set("pvm_input_seq", io.input_seq())
                for ev in events.poll_events(0):
                    if ev.event == "committed":
                        committed_seq = max(committed_seq, ev.extra.get("input_seq", -1))
                        asked = False
                # (the log takes thousands: a look every LOOK_S is soon enough to ask)
                if keep_limit is not None and not asked and input_log_checkpoint_due(
                        io.input_head, io.input_seq(), committed_seq, keep_limit) \
                        and not shared.unprotected.value:
                    asked = True
                    events.request("input_log_full",
                                   f"{io.input_head - committed_seq} inputs since the last "
                                   f"commit, {io.input_seq() - committed_seq} consumed")
            # one look per input: whether it is mirrored must agree with whether the resend
            # below covered it (a secondary that joins between two looks would otherwise
            # get this input first and the older ones after it, which it then refuses)
            unprotected = bool(shared.unprotected.value)
            if unprotected:
                was_unprotected = True
            elif was_unprotected:
                # a new secondary: it needs every input the PVM has not consumed yet (its
                # first checkpoint may be taken before the PVM gets to them). If it is lost
                # again during the resend, the guest goes on unprotected and the next
                # secondary gets the whole resend.
                was_unprotected = not resend_unconsumed(
                    out, io, shared.epoch.value, ctx.stop,
                    give_up=lambda: bool(shared.unprotected.value))
                if was_unprotected and ctx.stop.is_set():
                    return      # (not stopping(): once per turn, it is the stage's fault point)
            if payload is None:
                payload = injected.recv()     # what the last wait read (no system call)
                if payload is None and period is not None and time.monotonic() >= next_at:
                    now = time.monotonic()
                    next_at += period
                    if next_at < now - 1.0:   # fell far behind (guest paused long): no burst
                        next_at = now
                    payload = client_input(settings.guest.workload.seed, n)
                    n += 1
                if payload is None:
                    wait = 0.05 if period is None else max(0.0, min(next_at - time.monotonic(),
                                                                   0.05))
                    port.wait(io, injected, int(wait * 1000))
                    continue
            # room for the input: what the PVM consumed is kept no longer (a new secondary
            # needs only what it has not consumed); briefly, so outputs keep being read
            io.trim_inputs(io.input_seq())
            # In the PVM's log first (a secondary never holds an input the PVM's log has
            # not), then mirrored, then the PVM's doorbell: rung first, the PVM took this
            # CPU at once whenever the other one was busy (the kernel's wake-up preemption),
            # and the mirror, which the SVM's answer and so the release wait for, went out
            # only after the PVM's whole answer (cProfile's wall clock at load 10-15:
            # 0.32 ms per eventfd_write)
            fed_ns = time.monotonic_ns() if trace.REQUESTS else 0
            try:
                seq = io.feed_input(payload, timeout=0.05, wake=False)
            except TimeoutError:
                ctx.counters.add("input_full", 1)   # the PVM is not keeping up: try again
                port.output_ready = True            # (after reading what it answered)
                continue
            if trace.REQUESTS:
                trace.request("pvm_fed", seq, at_ns=fed_ns)
            # unprotected (no secondary): nothing to mirror to; a new secondary gets the
            # guest's state by a full sync, not by replaying input
            # (a hand-off is timed before it is made: its receiver may go on before we do)
            mirrored_ns = time.monotonic_ns() if trace.REQUESTS else 0
            mirrored = unprotected or sockets.send_until_stopped(
                out, wire.encode_input(shared.epoch.value, seq, payload), ctx.stop,
                give_up=lambda: bool(shared.unprotected.value))
            io.wake_guest()
            if not mirrored:
                if ctx.stopping():
                    return
            elif trace.REQUESTS and not unprotected:
                trace.request("mirrored", seq, at_ns=mirrored_ns)
            tally.add(1, len(payload))
            payload = None
    finally:
        tally.flush()
        trace.flush_requests()
        port.close()
        events.close()
        injected.close()
        nctx.close()


def run_mirror(ctx: StageContext, settings: Settings, domain: Domain, shared,
               becomes_primary: bool = False) -> None:
    """Until a takeover: feed the SVM the primary's inputs. After it (``shared.active``):
    the SVM is the service, and this stage becomes its client, going on with the same
    input stream where the mirrored one stopped. ``becomes_primary`` (role auto): the node
    will run the primary's stages, its comparator among them; the guest's output goes
    there from the takeover on (OutputPort.to_clients)."""
    io = domain.simulated_io()
    nctx = sockets.NodeContext(settings)
    inp = sockets.inputs_in(nctx)
    events = CheckpointClient(settings.run_dir, nctx.ctx)
    held: tuple[int, bytes] | None = None
    fed = 0
    svm_ran = False           # a checkpoint committed here: the SVM runs from its inputs
    rate = settings.guest.workload.input_rate_hz
    next_at = 0.0
    port = OutputPort(ctx, settings.net.secondary_in, "svm")
    next_look = 0.0           # the next look at the checkpoint events (see run_client)
    tally = Tally(ctx, "items_in", "bytes_in")   # inputs fed to the SVM
    try:
        while True:
            # compared while the primary is there; once active the SVM's output is the
            # service's output: it goes to the clients through this node's own comparator
            # (it starts passing frames through as the node becomes the primary)
            active = shared.active.value
            now = time.monotonic()
            look = now >= next_look
            # the stop flag as in run_client: every LOOK_S (and every turn once active)
            if (look or active) and ctx.stopping():
                break
            if active and becomes_primary and not port.keep and settings.net.primary_in:
                port.to_clients(settings.net.primary_in)
            if port.output_ready or port.pending or look or active:
                port.deliver(io, compare=not active or port.keep)
            if look:
                next_look = now + LOOK_S
                port.tally.flush()
                tally.flush()
                ctx.counters.set("svm_input_seq", io.input_seq())
            if active:
                ctx.counters.set("svm_input_seq", io.input_seq())
                if shared.hold_inputs.value or rate <= 0:
                    port.wait(io, None, 5)
                    continue
                now = time.monotonic()
                if now < next_at:
                    port.wait(io, None, max(1, int(min(next_at - now, 0.05) * 1000)))
                    continue
                next_at = max(next_at + 1.0 / rate, now - 1.0)
                n = io.input_head
                try:
                    io.feed_input(client_input(settings.guest.workload.seed, n), seq=n)
                except TimeoutError:
                    ctx.counters.add("input_full", 1)
                    continue
                io.trim_inputs(io.input_seq())
                ctx.counters.add("inputs_generated", 1)
                continue
            for ev in events.poll_events(0) if look else ():
                seq = ev.extra.get("input_seq", -1)
                if ev.event == "committed" and seq >= 0:
                    svm_ran = True
                    io.trim_inputs(seq)
            if held is None:
                if not port.wait(io, inp, 20):
                    continue
                try:
                    _epoch, seq, payload = wire.decode_input(inp.recv())
                except wire.WireError as exc:
                    ctx.counters.add("errors", 1)
                    ctx.log.warning("inputs channel: dropped a bad record: %s", exc)
                    continue
                held = (seq, payload)
                if trace.REQUESTS:
                    trace.request("svm_recv", seq)
            if fed == 0 and held[0] != io.input_head or not svm_ran and held[0] > io.input_head:
                # joining a primary whose input stream is already at held[0]; or a gap
                # before this SVM ever ran: it began mirroring to this new secondary while
                # it still took it for the one it lost, then went unprotected (mirroring
                # nothing) and re-protects it from its guest's input position. The SVM
                # starts from a checkpoint of the new sync: it needs inputs from there on
                try:
                    io.start_inputs_at(held[0])
                except ValueError as exc:
                    ctx.counters.add("errors", 1)
                    ctx.log.warning("inputs channel: refused input %d: %s", held[0], exc)
                    held = None
                    continue
                if fed:
                    ctx.log.warning("inputs channel: the input stream starts over at seq %d "
                                    "(a gap before this secondary's SVM ever ran)", held[0])
            try:
                # briefly: while the log is full, the commit that trims it must be seen
                fed_ns = time.monotonic_ns() if trace.REQUESTS else 0
                io.feed_input(held[1], seq=held[0], timeout=0.05)
                fed += 1
                if trace.REQUESTS:
                    trace.request("svm_fed", held[0], at_ns=fed_ns)
            except TimeoutError:
                # The SVM's input log is full until a checkpoint commits and trims it; the
                # input stays held here (and back-pressure reaches the primary), never dropped.
                ctx.counters.add("input_full", 1)
                next_look = 0.0        # the commit's event, and the SVM's answers, at once
                continue
            except ValueError as exc:
                ctx.counters.add("errors", 1)
                ctx.log.warning("inputs channel: refused input %d: %s", held[0], exc)
                held = None
                continue
            tally.add(1, len(held[1]))
            held = None
    finally:
        tally.flush()
        trace.flush_requests()
        port.close()
        events.close()
        nctx.close()
