"""Run-time slice pruning on a node: real Torch-Pruning surgery, pre-built variants, instant switch.

A node keeps its full slice and one pruned copy per ratio of a ladder, each made by
Torch-Pruning from a deepcopy (the master is never touched). Changing the ratio swaps a
reference between requests, so pruning and restoring cost about a microsecond.

Channel ranking. Every layer of a slice keeps ``int(C * (1 - p))`` of its channels, ranked by
L1 magnitude summed over the layers that *produce* a dependency group's channels (conv
out-weights and BatchNorm scales; :class:`ProducerL1Importance`). Torch-Pruning's stock
``MagnitudeImportance`` would also sum the consumers' in-weights, and which consumers a slice
contains depends on where the next cut falls, so the same channel would rank differently
under different placements. Counting producers only (which never cross a block boundary)
makes the kept channels a function of the block's weights and ratio alone: one set of masks,
trained once, and one BatchNorm table per ratio serve every placement and every
per-slice mix of ratios.

The same ranking is computed without Torch-Pruning by :func:`keep_masks` for training, where
:func:`masked` zeroes pruned channels right after their BatchNorm: a masked full model then
equals the pruned slices with zero-filled boundaries (tested to float tolerance).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from shared.model import INPUT_SIZE, BlockNet

log = logging.getLogger(__name__)

DEFAULT_LADDER: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))
# BN tables: {ratio_key(p): {BatchNorm name in the full model: {"mean": tensor, "var": tensor}}}
BnTables = Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]

_PRODUCER_FNS = (tp.prune_conv_out_channels, tp.prune_batchnorm_out_channels)


def ratio_key(ratio: float) -> str:
    """Checkpoint key of a ladder ratio ("0.30"): floats are poor dict keys."""
    return f"{ratio:.2f}"


def kept_channels(n: int, ratio: float) -> int:
    """How many of ``n`` channels survive ``ratio``: Torch-Pruning's own ``int(n * (1 - p))``.

    A layer left with no channel would cut the network, so that ratio is refused for it.
    """
    kept = int(n * (1 - ratio))
    if kept < 1:
        raise ValueError(f"ratio {ratio} leaves none of {n} channels: too high for this model width")
    return kept


class ProducerL1Importance(tp.importance.MagnitudeImportance):
    """L1 magnitude (p=1, mean over layers, mean-normalised) over a group's producing layers only.

    See the module docstring for why consumers' in-weights are left out.
    """

    def __init__(self) -> None:
        super().__init__(p=1, group_reduction="mean", normalizer="mean")

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        scores, root_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in _PRODUCER_FNS:
                continue
            scores.append(_channel_l1(dep.layer)[idxs])
            root_idxs.append(group[i].root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, root_idxs), self.normalizer)


def _channel_l1(layer: nn.Module) -> torch.Tensor:
    """Per-output-channel L1 of a conv's weights or a BatchNorm's scales."""
    w = layer.weight.detach()
    return w.abs().flatten(1).sum(1) if w.dim() > 1 else w.abs()


@dataclass(frozen=True)
class PruningGroup:
    """Channels Torch-Pruning removes together: the producing layers (in its order) and their block."""

    block: int
    producers: tuple[nn.Module, ...]   # convs (out-channels) and BatchNorms
    norms: tuple[nn.BatchNorm2d, ...]  # where a masked model zeroes the pruned channels

    @property
    def channels(self) -> int:
        return self.norms[0].num_features

    def importance(self) -> torch.Tensor:
        """Same numbers as :class:`ProducerL1Importance` on this group."""
        total = torch.zeros(self.channels)
        for layer in self.producers:
            total += _channel_l1(layer)
        total /= len(self.producers)
        return total / total.mean()

    def keep_mask(self, ratio: float) -> torch.Tensor:
        """Bool per channel, exactly the channels Torch-Pruning keeps at ``ratio``."""
        keep = torch.ones(self.channels, dtype=torch.bool)
        n_pruned = self.channels - kept_channels(self.channels, ratio)
        if n_pruned > 0:
            keep[torch.topk(self.importance(), k=n_pruned, largest=False).indices] = False
        return keep


def example_input(model: BlockNet, first_block: int, input_size: int = INPUT_SIZE) -> torch.Tensor:
    """A batch-1 input of the right shape for blocks ``first_block..``."""
    with torch.no_grad():
        return model.run_blocks(torch.zeros(1, 3, input_size, input_size), 0, first_block - 1)


def pruning_groups(model: BlockNet, input_size: int = INPUT_SIZE) -> list[PruningGroup]:
    """Torch-Pruning's dependency groups of the whole model, reduced to their producers.

    Producers never span two blocks, so these are also the groups of any slice.
    """
    head_layers = _head_layers(model)
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input(model, 0, input_size))
    block_of = {m: i for i, block in enumerate(model.blocks) for m in block.modules()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=head_layers, root_module_types=[nn.Conv2d, nn.Linear]):
        producers = tuple(dep.layer for dep, _ in group if dep.pruning_fn in _PRODUCER_FNS)
        norms = tuple(m for m in producers if isinstance(m, nn.BatchNorm2d))
        if not norms:
            continue
        blocks = {block_of[m] for m in producers}
        if len(blocks) != 1:
            raise ValueError(f"a channel group spans blocks {sorted(blocks)}: cut points must be stage boundaries")
        groups.append(PruningGroup(blocks.pop(), producers, norms))
    return groups


def _head_layers(module: nn.Module) -> list[nn.Module]:
    """The classifier layers, never pruned (their outputs are the class logits)."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def keep_masks(groups: Sequence[PruningGroup], block_ratios: Sequence[float]) -> dict[nn.BatchNorm2d, torch.Tensor]:
    """Keep mask for every BatchNorm whose channels are pruned, given each block's ratio."""
    masks = {}
    for group in groups:
        ratio = block_ratios[group.block]
        if kept_channels(group.channels, ratio) < group.channels:
            keep = group.keep_mask(ratio)
            masks.update({norm: keep for norm in group.norms})
    return masks


