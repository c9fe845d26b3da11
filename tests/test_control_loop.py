"""ControlLoop without a broker: when the controller runs, seq numbering, manual holds, follow-ups."""

from __future__ import annotations

import pytest

from gateway.control_loop import ControlLoop, LadderMismatch
from gateway.curves import AccuracyFit
from shared.schemas import (
    BlockProfile,
    Hop,
    ModelProfile,
    NodeStats,
    Placement,
    PruneDesired,
    Result,
    SliceCalibration,
    StageAssignment,
)
from shared.settings import ControllerSettings

LADDER = [round(0.1 * i, 1) for i in range(10)]
# A fitted logistic with no measured table behind it (only the unpruned vector): these tests run the
# 'logistic' predictor, since the default 'measured' one would forbid any ratio never measured.
BLOCK_ACCURACY = AccuracyFit(gains=(-1.0,) * 6, offset=-6.0, top=0.95, chance=0.1, r2=1.0, rmse=0.0,
                             vectors=((0.0,) * 6,), accuracies=(0.95,))


def placement(version: int, cut: int = 3) -> Placement:
    return Placement(version=version, model="trapnet", n_blocks=6, issued_at=0.0, stages=[
        StageAssignment(stage=1, node_id="a", first_block=0, last_block=cut - 1),
        StageAssignment(stage=2, node_id="b", first_block=cut, last_block=5)])


def calibration(node: str, first: int, last: int, version: int = 1, base_s: float = 0.02) -> SliceCalibration:
    return SliceCalibration(node_id=node, placement_version=version, first_block=first, last_block=last,
                            ratios=LADDER, latency_s=[base_s * (0.1 + 0.9 * (1 - p) ** 2) for p in LADDER],
                            measured_at=1.0)


def loop(policy: str = "bottleneck", **settings) -> ControlLoop:
    return ControlLoop(ControllerSettings(policy=policy, trigger_window_s=4, trigger_min_span_s=2, cooldown_s=3,
                                          accuracy_model="logistic", **settings),
                       slo_s=0.1, block_accuracy=BLOCK_ACCURACY, follow_up_s=2.0)


def test_runs_only_once_every_placed_node_calibrated_its_own_slice():
    c = loop()
    assert "no placement" in c.disabled_reason
    c.set_placement(placement(1))
    assert c.add_calibration(calibration("a", 0, 2)) is not None
    assert c.add_calibration(calibration("b", 0, 2)) is None  # not b's slice: ignored
    assert "waiting for the calibration of b" in c.disabled_reason
    c.add_calibration(calibration("b", 3, 5))
    assert c.controller is not None and c.disabled_reason is None
    c.set_placement(placement(2, cut=2))  # both slices change: both curves are stale
    assert c.controller is None and "a, b" in c.disabled_reason


def test_calibrations_that_arrive_before_the_placement_are_used_once_it_comes():
    # a restarted gateway: the nodes' retained calibrations come in before it has placed anything
    c = loop()
    assert c.add_calibration(calibration("a", 0, 2)) is None and c.add_calibration(calibration("b", 3, 5)) is None
    rows = c.set_placement(placement(7))  # the same slices the nodes kept
    assert c.controller is not None and c.disabled_reason is None
    assert sorted(r["node_id"] for r in rows) == ["a", "b"]  # for the calibrations table
    assert c.set_placement(placement(8, cut=2)) == [] and c.controller is None  # other slices: stale, not reused
    c.forget("a")  # a retired node's calibration goes with it
    assert [r["node_id"] for r in c.set_placement(placement(9))] == ["b"]
    assert c.disabled_reason == "waiting for the calibration of a"


def test_without_accuracy_model_it_says_what_to_do():
    c = ControlLoop(ControllerSettings(), slo_s=0.1, block_accuracy=None, follow_up_s=2.0)
    assert "edgeprune calibrate" in c.disabled_reason
    with pytest.raises(ValueError, match="off"):
        c.manual(0.0, "a", 0.5)


def running_loop() -> ControlLoop:
    c = loop()
    c.set_placement(placement(1))
    c.add_calibration(calibration("a", 0, 2))
    c.add_calibration(calibration("b", 3, 5))
    return c


