"""The hybrid planner against brute force over every hybrid plan of small instances, and hand-worked cases."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest

from gateway.hybrid import HybridRequest, HybridStage, Level, better, evaluate, meets_floor, plan_hybrid
from gateway.placement import MB, Block, Device, InfeasiblePlacement, PlacementProblem, cost_assignment


def brute_force(request: HybridRequest):
    """Every device's role (unused, or stage s of pipeline p) x every cut x every level per stage: plain enumeration."""
    problem = request.problem
    ids = [d.id for d in problem.devices]
    n = problem.n_blocks
    roles = [None] + [(p, s) for p in range(len(ids)) for s in range(min(n, len(ids)))]
    best = None
    for assignment in itertools.product(roles, repeat=len(ids)):
        used = [r for r in assignment if r is not None]
        pipelines = sorted({p for p, _ in used})
        if not used or pipelines != list(range(len(pipelines))):
            continue
        shapes = []
        for p in pipelines:
            stages = sorted({s for q, s in used if q == p})
            if stages != list(range(len(stages))):
                break
            shapes.append([tuple(d for d, r in zip(ids, assignment) if r == (p, s)) for s in stages])
        else:
            per_pipeline = []
            for replicas in shapes:
                k = len(replicas)
                options = []
                for cuts in itertools.combinations(range(1, n), k - 1):
                    bounds = [0, *cuts, n]
                    for ratios in itertools.product([lv.ratio for lv in request.levels], repeat=k):
                        options.append([HybridStage(a, b - 1, reps, ratio) for a, b, reps, ratio
                                        in zip(bounds, bounds[1:], replicas, ratios)])
                per_pipeline.append(options)
            for pipelines_choice in itertools.product(*per_pipeline):
                try:
                    plan = evaluate(request, pipelines_choice)
                except InfeasiblePlacement:
                    continue
                if meets_floor(request, plan) and better(request, plan, best):
                    best = plan
    return best


def cluster(speeds: list[float], block_ms: list[float], caps_mb: list[float] | None = None,
            out_bytes: int = 1000, bandwidth: float = 1e9) -> PlacementProblem:
    blocks = tuple(Block(f"b{i}", MB, MB, out_bytes) for i in range(len(block_ms)))
    caps = caps_mb or [100] * len(speeds)
    devices = tuple(Device(f"n{k}", int(cap * MB), bandwidth) for k, cap in enumerate(caps))
    compute = {d.id: [t * 1e-3 * s for t in block_ms] for d, s in zip(devices, speeds)}
    return PlacementProblem(blocks, devices, compute, frame_bytes=0, camera_bandwidth_bps=1e9)


def test_a_chain_costs_the_same_to_both_planners():
    """One stage cost (gateway.placement.stage_cost) for the chain planners and the hybrid one: the same chain gets
    the same bottleneck from both, and the same refusal when its blocks do not fit."""
    problem = cluster([1, 2, 4], [1, 2, 5, 3], out_bytes=100_000, bandwidth=1e7)
    chain = cost_assignment(problem, [("n0", 0, 1), ("n1", 2, 2), ("n2", 3, 3)])
    hybrid = evaluate(HybridRequest(problem, arrival_hz=1, slo_s=10),
                      [[HybridStage(0, 1, ("n0",)), HybridStage(2, 2, ("n1",)), HybridStage(3, 3, ("n2",))]])
    assert hybrid.capacity_hz == pytest.approx(1 / chain.bottleneck_s)
    small = cluster([1, 1], [1, 1], caps_mb=[2.5, 100])
    words = "blocks 0..1 need 3.0 MB but device n0 has 2.5 MB"
    with pytest.raises(InfeasiblePlacement, match=words):
        cost_assignment(small, [("n0", 0, 1)])
    with pytest.raises(InfeasiblePlacement, match=words):
        evaluate(HybridRequest(small, arrival_hz=1, slo_s=10), [[HybridStage(0, 1, ("n0",))]])


def random_request(rng: random.Random) -> HybridRequest:
    n_devices, n_blocks = rng.randint(1, 3), rng.randint(1, 3)
    problem = cluster([rng.choice([1, 1, 2, 4]) for _ in range(n_devices)],
                      [rng.choice([1, 2, 5]) for _ in range(n_blocks)],
                      [rng.choice([2.5, 4.5, 100]) for _ in range(n_devices)], out_bytes=rng.choice([1000, 100_000]),
                      bandwidth=rng.choice([1e6, 1e8]))
    levels = (Level(0.0, 1.0), Level(0.3, 0.6)) if rng.random() < 0.5 else (Level(0.0, 1.0),)
    accuracy = (lambda ratios: 0.9 - 0.1 * sum(ratios) / len(ratios)) if len(levels) > 1 else None
    return HybridRequest(problem, arrival_hz=rng.choice([50, 200, 1000]), slo_s=rng.choice([0.01, 0.05]),
                         levels=levels, accuracy=accuracy, accuracy_floor=rng.choice([0.0, 0.88]))


