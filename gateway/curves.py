"""Calibration fits the pruning controller predicts with: slice latency vs ratio, accuracy vs ratio vector.

Pure numpy/scipy, so calibration rows from SQLite can be refitted anywhere and the controller is testable
without torch. Every fit keeps its measurements and reports its error, because a poor fit must be visible
to the operator rather than silently steer the controller.

The latency fits live in :mod:`shared.latency_fit`, because a node emulates a slowdown from the same fit
(and a node does not import ``gateway/``); they are re-exported here so the controller has one fits module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit, logit

from shared.latency_fit import LatencyCurve, LatencyKind, SliceLatencyFit, fit_latency, fit_quality

__all__ = ["AccuracyFit", "AccuracyModel", "AccuracyPredictor", "LatencyCurve", "LatencyKind", "PipelineMix",
           "ReplicaAccuracy", "SliceLatencyFit", "accuracy_for_slices", "fit_accuracy", "fit_latency"]

AccuracyModel = Literal["logistic", "measured"]
AccuracyPredictor = Callable[[Sequence[float]], float]


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
    r2, rmse = fit_quality(model(theta), measured)
    return AccuracyFit(gains=tuple(float(g) for g in theta[:n]), offset=float(theta[n]), top=float(theta[n + 1]),
                       chance=chance, r2=r2, rmse=rmse,
                       vectors=tuple(tuple(float(p) for p in row) for row in ratios),
                       accuracies=tuple(float(a) for a in measured))


def accuracy_for_slices(block_fit: AccuracyFit, slices: Sequence[tuple[int, int]],
                        first_readers: Sequence[int] | None = None) -> AccuracyFit | PipelineMix:
    """The accuracy model of one placement, from a model calibrated once per *block*.

    ``slices``: the placement's stages in order; parallel pipelines list each of their cuts of the model after the
    other (a slice starting at block 0 again starts the next pipeline): their model is a :class:`PipelineMix`, each
    pipeline weighed by its first stage's nodes (``first_readers``, one each when not given).

    Pruning masks depend on a block's weights and ratio alone (shared/pruning.py), so one offline
    calibration with a ratio per block serves every placement: a slice pruned at p prunes each of its
    blocks at p, hence its gain is the sum of its blocks' gains. A measured block vector is carried over
    as the slice vector of its least-pruned block per slice: that vector prunes no more than the one
    measured, so its recorded accuracy stays a lower bound and ``lookup`` stays safe.
    """
    pipelines = _pipelines_of(slices)
    covered = [[b for first, last in pipeline for b in range(first, last + 1)] for pipeline in pipelines]
    if any(blocks != list(range(block_fit.n_stages)) for blocks in covered):
        raise ValueError(f"slices {list(slices)} do not cover the {block_fit.n_stages} calibrated blocks in order")
    if len(pipelines) > 1:
        readers = list(first_readers or [1] * len(pipelines))
        if len(readers) != len(pipelines) or min(readers) < 1:
            raise ValueError(f"{len(pipelines)} pipelines need a first-stage reader count each, not {readers}")
        return PipelineMix(tuple(accuracy_for_slices(block_fit, p) for p in pipelines),
                           tuple(r / sum(readers) for r in readers))
    gains = tuple(float(sum(block_fit.gains[first:last + 1])) for first, last in slices)
    vectors = tuple(tuple(float(min(v[first:last + 1])) for first, last in slices) for v in block_fit.vectors)
    return AccuracyFit(gains=gains, offset=block_fit.offset, top=block_fit.top, chance=block_fit.chance,
                       r2=block_fit.r2, rmse=block_fit.rmse, vectors=vectors, accuracies=block_fit.accuracies)


def _pipelines_of(slices: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``slices`` cut where a slice starts at block 0 again (a placement lists its pipelines one after the other)."""
    pipelines: list[list[tuple[int, int]]] = []
    for first, last in slices:
        if first == 0 or not pipelines:
            pipelines.append([])
        pipelines[-1].append((first, last))
    return pipelines


