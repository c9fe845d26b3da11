"""The controller state machine on synthetic streams: trigger, cooldown, restore, hysteresis, manual holds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import expit

from gateway.controller import PruningController
from gateway.controller_actions import Held, Infeasible, SetRatios
from gateway.curves import fit_accuracy, fit_latency
from shared.settings import ControllerSettings

NODES = ("node-1", "node-2")
LADDER = tuple(round(0.1 * k, 1) for k in range(10))
REACTIVE = ControllerSettings(policy="bottleneck")  # the sustained-violation trigger (adaptive is tested below)
STEPWISE = ControllerSettings(policy="bottleneck", fast_restore=False)  # the step-wise restore alone
SLO_S = 0.5  # stage budget = 0.8 × 0.5 / 2 = 0.2 s; LAT_trigger = 0.55 s; headroom ≤ 0.35 s


def calibrated_time(ratio: float) -> float:
    """Both slices: 0.12 s unpruned, falling with MACs to 0.011 s at 0.9."""
    return 0.01 + 0.11 * (1 - ratio) ** 2


FITS = {node: fit_latency(LADDER, [calibrated_time(p) for p in LADDER]) for node in NODES}
VECTORS = np.array(list(itertools.product(LADDER, repeat=2)))
# Stage 1 costs three times the accuracy per step that stage 2 does; the floor is 0.9 × 0.935.
ACCURACY = fit_accuracy(VECTORS, 0.1 + 0.85 * expit(VECTORS @ np.array([-6.0, -2.0]) + 4.0), chance=0.1)


class Loop:
    """A two-stage pipeline in closed loop with the controller, in simulated time.

    Requests complete every ``1/rate_hz`` s with latency = Σ slowdown × calibrated time at the applied
    ratio + ``overhead_s`` + ``extra_s`` (a cause the curves cannot see), ±2 % noise; nodes apply desired
    ratios at once and report stats every 2 s; the gateway ticks every second.
    """

    def __init__(self, config: ControllerSettings | None = None, rate_hz: float = 5.0, overhead_s: float = 0.05,
                 initial_ratios: dict[str, float] | None = None):
        self.controller = PruningController(NODES, FITS, ACCURACY, SLO_S, config or REACTIVE, initial_ratios)
        self.slowdown = {node: 1.0 for node in NODES}
        self.decode_s = {node: 0.0 for node in NODES}
        self.queue = {node: 0 for node in NODES}  # what each node's stats report queued
        self.extra_s = 0.0
        self.overhead_s = overhead_s
        self.dt = 1.0 / rate_hz
        self.step = 0
        self.rng = np.random.default_rng(0)
        self.actions: list[tuple[float, object]] = []
        self.arriving = True  # False: a lull, no frames arrive or finish (stats and ticks go on)

    @property
    def now(self) -> float:
        return self.step * self.dt

    def compute_s(self, node: str) -> float:
        return self.slowdown[node] * calibrated_time(self.controller.ratios[node])

    def run_until(self, end: float) -> None:
        while self.now < end - 1e-9:
            self.step += 1
            latency = sum(self.compute_s(n) + self.decode_s[n] for n in NODES) + self.overhead_s + self.extra_s
            if self.arriving:
                self.controller.observe_arrival(self.now)
                for node in NODES:  # every result's hops: the compute each node spent on it
                    self.controller.observe_frame(self.now, node, self.compute_s(node), self.controller.ratios[node])
                self.controller.observe_latency(self.now, latency * (1 + self.rng.normal(0, 0.02)))
            if self.step % round(2.0 / self.dt) == 0:
                for node in NODES:
                    self.controller.observe_node(self.now, node, self.compute_s(node), self.queue[node],
                                                 self.controller.ratios[node],
                                                 self.decode_s[node])
            if self.step % round(1.0 / self.dt) == 0:
                self.actions += [(self.now, a) for a in self.controller.tick(self.now)]

    def of(self, kind: type) -> list[tuple[float, object]]:
        return [(t, a) for t, a in self.actions if isinstance(a, kind)]


def test_short_spike_is_ignored():
    loop = Loop()
    loop.run_until(60)
    loop.extra_s = 0.7  # every request 2.4× the SLO for 3 s
    loop.run_until(63)
    loop.extra_s = 0.0
    loop.run_until(120)
    assert loop.actions == []


def test_burst_of_requests_shorter_than_the_span_never_fires():
    # Sparse camera-trap traffic, then 20 frames in 1 s that all queue: 90 % of the window violates.
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S)
    for ts in range(0, 60, 5):
        controller.observe_latency(ts, 0.3)
    for k in range(20):
        controller.observe_latency(60 + k * 0.05, 0.6 + 0.05 * k)
    metrics = controller.metrics(61)
    assert metrics.over_trigger_fraction >= 0.9 and metrics.trigger_samples >= 5
    assert all(controller.tick(61 + s) == [] for s in range(10))


def test_sustained_violation_fires_within_the_window_on_the_slowed_node_only():
    loop = Loop()
    loop.run_until(30)
    loop.slowdown["node-2"] = 4.0  # 0.48 + 0.12 + 0.05 = 0.65 s > 0.55 s
    loop.run_until(60)
    (fired_at, action), = loop.of(SetRatios)
    config = loop.controller.config
    assert 30 + config.trigger_min_span_s <= fired_at <= 30 + config.trigger_window_s
    assert action.ratios == {"node-2": 0.4}  # 4 × t(0.4) = 0.198 s ≤ 0.2 s < 4 × t(0.3) = 0.256 s
    assert action.source == "auto" and not action.decision.infeasible
    assert action.decision.bottleneck_s <= loop.controller.budget_s
    assert action.metrics.over_trigger_fraction >= config.trigger_fraction
    assert action.metrics.slowdowns["node-2"] == pytest.approx(4.0, rel=0.05)


def test_cooldown_is_honoured_before_acting_again():
    loop = Loop()
    loop.slowdown["node-2"] = 4.0
    loop.run_until(7)
    (first, _), = loop.of(SetRatios)
    loop.slowdown["node-2"] = 12.0  # 12 × t(0.4) + 0.17 = 0.77 s: violating again at once
    loop.run_until(70)
    (_, _), (second, action) = loop.of(SetRatios)
    cooldown = loop.controller.config.cooldown_s
    assert first + cooldown <= second <= first + cooldown + 1  # sustained all along: acts when allowed
    assert action.ratios == {"node-2": 0.8}  # 12 × t(0.8) = 0.17 s ≤ 0.2 s < 12 × t(0.7) = 0.24 s


def test_restore_after_recovery_steps_back_to_zero_then_stays():
    loop = Loop(config=STEPWISE)
    loop.slowdown["node-2"] = 4.0
    loop.run_until(120)
    assert loop.controller.ratios == {"node-1": 0.0, "node-2": 0.4}
    loop.slowdown["node-2"] = 1.0
    loop.run_until(400)
    steps = loop.of(SetRatios)[1:]
    assert [a.ratios for _, a in steps] == [{"node-2": r} for r in (0.3, 0.2, 0.1, 0.0)]
    assert all("restore" in a.reason for _, a in steps)
    times = [t for t, _ in steps]
    spacing = max(loop.controller.config.cooldown_s, loop.controller.config.restore_window_s)
    assert all(later - earlier >= spacing for earlier, later in zip(times, times[1:]))
    assert loop.controller.ratios == {"node-1": 0.0, "node-2": 0.0}
    loop.run_until(900)
    assert len(loop.of(SetRatios)) == 5  # nothing after the last step


def test_no_oscillation_while_the_slowdown_persists_with_headroom():
    # Pruned, the pipeline has ample headroom, which alone would invite a restore; the slowdown
    # estimate and the budget check must hold the ratio for the 15 minutes the slowdown lasts.
    loop = Loop(overhead_s=0.0)
    loop.slowdown["node-2"] = 4.0
    loop.run_until(900)
    assert len(loop.actions) == 1 and loop.controller.ratios["node-2"] == 0.4
    assert loop.controller.metrics(900).headroom_fraction == 1.0


def test_no_action_on_a_borderline_stream():
    # Latency hovering around the SLO: 40 % of requests just over LAT_trigger, the rest just under,
    # so never a sustained violation and never headroom.
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, REACTIVE, initial_ratios={"node-2": 0.3})
    actions = []
    for step in range(1, 3001):
        ts = step * 0.2
        controller.observe_latency(ts, 0.57 if step % 5 in (0, 2) else 0.48)
        if step % 5 == 0:
            actions += controller.tick(ts)
    assert actions == []
    assert controller.ratios == {"node-1": 0.0, "node-2": 0.3}


def test_restore_stops_where_the_next_step_would_break_the_budget():
    # node-2 recovers only to 1.2× (counts as gone): 1.2 × t(0.1) = 0.12 s, so all the way to 0 is
    # fine with the default budget, but not with a tight one.
    # stage budget 0.125 s; 1.2 × t(0) = 0.144 s
    config = ControllerSettings(policy="bottleneck", budget_fraction=0.5, fast_restore=False)
    loop = Loop(config=config)
    loop.controller.set_manual(0.0, "node-2", 0.5)
    loop.controller.release_manual(0.0, "node-2")
    loop.slowdown["node-2"] = 1.2
    loop.run_until(600)
    assert loop.controller.ratios["node-2"] == 0.1
    assert len(loop.of(SetRatios)) == 4  # 0.4, 0.3, 0.2, 0.1 and no further


def test_restore_waits_until_the_slowdown_is_gone():
    # 1.5 × t(0.3) = 0.1 s is well under budget, but node-2 is still slowed: keep its ratio.
    loop = Loop(config=STEPWISE, initial_ratios={"node-2": 0.4})
    loop.slowdown["node-2"] = 1.5
    loop.run_until(300)
    assert loop.actions == []
    loop.slowdown["node-2"] = 1.0
    loop.run_until(310)
    assert [a.ratios for _, a in loop.of(SetRatios)] == [{"node-2": 0.3}]


def test_restore_needs_a_whole_watched_window_and_a_node_heard_from():
    # A restarted gateway with a retained ratio and ample headroom from the first request.
    def run(node_reports: bool) -> list[tuple[float, object]]:
        controller = PruningController(NODES, FITS, ACCURACY, SLO_S, STEPWISE, initial_ratios={"node-2": 0.4})
        actions = []
        for step in range(1, 5 * 40):
            ts = step / 5
            controller.observe_latency(ts, 0.2)
            if node_reports and step % 10 == 0:
                controller.observe_node(ts, "node-2", calibrated_time(0.4), 0, 0.4)
            if step % 5 == 0:
                actions += [(ts, a) for a in controller.tick(ts)]
        return actions

    assert run(node_reports=False) == []
    (first, action), *_ = run(node_reports=True)
    assert first == 1 + ControllerSettings().restore_window_s  # watching starts at the first tick, at 1 s
    assert action.ratios == {"node-2": 0.3}


def test_requests_completed_before_an_action_do_not_count_after_it():
    # With a cooldown shorter than the window, the pre-action violations must not fire again.
    loop = Loop(config=ControllerSettings(policy="bottleneck", cooldown_s=2.0))
    loop.slowdown["node-2"] = 4.0
    loop.run_until(60)
    assert len(loop.actions) == 1


def test_infeasible_is_reported_with_best_effort_applied():
    loop = Loop()
    loop.slowdown["node-2"] = 40.0  # 40 × t(0.9) = 0.44 s > 0.2 s, and still 0.61 s end to end
    loop.run_until(60)
    kinds = [type(a) for _, a in loop.actions]
    assert kinds[:2] == [SetRatios, Infeasible]
    (_, best_effort), (_, infeasible) = loop.actions[:2]
    assert best_effort.ratios == {"node-2": 0.9} and best_effort.decision.infeasible
    assert "node-2 cannot meet" in infeasible.reason
    later = loop.actions[2:]  # still overloaded: reported again once per cooldown, nothing new to apply
    assert later and all(isinstance(a, Infeasible) for _, a in later)


def test_violation_the_curves_do_not_explain_is_held_not_pruned():
    # e.g. a saturated link: nodes compute at calibrated speed. The policy would give node-2's pruning
    # back, but lowering ratios during a violation is not done.
    loop = Loop(initial_ratios={"node-2": 0.3})
    loop.extra_s = 0.4
    loop.run_until(60)
    assert loop.of(SetRatios) == [] and len(loop.of(Held)) >= 2
    assert loop.controller.ratios["node-2"] == 0.3
    times = [t for t, _ in loop.of(Held)]
    assert all(b - a >= loop.controller.config.cooldown_s for a, b in zip(times, times[1:]))


def test_only_decode_slow_prunes_no_slice_and_says_why():
    # 12 MP frames at stage 1: every request 0.4 s longer, all of it decoding, the slices at calibrated speed
    loop = Loop()
    loop.decode_s["node-1"] = 0.4
    loop.run_until(60)
    assert loop.of(SetRatios) == [] and loop.of(Infeasible) == [] and len(loop.of(Held)) >= 2
    assert loop.controller.ratios == {"node-1": 0.0, "node-2": 0.0}
    assert all(s == pytest.approx(1.0) for s in loop.controller.metrics(loop.now).slowdowns.values())
    assert all("node-1 spends 400.0 ms a request decoding" in held.reason for _, held in loop.of(Held))
    # the same 0.4 s as slice compute is pruned for
    loop = Loop()
    loop.slowdown["node-1"] = 1 + 0.4 / calibrated_time(0.0)
    loop.run_until(60)
    assert loop.of(SetRatios) and loop.controller.ratios["node-1"] > 0.0


@pytest.mark.parametrize("policy,expected", [("bottleneck", {"node-2": 0.4}),
                                             ("paper", {"node-2": 0.9})])
def test_both_policies_are_selectable_by_config(policy, expected):
    loop = Loop(config=ControllerSettings(policy=policy))
    loop.slowdown["node-2"] = 4.0
    loop.run_until(60)
    (_, action), = loop.of(SetRatios)
    assert action.decision.policy == policy
    assert action.ratios == expected


def test_manual_hold_survives_triggers_and_restores_until_released():
    loop = Loop()
    (action,) = loop.controller.set_manual(0.0, "node-1", 0.2)
    assert action.source == "manual" and action.ratios == {"node-1": 0.2}
    loop.slowdown["node-2"] = 4.0
    loop.run_until(60)
    assert [a.ratios for _, a in loop.of(SetRatios)] == [{"node-2": 0.4}]
    loop.slowdown["node-2"] = 1.0
    loop.run_until(400)
    assert loop.controller.ratios == {"node-1": 0.2, "node-2": 0.0}
    (release,) = loop.controller.release_manual(loop.now, "node-1")
    assert release.source == "auto" and release.ratios == {"node-1": 0.2}
    assert loop.controller.release_manual(loop.now, "node-1") == []
    loop.run_until(700)
    assert loop.controller.ratios == {"node-1": 0.0, "node-2": 0.0}


def test_manual_ratio_must_be_on_the_ladder_and_node_known():
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S)
    with pytest.raises(ValueError, match="ladder"):
        controller.set_manual(0.0, "node-1", 0.35)
    with pytest.raises(ValueError, match="unknown"):
        controller.set_manual(0.0, "node-9", 0.3)
    assert controller.set_manual(0.0, "node-1", 0.30000000000000004)[0].ratios == {"node-1": 0.3}


def test_slowdown_is_compute_over_calibrated_at_the_applied_ratio():
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, REACTIVE)
    for ts in (2, 4, 6):
        controller.observe_node(ts, "node-2", 3 * calibrated_time(0.0), 4, 0.0)
    assert controller.slowdown("node-2") == pytest.approx(3.0)
    # The first report at a new ratio averages both variants: skipped.
    controller.observe_node(8, "node-2", 3 * calibrated_time(0.0), 0, 0.5)
    assert controller.slowdown("node-2") == pytest.approx(3.0)
    controller.observe_node(10, "node-2", 2 * calibrated_time(0.5), 0, 0.5)
    weight = controller.config.slowdown_smoothing
    smoothed = weight * 2.0 + (1 - weight) * 3.0
    assert controller.slowdown("node-2") == pytest.approx(smoothed)
    controller.observe_node(9, "node-2", 100.0, 0, 0.5)  # reordered/duplicate report: ignored
    assert controller.slowdown("node-2") == pytest.approx(smoothed)
    controller.observe_node(12, "node-1", 0.5 * calibrated_time(0.0), 0, 0.0)
    assert controller.slowdown("node-1") == 1.0  # never assumed faster than calibrated
    controller.observe_node(12, "retired", 1.0, 0, 0.0)  # outside the pipeline: ignored
    assert controller.metrics(12).queue_depths == {"node-2": 0, "node-1": 0}


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="ladder"):
        ControllerSettings(ladder=(0.1, 0.5))
    with pytest.raises(ValueError, match="ladder"):
        ControllerSettings(ladder=(0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="span"):
        ControllerSettings(trigger_window_s=4.0, trigger_min_span_s=5.0)


def test_controller_rejects_pipelines_it_cannot_model():
    with pytest.raises(ValueError, match="latency fit"):
        PruningController(("node-1", "node-3"), FITS, ACCURACY, SLO_S)
    with pytest.raises(ValueError, match="distinct"):
        PruningController(("node-1", "node-1"), FITS, ACCURACY, SLO_S)
    with pytest.raises(ValueError, match="initial ratios"):
        PruningController(NODES, FITS, ACCURACY, SLO_S, initial_ratios={"node-1": 1.0})


def test_fast_restore_returns_all_channels_in_one_decision_soon_after_the_slowdown_ends():
    loop = Loop()
    loop.slowdown["node-2"] = 4.0
    loop.run_until(120)
    assert loop.controller.ratios == {"node-1": 0.0, "node-2": 0.4}
    loop.slowdown["node-2"] = 1.0
    loop.run_until(400)
    prune, restore = loop.of(SetRatios)  # exactly one restore decision, and no re-prune after it
    assert restore[1].ratios == {"node-2": 0.0} and "fast restore" in restore[1].reason
    config = loop.controller.config
    # stats every 2 s; the EWMA needs a few reports to fall under slowdown_gone, then the confirmation
    assert restore[0] - 120 <= 4 * 2.0 + config.fast_restore_confirm_s + 1.0
    assert restore[0] - 120 < config.restore_window_s  # what the step-wise path alone would at least take


def test_fast_restore_stops_at_the_lowest_ratio_with_headroom_and_steps_confirm_the_rest():
    # node-2 recovers only to 1.2x: 1.2 x t(r) <= 0.7 x 0.2 s holds from r = 0.1 (0.119 s), not at 0 (0.144 s);
    # the step-wise path then checks 0 against the full budget (0.144 <= 0.2) after a watched window.
    loop = Loop(config=ControllerSettings(policy="bottleneck", restore_headroom=0.7), initial_ratios={"node-2": 0.5})
    loop.slowdown["node-2"] = 1.2
    loop.run_until(10)
    (first, fast), = loop.of(SetRatios)
    assert fast.ratios == {"node-2": 0.1} and "fast restore" in fast.reason
    loop.run_until(300)
    (_, fast), (later, step) = loop.of(SetRatios)
    assert step.ratios == {"node-2": 0.0} and later - first >= loop.controller.config.restore_window_s


def test_fast_restore_waits_for_the_slowdown_to_be_gone_and_confirmed():
    loop = Loop(config=ControllerSettings(policy="bottleneck", restore_window_s=600),  # fast path only
                initial_ratios={"node-2": 0.4})
    loop.slowdown["node-2"] = 1.5  # still slowed: nothing to restore, however much headroom
    loop.run_until(120)
    assert loop.actions == []
    loop.controller.observe_node(121.0, "node-2", calibrated_time(0.4), 0, 0.4)  # one report says gone...
    loop.controller.observe_node(122.0, "node-2", calibrated_time(0.4), 0, 0.4)
    assert loop.controller.tick(122.5) == []  # ...but not yet for fast_restore_confirm_s
    loop.controller.observe_node(123.0, "node-2", 1.5 * calibrated_time(0.4), 0, 0.4)
    assert loop.controller.slowdown("node-2") > loop.controller.config.slowdown_gone
    assert loop.controller.tick(125.0) == []  # back above: the confirmation starts over


def test_fast_restore_never_touches_a_manual_hold():
    loop = Loop()
    loop.controller.set_manual(0.0, "node-2", 0.5)
    loop.run_until(200)
    assert loop.controller.ratios["node-2"] == 0.5 and len(loop.of(SetRatios)) == 0


def test_a_restore_on_latency_headroom_also_jumps_when_fast_restore_is_on():
    # The slowdown confirmation never completes here, so the step-wise path acts; it goes all the way at once.
    loop = Loop(config=ControllerSettings(policy="bottleneck", fast_restore_confirm_s=1000),
                initial_ratios={"node-2": 0.5})
    loop.run_until(60)
    (_, restore), = loop.of(SetRatios)
    assert restore.ratios == {"node-2": 0.0} and restore.reason.startswith("restore:")


# ---- adaptive: acts on the first slowed frames' compute and on the arrival rate --------------------------------
ADAPTIVE = ControllerSettings(policy="adaptive")


def test_adaptive_prunes_within_a_second_of_the_first_slowed_frames():
    loop = Loop(config=ADAPTIVE)
    loop.run_until(10)
    assert loop.actions == []  # no slowdown, 5 frames/s well within every stage's rate: nothing to do
    loop.slowdown["node-2"] = 3.0
    loop.run_until(20)
    pruned = loop.of(SetRatios)
    assert pruned, "a 3x slowdown must be pruned"
    first_ts, first = pruned[0]
    assert first_ts <= 10 + 1.0  # 3 slowed frames (0.6 s) and the next tick, not an 8 s latency window
    assert set(first.ratios) == {"node-2"} and first.ratios["node-2"] > 0
    assert "node-2 3.0x" in first.reason
    # the chosen ratio meets the budget at 3x: frames at that ratio confirm the estimate, no further moves
    assert len(pruned) == 1 and loop.compute_s("node-2") <= loop.controller.budget_s


def test_adaptive_ignores_a_single_slow_frame():
    loop = Loop(config=ADAPTIVE)
    loop.run_until(5)
    loop.slowdown["node-1"] = 20.0
    loop.run_until(5.2)  # one frame at 20x: a scheduling spike
    loop.slowdown["node-1"] = 1.0
    loop.run_until(30)
    assert loop.of(SetRatios) == []
    assert loop.controller.slowdown("node-1") == 1.0


def test_adaptive_restores_from_the_same_signal_once_confirmed():
    loop = Loop(config=ADAPTIVE)
    loop.slowdown["node-2"] = 3.0
    loop.run_until(10)
    assert loop.controller.ratios["node-2"] > 0
    loop.slowdown["node-2"] = 1.0
    loop.run_until(20)
    restore_ts, restore = loop.of(SetRatios)[-1]
    assert restore.ratios == {"node-2": 0.0}
    confirm = ADAPTIVE.fast_restore_confirm_s
    assert 10 + confirm <= restore_ts <= 10 + confirm + 2.0  # 3 fast frames, then held for the confirm time
    assert "restore" in restore.reason


def test_adaptive_keeps_up_with_the_arrival_rate_without_any_slowdown():
    # 8 frames/s: a stage keeps up (at utilisation 0.8) only under 100 ms, but each takes 120 ms unpruned
    loop = Loop(config=ADAPTIVE, rate_hz=8.0)
    loop.run_until(10)
    pruned = loop.of(SetRatios)
    assert pruned and pruned[0][0] <= ADAPTIVE.arrival_window_s + 1.0
    assert "frames/s arriving" in pruned[0][1].reason and "(arrival rate)" in pruned[0][1].reason
    assert all(loop.compute_s(n) <= ADAPTIVE.utilisation / 8.0 + 1e-9 for n in NODES)
    assert loop.of(Infeasible) == []
    assert loop.controller.slowdown("node-1") == loop.controller.slowdown("node-2") == 1.0


def test_adaptive_keeps_the_pruning_a_burst_needed_while_its_frames_still_wait_in_a_queue():
    """Once a burst's frames are all captured the arrival rate falls, but while they wait at stage 1 the pipeline
    still has to serve them at the burst's pace: restoring then slows the drain (paper-imbalance at 3x)."""
    loop = Loop(config=ADAPTIVE, rate_hz=8.0)
    loop.run_until(10)
    pruned_to = dict(loop.controller.ratios)
    assert any(r > 0 for r in pruned_to.values())  # pruned for the rate
    loop.arriving = False  # the burst is over ...
    loop.queue["node-1"] = ADAPTIVE.restore_max_queue + 1  # ... and its frames still wait at stage 1
    loop.run_until(20)
    assert loop.controller.ratios == pruned_to
    loop.queue["node-1"] = ADAPTIVE.restore_max_queue  # drained down to the limit
    loop.run_until(30)
    restores = [a for t, a in loop.of(SetRatios) if t > 20]
    assert restores and all(r == 0 for r in loop.controller.ratios.values())


