"""Ratio policies: exact against brute force on small pipelines, and the properties the controller relies on."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.curves import AccuracyFit, fit_latency
from gateway.policy import POLICIES, RatioProblem, choose_bottleneck, choose_paper, evaluate_ratios

LADDER = tuple(round(0.1 * k, 1) for k in range(10))
COARSE = (0.0, 0.25, 0.5, 0.75)


def slice_fit(t0: float, floor_share: float):
    """Exact MAC-bound slice: t(p) = t0·(share + (1 − share)(1 − p)²), strictly falling."""
    return fit_latency(LADDER, [t0 * (floor_share + (1 - floor_share) * (1 - p) ** 2) for p in LADDER])


def accuracy_fit(gains, offset=-4.0, top=0.93, chance=0.1, ladder=LADDER):
    """A logistic with known parameters whose measured table is the full ladder grid (for the lookup)."""
    vectors = tuple(itertools.product(ladder, repeat=len(gains)))
    template = AccuracyFit(tuple(gains), offset, top, chance, 1.0, 0.0, vectors, ())
    return replace(template, accuracies=tuple(template.logistic(v) for v in vectors))


@st.composite
def problems(draw, max_stages=3, models=("logistic",)):
    n = draw(st.integers(1, max_stages))
    model = draw(st.sampled_from(models))
    ladder = COARSE if model == "measured" else LADDER
    fits = [slice_fit(draw(st.floats(0.02, 0.3)), draw(st.floats(0.05, 0.5))) for _ in range(n)]
    gains = [draw(st.floats(-10.0, -0.5)) for _ in range(n)]
    accuracy = accuracy_fit(gains, offset=draw(st.floats(-6.0, -1.0)), top=draw(st.floats(0.7, 1.0)),
                            ladder=ladder)
    unpruned = accuracy.predictor(model)([0.0] * n)
    fixed = {}
    if n > 1 and draw(st.booleans()):
        fixed = {draw(st.integers(0, n - 1)): draw(st.sampled_from(ladder))}
    caps = None  # the arrival rate's tighter budget on some stages (adaptive)
    if draw(st.booleans()):
        caps = [draw(st.one_of(st.none(), st.floats(0.01, 0.4))) for _ in range(n)]
    return RatioProblem(latency=fits, slowdowns=[draw(st.floats(1.0, 8.0)) for _ in range(n)], accuracy=accuracy,
                        accuracy_floor=draw(st.floats(0.5, 0.99)) * unpruned, budget_s=draw(st.floats(0.03, 0.4)),
                        ladder=ladder, accuracy_model=model, fixed=fixed, rate_caps_s=caps)


def brute_force(problem: RatioProblem) -> tuple[bool, tuple[float, ...]]:
    """(feasible, vector): least total pruning meeting every stage's budget and the floor, else the smallest
    overrun (stage time over its budget) above the floor with the least pruning, else the unpruned vector."""
    vectors = itertools.product(*(problem.options(i) for i in range(problem.n_stages)))
    above_floor = [v for v in vectors if problem.meets_floor(v)]
    if not above_floor:
        return False, problem.unpruned()

    def overrun(v):
        return max(problem.stage_time(i, r) / problem.stage_budget(i) for i, r in enumerate(v))

    feasible = [v for v in above_floor
                if all(problem.stage_time(i, r) <= problem.stage_budget(i) + 1e-9 for i, r in enumerate(v))]
    if feasible:
        return True, min(feasible, key=sum)
    # overruns equal within the policy's TOLERANCE tie (two stages both at 0.25 s differ by 1e-16 in the fit)
    return False, min(above_floor, key=lambda v: (round(overrun(v), 9), sum(v)))


@settings(max_examples=150, deadline=None)
@given(problems(models=("logistic", "measured")))
def test_bottleneck_policy_is_exact_against_brute_force(problem):
    decision = choose_bottleneck(problem)
    feasible, expected = brute_force(problem)
    assert decision.infeasible == (not feasible)
    assert decision.ratios == pytest.approx(expected)
    if feasible:  # and so no vector with less total pruning meets budget and floor
        assert all(t <= problem.stage_budget(i) + 1e-9 for i, t in enumerate(decision.stage_latency_s))


def test_an_arrival_rate_cap_tightens_only_its_stage_and_is_named():
    fits = [slice_fit(0.1, 0.2), slice_fit(0.1, 0.2)]
    base = RatioProblem(latency=fits, slowdowns=[1.0, 1.0], accuracy=accuracy_fit([-1.0, -1.0]),
                        accuracy_floor=0.5, budget_s=0.2, ladder=LADDER)
    assert choose_bottleneck(base).ratios == (0.0, 0.0)
    capped = replace(base, rate_caps_s=[None, 0.06])  # stage 2 must serve a frame in 60 ms to keep up
    decision = choose_bottleneck(capped)
    assert decision.ratios[0] == 0.0 and decision.ratios[1] > 0
    assert decision.stage_latency_s[1] <= 0.06 and capped.stage_time(1, decision.ratios[1] - 0.1) > 0.06
    assert "stage 2 60 ms (arrival rate)" in decision.reason and not decision.infeasible
    assert choose_bottleneck(replace(base, rate_caps_s=[None, 0.5])).ratios == (0.0, 0.0)  # looser: the SLO's


@settings(max_examples=150, deadline=None)
@given(problems(models=("logistic", "measured")), st.sampled_from(sorted(POLICIES)))
def test_no_policy_breaks_the_accuracy_floor_when_unpruned_meets_it(problem, policy):
    assume(problem.meets_floor(problem.unpruned()))
    decision = POLICIES[policy](problem)
    assert decision.accuracy >= problem.accuracy_floor - 1e-9
    assert all(r in problem.options(i) for i, r in enumerate(decision.ratios))
    assert all(decision.ratios[i] == r for i, r in problem.fixed.items())


@settings(max_examples=150, deadline=None)
@given(problems())
def test_a_stage_already_under_budget_is_never_pruned(problem):
    decision = choose_bottleneck(problem)
    for stage, ratio in enumerate(decision.ratios):
        if stage not in problem.fixed and problem.stage_time(stage, 0.0) <= problem.stage_budget(stage):
            assert ratio == 0.0, f"{problem.name(stage)} is not a bottleneck but was pruned to {ratio}"


@settings(max_examples=150, deadline=None)
@given(problems(), st.data())
def test_more_slowdown_on_a_node_never_lowers_its_ratio(problem, data):
    stage = data.draw(st.integers(0, problem.n_stages - 1))
    factor = data.draw(st.floats(1.0, 5.0))
    slower = list(problem.slowdowns)
    slower[stage] *= factor
    before = choose_bottleneck(problem).ratios[stage]
    after = choose_bottleneck(replace(problem, slowdowns=slower)).ratios[stage]
    assert after >= before


@settings(max_examples=100, deadline=None)
@given(problems())
def test_paper_policy_leaves_no_single_step_that_the_floor_would_allow(problem):
    assume(problem.meets_floor(problem.unpruned()))
    ratios = list(choose_paper(problem).ratios)
    for stage in range(problem.n_stages):
        higher = [r for r in problem.ladder if r > ratios[stage]]
        if stage in problem.fixed or not higher:
            continue
        stepped = ratios[:stage] + [higher[0]] + ratios[stage + 1:]
        assert not problem.meets_floor(stepped), f"{problem.name(stage)} could still go to {higher[0]}"


def two_stage(slowdowns, gains=(-6.0, -2.0), budget_s=0.2, **kwargs):
    fits = [slice_fit(0.12, 0.1), slice_fit(0.12, 0.1)]
    accuracy = accuracy_fit(gains)
    return RatioProblem(latency=fits, slowdowns=slowdowns, accuracy=accuracy,
                        accuracy_floor=0.9 * accuracy.logistic((0.0, 0.0)), budget_s=budget_s, ladder=LADDER,
                        names=("node-1", "node-2"), **kwargs)


def test_bottleneck_policy_prunes_only_the_slowed_stage_just_enough():
    decision = choose_bottleneck(two_stage([1.0, 4.0]))
    assert decision.ratios == (0.0, 0.5)  # 4 × t(0.4) = 0.226 > 0.2 ≥ 4 × t(0.5) = 0.168
    assert not decision.infeasible
    assert decision.bottleneck_stage == 1 and decision.bottleneck_s == pytest.approx(4 * 0.12 * (0.1 + 0.9 * 0.25))


def test_paper_policy_prunes_to_the_floor_on_the_cheapest_stage_regardless_of_speed():
    problem = two_stage([1.0, 1.0], gains=(-6.0, -3.0))
    decision = choose_paper(problem)
    assert decision.ratios[0] == 0.0 < decision.ratios[1]  # stage 2 costs a third of the accuracy per step
    assert decision.policy == "paper" and not decision.infeasible
    assert not problem.meets_floor((decision.ratios[0], decision.ratios[1] + 0.1))
    assert choose_paper(two_stage([4.0, 1.0], gains=(-6.0, -3.0))).ratios == decision.ratios


def test_paper_policy_spends_leftover_accuracy_where_it_saves_most_time_per_accuracy():
    # Time saved per accuracy lost ∝ t0/|g|: stage 2 (0.236) > stage 4 (0.038) > stage 1 (0.032) > stage 3 (0.020).
    # The LP maxes stage 2 and stops stage 4 between rungs; the slack after rounding fits two steps of
    # stage 1 or one of stage 3, not both: stage 1 must get them.
    fits = [slice_fit(t0, 0.1) for t0 in (0.06, 0.26, 0.06, 0.26)]
    accuracy = accuracy_fit((-1.9, -1.1, -3.0, -6.8), ladder=(0.0, 0.9))
    problem = RatioProblem(latency=fits, slowdowns=[1.0] * 4, accuracy=accuracy, budget_s=0.2, ladder=LADDER,
                           accuracy_floor=0.9 * accuracy.logistic((0.0,) * 4))
    assert choose_paper(problem).ratios == (0.2, 0.9, 0.0, 0.1)


def test_infeasible_budget_gives_best_effort_and_says_why():
    decision = choose_bottleneck(two_stage([1.0, 30.0]))
    assert decision.infeasible
    assert decision.ratios == (0.0, 0.9)  # the smallest bottleneck reachable
    assert "node-2 cannot meet" in decision.reason
    floor_bound = choose_bottleneck(two_stage([4.0, 4.0], gains=(-6.0, -6.0)))
    assert floor_bound.infeasible and "< floor" in floor_bound.reason
    assert floor_bound.accuracy >= two_stage([4.0, 4.0], gains=(-6.0, -6.0)).accuracy_floor


def test_paper_policy_flags_infeasible_when_its_vector_leaves_a_stage_over_budget():
    decision = choose_paper(two_stage([4.0, 1.0]))
    assert decision.infeasible and "node-1" in decision.reason


def test_floor_unmet_even_unpruned_prunes_nothing():
    problem = replace(two_stage([4.0, 4.0]), accuracy_floor=0.99)
    for policy in POLICIES.values():
        decision = policy(problem)
        assert decision.infeasible and decision.ratios == (0.0, 0.0)


def test_a_held_stage_keeps_its_ratio_and_the_other_takes_the_load():
    decision = choose_bottleneck(two_stage([4.0, 4.0], fixed={0: 0.3}))
    assert decision.ratios[0] == 0.3
    assert decision.infeasible  # stage 1 held at 0.3 cannot meet the budget at 4× slowdown
    assert decision.ratios[1] > 0.0


def test_evaluate_reports_what_the_curves_predict():
    problem = two_stage([4.0, 1.0])
    decision = evaluate_ratios(problem, (0.5, 0.0), "restore", "why")
    expected = (4 * 0.12 * (0.1 + 0.9 * 0.25), 0.12)
    assert decision.stage_latency_s == pytest.approx(expected)
    assert decision.bottleneck_stage == 0 and decision.bottleneck_s == pytest.approx(expected[0])
    assert decision.accuracy == pytest.approx(problem.accuracy.logistic((0.5, 0.0)))


def test_problem_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same stages"):
        replace(two_stage([1.0, 1.0]), slowdowns=[1.0])
    with pytest.raises(ValueError, match="ladder"):
        replace(two_stage([1.0, 1.0]), ladder=(0.1, 0.5))
    with pytest.raises(ValueError, match="fixed"):
        two_stage([1.0, 1.0], fixed={2: 0.5})


# An independent cost model, written from docs/controller.md rather than taken from the product:
# a stage's time is slowdown × t0·(share + (1 − share)(1 − p)²) (the exact curve the fits are fed) and
# a(p) = chance + (top − chance)·σ(Σ g_i·p_i − d). A bug in RatioProblem.stage_time, the fits or the
# accuracy predictor cannot hide here, as it can in the brute force above (which reuses them).
def independent_time(t0: float, share: float, slowdown: float, p: float) -> float:
    return slowdown * t0 * (share + (1 - share) * (1 - p) ** 2)


def independent_accuracy(gains, offset, top, chance, ratios) -> float:
    score = sum(g * p for g, p in zip(gains, ratios))
    return chance + (top - chance) / (1 + math.exp(-(score - offset)))


@pytest.mark.parametrize("seed", range(30))
def test_bottleneck_policy_matches_a_brute_force_over_an_independent_cost_model(seed):
    rng = random.Random(seed)
    n = rng.choice((2, 3))
    t0 = [rng.uniform(0.02, 0.3) for _ in range(n)]
    share = [rng.uniform(0.05, 0.5) for _ in range(n)]
    slowdowns = [rng.uniform(1.0, 6.0) for _ in range(n)]
    gains, offset, top, chance = [rng.uniform(-10, -0.5) for _ in range(n)], rng.uniform(-6, -1), 0.93, 0.1
    budget = rng.uniform(0.35, 1.1) * max(independent_time(a, b, c, 0.0) for a, b, c in zip(t0, share, slowdowns))
    floor = rng.uniform(0.6, 0.97) * independent_accuracy(gains, offset, top, chance, [0.0] * n)
    problem = RatioProblem(latency=[slice_fit(a, b) for a, b in zip(t0, share)], slowdowns=slowdowns,
                           accuracy=accuracy_fit(gains, offset, top, chance), accuracy_floor=floor,
                           budget_s=budget, ladder=LADDER, accuracy_model="logistic")

    def times(v):
        return [independent_time(t0[i], share[i], slowdowns[i], p) for i, p in enumerate(v)]

    feasible = [v for v in itertools.product(LADDER, repeat=n)
                if max(times(v)) <= budget and independent_accuracy(gains, offset, top, chance, v) >= floor]
    decision = choose_bottleneck(problem)
    assert decision.stage_latency_s == pytest.approx(times(decision.ratios), rel=1e-6)
    assert decision.accuracy == pytest.approx(independent_accuracy(gains, offset, top, chance, decision.ratios))
    if feasible:
        assert not decision.infeasible and decision.ratios == min(feasible, key=sum)
    else:
        assert decision.infeasible


def test_hand_worked_three_stages():
    """Stage times at slowdown s: s·0.1·(0.1 + 0.9(1 − p)²). Budget 0.1 s.

    Stage 1 at s=1 needs nothing (0.1 ≤ 0.1). Stage 2 at s=2: 0.2·(0.1 + 0.9(1 − p)²) ≤ 0.1 needs
    (1 − p)² ≤ 4/9, p ≥ 1/3 -> 0.4 (0.3 gives 0.2·0.541 = 0.1082). Stage 3 at s=1.5: (1 − p)² ≤ 0.6296,
    p ≥ 0.2065 -> 0.3 (0.2 gives 0.15·0.676 = 0.1014; 0.3 gives 0.15·0.541 = 0.0812).
    """
    fits = [slice_fit(0.1, 0.1)] * 3
    accuracy = accuracy_fit((-1.0, -1.0, -1.0), offset=-6.0)
    problem = RatioProblem(latency=fits, slowdowns=[1.0, 2.0, 1.5], accuracy=accuracy, budget_s=0.1,
                           ladder=LADDER, accuracy_model="logistic", accuracy_floor=0.5)
    decision = choose_bottleneck(problem)
    assert decision.ratios == (0.0, 0.4, 0.3) and not decision.infeasible
    assert decision.stage_latency_s == pytest.approx((0.1, 0.2 * (0.1 + 0.9 * 0.36), 0.15 * (0.1 + 0.9 * 0.49)))
