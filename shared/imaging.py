"""Camera frames: decoding untrusted JPEG/PNG bytes into the model's input tensor.

A camera trap's 12-20 MP JPEG is ~100x more pixels than the model looks at, and a full decode
of it costs far more than a whole slice of the model. So the decoder is told the target size
before it decodes: a JPEG is decoded straight at 1/2, 1/4 or 1/8 scale (Pillow's draft mode,
the largest reduction still at least the model's input size), and any other frame is shrunk
by an integer box filter (``Image.reduce``) before the same bilinear resize. Serving, the
benchmarks and the accuracy check all go through :func:`frame_pixels`, so the model sees one
preprocessing wherever a frame comes from.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.model import INPUT_SIZE, MEAN, STD
from shared.schemas import BadMessage

ACCEPTED_FORMATS = ("JPEG", "PNG")
MAX_PIXELS = 40_000_000  # a 40 MP frame is the largest camera trap we expect; beyond is a bomb
# Reduce by a box filter only down to this multiple of the target, so the bilinear resize
# still smooths the last step (Pillow's own ``reducing_gap`` advice).
REDUCING_GAP = 2


def decode_frame(payload: bytes, size: int = INPUT_SIZE, reduced: bool = True) -> np.ndarray:
    """JPEG/PNG bytes -> float32 array (1, 3, size, size), normalised; BadMessage if not a frame.

    ``reduced=False`` decodes every pixel first, as before decoding was reduced: kept only as the
    reference the decode benchmark and the accuracy check compare against.
    """
    return normalise(frame_pixels(payload, size, reduced))


def frame_pixels(payload: bytes, size: int = INPUT_SIZE, reduced: bool = True) -> np.ndarray:
    """JPEG/PNG bytes -> size x size x 3 uint8 pixels (the model's input before normalising)."""
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
                rgb = img.convert("RGB")
                if reduced:
                    rgb = reduce_towards(rgb, size)
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(rgb, dtype=np.uint8)
    except BadMessage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadMessage("bad_image", f"frame is not a readable JPEG or PNG: {exc}") from None


def reduce_towards(img: Image.Image, size: int) -> Image.Image:
    """Shrink by the largest integer box factor that keeps both sides >= REDUCING_GAP x ``size``."""
    factor = min(img.width, img.height) // (REDUCING_GAP * size)
    return img.reduce(factor) if factor >= 2 else img


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
