"""The NBD export as real clients see it: nbdinfo, qemu-io, libnbd (Debian's Python, run
explicitly as /usr/bin/python3), and a raw socket client for requests no polite client sends."""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import textwrap
import time

import pytest

from pipeline.disk import nbd_protocol as P
from pipeline.disk.nbd_client import NbdClient
from pipeline.disk.settings import DiskSettings
from pipeline.stages.disk import PrimaryDisk

SIZE = 4 << 20
BS = 4096
DEBIAN_PYTHON = "/usr/bin/python3"  # python3-libnbd belongs to Debian's interpreter

needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None,
                                   reason="qemu-io (Debian qemu-utils) is not installed")
needs_nbdinfo = pytest.mark.skipif(shutil.which("nbdinfo") is None,
                                   reason="nbdinfo (Debian libnbd-bin) is not installed")


def _has_libnbd() -> bool:
    return os.path.exists(DEBIAN_PYTHON) and subprocess.run(
        [DEBIAN_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0


needs_libnbd = pytest.mark.skipif(not _has_libnbd(),
                                  reason="python3-libnbd (Debian) is not installed")


@pytest.fixture
def export(tmp_path):
    """An unreplicated export (forwarding off) of a fresh image over TCP on a free port."""
    s = DiskSettings(image=str(tmp_path / "disk.img"), export_size=SIZE, block_size=BS,
                     export="127.0.0.1:0", max_request=1 << 20)
    disk = PrimaryDisk(s, forward=False)
    yield disk
    disk.close()


@pytest.fixture
def unix_export(tmp_path):
    s = DiskSettings(image=str(tmp_path / "disk.img"), export_size=SIZE, block_size=BS,
                     export=f"unix:{tmp_path}/nbd.sock")
    disk = PrimaryDisk(s, forward=False)
    yield disk
    disk.close()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def image(disk: PrimaryDisk) -> bytes:
    with open(disk.backend.settings.image, "rb") as f:
        return f.read()


@needs_nbdinfo
def test_nbdinfo_sees_size_block_sizes_and_capabilities(unix_export):
    r = run(["nbdinfo", "--json", unix_export.uri])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == SIZE
    assert exp["block_size_minimum"] == BS
    assert exp["can_flush"] and exp["can_trim"] and exp["can_zero"] and exp["can_multi_conn"]
    assert not exp["is_read_only"]


@needs_qemu_io
def test_qemu_io_write_read_discard_zero_flush(export):
    r = run(["qemu-io", "-f", "raw",
             "-c", "write -P 0x5a 0 64k",
             "-c", "write -P 0x33 1000 100",          # unaligned: qemu read-modify-writes
             "-c", "write -P 0x77 1M 1M",
             "-c", "discard 1M 4k",
             "-c", "write -z 1081344 8k",              # 1M + 32k
             "-c", "flush",
             "-c", "read -P 0x5a 0 1000",
             "-c", "read -P 0x33 1000 100",
             "-c", "read -P 0 1M 4k",
             "-c", "read -P 0x77 1052672 4k",          # 1M + 4k survives
             "-c", "read -P 0 1081344 8k",
             export.uri])
    assert r.returncode == 0, r.stderr
    assert "Pattern verification failed" not in r.stdout, r.stdout
    img = image(export)
    assert img[:1000] == b"\x5a" * 1000 and img[1000:1100] == b"\x33" * 100
    assert img[(1 << 20):(1 << 20) + BS] == bytes(BS)
    assert img[(1 << 20) + BS:(1 << 20) + 32 * 1024] == b"\x77" * (28 * 1024)
    c = export.counters
    assert c["writes"] >= 5 and c["flushes"] >= 1 and c["bad_requests"] == 0


@needs_libnbd
def test_out_of_bounds_and_misaligned_requests_get_einval_and_change_nothing(export):
    script = textwrap.dedent("""
        import errno, json, sys, nbd
        h = nbd.NBD()
        h.set_strict_mode(0)          # let the requests through so the server must judge
        h.connect_uri(sys.argv[1])
        out = {}
        def attempt(name, fn):
            try:
                fn()
                out[name] = 0
            except nbd.Error as e:
                out[name] = e.errnum
        attempt("read_past_end", lambda: h.pread(4096, %(size)d))
        attempt("write_past_end", lambda: h.pwrite(b"x" * 4096, %(size)d - 2048))
        attempt("write_misaligned", lambda: h.pwrite(b"x" * 4096, 100))
        attempt("write_short", lambda: h.pwrite(b"x" * 100, 0))
        attempt("trim_past_end", lambda: h.trim(8192, %(size)d))
        attempt("zero_misaligned", lambda: h.zero(4096, 512))
        attempt("good_write", lambda: h.pwrite(b"y" * 4096, 0))
        print(json.dumps(out))
        h.shutdown()
    """) % {"size": SIZE}
    r = run([DEBIAN_PYTHON, "-c", script, export.uri])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got.pop("good_write") == 0
    assert got == dict.fromkeys(got, P.EINVAL) and len(got) == 6
    assert export.counters["bad_requests"] == 6
    img = image(export)
    assert img[:BS] == b"y" * BS and img[BS:] == bytes(SIZE - BS)


class RawClient(NbdClient):
    """The package's NBD client, used here for requests polite clients refuse to send."""


def test_oversized_write_is_refused_and_the_connection_stays_in_step(export):
    c = RawClient(export.uri)
    try:
        big = 2 << 20  # max_request is 1 MiB here
        c.request(P.CMD_WRITE, 0, big, b"z" * big, cookie=1)
        assert c.reply()[:2] == (P.EOVERFLOW, 1)
        c.request(P.CMD_READ, 0, 2 << 20, cookie=2)
        assert c.reply()[:2] == (P.EOVERFLOW, 2)
        c.request(5, 0, BS, cookie=3)  # CACHE: not offered
        assert c.reply()[:2] == (P.EINVAL, 3)
        c.request(P.CMD_WRITE, BS, BS, b"k" * BS, cookie=4)
        assert c.reply()[:2] == (0, 4)
        c.request(P.CMD_READ, BS, BS, cookie=5)
        assert c.reply(BS) == (0, 5, b"k" * BS)
    finally:
        c.close()
    assert export.counters["bad_requests"] == 3
    assert image(export)[:BS] == bytes(BS)


def test_client_vanishing_mid_request_is_counted_and_others_are_served(export):
    c = RawClient(export.uri)
    c.request(P.CMD_WRITE, 0, 64 * 1024, b"h" * 1000)  # payload cut short
    c.close()
    deadline = time.monotonic() + 60      # (a generous deadline: a loaded machine)
    while export.counters["client_disconnects"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert export.counters["client_disconnects"] == 1
    assert image(export)[:1000] == bytes(1000)  # nothing of the torn write was applied
    c2 = RawClient(export.uri)
    try:
        c2.request(P.CMD_WRITE, 0, BS, b"w" * BS, cookie=9)
        assert c2.reply()[:2] == (0, 9)
    finally:
        c2.close()


def test_bad_request_magic_ends_that_connection_only(export):
    c = RawClient(export.uri)
    c.request(P.CMD_READ, 0, BS, magic=0xDEADBEEF)
    with pytest.raises((EOFError, ConnectionError)):
        c.reply()
    c.close()
    assert export.counters["bad_requests"] == 1
    c2 = RawClient(export.uri)
    try:
        c2.request(P.CMD_FLUSH, 0, 0, cookie=3)
        assert c2.reply()[:2] == (0, 3)
    finally:
        c2.close()


def test_settings_reject_bad_values_naming_the_key(tmp_path):
    ok = dict(image=str(tmp_path / "d.img"), export_size=SIZE)
    DiskSettings(**ok)
    for key, value in [("export_size", 1000), ("block_size", 3000), ("compare", "maybe"),
                       ("export", "nohost"), ("forward", "http://x"), ("forward_window", 0),
                       ("max_request", 64 << 20), ("overlay_max_bytes", 1), ("image", "")]:
        with pytest.raises(ValueError, match=rf"disk\.{key}"):
            DiskSettings(**{**ok, key: value})


def test_old_export_name_option_and_unknown_options(export):
    """A client using NBD_OPT_EXPORT_NAME (no GO) gets size and flags and can transmit;
    an option we do not offer gets NBD_REP_ERR_UNSUP and negotiation goes on."""
    host, port = export.uri[len("nbd://"):].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    try:
        raw = RawClient.__new__(RawClient)
        raw.sock = s
        assert raw._recv(18)[:8] == P.NBDMAGIC
        s.sendall(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
        s.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_STARTTLS, 0))
        _m, opt, rtype, length = P.OPTION_REPLY.unpack(raw._recv(P.OPTION_REPLY.size))
        assert (opt, rtype, length) == (P.OPT_STARTTLS, P.REP_ERR_UNSUP, 0)
        s.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
        size, flags = struct.unpack(">QH", raw._recv(10))
        assert size == SIZE and flags & P.TFLAG_SEND_FLUSH and flags & P.TFLAG_SEND_TRIM
        raw.request(P.CMD_WRITE, 0, BS, b"e" * BS, cookie=11)
        assert raw.reply()[:2] == (0, 11)
        raw.request(P.CMD_DISC, 0, 0)
    finally:
        s.close()
    assert image(export)[:BS] == b"e" * BS


@needs_nbdinfo
def test_nbdinfo_list_shows_the_one_export(unix_export):
    r = run(["nbdinfo", "--list", "--json", unix_export.uri])
    assert r.returncode == 0, r.stderr
    assert [e["export-name"] for e in json.loads(r.stdout)["exports"]] == [""]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs: a real filesystem that really runs out of space."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_failing_image_file_gives_eio_and_the_export_goes_on(tiny_fs):
    s = DiskSettings(image=os.path.join(tiny_fs, "disk.img"), export_size=SIZE, block_size=BS,
                     export="127.0.0.1:0")
    disk = PrimaryDisk(s, forward=False)
    try:
        c = RawClient(disk.uri)
        try:
            c.request(P.CMD_WRITE, 0, 1 << 20, b"f" * (1 << 20), cookie=1)  # > the fs
            assert c.reply()[:2] == (P.EIO, 1)
            # the failed write filled the fs; a block it did allocate can be rewritten
            c.request(P.CMD_WRITE, 0, BS, b"s" * BS, cookie=2)
            assert c.reply()[:2] == (0, 2)
            c.request(P.CMD_READ, 0, BS, cookie=3)
            assert c.reply(BS) == (0, 3, b"s" * BS)
        finally:
            c.close()
        assert disk.counters["io_errors"] == 1 and disk.counters["bad_requests"] == 0
    finally:
        disk.close()


# -- FUA, structured replies, block status --------------------------------------

def _sparse_export_with_data(disk: PrimaryDisk) -> list[tuple[int, int]]:
    """Write a few data runs through the export; the (offset, length) of each."""
    runs = [(64 * 1024, 128 * 1024), (1 << 20, 4096), (3 << 20, 256 * 1024)]
    cmds = []
    for i, (off, n) in enumerate(runs):
        cmds += ["-c", f"write -P {0x41 + i} {off} {n}"]
    r = run(["qemu-io", "-f", "raw"] + cmds + [disk.uri])
    assert r.returncode == 0, r.stderr
    return runs


@needs_qemu_io
@needs_nbdinfo
def test_block_status_reports_holes_and_data_to_nbdinfo_and_qemu_img(unix_export):
    runs = _sparse_export_with_data(unix_export)
    r = run(["nbdinfo", "--map", "--json", unix_export.uri])
    assert r.returncode == 0, r.stderr
    got = [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]
    want, pos = [], 0
    for off, n in runs:
        if off > pos:
            want.append((pos, off - pos, P.STATE_HOLE | P.STATE_ZERO))
        want.append((off, n, 0))
        pos = off + n
    want.append((pos, SIZE - pos, P.STATE_HOLE | P.STATE_ZERO))
    assert got == want
    r = run(["qemu-img", "map", "--output=json", "-f", "raw", unix_export.uri])
    assert r.returncode == 0, r.stderr
    data = [(m["start"], m["length"]) for m in json.loads(r.stdout) if m["data"]]
    assert data == runs
    assert unix_export.counters["block_status"] >= 2


@needs_qemu_io
@pytest.mark.skipif(shutil.which("nbdcopy") is None or shutil.which("qemu-img") is None,
                    reason="nbdcopy (libnbd-bin) and qemu-img (qemu-utils) are needed")
def test_qemu_img_convert_and_nbdcopy_read_only_the_allocated_extents(unix_export, tmp_path):
    runs = _sparse_export_with_data(unix_export)
    allocated = sum(n for _o, n in runs)
    for name, cmd in [("qemu-img", ["qemu-img", "convert", "-f", "raw", "-O", "raw"]),
                      ("nbdcopy", ["nbdcopy"])]:
        out = tmp_path / f"{name}.raw"
        before = unix_export.counters["read_bytes"]
        r = run(cmd + [unix_export.uri, str(out)])
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == image(unix_export), name
        read = unix_export.counters["read_bytes"] - before
        # only the data runs crossed the wire (the holes came from block status)
        assert allocated <= read < SIZE // 4, (name, read)


@needs_qemu_io
def test_fua_writes_are_accepted_counted_and_durable_before_the_reply(export):
    # writeback: qemu-io would otherwise give every write FUA (writethrough)
    r = run(["qemu-io", "-f", "raw", "-t", "writeback", "-c", "write -f -P 0x46 0 64k",
             "-c", "write -f -z 64k 64k", "-c", "write -P 0x47 128k 4k",
             "-c", "read -P 0x46 0 64k", "-c", "read -P 0 64k 64k", export.uri])
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    assert export.counters["fua_writes"] == 2 and export.counters["writes"] == 3
    assert image(export)[:64 * 1024] == b"\x46" * 64 * 1024


@needs_libnbd
def test_libnbd_negotiates_structured_replies_fua_and_base_allocation(export):
    script = textwrap.dedent("""
        import json, sys, nbd
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(sys.argv[1])
        h.pwrite(b"f" * 8192, 8192, nbd.CMD_FLAG_FUA)
        seen = []
        h.block_status(%(size)d, 0,
                       lambda meta, off, entries, err: seen.append((meta, entries)) or 0)
        one = []
        h.block_status(%(size)d, 0, lambda m, o, e, err: one.append(e) or 0,
                       nbd.CMD_FLAG_REQ_ONE)
        print(json.dumps({"structured": h.get_structured_replies_negotiated(),
                          "fua": h.can_fua(), "meta": h.can_meta_context("base:allocation"),
                          "seen": seen, "one": one, "read": h.pread(8192, 8192).decode()[:3]}))
        h.shutdown()
    """) % {"size": SIZE}
    r = run([DEBIAN_PYTHON, "-c", script, export.uri])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["structured"] and got["fua"] and got["meta"]
    hole = P.STATE_HOLE | P.STATE_ZERO
    assert got["seen"] == [["base:allocation", [8192, hole, 8192, 0, SIZE - 16384, hole]]]
    assert got["one"] == [[8192, hole]]
    assert got["read"] == "fff"
    assert export.counters["fua_writes"] == 1


def _raw_handshake(uri: str) -> RawClient:
    """A raw client just after the greeting and client flags (options not yet sent)."""
    host, port = uri[len("nbd://"):].rsplit(":", 1)
    raw = RawClient.__new__(RawClient)
    raw.sock = socket.create_connection((host, int(port)), timeout=10)
    assert raw._recv(18)[:8] == P.NBDMAGIC
    raw.sock.sendall(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
    return raw


def _option(raw: RawClient, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option; its replies (type, data) up to the final one."""
    raw.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)
    replies = []
    while True:
        _m, opt, rtype, length = P.OPTION_REPLY.unpack(raw._recv(P.OPTION_REPLY.size))
        assert opt == option
        replies.append((rtype, raw._recv(length)))
        if rtype == P.REP_ACK or rtype & 0x80000000:
            return replies


def _meta_query(*queries: str) -> bytes:
    body = struct.pack(">I", 0) + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def test_meta_context_negotiation_and_block_status_errors(export):
    raw = _raw_handshake(export.uri)
    try:
        # meta contexts before structured replies: refused, negotiation goes on
        assert _option(raw, P.OPT_SET_META_CONTEXT, _meta_query(P.BASE_ALLOCATION))[0][0] \
            == P.REP_ERR_INVALID
        assert _option(raw, P.OPT_STRUCTURED_REPLY) == [(P.REP_ACK, b"")]
        assert _option(raw, P.OPT_LIST_META_CONTEXT, b"\0\0")[0][0] == P.REP_ERR_INVALID
        listed = _option(raw, P.OPT_LIST_META_CONTEXT, _meta_query())
        assert listed == [(P.REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
                          (P.REP_ACK, b"")]
        assert _option(raw, P.OPT_SET_META_CONTEXT, _meta_query("x-other:thing")) == \
            [(P.REP_ACK, b"")]                                 # selects nothing
        assert _option(raw, P.OPT_GO, bytes(6))[-1] == (P.REP_ACK, b"")
        # no context selected: BLOCK_STATUS is an error, as an error chunk with the reason
        raw.request(P.CMD_BLOCK_STATUS, 0, BS, cookie=21)
        magic, flags, rtype, cookie, length = P.CHUNK.unpack(raw._recv(P.CHUNK.size))
        body = raw._recv(length)
        assert (magic, flags, rtype, cookie) == (P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                                 P.REPLY_TYPE_ERROR, 21)
        assert struct.unpack(">I", body[:4])[0] == P.EINVAL and b"metadata context" in body
        # a read is one data chunk
        raw.request(P.CMD_READ, 0, BS, cookie=22)
        magic, flags, rtype, cookie, length = P.CHUNK.unpack(raw._recv(P.CHUNK.size))
        assert (rtype, cookie, length) == (P.REPLY_TYPE_OFFSET_DATA, 22, 8 + BS)
        assert raw._recv(length) == bytes(8 + BS)
        raw.request(P.CMD_DISC, 0, 0)
    finally:
        raw.sock.close()
    assert export.counters["bad_requests"] == 1
