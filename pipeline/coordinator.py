"""The checkpoint protocol of each side (docs/architecture.md, "One checkpoint").

``PrimaryCoordinator.checkpoint`` and ``SecondaryCoordinator.checkpoint`` are one epoch
each, read top to bottom, step for step the two halves of one exchange (as QEMU's
``colo_do_checkpoint_transaction`` and ``colo_process_incoming_thread`` are):

  primary, epoch e                              secondary, epoch e
  1. send CHECKPOINT_BEGIN(e)             --->  1. pause the SVM, read and clear its
                                                   dirty log, answer SVM_DIRTY(e); ask
                                                   the restore stage to apply e
  2. the snapshot stage pauses the PVM,         2. the restore stage applies e once it
     copies its dirty pages and vCPU state,        has assembled it (every page verified);
     resumes it; publish ``snapshot``              e torn (timeout, newer BEGIN, primary
  3. wait for SVM_DIRTY(e), the send stage's       lost): have it rolled back instead
     Sent(e) and ACK(e)                     <---  3. resume the SVM, answer ACK(e)
  4. committed: fold the epoch's hashes in,     4. committed: publish ``committed``;
     publish ``committed``; torn: carry the        torn: publish ``aborted``
     epoch's pages into the next

Early ACK: the secondary answers ACK(e) once the restore stage has checked e whole (every
page verified and counted, the SVM pages unchanged, the vCPU state taken), while it
writes e's pages; the SVM resumes once they are written (its memory is e's: Written), a
takeover goes on from e only once the restore stage's cache has them too (Applied). A
secondary that dies in between is stale (its SVM half-applied, never used).
A proof checkpoint (FLAG_DIGEST) is ACKed after the apply: its ACK carries the digest.

Which node holds the active role, and the secondary's takeover when the primary is lost,
are ``pipeline/failover/takeover.py``; the coordinators call it.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from pipeline import faults, messages, seal, sockets, trace, wire
from pipeline.checkpoint_api import CAUSES, CheckpointBus
from pipeline.config import Settings
from pipeline.counters import STATUS_ABORTED, STATUS_COMMITTED, NodeCounters
from pipeline.failover.roles import record_role
from pipeline.failover.takeover import PrimaryRole, PrimaryStart, SecondaryRole
from pipeline.net.framing import BOUNDARY_COMMITTED, BOUNDARY_ROLLED_BACK, encode_boundary
from pipeline.pfns import in_sorted_pfns, union_pfns, unique_pfns
from pipeline.stages.common import (HashTable, StageContext, SvmPages, domain_page_hashes,
                                    rows_unlike, zero_page_hash)
from pipeline.stages.send import Pending
from pipeline.xen_io.base import Domain, DomainError

log = logging.getLogger(__name__)

TICK_S = 0.002   # the shortest gap between two looks at the PVM's dirty count
#: the longest the idle primary sleeps between looks at its lease and stop flag (a request
#: or a heartbeat event wakes it at once)
IDLE_WAIT_S = 0.02
#: the longest the primary's epoch loop waits in one go for the disk's forwards to be acked
FORWARD_WAIT_SLICE_MS = 20
#: the secondary's wait for an epoch's disk seal, in slices of this (heartbeat events and
#: control records are taken in between: a primary lost before its seal ends the wait)
SEAL_SLICE_MS = 20
#: an unprotected primary dials the control channel anew after this many unanswered HELLOs
CONTROL_REDIAL_HELLOS = 3


def poll_ms(seconds: float) -> int:
    """A wait of ``seconds`` as zmq's poll timeout: whole milliseconds, rounded up.
    pyzmq's ``Poller.poll`` cuts a float to its whole ms, so a wait of 0.7 ms polled
    without waiting and the loop around it spun until its due time, at real-time priority
    (the secondary's loop between prehash rounds, at PausePriority.HOP: up to a
    millisecond before each round, ~60 ms of a core a second at 1000 requests/s, taken
    from the SVM and the request path; the primary's idle wait as often before each
    dirty-count look). Rounded up, the wait ends at most a millisecond late instead."""
    return max(0, math.ceil(seconds * 1000))


class ProtocolError(RuntimeError):
    """The peer said something that breaks the checkpoint protocol."""


class PeerLost(RuntimeError):
    """The heartbeat stage declared the peer lost."""


class StaleSecondary(RuntimeError):
    """A primary starts a full sync of a secondary that already ran its SVM from
    checkpoints (it went unprotected meanwhile: a partition healed). Such a secondary
    stops; started again it joins as a new one."""


PRECOPY_MAX_ROUNDS = 8   # live pre-copy rounds before the first paused checkpoint
SYNC_ATTEMPTS = 3        # full syncs tried, while the secondary answers, before giving up


def dirty_threshold_reachable(cp, page_count: int) -> bool:
    """Whether the PVM's dirty count can reach ``cp.dirty_threshold_pages`` on a guest of
    ``page_count`` pages: a count is at most the guest's pages (twice as many with the
    prescan: its pages and the log's are counted apart). Where it cannot, the primary
    coordinator never looks: at 1000 requests/s an 8192-page guest's looks (the default
    threshold is 16384) were 5-7 of its 14-17 us a request, at normal priority beside the
    client stage, the PVM and the comparator (docs/tuning.md, Session 19 (svc))."""
    return cp.dirty_threshold_pages <= page_count * (2 if cp.prescan_ms else 1)


def _handshake_check(settings: Settings, domain: Domain, hello: wire.Hello) -> None:
    if hello.page_size != domain.page_size or hello.page_count != domain.page_count:
        raise ProtocolError(
            f"peer {hello.name!r} has a guest of {hello.page_count} pages of {hello.page_size} "
            f"bytes; this node's guest has {domain.page_count} pages of {domain.page_size} bytes")


def _agree_written(domain: Domain, hello: wire.Hello) -> None:
    """Both nodes must leave out of the proof, and the secondary keep, the same bytes the
    hypervisor writes itself: the secondary adopts or refuses the primary's, the primary
    refuses an answer that differs from its own. A disagreement is an error at start."""
    try:
        domain.agree_hypervisor_written(hello.written, peer_is_primary=hello.role == wire.ROLE_PRIMARY)
    except DomainError as exc:
        raise ProtocolError(f"peer {hello.name!r}: {exc}") from None


def _agree_seal(settings: Settings, shared, hello: wire.Hello, primary_share: bytes | None,
                secondary_share: bytes | None) -> int | None:
    """security.mode = "sealed": the session's key from both HELLOs' shares, installed for
    this node's stages (pipeline/seal.py); returns its key id (None if not sealed). A peer
    whose HELLO disagrees about sealing is an error naming both modes."""
    sealed = settings.security.mode == "sealed"
    if (hello.seal_share is not None) != sealed:
        raise ProtocolError(
            f"peer {hello.name!r} " + ("does not seal the pages channel; this node's "
                                       "security.mode is 'sealed'" if sealed else
                                       "seals the pages channel (security.mode = 'sealed'); "
                                       f"this node's is {settings.security.mode!r}")
            + ": both nodes must have the same security.mode")
    if not sealed:
        return None
    key_id, key = seal.derive_key(primary_share, secondary_share)
    shared.seal.install(key_id, key)
    return key_id


def _send_control(sock: zmq.Socket, msg: bytes, ctx: StageContext, counters,
                  route: bytes | None = None) -> bool:
    """Send on the control channel (the secondary's ROUTER: to ``route``, the connection
    the primary spoke on last); when the peer is gone the record is dropped (counted):
    the protocol recovers by timeouts and a fresh HELLO, never by blocking a coordinator."""
    try:
        if route is None:
            sock.send(msg)
        else:
            sock.send_multipart((route, msg))
        return True
    except zmq.ZMQError as exc:     # EAGAIN: no connection; EHOSTUNREACH: the route is gone
        if exc.errno not in (zmq.EAGAIN, zmq.EHOSTUNREACH):
            raise
        counters.add("control_dropped", 1)
        ctx.log.warning("control channel: peer not reachable, dropped a %s record",
                        wire.decode_header(msg).name)
        return False


def _recv_control(sock: zmq.Socket, ctx: StageContext, counters, routed: bool = False
                  ) -> tuple[bytes | None, wire.Header, bytes] | None:
    """One validated control record as (route, header, record), or None; bad records are
    counted and dropped. ``routed``: the secondary's ROUTER, whose first frame names the
    connection the record came on (the route; None on the primary's DEALER)."""
    frames = sock.recv_multipart() if routed else [sock.recv()]
    try:
        if len(frames) != 1 + routed:
            raise wire.WireError(f"{len(frames) - 1} frames on the control channel, "
                                 "expected 1")
        return (frames[0] if routed else None), wire.decode_header(frames[-1]), frames[-1]
    except wire.WireError as exc:
        counters.add("errors", 1)
        ctx.log.warning("control channel: dropped a bad record: %s", exc)
        return None


@dataclass
class EpochResult:
    epoch: int
    cause: str
    started_ns: int
    pause_ns: int = 0
    pages_dirty: int = 0
    svm_dirty: int = -1
    sent: messages.Sent | None = None
    ack: wire.Ack | None = None
    input_seq: int = -1
    input_step: int = 0     # pages of input ``input_seq`` already written at the pause
    pvm_digest: bytes = b""
    svm_forwarded: bool = False   # the send stage was told about SVM_DIRTY's hashes
    verify_ns: int = 0
    extra: dict = field(default_factory=dict)


class _Coordinator:
    """What both sides' coordinators share: the control channel, the checkpoint bus, the
    disk stage's control, and the node info. Made in ``__init__`` (in the coordinator's
    own process), closed by :meth:`close`."""

    ctx: StageContext
    node: NodeCounters

    def _open(self, settings: Settings, role: str) -> None:
        # the control records' I/O threads at the priority the checkpoint's hops run at
        self.nctx = sockets.NodeContext(
            settings, io_realtime=self.priority.HOP if self.priority.permitted() else 0)
        self.control = sockets.control(self.nctx)
        self.bus = CheckpointBus(settings.run_dir, self.nctx.ctx)
        self.disk = None
        if settings.disk.enabled:
            from pipeline.stages.disk import DiskControl
            self.disk = DiskControl(settings.run_dir, role)

    def close(self) -> None:
        self.bus.close()
        self.nctx.close()

    def _send(self, msg: bytes) -> bool:
        return _send_control(self.control, msg, self.ctx, self.ctx.counters)

    def _info(self, **kw) -> None:
        info = self.node.node_info()
        info.update(kw)
        self.node.set_node_info(info)


class PrimaryCoordinator(_Coordinator):
    def __init__(self, ctx: StageContext, settings: Settings, node: NodeCounters, domain: Domain,
                 snap_ctrl, send_ctrl, table: HashTable, pending: Pending, shared,
                 hb_events, svm: SvmPages | None = None,
                 start: PrimaryStart | None = None) -> None:
        self.ctx, self.settings, self.node, self.domain = ctx, settings, node, domain
        self.snap_ctrl, self.send_ctrl = snap_ctrl, send_ctrl
        self.table, self.pending, self.shared = table, pending, shared
        self.hb_events = hb_events
        self.svm = svm      # where the SVM's page hashes go for the digest workers
        self.c = ctx.counters
        self.start = start or PrimaryStart()
        self.epoch = self.start.first_epoch
        # the last checkpoint was torn: the snapshot stage takes the pages it took off the
        # PVM's dirty log for it again (SnapshotCmd.retake)
        self.retake = False
        self.last_checkpoint = 0.0
        self.pending_request: tuple[str, int] | None = None
        self.unprotected = False
        self.peer_name = ""
        self.role = PrimaryRole(settings, shared, self._info, node.node_info)
        self.next_dirty_check = 0.0   # monotonic time of the next dirty-count look
        self.dirty_countable = dirty_threshold_reachable(settings.checkpoint,
                                                         domain.page_count)
        self._snapshot_counters = None  # (prescan_held)
        self.snapshots = 0          # paused checkpoints taken (checkpoint.verify_every counts them)
        # a checkpoint's records are awaited at the pause's priority (below, checkpoint)
        from pipeline.stages.snapshot import PausePriority
        self.priority = PausePriority(settings.pipeline.pause_priority == "realtime")
        self._open(settings, "primary")
        self.disk_sync = None       # the disk sync's progress, copied into the node info
        if self.disk is not None:
            from pipeline.disk.progress import NodeInfoNote
            self.disk_sync = NodeInfoNote(node.stage("disk").as_dict)

    # -- helpers ----------------------------------------------------------

    def _heartbeat_lost(self) -> bool:
        """Read the heartbeat stage's events; True if it declared the secondary lost."""
        lost = False
        while self.hb_events.poll(0):
            lost = self.role.heard(self.hb_events.recv()) or lost
        self.role.check()
        return lost

    def _progress(self, res: EpochResult, total: int, base: int) -> None:
        """Full sync progress: node info for stats, a bar on a terminal."""
        done = self.node.stage("send").as_dict()["items_in"] - base
        frac = min(1.0, done / total) if total else 1.0
        self._info(sync_progress=round(frac, 4), sync_epoch=res.epoch)
        if sys.stderr.isatty():
            bar = "#" * int(frac * 40)
            sys.stderr.write(f"\rfull sync epoch {res.epoch} [{bar:<40}] {frac * 100:5.1f}%")
            if frac >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def _wait(self, deadline: float, want: set[str], res: EpochResult,
              sync_total: int = 0) -> None:
        """Wait until every event in ``want`` happened for ``res.epoch`` (or the deadline)."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.snap_ctrl.fileno(), zmq.POLLIN)
        poller.register(self.send_ctrl.fileno(), zmq.POLLIN)
        poller.register(self.hb_events.fileno(), zmq.POLLIN)
        base = self.node.stage("send").as_dict()["items_in"]
        while want and not self.ctx.stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"epoch {res.epoch}: no {', '.join(sorted(want))} within "
                                   f"{self.settings.checkpoint.epoch_timeout_ms} ms")
            if "forwarded" in want and self._forwarded(res.epoch, left):
                want.discard("forwarded")
            # while the disk's forwards are awaited, its wait slice was this turn's sleep
            events = dict(poller.poll(0 if "forwarded" in want else min(left, 0.2) * 1000))
            # a lost lease ends the wait: the secondary that took over will not ACK, and
            # this stale primary must give its role up now, not at the epoch timeout
            self.role.check()
            if self.hb_events.fileno() in events and self._heartbeat_lost():
                raise PeerLost(f"epoch {res.epoch}: the secondary was lost")
            if sync_total:
                self._progress(res, sync_total, base)
            if self.disk_sync is not None:
                self.disk_sync.update(self._info)
            if self.snap_ctrl.fileno() in events:
                m = self.snap_ctrl.recv()
                trace.point("snap_msg", res.epoch)
                if m.epoch != res.epoch:
                    # a torn epoch's answer, late: the snapshot stage went on with it after
                    # the epoch was given up. Not this epoch's figures (its PVM digest was
                    # compared with the next epoch's SVM digest, its input_seq published
                    # as the next one's commit)
                    self.c.add("stale_records", 1)
                    self.ctx.log.warning("epoch=%d event=stale_snapshot the snapshot stage's "
                                         "answer for epoch %d came late: ignored", res.epoch,
                                         m.epoch, extra={"epoch": res.epoch})
                    continue
                if isinstance(m, messages.Snapshotted):
                    e = m.epoch
                    res.pages_dirty, res.pause_ns, res.input_seq = m.pages, m.pause_ns, m.input_seq
                    res.pvm_digest, res.verify_ns = m.digest, m.verify_ns
                    res.input_step = m.input_step
                    self.bus.publish("snapshot", e, input_seq=res.input_seq)
                    if self.disk is not None:
                        # writes the guest issued before the snapshot reach the
                        # secondary's buffer before the epoch counts as committed
                        # (awaited in slices at the top of this loop, never in one block)
                        want.add("forwarded")
                elif isinstance(m, (messages.Synced, messages.Precopied)):
                    res.pages_dirty = m.pages
                want.discard("snapshotted")
            if self.send_ctrl.fileno() in events:
                m = self.send_ctrl.recv()
                if m.epoch == res.epoch:
                    trace.point("sent_msg", res.epoch)
                    res.sent = m
                    want.discard("sent")
            if self.control in events:
                got = _recv_control(self.control, self.ctx, self.c)
                if got is None:
                    continue
                _, hdr, msg = got
                if hdr.type == wire.SVM_DIRTY and hdr.epoch == res.epoch:
                    svm = wire.decode_svm_dirty(msg, self.domain.page_count)
                    res.svm_dirty = max(res.svm_dirty, 0) + len(svm.pfns)
                    trace.point("svm_dirty_in", res.epoch, str(len(svm.pfns)))
                    self._svm_hashes(res, svm)
                    trace.point("svm_published", res.epoch)
                    if svm.more:
                        self.c.add("svm_dirty_parts", 1)
                    else:
                        want.discard("svm_dirty")
                elif hdr.type == wire.ACK and hdr.epoch == res.epoch:
                    res.ack = wire.decode_ack(msg)
                    trace.point("ack_in", res.epoch)
                    want.discard("ack")
                elif hdr.type == wire.SHUTDOWN:
                    try:
                        wire.decode_shutdown(msg)
                    except wire.WireError as exc:  # a SHUTDOWN with a body: not a stop
                        self.c.add("errors", 1)
                        self.ctx.log.warning("control: dropped a bad record: %s", exc)
                        continue
                    raise ProtocolError("the secondary is shutting down")
                else:
                    self.c.add("stale_records", 1)
                    self.ctx.log.warning("control: ignored %s of epoch %d while in epoch %d",
                                         hdr.name, hdr.epoch, res.epoch)

    def _forwarded(self, epoch: int, left_s: float) -> bool:
        """Are the disk's writes of ``epoch`` and before acked by the secondary? Waits one
        short slice at most: a disk path that is stuck (an initial sync that gets no acks,
        a disk stage busy elsewhere) must not hold this loop, which hears a lost
        heartbeat and the lease, and tears the epoch at its deadline with a clear error:
        before the secondary's control-silence limit (epoch timeout + max interval)."""
        from pipeline.stages.disk import DiskControlError
        slice_ms = max(1, int(min(left_s * 1000, FORWARD_WAIT_SLICE_MS)))
        try:
            return self.disk.wait_forwarded(epoch, slice_ms,
                                            reply_timeout_ms=max(1, int(left_s * 1000)))
        except DiskControlError as exc:
            if left_s * 1000 <= 10 * FORWARD_WAIT_SLICE_MS:
                return False     # the epoch's last slice: the deadline says it
            raise TimeoutError(f"epoch {epoch}: the disk stage did not say whether the "
                               f"epoch's writes are forwarded: {exc}") from None

    def _svm_hashes(self, res: EpochResult, svm: wire.SvmDirty | None) -> None:
        """Tell the digest workers what the SVM holds at its dirty pages (SVM_DIRTY's
        hashes), or that nothing will come for this epoch: they wait for it before a
        checkpoint's batches, to send the pages the SVM already has as SVM pages."""
        if res.svm_forwarded:
            return
        more = svm is not None and svm.more     # a part: more of them follow
        res.svm_forwarded = not more
        if self.svm is not None:
            self.svm.publish(res.epoch, None if svm is None else svm.pfns,
                             None if svm is None else svm.hashes, more)

    # -- the protocol -----------------------------------------------------
    def checkpoint(self, cause: str, flags: int = 0, kind: str = "snapshot") -> EpochResult:
        """One epoch. ``kind``: "snapshot" (pause the PVM: a checkpoint), "sync" (all of
        memory, live) or "precopy" (what changed since the last round, live)."""
        e = self.epoch
        self.epoch += 1
        self.shared.epoch.value = e + 1
        res = EpochResult(e, cause, time.time_ns())
        t0 = time.monotonic()
        # 1. CHECKPOINT_BEGIN(e)
        if kind != "snapshot":
            flags |= wire.FLAG_SYNC | (wire.FLAG_PRECOPY if kind == "precopy" else 0)
        else:
            self.snapshots += 1
            every = self.settings.checkpoint.verify_every
            if every and self.snapshots % every == 0:
                flags |= wire.FLAG_DIGEST
        # the checkpoint's hops at the pause's priority (3.), from here: preempted between
        # BEGIN and the snapshot's command under load, the pause began 5 ms late; a live
        # round's pages go through the data stages at normal priority (StagePriority)
        self.priority.urgent(kind == "snapshot", self.priority.HOP)
        self.shared.live.value = -1 if kind == "snapshot" else e
        trace.point("begin", e)
        self._send(wire.encode_checkpoint_begin(e, CAUSES.index(cause), flags))
        faults.point("primary.begin_sent")
        # 2. the snapshot stage pauses the PVM, copies, resumes (Snapshotted arrives in 3.)
        self.snap_ctrl.send(messages.SyncCmd(e) if kind == "sync" else
                            messages.PrecopyCmd(e) if kind == "precopy" else
                            messages.SnapshotCmd(e, flags, self.retake))
        deadline = t0 + self.settings.checkpoint.epoch_timeout_ms / 1000
        # 3. wait for the snapshot, SVM_DIRTY(e), Sent(e) and ACK(e). A checkpoint's are
        # awaited at the pause's priority: each is a hop on the commit's path (SVM_DIRTY's
        # parts go on to the digest workers) and takes little CPU here; at normal priority,
        # under load, each wake-up waited up to a few ms for a core
        want = {"snapshotted", "svm_dirty", "sent", "ack"}
        try:
            self._wait(deadline, want, res,
                       sync_total=self.domain.page_count if kind == "sync" else 0)
            ok = res.ack is not None and res.ack.status == wire.ACK_COMMITTED
            reason = res.ack.reason if res.ack is not None else "stopped"
        except (TimeoutError, PeerLost) as exc:
            ok, reason = False, str(exc)
            # a secondary that does not answer for a whole epoch timeout is as good as
            # lost, whatever the heartbeat says: holding the guest's output any longer
            # would stall its clients (the next secondary gets a fresh full sync)
            res.extra["peer_lost"] = "heartbeat" if isinstance(exc, PeerLost) else "timeout"
        except BaseException:
            self.priority.urgent(False)
            raise
        finally:
            if not res.svm_forwarded:
                # the digest workers wait for the SVM's hashes: none will come
                self._svm_hashes(res, None)
        commit_ns = int((time.monotonic() - t0) * 1e9)
        # 4. committed: the secondary holds the epoch's pages; torn: they go out again.
        # Which pages those are only the snapshot stage knows: a torn epoch's pages left
        # the PVM's dirty log when it paused the PVM, and the pages in flight here
        # (``pending``) are only those the send stage had when the epoch was given up (a
        # secondary lost and heard again can tear it before the pause's pages were
        # dispatched, or before the pause: the Xen lab lost an epoch's pages for good so)
        n = int(self.pending.count[0])
        if kind == "snapshot":
            self.retake = not ok
        try:
            if ok:
                faults.point("primary.acked")
                self.table.update(self.pending.pfns[:n], self.pending.hashes[:n])
                self.bus.publish("committed", e, input_seq=res.input_seq)
                faults.point("primary.released")
                self.c.add("epochs_committed", 1)
            else:
                if res.ack is None:
                    # given up unanswered: the secondary may still apply the epoch (its
                    # ACK then comes to this primary as stale) and hold its pages, not
                    # what the table says. A page back at its committed content would go
                    # as a REF to a copy it no longer holds, be refused, and tear every
                    # retry until the page changed. Forget the table: pages go in full
                    # (or as SVM pages) once, until a commit hashes them in again
                    self.table.valid[:] = False
                self.bus.publish("aborted", e, reason=reason)
                self.c.add("epochs_aborted", 1)
                self.ctx.log.warning("epoch=%d event=aborted reason=%r: its pages go again "
                                     "with the next checkpoint", e, reason,
                                     extra={"epoch": e})
        finally:
            # (after the comparators heard: their release is the clients' wait)
            self.priority.urgent(False)
            self.shared.live.value = -1
        self._record(res, ok, commit_ns)
        if ok and flags & wire.FLAG_DIGEST:
            self._compare_digests(res)
        self.last_checkpoint = time.monotonic()
        res.extra["ok"] = ok
        lost = res.extra.get("peer_lost")
        if lost == "timeout" or lost == "heartbeat" and self._lost_for_good():
            self.go_unprotected()
        return res

    def _lost_for_good(self) -> bool:
        """The heartbeat declared the secondary lost: True unless it is heard again within
        one more heartbeat timeout; then the loss is abandoned (counted, logged) and the
        pair goes on protected (a torn epoch's pages are carried as always)."""
        faults.point("primary.peer_lost")
        if self.role.replaced:
            # not a silence: another secondary process answers at its address (issue 11)
            self.c.add("secondaries_replaced", 1)
            self.ctx.log.warning("epoch=%d event=secondary_replaced %s: the secondary this "
                                 "primary was protected by is gone; its successor joins "
                                 "with a HELLO and a full sync", self.epoch,
                                 self.role.replaced, extra={"epoch": self.epoch})
            return True
        why = self.role.peer_back_within(self.hb_events, self.settings.heartbeat.timeout_s,
                                         self.ctx.stopping)
        if not why:
            return True
        self.ctx.log.warning("epoch=%d event=loss_abandoned %s: still protected",
                             self.epoch, why, extra={"epoch": self.epoch})
        self.c.add("losses_abandoned", 1)
        return False

    def _record(self, res: EpochResult, ok: bool, commit_ns: int) -> None:
        """The epoch's checkpoint record (counters), log line and node info."""
        e, cause = res.epoch, res.cause
        sent = res.sent or messages.Sent.nothing(e)
        # where the commit went: the PVM pause, the pages' transfer (until the secondary
        # had them all), the secondary's apply, and the rest: the control channel's
        # BEGIN and ACK trips with the wake-ups around them (the ACK carries the
        # secondary's two durations, its clock is not ours)
        ack = res.ack
        transfer_ns = max(0, ack.assembled_ns - res.pause_ns) if ack else 0
        apply_ns = ack.apply_ns if ack else 0
        ack_ns = max(0, commit_ns - res.pause_ns - transfer_ns - apply_ns) if ack else 0
        self.node.record_checkpoint(
            epoch=e, cause=CAUSES.index(cause), started_ns=res.started_ns,
            pvm_pause_ns=res.pause_ns, commit_ns=commit_ns, pages_dirty=res.pages_dirty,
            transfer_ns=transfer_ns, apply_ns=apply_ns, ack_ns=ack_ns,
            pages_svm_dirty=max(res.svm_dirty, 0), pages_sent=sent.pages,
            pages_skipped_hash=sent.pages_ref, pages_zero=sent.pages_zero,
            pages_same_as_svm=sent.pages_svm, bytes_wire=sent.bytes_wire,
            bytes_raw=sent.pages * self.domain.page_size,
            status=STATUS_COMMITTED if ok else STATUS_ABORTED, pvm_verify_ns=res.verify_ns)
        self.ctx.log.info("epoch=%d event=checkpoint status=%s cause=%s dirty=%d sent=%d "
                          "skipped_hash=%d same_as_svm=%d zero=%d wire_bytes=%d pause_ms=%.3f "
                          "commit_ms=%.1f transfer_ms=%.1f apply_ms=%.1f ack_ms=%.1f",
                          e, "committed" if ok else "aborted", cause, res.pages_dirty,
                          sent.pages, sent.pages_ref, sent.pages_svm, sent.pages_zero,
                          sent.bytes_wire,
                          res.pause_ns / 1e6, commit_ns / 1e6, transfer_ns / 1e6,
                          apply_ns / 1e6, ack_ns / 1e6, extra={"epoch": e})
        self._info(epoch=e, committed=ok)

    def _compare_digests(self, res: EpochResult) -> None:
        """A proof checkpoint (FLAG_DIGEST): both nodes' full-memory blake3, compared."""
        e, svm = res.epoch, res.ack.memory_digest
        equal = res.pvm_digest == svm
        self._info(final_epoch=e, pvm_digest=res.pvm_digest.hex(), svm_digest=svm.hex(),
                   memory_equal=equal, final_input_seq=res.input_seq,
                   final_input_step=res.input_step)
        if not equal:
            self.c.add("memory_mismatches", 1)
        (self.ctx.log.info if equal else self.ctx.log.error)(
            "epoch=%d event=verified memory_equal=%s pvm_digest=%s svm_digest=%s "
            "verify_ms=%.1f", e, equal, res.pvm_digest.hex()[:16], svm.hex()[:16],
            res.verify_ns / 1e6, extra={"epoch": e})

    # -- protection, loss of the secondary, re-protection ------------------
    def protect(self) -> bool:
        """Full sync, live pre-copy rounds until the dirty set is small, then the first
        checkpoint. True once the secondary holds a consistent copy.

        An epoch of these torn while the secondary still answers (records lost on the way:
        a connection that broke and came back drops what was in flight) starts it all over
        with a fresh full sync, up to SYNC_ATTEMPTS times. Each attempt forgets what the
        secondary holds: a torn sync or pre-copy round may have written pages into the SVM
        and its cache already (the SVM never ran, there is nothing to roll back to), so no
        page may go as a REF to an older copy."""
        for attempt in range(1, SYNC_ATTEMPTS + 1):
            self.table.valid[:] = False
            self.retake = False     # (the full sync sends every page)
            self._info(state="syncing", sync_progress=0.0)
            res = self.checkpoint("initial", kind="sync")
            rounds = 0
            target = self.settings.checkpoint.precopy_target_pages
            while res.extra["ok"] and res.pages_dirty > target and rounds < PRECOPY_MAX_ROUNDS:
                rounds += 1
                res = self.checkpoint("initial", kind="precopy")
            if res.extra["ok"]:
                res = self.checkpoint("initial")
            if res.extra["ok"]:
                if self.disk_sync is not None:
                    self.disk_sync.update(self._info, force=True)
                self.role.protected(self.peer_name)     # before "protected": its figures
                self._info(state="protected", precopy_rounds=rounds)
                self.ctx.log.info("epoch=%d event=protected precopy_rounds=%d attempt=%d",
                                  res.epoch, rounds, attempt, extra={"epoch": res.epoch})
                return True
            if self.unprotected or self.ctx.stopping() or attempt == SYNC_ATTEMPTS:
                return False
            self.c.add("sync_restarts", 1)
            reason = res.ack.reason if res.ack is not None else "no answer"
            self.ctx.log.warning("epoch=%d event=sync_restart attempt=%d the secondary "
                                 "discarded an epoch of the sync (%s); starting it over",
                                 res.epoch, attempt + 1, reason, extra={"epoch": res.epoch})
        return False

    def go_unprotected(self) -> None:
        """The secondary is gone: stop comparing and checkpointing, let the PVM run free."""
        if self.unprotected:
            return
        self.unprotected = True
        self.shared.unprotected.value = 1
        self.role.loss_handled()
        self.c.add("peer_lost", 1)
        self.bus.publish("role", self.epoch, role="unprotected")
        self._info(state="unprotected", unprotected_since=time.time())
        self.ctx.log.warning("epoch=%d event=secondary_lost the guest runs unprotected; "
                             "waiting for a secondary to re-protect it", self.epoch,
                             extra={"epoch": self.epoch})
        self._note_disk_given_up()

    def _note_disk_given_up(self) -> None:
        """Why the disk replication was given up, if it was (the secondary's ack said it
        could not buffer a write, it refused one, or the initial sync failed; the secondary
        then stops as stale and is lost here): the primary disk stage keeps the reason,
        copied into the node info's ``disk_given_up`` (``stats`` shows it). Asked only
        here, when the secondary is lost: one short control call."""
        if self.disk is None:
            return
        from pipeline.stages.disk import DiskControlError
        try:
            given_up = self.disk.call("stats", reply_timeout_ms=2000).get("given_up")
        except DiskControlError as exc:
            self.ctx.log.warning("the disk stage did not say why its replication ended: %s",
                                 exc)
            return
        if given_up and given_up != self.node.node_info().get("disk_given_up"):
            self._info(disk_given_up=given_up)
            self.ctx.log.warning("epoch=%d event=disk_given_up cause=%s seq=%d: %s",
                                 self.epoch, given_up["cause"], given_up["seq"],
                                 given_up["reason"], extra={"epoch": self.epoch})

    def wait_for_secondary(self, timeout: float | None) -> bool:
        """Say HELLO until a secondary answers (re-sent every second: a new secondary
        binds the same address and the control socket reconnects to it by itself).
        After every CONTROL_REDIAL_HELLOS unanswered ones the control channel is dialled
        anew (before the next HELLO):
        its connection may be alive for TCP with the HELLOs queued behind a segment the
        kernel retransmits with exponential backoff (a healed partition: seconds, more
        the longer it lasted), while a new connection goes through at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        next_hello = 0.0
        hellos = 0
        # sealed: one share for all of this wait's HELLOs, so whichever the secondary
        # answers, both derive the same key (a new wait, a new key)
        share = seal.new_share() if self.settings.security.mode == "sealed" else None
        while not self.ctx.stopping():
            if deadline is not None and time.monotonic() > deadline:
                return False
            if time.monotonic() >= next_hello:
                if hellos and hellos % CONTROL_REDIAL_HELLOS == 0:
                    # before a HELLO, never right after one: the HELLO the secondary answers
                    # must have gone on the connection the sync then uses. Dropped right
                    # after it, the answer still came back, but the secondary's SVM_DIRTY
                    # and ACK of the sync went to the dropped connection: the epoch timed
                    # out and the pair was re-protected twice (the clean-clone CI's
                    # test_killing_the_secondary: reprotections 2). The HELLO after a
                    # redial waits for the new connection (SNDTIMEO) or is dropped
                    self._redial_control()
                self._send(wire.encode_hello(self.domain.page_size, wire.ROLE_PRIMARY,
                                             self.domain.page_count, self.settings.node.name,
                                             self.domain.hypervisor_written(), share))
                next_hello = time.monotonic() + 1.0
                hellos += 1
            self._heartbeat_lost()
            if not self.control.poll(100):
                continue
            msg = self.control.recv()
            try:
                if wire.decode_header(msg).type != wire.HELLO:
                    continue
                hello = wire.decode_hello(msg)
            except wire.WireError as exc:
                self.c.add("errors", 1)
                self.ctx.log.warning("control channel: dropped a bad record: %s", exc)
                continue
            _handshake_check(self.settings, self.domain, hello)
            _agree_written(self.domain, hello)
            key_id = _agree_seal(self.settings, self.shared, hello, share, hello.seal_share)
            if key_id is not None:
                self.ctx.log.info("event=seal_key key_id=%#010x: pages sealed under a new "
                                  "key", key_id)
            self.ctx.log.info("secondary %r connected", hello.name)
            self.peer_name = hello.name
            self._send_carried_offsets()
            return True
        return False

    def _redial_control(self) -> None:
        """The control channel on a new TCP connection (wait_for_secondary)."""
        address = sockets.peer_endpoints(self.settings)["control"]
        try:
            self.control.disconnect(address)
        except zmq.ZMQError:        # (not connected: nothing to let go)
            pass
        self.control.connect(address)
        self.c.add("control_redials", 1)

    def _send_carried_offsets(self) -> None:
        """A real guest NIC, after a takeover: the connections' offsets the redirector
        carried go to the new secondary before its full sync (pipeline/failover/offsets.py)."""
        from pipeline.failover.offsets import carried_offsets
        if not self.settings.net.redirector_offsets:
            return
        try:
            rows, why = carried_offsets(self.settings.net.redirector_offsets)
        except ValueError as exc:
            self.c.add("errors", 1)
            self.ctx.log.error("event=net_offsets_not_sent %s: the new secondary's redirector "
                               "will not move the connections opened before the failover",
                               exc)
            return
        if rows is None:
            self.ctx.log.info("event=net_offsets_not_sent %s", why)
            return
        self._send(wire.encode_net_offsets(rows))
        self.ctx.log.warning("event=net_offsets_sent %s to the secondary %r", why,
                             self.peer_name)

    def reprotect(self) -> None:
        """A new secondary answered: it holds nothing, so forget what the old one held."""
        self.shared.unprotected.value = 0
        self.unprotected = False
        self.role.loss_handled()      # heard meanwhile: the one that answered the HELLO
        self.table.valid[:] = False
        self.retake = False
        self.c.add("reprotections", 1)
        self.bus.publish("role", self.epoch, role="primary")
        faults.point("primary.reprotect")
        if not self.protect():
            self.go_unprotected()

    def next_trigger(self) -> tuple[str, int] | None:
        cp = self.settings.checkpoint
        since = (time.monotonic() - self.last_checkpoint) * 1000
        requests = self.bus.drain_requests()
        flags = 0
        cause = None
        for req_cause, detail in requests:
            self.c.add("requests", 1)
            if req_cause == "request" and detail == "digest":
                flags |= wire.FLAG_DIGEST
            cause = cause or (req_cause if req_cause in CAUSES else "request")
        if cause is not None:
            # requests pile up until min_interval_ms allows a checkpoint: keep the first
            # cause and every flag asked for (a digest request must not be lost)
            old = self.pending_request
            self.pending_request = (old[0], old[1] | flags) if old else (cause, flags)
        pend = self.pending_request
        if pend is not None and since >= cp.min_interval_ms:
            self.pending_request = None
            return pend
        if since >= cp.timer_ms(self.settings.net.release):
            return ("timer", 0)
        now = time.monotonic()
        if self.dirty_countable and since >= cp.min_interval_ms \
                and now >= self.next_dirty_check:
            count = self.domain.dirty_count()
            if count >= 0:
                # and the pages the snapshot stage took off the log while the PVM ran
                # (snapshot.Prescan): they go with the next checkpoint too
                count += self.prescan_held()
            # a count walks the guest's whole dirty log (PAGEMAP_SCAN on the sim): every
            # tick it took a fifth of a core from the stages on a 256 MiB guest; look at
            # most every 20 times what a look costs (~5% of a core), and while the count is
            # far from the threshold at the rate it grows, up to 100 times (~1%)
            cost = time.monotonic() - now
            ahead = (cp.dirty_threshold_pages - count) * since / 1000 / count / 2 \
                if count else float("inf")
            self.next_dirty_check = now + max(TICK_S, 20 * cost, min(ahead, 100 * cost))
            if count >= cp.dirty_threshold_pages:
                return ("dirty_threshold", 0)
        return None

    def prescan_held(self) -> int:
        if self._snapshot_counters is None:
            self._snapshot_counters = self.node.stage("snapshot")
        c = self._snapshot_counters
        return int(c.values[c.index("prescan_held")])

    def _idle_wait(self) -> None:
        """Sleep until the next trigger can fire: a checkpoint request or a heartbeat
        event wakes it at once, the timers (the periodic one, a pending request's
        min_interval_ms, the next dirty-count look) when they are due. It used to sleep
        TICK_S and look again: 500 wake-ups a second of an idle coordinator (8% of a core
        with the dirty counts, taken from the stages of the next commit) and a request
        heard up to 2 ms late."""
        cp = self.settings.checkpoint
        now = time.monotonic()
        timer_s = cp.timer_ms(self.settings.net.release) / 1000  # (max_interval_ms 0: by policy)
        due = [self.last_checkpoint + timer_s, now + IDLE_WAIT_S]
        if self.pending_request is not None:
            due.append(self.last_checkpoint + cp.min_interval_ms / 1000)
        elif self.dirty_countable:
            due.append(max(self.next_dirty_check,
                           self.last_checkpoint + cp.min_interval_ms / 1000))
        # at least a millisecond: a due time that passed without a trigger (none should)
        # must not turn this loop into a spin (poll_ms: a float is cut to whole ms)
        self.idle_poller.poll(max(1, poll_ms(min(due) - now)))

    def run(self) -> None:
        self.idle_poller = zmq.Poller()
        self.idle_poller.register(self.bus.requests_in, zmq.POLLIN)
        self.idle_poller.register(self.hb_events.fileno(), zmq.POLLIN)
        self._info(role="primary", state="connecting", epoch=-1,
                   stage_pids={**self.node.node_info().get("stage_pids", {}),
                               "coordinator": os.getpid()})
        try:
            self.role.take(self.start.generation)
            if self.start.wait_for_secondary:
                # role auto: the guest runs (unprotected) until a secondary joins
                self.unprotected = True
                self.shared.unprotected.value = 1
                self._info(role="primary", state="unprotected", unprotected_since=time.time())
                self.ctx.log.warning("epoch=%d event=unprotected waiting for a secondary at "
                                     "%s to protect the guest", self.epoch,
                                     self.settings.peer.address, extra={"epoch": self.epoch})
            elif not self.wait_for_secondary(self.settings.peer.connect_timeout_ms / 1000):
                raise ProtocolError(f"no secondary answered at {self.settings.peer.address} "
                                    f"within {self.settings.peer.connect_timeout_ms} ms")
            elif not self.protect():
                raise ProtocolError("the first full sync failed; the secondary is not protected")
            while not self.ctx.stopping():
                if self.unprotected:
                    if self.wait_for_secondary(timeout=None):
                        self.reprotect()
                    continue
                if self._heartbeat_lost() and self._lost_for_good():
                    self.go_unprotected()
                    continue
                trig = self.next_trigger()
                if trig is None:
                    self._idle_wait()
                    continue
                self.checkpoint(*trig)
        finally:
            self.role.close()
            try:
                self.control.send(wire.encode_shutdown(self.epoch), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.close()


class SvmPrehash:
    """The secondary hashes what its SVM dirtied while the SVM runs, so that BEGIN, on the
    commit's path, hashes only what was written since (issue 13: the SVM's hashes came
    before the primary's classification, 1.5 us a page, all of them after BEGIN).

    :meth:`round` reads and clears the dirty log and then hashes those pages. That order
    makes it correct: a page written again during or after the read is in the log again,
    so BEGIN hashes it afresh, with the SVM paused, and that hash wins (:meth:`take`).
    The pages of every round count as dirty for the epoch (SVM_DIRTY, the rollback).

    Not on a guest with bytes the hypervisor writes without marking their page dirty
    (Xen's vcpu_info, Domain.hypervisor_written): a page hashed while the guest runs could
    change under its hash, and the apply's check would tear the epoch for it."""

    MIN_S = 0.005       # a round at most this often, at most every COST_FACTOR times its
    COST_FACTOR = 40    # log read's cost (it walks all of the guest's memory on the sim:
                        # at 20x, an idle secondary coordinator took 9% of a core), and
    HASH_FACTOR = 2     # at most every HASH_FACTOR times its hashing's. The hashing is
                        # work BEGIN would do otherwise (but for pages written again), so
                        # it is not held to the log read's 40x: counted in, a round that
                        # hashed 1000 pages (2.5 ms) put the next one 100 ms off, and in
                        # scripts/bench_pipeline.py 4.7k of 15k SVM pages were hashed
                        # before BEGIN; at 2x a round hashes a third of a core at most
    CHUNK = 256         # pages hashed between two looks for a BEGIN (~0.4 ms)
    ROUND_MAX = 1024    # pages hashed in one round at most (1.5 ms, at real time: see
                        # round); the rest wait for the next round, or BEGIN
    #: A round whose log held mostly pages an earlier round of this epoch had hashed (the
    #: SVM writes them again: a service's working set) wasted that hashing, and most of
    #: its own will be wasted too: the next round waits twice as long as this one did, up
    #: to GAP_MAX_S; a round that finds more fresh pages than written-again ones, and
    #: BEGIN, bring the spacing back to MIN_S. A sim service at 1000 requests/s (2 pages a
    #: request, 2048 pages written over and over, a checkpoint every 8 s) took 90-118
    #: rounds a second, 37-40 ms of a core at SCHED_FIFO beside its SVM and mirror
    #: (docs/tuning.md, Session 19 (svc)). What BEGIN hashes itself grows by at most the
    #: pages written in GAP_MAX_S (the service: ~100, 0.15 ms); a guest writing fresh
    #: pages (a burst before a checkpoint) keeps MIN_S.
    GAP_MAX_S = 0.05

    def __init__(self, domain: Domain, counters=None) -> None:
        self.domain, self.c = domain, counters
        self.pfns = np.zeros(0, np.uint64)
        self.hashes = np.zeros((0, 32), np.uint8)
        self.todo = np.zeros(0, np.uint64)      # off the log, not hashed yet
        self.next_round = 0.0
        self.gap = self.MIN_S                   # the spacing by what the rounds found

    def round(self, interrupted=None) -> None:
        """``interrupted()``, asked before the round and before each chunk: a BEGIN is
        waiting. The round stops there (a round of a large dirty set held BEGIN back by
        its whole hashing, 1.5 us a page); the pages it took off the log but did not
        hash, and those beyond ROUND_MAX, are hashed by the
        next round or at BEGIN (:meth:`begin`). The caller runs it at real time
        (SecondaryCoordinator.run): at normal priority a loaded machine's real-time work
        kept it from its next look for BEGIN for up to 9 ms."""
        if interrupted is not None and interrupted():
            return                              # (not due again: the loop takes BEGIN)
        t0 = time.monotonic()
        trace.point("prehash_start")
        pfns = self.domain.read_and_clear_dirty()
        t_read = time.monotonic()
        if len(pfns):
            # written again since a round hashed them (an empty log leaves the spacing:
            # a burst of fresh pages after an idle spell must find the rounds at MIN_S)
            again = int(np.count_nonzero(in_sorted_pfns(pfns, self.pfns))) \
                if len(self.pfns) else 0
            self.gap = min(self.GAP_MAX_S, 2 * self.gap) \
                if 2 * again >= len(pfns) and not len(self.todo) else self.MIN_S
            if self.c is not None and again:
                self.c.add("svm_prehashed_again", again)
        if self.c is not None:
            self.c.add("svm_prehash_rounds", 1)
        if len(self.todo):
            pfns = union_pfns(self.todo, pfns)
        faults.point("secondary.prehash")
        done, most = 0, min(len(pfns), self.ROUND_MAX)
        if most:
            hashes = np.empty((most, 32), np.uint8)
            # asked before each chunk, the first too: a round of up to a chunk (most of
            # them, once they keep up) never asked, and held a BEGIN back by its read
            # and its hashing
            while done < most and not (interrupted is not None and interrupted()):
                part = pfns[done:min(done + self.CHUNK, most)]
                hashes[done:done + len(part)] = domain_page_hashes(self.domain, part)
                done += len(part)
            self._merge(pfns[:done], hashes[:done])
            if self.c is not None:
                self.c.add("svm_prehashed", done)
        self.todo = pfns[done:]
        trace.point("prehash_end", -1, f"{done}/{len(pfns)}")
        now = time.monotonic()
        self.next_round = now + max(self.gap, self.COST_FACTOR * (t_read - t0),
                                    self.HASH_FACTOR * (now - t_read))

    def begin(self, dirty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BEGIN, the SVM paused: ``dirty`` (the log now) with the pages a round took off
        the log but did not hash, hashed now, joined with the rounds' (:meth:`take`)."""
        parts = list(self.parts(dirty))
        return (np.concatenate([p for p, _, _ in parts]).astype(np.uint64),
                np.concatenate([h for _, h, _ in parts]))

    #: SVM_DIRTY's parts: the first this many pages, each next one twice as many, up to
    #: PART_MAX (the primary's digest workers start on the pages below a part's last pfn
    #: while the rest is hashed here; one part per record on the control channel). The
    #: first part is a digest batch (pipeline.batch_pages, 1024): a batch waits for the
    #: part that reaches its highest pfn, and a first part of 256 covered no whole batch
    #: (at 4k pages the first batch waited for the third part, 1792 pages hashed), while
    #: each part is a record each coordinator and both ZeroMQ I/O threads wake for, in
    #: the PVM's pause (the PVM's pause and the SVM's BEGIN run at once on both nodes).
    #: 1k pages: one part, not three (trace_checkpoint.py at load 15-22, alternated with
    #: 256: commit p50 6.1-6.8 against 5.9-8.2 ms, pause 1.8-2.0 against 2.1-2.9, 33-34
    #: stage wake-ups a checkpoint against 38-46; docs/tuning.md, Session 14)
    PART_FIRST, PART_MAX = 1024, 4096

    def parts(self, dirty: np.ndarray):
        """:meth:`begin` in parts, in pfn order, each hashed only when it is asked for:
        (pfns, hashes, more) of sorted, disjoint, ascending pfns, at least one part; ``more``:
        another part follows (known before it is hashed, so a part can be sent before the
        next is hashed). Pages hashed by the rounds keep their hash unless they are dirty
        again (then hashed afresh)."""
        fresh = union_pfns(dirty, self.todo) if len(self.todo) else unique_pfns(dirty)
        held_pfns, held_hashes = self.pfns, self.hashes
        self.gap = self.MIN_S           # a new epoch: nothing hashed yet is wasted
        self.pfns = np.zeros(0, np.uint64)
        self.hashes = np.zeros((0, 32), np.uint8)
        self.todo = np.zeros(0, np.uint64)
        if not len(fresh) and len(held_pfns):
            # every dirty page hashed by the rounds, none written since (the common case
            # once they keep up): the held arrays as they are, sorted by _merge (a union
            # and an isin of nothing cost 0.1-0.2 ms here, in the PVM's pause)
            for a, b in self._bounds(len(held_pfns)):
                yield held_pfns[a:b], held_hashes[a:b], b < len(held_pfns)
            return
        pfns = union_pfns(fresh, held_pfns) if len(held_pfns) else fresh
        is_fresh = in_sorted_pfns(pfns, fresh) if len(held_pfns) \
            else np.ones(len(pfns), bool)
        for a, b in self._bounds(len(pfns)):
            part, new = pfns[a:b], is_fresh[a:b]
            hashes = np.empty((len(part), 32), np.uint8)
            if not new.all():
                old = part[~new]
                hashes[~new] = held_hashes[np.searchsorted(held_pfns, old)]
            if new.any():
                hashes[new] = domain_page_hashes(self.domain, part[new]) if not new.all() \
                    else domain_page_hashes(self.domain, part)
            yield part, hashes, b < len(pfns)

    def _bounds(self, n: int):
        """(start, end) of each of SVM_DIRTY's parts of ``n`` pages: PART_FIRST, then twice
        as many each time up to PART_MAX; at least one part (empty when ``n`` is 0)."""
        at, size = 0, self.PART_FIRST
        while True:
            yield at, min(at + size, n)
            at += size
            if at >= n:
                return
            size = min(2 * size, self.PART_MAX)

    def _merge(self, pfns: np.ndarray, hashes: np.ndarray) -> None:
        """Add (pfns, hashes); a newer hash of a pfn wins over one held."""
        if len(self.pfns):
            pfns = np.concatenate((pfns, self.pfns))
            hashes = np.concatenate((hashes, self.hashes))
        # np.unique keeps the first occurrence of each pfn: the newest, which come first
        self.pfns, first = np.unique(pfns, return_index=True)
        self.hashes = hashes[first]

    def take(self, dirty: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BEGIN, the SVM paused: ``dirty`` (the log now) and its fresh ``hashes`` joined
        with what the rounds hashed, sorted by pfn; the rounds start afresh."""
        self.gap = self.MIN_S
        if not len(self.pfns):
            return dirty, hashes
        self._merge(dirty, hashes)
        out = self.pfns, self.hashes
        self.pfns = np.zeros(0, np.uint64)
        self.hashes = np.zeros((0, 32), np.uint8)
        return out


class SecondaryCoordinator(_Coordinator):
    def __init__(self, ctx: StageContext, settings: Settings, node: NodeCounters, domain: Domain,
                 restore_ctrl, shared, hb_events) -> None:
        self.ctx, self.settings, self.node, self.domain = ctx, settings, node, domain
        self.restore_ctrl, self.shared, self.hb_events = restore_ctrl, shared, hb_events
        self.c = ctx.counters
        self.redirector_notice = None     # net.redirector_control: CheckpointNotice
        self.role = SecondaryRole(ctx, settings, domain, shared, self._info, node.node_info)
        self.begins: deque[wire.CheckpointBegin] = deque()   # BEGINs not yet taken up
        # the restore stage's replies, by epoch
        self.replies: dict[int, messages.Checked | messages.Written | messages.Applied
                           | messages.Aborted] = {}
        self.lost: tuple[float, float, str] | None = None   # primary lost: last seen, when, by
        self.svm_started = False
        # sealed: (the primary's share, this node's answer) of the last HELLO answered: the
        # primary's resent HELLOs of one wait get the same answer, so the same key
        self.seal_shares: tuple[bytes, bytes] | None = None
        # a full sync (a FLAG_SYNC epoch, not a FLAG_PRECOPY round) committed: before it,
        # this SVM's memory is no copy of anything, and an ordinary checkpoint or pre-copy
        # round on top of it would not make it one
        self.synced = False
        self.last_epoch = -1
        self.last_control: float | None = None
        self.prehashed = SvmPrehash(domain, self.c)
        # BEGIN's answer (pause, dirty log, hashes, SVM_DIRTY) is the barrier the primary's
        # digest workers wait on: it runs at the snapshot stage's pause priority
        from pipeline.stages.snapshot import PausePriority
        self.priority = PausePriority(settings.pipeline.pause_priority == "realtime")
        self.pages_drops = (0, 0)    # the receive stage's conn_drops at the last outcome
        # an epoch torn by the primary's connection dropping: the rolled-back SVM waits until
        # then (two heartbeat timeouts) for the heartbeat's verdict before it runs on
        self.resume_at = 0.0
        self.torn_by_drop = False
        self._open(settings, "secondary")
        # the connection the primary's last valid control record came on: where this
        # side's records go (sockets.control: the secondary's end is a ROUTER)
        self.route: bytes | None = None
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.restore_ctrl.fileno(), zmq.POLLIN)
        self.poller.register(self.hb_events.fileno(), zmq.POLLIN)

    # -- the protocol -----------------------------------------------------

    def _commit_disk(self, epoch: int, attempts: int = 3) -> None:
        """Commit the disk to ``epoch``; a failed commit is retried (redoing its writes is
        idempotent: the store's journal says where it was). A disk that keeps failing
        stops this node with the error: the primary runs on unprotected."""
        from pipeline.stages.disk import DiskControlError
        for attempt in range(1, attempts + 1):
            try:
                self.disk.commit(epoch)
                return
            except DiskControlError as exc:
                if "NewSyncSession:" in str(exc):   # (stages/disk.py NewSyncSession)
                    self._info(state="stale", stale_reason=f"epoch {epoch}: a new disk sync")
                    raise StaleSecondary(
                        f"epoch {epoch}: the primary started a new initial sync of the disk, "
                        f"but this secondary ran its SVM from checkpoints up to epoch "
                        f"{self.last_epoch} already; stopping (start it again to join as a "
                        "new secondary)") from None
                if "GivenUp:" in str(exc):   # (disk/store.py GivenUp: no retry can help)
                    self._info(state="stale", stale_reason=f"epoch {epoch}: the disk "
                               "replication was given up (a write could not be buffered)")
                    raise StaleSecondary(
                        f"epoch {epoch}: this secondary gave the disk replication up: "
                        f"{exc}; stopping (start it again to join as a new secondary: "
                        "a new disk sync)") from None
                self.c.add("errors", 1)
                self.ctx.log.error("epoch=%d event=disk_commit_failed attempt=%d of %d: %s",
                                   epoch, attempt, attempts, exc, extra={"epoch": epoch})
                if attempt == attempts:
                    raise

    def checkpoint(self, begin: wire.CheckpointBegin) -> None:
        """One epoch, the other half of PrimaryCoordinator.checkpoint."""
        epoch = begin.epoch
        if (not begin.flags & wire.FLAG_SYNC or begin.flags & wire.FLAG_PRECOPY) \
                and not self.synced:
            # (here, in order: the sync's last epoch may still be being applied when the
            # next BEGIN arrives)
            self._refuse_unsynced(begin)
        t_begin = time.monotonic_ns()
        trace.point("begin_in", epoch)
        # a live round's pages go through the data stages at normal priority, a
        # checkpoint's at the pause's (common.StagePriority)
        self.shared.live.value = epoch if begin.flags & wire.FLAG_SYNC else -1
        # 1. pause the SVM, read and clear its dirty log, answer SVM_DIRTY(e)
        self.priority.urgent(True, self.priority.HOP)
        try:
            self.domain.pause()
            dirty = self.domain.read_and_clear_dirty() if self.svm_started \
                else np.zeros(0, np.uint64)
            # what the SVM holds at those pages: the primary sends the ones its PVM has
            # alike as SVM pages, without their content. Pages hashed while the SVM ran and
            # not written since (they are not in the log again) keep that hash. In parts,
            # each sent once hashed: the primary's digest workers go on with the pages
            # below a part while the rest is hashed here.
            trace.point("svm_dirty_read", epoch, str(len(dirty)))
            done = []
            # the pages the SVM holds as zeros can be no SVM page (the primary sends a zero
            # page as ZERO): the restore stage's copy of the SVM's pages leaves them out
            zero = np.frombuffer(zero_page_hash(self.domain.page_size), np.uint8)
            held = []
            # each part is sent before the next is hashed (it waited for the next one's
            # hashing before: the digest workers' batches below it waited as long). All at
            # the pause's priority: the data stages run at it too (common.StagePriority),
            # and at normal priority (boosted) this hashing, the commit's critical path,
            # got what they left of the cores (8 us a page instead of 1.8, 1k pages, on a
            # 2-core machine with both nodes). At the hops' priority (HOP), above the
            # digest workers (WORK): the last part is what their classification waits for
            # (at WORK it shared the cores with their hashing, 4-7 us a page at load 17)
            for pfns, hashes, more in self.prehashed.parts(dirty):
                self._send(wire.encode_svm_dirty(epoch, pfns, hashes, more=more))
                trace.point("svm_part_sent" if more else "svm_hashed", epoch, str(len(pfns)))
                done.append(pfns)
                held.append(pfns[rows_unlike(hashes, zero)])
            dirty = np.concatenate(done).astype(np.uint64) if len(done) > 1 else done[0]
            # the rest is hops on the commit's path (the restore stage's verdict, the ACK,
            # the SVM's resume) with little CPU of its own, asleep between
            self._settle(begin, epoch, dirty, t_begin,
                         np.concatenate(held).astype(np.uint64) if len(held) > 1 else held[0])
        finally:
            # (the priority stays: the loop (run) waits for the next BEGIN at it)
            self.shared.live.value = -1

    def _settle(self, begin: wire.CheckpointBegin, epoch: int, dirty: np.ndarray,
                t_begin: int, nonzero: np.ndarray | None = None) -> None:
        """The epoch's second half: the restore stage applies it (or rolls it back), the
        ACK, the SVM runs on. ``nonzero``: the pages of ``dirty`` the SVM does not hold as
        zeros (the restore stage copies them while the epoch is in transit)."""
        faults.point("secondary.begin")
        # 2. the restore stage applies e the moment it is assembled (no round trip through
        # here in between; with a disk, once e is sealed too); a torn e is rolled back
        want_digest = bool(begin.flags & wire.FLAG_DIGEST)
        deadline = time.monotonic() + self.settings.checkpoint.epoch_timeout_ms / 1000
        # A checkpoint's disk commits with its memory: the memory is applied only once the
        # primary sealed the epoch's disk writes and all of them arrived. Applied first, a
        # primary lost before its seal left an epoch that could be neither committed (no
        # seal ever comes) nor rolled back (its memory was in): the node stopped.
        if self.disk is not None and not begin.flags & wire.FLAG_SYNC \
                and not self._disk_sealed(epoch, deadline):
            reply = self._outcome(epoch, dirty, deadline, torn=True)
        else:
            self.restore_ctrl.send(messages.ApplyCmd(epoch, dirty, want_digest, nonzero))
            reply = self._outcome(epoch, dirty, deadline)
        if reply is None:
            return                  # the node is stopping
        trace.point("reply", epoch)
        # 3. answer ACK(e), resume the SVM. The ACK carries how long e took to arrive and to
        # apply (the primary splits its commit time by them); e may have been assembled
        # before this coordinator took up its BEGIN. Checked (early ACK): e is checked
        # whole and its pages are being written; the ACK goes now, and the SVM resumes once
        # they are in it (Written), a takeover goes on from e once they are applied.
        t_ready = max(t_begin, getattr(reply, "assembled_ns", 0) or time.monotonic_ns())
        committed = not isinstance(reply, messages.Aborted)
        if committed and self.disk is not None and not begin.flags & wire.FLAG_SYNC:
            # the disk goes to the same checkpoint before the ACK and before the SVM runs on
            # from it (with an early ACK, while the restore stage writes the pages)
            self._commit_disk(epoch)
        # (Written: the restore stage was on before this took Checked up)
        early = isinstance(reply, (messages.Checked, messages.Written))
        if early:
            self._ack(epoch, reply, t_begin, t_ready)
            self.c.add("acked_early", 1)
            # the SVM runs on once its memory is e's (Written); the restore stage's cache
            # takes e's pages meanwhile, and Applied comes (below) before anything else
            if isinstance(reply, messages.Checked):
                reply = self._applied(epoch, messages.Written)
                if reply is None:
                    return              # the node is stopping
            trace.point("written_in", epoch)
        resumed_ns = 0
        if not committed:
            reason = reply.reason
        # The SVM starts with the first checkpoint that commits. A torn first checkpoint
        # leaves it paused, never run: it has no vCPU state to go on from (resumed, a sim
        # guest asked its mirror for input 0, long trimmed: InputLogEntryGone), and the
        # primary syncs it again (a full sync is accepted while the SVM never ran)
        if self.svm_started or committed and not begin.flags & wire.FLAG_SYNC:
            if not self.svm_started:
                self.domain.enable_dirty_log()
                self.svm_started = True
            # the SVM's epoch boundary, in order with its output (the comparator's commit)
            if committed or self.last_epoch >= 0:
                self.domain.mark_outputs(
                    encode_boundary(BOUNDARY_COMMITTED, epoch) if committed else
                    encode_boundary(BOUNDARY_ROLLED_BACK, self.last_epoch, epoch))
            if self.settings.net.redirector_control:
                self._checkpoint_redirector(epoch)
            # the primary known lost (its heartbeat): the SVM stays paused where this epoch
            # left it until the takeover resumes it (or, refused, as the standby), so what
            # it replays goes to the clients, not into the lost primary's comparator. Torn
            # by the primary's connection dropping: a primary gone, or a corrupted segment
            # (the primary reconnects); the SVM waits for the heartbeat's verdict (two
            # timeouts: the drop is seen at once, the silence only after one)
            self.resume_at = 0.0
            if not committed and self.torn_by_drop and self.lost is None:
                self.resume_at = time.monotonic() + 2 * self.settings.heartbeat.timeout_s
            elif self.lost is None:
                self.domain.resume()
                resumed_ns = time.monotonic_ns()
                trace.point("svm_resumed", epoch)
                self.c.add("svm_resumes", 1)
        if not early:
            self._ack(epoch, reply, t_begin, t_ready)
        elif not isinstance(reply, messages.Applied):
            reply = self._applied(epoch)
            if reply is None:
                return              # the node is stopping
        input_seq, applied = (reply.input_seq, reply.pages) if committed else (-1, 0)
        # 4. committed: the SVM goes on from e; torn: from the last committed epoch.
        # resume_ms: BEGIN to the SVM running again, how long e held the SVM's answers
        # (and so the release of the PVM's): with an early ACK the primary's commit_ms
        # ends before the pages are written and the SVM resumes
        self.ctx.log.info("epoch=%d event=%s pages=%d svm_dirty=%d resume_ms=%s%s", epoch,
                          "applied" if committed else "discarded", applied, len(dirty),
                          f"{(resumed_ns - t_begin) / 1e6:.1f}" if resumed_ns else "-",
                          "" if committed else f" reason={reason!r}", extra={"epoch": epoch})
        if committed:
            self.last_epoch = epoch
            self.synced = self.synced or \
                begin.flags & (wire.FLAG_SYNC | wire.FLAG_PRECOPY) == wire.FLAG_SYNC
            self.bus.publish("committed", epoch, input_seq=input_seq)
            self.c.add("epochs_committed", 1)
            self._info(epoch=epoch, state="protected" if self.svm_started else "syncing")
        else:
            self.bus.publish("aborted", epoch, reason=reason)
            self.c.add("epochs_aborted", 1)
        self.node.record_checkpoint(epoch=epoch, cause=begin.cause, started_ns=time.time_ns(),
                                    pages_svm_dirty=len(dirty), pages_sent=applied,
                                    status=STATUS_COMMITTED if committed else STATUS_ABORTED)

    def _ack(self, epoch: int, reply: messages.Checked | messages.Applied | messages.Aborted,
             t_begin: int, t_ready: int) -> None:
        """ACK(e): committed once the restore stage checked (early) or applied it, else
        aborted with the reason. It carries how long e took to arrive (BEGIN to
        ``t_ready``) and to apply (``t_ready`` to now: with an early ACK, to the check)."""
        faults.point("secondary.applied")
        committed = not isinstance(reply, messages.Aborted)
        self._send(wire.encode_ack(
            epoch, wire.ACK_COMMITTED if committed else wire.ACK_ABORTED,
            reply.pages if committed else 0, "" if committed else reply.reason,
            getattr(reply, "digest", b""), assembled_ns=t_ready - t_begin,
            apply_ns=time.monotonic_ns() - t_ready))
        trace.point("ack_sent", epoch)
        faults.point("secondary.acked")

    def _applied(self, epoch: int, until: type = messages.Applied
                 ) -> messages.Written | messages.Applied | None:
        """After an early ACK: the restore stage's Applied for ``epoch``, which always
        follows its Checked and Written (``until=Written``: its Written, or the Applied
        that came first). Nothing tears the epoch now (a newer BEGIN waits, a lost
        primary is taken over from after it); a restore stage that does not finish within
        an epoch timeout leaves this secondary stale: it stops. None when the node stops."""
        deadline = time.monotonic() + self.settings.checkpoint.epoch_timeout_ms / 1000
        while not self.ctx.stopping():
            reply = self.replies.pop(epoch, None)
            if isinstance(reply, (messages.Applied, until)):
                self.replies = {e: r for e, r in self.replies.items() if e > epoch}
                return reply
            if reply is not None or time.monotonic() > deadline:
                why = (f"the restore stage discarded it after its check ({reply.reason})"
                       if reply is not None else "its pages were not written within "
                       f"{self.settings.checkpoint.epoch_timeout_ms} ms")
                self._info(state="stale", stale_reason=f"epoch {epoch}: acked, but {why}")
                raise StaleSecondary(f"epoch {epoch} was acked, but {why}: this secondary's "
                                     "SVM is half-applied; stopping (start it again to join "
                                     "as a new secondary)")
            self._poll(max(0.0, min(deadline - time.monotonic(), 0.1)))
        return None

    def _disk_sealed(self, epoch: int, deadline: float) -> bool:
        """Wait until the disk stage has every write the primary sealed into ``epoch``;
        False when the epoch is torn first (the primary lost, its pages channel broken, a
        newer BEGIN, the deadline; :meth:`_outcome` then says which) or the node stops.
        Asked in short slices: heartbeat events and control records are taken in between."""
        from pipeline.stages.disk import DiskControlError
        while not self.ctx.stopping():
            try:
                if self.disk.wait_sealed(epoch, SEAL_SLICE_MS):
                    return True
            except DiskControlError as exc:
                self.c.add("errors", 1)
                self.ctx.log.error("epoch=%d event=seal_wait_failed %s", epoch, exc,
                                   extra={"epoch": epoch})
            self._poll(0)
            if self.lost is not None or self.begins or self._pages_dropped() \
                    or time.monotonic() > deadline:
                return False
        return False

    def _outcome(self, epoch: int, dirty: np.ndarray, deadline: float, torn: bool = False
                 ) -> messages.Checked | messages.Applied | messages.Aborted | None:
        """The restore stage's first reply for ``epoch``. The primary lost, a newer BEGIN or
        the deadline tear the epoch: the restore stage is told to roll it back (if it
        checked or applied it meanwhile, that stands). ``torn``: the epoch's disk was
        never sealed (it was not asked to apply it): torn now. None when the node stops."""
        while not self.ctx.stopping():
            reply = self.replies.pop(epoch, None)
            if reply is not None:
                self.replies = {e: r for e, r in self.replies.items() if e > epoch}
                self.pages_drops = self._pages_drops()
                return reply
            dropped = self._pages_dropped()
            reason = ("the primary was lost mid-epoch" + (" (before its disk seal)" if torn
                                                          else "")
                      if self.lost is not None else
                      dropped if dropped else
                      f"epoch {self.begins[0].epoch} began before it completed" if self.begins
                      else f"epoch incomplete after {self.settings.checkpoint.epoch_timeout_ms}"
                      " ms" if time.monotonic() > deadline else
                      "the primary never sealed its disk writes" if torn else "")
            if reason:
                self.torn_by_drop = reason == dropped
                if reason == dropped:
                    self.c.add("torn_by_conn_drop", 1)
                    self.ctx.log.error("epoch=%d event=torn %s", epoch, reason,
                                       extra={"epoch": epoch})
                self.restore_ctrl.send(messages.AbortCmd(epoch, dirty, reason))
                while True:     # its reply to ApplyCmd (Checked, Applied: it was quicker)
                                # or to this
                    reply = self.restore_ctrl.recv()
                    if reply.epoch == epoch:
                        self.pages_drops = self._pages_drops()
                        return reply
            self._poll(max(0.0, min(deadline - time.monotonic(), 0.1)))
        return None

    def _pages_drops(self) -> tuple[int, int]:
        """The receive stage's count of broken pages connections (sockets.DropWatch), and
        of those broken by a message that failed CURVE authentication."""
        r = self.node.stage("receive").as_dict()
        return r.get("conn_drops", 0), r.get("conn_crypto_errors", 0)

    def _pages_dropped(self) -> str:
        """Why the epoch in flight lost records on the pages channel ("" if it did not):
        its connection broke since the last epoch's outcome. The epoch is torn at once,
        not at its timeout: what was in flight on that connection never comes."""
        drops, crypto = self._pages_drops()
        if drops == self.pages_drops[0]:
            return ""
        what = ("a message failed CURVE authentication (corrupted or forged on the way)"
                if crypto > self.pages_drops[1] else "the connection was dropped")
        return (f"the pages channel broke mid-epoch: {what}; the records in flight on it "
                f"are lost ({drops} broken connections so far)")

    def run(self) -> None:
        self._info(role="secondary", state="waiting", epoch=-1,
                   stage_pids={**self.node.node_info().get("stage_pids", {}),
                               "coordinator": os.getpid()})
        record_role(self._info, self.node.node_info(), "secondary", 0,
                    self.node.node_info().get("role_cause", "start"))
        # The SVM stays paused until its first checkpoint is applied (resumed in checkpoint):
        # the full sync writes pages into it as they arrive (stages/restore.py), before any
        # BEGIN pauses it. A sim SVM starts paused; a Xen one runs (the twin method restores
        # it running), and in the Xen lab a running SVM whose memory changed under it
        # triple-faulted and was re-created by xl under a new domain id. Paused before this
        # node answers the primary's HELLO, so before the first page of the sync.
        self.domain.pause()
        try:
            while not self.ctx.stopping():
                if self.begins:
                    self.checkpoint(self.begins.popleft())
                    continue
                running = self.svm_started and not self.role.active \
                    and not self.domain.hypervisor_written()
                if running and time.monotonic() >= self.prehashed.next_round:
                    # at real time, as BEGIN's own hashing (WORK: below the hops, the
                    # data stages' level), its I/O threads at the hops' (they carry the
                    # BEGIN that stops it): at normal priority the round's next look for a
                    # BEGIN waited for a core behind real-time work, BEGIN was taken up
                    # 5-9 ms late in ~1 checkpoint in 100 (docs/tuning.md, Session 15).
                    # At most ROUND_MAX pages, at most a third of a core (HASH_FACTOR)
                    self.priority.urgent(True, self.priority.WORK, threads=self.priority.HOP)
                    self.prehashed.round(lambda: bool(self.control.poll(0)))
                # BEGIN is awaited at the priority its answer runs at: asleep, that takes
                # no CPU, and the wake-up does not wait for a core (under load, at normal
                # priority, up to a few ms on the commit's path). The loop's own checks
                # stay at it too: dropped after every wake-up without a BEGIN, a BEGIN
                # that came just after waited for a core behind real-time work, and then
                # for the round that began when the loop got one (4.3 ms, load 4.7); the
                # takeover and an active role's serving drop it (below)
                self.priority.urgent(True, self.priority.HOP)
                self._poll(max(0.0, min(0.1, self.prehashed.next_round - time.monotonic()))
                           if running else 0.1)
                if self.lost is None and self.role.primary_silent(self.last_control,
                                                                  self.svm_started):
                    self.lost = (self.last_control, time.monotonic(), "control silence")
                    self.last_control = None    # one decision per silence
                    self.c.add("peer_lost", 1)
                if self.resume_at and self.lost is None and not self.role.active \
                        and time.monotonic() >= self.resume_at:
                    self.resume_at = 0.0         # the primary was not declared lost
                    self.domain.resume()
                faults.point("secondary.turn")
                if self.lost is not None:
                    self.resume_at = 0.0         # the takeover resumes it (or not)
                    last_seen, detected, by = self.lost
                    self.lost = None
                    self.priority.urgent(False)
                    self.role.take_over(self.bus, self.last_epoch, last_seen, detected, by,
                                        self.hb_events, self.disk)
                if self.role.active:
                    self.priority.urgent(False)
                    self.role.serve(self.bus)
        finally:
            self.role.close()
            self.close()

    # -- what arrives ------------------------------------------------------
    def _poll(self, timeout_s: float) -> None:
        """Take in what arrived within ``timeout_s``: heartbeat events, control records,
        the restore stage's verdicts."""
        events = dict(self.poller.poll(poll_ms(timeout_s)))
        if self.hb_events.fileno() in events:
            while self.hb_events.poll(0):
                lost = self.role.heard(self.hb_events.recv())
                if lost is not None:
                    self.primary_lost(lost.last_seen, lost.detected, "heartbeat")
        if self.control in events:
            got = self._recv()
            self.last_control = time.monotonic()
            if got is not None and not self.role.active:
                self.on_control(*got)
        if self.restore_ctrl.fileno() in events:
            m = self.restore_ctrl.recv()
            self.replies[m.epoch] = m

    def _recv(self) -> tuple[wire.Header, bytes] | None:
        """One validated control record (the ROUTER's route frame taken off and kept as
        :attr:`route`), or None; bad records are counted and dropped."""
        got = _recv_control(self.control, self.ctx, self.c, routed=True)
        if got is None:
            return None
        self.route, hdr, msg = got
        return hdr, msg

    def _send(self, msg: bytes) -> bool:
        if self.route is None:      # (nothing heard yet: nobody to answer)
            self.c.add("control_dropped", 1)
            return False
        return _send_control(self.control, msg, self.ctx, self.c, self.route)

    def primary_lost(self, last_seen: float, detected: float, detected_by: str) -> None:
        """The primary is lost. Before protection there is nothing to take over from;
        after it, an open epoch ends torn and then the takeover is tried (``run``)."""
        self.c.add("peer_lost", 1)
        if not self.svm_started:
            self.role.refuse_unprotected()
            return
        self.lost = (last_seen, detected, detected_by)

    def _refuse_unsynced(self, begin: wire.CheckpointBegin) -> None:
        """An ordinary checkpoint or a pre-copy round (FLAG_PRECOPY: as much a delta as a
        checkpoint) for a secondary that never had a full sync: a primary
        that took this (new) process for the one it had synced, which died within one
        heartbeat timeout, its sockets reconnected here (issue 11). Applied, the SVM
        would run from a memory that is no copy of the PVM (or, with a disk, the commit
        fails). It is torn (ACK aborted with the reason), never applied, and this
        secondary stops as stale: the primary, its epoch unanswered or the heartbeat's new
        instance heard, goes unprotected and syncs the restarted node afresh."""
        what = ("a pre-copy round (what changed since the full sync)"
                if begin.flags & wire.FLAG_PRECOPY else "an ordinary checkpoint (not a full sync)")
        why = (f"epoch {begin.epoch}: {what}, but this secondary never received a full sync; "
               "refused, not applied")
        self.c.add("unsynced_refused", 1)
        self._info(state="stale", stale_reason=why)
        self.ctx.log.error("epoch=%d event=unsynced_refused %s", begin.epoch, why,
                           extra={"epoch": begin.epoch})
        self._send(wire.encode_ack(begin.epoch, wire.ACK_ABORTED, 0, why, b"",
                                   assembled_ns=0, apply_ns=0))
        raise StaleSecondary(f"{why}; stopping (start it again to join as a new secondary: "
                             "the primary syncs it)")

    def _checkpoint_redirector(self, epoch: int) -> None:
        """A real guest NIC: the redirector drops the offsets it learnt, the SVM still
        paused (pipeline/net/redirector.py, "Checkpoints"). A redirector that cannot be
        told is logged and counted; the epoch stands (its offsets stay: a mismatch, then
        another checkpoint, follows on a connection opened since)."""
        from pipeline.failover.offsets import CheckpointNotice
        if self.redirector_notice is None:
            self.redirector_notice = CheckpointNotice(self.settings.net.redirector_control)
        why = self.redirector_notice.notify()
        if why:
            self.c.add("errors", 1)
            self.ctx.log.warning("epoch=%d event=redirector_not_checkpointed %s", epoch, why,
                                 extra={"epoch": epoch})

    def _seal_hello(self, hello: wire.Hello) -> bytes | None:
        """This node's seal share for its answer to ``hello`` (None unless sealed), the key
        installed. A primary that does not seal is answered all the same (it then stops,
        naming both modes); this node counts and logs it."""
        if self.settings.security.mode != "sealed":
            return None
        if self.seal_shares is not None and self.seal_shares[0] == hello.seal_share:
            return self.seal_shares[1]
        share = seal.new_share()
        try:
            key_id = _agree_seal(self.settings, self.shared, hello, hello.seal_share, share)
        except ProtocolError as exc:
            self.c.add("errors", 1)
            self.ctx.log.error("control channel: %s", exc)
            return share
        self.seal_shares = (hello.seal_share, share)
        self.ctx.log.info("event=seal_key key_id=%#010x: pages sealed under a new key", key_id)
        return share

    def on_control(self, hdr: wire.Header, msg: bytes) -> None:
        try:
            if hdr.type == wire.HELLO:
                hello = wire.decode_hello(msg)
                _handshake_check(self.settings, self.domain, hello)
                try:
                    _agree_written(self.domain, hello)
                except ProtocolError as exc:  # answered all the same: the primary names both and stops
                    self.c.add("errors", 1)
                    self.ctx.log.error("control channel: %s", exc)
                self._send(wire.encode_hello(self.domain.page_size, wire.ROLE_SECONDARY,
                                             self.domain.page_count, self.settings.node.name,
                                             self.domain.hypervisor_written(),
                                             self._seal_hello(hello)))
                self.ctx.log.info("primary %r connected", hello.name)
                self.role.peer_name = hello.name
                if not self.svm_started:
                    self._info(state="syncing", peer=hello.name)
            elif hdr.type == wire.CHECKPOINT_BEGIN:
                begin = wire.decode_checkpoint_begin(msg)
                if begin.flags & wire.FLAG_SYNC and self.svm_started:
                    # A primary that went unprotected (a partition healed) syncs whoever
                    # answers its HELLO afresh. In place that would go wrong twice: the
                    # mirror's input log belongs to the old input stream (it refuses the
                    # new one, so a later takeover misses inputs), and from the sync's
                    # first epoch on this secondary would take over from a half-synced
                    # memory. So it stops; restarted, it joins as a new secondary.
                    self._info(state="stale", stale_reason=f"epoch {begin.epoch}: a new "
                               f"full sync after epoch {self.last_epoch}")
                    raise StaleSecondary(
                        f"epoch {begin.epoch}: the primary starts a new full sync, but this "
                        f"secondary ran its SVM from checkpoints up to epoch "
                        f"{self.last_epoch} already; stopping (start it again to join as a "
                        "new secondary)")
                self.begins.append(begin)
            elif hdr.type == wire.NET_OFFSETS:
                from pipeline.failover.offsets import take_carried_offsets
                try:
                    what = take_carried_offsets(self.settings, wire.decode_net_offsets(msg))
                except (ValueError, OSError) as exc:
                    self._info(net_offsets=f"not taken: {exc}")
                    raise ProtocolError(f"NET_OFFSETS not taken: {exc}") from None
                self._info(net_offsets=what)
                self.ctx.log.warning("event=net_offsets_received %s", what)
            elif hdr.type == wire.SHUTDOWN:
                wire.decode_shutdown(msg)  # a SHUTDOWN with a body is malformed: counted below
                self.ctx.log.info("the primary stopped on purpose")
                self._info(state="peer stopped")
            else:
                raise wire.WireError(f"{hdr.name} is not expected on the secondary's control "
                                     "channel")
        except (wire.WireError, ProtocolError) as exc:
            self.c.add("errors", 1)
            self.ctx.log.warning("control channel: %s", exc)
