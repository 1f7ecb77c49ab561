"""A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies).

The demo's stand-in for a guest's disk driver, and the tests' way to send requests
that polite clients (qemu-io, libnbd) refuse to send. URIs: ``nbd://HOST:PORT`` or
``nbd+unix:///?socket=PATH``.
"""
from __future__ import annotations

import socket
import struct

from pipeline.disk import nbd_protocol as P


class NbdClient:
    def __init__(self, uri: str, timeout: float = 10) -> None:
        if uri.startswith("nbd+unix:"):
            path = uri.split("socket=", 1)[1]
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        else:
            host, port = uri[len("nbd://"):].rstrip("/").rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        hello = self._recv(18)
        if hello[:8] != P.NBDMAGIC:
            raise P.NbdProtocolError(f"{uri}: not an NBD server (greeting {hello[:8]!r})")
        self.sock.sendall(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 6) + bytes(6))
        while True:
            _magic, _opt, rtype, length = P.OPTION_REPLY.unpack(self._recv(P.OPTION_REPLY.size))
            self._recv(length)
            if rtype == P.REP_ACK:
                break
            if rtype & 0x80000000:
                raise P.NbdProtocolError(f"{uri}: NBD_OPT_GO refused (reply type {rtype:#x})")
        self._cookie = 0

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    # -- raw requests (tests send malformed ones on purpose) -----------------------
    def request(self, cmd: int, offset: int, length: int, payload: bytes = b"",
                cookie: int = 7, magic: int = P.REQUEST_MAGIC) -> None:
        self.sock.sendall(P.REQUEST.pack(magic, 0, cmd, cookie, offset, length) + payload)

    def reply(self, data_len: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = P.SIMPLE_REPLY.unpack(self._recv(P.SIMPLE_REPLY.size))
        if magic != P.SIMPLE_REPLY_MAGIC:
            raise P.NbdProtocolError(f"bad reply magic {magic:#x}")
        return error, cookie, self._recv(data_len) if not error else b""

    # -- the ordinary operations -------------------------------------------------
    def _call(self, cmd: int, offset: int, length: int, payload: bytes = b"",
              data_len: int = 0) -> bytes:
        self._cookie += 1
        self.request(cmd, offset, length, payload, cookie=self._cookie)
        error, cookie, data = self.reply(data_len)
        if error:
            raise P.NbdError(error, f"NBD command {cmd} at {offset}+{length} failed: "
                             f"errno {error}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        self._call(P.CMD_WRITE, offset, len(data), data)

    def read(self, offset: int, length: int) -> bytes:
        return self._call(P.CMD_READ, offset, length, data_len=length)

    def flush(self) -> None:
        self._call(P.CMD_FLUSH, 0, 0)

    def close(self) -> None:
        try:
            self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()
