"""Training data from one's own labelled photos: a class-per-folder tree, a labels CSV, or a Camtrap DP package.

Every source becomes a list of :class:`LabelledImage` (file, label, group), split
deterministically by *group* (the camera or deployment, where the source says so: test cameras
are never training cameras; else each file is its own group), then decoded by the node's own
:func:`shared.imaging.decode_pixels` at the model's input size, so training sees exactly what a
node will see. A file that cannot be read or decoded is skipped and counted before training
starts, so a bad file never stops an epoch halfway.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgeprune.dataset import SPLITS, FrameSplit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BLANK = "blank"
TEST_FRACTION = VAL_FRACTION = 0.1
SHOWN_FAILURES = 5  # how many unreadable file names a report lists


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    group: str = ""  # camera / deployment; "" = unknown (the file is its own group)
    split: str = ""  # a split the source fixes ("train", "val", "test"); "" = chosen by group


@dataclass
class OwnData:
    """Decoded splits plus everything a user should see before trusting them."""

    splits: dict[str, FrameSplit]
    class_names: tuple[str, ...]
    scientific_names: tuple[str, ...]
    split_by: str                                   # "deployment", "camera column" or "file"
    unreadable: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # rows left out before decoding, by reason


# --- sources ---------------------------------------------------------------------------------------


def scan_folder(root: Path) -> list[LabelledImage]:
    """One sub-folder per class (``root/fox/IMG_1.JPG``), the layout every image tool knows."""
    if not root.is_dir():
        raise SystemExit(f"--images {root}: not a folder")
    items = [LabelledImage(path, folder.name) for folder in sorted(p for p in root.iterdir() if p.is_dir())
             for path in sorted(folder.rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    if not items:
        raise SystemExit(f"--images {root}: no .jpg/.png files in class sub-folders (expected {root}/<class>/<file>)")
    return items


def read_labels_csv(path: Path, path_column: str = "path", label_column: str = "label",
                    group_column: str | None = None, split_column: str | None = None) -> list[LabelledImage]:
    """A CSV with a file column (relative to the CSV's folder, or absolute) and a label column; optionally a
    group column (camera, site, photo) and a split column that fixes each row's split (a set's own split)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        wanted = [c for c in (path_column, label_column, group_column, split_column) if c]
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"--labels {path}: no column {', '.join(missing)} (columns: {reader.fieldnames}); "
                             "choose them with --path-column / --label-column / --group-column / --split-column")
        items = [LabelledImage(path.parent / row[path_column], row[label_column].strip(),
                               row[group_column] if group_column else "",
                               row[split_column].strip() if split_column else "")
                 for row in reader if row[path_column] and row[label_column].strip()]
    bad = sorted({item.split for item in items if split_column and item.split not in SPLITS})
    if bad:
        raise SystemExit(f"--labels {path}: column {split_column} holds {bad}; every row needs one of {SPLITS}")
    return items


def read_camtrap_dp(root: Path) -> tuple[list[LabelledImage], dict[str, str], Counter]:
    """A Camtrap DP package: each media file labelled by its observations; (items, vernacular names, skipped).

    ``observationType`` blank gives the label ``blank``; animal observations give their
    ``scientificName``. Event-level observations (no ``mediaID``) label every media file of their
    deployment timed within the event. A file whose observations disagree, or that has none usable
    (human, vehicle, unknown, no scientific name), is left out and counted. The split is by deployment.
    """
    folder = root.parent if root.is_file() else root
    for name in ("media.csv", "observations.csv"):
        if not (folder / name).exists():
            raise SystemExit(f"--camtrap-dp {root}: no {name} "
                             "(a Camtrap DP package has media.csv and observations.csv)")
    media = _read_csv(folder / "media.csv")
    labels: dict[str, set[str]] = {row["mediaID"]: set() for row in media}
    events = []
    for obs in _read_csv(folder / "observations.csv"):
        label = _observation_label(obs)
        if obs.get("mediaID"):
            labels.setdefault(obs["mediaID"], set()).add(label)
        else:
            events.append((obs.get("deploymentID", ""), obs.get("eventStart", ""), obs.get("eventEnd", ""), label))
    for row in media:
        for deployment, start, end, label in events:
            if row.get("deploymentID") == deployment and start <= row.get("timestamp", "") <= end:
                labels[row["mediaID"]].add(label)
    items, skipped = [], Counter()
    for row in media:
        found = labels[row["mediaID"]]
        usable = found - {None}
        if not found:
            skipped["no observation"] += 1
        elif not usable:
            skipped["no usable observation (human, vehicle, unknown or no scientificName)"] += 1
        elif len(usable) > 1:
            skipped["observations disagree (several species)"] += 1
        else:
            items.append(LabelledImage(folder / row["filePath"], usable.pop(), row.get("deploymentID", "")))
    return items, _vernacular_names(folder / "datapackage.json"), skipped


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def _observation_label(obs: dict[str, str]) -> str | None:
    kind = (obs.get("observationType") or "").strip()
    if kind == "blank":
        return BLANK
    name = (obs.get("scientificName") or "").strip()
    return name if kind == "animal" and name else None


