"""What each block of the model costs on this device, and the files that describe a cluster for placement.

``profile.json`` (one device's measurement) and ``devices.json`` (the cluster: memory caps,
bandwidths, emulated speeds) are validated with pydantic; a bad file raises
:class:`ProfileError` naming the file and the field. torch is imported only to measure, so
the planner can read profiles without it.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.schemas import BadMessage, BlockProfile, ModelProfile, _Strict, parse_json
from shared.topics import validate_id

MB = 1_000_000
MBIT_BYTES = 1_000_000 / 8
WIRE_ITEMSIZE = {"float16": 2, "float32": 4}
# The reserved endpoints of links in devices.json (see gateway.placement).
CAMERA, GATEWAY = "camera", "gateway"
MAX_FILE_BYTES = 4 << 20


def mb_to_bytes(megabytes: float) -> int:
    """Whole bytes in ``megabytes`` MB, rounded: ``int()`` would make 2.01 MB 2,009,999 B (float error)."""
    return round(megabytes * MB)


class ProfileError(ValueError):
    """A profile or devices file that cannot be used; the message names the file and the field."""


class CameraSpec(_Strict):
    frame_bytes: int = Field(ge=0, description="Bytes of one frame as the camera publishes it.")
    bandwidth_mbit_s: float = Field(gt=0, allow_inf_nan=False, description="Camera uplink.")

    @property
    def bandwidth_bps(self) -> float:
        return self.bandwidth_mbit_s * MBIT_BYTES


class DeviceSpec(_Strict):
    id: str
    memory_mb: float = Field(gt=0, allow_inf_nan=False, description="Memory the slice may use, MB (10^6 B).")
    bandwidth_mbit_s: float = Field(gt=0, allow_inf_nan=False, description="Uplink to the next stage, Mbit/s.")
    speed_factor: float = Field(1.0, gt=0, allow_inf_nan=False, description="Compute time multiplier.")
    profile: Path | None = Field(None, description="This device's own profile.json (relative to devices.json).")

    _check_id = field_validator("id")(lambda v: validate_id("device", v))

    @property
    def memory_bytes(self) -> int:
        return mb_to_bytes(self.memory_mb)

    @property
    def bandwidth_bps(self) -> float:
        return self.bandwidth_mbit_s * MBIT_BYTES


class LinkSpec(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    sender: str = Field(alias="from")
    receiver: str = Field(alias="to")
    bandwidth_mbit_s: float = Field(gt=0, allow_inf_nan=False)

    @property
    def bandwidth_bps(self) -> float:
        return self.bandwidth_mbit_s * MBIT_BYTES


class ClusterSpec(_Strict):
    """Contents of devices.json."""

    camera: CameraSpec
    devices: list[DeviceSpec] = Field(min_length=1, max_length=64)
    links: list[LinkSpec] = Field(default_factory=list, description="Per-link bandwidths overriding uplinks.")

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSpec:
        ids = [d.id for d in self.devices]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"device ids must be unique: {', '.join(duplicated)} repeated")
        if {CAMERA, GATEWAY} & set(ids):
            raise ValueError(f"'{CAMERA}' and '{GATEWAY}' are reserved for links, not device ids")
        for link in self.links:
            if link.sender not in ids + [CAMERA] or link.receiver not in ids + [GATEWAY]:
                raise ValueError(f"link {link.sender}->{link.receiver} names an unknown device")
        return self


M = TypeVar("M", bound=BaseModel)


def _load(model: type[M], path: Path) -> M:
    try:
        return parse_json(model, path.read_bytes(), max_bytes=MAX_FILE_BYTES)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except BadMessage as exc:
        raise ProfileError(f"{path}: {exc}") from None


def load_profile(path: Path) -> ModelProfile:
    return _load(ModelProfile, path)


def load_cluster(path: Path) -> ClusterSpec:
    return _load(ClusterSpec, path)


def save_profile(profile: ModelProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=2) + "\n")


def profile_model(model, threads: int = 1, repeats: int = 20, warmup: int = 3,
                  wire_dtype: Literal["float16", "float32"] = "float16", model_name: str = "trapnet") -> ModelProfile:
    """Measure every block of ``model`` (``.blocks``, ``.block_names``) at batch 1 on this device.

    Each block runs on its real input (the previous blocks' output), ``warmup`` times unmeasured
    then ``repeats`` times; the median resists a stray scheduler hiccup. Peak activation is
    approximated by the block's input + output bytes (tensors inside a block are not counted).
    """
    import torch

    from shared.model import INPUT_SIZE

    size = getattr(getattr(model, "config", None), "input_size", INPUT_SIZE)  # the checkpoint's own input size
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError("repeats and threads must be >= 1, warmup >= 0")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocks = []
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for name, block in zip(model.block_names, model.blocks):
                for _ in range(warmup):
                    block(x)
                latencies = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    y = block(x)
                    latencies.append(time.perf_counter() - start)
                params = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
                blocks.append(BlockProfile(
                    name=name, latency_s=statistics.median(latencies), param_bytes=params,
                    activation_bytes=x.numel() * x.element_size() + y.numel() * y.element_size(),
                    output_bytes=y.numel() * WIRE_ITEMSIZE[wire_dtype]))
                x = y
    finally:
        torch.set_num_threads(previous_threads)
    return ModelProfile(model=model_name, host=platform.node() or "unknown", threads=threads, repeats=repeats,
                        warmup=warmup, wire_dtype=wire_dtype, blocks=blocks)
