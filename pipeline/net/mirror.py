"""Client input mirrored to the SVM, held across a checkpoint.

Input that arrives after the PVM's snapshot belongs to the next epoch: the SVM
is about to be reset to the snapshot, so whatever it received in between would
be lost. The mirror therefore holds the SVM's copy of the client frames from the
``snapshot`` event until the ``committed`` event, then delivers them (through the
rewriter, whose offsets the commit has just reset) to the restored SVM.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from pipeline.net.adapters import FrameSink

log = logging.getLogger(__name__)


class InputMirror:
    def __init__(self, sink: FrameSink, rewrite: Callable[[bytes, int], bytes] | None,
                 max_frames: int, counters: dict[str, int]) -> None:
        self.sink = sink
        self.rewrite = rewrite
        self.max_frames = max_frames
        self.counters = counters
        #: the epoch whose input is being held (None: deliver at once)
        self.holding: int | None = None
        self._held: list[tuple[bytes, int]] = []

    def send(self, frame: bytes, vnet_hdr_len: int) -> None:
        if self.holding is None:
            self._deliver(frame, vnet_hdr_len)
        elif len(self._held) < self.max_frames:
            self._held.append((frame, vnet_hdr_len))
            self.counters["mirror_frames_held"] += 1
        else:
            # the client's TCP retransmits; datagrams are lost as on a congested link
            self.counters["mirror_frames_dropped"] += 1
            if self.counters["mirror_frames_dropped"] % 1000 == 1:
                log.warning("mirror: %d client frames held for epoch %d, dropping more",
                            len(self._held), self.holding)

    def _deliver(self, frame: bytes, vnet_hdr_len: int) -> None:
        if self.rewrite is not None:
            frame = self.rewrite(frame, vnet_hdr_len)
        self.sink.send(frame, vnet_hdr_len)

    def hold(self, epoch: int) -> None:
        """From now on input belongs to ``epoch``: hold the SVM's copy until the commit."""
        self.holding = epoch

    def release(self) -> None:
        """The SVM was restored: give it the input held since the snapshot, in order."""
        held, self._held = self._held, []
        self.holding = None
        for frame, vnet in held:
            self._deliver(frame, vnet)
