"""Inputs taken back from a gone node's broker session, re-sent to where the placement in force reads them.

A node acknowledges an input only once it has served it (or reported why not), so when it dies or hangs, what it had
not finished is still in its broker session. Once a placement without it is in force the gateway takes that session
over (``shared.bus.drain_session``, :class:`gateway.placing.Placing`) and hands the inputs here: a camera frame goes
back on its own topic (whichever node is stage 1, or ingests, now takes it), an activation to the stage that runs
its next block in its own pipeline (:func:`shared.routing.output_topic`). An activation no stage reads now (the
pipeline shrank to one stage, which reads camera frames) waits for a placement that has one, e.g. the dead node's
restart placed again; not beyond ``max_age_s`` (the gateway's ``result_timeout_s``: by then it has recorded the
frame lost).

Pure: time passed in, publishes returned.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from gateway.effects import Publish
from shared import handover, routing, wire
from shared.schemas import BadMessage, Placement
from shared.topics import Topics

log = logging.getLogger(__name__)
MAX_HELD = 10_000  # activations kept waiting for a stage at most; beyond, the oldest go (they end as lost)


@dataclass(frozen=True)
class HeldInput:
    topic: str
    payload: bytes
    user: dict[str, str]
    next_block: int | None  # None: a camera frame
    since: float

    @cached_property
    def key(self) -> str:
        """Names it in the gateway's database (``held_inputs``), where it waits across a gateway restart; hashed
        once (every tick compares what waits)."""
        return hashlib.sha256(self.topic.encode() + b"\0" + self.payload).hexdigest()[:32]


@dataclass(frozen=True)
class Taken:
    """What one session held: data inputs taken back, of which re-sent at once, and messages that were not data
    (the gone node's commands, the placement: for it alone, dropped)."""

    inputs: int
    sent: int
    other: int


class HandBack:
    def __init__(self, topics: Topics, max_age_s: float, limit: int = MAX_HELD):
        self.topics = topics
        self.max_age_s = max_age_s
        self.limit = limit
        self._waiting: deque[HeldInput] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> tuple[HeldInput, ...]:
        return tuple(self._waiting)

    def restore(self, held: Iterable[HeldInput]) -> None:
        """What a previous run of the gateway held and had not sent yet (its database): it waits here again."""
        self._waiting.extend(held)

    def take(self, messages: list[tuple[str, bytes, dict[str, str]]], placement: Placement | None, now: float,
             ) -> tuple[Taken, list[Publish]]:
        """Sort what a session held into inputs and the rest; the inputs ``placement`` has a stage for, to send."""
        inputs = [held for held in (self._input(topic, payload, user, now) for topic, payload, user in messages)
                  if held is not None]
        self._waiting.extend(inputs)
        while len(self._waiting) > self.limit:
            dropped = self._waiting.popleft()
            log.warning("hand-back: more than %d inputs wait for a stage; the oldest (%s) is given up",
                        self.limit, dropped.topic)
        sent = self.release(placement, now)
        return Taken(len(inputs), len(sent), len(messages) - len(inputs)), sent

    def release(self, placement: Placement | None, now: float) -> list[Publish]:
        """The waiting inputs ``placement`` has a stage for, to send (in the order they were held); the rest wait,
        those older than ``max_age_s`` are given up."""
        if placement is None:
            return []
        sent, kept = [], deque()
        for held in self._waiting:
            topic = held.topic if held.next_block is None else routing.output_topic(
                self.topics, placement, self.topics.pipeline_of_input(held.topic), held.next_block)
            if topic is not None:
                sent.append(Publish(topic, held.payload, user=held.user or None))
            elif now - held.since <= self.max_age_s:
                kept.append(held)
        self._waiting = kept
        return sent

    def _input(self, topic: str, payload: bytes, user: dict[str, str], now: float) -> HeldInput | None:
        """A camera frame or an activation (its next block read from the header), else None."""
        if self.topics.camera_id_from_frame_topic(topic) is not None:
            return HeldInput(topic, payload, user, None, now)
        if not self.topics.is_data_topic(topic) or handover.is_marker(user):  # a hand-over marker: the gone node's
            return None
        try:
            header = wire.peek(payload)
        except BadMessage as exc:  # it would have been refused at the stage too
            log.error("hand-back: a held message on %s is no activation (%s); dropped", topic, exc)
            return None
        return HeldInput(topic, payload, user, header.next_block, now)
