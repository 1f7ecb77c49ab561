"""ZeroMQ's PUSH/PULL wire protocol (ZMTP 3.0, the NULL mechanism) on a unix stream
socket, both ends written by the calling thread: what libzmq speaks on an ``ipc://``
endpoint without CURVE, so either end pairs with a libzmq socket of the other kind.

Why not libzmq itself: a libzmq socket hands every message to its I/O thread, which wakes
to read or write it and then wakes the thread that uses the socket. On the request path
of a protected service (one message per request, two shared CPUs) each of those is a
wake-up and a hop more per request:

* :class:`ZmtpPush`, the benchmark's client (``pipeline.service_client``): ~28 us of CPU
  and one wake-up less per request on the CPUs it shares with the nodes it measures;
* :class:`ZmtpPull`, the client stage's ``client-inputs.sock``
  (``pipeline.stages.inputs.run_client``): the request is read by the stage's own thread
  in the wait it sleeps in anyway, instead of by its I/O thread, which then woke the
  stage. Any ZeroMQ PUSH socket connects to it as to libzmq's PULL (the demo, tests,
  ``localpair.inject_input``, the fault matrix's client, reconnecting across failovers).

Greeting (64 bytes): signature ``ff 00*8 7f``, version 3.0, mechanism ``NULL``, as-server
0, filler; then each side's READY command with its ``Socket-Type``. Frames: a flags byte
(bit 0 more, bit 1 long, bit 2 command), a size (1 byte, or 8 big-endian when long), the
body. A PUSH socket never receives, so a PULL end only reads messages (and ignores the
commands ZMTP allows after the handshake, such as PING)."""
from __future__ import annotations

import os
import socket
import time
from collections import deque

SIGNATURE = b"\xff" + bytes(8) + b"\x7f"
GREETING_SIZE = 64
#: a frame's flags
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
#: the longest message a PULL end takes (a request of the sim service is a few dozen
#: bytes; the guest's input log takes 2 KiB per input): a longer frame is a broken or
#: hostile peer, not a request
MAX_MESSAGE = 1 << 20


def greeting(as_server: bool = False) -> bytes:
    return (SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes([int(as_server)])
            + bytes(31))


def command(name: bytes, props: dict[bytes, bytes]) -> bytes:
    """A short command frame (READY and its properties)."""
    body = bytes([len(name)]) + name + b"".join(
        bytes([len(k)]) + k + len(v).to_bytes(4, "big") + v for k, v in props.items())
    return bytes([COMMAND, len(body)]) + body


def check_greeting(peer: bytes, address: str) -> None:
    """ConnectionError naming ``address`` unless ``peer`` is a ZMTP 3 NULL greeting."""
    if peer[:1] != b"\xff" or peer[9:10] != b"\x7f" or peer[10] < 3 \
            or peer[12:32].rstrip(b"\x00") != b"NULL":
        raise ConnectionError(f"{address} did not send a ZMTP 3 NULL greeting (got "
                              f"{peer[:16]!r}...)")


