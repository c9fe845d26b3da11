"""The pruning-aware fine-tune: a fixed channel order, and `edgeprune train --from pretrained` on a tiny fixture."""

from __future__ import annotations

import torch

from shared.model import TrapNet, TrapNetConfig, randomise_bn
from shared.pruning import PrunableSlice, fix_channel_order, keep_masks, pruning_groups
from tests.test_pruning import run_pipeline, zeroed_copy

SIZE = 32


def small_model() -> TrapNet:
    torch.manual_seed(0)
    model = TrapNet(TrapNetConfig(width=8, blocks_per_stage=(1, 1), input_size=SIZE))
    randomise_bn(model, 0)
    return model.eval()


def named_masks(model, ratio):
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: mask for m, mask in keep_masks(pruning_groups(model, SIZE), [ratio] * model.n_blocks).items()}


def test_a_fixed_channel_order_holds_whatever_the_weights_become():
    """Training moves the weights; the channels a node cuts stay the ones training masked."""
    model = small_model()
    fix_channel_order(model, SIZE)
    before = named_masks(model, 0.5)
    with torch.no_grad():  # what a fine-tune does to the L1 ranking: reshuffle it
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                m.weight.mul_(torch.rand_like(m.weight) * 4)
    after = named_masks(model, 0.5)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.channel_scores = {}
    assert any(not torch.equal(before[k], v) for k, v in named_masks(model, 0.5).items())  # L1 would move them
    fix_channel_order(model, SIZE)
    shuffled = {id(v): torch.rand_like(v) for v in model.channel_scores.values()}  # one per group, not L1 at all
    model.channel_scores = {k: shuffled[id(v)] for k, v in model.channel_scores.items()}
    slices = [PrunableSlice(model, a, b, ladder=(0.5,), input_size=SIZE, bn_tables={}) for a, b in ((0, 1), (2, 3))]
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = zeroed_copy(model, pruning_groups(model, SIZE), [0.5] * model.n_blocks)(x)
    torch.testing.assert_close(run_pipeline(slices, [0.5, 0.5], x), expected, atol=1e-4, rtol=1e-3)


def test_a_pretrained_lite0_fine_tunes_for_pruning_and_ships_its_order(tmp_path):
    """One sandwich step from the ImageNet weights on generated images: a new 2-class head, the ImageNet
    features kept, the channel order fixed from the pretrained weights and shipped with per-ratio tables."""
    import numpy as np

    from edgeprune.dataset import FrameSplit
    from edgeprune.training import calibrate_all_bn_tables, regime_config, save_checkpoint, train
    from shared import lite0
    from shared.model import build_model

    rng = np.random.default_rng(0)
    split = FrameSplit(rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8), np.array([0, 1, 0, 1]),
                       np.zeros(4, bool))
    model_config = TrapNetConfig(width=lite0.STEM_WIDTH, blocks_per_stage=lite0.BLOCKS_PER_STAGE,
                                 arch=lite0.ARCH, class_names=("fox", "hare"), input_size=SIZE,
                                 mean=lite0.MEAN, std=lite0.STD)
    config = regime_config("ours", init="pretrained", epochs=1, batch_size=4, ladder=(0.0, 0.5),
                           calibration_frames=4, model=model_config)
    assert config.sandwich_every == 1 and config.warmup_epochs == 0 and config.lr < 0.05
    model, history = train(config, {"train": split, "val": split}, progress=False, log=lambda _: None,
                           resume=tmp_path / "run.resume")
    assert len(history["epochs"]) == 1 and not (tmp_path / "run.resume").exists()
    imagenet = lite0.imagenet_model()
    stem, trained_stem = imagenet.blocks[0][0].weight, model.blocks[0][0].weight
    assert not torch.equal(stem, trained_stem)  # it trained ...
    assert torch.corrcoef(torch.stack([stem.flatten(), trained_stem.flatten()]))[0, 1] > 0.99  # ... from ImageNet
    assert model.blocks[-1].fc.out_features == 2
    fix_channel_order(imagenet, SIZE)
    assert model.channel_scores.keys() == imagenet.channel_scores.keys()
    assert all(torch.equal(model.channel_scores[k], v) for k, v in imagenet.channel_scores.items())
    tables, entry = calibrate_all_bn_tables(model, split, config, log=lambda _: None)
    save_checkpoint(tmp_path / "own.pt", model, config, tables, {}, entry)
    loaded = build_model(tmp_path / "own.pt")
    assert set(loaded.bn_tables) == {"0.50"} and loaded.config.class_names == ("fox", "hare")
    assert all(torch.equal(loaded.channel_scores[k], v) for k, v in model.channel_scores.items())


def test_bench_agreement_counts_top1_and_top5_against_the_unpruned_model():
    """One generated photo, four views: at p = 0 the pipeline agrees with itself; a pruned ratio gets both figures."""
    from edgeprune.bench.agreement import raw_agreement
    from shared.imaging import encode_jpeg, textured_scene

    raw, _ = raw_agreement({"scene": encode_jpeg(textured_scene(320, 240))}, [(0, 3), (4, 7)], (0.0, 0.5))
    assert raw["images"] == 4 and set(raw["ratios"]) == {"0", "0.5"}
    assert raw["ratios"]["0"] == {"top1": 1.0, "top5": 1.0}
    assert 0 <= raw["ratios"]["0.5"]["top1"] <= raw["ratios"]["0.5"]["top5"] <= 1
