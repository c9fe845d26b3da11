"""The planner scales to every node of a site: never worse than the optimum claims, exact when it says so,
and a plan whenever one exists, also past the type DP's table limit."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from edgeprune.bench.placement import distinct_problem
from gateway import placement
from gateway.live_placement import LivePlacement, PlacementRules
from gateway.placement import (InfeasiblePlacement, PlacementProblem, cost_assignment, dp_cells_bound,
                               heuristic_plan, optimal_plan, ordered_plan, solve_plan)
from shared.schemas import BlockProfile, ModelProfile, NodeProfile
from tests.test_placement import brute_force, problems, reference_bottleneck, stages_of


@pytest.fixture
def no_type_dp(monkeypatch):
    """Every problem takes the scalable path (heuristic + MILP), as a site of self-profiled nodes does."""
    monkeypatch.setattr(placement, "SOLVE_DP_CELLS", 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(problems())
def test_scalable_path_finds_a_plan_iff_one_exists_and_is_exact_when_it_says_so(no_type_dp,
                                                                                 problem: PlacementProblem) -> None:
    expected = brute_force(problem)
    if expected is None:
        with pytest.raises(InfeasiblePlacement):
            solve_plan(problem)
        return
    plan = solve_plan(problem, time_limit_s=30)
    assert reference_bottleneck(problem, stages_of(plan)) == pytest.approx(plan.bottleneck_s, rel=1e-12, abs=1e-15)
    assert plan.bottleneck_s >= expected * (1 - 1e-9)
    device_links = any(s != placement.CAMERA and r != placement.GATEWAY for s, r in problem.links)
    assert plan.exact == (not device_links)  # given time, the MILP proves every link-free instance
    if plan.exact:
        assert plan.bottleneck_s == pytest.approx(expected, rel=1e-6, abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(problems(max_devices=3, max_blocks=5))
def test_ordered_plan_over_every_order_is_the_optimum(problem: PlacementProblem) -> None:
    """ordered_plan is exact for its order (any subsequence, links included): the best order gives the optimum."""
    expected = brute_force(problem)
    found = [p for order in itertools.permutations([d.id for d in problem.devices])
             if (p := ordered_plan(problem, order)) is not None]
    assert bool(found) == (expected is not None)
    if found:
        assert min(p.bottleneck_s for p in found) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_the_milp_finds_a_plan_the_heuristic_misses(no_type_dp, monkeypatch) -> None:
    problem = distinct_problem(random.Random(3), 8, 12)
    monkeypatch.setattr(placement, "heuristic_plan", lambda problem: None)
    plan = solve_plan(problem)
    assert plan.method == "milp"
    assert plan.bottleneck_s == pytest.approx(optimal_plan(problem).bottleneck_s, rel=1e-6)


def test_heuristic_never_beats_the_exact_dp_and_solve_plan_matches_it(no_type_dp) -> None:
    rng = random.Random(0)
    for _ in range(5):
        problem = distinct_problem(rng, 8, 20)
        try:
            best = optimal_plan(problem)
        except InfeasiblePlacement:
            continue
        heuristic = heuristic_plan(problem)
        assert heuristic is None or heuristic.bottleneck_s >= best.bottleneck_s * (1 - 1e-12)
        plan = solve_plan(problem, time_limit_s=30)
        assert plan.exact and plan.bottleneck_s == pytest.approx(best.bottleneck_s, rel=1e-6)


def test_fifty_distinct_nodes_and_sixty_blocks_get_a_plan() -> None:
    """The case the type DP refuses: every node its own type."""
    problem = distinct_problem(random.Random(1), 50, 60)
    assert dp_cells_bound(problem) > placement.MAX_DP_CELLS
    with pytest.raises(ValueError, match="DP cells"):
        optimal_plan(problem)
    plan = solve_plan(problem)
    assert cost_assignment(problem, stages_of(plan)) == replace(plan, exact=True, method="dp")
    assert len(plan.stages) > 1


def test_device_links_leave_the_plan_unproven(no_type_dp) -> None:
    problem = distinct_problem(random.Random(2), 6, 10)
    first, second = problem.devices[0].id, problem.devices[1].id
    linked = replace(problem, links={(first, second): 1e3})
    plan = solve_plan(linked, time_limit_s=30)
    assert not plan.exact
    assert plan.bottleneck_s >= optimal_plan(linked).bottleneck_s * (1 - 1e-12)


def test_live_placement_places_twenty_self_profiled_nodes() -> None:
    """Every live node measures its own latencies, so none merge: the gateway must still place them."""
    rng = random.Random(4)
    nodes = [f"pi-{k}" for k in range(20)]
    live = LivePlacement(PlacementRules(startup_wait_s=20, rejoin_hold_s=10, min_gain=0.1), "trapnet", "abc",
                         nodes, started=0)
    for node in nodes:
        blocks = [BlockProfile(name=f"b{i}", latency_s=0.01 * rng.lognormvariate(0, 0.1), param_bytes=1000,
                               activation_bytes=1000, output_bytes=1000) for i in range(60)]
        profile = ModelProfile(model="trapnet", host=node, threads=1, repeats=1, warmup=0, wire_dtype="float16",
                               blocks=blocks)
        live.set_status(node, "online", 0)
        live.set_offer(NodeProfile(node_id=node, model_fingerprint="abc", memory_mb=100, uplink_mbit_s=1000,
                                   profile=profile))
    placement_message = live.tick(1)
    assert placement_message is not None and live.last_error is None
    assert len(placement_message.stages) == 20
