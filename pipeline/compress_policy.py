"""Whether the primary compresses its pages (``pipeline.compress = "auto"``).

Compression pays only while the transfer is the bottleneck (the link, or the secondary
behind it) and compressed pages get through it faster than raw ones. On loopback or a
10 Gb/s link lz4 (about 1 GB/s a core on random pages) is the slower part; on a slow
link it halves the transfer time of text-like memory.

The send stage judges in windows: every epoch end with at least ``MIN_BYTES`` of data
pages, and within a long epoch (the full sync) every ``WINDOW_BYTES``. For each window it
knows the page bytes it sent, the window's wall time and how much of it sends spent
blocked because ZeroMQ's queue to the peer was full: the transfer did not keep up. A
window starts again at the first send that blocked, so what the queues (ZeroMQ's, the
kernel's) took in at the producer's pace before they filled does not count as transfer.

- Raw and not blocked: the primary's own stages are the limit; compressing would cost
  their CPU, so raw pages.
- Otherwise the window's rate (page bytes per second) is what the mode in force achieves
  (through the transfer when blocked, through the compressors when not). The policy
  keeps that rate for both modes and uses the faster one. A mode not measured yet, or
  measured more than ``STALE`` windows ago, is tried for one window (the link may have
  changed): so a throttled link turns compression on, and a link that got faster turns
  it off again, each within a few windows.

Whether the link or the secondary's CPU is the limit does not matter: the measured rates
of both modes say which is faster through whatever the limit is. The digest workers'
lz4 rate and ratio (counters ``lz4_ns``, ``lz4_bytes_in``, ``lz4_bytes_out``) are shown
for the operator. Decisions are made by one process (send) and read by the digest
workers from one shared word, so a decision takes effect at their next batch.
"""
from __future__ import annotations

from dataclasses import dataclass

WINDOW_BYTES = 16 << 20   # page bytes per judgement inside a long epoch
MIN_BYTES = 1 << 20       # smaller epochs say too little about the link
SATURATED = 0.3           # share of the window blocked in send: the transfer is the limit
MARGIN = 1.1              # hysteresis: switch only when the other mode is this much faster
STALE = 8                 # windows after which the other mode's rate is measured again
MB = 1e6


@dataclass
class Window:
    """What the send stage saw while sending some data pages."""
    wire_bytes: int       # bytes of PAGES records sent
    page_bytes: int       # bytes of the data pages those records carried, uncompressed
    wall_s: float         # from the window's first record to its last
    blocked_s: float      # of that, time spent in sends that waited for the peer
    compressed: bool      # the mode the pages were encoded with


class CompressPolicy:
    """The decision and what it rests on. ``judge`` returns (compress, why) when the
    decision changes, else None; ``why`` (a sentence for the log) is kept either way."""

    def __init__(self, workers: int, compress: bool = False) -> None:
        self.workers = workers
        self.compress = compress
        self.rate: dict[bool, float | None] = {False: None, True: None}   # page B/s
        self.age: dict[bool, int] = {False: 0, True: 0}    # windows since measured
        self.link_b_s: float | None = None     # wire bytes/s of the last blocked window
        self.lz4_b_s: float | None = None      # one worker's lz4 rate, page bytes per s
        self.ratio: float | None = None        # compressed / page bytes
        self.why = "no measurement yet: sending raw"

    def observe_lz4(self, ns: int, bytes_in: int, bytes_out: int) -> None:
        """The digest workers' lz4 calls since the last observation (summed)."""
        if ns > 0 and bytes_in >= MIN_BYTES:
            self.lz4_b_s = bytes_in / (ns / 1e9) / self.workers
            self.ratio = bytes_out / bytes_in

    def judge(self, w: Window) -> tuple[bool, str] | None:
        if w.page_bytes < MIN_BYTES or w.wall_s <= 0:
            return None
        mode, other = w.compressed, not w.compressed
        blocked = w.blocked_s >= SATURATED * w.wall_s
        wire_rate = w.wire_bytes / w.wall_s
        page_rate = w.page_bytes / w.wall_s
        self.age[mode] = 0
        self.age[other] += 1
        name = {True: "lz4", False: "raw"}
        seen = (f"{name[mode]} {page_rate / MB:.0f} MB/s of pages, "
                f"{wire_rate / MB:.0f} MB/s on the wire, "
                f"blocked {w.blocked_s / w.wall_s:.0%}")
        self.rate[mode] = page_rate
        if not blocked and not mode:
            # the primary is the limit: compressing could only slow it further
            return self._set(False, f"{seen}: the transfer keeps up, raw pages")
        if blocked:
            self.link_b_s = wire_rate
        elif self.link_b_s and wire_rate > MARGIN * self.link_b_s:
            # more bytes got through than the link carried when it was the limit: it is
            # faster now, and what raw pages reached through it is out of date
            self.link_b_s = None
            self.age[other] = STALE
        known = self.rate[other]
        if other and self.ratio is not None and self.ratio * MARGIN >= 1:
            return self._set(False, f"{seen}: pages do not compress (ratio {self.ratio:.2f})")
        if known is None or self.age[other] >= STALE:
            self.age[other] = 0
            limit = "the transfer" if blocked else "compressing"
            return self._set(other, f"{seen}: {limit} is the limit; measuring {name[other]}")
        best = other if known > MARGIN * page_rate else mode
        return self._set(best, f"{seen}; {name[other]} measured {known / MB:.0f} MB/s")

    def _set(self, compress: bool, why: str) -> tuple[bool, str] | None:
        self.why = why
        if compress == self.compress:
            return None
        self.compress = compress
        return compress, why
