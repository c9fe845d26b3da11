"""Schemas of every JSON payload on the bus.

Each receiver parses with :func:`parse_json` so that malformed input raises one
:class:`BadMessage` with a readable reason, never anything else.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator

Id = Field(min_length=1, max_length=64, pattern=r"^[^/+#$\s]+$")
MAX_LABEL_INDEX = 9999  # a class index; labelled frames beyond it are rejected as malformed


class BadMessage(ValueError):
    """A received payload that does not follow its schema; ``kind`` names the failure class."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


def parse_json(model: type[M], payload: bytes, max_bytes: int = 1 << 20) -> M:
    """Validate a JSON payload against ``model``; raise :class:`BadMessage` on any problem."""
    if len(payload) > max_bytes:
        raise BadMessage("oversized", f"{model.__name__} payload of {len(payload)} B exceeds {max_bytes} B")
    try:
        return model.model_validate(json.loads(payload.decode("utf-8")))
    except UnicodeDecodeError as exc:
        raise BadMessage("bad_json", f"{model.__name__} payload is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadMessage("bad_json", f"{model.__name__} payload is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BadMessage("bad_schema", f"{model.__name__}: {where}: {first['msg']}") from None


def to_json(model: BaseModel) -> bytes:
    return model.model_dump_json().encode("utf-8")


class StageAssignment(_Strict):
    """One pipeline stage: the node that runs blocks ``first_block..last_block`` (inclusive)."""

    stage: int = Field(ge=1, le=64)
    node_id: str = Id
    first_block: int = Field(ge=0)
    last_block: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> StageAssignment:
        if self.last_block < self.first_block:
            raise ValueError("last_block must be >= first_block")
        return self


class Placement(_Strict):
    """Retained on the placement topic: the whole pipeline, in order, covering every block once."""

    version: int = Field(ge=0, description="Increases with every re-plan; nodes ignore older versions.")
    model: str = Field(min_length=1, max_length=64)
    n_blocks: int = Field(ge=1)
    stages: list[StageAssignment] = Field(min_length=1, max_length=64)
    issued_at: float
    bottleneck_s: float | None = None

    @model_validator(mode="after")
    def _contiguous(self) -> Placement:
        expected = 0
        nodes = set()
        for i, stage in enumerate(self.stages, start=1):
            if stage.stage != i:
                raise ValueError(f"stages must be numbered 1..n in order (got {stage.stage} at position {i})")
            if stage.first_block != expected:
                raise ValueError(f"stage {i} starts at block {stage.first_block}, expected {expected}")
            if stage.node_id in nodes:
                raise ValueError(f"node {stage.node_id} appears in two stages")
            nodes.add(stage.node_id)
            expected = stage.last_block + 1
        if expected != self.n_blocks:
            raise ValueError(f"stages cover blocks 0..{expected - 1} but the model has {self.n_blocks}")
        return self

    def stage_of(self, node_id: str) -> StageAssignment | None:
        return next((s for s in self.stages if s.node_id == node_id), None)


class Hop(_Strict):
    """What one stage did with one request; all times are wall-clock seconds of that node."""

    stage: int = Field(ge=1, le=255)
    node_id: str = Id
    prune_ratio: float = Field(ge=0.0, le=1.0)
    received_ts: float
    started_ts: float
    finished_ts: float
    published_ts: float

    @property
    def queue_s(self) -> float:
        return self.started_ts - self.received_ts

    @property
    def compute_s(self) -> float:
        return self.finished_ts - self.started_ts

    @property
    def publish_s(self) -> float:
        return self.published_ts - self.finished_ts


class Result(_Strict):
    """Published by the last stage for every classified frame."""

    request_id: str = Field(min_length=1, max_length=128)
    camera_id: str = Id
    capture_ts: float
    label: str = Field(min_length=1, max_length=64)
    label_index: int = Field(ge=0)
    confidence: float = Field(ge=0.0, le=1.0)
    hops: list[Hop] = Field(min_length=1, max_length=64)
    true_label: int | None = Field(None, ge=0, le=MAX_LABEL_INDEX,
                                   description="Ground truth of a labelled test frame (the camera's true_label).")


class NodeStats(_Strict):
    """Periodic health of a node agent (every ``stats_interval_s``)."""

    node_id: str = Id
    ts: float
    stage: int | None = None
    first_block: int | None = None
    last_block: int | None = None
    placement_version: int | None = None
    queue_depth: int = Field(ge=0)
    queue_capacity: int = Field(ge=1)
    processed: int = Field(ge=0)
    dropped: int = Field(ge=0, description="Requests dropped because the work queue was full.")
    errors: dict[str, int] = Field(default_factory=dict, description="Bad inputs seen, by kind.")
    compute_mean_s: float | None = None
    compute_p95_s: float | None = None
    queue_wait_mean_s: float | None = None
    cpu_percent: float = Field(ge=0.0)
    prune_ratio: float = Field(ge=0.0, le=1.0)
    emulated_slowdown: float = Field(1.0, ge=1.0, description="Compute stretch set by a `slowdown` command.")


class ErrorRecord(_Strict):
    """Published on the error topic whenever a component rejects an input."""

    component: str = Id
    ts: float
    topic: str = Field(max_length=512)
    kind: str = Field(max_length=64)
    message: str = Field(max_length=2000)
    request_id: str | None = Field(default=None, max_length=128)


class PruneDesired(_Strict):
    """Retained desired prune state for one node, issued by the gateway."""

    ratio: float = Field(ge=0.0, lt=1.0)
    seq: int = Field(ge=0)
    issued_at: float
    source: Literal["auto", "manual"] = "auto"
    reason: str = Field(default="", max_length=500)


class PruneState(_Strict):
    """Retained prune state a node actually applied (echo of :class:`PruneDesired`)."""

    ratio: float = Field(ge=0.0, lt=1.0)
    seq: int = Field(ge=0)
    applied_at: float
    switch_s: float = Field(ge=0.0)


class SliceCalibration(_Strict):
    """Retained on ``node/<id>/calibration``: the node's slice latency at each ladder ratio, measured
    on the node itself right after it takes a stage (the controller's latency curves)."""

    node_id: str = Id
    placement_version: int = Field(ge=0)
    first_block: int = Field(ge=0)
    last_block: int = Field(ge=0)
    ratios: list[float] = Field(min_length=3, max_length=64)
    latency_s: list[float] = Field(min_length=3, max_length=64)
    measured_at: float

    @model_validator(mode="after")
    def _paired(self) -> SliceCalibration:
        if len(self.ratios) != len(self.latency_s):
            raise ValueError("ratios and latency_s must have the same length")
        if any(not 0 <= r < 1 for r in self.ratios) or any(t <= 0 for t in self.latency_s):
            raise ValueError("ratios must lie in [0, 1) and latencies be positive")
        return self


class SlowdownCommand(_Strict):
    """Emulate a transient slowdown (tests, benchmarks, demos): ``factor`` × the device speed's compute."""

    cmd: Literal["slowdown"]
    factor: float = Field(ge=1.0, le=1000.0)


class DeviceSpeedCommand(_Strict):
    """Emulate a slower device type (benchmarks): a base ``factor`` × this host's compute, under transient
    slowdowns. The node re-calibrates after it, as it would on new hardware."""

    cmd: Literal["device_speed"]
    factor: float = Field(ge=1.0, le=1000.0)


class CalibrateCommand(_Strict):
    """Re-measure the node's slice at every ladder ratio (e.g. after changing its hardware or threads)."""

    cmd: Literal["calibrate"]


class NodeCommand(RootModel[Annotated[SlowdownCommand | CalibrateCommand | DeviceSpeedCommand,
                                      Field(discriminator="cmd")]]):
    """A one-shot command on a node's ``cmd`` topic (never retained)."""


class ManualPruneCommand(_Strict):
    """Operator override: hold ``node_id`` at ``ratio`` (a ladder ratio), or hand it back with ``null``."""

    cmd: Literal["prune"]
    node_id: str = Id
    ratio: float | None = Field(ge=0.0, lt=1.0)


class RetireCommand(_Strict):
    """A node leaves the deployment for good: the gateway clears its retained topics."""

    cmd: Literal["retire"]
    node_id: str = Id


class GatewayCommand(RootModel[Annotated[ManualPruneCommand | RetireCommand, Field(discriminator="cmd")]]):
    """A one-shot command on the gateway's ``cmd`` topic (never retained)."""
