"""Replicated stages, pure parts: the placement schema, shared-subscription topics, the expected-accuracy model
over replicas that run different ratios, and the controller pruning one replica of a stage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.special import expit

from gateway.controller import PruningController
from gateway.controller_actions import SetRatios
from gateway.curves import ReplicaAccuracy, fit_accuracy, fit_latency
from shared.schemas import Placement, StageAssignment, to_json
from shared.settings import ControllerSettings
from shared.topics import Topics

LADDER = tuple(round(0.1 * k, 1) for k in range(10))
VECTORS = np.array(list(itertools.product(LADDER, repeat=2)))
STAGES = fit_accuracy(VECTORS, 0.1 + 0.85 * expit(VECTORS @ np.array([-6.0, -2.0]) + 4.0), chance=0.1)


def test_a_one_node_stage_serialises_as_before_and_replicas_round_trip():
    single = StageAssignment(stage=1, node_id="n1", first_block=0, last_block=5)
    assert "replicas" not in single.model_dump_json()  # older nodes (extra fields forbidden) still parse it
    shared = StageAssignment(stage=1, node_id="n1", first_block=0, last_block=5, replicas=["n2", "n3"])
    with pytest.raises(ValidationError, match="share_token"):
        Placement(version=1, model="m", n_blocks=6, stages=[shared], issued_at=0.0)
    placement = Placement(version=1, model="m", n_blocks=6, stages=[shared], issued_at=0.0, share_token="s3cret-tok")
    again = Placement.model_validate_json(to_json(placement))
    assert again.stage_of("n3") == shared and again.node_ids() == ["n1", "n2", "n3"]
    with pytest.raises(ValidationError, match="appears in two stages"):
        Placement(version=1, model="m", n_blocks=6, issued_at=0.0,
                  stages=[StageAssignment(stage=1, node_id="n1", first_block=0, last_block=2, replicas=["n2"]),
                          StageAssignment(stage=2, node_id="n2", first_block=3, last_block=5)])


def test_replicated_stages_read_their_input_through_one_shared_subscription_group():
    topics = Topics("site/a")
    assert topics.shared(1, "tok") == "$share/site-a-stage-1-tok/site/a/camera/+/frame"
    assert topics.shared(3, "tok") == "$share/site-a-stage-3-tok/site/a/pipeline/stage/3/in"
    with pytest.raises(ValueError):
        topics.shared(2, "a/b")


def test_expected_accuracy_is_the_share_weighted_mean_over_paths():
    model = ReplicaAccuracy.equal_shares(STAGES, [2, 1])  # nodes 0, 1 serve stage 1; node 2 stage 2
    for predictor in ("logistic", "measured"):
        stage_predict, expected = STAGES.predictor(predictor), model.predictor(predictor)
        assert expected([0.5, 0.0, 0.3]) == pytest.approx(0.5 * stage_predict([0.5, 0.3])
                                                          + 0.5 * stage_predict([0.0, 0.3]))
        assert expected([0.2, 0.2, 0.4]) == pytest.approx(stage_predict([0.2, 0.4]))  # same ratio: the stage model
    assert model.gains == pytest.approx((STAGES.gains[0] / 2, STAGES.gains[0] / 2, STAGES.gains[1]))
    with pytest.raises(ValueError, match="add up to 1"):
        ReplicaAccuracy(STAGES, ((0, 1), (2,)), (0.5, 0.4, 1.0))


@given(st.lists(st.sampled_from(LADDER), min_size=4, max_size=4), st.integers(0, 3), st.sampled_from(LADDER))
def test_pruning_any_replica_further_never_raises_expected_accuracy(ratios, node, more):
    expected = ReplicaAccuracy.equal_shares(STAGES, [3, 1]).predictor("measured")
    pruned = list(ratios)
    pruned[node] = max(pruned[node], more)
    assert expected(pruned) <= expected(ratios) + 1e-12


def calibrated_time(ratio: float) -> float:
    return 0.01 + 0.11 * (1 - ratio) ** 2


def test_the_controller_prunes_only_the_slowed_replica_and_judges_the_floor_on_the_mix():
    nodes = ("rep-a", "rep-b", "tail")
    fits = {n: fit_latency(LADDER, [calibrated_time(p) for p in LADDER]) for n in nodes}
    accuracy = ReplicaAccuracy.equal_shares(STAGES, [2, 1])
    controller = PruningController(nodes, fits, accuracy, slo_s=0.5, config=ControllerSettings(policy="bottleneck"),
                                   n_stages=2)
    assert controller.budget_s == pytest.approx(0.8 * 0.5 / 2)  # per stage, not per node
    actions = []
    for step in range(1, 61):  # rep-a 3x slower: half the frames (those it gets) miss the SLO
        now = step * 0.2
        controller.observe_latency(now, 0.9 if step % 2 else 0.2)
        if step % 10 == 0:
            for n in nodes:
                controller.observe_node(now, n, (3.0 if n == "rep-a" else 1.0) * calibrated_time(0.0), 0, 0.0)
        if step % 5 == 0:
            actions += controller.tick(now)
    pruned = [a for a in actions if isinstance(a, SetRatios)]
    assert pruned and set(pruned[0].ratios) == {"rep-a"}
    assert controller.ratios["rep-b"] == 0.0 and controller.ratios["tail"] == 0.0
    assert 3.0 * calibrated_time(controller.ratios["rep-a"]) <= controller.budget_s
    decision = pruned[0].decision
    mixed = accuracy.predictor(controller.config.accuracy_model)([controller.ratios[n] for n in nodes])
    assert decision.accuracy == pytest.approx(mixed) and mixed >= controller.accuracy_floor


def hybrid_live(nodes: dict[str, float], arrival_hz: float, slo_s: float = 1.0):
    """A live placement in hybrid mode over nodes of the given speed factors (blocks 10 ms x factor each)."""
    from gateway.live_placement import HybridTarget, LivePlacement, PlacementRules
    from tests.test_live_placement import offer

    live = LivePlacement(PlacementRules(startup_wait_s=20, rejoin_hold_s=10, min_gain=0.1), "trapnet", "abc",
                         list(nodes), started=0, hybrid=HybridTarget(arrival_hz, slo_s))
    for node, speed in nodes.items():
        live.set_status(node, "online", 0)
        live.set_offer(offer(node, speed))
    return live


def test_a_hybrid_plan_that_leaves_a_node_out_is_not_made_again_every_tick():
    """b's whole model (90 ms) does not fit an 80 ms SLO: the plan leaves it out on purpose. Once b had stayed
    past rejoin_hold_s it counted as joined and every tick re-planned (seconds on many nodes) and re-published
    the same layout as a new version."""
    live = hybrid_live({"a": 1.0, "b": 1.5}, arrival_hz=1.0, slo_s=0.08)
    first = live.tick(1)
    assert first is not None and first.node_ids() == ["a"]
    assert live.tick(12) is None and live.tick(13) is None and live.current.version == first.version


def test_a_question_with_no_plan_is_not_asked_again_until_something_changes():
    """Data partitioning where no node holds the whole model: the planner says so, and the next tick asked the
    same question again (seconds each on many nodes), tick after tick."""
    from gateway.live_placement import HybridTarget, LivePlacement, PlacementRules, PlanWanted, solve
    from tests.test_live_placement import offer

    live = LivePlacement(PlacementRules(startup_wait_s=20, rejoin_hold_s=10, min_gain=0.1), "trapnet", "abc",
                         ["a", "b"], started=0, hybrid=HybridTarget(1.0, 1.0, whole_model=True))
    for node in ("a", "b"):
        live.set_status(node, "online", 0)
        live.set_offer(offer(node).model_copy(update={"memory_mb": 0.001}))  # 6 kB of weights do not fit 1 kB
    wanted = live.decide(1)
    assert isinstance(wanted, PlanWanted) and live.take(wanted, solve(wanted), 1) is None
    assert "no node holds the whole model" in live.last_error
    assert live.decide(2) is None and live.decide(3) is None
    live.set_offer(offer("b"))  # b re-offers itself with room for the model: asked again, and placed
    again = live.decide(4)
    assert isinstance(again, PlanWanted) and live.take(again, solve(again), 4).node_ids() == ["b"]


def test_hybrid_mode_replicates_the_whole_model_when_one_pipeline_cannot_keep_up():
    # six 10 ms blocks: one node serves ~16 frames/s; a pipeline over three is bound by its slowest slice
    # (2 blocks, ~50/s) but three whole-model replicas serve ~50/s too with no transfers: at 40 frames/s the
    # planner must use every node, and the placement must carry the replicas
    live = hybrid_live({"a": 1.0, "b": 1.0, "c": 1.0}, arrival_hz=40.0)
    placement = live.tick(1)
    assert placement is not None and sorted(placement.node_ids()) == ["a", "b", "c"]
    assert any(s.replicated for s in placement.stages) and placement.share_token
    live.set_status("b", "offline", 5)  # a replica lost: re-placed over the survivors at once
    again = live.tick(5)
    assert again is not None and sorted(again.node_ids()) == ["a", "c"]
    if any(s.replicated for s in again.stages):  # replicas are pruned per node, never re-partitioned
        assert live.replan_for_slowdowns({"a": 3.0}, 6) is None


def test_pipeline_mode_is_unchanged_by_default():
    from tests.test_live_placement import live_with

    placement = live_with(["a", "b", "c"]).tick(1)
    assert placement is not None and not any(s.replicated for s in placement.stages)
    assert "replicas" not in to_json(placement).decode() and "share_token" not in to_json(placement).decode()


def test_data_mode_puts_the_whole_model_on_every_node():
    from gateway.live_placement import HybridTarget

    live = hybrid_live({"a": 1.0, "b": 3.0, "c": 1.0}, arrival_hz=1.0)
    live.hybrid = HybridTarget(1.0, 1.0, whole_model=True)
    placement = live.tick(1)
    assert len(placement.stages) == 1 and sorted(placement.node_ids()) == ["a", "b", "c"]


@pytest.mark.parametrize("speeds", [{"a": 1.0, "b": 1.5}, {"a": 1.0, "b": 4.0}, {"a": 1.0, "b": 3.0, "c": 8.0},
                                    {"a": 8.0, "b": 3.0, "c": 1.5, "d": 1.0, "e": 3.0}])
def test_a_hybrid_mode_placement_does_not_depend_on_the_rate_it_is_planned_for(speeds):
    """Unpruned plans all predict the same accuracy, so the planner's objective picks the plan sustaining the highest
    rate within the SLO whatever rate it is asked for (gateway/hybrid.py: _key): which rate a join is planned for
    (``hybrid_arrival_hz`` or a rate re-plan's) moves no block. The SLO does (test_coordinator.py)."""
    placed = {hz: [(s.nodes, s.first_block, s.last_block) for s in hybrid_live(speeds, hz, slo_s=0.2).tick(1).stages]
              for hz in (0.05, 5.0, 50.0, 5000.0)}
    assert len({repr(p) for p in placed.values()}) == 1


def test_after_a_rate_re_plan_is_adopted_later_joins_are_planned_for_that_rate(tmp_path):
    """Issue 27 item 6: the rate re-planner adopted a plan for the measured rate, but a node joining later was
    planned for the configured ``hybrid_arrival_hz`` again, undoing it."""
    from gateway.control_loop import Effects
    from gateway.hybrid import HybridRequest
    from gateway.rate_replan import RateReplan, plan_for_rate
    from shared.settings import GatewaySettings

    live = hybrid_live({"a": 1.0, "b": 1.0, "c": 1.0}, arrival_hz=5.0)
    assert live.tick(1) is not None
    settings = GatewaySettings(db_path=tmp_path / "unused.db", nodes=["a", "b", "c"], placement_mode="hybrid",
                               rate_replan="apply")
    request = HybridRequest(live.eligible_problem(), 40.0, 1.0)
    RateReplan(settings, live, 0).apply(2.0, request, plan_for_rate(request), 5.0, Effects())
    assert live.hybrid.arrival_hz == 40.0  # adopted, or already what runs: either way the site runs for 40/s
    live.set_status("b", "offline", 3)
    live.tick(3)
    live.set_status("b", "online", 4)
    rejoined = live.tick(20)  # past rejoin_hold_s: b is planned in again, for 40 frames/s
    expected = hybrid_live({"a": 1.0, "b": 1.0, "c": 1.0}, arrival_hz=40.0).tick(1)
    assert rejoined is not None and [(s.nodes, s.first_block, s.last_block) for s in rejoined.stages] == [
        (s.nodes, s.first_block, s.last_block) for s in expected.stages]
