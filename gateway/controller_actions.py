"""What the pruning controller decides (:class:`SetRatios`, :class:`Infeasible`, :class:`Held`) and the
:class:`Metrics` it decided on: the vocabulary shared by :mod:`gateway.controller`, its two rules
(:mod:`gateway.tracking`, :mod:`gateway.reactive`) and :mod:`gateway.control_loop`, which turns actions into
retained desired states and ``prune_events`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.policy import Decision


@dataclass(frozen=True)
class Metrics:
    """What the trigger and restore rules saw, logged with every action and shown on the operator page.

    Only requests completed after the last action count: earlier ones describe the old ratios.
    """

    trigger_samples: int
    over_trigger_fraction: float
    violation_span_s: float
    restore_samples: int
    headroom_fraction: float
    slowdowns: dict[str, float]
    queue_depths: dict[str, int]
    arrival_hz: float | None = None


@dataclass(frozen=True)
class SetRatios:
    """Publish a new desired state for the nodes listed (only those whose ratio or source changes)."""

    ts: float
    ratios: dict[str, float]
    source: Literal["auto", "manual"]
    reason: str
    decision: Decision
    metrics: Metrics


@dataclass(frozen=True)
class Infeasible:
    """Even the most pruning allowed cannot meet the budget; the best effort (if new) is a SetRatios."""

    ts: float
    reason: str
    decision: Decision
    metrics: Metrics


@dataclass(frozen=True)
class Held:
    """A sustained violation the curves do not explain: the current ratios are predicted to meet the budget."""

    ts: float
    reason: str
    decision: Decision
    metrics: Metrics


Action = SetRatios | Infeasible | Held
