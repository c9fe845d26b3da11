"""SLO accounting in fixed windows: pure, time is passed in."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class WindowSummary:
    start_ts: float
    end_ts: float
    count: int
    slo_s: float
    met: int
    attainment_pct: float
    p50_s: float
    p95_s: float
    p99_s: float
    labelled: int = 0
    accuracy_measured: float | None = None  # fraction right among the window's labelled frames

    def row(self) -> dict:
        return asdict(self)


class SloWindows:
    """Groups completed requests by the window their completion falls in and summarises each.

    It keeps its own latencies (not the controller's sliding buffer): a window needs every result
    of its span, whether or not the controller runs, until it closes (see ControlLoop.observe_latency).
    """

    def __init__(self, window_s: float, slo_s: float):
        self.window_s = window_s
        self.slo_s = slo_s
        self._open: dict[int, list[float]] = {}
        self._correct: dict[int, list[int]] = {}

    def add(self, finish_ts: float, latency_s: float, correct: int | None = None) -> None:
        """One completed request; ``correct`` (1/0) when its frame carried a ground-truth label."""
        index = math.floor(finish_ts / self.window_s)
        self._open.setdefault(index, []).append(latency_s)
        if correct is not None:
            self._correct.setdefault(index, []).append(correct)

    def close_due(self, now: float) -> list[WindowSummary]:
        """Summaries of every window that ended at or before ``now`` (each returned once)."""
        done = sorted(k for k in self._open if (k + 1) * self.window_s <= now)
        return [self._summarise(k, self._open.pop(k)) for k in done]

    def close_all(self) -> list[WindowSummary]:
        return [self._summarise(k, self._open.pop(k)) for k in sorted(self._open)]

    def _summarise(self, index: int, latencies: list[float]) -> WindowSummary:
        lat = np.asarray(latencies)
        met = int((lat <= self.slo_s).sum())
        p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
        correct = self._correct.pop(index, [])
        return WindowSummary(index * self.window_s, (index + 1) * self.window_s, int(lat.size), self.slo_s,
                             met, 100.0 * met / lat.size, p50, p95, p99, len(correct),
                             sum(correct) / len(correct) if correct else None)