@contextmanager
def masked(masks: Mapping[nn.BatchNorm2d, torch.Tensor]) -> Iterator[None]:
    """Zero pruned channels right after their BatchNorm: the full model then computes what the pruned one does."""
    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return output * masks[module].to(output.dtype).view(1, -1, 1, 1)

    handles = [norm.register_forward_hook(hook) for norm in masks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def bn_table_for(tables: BnTables | None, ratio: float) -> Mapping[str, Mapping[str, torch.Tensor]]:
    """The per-ratio BatchNorm statistics for ``ratio`` (empty when the checkpoint has none).

    A model trained to rely on its tables loses most of its accuracy without them, so a ratio
    the tables do not cover is logged rather than passed over in silence.
    """
    if not tables:
        return {}
    table = tables.get(ratio_key(ratio))
    if table is None:
        log.warning("no BatchNorm table for ratio %s (tables cover %s): this variant keeps the full "
                    "model's statistics and may lose accuracy", ratio, ", ".join(sorted(tables)))
        return {}
    return table


@dataclass
class PrunedSlice:
    module: nn.Module
    keep_mask: np.ndarray | None  # over the slice's full output channels; None = all kept / logits


def prune_slice(model: BlockNet, first_block: int, last_block: int, ratio: float,
                bn_table: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                input_size: int = INPUT_SIZE) -> PrunedSlice:
    """Torch-Pruning surgery on a deepcopy of blocks ``first..last`` at one uniform ``ratio``.

    ``bn_table`` (BatchNorm name in the full model -> running mean/var calibrated for this ratio)
    is loaded into the copy before surgery, which then slices it along with the channels.
    The slice's input channels have no producer inside it, so they are never pruned.
    """
    sliced = copy.deepcopy(model.slice(first_block, last_block)).eval()
    copies = dict(sliced.named_modules())  # same names as in model.slice(...): "<block offset>.<path>"
    for name, norm in copies.items():
        if isinstance(norm, nn.BatchNorm2d):
            kept_channels(norm.num_features, ratio)  # refuse a ratio that would empty a layer
            offset, path = name.split(".", 1)
            stats = (bn_table or {}).get(f"blocks.{first_block + int(offset)}.{path}")
            if stats is not None:
                norm.running_mean.copy_(stats["mean"])
                norm.running_var.copy_(stats["var"])
    output_norm = model.output_norm(last_block)
    output_copy = next((copies[name] for name, m in model.slice(first_block, last_block).named_modules()
                        if m is output_norm), None)
    full_out = output_norm.num_features if output_norm is not None else 0

    # Torch-Pruning silently prunes nothing without autograd or with frozen parameters.
    sliced.requires_grad_(True)
    pruned_out: list[int] = []
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(sliced, example_input(model, first_block, input_size),
                                      importance=ProducerL1Importance(), pruning_ratio=ratio,
                                      ignored_layers=_head_layers(sliced))
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                if dep.layer is output_copy and dep.pruning_fn == tp.prune_batchnorm_out_channels:
                    pruned_out = list(idxs)
            group.prune()
    sliced.requires_grad_(False)
    keep = None
    if pruned_out:
        keep = np.ones(full_out, dtype=bool)
        keep[pruned_out] = False
    return PrunedSlice(sliced, keep)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class PrunableSlice:
    """A node's slice with every ratio of a ladder ready to swap in.

    ``bn_tables=None`` uses the tables the model was loaded with (``model.bn_tables``, set by
    :func:`shared.model.build_model` from the checkpoint); pass ``{}`` to prune without them.
    ``build="eager"`` makes every variant now (a few hundred ms); ``"lazy"`` makes them in a
    background thread, and a ``set_ratio`` that gets ahead of it builds its variant on the spot.
    """

    def __init__(self, model: BlockNet, first_block: int, last_block: int,
                 ladder: Sequence[float] = DEFAULT_LADDER, bn_tables: BnTables | None = None,
                 build: str = "eager", input_size: int = INPUT_SIZE):
        if build not in ("eager", "lazy"):
            raise ValueError(f"build must be 'eager' or 'lazy', not {build!r}")
        ladder = tuple(sorted({round(float(r), 6) for r in ladder} | {0.0}))
        if ladder[0] < 0 or ladder[-1] >= 1:
            raise ValueError(f"ladder ratios must lie in [0, 1): {ladder}")
        self.model = model
        self.first_block, self.last_block = first_block, last_block
        self.ladder = ladder
        self.input_size = input_size
        self.bn_tables = getattr(model, "bn_tables", None) if bn_tables is None else bn_tables
        full = model.slice(first_block, last_block).eval()
        self._variants: dict[float, PrunedSlice] = {0.0: PrunedSlice(full, None)}
        self._lock = threading.Lock()
        self._current = self._variants[0.0]
        self.ratio = 0.0
        self._builder: threading.Thread | None = None
        if build == "eager":
            for ratio in ladder[1:]:
                self._variant(ratio)
        else:
            self._builder = threading.Thread(target=self._build_all, name="prune-variants", daemon=True)
            self._builder.start()

    def _build_all(self) -> None:
        for ratio in self.ladder[1:]:
            self._variant(ratio)

    def _variant(self, ratio: float) -> PrunedSlice:
        with self._lock:
            variant = self._variants.get(ratio)
            if variant is None:
                variant = prune_slice(self.model, self.first_block, self.last_block, ratio,
                                      bn_table_for(self.bn_tables, ratio), self.input_size)
                self._variants[ratio] = variant
            return variant

    def snap(self, ratio: float) -> float:
        """The ladder ratio nearest ``ratio``; ValueError outside [0, 1)."""
        if not 0 <= ratio < 1:
            raise ValueError(f"pruning ratio {ratio} outside [0, 1)")
        return min(self.ladder, key=lambda r: abs(r - ratio))

    def set_ratio(self, ratio: float) -> float:
        """Switch to the variant nearest ``ratio`` (restoring is the same swap); return the seconds it took."""
        t0 = time.perf_counter()
        snapped = self.snap(ratio)
        variant = self._variants.get(snapped) or self._variant(snapped)
        self._current = variant
        self.ratio = snapped
        return time.perf_counter() - t0

    def wait_built(self, timeout: float | None = None) -> bool:
        """True once every variant exists (always, for eager builds)."""
        if self._builder is not None:
            self._builder.join(timeout)
        return len(self._variants) == len(self.ladder)

    def module(self, ratio: float | None = None) -> nn.Module:
        """The module that runs at ``ratio`` (default: the current one)."""
        return self._current.module if ratio is None else self._variant(self.snap(ratio)).module

    def keep_mask(self, ratio: float | None = None) -> np.ndarray | None:
        return self._current.keep_mask if ratio is None else self._variant(self.snap(ratio)).keep_mask

    def forward(self, x_full: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """Run the current variant on the full-width input: (output of kept channels, keep mask or None)."""
        variant = self._current  # one read, so a concurrent set_ratio never splits a request
        with torch.inference_mode():
            return variant.module(x_full), variant.keep_mask

    def memory_bytes(self) -> int:
        """Parameters and buffers of every variant built so far, the full slice included."""
        with self._lock:
            return sum(module_bytes(v.module) for v in self._variants.values())


def pipeline_predictions(stages: Sequence[PrunableSlice], ratios: Sequence[float], inputs: torch.Tensor,
                         batch: int = 250) -> np.ndarray:
    """Class predictions of the pruned pipeline, zero-filling pruned channels between slices like a node."""
    for stage, ratio in zip(stages, ratios):
        stage.set_ratio(ratio)
    preds = []
    for start in range(0, len(inputs), batch):
        x = inputs[start:start + batch]
        for stage in stages:
            out, keep = stage.forward(x)
            if keep is not None:
                full = torch.zeros(out.shape[0], keep.size, *out.shape[2:])
                full[:, torch.from_numpy(keep)] = out
                out = full
            x = out
        preds.append(x.argmax(1).numpy())
    return np.concatenate(preds)
