"""Bad input and faults against a real secondary node.

The secondary is the real thing (``colo-pipeline secondary`` in its own process tree,
sim guest, ZeroMQ sockets). The primary is driven by hand from the test, through the
same wire encoders and page encoder the real primary uses, so that it can send what
a real primary never would: corrupt pages, truncated and unknown records, records of
an old epoch, and half an epoch before vanishing.

After every fault the secondary must be at its last committed checkpoint: a
follow-up epoch that carries no pages and asks for a full-memory digest must report
exactly the digest of the last committed state.
"""
from __future__ import annotations

import hashlib
import random
import time

import blake3
import numpy as np
import pytest
import zmq
from conftest import free_port, wait_until

from pipeline import config, sockets, wire
from pipeline.disk.nbd_client import NbdClient
from pipeline.localpair import LocalPair
from pipeline.stages.common import HashTable
from pipeline.stages.digest import encode_batch
from pipeline.xen_io.sim import WorkloadSpec, open_sim_domain

pytestmark = pytest.mark.slow  # starts real node processes

PAGES = 1024
BATCH = 16


class HandPrimary:
    """A primary driven step by step by the test."""

    def __init__(self, pair: LocalPair, dom, first_epoch: int = 0,
                 keep_last_words: bool = False) -> None:
        settings = config.load(pair.configs["primary"])
        self.nctx = sockets.NodeContext(settings)     # the primary's CURVE keys
        if keep_last_words:
            # the node's control socket queues only for a connected peer (ZMQ_IMMEDIATE),
            # and so also drops what a secondary sent just before it stopped if it was not
            # read yet; this one keeps it, for a test that reads a stopping node's last ACK
            self.control = self.nctx.socket(zmq.DEALER, 1000, bind=False)
            self.control.setsockopt(zmq.IMMEDIATE, 0)
            self.control.connect(sockets._endpoint(settings, "control"))
        else:
            self.control = sockets.control(self.nctx)
        self.pages = sockets.pages_out(self.nctx)
        self.dom = dom
        self.table = HashTable(np.zeros((PAGES, 32), np.uint8), np.zeros(PAGES, bool))
        self.epoch = first_epoch

    def close(self) -> None:
        self.nctx.close()

    def recv(self, rtype: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.control.poll(100):
                msg = self.control.recv()
                if wire.decode_header(msg).type == rtype:
                    return msg
        raise AssertionError(f"no {wire.RECORD_NAMES[rtype]} from the secondary in {timeout} s")

    def hello(self) -> None:
        # the control socket queues only for a connected peer (ZMQ_IMMEDIATE) and a send
        # gives up after 200 ms: wait for the CURVE handshake to finish (POLLOUT), however
        # long a loaded machine takes, instead of hoping it is done by now
        assert self.control.poll(30_000, zmq.POLLOUT), \
            "the secondary's control socket never connected"
        # the pages socket is a separate connection with its own handshake (PUSH, also
        # IMMEDIATE): on a loaded machine it can still be connecting when the control
        # socket is done, and the first PAGES record would fail with EAGAIN
        assert self.pages.poll(30_000, zmq.POLLOUT), \
            "the secondary's pages socket never connected"
        self.control.send(wire.encode_hello(4096, wire.ROLE_PRIMARY, PAGES, "hand-primary"))
        hello = wire.decode_hello(self.recv(wire.HELLO))
        assert (hello.page_count, hello.page_size) == (PAGES, 4096)

    def records(self, epoch: int, pfns: np.ndarray,
                compress: bool = True) -> tuple[list[bytes], list, list]:
        """PAGES records of the PVM's current content of ``pfns``, made like the real
        digest stage makes them (zero / ref / lz4 / raw; no lz4 unless ``compress``)."""
        msgs, hashes_all = [], []
        data = np.empty((len(pfns), 4096), np.uint8)
        self.dom.read_pages(pfns, data)
        for start in range(0, len(pfns), BATCH):
            chunk = pfns[start:start + BATCH]
            n = len(chunk)
            h = np.zeros((n, 32), np.uint8)
            ln = np.zeros(n, np.uint32)
            kind = np.zeros(n, np.uint8)
            out = np.zeros(n * 4096, np.uint8)
            used, packed, _ = encode_batch(chunk, data[start:start + n], self.table, h, ln,
                                           kind, out, compress)
            msgs.append(wire.encode_pages(epoch, chunk, h, ln, kind, out[:used],
                                          wire.PAGES_PACKED if packed else 0))
            hashes_all.append(h)
        return msgs, [pfns], hashes_all

    def checkpoint(self, pfns: np.ndarray, flags: int = 0, mutate=None, extra=(),
                   vanish_after: int | None = None, compress: bool = True) -> wire.Ack | None:
        e = self.epoch
        self.epoch += 1
        self.control.send(wire.encode_checkpoint_begin(e, 0, flags))
        wire.decode_svm_dirty(self.recv(wire.SVM_DIRTY), PAGES)   # validated, not used
        vcpu = b"" if flags & wire.FLAG_SYNC else self.dom.get_vcpu_state()
        msgs, _, hashes = self.records(e, pfns, compress)
        if mutate is not None:
            msgs = mutate(msgs)
        for m in list(extra) + msgs[:vanish_after]:
            self.pages.send(m)
        if vanish_after is not None:
            return None
        self.pages.send(wire.encode_epoch_end(e, len(pfns), len(msgs),
                                              flags & wire.FLAG_SYNC, vcpu))
        ack = wire.decode_ack(self.recv(wire.ACK, timeout=20))
        assert ack.epoch == e
        if ack.status == wire.ACK_COMMITTED and len(pfns):
            self.table.update(pfns, np.concatenate(hashes))
        return ack

    def probe(self) -> bytes:
        """An epoch with no pages that asks for the SVM's full-memory digest."""
        ack = self.checkpoint(np.zeros(0, np.uint64), wire.FLAG_DIGEST)
        assert ack.status == wire.ACK_COMMITTED, ack.reason
        return ack.memory_digest

    def dirty_some(self, pages: int) -> np.ndarray:
        """Let the PVM write ``pages`` pages; returns its dirty set (PVM paused again)."""
        seq = self.dom.feed_input(self.dom.write_command(pages))
        self.dom.resume()
        deadline = time.monotonic() + 10
        while self.dom.input_seq() <= seq:
            assert time.monotonic() < deadline, "the PVM did not consume its input"
            time.sleep(0.002)
        self.dom.pause()
        return self.dom.read_and_clear_dirty()


def hand_pvm(pair: LocalPair):
    """The hand primary's PVM: a paused sim guest with dirty logging on, once the pair's
    secondary node is up (``pair.node`` waits for it)."""
    pair.node("secondary")
    dom = open_sim_domain("hand-pvm", PAGES, WorkloadSpec(seed=7), dirty_log="bitmap")
    dom.start(paused=True)
    dom.enable_dirty_log()
    return dom


def close_hand_pair(pair: LocalPair, dom, prim: "HandPrimary | None" = None) -> None:
    """The end of a hand-driven pair: the hand primary's sockets, its PVM, the secondary
    node, which must have exited cleanly."""
    if prim is not None:
        prim.close()
    dom.close()
    codes = pair.stop()
    assert codes["secondary"] == 0, pair.log_tail("secondary")


def committed_pair(pair, dom) -> tuple[HandPrimary, bytes]:
    """Handshake, full sync, first checkpoint: returns the primary and the committed digest."""
    prim = HandPrimary(pair, dom)
    prim.hello()
    ack = prim.checkpoint(np.arange(PAGES, dtype=np.uint64), wire.FLAG_SYNC)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    ack = prim.checkpoint(prim.dirty_some(40), wire.FLAG_DIGEST)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    assert ack.memory_digest == dom.memory_digest()
    return prim, ack.memory_digest


def counters(pair) -> dict:
    return pair.node("secondary").snapshot()["stages"]


def _flip_data_byte(msgs: list[bytes]) -> list[bytes]:
    """Flip one byte of the first page that carries data (RAW or LZ4)."""
    for i, m in enumerate(msgs):
        b = wire.decode_pages(m, PAGES, 4096, BATCH)
        if len(b.data):
            raw = bytearray(m)
            raw[len(m) - len(b.data) + 100 % len(b.data)] ^= 0x5A
            return msgs[:i] + [bytes(raw)] + msgs[i + 1:]
    raise AssertionError("no page with data in this epoch")


def test_corrupt_page_discards_the_epoch_whole(secondary):
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    dirty = prim.dirty_some(64)
    ack = prim.checkpoint(dirty, mutate=_flip_data_byte)
    assert ack.status == wire.ACK_ABORTED
    assert "blake3" in ack.reason or "lz4" in ack.reason or "verification" in ack.reason
    assert prim.probe() == committed        # nothing of the torn epoch was applied
    st = counters(pair)
    assert sum(st[f"verify.{i}"]["errors"] for i in range(2)) >= 1
    assert st["restore"]["epochs_aborted"] >= 1
    # the primary sends the torn epoch's pages again: now the SVM matches the PVM
    ack = prim.checkpoint(dirty, wire.FLAG_DIGEST)
    assert ack.status == wire.ACK_COMMITTED and ack.memory_digest == dom.memory_digest()
    prim.close()
    assert "bad page batch" in pair.log_tail("secondary", 20000)


def _flip_every_raw_page(msgs: list[bytes]) -> list[bytes]:
    """Flip one byte of every page of the first record whose pages go raw (no lz4)."""
    for i, m in enumerate(msgs):
        b = wire.decode_pages(m, PAGES, 4096, BATCH)
        if len(b.data) and not b.packed and not (b.enc_kind == wire.ENC_LZ4).any():
            raw = bytearray(m)
            at = len(m) - len(b.data)
            for page in range(len(b.data) // 4096):
                raw[at + page * 4096 + 100] ^= 0x5A
            return msgs[:i] + [bytes(raw)] + msgs[i + 1:]
    raise AssertionError("no raw page in this epoch")


@pytest.mark.parametrize("secondary", ["sample"], indirect=True)
def test_a_corrupt_raw_batch_checked_by_the_receive_stage_tears_the_epoch(secondary):
    """Raw batches skip the verify workers unless every page is re-hashed: the receive
    stage checks them itself (one page each here) and hands them straight to restore. A
    batch whose pages all differ from their hashes is caught there, and the epoch torn."""
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    dirty = prim.dirty_some(64)

    def verified() -> int:
        return sum(counters(pair)[f"verify.{i}"]["items_in"] for i in range(2))
    before = verified()
    ack = prim.checkpoint(dirty, mutate=_flip_every_raw_page, compress=False)
    assert ack.status == wire.ACK_ABORTED
    assert "verification" in ack.reason
    assert prim.probe() == committed        # nothing of the torn epoch was applied
    st = counters(pair)
    assert st["receive"]["errors"] >= 1
    assert verified() == before             # no batch went through the verify workers
    ack = prim.checkpoint(dirty, wire.FLAG_DIGEST, compress=False)
    assert ack.status == wire.ACK_COMMITTED and ack.memory_digest == dom.memory_digest()
    prim.close()


def test_truncated_and_unknown_records_are_dropped_and_counted(secondary):
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    dirty = prim.dirty_some(64)
    ack = prim.checkpoint(dirty, mutate=lambda msgs: [msgs[0][:len(msgs[0]) // 2]] + msgs[1:])
    assert ack.status == wire.ACK_ABORTED and "announced" in ack.reason
    assert prim.probe() == committed
    before = counters(pair)["receive"]["errors"]
    assert before >= 1
    unknown = wire._record(0x0042, prim.epoch, b"\0" * 16)   # unknown mandatory type
    garbage = b"\xde\xad\xbe\xef" * 10
    ack = prim.checkpoint(dirty, wire.FLAG_DIGEST, extra=[unknown, garbage])
    assert ack.status == wire.ACK_COMMITTED and ack.memory_digest == dom.memory_digest()
    assert counters(pair)["receive"]["errors"] == before + 2
    prim.close()
    log = pair.log_tail("secondary", 20000)
    assert "unknown mandatory record type 0x0042" in log and "bad marker" in log


def test_a_shutdown_with_a_body_is_refused_and_counted_not_obeyed(secondary):
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    before = counters(pair)["coordinator"]["errors"]
    prim.control.send(wire._record(wire.SHUTDOWN, prim.epoch, b"\0" * 8))
    wait_until(lambda: counters(pair)["coordinator"]["errors"] == before + 1, 60,
               "the malformed SHUTDOWN counted")
    dirty = prim.dirty_some(16)
    ack = prim.checkpoint(dirty, wire.FLAG_DIGEST)     # still a secondary, not "peer stopped"
    assert ack.status == wire.ACK_COMMITTED and ack.memory_digest == dom.memory_digest()
    prim.close()
    assert "SHUTDOWN: body_length 8" in pair.log_tail("secondary", 20000)


def test_records_of_an_old_epoch_are_ignored(secondary):
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    old_epoch = prim.epoch - 1               # committed already
    dirty = prim.dirty_some(32)
    stale, _, _ = prim.records(old_epoch, np.arange(8, dtype=np.uint64))
    ack = prim.checkpoint(dirty, wire.FLAG_DIGEST, extra=stale)
    assert ack.status == wire.ACK_COMMITTED
    assert ack.memory_digest == dom.memory_digest()
    assert counters(pair)["restore"]["stale_records"] >= 1
    prim.close()


def test_a_bad_vcpu_blob_aborts_before_memory_changes(secondary):
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    dirty = prim.dirty_some(32)
    real = dom.get_vcpu_state
    dom.get_vcpu_state = lambda: b"\x01" * len(real())   # a blob the SVM must refuse
    try:
        ack = prim.checkpoint(dirty)
    finally:
        dom.get_vcpu_state = real
    assert ack.status == wire.ACK_ABORTED and "vCPU" in ack.reason
    assert prim.probe() == committed
    prim.close()


def test_primary_vanishing_mid_epoch_leaves_the_last_checkpoint(secondary):
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    dirty = prim.dirty_some(96)
    prim.checkpoint(dirty, vanish_after=2)   # BEGIN and two batches, then gone
    next_epoch = prim.epoch
    prim.close()
    # epoch_timeout_ms is 1.5 s: the secondary gives the epoch up and rolls back
    deadline = time.monotonic() + 15
    while counters(pair)["coordinator"]["epochs_aborted"] < 1:
        assert time.monotonic() < deadline, "the secondary never gave up the torn epoch"
        time.sleep(0.05)
    # a primary comes back (same guest): the SVM is exactly at the last commit
    prim = HandPrimary(pair, dom, first_epoch=next_epoch)
    prim.hello()
    assert prim.probe() == committed
    ack = prim.checkpoint(dirty, wire.FLAG_DIGEST)
    assert ack.status == wire.ACK_COMMITTED and ack.memory_digest == dom.memory_digest()
    prim.close()
    # torn either way, both named: the primary's close broke the pages connection (seen
    # at once) or, on a machine too loaded to see the drop first, the epoch timed out
    log = pair.log_tail("secondary", 20000)
    assert "the pages channel broke mid-epoch" in log or "epoch incomplete" in log, log


def _svm_epoch(prim: HandPrimary, claims: list[tuple[int, bytes]]) -> wire.Ack:
    """An epoch whose only pages are SVM pages: each (pfn, hash) says "the SVM holds this
    page, with this blake3"; the vCPU state is the PVM's, as in any checkpoint."""
    e = prim.epoch
    prim.epoch += 1
    prim.control.send(wire.encode_checkpoint_begin(e, 0, 0))
    wire.decode_svm_dirty(prim.recv(wire.SVM_DIRTY), PAGES)
    n = len(claims)
    pfns = np.array([p for p, _ in claims], np.uint64)
    hashes = np.frombuffer(b"".join(h for _, h in claims), np.uint8).reshape(n, 32)
    prim.pages.send(wire.encode_pages(e, pfns, hashes, np.zeros(n, np.uint32),
                                      np.full(n, wire.ENC_SVM, np.uint8), b""))
    prim.pages.send(wire.encode_epoch_end(e, n, 1, 0, prim.dom.get_vcpu_state()))
    ack = wire.decode_ack(prim.recv(wire.ACK, timeout=20))
    assert ack.epoch == e
    return ack


def test_an_svm_page_that_no_longer_matches_tears_the_epoch(secondary):
    """Issue 13, item 4: a page sent as SVM (the SVM holds it) is checked against the SVM's
    page when the epoch is applied. The hand primary claims the SVM holds, at a page the
    PVM just rewrote, the PVM's new content: the SVM's page there is the old one, as if it
    had been changed behind the pipeline's back since SVM_DIRTY hashed it. The epoch is
    refused whole and counted; a true claim next to it is not enough to save it."""
    pair, dom = secondary
    prim, committed = committed_pair(pair, dom)
    changed = prim.dirty_some(8)             # the PVM rewrites these; the SVM does not
    same = np.setdiff1d(np.arange(PAGES, dtype=np.uint64), changed)[:4]

    def pvm_hash(pfn) -> bytes:
        page = np.empty((1, 4096), np.uint8)
        dom.read_pages(np.array([pfn], np.uint64), page)
        return blake3.blake3(page).digest()
    false_claim = (int(changed[0]), pvm_hash(changed[0]))
    true_claims = [(int(p), pvm_hash(p)) for p in same]
    ack = _svm_epoch(prim, true_claims + [false_claim])
    assert ack.status == wire.ACK_ABORTED, ack
    assert "changed behind the pipeline's back" in ack.reason
    # the stage counts as it goes; the ACK can reach the test before the count is
    # published: wait for the count (the deadline only bounds a hang)
    wait_until(lambda: counters(pair)["restore"]["svm_refs_refused"] >= 1, 60,
               "the refused SVM claim counted")
    assert prim.probe() == committed         # nothing of the epoch was applied
    # true claims alone are applied: the SVM keeps its pages, as they were
    ack = _svm_epoch(prim, true_claims)
    assert ack.status == wire.ACK_COMMITTED, ack.reason
    # an early ACK (issue 13) comes before the restore stage finished the epoch
    wait_until(lambda: counters(pair)["restore"]["pages_same_as_svm"] >= len(true_claims),
               60, "the SVM's own pages counted")
    assert prim.probe() == committed
    prim.close()


def test_an_io_error_in_the_secondarys_disk_commit_is_retried(tmp_path):
    """The secondary's disk store fails one commit with EIO halfway through its writes
    (store.commit.record:30:errno=EIO). The commit is redone (idempotent, journalled), the
    pair stays protected, and after the last checkpoint memories and disks are equal.
    Before, the failed commit stopped the secondary node."""
    MiB = 1 << 20
    disk = {"export_size": 8 * MiB, "durable_commit": False,
            "forward": f"tcp://127.0.0.1:{free_port()}"}
    roles = {r: {"disk": {**disk, "image": f"{{workdir}}/{r}.img",
                          "export": f"unix:{{workdir}}/{r}.nbd"}} for r in ("primary", "secondary")}
    pair = LocalPair({"guest": {"backend": "sim", "page_count": 2048},
                      "checkpoint": {"max_interval_ms": 200, "epoch_timeout_ms": 30000}},
                     workdir=str(tmp_path), role_tables=roles)
    try:
        pair.start(faults={"secondary": "store.commit.record:30:errno=EIO"})
        pair.wait_protected()
        nbd = NbdClient(f"nbd+unix:///?socket={tmp_path}/primary.nbd")
        rng = random.Random(2)
        while not pair.fault_fired("secondary", "store.commit.record", 30):
            nbd.write(rng.randrange(0, 2000) * 4096, rng.randbytes(8192))
            pair.check_alive()
        nbd.close()
        # the fault fires in the disk stage; the coordinator logs the failed attempt after
        # the stage's reply reaches it: wait for that line, do not expect it already there
        wait_until(lambda: "event=disk_commit_failed attempt=1 of 3"
                   in pair.log_tail("secondary", 1 << 24), what="the retried disk commit")
        info = pair.prove_memory_equal()       # a checkpoint after the last disk write
        assert info["memory_equal"] is True
        assert pair.node("secondary").node_info()["state"] == "protected"
        hashes = [hashlib.sha256((tmp_path / f"{r}.img").read_bytes()).hexdigest()
                  for r in ("primary", "secondary")]
        assert hashes[0] == hashes[1]
    finally:
        pair.stop()
