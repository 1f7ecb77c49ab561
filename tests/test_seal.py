"""security.mode = "sealed" (issue 13): the pages channel without CURVE, each record's page
data, hashes and vCPU state sealed with AES-GCM by the stages that encode them.

The functions first, as the stages call them (a digest worker's ring slot sealed by
digest.seal_batch, sent as the send stage sends it, validated by wire.decode_pages as the
receive stage does, opened by verify.open_batch into staging): round trip, every kind of
tampering refused naming the record and field, nonces never repeated. Then two real
nodes whose pages channel runs through a relay in this process that parses the ZMTP
stream: every record on the wire is sealed, a flipped byte in a checkpoint's record is
refused, counted and tears that epoch, a record sent twice is refused by its place, and
the pair stays protected with equal memories.
"""
from __future__ import annotations

import socket
import struct

import lz4.block
import numpy as np
import pytest

from conftest import Relay, cli, shutdown_both, wait_until
from conftest import checkpoint_of_writes as conftest_checkpoint_of_writes

from pipeline import config, seal, wire
from pipeline.counters import STATUS_COMMITTED
from pipeline.localpair import LocalPair
from pipeline.ring import Ring, SlotLayout
from pipeline.shm import segment_prefix
from pipeline.sockets import write_keypair
from pipeline.stages import digest, verify
from pipeline.stages.common import SLOT_DATA

PAGE = 4096
BATCH = 64


def _keys(share_p: bytes | None = None, share_s: bytes | None = None) -> seal.SealKeys:
    keys = seal.SealKeys()
    keys.install(*seal.derive_key(share_p or bytes(32), share_s or bytes(range(32))))
    return keys


@pytest.fixture
def rings(node):
    """A digest-to-send slot (with the wire prefix the send stage uses) and a
    receive-to-verify slot, in real shared-memory rings."""
    layout = SlotLayout(batch_pages=BATCH, page_size=PAGE)
    made = [Ring.create(segment_prefix(node) + "out", 2,
                        SlotLayout(BATCH, PAGE, wire.pages_prefix_size(BATCH))),
            Ring.create(segment_prefix(node) + "in", 2, layout)]
    yield made
    for r in made:
        r.unlink()
        r.close()


def _pages(n: int, seed: int = 1) -> np.ndarray:
    """Text-like pages (lz4 packs them), some zero."""
    rng = np.random.default_rng(seed)
    words = np.frombuffer(b"the quick brown fox jumps over the lazy dog ", np.uint8)
    pages = np.resize(words, (n, PAGE)).copy()
    pages[:, :8] = rng.integers(0, 255, (n, 8), dtype=np.uint8)
    pages[::7] = 0
    return pages


def _seal(out_ring: Ring, sealer: seal.Sealer, epoch: int, pages: np.ndarray,
          compress: bool) -> bytes:
    """A digest worker's batch, sealed (digest.seal_batch), sent as the send stage sends
    it: the record's bytes."""
    n = len(pages)
    out = out_ring.acquire_write(1)
    out.reset(SLOT_DATA, epoch, n)
    out.pfns[:n] = np.arange(n, dtype=np.uint64) * 3
    plain = np.empty(BATCH * PAGE, np.uint8)
    nbytes, packed, _ = digest.encode_batch(out.pfns[:n], pages, None, out.hashes,
                                            out.enc_len, out.enc_kind, plain, compress)
    out.batch_flags = wire.PAGES_PACKED if packed else 0
    aad = np.empty(wire.pages_prefix_size(BATCH), np.uint8)
    out.data_len = digest.seal_batch(sealer, out, n, plain[:nbytes], aad)
    msg = wire.encode_pages(epoch, out.pfns[:n], out.hashes[:n], out.enc_len[:n],
                            out.enc_kind[:n], out.data_flat[:out.data_len], out.batch_flags)
    out_ring.commit_write(out)
    out_ring.release_read(out_ring.try_acquire_read())
    return msg