def test_slowed_stage_is_pruned_with_the_next_seq_after_a_restart():
    c = running_loop()
    c.recover_desired("a", PruneDesired(ratio=0.0, seq=41, issued_at=0.0))  # our retained state, before a restart
    for i in range(60):  # a 4x slower node a: 80 ms against a 40 ms stage budget, frames far over the SLO
        t = 100 + i * 0.1
        c.observe_latency(t, 0.3)
        if i % 5 == 0:
            c.observe_stats(NodeStats(node_id="a", ts=t, queue_depth=3, queue_capacity=16, processed=i,
                                      dropped=0, cpu_percent=90, prune_ratio=0.0, compute_mean_s=0.08))
            c.observe_stats(NodeStats(node_id="b", ts=t, queue_depth=0, queue_capacity=16, processed=i,
                                      dropped=0, cpu_percent=20, prune_ratio=0.0, compute_mean_s=0.02))
    effects = c.tick(106.0)
    assert set(effects.publish) == {"a"} and effects.publish["a"].seq == 42 and effects.publish["a"].ratio > 0
    (event,) = effects.events
    assert event["kind"] == "set" and event["policy"] == "bottleneck"
    follow_up = c.tick(106.0 + 2.5).events  # one follow-up window later: what was observed after it
    assert follow_up == [{"ts": event["ts"], "kind": "set", "observed_count": 0, "observed_p50_s": None,
                          "observed_p95_s": None}]


def result(request_id: str, t: float, compute: dict[tuple[int, str], float]) -> Result:
    """A completed frame whose hops took ``compute[(stage, node)]`` seconds of compute each, at ratio 0."""
    hops = [Hop(stage=stage, node_id=node, prune_ratio=0.0, received_ts=t, started_ts=t, finished_ts=t + seconds,
                published_ts=t + seconds) for (stage, node), seconds in compute.items()]
    return Result(request_id=request_id, camera_id="cam", capture_ts=t, label="zebra", label_index=0,
                  confidence=0.9, hops=hops)


def test_adaptive_prunes_from_results_hops_of_each_nodes_own_stage():
    c = loop(policy="adaptive")
    c.set_placement(placement(1))
    c.add_calibration(calibration("a", 0, 2))
    c.add_calibration(calibration("b", 3, 5))
    for i in range(3):  # b ran stage 1 under an older placement, slowly: says nothing about its stage-2 slice
        c.observe_result(10 + i, result(f"old{i}", 10 + i, {(1, "b"): 0.2, (2, "a"): 0.02}))
    assert c.tick(13).publish == {}
    for i in range(3):  # three frames show a 4x slower node a: 80 ms against a 40 ms stage budget
        c.observe_arrival(20 + i)
        c.observe_result(20 + i, result(f"r{i}", 20 + i, {(1, "a"): 0.08, (2, "b"): 0.02}))
    effects = c.tick(23)
    assert set(effects.publish) == {"a"} and effects.publish["a"].ratio > 0
    assert effects.events[0]["policy"] == "adaptive" and "a 4.0x" in effects.events[0]["reason"]


def test_a_slowdown_seen_before_a_move_holds_for_the_new_slices_until_frames_say_otherwise():
    """A re-partition for a slowed node must not be undone by the controller of the new slices starting from
    "no slowdown" (it would move the blocks back before seeing one frame, then move them again)."""
    c = loop(policy="adaptive")
    c.set_placement(placement(1))
    c.add_calibration(calibration("a", 0, 2))
    c.add_calibration(calibration("b", 3, 5))
    for i in range(3):  # node a 4x slower than its curve
        c.observe_result(20 + i, result(f"r{i}", 20 + i, {(1, "a"): 0.08, (2, "b"): 0.02}))
    assert c.controller.slowdown("a") == pytest.approx(4.0)
    c.set_placement(placement(2, cut=2))  # the move: both nodes recalibrate, the controller pauses meanwhile
    assert c.controller is None
    c.add_calibration(calibration("a", 0, 1, version=2, base_s=0.013))
    c.add_calibration(calibration("b", 2, 5, version=2, base_s=0.027))
    assert c.controller.slowdown("a") == pytest.approx(4.0) and c.controller.slowdown("b") == 1.0
    for i in range(3):  # frames of the new slices: node a has recovered
        c.observe_result(30 + i, result(f"s{i}", 30 + i, {(1, "a"): 0.013, (2, "b"): 0.027}))
    assert c.controller.slowdown("a") == pytest.approx(1.0)
    for i in range(3):  # slowed again, then retired: if it comes back it is measured afresh
        c.observe_result(40 + i, result(f"t{i}", 40 + i, {(1, "a"): 0.052, (2, "b"): 0.027}))
    assert c.controller.slowdown("a") == pytest.approx(4.0)
    c.forget("a")
    c.set_placement(placement(3))
    c.add_calibration(calibration("a", 0, 2, version=3))
    c.add_calibration(calibration("b", 3, 5, version=3))
    assert c.controller.slowdown("a") == 1.0


