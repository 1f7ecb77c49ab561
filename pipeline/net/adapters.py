"""Frame adapters: they move frames and nothing else (no comparison logic here).

Every adapter is a :class:`FrameSource`, a :class:`FrameSink`, or both:

* :class:`StreamEndpoint` — ``tcp:HOST:PORT`` / ``unix:PATH``: listens like QEMU's
  ``server=on`` chardev, accepts one peer, speaks QEMU's socket framing.
* :class:`PacketSocket` — ``packet:IFNAME``: AF_PACKET on an interface (read and inject).
* :class:`PcapReader` / :class:`PcapWriter` — ``pcap:PATH``: replay from / record to a file.
* :class:`StreamClient` — the other end of a :class:`StreamEndpoint` (tests, the demo, tools).
"""
from __future__ import annotations

import abc
import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable

from pipeline.net.framing import LENGTH_WORD, Frame, FrameDecoder, encode_frame
from pipeline.net.settings import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

#: read at most this much per recv() call so one busy source cannot starve the others
READ_CHUNK = 1 << 20
PACKET_OUTGOING = 4
SOCKET_BUFFER = 4 << 20
ETH_P_ALL = 0x0003


class FrameSource(abc.ABC):
    @abc.abstractmethod
    def fileno(self) -> int | None:
        """A descriptor that becomes readable when frames may be waiting (None: always ready)."""

    @abc.abstractmethod
    def recv(self, timeout: float = 0.0) -> list[Frame]:
        """The frames available now, waiting up to ``timeout`` seconds for the first."""

    def close(self) -> None:
        pass


class FrameSink(abc.ABC):
    @abc.abstractmethod
    def send(self, frame: bytes, vnet_hdr_len: int = 0) -> None:
        """Queue one frame for sending (see :meth:`flush`)."""

    def flush(self) -> None:
        """Push out what :meth:`send` queued."""

    def close(self) -> None:
        pass


def _wait_readable(fd: int | None, timeout: float) -> bool:
    if fd is None:
        return True
    return bool(select.select([fd], [], [], timeout)[0])


def parse_address(address: str) -> tuple[str, object]:
    """``tcp:HOST:PORT`` -> ("tcp", (host, port)); ``unix:PATH`` -> ("unix", path); ..."""
    kind, _, rest = address.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad TCP address {address!r}: want tcp:HOST:PORT")
        return kind, (host or "0.0.0.0", int(port))
    if kind in ("unix", "packet", "pcap") and rest:
        return kind, rest
    raise ValueError(f"bad address {address!r}: want tcp:HOST:PORT, unix:PATH, "
                     "packet:IFNAME or pcap:PATH")


