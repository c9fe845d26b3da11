"""Why a pruned slice speeds up less than its MACs fall: speed-up, fixed per-call cost and time per MAC by input size.

At the model's 64 px input a batch-1 call is short, so a fixed per-call cost (dispatch, small
kernels) could explain a speed-up below the MAC reduction. Timing the same slice, full and
pruned, at larger inputs separates the two: the fixed part stays put while the per-MAC part
grows with the pixels. The full and pruned variants are timed round-robin (one call each in
turn) on one thread, in several rounds, so load from other processes falls on both alike; the
figures that matter are ratios measured within one round, not absolute times.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.bench.pruning import TARGET_SPEEDUP, median_latencies
from shared.model import DEFAULT_CHECKPOINT, build_model
from shared.pruning import PrunableSlice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--slice", default="2-3", help="first-last block of the slice (default: the slowest, 2-3)")
    parser.add_argument("--ratio", type=float, default=0.3, help="the pruned variant compared with the full one")
    parser.add_argument("--input-sizes", default="64,128,224,448", help="square input sizes in pixels")
    parser.add_argument("--rounds", type=int, default=5, help="independent rounds (the spread of the speed-up)")
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


def size_rows(sizes: list[int], macs: dict[int, tuple[float, float]], rounds: list[dict[int, tuple[float, float]]],
              ratio: float) -> list[dict[str, Any]]:
    """Per input size: MACs, median times over the rounds and the spread of the per-round speed-up."""
    rows = []
    for size in sizes:
        speedups = sorted(r[size][0] / r[size][1] for r in rounds)
        mac_reduction = macs[size][0] / macs[size][1]
        speedup = statistics.median(speedups)
        rows.append({"input_px": size, "MMACs_p0": macs[size][0] / 1e6, f"MMACs_p{ratio:g}": macs[size][1] / 1e6,
                     "MAC_reduction": mac_reduction,
                     "ms_p0": statistics.median(r[size][0] for r in rounds) * 1e3,
                     f"ms_p{ratio:g}": statistics.median(r[size][1] for r in rounds) * 1e3,
                     "speedup": speedup, "speedup_min": speedups[0], "speedup_max": speedups[-1],
                     # > 1: the pruned variant spends more time on each MAC than the full one
                     "time_per_MAC_pruned_over_full": mac_reduction / speedup})
    return rows


def fixed_cost_rows(sizes: list[int], macs: dict[int, tuple[float, float]],
                    rounds: list[dict[int, tuple[float, float]]], ratio: float) -> list[dict[str, Any]]:
    """Per variant, time = fixed + per-MMAC cost fitted over the input sizes within each round (every
    size was timed in the same interleaved loop), and the fixed part's share of a call; medians over rounds."""
    rows = []
    for variant, label in enumerate(("p=0", f"p={ratio:g}")):
        x = np.asarray([macs[size][variant] / 1e6 for size in sizes])
        fits = [np.polyfit(x, [r[size][variant] for size in sizes], 1) for r in rounds]  # (s per MMAC, fixed s)
        row = {"variant": label, "fixed_ms": statistics.median(f[1] for f in fits) * 1e3,
               "us_per_MMAC": statistics.median(f[0] for f in fits) * 1e6}
        for size in sizes:
            row[f"fixed_share_{size}px"] = statistics.median(f[1] / r[size][variant] for f, r in zip(fits, rounds))
        rows.append(row)
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
    # Every size and both variants in one round-robin loop, so load from other processes falls on all alike.
    calls = [(module, inputs[size]) for size in sizes for module in modules]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rounds = []
    try:
        for _ in tqdm(range(args.rounds), desc="rounds"):
            seconds = iter(median_latencies(calls, args.repeats))
            rounds.append({size: (next(seconds), next(seconds)) for size in sizes})
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
                       "Time = fixed + per-MMAC cost, fitted over the input sizes": fixed_cost_rows(sizes, macs, rounds,
                                                                                                    args.ratio),
                       "Target": targets},
            "checkpoint": str(args.checkpoint), "slice": [first, last], "ratio": args.ratio,
            "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats}