def profile(block_s: list[float]) -> ModelProfile:
    return ModelProfile(model="trapnet", host="test", threads=1, repeats=1, warmup=0, wire_dtype="float16",
                        blocks=[BlockProfile(name=f"b{i}", latency_s=t, param_bytes=1, activation_bytes=1,
                                             output_bytes=1) for i, t in enumerate(block_s)])


def test_a_moved_node_is_controlled_on_a_provisional_curve_until_it_has_measured_its_new_blocks():
    c = loop(policy="adaptive")
    c.set_placement(placement(1))
    c.add_calibration(calibration("a", 0, 2, base_s=0.03))
    c.add_calibration(calibration("b", 3, 5, base_s=0.03))
    profiles = {"a": profile([0.01] * 6), "b": profile([0.02, 0.01, 0.01, 0.01, 0.01, 0.01])}
    c.set_placement(placement(2, cut=2), profiles)  # a keeps blocks 0-1 (2/3 of its time), b takes 2-5
    assert c.controller is not None and c.disabled_reason is None
    assert c.status()["provisional_curves"] == ["a", "b"]
    assert c.controller.curve("a").predict(0.0) == pytest.approx(0.02)  # 0.03 s x 2/3
    assert c.controller.curve("b").predict(0.0) == pytest.approx(0.04)  # 0.03 s x 4/3
    for i in range(3):  # frames against a provisional curve do not move the estimate: its error is no slowdown
        c.observe_result(10 + i, result(f"p{i}", 10 + i, {(1, "a"): 0.08, (2, "b"): 0.04}))
    assert c.controller.slowdown("a") == 1.0
    rows = c.add_calibration(calibration("a", 0, 1, version=2, base_s=0.05))  # measured: the prediction goes
    assert rows is not None and c.status()["provisional_curves"] == ["b"]
    assert c.controller.curve("a").predict(0.0) == pytest.approx(0.05)
    c.set_placement(placement(3, cut=2))  # without profiles (an older gateway path) b keeps what it had
    assert c.controller is not None


def test_restore_all_logs_every_node_as_its_own_event():
    # prune_events is keyed on (ts, kind): the actions of one command at one instant must not overwrite each other
    c = running_loop()
    c.manual(10.0, "a", 0.5)
    c.manual(10.0, "b", 0.3)
    effects = c.restore_all(20.0)
    keys = [(e["ts"], e["kind"]) for e in effects.events]
    assert len(keys) == 4 and len(set(keys)) == 4  # a hold at 0 and a release for each node
    assert all(20.0 <= ts < 20.001 for ts, _ in keys)
    assert {n for e in effects.events for n in e["changed"]} == {"a", "b"}


def test_manual_hold_and_release():
    c = running_loop()
    held = c.manual(10.0, "b", 0.5)
    assert held.publish["b"].ratio == 0.5 and held.publish["b"].source == "manual"
    assert held.events[0]["policy"] == "manual"
    with pytest.raises(ValueError, match="ladder"):
        c.manual(11.0, "b", 0.55)
    released = c.manual(12.0, "b", None)
    assert released.events[0]["policy"] == "release"


