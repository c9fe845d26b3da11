"""The gateway's decisions without a broker, a database or a clock: each message in, the effects out."""

from __future__ import annotations

import json

from gateway.coordinator import Coordinator, Effects
from gateway.operator import Overrides
from shared.model import DEFAULT_CHECKPOINT, MODEL_NAME
from shared.schemas import (
    AcceptedRequest,
    ErrorRecord,
    Hop,
    ModelProfile,
    NodeProfile,
    NodeStats,
    Placement,
    Result,
    StageAssignment,
    to_json,
)
from shared.settings import ControllerSettings, GatewaySettings
from shared.topics import Topics
from tests.conftest import even_split

TOPICS = Topics()


def coordinator(tmp_path, nodes=("node-1", "node-2")) -> Coordinator:
    settings = GatewaySettings(db_path=tmp_path / "unused.db", nodes=list(nodes))
    return Coordinator(settings, Overrides(settings, ControllerSettings(), {}), TOPICS, "weights", 12288, None, {},
                       [], now=0.0)


def offer(c: Coordinator, node: str, now: float = 1.0) -> None:
    """What a node agent says when it starts: its profile (the shipped one) and that it is online."""
    profile = ModelProfile.model_validate_json(DEFAULT_CHECKPOINT.with_name("trapnet.profile.json").read_text())
    offered = NodeProfile(node_id=node, model_fingerprint="weights", memory_mb=500, uplink_mbit_s=100, profile=profile)
    assert c.on_profile(offered, to_json(offered), now).refusal is None
    c.on_status(node, "online", now)


def stats(node: str, ts: float, prepared_version: int | None = None) -> NodeStats:
    return NodeStats(node_id=node, ts=ts, prepared_version=prepared_version, queue_depth=0, queue_capacity=16,
                     processed=0, dropped=0, cpu_percent=1.0, prune_ratio=0.0)


def placed(c: Coordinator, placement: Placement) -> None:
    c.live.current = c.handover.active = placement


def result(request_id: str) -> Result:
    hop = Hop(stage=1, node_id="node-1", prune_ratio=0.0, received_ts=10.01, started_ts=10.02, finished_ts=10.05,
              published_ts=10.06)
    return Result(request_id=request_id, camera_id="cam-1", capture_ts=10.0, label="cat", label_index=1,
                  confidence=0.9, hops=[hop])


def command(c: Coordinator, payload: dict, now: float = 50.0) -> Effects:
    return c.on_command(json.dumps(payload).encode(), now)


def test_a_result_no_stage_1_announced_is_refused_and_never_stored(tmp_path):
    c = coordinator(tmp_path)
    effects = c.on_result(result("never-announced"), to_json(result("never-announced")), now=10.2)
    assert effects.refusal is not None and effects.refusal.kind == "unknown_result"
    assert effects.rows("add_request") == [] and c.slo.close_all() == []  # no row, no SLO sample

    accepted = AcceptedRequest(request_id="r-1", camera_id="cam-1", node_id="node-1", capture_ts=10.0,
                               received_ts=10.01)
    assert c.on_accepted(accepted, now=10.01).rows("add_accepted") == [accepted.model_dump()]
    effects = c.on_result(result("r-1"), to_json(result("r-1")), now=10.2)
    assert effects.refusal is None and [r["request_id"] for r in effects.rows("add_request")] == ["r-1"]


def test_retiring_a_node_clears_every_retained_topic_about_it(tmp_path):
    c = coordinator(tmp_path)
    effects = command(c, {"cmd": "retire", "node_id": "node-2", "id": "c1", "by": "ana"})
    cleared = {p.topic for p in effects.publish if p.payload == b"" and p.retain}
    assert cleared == {f"edgeprune/node/node-2/{leaf}"
                       for leaf in ("status", "profile", "calibration", "prune/set", "prune/state")}
    assert effects.rows("update_node") == [{"node_id": "node-2", "status": "retired", "status_ts": 50.0}]
    (reply,) = [json.loads(p) for p in effects.sent(TOPICS.component_reply("gateway"))]
    assert reply["ok"] and reply["id"] == "c1"


