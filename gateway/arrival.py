"""Has the arrival rate changed for good? Measure it, and ask for a re-plan only on a persistent change.

Camera traps send bursts (a passing animal: a dozen frames in half a minute, then minutes of
nothing, :mod:`camera.arrivals`), and seasons (a migration, a rut, a fruiting tree) change the mean
rate for days. The hybrid planner's choice depends on the rate (:mod:`gateway.hybrid`: how much to
prune up front, how many replicas a stage needs), so the gateway re-plans for a new season, but a
burst must never move blocks. Hysteresis, all in ``[gateway] rate_*`` settings:

- the rate is the frames stage 1 accepted in the last ``window_s``, divided by it (no rate before
  one whole window has passed);
- a re-plan is due when that rate has stayed outside ``planned × (1 ± band)`` on the *same* side for
  ``dwell_s`` without a break: a spike raises the windowed rate for at most its own length plus
  ``window_s``, so bursts shorter than ``dwell_s − window_s`` never trigger, and a rate wandering in
  and out of the band restarts the dwell each time it comes back (no flapping);
- two re-plans are at least ``min_interval_s`` apart;
- rates below ``floor_hz`` count as ``floor_hz``: a quiet night going from 0.01 to 0.03 frames/s is a
  300% change of nothing.

Before the first rate-aware plan there is no planned rate: the first full window's rate, once held
for ``dwell_s`` like any other, is planned for. Pure: time is passed in.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.hybrid import UNPRUNED, Level
from shared.latency_fit import SliceLatencyFit


@dataclass(frozen=True)
class RateRules:
    window_s: float
    band: float
    dwell_s: float
    min_interval_s: float
    floor_hz: float

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and 0 < self.band < 1 and self.dwell_s >= 0 and self.min_interval_s >= 0
                and self.floor_hz > 0):
            raise ValueError("rate rules: window_s > 0, 0 < band < 1, dwell_s >= 0, min_interval_s >= 0, "
                             "floor_hz > 0")


class ArrivalMeter:
    """Accepted frames per second over the last ``window_s``, from per-second counts (bounded memory)."""

    def __init__(self, window_s: float, started: float):
        self.window_s = window_s
        self.started = started
        self._counts: deque[tuple[int, int]] = deque()  # (whole second, frames accepted in it), oldest first

    def add(self, ts: float) -> None:
        second = math.floor(ts)
        if self._counts and self._counts[-1][0] == second:
            self._counts[-1] = (second, self._counts[-1][1] + 1)
        elif self._counts and second < self._counts[-1][0]:  # late (clock step): count it with the newest
            self._counts[-1] = (self._counts[-1][0], self._counts[-1][1] + 1)
        else:
            self._counts.append((second, 1))

    def rate(self, now: float) -> float | None:
        """Frames per second over the last window; None until a whole window has been watched."""
        while self._counts and self._counts[0][0] + 1 <= now - self.window_s:  # whole second before the window
            self._counts.popleft()
        if now - self.started < self.window_s:
            return None
        return sum(n for _, n in self._counts) / self.window_s


class RateTrigger:
    """Decides when the measured rate is far enough from the planned one, for long enough, to re-plan."""

    def __init__(self, rules: RateRules, planned_hz: float | None = None):
        self.rules = rules
        self.planned_hz = planned_hz  # the rate the current plan was made for; None: none yet
        self.last_replan: float | None = None
        self._side = 0  # +1 above the band, -1 below, 0 inside
        self._since: float | None = None  # when the rate left the band on this side

    def band(self) -> tuple[float, float] | None:
        if self.planned_hz is None:
            return None
        planned = max(self.planned_hz, self.rules.floor_hz)
        return planned * (1 - self.rules.band), planned * (1 + self.rules.band)

    def observe(self, now: float, rate_hz: float | None) -> float | None:
        """The rate to re-plan for, when one is due now; else None."""
        if rate_hz is None:
            return None
        side = self._side_of(max(rate_hz, self.rules.floor_hz))
        if side != self._side:
            self._side, self._since = side, (now if side else None)
        if not side or now - self._since < self.rules.dwell_s:
            return None
        if self.last_replan is not None and now - self.last_replan < self.rules.min_interval_s:
            return None
        self.planned_hz, self.last_replan = rate_hz, now
        self._side, self._since = 0, None
        return rate_hz

    def _side_of(self, rate_hz: float) -> int:
        band = self.band()
        if band is None:  # nothing planned for yet: any rate with traffic is news; silence since start-up is not
            return 1 if rate_hz > self.rules.floor_hz else 0
        low, high = band
        return 1 if rate_hz > high else -1 if rate_hz < low else 0

    def status(self, now: float) -> dict:
        """What the operator page and the logs show: planned rate, band, and how long the rate has been out."""
        band = self.band()
        return {"planned_hz": self.planned_hz, "band_hz": list(band) if band else None,
                "outside_s": 0.0 if self._since is None else now - self._since,
                "last_replan": self.last_replan}


def levels_from_fits(ladder: Sequence[float], fits: Mapping[str, SliceLatencyFit],
                     max_ratio: float) -> tuple[Level, ...]:
    """The hybrid planner's accuracy levels from the nodes' own calibrations: for each ladder ratio up to
    ``max_ratio``, the median over the calibrated slices of (time at that ratio) / (time unpruned).

    No calibration yet: only the unpruned level (the planner then chooses structure alone).
    """
    curves = [fit.best() for fit in fits.values()]
    if not curves:
        return UNPRUNED
    levels = [Level(0.0, 1.0)]
    for ratio in ladder:
        if 0 < ratio <= max_ratio:
            factor = statistics.median(c.predict(ratio) / c.predict(0.0) for c in curves)
            levels.append(Level(ratio, min(1.0, max(factor, 1e-3))))  # pruning never makes a slice slower
    return tuple(levels)
