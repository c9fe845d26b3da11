"""The arrival-rate trigger and its re-plan: measure the frames stage 1 accepts, and when the rate has changed for
good (:mod:`gateway.arrival`) ask the hybrid planner (:mod:`gateway.hybrid`) for the new rate, log its plan and,
with ``[gateway] rate_replan = "apply"``, adopt it (docs/placement.md).

Pure (time passed in). Planning can take seconds on many nodes, so it is split in three: :meth:`RateReplan.due`
says what to ask, :func:`plan_for_rate` plans (the service runs it outside its lock), :meth:`RateReplan.apply`
logs and adopts the answer.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from gateway.arrival import ArrivalMeter, RateRules, RateTrigger, levels_from_fits
from gateway.control_loop import ControlLoop
from gateway.control_loop import Effects as ControlEffects
from gateway.hybrid import HybridPlan, HybridRequest, plan_hybrid
from gateway.live_placement import LivePlacement
from gateway.placement import InfeasiblePlacement
from shared.schemas import Placement
from shared.settings import GatewaySettings

log = logging.getLogger(__name__)


def plan_for_rate(request: HybridRequest) -> HybridPlan | None:
    """The hybrid plan for a new arrival rate, None when there is none (logged). Seconds on many nodes
    (docs/placement.md): the service runs it outside its lock."""
    try:
        return plan_hybrid(request)
    except (InfeasiblePlacement, ValueError) as exc:
        log.error("no hybrid plan for %.3g frames/s: %s", request.arrival_hz, exc)
        return None


class RateReplan:
    def __init__(self, settings: GatewaySettings, live: LivePlacement, now: float):
        self.settings = settings
        self.live = live
        self.arrivals = ArrivalMeter(settings.rate_window_s, started=now)  # frames stage 1 accepted
        self.trigger = RateTrigger(RateRules(settings.rate_window_s, settings.rate_band, settings.rate_dwell_s,
                                             settings.rate_min_interval_s, settings.rate_floor_hz))

    def status(self, now: float) -> dict:
        return {"rate_hz": self.arrivals.rate(now), **self.trigger.status(now)}

    def due(self, now: float, control: ControlLoop, slo_s: float) -> HybridRequest | None:
        """What to ask the hybrid planner when the arrival rate has changed for good (gateway/arrival.py); None
        when no re-plan is due (or re-plans are off)."""
        if self.settings.rate_replan == "off" or self.live.current is None:
            return None
        problem = self.live.eligible_problem()
        target = self.trigger.observe(now, self.arrivals.rate(now)) if problem is not None else None
        if target is None:
            return None
        config, fit = control.settings, control.block_accuracy
        if fit is None or fit.n_stages != problem.n_blocks:  # no accuracy model: no pruning levels either
            return HybridRequest(problem, target, slo_s)
        predict = fit.predictor(config.accuracy_model)
        levels = levels_from_fits(config.ladder, control.curves.fits, config.max_ratio)
        return HybridRequest(problem, target, slo_s, levels, predict,
                             config.accuracy_floor_relative * predict([0.0] * problem.n_blocks))

    def apply(self, now: float, request: HybridRequest, plan: HybridPlan | None, previous_hz: float | None,
              effects: ControlEffects) -> Placement | None:
        """Log the plan for the new rate; with ``rate_replan = "apply"`` also adopt it (parallel pipelines included).

        For one pipeline the best cuts do not depend on the rate; what does is how much to prune up front, and
        whether parallel pipelines or replicated stages are needed. The plan is logged as a ``rate_replan`` row in
        ``prune_events`` (its kind, replicas, ratios, sustainable rate, predicted accuracy).
        """
        target = request.arrival_hz
        placement = None
        if plan is None:
            outcome = "no plan (see the log)"
        elif self.settings.rate_replan == "log":
            outcome = "logged only ([gateway] rate_replan = log)"
        else:
            placement = self.live.adopt_hybrid(plan, now, f"arrival rate {target:.3g}/s")
            outcome = (f"published as placement v{placement.version}" if placement
                       else "nothing moved (the placement already runs it, or one of its nodes left meanwhile)")
            if self.live.hybrid is not None:  # a node joining later is planned for this rate, not the configured one
                self.live.hybrid = replace(self.live.hybrid, arrival_hz=target)
        was = "nothing planned for" if previous_hz is None else f"planned for {previous_hz:.3g}/s"
        shown = "" if plan is None else f": {plan.kind}, sustains {plan.sustainable_hz:.3g}/s, " + "; ".join(
            "pipeline " + ", ".join(f"blocks {s.first_block}-{s.last_block} on {'+'.join(s.replicas)} at ratio "
                                    f"{s.ratio:g}" for s in p) for p in plan.pipelines)
        reason = f"arrival rate {target:.3g} frames/s ({was}){shown}; {outcome}"
        log.info("rate re-plan: %s", reason)
        effects.events.append({"ts": now, "kind": "rate_replan", "policy": "rate", "source": "auto", "reason": reason,
                               "predicted_accuracy": plan.accuracy if plan else None,
                               "metrics": {"arrival_hz": target, "planned_for_hz": previous_hz,
                                           "mode": self.settings.rate_replan,
                                           "placement_version": placement.version if placement else None,
                                           "plan": plan.to_dict() if plan else None}})
        return placement
