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
_ZERO_CHUNK = bytes(1 << 20)


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
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, freeing the blocks where the fs can."""
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, length) == 0:
            return
        while length:  # no hole punching here (tmpfs is fine; some fs are not)
            n = min(length, len(_ZERO_CHUNK))
            self.pwrite(offset, _ZERO_CHUNK[:n])
            offset += n
            length -= n

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
