"""The sim guest's input log: a shared-memory ring of input payloads indexed by sequence number.

One writer appends (the input forwarder: on the primary the client-input feeder, on
the secondary the mirror of the primary's inputs), one reader consumes (the guest).
Unlike a queue, an entry is not freed when the guest consumes it: a checkpoint can
move the guest back to an earlier input (the secondary's SVM is reset to the PVM's
state), so entries stay until :meth:`InputLog.trim` says the pair no longer needs
them. An entry is overwritten only when it is below both the trim point and the
input the guest is on (``free_below``). ``free_below`` never decreases: trim only
moves up, and a vCPU-state load may move the guest back only to a seq at or above
``free_below`` (SimDomain.set_vcpu_state checks it), so a writer that saw room
never overwrites an entry someone still needs.

The ring is an anonymous ``MAP_SHARED`` mapping: inherited by every process forked
after it is created, and it leaves nothing in ``/dev/shm``.

Layout: a header of ``uint64`` words, then per slot a ``uint64`` stamp (the seq the
slot holds, or ``EMPTY`` while it is written), a ``uint32`` length, and the payload.
x86 stores are not reordered with each other, so writing the payload before the
stamp and the stamp before ``head`` publishes an entry safely.

The words are read and written through memoryviews, not numpy arrays: every request
makes a dozen of these accesses in the stage feeding the guest and in the guest, and a
numpy scalar access (and its int()) costs several times a memoryview item's; the
payload goes in with one slice assignment into the mapping.
"""
from __future__ import annotations

import logging
import mmap
import time

log = logging.getLogger(__name__)

#: stamp of a slot that holds nothing (or is being rewritten)
EMPTY = 0xFFFF_FFFF_FFFF_FFFF

# header word indexes
_HEAD = 0            # next seq to be appended
_TRIM = 1            # entries below this may be overwritten
_CONSUMER = 2        # the seq the guest is on (it still needs this one and all above)
_REJECTED = 3        # appends refused (bad seq, oversized payload)
_HEADER_WORDS = 8


class InputLogEntryGone(LookupError):
    """The wanted input was trimmed and overwritten (or never appended)."""


class InputLog:
    """Ring of ``slot_count`` inputs of at most ``slot_size`` bytes each, in shared memory."""

    def __init__(self, slot_count: int = 1024, slot_size: int = 2048) -> None:
        if slot_count < 1 or slot_size < 1:
            raise ValueError(f"input log needs slot_count >= 1 and slot_size >= 1, "
                             f"got {slot_count} and {slot_size}")
        self.slot_count = slot_count
        self.slot_size = slot_size
        header = _HEADER_WORDS * 8
        stamps = slot_count * 8
        lengths = slot_count * 4
        size = header + stamps + lengths + slot_count * slot_size
        self._map = mmap.mmap(-1, size)  # anonymous, MAP_SHARED: inherited over fork
        whole = memoryview(self._map)
        self._header = whole[:header].cast("Q")
        self._stamps = whole[header:header + stamps].cast("Q")
        self._lengths = whole[header + stamps:header + stamps + lengths].cast("I")
        self._data_at = header + stamps + lengths      # slot i's payload: + i * slot_size
        whole.release()
        self._map[header:header + stamps] = b"\xff" * stamps      # every stamp EMPTY

    # -- state --------------------------------------------------------------------
    @property
    def head(self) -> int:
        """The seq the next append gets."""
        return self._header[_HEAD]

    @property
    def trim_seq(self) -> int:
        return self._header[_TRIM]

    @property
    def consumer_seq(self) -> int:
        return self._header[_CONSUMER]

    @property
    def rejected(self) -> int:
        return self._header[_REJECTED]

    def set_consumer(self, seq: int) -> None:
        """The guest (or a vCPU-state load) says which input it is on."""
        self._header[_CONSUMER] = seq

    def free_below(self) -> int:
        """Entries below this seq may be overwritten."""
        h = self._header
        return min(h[_TRIM], h[_CONSUMER])

    # -- writer -------------------------------------------------------------------
    def append(self, payload: bytes, seq: int | None = None, timeout: float = 5.0) -> int:
        """Append one input and return its seq. ``seq`` (when mirroring) must be the next
        one. Blocks up to ``timeout`` seconds while the ring is full (TimeoutError)."""
        h = self._header
        head = h[_HEAD]
        n = len(payload)
        if n > self.slot_size:
            h[_REJECTED] += 1
            raise ValueError(f"input seq {head}: payload of {n} bytes exceeds the "
                             f"input log slot size {self.slot_size}")
        if seq is not None and seq != head:
            h[_REJECTED] += 1
            raise ValueError(f"input seq {seq} out of order: the input log expects seq {head}")
        if head - min(h[_TRIM], h[_CONSUMER]) >= self.slot_count:
            self._wait_for_room(head, timeout)
        slot = head % self.slot_count
        self._stamps[slot] = EMPTY
        at = self._data_at + slot * self.slot_size
        self._map[at:at + n] = payload
        self._lengths[slot] = n
        self._stamps[slot] = head
        h[_HEAD] = head + 1
        return head

    def _wait_for_room(self, head: int, timeout: float) -> None:
        # A full log is the exception (the pipeline trims after every commit), so a short
        # sleep loop is simpler than another wakeup channel and costs nothing when not full.
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while head - self.free_below() >= self.slot_count:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"input log full for {timeout}s: appending seq {head} needs seq "
                    f"{head - self.slot_count} freed, but trim is at {self.trim_seq} and the "
                    f"guest is on seq {self.consumer_seq}")
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def restart_at(self, seq: int) -> None:
        """Make ``seq`` the next seq of a log that holds nothing still needed (a secondary
        joining when the primary's inputs are already at ``seq``). A guest that never
        consumed from the log since it restarted (its consumer below the trim point: it
        was never positioned in it; a running guest's is at or above the last commit's
        trim) needs none of it."""
        head = self.head
        never_positioned = self.consumer_seq < self.trim_seq
        if seq < head or not never_positioned and self.free_below() < head:
            raise ValueError(f"input log cannot restart at seq {seq}: head is {head}, and "
                             f"entries from seq {self.free_below()} are still needed")
        self._header[_TRIM] = seq
        self._header[_HEAD] = seq

    def trim(self, below_seq: int) -> None:
        """Inputs below ``below_seq`` may be overwritten. Never moves backwards."""
        if below_seq > self.trim_seq:
            self._header[_TRIM] = below_seq

    # -- reader -------------------------------------------------------------------
    def available(self, seq: int) -> bool:
        return seq < self._header[_HEAD]

    def get(self, seq: int) -> bytes:
        """The payload of input ``seq`` (which must have been appended)."""
        slot = seq % self.slot_count
        if seq >= self._header[_HEAD] or self._stamps[slot] != seq:
            raise InputLogEntryGone(
                f"input seq {seq} is not in the input log (head {self.head}, "
                f"trim {self.trim_seq}, slot holds seq {self._stamps[slot]})")
        at = self._data_at + slot * self.slot_size
        payload = self._map[at:at + self._lengths[slot]]
        if self._stamps[slot] != seq:  # overwritten while we copied
            raise InputLogEntryGone(f"input seq {seq} was overwritten while being read")
        return payload

    def close(self) -> None:
        """Drop this process's view (the memory goes when the last process lets go)."""
        for view in (self._header, self._stamps, self._lengths):
            view.release()
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; it goes with that view
            pass
