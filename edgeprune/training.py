"""Training regimes for a model that is pruned after deployment without fine-tuning.

Three regimes share data, model and optimiser, so differences in pruning robustness come from
the regime alone:

* ``standard``: plain SGD training of the full network;
* ``paper``: the regime of O'Quinn et al. (small batch, strong L2, more epochs);
* ``ours``: random-width training. Every step also runs the network with channels masked
  exactly as Torch-Pruning will remove them (same groups, same L1 ranking, ``int(C(1-p))``
  kept, mask right after BatchNorm: :mod:`shared.pruning`), at a random ladder ratio per block,
  and every second step at the smallest width too (sandwich rule, halved to save time). The
  masked passes learn the full pass's predictions (in-place distillation). Their BatchNorms
  normalise with the masked batch's own statistics and leave the running statistics alone
  (``masked_bn="batch"``): the weights then learn to work with statistics that match each
  width, and the per-ratio BN tables give every pruned variant exactly such statistics.
  docs/model.md records the runs that chose this over ``masked_bn="eval"`` (the full network's
  running statistics in the masked passes, what a pruned model inherits without tables).

``init="pretrained"`` (EfficientNet-Lite0 only, `edgeprune train`'s default for it) starts from the
ImageNet weights with a new classifier, freezes the channel order first (:func:`shared.pruning.fix_channel_order`,
shipped in the checkpoint) so the widths trained are the widths a node cuts, and follows
:data:`FINETUNE_RECIPE`: a tenth of the learning rate, no full-width-only warm-up, and the
sandwich rule on every step (full width, smallest width, one random mix; US-Nets).

After training, :func:`calibrate_bn_tables` re-estimates BatchNorm statistics per ladder ratio
from unlabelled training frames (forward passes only, no weight changes): the node loads the
table of its ratio into each pre-built variant. :func:`calibrate_entry_bn_tables` adds, for the
block a slice starts with, statistics per (own ratio, upstream ratio) pair.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgeprune.dataset import FrameSplit, to_model_input
from shared.model import BlockNet, TrapNetConfig, build_model, load_checkpoint, make_model
from shared.pruning import (
    DEFAULT_LADDER,
    PruningGroup,
    fix_channel_order,
    keep_masks,
    masked,
    pruning_groups,
    ratio_key,
)

REGIMES = ("standard", "paper", "ours")
INITS = ("scratch", "pretrained")
BASE_BATCH = 64
BASE_LR = 0.1  # at BASE_BATCH; scaled linearly with the batch size


@dataclass(frozen=True)
class TrainConfig:
    regime: str = "ours"
    epochs: int = 10
    batch_size: int = BASE_BATCH
    lr: float = BASE_LR
    weight_decay: float = 5e-4
    warmup_epochs: int = 1        # ours: full-network epochs before the masked passes start
    sandwich: bool = True         # ours: also train the smallest width, every ``sandwich_every``-th step
    sandwich_every: int = 2
    distill: bool = True          # ours: masked passes learn the full pass's predictions (in-place distillation)
    masked_bn: str = "batch"      # ours: BatchNorm in masked passes: "batch" statistics or "eval" (running)
    grad_clip: float = 5.0
    ladder: tuple[float, ...] = DEFAULT_LADDER
    calibration_frames: int = 2048  # for the BatchNorm tables (the name checkpoints store in meta.train_config)
    unlabelled_batch: int = 0     # ours: unlabelled images per step that only the masked passes distil on
    seed: int = 0
    init: str = "scratch"         # or "pretrained": the ImageNet Lite0 weights, a new classifier
    model: TrapNetConfig = field(default_factory=TrapNetConfig)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown start {self.init!r}; choose from {INITS}")
        if self.init == "pretrained" and self.model.arch != "efficientnet-lite0":
            raise ValueError(f"pretrained weights exist for efficientnet-lite0 only, not {self.model.arch}")
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose from {REGIMES}")
        if self.masked_bn not in ("eval", "batch"):
            raise ValueError(f"masked_bn must be 'eval' or 'batch', not {self.masked_bn!r}")

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["ladder"] = list(self.ladder)
        raw["model"] = self.model.to_dict()
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (a checkpoint's ``meta.train_config``); older keys missing take defaults."""
        return cls(**{**raw, "ladder": tuple(raw["ladder"]), "model": TrapNetConfig.from_dict(raw["model"])})


