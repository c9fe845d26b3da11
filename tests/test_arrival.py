"""Re-planning for a persistent arrival-rate change (gateway/arrival.py): a season re-plans once, a burst never,
a rate wandering along the band's edge never flaps; and what the re-plan changes (gateway/live_placement.py)."""

from __future__ import annotations

import pytest

from camera.arrivals import BurstParams, burst_arrivals
from gateway.arrival import ArrivalMeter, RateRules, RateTrigger, levels_from_fits
from gateway.hybrid import UNPRUNED, HybridPlan, HybridStage, Level
from gateway.live_placement import LivePlacement, PlacementRules
from shared.latency_fit import fit_latency
from shared.settings import GatewaySettings
from tests.test_live_placement import offer

RULES = RateRules(window_s=60, band=0.3, dwell_s=120, min_interval_s=600, floor_hz=0.01)


def drive(trigger: RateTrigger, rates, step: float = 10.0, start: float = 0.0) -> list[tuple[float, float]]:
    """Feed ``rates`` (one per ``step`` seconds) to the trigger; returns (time, rate) of every re-plan."""
    fired = []
    for k, rate in enumerate(rates):
        now = start + k * step
        planned = trigger.observe(now, rate)
        if planned is not None:
            fired.append((now, planned))
    return fired


def test_meter_counts_the_last_window_only_once_a_window_has_passed():
    meter = ArrivalMeter(window_s=10, started=100.0)
    for k in range(20):
        meter.add(100.0 + k * 0.5)  # 2 frames/s for 10 s
    assert meter.rate(105.0) is None  # not a whole window watched yet
    assert meter.rate(110.0) == pytest.approx(2.0)
    assert meter.rate(115.0) == pytest.approx(1.0)  # half the window is empty now
    assert meter.rate(125.0) == 0.0


def test_a_sustained_rise_re_plans_once():
    trigger = RateTrigger(RULES, planned_hz=1.0)
    fired = drive(trigger, [1.0] * 30 + [2.0] * 300)
    assert fired == [(300 + RULES.dwell_s, 2.0)]  # the rate left the band at 300 s and stayed out for dwell_s
    assert trigger.planned_hz == 2.0


def test_a_fall_re_plans_too():
    fired = drive(RateTrigger(RULES, planned_hz=1.0), [1.0] * 10 + [0.4] * 100)
    assert fired == [(100 + RULES.dwell_s, 0.4)]


def test_a_burst_never_re_plans():
    """19 extra frames/s for 30 s over a steady 1 frame/s: the windowed rate leaves the band for about the burst
    plus one window (90 s), shorter than the dwell (120 s)."""
    meter, trigger = ArrivalMeter(RULES.window_s, started=0.0), RateTrigger(RULES, planned_hz=1.0)
    fired, out_of_band_s = [], 0
    for second in range(3600):
        for k in range(20 if 1000 <= second < 1030 else 1):
            meter.add(second + k / 20)
        rate = meter.rate(second + 1)
        out_of_band_s += rate is not None and rate > 1.3
        if trigger.observe(second + 1, rate) is not None:
            fired.append(second)
    assert fired == []
    assert 60 < out_of_band_s < RULES.dwell_s  # the burst did push the rate out of the band, for a while


