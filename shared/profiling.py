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

from shared.schemas import BadMessage, DecodeCost, parse_json
from shared.topics import validate_id

MB = 1_000_000
MBIT_BYTES = 1_000_000 / 8
WIRE_ITEMSIZE = {"float16": 2, "float32": 4}
# The reserved endpoints of links in devices.json (see gateway.placement).
CAMERA, GATEWAY = "camera", "gateway"
MAX_FILE_BYTES = 4 << 20


class ProfileError(ValueError):
    """A profile or devices file that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlockProfile(_Strict):
    """One block as measured: latency on the measuring device, memory and wire size anywhere."""

    name: str = Field(min_length=1, max_length=64)
    latency_s: float = Field(ge=0, allow_inf_nan=False, description="Median latency at batch 1.")
    param_bytes: int = Field(ge=0, description="Parameters and buffers, as stored in memory.")
    activation_bytes: int = Field(ge=0, description="Peak activation: input + output tensor bytes of the block.")
    output_bytes: int = Field(ge=1, description="Output tensor bytes as sent on the wire.")


class ModelProfile(_Strict):
    """Contents of profile.json."""

    model: str = Field(min_length=1, max_length=64)
    host: str = Field(max_length=256, description="Where it was measured (informational).")
    threads: int = Field(ge=1)
    repeats: int = Field(ge=1)
    warmup: int = Field(ge=0)
    wire_dtype: Literal["float16", "float32"]
    blocks: list[BlockProfile] = Field(min_length=1, max_length=1024)

    def scaled(self, speed_factor: float) -> ModelProfile:
        """The same profile on a device ``speed_factor`` times slower (emulated devices)."""
        blocks = [b.model_copy(update={"latency_s": b.latency_s * speed_factor}) for b in self.blocks]
        return self.model_copy(update={"blocks": blocks})


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
        return int(self.memory_mb * MB)

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

    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError("repeats and threads must be >= 1, warmup >= 0")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocks = []
        x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
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


class NodeProfile(_Strict):
    """Retained on ``<root>/node/<id>/profile``: what a node offers the placement planner."""

    node_id: str = Field(min_length=1, max_length=64)
    model_fingerprint: str = Field(min_length=1, max_length=64,
                                   description="Hash of the node's weights: only same-model nodes are placed.")
    memory_mb: float = Field(gt=0, allow_inf_nan=False, description="Memory a slice may use on this node.")
    uplink_mbit_s: float = Field(gt=0, allow_inf_nan=False, description="Bandwidth to the next stage.")
    profile: ModelProfile
    decode: DecodeCost | None = Field(None, description="This node's cost of decoding one camera frame, "
                                      "charged to whichever node runs stage 1 (absent from older nodes).")

    _check_id = field_validator("node_id")(lambda v: validate_id("node", v))
