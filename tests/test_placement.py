"""The partitioner is exact (equal to brute force), respects memory, and never confuses hosts of one type."""

from __future__ import annotations

import argparse
import itertools
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprune.bench.placement import BASELINES, greedy_plan
from edgeprune.commands import place
from gateway import placement
from gateway.placement import (CAMERA, GATEWAY, MB, Block, Device, InfeasiblePlacement, PlacementProblem,
                               cost_assignment, cost_with_ingest, device_types, exhaustive_plan, optimal_plan,
                               plan_pipeline, plan_with_ingest, with_every_device)
from shared.profiling import BlockProfile, CameraSpec, ClusterSpec, DeviceSpec, LinkSpec, ModelProfile, save_profile
from shared.schemas import Placement, parse_json, to_json


def reference_bottleneck(problem: PlacementProblem, stages: list[tuple[str, int, int]]) -> float | None:
    """The documented cost model written again from the problem's raw fields, none of the product's accessors,
    so a bug in the product's cost function cannot hide in the oracle. None: a stage exceeds its device's memory."""
    device = {d.id: d for d in problem.devices}

    def bandwidth(sender: str, receiver: str) -> float:
        uplink = problem.camera_bandwidth_bps if sender == CAMERA else device[sender].bandwidth_bps
        return problem.links.get((sender, receiver), uplink)

    terms = [problem.frame_bytes / bandwidth(CAMERA, stages[0][0])]
    receivers = [d for d, _, _ in stages[1:]] + [GATEWAY]
    for (host, first, last), receiver in zip(stages, receivers):
        blocks = problem.blocks[first:last + 1]
        if sum(b.param_bytes for b in blocks) + max(b.activation_bytes for b in blocks) > device[host].memory_bytes:
            return None
        decode = problem.decode_s.get(host, 0.0) if first == 0 else 0.0  # stage 1 decodes the camera frame
        terms.append(decode + sum(problem.compute_s[host][first:last + 1]))
        terms.append(blocks[-1].output_bytes / bandwidth(host, receiver))
    return max(terms)