def test_planner_never_beats_brute_force_and_measures_its_gap() -> None:
    """The planner explores a subset of plans: it never claims more than the optimum, and its gap is small."""
    rng = random.Random(0)
    gaps, checked = [], 0
    for _ in range(60):
        request = random_request(rng)
        expected = brute_force(request)
        if expected is None:
            with pytest.raises(InfeasiblePlacement):
                plan_hybrid(request)
            continue
        plan = plan_hybrid(request)
        assert meets_floor(request, plan)
        assert not better(request, plan, expected), (plan, expected)
        assert evaluate(request, plan.pipelines) == plan  # the plan is what the cost function says
        checked += 1
        gaps.append(1 - plan.sustainable_hz / expected.sustainable_hz if expected.sustainable_hz else 0.0)
    assert checked >= 40
    assert sum(g <= 1e-9 for g in gaps) / len(gaps) >= 0.9  # measured: see docs/placement.md, "Hybrid plans"


def test_two_whole_model_replicas_beat_a_two_stage_pipeline_when_one_block_dominates() -> None:
    """A model with one heavy block: splitting cannot halve it, running the model twice can."""
    request = HybridRequest(cluster([1, 1], [1, 8]), arrival_hz=150, slo_s=0.1)
    plan = plan_hybrid(request)
    assert plan.capacity_hz == pytest.approx(2 / 9e-3)  # two 9 ms servers, not one 8 ms bottleneck
    assert plan.sustainable_hz == pytest.approx(brute_force(request).sustainable_hz)


def test_memory_caps_force_one_long_pipeline() -> None:
    request = HybridRequest(cluster([1, 1, 1], [2, 2, 2], caps_mb=[2.5, 2.5, 2.5]), arrival_hz=100, slo_s=0.1)
    plan = plan_hybrid(request)  # each device holds one block: nothing else fits
    assert plan.kind == "one pipeline" and len(plan.pipelines[0]) == 3


def test_decode_costs_of_devices_left_out_of_a_pipeline_do_not_stop_the_planner() -> None:
    """The live gateway's problem has a decode cost per node (frames bigger than the model's input); the planner
    tries pipelines on subsets of the devices, which must drop the others' decode costs, not refuse them."""
    problem = replace(cluster([1, 2, 4], [1, 1]), decode_s={"n0": 1e-3, "n1": 2e-3, "n2": 4e-3})
    plan = plan_hybrid(HybridRequest(problem, arrival_hz=10, slo_s=1.0))
    assert plan.sustainable_hz >= 10 and plan.sustainable_hz == pytest.approx(
        evaluate(HybridRequest(problem, arrival_hz=10, slo_s=1.0), plan.pipelines).sustainable_hz)


def test_replicas_served_in_turn_go_at_the_slowest_replicas_pace() -> None:
    """Mosquitto hands a shared subscription's messages to its members in turn, whatever their speed: each of r
    replicas gets 1/r of the frames, so the stage saturates when its slowest replica does, at r x that rate."""
    request = HybridRequest(cluster([1, 2, 2], [1, 1]), arrival_hz=10, slo_s=1.0)
    plan = evaluate(request, [[HybridStage(0, 1, ("n0", "n1", "n2"))]])
    assert plan.capacity_hz == pytest.approx(3 / 4e-3)  # not 1 / 2 ms + 2 / 4 ms: n0 idles a half of its time
    # a frame handed to a slowest replica waits in that replica's own queue, which gets a third of the frames
    alone = evaluate(replace(request, arrival_hz=10 / 3), [[HybridStage(0, 1, ("n1",))]])
    assert plan.latency_s == pytest.approx(alone.latency_s) and plan.latency_s > 4e-3


def test_a_replica_too_slow_for_its_share_is_left_out() -> None:
    """n1 is 5x slower than n0: as its replica it would get every second frame and hold the stage to 2 x its rate
    (200/s), below n0's 500/s alone (one pipeline, as the gateway places)."""
    plan = plan_hybrid(HybridRequest(cluster([1, 5], [2]), arrival_hz=1000, slo_s=1.0), max_parallel=1)
    assert plan.pipelines == ((HybridStage(0, 0, ("n0",)),),) and plan.capacity_hz == pytest.approx(500)


def test_pruning_is_used_only_when_the_rate_needs_it_and_never_below_the_floor() -> None:
    levels = (Level(0.0, 1.0), Level(0.3, 0.5))
    accuracy = lambda ratios: 0.9 - 0.1 * max(ratios)  # noqa: E731
    easy = HybridRequest(cluster([1], [2, 2]), arrival_hz=50, slo_s=0.1, levels=levels, accuracy=accuracy,
                         accuracy_floor=0.85)
    assert all(s.ratio == 0 for p in plan_hybrid(easy).pipelines for s in p)
    hard = HybridRequest(cluster([1], [2, 2]), arrival_hz=400, slo_s=0.1, levels=levels, accuracy=accuracy,
                         accuracy_floor=0.85)
    plan = plan_hybrid(hard)
    assert any(s.ratio == 0.3 for p in plan.pipelines for s in p) and plan.accuracy >= 0.85
    floor = HybridRequest(cluster([1], [2, 2]), arrival_hz=400, slo_s=0.1, levels=levels, accuracy=accuracy,
                          accuracy_floor=0.89)
    assert all(s.ratio == 0 for p in plan_hybrid(floor).pipelines for s in p)


