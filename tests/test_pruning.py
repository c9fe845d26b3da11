"""Slice pruning: real Torch-Pruning surgery must equal the masked model the training regime sees."""

from __future__ import annotations

import copy
import functools
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from shared import wire
from shared.model import TrapNetConfig, make_model, model_fingerprint, randomise_bn
from shared.pruning import (
    DEFAULT_LADDER,
    PrunableSlice,
    example_input,
    keep_masks,
    masked,
    prune_slice,
    pruning_groups,
    ratio_key,
)

SIZE = 28
SLICES = ((0, 1), (2, 3), (4, 5))


ARCHS = ["resnet", "vgg"]
# Every ladder ratio on the deployed architecture; a spot check on the second one keeps the suite fast.
LADDERS = {"resnet": DEFAULT_LADDER, "vgg": (0.0, 0.3, 0.5, 0.9)}


@functools.cache
def built(arch: str):
    """A seeded tiny model, its groups, and its slices with every ladder variant built (as at start-up)."""
    torch.manual_seed(3)
    net = make_model(TrapNetConfig(width=16, arch=arch))
    randomise_bn(net, 3)
    net.eval()
    stages = [PrunableSlice(net, a, b, ladder=LADDERS[arch], bn_tables={}, input_size=SIZE) for a, b in SLICES]
    return net, pruning_groups(net, SIZE), stages


@pytest.fixture(params=ARCHS)
def model(request):
    return built(request.param)[0]


@pytest.fixture
def groups(model):
    return built(model.config.arch)[1]


@pytest.fixture
def slices(model):
    return built(model.config.arch)[2]


def block_ratios(model, slice_ratios):
    ratios = [0.0] * model.n_blocks
    for (first, last), r in zip(SLICES, slice_ratios):
        ratios[first:last + 1] = [r] * (last - first + 1)
    return ratios


def zeroed_copy(model, groups, ratios):
    """The full model with pruned channels' conv out-weights AND BatchNorm weight and bias set to zero."""
    reference = copy.deepcopy(model)
    by_name = dict(model.named_modules())
    names = {m: n for n, m in by_name.items()}
    ref_modules = dict(reference.named_modules())
    for group in groups:
        ratio = ratios[group.block]
        if ratio == 0:
            continue
        pruned = ~group.keep_mask(ratio)
        for layer in group.producers:
            target = ref_modules[names[layer]]
            target.weight.data[pruned] = 0
            if isinstance(target, nn.BatchNorm2d):
                target.bias.data[pruned] = 0
    return reference


def run_pipeline(slices, slice_ratios, x):
    """Run the slices in order through the real wire format, zero-filling pruned channels at each receiver."""
    mask = None
    for stage, ratio in zip(slices, slice_ratios):
        stage.set_ratio(ratio)
        out, keep = stage.forward(x, mask)
        act = wire.decode(wire.encode(wire.Activation("r", "cam", 1.0, stage.last_block + 1, out.numpy(), keep)))
        x, mask = torch.from_numpy(act.full_tensor().copy()), act.keep_mask
    return x


def inputs(n=4):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


MIXED = {"resnet": [(0.5, 0.1, 0.9), (0.9, 0.0, 0.3), (0.2, 0.7, 0.0), (0.0, 0.4, 0.6)],
         "vgg": [(0.5, 0.0, 0.9), (0.9, 0.3, 0.5)]}
PIPELINE_CASES = [pytest.param(arch, ratios, id=f"{arch}-{ratios}") for arch in ARCHS
                  for ratios in [(r, r, r) for r in LADDERS[arch]] + MIXED[arch]]


