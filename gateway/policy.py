"""Choosing per-stage pruning ratios from the calibrated curves: the paper's rule and the bottleneck rule.

Pure functions of a :class:`RatioProblem`; the controller decides *when* to call them. Ratios are always chosen
on the ladder the nodes have variants for, and never below the accuracy floor when the unpruned
pipeline (with any manual holds) meets it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import numpy as np
from scipy.optimize import linprog

from gateway.curves import AccuracyFit, AccuracyModel, LatencyCurve, ReplicaAccuracy, SliceLatencyFit

PolicyName = Literal["paper", "bottleneck"]
TOLERANCE = 1e-9  # times and ratios closer than this are equal (the controller uses it too)


@dataclass(frozen=True)
class RatioProblem:
    """Everything a policy needs, in stage order.

    ``slowdowns`` are each node's observed compute time over its calibrated time (≥ 1): a stage's predicted
    time is slowdown × calibrated curve. ``budget_s`` is the time every stage must stay under.
    ``fixed`` holds stages at a ratio the policy may not change (manual overrides), by stage index.
    ``rate_caps_s`` tightens a stage's budget where the arrival rate needs it: a stage that takes longer
    per frame than 1 / (its share of the arrivals) builds a queue whatever the SLO budget says.
    """

    latency: Sequence[SliceLatencyFit]
    slowdowns: Sequence[float]
    accuracy: AccuracyFit | ReplicaAccuracy  # one entry per stage, or per node when stages have replicas
    accuracy_floor: float
    budget_s: float
    ladder: Sequence[float]
    accuracy_model: AccuracyModel = "logistic"
    fixed: Mapping[int, float] = field(default_factory=dict)
    names: Sequence[str] | None = None
    rate_caps_s: Sequence[float | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.latency)
        if len(self.slowdowns) != n or self.accuracy.n_stages != n:
            raise ValueError("latency fits, slowdowns and accuracy gains must cover the same stages")
        if self.rate_caps_s is not None and len(self.rate_caps_s) != n:
            raise ValueError("rate caps must cover the same stages")
        if not self.ladder or self.ladder[0] != 0.0 or any(b <= a for a, b in zip(self.ladder, self.ladder[1:])):
            raise ValueError("the ladder must start at 0 and increase")
        if any(not 0 <= i < n for i in self.fixed):
            raise ValueError("fixed stage index out of range")

    @property
    def n_stages(self) -> int:
        return len(self.latency)

    @cached_property
    def curves(self) -> tuple[LatencyCurve, ...]:
        return tuple(fit.best() for fit in self.latency)

    @cached_property
    def predict_accuracy(self) -> Callable[[Sequence[float]], float]:
        return self.accuracy.predictor(self.accuracy_model)

    def name(self, stage: int) -> str:
        return self.names[stage] if self.names else f"stage {stage + 1}"

    def options(self, stage: int) -> tuple[float, ...]:
        """Ratios a stage may take: its held ratio if fixed, else the ladder."""
        return (self.fixed[stage],) if stage in self.fixed else tuple(self.ladder)

    def stage_time(self, stage: int, ratio: float) -> float:
        return self.slowdowns[stage] * self.curves[stage].predict(ratio)

    def stage_budget(self, stage: int) -> float:
        """The time a stage must stay under: the SLO's per-stage budget, or the rate's cap when tighter."""
        cap = self.rate_caps_s[stage] if self.rate_caps_s is not None else None
        return self.budget_s if cap is None else min(self.budget_s, cap)

    def rate_bound(self, stage: int) -> bool:
        """Whether the arrival rate, not the SLO budget, sets this stage's budget."""
        return self.stage_budget(stage) < self.budget_s - TOLERANCE

    def budgets_text(self) -> str:
        """The budget every stage was held to, naming the rate where it bound."""
        if not any(self.rate_bound(i) for i in range(self.n_stages)):
            return f"the {self.budget_s:.3f} s budget"
        return "budgets " + ", ".join(
            f"{self.name(i)} {self.stage_budget(i) * 1e3:.0f} ms" + (" (arrival rate)" if self.rate_bound(i) else "")
            for i in range(self.n_stages))

    def unpruned(self) -> tuple[float, ...]:
        """No pruning anywhere except the held stages: the most accurate vector available."""
        return tuple(self.fixed.get(i, 0.0) for i in range(self.n_stages))

    def meets_floor(self, ratios: Sequence[float]) -> bool:
        return self.predict_accuracy(ratios) >= self.accuracy_floor - TOLERANCE


