"""``edgeprune train``: train on the synthetic frames or on your own photos; a checkpoint with BN tables."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# EfficientNet-Lite0's default input when training: a sandwich step at its native 224 px cost 3.4x one at
# 160 px here, 128 px saved almost nothing (docs/own-data.md, measured).
LITE0_INPUT_SIZE = 160


def register(sub) -> None:
    p = sub.add_parser("train", help="train the model (regimes: standard, paper, ours) and write a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--regime", default="ours", choices=["standard", "paper", "ours", "all"])
    p.add_argument("--epochs", type=int, help="override the regime's epochs (standard 10, paper 15, ours 12)")
    p.add_argument("--arch", default="resnet", choices=["resnet", "vgg", "efficientnet-lite0"])
    p.add_argument("--from", dest="init", choices=["pretrained", "scratch"],
                   help="efficientnet-lite0: start from its ImageNet weights (default) or from scratch; "
                        "the others train from scratch")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage")
    p.add_argument("--seed", type=int, default=0, help="seed of weight init, batch order and masks")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the frames and their split (keep 0 to compare runs on one test set)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="checkpoint path (default: the shipped checkpoint for "
                   "--regime ours --arch resnet, else <cache>/models/<regime>-<arch>.pt)")
    p.add_argument("--batch-size", type=int,
                   help="override the regime's batch size (standard 64, paper 16, ours 32; the learning rate scales)")
    p.add_argument("--weight-decay", type=float, help="override the regime's L2 weight decay")
    p.add_argument("--lr", type=float, help="override the peak learning rate (one-cycle schedule; default: the "
                                            "regime's, scaled to the batch size, a tenth of it --from pretrained)")
    p.add_argument("--masked-bn", default="batch", choices=["eval", "batch"],
                   help="ours: BatchNorm statistics in the masked passes (running or batch)")
    p.add_argument("--no-distill", action="store_true",
                   help="ours: masked passes learn the labels instead of the full pass's predictions")
    p.add_argument("--ladder", help="ours: the ratios trained and given BatchNorm tables, e.g. 0.1,0.3,0.5 "
                                    "(default: the nodes' whole ladder, 0.1..0.9; fewer cut the table passes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs epochs only)")
    p.add_argument("--recalibrate", type=Path, metavar="CHECKPOINT",
                   help="train nothing: recompute this checkpoint's BatchNorm tables (uniform and entry) in place")
    own = p.add_argument_group("your own labelled photos (docs/own-data.md); default: the synthetic frames")
    source = own.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, metavar="DIR", help="one sub-folder per class: DIR/<class>/<file>.jpg")
    source.add_argument("--labels", type=Path, metavar="CSV", help="a CSV of file paths (relative to it) and labels")
    source.add_argument("--camtrap-dp", type=Path, metavar="PATH",
                        help="a Camtrap DP package folder (media.csv + observations.csv; "
                             "blank observations -> 'blank')")
    own.add_argument("--path-column", default="path", help="--labels: the file path column")
    own.add_argument("--label-column", default="label", help="--labels: the label column")
    own.add_argument("--group-column", help="--labels: a camera/site column; the split never puts one in two splits")
    own.add_argument("--split-column", help="--labels: a column that fixes each row's split (train, val or test), "
                                            "e.g. a set's own hold-out; overrides the ~80/10/10 split")
    own.add_argument("--unlabelled", type=Path, metavar="DIR",
                     help="unlabelled photos (any .jpg/.png in DIR, e.g. `edgeprune dataset --unlabelled DIR`): "
                          "each step adds half a batch of them, which the pruned widths distil from the full width")
    own.add_argument("--image-size", type=int,
                     help="model input side in pixels (default 64; efficientnet-lite0: 160, docs/own-data.md)")
    own.add_argument("--resize", choices=["letterbox", "crop", "squash"],
                     help="how frames of another shape become square (default: letterbox for own photos, "
                          "squash for the square synthetic frames)")
    p.add_argument("--blank-fraction", type=float, default=0.1,
                   help="synthetic frames: this share of extra frames with no animal, class 'blank' (the shipped "
                        "model's recipe; 0: the ten animal classes only)")
    p.set_defaults(func=run)


def default_checkpoint(regime: str, arch: str) -> Path:
    from edgeprune.dataset import cache_dir
    from shared.model import DEFAULT_CHECKPOINT

    if regime == "ours" and arch == "resnet":
        return DEFAULT_CHECKPOINT
    return cache_dir() / "models" / f"{regime}-{arch}.pt"


def own_source(args) -> tuple[str, Path] | None:
    """(kind, path) of the own-data source the flags name, or None for the synthetic frames."""
    for kind, path in (("images", args.images), ("labels", args.labels), ("camtrap-dp", args.camtrap_dp)):
        if path is not None:
            return kind, path
    return None


def parse_ladder(text: str) -> tuple[float, ...]:
    try:
        ratios = {round(float(part), 6) for part in text.split(",")} | {0.0}
    except ValueError:
        raise SystemExit(f"--ladder {text!r}: write ratios such as 0.1,0.3,0.5") from None
    if max(ratios) >= 1 or min(ratios) < 0:
        raise SystemExit(f"--ladder {text!r}: ratios lie in [0, 1)")
    return tuple(sorted(ratios))


def run(args) -> int:
    from shared.ladder import DEFAULT_LADDER
    from shared.pruning import narrowest_prunable

    narrowest = narrowest_prunable(max(DEFAULT_LADDER))
    if args.width < narrowest:  # the nodes build every ladder rung of every slice: a layer left empty cuts the net
        raise SystemExit(f"--width {args.width} is too narrow: pruning to {max(DEFAULT_LADDER):g}, the top of the "
                         f"ladder, must keep a channel of every layer; use --width {narrowest} or more")
    from edgeprune.allocator import keep_large_allocations

    keep_large_allocations()
    import torch

    from edgeprune.training import REGIMES
    from shared.model import INPUT_SIZE, TrapNetConfig

    lite0 = args.arch == "efficientnet-lite0"
    init = args.init or ("pretrained" if lite0 else "scratch")
    if init == "pretrained" and not lite0:
        raise SystemExit("--from pretrained: ImageNet weights exist for --arch efficientnet-lite0 only")
    torch.set_num_threads(args.threads)
    if args.recalibrate:
        return recalibrate(args)
    size = args.image_size or (LITE0_INPUT_SIZE if lite0 else INPUT_SIZE)
    splits, names, scientific, resize, data_meta = training_data(args, size)
    regimes = REGIMES if args.regime == "all" else (args.regime,)
    if args.out and len(regimes) > 1:
        raise SystemExit("--out names one file: use it with a single --regime")
    shape = {"width": args.width}
    if lite0:
        from shared import lite0 as l0

        shape = {"width": l0.STEM_WIDTH, "blocks_per_stage": l0.BLOCKS_PER_STAGE, "mean": l0.MEAN, "std": l0.STD}
    model_config = TrapNetConfig(arch=args.arch, class_names=names, scientific_names=scientific,
                                 input_size=size, resize=resize, **shape)
    unlabelled = unlabelled_images(args.unlabelled, size, resize, args.threads, not args.no_progress) \
        if args.unlabelled else None
    if unlabelled is not None:
        data_meta.update(unlabelled=str(args.unlabelled.resolve()), unlabelled_images=len(unlabelled))
    for regime in regimes:
        train_regime(args, regime, init, model_config, splits, data_meta, unlabelled)
    return 0


def unlabelled_images(folder: Path, size: int, resize: str, threads: int, progress: bool):
    """``--unlabelled``: every readable image in the folder, decoded as the labelled ones."""
    import numpy as np

    from edgeprune.own_data import decode_all

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images, ok = decode_all(paths, size, resize, threads, progress)
    if not any(ok):
        raise SystemExit(f"--unlabelled {folder}: no readable .jpg or .png images")
    print(f"{sum(ok)} unlabelled images from {folder}")
    return images[np.asarray(ok, bool)]


def recalibrate(args) -> int:
    """``--recalibrate``: new BatchNorm tables for a checkpoint, from the frames it was trained on."""
    from edgeprune.own_data import splits_for_checkpoint
    from edgeprune.training import recalibrate_checkpoint_bn_tables

    if not args.recalibrate.exists():
        raise SystemExit(f"--recalibrate {args.recalibrate}: no such checkpoint")
    # the frames it was trained on (recorded in it), whatever the data flags of this command say
    train_split = splits_for_checkpoint(args.recalibrate, args.threads, not args.no_progress)["train"]
    recalibrate_checkpoint_bn_tables(args.recalibrate, train_split, progress=not args.no_progress)
    print(f"recalibrated the BatchNorm tables of {args.recalibrate} (weights unchanged)")
    return 0


def training_data(args, size: int) -> tuple[dict, list[str], list[str], str, dict]:
    """(splits, class names, scientific names, resize mode, what the checkpoint records of the data): one's own
    photos if a source flag names them, else the synthetic frames."""
    from edgeprune.dataset import RenderConfig, load_frames, synthetic_class_names, synthetic_scientific_names
    from edgeprune.own_data import balance_report, load_source

    source = own_source(args)
    if not source:
        resize = args.resize or "squash"
        splits = load_frames(RenderConfig(size=size, seed=args.data_seed, blank_fraction=args.blank_fraction))
        data_meta = {"source": "synthetic", "blank_fraction": args.blank_fraction, "size": size}
        return (splits, synthetic_class_names(args.blank_fraction), synthetic_scientific_names(args.blank_fraction),
                resize, data_meta)
    if args.out is None:
        raise SystemExit("training on your own photos needs --out CHECKPOINT (the shipped model stays as it is)")
    kind, path = source
    resize = args.resize or "letterbox"
    data_meta = {"source": kind, "path": str(path.resolve()), "seed": args.data_seed,
                 "path_column": args.path_column, "label_column": args.label_column,
                 "group_column": args.group_column, "split_column": args.split_column}
    started = time.perf_counter()
    data = load_source(kind, path, size, resize, seed=args.data_seed, threads=args.threads,
                       progress=not args.no_progress, path_column=args.path_column,
                       label_column=args.label_column, group_column=args.group_column,
                       split_column=args.split_column)
    print(balance_report(data))
    print(f"decoded in {time.perf_counter() - started:.1f} s ({size} px, {resize})")
    splits, names = data.splits, data.class_names
    data_meta.update(unreadable=len(data.unreadable), class_counts={
        name: int(sum((s.labels == i).sum() for s in splits.values())) for i, name in enumerate(names)})
    if not len(splits["train"]):
        raise SystemExit("no training images left after the split")
    return splits, names, data.scientific_names, resize, data_meta


def regime_overrides(args, init: str) -> dict:
    """The regime's recipe as the flags change it."""
    from edgeprune.training import BASE_BATCH, BASE_LR

    overrides = {"epochs": args.epochs} if args.epochs else {}
    if args.batch_size:
        overrides.update(batch_size=args.batch_size, lr=BASE_LR * args.batch_size / BASE_BATCH)
    if args.weight_decay is not None:
        overrides["weight_decay"] = args.weight_decay
    if args.ladder:
        overrides["ladder"] = parse_ladder(args.ladder)
    if init == "pretrained" and args.batch_size:
        overrides["lr"] /= 10  # FINETUNE_RECIPE's tenth
    if args.lr is not None:
        overrides["lr"] = args.lr
    return overrides


