"""Calibration fits the pruning controller predicts with: slice latency vs ratio, accuracy vs ratio vector.

Pure numpy/scipy, so calibration rows from SQLite can be refitted anywhere and the controller is testable
without torch. Every fit keeps its measurements and reports its error, because a poor fit must be visible
to the operator rather than silently steer the controller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
from numpy.polynomial import Polynomial
from scipy.optimize import least_squares
from scipy.special import expit, logit

LatencyKind = Literal["linear", "quadratic"]
AccuracyModel = Literal["logistic", "measured"]
AccuracyPredictor = Callable[[Sequence[float]], float]


def _fit_quality(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
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
    linear = LatencyCurve("linear", (float(slope), float(intercept)), *_fit_quality(slope * p + intercept, t))
    kept = 1.0 - p
    design = np.column_stack([np.ones_like(kept), kept, kept ** 2])
    coef = np.linalg.lstsq(design, t, rcond=None)[0]
    quadratic = LatencyCurve("quadratic", tuple(float(c) for c in coef), *_fit_quality(design @ coef, t))
    return SliceLatencyFit(tuple(float(x) for x in p), tuple(float(x) for x in t), linear, quadratic)


@dataclass(frozen=True)
class AccuracyFit:
    """End-to-end accuracy against the vector of per-slice ratios, fitted and measured.

    Fitted model: a(p) = chance + (top − chance) · σ(Σ g_i·p_i − d), σ the logistic function.

    * Sign convention: this is the paper's form, in which accuracy *rises* with Σ g_i·p_i; since accuracy
      falls with pruning, fitted gains g_i are ≤ 0 (the fit bounds them there, so a noisy calibration can
      never claim that pruning a slice buys accuracy, which would let a policy prune it for free).
    * Scale: a real model's accuracy tops out below 1 and falls to chance, not 0, so a bare logistic
      would bend g and d to fit both ends. ``top`` (fitted, ≤ 1) is the upper asymptote; ``chance``
      (given, e.g. 1/classes) the lower one. With chance = 0 this is the top·logistic form.
    """

    gains: tuple[float, ...]
    offset: float
    top: float
    chance: float
    r2: float
    rmse: float
    vectors: tuple[tuple[float, ...], ...]
    accuracies: tuple[float, ...]

    @property
    def n_stages(self) -> int:
        return len(self.gains)

    def logistic(self, ratios: Sequence[float]) -> float:
        score = float(np.dot(self.gains, ratios))
        return self.chance + (self.top - self.chance) * float(expit(score - self.offset))

    def lookup(self, ratios: Sequence[float]) -> float:
        """Best accuracy measured at a vector pruning every slice at least as much as ``ratios``.

        Accuracy does not rise with pruning, so this is a safe lower bound from measurements alone, for
        where the logistic fits poorly. With no such measurement the answer is ``chance``, so an
        unmeasured region is never chosen on the strength of a guess.
        """
        vectors = np.asarray(self.vectors)
        dominating = np.all(vectors >= np.asarray(ratios, dtype=float) - 1e-9, axis=1)
        return float(np.max(np.asarray(self.accuracies)[dominating])) if dominating.any() else self.chance

    def predictor(self, model: AccuracyModel) -> AccuracyPredictor:
        return self.logistic if model == "logistic" else self.lookup

    def required_score(self, floor: float) -> float:
        """Smallest Σ g_i·p_i at which the logistic reaches ``floor`` (±inf when always/never reached).

        σ is monotone, so the floor a(p) ≥ A_min is the linear constraint Σ g_i·p_i ≥ this value.
        """
        fraction = (floor - self.chance) / (self.top - self.chance)
        if fraction <= 0.0:
            return -np.inf
        if fraction >= 1.0:
            return np.inf
        return self.offset + float(logit(fraction))

    def to_dict(self) -> dict[str, Any]:
        return {"gains": list(self.gains), "offset": self.offset, "top": self.top, "chance": self.chance,
                "r2": self.r2, "rmse": self.rmse, "vectors": [list(v) for v in self.vectors],
                "accuracies": list(self.accuracies)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyFit:
        return cls(gains=tuple(float(g) for g in data["gains"]), offset=float(data["offset"]),
                   top=float(data["top"]), chance=float(data["chance"]), r2=float(data["r2"]),
                   rmse=float(data["rmse"]), vectors=tuple(tuple(float(p) for p in v) for v in data["vectors"]),
                   accuracies=tuple(float(a) for a in data["accuracies"]))


def fit_accuracy(vectors: Sequence[Sequence[float]], accuracies: Sequence[float],
                 chance: float = 0.0) -> AccuracyFit:
    """Least-squares fit of the logistic accuracy model (see :class:`AccuracyFit`) to measured vectors.

    Needs more measured vectors than parameters (n gains + offset + top), spread over the ratios the
    controller may choose; include the unpruned vector and a few uniform ones so the lookup covers all.
    """
    ratios = np.asarray(vectors, dtype=float)
    measured = np.asarray(accuracies, dtype=float)
    if ratios.ndim != 2 or measured.shape != (ratios.shape[0],):
        raise ValueError("vectors must be an (m, n) table with one accuracy per row")
    n = ratios.shape[1]
    if ratios.shape[0] < n + 3:
        raise ValueError(f"need at least {n + 3} measured vectors to fit {n + 2} parameters")
    if not 0.0 <= chance < measured.max() <= 1.0:
        raise ValueError("accuracies must lie in [0, 1] and some must exceed chance")

    # Start from a linear regression on the logit of the accuracy relative to its range.
    top0 = min(1.0, measured.max() + 0.01)
    relative = np.clip((measured - chance) / (top0 - chance), 0.02, 0.98)
    design = np.column_stack([ratios, -np.ones(len(ratios))])
    start = np.linalg.lstsq(design, logit(relative), rcond=None)[0]
    start[:n] = np.minimum(start[:n], -1e-3)

    def model(theta: np.ndarray) -> np.ndarray:
        gains, offset, top = theta[:n], theta[n], theta[n + 1]
        return chance + (top - chance) * expit(ratios @ gains - offset)

    lower = np.r_[np.full(n, -np.inf), -np.inf, chance + 1e-6]
    upper = np.r_[np.zeros(n), np.inf, 1.0]
    theta = least_squares(lambda th: model(th) - measured, np.r_[start, top0], bounds=(lower, upper)).x
    r2, rmse = _fit_quality(model(theta), measured)
    return AccuracyFit(gains=tuple(float(g) for g in theta[:n]), offset=float(theta[n]), top=float(theta[n + 1]),
                       chance=chance, r2=r2, rmse=rmse,
                       vectors=tuple(tuple(float(p) for p in row) for row in ratios),
                       accuracies=tuple(float(a) for a in measured))


def accuracy_for_slices(block_fit: AccuracyFit, slices: Sequence[tuple[int, int]]) -> AccuracyFit:
    """The accuracy model of one placement, from a model calibrated once per *block*.

    Pruning masks depend on a block's weights and ratio alone (shared/pruning.py), so one offline
    calibration with a ratio per block serves every placement: a slice pruned at p prunes each of its
    blocks at p, hence its gain is the sum of its blocks' gains. A measured block vector is carried over
    as the slice vector of its least-pruned block per slice: that vector prunes no more than the one
    measured, so its recorded accuracy stays a lower bound and ``lookup`` stays safe.
    """
    covered = [b for first, last in slices for b in range(first, last + 1)]
    if covered != list(range(block_fit.n_stages)):
        raise ValueError(f"slices {list(slices)} do not cover the {block_fit.n_stages} calibrated blocks in order")
    gains = tuple(float(sum(block_fit.gains[first:last + 1])) for first, last in slices)
    vectors = tuple(tuple(float(min(v[first:last + 1])) for first, last in slices) for v in block_fit.vectors)
    return AccuracyFit(gains=gains, offset=block_fit.offset, top=block_fit.top, chance=block_fit.chance,
                       r2=block_fit.r2, rmse=block_fit.rmse, vectors=vectors, accuracies=block_fit.accuracies)