def parse_command(body: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """A command frame's body: its name and properties (ValueError if it does not add up)."""
    if not body or 1 + body[0] > len(body):
        raise ValueError(f"a command frame of {len(body)} bytes has no name")
    name, at, props = body[1:1 + body[0]], 1 + body[0], {}
    while at < len(body):
        k = body[at + 1:at + 1 + body[at]]
        at += 1 + body[at]
        if at + 4 > len(body):
            raise ValueError(f"command {name!r}: property {k!r} is cut short")
        vlen = int.from_bytes(body[at:at + 4], "big")
        if at + 4 + vlen > len(body):
            raise ValueError(f"command {name!r}: property {k!r} is cut short")
        props[k] = body[at + 4:at + 4 + vlen]
        at += 4 + vlen
    return name, props


def connect_stream(address: str, timeout: float = 60.0) -> socket.socket:
    """A non-blocking connection to a released-output stream (``unix:PATH``, a bare path,
    or ``tcp:HOST:PORT``), retried until ``timeout`` while nothing listens there."""
    from pipeline.net.adapters import parse_address
    kind, where = parse_address(address if address.startswith(("unix:", "tcp:"))
                                else "unix:" + address)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_INET if kind == "tcp" else socket.AF_UNIX,
                             socket.SOCK_STREAM)
        try:
            sock.connect(where)
            sock.setblocking(False)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ZmtpPush:
    """The sending end of a PUSH/PULL connection over ``ipc://PATH`` (the peer: libzmq's
    PULL or :class:`ZmtpPull`). No reconnection: a connection that breaks raises (the
    benchmark's client stops with an error then), so ``ServiceClient`` uses this only when
    asked (``direct``). A send never blocks: what the socket does not take yet is kept
    (``pending``) and goes out first at the next :meth:`send` or :meth:`flush`, as a PUSH
    socket queues up to its high-water mark (a client blocked in a send would stop reading
    the answers the service waits to hand it out, and the service, backed up, would stop
    taking requests)."""

    SIGNATURE = SIGNATURE

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        if not address.startswith("ipc://"):
            raise ValueError(f"ZmtpPush: {address!r} is not an ipc:// endpoint")
        self.address = address
        self.sock = connect_stream(address[len("ipc://"):], timeout)
        self.sock.setblocking(True)
        self.sock.settimeout(timeout)
        try:
            # greeting, then READY, in one write
            self.sock.sendall(greeting() + command(b"READY", {b"Socket-Type": b"PUSH"}))
            try:
                check_greeting(self._read(GREETING_SIZE), address)
            except ConnectionError as exc:
                raise ConnectionError(f"ZmtpPush: {exc}") from None
            name, props = self._read_command()
            if name != b"READY" or props.get(b"Socket-Type") != b"PULL":
                raise ConnectionError(f"ZmtpPush: {address} is not a PULL socket "
                                      f"(command {name!r}, properties {props!r})")
        except OSError as exc:
            self.sock.close()
            if isinstance(exc, ConnectionError) and str(exc).startswith("ZmtpPush"):
                raise
            raise ConnectionError(f"ZmtpPush: the ZMTP handshake with {address} failed "
                                  f"({exc}): is it a ZeroMQ PULL socket?") from None
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.pending = bytearray()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"ZmtpPush: {self.address} closed the connection during "
                                      "the handshake (a ZeroMQ socket closes it unless it "
                                      "is a PULL one)")
            data += chunk
        return data

    def _read_command(self) -> tuple[bytes, dict[bytes, bytes]]:
        flags = self._read(1)[0]
        if not flags & COMMAND:
            raise ConnectionError(f"ZmtpPush: expected a command frame, got flags {flags:#x}")
        size = int.from_bytes(self._read(8 if flags & LONG else 1), "big")
        try:
            return parse_command(self._read(size))
        except ValueError as exc:
            raise ConnectionError(f"ZmtpPush: {self.address}: {exc}") from None

    def send(self, msg: bytes) -> None:
        """Queue one single-frame message (a short or a long frame) and send what the
        socket takes now."""
        n = len(msg)
        self.pending += (bytes([0x00, n]) if n < 256 else bytes([LONG]) + n.to_bytes(8, "big"))
        self.pending += msg
        self.flush()

    def flush(self) -> None:
        """Send as much of what is queued as the socket takes now."""
        while self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                return
            del self.pending[:sent]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class _Peer:
    """One PUSH end connected to a :class:`ZmtpPull`: what it sent and was not parsed yet."""

    __slots__ = ("sock", "buf", "greeted", "ready")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.greeted = False     # its greeting was read and checked
        self.ready = False       # its READY was read: messages come next


