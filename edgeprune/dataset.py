"""Camera-trap-like frames built offline from animal silhouettes and bundled photos.

Nothing is downloaded: the silhouettes are the 10,000 28x28 images shipped inside the PyPI
package ``animal-mnist`` (read directly, its loader imports TensorFlow); the backgrounds are
the CC0 photos bundled with scikit-image and scikit-learn. Each frame pastes one silhouette,
recoloured and scaled, onto a random crop of a background, then either keeps daylight colour
or turns it into a dark, grainy, grayscale infrared "night" shot, as camera traps do.

Everything is a pure function of the seed, so every machine builds the same frames; the
result is cached as ``.npz`` under :func:`cache_dir` (never inside the package). The split is
by silhouette (80/10/10 after a seeded shuffle; the files are stored sorted by class), so no
silhouette of the test split is ever seen in training.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.imaging import encode_png, normalise
from shared.model import CLASS_NAMES, INPUT_SIZE, MEAN, SCIENTIFIC_NAMES, STD

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
CACHE_ENV = "EDGEPRUNE_CACHE_DIR"
# Bump when the rendering changes: the cache key includes it, so stale frames are never reused.
RENDER_VERSION = 2
BLANK = "blank"


@dataclass(frozen=True)
class RenderConfig:
    """Knobs of the frame renderer; all of them enter the cache key."""

    size: int = INPUT_SIZE
    night_fraction: float = 0.3
    min_scale: float = 0.55   # animal height as a fraction of the frame
    max_scale: float = 0.95
    seed: int = 0
    # extra frames with no animal (class "blank"), as a share of the animal frames; 0 = the ten classes only
    blank_fraction: float = 0.0


@dataclass(frozen=True)
class FrameSplit:
    """One split: HxWx3 uint8 frames, class indices, and which frames are night shots."""

    images: np.ndarray
    labels: np.ndarray
    night: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask_or_index: np.ndarray) -> FrameSplit:
        return FrameSplit(self.images[mask_or_index], self.labels[mask_or_index], self.night[mask_or_index])


def cache_dir() -> Path:
    """``$EDGEPRUNE_CACHE_DIR`` or ``~/.cache/edgeprune``: built data never lands in the source tree."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgeprune")


def load_silhouettes() -> tuple[np.ndarray, np.ndarray]:
    """(10000x28x28 uint8 white-on-black silhouettes, labels 0..9) from the installed package files."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package animal-mnist is missing: pip install --no-deps animal-mnist==0.4")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    # These two files are package data installed from PyPI, not input from the network.
    with gzip.open(folder / "animal_data_version_3.gz") as fh:
        images = np.asarray(pickle.load(fh), dtype=np.uint8)
    with gzip.open(folder / "animal_label_version_3.gz") as fh:
        labels = np.asarray(pickle.load(fh), dtype=np.int64)
    if images.shape != (len(labels), 28, 28) or labels.max() >= len(CLASS_NAMES):
        raise RuntimeError(f"unexpected animal-mnist content: images {images.shape}, labels {labels.shape}")
    return images, labels


def split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded shuffle then 80/10/10: the labels are stored sorted, so never split in file order."""
    order = np.random.default_rng(seed).permutation(n)
    ends = np.cumsum([round(f * n) for f in SPLIT_FRACTIONS])
    ends[-1] = n
    starts = np.concatenate([[0], ends[:-1]])
    return {name: np.sort(order[a:b]) for name, a, b in zip(SPLITS, starts, ends)}


def synthetic_class_names(blank_fraction: float = 0.0) -> tuple[str, ...]:
    """The synthetic set's classes: the ten animals, and ``blank`` (index 10) when it renders empty frames."""
    return CLASS_NAMES + ((BLANK,) if blank_fraction > 0 else ())


def synthetic_scientific_names(blank_fraction: float = 0.0) -> tuple[str, ...]:
    """The taxa of :func:`synthetic_class_names`, in the same order (``blank`` has none)."""
    return SCIENTIFIC_NAMES + (("",) if blank_fraction > 0 else ())


def load_raw_silhouettes(seed: int = 0) -> dict[str, FrameSplit]:
    """The raw silhouettes as gray RGB frames (28x28), same split: the fast fixture for tests."""
    images, labels = load_silhouettes()
    rgb = np.repeat(images[..., None], 3, axis=3)
    return {name: FrameSplit(rgb[idx], labels[idx], np.zeros(len(idx), bool))
            for name, idx in split_indices(len(labels), seed).items()}