def train_regime(args, regime: str, init: str, model_config, splits: dict, data_meta: dict,
                 unlabelled=None) -> None:
    """Train one regime, give it its BatchNorm tables, test it and write its checkpoint."""
    import dataclasses

    from edgeprune.tables import format_table
    from edgeprune.own_data import per_class_report
    from edgeprune.training import calibrate_all_bn_tables, predict, regime_config, save_checkpoint, train

    config = regime_config(regime, seed=args.seed, masked_bn=args.masked_bn, distill=not args.no_distill,
                           model=model_config, init=init, **regime_overrides(args, init))
    if unlabelled is not None:
        if regime != "ours":
            raise SystemExit("--unlabelled: only the ours regime distils (its pruned widths from the full width)")
        config = dataclasses.replace(config, unlabelled_batch=config.batch_size // 2)
    out = args.out or default_checkpoint(regime, args.arch)
    model, history = train(config, splits, progress=not args.no_progress,
                           resume=out.with_name(out.name + ".resume"), unlabelled=unlabelled)
    print("computing the per-ratio BatchNorm tables (forward passes only)")
    tables, entry_tables = calibrate_all_bn_tables(model, splits["train"], config, progress=not args.no_progress)
    test = splits["test"]
    predicted = predict(model, test) if len(test) else test.labels
    test_acc = float((predicted == test.labels).mean()) if len(test) else float("nan")
    meta = {"regime": regime, "history": history, "test_accuracy": test_acc, "data": data_meta}
    if len(test) and test.night.any():
        meta.update(test_accuracy_day=float((predicted == test.labels)[~test.night].mean()),
                    test_accuracy_night=float((predicted == test.labels)[test.night].mean()))
    save_checkpoint(out, model, config, tables, meta, entry_tables)
    if len(test):
        print(format_table(f"Test split, unpruned ({len(test)} frames)",
                           per_class_report(predicted, test.labels, model_config.class_names)))
    per_epoch = [e["wall_s"] for e in history["epochs"] if "wall_s" in e]
    timing = f"; {sum(per_epoch) / len(per_epoch):.0f} s per epoch" if per_epoch else ""
    print(f"{regime}: test accuracy {test_acc:.4f} after {history['wall_s']:.0f} s{timing}; wrote {out}")
