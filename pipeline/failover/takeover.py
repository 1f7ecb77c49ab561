"""The active role: who holds it, how the secondary takes it over, what it serves then.

The coordinators (``pipeline/coordinator.py``) run the checkpoint protocol and call in
here for everything about the role:

- :class:`PrimaryRole`: with a witness, the primary holds the active role for a
  generation of its own before its guest's output counts, and gives up (:class:`RoleLost`)
  when its lease goes or the peer is active in a later generation.
- :class:`SecondaryRole`: the secondary follows the peer's generation from the
  heartbeat, decides that the primary is lost (heartbeat, or a silent control channel),
  passes the split-brain guard (``guard.py``) and makes the SVM the active VM; while
  active it answers "digest" requests.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import faults, messages
from pipeline.failover.guard import guard_takeover, make_fence
from pipeline.failover.roles import record_role
from pipeline.failover.witness import make_witness, witness_vm

log = logging.getLogger(__name__)


class RoleLost(RuntimeError):
    """This node may no longer act as the active side (the witness or the peer says so)."""


def signal_redirector(path: str, signum: int = signal.SIGUSR1) -> tuple[bool, str]:
    """``signum`` (SIGUSR1: fail over, SIGUSR2: re-protect) to the redirector whose pid
    file is ``path``; (sent, what happened). The pid must be a running
    ``pipeline.net.redirector`` (a stale file's pid may be reused)."""
    name = signal.Signals(signum).name
    try:
        with open(path) as fh:
            pid = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        return False, f"no redirector pid in {path}: {exc}"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return False, f"the redirector's pid {pid} (from {path}) is not running"
    if b"pipeline.net.redirector" not in cmdline:
        shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
        return False, f"pid {pid} (from {path}) is not a redirector: {shown}"
    try:
        os.kill(pid, signum)
    except OSError as exc:
        return False, f"{name} to the redirector (pid {pid}) failed: {exc}"
    return True, f"{name} sent to the redirector (pid {pid})"


def peer_generation(ev: Any) -> int | None:
    """The generation a heartbeat event reports the peer in (None: the event has none)."""
    if isinstance(ev, (messages.PeerUp, messages.PeerBack)):
        return int(ev.info.get("generation", 0))
    return None


class PeerBackWatch:
    """During a takeover attempt: reads the heartbeat stage's events (the coordinator is
    not reading them meanwhile) and says whether the primary is alive again. ``check()``
    is the guard's ``abandon``: the reason when the last event was the primary's
    heartbeat coming back (a PeerLost after it means lost again: the attempt goes on)."""

    def __init__(self, role: "SecondaryRole", events: Any) -> None:
        self.role, self.events = role, events
        self.reason = ""

    def check(self) -> str:
        while self.events is not None and self.events.poll(0):
            ev = self.events.recv()
            self.role.heard(ev)          # follows the peer's generation
            if isinstance(ev, (messages.PeerUp, messages.PeerBack)):
                self.reason = (f"the primary's heartbeat is back (generation "
                               f"{peer_generation(ev)}, seq {ev.info.get('seq')}) before the "
                               "guard granted the active role")
            elif isinstance(ev, messages.PeerLost):
                self.reason = ""
        return self.reason


@dataclass(frozen=True)
class PrimaryStart:
    """How a primary coordinator starts. Fixed roles: it connects to its secondary within
    ``peer.connect_timeout_ms`` and syncs it. ``wait_for_secondary`` (role auto): its guest
    runs unprotected until a secondary joins, however long that takes. ``generation`` > 0:
    the survivor of a takeover, which holds that generation already and keeps it;
    ``first_epoch`` goes on from the epochs its SVM had."""
    wait_for_secondary: bool = False
    generation: int = 0
    first_epoch: int = 0


class PrimaryRole:
    """The primary's hold on the active role. ``shared.generation`` is the generation it
    holds (0 without a witness); ``info(**kw)`` updates the node info, ``current()``
    reads it."""

    def __init__(self, settings: Any, shared: Any, info: Callable[..., None],
                 current: Callable[[], dict] = dict) -> None:
        self.settings, self.shared, self.info, self.current = settings, shared, info, current
        self.witness = None
        self.lost_reason = ""
        #: the heartbeat instance (random per process) of the secondary last heard
        self.peer_instance: int | None = None
        #: why the secondary counts as lost at once ("": it does not): its heartbeat
        #: came from another process than the one this primary was protected by
        self.replaced = ""

    def take(self, adopt: int = 0) -> None:
        """With a witness, hold the active role for a generation of our own (``adopt``:
        the generation this node's takeover was granted, kept); if another node holds
        it, this one refuses to start."""
        f = self.settings.failover
        cause = self.current().get("role_cause", "start")
        if f.witness == "none":
            record_role(self.info, self.current(), "primary", 0, cause)
            return
        self.witness = make_witness(f, witness_vm(self.settings), on_lost=self._on_lost)
        gen = adopt or self.witness.last_generation() + 1
        if not self.witness.acquire(self.settings.node.name, gen):
            raise RoleLost(f"the witness gives the active role to {self.witness.holder()}; "
                           "this primary does not start")
        self.shared.generation.value = gen
        self.info(generation=gen)
        record_role(self.info, self.current(), "primary", gen,
                    "the survivor of the takeover becomes the primary" if adopt else cause)

    def protected(self, peer: str) -> None:
        """A secondary holds a consistent copy again: after a takeover, how long the
        guest ran unprotected since it (``reprotected_ms``)."""
        cur = self.current()
        extra = {}
        if cur.get("awaiting_reprotection"):
            ms = round((time.time() - float(cur["took_over_at"])) * 1000, 1)
            extra = {"reprotected_ms": ms}
            self.info(awaiting_reprotection=False, reprotected_ms=ms,
                      reprotections_after_takeover=int(
                          cur.get("reprotections_after_takeover", 0)) + 1)
            cur = self.current()
        record_role(self.info, cur, "primary", int(self.shared.generation.value),
                    f"protected by secondary {peer!r}", **extra)

    def heard(self, ev: Any) -> bool:
        """One heartbeat event: True if it says the secondary is lost. Raises RoleLost when
        the peer is active in a later generation than ours.

        A heartbeat from another secondary process than the one last heard says the
        old one is lost at once (:attr:`replaced`), silence or not: a new process that
        started within one heartbeat timeout of the old one's death never let the
        heartbeat go silent, and the control and pages sockets reconnect to it by
        themselves; taken for the old one, it was sent checkpoints of epochs it never had
        a full sync for (issue 11). It joins with a HELLO and a sync of its own."""
        gen = peer_generation(ev)
        if gen is not None and gen > self.shared.generation.value:
            # the other side took the active role in a later generation
            raise RoleLost(f"the peer is active in generation {gen} (ours "
                           f"{self.shared.generation.value})")
        if isinstance(ev, (messages.PeerUp, messages.PeerBack)):
            instance = ev.info.get("instance")
            if self.peer_instance is not None and instance != self.peer_instance:
                self.replaced = (f"the secondary's heartbeat comes from a new process "
                                 f"(instance {instance}, was {self.peer_instance})")
                self.peer_instance = instance
                return True
            self.peer_instance = instance
        return isinstance(ev, messages.PeerLost)

    def loss_handled(self) -> None:
        """The primary went unprotected, or re-protects a secondary that answered its
        HELLO (after a full sync of its own): a replacement heard before is dealt with, and
        the next heartbeat instance is the one to keep (the new secondary's PeerBack can come
        after its HELLO: taken for a replacement, it re-protected the pair a second time)."""
        self.replaced = ""
        self.peer_instance = None

    def peer_back_within(self, events: Any, grace_s: float,
                         stopping: Callable[[], bool] = lambda: False) -> str:
        """The heartbeat declared the secondary lost. Before the primary acts on it (goes
        unprotected: it releases every output it holds, and any secondary needs a full
        sync after that), the heartbeat gets ``grace_s`` more: a secondary heard again
        meanwhile was not lost (a lossy link, a stalled heartbeat). Returns why it is not
        lost, "" if it is. Reads ``events`` (the heartbeat stage's pipe) itself; raises
        RoleLost as :meth:`heard` does.

        Only the same secondary process counts as back (its heartbeat's instance): a
        new one (the lost one restarted, or another host at its address) holds nothing
        of this pair; it joins with a HELLO and a sync of its own (memory and disk).
        Taken for the lost one, it was sent the old sync's epochs and its disk never got
        the disk sync's BEGIN (the fault matrix's partition rows: its first commit
        waited for writes "seen only up to 0")."""
        deadline = time.monotonic() + grace_s
        reason = ""
        while True:
            if self.replaced:
                log.warning("%s: the lost one is gone", self.replaced)
                return ""
            while events.poll(0):
                ev = events.recv()
                self.heard(ev)
                if self.replaced:
                    log.warning("%s: the lost one is gone", self.replaced)
                    return ""
                elif isinstance(ev, (messages.PeerUp, messages.PeerBack)):
                    reason = (f"the secondary's heartbeat is back (seq {ev.info.get('seq')}) "
                              "before the primary acted on its loss")
                elif isinstance(ev, messages.PeerLost):
                    reason = ""
            left = deadline - time.monotonic()
            if reason or left <= 0 or stopping():
                return reason
            events.poll(min(left, 0.05))

    def check(self) -> None:
        """Raises RoleLost once the witness lease is gone."""
        if self.lost_reason:
            raise RoleLost(self.lost_reason)

    def _on_lost(self, why: str) -> None:
        """From the witness's keepalive thread: our lease is gone; the main loop stops."""
        self.lost_reason = f"the witness lease was lost: {why}"

    def close(self) -> None:
        if self.witness is not None:
            self.witness.close()


class SecondaryRole:
    """The secondary's side of the role: standby until the primary is lost, then, if the
    guard allows, active. ``info(**kw)`` updates the node info."""

    def __init__(self, ctx: Any, settings: Any, domain: Any, shared: Any,
                 info: Callable[..., None], current: Callable[[], dict] = dict) -> None:
        self.ctx, self.settings, self.domain, self.shared = ctx, settings, domain, shared
        self.info, self.current = info, current
        self.c = ctx.counters
        self.active = False
        self.peer_generation = 0
        self.peer_name = ""
        self.witness = None
        self.active_digests = 0

    def heard(self, ev: Any) -> messages.PeerLost | None:
        """One heartbeat event; the PeerLost event if it means the primary is lost."""
        gen = peer_generation(ev)
        if gen is not None:
            self.peer_generation = gen
        elif isinstance(ev, messages.PeerLost) and not self.active:
            return ev
        return None

    def primary_silent(self, last_control: float | None, protected: bool) -> bool:
        """A second opinion beside the heartbeat: a protected secondary that hears nothing
        on the control channel for longer than a checkpoint interval and an epoch timeout
        together takes the primary for lost (the split-brain guard still decides)."""
        if self.active or not protected or last_control is None:
            return False
        cp = self.settings.checkpoint
        limit = (cp.timer_ms(self.settings.net.release) + cp.epoch_timeout_ms) / 1000
        if time.monotonic() - last_control <= limit:
            return False
        self.ctx.log.warning("event=primary_silent no control record for %.1f s", limit)
        return True

    def refuse_unprotected(self) -> None:
        """The primary was lost before the first checkpoint committed."""
        self.info(state="primary lost before protection")
        self.ctx.log.error("event=primary_lost the primary was lost before the first "
                           "checkpoint committed: the SVM has no consistent state to take "
                           "over from; staying passive")

    def take_over(self, bus: Any, last_epoch: int, last_seen: float, detected: float,
                  detected_by: str, events: Any = None, disk: Any = None) -> bool:
        """The primary is lost and no epoch is open: pass the split-brain guard and make
        the SVM the active VM, going on from its own state. True if it went active.

        ``events``: the heartbeat stage's event pipe. While the guard has not granted the
        role yet (the witness still refuses: the primary's lease runs), a heartbeat of
        the primary that comes back abandons the attempt (:meth:`_abandon`); once granted,
        the takeover goes through.

        ``disk``: the disk stage's control (a replicated disk). Its failover merge (the
        SVM's overlay into the image) is done before the SVM resumes and the node says
        it is active: a node that said so mid-merge had an export that hung on every
        request until the merge ended, or (a merge that fails for good) a VM live on a
        disk that is no checkpoint plus its own writes."""
        detect_ms = (detected - last_seen) * 1000
        f = self.settings.failover
        vm = witness_vm(self.settings)
        if self.witness is None and f.witness != "none":
            self.witness = make_witness(f, vm)
        # the next generation after any the peer or the witness knows of
        generation = max(self.peer_generation,
                         self.witness.last_generation() if self.witness else 0) + 1
        self.ctx.log.warning("epoch=%d event=takeover_attempt the primary was lost (%s, "
                             "%.0f ms after its last heartbeat); asking the guard for "
                             "generation %d", last_epoch, detected_by, detect_ms, generation,
                             extra={"epoch": last_epoch})
        faults.point("takeover.guard")
        back = PeerBackWatch(self, events)
        ok, why = guard_takeover(make_fence(f), self.witness, self.settings.node.name,
                                 generation, peer=self.peer_name, vm=vm, abandon=back.check)
        if not ok and back.reason:
            self._abandon(last_epoch, detected, back.reason)
            return False
        if not ok:
            self.c.add("takeovers_refused", 1)
            self.info(state="standby", takeover_refused=why)
            self.ctx.log.error("event=takeover_refused the SVM does not go live: %s", why)
            return False
        # committed: the witness granted the role (or the fence ran); a primary heard
        # from now on is a stale one, which gives the role up (PrimaryRole.heard, its lease)
        faults.point("takeover.granted")
        if disk is not None and not self._merge_disk(disk, last_epoch):
            return False
        self.shared.generation.value = generation
        self.shared.active.value = 1
        self.active = True
        if self.domain.is_paused:
            self.domain.resume()
        if f.redirector_pid_file:
            self._signal_redirector(f.redirector_pid_file)
        takeover_ms = (time.monotonic() - detected) * 1000
        self.c.add("takeovers", 1)
        self.info(role="active", state="active", generation=generation,
                  failover_detect_ms=round(detect_ms, 1), takeover_ms=round(takeover_ms, 1),
                  failover_detected_by=detected_by,
                  failover_detected_at=time.time() - (time.monotonic() - detected),
                  active_since_epoch=last_epoch, takeover_guard=why,
                  took_over_at=time.time(), awaiting_reprotection=True,
                  failovers=int(self.current().get("failovers", 0)) + 1)
        record_role(self.info, self.current(), "active", generation,
                    f"the primary {self.peer_name or '(peer)'} was lost ({detected_by}); "
                    f"{why}", takeover_ms=round(takeover_ms, 1))
        bus.publish("role", last_epoch, role="active")
        self.ctx.log.warning("epoch=%d event=takeover the SVM is the active VM (generation %d); "
                             "detected %.0f ms after the last heartbeat, live %.0f ms later",
                             last_epoch, generation, detect_ms, takeover_ms,
                             extra={"epoch": last_epoch})
        return True

    def _merge_disk(self, disk: Any, last_epoch: int) -> bool:
        """The disk stage's failover merge, the SVM still paused; False (the takeover
        refused, the SVM stays paused, counted) if it failed for good: the store's
        journal still says ``merging`` and the merge is finished when the store is
        opened again (pipeline/disk/store.py), never served half done."""
        self.info(state="takeover: merging the disk")
        t0 = time.monotonic()
        try:
            # long: a large overlay takes its time; the guest's disk I/O waits for it anyway
            disk.call("failover", reply_timeout_ms=600_000, give_up=self.ctx.stopping)
        except disk.Error as exc:   # DiskControlError (pipeline/stages/disk.py)
            self.c.add("takeovers_refused", 1)
            self.c.add("errors", 1)
            why = f"the disk's failover merge failed: {exc}"
            self.info(state="standby", takeover_refused=why)
            self.ctx.log.error("epoch=%d event=takeover_refused the SVM does not go live: %s",
                               last_epoch, why, extra={"epoch": last_epoch})
            return False
        self.info(takeover_disk_merge_ms=round((time.monotonic() - t0) * 1000, 1))
        return True

    def _signal_redirector(self, path: str) -> None:
        """The guest is live: its interface goes onto the clients' network (the redirector
        bridges it and announces the guest's MAC; QEMU's ``x-colo-lost-heartbeat``). A
        redirector that cannot be told is logged and counted; the takeover stands."""
        ok, why = signal_redirector(path)
        self.info(redirector=why)
        if ok:
            self.ctx.log.warning("event=redirector_failover %s", why)
        else:
            self.c.add("errors", 1)
            self.ctx.log.error("event=redirector_not_told the guest's interface stays off "
                               "the clients' network: %s", why)

    def _abandon(self, last_epoch: int, detected: float, reason: str) -> None:
        """A takeover attempt given up before it committed: the primary is alive after
        all (a false loss: a lossy link, a stalled heartbeat). The SVM stays the standby,
        paused at its last committed checkpoint; the primary's next BEGIN goes on."""
        n = int(self.current().get("takeovers_abandoned", 0)) + 1
        self.ctx.log.warning("epoch=%d event=takeover_abandoned %.0f ms after the primary was "
                             "declared lost: %s; the SVM stays the standby (%d abandoned)",
                             last_epoch, (time.monotonic() - detected) * 1000, reason, n,
                             extra={"epoch": last_epoch})
        self.info(takeover_abandoned=reason, takeovers_abandoned=n)
        self.c.add("takeovers_abandoned", 1)     # last: a reader of it finds the rest done

    def serve(self, bus: Any) -> None:
        """Active: a "digest" request hashes all of the guest's memory between two inputs
        (the input stream is held until the guest is idle), for checks and the demo."""
        for _cause, detail in bus.drain_requests():
            if detail != "digest":
                continue
            io = self.domain.simulated_io()
            self.shared.hold_inputs.value = 1
            try:
                deadline = time.monotonic() + 10
                while (io is not None and io.input_seq() < io.input_head
                       and time.monotonic() < deadline):
                    time.sleep(0.002)
                self.domain.pause()
                digest = self.domain.memory_digest()
                seq = io.vcpu_input_seq(self.domain.get_vcpu_state()) if io is not None else -1
                self.domain.resume()
            finally:
                self.shared.hold_inputs.value = 0
            self.active_digests += 1
            self.info(active_digest=digest.hex(), active_input_seq=seq,
                      active_digests=self.active_digests)

    def close(self) -> None:
        if self.witness is not None:
            self.witness.close()
