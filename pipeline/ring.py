"""A shared-memory ring of fixed-size slots: one producer process, one consumer process.

A slot carries a batch of pages with their pfns, blake3 digests and encoded
lengths, as numpy views straight into shared memory, so no page is ever
pickled or copied by the ring itself: the producer fills a slot in place, the
consumer reads it in place.

Layout of the segment (all little-endian, everything 64-byte aligned)::

    page 0     control block: magic, version, geometry, then on separate cache lines
               head (slots committed, written by the producer),
               tail (slots released, written by the consumer),
               closed flag, high-water mark, misuse count
    slot i     at slots_offset + i * slot_size:
                 header (64 B) | pfns u64[B] | hashes u8[B,32] | enc_len u32[B] | enc_kind u8[B]
                 [wire prefix: SlotLayout.wire_prefix bytes, ending where data starts]
                 data u8[B, page_size]   (starts on a 4 KiB boundary)

The slot header (:data:`SLOT_HEADER_DTYPE`) gives every meaning its own field, so no
stage reads a word another stage wrote with a different meaning::

    0  kind u32         what the slot is (a DATA batch, an END marker; pipeline.stages.common)
    4  count u32        pages in the batch
    8  epoch u64        the checkpoint epoch the slot belongs to
    16 row u64          where the batch's pages sit in the node's page buffer (the primary's
                        snapshot buffer, the secondary's staging area)
    24 epoch_pages u64  END marker: pages the epoch announced
    32 data_len u32     bytes of encoded page data in ``data``
    36 vcpu_len u32     END marker: bytes of the vCPU blob in ``data``
    40 epoch_flags u32  wire bits of the epoch (pipeline.wire FLAG_*)
    44 batch_flags u32  wire bits of the batch (pipeline.wire PAGES_*)
    48 marks u32        stage-private bits, never sent (pipeline.stages.common MARK_*)
    52 end_markers u32  END marker: how many END markers of the epoch the consumer gets
                        (0: one per ring); a producer that put none of an epoch's batches
                        on a ring may leave that ring's marker out

Wire bits and stage bits live in different fields, so their numbers may overlap.

Synchronisation uses two counting semaphores made of ``eventfd(EFD_SEMAPHORE)``:
``free`` (slots the producer may fill) and ``filled`` (slots the consumer may
read). They are inherited across ``fork``; ``filled`` doubles as a pollable fd
(:meth:`Ring.fileno`) so a consumer can wait on several rings with
``select``/``zmq.poll``. No polling with sleeps anywhere. We measured eventfd
against ``multiprocessing`` (POSIX) semaphores for a cross-process ping-pong
(scripts/bench_ring.py, 2 loaded cores): 8-18 us vs 6-13 us, equal within the
noise of a shared machine; only eventfd gives a pollable fd, and a slot's
memcpy (tens of us for 64 pages) dwarfs either. A wait reads the eventfd
directly when the shared head/tail show a token must be there (one syscall)
and only polls when it has to block.

Ordering: ``commit_write`` stores ``head`` before posting ``filled``, so a
consumer that took a token always finds the slot published; ``release_read``
stores ``tail`` before posting ``free``. So the shared counters can show a slot
before its token is there: a wait that the counters say must succeed (a caller
that looked at :attr:`Ring.occupancy` first and asks with ``timeout=0``) waits up to
:data:`POST_LAG_S` for the token instead of failing at once. The window is a few
instructions, but a poster preempted in it is late by its whole wait for a CPU: in
the Xen lab (session 21) the secondary's restore stage died on
``acquire_write(0)`` at occupancy 63/64 while a verify worker, on dom0's one vCPU,
had moved the tail and not yet posted (the fault point
``ring.release_read.tail_moved`` reproduces it). ``close_write``
posts one extra token; a consumer that takes a token and finds no unread slot
knows the ring is closed and drained, puts the token back (so every later
call, and ``fileno()``, keep reporting it) and raises :class:`RingClosed`.

Ownership: the supervisor calls :meth:`Ring.create` before it forks the stages;
every process calls :meth:`Ring.close`; only the creating process may call
:meth:`Ring.unlink`.
"""
from __future__ import annotations