@dataclass(frozen=True)
class Decision:
    """A ratio vector with what the curves predict for it, for the log and the operator page."""

    policy: str
    ratios: tuple[float, ...]
    stage_latency_s: tuple[float, ...]
    bottleneck_s: float
    bottleneck_stage: int
    accuracy: float
    budget_s: float
    infeasible: bool
    reason: str


def evaluate_ratios(problem: RatioProblem, ratios: Sequence[float], policy: str, reason: str,
             infeasible: bool = False) -> Decision:
    """Predicted per-stage time, bottleneck and accuracy of ``ratios`` at the nodes' current speed."""
    times = tuple(problem.stage_time(i, r) for i, r in enumerate(ratios))
    slowest = int(np.argmax(times))
    return Decision(policy=policy, ratios=tuple(ratios), stage_latency_s=times, bottleneck_s=times[slowest],
                    bottleneck_stage=slowest, accuracy=problem.predict_accuracy(ratios),
                    budget_s=problem.budget_s, infeasible=infeasible, reason=reason)


def _least_pruning_under(problem: RatioProblem, scale: float) -> tuple[float, ...] | None:
    """Per stage, the smallest allowed ratio whose predicted time is ≤ scale × its budget (None if a stage can't)."""
    chosen = []
    for stage in range(problem.n_stages):
        level_s = scale * problem.stage_budget(stage)
        fitting = [r for r in problem.options(stage) if problem.stage_time(stage, r) <= level_s + TOLERANCE]
        if not fitting:
            return None
        chosen.append(fitting[0])
    return tuple(chosen)


def choose_bottleneck(problem: RatioProblem) -> Decision:
    """Least total pruning that brings every stage under its budget at current speeds, above the floor.

    Stage times are separable, so any vector meeting scale × every stage's budget prunes each stage at
    least as much as ``_least_pruning_under(scale)``; accuracy does not rise with pruning (both predictors
    guarantee it), so that minimal vector is the unique optimum when it meets the floor, and no vector
    does otherwise. This is exact for any number of stages in O(stages² · ladder²).

    If the budgets cannot be met, the best effort is the smallest reachable overrun (the largest stage
    time over its budget, a bottleneck when the budgets are equal) above the floor, reached with the least
    pruning, flagged infeasible.
    """
    budgets = problem.budgets_text()
    minimal = _least_pruning_under(problem, 1.0)
    if minimal is not None and problem.meets_floor(minimal):
        return evaluate_ratios(problem, minimal, "bottleneck", f"least pruning that puts every stage under {budgets}")

    if minimal is None:
        slow = [problem.name(i) for i in range(problem.n_stages)
                if problem.stage_time(i, problem.options(i)[-1]) > problem.stage_budget(i) + TOLERANCE]
        why = f"{', '.join(slow)} cannot meet {budgets} even at the highest allowed ratio"
    else:
        why = (f"meeting {budgets} needs accuracy "
               f"{problem.predict_accuracy(minimal):.3f} < floor {problem.accuracy_floor:.3f}")
    scales = sorted({problem.stage_time(i, r) / problem.stage_budget(i)
                     for i in range(problem.n_stages) for r in problem.options(i)})
    for scale in scales:
        if scale <= 1.0:
            continue
        candidate = _least_pruning_under(problem, scale)
        if candidate is not None and problem.meets_floor(candidate):
            return evaluate_ratios(problem, candidate, "bottleneck",
                            f"{why}; best effort: smallest reachable bottleneck above the floor", infeasible=True)
    return evaluate_ratios(problem, problem.unpruned(), "bottleneck",
                    f"{why}; the accuracy floor is not met even unpruned, so nothing is pruned", infeasible=True)


