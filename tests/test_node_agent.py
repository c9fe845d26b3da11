"""The node agent's serving path (node_agent/serving.py) in-process, without a broker: what it publishes is recorded.

docs/reliability.md: a frame older than ``[node] max_frame_age_s`` when stage 1 would run it ends as
``expired`` (reported with its request id, so the gateway records the failure), and is not run. The rule itself is
tested at unit speed in tests/test_admission.py; here, that the data path carries it out.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from camera.simulator import camera_frame
from node_agent.agent import NodeAgent
from node_agent.runtime import Request, StageRuntime
from shared.schemas import ErrorRecord, Result, StageAssignment, parse_json
from shared.settings import MqttSettings, NodeSettings


@pytest.fixture(scope="module")
def frame() -> bytes:
    return camera_frame(np.random.default_rng(3), 64, "png")


def serve(frame: bytes, age_s: float, max_frame_age_s: float, stage: int = 1, n_stages: int = 1):
    """One frame captured ``age_s`` ago through the agent's serving path; the messages it published."""
    agent = NodeAgent(NodeSettings(node_id="a", memory_mb=100, max_frame_age_s=max_frame_age_s), MqttSettings())
    published: list[tuple[str, bytes]] = []
    agent.bus.publish = lambda topic, payload, *args, **kwargs: published.append((topic, payload))
    n_blocks = agent.model.n_blocks
    assignment = StageAssignment(stage=stage, node_id="a", first_block=0, last_block=n_blocks - 1)
    runtime = StageRuntime(agent.model, "a", assignment, n_stages, agent.topics.results("a"))
    captured = time.time() - age_s
    req = Request(agent.topics.camera_frame("cam-1"), frame, {"request_id": "r-1", "capture_ts": repr(captured)},
                  time.time(), camera_id="cam-1", request_id="r-1", capture_ts=captured)  # as read on receipt
    agent.server._serve(runtime, req)
    return agent, published


def test_a_frame_older_than_the_limit_is_reported_expired_with_its_request_id_and_not_run(frame):
    agent, published = serve(frame, age_s=1000, max_frame_age_s=300)
    ((topic, payload),) = published
    record = parse_json(ErrorRecord, payload)
    assert topic == agent.topics.errors("a") and (record.kind, record.request_id) == ("expired", "r-1")
    assert agent.server.health()["processed"] == 0


def test_a_frame_within_the_limit_is_run(frame):
    agent, published = serve(frame, age_s=1, max_frame_age_s=300)
    ((topic, payload),) = published
    assert topic == agent.topics.results("a") and parse_json(Result, payload).request_id == "r-1"
    assert agent.server.health()["processed"] == 1 and not agent.bus.errors


def test_a_limit_of_zero_never_expires_a_frame(frame):
    agent, published = serve(frame, age_s=1000, max_frame_age_s=0)
    assert [topic for topic, _ in published] == [agent.topics.results("a")] and agent.server.health()["processed"] == 1


def test_only_stage_1_expires_frames(frame):
    """A later stage serves what stage 1 took in time, however long it then waited (deadline order may defer it)."""
    agent = NodeAgent(NodeSettings(node_id="b", memory_mb=100, max_frame_age_s=300), MqttSettings())
    published: list[tuple[str, bytes]] = []
    agent.bus.publish = lambda topic, payload, *args, **kwargs: published.append((topic, payload))
    first = StageAssignment(stage=1, node_id="a", first_block=0, last_block=1)
    second = StageAssignment(stage=2, node_id="b", first_block=2, last_block=agent.model.n_blocks - 1)
    upstream = StageRuntime(agent.model, "a", first, 2, agent.topics.stage_input(2))
    captured = time.time() - 1000
    out = upstream.run(Request(agent.topics.camera_frame("cam-1"), frame, {"request_id": "r-2",
                                                                           "capture_ts": repr(captured)},
                               captured, camera_id="cam-1"), started_ts=captured)
    runtime = StageRuntime(agent.model, "b", second, 2, agent.topics.results("b"))
    agent.server._serve(runtime, Request(out.topic, out.payload, out.user or {}, time.time()))
    ((topic, payload),) = published
    assert topic == agent.topics.results("b") and parse_json(Result, payload).request_id == "r-2"
