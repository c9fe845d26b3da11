"""A stage topic taken over from its old reader in a move (node_agent/input_handover.py, shared/handover.py): the new
reader holds what comes until the old reader's marker, serves what the old reader did not take, and nothing twice.

The loss this prevents (docs/placement.md): in a `hetero4` run an activation reached the old reader of stage 2 just
after it had switched to stage 3 and the new reader before its own switch; each left it to the other."""

from __future__ import annotations

import time

import numpy as np
import pytest

from camera.simulator import camera_frame
from node_agent import agent as agent_module
from node_agent.agent import NodeAgent
from node_agent.input_handover import InputHandover
from node_agent.runtime import Request, StageRuntime
from shared import handover, wire
from shared.schemas import BadMessage, StageAssignment
from shared.settings import MqttSettings, NodeSettings
from tests.test_assignment import placement


def test_the_inputs_the_old_reader_took_are_dropped_and_the_rest_served_in_order():
    box: InputHandover[str] = InputHandover(timeout_s=5)
    for rid in ("r1", "r2", "r3"):
        box.hold("t", rid, f"input {rid}", old_reader="b")
    assert box.holding("t") and box.marker("t", "x", "r1", leaving="b") is None  # another node's marker: not ours
    assert box.marker("t", "b", "r1", leaving="b") == ["input r2", "input r3"]
    assert not box.holding("t") and box.handed_over("t")


def test_a_marker_naming_nothing_held_releases_everything_held():
    """This node subscribed after the old reader's last input (or it took none): all it holds came after."""
    box: InputHandover[str] = InputHandover(timeout_s=5)
    box.hold("t", "r7", "input r7", old_reader="b")
    assert box.marker("t", "b", "r5", leaving="b") == ["input r7"]
    box.hold("u", "r8", "input r8", old_reader="b")
    assert box.marker("u", "b", None, leaving="b") == ["input r8"]


def test_a_marker_before_any_input_makes_later_inputs_this_nodes():
    box: InputHandover[str] = InputHandover(timeout_s=5)
    assert box.marker("t", "b", "r1", leaving="b") == [] and box.handed_over("t")
    assert box.marker("u", "b", "r1", leaving=None) is None and not box.handed_over("u")  # not taking u over


def test_held_copies_wait_while_only_prepared_and_are_served_once_the_marker_is_overdue():
    box: InputHandover[str] = InputHandover(timeout_s=5)
    box.hold("t", "r1", "input r1", old_reader="b")
    box.hold("u", "r2", "input r2", old_reader="c")
    assert box.expire(now=1e9) == []  # prepared only: the old reader still serves the topic, no deadline
    box.in_force({"t"}, now=100.0)  # this node reads t now, not u: u's copies are its reader's
    assert not box.holding("u") and box.expire(now=104.9) == []
    assert box.expire(now=105.0) == [("t", ["input r1"])] and not box.holding("t")


def test_a_malformed_marker_is_refused():
    assert handover.parse_marker(b"", handover.marker_user("node-3", None)) == handover.Marker("node-3", None)
    for payload, user in [(b"x", handover.marker_user("node-3", "r1")), (b"", {handover.FROM: ""}),
                          (b"", handover.marker_user("n" * 300, "r1"))]:
        with pytest.raises(BadMessage):
            handover.parse_marker(payload, user)


# --- two node agents in process (no broker): the old and the new reader of stage 2 --------------------------------
V1 = placement(1, ("a", 0, 1), ("b", 2, 2), ("c", 3, 5))
V2 = placement(2, ("a", 0, 0), ("c", 1, 2), ("b", 3, 5))  # stage 2's topic: b reads it under v1, c under v2


def agent(node_id: str, **settings) -> tuple[NodeAgent, list, list]:
    """A node agent with v1 in force whose publishes and taken inputs are recorded instead of sent and served."""
    node = NodeAgent(NodeSettings(node_id=node_id, memory_mb=100, **settings), MqttSettings())
    published: list[tuple[str, bytes, dict]] = []
    served: list[str] = []
    node.bus.publish = lambda topic, payload, *args, user=None, **kwargs: published.append((topic, payload, user))
    node.bus.subscribe = lambda topic, *args, subscribed=None, **kwargs: subscribed and subscribed()
    node.bus.unsubscribe = lambda topic: None
    node.bus.report_error = lambda *args: published.append(("error", args, None))
    node._publish_stats = lambda: None
    node.server.receive = lambda runtime, req, ack: served.append(req.request_id or _request_id(req.payload))
    node._on_placement("placement", V1.model_dump_json().encode(), {})
    return node, published, served


def _request_id(payload: bytes) -> str:
    return wire.peek(payload).request_id


def activation(node: NodeAgent, request_id: str) -> Request:
    """What stage 1 of v1 (blocks 0..1) sends stage 2 for one frame: an activation whose next block is 2."""
    first = StageRuntime(node.model, "a", StageAssignment(stage=1, node_id="a", first_block=0, last_block=1), 3,
                         node.topics.stage_input(2))
    frame = camera_frame(np.random.default_rng(len(request_id)), 64, "png")
    out = first.run(Request(node.topics.camera_frame("cam-1"), frame, {"request_id": request_id,
                                                                       "capture_ts": repr(time.time())},
                            time.time(), camera_id="cam-1"), started_ts=time.time())
    return Request(node.topics.stage_input(2), out.payload, out.user or {}, time.time())


def deliver(node: NodeAgent, req: Request) -> None:
    node._on_input(req.topic, req.payload, dict(req.user_props), lambda: None)


def test_an_activation_between_the_old_readers_switch_and_the_new_readers_is_served_once():
    old, old_sent, old_served = agent("b")
    new, _, new_served = agent("c")
    new._prepare(V2)  # c builds blocks 1..2 and subscribes stage 2's topic ahead of v2
    first, second = activation(old, "r1"), activation(old, "r2")
    deliver(old, first)
    deliver(new, first)  # b serves it under v1; c holds its copy
    old._on_placement("placement", V2.model_dump_json().encode(), {})  # b switches to stage 3 first
    ((topic, payload, user),) = [m for m in old_sent if m[0] == old.topics.stage_input(2)]
    assert payload == b"" and user == handover.marker_user("b", "r1")  # where b stopped
    deliver(old, second)
    deliver(new, second)  # after b's switch, before c's: b leaves it; before the marker c left it too (lost)
    new._on_input(topic, payload, user, lambda: None)  # b's marker reaches c
    assert old_served == ["r1"] and new_served == ["r2"]  # each input served once
    third = activation(old, "r3")
    deliver(new, third)  # handed over: c serves stage 2's topic with what it prepared, before v2 reaches it
    assert new_served == ["r2", "r3"]


def test_without_the_old_readers_marker_the_held_inputs_are_served_after_the_timeout(monkeypatch):
    new, _, new_served = agent("c", handover_timeout_s=30)
    new._prepare(V2)
    deliver(new, activation(new, "r1"))  # b, still stage 2 under v1 and then dead, never sends its marker
    new._on_placement("placement", V2.model_dump_json().encode(), {})
    new._release_overdue()
    assert new_served == []  # the old reader may still be about to say where it stopped
    later = time.time() + 31
    monkeypatch.setattr(agent_module.time, "time", lambda: later)
    new._release_overdue()
    assert new_served == ["r1"]
