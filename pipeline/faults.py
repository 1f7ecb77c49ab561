"""Faults at named points: kill a process, or fail a call, exactly where a test says.

Tests and ``scripts/fault_matrix.py`` do not kill processes at random moments hoping
one lands in the window that matters; they name the window. A process reads
``COLO_FAULT`` once, when this module is imported::

    COLO_FAULT=<point>[:<n>][:<action>][,<point>[:<n>][:<action>]...]

``n`` (default 1) is which pass of the point fires, counted per process from 1 (a
stage forked by the supervisor counts its own passes). ``action`` is one of

* ``kill`` (default): SIGKILL this process, as a crash would;
* ``killgroup``: SIGKILL this process's whole process group: a node started in its
  own session (``LocalPair``, systemd) dies as a whole, like its host;
* ``errno=<NAME>``: the call at the point fails with ``OSError(<NAME>)`` (e.g.
  ``errno=EIO``, ``errno=ENOSPC``), as a failing disk or syscall would;
* ``stop``: SIGSTOP this process (a hung process; SIGCONT resumes it);
* ``segv``: a real SIGSEGV raised in this process, as a crash in native code would
  (numpy, the C module ``_pagehash``, lz4, libzmq): ``faulthandler`` prints the Python
  frames of every thread into the process's log (``pipeline.signals.report_fatal_signals``)
  and the process dies of signal 11. No core file is written for it (``faulthandler``
  sets this process's core limit to 0 first: a test's crash is not evidence).

Before it acts, the process writes one line to stderr, ``COLO_FAULT fired: <point>
pass <n> <action> pid <pid>``, so a test can tell the fault fired and did not merely
fail to happen. When ``COLO_FAULT`` is unset, :func:`point` is a function that returns
at once; :data:`ACTIVE` is False then, for a hot loop that wants to skip even the call.
A malformed ``COLO_FAULT`` stops the process at import with an error naming it.

The named points (``<k>``: the point is passed once per item; choose the item with n):

Disk store, ``pipeline/disk/store.py`` (the secondary's commit and failover merge):

* ``store.buffer.append``                before append <k> of forwarded PVM writes to an
                                         epoch's buffer log (one pwritev of up to 256
                                         records); with ``errno=NAME`` that append fails,
                                         as a full or failing disk would
* ``store.commit.log_synced``            after the fdatasync of buffer log <k> of the commit
* ``store.journal.<state>.written``      the journal's temporary file written (and fsynced),
                                         not yet renamed; ``<state>``: ``committing``,
                                         ``committed``, ``merging``, ``active``
* ``store.journal.<state>.renamed``      renamed over journal.json, directory not yet fsynced
* ``store.journal.<state>.done``         the journal state is durable
* ``store.commit.record``                after record <k> of the commit was applied to the image
* ``store.commit.image_synced``          all records applied and the image fsynced
* ``store.commit.log_dropped``           after buffer log <k> was dropped (committed)
* ``store.failover.bitmap_saved``        the overlay bitmap saved (fsynced), journal untouched
* ``store.merge.run``                    after overlay run <k> was copied into the image
* ``store.merge.image_synced``           every run merged and the image fsynced

Primary disk, ``pipeline/disk/primary.py``:

* ``disk.primary.applied``               guest write <k> (of this process's primary disk side)
                                         is in the primary's image; its forward to the
                                         secondary may not have been sent yet (a host lost
                                         here leaves a block the secondary never saw)
* ``disk.primary.wait_forwarded``        the disk stage took the coordinator's <k>-th
                                         ``wait_forwarded`` request, not answered yet
                                         (with ``stop``: a disk stage that hangs)
* ``disk.primary.seal``                  the <k>-th seal: the epoch moved on (writes are
                                         tagged with the next one; the snapshot stage's
                                         set_epoch, in the pause), the closed epoch's SEAL
                                         not sent yet; with ``errno=NAME`` it is never sent
                                         (lost on the way, as in a primary killed with it
                                         still queued): the secondary gets the epoch's
                                         pages and END but cannot commit its disk

Primary coordinator, ``pipeline/coordinator.py`` (<k>: the k-th epoch of this coordinator;
epoch 0 is the full sync, then pre-copy rounds, then checkpoints):

* ``primary.begin_sent``         CHECKPOINT_BEGIN sent
* ``primary.acked``              the secondary's ACK (committed) received; the epoch's
                                 outputs not yet released (hash table not folded in,
                                 ``committed`` not published to the comparators)
* ``primary.released``           ``committed`` published
* ``primary.peer_lost``          the heartbeat declared the secondary lost; the primary not
                                 yet unprotected (it waits one more heartbeat timeout for
                                 the secondary to be heard again)
* ``primary.reprotect``          a new secondary answered the unprotected primary's HELLO;
                                 its full sync (re-protection) starts next

Snapshot stage, ``pipeline/stages/snapshot.py``:

* ``snapshot.dirty_read``        checkpoint <k>'s pause: the PVM paused, its dirty log read
                                 and cleared, no page copied or dispatched yet (with
                                 ``stop``: its pages are off the log and nowhere else)

Send stage, ``pipeline/stages/send.py``:

* ``send.pages``                 after PAGES record <k> went out (records count across
                                 epochs: the full sync's come first, so a small k is
                                 "during the full sync")
* ``send.epoch_end``             after EPOCH_END of the k-th epoch went out (before the ACK)

Secondary coordinator and restore stage:

* ``secondary.begin``            CHECKPOINT_BEGIN handled: SVM paused, SVM_DIRTY sent
* ``secondary.prehash``          prehash round <k> (the SVM running) read and cleared the
                                 SVM's dirty log, none of its pages hashed yet
* ``secondary.turn``             turn <k> of the secondary coordinator's wait for a BEGIN
                                 (woken, its checks done), before a takeover or the next wait
* ``secondary.applied``          the epoch checked whole by the restore stage (early ACK:
                                 its pages may still be being written) or applied, and
                                 the disk committed; the ACK not yet sent
* ``secondary.acked``            the ACK sent
* ``restore.assembled``          a checkpoint epoch (not the full sync or a pre-copy round)
                                 arrived whole, nothing of it applied yet; with
                                 ``errno=NAME`` the epoch ends torn there (rolled back, ACK
                                 aborted), as a page failing its hash would
* ``takeover.guard``             the primary declared lost, the takeover attempt about to ask
                                 the split-brain guard (nothing granted yet: a primary heard
                                 again from here on abandons the attempt)
* ``takeover.granted``           the guard granted the active role (the witness, the fence),
                                 the SVM not live yet (committed: the takeover goes through)
* ``verify.decode``              a verify worker is about to decode (lz4) batch <k> of its
                                 own into its rows of the staging area (raw batches, which
                                 the receive side copies there itself, do not count)
* ``restore.vcpu_set``           mid-restore: the epoch's vCPU state set, no page written yet
* ``restore.checked``            mid-restore: the epoch checked whole, the coordinator told
                                 it may ACK (early ACK), no page written yet
* ``restore.pages_written``      mid-restore: the epoch's pages written into the SVM (not
                                 yet into the cache), the SVM's own dirty pages not yet put
                                 back from the cache (after the early ACK: the primary may
                                 have committed it)
* ``restore.written``            mid-restore, early ACK: the SVM's memory is the epoch's and
                                 the coordinator told (Written: it resumes the SVM); the
                                 epoch's pages not yet in the restore stage's cache
* ``restore.svm_copied``         the SVM's dirty pages of a checkpoint copied (<k>-th time)
                                 into the restore stage's side buffer while the epoch is
                                 in transit, the SVM paused, the cache untouched; the epoch
                                 not yet applied (its SVM pages go into the cache from that
                                 copy after the SVM resumed)

Demo witness, ``pipeline/failover/witness.py`` (``LocalWitness``):

* ``witness.local.swap``         state change <k> of this process (a grant, a renewal, a
                                 release) written to its temporary file, not yet linked
                                 as the next version (with ``stop``: a holder frozen in
                                 the middle of renewing its lease)

Shared-memory rings, ``pipeline/ring.py`` (<k>: this process's k-th release):

* ``ring.release_read.tail_moved``  a consumer's release <k>: the ring's tail moved (the
                                 slot shows as free in the shared counters), its ``free``
                                 token not yet posted (with ``stop``: a consumer preempted
                                 in that window, as on a one-vCPU dom0)

Supervisor, ``pipeline/cpu_latency.py`` (``node.cpu_latency_us``):

* ``cpu_latency.open``           before the node opens /dev/cpu_dma_latency to hold its
                                 CPU wake-up latency limit; with ``errno=NAME`` the open
                                 fails so (the node runs on without the hold)

Every stage process: ``stage.<name>.loop`` once per turn of its main loop, ``<name>``
its stage name without the worker index (``stage.coordinator.loop``,
``stage.snapshot.loop``, ``stage.digest.loop``, ``stage.send.loop``,
``stage.client.loop``, ``stage.verify.loop``, ``stage.restore.loop``,
``stage.mirror.loop``, ``stage.heartbeat.loop``, ``stage.disk.loop``,
``stage.net_compare.loop``); and ``stage.receive.loop`` once per record the restore
stage's process takes off the pages channel (it does the receive stage's work).

``docs/testing.md`` explains how the tests use them.
"""
from __future__ import annotations

