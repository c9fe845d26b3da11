"""Thumbnails: made from the decode stage 1 does anyway, checked by the gateway, kept within a size budget."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from gateway.accounting import RequestLedger
from gateway.coordinator import Coordinator
from gateway.operator import Overrides
from gateway.retention import DiskMode, thumbnail_budget_bytes
from gateway.store import Store
from node_agent.thumbnailer import Thumbnailer
from shared.imaging import decode_frame, decode_frame_and_image, encode_jpeg, encode_png, textured_scene
from shared.schemas import AcceptedRequest, BadMessage, Placement
from shared.settings import ControllerSettings, GatewaySettings
from shared.thumbnail import (MAX_THUMBNAIL_BYTES, THUMBNAIL_PX, check_thumbnail, make_thumbnail, thumbnail_request_id,
                              thumbnail_size)
from shared.topics import Topics
from tests.conftest import even_split, wait_until

TOPICS = Topics()


def test_a_thumbnail_is_a_small_jpeg_of_the_image_the_models_decode_made_anyway():
    payload = encode_jpeg(textured_scene(4000, 3000))
    pixels, frame = decode_frame_and_image(payload)
    assert frame.size == (500, 375)  # the 12 MP JPEG decoded at 1/8 scale, as for the model: no second decode
    assert np.array_equal(pixels, decode_frame(payload))  # what the model sees is unchanged
    jpeg = make_thumbnail(frame)
    assert check_thumbnail(jpeg) == (THUMBNAIL_PX, 180)
    assert 1_000 < len(jpeg) < 20_000
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.format == "JPEG" and not img.getexif() and img.mode == "RGB"


def test_a_thumbnail_is_never_enlarged_and_keeps_the_aspect():
    assert thumbnail_size(64, 64) == (64, 64)
    assert thumbnail_size(145, 109) == (145, 109)
    assert thumbnail_size(300, 1000) == (72, THUMBNAIL_PX)
    _, frame = decode_frame_and_image(encode_png(textured_scene(64, 64)))
    assert check_thumbnail(make_thumbnail(frame)) == (64, 64)
    assert check_thumbnail(make_thumbnail(Image.new("L", (480, 240)))) == (THUMBNAIL_PX, 120)  # grayscale too


def _jpeg(width: int, height: int, quality: int = 70) -> bytes:
    return encode_jpeg(textured_scene(width, height), quality=quality)


@pytest.mark.parametrize("payload, kind", [
    (b"", "bad_image"),
    (b"\xff\xd8\xff" + bytes(MAX_THUMBNAIL_BYTES), "oversized"),
    (encode_png(textured_scene(32, 32)), "bad_magic"),
    (b"GIF89a....", "bad_magic"),
    (_jpeg(200, 150)[:600], "bad_image"),  # truncated: decoding it fails
    (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "bad_image"),  # a JPEG's first bytes, then nonsense
    (_jpeg(400, 200, quality=30), "bad_image"),  # larger than a thumbnail
])
def test_the_gateway_refuses_anything_but_a_whole_small_jpeg(payload, kind):
    with pytest.raises(BadMessage) as refused:
        check_thumbnail(payload)
    assert refused.value.kind == kind


def test_a_thumbnail_names_its_frame_in_a_user_property():
    assert thumbnail_request_id({"request_id": "cam-1-000001"}) == "cam-1-000001"
    for props in ({}, {"request_id": ""}, {"request_id": "x" * 129}):
        with pytest.raises(BadMessage, match="request_id"):
            thumbnail_request_id(props)


def test_thumbnails_are_made_off_the_inference_thread_and_skipped_when_it_falls_behind():
    sent, release, busy = [], threading.Event(), threading.Event()

    def send(request_id: str, jpeg: bytes) -> None:
        busy.set()
        release.wait(30)
        if request_id == "bad":
            raise RuntimeError("broker gone")
        sent.append((request_id, check_thumbnail(jpeg)))
    thumbs = Thumbnailer(send, capacity=2)
    thumbs.start()
    frame = Image.new("RGB", (500, 375))
    assert thumbs.offer("bad", frame)
    wait_until(busy.is_set, 10, "the thumbnail thread never took the first frame")
    assert thumbs.offer("a", frame) and thumbs.offer("b", frame)
    assert not thumbs.offer("c", frame) and thumbs.skipped == 1  # the queue is full: this frame gets none
    release.set()
    wait_until(lambda: len(sent) == 2, 10, "queued thumbnails were not sent")
    assert sent == [("a", (THUMBNAIL_PX, 180)), ("b", (THUMBNAIL_PX, 180))] and thumbs.failed == 1
    thumbs.stop()


def test_only_the_node_that_accepted_a_frame_may_send_its_thumbnail_once():
    ledger = RequestLedger()
    ledger.accept("r1", "cam-1", 1.0, "node-1")
    assert ledger.thumbnail("r1", "node-2") is None
    assert ledger.thumbnail("r2", "node-1") is None
    assert ledger.thumbnail("r1", "node-1") == "cam-1"
    assert ledger.thumbnail("r1", "node-1") is None  # once


def coordinator(tmp_path, budget_mb: float) -> Coordinator:
    settings = GatewaySettings(db_path=tmp_path / "unused.db", thumbnail_budget_mb=budget_mb)
    return Coordinator(settings, Overrides(settings, ControllerSettings(), {}), TOPICS, "weights", 12288, None, {},
                       [], now=0.0)


def test_the_placement_asks_for_thumbnails_only_when_the_site_keeps_them(tmp_path):
    for budget_mb, asked in ((0.0, False), (64.0, True)):
        c = coordinator(tmp_path, budget_mb)
        c.placing.live.current = c.placing.handover.active = even_split(6, ["node-1", "node-2"])
        (payload,) = c.placement_message().sent(TOPICS.placement)
        assert Placement.model_validate_json(payload).thumbnails is asked
        assert (b'"thumbnails"' in payload) is asked  # an older node, which forbids the field, still reads it off


def test_a_thumbnail_of_an_accepted_frame_becomes_a_row_and_any_other_is_refused(tmp_path):
    c = coordinator(tmp_path, 64.0)
    c.on_accepted(AcceptedRequest(request_id="r1", camera_id="cam-1", node_id="node-1", capture_ts=1.0,
                                  received_ts=1.0), 1.0)
    jpeg = _jpeg(240, 180)
    assert c.on_thumbnail("node-2", "r1", jpeg, 2.0).refusal.kind == "unknown_thumbnail"
    effects = c.on_thumbnail("node-1", "r1", jpeg, 2.0)
    assert effects.refusal is None
    assert effects.rows("add_thumbnail") == [{"request_id": "r1", "camera_id": "cam-1", "ts": 2.0,
                                              "bytes": len(jpeg), "jpeg": jpeg}]
    assert c.on_thumbnail("node-1", "r1", jpeg, 3.0).refusal.kind == "unknown_thumbnail"


def test_past_the_budget_the_oldest_thumbnails_are_deleted_first(tmp_path):
    store = Store(tmp_path / "t.db")
    for i, size in enumerate([400, 300, 200, 100, 250]):
        store.add_thumbnail({"request_id": f"r{i}", "camera_id": "cam-1", "ts": 100.0 + i, "bytes": size,
                             "jpeg": bytes(size)})
    store.flush()
    assert store.trim_thumbnails(10_000) == 0
    assert store.trim_thumbnails(600) == 2  # newest first: 250 + 100 + 200 = 550 fit, r1 (300 more) does not
    kept = {r["request_id"]: r["jpeg"] for r in store.db["thumbnails"].rows}
    assert set(kept) == {"r2", "r3", "r4"} and kept["r4"] == bytes(250)
    assert store.trim_thumbnails(0) == 3  # a budget of 0 keeps none (the site turned thumbnails off)
    assert thumbnail_budget_bytes(1.5) == 1_572_864
    store.close()


def test_a_disk_that_fills_stores_no_thumbnails_and_a_failing_one_buffers_few(tmp_path):
    store = Store(tmp_path / "t.db")
    store.disk_mode = DiskMode.LEAN
    store.add_thumbnail({"request_id": "r0", "camera_id": "cam-1", "ts": 1.0, "bytes": 1, "jpeg": b"x"})
    assert store.flush() == 0
    store.disk_mode = DiskMode.NORMAL
    for i in range(300):  # as while writes fail: 64 KiB each would be 19 MB of memory; only 256 are kept
        store.add_thumbnail({"request_id": f"r{i}", "camera_id": "cam-1", "ts": float(i), "bytes": 1, "jpeg": b"x"})
    assert store.dropped["thumbnails"] == 44
    assert store.flush() == 256
    store.close()


def test_a_thumbnail_topic_names_its_node_and_is_never_retained():
    topic = TOPICS.thumbnail("node-1")
    assert topic == "edgeprune/pipeline/thumbnail/node-1"
    assert TOPICS.publisher(topic) == "node-1" and TOPICS.is_data_topic(topic)
    assert not TOPICS.is_data_topic("edgeprune/pipeline/thumbnail/node-1/x")