def test_a_node_online_in_the_placement_is_not_retired(tmp_path):
    c = coordinator(tmp_path)
    placed(c, even_split(6, ["node-1", "node-2"]))
    offer(c, "node-2")
    effects = command(c, {"cmd": "retire", "node_id": "node-2", "id": "c1"})
    assert effects.refusal is not None and effects.refusal.kind == "rejected_command"
    assert not [p for p in effects.publish if p.retain]


def test_a_replica_that_goes_offline_has_its_session_taken_over(tmp_path):
    c = coordinator(tmp_path, nodes=("node-1", "node-2", "node-3"))
    placement = Placement(version=7, model=MODEL_NAME, n_blocks=6, issued_at=0.0, share_token="tok3n-abcd", stages=[
        StageAssignment(stage=1, node_id="node-1", first_block=0, last_block=2),
        StageAssignment(stage=2, node_id="node-2", replicas=["node-3"], first_block=3, last_block=5)])
    placed(c, placement)
    assert c.on_status("node-3", "online", now=1.0).drains == []
    assert c.on_status("node-1", "offline", now=2.0).drains == []  # not replicated: re-placed, nothing to drain
    effects = c.on_status("node-3", "offline", now=3.0)
    assert effects.drains == [("node-3", TOPICS.shared(2, "tok3n-abcd"))]
    assert effects.rows("update_node") == [{"node_id": "node-3", "status": "offline", "status_ts": 3.0}]


def test_a_status_that_is_not_an_availability_is_refused(tmp_path):
    effects = coordinator(tmp_path).on_status("node-1", "sleepy", now=1.0)
    assert effects.refusal is not None and effects.refusal.kind == "bad_status" and effects.store == []


def test_only_a_pipeline_node_or_the_gateway_ends_a_frame_and_a_warning_never_does(tmp_path):
    """docs/reliability.md: an accepted frame ends as a row or a failure a stage reported; a camera's or the page's
    error record naming it, or a warning (an implausible capture time: still served), is stored, nothing more."""
    c = coordinator(tmp_path)
    c.on_accepted(AcceptedRequest(request_id="r-1", camera_id="cam-1", node_id="node-1", capture_ts=10.0,
                                  received_ts=10.01), now=10.01)

    def error(component: str, kind: str) -> Effects:
        return c.on_error(ErrorRecord(component=component, ts=11.0, topic="t", kind=kind, message="m",
                                      request_id="r-1"))
    for component, kind in (("node-1", "implausible_capture_ts"), ("cam-1", "bad_image"), ("web", "internal")):
        effects = error(component, kind)
        assert [r["kind"] for r in effects.rows("add_error")] == [kind] and effects.rows("add_failure") == []
    assert c.ledger.in_flight == 1
    assert [r["reason"] for r in error("node-1", "bad_image").rows("add_failure")] == ["bad_image"]
    assert c.ledger.in_flight == 0


def test_a_placement_is_published_once_every_node_it_moves_has_subscribed(tmp_path):
    c = coordinator(tmp_path)
    for node in ("node-1", "node-2"):
        offer(c, node)
    effects = c.tick(2.0)
    assert effects.sent(TOPICS.placement) == []  # both nodes get a new input: they prepare first
    asked = {node: json.loads(effects.sent(TOPICS.node_command(node))[0]) for node in ("node-1", "node-2")}
    version = asked["node-1"]["placement"]["version"]
    assert {a["cmd"] for a in asked.values()} == {"prepare"} and asked["node-2"]["placement"]["version"] == version
    assert c.on_stats(stats("node-1", 2.5, prepared_version=version), now=2.5).sent(TOPICS.placement) == []
    effects = c.on_stats(stats("node-2", 2.6, prepared_version=version), now=2.6)
    (payload,) = effects.sent(TOPICS.placement)
    published = Placement.model_validate_json(payload)
    assert published.version == version and [s.node_id for s in published.stages] == ["node-1", "node-2"]
    assert [row["version"] for row in effects.rows("add_placement")] == [version]
