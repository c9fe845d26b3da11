"""Camera frames: decoding untrusted JPEG/PNG bytes into the model's input tensor."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.model import INPUT_SIZE, MEAN, STD
from shared.schemas import BadMessage

ACCEPTED_FORMATS = ("JPEG", "PNG")
MAX_PIXELS = 40_000_000  # a 40 MP frame is the largest camera trap we expect; beyond is a bomb


def decode_frame(payload: bytes, size: int = INPUT_SIZE, fit: str = "squash",
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> np.ndarray:
    """JPEG/PNG bytes -> float32 array (1, 3, size, size), normalised; BadMessage if not a frame.

    ``fit``, ``mean`` and ``std`` come from the model's checkpoint (``TrapNetConfig.preprocessing``).
    """
    return normalise(decode_pixels(payload, size, fit), mean, std)


def decode_pixels(payload: bytes, size: int = INPUT_SIZE, fit: str = "squash") -> np.ndarray:
    """JPEG/PNG bytes -> size x size x 3 uint8 pixels: the one decode path of serving *and* training."""
    if not payload:
        raise BadMessage("bad_image", "empty frame payload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload), formats=ACCEPTED_FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadMessage("bad_image", f"frame of {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
                rgb = fit_square(img.convert("RGB"), size, fit)
                pixels = np.asarray(rgb, dtype=np.uint8)
    except BadMessage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadMessage("bad_image", f"frame is not a readable JPEG or PNG: {exc}") from None
    return pixels


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


def encode_png(pixels_hwc: np.ndarray) -> bytes:
    """Lossless PNG of an HxWx3 uint8 array (what the camera simulator publishes)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels_hwc, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(pixels_hwc: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels_hwc, dtype=np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