import errno as _errno
import os
import signal
import sys

ENV = "COLO_FAULT"


class FaultSpecError(ValueError):
    """COLO_FAULT does not parse; the message names the bad part."""


def parse(spec: str) -> dict[str, tuple[int, str]]:
    """``COLO_FAULT``'s value -> {point: (n, action)}."""
    faults: dict[str, tuple[int, str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        name, n, action = fields[0], 1, "kill"
        if not name or any(ch.isspace() for ch in name):
            raise FaultSpecError(f"{ENV}={spec!r}: {part!r} has no point name")
        for f in fields[1:]:
            if f.isdigit():
                n = int(f)
                if n < 1:
                    raise FaultSpecError(f"{ENV}={spec!r}: pass {f} of {name} (passes count "
                                         f"from 1)")
            elif f in ("kill", "killgroup", "stop", "segv"):
                action = f
            elif f.startswith("errno="):
                code = f[len("errno="):]
                if not isinstance(getattr(_errno, code, None), int):
                    raise FaultSpecError(f"{ENV}={spec!r}: {code!r} is not an errno name "
                                         f"(e.g. EIO, ENOSPC)")
                action = f
            else:
                raise FaultSpecError(f"{ENV}={spec!r}: {f!r} in {part!r} is neither a pass "
                                     f"number nor kill, killgroup, stop, segv or errno=NAME")
        if name in faults:
            raise FaultSpecError(f"{ENV}={spec!r}: point {name!r} is named twice")
        faults[name] = (n, action)
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))
_passes: dict[str, int] = {}
ACTIVE = bool(_FAULTS)