def _open(in_ring: Ring, opener: seal.Opener, msg: bytes,
          staging: np.ndarray) -> tuple[wire.PageBatch, str]:
    """The receive stage's validation and hand-off, then the verify worker's open and
    decode: (batch, '' or why it is bad)."""
    b = wire.decode_pages(msg, 1 << 20, PAGE, BATCH)
    n = b.count
    slot = in_ring.acquire_write(1)
    slot.reset(SLOT_DATA, b.epoch, n)
    slot.pfns[:n], slot.hashes[:n] = b.pfns, b.hashes
    slot.enc_len[:n], slot.enc_kind[:n] = b.enc_len, b.enc_kind
    slot.batch_flags = (wire.PAGES_PACKED if b.packed else 0) | wire.PAGES_SEALED
    slot.data_flat[:len(b.data)] = b.data
    slot.data_len = len(b.data)
    in_ring.commit_write(slot)
    slot = in_ring.try_acquire_read()
    try:
        rows = staging[:n]
        scratch = np.empty(BATCH * PAGE, np.uint8)
        aad = np.empty(wire.pages_prefix_size(BATCH), np.uint8)
        try:
            data = verify.open_batch(opener, slot, rows, scratch, aad, PAGE)
        except seal.SealError as exc:
            return b, str(exc)
        problem = verify.decode_batch(slot, rows, PAGE, "full", data, data is None)
        b.hashes = slot.hashes[:n].copy()
        return b, problem
    finally:
        in_ring.release_read(slot)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "packed"])
def test_a_sealed_batch_opens_to_its_pages_and_hashes(rings, compress):
    keys = _keys()
    pages = _pages(BATCH)
    pages[::7] = pages[1]           # no zero page: all raw, opened straight into staging
    if compress:
        pages = _pages(BATCH)
    msg = _seal(rings[0], seal.Sealer(keys, 1), 9, pages, compress)
    # on the wire: no hash in the clear, and the data is not the pages (nor compressible)
    b = wire.decode_pages(msg, 1 << 20, PAGE, BATCH)
    assert b.sealed is not None and b.sealed.sealer == 1 and b.sealed.index == 0
    assert not b.hashes.any()
    assert bytes(pages[1, 100:200]) not in msg
    assert len(lz4.block.compress(bytes(b.data), store_size=False)) > 0.99 * len(b.data)
    staging = np.zeros((BATCH, PAGE), np.uint8)
    got, problem = _open(rings[1], seal.Opener(keys), msg, staging)
    assert problem == ""
    assert np.array_equal(staging, pages)
    from pipeline.stages.common import hash_pages
    assert np.array_equal(got.hashes[pages.any(1)], hash_pages(pages)[pages.any(1)])


def _flip(msg: bytes, at: int) -> bytes:
    out = bytearray(msg)
    out[at] ^= 0x01
    return bytes(out)


def test_tampered_truncated_replayed_and_wrong_key_records_are_refused(rings):
    keys = _keys()
    sealer = seal.Sealer(keys, 0)
    pages = _pages(BATCH)
    msg = _seal(rings[0], sealer, 5, pages, compress=False)
    staging = np.zeros((BATCH, PAGE), np.uint8)
    n = BATCH
    pfns_at = wire.HEADER_SIZE + 8
    kinds_at = pfns_at + n * (8 + 32 + 4)
    data_at = len(msg) - (int(wire.decode_pages(msg, 1 << 20, PAGE, BATCH).data.size))
    places = {
        "epoch": 8, "pfn": pfns_at + 3, "enc_kind": kinds_at + 1,
        "seal key_id": data_at, "seal sealer": data_at + 4, "seal counter": data_at + 8,
        "seal index": data_at + 16, "hashes ciphertext": data_at + 24 + 5,
        "hashes tag": data_at + 24 + 32 * n + 3, "data ciphertext": len(msg) - 1000,
        "data tag": len(msg) - 1,
    }
    for what, at in places.items():
        try:
            _, problem = _open(rings[1], seal.Opener(keys), _flip(msg, at), staging)
        except wire.WireError as exc:       # the receive stage's validator refused it
            problem = str(exc)
        assert problem, f"a flipped bit in the {what} went through"
        assert problem.startswith("PAGES"), problem
    # cut short: the tag (and the length that says so) gone
    cut = msg[:-16]
    cut = cut[:16] + struct.pack("<I", len(cut) - wire.HEADER_SIZE) + cut[20:]
    with pytest.raises(wire.WireError, match="PAGES: .*data"):
        _open(rings[1], seal.Opener(keys), cut, staging)
    # another session's key: refused by its key id, before any decryption
    other = _keys(b"\1" * 32)
    _, problem = _open(rings[1], seal.Opener(other), msg, staging)
    assert "sealed under key id" in problem and "this session's" in problem
    # the same record again in its epoch: refused by its place (the receive stage's check)
    pos = wire.SealPosition()
    pos.check("PAGES", 5, wire.decode_pages(msg, 1 << 20, PAGE, BATCH).sealed)
    with pytest.raises(wire.SealRefused, match="seal index 0, expected 1.*replay"):
        pos.check("PAGES", 5, wire.decode_pages(msg, 1 << 20, PAGE, BATCH).sealed)
    # ... and into another epoch: its tag does not verify
    moved = msg[:8] + struct.pack("<Q", 6) + msg[16:]
    _, problem = _open(rings[1], seal.Opener(keys), moved, staging)
    assert "tag does not verify" in problem
    # a plaintext record where sealed ones are expected, and the reverse, for EPOCH_END
    plain_end = wire.encode_epoch_end(5, 64, 1, 0, b"vcpu")
    with pytest.raises(wire.SealRefused, match="EPOCH_END: flags say not sealed"):
        wire.decode_epoch_end(plain_end, seal.Opener(keys))
    sealed_end = wire.encode_epoch_end(5, 64, 1, 0, b"vcpu", seal.Sealer(keys, seal.SEND_SEALER))
    with pytest.raises(wire.SealRefused, match="EPOCH_END: flags say sealed"):
        wire.decode_epoch_end(sealed_end)
    assert bytes(b"vcpu") not in sealed_end
    pos = wire.SealPosition()
    end = wire.decode_epoch_end(sealed_end, seal.Opener(keys), pos)
    assert (end.vcpu, end.flags, end.pages) == (b"vcpu", 0, 64)
    with pytest.raises(wire.SealRefused, match="replay"):
        wire.decode_epoch_end(sealed_end, seal.Opener(keys), pos)
    fewer = sealed_end[:24] + struct.pack("<Q", 63) + sealed_end[32:]   # its page count
    with pytest.raises(wire.SealRefused, match="EPOCH_END vcpu: part 0: the tag does not"):
        wire.decode_epoch_end(fewer, seal.Opener(keys), wire.SealPosition())


