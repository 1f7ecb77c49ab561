"""Every message on the control pipes between stages and coordinators, as named types.

The pipes are ``multiprocessing`` Connections inside one node; these types are what
crosses them, so a stage's docstring and its code cannot disagree about a field. A
receiver dispatches on the type (``isinstance`` or ``match``), never on a position.
Host-to-host records are not here: they are ``pipeline/wire.py`` (the wire format).

Snapshot stage (primary), asked by the coordinator::

    SyncCmd(epoch)                       -> Synced(epoch, pages)
    PrecopyCmd(epoch)                    -> Precopied(epoch, pages)
    SnapshotCmd(epoch, flags, retake)    -> Snapshotted(epoch, pages, pause_ns, input_seq,
                                                        digest, verify_ns)

Send stage (primary), once an epoch's EPOCH_END is sent::

    -> Sent(epoch, pages, records, bytes_wire, pages_data, pages_zero, pages_ref, pages_svm)

Restore stage (secondary)::

    ApplyCmd(epoch, svm_dirty, want_digest)  -> [Checked(epoch, pages, assembled_ns),
                                                 Written(epoch, pages, assembled_ns)]
                                                Applied(epoch, pages, digest, input_seq,
                                                        assembled_ns) or Aborted(epoch, reason)
    AbortCmd(epoch, svm_dirty, reason)       -> Aborted(epoch, reason), or nothing if the
                                                epoch was applied already

ApplyCmd is sent at BEGIN, before the epoch's pages arrive: the restore stage applies the
epoch the moment it is assembled (or discards it, if it cannot be applied), with no round
trip through the coordinator in between. Checked comes first when the epoch was checked
whole (its SVM pages, its vCPU state) and no digest was asked for: from then on nothing
can stop it being applied, so the coordinator ACKs it while the pages are written (early
ACK); Written follows once the SVM's memory is the epoch's (the coordinator resumes the
SVM then), and Applied once the stage's cache is too.

Heartbeat stage (both), to its coordinator; times are ``time.monotonic()`` seconds::

    PeerUp(heard, info)          the first valid heartbeat from the peer (on the primary,
                                 also from a new secondary process while the peer was up:
                                 its ``instance``)
    PeerLost(last_seen, detected)  no valid heartbeat for ``miss_count`` intervals
    PeerBack(heard, info)        a valid heartbeat after PeerLost
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

# -- snapshot stage ----------------------------------------------------------


class SyncCmd(NamedTuple):
    """Stream all of guest memory, live (the first epoch)."""
    epoch: int


class PrecopyCmd(NamedTuple):
    """Stream the pages written since the last round, live."""
    epoch: int


class SnapshotCmd(NamedTuple):
    """Pause the PVM and take a checkpoint. ``flags`` are the epoch's CHECKPOINT_BEGIN
    bits (wire.FLAG_*); ``retake``: the previous checkpoint was torn, so its pages (which
    left the PVM's dirty log at its pause) go again with this one."""
    epoch: int
    flags: int
    retake: bool


class Synced(NamedTuple):
    epoch: int
    pages: int


class Precopied(NamedTuple):
    epoch: int
    pages: int


class Snapshotted(NamedTuple):
    epoch: int
    pages: int          # dirty pages (with the carried ones)
    pause_ns: int       # how long the PVM was paused
    input_seq: int      # the guest's input position at the snapshot (-1: not known)
    digest: bytes       # blake3 of all of memory when FLAG_DIGEST was asked, else b""
    verify_ns: int      # time spent on that digest, apart from the pause
    input_step: int = 0     # pages of input ``input_seq`` the guest had written (sim guest)


# -- send stage ----------------------------------------------------------------


class Sent(NamedTuple):
    """An epoch's pages and EPOCH_END went out: how many pages, records and bytes, and
    how the pages went (with data, as ZERO, as REF)."""
    epoch: int
    pages: int
    records: int
    bytes_wire: int
    pages_data: int
    pages_zero: int
    pages_ref: int
    pages_svm: int = 0      # sent as SVM: the SVM already held them

    @classmethod
    def nothing(cls, epoch: int) -> Sent:
        """What an epoch whose EPOCH_END never went out counts."""
        return cls(epoch, 0, 0, 0, 0, 0, 0, 0)



# -- restore stage ---------------------------------------------------------------


class ApplyCmd(NamedTuple):
    """Apply ``epoch`` once it is assembled (the SVM is paused until the reply).
    ``svm_nonzero``: the pages of ``svm_dirty`` the SVM does not hold as zeros (their
    SVM_DIRTY hash), the only ones that can be SVM pages: the restore stage copies them
    while the epoch is in transit (None: all of ``svm_dirty``)."""
    epoch: int
    svm_dirty: np.ndarray
    want_digest: bool
    svm_nonzero: np.ndarray | None = None


class AbortCmd(NamedTuple):
    epoch: int
    svm_dirty: np.ndarray
    reason: str


class Checked(NamedTuple):
    """Everything ``epoch`` needs is here and checked (its SVM pages match, the vCPU
    state was taken); its pages are being written. Written and Applied always follow: the
    coordinator may ACK the epoch now but resumes the SVM only after Written (takes over
    only after Applied)."""
    epoch: int
    pages: int
    assembled_ns: int   # time.monotonic_ns() when the epoch was assembled


class Written(NamedTuple):
    """After Checked: the SVM's memory is ``epoch``'s (its pages written, its SVM pages
    cached, the pages it wrote itself restored); the coordinator may resume the SVM now.
    The stage then writes the epoch's pages into its cache (from staging); Applied follows,
    and a takeover or the next epoch waits for it."""
    epoch: int
    pages: int
    assembled_ns: int   # time.monotonic_ns() when the epoch was assembled


class Applied(NamedTuple):
    epoch: int
    pages: int
    digest: bytes       # blake3 of all of memory when asked, else b""
    input_seq: int      # the SVM's input position at the committed state (-1: not known)
    assembled_ns: int = 0   # time.monotonic_ns() when the epoch was assembled and applying began


class Aborted(NamedTuple):
    epoch: int
    reason: str


# -- heartbeat stage ---------------------------------------------------------------


class PeerUp(NamedTuple):
    heard: float
    info: dict[str, Any]   # the peer's record: role, generation, epoch, seq, instance, interval_ms


class PeerLost(NamedTuple):
    last_seen: float
    detected: float


class PeerBack(NamedTuple):
    heard: float
    info: dict[str, Any]
