"""A fixed-newstyle NBD server: one thread per client connection, serving an export backend.

Why our own server rather than nbdkit's Python plugin: nbdkit embeds Debian's
``/usr/bin/python3``, which has none of numpy/pyzmq/blake3 (they live in the
project's interpreter), so a plugin could not forward over ZeroMQ or hash with
blake3 without a second IPC hop; and measured here a plain-Python server per
connection is fast enough (see scripts/bench_disk.py).

Each connection thread polls two things at once: the client socket, and the
backend link's completion socket (the primary's ZeroMQ link to the secondary).
A write whose forward is still in flight is answered later, out of order (NBD
allows that); when ``window`` writes are in flight the thread stops reading the
client socket — that is the back-pressure a slow secondary puts on the guest.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Protocol

import numpy as np
import zmq

from pipeline.disk import nbd_protocol as P
from pipeline.disk.counters import DiskCounters
from pipeline.disk.image import block_runs
from pipeline.disk.settings import parse_export_address

log = logging.getLogger(__name__)


class ExportLink(Protocol):
    """One client connection's view of the export (may own a forwarding socket)."""

    #: zmq sockets / fds polled for completions of pending writes (empty: writes complete at once)
    poll_items: list
    inflight: int

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...
    def write(self, cookie: int, offset: int, data: bytearray, fua: bool = False) -> bool: ...
    def zero(self, cookie: int, offset: int, length: int, fua: bool = False,
             keep_allocated: bool = False) -> bool: ...
    #: (start, end, allocated) runs covering the range (pipeline.disk.image.Runs)
    def block_status(self, offset: int, length: int) -> list: ...
    def flush(self) -> None: ...
    def completions(self, now_ns: int) -> list[tuple[int, int]]: ...
    #: True when pending work should be sent before reading more requests
    outbox_full: bool
    def end_of_burst(self) -> None: ...
    def close(self) -> None: ...


class ExportBackend(Protocol):
    size: int
    block_size: int
    max_request: int
    window: int

    def connect(self) -> ExportLink: ...


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"peer closed after {got} of {n} bytes")
        got += k
    return buf


class _Session:
    """What a client negotiated: structured replies, and the metadata contexts selected
    (context id → name)."""

    def __init__(self) -> None:
        self.structured = False
        self.contexts: dict[int, str] = {}


def _match_contexts(queries: list[str], listing: bool) -> list[str]:
    """The contexts ``queries`` select (LIST: no query or ``base:`` means every one)."""
    if listing and not queries:
        return [P.BASE_ALLOCATION]
    hits = [q for q in queries
            if q == P.BASE_ALLOCATION or (listing and q == "base:")]
    return [P.BASE_ALLOCATION] if hits else []


class _BackendIOError(Exception):
    """The export's files failed (I/O error, disk full): the client gets EIO."""


def _io(name: str, offset: int, length: int, op, *args):
    """Run a backend operation; an OSError of the files becomes a _BackendIOError naming
    the request (socket errors never pass through here)."""
    try:
        return op(*args)
    except OSError as e:
        raise _BackendIOError(f"{name} [{offset}, +{length}): {e}") from e


def _info_request_ok(data: bytes) -> bool:
    """INFO/GO data: u32 name length, name, u16 count, count × u16 info types."""
    if len(data) < 6:
        return False
    name_len = int.from_bytes(data[:4], "big")
    if 6 + name_len > len(data):
        return False
    count = int.from_bytes(data[4 + name_len:6 + name_len], "big")
    return len(data) == 6 + name_len + 2 * count


#: buffers handed to one sendmsg (the kernel's IOV_MAX is 1024)
_IOV_BATCH = 512