def test_a_burst_counts_from_its_first_frames_not_once_it_fills_the_arrival_window():
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, ADAPTIVE)
    for i in range(20):  # 2 frames/s for 10 s, then 6 frames in 0.3 s
        controller.observe_arrival(i * 0.5)
    burst = [10.0 + 0.05 * i for i in range(6)]
    for ts in burst:
        controller.observe_arrival(ts)
    now = burst[-1] + 0.01
    long_window = sum(ts > now - ADAPTIVE.arrival_window_s for ts in [i * 0.5 for i in range(20)] + burst)
    assert controller.arrival_rate(now) == pytest.approx(
        (sum(ts > now - ADAPTIVE.burst_window_s for ts in burst + [9.5]) - 1) / ADAPTIVE.burst_window_s)
    assert controller.arrival_rate(now) > long_window / ADAPTIVE.arrival_window_s
    off = PruningController(NODES, FITS, ACCURACY, SLO_S, ADAPTIVE.model_copy(update={"burst_window_s": 0.0}))
    for ts in [i * 0.5 for i in range(20)] + burst:
        off.observe_arrival(ts)
    assert off.arrival_rate(now) == pytest.approx(long_window / ADAPTIVE.arrival_window_s)


def test_adaptive_gives_the_channels_back_when_the_burst_is_over():
    loop = Loop(config=ADAPTIVE, rate_hz=8.0)
    loop.run_until(10)
    assert any(r > 0 for r in loop.controller.ratios.values())
    loop.dt = 1.0 / 2.0  # the burst is over: 2 frames/s
    loop.step = int(10 / loop.dt)
    loop.run_until(20)
    assert loop.controller.ratios == {"node-1": 0.0, "node-2": 0.0}


