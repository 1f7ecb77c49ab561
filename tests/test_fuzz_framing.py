"""Fuzzing QEMU's chardev framing (pipeline/net/framing.py) and Xen's notify protocol
(pipeline/net/control.py) for answers.

Framing:
* a stream made of known items (frames, epoch boundaries, and the bad ones: an unknown
  boundary kind, a frame longer than the limit with its bytes, a vnet length beyond its
  frame), cut anywhere, decodes to exactly the good items in order, with every bad one
  counted (``malformed``) and reported naming its field, and the stream stays in step;
* arbitrary bytes, cut anywhere, decode the same as uncut; when nothing was refused, the
  items encode back to exactly the bytes consumed.

The comparator's own walk of a framed stream (Comparator.push_stream, which cuts frames in
place and releases runs of equal ones whole): cut and counted as FrameDecoder does, every
PVM frame released once or counted dropped.

Notify: a real XenNotify on a unix socket, fed any mix of its messages, unknown ones, too
long ones, bad vnet words and epoch-boundary-looking words: every PROXY_INIT is answered,
every COLO_CHECKPOINT flushes, every other message is counted as unknown, and every
unframeable one as malformed; nothing else happens and nothing raises.
"""
from __future__ import annotations

import shutil
import socket
import struct
import tempfile

from conftest import wait_until
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.net import build
from pipeline.net.comparator import PRIMARY, SECONDARY, Comparator
from pipeline.net.control import (
    COLO_CHECKPOINT, MAX_NOTIFY_MESSAGE, PROXY_INIT, PROXY_INIT_REPLY, XenNotify, encode_notify,
)
from pipeline.net.framing import (
    BOUNDARY_KINDS, BOUNDARY_WORD, Boundary, FrameDecoder, encode_boundary, encode_frame,
)
from pipeline.net.packet import MalformedFrame, parse_frame
from pipeline.net.settings import MAX_FRAME_BYTES, NetSettings

MAX = 64          # a small frame limit, so oversized frames are cheap to make
U64 = st.integers(0, 2**64 - 1)


# -- a stream of known items -------------------------------------------------------------------
@st.composite
def items(draw, vnet: bool):
    """(bytes on the stream, the item the decoder must yield or None, refused?)."""
    kind = draw(st.sampled_from(["frame", "frame", "boundary", "bad_boundary", "oversized",
                                 "bad_vnet"]))
    if kind == "frame":
        frame = draw(st.binary(max_size=MAX))
        v = draw(st.integers(0, len(frame))) if vnet else 0
        return encode_frame(frame, v, vnet), (frame, v), False
    if kind == "boundary":
        b = Boundary(draw(st.sampled_from(sorted(BOUNDARY_KINDS))), draw(U64), draw(U64))
        return encode_boundary(b.kind, b.epoch, b.aborted), b, False
    if kind == "bad_boundary":
        k = draw(st.integers(0, 2**32 - 1).filter(lambda k: k not in BOUNDARY_KINDS))
        return struct.pack("!IIQQ", BOUNDARY_WORD, k, draw(U64), draw(U64)), None, True
    if kind == "oversized":
        n = draw(st.integers(MAX + 1, 3 * MAX))
        head = struct.pack("!II", n, draw(st.integers(0, 2**32 - 1))) if vnet \
            else struct.pack("!I", n)
        return head + draw(st.binary(min_size=n, max_size=n)), None, True
    if not vnet:
        return draw(items(vnet))
    frame = draw(st.binary(max_size=MAX))
    bad = draw(st.integers(len(frame) + 1, 2**32 - 1))
    return struct.pack("!II", len(frame), bad) + frame, None, True