import math
import os
import select
import time
from dataclasses import dataclass

import numpy as np

from pipeline import faults
from pipeline.shm import Segment, create_segment

MAGIC = b"COLORING"
VERSION = 1
HASH_SIZE = 32
CONTROL_SIZE = 4096
_ALIGN = 4096
#: how long a wait that the shared counters say must succeed gives the other side to post
#: its token (module doc, "Ordering"): far above any preemption of a live poster; past it
#: the poster is stopped or dead, and the usual RingTimeout names the ring
POST_LAG_S = 10.0

# uint64 word indexes in the control block (each mutable word on its own 64-byte line)
_W_HEAD = 8          # byte 64: slots committed so far (producer)
_W_TAIL = 16         # byte 128: slots released so far (consumer)
_W_CLOSED = 24       # byte 192: producer called close_write (producer)
_W_HIGH_WATER = 25   # max occupancy seen at a commit (producer)
_W_ERRORS = 26       # out-of-order / invalid commits and releases (either side)

SLOT_HEADER_DTYPE = np.dtype({
    "names": ["kind", "count", "epoch", "row", "epoch_pages", "data_len", "vcpu_len",
              "epoch_flags", "batch_flags", "marks", "end_markers"],
    "formats": ["<u4", "<u4", "<u8", "<u8", "<u8", "<u4", "<u4", "<u4", "<u4", "<u4", "<u4"],
    "offsets": [0, 4, 8, 16, 24, 32, 36, 40, 44, 48, 52],
    "itemsize": 64,
})


_ZERO_HEADER = bytes(SLOT_HEADER_DTYPE.itemsize)


class RingTimeout(TimeoutError):
    """A blocking ring call waited longer than its timeout; the message names the ring and
    what it waited for."""


class RingClosed(Exception):
    """The producer closed the ring and every published slot has been consumed."""


