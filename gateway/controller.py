"""The pruning controller's state machine: when to prune, how much (via a policy), when to give it back.

Pure: no MQTT and no clock of its own. The gateway feeds it observations with their timestamps, calls
:meth:`PruningController.tick` with the current time, and turns the returned actions into retained
``PruneDesired`` messages and ``prune_events`` rows. See docs/controller.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.curves import AccuracyFit, LatencyCurve, ReplicaAccuracy, SliceLatencyFit
from gateway.policy import POLICIES, TOLERANCE, Decision, RatioProblem, choose_adaptive, evaluate_ratios
from gateway.slowdown import SlowdownDetector
from shared.settings import ControllerSettings

MIN_STAGE_BUDGET_S = 1e-4  # a rate cap a stage's decode alone exceeds: no ratio meets it (best effort)


@dataclass(frozen=True)
class Metrics:
    """What the trigger and restore rules saw, logged with every action and shown on the operator page.

    Only requests completed after the last action count: earlier ones describe the old ratios.
    """

    trigger_samples: int
    over_trigger_fraction: float
    violation_span_s: float
    restore_samples: int
    headroom_fraction: float
    slowdowns: dict[str, float]
    queue_depths: dict[str, int]
    arrival_hz: float | None = None


@dataclass(frozen=True)
class SetRatios:
    """Publish a new desired state for the nodes listed (only those whose ratio or source changes)."""

    ts: float
    ratios: dict[str, float]
    source: Literal["auto", "manual"]
    reason: str
    decision: Decision
    metrics: Metrics


@dataclass(frozen=True)
class Infeasible:
    """Even the most pruning allowed cannot meet the budget; the best effort (if new) is a SetRatios."""

    ts: float
    reason: str
    decision: Decision
    metrics: Metrics


@dataclass(frozen=True)
class Held:
    """A sustained violation the curves do not explain: the current ratios are predicted to meet the budget."""

    ts: float
    reason: str
    decision: Decision
    metrics: Metrics


Action = SetRatios | Infeasible | Held


@dataclass(frozen=True)
class DeviceMemory:
    """What a controller learnt about the devices rather than their slices, carried to the next placement's.

    A move gives nodes new slices, so the controller is rebuilt on their new curves; without this it would
    start from "no slowdown" and a re-partition made for a slowed node would be undone (and redone) at once,
    before a single frame of the new slices was seen. Calibrations are taken at the device's own speed, so a
    slowdown over one slice's curve holds over the next one's."""

    slowdowns: dict[str, float]  # the detector's per-frame estimates (adaptive)
    smoothed: dict[str, float]  # the estimates smoothed from node stats (the reactive policies)
    arrivals: tuple[float, ...]  # accepted frames' times within the arrival window

    def without(self, node_id: str) -> DeviceMemory:
        return DeviceMemory({n: k for n, k in self.slowdowns.items() if n != node_id},
                            {n: k for n, k in self.smoothed.items() if n != node_id}, self.arrivals)


class PruningController:
    """Slowdown estimation, ratio choice, restore and manual holds, on one of two triggers.

    ``adaptive`` (the default) tracks a target: each tick it solves for the least pruning that meets every
    stage's budget at the slowdowns the last frames' compute shows (:mod:`gateway.slowdown`) and the
    arrival rate of the last ``arrival_window_s``; more pruning is applied at once, less only after it has
    been the answer for ``fast_restore_confirm_s`` with headroom. The end-to-end trigger stays as a safety
    net for what compute cannot see. ``bottleneck`` and ``paper`` act only on the sustained end-to-end
    violation (the paper's reactive controller), with a cooldown and step-wise restore.
    """

    def __init__(self, nodes: Sequence[str], latency: Mapping[str, SliceLatencyFit],
                 accuracy: AccuracyFit | ReplicaAccuracy, slo_s: float, config: ControllerSettings | None = None,
                 initial_ratios: Mapping[str, float] | None = None, n_stages: int | None = None,
                 arrival_shares: Mapping[str, float] | None = None):
        """``nodes`` in stage order, a replicated stage's nodes side by side; ``accuracy`` has one entry per node
        (a :class:`ReplicaAccuracy` when stages have replicas, whose count ``n_stages`` then gives);
        ``arrival_shares``: the fraction of the frames each node serves (1 / its stage's replicas; default 1)."""
        if not nodes or len(set(nodes)) != len(nodes):
            raise ValueError("nodes must be a non-empty list of distinct ids in stage order")
        if n_stages is not None and not 1 <= n_stages <= len(nodes):
            raise ValueError("n_stages must lie between 1 and the number of nodes")
        if not set(nodes) <= set(latency) or accuracy.n_stages != len(nodes):
            raise ValueError("every node needs a latency fit, and the accuracy fit one gain per node")
        if slo_s <= 0:
            raise ValueError("slo_s must be positive")
        self.config = config or ControllerSettings()
        self.nodes = tuple(nodes)
        self.n_stages = n_stages or len(nodes)
        self.slo_s = slo_s
        self._fits = {node: latency[node] for node in nodes}
        self._curves = {node: fit.best() for node, fit in self._fits.items()}
        self._accuracy = accuracy
        self._ratios = {node: (initial_ratios or {}).get(node, 0.0) for node in nodes}
        if any(not 0.0 <= r < 1.0 for r in self._ratios.values()):
            raise ValueError("initial ratios must lie in [0, 1)")
        self._manual: dict[str, float] = {}
        self._latencies: deque[tuple[float, float]] = deque()
        self._slowdown: dict[str, float] = {}
        self._decode_s: dict[str, float] = {}
        self._applied: dict[str, float] = {}
        self._stats_ts: dict[str, float] = {}
        self._gone_since: dict[str, float] = {}  # when each node's slowdown estimate last fell to "gone"
        self._queue_depth: dict[str, int] = {}
        self._last_action_ts = float("-inf")
        self._watching_since: float | None = None
        self._detector = SlowdownDetector(self.config.detect_frames, self.config.detect_margin)
        self._arrivals: deque[float] = deque()
        self._shares = {node: (arrival_shares or {}).get(node, 1.0) for node in nodes}
        self._lower_since: dict[str, float] = {}  # adaptive: since when a lower ratio has been the answer
        self._last_infeasible: tuple | None = None
        unpruned = accuracy.predictor(self.config.accuracy_model)([0.0] * len(nodes))
        self.accuracy_floor = self.config.accuracy_floor_relative * unpruned

    def memory(self) -> DeviceMemory:
        return DeviceMemory(self._detector.estimates(), dict(self._slowdown), tuple(self._arrivals))

    def recall(self, memory: DeviceMemory) -> None:
        """Start from what the previous placement's controller knew of the nodes this one still has."""
        self._detector.recall({n: k for n, k in memory.slowdowns.items() if n in self._ratios})
        self._slowdown.update({n: k for n, k in memory.smoothed.items() if n in self._ratios})
        self._arrivals.extend(memory.arrivals)

    def forget_device(self, node_id: str) -> None:
        """A retired node: what was learnt of its device is no longer carried to the next placement."""
        self._detector.forget(node_id)
        self._slowdown.pop(node_id, None)

    # ---- read-only views -------------------------------------------------------------------------
    @property
    def lat_trigger_s(self) -> float:
        return self.slo_s + self.config.trigger_margin_s

    @property
    def budget_s(self) -> float:
        """Per-stage time budget: if every stage meets it, the compute path uses ≤ budget_fraction × SLO.

        Every replica of a stage must meet it too: a frame waits for whichever replica it was handed."""
        return self.config.budget_fraction * self.slo_s / self.n_stages

    @property
    def ratios(self) -> dict[str, float]:
        """Desired ratio per node (what the gateway last published or should publish)."""
        return dict(self._ratios)

    @property
    def manual(self) -> dict[str, float]:
        return dict(self._manual)

    def curve(self, node_id: str) -> LatencyCurve:
        """The latency curve the controller predicts ``node_id``'s slice with (calibrated, or provisional)."""
        return self._curves[node_id]

    @property
    def adaptive(self) -> bool:
        return self.config.policy == "adaptive"

    def slowdown(self, node_id: str) -> float:
        """Observed/calibrated compute time, ≥ 1 (a node is never assumed faster than calibrated): from the last
        frames' compute when adaptive, else smoothed from the node's periodic stats."""
        if self.adaptive:
            return self._detector.estimate(node_id)
        return max(1.0, self._slowdown.get(node_id, 1.0))

    def arrival_rate(self, now: float) -> float:
        """Frames stage 1 accepted per second: over the last ``arrival_window_s``, or over the last
        ``burst_window_s`` when that is higher (a burst's rate counts from its first frames, not once it
        has filled the longer window)."""
        window, burst = self.config.arrival_window_s, self.config.burst_window_s
        while self._arrivals and self._arrivals[0] <= now - max(window, burst):
            self._arrivals.popleft()
        rate = sum(ts > now - window for ts in self._arrivals) / window
        if 0 < burst < window:  # intervals between the window's frames: one frame alone is no rate
            rate = max(rate, (sum(ts > now - burst for ts in self._arrivals) - 1) / burst)
        return rate

    def metrics(self, now: float) -> Metrics:
        trigger_window = self._since_last_action(now, self.config.trigger_window_s)
        over_ts = [ts for ts, latency in trigger_window if latency > self.lat_trigger_s]
        restore_window = [latency for _, latency in self._since_last_action(now, self.config.restore_window_s)]
        headroom_s = self.config.restore_latency_fraction * self.slo_s
        return Metrics(
            trigger_samples=len(trigger_window),
            over_trigger_fraction=len(over_ts) / len(trigger_window) if trigger_window else 0.0,
            violation_span_s=max(over_ts) - min(over_ts) if over_ts else 0.0,
            restore_samples=len(restore_window),
            headroom_fraction=(sum(latency <= headroom_s for latency in restore_window) / len(restore_window)
                               if restore_window else 0.0),
            slowdowns={node: self.slowdown(node) for node in self.nodes},
            queue_depths=dict(self._queue_depth), arrival_hz=self.arrival_rate(now))

    def _since_last_action(self, now: float, window_s: float) -> list[tuple[float, float]]:
        """(completion ts, latency) of requests in the window that completed after the last action."""
        start = max(self._last_action_ts, now - window_s)
        return [(ts, latency) for ts, latency in self._latencies if ts > start]

    # ---- inputs --------------------------------------------------------------------------------------
    def observe_latency(self, ts: float, e2e_latency_s: float) -> None:
        """One completed request: its completion time and end-to-end latency."""
        self._latencies.append((ts, e2e_latency_s))

    def observe_frame(self, ts: float, node_id: str, compute_s: float, ratio: float) -> None:
        """One stage of one completed frame: the node's compute at the ratio it ran (adaptive's slowdown signal)."""
        if node_id in self._curves:
            self._detector.observe(ts, node_id, compute_s, self._curves[node_id].predict(ratio))

    def observe_arrival(self, ts: float) -> None:
        """A frame stage 1 accepted: the arrival rate each stage must keep up with."""
        self._arrivals.append(ts)

    def observe_node(self, ts: float, node_id: str, compute_mean_s: float | None, queue_depth: int,
                     applied_ratio: float, decode_mean_s: float | None = None) -> None:
        """A node's periodic stats (``NodeStats``: ts, compute_mean_s, queue_depth, prune_ratio, decode_mean_s).

        The slowdown sample is compute time over the calibrated time *at the ratio the node reports
        applied*. The first report after the applied ratio changes is skipped, since its mean mixes both
        variants. Stats of nodes outside the pipeline, and duplicates or reordered reports, are ignored.
        Decode time (a stage-1 frame's JPEG/PNG decode) is kept apart: pruning cannot shrink it, so it
        never counts as slowdown; it is only named when a violation is held.
        """
        if node_id not in self._fits or ts <= self._stats_ts.get(node_id, float("-inf")):
            return
        self._stats_ts[node_id] = ts
        self._queue_depth[node_id] = queue_depth
        if decode_mean_s is not None:
            self._decode_s[node_id] = decode_mean_s
        if node_id in self._applied and abs(self._applied[node_id] - applied_ratio) > TOLERANCE:
            self._applied[node_id] = applied_ratio
            return
        self._applied[node_id] = applied_ratio
        if compute_mean_s is None or compute_mean_s <= 0:
            return
        sample = compute_mean_s / self._curves[node_id].predict(applied_ratio)
        previous = self._slowdown.get(node_id)
        weight = self.config.slowdown_smoothing
        self._slowdown[node_id] = sample if previous is None else weight * sample + (1 - weight) * previous
        if self.slowdown(node_id) <= self.config.slowdown_gone:
            self._gone_since.setdefault(node_id, ts)
        else:
            self._gone_since.pop(node_id, None)

    def set_manual(self, now: float, node_id: str, ratio: float) -> list[Action]:
        """Hold a node at a ladder ratio until released; the policies and restore leave it alone."""
        if node_id not in self._ratios:
            raise ValueError(f"unknown node {node_id!r}")
        on_ladder = [r for r in self.config.ladder if abs(r - ratio) < 1e-6]
        if not on_ladder:
            raise ValueError(f"ratio {ratio} is not on the ladder {self.config.ladder}")
        metrics = self.metrics(now)
        self._manual[node_id] = self._ratios[node_id] = on_ladder[0]
        self._last_action_ts = now
        reason = f"operator holds {node_id} at {on_ladder[0]}"
        return [SetRatios(now, {node_id: on_ladder[0]}, "manual", reason, self._evaluate_current("manual", reason),
                          metrics)]

    def release_manual(self, now: float, node_id: str) -> list[Action]:
        """Hand a held node back to the controller at its current ratio (restore lowers it when safe)."""
        if self._manual.pop(node_id, None) is None:
            return []
        reason = f"operator released {node_id}"
        return [SetRatios(now, {node_id: self._ratios[node_id]}, "auto", reason,
                          self._evaluate_current("release", reason), self.metrics(now))]

    # ---- the state machine ----------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Decide at time ``now``; call it periodically (e.g. every second) and after bursts of input."""
        if self._watching_since is None:
            self._watching_since = now
        horizon = now - max(self.config.trigger_window_s, self.config.restore_window_s)
        while self._latencies and self._latencies[0][0] <= horizon:
            self._latencies.popleft()
        if self.adaptive:
            return self._track(now)
        if now < self._last_action_ts + self.config.cooldown_s:
            return []
        metrics = self.metrics(now)
        if self._violation_sustained(metrics):
            return self._respond_to_violation(now, metrics)
        if self.config.fast_restore and metrics.over_trigger_fraction < self.config.trigger_fraction:
            fast = self._fast_restore(now, metrics)
            if fast:
                return fast
        if self._headroom_sustained(now, metrics):
            return self._restore_step(now, metrics)
        return []

    def _violation_sustained(self, m: Metrics) -> bool:
        return (m.trigger_samples >= self.config.min_samples
                and m.over_trigger_fraction >= self.config.trigger_fraction
                and m.violation_span_s >= self.config.trigger_min_span_s)

    def _headroom_sustained(self, now: float, m: Metrics) -> bool:
        """Headroom over a whole restore window, all of it watched and after the last action."""
        watched_from = max(self._last_action_ts, self._watching_since)
        return (now - self.config.restore_window_s >= watched_from
                and m.restore_samples >= self.config.min_samples
                and m.headroom_fraction >= self.config.restore_fraction)

    def _problem(self, now: float | None = None, headroom: float = 1.0) -> RatioProblem:
        """The ratio problem at the current estimates; with ``now`` (adaptive) the arrival rate caps each stage's
        budget; ``headroom`` < 1 shrinks every budget (a lower ratio must fit with room to spare)."""
        index = {node: i for i, node in enumerate(self.nodes)}
        caps = [self._rate_cap(n, now) for n in self.nodes] if now is not None else None
        return RatioProblem(latency=[self._fits[n] for n in self.nodes],
                            slowdowns=[self.slowdown(n) for n in self.nodes],
                            accuracy=self._accuracy, accuracy_floor=self.accuracy_floor,
                            budget_s=headroom * self.budget_s,
                            ladder=[r for r in self.config.ladder if r <= self.config.max_ratio + TOLERANCE],
                            accuracy_model=self.config.accuracy_model,
                            fixed={index[n]: r for n, r in self._manual.items()}, names=self.nodes,
                            rate_caps_s=None if caps is None else [None if c is None else headroom * c for c in caps])

    def _rate_cap(self, node: str, now: float) -> float | None:
        """Longest compute per frame with which ``node`` keeps up with its share of the arrivals (its input decode,
        which pruning cannot shrink, takes its part first); None while nothing arrives."""
        rate = self.arrival_rate(now) * self._shares[node]
        if rate <= 0:
            return None
        return max(MIN_STAGE_BUDGET_S, self.config.utilisation / rate - self._decode_s.get(node, 0.0))

    def _track(self, now: float) -> list[Action]:
        """Adaptive: move towards the least pruning that meets every stage's budget at the current slowdowns and
        arrival rate. More pruning is applied at once; less once it has been the answer, with headroom, for
        ``fast_restore_confirm_s`` and the latency is not violating. A sustained end-to-end violation the
        estimates do not explain (a backlog, transport) prunes the deepest queue's node one more step."""
        metrics = self.metrics(now)
        decision = choose_adaptive(self._problem(now))
        needed = dict(zip(self.nodes, decision.ratios))
        relaxed = dict(zip(self.nodes, choose_adaptive(self._problem(now, self.config.restore_headroom)).ratios))
        violating = metrics.over_trigger_fraction >= self.config.trigger_fraction
        changed = {n: r for n, r in needed.items() if r > self._ratios[n] + TOLERANCE}
        for node in self.nodes:
            lower = max(needed[node], relaxed[node])
            if node in self._manual or lower >= self._ratios[node] - TOLERANCE or violating:
                self._lower_since.pop(node, None)
                continue
            since = self._lower_since.setdefault(node, now)
            if now - since >= self.config.fast_restore_confirm_s:
                changed[node] = lower
        if changed:
            candidate = {**self._ratios, **changed}
            if not self._problem(now).meets_floor([candidate[n] for n in self.nodes]):
                changed = {n: r for n, r in needed.items() if abs(r - self._ratios[n]) > TOLERANCE}
        actions: list[Action] = []
        if changed:
            raised = any(r > self._ratios[n] for n, r in changed.items())
            reason = self._tracking_reason(metrics, decision, raised)
            self._ratios.update(changed)
            for node in changed:
                self._lower_since.pop(node, None)
            self._last_action_ts = now
            actions.append(SetRatios(now, changed, "auto", reason,
                                     decision if raised else self._evaluate_current("restore", reason), metrics))
        infeasible = (decision.infeasible, decision.ratios) if decision.infeasible else None
        if infeasible is not None and infeasible != self._last_infeasible:
            actions.append(Infeasible(now, decision.reason, decision, metrics))
        self._last_infeasible = infeasible
        if not actions and now >= self._last_action_ts + self.config.cooldown_s and self._violation_sustained(metrics):
            actions = self._relieve_backlog(now, metrics)
        return actions

    def _tracking_reason(self, metrics: Metrics, decision: Decision, raised: bool) -> str:
        slowed = {n: s for n, s in metrics.slowdowns.items() if s > 1.0}
        seen = ", ".join(f"{n} {s:.1f}x" for n, s in slowed.items()) or "no slowdown"
        rate = f"{metrics.arrival_hz:.1f} frames/s arriving" if metrics.arrival_hz else "no recent arrivals"
        if raised:
            return f"compute shows {seen}, {rate}; {decision.reason}"
        return (f"restore: compute shows {seen}, {rate}; lower ratios have met every budget with "
                f"{1 - self.config.restore_headroom:.0%} headroom for {self.config.fast_restore_confirm_s:g} s")

    def _relieve_backlog(self, now: float, metrics: Metrics) -> list[Action]:
        """The safety net: latency over the trigger although the estimates say every stage keeps up. One more
        ladder step on the node with the deepest queue drains it faster, if the accuracy floor allows."""
        problem = self._problem(now)
        queued = sorted((d, n) for n, d in self._queue_depth.items()
                        if d > 0 and n in self._ratios and n not in self._manual)  # an idle node holds no backlog
        for _, node in reversed(queued):
            higher = [r for r in problem.ladder if r > self._ratios[node] + TOLERANCE]
            ratios = {**self._ratios, node: higher[0]} if higher else None
            if ratios and problem.meets_floor([ratios[n] for n in self.nodes]):
                reason = (f"{metrics.over_trigger_fraction:.0%} of {metrics.trigger_samples} requests over "
                          f"{self.lat_trigger_s:.3f} s although every stage is predicted to keep up: one step more "
                          f"on {node} (queue {self._queue_depth[node]}) to drain the backlog")
                self._ratios[node] = higher[0]
                self._last_action_ts = now
                return [SetRatios(now, {node: higher[0]}, "auto", reason,
                                  evaluate_ratios(problem, [self._ratios[n] for n in self.nodes], "adaptive", reason),
                                  metrics)]
        self._last_action_ts = now
        return [Held(now, "latency over the trigger, but the estimates predict every stage keeps up and no queued node "
                          "may be pruned further" + self._decode_note(), self._evaluate_current("held", ""), metrics)]

    def _evaluate_current(self, label: str, reason: str) -> Decision:
        return evaluate_ratios(self._problem(), [self._ratios[n] for n in self.nodes], label, reason)

    def _respond_to_violation(self, now: float, metrics: Metrics) -> list[Action]:
        """Apply the policy's vector if it adds pruning somewhere; report infeasible or unexplained cases.

        A vector that only lowers ratios is not applied: lowering during a violation would be a restore
        the latency does not support.
        """
        decision = POLICIES[self.config.policy](self._problem())
        proposed = dict(zip(self.nodes, decision.ratios))
        changed = {n: r for n, r in proposed.items() if abs(r - self._ratios[n]) > TOLERANCE}
        actions: list[Action] = []
        if any(r > self._ratios[n] for n, r in changed.items()):
            reason = (f"{metrics.over_trigger_fraction:.0%} of {metrics.trigger_samples} requests over "
                      f"{self.lat_trigger_s:.3f} s; {decision.reason}")
            self._ratios.update(changed)
            actions.append(SetRatios(now, changed, "auto", reason, decision, metrics))
        if decision.infeasible:
            actions.append(Infeasible(now, decision.reason, decision, metrics))
        if not actions:
            actions.append(Held(now, "latency over the trigger, but the curves predict the current ratios meet "
                                     "the stage budget (queueing, transport or an uncalibrated cause?)"
                                + self._decode_note(), decision, metrics))
        self._last_action_ts = now
        return actions

    def _decode_note(self) -> str:
        """Names the slowest input decode, which pruning cannot shrink (smaller frames or a faster stage-1 can)."""
        if not self._decode_s:
            return ""
        node, seconds = max(self._decode_s.items(), key=lambda item: item[1])
        return f"; {node} spends {seconds * 1e3:.1f} ms a request decoding its input, which pruning cannot shrink"

    def _fast_restore(self, now: float, metrics: Metrics) -> list[Action]:
        """Give a recovered node its channels back in one decision, not one ladder step per restore window.

        The controller knows each node's slowdown: once it has stayed gone for ``fast_restore_confirm_s``
        (after the last action and after watching started), the node goes straight to the lowest ratio its
        calibrated curve predicts within ``restore_headroom`` × the stage budget at its current speed. The
        headroom keeps the next trigger from undoing it; any pruning left is confirmed by the step-wise
        restore, which also guards nodes whose curve the latency does not bear out.
        """
        confirm = self.config.fast_restore_confirm_s
        watched_from = max(self._last_action_ts, self._watching_since)
        if now - watched_from < confirm:
            return []
        changed = {}
        for node in self.nodes:
            ratio, since = self._ratios[node], self._gone_since.get(node)
            if node in self._manual or ratio <= 0.0 or since is None or now - max(since, watched_from) < confirm:
                continue
            target = self._fast_target(node, ratio)
            if target is not None:
                changed[node] = target
        reason = (f"fast restore: slowdown gone (≤ {self.config.slowdown_gone}x) for {confirm:g} s; lowest ratio "
                  f"predicted within {self.config.restore_headroom:.0%} of the {self.budget_s * 1e3:.0f} ms budget")
        return self._restore(now, changed, reason, metrics)

    def _fast_target(self, node: str, ratio: float) -> float | None:
        """The lowest ladder ratio below ``ratio`` predicted within restore_headroom × the budget, if any."""
        limit_s = self.config.restore_headroom * self.budget_s + TOLERANCE
        fitting = [r for r in self.config.ladder
                   if r < ratio - TOLERANCE and self.slowdown(node) * self._curves[node].predict(r) <= limit_s]
        return min(fitting) if fitting else None

    def _restore_step(self, now: float, metrics: Metrics) -> list[Action]:
        """Lower each recovered auto node one ladder step, if that keeps it under the stage budget.

        Hysteresis: headroom is judged against restore_latency_fraction × SLO (well below LAT_trigger),
        the slowdown must be observed and below slowdown_gone, and the step must keep the node's predicted
        time under the same budget the policy prunes to, so a restore never undoes what the next trigger
        would redo.
        """
        changed = {}
        for node in self.nodes:
            ratio = self._ratios[node]
            if (node in self._manual or ratio <= 0.0 or node not in self._slowdown
                    or self.slowdown(node) > self.config.slowdown_gone):
                continue
            lower = max((r for r in self.config.ladder if r < ratio - TOLERANCE), default=0.0)
            if self.slowdown(node) * self._curves[node].predict(lower) <= self.budget_s + TOLERANCE:
                # with fast restore on, latency headroom is as good a reason to jump as the confirmed slowdown
                target = self._fast_target(node, ratio) if self.config.fast_restore else None
                changed[node] = lower if target is None else min(lower, target)
        reason = (f"restore: {metrics.headroom_fraction:.0%} of {metrics.restore_samples} requests under "
                  f"{self.config.restore_latency_fraction:.0%} of the SLO and slowdown gone")
        return self._restore(now, changed, reason, metrics)

    def _restore(self, now: float, changed: dict[str, float], reason: str, metrics: Metrics) -> list[Action]:
        """Give back what a restore rule chose (nothing if it chose nothing); an action starts the cooldown."""
        if not changed:
            return []
        self._last_action_ts = now
        self._ratios.update(changed)
        return [SetRatios(now, changed, "auto", reason, self._evaluate_current("restore", reason), metrics)]
