"""A forwarded write of another session reaching a new secondary process (issue 11).

The primary's forwarding sockets queue what they could not deliver to a lost secondary;
ZeroMQ hands it to whichever process binds the address next. Such a write is another
session's: refused as such (ESTALE), harmless, the replication goes on. The fault matrix's
dev-shm-full@mid-run row once failed because one (seq 289 of epoch 24) reached the new
secondary with an epoch outside its session's window: refused as a "wrong epoch", it gave
the replication up, and the new secondary stopped at its first commit.

The secondary's disk stage runs in this process; the test is the primary's forwarding
link (a DEALER over tcp://127.0.0.1), so it sends exactly what a reconnecting socket
delivers, in the order that failed: no timing involved.
"""
from __future__ import annotations

import zmq
from test_disk_replication import BS, SIZE, file_hash

from pipeline.disk import wire
from pipeline.disk.settings import DiskSettings
from pipeline.stages.disk import SecondaryDisk

GENERATION = b"\x07" * 32


def _send(dealer, frames) -> list[tuple[int, int, str]]:
    dealer.send_multipart(frames)
    assert dealer.poll(10_000), "no answer from the secondary's receiver"
    return wire.decode_ack(dealer.recv_multipart())


def _secondary(tmp_path) -> tuple[SecondaryDisk, zmq.Socket]:
    sec = SecondaryDisk(DiskSettings(image=str(tmp_path / "secondary.img"),
                                     export=f"unix:{tmp_path}/s.sock",
                                     forward="tcp://127.0.0.1:*", export_size=SIZE,
                                     block_size=BS, compare="off"))
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(sec.forward_endpoint)
    return sec, dealer


def _session(tmp_path, old_first: bool) -> None:
    # an earlier life of this secondary's store: a session that committed epoch 3
    sec, dealer = _secondary(tmp_path)
    try:
        for kind, seq in ((wire.KIND_SYNC_BEGIN, 1), (wire.KIND_SYNC_END, 2)):
            ((_s, status, reason),) = _send(dealer, wire.encode_forward(
                kind, 3, seq, 0, 0, None,
                digest=GENERATION if kind == wire.KIND_SYNC_BEGIN else None))
            assert status == 0, reason
        dealer.send(wire.encode_seal(3, 2))
        sec.commit(3)
    finally:
        dealer.close(0)
        sec.close()
    # the new process on the same store; the old session's queued write: seq 3, epoch 2
    sec, dealer = _secondary(tmp_path)
    old = wire.encode_forward(wire.KIND_WRITE, 2, 3, 0, BS, b"O" * BS)
    try:
        if old_first:       # delivered before this process's first BEGIN: refused (its
            # epoch is below what the store committed); the BEGIN starts afresh all the same
            ((seq, status, reason),) = _send(dealer, old)
            assert (seq, status) == (3, wire.errno.ESTALE), reason
        # the new session: BEGIN at seq 10 of epoch 5 (the store's window starts there)
        ((_s, status, reason),) = _send(dealer, wire.encode_forward(
            wire.KIND_SYNC_BEGIN, 5, 10, 0, 0, None, digest=GENERATION))
        assert status == 0, reason
        if not old_first:   # delivered after it: seq 3 is before the BEGIN, epoch 2 too old
            ((seq, status, reason),) = _send(dealer, old)
            assert (seq, status) == (3, wire.errno.ESTALE) and "before this sync" in reason, \
                reason
        ((_s, status, reason),) = _send(dealer, wire.encode_forward(
            wire.KIND_SYNC_END, 5, 11, 0, 0, None))
        assert status == 0, reason
        ((seq, status, reason),) = _send(dealer, wire.encode_forward(
            wire.KIND_WRITE, 5, 12, BS, BS, b"N" * BS))
        assert (seq, status, reason) == (12, 0, ""), "the new session's write: " + reason
        dealer.send(wire.encode_seal(5, 12))
        sec.commit(5)       # the replication was not given up: the epoch commits
        assert sec.counters.snapshot()["given_up"] == 0
    finally:
        dealer.close(0)
        sec.close()
    with open(tmp_path / "secondary.img", "rb") as f:
        assert f.read(2 * BS) == bytes(BS) + b"N" * BS    # nothing of the old write