def test_adaptive_never_prunes_below_the_floor_for_a_rate():
    # 40 frames/s would need 20 ms stages: beyond the floor, so the best effort is flagged, once
    loop = Loop(config=ADAPTIVE, rate_hz=40.0)
    loop.run_until(6)
    infeasible = loop.of(Infeasible)
    assert len(infeasible) == 1
    ratios = [loop.controller.ratios[n] for n in NODES]
    assert ACCURACY.predictor(ADAPTIVE.accuracy_model)(ratios) >= loop.controller.accuracy_floor - 1e-9


def test_adaptive_safety_net_never_prunes_a_node_with_an_empty_queue():
    # latency over the trigger that no compute explains (transport, say) while no node has anything queued:
    # pruning an idle node drains nothing, so the violation is held, not "relieved" on a random node
    loop = Loop(config=ADAPTIVE)
    loop.extra_s = 1.0
    loop.run_until(40)
    assert loop.of(SetRatios) == []
    held = loop.of(Held)
    assert held and "no queued node" in held[0][1].reason


def test_adaptive_safety_net_steps_the_node_whose_queue_holds_the_backlog():
    loop = Loop(config=ADAPTIVE)
    loop.extra_s = 1.0
    loop.queue["node-1"] = 4
    loop.run_until(40)
    pruned = loop.of(SetRatios)
    assert pruned and all(set(action.ratios) == {"node-1"} for _, action in pruned)
    assert "node-1 (queue 4)" in pruned[0][1].reason and loop.controller.ratios["node-2"] == 0.0


