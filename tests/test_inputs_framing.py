"""The output ports' framing of a sim guest's answers (``GuestOutputFramer``, made per
payload length once) is byte for byte ``encode_frame(guest_output_frame(payload))``, the
frame the comparator compares and the client reads: every length, odd ones included, and
the payloads whose UDP checksum is the one edge case (a sum that folds to 0xFFFF)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.net.build import MAX_UDP_PAYLOAD, GuestOutputFramer, guest_output_frame
from pipeline.net.framing import FrameDecoder, encode_frame


def reference(payload: bytes) -> bytes:
    return encode_frame(guest_output_frame(payload))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8))
def test_the_framer_equals_the_reference_frame(payloads):
    framer = GuestOutputFramer()          # one framer, headers made once per length
    for p in payloads:
        assert framer.frame(p) == reference(p)


def test_every_short_length_and_the_largest():
    framer = GuestOutputFramer()
    for n in list(range(0, 130)) + [1499, 1500, MAX_UDP_PAYLOAD]:
        p = bytes((i * 7 + n) % 256 for i in range(n))
        assert framer.frame(p) == reference(p), n
    with pytest.raises(ValueError, match="exceeds"):
        framer.frame(bytes(MAX_UDP_PAYLOAD + 1))


@pytest.mark.parametrize("n", [56, 57])
def test_a_checksum_that_folds_to_all_ones(n):
    """The payload whose words make the sum a multiple of 0xFFFF: the UDP checksum field
    is then 0xFFFF (a computed 0 is sent as all ones). Found by trying the last word."""
    framer = GuestOutputFramer()
    head = bytes(range(n - 2))
    found = []
    for last in range(0x10000):
        p = head + last.to_bytes(2, "big")
        frame = guest_output_frame(p)
        if frame[14 + 20 + 6:14 + 20 + 8] == b"\xff\xff":
            found.append(p)
    assert found
    for p in found:
        assert framer.frame(p) == reference(p)


def test_frames_decode_to_the_guest_output():
    framer = GuestOutputFramer()
    payloads = [bytes([i]) * (40 + i) for i in range(20)]
    frames = FrameDecoder(False).feed(b"".join(framer.frame(p) for p in payloads))
    assert [bytes(f[0][14 + 20 + 8:]) for f in frames] == payloads
