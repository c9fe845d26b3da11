"""Camera frames: decoding untrusted JPEG/PNG bytes into the model's input tensor.

A camera trap's 12-20 MP JPEG is ~100x more pixels than the model looks at, and a full decode
of it costs far more than a whole slice of the model. So the decoder is told the target size
before it decodes: a JPEG is decoded straight at 1/2, 1/4 or 1/8 scale (Pillow's draft mode,
the largest reduction still at least the model's input size), and any other frame is shrunk
by an integer box filter (``Image.reduce``) before the same bilinear resize. Serving, the
benchmarks, training and the accuracy check all go through :func:`decode_pixels`, so the model sees one
preprocessing wherever a frame comes from.
"""

from __future__ import annotations

import io
import statistics
import time
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.schemas import BadMessage, DecodeCost

# The model input this decode path makes unless a checkpoint names its own (``shared.model.TrapNetConfig``, whose
# defaults these are): here, not in shared/model.py, so a camera and anything else that decodes need no torch.
INPUT_SIZE = 64
# Per-channel normalisation of RGB frames in [0, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
ACCEPTED_FORMATS = ("JPEG", "PNG")
MAX_PIXELS = 40_000_000  # a 40 MP frame is the largest camera trap we expect; beyond is a bomb
# Frame sizes a node decodes at start to fit its decode cost (a trap's 12-20 MP lies beyond: the fit is linear).
PROFILE_MEGAPIXELS = (0.3, 1.0, 4.0)
# Reduce by a box filter only down to this multiple of the target, so the bilinear resize
# still smooths the last step (Pillow's own ``reducing_gap`` advice).
REDUCING_GAP = 2


def decode_frame(payload: bytes, size: int = INPUT_SIZE, fit: str = "squash",
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD, reduced: bool = True) -> np.ndarray:
    """JPEG/PNG bytes -> float32 array (1, 3, size, size), normalised; BadMessage if not a frame.

    ``fit``, ``mean`` and ``std`` come from the model's checkpoint (``TrapNetConfig.preprocessing``).
    ``reduced=False`` decodes every pixel first, as before decoding was reduced: kept only as the
    reference the decode benchmark and the accuracy check compare against.
    """
    return decode_frame_and_image(payload, size, fit, mean, std, reduced)[0]


def decode_frame_and_image(payload: bytes, size: int = INPUT_SIZE, fit: str = "squash",
                           mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                           reduced: bool = True) -> tuple[np.ndarray, Image.Image]:
    """:func:`decode_frame`, and the RGB image it was reduced from: a thumbnail is made of that at no second
    decode (shared/thumbnail.py)."""
    rgb = open_frame(payload, size, reduced)
    return normalise(frame_pixels(rgb, size, fit, reduced), mean, std), rgb


def decode_pixels(payload: bytes, size: int = INPUT_SIZE, fit: str = "squash", reduced: bool = True) -> np.ndarray:
    """JPEG/PNG bytes -> size x size x 3 uint8 pixels: the one decode path of serving *and* training."""
    return frame_pixels(open_frame(payload, size, reduced), size, fit, reduced)