class StreamEndpoint(FrameSource, FrameSink):
    """A listening stream socket with at most one peer, in QEMU's socket framing.
    When the peer goes away the endpoint listens again (like a ``server=on`` chardev)."""

    #: bumped whenever any endpoint's peer comes or goes (pollers watch this to re-plan)
    peer_changes = 0

    def __init__(self, address: str, vnet_hdr: bool = False, name: str = "",
                 on_malformed: Callable[[str], None] | None = None,
                 max_frame: int = MAX_FRAME_BYTES, vnet_hdr_in: bool | None = None) -> None:
        kind, where = parse_address(address)
        if kind not in ("tcp", "unix"):
            raise ValueError(f"{name or 'stream'}: {address!r} is not a tcp: or unix: address")
        self.address, self.name, self.vnet_hdr = address, name or address, vnet_hdr
        self._vnet_hdr_in = vnet_hdr if vnet_hdr_in is None else vnet_hdr_in
        self._max_frame = max_frame
        self._on_malformed = on_malformed
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        if kind == "tcp":
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            try:
                os.unlink(where)
            except FileNotFoundError:
                pass
        self._unix_path = where if kind == "unix" else None
        self._listener.bind(where)
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._peer: socket.socket | None = None
        self._decoder = self._new_decoder()
        self._out = bytearray()
        #: frames sent while no peer was connected (they are dropped, as QEMU does)
        self.dropped_unconnected = 0
        #: counts the peers accepted (recv_bytes users restart their framing when it changes)
        self.generation = 0
        #: what every read goes into (made at the first read). Python's recv(n) allocates an
        #: n-byte object per call, even when nothing is waiting: for a 4 MiB read that is an
        #: mmap and a munmap, ~25 us a call (10x the read of one frame), paid twice per frame
        #: pair by a comparator that is not saturated.
        self._scratch: memoryview | None = None

    def _new_decoder(self) -> FrameDecoder:
        return FrameDecoder(self._vnet_hdr_in, self._max_frame, self._on_malformed)

    @property
    def connected(self) -> bool:
        return self._peer is not None

    @property
    def boundaries(self) -> int:
        """Epoch boundaries read so far (see :mod:`pipeline.net.framing`)."""
        return self._decoder.boundaries

    def accept_pending(self) -> bool:
        """Take the waiting peer, if there is one and none is connected yet."""
        if self._peer is not None:
            return True
        return self._accept()

    def _accept(self) -> bool:
        try:
            peer, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        peer.setblocking(True)
        # room for bursts: a peer that reads in big gulps should not stall the loop's sendall
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        if peer.family == socket.AF_INET:
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._peer = peer
        self._decoder = self._new_decoder()
        self.generation += 1
        StreamEndpoint.peer_changes += 1
        log.info("%s: peer connected", self.name)
        return True

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._peer is None and time.monotonic() < deadline:
            if _wait_readable(self._listener.fileno(), max(0.0, deadline - time.monotonic())):
                self._accept()
        return self._peer is not None

    def fileno(self) -> int:
        return (self._peer or self._listener).fileno()

    def _lost(self, why: str) -> None:
        log.info("%s: peer gone (%s); listening again", self.name, why)
        if self._peer is not None:
            self._peer.close()
        self._peer = None
        self._out.clear()
        StreamEndpoint.peer_changes += 1

    def recv(self, timeout: float = 0.0) -> list[Frame]:
        if timeout and not _wait_readable(self.fileno(), timeout):
            return []
        if self._peer is None:
            self._accept()
            return []
        data = self._read(READ_CHUNK)
        return self._decoder.feed(data) if data else []   # feed() copies what it keeps

    def recv_bytes(self) -> memoryview | bytes:
        """The stream's bytes available now, undecoded (the caller frames them; see
        :attr:`generation`). Valid until the next read from this endpoint: copy what must
        outlive it."""
        if self._peer is None:
            self._accept()
            return b""
        # a whole socket buffer at once: the comparator compares what comes as runs
        return self._read(SOCKET_BUFFER)

    def scratch(self) -> memoryview:
        """The buffer every read goes into (SOCKET_BUFFER bytes, made once)."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SOCKET_BUFFER))
        return self._scratch

    def read_result(self, n: int) -> memoryview | bytes:
        """What a read done elsewhere into :meth:`scratch` (pipeline.net.native) returned:
        ``n`` bytes, 0 at end of stream, -errno. Its bytes as :meth:`recv_bytes` would have
        returned them (the peer is dropped at end of stream or on an error)."""
        if n > 0:
            return self._scratch[:n]
        if n == 0:
            self._lost("end of stream")
        elif -n not in (errno.EAGAIN, errno.EINTR):
            self._lost(os.strerror(-n))
        return b""

    @property
    def queued(self) -> bool:
        """Bytes wait to be sent (flush sends them)."""
        return bool(self._out)

    def sent_partly(self, data, sent: int) -> None:
        """A write of ``data`` done elsewhere (pipeline.net.native) took ``sent`` bytes
        (-errno: none): the rest is queued, as :meth:`send_framed` queues what its first
        send left (the peer is dropped on an error other than a full socket)."""
        if sent < 0:
            if -sent not in (errno.EAGAIN, errno.EINTR):
                self._lost(os.strerror(-sent))
                return
            sent = 0
        self._out += data[sent:]

    def _read(self, limit: int) -> memoryview | bytes:
        """Up to ``limit`` bytes from the peer into the endpoint's scratch buffer (a view of
        it, valid until the next read; empty when nothing waits or the peer went away)."""
        scratch = self.scratch()
        try:
            n = self._peer.recv_into(scratch, limit, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            self._lost(str(exc))
            return b""
        if not n:
            self._lost("end of stream")
            return b""
        return scratch[:n]

    def send_framed(self, data: bytes) -> None:
        """Frames already in this endpoint's framing (a run released in one piece; ``data``
        may be a memoryview valid during the call only)."""
        if self._peer is None and not self._accept():
            self.dropped_unconnected += 1
            return
        if not self._out:
            try:   # straight to the socket when nothing waits before it (no copy)
                sent = self._peer.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._lost(str(exc))
                return
            data = data[sent:]
        self._out += data
        if len(self._out) >= READ_CHUNK:
            self.flush()

    def send(self, frame: bytes, vnet_hdr_len: int = 0) -> None:
        if self._peer is None and not self._accept():
            self.dropped_unconnected += 1
            return
        out = self._out
        out += LENGTH_WORD.pack(len(frame))
        if self.vnet_hdr:
            out += LENGTH_WORD.pack(vnet_hdr_len)
        out += frame
        if len(out) >= READ_CHUNK:
            self.flush()

    def send_raw(self, data: bytes) -> None:
        """Bytes with their framing already applied (the notify channel)."""
        if self._peer is None and not self._accept():
            self.dropped_unconnected += 1
            return
        self._out += data
        self.flush()

    def flush(self) -> None:
        if self._peer is None or not self._out:
            return
        try:
            self._peer.sendall(self._out)
        except OSError as exc:
            self._lost(str(exc))
        self._out.clear()

    def close(self) -> None:
        if self._peer is not None:
            self._peer.close()
            self._peer = None
        self._listener.close()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except FileNotFoundError:
                pass


class StreamClient:
    """Connects to a framed stream (ours or QEMU's chardev) to send and receive frames."""

    def __init__(self, address: str, vnet_hdr: bool = False, timeout: float = 5.0) -> None:
        kind, where = parse_address(address)
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                self.sock.connect(where)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise ConnectionError(f"nothing listens on {address!r}") from None
                time.sleep(0.02)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.vnet_hdr = vnet_hdr
        self._decoder = FrameDecoder(vnet_hdr)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes, vnet_hdr_len: int = 0) -> None:
        self.sock.sendall(encode_frame(frame, vnet_hdr_len, self.vnet_hdr))

    def send_many(self, frames: list[bytes], give_up: Callable[[], bool] | None = None) -> None:
        """Send ``frames``; blocks while the peer does not read (back-pressure). With
        ``give_up``, checked every 0.1 s while blocked: True abandons the rest."""
        self.send_bytes(b"".join(encode_frame(f, 0, self.vnet_hdr) for f in frames), give_up)

    def send_bytes(self, data: bytes, give_up: Callable[[], bool] | None = None) -> None:
        """Send bytes already framed (frames, epoch boundaries); see :meth:`send_many`."""
        if give_up is None:
            self.sock.sendall(data)
            return
        view, sent = memoryview(data), 0
        while sent < len(data):
            try:
                sent += self.sock.send(view[sent:], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if give_up():
                    return
                select.select([], [self.sock], [], 0.1)

    def recv(self, timeout: float = 0.0) -> list[Frame]:
        if not _wait_readable(self.sock.fileno(), timeout):
            return []
        data = self.sock.recv(READ_CHUNK)
        if not data:
            raise ConnectionError("peer closed the stream")
        return self._decoder.feed(data)

    def recv_until(self, count: int, timeout: float) -> list[Frame]:
        """Frames until ``count`` arrived or ``timeout`` seconds of silence... or total time."""
        out: list[Frame] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            out += self.recv(left)
        return out

    def close(self) -> None:
        self.sock.close()


SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
#: struct tpacket_auxdata: status, len, snaplen (u32); mac, net, vlan_tci, vlan_tpid (u16)
_AUXDATA = struct.Struct("=IIIHHHH")
_AUX_SPACE = socket.CMSG_SPACE(_AUXDATA.size)


class PacketSocket(FrameSource, FrameSink):
    """AF_PACKET on one interface: reads frames arriving on it, injects frames into it.
    Frames this host sends out of the interface (our own injections) are skipped.

    The kernel hands 802.1Q tags over beside the frame (PACKET_AUXDATA), not in it;
    they are put back into the frame so that comparison and re-injection see them.
    The interfaces must not leave checksums to offload (``ethtool -K IF tx off``)
    nor merge segments (``tso off gso off gro off``): frames are moved as read.
    """

    def __init__(self, ifname: str) -> None:
        self.name = ifname
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.sock.bind((ifname, 0))
        except OSError as exc:
            raise OSError(exc.errno, f"AF_PACKET on interface {ifname!r}: {exc.strerror}") from exc
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, timeout: float = 0.0) -> list[Frame]:
        if timeout and not _wait_readable(self.fileno(), timeout):
            return []
        out: list[Frame] = []
        for _ in range(1024):
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(65536, _AUX_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            for level, kind, aux in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(aux) >= _AUXDATA.size:
                    status, _, _, _, _, tci, tpid = _AUXDATA.unpack_from(aux)
                    if status & TP_STATUS_VLAN_VALID:
                        if not status & TP_STATUS_VLAN_TPID_VALID:
                            tpid = 0x8100
                        data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
            out.append((data, 0))
        return out

    def send(self, frame: bytes, vnet_hdr_len: int = 0) -> None:
        try:
            self.sock.send(frame[vnet_hdr_len:])
        except OSError as exc:
            if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                raise
            log.warning("%s: frame of %d bytes not sent: %s", self.name, len(frame), exc)

    def close(self) -> None:
        self.sock.close()


_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
               b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
LINKTYPE_ETHERNET = 1


class PcapReader(FrameSource):
    """Frames of a classic pcap file (Ethernet link type), then end of input."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
            raise ValueError(f"{path}: not a pcap file (magic {data[:4].hex()!r})")
        endian, _unit = _PCAP_MAGIC[data[:4]]
        linktype = struct.unpack_from(endian + "I", data, 20)[0]
        if linktype != LINKTYPE_ETHERNET:
            raise ValueError(f"{path}: link type {linktype} is not Ethernet (1)")
        self.frames: list[bytes] = []
        pos = 24
        record = struct.Struct(endian + "IIII")
        while pos + 16 <= len(data):
            _sec, _frac, caplen, _origlen = record.unpack_from(data, pos)
            pos += 16
            if pos + caplen > len(data):
                raise ValueError(f"{path}: record of {caplen} bytes at byte {pos - 16} "
                                 "runs past the end of the file")
            self.frames.append(data[pos:pos + caplen])
            pos += caplen
        self._next = 0

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self.frames)

    def fileno(self) -> None:
        return None

    def recv(self, timeout: float = 0.0) -> list[Frame]:
        batch = self.frames[self._next:self._next + 256]
        self._next += len(batch)
        return [(f, 0) for f in batch]


class PcapWriter(FrameSink):
    """Records frames to a classic pcap file (microsecond timestamps, Ethernet)."""

    def __init__(self, path: str) -> None:
        # held open for the writer's lifetime; close() closes it
        self._file = open(path, "wb")  # noqa: SIM115
        self._file.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535,
                                     LINKTYPE_ETHERNET))

    def send(self, frame: bytes, vnet_hdr_len: int = 0) -> None:
        frame = frame[vnet_hdr_len:]
        now = time.time()
        self._file.write(struct.pack("<IIII", int(now), int(now % 1 * 1e6), len(frame),
                                     len(frame)) + frame)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_pcap(path: str, frames: list[bytes]) -> None:
    """Write ``frames`` to a pcap file (tests and tools)."""
    writer = PcapWriter(path)
    for frame in frames:
        writer.send(frame)
    writer.close()