def test_a_violation_spanning_exactly_the_minimum_span_fires():
    """docs/controller.md: the violation must span *at least* trigger_min_span_s, so a span on the limit fires."""
    config = ControllerSettings(policy="bottleneck", trigger_window_s=10.0, trigger_min_span_s=5.0, min_samples=5)
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, config)
    for ts in range(100, 106):  # six requests over LAT_trigger, 100 ... 105: a span of exactly 5 s
        controller.observe_latency(ts, 0.8)
    metrics = controller.metrics(105)
    assert metrics.violation_span_s == 5.0 and metrics.over_trigger_fraction == 1.0
    assert controller.tick(105) != []


def fires(latencies: list[float], **config) -> bool:
    """Whether the reactive trigger fires on requests completing one a second from t = 100 with these latencies."""
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, ControllerSettings(policy="bottleneck", **config))
    for ts, latency in enumerate(latencies, start=100):
        controller.observe_latency(ts, latency)
    return controller.tick(100 + len(latencies) - 1) != []


def test_the_trigger_fraction_and_the_minimum_sample_count_are_inclusive():
    """docs/controller.md: at least ``min_samples`` requests, at least ``trigger_fraction`` of them over LAT_trigger."""
    rules = {"trigger_window_s": 10.0, "trigger_min_span_s": 2.0, "trigger_fraction": 0.5, "min_samples": 4}
    over, under = 0.8, 0.1
    assert fires([over, under] * 4, **rules)  # 4 of 8 over: exactly the fraction
    assert not fires([over, under] * 3 + [under, under], **rules)  # 3 of 8
    assert fires([over] * 4, **rules)  # exactly min_samples
    assert not fires([over] * 3, **rules)