def open_frame(payload: bytes, size: int = INPUT_SIZE, reduced: bool = True) -> Image.Image:
    """JPEG/PNG bytes -> an RGB image; ``reduced``: a JPEG decoded straight at the smallest scale (1/2..1/8)
    whose sides stay >= ``size``. BadMessage if the bytes are not a frame (or a decompression bomb)."""
    if not payload:
        raise BadMessage("bad_image", "empty frame payload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload), formats=ACCEPTED_FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadMessage("bad_image", f"frame of {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
                if reduced:
                    img.draft("RGB", (size, size))  # JPEG only: scales by 1/2..1/8 while decoding
                return img.convert("RGB")
    except BadMessage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadMessage("bad_image", f"frame is not a readable JPEG or PNG: {exc}") from None


def frame_pixels(rgb: Image.Image, size: int = INPUT_SIZE, fit: str = "squash", reduced: bool = True) -> np.ndarray:
    """A decoded RGB frame -> size x size x 3 uint8 pixels (box-reduced first when ``reduced``), fitted as
    ``fit`` says."""
    if reduced:
        rgb = reduce_towards(rgb, size)
    return np.asarray(fit_square(rgb, size, fit), dtype=np.uint8)


def reduce_towards(img: Image.Image, size: int) -> Image.Image:
    """Shrink by the largest integer box factor that keeps both sides >= REDUCING_GAP x ``size``."""
    factor = min(img.width, img.height) // (REDUCING_GAP * size)
    return img.reduce(factor) if factor >= 2 else img


LETTERBOX_FILL = (128, 128, 128)  # mid-gray: close to zero after the default normalisation


def fit_square(rgb: Image.Image, size: int, fit: str = "squash") -> Image.Image:
    """An RGB image as size x size: stretched (``squash``), padded (``letterbox``) or centre-cropped (``crop``)."""
    w, h = rgb.size
    if fit == "crop" and w != h:
        side = min(w, h)
        rgb = rgb.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    elif fit == "letterbox" and w != h:
        scale = size / max(w, h)
        inner = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (size, size), LETTERBOX_FILL)
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    elif fit not in ("squash", "crop", "letterbox"):
        raise ValueError(f"unknown fit {fit!r}")
    return rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.Resampling.BILINEAR)


def normalise(pixels_hwc: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> np.ndarray:
    """uint8-range HxWx3 pixels -> normalised (1, 3, H, W) float32."""
    x = pixels_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def textured_scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like HxWx3 frame made without any data file: smooth shapes plus sensor-like grain.

    The grain matters: a JPEG's decode time grows with its entropy, and a noiseless gradient
    would compress (and decode) far faster than a real photo.
    """
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    scene = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (256, 256, 3), dtype=np.int16)  # tiled: cheap for 20 MP frames
    tiled = np.tile(grain, (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    return np.clip(scene + tiled, 0, 255).astype(np.uint8)


def frame_size(megapixels: float) -> tuple[int, int]:
    """Width and height of a 4:3 frame of about ``megapixels``."""
    width = max(4, round((megapixels * 1e6 * 4 / 3) ** 0.5))
    return width, max(3, round(width * 3 / 4))


def measure_decode_cost(megapixels: tuple[float, ...] = PROFILE_MEGAPIXELS, repeats: int = 5,
                        size: int = INPUT_SIZE, reduced: bool = True) -> DecodeCost:
    """This device's decode time for JPEG frames of a few sizes, fitted linear in pixels (least squares).

    The median of ``repeats`` counts, as for the block profile. The scene's grain makes its JPEGs
    ~0.26 B per pixel, as large as a camera trap's: decode time follows the JPEG's bytes as much
    as its pixels, so a site whose frames compress much better or worse will see the fit err.
    """
    seconds = []
    for k, mp in enumerate(megapixels):
        payload = encode_jpeg(textured_scene(*frame_size(mp), seed=k))
        decode_frame(payload, size, reduced=reduced)  # warm-up: allocations, first-touch of the decoder's tables
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode_frame(payload, size, reduced=reduced)
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
    slope, intercept = np.polyfit(np.asarray(megapixels), np.asarray(seconds), 1)
    return DecodeCost(fixed_s=max(0.0, float(intercept)), per_megapixel_s=max(0.0, float(slope)),
                      megapixels=list(megapixels), seconds=seconds)


def model_input_bytes(size: int = INPUT_SIZE) -> int:
    """Bytes of one decoded frame as an ingest node sends it to stage 1: 3 x size x size float32."""
    return 3 * size * size * np.dtype(np.float32).itemsize


def encode_png(pixels_hwc: np.ndarray) -> bytes:
    """Lossless PNG of an HxWx3 uint8 array (what the camera simulator publishes)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels_hwc, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(pixels_hwc: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels_hwc, dtype=np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