def fired_line(point: str, n: int | None = None, action: str = "") -> str:
    """The start of the line a process writes to stderr when ``point`` fires: what a test
    looks for in its output or log. ``n`` None: any pass; ``action`` (with ``n``) narrows it
    to one action. Ends with a space, so pass 3 is not pass 30."""
    line = f"{ENV} fired: {point} pass "
    if n is not None:
        line += f"{n} " + (f"{action} " if action else "")
    return line


def _fire(name: str, n: int, action: str) -> None:
    sys.stderr.write(f"{fired_line(name, n, action)}pid {os.getpid()}\n")
    sys.stderr.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "killgroup":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "segv":
        import faulthandler
        faulthandler._sigsegv()     # raise(SIGSEGV) from C, core dump suppressed
    else:
        code = getattr(_errno, action[len("errno="):])
        raise OSError(code, f"{os.strerror(code)} (injected by {ENV} at {name}, pass {n})")


def _point(name: str) -> None:
    want = _FAULTS.get(name)
    if want is None:
        return
    k = _passes.get(name, 0) + 1
    _passes[name] = k
    if k == want[0]:
        _fire(name, k, want[1])


def _nothing(name: str) -> None:
    return None


#: ``point(name)``: pass the named point (see the module docstring for the names).
point = _point if ACTIVE else _nothing