def test_nonces_never_repeat_under_one_key_and_a_new_key_starts_afresh():
    keys = _keys()
    sealers = [seal.Sealer(keys, i) for i in (0, 1, seal.SEND_SEALER)]
    seen: set[tuple[int, int, int]] = set()
    buf = bytearray(1024)
    for epoch in range(50):
        for s in sealers:
            for _ in range(3 if s.sealer != seal.SEND_SEALER else 1):
                parts = [b"h" * 32, b"d" * 100] if s.sealer != seal.SEND_SEALER else [b"v"]
                s.seal(epoch, b"aad", parts, buf)
                h = seal.read_header(buf)
                for j in range(len(parts)):
                    nonce = (h.key_id, h.sealer, h.counter + j)
                    assert nonce not in seen
                    seen.add(nonce)
                assert h.key_id == keys.key_id()
    assert len(seen) == 50 * (3 * 2 * 2 + 1)
    # a new session: a new key id; the counters start again under it
    keys.install(*seal.derive_key(b"\2" * 32, b"\3" * 32))
    sealers[0].seal(50, b"aad", [b"x"], buf)
    h = seal.read_header(buf)
    assert h.counter == 0 and h.index == 0 and h.key_id == keys.key_id()
    assert h.key_id not in {k for k, _, _ in seen}


def test_the_key_comes_from_both_hellos_shares():
    a, b = seal.new_share(), seal.new_share()
    assert seal.derive_key(a, b) == seal.derive_key(a, b)
    assert seal.derive_key(a, b)[1] != seal.derive_key(a, seal.new_share())[1]
    assert seal.derive_key(a, b)[1] != seal.derive_key(seal.new_share(), b)[1]
    msg = wire.encode_hello(4096, wire.ROLE_PRIMARY, 100, "p", (), a)
    assert wire.decode_hello(msg).seal_share == a
    assert wire.decode_hello(wire.encode_hello(4096, wire.ROLE_PRIMARY, 100, "p")
                             ).seal_share is None
    keys = seal.SealKeys()
    assert keys.key_id() == seal.NO_KEY     # nothing agreed: refused by any receiver
    with pytest.raises(seal.SealError, match="none agreed yet"):
        seal.Opener(keys).check_key(seal.NO_KEY, "PAGES")


