"""The NBD wire protocol (fixed newstyle), as far as our exports speak it.

Reference: the NBD protocol document (github.com/NetworkBlockDevice/nbd,
``doc/proto.md``). We implement: the fixed-newstyle handshake with
``NBD_FLAG_NO_ZEROES``; options EXPORT_NAME, ABORT, LIST, INFO and GO (with
NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and
SET_META_CONTEXT (one context, ``base:allocation``); everything else is answered
``NBD_REP_ERR_UNSUP``. Commands: READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES,
BLOCK_STATUS; the FUA flag on the writing ones, NO_HOLE on WRITE_ZEROES, REQ_ONE on
BLOCK_STATUS. With structured replies negotiated, reads and block status are answered
with structured chunks and errors with an error chunk carrying the reason; without,
every reply is a simple reply.
"""
from __future__ import annotations

import errno
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

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
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8
TRANSMISSION_FLAGS = (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM
                      | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN)

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_REQ_ONE = 1 << 3

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", 5: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# the one metadata context we serve, and its flags
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# error values on the wire (the protocol fixes these to the Linux numbers)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = (
    errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW,
    errno.ENOTSUP, errno.ESHUTDOWN)

REQUEST = struct.Struct(">IHHQQI")        # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")      # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")           # magic, flags, type, cookie, payload length
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


def chunk(cookie: int, rtype: int, payload: bytes = b"", done: bool = True) -> bytes:
    """A structured reply chunk (header and payload)."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype, cookie,
                      len(payload)) + payload


def data_chunk_header(cookie: int, offset: int, length: int) -> bytes:
    """Header of a final OFFSET_DATA chunk of ``length`` data bytes (the data follows)."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                      cookie, 8 + length) + offset.to_bytes(8, "big")


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:4096]
    return chunk(cookie, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(text)) + text)


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """``extents``: (length, flags) descriptors, in order from the request's offset."""
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f)
                                                    for n, f in extents)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, body)


def meta_context_queries(data: bytes) -> list[str]:
    """The queries of a LIST/SET_META_CONTEXT option: u32 export name length, name, u32
    query count, count × (u32 length, string). ValueError naming what is malformed."""
    if len(data) < 8:
        raise ValueError(f"meta context request of {len(data)} bytes")
    name_len = int.from_bytes(data[:4], "big")
    pos = 4 + name_len
    if pos + 4 > len(data):
        raise ValueError(f"meta context request: export name of {name_len} bytes overruns it")
    count = int.from_bytes(data[pos:pos + 4], "big")
    pos += 4
    queries = []
    for i in range(count):
        if pos + 4 > len(data):
            raise ValueError(f"meta context request: query {i} of {count} is missing")
        n = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if pos + n > len(data):
            raise ValueError(f"meta context request: query {i} of {n} bytes overruns it")
        queries.append(data[pos:pos + n].decode(errors="replace"))
        pos += n
    if pos != len(data):
        raise ValueError(f"meta context request: {len(data) - pos} bytes after the queries")
    return queries


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode())