def test_a_rate_wandering_along_the_band_edge_does_not_flap():
    # 1.25 (inside the band's 1.3 edge) and 1.35 (outside) alternating every 60 s, for a day
    rates = [1.25 if (k // 6) % 2 else 1.35 for k in range(8640)]
    assert drive(RateTrigger(RULES, planned_hz=1.0), rates) == []


def test_re_plans_are_at_least_min_interval_apart():
    trigger = RateTrigger(RULES, planned_hz=1.0)
    fired = drive(trigger, [2.0] * 30 + [4.0] * 200)
    assert [t for t, _ in fired] == [RULES.dwell_s, RULES.dwell_s + RULES.min_interval_s]
    assert [r for _, r in fired] == [2.0, 4.0]


def test_rates_below_the_floor_are_the_same_rate():
    rules = RateRules(window_s=60, band=0.3, dwell_s=120, min_interval_s=600, floor_hz=0.05)
    assert drive(RateTrigger(rules, planned_hz=0.01), [0.03] * 500) == []


def test_the_first_measured_rate_is_planned_for_after_the_dwell():
    trigger = RateTrigger(RULES)
    assert drive(trigger, [None] * 6 + [0.7] * 30) == [(60 + RULES.dwell_s, 0.7)]


def test_no_first_plan_for_the_silence_before_any_traffic():
    trigger = RateTrigger(RULES)
    assert drive(trigger, [0.0] * 40 + [0.7] * 30) == [(400 + RULES.dwell_s, 0.7)]


def replans_on_trace(rules: RateRules, arrivals: list[float], hours: float, step: float = 30.0) -> list[tuple]:
    meter, trigger = ArrivalMeter(rules.window_s, started=0.0), RateTrigger(rules)
    fired, i, now = [], 0, 0.0
    while now < hours * 3600:
        while i < len(arrivals) and arrivals[i] <= now:
            meter.add(arrivals[i])
            i += 1
        rate = trigger.observe(now, meter.rate(now))
        if rate is not None:
            fired.append((now / 3600, rate))
        now += step
    return fired


def default_rules() -> RateRules:
    s = GatewaySettings()
    return RateRules(s.rate_window_s, s.rate_band, s.rate_dwell_s, s.rate_min_interval_s, s.rate_floor_hz)


def test_default_rules_on_camera_trap_bursts_plan_once_and_follow_a_new_season():
    """Ten simulated camera traps (Kline et al.'s burst statistics, camera/arrivals.py) for three days: only the
    first plan; twenty more cameras from hour 12 (three times the rate): one re-plan, for about the new rate."""
    cameras = [f"c{i}" for i in range(10)]
    steady = [a.at_s for a in burst_arrivals(BurstParams(), cameras, 72 * 3600, seed=0)]
    assert len(replans_on_trace(default_rules(), steady, 72)) == 1

    season_start = 12 * 3600
    extra = [a.at_s + season_start for a in burst_arrivals(BurstParams(), [f"d{i}" for i in range(20)],
                                                           12 * 3600, seed=1)]
    fired = replans_on_trace(default_rules(), sorted(steady + extra), 24)
    assert len(fired) == 2
    (_, first_hz), (at_h, season_hz) = fired
    assert 12 < at_h <= 15 and season_hz > 2 * first_hz


def test_levels_come_from_the_nodes_calibrations():
    ratios = [0.0, 0.25, 0.5, 0.75]
    fits = {n: fit_latency(ratios, [scale * (1 - p) ** 2 for p in ratios]) for n, scale in (("a", 0.1), ("b", 0.3))}
    levels = levels_from_fits([0.0, 0.25, 0.5, 0.75], fits, max_ratio=0.5)
    assert [lv.ratio for lv in levels] == [0.0, 0.25, 0.5]  # 0.75 is above the controller's max_ratio
    assert [lv.time_factor for lv in levels] == pytest.approx([1.0, 0.5625, 0.25], abs=1e-6)
    assert levels_from_fits([0.0, 0.5], {}, 0.9) == UNPRUNED


def two_nodes() -> LivePlacement:
    live = LivePlacement(PlacementRules(0, 0, 0.1), "trapnet", "abc", ["a", "b"], started=0)
    for node in ("a", "b"):
        live.set_status(node, "online", 0)
        live.set_offer(offer(node))
    live.tick(1)
    return live


def test_the_hybrid_planner_never_sees_a_node_of_the_ingest_role():
    live = LivePlacement(PlacementRules(0, 0, 0.1), "trapnet", "abc", ["a", "b", "i"], started=0)
    for node in ("a", "b", "i"):
        live.set_status(node, "online", 0)
        live.set_offer(offer(node).model_copy(update={"role": "ingest" if node == "i" else "stage"}))
    live.tick(1)
    assert [d.id for d in live.eligible_problem().devices] == ["a", "b"]


def test_the_rate_changes_the_plan_through_up_front_pruning():
    """For one structure the best cuts do not depend on the rate; the pruning to sustain it does."""
    from gateway.hybrid import HybridRequest, plan_hybrid

    problem = two_nodes().eligible_problem()
    levels = (Level(0.0, 1.0), Level(0.5, 0.4))

    def plan_at(hz: float) -> HybridPlan:
        return plan_hybrid(HybridRequest(problem, hz, slo_s=1.0, levels=levels,
                                         accuracy=lambda r: 0.9 - 0.1 * sum(r) / len(r), accuracy_floor=0.8))

    quiet, busy = plan_at(1.0), plan_at(60.0)
    assert quiet.sustainable_hz >= 1.0 and all(s.ratio == 0 for p in quiet.pipelines for s in p)
    assert quiet.sustainable_hz < 60.0 <= busy.sustainable_hz  # unpruned, no structure sustains 60/s
    assert any(s.ratio > 0 for p in busy.pipelines for s in p) and busy.accuracy < quiet.accuracy


def test_a_plan_is_adopted_when_it_moves_something_parallel_pipelines_included():
    live = two_nodes()
    current = [(s.node_id, s.first_block, s.last_block) for s in live.current.stages]
    same = HybridPlan((tuple(HybridStage(f, last, (n,)) for n, f, last in current),), 1, 1, 0.1, None)
    assert live.adopt_hybrid(same, 5, "rate") is None  # nothing moves
    alone = HybridPlan(((HybridStage(0, 5, ("b",)),),), 1, 1, 0.1, None)
    adopted = live.adopt_hybrid(alone, 5, "rate")
    assert [s.node_id for s in adopted.stages] == ["b"] and live.current is adopted and adopted.share_token is None
    assert live.tick(6) is None  # node a, left out on purpose, is not re-placed as if it had just joined
    parallel = HybridPlan(((HybridStage(0, 5, ("a",)),), (HybridStage(0, 5, ("b",)),)), 1, 1, 0.1, None)
    adopted = live.adopt_hybrid(parallel, 7, "rate")
    assert [(s.pipeline, s.node_id) for s in adopted.stages] == [(0, "a"), (1, "b")] and adopted.share_token
    assert live.adopt_hybrid(parallel, 8, "rate") is None  # the placement runs it already


def test_a_one_pipeline_plan_with_replicated_stages_is_adopted_with_its_share_token():
    live = two_nodes()
    first = live.current
    replicated = HybridPlan(((HybridStage(0, 2, ("a",)), HybridStage(3, 5, ("b", "c"))),), 1, 4.0, 0.1, None)
    assert live.adopt_hybrid(replicated, 5, "rate") is None  # node c is not online: not placed
    live.allowed.append("c")
    live.set_status("c", "online", 5)
    live.set_offer(offer("c"))
    adopted = live.adopt_hybrid(replicated, 6, "rate")
    assert adopted is live.current and adopted.version > first.version
    assert [(s.stage, s.nodes, s.first_block, s.last_block) for s in adopted.stages] == [
        (1, ["a"], 0, 2), (2, ["b", "c"], 3, 5)]
    assert adopted.share_token and adopted.bottleneck_s == pytest.approx(0.25)  # the replicas' shared group
    assert live.adopt_hybrid(replicated, 7, "rate") is None  # the same replicas again: nothing moves
    whole = HybridPlan(((HybridStage(0, 5, ("a", "b", "c")),),), 1, 1, 0.1, None)  # data partitioning
    again = live.adopt_hybrid(whole, 8, "rate")
    assert again.stages[0].nodes == ["a", "b", "c"] and again.share_token == adopted.share_token


def test_a_replicated_rate_plan_is_kept_when_a_node_joins_and_re_placed_when_one_is_lost():
    """In pipeline mode the one-pipeline planner cannot weigh replicas: a newcomer waits for the next rate re-plan;
    a lost replica re-places the survivors as one pipeline, as any lost node does."""
    live = LivePlacement(PlacementRules(0, 0, 0.1), "trapnet", "abc", ["a", "b", "c"], started=0)
    for node in ("a", "b", "c"):
        live.set_offer(offer(node))
    for node in ("a", "b"):
        live.set_status(node, "online", 0)
    assert live.tick(1) is not None
    replicated = live.adopt_hybrid(HybridPlan(((HybridStage(0, 5, ("a", "b")),),), 1, 1, 0.1, None), 2, "rate")
    assert replicated is not None
    live.set_status("c", "online", 3)
    assert live.tick(4) is None and live.current is replicated
    live.set_status("b", "offline", 5)
    survivors = live.tick(6)
    assert survivors is not None and set(survivors.node_ids()) == {"a", "c"}
    assert not any(s.replicas for s in survivors.stages)