def feed_in_pieces(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list:
    out, pos = [], 0
    for cut in cuts:
        out += decoder.feed(stream[pos:pos + cut])
        pos += cut
    return out + decoder.feed(stream[pos:])


cuts = st.lists(st.integers(1, 80), max_size=20)


@given(st.booleans().flatmap(lambda vnet: st.tuples(st.just(vnet),
                                                    st.lists(items(vnet), max_size=10))), cuts)
def test_a_stream_of_known_items_decodes_to_the_good_ones_and_counts_the_bad(case, pieces):
    vnet, parts = case
    reasons: list[str] = []
    decoder = FrameDecoder(vnet, MAX, reasons.append)
    out = feed_in_pieces(decoder, b"".join(p for p, _, _ in parts), pieces)
    assert out == [item for _, item, bad in parts if not bad]
    assert decoder.malformed == len(reasons) == sum(bad for _, _, bad in parts)
    assert decoder.boundaries == sum(isinstance(i, Boundary) for i in out)
    assert decoder.idle                              # in step: nothing left half-read
    for r in reasons:
        assert any(w in r for w in ("frame length", "vnet header length",
                                    "epoch boundary kind")), r


def encode_item(item, vnet: bool) -> bytes:
    if isinstance(item, Boundary):
        return encode_boundary(item.kind, item.epoch, item.aborted)
    frame, v = item
    return encode_frame(frame, v, vnet)


@given(st.binary(max_size=300), cuts, st.booleans())
@example(struct.pack("!I", BOUNDARY_WORD) + bytes(20), [], False)
def test_arbitrary_bytes_decode_the_same_however_cut_and_encode_back(stream, pieces, vnet):
    whole = FrameDecoder(vnet, MAX)
    want = whole.feed(stream)
    cut = FrameDecoder(vnet, MAX)
    assert feed_in_pieces(cut, stream, pieces) == want
    assert (cut.malformed, cut.boundaries, cut.idle) == (whole.malformed, whole.boundaries,
                                                         whole.idle)
    if whole.malformed == 0:
        consumed = b"".join(encode_item(i, vnet) for i in want)
        assert stream.startswith(consumed)
        assert len(consumed) + len(whole._buf) == len(stream)


# -- Xen's notify protocol on a real socket ----------------------------------------------
@st.composite
def notify_messages(draw, vnet: bool):
    """(bytes on the stream, what the comparator must do: reply / flush / unknown / malformed)."""
    kind = draw(st.sampled_from(["init", "checkpoint", "other", "too_long", "boundary",
                                 "bad_vnet"]))
    vword = (lambda n: struct.pack("!I", draw(st.integers(0, n)))) if vnet else (lambda n: b"")
    if kind in ("init", "checkpoint", "other"):
        text = {"init": PROXY_INIT, "checkpoint": COLO_CHECKPOINT}.get(kind) \
            or draw(st.binary(max_size=40).filter(
                lambda b: b.rstrip(b"\0") not in (PROXY_INIT, COLO_CHECKPOINT)))
        text += b"\0" * draw(st.integers(0, 3))           # Xen's strings may end in NULs
        return struct.pack("!I", len(text)) + vword(len(text)) + text, {
            "init": "reply", "checkpoint": "flush"}.get(kind, "unknown")
    if kind == "too_long":
        n = draw(st.integers(MAX_NOTIFY_MESSAGE + 1, MAX_NOTIFY_MESSAGE + 40))
        return struct.pack("!I", n) + vword(0) + bytes(n), "malformed"
    if kind == "boundary":   # the comparator's epoch-boundary word, where it has no meaning
        return struct.pack("!IIQQ", BOUNDARY_WORD, draw(st.integers(0, 4)), draw(U64),
                           draw(U64)), "unknown_or_malformed"
    if not vnet:
        return draw(notify_messages(vnet))
    text = draw(st.binary(max_size=20))
    return (struct.pack("!II", len(text), draw(st.integers(len(text) + 1, 2**32 - 1))) + text,
            "malformed")


class Events:
    def __init__(self) -> None:
        self.flushes = 0

    def on_flush(self) -> None:
        self.flushes += 1

    def on_snapshot(self, epoch):
        raise AssertionError("notify_dev never reports a snapshot")

    on_committed = on_role = on_snapshot


@given(st.booleans().flatmap(lambda vnet: st.tuples(
    st.just(vnet), st.lists(notify_messages(vnet), min_size=1, max_size=8))))
@example((False, [(struct.pack("!IIQQ", BOUNDARY_WORD, 1, 5, 0), "unknown_or_malformed")]))
def test_notify_answers_flushes_and_counts_every_message(case):
    vnet, messages = case
    tmp = tempfile.mkdtemp(prefix="fuzz-notify-")
    malformed: list[str] = []
    notify = XenNotify(f"unix:{tmp}/ntf.sock", vnet_hdr=vnet, on_malformed=malformed.append)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(f"{tmp}/ntf.sock")
        client.sendall(b"".join(m for m, _ in messages))
        want = {w: sum(1 for _, x in messages if x == w) for w in
                ("reply", "flush", "unknown", "malformed", "unknown_or_malformed")}
        events = Events()

        def handled() -> bool:
            notify.handle(events)
            return (notify.unknown_messages + len(malformed) + events.flushes
                    + replies_seen() >= len(messages))

        got = bytearray()

        def replies_seen() -> int:
            client.setblocking(False)
            try:
                got.extend(client.recv(65536))
            except BlockingIOError:
                pass
            return len(got) // len(encode_notify(PROXY_INIT_REPLY))

        wait_until(handled, 60, "every notify message handled", interval=0.001)
        assert bytes(got) == encode_notify(PROXY_INIT_REPLY) * want["reply"]
        assert events.flushes == want["flush"]
        either = notify.unknown_messages + len(malformed) - want["unknown"] - want["malformed"]
        assert notify.unknown_messages >= want["unknown"] and len(malformed) >= want["malformed"]
        assert either == want["unknown_or_malformed"]
    finally:
        client.close()
        notify.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- the comparator's own walk of a framed stream (Comparator.push_stream) -------------------
G, C = "10.0.0.2", "10.0.0.1"


@st.composite
def stream_frames(draw):
    """A datagram as guests send them (a few flows, so runs form), or garbage too short to
    be a UDP or TCP frame. (No TCP: a segment after a gap in the sequence numbers is held
    by the per-frame path, waiting for the bytes before it, while a run of byte-equal
    frames is released at once; both are safe, they are not the same answer.)"""
    kind = draw(st.sampled_from(["udp", "udp", "icmp", "garbage"]))
    flow, n = draw(st.integers(0, 2)), draw(st.integers(0, 3))
    if kind == "udp":
        return build.udp_frame(G, C, 1000 + flow, 53, b"answer %d" % n)
    if kind == "icmp":
        return build.icmp_echo_frame(G, C, flow, n, b"ping")
    return draw(st.binary(max_size=41))


@st.composite
def stream_pairs(draw):
    """(PVM stream, SVM stream): mostly the same frames (other IP ids now and then), some
    different, some only on one side, bad items on either side. (No checkpoint boundaries:
    the walk takes the SVM's ahead of PVM frames it holds back, so the two paths would see
    the epochs' events in another order; the node tests cover boundaries.)"""
    pvm, svm = [], []
    for _ in range(draw(st.integers(0, 24))):
        what = draw(st.sampled_from(["same"] * 6 + ["ip_id", "other", "pvm", "svm", "bad"]))
        f = draw(stream_frames())
        if what == "same":
            pvm.append(encode_frame(f)), svm.append(encode_frame(f))
        elif what == "ip_id" and len(f) > 20 and f[12:14] == b"\x08\x00":
            g = bytearray(f)
            g[18:20] = b"\x12\x34"
            pvm.append(encode_frame(f)), svm.append(encode_frame(bytes(g)))
        elif what == "other":
            pvm.append(encode_frame(f)), svm.append(encode_frame(draw(stream_frames())))
        elif what in ("pvm", "svm"):
            (pvm if what == "pvm" else svm).append(encode_frame(f))
        elif what == "bad":
            draw(st.sampled_from([pvm, svm])).append(draw(st.sampled_from([
                struct.pack("!IIQQ", BOUNDARY_WORD, 9, 1, 0),                 # unknown kind
                struct.pack("!I", MAX_FRAME_BYTES + 1) + bytes(MAX_FRAME_BYTES + 1)])))
    return b"".join(pvm), b"".join(svm)


def _comparator(released: list, requests: list) -> Comparator:
    return Comparator(NetSettings(max_queue_frames=100000, compare_timeout_ms=10 ** 9),
                      lambda f, v: released.append(f), lambda c, d: requests.append(c),
                      clock=lambda: 0.0)


@given(stream_pairs(), st.lists(st.tuples(st.booleans(), st.integers(1, 400)), max_size=30),
       st.booleans())
def test_the_stream_walk_cuts_counts_and_releases_every_pvm_frame_once(pair, schedule, same):
    """Both sides' streams through push_stream, cut and interleaved anyhow: every item is
    cut out as FrameDecoder cuts it (frames in, bad items counted malformed once); after a
    flush every PVM frame was released once or counted dropped, and nothing else was
    released; equal streams (IP ids aside) release everything in order and ask for nothing.

    (Not "the same as frame by frame" in general: the walk takes SVM frames ahead of PVM
    frames it holds back, and QEMU's datagram rule, "the PVM's oldest frame equals one of
    the SVM's", depends on which side came first.)"""
    pvm, svm = pair
    if same:
        svm = pvm
    streams = {PRIMARY: pvm, SECONDARY: svm}
    released: list[bytes] = []
    requests: list[str] = []
    walk = _comparator(released, requests)
    walk._release_block_cb = lambda b: released.extend(f for f, _ in FrameDecoder().feed(b))
    pos = {PRIMARY: 0, SECONDARY: 0}

    def give(side: int, n: int) -> None:
        data = streams[side][pos[side]:pos[side] + n]
        pos[side] += len(data)
        if data:
            walk.push_stream(side, data)

    for svm_side, n in schedule:
        give(SECONDARY if svm_side else PRIMARY, n)
    give(PRIMARY, len(pvm))
    give(SECONDARY, len(svm))
    walk.settle()
    assert walk.stream_frames() == 0
    want = {side: FrameDecoder(False, MAX_FRAME_BYTES) for side in streams}
    frames = {side: want[side].feed(streams[side]) for side in streams}
    c = walk.counters
    assert (c["primary_frames_in"], c["secondary_frames_in"]) == (
        len(frames[PRIMARY]), len(frames[SECONDARY]))
    bad = want[PRIMARY].malformed + want[SECONDARY].malformed
    unparsable = sum(1 for side in streams for f, _ in frames[side] if _refused(f))
    assert c["malformed_frames"] == bad + unparsable
    walk.flush()
    sent = [f for f, _ in frames[PRIMARY]]
    # items that could not even be cut out (oversized, unknown boundary) count as dropped too
    assert len(released) + c["primary_frames_dropped"] == len(sent) + want[PRIMARY].malformed
    for f in released:
        sent.remove(f)             # only PVM frames, each at most as often as it was sent
    if same:
        assert released == [f for f, _ in frames[PRIMARY] if not _refused(f)]
        assert requests == []


def _refused(frame: bytes) -> bool:
    try:
        parse_frame(frame)
    except MalformedFrame:
        return True
    return False