def stepwise_restore(under_headroom: int) -> list:
    """node-1 pruned to 0.5 at calibrated speed; four requests in the restore window, ``under_headroom`` of them
    within restore_latency_fraction × SLO (0.35 s), the others between that and LAT_trigger."""
    config = ControllerSettings(policy="bottleneck", fast_restore=False, restore_fraction=0.5, min_samples=4,
                                restore_window_s=20.0)
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, config, initial_ratios={"node-1": 0.5})
    assert controller.tick(100) == []
    controller.observe_node(105, "node-1", calibrated_time(0.5), 0, 0.5)
    for k, ts in enumerate(range(110, 114)):
        controller.observe_latency(ts, 0.3 if k < under_headroom else 0.45)
    return controller.tick(120)


def test_a_restore_window_with_exactly_the_restore_fraction_of_headroom_restores():
    """docs/controller.md: a restore step needs at least ``restore_fraction`` of the window within the headroom."""
    (action,) = stepwise_restore(under_headroom=2)
    assert isinstance(action, SetRatios) and action.ratios == {"node-1": 0.4}
    assert stepwise_restore(under_headroom=1) == []


def fast_restore_at(slowdown: float) -> list:
    """node-1 pruned to 0.5 reports one stats sample of ``slowdown`` × its calibrated time (gone at ≤ 2)."""
    config = ControllerSettings(policy="bottleneck", fast_restore_confirm_s=2.0, slowdown_gone=2.0,
                                slowdown_smoothing=1.0)
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, config, initial_ratios={"node-1": 0.5})
    assert controller.tick(100) == []
    # × 2 and ÷ the same number are exact in binary floating point: the sample is exactly 2.0
    controller.observe_node(101, "node-1", slowdown * controller.curve("node-1").predict(0.5), 0, 0.5)
    return controller.tick(104)


