"""Why a pruned slice speeds up less than its MACs fall: speed-up, fixed per-call cost and time per MAC by input size.

At the model's 64 px input a batch-1 call is short, so a fixed per-call cost (dispatch, small
kernels) could explain a speed-up below the MAC reduction. Timing the same slice, full and
pruned, at larger inputs separates the two: the fixed part stays put while the per-MAC part
grows with the pixels, so if the speed-up stays below the MAC reduction at large inputs, each
MAC of the pruned slice costs more time. The full and pruned variants are timed round-robin (one call each in
turn) on one thread, in several rounds, so load from other processes falls on both alike; the
figures that matter are ratios measured within one round, not absolute times. ``--ratios`` times
several pruned variants in the same rounds; the switch between them (``set_ratio``) is timed too.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from edgeprune.bench.pruning import TARGET_SPEEDUP, TARGET_SPEEDUP_BY_ARCH, TARGET_SWITCH_S, interleaved_latencies
from shared.model import DEFAULT_CHECKPOINT, build_model
from shared.pruning import PrunableSlice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--slice", default="2-3",
                        help="first-last block of the slice (default: TrapNet's slowest, 2-3; Lite0's is 5-7 of "
                             "three nodes)")
    parser.add_argument("--ratios", default="0.3",
                        help="pruned variants compared with the full one, timed in the same rounds (e.g. 0.1,0.3,0.5); "
                             "the target is read at 0.3")
    parser.add_argument("--input-sizes", default="64,128,224,448", help="square input sizes in pixels")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every size (the spread of the speed-up)")
    parser.add_argument("--repeats", type=int, default=40, help="calls per variant and round, interleaved")
    parser.add_argument("--threads", type=int, default=1)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise SystemExit(f"--input-sizes {text!r}: write pixel sizes such as 64,128,224,448") from None
    if not sizes or min(sizes) < 32:
        raise SystemExit(f"--input-sizes {text!r}: every size must be at least 32 px")
    return sizes


Round = dict[int, tuple[list[float], list[float]]]  # input size -> (seconds at p=0, seconds pruned), call by call
SWITCHES = 200  # set_ratio calls timed, cycling through the ratios


def size_rows(sizes: list[int], macs: dict[int, tuple[float, float]], rounds: list[Round],
              ratio: float) -> list[dict[str, Any]]:
    """Per input size: MACs, median times, and the speed-up as the median of back-to-back call pairs
    (a pair shares the load of its moment), with the spread of the per-round medians."""
    rows = []
    for size in sizes:
        pairs = [[full / pruned for full, pruned in zip(*r[size])] for r in rounds]
        per_round = sorted(statistics.median(p) for p in pairs)
        speedup = statistics.median([q for p in pairs for q in p])
        mac_reduction = macs[size][0] / macs[size][1]
        rows.append({"input_px": size, "MMACs_p0": macs[size][0] / 1e6, f"MMACs_p{ratio:g}": macs[size][1] / 1e6,
                     "MAC_reduction": mac_reduction,
                     "ms_p0": statistics.median(t for r in rounds for t in r[size][0]) * 1e3,
                     f"ms_p{ratio:g}": statistics.median(t for r in rounds for t in r[size][1]) * 1e3,
                     "speedup": speedup, "round_min": per_round[0], "round_max": per_round[-1],
                     # > 1: the pruned variant spends more time on each MAC than the full one
                     "time_per_MAC_pruned_over_full": mac_reduction / speedup})
    return rows


def fixed_cost_rows(sizes: list[int], rounds: list[Round], ratio: float) -> list[dict[str, Any]]:
    """Per variant, an upper bound on the fixed per-call cost's share of a call at each size.

    Whatever a call costs regardless of its input size is part of even the smallest input's call, so
    time(smallest) / time(size) bounds that share from above. A bound, because a line fitted through
    the sizes would set its intercept with the noise of calls a hundred times longer on a loaded machine.
    """
    rows = []
    smallest = min(sizes)
    for variant, label in enumerate(("p=0", f"p={ratio:g}")):
        medians = {size: statistics.median(t for r in rounds for t in r[size][variant]) for size in sizes}
        rows.append({"variant": label, f"ms_at_{smallest}px": medians[smallest] * 1e3,
                     **{f"fixed_share_at_most_{size}px": medians[smallest] / medians[size] for size in sizes
                        if size != smallest}})
    return rows


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = sorted({float(part) for part in text.split(",")})
    except ValueError:
        raise SystemExit(f"--ratios {text!r}: write ratios such as 0.1,0.3,0.5") from None
    if not ratios or ratios[0] <= 0 or ratios[-1] >= 1:
        raise SystemExit(f"--ratios {text!r}: every ratio must lie in (0, 1)")
    return ratios


def switch_times(stage: PrunableSlice, ratios: list[float]) -> list[float]:
    """Seconds of :data:`SWITCHES` ratio switches, cycling full -> each ratio (every variant already built)."""
    cycle = [0.0, *ratios]
    return [stage.set_ratio(cycle[i % len(cycle)]) for i in range(1, SWITCHES + 1)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch_pruning as tp
    from tqdm import tqdm

    sizes = parse_sizes(args.input_sizes)
    ratios = parse_ratios(args.ratios)
    first, last = (int(b) for b in args.slice.split("-"))
    model = build_model(args.checkpoint)
    stage = PrunableSlice(model, first, last, ladder=(0.0, *ratios))
    modules = [stage.module(0.0), *(stage.module(r) for r in ratios)]
    generator = torch.Generator().manual_seed(0)  # an image-like input: zeros make constant activations
    inputs = {size: model.run_blocks(torch.rand(1, 3, size, size, generator=generator), 0, first - 1).detach()
              for size in sizes}
    macs = {size: [float(tp.utils.count_ops_and_params(m, inputs[size])[0]) for m in modules] for size in sizes}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    timed: list[dict[int, list[list[float]]]] = []
    try:
        for _ in tqdm(range(args.rounds), desc="rounds"):
            # the variants alternate call by call on one input size at a time: each follows the others,
            # never a call of another size (whose larger tensors would leave the caches cold).
            timed.append({size: interleaved_latencies([(m, inputs[size]) for m in modules], args.repeats)
                          for size in sizes})
        switches = switch_times(stage, ratios)
    finally:
        torch.set_num_threads(previous_threads)
    slice_name = f"{model.block_names[first]}..{model.block_names[last]}"
    tables: dict[str, Any] = {}
    targets = []
    goal = TARGET_SPEEDUP_BY_ARCH.get(model.config.arch, TARGET_SPEEDUP)
    for k, ratio in enumerate(ratios, start=1):
        rounds: list[Round] = [{size: (r[size][0], r[size][k]) for size in sizes} for r in timed]
        pair_macs = {size: (macs[size][0], macs[size][k]) for size in sizes}
        rows = size_rows(sizes, pair_macs, rounds, ratio)
        tables[f"Slice {slice_name}, p=0 vs p={ratio:g}, {args.threads} thread(s), by input size"] = rows
        tables[f"Fixed per-call cost at p={ratio:g}: at most the smallest input's time"] = fixed_cost_rows(
            sizes, rounds, ratio)
        if abs(ratio - 0.3) < 1e-9:
            largest = rows[-1]
            targets.append({"target": f"speedup of slice {slice_name} at p=0.3, {largest['input_px']} px, "
                                      f"{args.threads} thread(s)",
                            "goal": f">= {goal}", "measured": largest["speedup"],
                            "met": largest["speedup"] >= goal})
    switch_max = max(switches)
    targets.append({"target": f"ratio switch of slice {slice_name} (max of {len(switches)})",
                    "goal": f"<= {TARGET_SWITCH_S * 1e3:g} ms", "measured": switch_max * 1e3,
                    "met": switch_max <= TARGET_SWITCH_S})
    tables["Ratio switch (set_ratio, every variant built)"] = [
        {"switches": len(switches), "median_us": statistics.median(switches) * 1e6, "max_us": switch_max * 1e6}]
    tables["Target"] = targets
    return {"tables": tables, "checkpoint": str(args.checkpoint), "slice": [first, last], "ratios": ratios,
            "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
            "round_medians_ms": [{str(size): [statistics.median(t) * 1e3 for t in r[size]] for size in sizes}
                                 for r in timed]}