# Each regime's recipe. The paper's is small batch (learning rate scaled linearly), ten times the
# L2, and half again as many epochs as standard; ours runs batch 32 and 12 epochs, the shipped run.
REGIME_RECIPES: dict[str, dict[str, Any]] = {
    "standard": {"epochs": 10},
    "paper": {"epochs": 15, "batch_size": 16, "lr": BASE_LR * 16 / BASE_BATCH, "weight_decay": 5e-3},
    "ours": {"epochs": 12, "batch_size": 32, "lr": BASE_LR * 32 / BASE_BATCH},
}


# Fine-tuning from ImageNet weights: the recipe's full learning rate would wipe out what they know; the
# pretrained widths need no warm-up, and the sandwich runs every step, as in US-Nets.
FINETUNE_RECIPE: dict[str, Any] = {"lr": BASE_LR * 32 / BASE_BATCH / 10, "weight_decay": 4e-5, "warmup_epochs": 0,
                                   "sandwich_every": 1}


def regime_config(regime: str, **overrides: Any) -> TrainConfig:
    """The hyper-parameters of ``regime`` (:data:`REGIME_RECIPES`; :data:`FINETUNE_RECIPE` on top when
    ``init="pretrained"``), with ``overrides`` on top."""
    if regime not in REGIME_RECIPES:
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    finetune = FINETUNE_RECIPE if overrides.get("init") == "pretrained" else {}
    return TrainConfig(**{"regime": regime, **REGIME_RECIPES[regime], **finetune, **overrides})


def initial_model(config: TrainConfig, input_size: int) -> BlockNet:
    """A fresh model of ``config.model``: seeded weights, or the ImageNet ones with a new classifier and a
    fixed channel order."""
    model = make_model(config.model)
    if config.init == "pretrained":
        from shared.lite0 import load_weights, weights_path

        imagenet = load_weights(weights_path())
        head = {k for k in imagenet if ".fc." in k}
        missing, unexpected = model.load_state_dict({k: v for k, v in imagenet.items() if k not in head},
                                                    strict=False)
        if unexpected or {k for k in missing} != {k for k in model.state_dict() if ".fc." in k}:
            raise ValueError(f"ImageNet weights do not fit: missing {missing}, unexpected {unexpected}")
        fix_channel_order(model.eval(), input_size)
    return model


