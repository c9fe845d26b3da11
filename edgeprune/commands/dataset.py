"""``edgeprune dataset``: build (or reuse) the cached camera-trap frames and show a preview."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("dataset", help="build the cached camera-trap frames; --preview writes a montage PNG")
    p.add_argument("--preview", type=Path, metavar="PNG", help="write a labelled montage of test frames")
    p.add_argument("--seed", type=int, default=0, help="render and split seed")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split shown by --preview")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgeprune.dataset import RenderConfig, cache_dir, load_frames, montage

    splits = load_frames(RenderConfig(seed=args.seed))
    for name, split in splits.items():
        print(f"{name}: {len(split)} frames, {int(split.night.sum())} night, "
              f"{split.images.shape[1]}x{split.images.shape[2]} RGB")
    print(f"cache: {cache_dir()}")
    if args.preview:
        args.preview.parent.mkdir(parents=True, exist_ok=True)
        montage(splits[args.split]).save(args.preview)
        print(f"wrote {args.preview}")
    return 0