def choose_paper(problem: RatioProblem) -> Decision:
    """The paper's rule: min Σ (α_i·p_i + β_i) subject to a(p) ≥ A_min, 0 ≤ p_i ≤ p_max.

    σ is monotone, so the floor is the linear constraint Σ g_i·p_i ≥ required score and the problem is a
    linear programme (solved by scipy's HiGHS). It ignores current speeds: it prunes as much as the floor
    allows wherever the line says time falls. Snapping: each ratio is rounded *down* to the ladder (which
    cannot lower accuracy), then the freed accuracy is spent one ladder step at a time on the stage with
    the largest latency saved per accuracy lost (α_i/g_i), as the paper distributes overshoot.
    Predicted times use the best curve × current slowdown, so its infeasibility is judged like ours.
    """
    start = problem.unpruned()
    if not problem.meets_floor(start):
        return evaluate_ratios(problem, start, "paper", "the accuracy floor is not met even unpruned", infeasible=True)

    free = [i for i in range(problem.n_stages) if i not in problem.fixed]
    slope = {i: problem.latency[i].linear.coef[0] for i in free}
    gain = {i: problem.accuracy.gains[i] for i in free}
    held_score = sum(problem.accuracy.gains[i] * r for i, r in problem.fixed.items())
    needed = problem.accuracy.required_score(problem.accuracy_floor) - held_score
    ratios = list(start)
    if free and needed < np.inf:
        floor_constraint = {"A_ub": [[-gain[i] for i in free]], "b_ub": [-needed]} if needed > -np.inf else {}
        solution = linprog([slope[i] for i in free], **floor_constraint, bounds=[(0.0, problem.ladder[-1])] * len(free),
                           method="highs")
        if solution.success:
            for i, p in zip(free, solution.x):
                ratios[i] = max(r for r in problem.ladder if r <= p + TOLERANCE)
        if not problem.meets_floor(ratios):  # the measured table can be stricter than the logistic
            ratios = list(start)

    def saved_per_accuracy(stage: int) -> float:
        return slope[stage] / gain[stage] if gain[stage] < 0 else np.inf

    while True:
        steps = []
        for i in free:
            higher = [r for r in problem.ladder if r > ratios[i] + TOLERANCE]
            if higher and slope[i] < 0:
                stepped = ratios[:i] + [higher[0]] + ratios[i + 1:]
                if problem.meets_floor(stepped):
                    steps.append((saved_per_accuracy(i), -i, stepped))
        if not steps:
            break
        ratios = max(steps)[2]

    decision = evaluate_ratios(problem, ratios, "paper", "largest pruning the accuracy floor allows (paper's rule)")
    if decision.bottleneck_s <= problem.budget_s + TOLERANCE:
        return decision
    return replace(decision, infeasible=True,
                   reason=f"even the largest pruning the floor allows leaves {problem.name(decision.bottleneck_stage)}"
                          f" at {decision.bottleneck_s:.3f} s over the {problem.budget_s:.3f} s budget")


def choose_adaptive(problem: RatioProblem) -> Decision:
    """The adaptive controller's choice: the bottleneck rule's solver, on budgets the arrival rate may tighten
    (``RatioProblem.rate_caps_s``); the controller, not the rule, is what differs (gateway/controller.py)."""
    return replace(choose_bottleneck(problem), policy="adaptive")


POLICIES: dict[str, Callable[[RatioProblem], Decision]] = {
    "paper": choose_paper, "bottleneck": choose_bottleneck, "adaptive": choose_adaptive}
