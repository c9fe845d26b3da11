"""When a node takes its calibration runs (node_agent/calibration.py), on a fake clock and a fake calibrator."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from node_agent.calibration import CalibrationSchedule
from shared.schemas import StageAssignment


@dataclass
class FakeRuntime:
    assignment: StageAssignment
    calibrated: list[float] | None = None  # what the schedule handed over

    def use_calibration(self, latencies_s: list[float]) -> None:
        self.calibrated = list(latencies_s)


class FakeCalibrator:
    """Needs ``runs`` steps; reports 10 ms at p=0, one ms less per ladder step."""

    ladder = (0.0, 0.5, 0.9)

    def __init__(self, runs: int):
        self.runs = runs
        self.steps = 0

    def step(self) -> bool:
        self.steps += 1
        return self.steps >= self.runs

    def latencies(self) -> list[float]:
        assert self.steps >= self.runs, "latencies read before the calibration was done"
        return [0.010, 0.009, 0.008]


def schedule(runs: int = 3) -> tuple[CalibrationSchedule, list[FakeCalibrator]]:
    made: list[FakeCalibrator] = []

    def make(_runtime):
        made.append(FakeCalibrator(runs))
        return made[-1]

    return CalibrationSchedule(make, pause_s=0.05, max_gap_s=1.0), made


def runtime(first: int = 0, last: int = 2) -> FakeRuntime:
    return FakeRuntime(StageAssignment(stage=1, node_id="n1", first_block=first, last_block=last))


def test_nothing_requested_means_no_runs_and_the_idle_wait():
    sched, made = schedule()
    assert not sched.busy and sched.wait_s(0.2) == 0.2
    assert sched.tick(0.0, idle=True) is None and not made


def test_idle_pauses_each_take_one_run_and_the_finished_curve_is_handed_over():
    sched, made = schedule(runs=3)
    rt = runtime()
    sched.request(rt)
    assert sched.busy and sched.wait_s(0.2) == 0.05  # poll at the pause while calibrating
    assert sched.tick(10.0, idle=True) is None
    assert sched.tick(10.05, idle=True) is None
    assert made[0].steps == 2 and rt.calibrated is None  # nothing handed over half-measured
    finished = sched.tick(10.10, idle=True)
    assert finished is not None and finished.target is rt
    assert finished.latency_s == {0.0: 0.010, 0.5: 0.009, 0.9: 0.008}
    assert rt.calibrated == [0.010, 0.009, 0.008]
    assert not sched.busy and sched.tick(20.0, idle=True) is None and made[0].steps == 3


def test_under_load_one_run_per_max_gap():
    sched, made = schedule(runs=10)
    sched.request(runtime())
    sched.tick(0.0, idle=False)  # the first run is due at once
    for now in (0.2, 0.5, 0.99):
        sched.tick(now, idle=False)
    assert made[0].steps == 1
    sched.tick(1.0, idle=False)
    sched.tick(1.5, idle=False)
    assert made[0].steps == 2
    sched.tick(1.6, idle=True)  # an idle pause is always a good moment, whatever the gap
    assert made[0].steps == 3


def test_a_new_request_abandons_the_unfinished_calibration():
    sched, made = schedule(runs=3)
    old, new = runtime(0, 2), runtime(3, 5)
    sched.request(old)
    sched.tick(0.0, idle=True)
    sched.request(new)
    results = [sched.tick(t, idle=True) for t in (0.1, 0.2, 0.3)]
    assert len(made) == 2 and made[0].steps == 1  # the old slice is never measured further
    assert results[:2] == [None, None] and results[2].target is new
    assert old.calibrated is None and new.calibrated


def test_requesting_nothing_cancels():
    sched, made = schedule(runs=3)
    sched.request(runtime())
    sched.tick(0.0, idle=True)
    sched.request(None)
    assert sched.tick(0.1, idle=True) is None and not sched.busy and made[0].steps == 1


@pytest.mark.parametrize("device_factor", [1.0, 3.0])
def test_the_published_curve_names_the_slice_and_carries_the_device_factor(device_factor):
    sched, _ = schedule(runs=1)
    rt = runtime(2, 4)
    sched.request(rt)
    message = sched.tick(0.0, idle=True).message("n1", placement_version=7, device_factor=device_factor,
                                                 measured_at=123.0)
    assert (message.first_block, message.last_block, message.placement_version) == (2, 4, 7)
    assert message.ratios == [0.0, 0.5, 0.9]
    assert message.latency_s == pytest.approx([0.010 * device_factor, 0.009 * device_factor, 0.008 * device_factor])
    assert rt.calibrated[0] == 0.010  # the runtime keeps the unslowed figures
