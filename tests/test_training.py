"""Training regimes, BN calibration and the checkpoint, on the raw-silhouette fixture with a tiny model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.dataset import load_raw_silhouettes
from edgeprune.training import (
    accuracy,
    batches,
    calibrate_bn_tables,
    calibrate_entry_bn_tables,
    masked_pass_bn,
    recalibrate_checkpoint_bn_tables,
    regime_config,
    save_checkpoint,
    table_passes,
    train,
)
from shared.model import TrapNetConfig, build_model, model_fingerprint
from shared.pruning import PrunableSlice, keep_masks, masked, pruning_groups, ratio_key

LADDER = (0.0, 0.3, 0.5)
# The module's shared training fixture is CPU-bound: a load average
# of 16 stretched it past the suite's 300 s hang guard. The guard is for hangs, not speed: give it room.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def data():
    splits = load_raw_silhouettes()
    rng = np.random.default_rng(0)
    return {"train": splits["train"].subset(np.sort(rng.choice(8000, 1200, replace=False))),
            "val": splits["val"].subset(np.arange(0, 1000, 4)),
            "test": splits["test"].subset(np.arange(0, 1000, 2))}


@pytest.fixture(scope="module")
def trained(data):
    config = regime_config("ours", epochs=3, batch_size=32, ladder=LADDER, model=TrapNetConfig(width=8),
                           calibration_frames=256)
    model, history = train(config, data, progress=False, log=lambda _: None)
    return config, model, history


def test_random_width_training_learns_above_chance_at_full_and_pruned_width(trained, data):
    """Learns, and its pruned pipeline (real surgery + the calibrated BN tables) still classifies."""
    from edgeprune.dataset import to_model_input
    from shared.pruning import pipeline_predictions

    _, model, history = trained
    assert len(history["epochs"]) == 3 and np.isfinite(history["epochs"][-1]["loss"])
    assert accuracy(model, data["test"]) > 0.35  # chance is 0.10
    model.bn_tables = calibrate_bn_tables(model, data["train"], LADDER)
    try:
        stages = [PrunableSlice(model, a, b, ladder=LADDER, input_size=28) for a, b in ((0, 1), (2, 3), (4, 5))]
        preds = pipeline_predictions(stages, [0.3] * 3, to_model_input(data["test"].images))
    finally:
        model.bn_tables = {}
    assert (preds == data["test"].labels).mean() > 0.25


def test_calibration_reads_each_ratios_statistics_and_restores_the_model(trained, data):
    _, model, _ = trained
    before = model_fingerprint(model)
    frames = data["train"].subset(np.arange(256))
    tables = calibrate_bn_tables(model, frames, LADDER)
    assert model_fingerprint(model) == before and not model.training
    assert sorted(tables) == [ratio_key(0.3), ratio_key(0.5)]
    # The stem sees unpruned input, so its table is the plain mean of its conv output at every ratio.
    with torch.no_grad():
        stem_conv = torch.cat([model.blocks[0][0](x) for x, _ in batches(frames, 256, None, False)])
    torch.testing.assert_close(tables["0.30"]["blocks.0.1"]["mean"], stem_conv.mean((0, 2, 3)), atol=1e-4, rtol=1e-3)
    # Deeper layers see pruned inputs, so their statistics move with the ratio.
    deep = "blocks.4.0.bn1"
    assert not torch.allclose(tables["0.30"][deep]["mean"], tables["0.50"][deep]["mean"])
    assert not torch.allclose(tables["0.30"][deep]["mean"], model.get_submodule(deep).running_mean)


def test_checkpoint_round_trip_carries_the_bn_tables_to_the_node(trained, data, tmp_path):
    config, model, _ = trained
    tables = calibrate_bn_tables(model, data["train"].subset(np.arange(128)), LADDER)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, config, tables, {"regime": "ours"})
    loaded = build_model(path)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert loaded.config == model.config and sorted(loaded.bn_tables) == sorted(tables)
    stage = PrunableSlice(loaded, 0, 2, ladder=LADDER, input_size=28)  # tables come from the checkpoint
    norm = stage.module(0.5).get_submodule("2.0.bn1")
    keep = keep_masks(pruning_groups(loaded, 28), [0.5] * loaded.n_blocks)[loaded.get_submodule("blocks.2.0.bn1")]
    torch.testing.assert_close(norm.running_mean, tables["0.50"]["blocks.2.0.bn1"]["mean"][keep])


def test_paper_regime_is_small_batch_strong_l2_more_epochs():
    standard, paper = regime_config("standard"), regime_config("paper")
    assert paper.batch_size < standard.batch_size
    assert paper.weight_decay >= 10 * standard.weight_decay
    assert paper.epochs > standard.epochs
    with pytest.raises(ValueError):
        regime_config("magic")


def test_standard_training_never_masks(data, monkeypatch):
    from edgeprune import training

    def fail(*_args, **_kwargs):
        raise AssertionError("standard regime ran a masked pass")

    monkeypatch.setattr(training, "masked_loss", fail)
    small = {k: v.subset(np.arange(64)) for k, v in data.items()}
    model, _ = train(regime_config("standard", epochs=1, model=TrapNetConfig(width=8)), small, progress=False,
                     log=lambda _: None)
    assert isinstance(model.blocks[0][1], nn.BatchNorm2d)


def test_unlabelled_images_reach_only_the_masked_passes_with_the_full_widths_targets(data, monkeypatch):
    """Each masked pass distils on the labelled batch plus ``unlabelled_batch`` unlabelled images; the labelled
    loss never scores them (they have no label) and every target is the full pass's softmax."""
    from edgeprune import training

    seen = []
    real = training.masked_loss

    def spy(model, groups, ratios, x, target):
        seen.append((x.detach().clone(), target.detach().clone()))
        return real(model, groups, ratios, x, target)

    monkeypatch.setattr(training, "masked_loss", spy)
    small = {k: v.subset(np.arange(32)) for k, v in data.items()}
    unlabelled = np.full((6, *small["train"].images.shape[1:]), 255, np.uint8)  # white: unlike any fixture frame
    config = regime_config("ours", epochs=1, batch_size=16, warmup_epochs=0, ladder=LADDER,
                           model=TrapNetConfig(width=8), unlabelled_batch=4)
    train(config, small, progress=False, log=lambda _: None, unlabelled=unlabelled)
    assert len(seen) >= 2
    for x, target in seen:
        assert x.shape[0] == 16 + 4 and target.shape == (20, config.model.num_classes)
        assert torch.allclose(target.sum(1), torch.ones(20))  # soft targets, the unlabelled rows included
        white = x.flatten(1).std(1) < 1e-6
        assert white[16:].all() and not white[:16].any()
    with pytest.raises(ValueError, match="unlabelled"):
        train(config, small, progress=False, log=lambda _: None)


