"""Thumbnails: a small JPEG of each stored frame, so an ecologist can check a label by eye (docs/api.md, "Thumbnails").

The node that decodes a camera frame (stage 1, or the ingest node) makes it from the image its decode has already
reduced: a 12 MP JPEG is decoded at 1/8 scale (500x375) for the model anyway, so a thumbnail costs a resize and a
small JPEG encode (~1 ms here), not a second decode (~26 ms). It is never larger than that image (a 1 MP frame gives
145 px), and carries no EXIF. The gateway checks every thumbnail it receives (:func:`check_thumbnail`): it comes
from the network. Pure: no MQTT, no files.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from shared.schemas import BadMessage

THUMBNAIL_PX = 240  # longest side
THUMBNAIL_QUALITY = 70
MAX_THUMBNAIL_BYTES = 64 << 10  # a 240 px JPEG at quality 70 is 4-10 KB
JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker, then the first segment's marker
REQUEST_ID_PROPERTY = "request_id"  # the MQTT v5 user property naming the frame, as on camera frames
MAX_REQUEST_ID = 128


def thumbnail_size(width: int, height: int, px: int = THUMBNAIL_PX) -> tuple[int, int]:
    """(width, height) with the longest side at most ``px``, the aspect kept; never enlarged."""
    scale = min(1.0, px / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def make_thumbnail(frame: Image.Image, px: int = THUMBNAIL_PX, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """A decoded frame (any mode) -> baseline JPEG bytes, longest side at most ``px``, without metadata."""
    rgb = frame if frame.mode == "RGB" else frame.convert("RGB")
    size = thumbnail_size(rgb.width, rgb.height, px)
    small = rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def check_thumbnail(payload: bytes) -> tuple[int, int]:
    """Its (width, height) if ``payload`` is a whole JPEG no larger than a thumbnail; BadMessage otherwise."""
    if not payload:
        raise BadMessage("bad_image", "empty thumbnail")
    if len(payload) > MAX_THUMBNAIL_BYTES:
        raise BadMessage("oversized", f"thumbnail of {len(payload)} B exceeds {MAX_THUMBNAIL_BYTES} B")
    if not payload.startswith(JPEG_MAGIC):
        raise BadMessage("bad_magic", f"thumbnail does not start as a JPEG does: {payload[:4]!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload), formats=("JPEG",)) as img:
                if not (1 <= img.width <= THUMBNAIL_PX and 1 <= img.height <= THUMBNAIL_PX):
                    raise BadMessage("bad_image", f"thumbnail of {img.width}x{img.height} px is larger than "
                                     f"{THUMBNAIL_PX} px")
                img.load()  # the whole image decodes: a truncated or corrupt one is refused here, not in a browser
                return img.width, img.height
    except BadMessage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadMessage("bad_image", f"thumbnail is not a readable JPEG: {exc}") from None


def thumbnail_request_id(user_properties: dict[str, str]) -> str:
    """The frame a thumbnail shows, from its ``request_id`` user property; BadMessage if missing or too long."""
    request_id = user_properties.get(REQUEST_ID_PROPERTY, "")
    if not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise BadMessage("bad_header", f"thumbnail needs a request_id user property of 1-{MAX_REQUEST_ID} "
                         f"characters (got {len(request_id)})")
    return request_id
