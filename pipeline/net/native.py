"""Rounds of one frame pair at machine speed: poll, one read per side, the comparison
outside the masks, one write, in a loop compiled by numba (no Python between rounds).

Why: a comparator that keeps up is woken for one PVM/SVM frame pair at a time, after
sleeping long enough for other processes to have taken its caches. Each such round
through the interpreter (the poll, both reads, the checks, the compare, the release)
cost ~45 us of CPU cold against QEMU's ~25, and the longer path is what put our p99
latency behind QEMU's (scripts/bench_compare.py). Compiled, the round is its four system
calls and a byte loop.

:func:`pair_rounds` runs rounds while each read of one side brings whole frames (one, or
a run) that the comparator would release at once against the other side's read of the
same size: what ``Comparator._release_equal`` and ``_match_run`` judge, each frame a
valid untagged IPv4 TCP/UDP/ICMP frame, the same length on both sides, equal outside
the IPv4 id and checksum and the TCP window and checksum. The caller enters it only
while nothing is held or queued anywhere (``Comparator.native_ok``), and it comes back
to Python for everything else, with what it read: another descriptor readable (the
control channel first, as always), reads that are not such a run (a partial frame, a
lone side, a boundary, a mismatch, end of stream), a write that did not take the whole
run, a signal, the poll's timeout, or ``max_pairs`` pairs or ``timeout_ms`` of rounds,
whichever comes first (the caller's counters, timeouts and stop flag get their turn: pairs
that kept coming, each well before the poll's timeout, kept them away for ``max_pairs``
pairs, at 20 requests/s 13 s of ``stats`` showing none of them).

When one side's frame came alone, the loop waits for the other side's, asleep in the
poll, for up to ``wait_ns`` (every other descriptor still watched): the second frame of
a pair usually follows within microseconds, often held up only because waking the
comparator took the sender's CPU, and judged here it costs no trip through Python. A
lone frame that waited so and goes to Python after all carries its read time
(``res[ARRIVED_NS]``), so its hold time and timeout count from then.

Imported only where a loop can use it (numba's import and the cached code's load: ~0.45 s
of CPU; see ``pipeline.net.loop.native_rounds``, which also runs every round in Python
when numba is missing): by the node's supervisor before it forks the comparator
(``preload_native_rounds``: neither the import nor a call of the cached functions starts a
thread, and the forked child calls the inherited code without compiling it again, its
first call ~0.2 ms), else by the comparator itself. The compiled code is cached (numba's
``cache=True``, beside this file): only the first process after an install (or in a new
checkout) compiles it, ~3 s of CPU.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types

from pipeline.net.settings import MAX_FRAME_BYTES

#: what pair_rounds returns in res[ST]
ST_IDLE = 0      # the poll timed out (after the pairs counted in res[PAIRS], if any)
ST_OTHER = 1     # another descriptor is readable: nothing was read in this round
ST_INPUT = 2     # res[P_READ]/res[S_READ] hold this round's reads: not a pair it releases
ST_SEND = 3      # the last pair's write took res[SENT] bytes (or -errno) of res[P_READ]
ST_SIGNAL = 4    # the poll was interrupted (a signal handler is due)
ST_MAX = 5       # max_pairs rounds done, or timeout_ms passed since the call
ST_ERROR = 6     # the poll failed: res[SENT] = -errno
STATUS_NAMES = ("idle", "other", "input", "send", "signal", "max", "error")

#: the slots of the result array: status; frame pairs released and their bytes (a side,
#: length words not counted); what the last round read (bytes, 0 at end of stream or
#: -errno) and how many of those bytes at the front were read while readable at a poll
#: that found the control channel quiet (the rest go after a waiting control message);
#: what the last write took; waits for a lone side's partner and how many ended with it;
#: when the lone frame of the last round was read if it waited in vain (monotonic ns,
#: 0: now); then the released pairs by how long the PVM's frame waited (the Comparator's
#: RELEASE_DELAY_BOUNDS_MS buckets)
ST, PAIRS, BYTES, P_READ, S_READ, P_READY, S_READY, SENT, WAITS, WAIT_HITS, ARRIVED_NS, \
    DELAYS = range(12)
DELAY_BUCKETS = 11
RESULT_SLOTS = DELAYS + DELAY_BUCKETS

# libc, resolved when the code is linked (unlike ctypes pointers, which stop the caching)
c_int, ssize = types.intc, types.intp
recv = types.ExternalFunction("recv", ssize(c_int, types.voidptr, types.uintp, c_int))
send = types.ExternalFunction("send", ssize(c_int, types.voidptr, types.uintp, c_int))
poll = types.ExternalFunction("poll", c_int(types.voidptr, types.uint64, c_int))
errno_location = types.ExternalFunction("__errno_location", types.CPointer(c_int)())
clock_gettime = types.ExternalFunction("clock_gettime", c_int(c_int, types.voidptr))
memcpy = types.ExternalFunction("memcpy", types.voidptr(types.voidptr, types.voidptr,
                                                        types.uintp))
memcmp = types.ExternalFunction("memcmp", c_int(types.voidptr, types.voidptr, types.uintp))
# the signal mask argument as an integer: 0 is NULL (keep the process's mask)
ppoll = types.ExternalFunction("ppoll", c_int(types.voidptr, types.uint64, types.voidptr,
                                              types.intp))

MSG_DONTWAIT, MSG_NOSIGNAL = 0x40, 0x4000
POLLIN = 1
EINTR, EAGAIN = 4, 11
CLOCK_MONOTONIC = 1
_MAX_FRAME = MAX_FRAME_BYTES


@njit(cache=True, nogil=True)
def now_ns(ts):
    clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@njit(cache=True, nogil=True)
def read(fd, buf):
    """recv() into buf: bytes, 0 at end of stream, -errno (-EAGAIN: nothing waits)."""
    n = recv(fd, buf.ctypes.data, buf.size, MSG_DONTWAIT)
    if n < 0:
        return -np.int64(errno_location()[0])
    return n


@njit(cache=True, nogil=True)
def one_frame(b, n):
    """b[:n] is one whole item whose length word says a frame (not a boundary)."""
    if n < 4:
        return False
    length = np.int64(b[0]) << 24 | np.int64(b[1]) << 16 | np.int64(b[2]) << 8 \
        | np.int64(b[3])
    return length + 4 == n and length <= _MAX_FRAME


@njit(cache=True, nogil=True)
def frame_proto(p, f, fl):
    """The IP protocol of the frame ``p[f:f + fl]`` when it is one the masked comparison
    takes (a valid untagged IPv4 TCP/UDP/ICMP frame, no options, not a fragment: the
    checks of comparator._equal_outside_masks), else -1."""
    if fl < 38 or p[f + 12] != 0x08 or p[f + 13] != 0x00 or p[f + 14] != 0x45:
        return -1
    total = np.int64(p[f + 16]) << 8 | np.int64(p[f + 17])
    frag = np.int64(p[f + 20]) << 8 | np.int64(p[f + 21])
    proto = np.int64(p[f + 23])
    if frag & 0x3FFF or total < 20 or 14 + total > fl:
        return -1
    if proto == 6:
        doff = (np.int64(p[f + 46]) >> 4) * 4
        if fl < 54 or total < 40 or doff < 20 or doff > total - 20:
            return -1
    elif proto == 17:
        ulen = np.int64(p[f + 38]) << 8 | np.int64(p[f + 39])
        if fl < 42 or total < 28 or ulen < 8 or ulen > total - 20:
            return -1
    elif proto != 1 or total < 24:
        return -1
    return proto


@njit(cache=True, nogil=True)
def releasable_run(p, s, t, n):
    """How many items ``p[:n]`` holds when it is a run of whole frames each equal, outside
    the fields that may differ, to the item at the same place in ``s[:n]`` (0 when not):
    what Comparator._release_equal and _match_run release. As _equal_outside_masks does
    it: ``s`` copied into ``t`` with those fields taken from ``p``, then one comparison
    (libc's memcpy and memcmp: numba's loops over the bytes took 4x as long)."""
    memcpy(t.ctypes.data, s.ctypes.data, n)
    at = 0
    k = 0
    while at < n:
        if n - at < 42:
            return 0
        length = np.int64(p[at]) << 24 | np.int64(p[at + 1]) << 16 \
            | np.int64(p[at + 2]) << 8 | np.int64(p[at + 3])
        end = at + 4 + length
        if length > _MAX_FRAME or end > n:
            return 0
        f = at + 4
        proto = frame_proto(p, f, length)
        if proto < 0:
            return 0
        for j in (18, 19, 24, 25):                 # IPv4 id, header checksum
            t[f + j] = p[f + j]
        if proto == 6:
            for j in (48, 49, 50, 51):             # TCP window, checksum
                t[f + j] = p[f + j]
        at = end
        k += 1
    if memcmp(p.ctypes.data, t.ctypes.data, n) != 0:
        return 0
    return k


@njit(cache=True, nogil=True)
def pair_rounds(pfds, nfds, ip, is_, out_fd, pbuf, sbuf, tbuf, timeout_ms, max_pairs,
                wait_ns, delay_bounds_ns, res):
    """``pfds``: int32 pairs (fd, events | revents << 16), a struct pollfd array of
    ``nfds`` with the PVM's stream at index ``ip`` and the SVM's at ``is_``; reads go
    into ``pbuf``/``sbuf`` (``tbuf``: room for the comparison, as large); released frames
    to ``out_fd``; ``delay_bounds_ns``: the upper
    bounds of the release-delay buckets but the last. See the module doc."""
    for j in range(RESULT_SLOTS):
        res[j] = 0
    pin, sin = pfds[2 * ip], pfds[2 * is_]
    ts = np.zeros(2, np.int64)
    pairs = 0
    nbytes = 0
    status = ST_MAX
    budget_end = now_ns(ts) + np.int64(timeout_ms) * 1_000_000
    while pairs < max_pairs:
        for j in range(nfds):
            pfds[2 * j + 1] = POLLIN
        ready = poll(pfds.ctypes.data, nfds, timeout_ms)
        if ready < 0:
            err = errno_location()[0]
            if err == EINTR:
                status = ST_SIGNAL
            else:
                status = ST_ERROR
                res[SENT] = -err
            break
        if ready == 0:
            status = ST_IDLE
            break
        p_ready = (pfds[2 * ip + 1] >> 16) != 0
        s_ready = (pfds[2 * is_ + 1] >> 16) != 0
        if ready > np.int64(p_ready) + np.int64(s_ready):
            status = ST_OTHER
            break
        # both sides read, as CompareLoop._run_pair does (the other side's frame
        # usually came meanwhile)
        rp = read(pin, pbuf)
        rs = read(sin, sbuf)
        # the bytes of each side read while it was readable at a poll that found the
        # control channel quiet (the rest may have been sent after a control message)
        p_rb = rp if p_ready and rp > 0 else 0
        s_rb = rs if s_ready and rs > 0 else 0
        pvm_since = 0
        if wait_ns > 0 and ((rp == -EAGAIN and one_frame(sbuf, rs))
                            or (rs == -EAGAIN and one_frame(pbuf, rp))):
            # one side's frame alone: wait (asleep, every other descriptor watched) a
            # little for the other side's
            arrived = now_ns(ts)
            missing, present = (ip, is_) if rp == -EAGAIN else (is_, ip)
            for j in range(nfds):
                pfds[2 * j + 1] = POLLIN
            pfds[2 * present + 1] = 0
            ts[0], ts[1] = wait_ns // 1_000_000_000, wait_ns % 1_000_000_000
            res[WAITS] += 1
            if ppoll(pfds.ctypes.data, nfds, ts.ctypes.data, 0) == 1 \
                    and (pfds[2 * missing + 1] >> 16) != 0:
                # readable at a poll that found every other descriptor quiet: no
                # control message can be due before its frame
                res[WAIT_HITS] += 1
                if missing == ip:
                    rp = read(pin, pbuf)
                    p_rb = max(rp, 0)
                else:
                    rs = read(sin, sbuf)
                    s_rb = max(rs, 0)
                    pvm_since = arrived
            else:
                res[ARRIVED_NS] = arrived          # the lone frame goes to Python
        if 0 < rp < rs:
            # the side behind got its next frames between the two reads: read once more
            more = read(pin, pbuf[rp:])
            if more > 0:
                rp += more
        elif 0 < rs < rp:
            more = read(sin, sbuf[rs:])
            if more > 0:
                rs += more
        res[P_READ], res[S_READ] = rp, rs
        res[P_READY], res[S_READY] = p_rb, s_rb
        k = releasable_run(pbuf, sbuf, tbuf, rp) if rp > 0 and rs == rp else 0
        if k == 0:
            status = ST_INPUT
            break
        if rp > p_rb or rs > s_rb:
            # bytes read without being readable at the poll: they may have been sent
            # after a control message that is waiting now, which must go first
            for j in range(nfds):
                pfds[2 * j + 1] = POLLIN
            if poll(pfds.ctypes.data, nfds, 0) > 0:
                for j in range(nfds):
                    if j != ip and j != is_ and (pfds[2 * j + 1] >> 16) != 0:
                        status = ST_INPUT
                if status == ST_INPUT:
                    break
        sent = send(out_fd, pbuf.ctypes.data, rp, MSG_DONTWAIT | MSG_NOSIGNAL)
        pairs += k
        nbytes += rp - 4 * k
        bucket = 0
        if pvm_since:
            held = now_ns(ts) - pvm_since
            while bucket < len(delay_bounds_ns) and held > delay_bounds_ns[bucket]:
                bucket += 1
        res[DELAYS + bucket] += k
        res[ARRIVED_NS] = 0
        if sent != rp:
            res[SENT] = sent if sent >= 0 else -np.int64(errno_location()[0])
            status = ST_SEND
            break
        if timeout_ms >= 0 and now_ns(ts) >= budget_end:
            break                                  # (ST_MAX) the round's time is up
    res[ST], res[PAIRS], res[BYTES] = status, pairs, nbytes
    return status


def warm_up() -> None:
    """Compile pair_rounds (or read numba's cache) now, not at the first pair."""
    pfds = np.zeros(2, np.int32)
    buf = np.zeros(64, np.uint8)
    res = np.zeros(RESULT_SLOTS, np.int64)
    pair_rounds(pfds, 0, 0, 0, -1, buf, buf, buf, 0, 1, 0,
                np.zeros(DELAY_BUCKETS - 1, np.int64), res)
