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