@pytest.mark.parametrize("mode", ["batch", "eval"])
def test_masked_passes_never_move_the_full_networks_running_statistics(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    norm = net[1]
    before = norm.running_mean.clone()
    x = torch.randn(8, 3, 6, 6) * 3 + 2
    with masked_pass_bn(net, mode):
        out = net(x)
    torch.testing.assert_close(norm.running_mean, before)
    assert norm.training and norm.momentum == 0.1  # restored for the next full pass
    per_channel_mean = out.mean((0, 2, 3)).detach()
    if mode == "batch":  # normalised with the batch's statistics: centred on the BN bias (0)
        torch.testing.assert_close(per_channel_mean, torch.zeros(4), atol=1e-5, rtol=0)
    else:  # normalised with the stored statistics (mean 0, var 1): not centred
        assert per_channel_mean.abs().max() > 0.1


def test_entry_tables_hold_the_statistics_behind_a_differently_pruned_upstream(trained, data, tmp_path):
    """Entry (own 0, upstream 0.5) of block 2 = mean of its first conv's output when blocks 0-1 run at 0.5."""
    config, model, _ = trained
    before = model_fingerprint(model)
    frames = data["train"].subset(np.arange(256))
    tables = calibrate_bn_tables(model, frames, LADDER)
    entry = calibrate_entry_bn_tables(model, frames, LADDER, tables)
    assert model_fingerprint(model) == before and not model.training
    assert sorted(entry) == ["0.00", "0.30", "0.50"]
    assert sorted(entry["0.50"]) == ["0.00", "0.30"]  # the diagonal is the uniform table
    assert {name.split(".")[1] for name in entry["0.00"]["0.50"]} == {"1", "2", "3", "4"}  # never the stem

    upstream = copy.deepcopy(model)
    for name, m in upstream.named_modules():
        if name in tables["0.50"]:
            m.running_mean.copy_(tables["0.50"][name]["mean"])
            m.running_var.copy_(tables["0.50"][name]["var"])
    with torch.no_grad(), masked(keep_masks(pruning_groups(upstream, 28), [0.5] * upstream.n_blocks)):
        conv = torch.cat([upstream.blocks[2][0].conv1(upstream.run_blocks(x, 0, 1))
                          for x, _ in batches(frames, 256, None, False)])
    got = entry["0.00"]["0.50"]["blocks.2.0.bn1"]["mean"]
    torch.testing.assert_close(got, conv.mean((0, 2, 3)), atol=1e-4, rtol=1e-3)
    assert not torch.allclose(got, model.get_submodule("blocks.2.0.bn1").running_mean, atol=1e-3)

    # --recalibrate puts both kinds of table into an existing checkpoint without touching its weights.
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, config, {}, {"regime": "ours"})
    lines: list[str] = []
    recalibrate_checkpoint_bn_tables(path, frames, log=lines.append)
    passes = table_passes(LADDER)  # 2 pruned ratios + 3 upstream passes + 3 x 2 (own, upstream) pairs
    assert passes == 11 and f"BatchNorm tables: {passes}/{passes} passes" in "\n".join(lines)  # said while it ran
    assert lines[-1].startswith(f"BatchNorm tables: {passes} passes over 256 frames")
    loaded = build_model(path)
    assert model_fingerprint(loaded) == before
    assert sorted(loaded.bn_tables) == ["0.30", "0.50"] and sorted(loaded.entry_bn_tables) == sorted(entry)


