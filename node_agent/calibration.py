"""When a node takes its calibration runs, and what it hands over once a slice is measured: pure, time passed in.

A node measures its slice at every ladder ratio (the controller's latency curves) while it
serves. One timed run at a time goes in after the work queue has been idle for a short pause
(as a live request arrives after a pause), and at least every ``max_gap_s`` under steady load,
so calibration never stalls serving and always finishes. The measuring itself is the
calibrator's (:class:`node_agent.runtime.SliceCalibrator`); this module only decides when, and
the agent (:mod:`node_agent.agent`) only supplies the clock, the thread and the bus.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shared.schemas import SliceCalibration, StageAssignment

PAUSE_S = 0.05  # idle this long before a timed calibration run, as a live request would be
MAX_GAP_S = 1.0  # under steady load, still take one run this often


class Calibrator(Protocol):
    """Measures one slice (:class:`node_agent.runtime.SliceCalibrator`)."""

    ladder: tuple[float, ...]

    def step(self) -> bool: ...  # one run; True once every ratio is measured

    def latencies(self) -> list[float]: ...  # seconds per ladder ratio, once done


class Calibrated(Protocol):
    """What is calibrated (a :class:`node_agent.runtime.StageRuntime`): it emulates a slowdown from the curve."""

    assignment: StageAssignment

    def use_calibration(self, latencies_s: list[float]) -> None: ...  # one median per ladder ratio


@dataclass(frozen=True)
class FinishedCalibration:
    """A slice measured at every ratio, already handed to its runtime (``use_calibration``)."""

    target: Calibrated
    latency_s: dict[float, float]  # unslowed median seconds per ladder ratio

    def message(self, node_id: str, placement_version: int, device_factor: float,
                measured_at: float) -> SliceCalibration:
        """The retained curve for the controller, at the speed the device claims to have.

        ``device_factor`` is the node's configured emulated slowdown: a device emulated slower from
        the start reports its curve that much slower, as its profile does.
        """
        a = self.target.assignment
        return SliceCalibration(node_id=node_id, placement_version=placement_version, first_block=a.first_block,
                                last_block=a.last_block, ratios=list(self.latency_s),
                                latency_s=[t * device_factor for t in self.latency_s.values()],
                                measured_at=measured_at)


class CalibrationSchedule:
    """Which slice is being calibrated and whether a run is due now.

    :meth:`request` may be called from any thread (a new stage, a ``calibrate`` command); every
    other method belongs to whichever thread holds the work queue's claim (one at a time: the
    inference thread, or paho's when it serves a request at once).
    """

    def __init__(self, make_calibrator: Callable[[Calibrated], Calibrator], pause_s: float = PAUSE_S,
                 max_gap_s: float = MAX_GAP_S):
        self.make_calibrator = make_calibrator
        self.pause_s = pause_s
        self.max_gap_s = max_gap_s
        self._lock = threading.Lock()
        self._requested: Calibrated | None = None
        self._new_request = False
        self._current: tuple[Calibrated, Calibrator] | None = None
        self._last_run: float | None = None

    def request(self, target: Calibrated | None) -> None:
        """Calibrate ``target`` next, abandoning any unfinished one (``None``: nothing to serve)."""
        with self._lock:
            self._requested = target
            self._new_request = True

    @property
    def busy(self) -> bool:
        return self._current is not None or self._new_request

    def wait_s(self, idle_wait_s: float) -> float:
        """How long the worker may block waiting for a request before it should call :meth:`tick`."""
        return self.pause_s if self.busy else idle_wait_s

    def tick(self, now: float, idle: bool) -> FinishedCalibration | None:
        """Take one run if one is due (``idle``: the queue stayed empty for :meth:`wait_s`)."""
        with self._lock:
            requested, new_request = self._requested, self._new_request
            self._requested, self._new_request = None, False
        if new_request:
            self._current = (requested, self.make_calibrator(requested)) if requested is not None else None
            self._last_run = None
        if self._current is None:
            return None
        if not idle and self._last_run is not None and now - self._last_run < self.max_gap_s:
            return None
        target, calibrator = self._current
        self._last_run = now
        if not calibrator.step():
            return None
        self._current = None
        latency_s = dict(zip(calibrator.ladder, calibrator.latencies()))
        target.use_calibration(list(latency_s.values()))
        return FinishedCalibration(target, latency_s)
