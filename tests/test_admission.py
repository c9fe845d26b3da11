"""What a node takes on receipt and what it still runs (node_agent/admission.py), at unit speed: no broker, no model.

docs/reliability.md: stage 1 announces every frame it takes, after checking its camera id, capture time and size;
from then on the frame ends as a row or a failure with its request id, and one older than ``max_frame_age_s`` when
stage 1 would run it ends ``expired``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from node_agent.admission import Admission, Report
from node_agent.runtime import Request
from shared import wire
from shared.schemas import BadMessage
from shared.settings import NodeSettings
from shared.topics import Topics

TOPICS = Topics("edgeprune")
FRAME_TOPIC = TOPICS.camera_frame("cam-1")
STAGE_2 = TOPICS.stage_input(2)


@dataclass
class Runtime:
    """A stand-in for the runtime an input is for: frames or activations, and a size limit."""

    takes_frames: bool
    limit: int = 1000

    def check_size(self, payload: bytes) -> None:
        if len(payload) > self.limit:
            raise BadMessage("oversized", f"{len(payload)} B over {self.limit} B")


FRAMES, ACTIVATIONS = Runtime(takes_frames=True), Runtime(takes_frames=False)


def admission(**settings) -> Admission:
    return Admission(NodeSettings(node_id="n1", memory_mb=100, **settings), TOPICS)


def frame(received: float = 1000.0, payload: bytes = b"jpeg", **props: str) -> Request:
    return Request(FRAME_TOPIC, payload, props, received)


def activation() -> bytes:
    return wire.encode(wire.Activation("cam-1-7", "cam-1", 990.0, 2, np.zeros((1, 2, 2, 2), np.float16)))


def expired(age_s: float, max_frame_age_s: float, runtime: Runtime = FRAMES) -> Report | None:
    req = frame()
    req.request_id, req.capture_ts = "r-1", 1000.0 - age_s  # as read on receipt
    return admission(max_frame_age_s=max_frame_age_s).expired(req, runtime, now=1000.0)


def test_a_frame_older_than_the_limit_expires_with_its_request_id_and_topic():
    report = expired(age_s=300.5, max_frame_age_s=300)
    assert (report.kind, report.request_id, report.topic) == ("expired", "r-1", FRAME_TOPIC)
    assert "300 s" in report.message


def test_a_frame_exactly_at_the_limit_is_still_run():
    assert expired(age_s=300, max_frame_age_s=300) is None
    assert expired(age_s=1, max_frame_age_s=300) is None


def test_a_limit_of_zero_never_expires_a_frame():
    assert expired(age_s=10_000, max_frame_age_s=0) is None


def test_only_the_node_that_takes_frames_expires_them():
    """A later stage serves what stage 1 took in time, however long it then waited."""
    assert expired(age_s=10_000, max_frame_age_s=300, runtime=ACTIVATIONS) is None


def test_a_frame_is_announced_with_what_was_read_once_and_kept_on_it():
    req = frame(request_id="r-9", capture_ts="999.5")
    receipt = admission().receive(req, FRAMES)
    assert receipt.taken and receipt.notes == ()
    a = receipt.announcement
    assert (a.request_id, a.camera_id, a.node_id, a.capture_ts, a.received_ts, a.claimed_capture_ts) == (
        "r-9", "cam-1", "n1", 999.5, 1000.0, None)
    assert (req.request_id, req.capture_ts, req.camera_id) == ("r-9", 999.5, "cam-1")


def test_an_implausible_capture_time_is_noted_and_the_frame_timed_from_arrival():
    req = frame(received=1e6, request_id="r-9", capture_ts=repr(1e6 - 90_000))
    receipt = admission(capture_past_s=86_400).receive(req, FRAMES)
    (note,) = receipt.notes
    assert (note.kind, note.request_id) == ("implausible_capture_ts", "r-9") and receipt.taken
    assert (receipt.announcement.capture_ts, receipt.announcement.claimed_capture_ts) == (1e6, 1e6 - 90_000)
    assert req.capture_ts == 1e6
    future = admission(capture_future_s=300).receive(frame(capture_ts="1400"), FRAMES)
    assert [n.kind for n in future.notes] == ["implausible_capture_ts"]


def test_an_oversized_frame_is_announced_then_refused_under_its_request_id():
    """Announced first: the gateway records the refusal as the accepted frame's failure."""
    receipt = admission().receive(frame(payload=b"x" * 1001, request_id="r-3"), FRAMES)
    assert receipt.announcement.request_id == "r-3"
    assert not receipt.taken and (receipt.refusal.kind, receipt.refusal.request_id) == ("oversized", "r-3")


@pytest.mark.parametrize("topic, props, kind", [
    ("edgeprune/camera/frame", {}, "bad_topic"),
    ("edgeprune/camera/cam 1/frame", {}, "bad_camera_id"),
    (FRAME_TOPIC, {"capture_ts": "soon"}, "bad_header"),
    (FRAME_TOPIC, {"request_id": "r" * 129}, "bad_header"),
])
def test_a_malformed_frame_is_refused_before_it_is_announced(topic, props, kind):
    with pytest.raises(BadMessage) as err:
        admission().receive(Request(topic, b"jpeg", props, 1000.0), FRAMES)
    assert err.value.kind == kind


def test_an_activation_is_read_from_its_header_and_never_announced():
    req = Request(STAGE_2, activation(), {}, 1000.0)
    receipt = admission().receive(req, ACTIVATIONS)
    assert receipt.taken and receipt.announcement is None and receipt.notes == ()
    assert (req.request_id, req.capture_ts) == ("cam-1-7", 990.0)
    refused = admission().receive(Request(STAGE_2, activation(), {}, 1000.0), Runtime(False, limit=10))
    assert (refused.refusal.kind, refused.refusal.request_id) == ("oversized", "cam-1-7")


def test_an_activation_whose_header_does_not_parse_is_taken_and_timed_from_arrival():
    """Reported when it is served (it fails to decode), under no request id."""
    req = Request(STAGE_2, b"garbage", {}, 1000.0)
    assert admission().receive(req, ACTIVATIONS).taken
    assert (req.request_id, req.capture_ts) == (None, 1000.0)
