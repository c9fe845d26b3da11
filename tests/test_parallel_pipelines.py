"""Parallel pipelines (docs/scaling.md, "Parallel pipelines"): the placement message, the topics, where a node reads and
writes, and the gateway adopting the hybrid planner's parallel plans."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeprune.credentials import render_acl
from gateway.hybrid import HybridPlan, HybridStage
from gateway.live_placement import Handover, HybridTarget, LivePlacement, PlacementRules, hybrid_placement, input_of
from shared import routing
from shared.schemas import Placement, StageAssignment, to_json
from shared.topics import Topics
from tests.test_live_placement import offer

TOPICS = Topics("site/a")


def two_pipelines(token: str | None = "tok3n-abcd") -> Placement:
    """Pipeline 0: a (blocks 0-2) -> b (3-5); pipeline 1: c (0-3) -> d (4-5)."""
    return Placement(version=3, model="trapnet", n_blocks=6, issued_at=0.0, share_token=token, stages=[
        StageAssignment(stage=1, node_id="a", first_block=0, last_block=2),
        StageAssignment(stage=2, node_id="b", first_block=3, last_block=5),
        StageAssignment(stage=1, node_id="c", first_block=0, last_block=3, pipeline=1),
        StageAssignment(stage=2, node_id="d", first_block=4, last_block=5, pipeline=1)])


# --- the placement message -------------------------------------------------------------------------
def test_a_placement_of_one_pipeline_serialises_byte_for_byte_as_before():
    before = (b'{"version":1,"model":"trapnet","n_blocks":6,"stages":[{"stage":1,"node_id":"a","first_block":0,'
              b'"last_block":2},{"stage":2,"node_id":"b","first_block":3,"last_block":5}],"issued_at":0.0,'
              b'"bottleneck_s":null,"ingest_node":null}')
    placement = Placement.model_validate_json(before)
    assert [s.pipeline for s in placement.stages] == [0, 0] and to_json(placement) == before
    assert placement.pipelines == [placement.stages]


def test_parallel_pipelines_round_trip_with_their_numbers():
    placement = two_pipelines()
    again = Placement.model_validate_json(to_json(placement))
    assert again == placement and [len(p) for p in again.pipelines] == [2, 2]
    assert b'"pipeline":1' in to_json(placement) and to_json(placement).count(b'"pipeline"') == 2  # 0 left out
    assert [again.is_last(s) for s in again.stages] == [False, True, False, True]
    assert [again.shares_input(s) for s in again.stages] == [True, False, True, False]  # first stages deal frames


@pytest.mark.parametrize("change, message", [
    (lambda s: s[:2] + [s[2].model_copy(update={"pipeline": 2}), s[3].model_copy(update={"pipeline": 2})],
     "numbered 0..m"),
    (lambda s: [s[2], s[3], s[0], s[1]], "numbered 0..m"),  # listed out of order
    (lambda s: s[:3], "pipeline 1's stages cover blocks 0..3"),
    (lambda s: s[:3] + [s[3].model_copy(update={"node_id": "a"})], "appears in two stages"),
    (lambda s: s[:2] + [s[3].model_copy(update={"stage": 1}), s[2].model_copy(update={"stage": 2})],
     "starts at block"),
])
def test_a_malformed_parallel_placement_is_refused(change, message):
    stages = two_pipelines().stages
    with pytest.raises(ValidationError, match=message):
        Placement(version=1, model="trapnet", n_blocks=6, issued_at=0.0, share_token="tok3n-abcd",
                  stages=change(stages))


def test_parallel_pipelines_need_a_share_token_and_no_ingest_node():
    with pytest.raises(ValidationError, match="share_token"):
        two_pipelines(token=None)
    with pytest.raises(ValidationError, match="ingest node feeds one pipeline"):
        Placement.model_validate({**two_pipelines().model_dump(), "ingest_node": "e"})


# --- topics and the broker's rights ----------------------------------------------------------------------
def test_each_pipeline_has_its_own_stage_topics_and_the_first_pipelines_are_unchanged():
    assert TOPICS.stage_input(2) == TOPICS.stage_input(2, 0) == "site/a/pipeline/stage/2/in"
    assert TOPICS.stage_input(2, 1) == "site/a/pipeline/p1/stage/2/in"
    assert TOPICS.is_data_topic("site/a/pipeline/p1/stage/2/in") and TOPICS.is_data_topic(TOPICS.stage_input(3))
    assert not TOPICS.is_data_topic("site/a/pipeline/px/stage/2/in")
    assert not TOPICS.is_data_topic("site/a/pipeline/p1/stage/2/out")
    with pytest.raises(ValueError):
        TOPICS.stage_input(2, -1)


def test_every_first_stage_joins_one_group_and_later_stages_their_pipelines_own():
    frames = "$share/site-a-stage-1-tok/site/a/camera/+/frame"
    assert TOPICS.shared(1, "tok", pipeline=1) == TOPICS.shared(1, "tok") == frames
    assert TOPICS.shared(2, "tok", pipeline=1) == "$share/site-a-p1-stage-2-tok/site/a/pipeline/p1/stage/2/in"
    assert TOPICS.shared(2, "tok") == "$share/site-a-stage-2-tok/site/a/pipeline/stage/2/in"


def test_nodes_may_write_and_the_gateway_re_publish_every_pipelines_stage_inputs():
    acl = render_acl({"node-1": "node", "gw": "gateway"}, "site", "gw")
    node, gateway = acl.split("user gw\n")[1].split("user node-1\n")[::-1]
    assert "topic readwrite site/pipeline/+/stage/+/in\n" in node
    assert "topic write site/pipeline/+/stage/+/in\n" in gateway


# --- where a node reads and writes -------------------------------------------------------------------------
def test_first_stages_share_the_frames_later_stages_read_their_own_pipeline():
    placement = two_pipelines()
    frames = "$share/site-a-stage-1-tok3n-abcd/site/a/camera/+/frame"
    assert routing.input_filter(TOPICS, placement, "a") == routing.input_filter(TOPICS, placement, "c") == frames
    assert routing.input_filter(TOPICS, placement, "b") == "site/a/pipeline/stage/2/in"
    assert routing.input_filter(TOPICS, placement, "d") == "site/a/pipeline/p1/stage/2/in"
    assert routing.input_filter(TOPICS, placement, "e") is None


def test_a_stage_of_one_pipeline_reads_its_input_plain_as_before():
    placement = Placement(version=1, model="trapnet", n_blocks=6, issued_at=0.0, stages=[
        StageAssignment(stage=1, node_id="a", first_block=0, last_block=2),
        StageAssignment(stage=2, node_id="b", first_block=3, last_block=5)])
    assert routing.input_filter(TOPICS, placement, "a") == TOPICS.camera_frame_filter
    assert routing.input_filter(TOPICS, placement, "b") == TOPICS.stage_input(2)


def test_an_output_goes_to_the_next_stage_of_its_own_pipeline():
    placement = two_pipelines()
    assert routing.output_topic(TOPICS, placement, 0, 3) == "site/a/pipeline/stage/2/in"
    assert routing.output_topic(TOPICS, placement, 1, 4) == "site/a/pipeline/p1/stage/2/in"
    # pipeline 1 runs block 3 in its stage 1: an activation for it (queued before a move) goes to its stage 2,
    # which serves activations for any block
    assert routing.output_topic(TOPICS, placement, 1, 3) == "site/a/pipeline/p1/stage/2/in"
    assert routing.output_topic(TOPICS, placement, 5, 3) == "site/a/pipeline/stage/2/in"  # a pipeline gone: the first
    one = Placement(version=1, model="trapnet", n_blocks=6, issued_at=0.0,
                    stages=[StageAssignment(stage=1, node_id="a", first_block=0, last_block=5)])
    assert routing.output_topic(TOPICS, one, 0, 3) is None  # no later stage: the node's own topic (results)
    assert routing.output_topic(TOPICS, one, 0, 0) is None  # a decoded frame without an ingest placement


# --- the gateway ---------------------------------------------------------------------------------------------
def test_a_parallel_plan_becomes_one_placement_with_numbered_pipelines():
    plan = HybridPlan(((HybridStage(0, 2, ("a",)), HybridStage(3, 5, ("b",))),
                       (HybridStage(0, 3, ("c", "e")), HybridStage(4, 5, ("d",)))), 10.0, 20.0, 0.1, None)
    placement = hybrid_placement(plan, 5, "trapnet", 6, 1.0, "tok3n-abcd")
    assert [(s.pipeline, s.stage, s.nodes) for s in placement.stages] == [
        (0, 1, ["a"]), (0, 2, ["b"]), (1, 1, ["c", "e"]), (1, 2, ["d"])]
    assert placement.share_token == "tok3n-abcd" and placement.bottleneck_s == pytest.approx(0.05)


def parallel_live(min_parallel: int = 2, **speeds: float) -> LivePlacement:
    """Nodes a-d of six 10 ms x speed blocks each (speed 1 unless given), placed by the hybrid planner for 40 frames/s
    (``min_parallel`` 2: ``placement_mode = "parallel"``, 1: ``"hybrid"``)."""
    nodes = ["a", "b", "c", "d"]
    live = LivePlacement(PlacementRules(20, 10, 0.1), "trapnet", "abc", nodes, started=0,
                         hybrid=HybridTarget(40.0, 1.0, min_parallel=min_parallel))
    for node in nodes:
        live.set_status(node, "online", 0)
        live.set_offer(offer(node, speeds.get(node, 1.0)))
    return live


def test_hybrid_mode_runs_parallel_pipelines_when_the_planner_picks_them():
    """Two fast and two half-speed nodes: the planner's best is two pipelines, each a half-speed node running the first
    blocks for a fast one; hybrid mode places exactly that."""
    placement = parallel_live(min_parallel=1, c=2.0, d=2.0).tick(1)
    assert [(s.pipeline, s.stage, s.nodes) for s in placement.stages] == [
        (0, 1, ["c"]), (0, 2, ["a"]), (1, 1, ["d"]), (1, 2, ["b"])]
    assert placement.share_token


def test_the_gateway_runs_the_planners_parallel_pipelines():
    live = parallel_live()
    placement = live.tick(1)
    assert placement is not None and len(placement.pipelines) >= 2 and placement.share_token
    assert sorted(placement.node_ids()) == ["a", "b", "c", "d"]
    assert live.replan_for_slowdowns({"a": 3.0}, 2) is None  # the controller prunes; blocks are not moved
    assert live.tick(3) is None  # nothing changed: no new placement
    gone = placement.pipelines[1][0].node_id  # a node lost: re-placed over the survivors at once
    live.set_status(gone, "offline", 5)
    again = live.tick(5)
    assert again is not None and gone not in again.node_ids()


def test_a_node_moving_to_another_pipeline_prepares_its_new_input():
    placement = two_pipelines()
    moved = placement.model_copy(update={"version": 4, "stages": [
        placement.stages[0], placement.stages[3].model_copy(update={"first_block": 3, "pipeline": 0}),
        placement.stages[2].model_copy(update={"last_block": 2}),
        placement.stages[1].model_copy(update={"pipeline": 1})]})
    moved = Placement.model_validate(moved.model_dump())
    assert input_of(moved, "b") != input_of(placement, "b")  # stage 2 of pipeline 1 now, not of pipeline 0
    handover = Handover(timeout_s=5)
    handover.active = placement
    ready, ask = handover.propose(moved, 1)
    assert ready is None and ask == ["b", "d"]  # c keeps its input (the shared frames) though its blocks change


# --- the pruning controller --------------------------------------------------------------------------------------
def block_fit():
    """A per-block accuracy model of six blocks (what the gateway loads): later blocks cost more accuracy."""
    import itertools

    import numpy as np
    from scipy.special import expit

    from gateway.curves import fit_accuracy

    vectors = np.array(list(itertools.product((0.0, 0.5), repeat=6)))
    weights = -np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    return fit_accuracy(vectors, 0.1 + 0.85 * expit(vectors @ weights + 4.0), chance=0.1)


def test_the_accuracy_model_of_parallel_pipelines_is_the_mean_over_their_frames():
    """The control loop builds its model from every stage's slice in placement order; parallel pipelines list each
    cut of the model after the other. Each pipeline takes an equal share of the frames (one first-stage reader each)."""
    from gateway.curves import accuracy_for_slices

    fit = block_fit()
    mix = accuracy_for_slices(fit, [(0, 2), (3, 5), (0, 3), (4, 5)])  # refused before parallel pipelines ran
    one, other = accuracy_for_slices(fit, [(0, 2), (3, 5)]), accuracy_for_slices(fit, [(0, 3), (4, 5)])
    assert mix.n_stages == 4 and mix.gains == pytest.approx([g / 2 for g in one.gains + other.gains])
    for model in ("logistic", "measured"):
        predict = mix.predictor(model)
        ratios = [0.5, 0.0, 0.0, 0.5]
        assert predict(ratios) == pytest.approx((one.predictor(model)([0.5, 0.0]) +
                                                 other.predictor(model)([0.0, 0.5])) / 2)
    assert mix.required_score(0.5) == one.required_score(0.5)
    with pytest.raises(ValueError, match="do not cover"):
        accuracy_for_slices(fit, [(0, 2), (3, 5), (0, 3)])


def test_a_pipeline_whose_first_stage_has_more_readers_weighs_more_in_the_accuracy_model():
    """Mosquitto deals the camera's frames in turn to every reader of the pipelines' first stages, whatever their
    speed, also with flow control (tests/test_replicas_broker.py), so a pipeline whose first stage has two replicas
    takes two thirds of the frames next to one with a single first-stage node. The model weighed them equally."""
    from gateway.curves import accuracy_for_slices

    fit = block_fit()
    mix = accuracy_for_slices(fit, [(0, 2), (3, 5), (0, 3), (4, 5)], first_readers=[2, 1])
    one, other = accuracy_for_slices(fit, [(0, 2), (3, 5)]), accuracy_for_slices(fit, [(0, 3), (4, 5)])
    assert mix.gains == pytest.approx([2 * g / 3 for g in one.gains] + [g / 3 for g in other.gains])
    for model in ("logistic", "measured"):
        ratios = [0.5, 0.0, 0.0, 0.5]
        assert mix.predictor(model)(ratios) == pytest.approx(2 / 3 * one.predictor(model)([0.5, 0.0]) +
                                                             1 / 3 * other.predictor(model)([0.0, 0.5]))


def test_the_control_loops_accuracy_model_weighs_pipelines_by_their_first_stage_readers():
    from gateway.control_loop import ControlLoop
    from gateway.curves import ReplicaAccuracy
    from shared.settings import ControllerSettings

    placement = Placement(version=1, model="trapnet", n_blocks=6, stages=[
        StageAssignment(stage=1, node_id="a", first_block=0, last_block=2, replicas=["e"]),
        StageAssignment(stage=2, node_id="b", first_block=3, last_block=5),
        StageAssignment(stage=1, node_id="c", first_block=0, last_block=3, pipeline=1),
        StageAssignment(stage=2, node_id="d", first_block=4, last_block=5, pipeline=1)], issued_at=1.0,
        share_token="token-of-the-test")
    loop = ControlLoop(ControllerSettings(), 0.3, block_fit(), follow_up_s=5.0)
    loop.set_placement(placement)
    accuracy = loop.accuracy_model()
    assert isinstance(accuracy, ReplicaAccuracy) and accuracy.stage_fit.shares == pytest.approx((2 / 3, 1 / 3))


def test_the_control_loop_runs_over_parallel_pipelines(tmp_path):
    """Every node of two pipelines calibrated: the controller runs (per node), instead of refusing the last
    calibration (what made `bench replicas`' parallel strategy wait for a controller that never started)."""
    from gateway.control_loop import ControlLoop
    from shared.schemas import SliceCalibration
    from shared.settings import ControllerSettings

    settings = ControllerSettings()
    loop = ControlLoop(settings, 0.3, block_fit(), follow_up_s=5.0)
    placement = two_pipelines()
    loop.set_placement(placement)
    for stage in placement.stages:
        ratios = list(settings.ladder)
        loop.add_calibration(SliceCalibration(
            node_id=stage.node_id, placement_version=placement.version, first_block=stage.first_block,
            last_block=stage.last_block, ratios=ratios, latency_s=[0.02 * (1 - 0.5 * r) for r in ratios],
            measured_at=1.0))
    assert loop.disabled_reason is None and loop.controller is not None
    assert list(loop.controller.nodes) == ["a", "b", "c", "d"]
    # a frame crosses one pipeline's two stages, not four: each stage's budget is half the compute path; and the
    # broker deals the frames to the two first stages in turn, so every node sees half of them
    assert loop.controller.budget_s == pytest.approx(settings.budget_fraction * 0.3 / 2)
    assert loop.controller._shares == {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}


def test_doctor_names_each_pipeline_of_a_parallel_placement():
    from edgeprune.doctor import pipeline_words

    assert pipeline_words(two_pipelines()) == ("pipeline 0: stage 1 on a → stage 2 on b; "
                                               "pipeline 1: stage 1 on c → stage 2 on d")


def test_the_operator_page_shows_parallel_pipelines_side_by_side():
    from web.overview import pipeline_of, placement_words

    row = two_pipelines().model_dump()
    assert placement_words(2, pipeline_of(row)) == ("placement 2: 1 a (blocks 0–2) → 2 b (blocks 3–5) ∥ "
                                                    "1 c (blocks 0–3) → 2 d (blocks 4–5)")


def test_gone_nodes_of_parallel_pipelines_have_their_sessions_taken_over_once_placed_around(tmp_path):
    """A first stage's frames came through the shared frames group, a later stage's through its own pipeline's plain
    topic; both sessions hold what the node had not served (docs/reliability.md) and are taken over once a placement
    without them is in force, each with the subscription it read."""
    from shared.model import MODEL_NAME
    from tests.test_coordinator import TOPICS, coordinator, placed, placed_around

    c = coordinator(tmp_path, nodes=("a", "b", "c", "d"))
    placement = two_pipelines().model_copy(update={"model": MODEL_NAME})
    placed(c, placement)
    for node in "abcd":
        c.on_status(node, "online", now=1.0)
    assert c.on_status("d", "offline", now=2.0).drains == []
    assert c.on_status("c", "offline", now=3.0).drains == []  # not yet: the placement still sends them frames
    drains = placed_around(c, ["a", "b"], now=4.0, version=placement.version + 1).drains
    assert sorted(drains) == [("c", "$share/edgeprune-stage-1-tok3n-abcd/edgeprune/camera/+/frame"),
                              ("d", TOPICS.stage_input(2, pipeline=1))]


def test_every_input_a_node_may_read_under_a_placement_is_among_those_a_restarted_node_leaves():
    """A restarted node unsubscribes these unless it reads them (docs/reliability.md): each node's own input must be
    among them, whichever its job, so a previous run's one is too when the placement is the one it was made under."""
    topics = Topics()
    placement = Placement(version=3, model="m", n_blocks=6, issued_at=0.0, share_token="tok-12345", stages=[
        StageAssignment(stage=1, node_id="n1", first_block=0, last_block=2, pipeline=0),
        StageAssignment(stage=2, node_id="n2", first_block=3, last_block=5, replicas=["n5"], pipeline=0),
        StageAssignment(stage=1, node_id="n3", first_block=0, last_block=3, pipeline=1),
        StageAssignment(stage=2, node_id="n4", first_block=4, last_block=5, pipeline=1)])
    filters = routing.input_filters(topics, placement)
    assert len(filters) == len(set(filters))
    for node in placement.node_ids():
        assert routing.input_filter(topics, placement, node) in filters
    assert topics.stage_input(2) in filters and topics.stage_input(2, 1) in filters  # plain, as a lone reader has it
    assert topics.stage_input(1) in filters  # stage 1 behind an ingest node
