"""Whether a node takes an input, read once on receipt, and whether a frame is still worth running when its turn
comes: pure (the clock is passed in; what to report and announce is returned for the data path to send).

On receipt (:meth:`Admission.receive`) a camera frame's camera id, request id and capture time are checked and the
frame is announced, then every input's size; an activation's request id and capture time are read from its header.
What is read is kept on the :class:`node_agent.runtime.Request`, so the queue, the failure reports and the decode
agree without reading it again. From its announcement on a frame is *accepted* (docs/reliability.md): it must end as
a result row or a failure with a reason, so every refusal after it carries its request id. A frame whose topic,
camera id or metadata is malformed is refused before it is announced (:class:`shared.schemas.BadMessage`, raised:
there is no request id to report it under).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from node_agent.runtime import Request, frame_metadata, plausible_capture
from shared import wire
from shared.schemas import AcceptedRequest, BadMessage
from shared.settings import NodeSettings
from shared.topics import Topics, validate_id


class Receiver(Protocol):
    """The runtime an input is for (:class:`node_agent.runtime.StageRuntime` or ``IngestRuntime``)."""

    takes_frames: bool  # camera frames (stage 1, or the ingest node before it), not activations

    def check_size(self, payload: bytes) -> None: ...  # BadMessage("oversized") over the node's limit


@dataclass(frozen=True)
class Report:
    """One line on the node's error topic (:meth:`shared.bus.Bus.report_error`)."""

    topic: str
    kind: str
    message: str
    request_id: str | None = None


@dataclass(frozen=True)
class Receipt:
    """What to send for one input received, in this order: ``notes`` (the input is taken all the same), the frame's
    ``announcement``, and the ``refusal`` if it is not taken (a frame is announced before its size check)."""

    notes: tuple[Report, ...] = ()
    announcement: AcceptedRequest | None = None
    refusal: Report | None = None

    @property
    def taken(self) -> bool:
        return self.refusal is None


class Admission:
    """The node's rules for what it takes (``[node]`` capture-time bounds, size limit) and what it still runs
    (``max_frame_age_s``)."""

    def __init__(self, settings: NodeSettings, topics: Topics):
        self.settings = settings
        self.topics = topics

    def receive(self, req: Request, runtime: Receiver) -> Receipt:
        """Read ``req``'s request id and capture time into it, announce it if it is a frame, check its size."""
        notes: tuple[Report, ...] = ()
        announcement = None
        if runtime.takes_frames:
            notes, announcement = self._frame(req)
        else:  # an activation's header carries them; a malformed one is reported when served, timed from arrival
            header = _peek(req.payload)
            req.request_id, req.capture_ts = ((header.request_id, header.capture_ts) if header
                                              else (None, req.received_ts))
        try:
            runtime.check_size(req.payload)
        except BadMessage as exc:
            return Receipt(notes, announcement, Report(req.topic, exc.kind, str(exc), req.request_id))
        return Receipt(notes, announcement)

    def _frame(self, req: Request) -> tuple[tuple[Report, ...], AcceptedRequest]:
        """A camera frame's camera id and times checked, and its announcement; a capture time no camera's clock could
        give is noted and replaced by the arrival's (the claimed one goes along in the announcement)."""
        camera_id = self.topics.camera_id_from_frame_topic(req.topic)
        if camera_id is None:
            raise BadMessage("bad_topic", f"frame topic {req.topic} does not name a camera")
        try:
            validate_id("camera", camera_id)
        except ValueError as exc:
            raise BadMessage("bad_camera_id", str(exc)) from None
        req.camera_id = camera_id
        request_id, capture_ts = frame_metadata(req)
        notes: tuple[Report, ...] = ()
        claimed = None
        if not plausible_capture(capture_ts, req.received_ts, self.settings.capture_past_s,
                                 self.settings.capture_future_s):
            claimed, req.capture_ts = capture_ts, req.received_ts
            notes = (Report(req.topic, "implausible_capture_ts", f"capture time {claimed!r} is "
                            f"{req.received_ts - claimed:.0f} s before arrival: timed from arrival instead",
                            request_id),)
        announcement = AcceptedRequest(request_id=request_id, camera_id=camera_id, node_id=self.settings.node_id,
                                       capture_ts=req.capture_ts, received_ts=req.received_ts,
                                       claimed_capture_ts=claimed)
        return notes, announcement

    def expired(self, req: Request, runtime: Receiver, now: float) -> Report | None:
        """Why a frame is not run at ``now``: a camera frame that waited (in the broker or the queue) more than
        ``max_frame_age_s`` since its capture (0: no limit). A later stage serves what stage 1 took in time,
        however long it then waited."""
        max_age = self.settings.max_frame_age_s
        if not runtime.takes_frames or not max_age:
            return None
        age = now - req.capture_ts
        if age <= max_age:
            return None
        return Report(req.topic, "expired", f"frame captured {age:.0f} s ago (limit {max_age:g} s): not run",
                      req.request_id)


def _peek(payload: bytes) -> wire.Header | None:
    """An activation's header (its request id and capture time), if it parses."""
    try:
        return wire.peek(payload)
    except BadMessage:
        return None