def test_the_slo_caps_the_sustainable_rate_below_capacity() -> None:
    request = HybridRequest(cluster([1], [5]), arrival_hz=10, slo_s=0.01)
    plan = evaluate(request, [[HybridStage(0, 0, ("n0",))]])
    # M/D/1 at mu = 200/s: 5 ms compute + 1 us transfer + rho / (2 mu (1 - rho)) wait = 10 ms
    ratio = 2 * 200 * (0.01 - 5.001e-3)  # rho / (1 - rho)
    assert plan.sustainable_hz == pytest.approx(200 * ratio / (1 + ratio), rel=1e-9)
    assert math.isinf(evaluate(HybridRequest(cluster([1], [5]), arrival_hz=250, slo_s=0.01),
                               [[HybridStage(0, 0, ("n0",))]]).latency_s)


def test_plan_hybrid_command_prints_the_chosen_plan(tmp_path, capsys) -> None:
    import json

    from edgeprune.cli import main
    from shared.profiling import CameraSpec, ClusterSpec, DeviceSpec, ModelProfile, save_profile
    from shared.schemas import BlockProfile

    blocks = [BlockProfile(name=f"b{i}", latency_s=t, param_bytes=1000, activation_bytes=1000, output_bytes=100)
              for i, t in enumerate([1e-3, 8e-3])]
    save_profile(ModelProfile(model="trapnet", host="h", threads=1, repeats=1, warmup=0, wire_dtype="float16",
                              blocks=blocks), tmp_path / "profile.json")
    spec = ClusterSpec(camera=CameraSpec(frame_bytes=100, bandwidth_mbit_s=100),
                       devices=[DeviceSpec(id=f"pi-{k}", memory_mb=8, bandwidth_mbit_s=100) for k in range(2)])
    (tmp_path / "devices.json").write_text(spec.model_dump_json(by_alias=True))
    code = main(["plan-hybrid", "--devices", str(tmp_path / "devices.json"), "--profile",
                 str(tmp_path / "profile.json"), "--arrival-hz", "150", "--slo-ms", "100"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("data partitioning (whole model per device): sustains") and "meets 150/s" in out
    plan = json.loads(out[out.index("{"):])  # one 8 ms block: two whole models beat a 2-stage pipeline
    assert sorted(d for p in plan["pipelines"] for s in p for d in s["replicas"]) == ["pi-0", "pi-1"]
    assert main(["plan-hybrid", "--devices", str(tmp_path / "devices.json"), "--profile",
                 str(tmp_path / "profile.json"), "--arrival-hz", "150", "--slo-ms", "100",
                 "--levels", "0:1,0.3:0.5"]) == 2  # pruning without an accuracy model is refused


def test_parallel_pipelines_get_frames_in_turn_per_first_stage_reader() -> None:
    """Every pipeline's first stage reads camera frames through one shared subscription (docs/scaling.md, "Parallel
    pipelines"): the broker deals them in turn, one share per first-stage reader, whatever a pipeline's capacity. A
    pipeline of half the speed still gets half the frames, so it saturates first: 2 x its rate, not the sum."""
    request = HybridRequest(cluster([1, 2], [1, 1]), arrival_hz=10, slo_s=1.0)
    plan = evaluate(request, [[HybridStage(0, 1, ("n0",))], [HybridStage(0, 1, ("n1",))]])
    assert plan.capacity_hz == pytest.approx(2 / 4e-3)  # not 1 / 2 ms + 1 / 4 ms
    alone = evaluate(replace(request, arrival_hz=5), [[HybridStage(0, 1, ("n1",))]])
    assert plan.latency_s == pytest.approx(alone.latency_s)  # the slow pipeline queues half the frames
    # a first stage with two readers takes two shares of the frames
    three = HybridRequest(cluster([2, 2, 2], [1, 1]), arrival_hz=10, slo_s=1.0)
    plan = evaluate(three, [[HybridStage(0, 1, ("n0", "n1"))], [HybridStage(0, 1, ("n2",))]])
    assert plan.capacity_hz == pytest.approx(3 / 4e-3)


def test_min_parallel_leaves_out_plans_of_fewer_pipelines() -> None:
    """placement_mode "parallel" (for comparing strategies) asks for at least two pipelines."""
    request = HybridRequest(cluster([1, 1, 1, 1], [1, 8]), arrival_hz=10, slo_s=1.0)
    assert len(plan_hybrid(request, min_parallel=2).pipelines) >= 2
    assert len(plan_hybrid(HybridRequest(cluster([1, 1], [2, 2], caps_mb=[2.5, 2.5]), 10, 1.0)).pipelines) == 1
    with pytest.raises(InfeasiblePlacement):  # one block per device: only one pipeline fits
        plan_hybrid(HybridRequest(cluster([1, 1], [2, 2], caps_mb=[2.5, 2.5]), 10, 1.0), min_parallel=2)
