"""Camera frames: decoding untrusted JPEG/PNG bytes into the model's input tensor."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.model import INPUT_SIZE, MEAN, STD
from shared.schemas import BadMessage

ACCEPTED_FORMATS = ("JPEG", "PNG")
MAX_PIXELS = 40_000_000  # a 40 MP frame is the largest camera trap we expect; beyond is a bomb


def decode_frame(payload: bytes, size: int = INPUT_SIZE) -> np.ndarray:
    """JPEG/PNG bytes -> float32 array (1, 3, size, size), normalised; BadMessage if not a frame."""
    if not payload:
        raise BadMessage("bad_image", "empty frame payload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload), formats=ACCEPTED_FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadMessage("bad_image", f"frame of {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
                rgb = img.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(rgb, dtype=np.float32)
    except BadMessage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadMessage("bad_image", f"frame is not a readable JPEG or PNG: {exc}") from None
    return normalise(pixels)


def normalise(pixels_hwc: np.ndarray) -> np.ndarray:
    """uint8-range HxWx3 pixels -> normalised (1, 3, H, W) float32."""
    x = pixels_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
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
