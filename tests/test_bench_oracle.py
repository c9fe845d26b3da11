"""The benchmark's oracle policy and rate sweep: pure decisions (no cluster)."""

from __future__ import annotations

import pytest

from edgeprune.bench.pipeline import Scenario, at_rate, oracle_plan, parse_rates, true_slowdowns
from edgeprune.demo import SlowdownEpisode
from gateway.policy import RatioProblem
from tests.test_policy import LADDER, accuracy_fit, slice_fit

NODES = ["node-1", "node-2"]


def two_stages(budget_s: float = 0.08, floor_fraction: float = 0.8) -> RatioProblem:
    """Two 50 ms stages (a fifth of each is not prunable) under an 80 ms stage budget at slowdown 1."""
    accuracy = accuracy_fit([-2.0, -3.0])
    unpruned = accuracy.predictor("logistic")([0.0, 0.0])
    return RatioProblem(latency=[slice_fit(0.05, 0.2), slice_fit(0.05, 0.2)], slowdowns=[1.0, 1.0],
                        accuracy=accuracy, accuracy_floor=floor_fraction * unpruned, budget_s=budget_s,
                        ladder=LADDER, names=NODES)


def test_true_slowdowns_follow_the_schedule_as_the_benchmark_applies_it():
    episodes = (SlowdownEpisode("node-1", 3.0, 10, 30), SlowdownEpisode("node-2", 2.0, 20, 40))
    assert true_slowdowns(episodes, 9.99) == {}
    assert true_slowdowns(episodes, 10) == {"node-1": 3.0}
    assert true_slowdowns(episodes, 25) == {"node-1": 3.0, "node-2": 2.0}
    assert true_slowdowns(episodes, 30) == {"node-1": 1.0, "node-2": 2.0}
    assert true_slowdowns(episodes, 50) == {"node-1": 1.0, "node-2": 1.0}
    back_to_back = (SlowdownEpisode("node-1", 3.0, 0, 10), SlowdownEpisode("node-1", 5.0, 10, 20))
    assert true_slowdowns(back_to_back, 10) == {"node-1": 5.0}  # the next onset wins over the end at the same time


def test_oracle_prunes_at_the_onset_least_that_meets_the_budget_and_restores_exactly_at_the_end():
    problem = two_stages()
    plan = oracle_plan(problem, NODES, (SlowdownEpisode("node-1", 3.0, 30, 90),))
    assert [step["at_s"] for step in plan] == [30, 90]  # unpruned meets the budget at slowdown 1: no step at 0
    onset, end = plan
    pruned = onset["ratios"]["node-1"]
    assert pruned > 0 and onset["ratios"]["node-2"] == 0 and onset["changed"] == {"node-1": pruned}
    assert onset["slowdowns"] == {"node-1": 3.0, "node-2": 1.0} and not onset["infeasible"]
    slowed = 3.0 * problem.curves[0].predict(pruned)
    assert slowed == pytest.approx(onset["predicted_bottleneck_s"]) and slowed <= problem.budget_s
    one_step_less = LADDER[LADDER.index(pruned) - 1]
    assert 3.0 * problem.curves[0].predict(one_step_less) > problem.budget_s  # least pruning that fits
    assert onset["predicted_accuracy"] >= problem.accuracy_floor
    assert end["ratios"] == {"node-1": 0.0, "node-2": 0.0} and end["changed"] == {"node-1": 0.0}


def test_oracle_follows_overlapping_slowdowns_node_by_node():
    plan = oracle_plan(two_stages(), NODES, (SlowdownEpisode("node-1", 3.0, 10, 50),
                                             SlowdownEpisode("node-2", 2.0, 30, 70)))
    assert [step["at_s"] for step in plan] == [10, 30, 50, 70]
    assert plan[1]["changed"] == {"node-2": plan[1]["ratios"]["node-2"]} and plan[1]["ratios"]["node-2"] > 0
    assert plan[2]["ratios"] == {"node-1": 0.0, "node-2": plan[1]["ratios"]["node-2"]}  # node-2 is still slowed
    assert plan[3]["ratios"] == {"node-1": 0.0, "node-2": 0.0}
    assert not any(step["infeasible"] for step in plan)


def test_oracle_keeps_the_floor_when_the_budget_is_out_of_reach():
    problem = two_stages(floor_fraction=0.97)
    plan = oracle_plan(problem, NODES, (SlowdownEpisode("node-2", 40.0, 30, 70),))
    assert [step["at_s"] for step in plan] == [30, 70]
    best_effort = plan[0]
    assert best_effort["infeasible"] and best_effort["predicted_bottleneck_s"] > problem.budget_s
    assert best_effort["ratios"]["node-2"] > 0 and best_effort["predicted_accuracy"] >= problem.accuracy_floor - 1e-9
    assert problem.predict_accuracy([0.0, LADDER[LADDER.index(best_effort["ratios"]["node-2"]) + 1]]) \
        < problem.accuracy_floor  # the next step would have crossed the floor
    assert plan[1]["ratios"] == {"node-1": 0.0, "node-2": 0.0}


def test_oracle_prunes_from_the_start_when_the_pipeline_misses_the_budget_unslowed():
    plan = oracle_plan(two_stages(budget_s=0.04), NODES, ())
    assert len(plan) == 1 and plan[0]["at_s"] == 0 and all(r > 0 for r in plan[0]["ratios"].values())


def test_rate_multipliers_compress_the_trace_or_multiply_the_rate_and_keep_the_schedule():
    episodes = (SlowdownEpisode("node-1", 3.0, 10, 30),)
    bursts = Scenario(name="s", description="", duration_s=60, slo_s=0.2, window_s=5, seed=3, nodes={"node-1": 10.0},
                      imbalance={}, slowdowns=episodes, arrivals={"kind": "bursts", "cameras": 4, "time_scale": 10})
    doubled = at_rate(bursts, 2)
    assert doubled.arrivals == {"kind": "bursts", "cameras": 4, "time_scale": 20.0}
    assert (doubled.slowdowns, doubled.seed, doubled.duration_s) == (episodes, 3, 60)
    assert bursts.arrivals["time_scale"] == 10  # the scenario itself is left alone
    poisson = Scenario(**{**vars(bursts), "arrivals": {"kind": "poisson", "rate_hz": 4.0}})
    assert at_rate(poisson, 0.5).arrivals == {"kind": "poisson", "rate_hz": 2.0}
    assert parse_rates("2, 0.5") == [0.5, 1.0, 2.0]
    for bad in ("0,1", "fast", "-1"):
        with pytest.raises(SystemExit, match="--rates"):
            parse_rates(bad)