@pytest.mark.parametrize("arch,slice_ratios", PIPELINE_CASES)
def test_pruned_pipeline_equals_masked_full_model(arch, slice_ratios):
    """For every ladder ratio and mixed per-slice ratios, pruned slices + zero-fill == masked model."""
    model, groups, slices = built(arch)
    x = inputs()
    with torch.no_grad():
        expected = zeroed_copy(model, groups, block_ratios(model, slice_ratios))(x)
    got = run_pipeline(slices, slice_ratios, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_zeroing_conv_weights_alone_is_not_enough(model, groups, slices):
    """The check above is sharp: leaving the BatchNorm bias leaks into the pruned channels."""
    ratios = block_ratios(model, (0.5, 0.5, 0.5))
    leaky = copy.deepcopy(model)
    names = {m: n for n, m in model.named_modules()}
    mods = dict(leaky.named_modules())
    for group in groups:
        pruned = ~group.keep_mask(ratios[group.block])
        for layer in group.producers:
            if isinstance(layer, nn.Conv2d):
                mods[names[layer]].weight.data[pruned] = 0
    x = inputs()
    with torch.no_grad():
        assert (leaky(x) - run_pipeline(slices, (0.5, 0.5, 0.5), x)).abs().max() > 1e-3


@pytest.mark.parametrize("slice_ratios", [(0.3, 0.3, 0.3), (0.6, 0.2, 0.8)])
def test_training_masks_equal_zeroed_weights(model, groups, slice_ratios):
    """The masking hooks used in training compute what the zeroed (so: the pruned) model computes."""
    ratios = block_ratios(model, slice_ratios)
    x = inputs()
    with torch.no_grad(), masked(keep_masks(groups, ratios)):
        hooked = model(x)
    with torch.no_grad():
        torch.testing.assert_close(hooked, zeroed_copy(model, groups, ratios)(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_masks_equal_torch_pruning_surgery(model, groups, slices, ratio):
    """Every BatchNorm Torch-Pruning keeps holds exactly the channels keep_masks predicts."""
    masks = keep_masks(groups, [ratio] * model.n_blocks)
    names = {m: n for n, m in model.named_modules()}
    for (first, last), stage in zip(SLICES, slices):
        pruned = stage.module(ratio)
        pruned_norms = {f"blocks.{first + int(n.split('.', 1)[0])}.{n.split('.', 1)[1]}": m
                        for n, m in pruned.named_modules() if isinstance(m, nn.BatchNorm2d)}
        for norm, keep in masks.items():
            name = names[norm]
            if name in pruned_norms:
                assert pruned_norms[name].num_features == int(keep.sum())
                torch.testing.assert_close(pruned_norms[name].weight, norm.weight[keep], rtol=0, atol=0)


def test_channel_sets_are_nested_across_ratios(groups):
    for group in groups:
        kept = [group.keep_mask(r) for r in DEFAULT_LADDER]
        for wider, narrower in itertools.pairwise(kept):
            assert not (narrower & ~wider).any()
            assert narrower.sum() < wider.sum() or narrower.sum() == 1


def test_masks_do_not_depend_on_where_the_slice_is_cut(model):
    """Block 1's output channels are the same whether block 1 ends a slice or sits alone."""
    alone = prune_slice(model, 1, 1, 0.4, input_size=SIZE)
    with_stem = prune_slice(model, 0, 1, 0.4, input_size=SIZE)
    np.testing.assert_array_equal(alone.keep_mask, with_stem.keep_mask)


def test_switching_and_restoring_returns_the_same_outputs(model, slices):
    stage = slices[1]
    x = torch.randn(2, *prune_slice(model, 0, 1, 0.0, input_size=SIZE).module(inputs(2)).shape[1:])
    stage.set_ratio(0.0)
    full, full_keep = stage.forward(x)
    stage.set_ratio(0.3)
    at_03, keep_03 = stage.forward(x)
    assert at_03.shape[1] < full.shape[1] and keep_03 is not None and full_keep is None
    for ratio in (0.9, 0.3):  # how fast a switch is: `edgeprune bench pruning` (switch_median_us)
        stage.set_ratio(ratio)
        assert stage.ratio == ratio and stage.module() is stage.module(ratio) is not stage.module(0.0)
    torch.testing.assert_close(stage.forward(x)[0], at_03, rtol=0, atol=0)
    stage.set_ratio(0.0)
    torch.testing.assert_close(stage.forward(x)[0], full, rtol=0, atol=0)


def test_master_weights_are_never_pruned(model):
    before = model_fingerprint(model)
    PrunableSlice(model, 2, 3, ladder=(0.5, 0.9), bn_tables={}, input_size=SIZE)
    assert model_fingerprint(model) == before
    assert all(p.requires_grad for p in model.parameters())


def test_last_slice_returns_logits_without_mask(slices):
    last = slices[-1]
    last.set_ratio(0.5)
    out, keep = last.forward(torch.randn(1, *_stage_input_shape(slices, 2)))
    assert keep is None and out.shape == (1, 10)


def _stage_input_shape(slices, index):
    x = inputs(1)
    for stage in slices[:index]:
        stage.set_ratio(0.0)
        x = stage.forward(x)[0]
    return x.shape[1:]


def test_ratio_snaps_to_the_ladder_and_rejects_nonsense(slices):
    stage = slices[0]
    stage.set_ratio(0.34)
    assert stage.ratio == 0.3
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError):
            stage.set_ratio(bad)


def test_a_ratio_that_empties_a_layer_is_refused():
    narrow = make_model(TrapNetConfig(width=4)).eval()
    with pytest.raises(ValueError, match="leaves none"):
        PrunableSlice(narrow, 0, 1, ladder=(0.9,), bn_tables={}, input_size=SIZE)


def test_training_refuses_a_width_the_ladder_would_empty():
    """The nodes build every rung of the ladder (up to 0.9): 10 channels keep int(10 * 0.1) = 0, 11 keep 1."""
    from edgeprune.cli import main
    from shared.pruning import kept_channels, narrowest_prunable

    assert narrowest_prunable(0.9) == 11 and kept_channels(11, 0.9) == 1
    with pytest.raises(SystemExit, match="--width 10 is too narrow.*--width 11"):
        main(["train", "--width", "10", "--epochs", "1", "--out", "never-written.pt"])


def test_kept_channels_round_to_the_nearest_multiple():
    """Rounding down made Lite0's p = 0.1 halve its 16-channel stem output (14 -> 8): nearest keeps all 16."""
    from shared.pruning import kept_channels

    assert kept_channels(16, 0.1, 8) == 16   # 14 -> 16
    assert kept_channels(24, 0.1, 8) == 24   # 21 -> 24
    assert kept_channels(24, 0.3, 8) == 16   # 16 stays
    assert kept_channels(144, 0.1, 8) == 128  # 129 -> 128
    assert kept_channels(40, 0.3, 8) == 32   # 28, a tie, rounds up
    assert kept_channels(16, 0.5, 8) == 8 and kept_channels(16, 0.7, 8) == 8  # never below one multiple
    assert kept_channels(22, 0.04, 8) == 22  # 21 -> 24, capped at the layer's 22
    assert kept_channels(10, 0.3) == 7       # no multiple: Torch-Pruning's int(C * (1 - p))


def test_lazy_build_finishes_in_the_background_and_serves_early_switches(model):
    stage = PrunableSlice(model, 0, 1, ladder=(0.2, 0.5, 0.8), bn_tables={}, build="lazy", input_size=SIZE)
    stage.set_ratio(0.8)  # may run before the builder got there: built on the spot
    assert stage.ratio == 0.8 and stage.forward(inputs(1))[1] is not None
    assert stage.wait_built(timeout=30)
    eager = PrunableSlice(model, 0, 1, ladder=(0.2, 0.5, 0.8), bn_tables={}, input_size=SIZE)
    assert stage.memory_bytes() == eager.memory_bytes() > PrunableSlice(
        model, 0, 1, ladder=(0.0,), bn_tables={}, input_size=SIZE).memory_bytes()


def random_stats(model, prefix, seed):
    gen = torch.Generator().manual_seed(seed)
    return {name: {"mean": torch.randn(m.num_features, generator=gen),
                   "var": torch.rand(m.num_features, generator=gen) + 0.5}
            for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and name.startswith(prefix)}


def with_stats(model, table):
    reference = copy.deepcopy(model)
    for name, m in reference.named_modules():
        if name in table:
            m.running_mean.copy_(table[name]["mean"])
            m.running_var.copy_(table[name]["var"])
    return reference


def test_bn_tables_are_loaded_into_each_variant(model, groups):
    """A variant runs with its ratio's table: equal to the masked full model carrying those statistics."""
    ratio = 0.4
    table = random_stats(model, "", seed=5)
    stage = PrunableSlice(model, 0, 1, ladder=(ratio,), bn_tables={ratio_key(ratio): table}, input_size=SIZE)
    plain = PrunableSlice(model, 0, 1, ladder=(ratio,), bn_tables={}, input_size=SIZE)
    stage.set_ratio(ratio)
    plain.set_ratio(ratio)
    x = inputs()
    with_table, keep = stage.forward(x)
    assert not torch.allclose(with_table, plain.forward(x)[0])

    reference = with_stats(model, table)
    ratios = [ratio, ratio] + [0.0] * (model.n_blocks - 2)
    with torch.no_grad():
        expected = zeroed_copy(reference, pruning_groups(reference, SIZE), ratios).run_blocks(x, 0, 1)
    torch.testing.assert_close(with_table, expected[:, torch.from_numpy(keep)], atol=2e-5, rtol=1e-4)


def test_tables_default_to_the_ones_the_model_was_loaded_with(model):
    ratio = 0.5
    loaded = copy.deepcopy(model)
    stem_norm = loaded.get_submodule("blocks.0.1")
    loaded.bn_tables = {ratio_key(ratio): {"blocks.0.1": {"mean": stem_norm.running_mean + 1.0,
                                                          "var": stem_norm.running_var}}}
    stage = PrunableSlice(loaded, 0, 1, ladder=(ratio,), input_size=SIZE)
    keep = keep_masks(pruning_groups(loaded, SIZE), [ratio] * loaded.n_blocks)[stem_norm]
    torch.testing.assert_close(stage.module(ratio).get_submodule("0.1").running_mean,
                               (stem_norm.running_mean + 1.0)[keep])


def test_a_ratio_without_a_table_is_reported(model, caplog):
    loaded = copy.deepcopy(model)
    loaded.bn_tables = {ratio_key(0.5): {}}
    with caplog.at_level("WARNING", logger="shared.pruning"):
        PrunableSlice(loaded, 0, 1, ladder=(0.5, 0.25), input_size=SIZE)
    assert [r for r in caplog.records if "no BatchNorm table for ratio 0.25" in r.getMessage()]
    assert not [r for r in caplog.records if "ratio 0.5 " in r.getMessage()]


def test_entry_statistics_follow_the_upstream_ratio_read_off_the_keep_mask(model, caplog):
    """Behind an upstream at 0.9 the entry block runs its (0.5, 0.9) table; behind an unpruned one, its own."""
    own, upstream = 0.5, 0.9
    table = random_stats(model, "blocks.2.", seed=7)
    before = model_fingerprint(model)
    first = PrunableSlice(model, 0, 1, ladder=(upstream,), bn_tables={}, input_size=SIZE)
    second = PrunableSlice(model, 2, 3, ladder=(own,), bn_tables={}, input_size=SIZE,
                           entry_tables={ratio_key(own): {ratio_key(upstream): table}})
    x = inputs()
    got = run_pipeline([first, second], [upstream, own], x)
    groups = pruning_groups(model, SIZE)
    ratios = [upstream, upstream, own, own] + [0.0] * (model.n_blocks - 4)
    with torch.no_grad():
        reference = with_stats(model, table)
        expected = zeroed_copy(reference, pruning_groups(reference, SIZE), ratios).run_blocks(x, 0, 3)
    keep = torch.from_numpy(second.keep_mask())
    torch.testing.assert_close(got, expected * keep.view(1, -1, 1, 1).float(), atol=2e-5, rtol=1e-4)

    # An unpruned upstream (no mask) has no table here: the variant's own statistics come back.
    got = run_pipeline([first, second], [0.0, own], x)
    with torch.no_grad():
        expected = zeroed_copy(model, groups, [0.0, 0.0, own, own] + [0.0] * (model.n_blocks - 4)).run_blocks(x, 0, 3)
    torch.testing.assert_close(got, expected * keep.view(1, -1, 1, 1).float(), atol=2e-5, rtol=1e-4)
    assert model_fingerprint(model) == before  # the master's statistics are never touched

    # A mask that matches no upstream ratio of the ladder is reported once and served with the own statistics.
    odd = np.zeros(first.keep_mask(upstream).size, dtype=bool)
    odd[:3] = True
    with caplog.at_level("WARNING", logger="shared.pruning"):
        assert second.upstream_ratio(odd) is None and second.upstream_ratio(odd) is None
    assert len([r for r in caplog.records if "matches no upstream ladder ratio" in r.getMessage()]) == 1


def test_entry_tables_default_to_the_ones_the_model_was_loaded_with(model):
    loaded = copy.deepcopy(model)
    table = random_stats(loaded, "blocks.4.", seed=8)
    loaded.entry_bn_tables = {ratio_key(0.0): {ratio_key(0.5): table}}
    stage = PrunableSlice(loaded, 4, 5, ladder=(0.5,), bn_tables={}, input_size=SIZE)
    mask = keep_masks(pruning_groups(loaded, SIZE), [0.5] * loaded.n_blocks)[loaded.output_norm(3)].numpy()
    assert stage.upstream_ratio(mask) == 0.5
    x = example_input(loaded, 4, SIZE).repeat(2, 1, 1, 1)
    stage.forward(x, mask)
    name = next(iter(table))
    torch.testing.assert_close(stage.module(0.0).get_submodule("0." + name.split(".", 2)[2]).running_mean,
                               table[name]["mean"])
    assert PrunableSlice(loaded, 0, 1, ladder=(0.5,), bn_tables={}, input_size=SIZE).entry_tables == {}

