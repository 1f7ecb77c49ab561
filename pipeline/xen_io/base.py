"""The hypervisor boundary: the one interface the pipeline uses to drive a guest.

The pipeline never imports a backend module directly; the supervisor opens the backend
named by ``guest.backend`` (:data:`pipeline.xen_io.BACKENDS`) and gets a :class:`Domain`.
Backends: ``xen`` (a real Xen domain through libxenctrl / libxenforeignmemory via
ctypes: ``xen.py``) and ``sim`` (a simulated guest process whose RAM is a shared memfd:
``sim/``).

:class:`Domain` is what every backend must do. :class:`SimulatedIO` is what only a
guest whose client I/O is simulated does (the pipeline plays its clients: feeds its
inputs, reads its outputs); the pipeline reaches it only through
:meth:`Domain.simulated_io`, which is ``None`` for a real VM (its clients are real).

Frame numbers (``pfns``) are guest frame numbers: indexes of pages of the
guest's physical memory, ``0 <= pfn < page_count``.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator

import numpy as np


#: the seq ``read_outputs`` gives an output mark (see :meth:`Domain.mark_outputs`)
OUTPUT_MARK = (1 << 64) - 1


class DomainError(RuntimeError):
    """A hypervisor call failed. The message names the call, the domain and the cause."""


class Domain(abc.ABC):
    """A guest whose memory and vCPU state the pipeline reads (primary) or writes (secondary)."""

    #: bytes per guest page (4096 on x86)
    page_size: int
    #: number of guest frames; valid pfns are ``range(page_count)``
    page_count: int
    #: a human-readable name used in log lines and error messages
    name: str
    #: how the backend tracks written pages, for the node info ("" when it has one way only)
    dirty_log_kind: str = ""

    def simulated_io(self) -> SimulatedIO | None:
        """The guest's simulated client I/O, or None: a real VM's clients are real, and
        the pipeline neither feeds its inputs nor reads its outputs."""
        return None

    # -- execution ------------------------------------------------------
    @abc.abstractmethod
    def pause(self) -> None:
        """Stop the guest's vCPUs. Returns once the guest is stopped and its state is stable."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Let a paused guest run again."""

    @property
    @abc.abstractmethod
    def is_paused(self) -> bool:
        ...

    # -- dirty log ------------------------------------------------------
    @abc.abstractmethod
    def enable_dirty_log(self) -> None:
        """Start tracking written pages; every page counts as clean from here on."""

    @abc.abstractmethod
    def read_and_clear_dirty(self) -> np.ndarray:
        """Pages written since the last call (or since enable), and clear them.

        Xen log-dirty CLEAN semantics. Returns a sorted, duplicate-free
        ``uint64`` array of pfns. Call it with the guest paused for an exact set.
        """

    def prescan_dirty(self, interrupted: Callable[[], bool] | None = None) -> np.ndarray:
        """:meth:`read_and_clear_dirty` with the guest running (the snapshot stage's prescan:
        what it takes off the log is not read again in the pause). A backend may read in
        parts and stop early when ``interrupted()`` says so: the pages it did not reach stay
        in the log, for the next read. Xen: one CLEAN, as live migration does."""
        return self.read_and_clear_dirty()

    def dirty_count(self) -> int:
        """How many pages were written since the last read_and_clear_dirty, without clearing
        (Xen: log-dirty PEEK). -1 when the backend cannot tell; the dirty-threshold trigger
        is then off."""
        return -1

    def hypervisor_written(self) -> tuple[tuple[int, int, int], ...]:
        """Byte ranges ``(pfn, start, end)`` the hypervisor writes into guest memory itself,
        without logging the page dirty (Xen: each vCPU's registered vcpu_info). A secondary
        keeps its own bytes there and the memory proof hashes them as zeros; the nodes compare
        theirs in the handshake. Sorted; empty for backends without such bytes."""
        return ()

    def agree_hypervisor_written(self, peer: tuple[tuple[int, int, int], ...], peer_is_primary: bool) -> None:
        """The handshake: the peer's :meth:`hypervisor_written`. A secondary may adopt the
        primary's (when its own observation supports them); otherwise they must be equal.
        Raises DomainError naming both when the nodes disagree."""
        peer = tuple(sorted(tuple(int(v) for v in r) for r in peer))
        if peer != self.hypervisor_written():
            raise DomainError(f"{self.name}: the nodes disagree where the hypervisor writes itself: "
                              f"peer {peer or 'none'}, this node {self.hypervisor_written() or 'none'}")

    # -- memory ---------------------------------------------------------
    @abc.abstractmethod
    def read_pages(self, pfns: np.ndarray, out: np.ndarray) -> None:
        """Copy the pages ``pfns`` into ``out[:len(pfns)]`` (shape ``(n, page_size)``, uint8)."""

    @abc.abstractmethod
    def write_pages(self, pfns: np.ndarray, data: np.ndarray) -> None:
        """Copy ``data[:len(pfns)]`` (shape ``(n, page_size)``, uint8) into the pages ``pfns``."""

    def memory_view(self) -> np.ndarray | None:
        """The whole guest RAM as a writable ``(page_count, page_size)`` uint8 array, if the
        backend can map it all at once (sim); ``None`` otherwise (xen maps in batches)."""
        return None

    def memory_digest(self, batch_pages: int = 1024) -> bytes:
        """blake3 over all of guest RAM in pfn order (pause the guest for a stable answer).
        Backends that can map all of RAM at once may override this with a faster path."""
        import blake3

        h = blake3.blake3()
        view = self.memory_view()
        if view is not None:
            h.update(view)
            return h.digest()
        for _, pages in self.iter_pages(batch_pages):
            h.update(pages)
        return h.digest()

    def iter_pages(self, batch_pages: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """All of guest memory in pfn order, ``batch_pages`` at a time: ``(first pfn, pages)``,
        ``pages`` a view into one buffer that the next step overwrites."""
        buf = np.empty((batch_pages, self.page_size), np.uint8)
        for start in range(0, self.page_count, batch_pages):
            pfns = np.arange(start, min(start + batch_pages, self.page_count), dtype=np.uint64)
            self.read_pages(pfns, buf)
            yield start, buf[:len(pfns)]

    # -- vCPU / platform state -----------------------------------------
    @abc.abstractmethod
    def get_vcpu_state(self) -> bytes:
        """The vCPU and platform state as an opaque blob (Xen: the HVM context). Guest paused."""

    @abc.abstractmethod
    def set_vcpu_state(self, blob: bytes) -> None:
        """Load a blob produced by :meth:`get_vcpu_state` of the peer domain. Guest paused."""

    # -- output stream --------------------------------------------------
    def mark_outputs(self, tag: bytes) -> None:
        """Put ``tag`` into the guest's output stream where it stands now (guest paused):
        whoever reads the outputs gets it between the frames emitted before and after, so
        an epoch boundary travels in order with the guest's output. Backends whose
        output does not pass through the pipeline ignore it."""

    # -- lifetime -------------------------------------------------------
    def prefault(self) -> None:
        """Called once at the start of each stage process that was handed the domain: map
        what the backend maps (guest RAM) into this process now, so first-touch faults do
        not land inside a pause. Nothing for backends that map in batches."""

    def before_fork(self) -> None:
        """The node is about to fork its stages, which share this object: drop what must not
        cross a fork (the xen backend's library handles). Nothing for most backends."""

    def close(self) -> None:
        """Release what this object holds (mappings, handles, child processes it owns)."""

    def __enter__(self) -> "Domain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimulatedIO(abc.ABC):
    """What only a guest with simulated client I/O does (the sim backend): an input stream
    the pipeline feeds, numbered from 0 (``seq``), and an output stream it reads. The
    primary's client stage feeds the PVM and mirrors each input to the secondary, whose
    mirror stage feeds the SVM in the same order; a checkpoint's vCPU blob says how far
    into its inputs the guest was, so a rolled-back SVM replays exactly what followed."""

    #: the seq the next fed input gets
    input_head: int
    #: inputs held at once (fed, not trimmed): a secondary keeps each until a commit past it
    input_capacity: int

    @abc.abstractmethod
    def input_seq(self) -> int:
        """The seq of the next input the guest will consume."""

    @abc.abstractmethod
    def feed_input(self, payload: bytes, seq: int | None = None, timeout: float = 5.0,
                   wake: bool = True) -> int:
        """Append one input (at ``seq``, which must be the head, if given); its seq.
        ``wake=False``: the guest is not woken for it yet (a running guest still finds
        it), :meth:`wake_guest` does that."""

    @abc.abstractmethod
    def wake_guest(self) -> None:
        """Wake the guest for the inputs fed with ``wake=False``."""

    @abc.abstractmethod
    def input_limit(self) -> int:
        """The first seq the input log cannot take until room is freed: it keeps every
        input from the last trim (a secondary's last commit) or the guest's own position,
        whichever is lower, ``input_capacity`` of them."""

    @abc.abstractmethod
    def input_payload(self, seq: int) -> bytes:
        """An input still held (not trimmed)."""

    @abc.abstractmethod
    def trim_inputs(self, below_seq: int) -> None:
        """Inputs below ``below_seq`` will never be replayed: their room may be reused."""

    @abc.abstractmethod
    def start_inputs_at(self, seq: int) -> None:
        """Continue the input stream at ``seq`` (a secondary joining a primary whose inputs
        are there)."""

    @abc.abstractmethod
    def vcpu_input_seq(self, blob: bytes) -> int:
        """The input seq a vCPU blob of this guest records."""

    @abc.abstractmethod
    def vcpu_inputs_taken(self, blob: bytes) -> int:
        """How many inputs a guest in this vCPU state has begun: every seq below it. One
        more than :meth:`vcpu_input_seq` while the guest is inside an input (it read the
        payload and reads it again, e.g. its answer names the request), the same between
        inputs. A peer loaded with the state needs that input in its own log."""

    @abc.abstractmethod
    def vcpu_input_step(self, blob: bytes) -> int:
        """How far into that input the blob's guest was: pages of it already written (0
        between inputs). A pause may stop the guest between two page writes of one input,
        so its memory is then the replay of the inputs before plus this many pages."""

    @abc.abstractmethod
    def output_fileno(self) -> int:
        """An fd that is readable when the guest wrote output."""

    @abc.abstractmethod
    def read_outputs(self, timeout: float = 0.0) -> list[tuple[int, bytes]]:
        """Output frames ``(input seq, frame)`` written since the last call, marks
        (:meth:`Domain.mark_outputs`) in place with seq :data:`OUTPUT_MARK`."""
