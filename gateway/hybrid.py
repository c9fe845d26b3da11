"""Hybrid plans: one long pipeline, r parallel shorter pipelines, replicated bottleneck stages, pruning up front.

Pure (no I/O, no clock), so it can be checked against brute force. Collaborative edge inference
work (Taufique et al.) gains by choosing jointly where to split the model, how to spread requests
over nodes and which accuracy level to run; this module makes the same choice for edgeprune with
the placement cost model of :mod:`gateway.placement` and the pruning ladder as the accuracy levels.

Queueing model (documented in docs/placement.md, "Hybrid plans"):

* a replica ``d`` of a stage serves a frame in ``t_d = max(compute, transfer out)`` (CPU and network
  work in parallel). The broker hands a stage's frames to its r replicas in turn, whatever their speed
  (Mosquitto's shared subscriptions: nothing balances them by readiness), so each replica gets 1/r of
  them and the slowest sets the pace: the stage's rate is ``r / max t_d`` (:func:`stage_rate`), not the
  sum of its replicas' rates;
* arrivals are dealt to the pipelines in turn, one share per reader of a first stage (every pipeline's first
  stage joins one shared subscription of the camera frames), whatever a pipeline's capacity: the pipeline that
  saturates first at its share sets the plan's capacity, ``min_j capacity_j / share_j``;
* a frame's latency through a stage is its slowest replica's ``compute + transfer`` (conservative)
  plus that replica's own M/D/1 wait ``rho / (2 mu (1 - rho))``, ``mu = 1 / max t_d``, at utilisation
  ``rho = (lambda / r) / mu``; the frame upload is added once. The SLO holds when the slowest
  pipeline's mean latency is within it;
* the *sustainable* rate is the largest arrival rate at which the SLO holds (latency rises with
  the rate, so it is found by bisection), at most the camera uplink's rate;
* pruning a stage at ratio ``p`` multiplies its compute by the level's ``time_factor``; the plan's
  accuracy is the traffic-weighted mean over pipelines of the calibrated accuracy model applied to
  the per-block ratio vector, and must stay at or above ``accuracy_floor``.

Objective: if some plan sustains the arrival rate, the most accurate such plan (ties: more
headroom); otherwise the plan that sustains the highest rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from gateway.placement import InfeasiblePlacement, PlacementProblem, solve_plan, stage_cost, subproblem
from shared.profiling import CAMERA, GATEWAY
from shared.schemas import MAX_PIPELINES

# Pipelines tried at most (1..this many in parallel): each needs its own planner runs; a placement holds no more.
MAX_PARALLEL = MAX_PIPELINES
BISECTION_STEPS = 60


@dataclass(frozen=True)
class Level:
    """One rung of the pruning ladder: compute time at ``ratio`` is ``time_factor`` x the unpruned time."""

    ratio: float
    time_factor: float


UNPRUNED = (Level(0.0, 1.0),)


@dataclass(frozen=True)
class HybridStage:
    first_block: int
    last_block: int  # inclusive
    replicas: tuple[str, ...]
    ratio: float = 0.0


@dataclass(frozen=True)
class HybridPlan:
    pipelines: tuple[tuple[HybridStage, ...], ...]
    sustainable_hz: float  # largest arrival rate at which the SLO holds
    capacity_hz: float  # the rate the stages can serve at all (utilisation 1)
    latency_s: float  # slowest pipeline's predicted mean latency at the requested arrival rate (inf: overloaded)
    accuracy: float | None  # predicted, when an accuracy model was given

    @property
    def kind(self) -> str:
        replicated = any(len(s.replicas) > 1 for p in self.pipelines for s in p)
        if all(len(p) == 1 for p in self.pipelines):
            return "data partitioning (whole model per device)"
        if len(self.pipelines) > 1:
            return "parallel pipelines" + (" with replicated stages" if replicated else "")
        return "one pipeline" + (" with replicated stages" if replicated else "")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sustainable_hz": self.sustainable_hz, "capacity_hz": self.capacity_hz,
                "latency_s": self.latency_s, "accuracy": self.accuracy,
                "pipelines": [[{"blocks": [s.first_block, s.last_block], "replicas": list(s.replicas),
                                "ratio": s.ratio} for s in p] for p in self.pipelines]}


@dataclass(frozen=True)
class HybridRequest:
    """What the planner is asked: the placement problem plus rates, SLO and (optionally) accuracy levels."""

    problem: PlacementProblem
    arrival_hz: float
    slo_s: float
    levels: tuple[Level, ...] = UNPRUNED
    accuracy: Callable[[Sequence[float]], float] | None = None  # per-block ratio vector -> predicted accuracy
    accuracy_floor: float = 0.0

    def __post_init__(self) -> None:
        if not self.arrival_hz > 0 or not self.slo_s > 0:
            raise ValueError("the arrival rate and the SLO must be positive")
        if not self.levels or self.levels[0] != Level(0.0, 1.0):
            raise ValueError("the levels must start with the unpruned level (ratio 0, time factor 1)")
        if any(not 0 < lv.time_factor <= 1 for lv in self.levels):
            raise ValueError("a level's time factor must lie in (0, 1]: pruning never makes a slice slower")


def evaluate(request: HybridRequest, pipelines: Sequence[Sequence[HybridStage]]) -> HybridPlan:
    """The one cost function every hybrid planner is judged by; raises InfeasiblePlacement on a memory cap."""
    problem = request.problem
    _check_structure(problem, pipelines)
    factor = {lv.ratio: lv.time_factor for lv in request.levels}
    service, latencies = [], []  # per pipeline: per stage its replicas' service times; the fixed latency
    for stages in pipelines:
        receivers = [s.replicas for s in stages[1:]] + [(GATEWAY,)]
        stage_times, fixed = [], problem.frame_bytes / problem.bandwidth_to_any(CAMERA, stages[0].replicas)
        for stage, next_replicas in zip(stages, receivers):
            times, paths = [], []
            for device in stage.replicas:
                cost = stage_cost(problem, device, stage.first_block, stage.last_block, next_replicas)
                compute = cost.compute_s * factor[stage.ratio]
                times.append(max(compute, cost.transfer_s))
                paths.append(compute + cost.transfer_s)
            stage_times.append(times)
            fixed += max(paths)
        service.append(stage_times)
        latencies.append(fixed)
    capacities = [min(stage_rate(times) for times in stage_times) for stage_times in service]
    readers = [len(stages[0].replicas) for stages in pipelines]
    shares = [r / sum(readers) for r in readers]  # of the frames, per pipeline: the broker deals them in turn
    camera_hz = problem.camera_bandwidth_bps / problem.frame_bytes if problem.frame_bytes else math.inf
    capacity = min(min(c / share for c, share in zip(capacities, shares)), camera_hz)
    # the bisection below calls latency() 60 times per plan weighed: what does not depend on the rate is done once
    # per stage: (replicas r, the slowest replica's rate mu, 2 mu): each replica queues its 1/r of the frames
    servers = [[(len(times), 1 / max(times), 2 / max(times)) for times in stage_times if max(times) > 0]
               for stage_times in service]

    def latency(total_hz: float) -> float:
        worst = 0.0
        for queues, fixed, share in zip(servers, latencies, shares):
            wait = 0.0
            for replicas, mu, twice_mu in queues:
                rho = total_hz * share / replicas / mu
                if rho >= 1:
                    return math.inf
                wait += rho / (twice_mu * (1 - rho))
            worst = max(worst, fixed + wait)
        return worst

    if latency(0.0) > request.slo_s:
        sustainable = 0.0
    elif math.isinf(capacity):  # nothing takes time: no rate is too high
        sustainable = capacity
    else:
        low, high = 0.0, capacity
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if middle == low:  # latency(low) is known to be within the SLO: every further step keeps low and high
                break
            tried_high = middle == high  # then every further step repeats this one
            low, high = (middle, high) if latency(middle) <= request.slo_s else (low, middle)
            if tried_high:
                break
        sustainable = low
    accuracy = None
    if request.accuracy is not None:
        per_pipeline = [request.accuracy([s.ratio for s in stages for _ in range(s.first_block, s.last_block + 1)])
                        for stages in pipelines]
        accuracy = sum(a * share for a, share in zip(per_pipeline, shares))
    return HybridPlan(tuple(tuple(p) for p in pipelines), sustainable, capacity, latency(request.arrival_hz), accuracy)


def stage_rate(service_times: Sequence[float]) -> float:
    """Frames/s a stage serves when the broker deals them to its replicas in turn: r x its slowest replica's rate
    (each replica gets 1/r of the frames, so the slowest saturates first; a faster one idles the rest of its time)."""
    slowest = max(service_times)
    return len(service_times) / slowest if slowest > 0 else math.inf


def _check_structure(problem: PlacementProblem, pipelines: Sequence[Sequence[HybridStage]]) -> None:
    if not pipelines or any(not stages for stages in pipelines):
        raise ValueError("a hybrid plan needs at least one pipeline, each with at least one stage")
    used = [d for stages in pipelines for s in stages for d in s.replicas]
    if len(set(used)) != len(used):
        raise ValueError(f"a device serves two stages: {used}")
    for stages in pipelines:
        expected = 0
        for stage in stages:
            if stage.first_block != expected or stage.last_block < stage.first_block or not stage.replicas:
                raise ValueError("each pipeline's stages must cover the blocks contiguously, each with a replica")
            expected = stage.last_block + 1
        if expected != problem.n_blocks:
            raise ValueError(f"a pipeline covers blocks 0..{expected - 1} of {problem.n_blocks}")


def better(request: HybridRequest, a: HybridPlan, b: HybridPlan | None) -> bool:
    """Whether ``a`` beats ``b`` under the objective (see the module docstring)."""
    if b is None:
        return True
    return _key(request, a) > _key(request, b)


def _key(request: HybridRequest, plan: HybridPlan) -> tuple:
    accuracy = plan.accuracy if plan.accuracy is not None else 1.0
    if plan.sustainable_hz >= request.arrival_hz:
        return (1, round(accuracy, 12), plan.sustainable_hz)
    return (0, plan.sustainable_hz, round(accuracy, 12))


def meets_floor(request: HybridRequest, plan: HybridPlan) -> bool:
    return plan.accuracy is None or plan.accuracy >= request.accuracy_floor - 1e-12


def plan_hybrid(request: HybridRequest, max_parallel: int = MAX_PARALLEL, min_parallel: int = 1) -> HybridPlan:
    """The best hybrid plan found (module docstring: model and objective).

    Structures tried: for r = 1..``max_parallel`` parallel pipelines, the devices are dealt into r
    groups of near-equal speed (fastest first, each to the group with the least capacity so
    far); in each group, for every m, the minimum-bottleneck pipeline over its m fastest devices
    (:func:`gateway.placement.solve_plan`), the group's other devices then added one by one as
    replicas of whichever stage is slowest and can hold them (at least ``min_parallel`` pipelines: the
    gateway's ``placement_mode = "parallel"``, for comparisons). Pruning: every structure with all
    stages at one level, and a greedy path pruning the slowest stage one level further while the
    accuracy floor holds. Raises InfeasiblePlacement when nothing fits the memory caps.
    """
    problem = request.problem
    speed = {d.id: problem.compute(d.id, 0, problem.n_blocks) for d in problem.devices}
    ids = sorted((d.id for d in problem.devices), key=speed.get)
    best: HybridPlan | None = None
    for r in range(min_parallel, min(max_parallel, len(ids)) + 1):
        groups: list[list[str]] = [[] for _ in range(r)]
        for device in ids:
            min(groups, key=lambda g: sum(1 / (speed[d] or 1e-12) for d in g)).append(device)
        options = [_group_pipelines(problem, group, speed) for group in groups]
        if any(not o for o in options):
            continue
        # Groups are alike by construction: combine each group's m-th option (same shape everywhere).
        for m in range(max(len(o) for o in options)):
            pipelines = [o[min(m, len(o) - 1)] for o in options]
            for candidate in _with_levels(request, pipelines):
                if meets_floor(request, candidate) and better(request, candidate, best):
                    best = candidate
    if best is None:
        raise InfeasiblePlacement("no hybrid plan fits the memory caps (or meets the accuracy floor)")
    return best


def _group_pipelines(problem: PlacementProblem, group: list[str], speed: dict[str, float]) -> list[list[HybridStage]]:
    """Pipelines over a group: for each m, the best pipeline on its m fastest devices, then with the group's
    other devices added one at a time (fastest first) as replicas; each step is a candidate, because a
    slow replica adds latency (a frame may wait for it) and may even lower its stage's rate (it sets the pace)."""
    found = []
    ordered = sorted(group, key=speed.get)
    for m in range(1, len(group) + 1):
        try:
            plan = solve_plan(subproblem(problem, ordered[:m]))
        except InfeasiblePlacement:
            continue
        stages = [HybridStage(s.first_block, s.last_block, (s.device,)) for s in plan.stages]
        found.append(stages)
        for device in [d for d in ordered if d not in {s.device for s in plan.stages}]:
            stages = _add_replica(problem, stages, device)
            if stages is not found[-1]:
                found.append(stages)
    return found


def _add_replica(problem: PlacementProblem, stages: list[HybridStage], device: str) -> list[HybridStage]:
    """``device`` joins the slowest stage (lowest :func:`stage_rate`) whose slice fits its memory (unchanged if
    none)."""
    def rate(stage: HybridStage) -> float:
        return stage_rate([problem.compute(d, stage.first_block, stage.last_block + 1) for d in stage.replicas])

    fitting = [k for k, s in enumerate(stages) if problem.fits(device, s.first_block, s.last_block + 1)]
    if not fitting:
        return stages
    k = min(fitting, key=lambda k: rate(stages[k]))
    return stages[:k] + [replace(stages[k], replicas=stages[k].replicas + (device,))] + stages[k + 1:]


def _with_levels(request: HybridRequest, pipelines: list[list[HybridStage]]) -> list[HybridPlan]:
    """The structure at every uniform pruning level, and along a greedy path pruning the slowest stage."""
    weighed: dict[tuple, HybridPlan] = {}  # a one-stage structure's greedy path is its uniform levels again

    def weigh(structure: list[list[HybridStage]]) -> HybridPlan:
        key = tuple(tuple(p) for p in structure)
        if key not in weighed:
            weighed[key] = evaluate(request, structure)
        return weighed[key]

    results = []
    for level in request.levels:
        results.append(weigh([[replace(s, ratio=level.ratio) for s in p] for p in pipelines]))
    if len(request.levels) > 1:
        ratios = [lv.ratio for lv in request.levels]
        current = [list(p) for p in pipelines]
        plan = weigh(current)
        while True:
            if plan.sustainable_hz >= request.arrival_hz or not meets_floor(request, plan):
                break
            slowest = min(((i, k) for i, p in enumerate(current) for k in range(len(p))
                           if current[i][k].ratio != ratios[-1]),
                          key=lambda ik: _stage_rate(request, current[ik[0]][ik[1]]), default=None)
            if slowest is None:
                break
            i, k = slowest
            current[i][k] = replace(current[i][k], ratio=ratios[ratios.index(current[i][k].ratio) + 1])
            plan = weigh(current)  # the next step starts from it
            results.append(plan)
    return results


def _stage_rate(request: HybridRequest, stage: HybridStage) -> float:
    factor = {lv.ratio: lv.time_factor for lv in request.levels}[stage.ratio]
    return stage_rate([request.problem.compute(d, stage.first_block, stage.last_block + 1) * factor
                       for d in stage.replicas])
