"""What a node says about its own health in its stats (:class:`shared.schemas.NodeStats`): counts since it started,
and latency figures since the previous report, so they describe the node's *current* speed. Free of MQTT; the agent
records under its lock."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

WINDOW = 1024  # requests a report's latency figures cover at most


class CpuMeter:
    """Process CPU use since the last reading, in percent of one core."""

    def __init__(self):
        self._wall = time.monotonic()
        self._cpu = time.process_time()

    def read(self) -> float:
        wall, cpu = time.monotonic(), time.process_time()
        pct = 100.0 * (cpu - self._cpu) / max(wall - self._wall, 1e-6)
        self._wall, self._cpu = wall, cpu
        return max(pct, 0.0)


class Health:
    """Requests served, served late and dropped; compute, decode and queue-wait times of those served lately."""

    def __init__(self):
        self.processed = 0
        self.dropped = 0
        self.late_served = 0
        self._compute_s: deque[float] = deque(maxlen=WINDOW)
        self._decode_s: deque[float] = deque(maxlen=WINDOW)
        self._queue_wait_s: deque[float] = deque(maxlen=WINDOW)

    def served(self, compute_s: float, decode_s: float, queue_wait_s: float, late: bool) -> None:
        self.processed += 1
        self.late_served += late
        self._compute_s.append(compute_s)
        self._decode_s.append(decode_s)
        self._queue_wait_s.append(queue_wait_s)

    def drop(self) -> int:
        """One request dropped; how many so far."""
        self.dropped += 1
        return self.dropped

    def report(self) -> dict[str, float | int | None]:
        """The ``NodeStats`` fields of this report; the latency figures start again after it."""
        compute = np.array(self._compute_s) if self._compute_s else None
        figures = {"processed": self.processed, "dropped": self.dropped, "late_served": self.late_served,
                   "compute_mean_s": float(compute.mean()) if compute is not None else None,
                   "compute_p95_s": float(np.percentile(compute, 95)) if compute is not None else None,
                   "queue_wait_mean_s": float(np.mean(self._queue_wait_s)) if self._queue_wait_s else None,
                   "decode_mean_s": float(np.mean(self._decode_s)) if self._decode_s else None}
        self._compute_s.clear()
        self._decode_s.clear()
        self._queue_wait_s.clear()
        return figures