class ZmtpPull:
    """The receiving end of PUSH connections, bound at ``ipc://PATH``: read by the
    calling thread, in its own poll (:meth:`poll_items`, then :meth:`take_ready` with what
    the poll found readable), never by a thread of its own; :meth:`recv` hands out what
    was read, one message at a time, in the order each peer sent them. Each frame of a
    multipart message is a message (what libzmq's ``recv`` returns, one per call).

    A peer that is not a ZMTP 3 PUSH end, or sends a malformed or oversized frame, is
    disconnected with ``errors`` counted and its reason in ``last_error`` (``on_error``
    is called with it); its messages before that stay delivered. Reading only while
    nothing read is waiting (the caller polls only once it took every message) bounds
    what is held here to one read per peer; the rest waits in the socket, and a pushing
    peer feels back-pressure as from a PULL socket at its high-water mark."""

    def __init__(self, address: str, on_error=None, backlog: int = 64) -> None:
        if not address.startswith("ipc://"):
            raise ValueError(f"ZmtpPull: {address!r} is not an ipc:// endpoint")
        self.address = address
        self.path = address[len("ipc://"):]
        try:
            os.unlink(self.path)         # a stale endpoint of a node before (as libzmq does)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(self.path)
            self.listener.listen(backlog)
            self.listener.setblocking(False)
        except BaseException:
            self.listener.close()
            raise
        self.peers: dict[int, _Peer] = {}
        self.messages: deque[bytes] = deque()
        self.on_error = on_error
        self.errors = 0
        self.last_error = ""
        #: changes whenever the descriptors to poll change (a poll list made once per value)
        self.generation = 0

    # -- the caller's poll -----------------------------------------------------------------
    def poll_items(self) -> list[tuple[int, int]]:
        """(fd, POLLIN) of the listening socket and of every peer, for zmq_poll/select."""
        return [(self.listener.fileno(), 1)] + [(fd, 1) for fd in self.peers]

    def take_ready(self, fds) -> None:
        """Accept and read what the poll found readable among :meth:`poll_items`' fds."""
        for fd in fds:
            if fd == self.listener.fileno():
                self._accept()
            else:
                peer = self.peers.get(fd)
                if peer is not None:
                    self._read(fd, peer)

    def recv(self) -> bytes | None:
        """The next message read, or None (then poll)."""
        return self.messages.popleft() if self.messages else None

    # -- inside ----------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            try:
                # our whole greeting and READY at once: a fresh socket's buffer takes them
                sock.send(greeting(as_server=True) + command(b"READY",
                                                             {b"Socket-Type": b"PULL"}))
            except OSError:
                sock.close()             # gone already
                continue
            self.peers[sock.fileno()] = _Peer(sock)
            self.generation += 1

    def _drop(self, fd: int, why: str = "") -> None:
        peer = self.peers.pop(fd)
        peer.sock.close()
        self.generation += 1
        if why:
            self.errors += 1
            self.last_error = f"{self.address}: a peer was disconnected: {why}"
            if self.on_error is not None:
                self.on_error(self.last_error)

    def _read(self, fd: int, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(fd, f"read failed: {exc}")
            return
        if not data:
            self._drop(fd)                # the peer closed: its partial frame goes with it
            return
        if peer.ready and not peer.buf:
            # the common case, a request per read: whole short message frames, taken from
            # the read itself (no copy into the peer's buffer and out again)
            at, n = 0, len(data)
            while at + 2 <= n and data[at] == 0 and at + 2 + data[at + 1] <= n:
                self.messages.append(data[at + 2:at + 2 + data[at + 1]])
                at += 2 + data[at + 1]
            if at == n:
                return
            data = data[at:]
        peer.buf += data
        try:
            self._parse(peer)
        except ValueError as exc:
            self._drop(fd, str(exc))

    def _parse(self, peer: _Peer) -> None:
        buf = peer.buf
        at = 0
        try:
            if not peer.greeted:
                if len(buf) < GREETING_SIZE:
                    if buf[:1] not in (b"", b"\xff"):
                        raise ValueError(f"not a ZMTP peer (it began with {bytes(buf[:16])!r})")
                    return
                try:
                    check_greeting(bytes(buf[:GREETING_SIZE]), "the peer")
                except ConnectionError as exc:
                    raise ValueError(str(exc)) from None
                peer.greeted, at = True, GREETING_SIZE
            while True:
                if len(buf) - at < 2:
                    return
                flags = buf[at]
                if flags & ~(MORE | LONG | COMMAND):
                    raise ValueError(f"a frame with reserved flags {flags:#x}")
                if flags & LONG:
                    if len(buf) - at < 9:
                        return
                    size, head = int.from_bytes(buf[at + 1:at + 9], "big"), 9
                else:
                    size, head = buf[at + 1], 2
                if size > MAX_MESSAGE:
                    raise ValueError(f"a frame of {size} bytes (at most {MAX_MESSAGE})")
                if len(buf) - at < head + size:
                    return
                body = bytes(buf[at + head:at + head + size])
                at += head + size
                if flags & COMMAND:
                    name, props = parse_command(body)
                    if not peer.ready:
                        if name != b"READY" or props.get(b"Socket-Type") != b"PUSH":
                            raise ValueError(f"it is not a PUSH socket (command {name!r}, "
                                             f"properties {props!r})")
                        peer.ready = True
                    continue            # (PING and the like: nothing a PULL end answers)
                if not peer.ready:
                    raise ValueError("a message before its READY")
                self.messages.append(body)
        finally:
            del buf[:at]

    def close(self) -> None:
        for fd in list(self.peers):
            self._drop(fd)
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