def brute_force(problem: PlacementProblem) -> float | None:
    """Every device order x every composition of the blocks, costed by the reference: the oracle, kept plain."""
    n = problem.n_blocks
    ids = [d.id for d in problem.devices]
    best = None
    for k in range(1, min(len(ids), n) + 1):
        for order in itertools.permutations(ids, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                value = reference_bottleneck(problem, [(d, a, b - 1) for d, a, b in zip(order, bounds, bounds[1:])])
                if value is not None:
                    best = value if best is None else min(best, value)
    return best


def stages_of(plan) -> list[tuple[str, int, int]]:
    return [(s.device, s.first_block, s.last_block) for s in plan.stages]


@st.composite
def problems(draw, max_devices: int = 4, max_blocks: int = 6) -> PlacementProblem:
    """Small clusters built from a few hardware kinds; hosts of one kind get their own caps and links.

    Sharing a compute profile while differing in memory cap, uplink or a link is the case a
    per-type index gets wrong, so it is drawn often.
    """
    n_blocks = draw(st.integers(1, max_blocks))
    n_devices = draw(st.integers(1, max_devices))
    sizes = st.integers(0, 4)
    blocks = tuple(Block(f"b{i}", draw(sizes) * MB, draw(sizes) * MB, draw(st.integers(1, 8)) * 1000)
                   for i in range(n_blocks))
    times = st.lists(st.sampled_from([0.0, 1e-3, 2e-3, 3e-3, 5e-3, 8e-3]), min_size=n_blocks, max_size=n_blocks)
    kinds = draw(st.lists(times, min_size=1, max_size=n_devices))
    caps = st.sampled_from([4 * MB, 8 * MB, 20 * MB])
    bandwidths = st.sampled_from([1e6, 4e6])
    devices, compute = [], {}
    for index in range(n_devices):
        device = Device(f"host{index}", draw(caps), draw(bandwidths))
        devices.append(device)
        compute[device.id] = draw(st.sampled_from(kinds))
    ids = [d.id for d in devices]
    pairs = [(a, b) for a in ids + [CAMERA] for b in ids + [GATEWAY] if a != b]
    link_bandwidths = st.sampled_from([1e3, 1e6, 4e6])
    links = draw(st.dictionaries(st.sampled_from(pairs), link_bandwidths, max_size=3))
    if n_devices > 1:  # a link both ways keeps identical hosts one type, with a link of their own
        mutual = draw(st.dictionaries(st.sampled_from(list(itertools.combinations(ids, 2))), link_bandwidths,
                                      max_size=2))
        links |= {pair: bw for (a, b), bw in mutual.items() for pair in ((a, b), (b, a))}
    decode = draw(st.dictionaries(st.sampled_from(ids), st.sampled_from([0.0, 2e-3, 9e-3]), max_size=2))
    return PlacementProblem(blocks, tuple(devices), compute, draw(st.integers(0, 8)) * 1000, draw(bandwidths), links,
                            decode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_optimal_plan_equals_brute_force(problem: PlacementProblem) -> None:
    expected = brute_force(problem)
    if expected is None:
        with pytest.raises(InfeasiblePlacement):
            optimal_plan(problem)
    else:
        plan = optimal_plan(problem)
        assert plan.bottleneck_s == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert reference_bottleneck(problem, stages_of(plan)) == pytest.approx(plan.bottleneck_s, rel=1e-12, abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(problems(max_devices=3, max_blocks=5))
def test_exhaustive_reference_equals_brute_force(problem: PlacementProblem) -> None:
    """The benchmark verifies the DP with exhaustive_plan on larger instances, so it must be right too."""
    expected = brute_force(problem)
    found = exhaustive_plan(problem)
    assert (found is None) == (expected is None)
    if found is not None:
        assert found.bottleneck_s == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert exhaustive_plan(problem, must_beat=found.bottleneck_s) is None


@settings(max_examples=100, deadline=None)
@given(problems())
def test_a_plan_completed_with_every_device_uses_them_all_at_its_true_cost(problem: PlacementProblem) -> None:
    """Run-time moves keep every placed node: a completion uses each device once, costed as the reference does,
    and is None only when no split fits one (fewer blocks than devices, or memory)."""
    try:
        best = optimal_plan(problem)
    except InfeasiblePlacement:
        return
    ids = [d.id for d in problem.devices]
    completed = with_every_device(problem, best, ids, input_bytes=0)
    if completed is None:  # every split fits a device that holds the whole model: then only blocks can run short
        holds_all = all(problem.memory(0, problem.n_blocks) <= d.memory_bytes for d in problem.devices)
        assert len(ids) > problem.n_blocks or not holds_all
        return
    assert sorted(d for d, _, _ in stages_of(completed)) == sorted(ids)
    assert completed.bottleneck_s == pytest.approx(reference_bottleneck(problem, stages_of(completed)), rel=1e-12,
                                                   abs=1e-15)
    assert completed.bottleneck_s >= best.bottleneck_s * (1 - 1e-12)  # never better than the optimum


def test_a_completion_needs_a_block_for_every_device():
    problem = PlacementProblem(tuple(Block(f"b{i}", 10, 10, 10) for i in range(2)),
                               tuple(Device(d, 10**6, 1e6) for d in "abc"), {d: [0.01, 0.02] for d in "abc"}, 0, 1e6)
    assert with_every_device(problem, optimal_plan(problem), "abc", input_bytes=0) is None


@given(problems(), st.integers(0, 2**32 - 1))
def test_plans_respect_memory_and_baselines_never_beat_the_optimum(problem: PlacementProblem, seed: int) -> None:
    try:
        best = optimal_plan(problem)
    except InfeasiblePlacement:
        return
    caps = {d.id: d.memory_bytes for d in problem.devices}
    for stage in best.stages:
        assert problem.memory(stage.first_block, stage.last_block + 1) == stage.memory_bytes <= caps[stage.device]
    for name, baseline in BASELINES.items():
        try:
            plan = baseline(problem, random.Random(seed))
        except InfeasiblePlacement:
            continue
        assert plan.bottleneck_s >= best.bottleneck_s * (1 - 1e-12), name


def uniform_problem(caps_mb: list[float], compute_ms: list[float], bandwidth: float = 1e9,
                    params_mb: list[float] | None = None, **kwargs) -> PlacementProblem:
    """Hosts with one shared compute profile (one hardware kind) but their own memory caps."""
    params = params_mb or [1.0] * len(compute_ms)
    blocks = tuple(Block(f"stage{i}", int(p * MB), 0, 1000) for i, p in enumerate(params))
    devices = tuple(Device(f"pi-{i}", int(cap * MB), bandwidth) for i, cap in enumerate(caps_mb))
    compute = {d.id: [t / 1e3 for t in compute_ms] for d in devices}
    return PlacementProblem(blocks, devices, compute, frame_bytes=1000, camera_bandwidth_bps=1e9, **kwargs)


def test_hosts_of_one_kind_with_different_caps_are_different_types() -> None:
    problem = uniform_problem([10, 3, 3, 10, 3], [1, 1, 1])
    assert sorted(map(sorted, device_types(problem))) == [["pi-0", "pi-3"], ["pi-1", "pi-2", "pi-4"]]


def test_a_link_or_uplink_difference_splits_a_type() -> None:
    problem = uniform_problem([5, 5, 5, 5], [1, 1], links={("pi-2", GATEWAY): 10.0, (CAMERA, "pi-3"): 10.0})
    assert sorted(map(sorted, device_types(problem))) == [["pi-0", "pi-1"], ["pi-2"], ["pi-3"]]


def test_big_block_goes_to_the_one_host_that_can_hold_it() -> None:
    """Costing a stage with the type's first host and running it on another is the PipeEdge bug class."""
    problem = uniform_problem([2, 2, 6, 2], [4, 4, 4, 4], params_mb=[1, 1, 5, 1])
    plan = optimal_plan(problem)
    holder = next(s for s in plan.stages if s.first_block <= 2 <= s.last_block)
    assert holder.device == "pi-2"
    assert plan.bottleneck_s == pytest.approx(4e-3)
    assert len(plan.stages) == 4


def test_several_hosts_per_type_are_all_used_when_it_pays() -> None:
    blocks_ms = [3, 1, 2, 2, 1, 3, 2, 2]
    problem = uniform_problem([4, 4, 4, 9, 9, 9], blocks_ms)
    plan = optimal_plan(problem)
    assert plan.bottleneck_s == pytest.approx(max(blocks_ms) / 1e3)
    assert len({s.device for s in plan.stages}) == len(plan.stages) == 6


def test_a_block_too_big_for_every_device_is_named() -> None:
    problem = uniform_problem([128, 64], [1, 1, 1, 1], params_mb=[1, 1, 1, 210])
    with pytest.raises(InfeasiblePlacement, match=r"block 3 \(stage3\) needs 210.0 MB but the largest device cap "
                                                  r"is 128.0 MB \(pi-0\)"):
        optimal_plan(problem)


def test_too_few_devices_names_the_first_block_that_does_not_fit() -> None:
    problem = uniform_problem([3, 3], [1, 1, 1, 1, 1], params_mb=[1, 1, 1, 2, 2])
    with pytest.raises(InfeasiblePlacement, match=r"blocks 0..3 fit, block 4 \(stage4\)"):
        optimal_plan(problem)


def test_a_search_too_large_is_refused_with_advice(monkeypatch) -> None:
    monkeypatch.setattr(placement, "MAX_DP_CELLS", 50)
    problem = uniform_problem([4, 5, 6], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="3 devices in 3 distinct types need more than .* merge into one type"):
        optimal_plan(problem)


def test_unused_devices_are_allowed() -> None:
    """A slow link between the devices makes a second stage a loss: the plan keeps everything on one."""
    problem = uniform_problem([10, 10], [1, 1], links={("pi-0", "pi-1"): 1e3, ("pi-1", "pi-0"): 1e3})
    plan = optimal_plan(problem)
    assert len(plan.stages) == 1
    assert plan.bottleneck_s == pytest.approx(2e-3)


def test_frame_upload_and_gateway_transfer_are_terms_of_the_bottleneck() -> None:
    problem = uniform_problem([10], [1], links={(CAMERA, "pi-0"): 100.0})
    plan = optimal_plan(problem)
    assert plan.frame_upload_s == pytest.approx(10.0)
    assert plan.bottleneck_s == pytest.approx(10.0)


def test_plan_converts_to_a_valid_placement() -> None:
    plan = optimal_plan(uniform_problem([4, 4, 4], [3, 1, 2, 2, 1]))
    placement = plan.to_placement(version=7, model="trapnet", issued_at=123.0)
    assert parse_json(Placement, to_json(placement)) == placement
    assert [(s.node_id, s.first_block, s.last_block) for s in placement.stages] == [
        (s.device, s.first_block, s.last_block) for s in plan.stages]
    assert placement.n_blocks == 5 and placement.bottleneck_s == plan.bottleneck_s


def two_device_problem(links: dict[tuple[str, str], float] | None = None) -> PlacementProblem:
    """Worked by hand below. Blocks (params, peak activation, output): b0 (1 MB, 1 MB, 8000 B),
    b1 (1 MB, 0.5 MB, 2000 B), b2 (2 MB, 1 MB, 40 B): 5 MB on one device, more than either cap,
    so every plan has two stages. Device a: 3 MB, compute 3/3/1 ms; b: 4 MB, 2/2/6 ms; uplinks
    1 MB/s; the camera sends 1000 B at 1 MB/s (1 ms)."""
    blocks = (Block("b0", MB, MB, 8000), Block("b1", MB, MB // 2, 2000), Block("b2", 2 * MB, MB, 40))
    devices = (Device("a", 3 * MB, 1e6), Device("b", 4 * MB, 1e6))
    return PlacementProblem(blocks, devices, {"a": [3e-3, 3e-3, 1e-3], "b": [2e-3, 2e-3, 6e-3]}, frame_bytes=1000,
                            camera_bandwidth_bps=1e6, links=links or {})


def test_hand_worked_stage_costs() -> None:
    """a: b0 | b: b1..b2 -- a computes 3 ms and sends 8000 B at 1 MB/s (8 ms); b computes 2+6 = 8 ms,
    holds 1+2 MB of parameters + its largest activation 1 MB = 4 MB, and sends 40 B to the gateway."""
    plan = cost_assignment(two_device_problem(), [("a", 0, 0), ("b", 1, 2)])
    assert plan.frame_upload_s == pytest.approx(1e-3)
    assert [s.compute_s for s in plan.stages] == pytest.approx([3e-3, 8e-3])
    assert [s.transfer_s for s in plan.stages] == pytest.approx([8e-3, 40e-6])
    assert [s.memory_bytes for s in plan.stages] == [2 * MB, 4 * MB]
    assert plan.bottleneck_s == pytest.approx(8e-3)


def test_hand_worked_optimum_with_transfer_and_memory_caps() -> None:
    """The four two-stage plans, by hand (bottleneck = max(upload, computes, transfers)):
    a: b0 | b: b1-b2 -> max(1, 3, 8 transfer, 8) = 8 ms;  a: b0-b1 | b: b2 -> max(1, 6, 2, 6) = 6 ms;
    b: b0-b1 | a: b2 -> max(1, 4, 2, 1) = 4 ms;  b: b0 | a: b1-b2 needs 4 MB on a (3 MB cap): infeasible.
    A slow b->a link (200 kB/s: 2000 B take 10 ms) makes the 4 ms plan cost 10 ms, so 6 ms wins."""
    plan = optimal_plan(two_device_problem())
    assert stages_of(plan) == [("b", 0, 1), ("a", 2, 2)]
    assert plan.bottleneck_s == pytest.approx(4e-3)
    with pytest.raises(InfeasiblePlacement, match="need 4.0 MB but device a has 3.0 MB"):
        cost_assignment(two_device_problem(), [("b", 0, 0), ("a", 1, 2)])

    slow = two_device_problem({("b", "a"): 2e5})
    assert cost_assignment(slow, [("b", 0, 1), ("a", 2, 2)]).bottleneck_s == pytest.approx(10e-3)
    plan = optimal_plan(slow)
    assert stages_of(plan) == [("a", 0, 1), ("b", 2, 2)]
    assert plan.bottleneck_s == pytest.approx(6e-3)


def test_cost_assignment_rejects_gaps_and_repeated_devices() -> None:
    problem = uniform_problem([4, 4], [1, 1, 1])
    with pytest.raises(ValueError, match="contiguously"):
        cost_assignment(problem, [("pi-0", 0, 0), ("pi-1", 2, 2)])
    with pytest.raises(ValueError, match="two stages"):
        cost_assignment(problem, [("pi-0", 0, 0), ("pi-0", 1, 2)])


def test_greedy_fills_devices_in_order_up_to_an_equal_share() -> None:
    plan = greedy_plan(uniform_problem([10, 10, 10], [1, 1, 1, 1, 1, 1]))
    assert [(s.device, s.first_block, s.last_block) for s in plan.stages] == [
        ("pi-0", 0, 1), ("pi-1", 2, 3), ("pi-2", 4, 5)]
    plan = greedy_plan(uniform_problem([10, 0.5, 10], [1, 1, 1, 1]))  # pi-1 cannot hold any 1 MB block
    assert [(s.device, s.first_block, s.last_block) for s in plan.stages] == [("pi-0", 0, 0), ("pi-2", 1, 3)]


def profile(latencies_ms: list[float], params_mb: list[float]) -> list[BlockProfile]:
    return [BlockProfile(name=f"b{i}", latency_s=t / 1e3, param_bytes=int(p * MB), activation_bytes=0,
                         output_bytes=100) for i, (t, p) in enumerate(zip(latencies_ms, params_mb))]


def test_plan_pipeline_uses_each_devices_own_profile() -> None:
    """The fast host takes the heavy block even though it is listed last."""
    devices = [Device("slow", 10 * MB, 1e9), Device("fast", 10 * MB, 1e9)]
    plan = plan_pipeline({"slow": profile([1, 9], [1, 1]), "fast": profile([1, 3], [1, 1])}, devices,
                         frame_bytes=100, camera_bandwidth_bps=1e9)
    assert [(s.device, s.first_block, s.last_block) for s in plan.stages] == [("slow", 0, 0), ("fast", 1, 1)]
    assert plan.bottleneck_s == pytest.approx(3e-3)


def test_plan_pipeline_rejects_profiles_of_different_models() -> None:
    devices = [Device("a", 10 * MB, 1e9), Device("b", 10 * MB, 1e9)]
    with pytest.raises(ValueError, match="different blocks"):
        plan_pipeline({"a": profile([1, 1], [1, 1]), "b": profile([1, 1], [1, 2])}, devices, 100, 1e9)
    with pytest.raises(ValueError, match="no profile for device"):
        plan_pipeline({"a": profile([1, 1], [1, 1])}, devices, 100, 1e9)


def test_problem_rejects_unknown_link_endpoints() -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        uniform_problem([4], [1], links={("pi-0", "pi-9"): 1e6})


def test_problem_says_what_is_wrong_with_a_link_to_itself() -> None:
    with pytest.raises(ValueError, match="pi-0->pi-0: a link joins two different endpoints"):
        uniform_problem([4], [1], links={("pi-0", "pi-0"): 1e6})


def run_place(tmp_path, capsys, cluster: ClusterSpec, *flags: str,
              blocks: list[BlockProfile] | None = None) -> tuple[int, str, str]:
    save_profile(ModelProfile(model="m", host="h", threads=1, repeats=1, warmup=0, wire_dtype="float16",
                              blocks=blocks or profile([2, 2, 2, 3], [1, 1, 1, 1])), tmp_path / "profile.json")
    (tmp_path / "devices.json").write_text(cluster.model_dump_json(by_alias=True))
    parser = argparse.ArgumentParser()
    place.register(parser.add_subparsers())
    args = parser.parse_args(["place", "--devices", str(tmp_path / "devices.json"),
                              "--profile", str(tmp_path / "profile.json"), *flags])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_place_command_prints_the_plan_as_json(tmp_path, capsys) -> None:
    cluster = ClusterSpec(camera=CameraSpec(frame_bytes=1000, bandwidth_mbit_s=100), devices=[
        DeviceSpec(id="pi-a", memory_mb=3, bandwidth_mbit_s=100),
        DeviceSpec(id="pi-b", memory_mb=3, bandwidth_mbit_s=100, speed_factor=2.0)])
    code, out, _ = run_place(tmp_path, capsys, cluster, "--json")
    assert code == 0
    plan = json.loads(out)
    assert [s["device"] for s in plan["stages"]] == ["pi-a", "pi-b"]
    assert [s["blocks"] for s in plan["stages"]] == [[0, 2], [3, 3]]  # 3 blocks fit in 3 MB
    assert plan["bottleneck_s"] == pytest.approx(6e-3)  # pi-b computes at half speed: 2 x 3 ms


def test_place_command_reports_what_does_not_fit(tmp_path, capsys) -> None:
    cluster = ClusterSpec(camera=CameraSpec(frame_bytes=1000, bandwidth_mbit_s=100),
                          devices=[DeviceSpec(id="pi-a", memory_mb=0.5, bandwidth_mbit_s=100)])
    code, out, err = run_place(tmp_path, capsys, cluster)
    assert code == 1 and out == ""
    assert "block 0 (b0) needs 1.0 MB but the largest device cap is 0.5 MB" in err



def test_place_command_rounds_memory_caps(tmp_path, capsys) -> None:
    """2.01 MB is 2,009,999.99... B in floating point: truncating it refused a slice needing exactly 2,010,000 B."""
    cluster = ClusterSpec(camera=CameraSpec(frame_bytes=1000, bandwidth_mbit_s=100),
                          devices=[DeviceSpec(id="pi-a", memory_mb=2.01, bandwidth_mbit_s=100)])
    assert cluster.devices[0].memory_bytes == 2_010_000
    block = BlockProfile(name="b0", latency_s=1e-3, param_bytes=2_000_000, activation_bytes=10_000, output_bytes=100)
    code, out, err = run_place(tmp_path, capsys, cluster, "--json", blocks=[block])
    assert (code, err) == (0, "")
    assert json.loads(out)["stages"][0]["memory_bytes"] == 2_010_000


def test_place_command_reports_a_link_to_itself(tmp_path, capsys) -> None:
    cluster = ClusterSpec(camera=CameraSpec(frame_bytes=1000, bandwidth_mbit_s=100),
                          devices=[DeviceSpec(id="pi-a", memory_mb=8, bandwidth_mbit_s=100)],
                          links=[LinkSpec(sender="pi-a", receiver="pi-a", bandwidth_mbit_s=10)])
    code, out, err = run_place(tmp_path, capsys, cluster)
    assert code == 2 and out == ""
    assert "link pi-a->pi-a: a link joins two different endpoints" in err


# --- a dedicated ingest device ----------------------------------------------------------------------------


def reference_behind_ingest(problem: PlacementProblem, stages: list[tuple[str, int, int]], ingest: str,
                            input_bytes: int) -> float | None:
    """The cost model with an ingest device in front, from raw fields: the frame is uploaded to it, it decodes,
    it sends ``input_bytes`` to stage 1 over its link; no stage decodes. None: a stage exceeds its memory."""
    device = {d.id: d for d in problem.devices}

    def bandwidth(sender: str, receiver: str) -> float:
        uplink = problem.camera_bandwidth_bps if sender == CAMERA else device[sender].bandwidth_bps
        return problem.links.get((sender, receiver), uplink)

    terms = [problem.frame_bytes / bandwidth(CAMERA, ingest), problem.decode_s[ingest],
             input_bytes / bandwidth(ingest, stages[0][0])]
    receivers = [d for d, _, _ in stages[1:]] + [GATEWAY]
    for (host, first, last), receiver in zip(stages, receivers):
        blocks = problem.blocks[first:last + 1]
        if sum(b.param_bytes for b in blocks) + max(b.activation_bytes for b in blocks) > device[host].memory_bytes:
            return None
        terms.append(sum(problem.compute_s[host][first:last + 1]))
        terms.append(blocks[-1].output_bytes / bandwidth(host, receiver))
    return max(terms)


def brute_force_with_ingest(problem: PlacementProblem, input_bytes: int, ingest_only: set[str]) -> float | None:
    """Decode on stage 1's device, or on each device with a decode cost; every order and cut of the rest."""
    n = problem.n_blocks
    ids = [d.id for d in problem.devices]
    best = None
    for ingest in [None] + [d for d in ids if d in problem.decode_s]:
        pool = [d for d in ids if d != ingest and d not in ingest_only]
        for k in range(1, min(len(pool), n) + 1):
            for order in itertools.permutations(pool, k):
                for cuts in itertools.combinations(range(1, n), k - 1):
                    bounds = [0, *cuts, n]
                    stages = [(d, a, b - 1) for d, a, b in zip(order, bounds, bounds[1:])]
                    value = (reference_bottleneck(problem, stages) if ingest is None
                             else reference_behind_ingest(problem, stages, ingest, input_bytes))
                    if value is not None:
                        best = value if best is None else min(best, value)
    return best


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_devices=4, max_blocks=4), st.sampled_from([0, 1000, 6000, 49152]), st.data())
def test_plan_with_ingest_equals_brute_force(problem: PlacementProblem, input_bytes: int, data) -> None:
    ids = [d.id for d in problem.devices]
    ingest_only = set(data.draw(st.lists(st.sampled_from(ids), max_size=1)))
    expected = brute_force_with_ingest(problem, input_bytes, ingest_only)
    if expected is None:
        with pytest.raises(InfeasiblePlacement):
            plan_with_ingest(problem, input_bytes, ingest_only)
        return
    plan = plan_with_ingest(problem, input_bytes, ingest_only)
    assert plan.bottleneck_s == pytest.approx(expected, rel=1e-12, abs=1e-15)
    stages = stages_of(plan)
    assert not ingest_only & {d for d, _, _ in stages}
    if plan.ingest is None:
        assert reference_bottleneck(problem, stages) == pytest.approx(plan.bottleneck_s, rel=1e-12, abs=1e-15)
    else:
        assert plan.ingest.device not in {d for d, _, _ in stages}
        assert reference_behind_ingest(problem, stages, plan.ingest.device, input_bytes) == pytest.approx(
            plan.bottleneck_s, rel=1e-12, abs=1e-15)
    again = cost_with_ingest(problem, stages, plan.ingest and plan.ingest.device, input_bytes)
    assert again.bottleneck_s == pytest.approx(plan.bottleneck_s, rel=1e-12, abs=1e-15)


def ingest_site(decode_ms: dict[str, float], uplink: float = 1e9) -> PlacementProblem:
    """Three devices of one kind, four 10 ms blocks of 1 kB output, every device's uplink ``uplink`` bytes/s."""
    blocks = tuple(Block(f"b{i}", MB, MB, 1000) for i in range(4))
    devices = tuple(Device(d, 100 * MB, uplink) for d in "abc")
    return PlacementProblem(blocks, devices, {d.id: [0.010] * 4 for d in devices}, frame_bytes=0,
                            camera_bandwidth_bps=1.0, decode_s={d: ms / 1e3 for d, ms in decode_ms.items()})


def test_a_fast_decoder_ingests_when_decode_would_be_the_bottleneck_of_stage_one() -> None:
    # decode 35 ms everywhere: with c as a third stage the best is max(35 + 10, 10 + 10, ...) = 45 ms on stage 1;
    # with c ingesting, a and b split the blocks (20 ms each) and c decodes in 35 ms: 35 ms
    plan = plan_with_ingest(ingest_site({"a": 35, "b": 35, "c": 35}), input_bytes=49152)
    assert plan.ingest is not None and plan.bottleneck_s == pytest.approx(0.035)
    assert plan.to_placement(1, "trapnet", 0.0).ingest_node == plan.ingest.device
    # the extra transfer counts: 49 kB at 100 kB/s (0.49 s) is worse than decoding on stage 1 (45 ms)
    plan = plan_with_ingest(ingest_site({"a": 35, "b": 35, "c": 35}, uplink=1e5), input_bytes=49152)
    assert plan.ingest is None and plan.bottleneck_s == pytest.approx(0.045)
    # decoding cheaper than any block: a dedicated decoder only takes a device from the stages
    plan = plan_with_ingest(ingest_site({"a": 1, "b": 1, "c": 1}), input_bytes=49152)
    assert plan.ingest is None and plan.to_placement(1, "trapnet", 0.0).ingest_node is None


def test_an_ingest_only_device_never_runs_a_stage_and_is_refused_if_it_is_the_only_one() -> None:
    plan = plan_with_ingest(ingest_site({"a": 1, "b": 1, "c": 1}), input_bytes=49152, ingest_only={"c"})
    assert "c" not in {s.device for s in plan.stages}
    with pytest.raises(InfeasiblePlacement, match="only ingest"):
        plan_with_ingest(ingest_site({"c": 1}), input_bytes=49152, ingest_only={"a", "b", "c"})


def test_a_placement_cannot_ingest_on_a_stage_node() -> None:
    stages = [{"stage": 1, "node_id": "a", "first_block": 0, "last_block": 3}]
    base = {"version": 1, "model": "trapnet", "n_blocks": 4, "issued_at": 0.0, "stages": stages}
    assert parse_json(Placement, json.dumps({**base, "ingest_node": "c"}).encode()).ingest_node == "c"
    with pytest.raises(Exception, match="both ingest and run a stage"):
        parse_json(Placement, json.dumps({**base, "ingest_node": "a"}).encode())
