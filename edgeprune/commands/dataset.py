"""``edgeprune dataset``: build (or reuse) the cached camera-trap frames and show a preview; ``--real-photos``
assembles the labelled real-photo set from Debian packages instead, ``--unlabelled`` their other photos
(:mod:`edgeprune.real_photos`)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("dataset", help="build the cached camera-trap frames; --preview writes a montage PNG")
    p.add_argument("--preview", type=Path, metavar="PNG", help="write a labelled montage of test frames")
    p.add_argument("--seed", type=int, default=0, help="render and split seed")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split shown by --preview")
    p.add_argument("--real-photos", type=Path, metavar="DIR",
                   help="instead: write the labelled real animal photos of Debian's gcompris-qt-data, "
                        "tuxpaint-stamps-default and darknet to DIR (DIR/labels.csv: path, label, photo, split; "
                        "docs/own-data.md)")
    p.add_argument("--views", type=int, default=6, help="--real-photos: views per photo (whole, then random crops)")
    p.add_argument("--unlabelled", type=Path, metavar="DIR",
                   help="instead: write the same packages' other photos (none of the labelled ones) to DIR, "
                        "for `train --unlabelled` (distillation of the pruned widths)")
    p.set_defaults(func=run)


def real_photos(out: Path, n_views: int, seed: int) -> int:
    from edgeprune.tables import format_table
    from edgeprune.dataset import _backgrounds
    from edgeprune.real_photos import PACKAGES, assemble, load_photos

    try:
        # cut-outs go onto the tinted grass, gravel, brick and sand textures, not the rocket or flower photos
        counts = assemble(out, load_photos(), _backgrounds()[:4], n_views, seed)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}\ninstall the photos' packages first: apt-get install {' '.join(PACKAGES)}") from exc
    rows = [{"class": label, **per, "photos": sum(per.values())} for label, per in counts.items()]
    print(format_table(f"Real photos by split ({n_views} views each)", rows))
    print(f"wrote {out / 'labels.csv'}; train with: edgeprune train --arch efficientnet-lite0 "
          f"--labels {out / 'labels.csv'} --split-column split --out CHECKPOINT")
    return 0


def unlabelled(out: Path, seed: int) -> int:
    from edgeprune.dataset import _backgrounds
    from edgeprune.real_photos import PACKAGES, load_photos, unlabelled_photos, write_unlabelled

    try:
        n = write_unlabelled(out, unlabelled_photos(load_photos()), _backgrounds()[:4], seed)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}\ninstall the photos' packages first: apt-get install {' '.join(PACKAGES)}") from exc
    print(f"wrote {n} unlabelled photos to {out}; distil on them with: edgeprune train ... --unlabelled {out}")
    return 0


def run(args) -> int:
    if args.real_photos:
        return real_photos(args.real_photos, args.views, args.seed)
    if args.unlabelled:
        return unlabelled(args.unlabelled, args.seed)
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
