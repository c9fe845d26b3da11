"""Run-time slice pruning on a node: real Torch-Pruning surgery, pre-built variants, instant switch.

A node keeps its full slice and one pruned copy per ratio of a ladder, each made by
Torch-Pruning from a deepcopy (the master is never touched). Changing the ratio swaps a
reference between requests, so pruning and restoring cost about a microsecond.

Channel ranking. Every layer of a slice keeps ``int(C * (1 - p))`` of its channels (rounded to the nearest
multiple of the model's ``channel_multiple``, never below one multiple: :func:`kept_channels`), ranked by
L1 magnitude summed over the layers that *produce* a dependency group's channels (conv
out-weights and BatchNorm scales; :class:`ProducerL1Importance`). Torch-Pruning's stock
``MagnitudeImportance`` would also sum the consumers' in-weights, and which consumers a slice
contains depends on where the next cut falls, so the same channel would rank differently
under different placements. Counting producers only (which never cross a block boundary)
makes the kept channels a function of the block's weights and ratio alone: one set of masks,
trained once, serves every placement and every per-slice mix of ratios. A model fine-tuned for
pruning from pretrained weights instead carries a fixed order (``model.channel_scores``, set by
:func:`fix_channel_order` before training and shipped in the checkpoint), which then ranks channels
everywhere below: training's masks and the node's surgery keep the same channels whatever the
weights became.

BatchNorm statistics. Each variant loads its ratio's table (calibrated with every block at
that ratio), and the block a slice starts with also holds statistics per *upstream* ratio
(entry tables), loaded in :meth:`PrunableSlice.forward` from the keep mask of the input: a
slice behind a harder-pruned one otherwise normalises with the wrong statistics.

The same ranking is computed without Torch-Pruning by :func:`keep_masks` for training, where
:func:`masked` zeroes pruned channels right after their BatchNorm: a masked full model then
equals the pruned slices with zero-filled boundaries (tested to float tolerance).
"""

from __future__ import annotations

import atexit
import copy
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from shared.ladder import DEFAULT_LADDER
from shared.model import INPUT_SIZE, BlockNet

log = logging.getLogger(__name__)

BnStats = Mapping[str, Mapping[str, torch.Tensor]]  # BatchNorm name in the full model -> {"mean": t, "var": t}
BnTables = Mapping[str, BnStats]  # ratio_key(p) -> statistics of the model pruned uniformly at p
# Entry tables: ratio_key(own p) -> ratio_key(upstream q) -> statistics of the BatchNorms of the
# block a slice starts with, when the slices before it run at q (edgeprune.training.calibrate_entry_bn_tables)
EntryTables = Mapping[str, Mapping[str, BnStats]]

_PRODUCER_FNS = (tp.prune_conv_out_channels, tp.prune_batchnorm_out_channels)


def ratio_key(ratio: float) -> str:
    """Checkpoint key of a ladder ratio ("0.30"): floats are poor dict keys."""
    return f"{ratio:.2f}"


