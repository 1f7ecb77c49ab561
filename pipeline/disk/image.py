"""A disk image file accessed with positioned I/O (pread/pwrite), created sparse."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = bytes(1 << 20)

#: [start, end) byte runs, each allocated (True: data) or a hole (False)
Runs = list[tuple[int, int, bool]]


class ImageFile:
    """A fixed-size file of ``size`` bytes. Missing → created sparse; shorter → extended;
    longer → ValueError (we never silently hide data beyond the export)."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        have = os.fstat(self.fd).st_size
        if have > size:
            os.close(self.fd)
            raise ValueError(f"image {path} is {have} bytes, larger than the export size {size}")
        if have < size:
            os.ftruncate(self.fd, size)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:  # cannot happen within size; guard against a truncated file
            raise OSError(errno.EIO, f"{self.path}: short read at {offset} (+{length})")
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        n = os.pwrite(self.fd, data, offset)
        if n == len(data):   # (nearly always: no view to make, no loop)
            return
        view = memoryview(data)[n:]
        offset += n
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int, keep_allocated: bool = False) -> None:
        """Make [offset, offset+length) read as zeros, freeing the blocks where the fs can
        (``keep_allocated``: leave them allocated, as NBD's NO_HOLE flag asks)."""
        mode = FALLOC_FL_ZERO_RANGE if keep_allocated else \
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, offset, length) == 0:
            return
        while length:  # no hole punching here (tmpfs is fine; some fs are not)
            n = min(length, len(_ZERO_CHUNK))
            self.pwrite(offset, _ZERO_CHUNK[:n])
            offset += n
            length -= n

    def extents(self, offset: int, length: int) -> Runs:
        """Allocated runs and holes covering [offset, offset+length), from SEEK_DATA and
        SEEK_HOLE (a filesystem without them reports everything allocated)."""
        out: Runs = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                data = min(os.lseek(self.fd, pos, os.SEEK_DATA), end)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                data = end
            if data > pos:
                out.append((pos, data, False))
                pos = data
            if pos < end:
                hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
                out.append((pos, hole, True))
                pos = hole
        return out

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def reset(self) -> None:
        """Drop every byte (the file stays ``size`` long and sparse)."""
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, self.size)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def paint(base: Runs, patch: Runs) -> Runs:
    """``base`` with the contiguous range ``patch`` covers replaced by ``patch``."""
    if not patch:
        return base
    lo, hi = patch[0][0], patch[-1][1]
    out: Runs = []
    for s, e, a in base:
        if s < lo:
            out.append((s, min(e, lo), a))
    out += patch
    for s, e, a in base:
        if e > hi:
            out.append((max(s, hi), e, a))
    return out


def block_runs(runs: Runs, block: int) -> Runs:
    """Runs on ``block`` boundaries (a block with any data counts as data), adjacent runs
    of the same kind merged. ``runs`` must be contiguous and start and end on boundaries."""
    out: Runs = []
    for s, e, allocated in runs:
        if not allocated:  # shrink a hole to whole blocks; the cut-off parts are data
            s2, e2 = -(-s // block) * block, e // block * block
            if s2 >= e2:
                allocated = True
            else:
                if s2 > s:
                    _append(out, s, s2, True)
                _append(out, s2, e2, False)
                if e > e2:
                    _append(out, e2, e, True)
                continue
        _append(out, s, e, allocated)
    return out


def _append(out: Runs, s: int, e: int, allocated: bool) -> None:
    if out and out[-1][2] == allocated and out[-1][1] == s:
        out[-1] = (out[-1][0], e, allocated)
    else:
        out.append((s, e, allocated))
