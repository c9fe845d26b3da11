"""The adaptive controller's rule (``policy = "adaptive"``, the default): track a target.

Each tick it solves for the least pruning that meets every stage's budget at the slowdowns the last frames'
compute shows (:mod:`gateway.slowdown`) and the arrival rate; more pruning is applied at once, less only after it
has been the answer for ``fast_restore_confirm_s`` with headroom. The end-to-end trigger stays as a safety net for
what compute cannot see (a backlog, transport). Pure; it reads and moves the ratios of the
:class:`~gateway.controller.PruningController` it serves (docs/controller.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.controller_actions import Action, Held, Infeasible, Metrics, SetRatios
from gateway.policy import TOLERANCE, Decision, choose_adaptive, evaluate_ratios

if TYPE_CHECKING:
    from gateway.controller import PruningController


class AdaptiveTracking:
    def __init__(self, controller: PruningController):
        self.controller = controller
        self._lower_since: dict[str, float] = {}  # since when a lower ratio has been the answer
        self._last_infeasible: tuple | None = None

    def decide(self, now: float) -> list[Action]:
        """Move towards the least pruning that meets every stage's budget at the current slowdowns and arrival
        rate. More pruning is applied at once; less once it has been the answer, with headroom, for
        ``fast_restore_confirm_s``, the latency is not violating and no node has more than ``restore_max_queue``
        requests queued. A sustained end-to-end violation the
        estimates do not explain (a backlog, transport) prunes the deepest queue's node one more step."""
        c, config = self.controller, self.controller.config
        metrics = c.metrics(now)
        decision = choose_adaptive(c.problem(now))
        needed = dict(zip(c.nodes, decision.ratios))
        relaxed = dict(zip(c.nodes, choose_adaptive(c.problem(now, config.restore_headroom)).ratios))
        # not while the latency violates, nor while a backlog waits: it needs the pace it was pruned for, whatever
        # the arrival rate says now
        hold_back = (metrics.over_trigger_fraction >= config.trigger_fraction
                     or max(metrics.queue_depths.values(), default=0) > config.restore_max_queue)
        ratios, manual = c.ratios, c.manual
        changed = {n: r for n, r in needed.items() if r > ratios[n] + TOLERANCE}
        for node in c.nodes:
            lower = max(needed[node], relaxed[node])
            if node in manual or lower >= ratios[node] - TOLERANCE or hold_back:
                self._lower_since.pop(node, None)
                continue
            since = self._lower_since.setdefault(node, now)
            if now - since >= config.fast_restore_confirm_s:
                changed[node] = lower
        if changed:
            candidate = {**ratios, **changed}
            if not c.problem(now).meets_floor([candidate[n] for n in c.nodes]):
                changed = {n: r for n, r in needed.items() if abs(r - ratios[n]) > TOLERANCE}
        actions: list[Action] = []
        if changed:
            raised = any(r > ratios[n] for n, r in changed.items())
            reason = self._reason(metrics, decision, raised)
            c.act(now, changed)
            for node in changed:
                self._lower_since.pop(node, None)
            actions.append(SetRatios(now, changed, "auto", reason,
                                     decision if raised else c.evaluate_current("restore", reason), metrics))
        infeasible = (decision.infeasible, decision.ratios) if decision.infeasible else None
        if infeasible is not None and infeasible != self._last_infeasible:
            actions.append(Infeasible(now, decision.reason, decision, metrics))
        self._last_infeasible = infeasible
        if not actions and now >= c.last_action_ts + config.cooldown_s and c.violation_sustained(metrics):
            actions = self._relieve_backlog(now, metrics)
        return actions

    def _reason(self, metrics: Metrics, decision: Decision, raised: bool) -> str:
        config = self.controller.config
        slowed = {n: s for n, s in metrics.slowdowns.items() if s > 1.0}
        seen = ", ".join(f"{n} {s:.1f}x" for n, s in slowed.items()) or "no slowdown"
        rate = f"{metrics.arrival_hz:.1f} frames/s arriving" if metrics.arrival_hz else "no recent arrivals"
        if raised:
            return f"compute shows {seen}, {rate}; {decision.reason}"
        return (f"restore: compute shows {seen}, {rate}; lower ratios have met every budget with "
                f"{1 - config.restore_headroom:.0%} headroom for {config.fast_restore_confirm_s:g} s")

    def _relieve_backlog(self, now: float, metrics: Metrics) -> list[Action]:
        """The safety net: latency over the trigger although the estimates say every stage keeps up. One more
        ladder step on the node with the deepest queue drains it faster, if the accuracy floor allows."""
        c = self.controller
        problem = c.problem(now)
        ratios, manual = c.ratios, c.manual
        queued = sorted((d, n) for n, d in metrics.queue_depths.items()
                        if d > 0 and n in ratios and n not in manual)  # an idle node holds no backlog
        for _, node in reversed(queued):
            higher = [r for r in problem.ladder if r > ratios[node] + TOLERANCE]
            candidate = {**ratios, node: higher[0]} if higher else None
            if candidate and problem.meets_floor([candidate[n] for n in c.nodes]):
                reason = (f"{metrics.over_trigger_fraction:.0%} of {metrics.trigger_samples} requests over "
                          f"{c.lat_trigger_s:.3f} s although every stage is predicted to keep up: one step more "
                          f"on {node} (queue {metrics.queue_depths[node]}) to drain the backlog")
                c.act(now, {node: higher[0]})
                return [SetRatios(now, {node: higher[0]}, "auto", reason,
                                  evaluate_ratios(problem, [candidate[n] for n in c.nodes], "adaptive", reason),
                                  metrics)]
        c.act(now, {})
        return [Held(now, "latency over the trigger, but the estimates predict every stage keeps up and no queued node "
                          "may be pruned further" + c.decode_note(), c.evaluate_current("held", ""), metrics)]