def kept_channels(n: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``n`` channels survive ``ratio``: Torch-Pruning's own ``int(n * (1 - p))``, rounded.

    A layer left with no channel would cut the network, so that ratio is refused for it.
    """
    kept = int(n * (1 - ratio))
    if kept < 1:
        raise ValueError(f"ratio {ratio} leaves none of {n} channels: too high for this model width")
    return round_kept(kept, n, multiple)


def round_kept(kept: int, n: int, multiple: int) -> int:
    """``kept`` of ``n`` channels rounded to the nearest multiple of ``multiple`` (ties up), within [one multiple, n].

    CPU convolution kernels run channel counts that are multiples of their vector width much faster
    per MAC (docs/model.md): unrounded, EfficientNet-Lite0 at p = 0.1 ran *slower* than unpruned.
    Nearest, not down: rounding down made p = 0.1 halve Lite0's 16-channel stage 1 (14 -> 8) and cut a
    third of its 24-channel stage 2, so the mildest ratio was not mild. Torch-Pruning's ``round_to``
    rounds down, and to zero below one multiple; see :class:`_RoundingPruner`.
    """
    if multiple <= 1 or kept >= n:
        return kept
    nearest = (kept + multiple // 2) // multiple * multiple
    return min(max(nearest, multiple), n)


def narrowest_prunable(ratio: float) -> int:
    """The fewest channels a layer may have so that pruning it to ``ratio`` keeps one (see :func:`kept_channels`)."""
    return next(n for n in range(1, 1 << 16) if int(n * (1 - ratio)) >= 1)


class ProducerL1Importance(tp.importance.MagnitudeImportance):
    """L1 magnitude (p=1, mean over layers, mean-normalised) over a group's producing layers only.

    See the module docstring for why consumers' in-weights are left out. ``fixed`` (BatchNorm ->
    per-channel score, a model's fixed channel order) replaces the L1 of any group one of them is in.
    """

    def __init__(self, fixed: Mapping[nn.Module, torch.Tensor] | None = None) -> None:
        super().__init__(p=1, group_reduction="mean", normalizer="mean")
        self.fixed = dict(fixed or {})

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        scores, root_idxs = [], []
        has_fixed = any(dep.layer in self.fixed for dep, _ in group)
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in _PRODUCER_FNS or (has_fixed and dep.layer not in self.fixed):
                continue
            layer_scores = self.fixed[dep.layer] if has_fixed else _channel_l1(dep.layer)
            scores.append(layer_scores[idxs])
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
    multiple: int = 1                  # kept channels are a multiple of this (:func:`kept_channels`)
    scores: torch.Tensor | None = None  # the model's fixed channel order, if it has one

    @property
    def channels(self) -> int:
        return self.norms[0].num_features

    def importance(self) -> torch.Tensor:
        """Same ranking as :class:`ProducerL1Importance` on this group."""
        if self.scores is not None:
            return self.scores
        total = torch.zeros(self.channels)
        for layer in self.producers:
            total += _channel_l1(layer)
        total /= len(self.producers)
        return total / total.mean()

    def keep_mask(self, ratio: float) -> torch.Tensor:
        """Bool per channel, exactly the channels Torch-Pruning keeps at ``ratio``."""
        keep = torch.ones(self.channels, dtype=torch.bool)
        n_pruned = self.channels - kept_channels(self.channels, ratio, self.multiple)
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
    name_of = {m: name for name, m in model.named_modules()}
    fixed = getattr(model, "channel_scores", {})
    groups = []
    for group in graph.get_all_groups(ignored_layers=head_layers, root_module_types=[nn.Conv2d, nn.Linear]):
        producers = tuple(dep.layer for dep, _ in group if dep.pruning_fn in _PRODUCER_FNS)
        norms = tuple(m for m in producers if isinstance(m, nn.BatchNorm2d))
        if not norms:
            continue
        blocks = {block_of[m] for m in producers}
        if len(blocks) != 1:
            raise ValueError(f"a channel group spans blocks {sorted(blocks)}: cut points must be stage boundaries")
        groups.append(PruningGroup(blocks.pop(), producers, norms, model.channel_multiple,
                                   fixed.get(name_of[norms[0]])))
    return groups


def fix_channel_order(model: BlockNet, input_size: int = INPUT_SIZE) -> None:
    """Freeze today's L1 ranking as the model's channel order (``model.channel_scores``, by BatchNorm name).

    Called once before a pruning-aware fine-tune: the widths it trains then stay the widths a node cuts.
    """
    model.channel_scores = {}
    names = {m: name for name, m in model.named_modules()}
    for group in pruning_groups(model, input_size):
        scores = group.importance().clone()
        model.channel_scores.update({names[norm]: scores for norm in group.norms})


def _head_layers(module: nn.Module) -> list[nn.Module]:
    """The classifier layers, never pruned (their outputs are the class logits)."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def keep_masks(groups: Sequence[PruningGroup], block_ratios: Sequence[float]) -> dict[nn.BatchNorm2d, torch.Tensor]:
    """Keep mask for every BatchNorm whose channels are pruned, given each block's ratio."""
    masks = {}
    for group in groups:
        ratio = block_ratios[group.block]
        if kept_channels(group.channels, ratio, group.multiple) < group.channels:
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
    """One variant: the pruned module, its output keep mask, and its entry statistics per upstream ratio."""

    module: nn.Module
    keep_mask: np.ndarray | None  # over the slice's full output channels; None = all kept / logits
    ratio: float = 0.0
    # upstream ratio -> (BatchNorm of the entry block, running mean, running var), sliced to kept channels
    entry_stats: dict[float, list[tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    upstream: float | None = None  # the upstream ratio whose entry statistics are loaded now

    def condition_on(self, upstream: float | None) -> None:
        """Load the entry block's statistics for an upstream slice at ``upstream`` (a few µs, only on change).

        An upstream ratio the tables do not cover (or None) gets the variant's own statistics.
        """
        if upstream not in self.entry_stats:
            upstream = self.ratio
        if upstream == self.upstream:
            return
        for norm, mean, var in self.entry_stats[upstream]:
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
        self.upstream = upstream


def full_model_name(first_block: int, slice_name: str) -> str:
    """A module's name in the full model from its name in a slice starting at ``first_block``.

    ``model.slice(...)`` numbers its blocks from 0 ("<block offset>.<path>"), the model from the stem.
    """
    offset, path = slice_name.split(".", 1)
    return f"blocks.{first_block + int(offset)}.{path}"


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
    fixed = {}
    for name, norm in copies.items():
        if isinstance(norm, nn.BatchNorm2d):
            kept_channels(norm.num_features, ratio)  # refuse a ratio that would empty a layer
            scores = model.channel_scores.get(full_model_name(first_block, name))
            if scores is not None:
                fixed[norm] = scores
            stats = (bn_table or {}).get(full_model_name(first_block, name))
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
        pruner = _RoundingPruner(sliced, example_input(model, first_block, input_size),
                                 importance=ProducerL1Importance(fixed), pruning_ratio=ratio,
                                 ignored_layers=_head_layers(sliced),
                                 round_to=model.channel_multiple if model.channel_multiple > 1 else None)
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
    return PrunedSlice(sliced, keep, ratio)


class _RoundingPruner(tp.pruner.BasePruner):
    """Torch-Pruning with :func:`round_kept`'s rounding: theirs would drop a group below one multiple."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        return current_channels - round_kept(current_channels - n_pruned, current_channels, round_to)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# Background builders still inside torch when the interpreter exits abort the process
# ("terminate called without an active exception"), so at exit they stop after their current variant.
_shutting_down = threading.Event()
_builders: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
# One surgery at a time in a process: builder threads of two slices (a re-placement, or tests) tracing and
# deep-copying at once crashed the interpreter once (SIGSEGV in batch_norm under Torch-Pruning's trace).
# Serial surgery only delays background builds (and a set_ratio that overtakes its own builder).
_surgery = threading.Lock()


@atexit.register
def _stop_builders() -> None:
    _shutting_down.set()
    wait_for_builders(timeout_s=10)


def wait_for_builders(timeout_s: float) -> None:
    """Let every background variant builder finish (at exit, and between tests)."""
    for builder in list(_builders):
        builder.join(timeout=timeout_s)


class PrunableSlice:
    """A node's slice with every ratio of a ladder ready to swap in.

    ``bn_tables=None`` uses the tables the model was loaded with (``model.bn_tables``, set by
    :func:`shared.model.build_model` from the checkpoint); pass ``{}`` to prune without them.
    ``entry_tables`` likewise (``model.entry_bn_tables``): with them, :meth:`forward` loads the
    first block's statistics for the ratio the upstream slice ran at, read off the keep mask of
    its input, so a slice behind a harder-pruned one keeps its accuracy.
    ``build="eager"`` makes every variant now (a few hundred ms); ``"lazy"`` makes them in a
    background thread, and a ``set_ratio`` that gets ahead of it builds its variant on the spot.
    """

    def __init__(self, model: BlockNet, first_block: int, last_block: int,
                 ladder: Sequence[float] = DEFAULT_LADDER, bn_tables: BnTables | None = None,
                 build: str = "eager", input_size: int = INPUT_SIZE, entry_tables: EntryTables | None = None):
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
        if entry_tables is None:
            entry_tables = getattr(model, "entry_bn_tables", None)
        self.entry_tables = entry_tables if first_block > 0 and entry_tables else {}
        self._entry_masks: dict[float, dict[str, torch.Tensor]] | None = None  # built with the first pruned variant
        self._upstream_by_kept: dict[int, float] = {}
        self._warned_upstream: set[int] = set()
        if self.entry_tables:
            in_channels = example_input(model, first_block, input_size).shape[1]
            upstream = {float(key) for tables in self.entry_tables.values() for key in tables} | set(ladder)
            for q in sorted(upstream):
                # rounded counts can coincide: the lowest of those ratios stands for them
                self._upstream_by_kept.setdefault(kept_channels(in_channels, q, model.channel_multiple), q)
        # the full variant is a copy too: entry statistics are loaded into it, never into the master
        full = copy.deepcopy(model.slice(first_block, last_block)).eval()
        self._lock = threading.Lock()
        self._variants: dict[float, PrunedSlice] = {0.0: self._with_entry_stats(PrunedSlice(full, None, 0.0))}
        self._current = self._variants[0.0]
        self.ratio = 0.0
        self._builder: threading.Thread | None = None
        if build == "eager":
            for ratio in ladder[1:]:
                self._variant(ratio)
        else:
            self._builder = threading.Thread(target=self._build_all, name="prune-variants", daemon=True)
            _builders.add(self._builder)
            self._builder.start()

    def _build_all(self) -> None:
        for ratio in self.ladder[1:]:
            if _shutting_down.is_set():
                return
            self._variant(ratio)

    def _variant(self, ratio: float) -> PrunedSlice:
        with self._lock:
            variant = self._variants.get(ratio)
            if variant is None:
                with _surgery:
                    variant = self._with_entry_stats(prune_slice(
                        self.model, self.first_block, self.last_block, ratio,
                        bn_table_for(self.bn_tables, ratio), self.input_size))
                self._variants[ratio] = variant
            return variant

    def _entry_keep_masks(self, ratio: float) -> dict[str, torch.Tensor]:
        """Keep masks of the entry block's BatchNorms at ``ratio``, by name (traced once, ~0.1 s)."""
        if ratio == 0:
            return {}
        if self._entry_masks is None:
            # Trace a copy: Torch-Pruning hooks every module it traces, and other slices' builder
            # threads may be running the master's blocks at this moment.
            traced = copy.deepcopy(self.model)
            groups = pruning_groups(traced, self.input_size)
            prefix = f"blocks.{self.first_block}."
            names = {m: name for name, m in traced.named_modules() if name.startswith(prefix)}
            self._entry_masks = {}
            for r in self.ladder:
                masks = keep_masks(groups, [r] * traced.n_blocks)
                self._entry_masks[r] = {names[m]: mask for m, mask in masks.items() if m in names}
        return self._entry_masks.get(ratio, {})

    def _with_entry_stats(self, variant: PrunedSlice) -> PrunedSlice:
        """Attach the entry block's statistics for every upstream ratio the tables cover (and its own)."""
        by_upstream = self.entry_tables.get(ratio_key(variant.ratio))
        if not by_upstream:
            return variant
        norms = {full_model_name(self.first_block, name): m for name, m in variant.module.named_modules()
                 if name.startswith("0.") and isinstance(m, nn.BatchNorm2d)}
        variant.entry_stats[variant.ratio] = [(m, m.running_mean.clone(), m.running_var.clone())
                                              for m in norms.values()]
        masks = self._entry_keep_masks(variant.ratio)
        for key, stats in by_upstream.items():
            upstream = float(key)
            if upstream == variant.ratio or not all(name in stats for name in norms):
                continue
            variant.entry_stats[upstream] = [
                (m, *(stats[name][s][masks[name]] if name in masks else stats[name][s] for s in ("mean", "var")))
                for name, m in norms.items()]
        variant.upstream = variant.ratio
        return variant

    def upstream_ratio(self, upstream_mask: np.ndarray | None) -> float | None:
        """The ratio the upstream slice ran at, from the keep mask of this slice's input (None: unknown)."""
        if upstream_mask is None:
            return 0.0
        kept = int(upstream_mask.sum())
        ratio = self._upstream_by_kept.get(kept)
        if ratio is None and kept not in self._warned_upstream:
            self._warned_upstream.add(kept)
            log.warning("input with %d of %d channels kept matches no upstream ladder ratio: the entry "
                        "block keeps its own statistics", kept, upstream_mask.size)
        return ratio

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

    def forward(self, x_full: torch.Tensor,
                upstream_mask: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
        """Run the current variant on the full-width input: (output of kept channels, keep mask or None).

        ``upstream_mask`` is the keep mask the input arrived with (None: every channel, an unpruned
        upstream). Call from one thread: entry statistics are loaded into the variant in place.
        """
        variant = self._current  # one read, so a concurrent set_ratio never splits a request
        if variant.entry_stats:
            variant.condition_on(self.upstream_ratio(upstream_mask))
        with torch.inference_mode():
            return variant.module(x_full), variant.keep_mask

    @property
    def entry_upstream(self) -> float | None:
        """The upstream ratio whose entry statistics the current variant holds (None: it has no entry tables)."""
        variant = self._current
        return variant.upstream if variant.entry_stats else None

    def memory_bytes(self) -> int:
        """Parameters and buffers of every variant built so far, the full slice included."""
        with self._lock:
            return sum(module_bytes(v.module) for v in self._variants.values())


def pipeline_predictions(stages: Sequence[PrunableSlice], ratios: Sequence[float], inputs: torch.Tensor,
                         batch: int = 250) -> np.ndarray:
    """Class predictions of the pruned pipeline, zero-filling pruned channels between slices like a node."""
    return pipeline_logits(stages, ratios, inputs, batch).argmax(1).numpy()


def pipeline_logits(stages: Sequence[PrunableSlice], ratios: Sequence[float], inputs: torch.Tensor,
                    batch: int = 250) -> torch.Tensor:
    """Logits of the pruned pipeline, zero-filling pruned channels between slices like a node."""
    for stage, ratio in zip(stages, ratios):
        stage.set_ratio(ratio)
    logits = []
    for start in range(0, len(inputs), batch):
        x, mask = inputs[start:start + batch], None
        for stage in stages:
            out, keep = stage.forward(x, mask)
            if keep is not None:
                full = torch.zeros(out.shape[0], keep.size, *out.shape[2:])
                full[:, torch.from_numpy(keep)] = out
                out = full
            x, mask = out, keep
        logits.append(x)
    return torch.cat(logits)
