"""Each node's current slowdown from the compute time of its last few frames: pure, time passed in.

Every result carries one hop per stage with the ratio the node ran and its compute time (decode
excluded). Compute over the node's calibrated curve at that ratio is a slowdown sample that needs no
end-to-end latency and no queue to build up: the first frame a slowed node serves already says how
slow it is. One sample can be a scheduling spike, so an estimate moves only when ``frames``
consecutive samples agree that it is off by more than ``margin`` (all above ``estimate × (1 +
margin)``, or all below ``estimate / (1 + margin)``); it then moves to their median. A spike never
moves it; a real slowdown moves it after ``frames`` slowed frames, and a recovery brings it back the
same way. The adaptive controller (``gateway/controller.py``) acts on these moves.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class SlowdownChange:
    """A node's estimate moved: ``frames`` consecutive samples agreed, the last of them completed at ``ts``."""

    node_id: str
    ts: float
    previous: float
    estimate: float


class SlowdownDetector:
    """Per-node slowdown estimates (≥ 1: a node is never assumed faster than calibrated) from per-frame samples."""

    def __init__(self, frames: int = 3, margin: float = 0.5):
        if frames < 1 or margin <= 0:
            raise ValueError("frames must be >= 1 and margin > 0")
        self.frames = frames
        self.margin = margin
        self._samples: dict[str, deque[float]] = {}
        self._estimate: dict[str, float] = {}

    def estimate(self, node_id: str) -> float:
        return self._estimate.get(node_id, 1.0)

    def estimates(self) -> dict[str, float]:
        return dict(self._estimate)

    def recall(self, estimates: dict[str, float]) -> None:
        """Start from estimates an earlier detector reached (a slowdown belongs to the device, not its slice)."""
        self._estimate.update({node: max(1.0, k) for node, k in estimates.items()})

    def forget(self, node_id: str) -> None:
        self._samples.pop(node_id, None)
        self._estimate.pop(node_id, None)

    def observe(self, ts: float, node_id: str, compute_s: float, calibrated_s: float) -> SlowdownChange | None:
        """One frame's compute at a node against the calibrated time at the ratio it ran; the change it made."""
        if compute_s <= 0 or calibrated_s <= 0:
            return None
        recent = self._samples.setdefault(node_id, deque(maxlen=self.frames))
        recent.append(compute_s / calibrated_s)
        if len(recent) < self.frames:
            return None
        current = self.estimate(node_id)
        higher = all(s > current * (1 + self.margin) for s in recent)
        lower = all(s < current / (1 + self.margin) for s in recent)
        new = max(1.0, statistics.median(recent))
        if not (higher or lower) or new == current:
            return None
        self._estimate[node_id] = new
        recent.clear()  # the next move needs frames fresh evidence against the new estimate
        return SlowdownChange(node_id, ts, current, new)
