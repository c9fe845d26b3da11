"""The one emulated device of a ``bench pipeline`` invocation: measuring it, and checking every run served it.

A policy comparison is only as good as the sameness of what the policies run on. The device model
(:mod:`shared.device_model`) is measured once, before any policy, with the node's own calibrator; every node of
every run emulates from it. Afterwards :func:`devices_check` compares the stage time each run actually served
(per node, block range, ratio and transient slowdown) and fails the benchmark when two runs differ by more
than :data:`TOLERANCE`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from node_agent.runtime import SliceCalibrator, block_input_shape
from shared.device_model import DeviceModel
from shared.latency_fit import fit_latency
from shared.model import build_model, model_fingerprint
from shared.pruning import PrunableSlice

# A pause before every timed run, as a live request finds one. 10 ms times the same as the node's 50 ms idle
# pause on this host (0.5-slice medians 3.6-4.1 ms at 10, 20 and 50 ms), while back-to-back runs read 1.9 ms:
# a hot loop. The shorter pause keeps 21 ranges x 10 ratios within half a minute.
PAUSE_S = 0.01
TOLERANCE = 0.05  # two runs' served stage times further apart than this are different devices
MIN_FRAMES = 5  # served times from fewer frames are too noisy to compare


def measure_device_model(repeats: int, threads: int = 1, progress: bool = True) -> DeviceModel:
    """Every contiguous block range at every ladder ratio, ``repeats`` timed runs each (median), smoothed by the
    latency fit the controller uses (``shared/latency_fit.py``; the medians are kept beside it)."""
    torch.set_num_threads(threads)  # as a node with the default [node] threads
    model = build_model()
    n = model.n_blocks
    ranges = [(a, b) for a in range(n) for b in range(a, n)]
    fitted: dict[tuple[int, int], tuple[float, ...]] = {}
    medians: dict[tuple[int, int], tuple[float, ...]] = {}
    started = time.monotonic()
    for i, (a, b) in enumerate(ranges, start=1):
        if progress:
            print(f"\rdevice model: blocks {a}..{b} ({i}/{len(ranges)} ranges, {repeats} runs per ratio)", end="",
                  file=sys.stderr, flush=True)
        prunable = PrunableSlice(model, a, b, build="eager", input_size=model.config.input_size)
        calibrator = SliceCalibrator(prunable, block_input_shape(model, a), repeats)
        while True:
            time.sleep(PAUSE_S)
            if calibrator.step():
                break
        medians[(a, b)] = tuple(calibrator.latencies())
        try:
            curve = fit_latency(prunable.ladder, medians[(a, b)]).best()
            fitted[(a, b)] = tuple(curve.predict(r) for r in prunable.ladder)
        except ValueError:  # no usable fit: the medians themselves
            fitted[(a, b)] = medians[(a, b)]
    if progress:
        print(f"\rdevice model: {len(ranges)} ranges measured in {time.monotonic() - started:.0f} s" + " " * 20,
              file=sys.stderr, flush=True)
    return DeviceModel(model_fingerprint(model), n, prunable.ladder, fitted,
                       {"repeats": repeats, "pause_s": PAUSE_S, "threads": threads, "at": time.time(),
                        "smoothing": "shared/latency_fit best fit of the medians"}, medians)


def served_stage_times(hops: list[tuple[str, tuple[int, int], float, float, float]]) -> list[dict]:
    """Median emulated compute each (node, blocks, ratio, transient slowdown) served, from
    ``(node, (first, last), ratio, slowdown, compute_s)`` per stored hop."""
    groups: dict[tuple, list[float]] = {}
    for node, blocks, ratio, slowdown, compute_s in hops:
        groups.setdefault((node, tuple(blocks), round(ratio, 6), round(slowdown, 6)), []).append(compute_s)
    return [{"node": node, "blocks": list(blocks), "ratio": ratio, "slowdown": slowdown, "frames": len(times),
             "median_s": float(np.median(times))}
            for (node, blocks, ratio, slowdown), times in sorted(groups.items())]


def devices_check(served: dict[str, list[dict]], tolerance: float = TOLERANCE,
                  min_frames: int = MIN_FRAMES) -> dict:
    """Compare the served stage times of every run (``served``: run label -> :func:`served_stage_times`) where two
    or more runs served the same node, blocks, ratio and slowdown from ``min_frames`` frames each.

    ``passed`` is False when any such group's largest median is more than ``tolerance`` above its smallest; each
    compared group is listed with its figures, the failing ones also as a sentence in ``failures``.
    """
    groups: dict[tuple, dict[str, dict]] = {}
    for label, entries in served.items():
        for e in entries:
            if e["frames"] >= min_frames:
                key = (e["node"], tuple(e["blocks"]), e["ratio"], e["slowdown"])
                groups.setdefault(key, {})[label] = e
    compared, failures = [], []
    for (node, blocks, ratio, slowdown), by_run in sorted(groups.items()):
        if len(by_run) < 2:
            continue
        medians = {label: e["median_s"] for label, e in by_run.items()}
        low, high = min(medians, key=medians.get), max(medians, key=medians.get)
        spread = medians[high] / medians[low] - 1.0
        compared.append({"node": node, "blocks": list(blocks), "ratio": ratio, "slowdown": slowdown,
                         "spread": spread, "median_ms": {k: 1000 * v for k, v in medians.items()},
                         "frames": {k: e["frames"] for k, e in by_run.items()}})
        if spread > tolerance:
            failures.append(f"{node} blocks {blocks[0]}..{blocks[1]} at ratio {ratio:g}, slowdown {slowdown:g}: "
                            f"{high} served {1000 * medians[high]:.1f} ms, {low} {1000 * medians[low]:.1f} ms "
                            f"({100 * spread:.1f}% apart, more than {100 * tolerance:.0f}%)")
    worst = max((c["spread"] for c in compared), default=None)
    return {"tolerance": tolerance, "min_frames": min_frames, "groups_compared": len(compared),
            "worst_spread": worst, "passed": not failures, "failures": failures, "compared": compared}


def describe_check(check: dict) -> str:
    """The check's one printed line."""
    if not check["groups_compared"]:
        return "devices check: nothing to compare (one run, or no stage served the same state twice)"
    verdict = "passed" if check["passed"] else f"FAILED ({len(check['failures'])} groups)"
    return (f"devices check: {verdict}: {check['groups_compared']} node/blocks/ratio/slowdown groups served by "
            f"several runs, at most {100 * check['worst_spread']:.1f}% apart (limit {100 * check['tolerance']:.0f}%)")

