"""Measuring the accuracy model offline: per-block vectors through real pruned slices, a file the gateway loads."""

from __future__ import annotations

import numpy as np
import torch

from edgeprune.measure_accuracy import measure_accuracy, ratio_vectors, save_accuracy_model
from edgeprune.dataset import FrameSplit, to_model_input
from gateway.accuracy_model import load_block_accuracy
from shared.model import build_model, model_fingerprint


def test_vectors_hold_unpruned_uniform_lone_block_and_pipeline_shaped_rows():
    v = ratio_vectors(6, (0.0, 0.3, 0.6, 0.9), max_ratio=0.6, n_random=30, seed=1)
    assert v.shape == (3 + 2 * 6 + 30, 6)
    assert (v[0] == 0).all() and (v[2] == 0.6).all() and v.max() <= 0.6
    lone = v[3:15]  # each block alone at 0.3 and 0.6: the fit can tell which block costs what
    assert sorted((int(np.flatnonzero(row)[0]), float(row.max())) for row in lone) == sorted(
        (b, r) for b in range(6) for r in (0.3, 0.6))
    assert all(np.count_nonzero(row) == 1 for row in lone)
    for row in v[3:]:  # 2 or 3 contiguous runs of one ratio each, like the slices of a pipeline
        assert sum(a != b for a, b in zip(row, row[1:])) <= 2


def test_measuring_runs_the_pipeline_and_writes_a_loadable_model(tmp_path):
    torch.manual_seed(0)
    model = build_model()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(60, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():  # labels = the unpruned model's own answers: accuracy 1 at p = 0
        labels = model(to_model_input(images)).argmax(1).numpy()
    split = FrameSplit(images, labels, np.zeros(60, bool))
    vectors = ratio_vectors(model.n_blocks, (0.0, 0.5, 0.9), 0.9, n_random=6, seed=0)
    fit, measured = measure_accuracy(model, split, vectors, progress=False)
    assert measured[0] == 1.0  # unpruned pipeline of per-block slices == the model itself
    assert min(measured) < 1.0  # pruning 90% of every block changes answers
    assert len(fit.gains) == model.n_blocks and all(g <= 0 for g in fit.gains)

    path = tmp_path / "accuracy.json"
    save_accuracy_model(path, model, fit, len(split), "seeded")
    loaded = load_block_accuracy(path, model_fingerprint(model))
    assert loaded is not None and loaded.gains == fit.gains
    assert load_block_accuracy(path, "other-weights") is None  # never applied to other weights
