"""Placement: the exact partitioner against random, greedy and SEIFER-style baselines, and its solve time.

Instances: random heterogeneous clusters (2-20 devices of up to 4 hardware kinds, a
variant of one kind with less free memory, 8-60 CNN-like blocks, mixed memory caps,
uplinks and a few slow links), and TrapNet's real profile measured on this machine run by
emulated devices 4-32x slower. Every instance with at most ``--brute-force-devices`` devices
and ``--brute-force-blocks`` blocks is verified by exhaustive search for a strictly better
plan; a family of small clusters exists for that check.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway.placement import (
    Block,
    Device,
    InfeasiblePlacement,
    PlacementProblem,
    Plan,
    cost_assignment,
    MAX_DP_CELLS,
    device_types,
    dp_cells_bound,
    exhaustive_plan,
    heuristic_plan,
    milp_plan,
    optimal_plan,
    solve_plan,
)
from shared.profiling import CAMERA, MB

MBIT = 1e6 / 8
KINDS = 4  # hardware kinds per random cluster, at most
TRAPNET_SPEED_FACTORS = (4, 8, 16, 32)  # Pi-class devices against one core of this machine
TRAPNET_CAPS_MB = (1, 2, 4, 8)
BANDWIDTHS_MBIT = (8, 20, 50, 100)


# --- the baselines the exact planner is compared with (the product never uses them) ---------------------


def random_plan(problem: PlacementProblem, rng: random.Random, attempts: int = 100) -> Plan:
    """Every device gets a random slice in a random order (as an uninformed deployment would)."""
    n_stages = min(len(problem.devices), problem.n_blocks)
    for _ in range(attempts):
        order = rng.sample([d.id for d in problem.devices], n_stages)
        cuts = sorted(rng.sample(range(1, problem.n_blocks), n_stages - 1))
        try:
            return cost_assignment(problem, _stages_from_cuts(order, cuts, problem.n_blocks))
        except InfeasiblePlacement:
            continue
    raise InfeasiblePlacement(f"no random placement out of {attempts} fits the memory caps")


def greedy_plan(problem: PlacementProblem) -> Plan:
    """Devices in listed order, each filled up to an equal share of the work in its own time, within memory.

    A device that cannot hold even the next block is skipped.
    """
    share = 1 / len(problem.devices) + 1e-9  # so float rounding does not cost an exactly equal share a block
    assignment, start = [], 0
    for position, device in enumerate(problem.devices):
        if start == problem.n_blocks:
            break
        if problem.memory(start, start + 1) > device.memory_bytes:
            continue
        total = problem.compute(device.id, 0, problem.n_blocks) or 1.0
        last_device = position == len(problem.devices) - 1
        end = start + 1
        while end < problem.n_blocks and problem.memory(start, end + 1) <= device.memory_bytes and (
                last_device or problem.compute(device.id, start, end + 1) / total <= share):
            end += 1
        assignment.append((device.id, start, end - 1))
        start = end
    if start < problem.n_blocks:
        raise InfeasiblePlacement(f"greedy filling stopped at block {start}: out of devices")
    return cost_assignment(problem, assignment)


def communication_plan(problem: PlacementProblem) -> Plan:
    """SEIFER-style: cuts and order that minimise the slowest transfer within memory, blind to compute."""
    free_compute = replace(problem, compute_s={d.id: [0.0] * problem.n_blocks for d in problem.devices}, decode_s={})
    chosen = optimal_plan(free_compute)
    return cost_assignment(problem, [(s.device, s.first_block, s.last_block) for s in chosen.stages])


def _stages_from_cuts(order: Sequence[str], cuts: Sequence[int], n_blocks: int) -> list[tuple[str, int, int]]:
    bounds = [0, *cuts, n_blocks]
    return [(device, first, end - 1) for device, first, end in zip(order, bounds, bounds[1:])]


BASELINES = {
    "random": lambda problem, rng: random_plan(problem, rng),
    "greedy": lambda problem, rng: greedy_plan(problem),
    "seifer-style": lambda problem, rng: communication_plan(problem),
}


def add_arguments(parser) -> None:
    parser.add_argument("--instances", type=int, default=1000, help="random heterogeneous instances")
    parser.add_argument("--small-instances", type=int, default=300, help="random instances small enough to verify")
    parser.add_argument("--trapnet-instances", type=int, default=200, help="instances on the measured TrapNet")
    parser.add_argument("--timing-runs", type=int, default=20, help="extra 20-device x 60-block instances timed")
    parser.add_argument("--brute-force-devices", type=int, default=8,
                        help="verify every instance with at most this many devices ...")
    parser.add_argument("--brute-force-blocks", type=int, default=16, help="... and blocks by exhaustive search")
    parser.add_argument("--scale-instances", type=int, default=10,
                        help="instances per size of distinct self-profiled nodes (10, 20, 50 x 60 blocks)")
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=[10, 20, 50], help="node counts to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=lambda text: Path(text) if text else None,
                        default=Path("docs/placement-bench.png"), help="PNG of the ratios ('' for none)")


@dataclass
class Family:
    """Results on one family of instances."""

    ratios: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in BASELINES})
    failures: dict[str, int] = field(default_factory=lambda: {name: 0 for name in BASELINES})
    solve_s: list[float] = field(default_factory=list)
    device_types: list[int] = field(default_factory=list)
    checked: int = 0
    mismatches: int = 0
    infeasible: int = 0


def random_problem(rng: random.Random, n_devices: int, n_blocks: int) -> PlacementProblem:
    """A CNN-like chain (outputs shrink, parameters grow with depth) on a mixed cluster."""
    blocks = []
    for index in range(n_blocks):
        depth = index / max(1, n_blocks - 1)
        output = int(150e3 * 0.05 ** depth * rng.lognormvariate(0, 0.4)) + 64
        params = int(0.2 * MB * 40 ** depth * rng.lognormvariate(0, 0.5))
        blocks.append(Block(f"block{index}", params, 2 * output + 2 * (blocks[-1].output_bytes if blocks else output),
                            output))
    base_s = [2e-3 * rng.lognormvariate(0, 0.6) for _ in range(n_blocks)]
    total_params = sum(b.param_bytes for b in blocks)
    kinds = []
    for _ in range(rng.randint(1, min(n_devices, KINDS))):
        speed = math.exp(rng.uniform(math.log(0.5), math.log(4)))  # log-uniform 0.5-4x
        kinds.append(dict(times=[t * speed * rng.lognormvariate(0, 0.25) for t in base_s],
                          cap=int(total_params * rng.choice([0.25, 0.5, 1.0, 1.5])),
                          bandwidth=rng.choice(BANDWIDTHS_MBIT) * MBIT))
    low_memory_kind = rng.randrange(len(kinds))
    devices, compute = [], {}
    for index in range(n_devices):
        kind_index = rng.randrange(len(kinds))
        kind = kinds[kind_index]
        cap = kind["cap"] // 2 if kind_index == low_memory_kind and rng.random() < 0.4 else kind["cap"]
        devices.append(Device(f"d{index}", cap, kind["bandwidth"]))
        compute[devices[-1].id] = kind["times"]
    links = {}
    if n_devices <= 10 and rng.random() < 0.3:  # a few slow links (each splits a device type)
        for _ in range(rng.randint(1, 2)):
            sender, receiver = rng.sample([CAMERA] + [d.id for d in devices], 2)
            if receiver != CAMERA:
                links[(sender, receiver)] = rng.choice(BANDWIDTHS_MBIT[:2]) * MBIT / 4
    return PlacementProblem(tuple(blocks), tuple(devices), compute, frame_bytes=rng.randint(5_000, 50_000),
                   camera_bandwidth_bps=20 * MBIT, links=links)


def distinct_problem(rng: random.Random, n_devices: int, n_blocks: int) -> PlacementProblem:
    """A random cluster as live nodes report it: every device measured its own latencies (±5% noise on its
    kind's), so no two devices merge into one type. No device-to-device links (live nodes have none)."""
    problem = random_problem(rng, n_devices, n_blocks)
    compute = {device: [t * rng.lognormvariate(0, 0.05) for t in times] for device, times in problem.compute_s.items()}
    return replace(problem, compute_s=compute, links={})


def trapnet_problem(rng: random.Random, profile, n_devices: int, own_profiles: bool = False) -> PlacementProblem:
    """The measured TrapNet profile on emulated Pi-class devices (speed factor, cap, uplink per device).

    ``own_profiles`` jitters every device's latencies by ~10%, as separately measured nodes
    differ: then no two devices merge into one type, the hardest case for the DP.
    """
    blocks = tuple(Block(b.name, b.param_bytes, b.activation_bytes, b.output_bytes) for b in profile.blocks)
    devices, compute = [], {}
    for index in range(n_devices):
        device = Device(f"pi-{index}", rng.choice(TRAPNET_CAPS_MB) * MB, rng.choice(BANDWIDTHS_MBIT) * MBIT)
        factor = rng.choice(TRAPNET_SPEED_FACTORS)
        devices.append(device)
        compute[device.id] = [b.latency_s * factor * (rng.lognormvariate(0, 0.1) if own_profiles else 1)
                              for b in profile.blocks]
    # Frames as the camera sends them: at most an uncompressed 64x64 RGB image.
    return PlacementProblem(blocks, tuple(devices), compute, frame_bytes=64 * 64 * 3, camera_bandwidth_bps=20 * MBIT)


def solve_and_compare(problem: PlacementProblem, rng: random.Random, family: Family, verify: bool) -> None:
    start = time.perf_counter()
    try:
        best = optimal_plan(problem)
    except InfeasiblePlacement:
        family.infeasible += 1
        return
    family.solve_s.append(time.perf_counter() - start)
    family.device_types.append(len(device_types(problem)))
    for name, baseline in BASELINES.items():
        try:
            family.ratios[name].append(baseline(problem, rng).bottleneck_s / best.bottleneck_s)
        except InfeasiblePlacement:
            family.failures[name] += 1
    if verify:
        family.checked += 1
        family.mismatches += exhaustive_plan(problem, must_beat=best.bottleneck_s * (1 - 1e-9)) is not None


REFERENCE_TIME_LIMIT_S = 60  # the MILP's time for the exact reference the heuristic's gap is measured against


def scale_row(rng: random.Random, n_devices: int, count: int) -> dict:
    """``solve_plan`` on self-profiled nodes (no two merge), and the heuristic alone against the exact optimum.

    The exact reference is the type DP where its table fits, else the MILP given
    ``REFERENCE_TIME_LIMIT_S`` (instances it cannot prove in that time are left out of the gap).
    """
    solve_s, exact, methods, gaps, infeasible = [], 0, {}, [], 0
    for _ in range(count):
        problem = distinct_problem(rng, n_devices, 60)
        start = time.perf_counter()
        try:
            plan = solve_plan(problem)
        except InfeasiblePlacement:
            infeasible += 1
            continue
        solve_s.append(time.perf_counter() - start)
        exact += plan.exact
        methods[plan.method] = methods.get(plan.method, 0) + 1
        heuristic = heuristic_plan(problem)
        reference = None
        if dp_cells_bound(problem) <= MAX_DP_CELLS:
            reference = optimal_plan(problem).bottleneck_s
        else:  # the type DP's table does not fit: prove with the MILP instead
            bound = min(plan.bottleneck_s, heuristic.bottleneck_s if heuristic else math.inf)
            stages, finished = milp_plan(problem, below=bound, time_limit_s=REFERENCE_TIME_LIMIT_S)
            if finished:
                reference = cost_assignment(problem, stages).bottleneck_s if stages else bound
        if reference is not None:
            gaps.append(math.inf if heuristic is None else heuristic.bottleneck_s / reference - 1)
    finite = sorted(g for g in gaps if math.isfinite(g))
    return {"nodes": n_devices, "solved": len(solve_s), "infeasible": infeasible,
            "median_s": statistics.median(solve_s) if solve_s else math.nan,
            "max_s": max(solve_s) if solve_s else math.nan, "proven_optimal": exact,
            "methods": " ".join(f"{k}:{v}" for k, v in sorted(methods.items())),
            "gap_checked": len(gaps), "heuristic_no_plan": len(gaps) - len(finite),
            "heuristic_gap_mean": statistics.fmean(finite) if finite else math.nan,
            "heuristic_gap_max": finite[-1] if finite else math.nan,
            "heuristic_optimal_share": sum(g <= 1e-9 for g in finite) / len(finite) if finite else math.nan}


def ratio_rows(family: Family) -> list[dict]:
    rows = []
    for name, ratios in family.ratios.items():
        ordered = sorted(ratios)
        rows.append({"method": name, "solved": len(ratios), "failures": family.failures[name],
                     "mean": statistics.fmean(ordered) if ordered else math.nan,
                     "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else math.nan,
                     "max": ordered[-1] if ordered else math.nan,
                     "optimal_share": sum(r <= 1 + 1e-9 for r in ordered) / len(ordered) if ordered else math.nan})
    return rows


def run(args) -> dict:
    from tqdm import tqdm

    from shared.model import build_model
    from shared.profiling import profile_model

    rng = random.Random(args.seed)
    profile = profile_model(build_model(), threads=1, repeats=20, warmup=3)
    workloads = {
        "random clusters": (args.instances, lambda: random_problem(rng, rng.randint(2, 20), rng.randint(8, 60))),
        "small random clusters": (args.small_instances, lambda: random_problem(rng, rng.randint(2, 8),
                                                                               rng.randint(8, 16))),
        "TrapNet, emulated devices": (args.trapnet_instances, lambda: trapnet_problem(rng, profile, rng.randint(2, 8))),
    }
    families = {}
    for name, (count, make) in workloads.items():
        family = families[name] = Family()
        for _ in tqdm(range(count), desc=name):
            problem = make()
            verify = (len(problem.devices) <= args.brute_force_devices
                      and problem.n_blocks <= args.brute_force_blocks)
            solve_and_compare(problem, rng, family, verify)

    timed = {"20 devices x 60 blocks": lambda: random_problem(rng, 20, 60),
             "TrapNet, 20 devices, own profiles": lambda: trapnet_problem(rng, profile, 20, own_profiles=True)}
    timings = {}
    for name, make in timed.items():
        family = timings[name] = Family()
        for _ in tqdm(range(args.timing_runs), desc=name):
            solve_and_compare(make(), rng, family, verify=False)

    tables = {f"Bottleneck / optimum, {name}": ratio_rows(family) for name, family in families.items()}
    tables["Every node its own type: solve_plan time, heuristic gap (60 blocks)"] = [
        scale_row(rng, size, args.scale_instances) for size in tqdm(args.scale_sizes, desc="distinct nodes")]
    tables["Exact solver: solve time and verification"] = [
        {"instances": name, "solved": len(family.solve_s), "infeasible": family.infeasible,
         "types_max": max(family.device_types),
         "median_s": statistics.median(family.solve_s), "max_s": max(family.solve_s),
         "brute_force_checked": family.checked, "brute_force_mismatches": family.mismatches}
        for name, family in {**families, **timings}.items() if family.solve_s]
    result = {"tables": tables, "seed": args.seed, "trapnet_profile": profile.model_dump()}
    if args.plot:
        plot(families, args.plot)
        result["plot"] = str(args.plot)
    return result


def plot(families: dict[str, Family], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), sharey=True)
    for axis, (name, family) in zip(axes, families.items()):
        names = [n for n, r in family.ratios.items() if r]
        axis.boxplot([family.ratios[n] for n in names], whis=(0, 100))
        axis.set_xticks(range(1, len(names) + 1), [f"{n}\n{family.failures[n]} failed" for n in names])
        axis.set_yscale("log")
        axis.axhline(1.0, color="tab:green", linestyle="--")
        axis.set_title(name)
    axes[0].set_ylabel("bottleneck / optimal bottleneck")
    fig.suptitle("Baselines against the exact planner (dashed line = 1); boxes: quartiles, whiskers: min-max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