def test_an_old_sessions_write_after_the_begin_is_refused_as_such_not_given_up(tmp_path):
    _session(tmp_path, old_first=False)


def test_an_old_sessions_write_before_the_first_begin_leaves_the_new_session_whole(tmp_path):
    _session(tmp_path, old_first=True)


def _connections_to(port: int) -> int:
    """TCP connections of this host to 127.0.0.1:``port`` that a process still holds
    (ESTABLISHED, or CLOSE_WAIT: the peer closed, this side has not yet)."""
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if int(remote.split(":")[1], 16) == port and state in ("01", "08"):
                n += 1
    return n


def test_a_new_session_forwards_on_a_new_connection_and_never_delivers_the_old_queue(
        tmp_path):
    """The secondary is lost while the guest writes on one NBD connection: the write's
    forward waits in the connection's socket, queued for whoever binds the address next.
    The primary goes unprotected; a new secondary comes up on the same address and is
    re-protected. The same guest connection's next write goes on a new forwarding
    socket: the new secondary never sees the old session's write (neither refused nor
    buffered), only the new one, and the first commit leaves equal images. (On a socket
    kept from the old session, its queue was delivered to the new secondary; and a
    connection to a secondary that was gone without ZeroMQ having noticed swallowed what
    was written into it: the partition rows' "sealed up to 732, seen only up to 722".)"""
    import threading
    from conftest import wait_until

    from pipeline.disk.nbd_client import NbdClient
    from pipeline.stages.disk import PrimaryDisk
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    settings = dict(export_size=SIZE, block_size=BS, compare="off")
    sec = SecondaryDisk(DiskSettings(image=str(b), export=f"unix:{tmp_path}/s1.sock",
                                     forward="tcp://127.0.0.1:*", **settings))
    address = sec.forward_endpoint
    port = int(address.rsplit(":", 1)[1])
    pri = PrimaryDisk(DiskSettings(image=str(a), export=f"unix:{tmp_path}/p.sock",
                                   forward=address, **settings))
    guest = NbdClient(pri.uri, timeout=60)
    sec2 = None
    try:
        assert pri.backend.wait_synced(120)
        guest.write(0, b"\x01" * BS)
        pri.backend.set_epoch(2)
        sec.commit(1)
        sec.close()                                  # the secondary is lost
        wait_until(lambda: _connections_to(port) == 0, timeout=30,
                   what="the primary's sockets noticing the lost secondary")
        lost = threading.Thread(target=guest.write, args=(BS, b"\x02" * BS))
        lost.start()                                 # forwarded into the socket's queue
        wait_until(lambda: pri.backend._inflight.total() > 0, timeout=30,
                   what="the write forwarded to the lost secondary")
        pri.on_event("role", 2, {"role": "unprotected"})
        lost.join(30)                                # answered from the primary's image
        assert not lost.is_alive()
        from test_forward_black_hole import port_free   # (ZeroMQ closes a listener late)
        wait_until(lambda: port_free(port), timeout=60, what="the lost secondary's listener closed")
        sec2 = SecondaryDisk(DiskSettings(image=str(b), export=f"unix:{tmp_path}/s2.sock",
                                          forward=address, **settings))
        pri.on_event("role", 2, {"role": "primary"})  # re-protection
        assert pri.backend.wait_synced(120)
        guest.write(2 * BS, b"\x03" * BS)             # the same connection, a new session
        pri.backend.set_epoch(3)
        sec2.commit(2)
        assert file_hash(str(a)) == file_hash(str(b))
        assert pri.counters["forward_reconnects"] >= 1
        assert sec2.counters["bad_forwards"] == 0, "the old session's write was delivered"
        assert sec2.counters["received"] == 1, "the old session's write was delivered"
    finally:
        guest.close()
        pri.close()
        if sec2 is not None:
            sec2.close()