def test_a_hold_outlives_every_rebuild_of_the_controller_until_released():
    """A node's recalibration (the gateway asks for one after a poorly fitted curve, common on a loaded host) or a
    re-placement rebuilds the controller; the operator's hold was dropped with the old one, so the held node was
    handed back to the controller unasked (seen in the browser test: the hold gone from the page 3 s after it)."""
    c = running_loop()
    c.manual(10.0, "b", 0.5)
    c.add_calibration(calibration("b", 3, 5, base_s=0.021))  # measured again: a new controller
    assert c.controller.manual == {"b": 0.5} and c.controller.ratios["b"] == 0.5
    c.set_placement(placement(2, cut=2))  # a move: paused until both nodes have measured their new slices
    assert c.controller is None
    c.add_calibration(calibration("a", 0, 1, version=2))
    c.add_calibration(calibration("b", 2, 5, version=2))
    assert c.controller.manual == {"b": 0.5} and c.status()["manual"] == {"b": 0.5}
    c.manual(20.0, "b", None)
    c.add_calibration(calibration("b", 2, 5, version=2, base_s=0.021))
    assert c.controller.manual == {}  # released stays released
    c.manual(30.0, "a", 0.3)
    c.forget("a")  # a retired node's hold goes with it
    c.set_placement(placement(3))
    c.add_calibration(calibration("a", 0, 2, version=3))
    c.add_calibration(calibration("b", 3, 5, version=3))
    assert c.controller.manual == {}


def test_an_operators_hold_survives_a_gateway_restart():
    """docs/controller.md: a hold lasts until it is released. A restarted gateway took the held ratio back from the
    desired state it had issued but not the hold, so its controller treated the node as its own and restored it."""
    before = running_loop()
    held = before.manual(10.0, "b", 0.5).publish["b"]
    after = loop()  # the restarted gateway: the desired states it issued come back before the placement
    after.recover_desired("a", PruneDesired(ratio=0.0, seq=3, issued_at=0.0))
    after.recover_desired("b", held)
    after.set_placement(placement(1))
    after.add_calibration(calibration("a", 0, 2))
    after.add_calibration(calibration("b", 3, 5))
    assert after.controller.manual == {"b": 0.5} and after.status()["manual"] == {"b": 0.5}
    released = before.manual(20.0, "b", None).publish["b"]
    after.recover_desired("b", released)  # released before the restart: the controller's again
    assert after.controller.manual == {} and after.controller.ratios["b"] == 0.5


def test_a_hold_outlives_the_held_node_leaving_the_placement():
    """A held node that dies is placed around and placed again when it is back: still held (the hold was dropped by
    the first controller built without it)."""
    c = running_loop()
    c.manual(10.0, "b", 0.5)
    c.set_placement(Placement(version=2, model="trapnet", n_blocks=6, issued_at=0.0, stages=[
        StageAssignment(stage=1, node_id="a", first_block=0, last_block=5)]))
    c.add_calibration(calibration("a", 0, 5, version=2))
    assert c.controller.nodes == ("a",) and c.controller.manual == {}
    c.set_placement(placement(3))
    c.add_calibration(calibration("a", 0, 2, version=3))
    c.add_calibration(calibration("b", 3, 5, version=3))
    assert c.controller.manual == {"b": 0.5} and c.controller.ratios["b"] == 0.5


def test_a_ladder_the_nodes_do_not_have_is_refused_not_snapped():
    c = loop(ladder=(0.0, 0.25, 0.5, 0.75))  # the nodes build 0.0, 0.1, ... 0.9: 0.25 and 0.75 would snap
    c.set_placement(placement(1))
    with pytest.raises(LadderMismatch, match="0.25, 0.75") as refused:
        c.add_calibration(calibration("a", 0, 2))
    assert "a has no variant" in str(refused.value)
    assert c.controller is None and "0.25, 0.75" in c.disabled_reason
    with pytest.raises(ValueError, match="off"):
        c.manual(1.0, "a", 0.25)
    matching = loop(ladder=(0.0, 0.3, 0.6))  # a subset of the nodes' variants is fine
    matching.set_placement(placement(1))
    matching.add_calibration(calibration("a", 0, 2))
    matching.add_calibration(calibration("b", 3, 5))
    assert matching.controller is not None
