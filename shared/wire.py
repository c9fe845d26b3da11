"""Binary wire format for activations passed between pipeline stages.

Layout (all integers little-endian; documented in docs/wire-format.md)::

    magic      4s   b"EPAT"
    version    u8   3 (versions 1 and 2, without a hop's decode time, flags or blocks, are still read)
    dtype      u8   1 = float16, 2 = float32
    ndim       u8   1..6, tensor is N,C,H,W-like (channels on dim 1)
    n_hops     u8   hops recorded so far (0..64)
    next_block u16  index of the first model block the receiver must run
    capture_ts f64  camera capture time, seconds since the epoch
    id_len     u16  then request id, UTF-8
    cam_len    u16  then camera id, UTF-8
    shape      ndim x u32   shape of the tensor *as sent* (kept channels only)
    full_c     u32  0 = no mask; else the slice's full channel count, followed by
    mask       ceil(full_c / 8) bytes, bit i (LSB first) set = channel i was kept
    hops       n_hops x (stage u8, ratio f32, received f64, started f64, finished f64,
                         published f64, decode f64 (version 2 on), flags u8 (version 3: bit 0 =
                         deferred, the others 0), first_block u16 and n_blocks u16 (version 3;
                         65535 = not recorded), node_len u8, node id UTF-8)
    data       prod(shape) x itemsize bytes, C order

Nothing here unpickles or evaluates: :func:`decode` reads fixed fields with ``struct`` and
checks every length against the payload, raising :class:`shared.schemas.BadMessage`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.schemas import BadMessage, Hop

MAGIC = b"EPAT"
VERSION = 3
DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
DTYPE_CODES = {np.dtype("float16"): 1, np.dtype("float32"): 2}
MAX_NDIM = 6
MAX_HOPS = 64

_FIXED = struct.Struct("<4sBBBBHd")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HOP = {1: struct.Struct("<Bfdddd"), 2: struct.Struct("<Bfddddd"), 3: struct.Struct("<BfdddddBHH")}  # by version
DEFERRED = 0x01  # hop flag: the node served this request late, after the timely ones (docs/reliability.md)
NO_BLOCKS = 0xFFFF  # a hop that did not record its blocks (an older node, the ingest hop)


@dataclass
class Activation:
    """One request in flight between stages."""

    request_id: str
    camera_id: str
    capture_ts: float
    next_block: int
    tensor: np.ndarray
    keep_mask: np.ndarray | None = None  # bool per full channel; None = all channels present
    hops: list[Hop] = field(default_factory=list)

    def full_tensor(self) -> np.ndarray:
        """The tensor at full channel width, pruned channels filled with zeros."""
        if self.keep_mask is None:
            return self.tensor
        shape = list(self.tensor.shape)
        shape[1] = int(self.keep_mask.size)
        full = np.zeros(shape, dtype=self.tensor.dtype)
        full[:, self.keep_mask] = self.tensor
        return full


def _utf8(text: str, limit: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"{what} longer than {limit} bytes")
    return raw


def encode(act: Activation, stamp: Callable[[], float] | None = None) -> bytes:
    """The activation's bytes. ``stamp``: the last hop's ``published_ts`` is read from it once everything else is
    encoded (only the final join follows), so a hop record does not book its own encoding as transfer."""
    tensor = np.ascontiguousarray(act.tensor)
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise ValueError(f"unsupported dtype {tensor.dtype}; use float16 or float32")
    if not 2 <= tensor.ndim <= MAX_NDIM:
        raise ValueError(f"tensor must have 2..{MAX_NDIM} dims, got {tensor.ndim}")
    if len(act.hops) > MAX_HOPS:
        raise ValueError(f"too many hops ({len(act.hops)})")
    rid = _utf8(act.request_id, 65535, "request id")
    cam = _utf8(act.camera_id, 65535, "camera id")
    parts = [
        _FIXED.pack(MAGIC, VERSION, code, tensor.ndim, len(act.hops), act.next_block, act.capture_ts),
        _U16.pack(len(rid)), rid, _U16.pack(len(cam)), cam,
        struct.pack(f"<{tensor.ndim}I", *tensor.shape),
    ]
    if act.keep_mask is None:
        parts.append(_U32.pack(0))
    else:
        mask = np.asarray(act.keep_mask, dtype=bool)
        if int(mask.sum()) != tensor.shape[1]:
            raise ValueError(f"mask keeps {int(mask.sum())} channels but tensor has {tensor.shape[1]}")
        parts += [_U32.pack(mask.size), np.packbits(mask, bitorder="little").tobytes()]
    for hop in act.hops:
        node = _utf8(hop.node_id, 255, "node id")
        parts += [_pack_hop(hop, hop.published_ts), bytes([len(node)]), node]
    parts.append(tensor.astype(DTYPES[code], copy=False).tobytes())
    if stamp is not None and act.hops:
        parts[-4] = _pack_hop(act.hops[-1], stamp())
    return b"".join(parts)


def _pack_hop(hop: Hop, published_ts: float) -> bytes:
    return _HOP[VERSION].pack(hop.stage, hop.prune_ratio, hop.received_ts, hop.started_ts, hop.finished_ts,
                              published_ts, hop.decode_s, DEFERRED if hop.deferred else 0,
                              NO_BLOCKS if hop.first_block is None else hop.first_block,
                              NO_BLOCKS if hop.n_blocks is None else hop.n_blocks)


class _Reader:
    def __init__(self, payload: bytes):
        self.buf = memoryview(payload)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise BadMessage("truncated", f"activation truncated while reading {what} "
                             f"(need {n} B at offset {self.pos}, payload is {len(self.buf)} B)")
        chunk = self.buf[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))

    def text(self, n: int, what: str) -> str:
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage("bad_header", f"{what} is not UTF-8") from None


@dataclass(frozen=True)
class Header:
    """What precedes the tensor's shape: enough to name and time a request without decoding it."""

    version: int
    dtype_code: int
    ndim: int
    n_hops: int
    next_block: int
    capture_ts: float
    request_id: str
    camera_id: str


