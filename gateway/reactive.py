"""The reactive controller's rules (``policy = "bottleneck"`` or ``"paper"``): act only on a sustained end-to-end
violation (the paper's reactive controller), with a cooldown, and give pruning back by a fast restore once a
node's slowdown is gone or step-wise on latency headroom.

Pure; it reads and moves the ratios of the :class:`~gateway.controller.PruningController` it serves
(docs/controller.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.controller_actions import Action, Held, Infeasible, Metrics, SetRatios
from gateway.policy import POLICIES, TOLERANCE

if TYPE_CHECKING:
    from gateway.controller import PruningController


class ReactiveTrigger:
    def __init__(self, controller: PruningController):
        self.controller = controller

    def decide(self, now: float) -> list[Action]:
        c, config = self.controller, self.controller.config
        if now < c.last_action_ts + config.cooldown_s:
            return []
        metrics = c.metrics(now)
        if c.violation_sustained(metrics):
            return self._respond_to_violation(now, metrics)
        if config.fast_restore and metrics.over_trigger_fraction < config.trigger_fraction:
            fast = self._fast_restore(now, metrics)
            if fast:
                return fast
        if self._headroom_sustained(now, metrics):
            return self._restore_step(now, metrics)
        return []

    def _headroom_sustained(self, now: float, m: Metrics) -> bool:
        """Headroom over a whole restore window, all of it watched and after the last action."""
        config = self.controller.config
        return (now - config.restore_window_s >= self.controller.watched_from
                and m.restore_samples >= config.min_samples
                and m.headroom_fraction >= config.restore_fraction)

    def _respond_to_violation(self, now: float, metrics: Metrics) -> list[Action]:
        """Apply the policy's vector if it adds pruning somewhere; report infeasible or unexplained cases.

        A vector that only lowers ratios is not applied: lowering during a violation would be a restore
        the latency does not support.
        """
        c = self.controller
        decision = POLICIES[c.config.policy](c.problem())
        ratios = c.ratios
        proposed = dict(zip(c.nodes, decision.ratios))
        changed = {n: r for n, r in proposed.items() if abs(r - ratios[n]) > TOLERANCE}
        actions: list[Action] = []
        raised = any(r > ratios[n] for n, r in changed.items())
        if raised:
            reason = (f"{metrics.over_trigger_fraction:.0%} of {metrics.trigger_samples} requests over "
                      f"{c.lat_trigger_s:.3f} s; {decision.reason}")
            actions.append(SetRatios(now, changed, "auto", reason, decision, metrics))
        if decision.infeasible:
            actions.append(Infeasible(now, decision.reason, decision, metrics))
        if not actions:
            actions.append(Held(now, "latency over the trigger, but the curves predict the current ratios meet "
                                     "the stage budget (queueing, transport or an uncalibrated cause?)"
                                + c.decode_note(), decision, metrics))
        c.act(now, changed if raised else {})
        return actions

    def _fast_restore(self, now: float, metrics: Metrics) -> list[Action]:
        """Give a recovered node its channels back in one decision, not one ladder step per restore window.

        The controller knows each node's slowdown: once it has stayed gone for ``fast_restore_confirm_s``
        (after the last action and after watching started), the node goes straight to the lowest ratio its
        calibrated curve predicts within ``restore_headroom`` × the stage budget at its current speed. The
        headroom keeps the next trigger from undoing it; any pruning left is confirmed by the step-wise
        restore, which also guards nodes whose curve the latency does not bear out.
        """
        c, config = self.controller, self.controller.config
        confirm = config.fast_restore_confirm_s
        watched_from = c.watched_from
        if now - watched_from < confirm:
            return []
        ratios, manual = c.ratios, c.manual
        changed = {}
        for node in c.nodes:
            ratio, since = ratios[node], c.gone_since(node)
            if node in manual or ratio <= 0.0 or since is None or now - max(since, watched_from) < confirm:
                continue
            target = self._fast_target(node, ratio)
            if target is not None:
                changed[node] = target
        reason = (f"fast restore: slowdown gone (≤ {config.slowdown_gone}x) for {confirm:g} s; lowest ratio "
                  f"predicted within {config.restore_headroom:.0%} of the {c.budget_s * 1e3:.0f} ms budget")
        return self._restore(now, changed, reason, metrics)

    def _fast_target(self, node: str, ratio: float) -> float | None:
        """The lowest ladder ratio below ``ratio`` predicted within restore_headroom × the budget, if any."""
        c = self.controller
        limit_s = c.config.restore_headroom * c.budget_s + TOLERANCE
        fitting = [r for r in c.config.ladder
                   if r < ratio - TOLERANCE and c.slowdown(node) * c.curve(node).predict(r) <= limit_s]
        return min(fitting) if fitting else None

    def _restore_step(self, now: float, metrics: Metrics) -> list[Action]:
        """Lower each recovered auto node one ladder step, if that keeps it under the stage budget.

        Hysteresis: headroom is judged against restore_latency_fraction × SLO (well below LAT_trigger),
        the slowdown must be observed and below slowdown_gone, and the step must keep the node's predicted
        time under the same budget the policy prunes to, so a restore never undoes what the next trigger
        would redo.
        """
        c, config = self.controller, self.controller.config
        ratios, manual = c.ratios, c.manual
        changed = {}
        for node in c.nodes:
            ratio = ratios[node]
            if (node in manual or ratio <= 0.0 or not c.stats_heard(node)
                    or c.slowdown(node) > config.slowdown_gone):
                continue
            lower = max((r for r in config.ladder if r < ratio - TOLERANCE), default=0.0)
            if c.slowdown(node) * c.curve(node).predict(lower) <= c.budget_s + TOLERANCE:
                # with fast restore on, latency headroom is as good a reason to jump as the confirmed slowdown
                target = self._fast_target(node, ratio) if config.fast_restore else None
                changed[node] = lower if target is None else min(lower, target)
        reason = (f"restore: {metrics.headroom_fraction:.0%} of {metrics.restore_samples} requests under "
                  f"{config.restore_latency_fraction:.0%} of the SLO and slowdown gone")
        return self._restore(now, changed, reason, metrics)

    def _restore(self, now: float, changed: dict[str, float], reason: str, metrics: Metrics) -> list[Action]:
        """Give back what a restore rule chose (nothing if it chose nothing); an action starts the cooldown."""
        if not changed:
            return []
        c = self.controller
        c.act(now, changed)
        return [SetRatios(now, changed, "auto", reason, c.evaluate_current("restore", reason), metrics)]
