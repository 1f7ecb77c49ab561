"""A guest write forwarded into a connection to a secondary that is gone unnoticed (issue 11).

The fault matrix's partition rows failed about 1 run in 25 before 62cda24 with "writes up
to seq 732 were sealed, seen only up to 722": after the partition healed and a new
secondary was re-protected, a guest write never reached it. The mechanism this test shows:
during a partition the primary's forwarding connections stay ESTABLISHED (no FIN or RST
gets through), and the old secondary process goes away behind them. ZeroMQ does not know
the connection is dead until TCP's next retransmit after the heal draws an RST, seconds
later (exponential backoff). The re-protection's initial sync makes a socket of its own, so
its BEGIN reaches the new secondary; but an NBD connection that kept its forwarding socket
writes the new session's first forwards into the dead connection, which swallows them, and
ZeroMQ never sends them again: the new secondary's first commit waits for writes it will
never see.

The partition is a TCP relay in front of the secondary's forward address (a fault device,
like the fault matrix's TUN forwarder: the primary's sockets and ZeroMQ are real): once
told, it keeps every connection it has open towards the primary but swallows what comes
in (a black hole, what a partitioned peer that is gone looks like from this side), and
passes new connections to whatever is bound at the address now (a secondary host replaced
at the same address: the old connections die only once a retransmit reaches the new
host's kernel and draws an RST, seconds later). No timing: the test waits for events
(connections made, the write answered).
"""
from __future__ import annotations

import selectors
import socket
import threading

from conftest import wait_until
from test_disk_replication import BS, SIZE, file_hash

