"""One emulated device for a whole benchmark: this host's unslowed compute time of every block range at every ratio.

A node with ``[node] device_model`` set makes each stage take exactly ``slowdown × time_s(first, last, ratio)``
(it runs the slice for real and sleeps the rest, :meth:`node_agent.runtime.StageRuntime.run`) instead of
stretching by its own calibration, which a loaded host measures differently on every run: so every policy of a
benchmark runs on the same device. Every contiguous range is measured because a re-placement may give a node any
of them. The file is JSON (:meth:`DeviceModel.save`); :func:`load_device_model` refuses a malformed one clearly.
The measuring is the benchmark's (``edgeprune/bench/pipeline.py``, with the node's own calibrator).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT = "edgeprune-device-model/1"


class DeviceModelError(ValueError):
    """A device model file that cannot be used (unreadable, malformed, or for another model)."""


class _RangeTimes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first: int = Field(ge=0)
    last: int = Field(ge=0)
    latency_s: list[float]
    median_s: list[float] | None = None  # the raw medians the (smoothed) latency_s were fitted to


class _File(BaseModel):
    """The JSON as written: validated before anything is looked up in it."""

    model_config = ConfigDict(extra="forbid")
    format: str
    model_fingerprint: str
    n_blocks: int = Field(ge=1, le=256)
    ratios: list[float] = Field(min_length=1)
    ranges: list[_RangeTimes]
    measured: dict[str, Any] = {}

    @model_validator(mode="after")
    def _complete(self) -> _File:
        if self.format != FORMAT:
            raise ValueError(f"format {self.format!r}, expected {FORMAT!r}")
        if self.ratios != sorted(set(self.ratios)) or not all(0 <= r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be distinct, ascending and in [0, 1): {self.ratios}")
        seen = {(r.first, r.last) for r in self.ranges}
        wanted = {(a, b) for a in range(self.n_blocks) for b in range(a, self.n_blocks)}
        if seen != wanted or len(self.ranges) != len(wanted):
            missing, extra = sorted(wanted - seen), sorted(seen - wanted)
            raise ValueError(f"ranges must be every contiguous block range of {self.n_blocks} blocks once "
                             f"(missing {missing[:5]}, unexpected {extra[:5]}, {len(self.ranges)} listed)")
        for r in self.ranges:
            if len(r.latency_s) != len(self.ratios) or not all(np.isfinite(t) and t > 0 for t in r.latency_s):
                raise ValueError(f"range {r.first}..{r.last}: need {len(self.ratios)} positive seconds, one per "
                                 f"ratio, got {r.latency_s}")
        return self


@dataclass(frozen=True)
class DeviceModel:
    """Unslowed seconds of blocks ``first..last`` at each ladder ratio, on the host that measured them."""

    model_fingerprint: str
    n_blocks: int
    ratios: tuple[float, ...]
    latency_s: dict[tuple[int, int], tuple[float, ...]]
    measured: dict[str, Any] = field(default_factory=dict)  # how: repeats, pause, threads, host, when
    median_s: dict[tuple[int, int], tuple[float, ...]] = field(default_factory=dict)  # raw, for the record

    def time_s(self, first: int, last: int, ratio: float) -> float:
        """The range's time at ``ratio`` (between measured ratios: linear interpolation)."""
        try:
            times = self.latency_s[(first, last)]
        except KeyError:
            raise DeviceModelError(f"no blocks {first}..{last} in a device model of {self.n_blocks} blocks") from None
        return float(np.interp(ratio, self.ratios, times))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model_fingerprint": self.model_fingerprint, "n_blocks": self.n_blocks,
                "ratios": list(self.ratios), "measured": self.measured,
                "ranges": [{"first": a, "last": b, "latency_s": list(t),
                            **({"median_s": list(self.median_s[(a, b)])} if (a, b) in self.median_s else {})}
                           for (a, b), t in self.latency_s.items()]}

    @classmethod
    def from_dict(cls, data: Any) -> DeviceModel:
        try:
            parsed = _File.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
            raise DeviceModelError(f"not a device model: {problems}") from None
        return cls(parsed.model_fingerprint, parsed.n_blocks, tuple(parsed.ratios),
                   {(r.first, r.last): tuple(r.latency_s) for r in parsed.ranges}, parsed.measured,
                   {(r.first, r.last): tuple(r.median_s) for r in parsed.ranges if r.median_s is not None})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))


def load_device_model(path: Path, fingerprint: str | None = None) -> DeviceModel:
    """The device model in ``path``; with ``fingerprint``, it must have been measured on that model."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DeviceModelError(f"device model {path}: cannot read it as JSON: {exc}") from None
    try:
        model = DeviceModel.from_dict(data)
    except DeviceModelError as exc:
        raise DeviceModelError(f"device model {path}: {exc}") from None
    if fingerprint is not None and model.model_fingerprint != fingerprint:
        raise DeviceModelError(f"device model {path} was measured on model {model.model_fingerprint}, this node "
                               f"runs {fingerprint}: measure it again (edgeprune bench pipeline)")
    return model