#: bytes of a slot's data area after its pages, per page and per slot: room for a sealed
#: batch's sealed hashes and its seal header and tags (wire.sealed_pages_extra)
DATA_TAIL_PER_PAGE, DATA_TAIL = 32, 64


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class SlotLayout:
    """The geometry of one slot: up to ``batch_pages`` pages of ``page_size`` bytes."""

    batch_pages: int = 64
    page_size: int = 4096
    # bytes kept free right before ``data``: a consumer lays a wire record's header and
    # arrays there and sends header and data as one buffer, without copying the data
    # (the primary's digest-to-send rings: pipeline.wire.pages_prefix_size)
    wire_prefix: int = 0

    def __post_init__(self) -> None:
        for key, value, limit in (("batch_pages", self.batch_pages, 1 << 16),
                                  ("page_size", self.page_size, 1 << 24)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise ValueError(f"SlotLayout.{key}={value!r}: must be an int in 1..{limit}")
        if not isinstance(self.wire_prefix, int) or not 0 <= self.wire_prefix <= 1 << 24:
            raise ValueError(f"SlotLayout.wire_prefix={self.wire_prefix!r}: must be an int in "
                             f"0..{1 << 24}")

    # byte offsets inside a slot
    @property
    def pfns_offset(self) -> int:
        return SLOT_HEADER_DTYPE.itemsize

    @property
    def hashes_offset(self) -> int:
        return self.pfns_offset + 8 * self.batch_pages

    @property
    def enc_len_offset(self) -> int:
        return self.hashes_offset + HASH_SIZE * self.batch_pages

    @property
    def enc_kind_offset(self) -> int:
        return self.enc_len_offset + 4 * self.batch_pages

    @property
    def data_offset(self) -> int:
        return _round_up(self.enc_kind_offset + self.batch_pages + self.wire_prefix, _ALIGN)

    @property
    def data_size(self) -> int:
        return self.batch_pages * self.page_size

    @property
    def data_room(self) -> int:
        """``data_size`` and the tail: a sealed batch (pipeline/seal.py) is its pages, its
        hashes, a seal header and tags."""
        return self.data_size + DATA_TAIL_PER_PAGE * self.batch_pages + DATA_TAIL

    @property
    def slot_size(self) -> int:
        return _round_up(self.data_offset + self.data_room, _ALIGN)


class Slot:
    """Numpy views into one slot of a ring. Nothing here copies or pickles."""

    __slots__ = (
        "_h8",
        "_h32",
        "_h64",
        "data",
        "data_flat",
        "enc_kind",
        "enc_len",
        "framed",
        "hashes",
        "header",
        "index",
        "pfns",
    )

    def __init__(self, buf: memoryview, offset: int, index: int, layout: SlotLayout) -> None:
        b = layout.batch_pages
        self.index = index
        self.header = np.ndarray((), SLOT_HEADER_DTYPE, buf, offset)
        # plain-int access to the header words (much cheaper than numpy scalars)
        self._h8 = buf[offset:offset + 64]
        self._h32 = buf[offset:offset + 64].cast("I")
        self._h64 = buf[offset:offset + 64].cast("Q")
        self.pfns = np.ndarray((b,), np.uint64, buf, offset + layout.pfns_offset)
        self.hashes = np.ndarray((b, HASH_SIZE), np.uint8, buf, offset + layout.hashes_offset)
        self.enc_len = np.ndarray((b,), np.uint32, buf, offset + layout.enc_len_offset)
        self.enc_kind = np.ndarray((b,), np.uint8, buf, offset + layout.enc_kind_offset)
        self.data_flat = np.ndarray((layout.data_room,), np.uint8, buf,
                                    offset + layout.data_offset)
        self.data = self.data_flat[:layout.data_size].reshape(b, layout.page_size)
        # the wire prefix and the data after it, one buffer (None without a prefix)
        p = layout.wire_prefix
        self.framed = np.ndarray((p + layout.data_room,), np.uint8, buf,
                                 offset + layout.data_offset - p) if p else None

    # header fields as plain ints (offsets per SLOT_HEADER_DTYPE)
    kind = property(lambda s: s._h32[0], lambda s, v: s._h32.__setitem__(0, v))
    count = property(lambda s: s._h32[1], lambda s, v: s._h32.__setitem__(1, v))
    epoch = property(lambda s: s._h64[1], lambda s, v: s._h64.__setitem__(1, v))
    row = property(lambda s: s._h64[2], lambda s, v: s._h64.__setitem__(2, v))
    epoch_pages = property(lambda s: s._h64[3], lambda s, v: s._h64.__setitem__(3, v))
    data_len = property(lambda s: s._h32[8], lambda s, v: s._h32.__setitem__(8, v))
    vcpu_len = property(lambda s: s._h32[9], lambda s, v: s._h32.__setitem__(9, v))
    epoch_flags = property(lambda s: s._h32[10], lambda s, v: s._h32.__setitem__(10, v))
    batch_flags = property(lambda s: s._h32[11], lambda s, v: s._h32.__setitem__(11, v))
    marks = property(lambda s: s._h32[12], lambda s, v: s._h32.__setitem__(12, v))
    end_markers = property(lambda s: s._h32[13], lambda s, v: s._h32.__setitem__(13, v))

    def reset(self, kind: int, epoch: int, count: int) -> None:
        """Start a slot: every header field zero but these three. A slot is reused, so a
        producer that did not reset would hand on the previous batch's fields."""
        self._h8[:] = _ZERO_HEADER
        self._h32[0], self._h32[1], self._h64[1] = kind, count, epoch

    def copy_header(self, src: Slot) -> None:
        """This slot's header becomes ``src``'s (all fields)."""
        self._h8[:] = src._h8

    def __repr__(self) -> str:
        return (f"<Slot {self.index} kind={self.kind} epoch={self.epoch} count={self.count} "
                f"row={self.row}>")


def _make_semaphore(initial: int) -> int:
    return os.eventfd(initial, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Ring:
    """One producer, one consumer, ``slots`` fixed slots in one shared segment.

    Slots are acquired and handed back strictly in ring order on each side; a side
    may hold several acquired slots at once. Create it in the supervisor before
    forking the stages (``multiprocessing.get_context("fork")``).
    """

    def __init__(self, segment: Segment, slots: int, layout: SlotLayout,
                 free_fd: int, filled_fd: int) -> None:
        self.name = segment.name
        self.slots = slots
        self.layout = layout
        self._segment: Segment | None = segment
        self._free_fd = free_fd
        self._filled_fd = filled_fd
        self._ctl = segment.buf[:CONTROL_SIZE].cast("Q")
        self._slots = [Slot(segment.buf, CONTROL_SIZE + i * layout.slot_size, i, layout)
                       for i in range(slots)]
        # Slots acquired by this process and not yet committed / released. Only the
        # producer process touches _writing, only the consumer _reading.
        self._writing = 0
        self._reading = 0
        self._free_poll = select.poll()
        self._free_poll.register(free_fd, select.POLLIN)
        self._filled_poll = select.poll()
        self._filled_poll.register(filled_fd, select.POLLIN)

    @classmethod
    def create(cls, name: str, slots: int, layout: SlotLayout = SlotLayout()) -> Ring:
        """Create the ring's segment and semaphores; the calling process owns them."""
        if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= 1 << 20:
            raise ValueError(f"ring {name!r}: slots={slots!r} must be an int in 1..{1 << 20}")
        if not isinstance(layout, SlotLayout):
            raise TypeError(f"ring {name!r}: layout must be a SlotLayout, not {layout!r}")
        segment = create_segment(name, CONTROL_SIZE + slots * layout.slot_size)
        ctl = np.ndarray((8,), np.uint32, segment.buf, 0)
        ctl[2:6] = (VERSION, slots, layout.batch_pages, layout.page_size)
        ctl64 = np.ndarray((8,), np.uint64, segment.buf, 0)
        ctl64[3:5] = (layout.slot_size, CONTROL_SIZE)
        segment.buf[0:8] = MAGIC
        del ctl, ctl64
        return cls(segment, slots, layout, _make_semaphore(slots), _make_semaphore(0))

    # -- producer ---------------------------------------------------------
    def acquire_write(self, timeout: float | None = None) -> Slot:
        """The next free slot, to fill in place. Raises RingTimeout after ``timeout`` s."""
        self._check_open()
        ctl = self._ctl
        if ctl[_W_CLOSED]:
            raise ValueError(f"ring {self.name}: acquire_write after close_write")
        position = ctl[_W_HEAD] + self._writing
        free = self.slots - (position - ctl[_W_TAIL])
        self._wait(self._free_fd, self._free_poll, timeout, free > 0, "a free slot to write")
        self._writing += 1
        return self._slots[position % self.slots]

    def commit_write(self, slot: Slot) -> None:
        """Publish ``slot`` to the consumer. Slots must be committed in the order acquired."""
        ctl = self._ctl
        head = ctl[_W_HEAD]
        self._check_turn(slot, head, self._writing, "commit_write")
        if slot.count > self.layout.batch_pages:
            ctl[_W_ERRORS] += 1
            raise ValueError(f"ring {self.name}: slot {slot.index} has count={slot.count} > "
                             f"batch_pages={self.layout.batch_pages}; not published")
        head += 1
        ctl[_W_HEAD] = head          # publish before posting the token (see module doc)
        self._writing -= 1
        occupancy = head - ctl[_W_TAIL]
        if occupancy > ctl[_W_HIGH_WATER]:
            ctl[_W_HIGH_WATER] = occupancy
        os.eventfd_write(self._filled_fd, 1)

    def wait_empty(self, timeout: float | None = None) -> None:
        """Producer: wait until the consumer has released every slot committed so far.
        Raises RingTimeout after ``timeout`` s (the slots it still holds are named).

        It sleeps on the ``free`` semaphore, which the consumer posts at every release: the
        producer is that semaphore's only reader, so it takes every token there is (each
        read is one free slot; while any slot is out, a read blocks until the next
        release), and gives them all back before it returns. Not while this producer holds
        acquired slots (they could never come back)."""
        self._check_open()
        if self._writing:
            raise ValueError(f"ring {self.name}: wait_empty while {self._writing} acquired "
                             "slot(s) are not committed")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"ring {self.name}: timeout={timeout!r} must be >= 0 or None")
        ctl = self._ctl
        if ctl[_W_HEAD] == ctl[_W_TAIL]:
            return                   # the common case: one look, no syscall
        deadline = None if timeout is None else time.monotonic() + timeout
        taken = 0
        try:
            while True:
                try:
                    while True:      # every token there is now (at most ``slots``)
                        os.eventfd_read(self._free_fd)
                        taken += 1
                except BlockingIOError:
                    pass
                if ctl[_W_HEAD] == ctl[_W_TAIL]:
                    return
                # a slot is still out, so its release is still to be posted: sleep on it
                if deadline is None:
                    ready = self._free_poll.poll()
                else:
                    ready = self._free_poll.poll(
                        max(0, math.ceil((deadline - time.monotonic()) * 1000)))
                if not ready:
                    raise RingTimeout(f"ring {self.name}: waited {timeout}s for the consumer "
                                      f"to release every slot (occupancy "
                                      f"{self.occupancy}/{self.slots})")
        finally:
            if taken:
                os.eventfd_write(self._free_fd, taken)

    def close_write(self) -> None:
        """No more slots will come. The consumer gets RingClosed once it has drained the rest."""
        if self._ctl[_W_CLOSED]:
            return
        self._ctl[_W_CLOSED] = 1
        os.eventfd_write(self._filled_fd, 1)

    # -- consumer ---------------------------------------------------------
    def acquire_read(self, timeout: float | None = None) -> Slot:
        """The oldest published slot. RingTimeout after ``timeout`` s; RingClosed once the
        producer closed the ring and everything was consumed."""
        self._check_open()
        published = self._ctl[_W_HEAD] - self._ctl[_W_TAIL] - self._reading
        self._wait(self._filled_fd, self._filled_poll, timeout, published > 0,
                   "a published slot to read")
        return self._take_published()

    def try_acquire_read(self) -> Slot | None:
        """Like acquire_read, but returns None at once if nothing is published."""
        self._check_open()
        if self._ctl[_W_TAIL] + self._reading >= self._ctl[_W_HEAD]:
            if self._ctl[_W_CLOSED]:
                raise RingClosed(f"ring {self.name} is closed and drained")
            return None   # no syscall on the empty path: the send stage polls often
        try:
            os.eventfd_read(self._filled_fd)
        except BlockingIOError:
            return None   # head moved but the token is a few instructions behind
        return self._take_published()

    def release_read(self, slot: Slot) -> None:
        """Give ``slot`` back to the producer. Slots must be released in the order acquired."""
        tail = self._ctl[_W_TAIL]
        self._check_turn(slot, tail, self._reading, "release_read")
        self._ctl[_W_TAIL] = tail + 1
        self._reading -= 1
        if faults.ACTIVE:
            faults.point("ring.release_read.tail_moved")
        os.eventfd_write(self._free_fd, 1)

    def fileno(self) -> int:
        """An fd that is readable while a published slot (or the close mark) is waiting.
        Use it with select/poll/zmq.poll, then call try_acquire_read()."""
        return self._filled_fd

    # -- state --------------------------------------------------------------
    @property
    def occupancy(self) -> int:
        """Slots committed and not yet released."""
        return self._ctl[_W_HEAD] - self._ctl[_W_TAIL]

    @property
    def high_water(self) -> int:
        """The largest occupancy seen right after a commit."""
        return self._ctl[_W_HIGH_WATER]

    @property
    def errors(self) -> int:
        """Commits/releases refused as out of order or invalid."""
        return self._ctl[_W_ERRORS]

    @property
    def closed(self) -> bool:
        """True once close() was called in this process."""
        return self._segment is None

    @property
    def closed_for_write(self) -> bool:
        return bool(self._ctl[_W_CLOSED])

    # -- lifetime -----------------------------------------------------------
    def prefault(self) -> bool:
        """Call once at the start of a stage process: maps the whole ring now, so the
        first pass through its slots takes no page faults (see Segment.prefault)."""
        self._check_open()
        return self._segment.prefault()

    def close(self) -> None:
        """Drop this process's views, mapping and semaphore fds. Every user calls it."""
        if self._segment is None:
            return
        segment, self._segment = self._segment, None
        for slot in self._slots:   # a Slot kept past close() then fails loudly on header use
            slot._h8.release()
            slot._h32.release()
            slot._h64.release()
        self._slots = []
        self._ctl.release()
        segment.close()
        for fd in (self._free_fd, self._filled_fd):
            os.close(fd)

    def unlink(self) -> None:
        """Remove the segment from /dev/shm. Only the creating process may (owner only)."""
        if self._segment is None:
            raise ValueError(f"ring {self.name}: unlink after close (unlink first, then close)")
        self._segment.unlink()

    def __reduce__(self):
        raise TypeError(f"ring {self.name!r} cannot be pickled: create it before forking the "
                        "stages with multiprocessing.get_context('fork')")

    def __repr__(self) -> str:
        if self._segment is None:
            return f"<Ring {self.name} closed>"
        return f"<Ring {self.name} {self.occupancy}/{self.slots} slots>"

    # -- internals ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._segment is None:
            raise ValueError(f"ring {self.name} is closed in this process")

    def _wait(self, fd: int, poller: select.poll, timeout: float | None, token_likely: bool,
              what: str) -> None:
        """Take one token from semaphore ``fd`` (we are its only reader).

        When the shared counters show a token must be there, read it straight away:
        one syscall. Otherwise, or if the poster has moved the counter but not yet
        posted, block in poll() with the timeout (at least POST_LAG_S in the latter case)
        and read when it is readable.
        """
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"ring {self.name}: timeout={timeout!r} must be >= 0 or None")
        if token_likely:
            try:
                os.eventfd_read(fd)
                return
            except BlockingIOError:
                # the other side moved its counter and has not posted yet (module doc,
                # "Ordering"): the token comes, so even a caller that would not wait does
                if timeout is not None:
                    timeout = max(timeout, POST_LAG_S)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                ready = poller.poll()
            else:
                ready = poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000)))
            if not ready:
                raise RingTimeout(f"ring {self.name}: waited {timeout}s for {what} "
                                  f"(occupancy {self.occupancy}/{self.slots})")
            try:
                os.eventfd_read(fd)
                return
            except BlockingIOError:   # cannot happen with one reader; stay correct anyway
                continue

    def _take_published(self) -> Slot:
        position = self._ctl[_W_TAIL] + self._reading
        if position >= self._ctl[_W_HEAD]:
            # the close token: put it back so later calls and fileno() still see it
            os.eventfd_write(self._filled_fd, 1)
            raise RingClosed(f"ring {self.name} is closed and drained")
        self._reading += 1
        return self._slots[position % self.slots]

    def _check_turn(self, slot: Slot, position: int, outstanding: int, op: str) -> None:
        if not isinstance(slot, Slot) or slot.index >= len(self._slots) \
                or self._slots[slot.index] is not slot:
            self._ctl[_W_ERRORS] += 1
            raise ValueError(f"ring {self.name}: {op} of {slot!r}, which is not a slot of "
                             "this ring")
        expected = position % self.slots
        if outstanding == 0 or slot.index != expected:
            self._ctl[_W_ERRORS] += 1
            held = "none held" if outstanding == 0 else f"expected slot {expected}"
            raise ValueError(f"ring {self.name}: {op} of slot {slot.index} out of order "
                             f"({held})")
