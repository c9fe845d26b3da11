"""The activation wire format: round trips exactly and rejects every malformed payload cleanly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import wire
from shared.schemas import BadMessage, Hop

ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
node_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e12, max_value=1e12)


@st.composite
def activations(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    full_c = draw(st.integers(1, 70))
    spatial = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    mask = None
    kept = full_c
    if draw(st.booleans()):
        mask = np.array(draw(st.lists(st.booleans(), min_size=full_c, max_size=full_c)))
        if not mask.any():
            mask[draw(st.integers(0, full_c - 1))] = True
        kept = int(mask.sum())
    shape = (draw(st.integers(1, 2)), kept, *spatial)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensor = rng.standard_normal(shape).astype(dtype)
    hops = [Hop(stage=draw(st.integers(1, 255)), node_id=draw(node_ids),
                prune_ratio=draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9])),
                received_ts=draw(finite), started_ts=draw(finite), finished_ts=draw(finite),
                published_ts=draw(finite), decode_s=draw(st.floats(0, 1e3)), deferred=draw(st.booleans()),
                **draw(st.sampled_from([{}, {"first_block": 0, "n_blocks": 0},
                                        {"first_block": 65534, "n_blocks": 65534}])))
            for _ in range(draw(st.integers(0, 4)))]
    return wire.Activation(draw(ids), draw(ids), draw(finite), draw(st.integers(0, 65535)), tensor, mask, hops)


@settings(max_examples=200, deadline=None)
@given(activations())
def test_round_trip_is_exact(act):
    back = wire.decode(wire.encode(act))
    assert (back.request_id, back.camera_id, back.capture_ts, back.next_block) == \
        (act.request_id, act.camera_id, act.capture_ts, act.next_block)
    assert back.tensor.dtype == act.tensor.dtype and np.array_equal(back.tensor, act.tensor)
    if act.keep_mask is None:
        assert back.keep_mask is None
    else:
        assert np.array_equal(back.keep_mask, act.keep_mask)
    assert back.hops == act.hops


@pytest.mark.parametrize("version", [1, 2])
def test_activations_from_not_yet_updated_nodes_still_decode(version):
    hop = Hop(stage=1, node_id="old", prune_ratio=0.5, received_ts=1.0, started_ts=2.0, finished_ts=3.0,
              published_ts=4.0, decode_s=0.5, deferred=True, first_block=0, n_blocks=3)
    act = wire.Activation("r", "c", 0.0, 1, np.ones((1, 2, 2, 2), np.float32), None, [hop])
    payload = wire.encode(act)
    tail = struct.pack("<ddBHH", 4.0, 0.5, wire.DEFERRED, 0, 3)  # published, decode, flags, first block, blocks
    assert payload[4] == 3 and payload.count(tail) == 1
    old_tail = struct.pack("<d", 4.0) if version == 1 else struct.pack("<dd", 4.0, 0.5)
    old_payload = payload[:4] + bytes([version]) + payload[5:].replace(tail, old_tail)
    expected = {"first_block": None, "n_blocks": None, "deferred": False,
                **({"decode_s": 0.0} if version == 1 else {})}
    assert wire.decode(old_payload).hops == [hop.model_copy(update=expected)]


def test_peek_reads_the_header_without_the_tensor():
    act = wire.Activation("req-1", "cam", 12.5, 3, np.ones((1, 2, 2, 2), np.float32))
    payload = wire.encode(act)
    header = wire.peek(payload[:payload.index(b"cam") + 3])  # the tensor and beyond cut off
    assert (header.request_id, header.camera_id, header.capture_ts, header.next_block) == ("req-1", "cam", 12.5, 3)
    with pytest.raises(BadMessage) as err:
        wire.peek(payload[:10])
    assert err.value.kind == "truncated"


def test_unknown_hop_flags_are_rejected():
    at = DOCUMENTED.index(bytes.fromhex("000000000000d03f")) + 8  # the flags byte after the hop's decode time
    with pytest.raises(BadMessage, match="hop flags") as err:
        wire.decode(DOCUMENTED[:at] + b"\x03" + DOCUMENTED[at + 1:])
    assert err.value.kind == "bad_header"


def test_full_tensor_zero_fills_pruned_channels():
    mask = np.array([True, False, True, False])
    act = wire.Activation("r", "c", 0.0, 1, np.ones((1, 2, 2, 2), np.float32), mask)
    full = wire.decode(wire.encode(act)).full_tensor()
    assert full.shape == (1, 4, 2, 2)
    assert np.array_equal(full[0, :, 0, 0], [1, 0, 1, 0])


def _sample() -> bytes:
    return wire.encode(wire.Activation("req", "cam", 1.5, 2, np.ones((1, 3, 2, 2), np.float16),
                                       np.array([True, True, False, True])))


def test_every_truncation_is_rejected_as_bad_message():
    payload = _sample()
    for n in range(len(payload)):
        with pytest.raises(BadMessage):
            wire.decode(payload[:n])


@pytest.mark.parametrize("mutate,kind", [
    (lambda p: b"XXXX" + p[4:], "bad_magic"),
    (lambda p: p[:4] + b"\x09" + p[5:], "bad_version"),
    (lambda p: p[:5] + b"\x07" + p[6:], "bad_header"),
    (lambda p: p + b"\x00\x00", "bad_shape"),
])
def test_malformed_headers_name_the_problem(mutate, kind):
    with pytest.raises(BadMessage) as err:
        wire.decode(mutate(_sample()))
    assert err.value.kind == kind


def test_non_finite_tensor_rejected():
    payload = wire.encode(wire.Activation("r", "c", 0.0, 1, np.array([[np.nan, 1.0]], np.float32)))
    with pytest.raises(BadMessage, match="NaN"):
        wire.decode(payload)


def test_oversized_shape_rejected_before_allocation():
    payload = wire.encode(wire.Activation("r", "c", 0.0, 1, np.zeros((1, 64, 64, 64), np.float16)))
    with pytest.raises(BadMessage) as err:
        wire.decode(payload, max_elements=1000)
    assert err.value.kind == "bad_shape"


# One activation written out byte by byte from the table in docs/wire-format.md (little-endian
# throughout, mask bit i = channel i counted from the least significant bit).
def _documented(version: int) -> bytes:
    return bytes.fromhex(
        "45504154"                   # magic "EPAT"
        f"{version:02x}"             # version
        "01"                         # dtype 1 = float16
        "04"                         # ndim 4
        "01"                         # n_hops 1
        "0300"                       # next_block 3 (u16)
        "000000000000f83f"           # capture_ts 1.5 (f64)
        "0200" "7231"                # id_len 2, request id "r1"
        "0100" "63"                  # cam_len 1, camera id "c"
        "01000000" "02000000" "01000000" "01000000"  # shape 1 x 2 x 1 x 1 (kept channels only)
        "0a000000"                   # full_c 10
        "0102"                       # mask: channel 0 (byte 0, bit 0) and channel 9 (byte 1, bit 1) kept
        "01" "0000003f"              # hop: stage 1, ratio 0.5 (f32)
        "000000000000f03f" "0000000000000040" "0000000000000840" "0000000000001040"  # received 1, started 2,
        + ("000000000000d03f" if version >= 2 else "")  # finished 3, published 4, (v2 on) decode 0.25 (f64);
        + ("01" "0300" "0200" if version >= 3 else "") +  # (v3) flags (bit 0 = deferred), first block 3, 2 blocks
        "01" "6e"                    # node_len 1, node id "n"
        "003c" "00c0"                # data: 1.0, -2.0 (float16)
    )


DOCUMENTED = _documented(3)


def _documented_activation(version: int = 3) -> wire.Activation:
    mask = np.zeros(10, dtype=bool)
    mask[[0, 9]] = True
    blocks = {"first_block": 3, "n_blocks": 2} if version >= 3 else {}
    hop = Hop(stage=1, node_id="n", prune_ratio=0.5, received_ts=1.0, started_ts=2.0, finished_ts=3.0,
              published_ts=4.0, decode_s=0.25 if version >= 2 else 0.0, deferred=version >= 3, **blocks)
    return wire.Activation("r1", "c", 1.5, 3, np.array([1.0, -2.0], np.float16).reshape(1, 2, 1, 1), mask, [hop])


def test_encoder_writes_the_documented_layout_byte_for_byte():
    assert wire.encode(_documented_activation()).hex() == DOCUMENTED.hex()


@pytest.mark.parametrize("version", [3, 2, 1])
def test_decoder_reads_the_documented_layout(version):
    act = wire.decode(_documented(version))
    expected = _documented_activation(version)
    assert (act.request_id, act.camera_id, act.capture_ts, act.next_block) == ("r1", "c", 1.5, 3)
    assert np.flatnonzero(act.keep_mask).tolist() == [0, 9]
    assert act.tensor.dtype == np.float16 and act.tensor.ravel().tolist() == [1.0, -2.0]
    assert act.hops == expected.hops


def test_mask_that_disagrees_with_the_channel_count_is_rejected():
    mask_at = DOCUMENTED.index(bytes.fromhex("0a000000")) + 4
    three_kept = DOCUMENTED[:mask_at] + b"\x03" + DOCUMENTED[mask_at + 1:]  # channels 0, 1 and 9; tensor has 2
    with pytest.raises(BadMessage, match="mask keeps 3 channels") as err:
        wire.decode(three_kept)
    assert err.value.kind == "bad_shape"


def test_a_stamp_gives_the_last_hop_its_publish_time_once_the_rest_is_encoded():
    hops = [Hop(stage=s, node_id=f"n{s}", prune_ratio=0.0, received_ts=1.0, started_ts=2.0, finished_ts=3.0,
                published_ts=3.0) for s in (1, 2)]
    act = wire.Activation("r", "cam", 0.5, 3, np.ones((1, 4, 2, 2), dtype=np.float16), None, hops)
    calls = []
    payload = wire.encode(act, stamp=lambda: calls.append(1) or 9.0)
    decoded = wire.decode(payload)
    assert calls == [1]
    assert [h.published_ts for h in decoded.hops] == [3.0, 9.0]
    assert decoded.hops[1].model_copy(update={"published_ts": 3.0}) == hops[1]
    assert np.array_equal(decoded.tensor, act.tensor)