def batches(split: FrameSplit, batch_size: int, rng: np.random.Generator | None, augment: bool,
            model: TrapNetConfig | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Input batches normalised as ``model`` says (default: TrapNet's); shuffled and randomly mirrored when training."""
    norm = (model.mean, model.std) if model is not None else ()
    order = rng.permutation(len(split)) if rng is not None else np.arange(len(split))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        images = split.images[idx]
        if augment and rng is not None:
            flip = rng.random(len(idx)) < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        yield to_model_input(images, *norm), torch.from_numpy(split.labels[idx])


@contextmanager
def masked_pass_bn(model: nn.Module, mode: str) -> Iterator[None]:
    """BatchNorm during masked passes, never updating the full network's running statistics.

    ``eval`` normalises with those running statistics (what a pruned model inherits without
    tables); ``batch`` with the masked batch's own statistics (what per-ratio tables restore).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        if mode == "eval":
            m.eval()
        else:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.train()
            m.momentum = momentum


def random_block_ratios(rng: np.random.Generator, ladder: Sequence[float], n_blocks: int) -> list[float]:
    """A ratio per block: the same for all half the time (uniform deployment), else mixed per block."""
    choices = [r for r in ladder if r > 0]
    if rng.random() < 0.5:
        return [float(rng.choice(choices))] * n_blocks
    return [float(r) for r in rng.choice(choices, size=n_blocks)]


def masked_loss(model: BlockNet, groups: Sequence[PruningGroup], ratios: Sequence[float],
                x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of the model masked to ``ratios``; ``target`` holds labels or (distilling) class probabilities."""
    with masked(keep_masks(groups, ratios)):
        return F.cross_entropy(model(x), target)


def unlabelled_batches(images: np.ndarray, batch_size: int, seed: int,
                       model: TrapNetConfig) -> Iterator[torch.Tensor]:
    """Endless shuffled, randomly mirrored batches of unlabelled images (a pass restarts on resume)."""
    rng = np.random.default_rng(seed + 1)
    split = FrameSplit(images, np.zeros(len(images), np.int64), np.zeros(len(images), bool))
    while True:
        for x, _ in batches(split, batch_size, rng, augment=True, model=model):
            if len(x) == batch_size:
                yield x


def train(config: TrainConfig, splits: dict[str, FrameSplit], progress: bool = True,
          log: Callable[[str], None] = print, resume: Path | None = None,
          unlabelled: np.ndarray | None = None) -> tuple[BlockNet, dict[str, Any]]:
    """Train a model of ``config.model`` on ``splits["train"]``; returns it (eval mode) and a history.

    With ``resume``, the state after every epoch is saved there, and a run of the same config
    started again continues after the last finished epoch (an interrupted hour is not lost).
    ``unlabelled`` (N x H x W x 3 uint8, with ``config.unlabelled_batch``): each step's full pass also
    runs that many of them, unscored, and the masked passes distil the full width on them too; 97
    labelled photos alone let the pruned widths fit rather than generalise (docs/model.md).
    """
    if config.unlabelled_batch and (unlabelled is None or len(unlabelled) < config.unlabelled_batch
                                    or config.regime != "ours" or not config.distill):
        raise ValueError("unlabelled_batch needs the ours regime with distillation and that many unlabelled images")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_split = splits["train"]
    input_size = train_split.images.shape[1]
    model = initial_model(config, input_size)
    groups = pruning_groups(model.eval(), input_size) if config.regime == "ours" else []
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, pct_start=0.15,
                                                    total_steps=config.epochs * steps_per_epoch)
    smallest = max(config.ladder)
    extra = unlabelled_batches(unlabelled, config.unlabelled_batch, config.seed, config.model) \
        if config.unlabelled_batch else None
    history: dict[str, Any] = {"epochs": [], "wall_s": 0.0}
    start = 0
    if resume is not None and resume.exists():
        start = _restore(resume, config, model, optimiser, scheduler, rng, history, log)
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        model.train()
        use_masks = config.regime == "ours" and epoch >= config.warmup_epochs
        bar = tqdm(batches(train_split, config.batch_size, rng, augment=True, model=config.model),
                   total=steps_per_epoch,
                   desc=f"{config.regime} epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        total_loss, n_seen = 0.0, 0
        for step, (x, y) in enumerate(bar):
            optimiser.zero_grad(set_to_none=True)
            if extra is not None and use_masks:
                x = torch.cat([x, next(extra)])
            logits = model(x)
            loss = F.cross_entropy(logits[:len(y)], y)
            loss.backward()
            if use_masks:
                target = torch.softmax(logits.detach(), 1) if config.distill else y
                masked_ratios = [random_block_ratios(rng, config.ladder, model.n_blocks)]
                if config.sandwich and step % config.sandwich_every == 0:
                    masked_ratios.append([smallest] * model.n_blocks)
                with masked_pass_bn(model, config.masked_bn):
                    for ratios in masked_ratios:
                        masked_loss(model, groups, ratios, x, target).backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimiser.step()
            scheduler.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {loss.item()})")
            total_loss += loss.item() * len(y)
            n_seen += len(y)
            bar.set_postfix(loss=f"{total_loss / n_seen:.3f}")
        model.eval()
        val_acc = accuracy(model, splits["val"]) if "val" in splits else float("nan")
        wall_s = time.perf_counter() - t0
        history["epochs"].append({"epoch": epoch + 1, "loss": total_loss / n_seen, "val_acc": val_acc,
                                  "wall_s": wall_s})
        history["wall_s"] += wall_s
        log(f"{config.regime} epoch {epoch + 1}/{config.epochs}: loss {total_loss / n_seen:.4f}, "
            f"val accuracy {val_acc:.4f} ({wall_s:.0f} s)")
        if resume is not None:
            _save_resume(resume, config, model, optimiser, scheduler, rng, history)
    if resume is not None:
        resume.unlink(missing_ok=True)
    return model.eval(), history


def _save_resume(path: Path, config: TrainConfig, model: nn.Module, optimiser: torch.optim.Optimizer,
                 scheduler: Any, rng: np.random.Generator, history: dict[str, Any]) -> None:
    """Everything the next epoch depends on, written atomically (a kill mid-write keeps the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"train_config": json.dumps(config.to_dict(), sort_keys=True), "model": model.state_dict(),
                "optimiser": optimiser.state_dict(), "scheduler": json.dumps(scheduler.state_dict()),
                "numpy_rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
                "history": json.dumps(history)}, tmp)
    tmp.replace(path)


def _restore(path: Path, config: TrainConfig, model: nn.Module, optimiser: torch.optim.Optimizer,
             scheduler: Any, rng: np.random.Generator, history: dict[str, Any], log: Callable[[str], None]) -> int:
    """Load a resume file of the same config; returns the number of epochs already done (0: start afresh).

    Compared as configs, not as text: a file written before a field was added (at its default) still resumes.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        same = TrainConfig.from_dict(json.loads(state["train_config"])) == config
    except (KeyError, TypeError, ValueError):  # not a resume file, or one with fields this version lacks
        same = False
    if not same:
        log(f"{path} belongs to a run with other settings: starting afresh (it will be overwritten)")
        return 0
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(json.loads(state["scheduler"]))
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    history.update(json.loads(state["history"]))
    done = len(history["epochs"])
    log(f"resuming from {path} after epoch {done}/{config.epochs}")
    return done


@torch.no_grad()
def predict(model: nn.Module, split: FrameSplit, batch_size: int = 250) -> np.ndarray:
    model.eval()
    return np.concatenate([model(x).argmax(1).numpy()
                           for x, _ in batches(split, batch_size, None, False, model.config)])


def accuracy(model: nn.Module, split: FrameSplit) -> float:
    return float((predict(model, split) == split.labels).mean())


BnStats = dict[str, dict[str, torch.Tensor]]  # BatchNorm name -> {"mean": t, "var": t}


@contextmanager
def preserved_bn_statistics(model: nn.Module) -> Iterator[dict[str, nn.BatchNorm2d]]:
    """Yield the model's BatchNorms by name; their statistics and modes are restored on exit."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for name, m in norms.items()}
    try:
        yield norms
    finally:
        for name, m in norms.items():
            mean, var, count, momentum = saved[name]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
        model.eval()


def _start_averaging(norms: Iterable[nn.BatchNorm2d]) -> None:
    """BatchNorms that average the batch statistics of what runs next (cumulative mean, ``momentum=None``)."""
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()


def _read_stats(norms: Mapping[str, nn.BatchNorm2d]) -> BnStats:
    return {name: {"mean": m.running_mean.clone(), "var": m.running_var.clone()} for name, m in norms.items()}


@torch.no_grad()
def calibrate_bn_tables(model: BlockNet, frames: FrameSplit, ladder: Sequence[float],
                        batch_size: int = 256, advance: Callable[[], None] = lambda: None) -> dict[str, BnStats]:
    """BatchNorm running statistics of the model pruned to each ladder ratio (no gradient, no weight change).

    The model is masked exactly as it will be pruned, its BatchNorms average the batch
    statistics of ``frames``, and the result is read out. The model's own statistics are
    restored afterwards. ``advance`` is called after each ratio's pass (progress).
    """
    groups = pruning_groups(model.eval(), frames.images.shape[1])
    tables = {}
    with preserved_bn_statistics(model) as norms:
        for ratio in ladder:
            if ratio == 0:
                continue
            _start_averaging(norms.values())
            with masked(keep_masks(groups, [ratio] * model.n_blocks)):
                for x, _ in batches(frames, batch_size, None, False, model.config):
                    model(x)
            tables[ratio_key(ratio)] = _read_stats(norms)
            advance()
    return tables


@torch.no_grad()
def calibrate_entry_bn_tables(model: BlockNet, frames: FrameSplit, ladder: Sequence[float],
                           bn_tables: Mapping[str, BnStats], batch_size: int = 256,
                           advance: Callable[[], None] = lambda: None) -> dict[str, dict[str, BnStats]]:
    """Statistics of each block's BatchNorms when the blocks before it run at a *different* ratio.

    A slice that starts at block ``b`` runs at its own ratio ``p`` on activations that the
    upstream slice pruned at ``q``. The uniform table for ``p`` assumes ``q == p``; when the
    upstream is pruned much harder the block's first BatchNorms normalise with the wrong
    statistics and accuracy collapses (docs/model.md). So for every pair ``q != p`` of the
    ladder: the blocks before ``b`` run masked at ``q`` with their ``q`` table (as the upstream
    node does), and block ``b`` alone, masked at ``p``, averages its batch statistics. Blocks after
    the slice's first see a normalised input and keep the uniform table. Result:
    ``{ratio_key(p): {ratio_key(q): {BatchNorm name: {"mean", "var"}}}}`` over the BatchNorms of
    every block that can start a slice (all but the stem). ``advance`` is called after each
    upstream pass and each (own, upstream) pair (progress).
    """
    groups = pruning_groups(model.eval(), frames.images.shape[1])
    entry: dict[str, dict[str, BnStats]] = {ratio_key(p): {} for p in ladder}
    with preserved_bn_statistics(model) as norms:
        own = _read_stats(norms)
        block_norms = {b: {name: norms[name] for name in norms if name.startswith(f"blocks.{b}.")}
                       for b in range(1, model.n_blocks)}
        block_norms = {b: found for b, found in block_norms.items() if found}
        for upstream in ladder:
            table = bn_tables[ratio_key(upstream)] if upstream > 0 else own
            for name, m in norms.items():
                m.running_mean.copy_(table[name]["mean"])
                m.running_var.copy_(table[name]["var"])
                m.eval()
            inputs: dict[int, list[torch.Tensor]] = {b: [] for b in block_norms}
            with masked(keep_masks(groups, [upstream] * model.n_blocks)):
                for x, _ in batches(frames, batch_size, None, False, model.config):
                    for b, block in enumerate(model.blocks):
                        if b in inputs:
                            inputs[b].append(x)
                        x = block(x)
            advance()
            for ratio in ladder:
                if ratio == upstream:
                    continue
                masks = keep_masks(groups, [ratio] * model.n_blocks)
                for b, found in block_norms.items():
                    _start_averaging(found.values())
                    with masked({m: mask for m, mask in masks.items() if m in found.values()}):
                        for x in inputs[b]:
                            model.blocks[b](x)
                    entry[ratio_key(ratio)].setdefault(ratio_key(upstream), {}).update(_read_stats(found))
                    for m in found.values():
                        m.eval()
                advance()
    return entry


def bn_calibration_frames(split: FrameSplit, n: int, seed: int) -> FrameSplit:
    """A seeded sample of unlabelled training frames for BatchNorm calibration."""
    n = min(n, len(split))
    return split.subset(np.sort(np.random.default_rng(seed).choice(len(split), n, replace=False)))


def save_checkpoint(path: Path, model: BlockNet, config: TrainConfig, bn_tables: dict[str, Any],
                    meta: dict[str, Any], entry_tables: dict[str, Any] | None = None) -> None:
    """The dict :func:`shared.model.build_model` loads (``weights_only``-safe: tensors and plain values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config.model.to_dict(), "model": model.state_dict(), "bn_tables": bn_tables,
                "entry_bn_tables": entry_tables or {}, "channel_scores": model.channel_scores,
                "meta": {"train_config": config.to_dict(), **meta}}, path)


