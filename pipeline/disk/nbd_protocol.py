"""The NBD wire protocol (fixed newstyle), as far as our exports speak it.

Reference: the NBD protocol document (github.com/NetworkBlockDevice/nbd,
``doc/proto.md``). We implement: the fixed-newstyle handshake with
``NBD_FLAG_NO_ZEROES``; options EXPORT_NAME, ABORT, LIST, INFO and GO (with
NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE); everything else is answered
``NBD_REP_ERR_UNSUP`` — including STRUCTURED_REPLY, so every reply is a simple
reply. Commands: READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES.
"""
from __future__ import annotations

import errno
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8
TRANSMISSION_FLAGS = (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM
                      | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN)

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", 5: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES", 7: "BLOCK_STATUS"}

# error values on the wire (the protocol fixes these to the Linux numbers)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = (
    errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW,
    errno.ENOTSUP, errno.ESHUTDOWN)

REQUEST = struct.Struct(">IHHQQI")        # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")      # magic, error, cookie
OPTION_HEADER = struct.Struct(">QII")     # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")     # magic, option, reply type, length


class NbdError(Exception):
    """A request that gets an error reply (the connection goes on)."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class NbdProtocolError(Exception):
    """The peer broke the protocol (bad magic, truncated handshake): the connection ends."""


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


def info_export(size: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, TRANSMISSION_FLAGS)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
