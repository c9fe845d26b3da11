"""Offline: measure the per-block accuracy model the pruning controller needs (``edgeprune calibrate``).

Not the BatchNorm tables' calibration (``edgeprune.training``) nor a node's latency curves
(``node_agent/calibration.py``): docs/architecture.md, "Three calibrations".

Pruning masks depend on a block's weights and ratio alone (shared/pruning.py), so the model is
measured once per checkpoint with a ratio *per block*: every block becomes its own pruned slice,
chained with zero-filled boundaries exactly as nodes do, and the validation split is classified
for the unpruned vector, every uniform ratio of the ladder and random per-block vectors. The
paper's logistic is fitted to those points (gateway/curves.py), and any placement's model is
derived from it at run time (``accuracy_for_slices``). Latency needs no offline step: each node
measures its own slice when it takes a stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgeprune.dataset import FrameSplit, to_model_input
from gateway.curves import AccuracyFit, fit_accuracy
from shared.model import BlockNet, model_fingerprint
from shared.pruning import DEFAULT_LADDER, PrunableSlice, pipeline_predictions


def ratio_vectors(n_blocks: int, ladder: Sequence[float], max_ratio: float, n_random: int,
                        seed: int) -> np.ndarray:
    """Unpruned, every uniform ratio up to ``max_ratio``, each block pruned alone (at ``max_ratio`` and
    about half of it), and ``n_random`` random *pipeline-shaped* vectors.

    The uniform vectors fix the total loss; the lone blocks tell the fit which block it comes from
    (random runs alone left that to chance, and the fit once put all of it on one block, so the
    controller thought pruning the others was free).

    A pipeline prunes contiguous runs of blocks at one ratio (a slice each), so the random vectors
    are 2 or 3 random runs with a ladder ratio each: what the controller will actually choose.
    Each block runs as its own slice here; inside a run it sees its upstream at its own ratio
    (the uniform table) and at a run boundary it loads its entry table, exactly as the first block
    of a real slice does, so these measurements equal the pipeline's.
    """
    allowed = np.asarray([r for r in ladder if r <= max_ratio + 1e-9])
    uniform = np.repeat(allowed[:, None], n_blocks, axis=1)
    lone = []
    for ratio in sorted({float(allowed[-1]), float(allowed[len(allowed) // 2])} - {0.0}):
        for block in range(n_blocks):
            vector = np.zeros(n_blocks)
            vector[block] = ratio
            lone.append(vector)
    rng = np.random.default_rng(seed)
    shaped = []
    for _ in range(n_random):
        runs = int(rng.integers(2, min(3, n_blocks) + 1))
        cuts = np.sort(rng.choice(np.arange(1, n_blocks), size=runs - 1, replace=False))
        ratios = rng.choice(allowed, size=runs)
        shaped.append(np.repeat(ratios, np.diff(np.concatenate([[0], cuts, [n_blocks]]))))
    return np.vstack([uniform, *lone, *shaped])


def measure_accuracy(model: BlockNet, split: FrameSplit, vectors: np.ndarray,
                       progress: bool = True) -> tuple[AccuracyFit, list[float]]:
    """Measured accuracy of each per-block ratio vector and the logistic fitted to them."""
    ladder = tuple(sorted(set(DEFAULT_LADDER) | {float(r) for r in np.unique(vectors)}))
    blocks = [PrunableSlice(model, b, b, ladder=ladder) for b in range(model.n_blocks)]
    inputs = to_model_input(split.images, model.config.mean, model.config.std)
    measured = []
    with torch.inference_mode():
        for vector in tqdm(vectors, desc="accuracy per ratio vector", unit="vector", disable=not progress):
            measured.append(float((pipeline_predictions(blocks, vector, inputs) == split.labels).mean()))
    fit = fit_accuracy(vectors.tolist(), measured, chance=1.0 / model.config.num_classes)
    return fit, measured


def save_accuracy_model(path: Path, model: BlockNet, fit: AccuracyFit, frames: int, checkpoint: str) -> None:
    """The file the gateway loads (``[gateway] accuracy_model``), tied to the weights it was measured on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "model": "trapnet", "model_fingerprint": model_fingerprint(model), "checkpoint": checkpoint,
        "n_blocks": model.n_blocks, "block_names": model.block_names, "frames": frames,
        "measured_at": time.time(), "fit": fit.to_dict()}, indent=1) + "\n")
