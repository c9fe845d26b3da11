"""Latency-vs-ratio fits of one slice: what the controller predicts with and what a node emulates a slowdown from.

Pure numpy, so a node agent (which must not import ``gateway/``) and the gateway fit the same calibration
the same way: a node that emulates a slower device from this fit is exactly as slow as the controller
predicts, rather than as slow as one noisy calibration sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
from numpy.polynomial import Polynomial

LatencyKind = Literal["linear", "quadratic"]


def fit_quality(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """(R², RMSE); R² is 1 for a perfect fit of constant data, 0 for an imperfect one (no variance to explain)."""
    residual = float(np.sum((measured - predicted) ** 2))
    total = float(np.sum((measured - measured.mean()) ** 2))
    rmse = float(np.sqrt(residual / len(measured)))
    if total == 0.0:
        return (1.0 if residual == 0.0 else 0.0), rmse
    return 1.0 - residual / total, rmse


@dataclass(frozen=True)
class LatencyCurve:
    """One fitted model of a slice's compute time (seconds) against its pruning ratio p.

    ``linear``: t = coef[0]·p + coef[1] (the paper's α·p + β).
    ``quadratic``: t = coef[0] + coef[1]·(1−p) + coef[2]·(1−p)², because compute follows MACs, which fall
    roughly as (1−p)² when a slice's input and output channels are both thinned.
    """

    kind: LatencyKind
    coef: tuple[float, ...]
    r2: float
    rmse: float

    @cached_property
    def polynomial(self) -> Polynomial:
        """The curve as a polynomial in p (one evaluation path for both kinds; built once, policies call often)."""
        if self.kind == "linear":
            slope, intercept = self.coef
            return Polynomial([intercept, slope])
        return Polynomial(list(self.coef))(Polynomial([1.0, -1.0]))

    def predict(self, ratio: float) -> float:
        return float(self.polynomial(ratio))

    def min_on(self, max_ratio: float) -> float:
        """Smallest predicted time on [0, max_ratio]: a curve that reaches ≤ 0 there is unusable."""
        poly = self.polynomial
        points = [0.0, max_ratio] + [float(r.real) for r in poly.deriv().roots()
                                     if abs(r.imag) < 1e-12 and 0.0 < r.real < max_ratio]
        return float(min(poly(p) for p in points))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "coef": list(self.coef), "r2": self.r2, "rmse": self.rmse}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyCurve:
        return cls(kind=data["kind"], coef=tuple(float(c) for c in data["coef"]),
                   r2=float(data["r2"]), rmse=float(data["rmse"]))


@dataclass(frozen=True)
class SliceLatencyFit:
    """Both latency models of one slice, with the measurements they came from."""

    ratios: tuple[float, ...]
    latencies_s: tuple[float, ...]
    linear: LatencyCurve
    quadratic: LatencyCurve

    @property
    def max_ratio(self) -> float:
        """Largest measured ratio: predictions beyond it are extrapolation."""
        return max(self.ratios)

    def best(self) -> LatencyCurve:
        """The curve with the smaller RMSE among those predicting a positive time on [0, max_ratio]."""
        usable = [c for c in (self.quadratic, self.linear) if c.min_on(self.max_ratio) > 0.0]
        if not usable:
            raise ValueError("both latency fits predict a time <= 0 within the measured ratios; re-calibrate")
        return min(usable, key=lambda c: c.rmse)

    def to_dict(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios), "latencies_s": list(self.latencies_s),
                "linear": self.linear.to_dict(), "quadratic": self.quadratic.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SliceLatencyFit:
        return cls(ratios=tuple(float(r) for r in data["ratios"]),
                   latencies_s=tuple(float(t) for t in data["latencies_s"]),
                   linear=LatencyCurve.from_dict(data["linear"]),
                   quadratic=LatencyCurve.from_dict(data["quadratic"]))


def fit_latency(ratios: Sequence[float], latencies_s: Sequence[float]) -> SliceLatencyFit:
    """Least-squares fit of both latency models to one slice's (ratio, seconds) measurements.

    Repeated measurements at the same ratio are welcome (they average out noise); at least three distinct
    ratios are needed for the quadratic.
    """
    p = np.asarray(ratios, dtype=float)
    t = np.asarray(latencies_s, dtype=float)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError("ratios and latencies must be equally long 1-D sequences")
    if len(np.unique(p)) < 3:
        raise ValueError("need measurements at >= 3 distinct ratios to fit a quadratic")
    if np.any((p < 0) | (p >= 1)) or np.any(t <= 0):
        raise ValueError("ratios must lie in [0, 1) and latencies be positive")

    slope, intercept = np.polyfit(p, t, 1)
    linear = LatencyCurve("linear", (float(slope), float(intercept)), *fit_quality(slope * p + intercept, t))
    kept = 1.0 - p
    design = np.column_stack([np.ones_like(kept), kept, kept ** 2])
    coef = np.linalg.lstsq(design, t, rcond=None)[0]
    quadratic = LatencyCurve("quadratic", tuple(float(c) for c in coef), *fit_quality(design @ coef, t))
    return SliceLatencyFit(tuple(float(x) for x in p), tuple(float(x) for x in t), linear, quadratic)
