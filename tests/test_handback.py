"""What a gone node's session held, re-sent to where the placement in force reads it (gateway/handback.py)."""

from __future__ import annotations

import numpy as np

from gateway.effects import Publish
from gateway.handback import HandBack, Taken
from shared import wire
from shared.topics import Topics
from tests.conftest import even_split

TOPICS = Topics()
FRAME_TOPIC = TOPICS.camera_frame("cam-1")
FRAME_USER = {"request_id": "F-1", "capture_ts": "10.0"}


def activation(next_block: int, request_id: str = "A-1") -> bytes:
    return wire.encode(wire.Activation(request_id, "cam-1", 10.0, next_block, np.zeros((1, 8, 4, 4), np.float32)))


def test_frames_go_back_on_their_topic_and_activations_to_the_stage_of_their_next_block():
    two = even_split(6, ["node-1", "node-2"])  # node-1 blocks 0..2, node-2 3..5
    three = even_split(6, ["node-1", "node-2", "node-3"])  # 0..1, 2..3, 4..5
    back = HandBack(TOPICS, max_age_s=30)
    held = [(FRAME_TOPIC, b"jpeg", FRAME_USER), (TOPICS.stage_input(2), activation(3), {"label": "cat"}),
            (TOPICS.stage_input(2), activation(4, "A-2"), {}), (TOPICS.node_command("node-2"), b"{}", {})]
    taken, sent = back.take(held, three, now=0.0)
    assert taken == Taken(inputs=3, sent=3, other=1)  # a command for the gone node is not re-sent
    assert sent == [Publish(FRAME_TOPIC, b"jpeg", user=FRAME_USER),
                    Publish(TOPICS.stage_input(2), activation(3), user={"label": "cat"}),  # 2..3 runs block 3
                    Publish(TOPICS.stage_input(3), activation(4, "A-2"))]
    assert len(back) == 0
    taken, sent = back.take([(TOPICS.stage_input(2), activation(3), {})], two, now=0.0)
    assert sent == [Publish(TOPICS.stage_input(2), activation(3))]


def test_an_activation_no_stage_reads_waits_for_a_placement_with_one_not_beyond_max_age():
    alone = even_split(6, ["node-1"])  # one stage: it reads camera frames, not activations
    back = HandBack(TOPICS, max_age_s=30)
    taken, sent = back.take([(TOPICS.stage_input(2), activation(3), {}), (FRAME_TOPIC, b"jpeg", FRAME_USER)],
                            alone, now=0.0)
    assert taken == Taken(inputs=2, sent=1, other=0) and [p.topic for p in sent] == [FRAME_TOPIC]
    assert back.release(alone, now=10.0) == [] and len(back) == 1
    assert back.release(even_split(6, ["node-1", "node-2"]), now=20.0) == [Publish(TOPICS.stage_input(2),
                                                                                   activation(3))]
    assert len(back) == 0

    back.take([(TOPICS.stage_input(2), activation(3), {})], alone, now=100.0)
    assert back.release(alone, now=131.0) == [] and len(back) == 0  # recorded lost by then: given up


def test_garbage_held_on_a_stage_input_is_dropped_and_the_waiting_inputs_are_bounded():
    alone = even_split(6, ["node-1"])
    back = HandBack(TOPICS, max_age_s=30, limit=2)
    taken, _ = back.take([(TOPICS.stage_input(2), b"not an activation", {})], alone, now=0.0)
    assert taken == Taken(inputs=0, sent=0, other=1)
    back.take([(TOPICS.stage_input(2), activation(3, f"A-{i}"), {}) for i in range(3)], alone, now=0.0)
    two = even_split(6, ["node-1", "node-2"])
    assert [wire.peek(p.payload).request_id for p in back.release(two, now=1.0)] == ["A-1", "A-2"]