@dataclass(frozen=True)
class PipelineMix:
    """The accuracy model over the slices of parallel pipelines (docs/scaling.md, "Parallel pipelines").

    Each frame passes one pipeline; the broker deals frames in turn to every reader of the pipelines' first stages,
    whatever a pipeline's speed (measured with and without flow control: docs/scaling.md), so a pipeline takes
    ``shares[j]`` = its first stage's nodes / all first-stage nodes of the frames, and the expected accuracy of a
    slice ratio vector is the share-weighted mean over pipelines of each one's model at its own slices. Monotone like
    its parts; ``gains`` (the paper policy's linear floor) are each slice's gain times its pipeline's share. The
    pipelines share one block model, so they need the same score for a floor.
    """

    pipelines: tuple[AccuracyFit, ...]  # per pipeline, the model of its slices (accuracy_for_slices)
    shares: tuple[float, ...]  # per pipeline, its fraction of the frames

    @property
    def n_stages(self) -> int:
        """One entry per slice, pipeline after pipeline: the controller indexes ratios by stage node."""
        return sum(p.n_stages for p in self.pipelines)

    @property
    def gains(self) -> tuple[float, ...]:
        return tuple(g * share for p, share in zip(self.pipelines, self.shares) for g in p.gains)

    def required_score(self, floor: float) -> float:
        return self.pipelines[0].required_score(floor)

    def predictor(self, model: AccuracyModel) -> AccuracyPredictor:
        parts, start = [], 0
        for pipeline, share in zip(self.pipelines, self.shares):
            parts.append((pipeline.predictor(model), share, start, start + pipeline.n_stages))
            start += pipeline.n_stages

        def mean(ratios: Sequence[float]) -> float:
            return sum(share * predict(ratios[a:b]) for predict, share, a, b in parts)
        return mean


@dataclass(frozen=True)
class ReplicaAccuracy:
    """The accuracy model over *nodes* when stages have replicas that may run different ratios.

    Each frame passes one replica per stage; a replica takes ``shares[u]`` of its stage's frames (the
    broker's shared subscription hands them out in turn: equal shares). So the expected accuracy of the
    node ratio vector is the share-weighted mean, over every path (one replica per stage), of the stage
    model at that path's stage vector:

        E[a] = sum over paths (r_1..r_K) of  prod_k shares[r_k] * a(p[r_1], ..., p[r_K])

    Exact for independent routing, monotone (pruning any node never raises it), and equal to the stage
    model when every stage has one node. ``gains`` (for the paper policy's linear floor) are the stage
    gains times the node's share: the expected score, whose floor the policy then checks with this model.
    """

    stage_fit: AccuracyFit | PipelineMix
    groups: tuple[tuple[int, ...], ...]  # node indices per stage, in stage order
    shares: tuple[float, ...]  # per node: its fraction of its stage's frames

    def __post_init__(self) -> None:
        nodes = sorted(u for group in self.groups for u in group)
        if len(self.groups) != self.stage_fit.n_stages or nodes != list(range(len(self.shares))):
            raise ValueError("every stage needs a group of nodes, and every node one share")
        if any(abs(sum(self.shares[u] for u in group) - 1.0) > 1e-9 for group in self.groups):
            raise ValueError("the shares of a stage's nodes must add up to 1")

    @classmethod
    def equal_shares(cls, stage_fit: AccuracyFit | PipelineMix, stage_sizes: Sequence[int]) -> ReplicaAccuracy:
        groups, shares, start = [], [], 0
        for size in stage_sizes:
            groups.append(tuple(range(start, start + size)))
            shares += [1.0 / size] * size
            start += size
        return cls(stage_fit, tuple(groups), tuple(shares))

    @property
    def n_stages(self) -> int:
        """One entry per node: the controller and policies index ratios by node."""
        return len(self.shares)

    @property
    def gains(self) -> tuple[float, ...]:
        gains = [0.0] * len(self.shares)
        for stage, group in enumerate(self.groups):
            for u in group:
                gains[u] = self.stage_fit.gains[stage] * self.shares[u]
        return tuple(gains)

    def required_score(self, floor: float) -> float:
        return self.stage_fit.required_score(floor)

    def predictor(self, model: AccuracyModel) -> AccuracyPredictor:
        stage_predict = self.stage_fit.predictor(model)
        paths = [(float(np.prod([self.shares[u] for u in path])), path) for path in product(*self.groups)]

        def expected(ratios: Sequence[float]) -> float:
            return sum(weight * stage_predict([ratios[u] for u in path]) for weight, path in paths)
        return expected