def test_an_interrupted_run_resumes_after_its_last_epoch_and_ends_where_an_uninterrupted_one_does(data, tmp_path):
    small = {k: v.subset(np.arange(64)) for k, v in data.items()}
    config = regime_config("ours", epochs=2, batch_size=32, ladder=LADDER, model=TrapNetConfig(width=8))
    whole, _ = train(config, small, progress=False, log=lambda _: None)

    resume = tmp_path / "run.pt.resume"

    def interrupt_after_epoch_one(line: str) -> None:
        if "epoch 2/2" in line:  # logged before epoch 2 is saved: as if killed during the save
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, small, progress=False, log=interrupt_after_epoch_one, resume=resume)
    assert resume.exists()  # epoch 1 was saved
    state = torch.load(resume, weights_only=True)  # as written before TrainConfig had unlabelled_batch:
    older = json.loads(state["train_config"])      # a new field at its default still resumes
    del older["unlabelled_batch"]
    torch.save({**state, "train_config": json.dumps(older, sort_keys=True)}, resume)
    lines: list[str] = []
    resumed, history = train(config, small, progress=False, log=lines.append, resume=resume)
    assert lines[0] == f"resuming from {resume} after epoch 1/2"
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert not resume.exists()  # a finished run removes its resume file
    assert model_fingerprint(resumed) == model_fingerprint(whole)
