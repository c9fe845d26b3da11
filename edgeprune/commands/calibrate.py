"""``edgeprune calibrate``: measure the per-block accuracy model the pruning controller needs."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="measure accuracy vs per-block prune ratios and fit the controller's model")
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the shipped one)")
    p.add_argument("--out", type=Path, help="accuracy model file (default: beside the checkpoint, X.pt -> "
                   "X.accuracy.json, where the gateway looks for it)")
    p.add_argument("--frames", type=int, default=1000, help="validation frames to classify per vector")
    p.add_argument("--random", type=int, default=40,
                   help="random pipeline-shaped ratio vectors (besides the uniform ones)")
    p.add_argument("--max-ratio", type=float, default=0.9, help="highest ratio measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgeprune.allocator import keep_large_allocations

    keep_large_allocations()
    import torch

    from edgeprune.measure_accuracy import measure_accuracy, ratio_vectors, save_accuracy_model
    from edgeprune.tables import format_table
    from edgeprune.own_data import splits_for_checkpoint
    from shared.model import DEFAULT_CHECKPOINT, accuracy_model_beside, build_model
    from shared.pruning import DEFAULT_LADDER

    torch.set_num_threads(args.threads)
    model = build_model(args.checkpoint)
    val = splits_for_checkpoint(args.checkpoint, args.threads, not args.no_progress)["val"]  # what it was trained on
    split = val.subset(slice(0, args.frames))
    vectors = ratio_vectors(model.n_blocks, DEFAULT_LADDER, args.max_ratio, args.random, args.seed)
    fit, measured = measure_accuracy(model, split, vectors, progress=not args.no_progress)
    out = args.out or accuracy_model_beside(args.checkpoint)
    save_accuracy_model(out, model, fit, len(split), str(args.checkpoint or DEFAULT_CHECKPOINT))
    n_shown = len(vectors) - args.random
    rows = [{"vector": "/".join(f"{r:.1f}" for r in v), "measured": acc, "fitted": fit.logistic(v)}
            for v, acc in zip(vectors[:n_shown], measured[:n_shown])]
    print(format_table(f"Accuracy at uniform ratios and with one block pruned alone ({len(split)} validation "
                       f"frames; {args.random} random pipeline-shaped vectors also fitted)", rows))
    print(f"logistic fit over {len(vectors)} vectors: R² {fit.r2:.3f}, RMSE {fit.rmse:.4f}; "
          f"block gains {', '.join(f'{g:.2f}' for g in fit.gains)}, offset {fit.offset:.2f}, top {fit.top:.3f}")
    print(f"wrote {out}")
    return 0