def _send_parts(sock: socket.socket, parts: list) -> None:
    """sendmsg until every byte of ``parts`` is out (a blocking sendmsg may stop short)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views[:_IOV_BATCH])
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class _BufferedReader:
    """Reads the client socket in large chunks: one recv often carries many small requests."""

    CHUNK = 256 * 1024

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(self.CHUNK)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def read(self, n: int) -> bytearray | memoryview:
        """Exactly ``n`` bytes; EOFError if the peer closes first."""
        have = self.end - self.start
        if have >= n:
            out = self.buf[self.start:self.start + n]
            self.start += n
            return out
        if n - have >= self.CHUNK:  # big payload: straight into its own buffer
            # not a bytearray, which the allocator zero-fills before recv_into overwrites
            # every byte (~65 of a 1 MiB write's ~700 us of server CPU here)
            view = memoryview(np.empty(n, np.uint8))
            view[:have] = self.view[self.start:self.end]
            self.start = self.end = 0
            got = have
            while got < n:
                # MSG_WAITALL: the client's socket hands a large payload over in pieces;
                # wait for them in the kernel rather than in a Python loop of recvs
                k = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
                if k == 0:
                    raise EOFError(f"peer closed after {got} of {n} bytes")
                got += k
            return view
        out = bytearray(n)
        out[:have] = self.view[self.start:self.end]
        self.start = self.end = 0
        got = have
        while got < n:
            k = self.sock.recv_into(self.view, self.CHUNK)
            if k == 0:
                raise EOFError(f"peer closed after {got} of {n} bytes")
            take = min(k, n - got)
            out[got:got + take] = self.view[:take]
            got += take
            self.start, self.end = take, k
        return out


class NbdServer:
    """Serve ``backend`` at ``address`` (``HOST:PORT`` or ``unix:PATH``) until :meth:`stop`."""

    def __init__(self, backend: ExportBackend, address: str, counters: DiskCounters,
                 name: str = "disk") -> None:
        self.backend = backend
        self.counters = counters
        self.name = name
        self._kind, where = parse_export_address(address)
        if self._kind == "unix":
            assert isinstance(where, str)
            if os.path.exists(where):
                os.unlink(where)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(where)
            self.uri = f"nbd+unix:///?socket={where}"
            self._unix_path: str | None = where
        else:
            host, port = where  # type: ignore[misc]
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            port = self._listener.getsockname()[1]
            self.uri = f"nbd://{host}:{port}"
            self._unix_path = None
        self.address = address
        self._listener.listen(16)
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        #: the connections in their transmission phase (set_backend waits for them)
        self._sessions: set[_Connection] = set()
        #: bumped by set_backend: a connection whose link is older takes a new one
        self.backend_version = 0
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"nbd-{name}-accept",
                                          daemon=True)

    @property
    def port(self) -> int | None:
        return None if self._kind == "unix" else self._listener.getsockname()[1]

    def start(self) -> NbdServer:
        self._acceptor.start()
        log.info("%s: NBD export of %d bytes at %s", self.name, self.backend.size, self.uri)
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._conns_lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        if self._unix_path and os.path.exists(self._unix_path):
            os.unlink(self._unix_path)

    def set_backend(self, backend: ExportBackend, name: str | None = None) -> None:
        """Serve ``backend`` from now on, on the open connections too: the export does not
        close, so a guest's disk stays attached while its host changes role (the survivor
        of a failover: the SVM's export becomes the primary's). Each open connection takes
        a link of the new backend before its next request (once nothing it sent is in
        flight); this returns once no request is being handled by an old link any more.
        Both backends must describe the same export (size, block size). (A connection
        with writes in flight on its old link finishes them there before it swaps.)"""
        if (backend.size, backend.block_size) != (self.backend.size, self.backend.block_size):
            raise ValueError(f"{self.name}: a new backend of {backend.size} bytes in blocks "
                             f"of {backend.block_size} for an export of {self.backend.size} "
                             f"in blocks of {self.backend.block_size}")
        with self._conns_lock:
            self.backend = backend
            self.backend_version += 1
            self.name = name or self.name
            sessions = list(self._sessions)
        for conn in sessions:
            conn.wait_relinked()
        log.info("%s: the export is served by a new backend (%d open connections)",
                 self.name, len(sessions))

    # -- accepting -------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            if self._kind == "tcp":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                 name=f"nbd-{self.name}-conn")
            with self._conns_lock:
                self._conns.add(conn)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        link = None
        try:
            session = self._handshake(conn)
            if session is None:
                return
            with self._conns_lock:
                version, link = self.backend_version, self.backend.connect()
                served = _Connection(self, conn, link, session, version)
                self._sessions.add(served)
            try:
                served.run()
            finally:
                with self._conns_lock:
                    self._sessions.discard(served)
                link = served.link
        except (EOFError, ConnectionError) as e:
            if not self._stopping.is_set():
                log.info("%s: client %s disconnected mid-request: %s", self.name, peer, e)
                self.counters.add("client_disconnects")
        except P.NbdProtocolError as e:
            log.warning("%s: client %s broke the protocol: %s", self.name, peer, e)
            self.counters.add("bad_requests")
        except OSError as e:
            if not self._stopping.is_set():
                log.warning("%s: connection %s failed: %s", self.name, peer, e)
        finally:
            if link is not None:
                link.close()
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    # -- handshake -------------------------------------------------------
    def _handshake(self, conn: socket.socket) -> _Session | None:
        """Fixed-newstyle negotiation: what was negotiated once the client entered
        transmission, None if it went away."""
        conn.sendall(P.NBDMAGIC + P.IHAVEOPT.to_bytes(8, "big")
                     + (P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES).to_bytes(2, "big"))
        client_flags = int.from_bytes(_recv_exact(conn, 4), "big")
        if not client_flags & P.CLIENT_FLAG_FIXED_NEWSTYLE:
            raise P.NbdProtocolError(f"client flags {client_flags:#x}: not fixed newstyle")
        no_zeroes = bool(client_flags & P.CLIENT_FLAG_NO_ZEROES)
        b = self.backend
        session = _Session()
        while True:
            magic, option, length = P.OPTION_HEADER.unpack(_recv_exact(conn, P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise P.NbdProtocolError(f"option magic {magic:#x} is not IHAVEOPT")
            if length > 65536:
                raise P.NbdProtocolError(f"option {option} data of {length} bytes is too long")
            data = bytes(_recv_exact(conn, length))
            if option == P.OPT_EXPORT_NAME:
                reply = b.size.to_bytes(8, "big") + P.TRANSMISSION_FLAGS.to_bytes(2, "big")
                conn.sendall(reply if no_zeroes else reply + bytes(124))
                return session
            if option == P.OPT_ABORT:
                conn.sendall(P.option_reply(option, P.REP_ACK))
                return None
            if option == P.OPT_LIST:
                conn.sendall(P.option_reply(option, P.REP_SERVER, (0).to_bytes(4, "big"))
                             + P.option_reply(option, P.REP_ACK))
                continue
            if option in (P.OPT_INFO, P.OPT_GO):
                if not _info_request_ok(data):
                    conn.sendall(P.option_reply(option, P.REP_ERR_INVALID,
                                                b"malformed INFO/GO request"))
                    continue
                # Block size info is always sent: clients that asked honour it, others
                # get EINVAL on misaligned requests (counted as bad requests).
                conn.sendall(P.option_reply(option, P.REP_INFO, P.info_export(b.size))
                             + P.option_reply(option, P.REP_INFO, P.info_block_size(
                                 b.block_size, b.block_size, b.max_request))
                             + P.option_reply(option, P.REP_ACK))
                if option == P.OPT_GO:
                    return session
                continue
            if option == P.OPT_STRUCTURED_REPLY:
                if data:
                    conn.sendall(P.option_reply(option, P.REP_ERR_INVALID,
                                                b"STRUCTURED_REPLY carries no data"))
                else:
                    session.structured = True
                    conn.sendall(P.option_reply(option, P.REP_ACK))
                continue
            if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                conn.sendall(self._meta_context(option, data, session))
                continue
            # STARTTLS, extended headers and anything newer: not offered
            conn.sendall(P.option_reply(option, P.REP_ERR_UNSUP))

    @staticmethod
    def _meta_context(option: int, data: bytes, session: _Session) -> bytes:
        """The replies to LIST_META_CONTEXT / SET_META_CONTEXT (SET replaces the selection)."""
        if not session.structured:
            return P.option_reply(option, P.REP_ERR_INVALID,
                                  b"meta contexts need structured replies first")
        try:
            queries = P.meta_context_queries(data)
        except ValueError as e:
            return P.option_reply(option, P.REP_ERR_INVALID, str(e).encode())
        listing = option == P.OPT_LIST_META_CONTEXT
        names = _match_contexts(queries, listing)
        if not listing:
            session.contexts = {P.BASE_ALLOCATION_ID: n for n in names}
        return b"".join(P.meta_context_reply(option, 0 if listing else P.BASE_ALLOCATION_ID, n)
                        for n in names) + P.option_reply(option, P.REP_ACK)


class _Connection:
    """The transmission phase of one client."""

    def __init__(self, server: NbdServer, conn: socket.socket, link: ExportLink,
                 session: _Session, version: int = 0) -> None:
        self.server = server
        self.session = session
        self.sock = conn
        self.reader = _BufferedReader(conn)
        self.link = link
        self.version = version        # the server's backend_version ``link`` belongs to
        #: held while a turn of the loop handles requests and completions (set_backend
        #: waits on it); a swap of the link happens under it too
        self.busy = threading.Lock()
        self.counters = server.counters
        b = server.backend
        self.size, self.block, self.max_request, self.window = (
            b.size, b.block_size, b.max_request, b.window)
        self._poller: zmq.Poller | None = None
        self._polled: list = []     # what _poller polls of the link's poll_items
        # replies of one burst go out in one sendmsg (a send per reply wakes the client
        # once per request and cost more than the request itself)
        self._out: list = []
        self._out_bytes = 0
        # counted per burst, not per request (each count takes the counters' lock)
        self._counts = dict.fromkeys(("writes", "write_bytes", "reads", "read_bytes"), 0)

    def _send(self, *parts) -> None:
        """Queue reply bytes; sent by :meth:`_flush` (at once when much is queued)."""
        self._out += parts
        n = self._out_bytes
        for part in parts:       # (a loop: sum() over a generator cost more per reply)
            n += len(part)
        self._out_bytes = n
        if n >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._out:
            out, self._out, self._out_bytes = self._out, [], 0
            _send_parts(self.sock, out)
        for name, n in self._counts.items():
            if n:
                self.counters.add(name, n)
                self._counts[name] = 0

    def run(self) -> None:
        try:
            self._run()
        finally:
            try:
                self._flush()
            except OSError:
                pass  # the client is gone: nobody to tell

    def wait_relinked(self) -> None:
        """Return once this connection handles no request through a link older than the
        server's backend (it swaps at its next turn; an idle one is handling none)."""
        with self.busy:
            pass

    def _relink(self) -> None:
        """Take a link of the server's current backend (called under ``busy``, with
        nothing in flight on the old link)."""
        server = self.server
        with server._conns_lock:
            version, backend = server.backend_version, server.backend
        old = self.link
        for item in self._polled:
            self._poller.unregister(item)
        self.link = backend.connect()
        self.version = version
        self.window = backend.window
        self._polled = list(self.link.poll_items)
        for item in self._polled:
            self._poller.register(item, zmq.POLLIN)
        old.close()
        self.counters.add("relinks")

    def _repoll(self) -> None:
        """The link changed what it is polled on (a new forwarding socket for a new
        session, PrimaryLink._send_outbox): poll that from now on."""
        for item in self._polled:
            if item not in self.link.poll_items:
                self._poller.unregister(item)
        for item in self.link.poll_items:
            if item not in self._polled:
                self._poller.register(item, zmq.POLLIN)
        self._polled = list(self.link.poll_items)

    def _run(self) -> None:
        poller = self._poller = zmq.Poller()
        fd = self.sock.fileno()
        poller.register(fd, zmq.POLLIN)
        reading = True
        self._polled = list(self.link.poll_items)
        for item in self._polled:
            poller.register(item, zmq.POLLIN)
        while True:
            if self.link.poll_items != self._polled:
                self._repoll()
            # requests already in our read buffer count as readable: never poll on them
            pending_input = reading and self.reader.buffered > 0
            timeout = 0 if pending_input else 100 if self.link.inflight else 1000
            events = dict(poller.poll(timeout))
            with self.busy:
                if not self._turn(events, fd, pending_input, reading):
                    return
                want_read = self.link.inflight < self.window
            if want_read != reading:
                if want_read:
                    poller.register(fd, zmq.POLLIN)
                else:
                    poller.unregister(fd)
                    self.counters.add("forward_stalls")
                reading = want_read

    def _turn(self, events: dict, fd: int, pending_input: bool, reading: bool) -> bool:
        """One turn of the loop: completions, then the requests that arrived; False once
        the client said goodbye."""
        if self.version != self.server.backend_version and not self.link.inflight:
            self._relink()
        if self.link.inflight:
            done = self.link.completions(time.monotonic_ns())
            if done:   # one _send for the turn's replies
                simple = P.simple_reply
                self._send(*[self._reply(c, e) if e else simple(c) for c, e in done])
        if reading and (fd in events or pending_input):
            # handle every request already received before polling again
            more = self._one_request()
            while more and self.reader.buffered and self.link.inflight < self.window \
                    and not self.link.outbox_full:
                more = self._one_request()
            self.link.end_of_burst()
            if not more:
                self._flush()
                self._drain(self._poller)
                return False
        self._flush()
        return True

    def _drain(self, poller: zmq.Poller) -> None:
        """The client said goodbye (DISC or EOF): answer what is still in flight first, as
        the protocol asks (bounded by the forward timeout, after which writes fail)."""
        while self.link.inflight:
            poller.poll(100)
            done = self.link.completions(time.monotonic_ns())
            if done:
                try:
                    _send_parts(self.sock, [self._reply(c, e) for c, e in done])
                except OSError:
                    pass  # a client that closed its end cannot hear them; keep accounting

    def _check(self, name: str, offset: int, length: int) -> None:
        """Bounds, alignment and size of one request; raises NbdError naming what is wrong."""
        if length == 0:
            raise P.NbdError(P.EINVAL, f"{name} of 0 bytes at {offset}")
        if offset + length > self.size:
            raise P.NbdError(P.EINVAL, f"{name} [{offset}, +{length}) beyond the export "
                                       f"size {self.size}")
        if offset % self.block or length % self.block:
            raise P.NbdError(P.EINVAL, f"{name} [{offset}, +{length}) not aligned to the "
                                       f"block size {self.block}")

    def _reply(self, cookie: int, error: int = 0, message: str = "") -> bytes:
        """The reply to a request without data: simple, or an error chunk carrying the
        reason when structured replies were negotiated."""
        if error and self.session.structured:
            return P.error_chunk(cookie, error, message or
                                 "the write failed: see the disk stage's log")
        return P.simple_reply(cookie, error)

    def _refuse(self, cookie: int, err: P.NbdError, counter: str = "bad_requests") -> None:
        log.warning("%s: refused: %s", self.server.name, err)
        self.counters.add(counter)
        self._send(self._reply(cookie, err.error, str(err)))

    def _one_request(self) -> bool:
        """Handle one request; False when the client ended the session."""
        try:
            header = self.reader.read(P.REQUEST.size)
        except EOFError as e:
            if "after 0 of" in str(e):
                return False  # closed between requests: a plain (if impolite) goodbye
            raise
        magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(header)
        if magic != P.REQUEST_MAGIC:
            raise P.NbdProtocolError(f"request magic {magic:#x} (cmd {cmd}, offset {offset})")
        payload = None
        if cmd == P.CMD_WRITE:
            if length > self.max_request:
                self._discard(length)  # keep the stream in step; refused below
            else:
                payload = self.reader.read(length)
        try:
            return self._dispatch(cmd, flags, cookie, offset, length, payload)
        except P.NbdError as e:
            self._refuse(cookie, e)
        except _BackendIOError as e:
            self._refuse(cookie, P.NbdError(P.EIO, str(e)), counter="io_errors")
        return True

    def _dispatch(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
                  payload: bytearray | None) -> bool:
        fua = bool(flags & P.CMD_FLAG_FUA)
        if cmd == P.CMD_WRITE and length <= self.max_request:
            # the common request first, without the checks' calls when it is well formed
            # (the same checks and errors as below)
            if not length or offset + length > self.size or offset % self.block \
                    or length % self.block:
                self._check("WRITE", offset, length)
            try:
                done = self.link.write(cookie, offset, payload, fua)
            except OSError as e:
                raise _BackendIOError(f"WRITE [{offset}, +{length}): {e}") from e
            counts = self._counts
            counts["writes"] += 1
            counts["write_bytes"] += length
            if done:
                self._send(P.simple_reply(cookie))
            return True
        name = P.CMD_NAMES.get(cmd) or f"command {cmd}"
        if cmd in (P.CMD_READ, P.CMD_WRITE) and length > self.max_request:
            raise P.NbdError(P.EOVERFLOW, f"{name} of {length} bytes exceeds the maximum "
                                          f"request {self.max_request}")
        if cmd == P.CMD_WRITE:
            self._check(name, offset, length)
            done = _io(name, offset, length, self.link.write, cookie, offset, payload, fua)
            self._counts["writes"] += 1
            self._counts["write_bytes"] += length
            if done:
                self._send(P.simple_reply(cookie))
        elif cmd == P.CMD_READ:
            self._check(name, offset, length)
            data = _io(name, offset, length, self.link.read, offset, length)
            head = P.data_chunk_header(cookie, offset, length) if self.session.structured \
                else P.simple_reply(cookie)
            self._send(head, data)
            self._counts["reads"] += 1
            self._counts["read_bytes"] += length
        elif cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
            self._check(name, offset, length)
            # TRIM is served as zeroing so both replicas read back the same bytes
            keep = cmd == P.CMD_WRITE_ZEROES and bool(flags & P.CMD_FLAG_NO_HOLE)
            done = _io(name, offset, length, self.link.zero, cookie, offset, length, fua, keep)
            self._counts["writes"] += 1
            self._counts["write_bytes"] += length
            if done:
                self._send(P.simple_reply(cookie))
        elif cmd == P.CMD_FLUSH:
            _io(name, offset, length, self.link.flush)
            self.counters.add("flushes")
            self._send(P.simple_reply(cookie))
        elif cmd == P.CMD_BLOCK_STATUS:
            if not self.session.contexts:
                raise P.NbdError(P.EINVAL, "BLOCK_STATUS without a metadata context (the "
                                           "client selected none)")
            self._check(name, offset, length)
            runs = block_runs(_io(name, offset, length, self.link.block_status, offset,
                                  length), self.block)
            extents = [(e - s, 0 if allocated else P.STATE_HOLE | P.STATE_ZERO)
                       for s, e, allocated in runs]
            if flags & P.CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            self._send(*(P.block_status_chunk(cookie, cid, extents)
                         for cid in self.session.contexts))
            self.counters.add("block_status")
        elif cmd == P.CMD_DISC:
            return False
        else:
            raise P.NbdError(P.EINVAL, f"{name} is not supported by this export")
        return True

    def _discard(self, length: int) -> None:
        """Read and drop an oversized payload so the stream stays in step."""
        while length:
            length -= len(self.reader.read(min(length, 1 << 20)))