def _vernacular_names(datapackage: Path) -> dict[str, str]:
    """scientificName -> English common name from the package's ``taxonomic`` list, where given."""
    if not datapackage.exists():
        return {}
    try:
        taxa = json.loads(datapackage.read_text()).get("taxonomic", [])
        return {t["scientificName"]: t.get("vernacularNames", {}).get("eng", "") for t in taxa
                if isinstance(t, dict) and t.get("scientificName") and isinstance(t.get("vernacularNames", {}), dict)}
    except (ValueError, AttributeError):
        return {}


# --- split, decode, report -------------------------------------------------------------------------


def _stable_hash(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_by_group(items: Sequence[LabelledImage], seed: int = 0) -> dict[str, list[int]]:
    """Indices per split: whole groups go to test, then val, until each holds ~10% of the files.

    Groups are ordered by a seeded hash of their name (items without a group by their path), so
    the split depends neither on file order nor on which other files exist, and one camera never
    lands in two splits. Items whose source fixes their split (``item.split``) keep it.
    """
    if any(item.split for item in items):
        return {name: [i for i, item in enumerate(items) if item.split == name] for name in SPLITS}
    keys = [item.group or str(item.path) for item in items]
    by_group: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_group.setdefault(key, []).append(i)
    order = sorted(by_group, key=lambda g: _stable_hash(g, seed))
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    targets = {"test": TEST_FRACTION * len(items), "val": VAL_FRACTION * len(items)}
    for position, group in enumerate(order):
        name = next((s for s in ("test", "val") if len(out[s]) < targets[s]), "train")
        if position == len(order) - 1 and not out["train"]:
            name = "train"  # never leave training without data
        out[name].extend(by_group[group])
    return out


def decode_all(paths: Sequence[Path], size: int, fit: str, threads: int = 2,
               progress: bool = True) -> tuple[np.ndarray, list[bool]]:
    """(N x size x size x 3 uint8 with zeros where unreadable, readable flags), decoded as a node decodes."""
    from shared.imaging import decode_pixels
    from shared.schemas import BadMessage

    def load(path: Path) -> np.ndarray | None:
        try:
            return decode_pixels(path.read_bytes(), size, fit)
        except (OSError, BadMessage):
            return None

    images = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = [False] * len(paths)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i, pixels in enumerate(tqdm(pool.map(load, paths), total=len(paths), desc="decoding images",
                                        unit="img", disable=not progress)):
            if pixels is not None:
                images[i], ok[i] = pixels, True
    return images, ok


def build_own_data(items: Sequence[LabelledImage], size: int, fit: str, seed: int = 0, threads: int = 2,
                   progress: bool = True, vernacular: dict[str, str] | None = None,
                   skipped: Counter | None = None, split_by: str = "file") -> OwnData:
    """Decode, drop unreadable files (counted), index the classes (sorted; ``blank`` first) and split."""
    if not items:
        raise SystemExit("no labelled images found")
    images, ok = decode_all([item.path for item in items], size, fit, threads, progress)
    unreadable = [str(item.path) for item, good in zip(items, ok) if not good]
    kept = [item for item, good in zip(items, ok) if good]
    images = images[np.asarray(ok, bool)]
    labels = sorted({item.label for item in kept}, key=lambda name: (name != BLANK, name))
    if len(labels) < 2:
        raise SystemExit(f"need at least two classes with readable images, found {labels}")
    index = {name: i for i, name in enumerate(labels)}
    targets = np.asarray([index[item.label] for item in kept], np.int64)
    vernacular = vernacular or {}
    if vernacular:  # Camtrap DP: the label is the scientific name; show the common one where known
        class_names = tuple(vernacular.get(name) or name for name in labels)
        scientific = tuple("" if name == BLANK else name for name in labels)
        if len(set(class_names)) != len(class_names):
            class_names = tuple(labels)
    else:
        class_names, scientific = tuple(labels), ("",) * len(labels)
    splits = {name: FrameSplit(images[idx], targets[idx], np.zeros(len(idx), bool))
              for name, idx in ((n, np.asarray(i, np.int64)) for n, i in split_by_group(kept, seed).items())}
    return OwnData(splits, class_names, scientific, split_by, unreadable, skipped or Counter())


def load_source(kind: str, path: Path, size: int, fit: str, seed: int = 0, threads: int = 2, progress: bool = True,
                path_column: str = "path", label_column: str = "label", group_column: str | None = None,
                split_column: str | None = None) -> OwnData:
    """One of the three sources (``images``, ``labels``, ``camtrap-dp``), decoded and split."""
    if kind == "images":
        return build_own_data(scan_folder(path), size, fit, seed, threads, progress)
    if kind == "labels":
        items = read_labels_csv(path, path_column, label_column, group_column, split_column)
        split_by = f"column {split_column}" if split_column else f"column {group_column}" if group_column else "file"
        return build_own_data(items, size, fit, seed, threads, progress, split_by=split_by)
    if kind == "camtrap-dp":
        items, vernacular, skipped = read_camtrap_dp(path)
        return build_own_data(items, size, fit, seed, threads, progress, vernacular, skipped, "deployment")
    raise ValueError(f"unknown source {kind!r}")


def balance_report(data: OwnData) -> str:
    """Images per class and split, the readable-file count, and what was skipped and why."""
    from edgeprune.tables import format_table

    rows = []
    for i, name in enumerate(data.class_names):
        counts = {split: int((data.splits[split].labels == i).sum()) for split in SPLITS}
        total = sum(counts.values())
        rows.append({"class": name, **counts, "total": total})
    n = sum(r["total"] for r in rows)
    for r in rows:
        r["share"] = f"{r['total'] / n:.1%}"
    lines = [format_table(f"Class balance ({n} images; split by {data.split_by})", rows)]
    if data.unreadable:
        shown = ", ".join(data.unreadable[:SHOWN_FAILURES])
        more = f" and {len(data.unreadable) - SHOWN_FAILURES} more" if len(data.unreadable) > SHOWN_FAILURES else ""
        lines.append(f"skipped {len(data.unreadable)} unreadable or corrupt file(s): {shown}{more}")
    for reason, count in sorted(data.skipped.items()):
        lines.append(f"left out {count} media file(s): {reason}")
    smallest = min(rows, key=lambda r: r["train"])
    if smallest["train"] < 10:
        lines.append(f"warning: class {smallest['class']!r} has only {smallest['train']} training images")
    return "\n".join(lines)


def per_class_report(predicted: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Precision and recall per class (``nan`` where a class was never predicted / never present)."""
    rows = []
    for i, name in enumerate(class_names):
        tp = int(((predicted == i) & (labels == i)).sum())
        pred, true = int((predicted == i).sum()), int((labels == i).sum())
        rows.append({"class": name, "frames": true, "precision": tp / pred if pred else float("nan"),
                     "recall": tp / true if true else float("nan")})
    return rows



def splits_for_checkpoint(checkpoint: Path | None, threads: int = 2, progress: bool = True) -> dict[str, FrameSplit]:
    """The frames a checkpoint was trained on, split as in training: its own photos, else the synthetic set.

    `edgeprune calibrate` measures the accuracy model on these (the validation split), so a model of
    one's own photos is calibrated on one's own photos, not on the synthetic frames.
    """
    from edgeprune.dataset import RenderConfig, load_frames
    from shared.model import DEFAULT_CHECKPOINT, TrapNetConfig, load_checkpoint

    path = checkpoint or DEFAULT_CHECKPOINT
    state = load_checkpoint(path) if path.exists() else {}
    config = TrapNetConfig.from_dict(state.get("config", {}))
    data = state.get("meta", {}).get("data", {})
    if data.get("source") in ("images", "labels", "camtrap-dp"):
        return load_source(data["source"], Path(data["path"]), config.input_size, config.resize, data.get("seed", 0),
                           threads, progress, data.get("path_column", "path"), data.get("label_column", "label"),
                           data.get("group_column"), data.get("split_column")).splits
    return load_frames(RenderConfig(size=config.input_size, blank_fraction=data.get("blank_fraction", 0.0)))