def _backgrounds() -> list[np.ndarray]:
    """Outdoor-ish RGB photos; gray textures are tinted to look like grass, soil, sand and wall."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    def tint(gray: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
        return np.clip(gray[..., None].astype(np.float32) * np.asarray(rgb, np.float32), 0, 255).astype(np.uint8)

    photos = [tint(data.grass(), (0.75, 1.0, 0.55)), tint(data.gravel(), (1.0, 0.9, 0.75)),
              tint(data.brick(), (1.0, 0.8, 0.7)), tint(data.moon(), (1.05, 0.95, 0.75)),
              data.rocket()]
    photos += list(load_sample_images().images)  # china.jpg, flower.jpg
    return photos


DARK_COATS = np.asarray([[120, 85, 50], [70, 60, 50], [100, 100, 95], [40, 35, 30]], np.float32)
LIGHT_COATS = np.asarray([[160, 130, 90], [190, 170, 140], [210, 200, 185], [230, 220, 200]], np.float32)


def _fur(rng: np.random.Generator, size: int, behind: np.ndarray) -> np.ndarray:
    """A coat colour with low-frequency mottling, darker or lighter than the ground ``behind`` it.

    A labelled camera-trap frame shows its animal; a coat that matches the ground would make
    the label unlearnable rather than realistic.
    """
    coats = DARK_COATS if behind.mean() > 110 else LIGHT_COATS
    base = coats[rng.integers(len(coats))] * rng.uniform(0.85, 1.15, 3)
    blotch = np.asarray(Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    return base[None, None, :] * (0.75 + 0.5 * blotch[..., None])


def render_frame(silhouette: np.ndarray | None, backgrounds: list[np.ndarray], rng: np.random.Generator,
                 config: RenderConfig, night: bool) -> np.ndarray:
    """One camera-trap-like HxWx3 uint8 frame: a recoloured silhouette on a random background crop.

    ``silhouette`` None renders a *blank* frame: the same background, light and noise, no animal
    (most real trap frames are such false triggers).
    """
    s = config.size
    photo = backgrounds[rng.integers(len(backgrounds))]
    crop = int(rng.uniform(0.25, 0.9) * min(photo.shape[:2]))
    y0 = rng.integers(photo.shape[0] - crop + 1)
    x0 = rng.integers(photo.shape[1] - crop + 1)
    bg = Image.fromarray(photo[y0:y0 + crop, x0:x0 + crop]).resize((s, s), Image.Resampling.BILINEAR)
    frame = np.asarray(bg, np.float32) * rng.uniform(0.7, 1.2) + rng.uniform(-20, 20, 3)

    side = max(8, int(rng.uniform(config.min_scale, config.max_scale) * s))
    if silhouette is None:  # blank: nothing pasted, and the night flash lights no subject
        alpha = np.zeros((side, side, 1), np.float32)
        top = rng.integers(0, s - side + 1)
        left = rng.integers(0, s - side + 1)
    else:  # the draws keep their order, so every animal frame renders as it did before blanks existed
        sil = silhouette[:, ::-1] if rng.random() < 0.5 else silhouette
        alpha = np.asarray(Image.fromarray(np.ascontiguousarray(sil)).resize(
            (side, side), Image.Resampling.BILINEAR), np.float32)[..., None] / 255.0
        top = rng.integers(0, s - side + 1)
        left = rng.integers(0, s - side + 1)
        region = frame[top:top + side, left:left + side]
        frame[top:top + side, left:left + side] = region * (1 - alpha) + _fur(rng, side, region) * alpha

    if night:
        # Infrared flash: near subject bright, scene dark, no colour, strong sensor noise.
        gray = frame @ np.asarray([0.299, 0.587, 0.114], np.float32)
        lit = np.clip(alpha[..., 0] * 2.0, 0, 1)
        gain = np.full((s, s), rng.uniform(0.15, 0.3), np.float32)
        gain[top:top + side, left:left + side] += lit * rng.uniform(0.6, 1.0)
        gray = gray * gain + rng.normal(0, rng.uniform(5, 10), (s, s))
        frame = gray[..., None] * np.asarray([1.0, 1.0, rng.uniform(0.9, 1.05)], np.float32)
    else:
        frame = frame + rng.normal(0, rng.uniform(2, 6), frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def _cache_path(config: RenderConfig) -> Path:
    fields = asdict(config)
    if not config.blank_fraction:
        del fields["blank_fraction"]  # sets without blanks keep the key (and cache) they had before blanks existed
    key = json.dumps({"v": RENDER_VERSION, **fields}, sort_keys=True)
    return cache_dir() / f"frames-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def build_frames(config: RenderConfig) -> dict[str, FrameSplit]:
    """Render every split; frame ``i`` of the file uses its own generator, so order never matters."""
    images, labels = load_silhouettes()
    backgrounds = _backgrounds()
    out: dict[str, FrameSplit] = {}
    for name, idx in split_indices(len(labels), config.seed).items():
        frames = np.empty((len(idx), config.size, config.size, 3), np.uint8)
        night = np.empty(len(idx), bool)
        for k, i in enumerate(idx):
            rng = np.random.default_rng([config.seed, int(i)])
            night[k] = rng.random() < config.night_fraction
            frames[k] = render_frame(images[i], backgrounds, rng, config, bool(night[k]))
        out[name] = FrameSplit(frames, labels[idx], night)
    n_blank = round(config.blank_fraction * len(labels))
    for name, idx in split_indices(n_blank, config.seed).items():  # blank frame j uses generator [seed, n + j]
        frames = np.empty((len(idx), config.size, config.size, 3), np.uint8)
        night = np.empty(len(idx), bool)
        for k, j in enumerate(idx):
            rng = np.random.default_rng([config.seed, len(labels) + int(j)])
            night[k] = rng.random() < config.night_fraction
            frames[k] = render_frame(None, backgrounds, rng, config, bool(night[k]))
        blank = np.full(len(idx), len(CLASS_NAMES), np.int64)
        out[name] = FrameSplit(np.concatenate([out[name].images, frames]),
                               np.concatenate([out[name].labels, blank]), np.concatenate([out[name].night, night]))
    return out


def load_frames(config: RenderConfig = RenderConfig()) -> dict[str, FrameSplit]:
    """The camera-trap frames, from the cache or rendered once (a few seconds) and cached."""
    path = _cache_path(config)
    if path.exists():
        with np.load(path) as z:
            return {name: FrameSplit(z[f"{name}_images"], z[f"{name}_labels"], z[f"{name}_night"])
                    for name in SPLITS}
    splits = build_frames(config)
    _write_cache(path, splits)
    return splits


def _write_cache(path: Path, splits: dict[str, FrameSplit]) -> None:
    """Atomically, through a temporary file of this writer's own: two processes (a benchmark's cameras, two
    benchmarks) may render the same frames at once, and a shared temporary name made one's rename fail."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp.npz")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez_compressed(out, **{f"{name}_{field}": getattr(split, field)
                                        for name, split in splits.items() for field in ("images", "labels", "night")})
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LabelledFrames:
    """Test-split frames in a seeded order as PNG, with their class index: a camera's frame source for benchmarks
    (`edgeprune camera --labelled`, :data:`camera.simulator.FrameSource`). Renders or reads the cached set here, before
    the camera connects."""

    def __init__(self, seed: int):
        test = load_frames()["test"]
        self.images, self.labels = test.images, test.labels
        self.order = np.random.default_rng([seed, 2]).permutation(len(self.labels))
        self.next = 0

    def __call__(self) -> tuple[bytes, int]:
        index = self.order[self.next % len(self.order)]
        self.next += 1
        return encode_png(self.images[index]), int(self.labels[index])


def to_model_input(images: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32, through the node's own :func:`normalise`
    (with the model's ``mean``/``std``: ``TrapNetConfig``)."""
    return torch.from_numpy(np.concatenate([normalise(img, mean, std) for img in images]))


def montage(split: FrameSplit, rows: int = 6, cols: int = 8, zoom: int = 2) -> Image.Image:
    """A labelled grid of a seeded sample of frames, so a person can see what the model sees."""
    from PIL import ImageDraw

    n = min(rows * cols, len(split))
    shown = split.subset(np.sort(np.random.default_rng(0).choice(len(split), n, replace=False)))
    h, w = split.images.shape[1:3]
    cell_h = h * zoom + 12
    sheet = Image.new("RGB", (cols * w * zoom, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k in range(n):
        r, c = divmod(k, cols)
        tile = Image.fromarray(shown.images[k]).resize((w * zoom, h * zoom), Image.Resampling.NEAREST)
        sheet.paste(tile, (c * w * zoom, r * cell_h))
        caption = synthetic_class_names(1.0)[int(shown.labels[k])] + (" (night)" if shown.night[k] else "")
        draw.text((c * w * zoom + 2, r * cell_h + h * zoom), caption, fill="black")
    return sheet
