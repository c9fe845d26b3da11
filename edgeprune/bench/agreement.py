"""EfficientNet-Lite0 under run-time pruning: the raw ImageNet weights on real photos, a fine-tuned model on its
held-out split.

``raw_pretrained``: real photos found offline (scikit-image's samples, Debian's ``darknet`` photos
when installed, any ``--photos`` folder), four views each (as is, mirrored, two 80 % corner crops),
through the pipeline of ``--slices`` pruned uniformly to each ratio; top-1 agreement is the pruned
top-1 equal to the unpruned top-1, top-5 the unpruned top-1 within the pruned top 5. There are no
labels here: agreement with the unpruned model is what pruning costs.

``finetuned`` (with ``--finetuned CKPT``): accuracy on the test split of the data the checkpoint was
trained on (recorded in it), unpruned and at each ratio with its BatchNorm tables, relative to the
unpruned; ``--scratch CKPT`` adds a model trained from scratch on the same data for comparison.
Everything runs through the node's own :class:`shared.pruning.PrunableSlice`.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.bench.pruning import parse_slices
from shared.model import IMAGENET_CHECKPOINT, BlockNet, build_model
from shared.pruning import PrunableSlice, pipeline_logits

RATIOS = (0.1, 0.3, 0.5)
DARKNET_PHOTOS = Path("/usr/share/darknet/data")  # Debian's darknet package: GPL-3.0+ or MIT or WTFPL
SKIMAGE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")  # scikit-image's data (their licences: its docs)
CROP = 0.8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", type=Path, action="append", default=[],
                        help="a folder of extra .jpg/.png photos for the raw agreement (repeatable)")
    parser.add_argument("--slices", default="0-2,3-4,5-7", help="the pipeline's slices (default: three nodes)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="uniform ratios to measure")
    parser.add_argument("--finetuned", type=Path, help="a Lite0 checkpoint fine-tuned with `edgeprune train`")
    parser.add_argument("--scratch", type=Path, help="the same data trained --from scratch, for comparison")


def photo_bytes(extra: list[Path]) -> dict[str, bytes]:
    """Name -> encoded photo, from every offline source present."""
    from shared.imaging import encode_jpeg

    found: dict[str, bytes] = {}
    try:
        from skimage import data

        found.update({f"skimage/{name}": encode_jpeg(getattr(data, name)(), quality=92) for name in SKIMAGE_PHOTOS})
    except ImportError:
        pass
    for folder in [DARKNET_PHOTOS, *extra]:
        if folder.is_dir():
            found.update({f"{folder.name}/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())
                          if p.suffix.lower() in (".jpg", ".jpeg", ".png")})
    if not found:
        raise SystemExit("no photos: install scikit-image (the train extra) or Debian's darknet, or pass --photos")
    return found


def views(payload: bytes, model: BlockNet) -> torch.Tensor:
    """The photo as is, mirrored, and its top-left and bottom-right 80 % crops, as model inputs (4 x 3 x N x N)."""
    from PIL import Image

    from shared.imaging import decode_frame, encode_jpeg

    rgb = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    h, w = rgb.shape[:2]
    ch, cw = int(h * CROP), int(w * CROP)
    crops = [rgb, rgb[:, ::-1], rgb[:ch, :cw], rgb[h - ch:, w - cw:]]
    return torch.from_numpy(np.concatenate([decode_frame(encode_jpeg(np.ascontiguousarray(c), quality=92),
                                                         **model.config.preprocessing()) for c in crops]))


def stages(model: BlockNet, slices: list[tuple[int, int]], ratios: tuple[float, ...]) -> list[PrunableSlice]:
    return [PrunableSlice(model, a, b, ladder=ratios, input_size=model.config.input_size) for a, b in slices]


def raw_agreement(photos: dict[str, bytes], slices, ratios) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    model = build_model(IMAGENET_CHECKPOINT)
    inputs = torch.cat([views(p, model) for p in photos.values()])
    pipeline = stages(model, slices, ratios)
    full = pipeline_logits(pipeline, [0.0] * len(slices), inputs, batch=16).argmax(1)
    rows, out = [], {}
    for ratio in ratios:
        logits = pipeline_logits(pipeline, [ratio] * len(slices), inputs, batch=16)
        top1 = float((logits.argmax(1) == full).float().mean())
        top5 = float((logits.topk(5, 1).indices == full[:, None]).any(1).float().mean())
        out[f"{ratio:g}"] = {"top1": top1, "top5": top5}
        rows.append({"ratio": ratio, "top1_agreement": top1, "top5_agreement": top5})
    return {"images": len(inputs), "photos": sorted(photos), "views_per_photo": 4, "ratios": out}, rows


def split_accuracy(model: BlockNet, slices, ratio: float, pipeline: list[PrunableSlice], test) -> float:
    from edgeprune.dataset import to_model_input

    inputs = to_model_input(test.images, model.config.mean, model.config.std)
    logits = pipeline_logits(pipeline, [ratio] * len(slices), inputs, batch=32)
    return float((logits.argmax(1).numpy() == test.labels).mean())


def finetuned_accuracy(path: Path, scratch: Path | None, slices, ratios) -> tuple[dict[str, Any], list[dict]]:
    from edgeprune.own_data import splits_for_checkpoint
    from shared.model import load_checkpoint

    test = splits_for_checkpoint(path, threads=1, progress=False)["test"]
    model = build_model(path)
    pipeline = stages(model, slices, ratios)
    full = split_accuracy(model, slices, 0.0, pipeline, test)
    rows = [{"model": "fine-tuned", "ratio": 0.0, "accuracy": full, "relative_accuracy": 1.0}]
    out: dict[str, Any] = {}
    for ratio in ratios:
        acc = split_accuracy(model, slices, ratio, pipeline, test)
        out[f"{ratio:g}"] = {"accuracy": acc, "relative_accuracy": acc / full if full else float("nan")}
        rows.append({"model": "fine-tuned", "ratio": ratio, "accuracy": acc, **out[f"{ratio:g}"]})
    scratch_acc = None
    if scratch is not None:
        scratch_model = build_model(scratch)
        scratch_acc = split_accuracy(scratch_model, slices, 0.0, stages(scratch_model, slices, ()), test)
        rows.append({"model": "from scratch", "ratio": 0.0, "accuracy": scratch_acc})
    data = load_checkpoint(path).get("meta", {}).get("data", {})
    source = Path(data.get("path", "?"))  # a labels CSV is named by its folder too: real5/labels.csv
    name = "/".join(source.parts[-2:]) if data.get("source") == "labels" else source.name
    return {"dataset": name, "classes": model.config.num_classes, "images": len(test),
            "full_accuracy": full, "scratch_accuracy": scratch_acc, "ratios": out}, rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    slices = parse_slices(args.slices)
    ratios = tuple(sorted(float(r) for r in args.ratios.split(",")))
    photos = photo_bytes(args.photos)
    raw, raw_rows = raw_agreement(photos, slices, ratios)
    tables = {f"Raw ImageNet weights: agreement with unpruned ({raw['images']} views of {len(photos)} photos)":
              raw_rows}
    finetuned = None
    if args.finetuned is not None:
        finetuned, rows = finetuned_accuracy(args.finetuned, args.scratch, slices, ratios)
        tables[f"Fine-tuned: accuracy on its test split ({finetuned['images']} images)"] = rows
    return {"tables": tables, "raw_pretrained": raw, "finetuned": finetuned, "slices": [list(s) for s in slices]}