def _read_header(r: _Reader) -> Header:
    magic, version, code, ndim, n_hops, next_block, capture_ts = r.unpack(_FIXED, "fixed header")
    if magic != MAGIC:
        raise BadMessage("bad_magic", f"not an activation (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version not in _HOP:
        raise BadMessage("bad_version", f"activation format version {version} unsupported (this is {VERSION})")
    if code not in DTYPES:
        raise BadMessage("bad_header", f"unknown dtype code {code}")
    if not 2 <= ndim <= MAX_NDIM:
        raise BadMessage("bad_header", f"ndim {ndim} outside 2..{MAX_NDIM}")
    if n_hops > MAX_HOPS:
        raise BadMessage("bad_header", f"{n_hops} hops exceeds {MAX_HOPS}")
    if not math.isfinite(capture_ts):
        raise BadMessage("bad_header", "capture time is not finite")
    request_id = r.text(r.unpack(_U16, "request id length")[0], "request id")
    camera_id = r.text(r.unpack(_U16, "camera id length")[0], "camera id")
    if not request_id or not camera_id:
        raise BadMessage("bad_header", "empty request or camera id")
    return Header(version, code, ndim, n_hops, next_block, capture_ts, request_id, camera_id)


def peek(payload: bytes) -> Header:
    """The header alone (request id, capture time), checked as :func:`decode` checks it: a node orders its
    queue and reports a drop by it without touching the tensor."""
    return _read_header(_Reader(payload))


def decode(payload: bytes, max_elements: int = 1 << 24) -> Activation:
    """Parse an activation; raise :class:`BadMessage` for anything malformed."""
    r = _Reader(payload)
    h = _read_header(r)
    shape = struct.unpack(f"<{h.ndim}I", r.take(4 * h.ndim, "shape"))
    n_elements = math.prod(shape)
    if n_elements == 0 or n_elements > max_elements:
        raise BadMessage("bad_shape", f"shape {shape} has {n_elements} elements (allowed 1..{max_elements})")
    (full_c,) = r.unpack(_U32, "mask size")
    keep_mask = None
    if full_c:
        bits = np.frombuffer(r.take((full_c + 7) // 8, "mask"), dtype=np.uint8)
        keep_mask = np.unpackbits(bits, bitorder="little")[:full_c].astype(bool)
        if int(keep_mask.sum()) != shape[1]:
            raise BadMessage("bad_shape", f"mask keeps {int(keep_mask.sum())} channels, tensor has {shape[1]}")
    hops = []
    for _ in range(h.n_hops):
        stage, ratio, rec, sta, fin, pub, *rest = r.unpack(_HOP[h.version], "hop")
        # version 1 has none of these, 2 only decode_s, 3 all four
        decode_s, flags, first, count = (*rest, 0, NO_BLOCKS, NO_BLOCKS)[:4] if rest else (0.0, 0, NO_BLOCKS, NO_BLOCKS)
        if flags & ~DEFERRED:
            raise BadMessage("bad_header", f"unknown hop flags {flags:#04x}")
        node = r.text(r.take(1, "hop node length")[0], "hop node id")
        try:
            hops.append(Hop(stage=stage, node_id=node, prune_ratio=round(ratio, 6), received_ts=rec,
                            started_ts=sta, finished_ts=fin, published_ts=pub, decode_s=decode_s,
                            deferred=bool(flags & DEFERRED), first_block=None if first == NO_BLOCKS else first,
                            n_blocks=None if count == NO_BLOCKS else count))
        except ValueError as exc:
            raise BadMessage("bad_header", f"invalid hop record: {exc}") from None
    dtype = DTYPES[h.dtype_code]
    data = r.take(n_elements * dtype.itemsize, "tensor data")
    if r.pos != len(r.buf):
        raise BadMessage("bad_shape", f"{len(r.buf) - r.pos} trailing bytes after tensor of shape {shape}")
    tensor = np.frombuffer(data, dtype=dtype).reshape(shape)
    if not np.isfinite(tensor).all():
        raise BadMessage("bad_tensor", "tensor contains NaN or infinity")
    return Activation(h.request_id, h.camera_id, h.capture_ts, h.next_block, tensor, keep_mask, hops)
