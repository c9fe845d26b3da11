"""Why a pruned slice speeds up less than its MACs fall: speed-up, fixed per-call cost and time per MAC by input size.

At the model's 64 px input a batch-1 call is short, so a fixed per-call cost (dispatch, small
kernels) could explain a speed-up below the MAC reduction. Timing the same slice, full and
pruned, at larger inputs separates the two: the fixed part stays put while the per-MAC part
grows with the pixels, so if the speed-up stays below the MAC reduction at large inputs, each
MAC of the pruned slice costs more time. The full and pruned variants are timed round-robin (one call each in
turn) on one thread, in several rounds, so load from other processes falls on both alike; the
figures that matter are ratios measured within one round, not absolute times.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from edgeprune.bench.pruning import TARGET_SPEEDUP, interleaved_latencies
from shared.model import DEFAULT_CHECKPOINT, build_model
from shared.pruning import PrunableSlice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--slice", default="2-3", help="first-last block of the slice (default: the slowest, 2-3)")
    parser.add_argument("--ratio", type=float, default=0.3, help="the pruned variant compared with the full one")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch_pruning as tp
    from tqdm import tqdm

    sizes = parse_sizes(args.input_sizes)
    first, last = (int(b) for b in args.slice.split("-"))
    model = build_model(args.checkpoint)
    stage = PrunableSlice(model, first, last, ladder=(0.0, args.ratio))
    modules = (stage.module(0.0), stage.module(args.ratio))
    generator = torch.Generator().manual_seed(0)  # an image-like input: zeros make constant activations
    inputs = {size: model.run_blocks(torch.rand(1, 3, size, size, generator=generator), 0, first - 1).detach()
              for size in sizes}
    macs = {size: tuple(float(tp.utils.count_ops_and_params(m, inputs[size])[0]) for m in modules)
            for size in sizes}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rounds: list[Round] = []
    try:
        for _ in tqdm(range(args.rounds), desc="rounds"):
            # p=0 and the pruned variant alternate call by call on one input size at a time: each follows
            # the other, never a call of another size (whose larger tensors would leave the caches cold).
            rounds.append({size: tuple(interleaved_latencies([(m, inputs[size]) for m in modules], args.repeats))
                           for size in sizes})
    finally:
        torch.set_num_threads(previous_threads)
    rows = size_rows(sizes, macs, rounds, args.ratio)
    slice_name = f"{model.block_names[first]}..{model.block_names[last]}"
    largest = rows[-1]
    targets = [{"target": f"speedup of slice {slice_name} at p={args.ratio:g}, {largest['input_px']} px, "
                          f"{args.threads} thread(s)",
                "goal": f">= {TARGET_SPEEDUP}", "measured": largest["speedup"],
                "met": largest["speedup"] >= TARGET_SPEEDUP}]
    title = f"Slice {slice_name}, p=0 vs p={args.ratio:g}, {args.threads} thread(s), by input size"
    return {"tables": {title: rows,
                       "Fixed per-call cost: at most the smallest input's time": fixed_cost_rows(sizes, rounds,
                                                                                                 args.ratio),
                       "Target": targets},
            "checkpoint": str(args.checkpoint), "slice": [first, last], "ratio": args.ratio,
            "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
            "round_medians_ms": [{str(size): [statistics.median(t) * 1e3 for t in r[size]] for size in sizes}
                                 for r in rounds]}
