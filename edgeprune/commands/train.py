"""``edgeprune train``: train a regime on the camera-trap frames and write a checkpoint with BN tables."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train the model (regimes: standard, paper, ours) and write a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--regime", default="ours", choices=["standard", "paper", "ours", "all"])
    p.add_argument("--epochs", type=int, help="override the regime's epochs (standard 10, paper 15, ours 12)")
    p.add_argument("--arch", default="resnet", choices=["resnet", "vgg"])
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
    p.add_argument("--masked-bn", default="batch", choices=["eval", "batch"],
                   help="ours: BatchNorm statistics in the masked passes (running or batch)")
    p.add_argument("--no-distill", action="store_true",
                   help="ours: masked passes learn the labels instead of the full pass's predictions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs epochs only)")
    p.add_argument("--recalibrate", type=Path, metavar="CHECKPOINT",
                   help="train nothing: recompute this checkpoint's BatchNorm tables (uniform and entry) in place")
    p.set_defaults(func=run)


def default_checkpoint(regime: str, arch: str) -> Path:
    from edgeprune.dataset import cache_dir
    from shared.model import DEFAULT_CHECKPOINT

    if regime == "ours" and arch == "resnet":
        return DEFAULT_CHECKPOINT
    return cache_dir() / "models" / f"{regime}-{arch}.pt"


def run(args) -> int:
    from edgeprune.allocator import keep_large_allocations

    keep_large_allocations()
    import torch

    from edgeprune.dataset import RenderConfig, load_frames
    from edgeprune.training import (
        BASE_BATCH,
        BASE_LR,
        REGIMES,
        accuracy,
        calibrate_all_tables,
        recalibrate_checkpoint,
        regime_config,
        save_checkpoint,
        train,
    )
    from shared.model import TrapNetConfig

    torch.set_num_threads(args.threads)
    splits = load_frames(RenderConfig(seed=args.data_seed))
    if args.recalibrate:
        if not args.recalibrate.exists():
            raise SystemExit(f"--recalibrate {args.recalibrate}: no such checkpoint")
        recalibrate_checkpoint(args.recalibrate, splits["train"])
        print(f"recalibrated the BatchNorm tables of {args.recalibrate} (weights unchanged)")
        return 0
    regimes = REGIMES if args.regime == "all" else (args.regime,)
    if args.out and len(regimes) > 1:
        raise SystemExit("--out names one file: use it with a single --regime")
    for regime in regimes:
        overrides = {"epochs": args.epochs} if args.epochs else {}
        if args.batch_size:
            overrides.update(batch_size=args.batch_size, lr=BASE_LR * args.batch_size / BASE_BATCH)
        if args.weight_decay is not None:
            overrides["weight_decay"] = args.weight_decay
        config = regime_config(regime, seed=args.seed, masked_bn=args.masked_bn, distill=not args.no_distill,
                               model=TrapNetConfig(width=args.width, arch=args.arch), **overrides)
        model, history = train(config, splits, progress=not args.no_progress)
        tables, entry_tables = calibrate_all_tables(model, splits["train"], config)
        test_acc = accuracy(model, splits["test"])
        out = args.out or default_checkpoint(regime, args.arch)
        save_checkpoint(out, model, config, tables, {"regime": regime, "history": history,
                                                     "test_accuracy": test_acc}, entry_tables)
        print(f"{regime}: test accuracy {test_acc:.4f} after {history['wall_s']:.0f} s; wrote {out}")
    return 0