def test_sealed_mode_needs_the_curve_keys(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text("[security]\nmode = 'sealed'\n")
    r = cli("check-config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}:security.key_file:" in r.stderr and "sealed" in r.stderr
    assert "control channel is CURVE" in r.stderr
    write_keypair(str(tmp_path), "a")
    write_keypair(str(tmp_path), "b")
    cfg.write_text("[security]\nmode = 'sealed'\nkey_file = 'a.key_secret'\n"
                   "peer_public_key_file = 'b.key'\n")
    assert cli("check-config", str(cfg)).returncode == 0, r.stderr
    assert config.load(str(cfg)).security.mode == "sealed"


# -- two real nodes, the pages channel through a relay that reads it ---------------------
class PagesWire(Relay):
    """The relay of conftest, whose pages channel from the primary is cut into ZMTP frames
    (NULL mechanism: no CURVE on a sealed pages channel): each record's type, epoch and
    flags are noted; ``tamper`` flips one bit in the data of the next checkpoint PAGES
    record of 64 KiB or more, ``replay`` sends the next checkpoint PAGES record twice."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, int, float]] = []   # type, epoch, flags, lz4
        self.tamper = self.replay = False
        self.tampered: list[int] = []      # epochs
        self.replayed: list[int] = []
        super().__init__()

    def _pump(self, src: socket.socket, dst: socket.socket, pages: bool) -> None:
        if not pages:
            return super()._pump(src, dst, pages)
        buf, at, greeting = bytearray(), 0, 64
        try:
            while not self.stopped.is_set():
                data = src.recv(1 << 20)
                if not data:
                    break
                buf += data
                out = bytearray()
                if greeting:
                    take = min(greeting, len(buf))
                    out += buf[:take]
                    at, greeting = take, greeting - take
                while not greeting:
                    if len(buf) - at < 2:
                        break
                    flags = buf[at]
                    hl = 9 if flags & 2 else 2
                    if len(buf) - at < hl:
                        break
                    size = int.from_bytes(buf[at + 1:at + hl], "big") if flags & 2 \
                        else buf[at + 1]
                    if len(buf) - at < hl + size:
                        break
                    frame = bytearray(buf[at:at + hl + size])
                    at += hl + size
                    out += frame if flags & 4 else self._record(frame, hl)
                del buf[:at]
                at = 0
                dst.sendall(out)
        except OSError:
            pass
        finally:
            shutdown_both(src, dst)

    def _record(self, frame: bytearray, hl: int) -> bytes:
        body = memoryview(frame)[hl:]
        rtype, epoch = struct.unpack_from("<HQ", body, 6)
        flags = struct.unpack_from("<I", body, 28 if rtype == wire.PAGES else 40)[0]
        data_ratio = 0.0
        if rtype == wire.PAGES and len(body) > 65536:
            tail = bytes(body[-65536:])
            data_ratio = len(lz4.block.compress(tail, store_size=False)) / len(tail)
        self.records.append((rtype, epoch, flags, data_ratio))
        checkpoint = rtype == wire.PAGES and epoch > 0 and len(body) > 65536
        if checkpoint and self.tamper:
            self.tamper = False
            frame[len(frame) - 1000] ^= 0x04
            self.tampered.append(epoch)
        elif checkpoint and self.replay:
            self.replay = False
            self.replayed.append(epoch)
            return bytes(frame) * 2
        return bytes(frame)


def _sum(pair: LocalPair, stage: str, counter: str, n: int) -> int:
    return sum(pair.stage_counter(f"{stage}.{i}", counter, "secondary") for i in range(n))


@pytest.mark.slow
def test_two_nodes_sealed_a_tampered_record_tears_its_epoch_a_replay_is_refused(tmp_path):
    relay = PagesWire()
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": 4096},
        "guest.workload": {"seed": 11, "input_rate_hz": 0.0, "nondeterminism": 1.0},
        "pipeline": {"compress": "none"},
        "checkpoint": {"max_interval_ms": 3_600_000, "min_interval_ms": 0,
                       "epoch_timeout_ms": 300_000},
        # the heartbeats go through this test process's relay threads too
        "heartbeat": {"interval_ms": 100, "miss_count": 50},
        "security": {"mode": "sealed"},
    }, workdir=str(tmp_path), log_level="info",
        role_tables={"primary": {"peer": {"address": f"tcp://127.0.0.1:{relay.listen}"}}})
    relay.target = pair.port

    def checkpoint_of_writes(pages: int) -> None:
        conftest_checkpoint_of_writes(pair, pages)

    try:
        with pair:
            pair.start()
            pair.wait_protected(timeout=300)
            checkpoint_of_writes(600)
            # every record on the wire was sealed; its data does not compress (the sim's
            # pages pack to ~0.3 in the clear)
            pages = [r for r in relay.records if r[0] == wire.PAGES]
            ends = [r for r in relay.records if r[0] == wire.EPOCH_END]
            assert pages and ends
            assert all(r[2] & wire.PAGES_SEALED for r in pages), pages[:5]
            assert all(r[2] & wire.EPOCH_END_SEALED for r in ends), ends[:5]
            big = [r[3] for r in pages if r[3]]
            assert big and min(big) > 0.99, big[:5]
            for role in ("primary", "secondary"):
                assert "event=seal_key" in pair.log_tail(role, 1 << 24)
            key_lines = {line.split("key_id=")[1].split(":")[0]
                         for role in ("primary", "secondary")
                         for line in pair.log_tail(role, 1 << 24).splitlines()
                         if "event=seal_key" in line}
            assert len(key_lines) == 1, key_lines      # both sides: the same key id
            assert pair.stage_counter("digest.0", "seal_ns") > 0
            assert _sum(pair, "verify", "open_ns", 2) > 0

            # one flipped bit in a checkpoint's record: refused by a verify worker,
            # counted, that epoch torn; the pages are carried into the next epoch
            torn = pair.stage_counter("restore", "torn_epochs", "secondary") + \
                pair.stage_counter("restore", "epochs_aborted", "secondary")
            relay.tamper = True
            wait_until(lambda: relay.tampered or checkpoint_of_writes(600), 300,
                       "a checkpoint record tampered on the wire", interval=0)
            wait_until(lambda: _sum(pair, "verify", "seal_refused", 2) >= 1, 120,
                       "the verify worker refusing the tampered record")
            wait_until(lambda: pair.stage_counter("restore", "torn_epochs", "secondary")
                       + pair.stage_counter("restore", "epochs_aborted", "secondary")
                       > torn, 120, "the tampered epoch torn")
            assert _sum(pair, "verify", "seal_refused", 2) == 1
            log = pair.log_tail("secondary", 1 << 24)
            assert f"PAGES of epoch {relay.tampered[0]}" in log
            assert "the tag does not verify" in log

            # the same record twice: the copy refused by its place, the epoch commits
            relay.replay = True
            wait_until(lambda: relay.replayed or checkpoint_of_writes(600), 300,
                       "a checkpoint record sent twice", interval=0)
            wait_until(lambda: pair.stage_counter("receive", "seal_refused", "secondary")
                       >= 1, 120, "the receive stage refusing the copy")
            assert "sent again: a replay" in pair.log_tail("secondary", 1 << 24)
            def committed() -> int:
                return sum(c["status"] == STATUS_COMMITTED for c in pair.checkpoints())
            before = committed()
            checkpoint_of_writes(600)
            checkpoint_of_writes(600)
            assert committed() >= before + 2
            assert pair.node("primary").node_info()["state"] == "protected"
            assert pair.stage_counter("coordinator", "peer_lost", "primary") == 0
            info = pair.prove_memory_equal(timeout=300)
            assert info["memory_equal"], info
    finally:
        relay.close()


def _key_ids(pair: LocalPair, role: str) -> list[str]:
    """The key ids a node's coordinator installed, in order (event=seal_key)."""
    return [line.split("key_id=")[1].split(":")[0]
            for line in pair.log_tail(role, 1 << 24).splitlines() if "event=seal_key" in line]


@pytest.mark.slow
def test_a_new_secondary_gets_a_new_key(tmp_path):
    """Keys are per session: a secondary killed and started again is re-protected under a
    key agreed at its HELLO, and the new session's records open."""
    pair = LocalPair({
        "guest": {"backend": "sim", "page_count": 2048},
        "guest.workload": {"seed": 3, "input_rate_hz": 250.0, "pages_per_input": 8},
        "checkpoint": {"max_interval_ms": 150, "min_interval_ms": 5, "epoch_timeout_ms": 5000},
        "security": {"mode": "sealed"},
    }, workdir=str(tmp_path), log_level="info")
    try:
        pair.start()
        pair.wait_protected(timeout=300)
        first = _key_ids(pair, "primary")
        assert len(first) == 1 and _key_ids(pair, "secondary") == first
        pair.kill("secondary")
        pair.wait_info("state", "unprotected", timeout=120)
        pair.start_node("secondary")
        pair.wait_info("state", "protected", timeout=300)
        keys = _key_ids(pair, "primary")
        assert len(keys) == 2 and keys[1] != keys[0], keys
        # the new secondary's log (appended to the old one's) ends with the same key
        assert _key_ids(pair, "secondary")[-1] == keys[1]
        done = pair.stage_counter("coordinator", "epochs_committed")
        wait_until(lambda: pair.stage_counter("coordinator", "epochs_committed") >= done + 5,
                   120, "checkpoints under the new key")
        assert pair.stage_counter("receive", "seal_refused", "secondary") == 0
        assert pair.prove_memory_equal(timeout=180)["memory_equal"] is True
    finally:
        pair.stop()
