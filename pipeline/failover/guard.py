"""The split-brain guard: nobody goes active unless fencing and/or a witness says so.

Before a secondary takes over (its heartbeat said the primary is lost), it must know
that the primary is not still running somewhere behind a broken link. Two guards,
either or both (``[failover]``):

* :class:`Fence` runs a configured command that makes sure the other node is down
  (power its host off through a PDU or a BMC, ``virsh destroy``, ...). It must exit
  0 within its timeout; otherwise its output goes into the reason.
* A witness (:mod:`pipeline.failover.witness`) grants the active role of a protected
  VM to exactly one node per *generation*.

:func:`guard_takeover` runs them in the safe order: the witness first (a node that
is refused, or cannot reach the witness, goes no further and fences nobody: in a
partition only the winner fences), then the fencing command; a failed fence gives
the role back. It never raises; it returns ``(ok, reason)``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from pipeline.failover.settings import FailoverSettings
from pipeline.failover.witness import Witness, WitnessError

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 2000   # characters of a fencing command's output kept in a reason


class FenceError(RuntimeError):
    """The fencing command failed: did not start, exited non-zero or timed out."""


# -- fencing ------------------------------------------------------------------------------
class Fence:
    """A fencing command: ``argv`` run without a shell, must exit 0 within ``timeout_s``.

    ``{peer}``, ``{node}``, ``{vm}`` and ``{generation}`` inside an argument are
    replaced by :meth:`run`'s arguments. On timeout the command's whole process group
    is killed.
    """

    def __init__(self, argv: tuple[str, ...] | list[str], timeout_s: float = 10) -> None:
        if not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise ValueError(f"fence command {argv!r}: expected a program and its arguments")
        if not timeout_s > 0:
            raise ValueError(f"fence command: timeout {timeout_s!r} must be > 0")
        self.argv, self.timeout_s = tuple(argv), float(timeout_s)

    def command(self, **subst: Any) -> list[str]:
        out = []
        for arg in self.argv:
            for name, value in subst.items():
                arg = arg.replace("{" + name + "}", str(value))
            out.append(arg)
        return out

    def run(self, peer: str = "", node: str = "", vm: str = "", generation: int = 0) -> str:
        """Run the command; its output if it exited 0, else FenceError with the output."""
        argv = self.command(peer=peer, node=node, vm=vm, generation=generation)
        shown = " ".join(argv)
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise FenceError(f"fence command `{shown}` did not start: {exc}") from None
        try:
            out, _ = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:   # a grandchild that left the group holds the pipe
                out = b""
            raise FenceError(f"fence command `{shown}` timed out after {self.timeout_s:g} s; "
                             f"output: {_tail(out)}") from None
        took = time.monotonic() - t0
        if proc.returncode != 0:
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with code {proc.returncode}")
            raise FenceError(f"fence command `{shown}` {how}; output: {_tail(out)}")
        log.info("fence command `%s` succeeded in %.2f s", shown, took)
        return out.decode(errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()


def _tail(out: bytes | None) -> str:
    text = (out or b"").decode(errors="replace").strip()
    if not text:
        return "(none)"
    return text if len(text) <= OUTPUT_LIMIT else "..." + text[-OUTPUT_LIMIT:]


# -- the guard ----------------------------------------------------------------------------
def make_fence(settings: FailoverSettings) -> Fence | None:
    return Fence(settings.fence_command, settings.fence_timeout_s) \
        if settings.fence_command else None


def guard_takeover(fence: Fence | None, witness: Witness | None, node: str, generation: int,
                   *, peer: str = "", vm: str = "", wait_s: float | None = None,
                   poll_s: float = 0.1,
                   abandon: Callable[[], str] | None = None) -> tuple[bool, str]:
    """May ``node`` become active in ``generation``? Runs the witness, then the fence.

    The witness is asked until it grants the role or ``wait_s`` passed (default: the
    lease TTL + 2 s: the longest a dead holder's lease can still run, plus etcd's
    expiry granularity); a refusal that
    waiting cannot change (the generation was granted to another node) ends at once.

    ``abandon()`` is asked before each request to the witness and before the fencing
    command: a non-empty answer (why: the peer turned out to be alive) gives the attempt
    up there, with ``(False, that answer)``. It is never asked once the witness granted
    the role or the fence ran: from there the takeover goes through, so the witness's
    promise (one active node per generation) holds whatever the peer does next.
    Returns ``(True, what was done)`` or ``(False, why not)``; never raises.
    """
    if fence is None and witness is None:
        return False, ("no fencing command and no witness configured: refusing to go active "
                       "(set failover.witness and/or failover.fence_command)")
    done = []
    if witness is not None:
        deadline = time.monotonic() + (witness.ttl_s + 2 if wait_s is None else wait_s)
        while True:
            why = abandon() if abandon is not None else ""
            if why:
                return False, why
            try:
                if witness.acquire(node, generation):
                    done.append(f"{witness.where} granted generation {generation} to {node}")
                    break
                holder = witness.holder()
                last = witness.last_generation()
            except (WitnessError, ValueError) as exc:
                return False, f"witness: {exc}; not going active"
            if holder is None and last >= generation:
                return False, (f"{witness.where}: generation {generation} was granted already "
                               f"(last granted: {last}); not going active")
            if time.monotonic() >= deadline:
                return False, (f"{witness.where}: the active role is held by {holder} "
                               f"(asked for generation {generation} as {node}); not going "
                               "active")
            time.sleep(poll_s)
    if fence is not None:
        why = abandon() if abandon is not None and witness is None else ""
        if why:
            return False, why
        try:
            out = fence.run(peer=peer, node=node, vm=vm, generation=generation)
        except FenceError as exc:
            if witness is not None:
                try:
                    witness.release()
                except WitnessError as rel:
                    log.warning("after a failed fence, could not release the role: %s", rel)
            return False, f"fencing failed: {exc}; not going active"
        done.append(f"fenced {peer or 'the peer'} ({_tail(out.encode())[:200]})")
    return True, "; ".join(done)