from pipeline.disk.nbd_client import NbdClient
from pipeline.disk.settings import DiskSettings
from pipeline.stages.disk import PrimaryDisk, SecondaryDisk


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (a bind as ZeroMQ's, SO_REUSEADDR, would work):
    binding it again right after a ZeroMQ socket's close() failed 5 times in 30 here."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class BlackHoleRelay(threading.Thread):
    """127.0.0.1:``port`` -> ``upstream``. :meth:`hole`: the connections open now are held
    towards the client and swallow its bytes (``swallowed``), their upstream side closed.
    ``accepted``: connections so far."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(name="black-hole-relay", daemon=True)
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self.peer: dict[socket.socket, socket.socket | None] = {}   # down <-> up, both ways
        self.held: set[socket.socket] = set()                        # client sides held
        self.accepted = self.swallowed = 0
        self.lock = threading.Lock()
        self.commands: list = []
        self.wake_r, self.wake_w = socket.socketpair()
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        self.stopping = False

    # -- called from the test: run in the relay's thread ---------------------------------
    def _do(self, fn) -> None:
        done = threading.Event()
        with self.lock:
            self.commands.append((fn, done))
        self.wake_w.send(b"x")
        assert done.wait(30), "the relay did not run a command"

    def hole(self) -> None:
        def held():
            for down in [s for s, up in self.peer.items() if s not in self.held
                         and self._is_down(s)]:
                self.held.add(down)
                up = self.peer.get(down)
                if up is not None:
                    self._drop(up)
                    self.peer[down] = None
        self._do(held)

    def stop(self) -> None:
        self.stopping = True
        self.wake_w.send(b"x")
        self.join(10)
        for s in list(self.peer):
            s.close()
        for s in (self.listener, self.wake_r, self.wake_w):
            s.close()

    # -- the relay's thread ---------------------------------------------------------------
    def _is_down(self, s: socket.socket) -> bool:
        return self.sel.get_key(s).data[0] == "down"

    def _drop(self, s: socket.socket) -> None:
        other = self.peer.pop(s, None)
        if other is not None and other in self.peer:
            self.peer[other] = None
        try:
            self.sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()

    def run(self) -> None:
        while not self.stopping:
            for key, _ev in self.sel.select(1.0):
                kind, _ = key.data
                s = key.fileobj
                if kind == "wake":
                    s.recv(64)
                    with self.lock:
                        todo, self.commands = self.commands, []
                    for fn, done in todo:
                        fn()
                        done.set()
                elif kind == "accept":
                    down, _addr = s.accept()
                    self.accepted += 1
                    try:
                        up = socket.create_connection(("127.0.0.1", self.upstream_port), 5)
                    except OSError:       # nothing bound there now: the client tries again
                        down.close()
                        continue
                    self.peer[down], self.peer[up] = up, down
                    self.sel.register(down, selectors.EVENT_READ, ("down", None))
                    self.sel.register(up, selectors.EVENT_READ, ("up", None))
                elif s in self.peer:
                    try:
                        data = s.recv(1 << 16)
                    except OSError:
                        data = b""
                    if s in self.held:
                        self.swallowed += len(data)   # (EOF too: the client's close is moot)
                        if not data:
                            self.held.discard(s)
                            self._drop(s)
                        continue
                    other = self.peer.get(s)
                    if not data or other is None:
                        if other is not None:
                            self._drop(other)
                        self._drop(s)
                        continue
                    other.sendall(data)


def test_a_new_sessions_first_forward_never_goes_into_a_connection_to_a_gone_secondary(
        tmp_path):
    """The guest writes on one NBD connection; the link to the secondary is cut (the relay
    holds the primary's connections and swallows what comes in) and the secondary is lost;
    the primary runs unprotected; a new secondary binds the same address and is
    re-protected (its initial sync on a new connection). The same guest connection writes
    again: that write and the epoch's seal must reach the new secondary, and its first
    commit must cover the write. Before 62cda24 the link kept its socket: the write went
    into the held connection (the relay counted its bytes) and the commit failed with
    "writes up to seq N were sealed, seen only up to N-1", the fault matrix's partition
    failure; until the seal socket was made anew for a new session too, the seal went
    into one: "the primary never sealed epoch 2"."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    settings = dict(export_size=SIZE, block_size=BS, compare="off")
    sec = SecondaryDisk(DiskSettings(image=str(b), export=f"unix:{tmp_path}/s1.sock",
                                     forward="tcp://127.0.0.1:*", **settings))
    port = int(sec.forward_endpoint.rsplit(":", 1)[1])
    relay = BlackHoleRelay(port)
    relay.start()
    pri = PrimaryDisk(DiskSettings(image=str(a), export=f"unix:{tmp_path}/p.sock",
                                   forward=f"tcp://127.0.0.1:{relay.port}", **settings))
    guest = NbdClient(pri.uri, timeout=60)
    sec2 = None
    try:
        assert pri.backend.wait_synced(30)
        guest.write(0, b"\x01" * BS)        # the link's socket is connected (through the relay)
        pri.backend.set_epoch(2)
        sec.commit(1)
        relay.hole()                        # the partition: nothing reaches the secondary
        sec.close()                         # ... which is lost behind it
        pri.on_event("role", 2, {"role": "unprotected"})
        wait_until(lambda: port_free(port), timeout=60, what="the lost secondary's "
                   "listener closed (ZeroMQ closes it in its I/O thread, after close())")
        sec2 = SecondaryDisk(DiskSettings(image=str(b), export=f"unix:{tmp_path}/s2.sock",
                                          forward=f"tcp://127.0.0.1:{port}", **settings))
        before = relay.accepted
        pri.on_event("role", 2, {"role": "primary"})   # re-protection: a new initial sync
        assert pri.backend.wait_synced(30)
        wait_until(lambda: relay.accepted > before, timeout=60,
                   what="the new initial sync connecting to the new secondary")
        swallowed = relay.swallowed
        guest.write(2 * BS, b"\x03" * BS)   # the same guest connection, the new session
        # before 62cda24 it went into the held connection (the commit below then failed
        # with the partition rows' "writes up to seq 14 were sealed, seen only up to 13")
        assert relay.swallowed == swallowed, "the new session's write went into the old " \
            "connection"
        # the held connections stay held (no retransmit has drawn an RST yet): the seal
        # must not go into one either (before the seal socket was made anew for a new
        # session: "the primary never sealed epoch 2")
        pri.backend.set_epoch(3)
        sec2.commit(2)
        assert file_hash(str(a)) == file_hash(str(b))
        assert sec2.counters.snapshot()["received"] >= 1
    finally:
        guest.close()
        pri.close()
        if sec2 is not None:
            sec2.close()
        relay.stop()
