"""Camera-trap frames: deterministic, split by silhouette, cached outside the package."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune import dataset
from edgeprune.dataset import (
    FrameSplit,
    RenderConfig,
    load_frames,
    load_raw_silhouettes,
    render_frame,
    split_indices,
    to_model_input,
)
from shared.imaging import normalise


def test_split_is_seeded_disjoint_complete_and_shuffled():
    a, b = split_indices(10_000, seed=0), split_indices(10_000, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "val", "test")] == [8000, 1000, 1000]
    assert len(np.unique(np.concatenate(list(a.values())))) == 10_000
    assert not np.array_equal(a["test"], split_indices(10_000, seed=1)["test"])


def test_raw_silhouettes_fixture_has_every_class_in_every_split():
    splits = load_raw_silhouettes()
    for split in splits.values():
        assert split.images.shape[1:] == (28, 28, 3) and split.images.dtype == np.uint8
        # The files are sorted by class: a split taken in file order would miss classes.
        assert set(np.unique(split.labels)) == set(range(10))
        assert np.bincount(split.labels).min() >= 0.5 * len(split) / 10


@pytest.fixture(scope="module")
def silhouette_and_backgrounds():
    images, _ = dataset.load_silhouettes()
    return images[0], dataset._backgrounds()


def test_render_is_a_function_of_the_seed(silhouette_and_backgrounds):
    sil, bgs = silhouette_and_backgrounds
    config = RenderConfig()
    first = render_frame(sil, bgs, np.random.default_rng([0, 7]), config, night=False)
    again = render_frame(sil, bgs, np.random.default_rng([0, 7]), config, night=False)
    other = render_frame(sil, bgs, np.random.default_rng([1, 7]), config, night=False)
    assert first.shape == (config.size, config.size, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_night_frames_are_dark_and_colourless(silhouette_and_backgrounds):
    sil, bgs = silhouette_and_backgrounds
    day = [render_frame(sil, bgs, np.random.default_rng([0, i]), RenderConfig(), night=False) for i in range(20)]
    night = [render_frame(sil, bgs, np.random.default_rng([0, i]), RenderConfig(), night=True) for i in range(20)]
    assert np.mean(night) < 0.6 * np.mean(day)
    night_f = np.asarray(night, np.float32)
    assert np.abs(night_f[..., 0] - night_f[..., 1]).mean() < 1.0  # gray: R == G
    assert np.abs(np.asarray(day, np.float32)[..., 0] - np.asarray(day, np.float32)[..., 1]).mean() > 5.0


def test_frames_are_cached_outside_the_package_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path))
    calls = []
    rng = np.random.default_rng(0)
    fake = {name: FrameSplit(rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), np.arange(4),
                             np.array([True, False, False, True])) for name in dataset.SPLITS}

    def build(config):
        calls.append(config)
        return fake

    monkeypatch.setattr(dataset, "build_frames", build)
    first = load_frames(RenderConfig(seed=5))
    second = load_frames(RenderConfig(seed=5))
    load_frames(RenderConfig(seed=6))
    assert len(calls) == 2  # seed 5 once, seed 6 once
    assert list(tmp_path.glob("*.npz")) and all(np.array_equal(first[k].images, second[k].images) for k in fake)
    assert np.array_equal(second["test"].night, fake["test"].night)


def test_two_processes_rendering_the_same_frames_at_once_both_get_them(tmp_path, monkeypatch):
    """Two cameras of one benchmark (or two benchmarks) render the same cache at once: the second writer
    finishes between the first's save and rename. A shared temporary name made the first's rename fail."""
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path))
    rng = np.random.default_rng(0)
    fake = {name: FrameSplit(rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8), np.arange(2),
                             np.array([True, False])) for name in dataset.SPLITS}
    monkeypatch.setattr(dataset, "build_frames", lambda config: fake)
    real_save = np.savez_compressed
    interleaved = []

    def save_then_let_the_other_writer_finish(file, **arrays):
        real_save(file, **arrays)
        if not interleaved:
            interleaved.append(True)
            load_frames(RenderConfig(seed=7))  # the other process: renders, saves and renames in full

    monkeypatch.setattr(dataset.np, "savez_compressed", save_then_let_the_other_writer_finish)
    frames = load_frames(RenderConfig(seed=7))
    assert interleaved and np.array_equal(frames["test"].images, fake["test"].images)
    # no temporaries left
    assert [p.name for p in tmp_path.iterdir()] == [dataset._cache_path(RenderConfig(seed=7)).name]


def test_training_input_is_the_nodes_normalisation():
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    batch = to_model_input(frames).numpy()
    for k in range(3):
        np.testing.assert_array_equal(batch[k:k + 1], normalise(frames[k]))


def test_montage_shows_a_labelled_grid():
    split = load_raw_silhouettes()["test"]
    sheet = dataset.montage(split, rows=2, cols=3, zoom=1)
    assert sheet.size == (3 * 28, 2 * (28 + 12))
