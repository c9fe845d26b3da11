"""``edgeprune classify IMG…``: what the model makes of your photos, decoded exactly as a node decodes them.

Without ``--checkpoint`` it runs the ImageNet-pretrained EfficientNet-Lite0 (1000 classes), which
knows real photographs; ``--checkpoint trapnet`` runs the pipeline's default model instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TOP_K = 3


def register(sub) -> None:
    p = sub.add_parser("classify", help="classify image files with a checkpoint, as the pipeline would",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, metavar="IMG", help="JPEG or PNG files")
    p.add_argument("--checkpoint", type=checkpoint_path, default="imagenet",
                   help="model checkpoint: a .pt file, 'trapnet' (the pipeline's default model) or 'imagenet' "
                        "(EfficientNet-Lite0, ImageNet-1k classes)")
    p.add_argument("--ratios", help="prune ratios, one per block (e.g. 0.3/0.3/0.3/0.5/0.5/0.5) or one for all: "
                   "classify as a pipeline pruned that way would (each block its own slice, entry tables applied)")
    p.add_argument("--json", action="store_true", help='print [{"image", "label", "confidence", "top3"}] instead')
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(func=run)


def checkpoint_path(text: str) -> Path:
    """``--checkpoint``: a file, or the name of a shipped model."""
    from shared.model import DEFAULT_CHECKPOINT, IMAGENET_CHECKPOINT

    return {"trapnet": DEFAULT_CHECKPOINT, "imagenet": IMAGENET_CHECKPOINT}.get(text, Path(text))


def parse_ratios(text: str | None, n_blocks: int) -> list[float]:
    """``--ratios``: one ratio per block, or a single one for every block; all zero when absent."""
    if not text:
        return [0.0] * n_blocks
    try:
        ratios = [float(r) for r in text.replace(",", "/").split("/")]
    except ValueError:
        raise SystemExit(f"--ratios {text!r}: not numbers separated by '/'") from None
    if len(ratios) == 1:
        ratios *= n_blocks
    if len(ratios) != n_blocks or not all(0 <= r < 1 for r in ratios):
        raise SystemExit(f"--ratios needs one ratio in [0, 1) or {n_blocks} of them (one per block), got {text!r}")
    return ratios


def classify(model, inputs, ratios: list[float]) -> list[list[tuple[str, float]]]:
    """The top-``TOP_K`` (label, probability) of each decoded frame; ``ratios`` per block, as a pruned pipeline runs."""
    import torch

    from shared.pruning import DEFAULT_LADDER, PrunableSlice, pipeline_logits

    with torch.inference_mode():
        if any(ratios):
            ladder = tuple(sorted(set(DEFAULT_LADDER) | set(ratios)))
            blocks = [PrunableSlice(model, b, b, ladder=ladder, input_size=model.config.input_size)
                      for b in range(model.n_blocks)]
            logits = pipeline_logits(blocks, ratios, inputs)
        else:
            logits = model(inputs)
        probs = torch.softmax(logits.float(), dim=1)
    top = torch.topk(probs, min(TOP_K, probs.shape[1]), dim=1)
    names = model.config.class_names
    return [[(names[int(i)], float(p)) for p, i in zip(ps, idx)] for ps, idx in zip(top.values, top.indices)]


def run(args) -> int:
    import json
    import sys

    import torch

    from shared.imaging import decode_frame
    from shared.model import build_model
    from shared.schemas import BadMessage

    torch.set_num_threads(args.threads)
    model = build_model(args.checkpoint)
    ratios = parse_ratios(args.ratios, model.n_blocks)
    readable, frames, failed = [], [], 0
    for path in args.images:  # the node's own decoding; an unreadable file is reported, the rest classified
        try:
            frames.append(torch.from_numpy(decode_frame(path.read_bytes(), **model.config.preprocessing())))
        except (OSError, BadMessage) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        readable.append(path)
    tops = classify(model, torch.cat(frames), ratios) if frames else []
    if args.json:
        print(json.dumps([{"image": str(path), "label": top[0][0], "confidence": round(top[0][1], 4),
                           "top3": [{"label": name, "confidence": round(p, 4)} for name, p in top]}
                          for path, top in zip(readable, tops)], indent=1))
    else:
        for path, top in zip(readable, tops):
            rest = "\t".join(f"{name}:{p:.3f}" for name, p in top)
            print(f"{path}\t{top[0][0]}\t{top[0][1]:.3f}\t{rest}")
    return 1 if failed else 0
