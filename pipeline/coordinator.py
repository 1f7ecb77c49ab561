"""The checkpoint state machine of each side (DESIGN.md, "One checkpoint").

Primary, per epoch e:
  1. decide: timer, dirty threshold, or a comparator's request (never faster than
     ``min_interval_ms``); send CHECKPOINT_BEGIN(e) to the secondary;
  2. have the snapshot stage pause the PVM, copy its dirty pages and vCPU state into
     the rings and resume it; publish ``snapshot``;
  3. wait for SVM_DIRTY(e), the send stage's "sent e", and ACK(e);
  4. committed: fold the epoch's page hashes into the hash table, publish ``committed``
     (comparators release what they held). Aborted or timed out: the epoch's pages are
     carried into the next epoch (they left the dirty log but never reached the SVM).

Secondary, per epoch e:
  1. on CHECKPOINT_BEGIN(e): pause the SVM, read and clear its dirty log, answer SVM_DIRTY;
  2. when the restore stage says e is assembled: have it apply e (or roll back), resume
     the SVM, answer ACK(e); a BEGIN whose epoch does not complete within
     ``epoch_timeout_ms`` is aborted.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from pipeline import sockets, wire
from pipeline.checkpoint_api import CAUSES, CheckpointBus
from pipeline.config import Settings
from pipeline.counters import STATUS_ABORTED, STATUS_COMMITTED, NodeCounters
from pipeline.stages.common import HashTable, StageContext
from pipeline.stages.send import Pending
from pipeline.xen_io.base import Domain

log = logging.getLogger(__name__)

TICK_S = 0.002   # how often the primary looks at its triggers


class ProtocolError(RuntimeError):
    """The peer said something that breaks the checkpoint protocol."""


def _handshake_check(settings: Settings, domain: Domain, hello: wire.Hello) -> None:
    if hello.page_size != domain.page_size or hello.page_count != domain.page_count:
        raise ProtocolError(
            f"peer {hello.name!r} has a guest of {hello.page_count} pages of {hello.page_size} "
            f"bytes; this node's guest has {domain.page_count} pages of {domain.page_size} bytes")


def _send_control(sock: zmq.Socket, msg: bytes, ctx: StageContext, counters) -> bool:
    """Send on the control channel; when the peer is gone the record is dropped (counted):
    the protocol recovers by timeouts and a fresh HELLO, never by blocking a coordinator."""
    try:
        sock.send(msg)
        return True
    except zmq.Again:
        counters.add("control_dropped", 1)
        ctx.log.warning("control channel: peer not reachable, dropped a %s record",
                        wire.decode_header(msg).name)
        return False


def _recv_control(sock: zmq.Socket, ctx: StageContext, counters) -> tuple[wire.Header, bytes] | None:
    """One validated control record, or None; bad records are counted and dropped."""
    msg = sock.recv()
    try:
        return wire.decode_header(msg), msg
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
    sent: dict | None = None
    ack: wire.Ack | None = None
    input_seq: int = -1
    pvm_digest: bytes = b""
    extra: dict = field(default_factory=dict)


class PrimaryCoordinator:
    def __init__(self, ctx: StageContext, settings: Settings, node: NodeCounters, domain: Domain,
                 snap_ctrl, send_ctrl, table: HashTable, pending: Pending, epoch_value) -> None:
        self.ctx, self.settings, self.node, self.domain = ctx, settings, node, domain
        self.snap_ctrl, self.send_ctrl = snap_ctrl, send_ctrl
        self.table, self.pending, self.epoch_value = table, pending, epoch_value
        self.c = ctx.counters
        self.epoch = 0
        self.carry = np.zeros(0, np.uint64)
        self.last_checkpoint = 0.0
        self.pending_request: tuple[str, int] | None = None

    # -- helpers ----------------------------------------------------------
    def _send(self, msg: bytes) -> bool:
        return _send_control(self.control, msg, self.ctx, self.c)

    def _info(self, **kw) -> None:
        info = self.node.node_info()
        info.update(kw)
        self.node.set_node_info(info)

    def _wait(self, deadline: float, want: set[str], res: EpochResult) -> None:
        """Wait until every event in ``want`` happened for ``res.epoch`` (or the deadline)."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.snap_ctrl.fileno(), zmq.POLLIN)
        poller.register(self.send_ctrl.fileno(), zmq.POLLIN)
        while want and not self.ctx.stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"epoch {res.epoch}: no {', '.join(sorted(want))} within "
                                   f"{self.settings.checkpoint.epoch_timeout_ms} ms")
            events = dict(poller.poll(min(left, 0.2) * 1000))
            if self.snap_ctrl.fileno() in events:
                m = self.snap_ctrl.recv()
                if m[0] == "snapshotted":
                    _, e, res.pages_dirty, res.pause_ns, res.input_seq, res.pvm_digest = m
                    self.bus.publish("snapshot", e, input_seq=res.input_seq)
                want.discard("synced" if m[0] == "synced" else "snapshotted")
            if self.send_ctrl.fileno() in events:
                m = self.send_ctrl.recv()
                if m[1] == res.epoch:
                    res.sent = m[2]
                    want.discard("sent")
            if self.control in events:
                got = _recv_control(self.control, self.ctx, self.c)
                if got is None:
                    continue
                hdr, msg = got
                if hdr.type == wire.SVM_DIRTY and hdr.epoch == res.epoch:
                    res.svm_dirty = len(wire.decode_svm_dirty(msg, self.domain.page_count)[1])
                    want.discard("svm_dirty")
                elif hdr.type == wire.ACK and hdr.epoch == res.epoch:
                    res.ack = wire.decode_ack(msg)
                    want.discard("ack")
                elif hdr.type == wire.SHUTDOWN:
                    raise ProtocolError("the secondary is shutting down")
                else:
                    self.c.add("stale_records", 1)
                    self.ctx.log.warning("control: ignored %s of epoch %d while in epoch %d",
                                         hdr.name, hdr.epoch, res.epoch)

    # -- the protocol -----------------------------------------------------
    def handshake(self) -> None:
        self._send(wire.encode_hello(self.domain.page_size, wire.ROLE_PRIMARY,
                                     self.domain.page_count, self.settings.node.name))
        deadline = time.monotonic() + self.settings.peer.connect_timeout_ms / 1000
        while time.monotonic() < deadline and not self.ctx.stopping():
            if self.control.poll(200):
                hello = wire.decode_hello(self.control.recv())
                _handshake_check(self.settings, self.domain, hello)
                self.ctx.log.info("secondary %r connected", hello.name)
                return
        raise ProtocolError(f"no secondary answered at {self.settings.peer.address} within "
                            f"{self.settings.peer.connect_timeout_ms} ms")

    def checkpoint(self, cause: str, flags: int = 0) -> EpochResult:
        e = self.epoch
        self.epoch += 1
        self.epoch_value.value = e + 1
        res = EpochResult(e, cause, time.time_ns())
        t0 = time.monotonic()
        sync = bool(flags & wire.FLAG_SYNC)
        self._send(wire.encode_checkpoint_begin(e, CAUSES.index(cause), flags))
        if sync:
            self.snap_ctrl.send(("sync", e))
        else:
            self.snap_ctrl.send(("snapshot", e, flags, self.carry))
        deadline = t0 + self.settings.checkpoint.epoch_timeout_ms / 1000
        want = {"synced" if sync else "snapshotted", "svm_dirty", "sent", "ack"}
        try:
            self._wait(deadline, want, res)
            ok = res.ack is not None and res.ack.status == wire.ACK_COMMITTED
            reason = res.ack.reason if res.ack is not None else "stopped"
        except TimeoutError as exc:
            ok, reason = False, str(exc)
        commit_ns = int((time.monotonic() - t0) * 1e9)
        n = int(self.pending.count[0])
        if ok:
            self.table.update(self.pending.pfns[:n], self.pending.hashes[:n])
            self.carry = np.zeros(0, np.uint64)
            self.bus.publish("committed", e, input_seq=res.input_seq)
            self.c.add("epochs_committed", 1)
        else:
            self.carry = np.union1d(self.carry, self.pending.pfns[:n]).astype(np.uint64)
            self.bus.publish("aborted", e, reason=reason)
            self.c.add("epochs_aborted", 1)
            self.ctx.log.warning("epoch=%d event=aborted reason=%r carried_pages=%d", e, reason,
                                 n, extra={"epoch": e})
        sent = res.sent or {}
        self.node.record_checkpoint(
            epoch=e, cause=CAUSES.index(cause), started_ns=res.started_ns,
            pvm_pause_ns=res.pause_ns, commit_ns=commit_ns, pages_dirty=res.pages_dirty,
            pages_svm_dirty=max(res.svm_dirty, 0), pages_sent=sent.get("pages", 0),
            pages_skipped_hash=sent.get("pages_ref", 0), pages_zero=sent.get("pages_zero", 0),
            bytes_wire=sent.get("bytes_wire", 0),
            bytes_raw=sent.get("pages", 0) * self.domain.page_size,
            status=STATUS_COMMITTED if ok else STATUS_ABORTED)
        self.ctx.log.info("epoch=%d event=checkpoint status=%s cause=%s dirty=%d sent=%d "
                          "skipped_hash=%d zero=%d wire_bytes=%d pause_ms=%.3f commit_ms=%.1f",
                          e, "committed" if ok else "aborted", cause, res.pages_dirty,
                          sent.get("pages", 0), sent.get("pages_ref", 0),
                          sent.get("pages_zero", 0), sent.get("bytes_wire", 0),
                          res.pause_ns / 1e6, commit_ns / 1e6, extra={"epoch": e})
        self._info(epoch=e, committed=ok)
        if ok and flags & wire.FLAG_DIGEST:
            svm = res.ack.memory_digest
            self._info(final_epoch=e, pvm_digest=res.pvm_digest.hex(), svm_digest=svm.hex(),
                       memory_equal=res.pvm_digest == svm)
        self.last_checkpoint = time.monotonic()
        res.extra["ok"] = ok
        return res

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
            self.pending_request = (cause, flags)
        pend = self.pending_request
        if pend is not None and since >= cp.min_interval_ms:
            self.pending_request = None
            return pend
        if since >= cp.max_interval_ms:
            return ("timer", 0)
        if since >= cp.min_interval_ms:
            count = self.domain.dirty_count()
            if count >= cp.dirty_threshold_pages:
                return ("dirty_threshold", 0)
        return None

    def run(self) -> None:
        nctx = sockets.NodeContext(self.settings)
        self.control = sockets.control(nctx)
        self.bus = CheckpointBus(self.settings.run_dir, nctx.ctx)
        self._info(role="primary", state="connecting", epoch=-1,
                   stage_pids={**self.node.node_info().get("stage_pids", {}),
                               "coordinator": os.getpid()})
        try:
            self.handshake()
            self._info(state="syncing")
            res = self.checkpoint("initial", wire.FLAG_SYNC)
            if not res.extra["ok"]:
                raise ProtocolError("the first full sync failed; the secondary is not protected")
            self.checkpoint("initial")
            self._info(state="protected")
            while not self.ctx.stopping():
                trig = self.next_trigger()
                if trig is None:
                    time.sleep(TICK_S)
                    continue
                self.checkpoint(*trig)
        finally:
            try:
                self.control.send(wire.encode_shutdown(self.epoch), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.bus.close()
            nctx.close()


class SecondaryCoordinator:
    def __init__(self, ctx: StageContext, settings: Settings, node: NodeCounters, domain: Domain,
                 restore_ctrl) -> None:
        self.ctx, self.settings, self.node, self.domain = ctx, settings, node, domain
        self.restore_ctrl = restore_ctrl
        self.c = ctx.counters
        self.begun: dict[int, tuple[wire.CheckpointBegin, np.ndarray, float]] = {}
        self.ready: dict[int, tuple[bool, str]] = {}
        self.svm_started = False

    def _send(self, msg: bytes) -> bool:
        return _send_control(self.control, msg, self.ctx, self.c)

    def _info(self, **kw) -> None:
        info = self.node.node_info()
        info.update(kw)
        self.node.set_node_info(info)

    def on_begin(self, begin: wire.CheckpointBegin) -> None:
        self.domain.pause()
        dirty = self.domain.read_and_clear_dirty() if self.svm_started else np.zeros(0, np.uint64)
        self._send(wire.encode_svm_dirty(begin.epoch, dirty))
        deadline = time.monotonic() + self.settings.checkpoint.epoch_timeout_ms / 1000
        self.begun[begin.epoch] = (begin, dirty, deadline)

    def finish(self, epoch: int, ok: bool, reason: str) -> None:
        begin, dirty, _ = self.begun.pop(epoch)
        self.ready.pop(epoch, None)
        want_digest = bool(begin.flags & wire.FLAG_DIGEST)
        if ok:
            self.restore_ctrl.send(("apply", epoch, dirty, want_digest))
        else:
            self.restore_ctrl.send(("abort", epoch, dirty, reason))
        reply = self.restore_ctrl.recv()
        committed = reply[0] == "applied"
        digest, input_seq, applied = b"", -1, 0
        if committed:
            _, _, applied, digest, input_seq = reply
        else:
            reason = reply[2]
        if not begin.flags & wire.FLAG_SYNC or self.svm_started:
            if not self.svm_started:
                self.domain.enable_dirty_log()
                self.svm_started = True
            self.domain.resume()
        self._send(wire.encode_ack(
            epoch, wire.ACK_COMMITTED if committed else wire.ACK_ABORTED, applied,
            "" if committed else reason, digest))
        self.ctx.log.info("epoch=%d event=%s pages=%d svm_dirty=%d%s", epoch,
                          "applied" if committed else "discarded", applied, len(dirty),
                          "" if committed else f" reason={reason!r}", extra={"epoch": epoch})
        if committed:
            self.bus.publish("committed", epoch, input_seq=input_seq)
            self.c.add("epochs_committed", 1)
            self._info(epoch=epoch, state="protected" if self.svm_started else "syncing")
        else:
            self.bus.publish("aborted", epoch, reason=reason)
            self.c.add("epochs_aborted", 1)
        self.node.record_checkpoint(epoch=epoch, cause=begin.cause, started_ns=time.time_ns(),
                                    pages_svm_dirty=len(dirty), pages_sent=applied,
                                    status=STATUS_COMMITTED if committed else STATUS_ABORTED)

    def run(self) -> None:
        nctx = sockets.NodeContext(self.settings)
        self.control = sockets.control(nctx)
        self.bus = CheckpointBus(self.settings.run_dir, nctx.ctx)
        self._info(role="secondary", state="waiting", epoch=-1,
                   stage_pids={**self.node.node_info().get("stage_pids", {}),
                               "coordinator": os.getpid()})
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.restore_ctrl.fileno(), zmq.POLLIN)
        try:
            while not self.ctx.stopping():
                events = dict(poller.poll(100))
                if self.control in events:
                    got = _recv_control(self.control, self.ctx, self.c)
                    if got is not None:
                        self.on_control(*got)
                if self.restore_ctrl.fileno() in events:
                    m = self.restore_ctrl.recv()
                    if m[0] == "ready":
                        self.ready[m[1]] = (m[2], m[3])
                now = time.monotonic()
                for e in sorted(self.begun):
                    if e in self.ready:
                        self.finish(e, *self.ready[e])
                    elif now > self.begun[e][2]:
                        self.finish(e, False, f"epoch incomplete after "
                                    f"{self.settings.checkpoint.epoch_timeout_ms} ms")
        finally:
            self.bus.close()
            nctx.close()

    def on_control(self, hdr: wire.Header, msg: bytes) -> None:
        try:
            if hdr.type == wire.HELLO:
                hello = wire.decode_hello(msg)
                _handshake_check(self.settings, self.domain, hello)
                self._send(wire.encode_hello(self.domain.page_size, wire.ROLE_SECONDARY,
                                             self.domain.page_count, self.settings.node.name))
                self.ctx.log.info("primary %r connected", hello.name)
                self._info(state="syncing", peer=hello.name)
            elif hdr.type == wire.CHECKPOINT_BEGIN:
                begin = wire.decode_checkpoint_begin(msg)
                for e in [e for e in self.begun if e < begin.epoch]:
                    self.finish(e, False, f"epoch {begin.epoch} began before it completed")
                self.on_begin(begin)
            elif hdr.type == wire.SHUTDOWN:
                self.ctx.log.info("the primary stopped on purpose")
                self._info(state="peer stopped")
            else:
                raise wire.WireError(f"{hdr.name} is not expected on the secondary's control "
                                     "channel")
        except (wire.WireError, ProtocolError) as exc:
            self.c.add("errors", 1)
            self.ctx.log.warning("control channel: %s", exc)