def test_a_slowdown_exactly_at_slowdown_gone_counts_as_gone():
    """docs/controller.md: a node's slowdown *at or below* ``slowdown_gone`` counts as gone (fast restore)."""
    (action,) = fast_restore_at(2.0)
    assert isinstance(action, SetRatios) and action.ratios["node-1"] < 0.5
    assert fast_restore_at(2.5) == []


def test_the_arrival_rate_is_the_cameras_rate_while_frames_wait_in_the_broker():
    """With flow control stage 1 takes a frame only when it is free: acceptances come at its own pace (5/s
    here) while the cameras send 10/s; the capture times still say 10/s, whatever the cameras' common clock offset."""
    for offset in (0.0, 100.0, -100.0):
        controller = PruningController(NODES, FITS, ACCURACY, SLO_S, ADAPTIVE.model_copy(update={"burst_window_s": 0}))
        for i in range(40):  # captured every 0.1 s from t=0, accepted every 0.2 s: the backlog grows
            controller.observe_arrival(0.2 * i, 0.1 * i + offset)
        now = 0.2 * 39 + 0.05
        assert controller.arrival_rate(now) == pytest.approx(10.0, abs=0.6)
        assert controller.arrival_rate(now + ADAPTIVE.arrival_window_s + 0.1) == 0.0  # nothing since: no rate


def test_without_capture_times_the_arrival_rate_counts_acceptances():
    controller = PruningController(NODES, FITS, ACCURACY, SLO_S, ADAPTIVE.model_copy(update={"burst_window_s": 0}))
    for i in range(40):
        controller.observe_arrival(0.2 * i)
    assert controller.arrival_rate(0.2 * 39 + 0.05) == pytest.approx(5.0, abs=0.6)