class PassCounter:
    """Progress of the table passes: a bar, or (``progress=False``) a log line per tenth with the time left.

    The tables cost about three random-width epochs of forward passes and run after the last epoch
    (up to 16 minutes at 128 px on a quiet machine here, over 18 under load): without this a long run
    looked hung.
    """

    def __init__(self, total: int, progress: bool, log: Callable[[str], None]) -> None:
        self.total, self.done, self.log = total, 0, log
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, desc="BatchNorm tables", unit="pass", disable=not progress, leave=False)

    def __call__(self) -> None:
        self.done += 1
        self.bar.update(1)
        tenth = max(1, self.total // 10)
        if self.bar.disable and (self.done % tenth == 0 or self.done == self.total):
            elapsed = time.perf_counter() - self.started
            left = elapsed / self.done * (self.total - self.done)
            self.log(f"BatchNorm tables: {self.done}/{self.total} passes, {elapsed:.0f} s, about {left:.0f} s left")

    def close(self) -> float:
        """Seconds since the first pass started."""
        self.bar.close()
        return time.perf_counter() - self.started


def table_passes(ladder: Sequence[float]) -> int:
    """Passes of :func:`calibrate_all_bn_tables`: one per pruned ratio, per upstream ratio, per (own, upstream) pair."""
    return sum(1 for p in ladder if p > 0) + len(ladder) + len(ladder) * (len(ladder) - 1)


def calibrate_all_bn_tables(model: BlockNet, train_split: FrameSplit, config: TrainConfig, progress: bool = False,
                            log: Callable[[str], None] = print
                            ) -> tuple[dict[str, BnStats], dict[str, dict[str, BnStats]]]:
    """Uniform per-ratio tables and entry tables from the same seeded unlabelled training frames."""
    frames = bn_calibration_frames(train_split, config.calibration_frames, config.seed)
    counter = PassCounter(table_passes(config.ladder), progress, log)
    tables = calibrate_bn_tables(model, frames, config.ladder, advance=counter)
    entry = calibrate_entry_bn_tables(model, frames, config.ladder, tables, advance=counter)
    log(f"BatchNorm tables: {counter.done} passes over {len(frames)} frames in {counter.close():.0f} s")
    return tables, entry


def recalibrate_checkpoint_bn_tables(path: Path, train_split: FrameSplit, progress: bool = False,
                                     log: Callable[[str], None] = print) -> None:
    """Recompute a checkpoint's BatchNorm tables in place: same weights, same training config."""
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["meta"]["train_config"])
    state["bn_tables"], state["entry_bn_tables"] = calibrate_all_bn_tables(build_model(path), train_split, config,
                                                                           progress, log)
    torch.save(state, path)
