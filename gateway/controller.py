"""The pruning controller: when to prune, how much (via a policy), when to give it back.

Pure: no MQTT and no clock of its own. The gateway feeds it observations with their timestamps, calls
:meth:`PruningController.tick` with the current time, and turns the returned actions
(:mod:`gateway.controller_actions`) into retained ``PruneDesired`` messages and ``prune_events`` rows. This class
keeps what both rules share: the observations and the estimates made from them (slowdowns, arrival rate, the
metrics), the ratios and the operator's manual holds, and the ratio problem at the current estimates; the rule
that decides is :class:`gateway.tracking.AdaptiveTracking` or :class:`gateway.reactive.ReactiveTrigger`.
See docs/controller.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.controller_actions import Action, Metrics, SetRatios
from gateway.curves import AccuracyFit, LatencyCurve, ReplicaAccuracy, SliceLatencyFit
from gateway.policy import TOLERANCE, Decision, RatioProblem, evaluate_ratios
from gateway.reactive import ReactiveTrigger
from gateway.slowdown import SlowdownDetector
from gateway.tracking import AdaptiveTracking
from shared.settings import ControllerSettings

MIN_STAGE_BUDGET_S = 1e-4  # a rate cap a stage's decode alone exceeds: no ratio meets it (best effort)


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
    """Slowdown estimation, ratio choice, restore and manual holds, on one of two rules.

    ``adaptive`` (the default) tracks a target (:mod:`gateway.tracking`); ``bottleneck`` and ``paper`` act only on
    the sustained end-to-end violation (the paper's reactive controller), with a cooldown and restores
    (:mod:`gateway.reactive`). Either rule reads the estimates and moves the ratios through the methods below
    ``tick``.
    """

    def __init__(self, nodes: Sequence[str], latency: Mapping[str, SliceLatencyFit],
                 accuracy: AccuracyFit | ReplicaAccuracy, slo_s: float, config: ControllerSettings | None = None,
                 initial_ratios: Mapping[str, float] | None = None, n_stages: int | None = None,
                 arrival_shares: Mapping[str, float] | None = None, held: Mapping[str, float] | None = None):
        """``nodes`` in stage order, a replicated stage's nodes side by side; ``accuracy`` has one entry per node
        (a :class:`ReplicaAccuracy` when stages have replicas, whose count ``n_stages`` then gives);
        ``arrival_shares``: the fraction of the frames each node serves (1 / its stage's replicas; default 1);
        ``held``: the operator's holds a previous controller had (they stay until released)."""
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
        self._manual = {node: ratio for node, ratio in (held or {}).items() if node in self._ratios}
        self._ratios.update(self._manual)
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
        self._arrivals: deque[float] = deque()  # capture times of the frames stage 1 accepted, in acceptance order
        self._newest_accepted: tuple[float, float] | None = None  # (accepted, captured) of the newest accepted frame
        self._shares = {node: (arrival_shares or {}).get(node, 1.0) for node in nodes}
        unpruned = accuracy.predictor(self.config.accuracy_model)([0.0] * len(nodes))
        self.accuracy_floor = self.config.accuracy_floor_relative * unpruned
        self._rule = AdaptiveTracking(self) if self.adaptive else ReactiveTrigger(self)

    def memory(self) -> DeviceMemory:
        return DeviceMemory(self._detector.estimates(), dict(self._slowdown), tuple(self._arrivals))

    def recall(self, memory: DeviceMemory) -> None:
        """Start from what the previous placement's controller knew of the nodes this one still has."""
        self._detector.recall({n: k for n, k in memory.slowdowns.items() if n in self._ratios})
        self._slowdown.update({n: k for n, k in memory.smoothed.items() if n in self._ratios})
        self._arrivals.extend(memory.arrivals)

    def forget_device(self, node_id: str) -> None:
        """A retired node: what was learnt of its device, and its hold, are no longer carried to the next placement."""
        self._detector.forget(node_id)
        self._slowdown.pop(node_id, None)
        self._manual.pop(node_id, None)

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
        """Frames per second the cameras send into stage 1: over the last ``arrival_window_s``, or over the last
        ``burst_window_s`` when that is higher (a burst's rate counts from its first frames, not once it
        has filled the longer window).

        Counted by *capture* time, in windows that end where stage 1 has got to: the newest accepted frame's
        capture plus the time since it was accepted. While stage 1 keeps up that is ``now``. When frames wait in
        the broker before stage 1 takes them (``[node] flow_control``: one input at a time), acceptances come at
        the rate stage 1 already serves, but the frames' capture times still carry the cameras' spacing, so the
        controller sees the rate it must keep up with, not the one it keeps. A camera clock off by a constant
        cancels out; cameras whose clocks disagree with each other blur the spacing (docs/controller.md)."""
        window, burst = self.config.arrival_window_s, self.config.burst_window_s
        front = now
        if self._newest_accepted is not None:
            accepted, captured = self._newest_accepted
            front = captured + max(0.0, now - accepted)
            while self._arrivals and self._arrivals[0] <= captured - max(window, burst):
                self._arrivals.popleft()
        rate = sum(ts > front - window for ts in self._arrivals) / window
        if 0 < burst < window:  # intervals between the window's frames: one frame alone is no rate
            rate = max(rate, (sum(ts > front - burst for ts in self._arrivals) - 1) / burst)
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

    def observe_arrival(self, ts: float, capture_ts: float | None = None) -> None:
        """A frame stage 1 accepted at ``ts``, captured at ``capture_ts`` (default: ``ts``): the arrival rate each
        stage must keep up with (:meth:`arrival_rate`)."""
        capture_ts = ts if capture_ts is None else capture_ts
        self._arrivals.append(capture_ts)
        if self._newest_accepted is None or ts >= self._newest_accepted[0]:
            self._newest_accepted = (ts, capture_ts)

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

    # ---- the operator's manual holds ---------------------------------------------------------------
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
        return [SetRatios(now, {node_id: on_ladder[0]}, "manual", reason, self.evaluate_current("manual", reason),
                          metrics)]

    def release_manual(self, now: float, node_id: str) -> list[Action]:
        """Hand a held node back to the controller at its current ratio (restore lowers it when safe)."""
        if self._manual.pop(node_id, None) is None:
            return []
        reason = f"operator released {node_id}"
        return [SetRatios(now, {node_id: self._ratios[node_id]}, "auto", reason,
                          self.evaluate_current("release", reason), self.metrics(now))]

    # ---- the state machine ----------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Decide at time ``now``; call it periodically (e.g. every second) and after bursts of input."""
        if self._watching_since is None:
            self._watching_since = now
        horizon = now - max(self.config.trigger_window_s, self.config.restore_window_s)
        while self._latencies and self._latencies[0][0] <= horizon:
            self._latencies.popleft()
        return self._rule.decide(now)

    # ---- for the rules (gateway/tracking.py, gateway/reactive.py) --------------------------------------
    @property
    def last_action_ts(self) -> float:
        """When ratios were last set or a violation answered: the cooldown and the metrics start there."""
        return self._last_action_ts

    @property
    def watched_from(self) -> float:
        """Since when the current ratios have been watched: the last action, or the first tick."""
        return max(self._last_action_ts, self._watching_since)

    def gone_since(self, node_id: str) -> float | None:
        """Since when the node's slowdown (from its stats) has been gone, if it is."""
        return self._gone_since.get(node_id)

    def stats_heard(self, node_id: str) -> bool:
        """The node's stats have given a slowdown sample (a restore needs one)."""
        return node_id in self._slowdown

    def act(self, now: float, changed: dict[str, float]) -> None:
        """A rule acted at ``now`` (``changed``: the ratios it set, possibly none): the cooldown starts."""
        self._ratios.update(changed)
        self._last_action_ts = now

    def violation_sustained(self, m: Metrics) -> bool:
        return (m.trigger_samples >= self.config.min_samples
                and m.over_trigger_fraction >= self.config.trigger_fraction
                and m.violation_span_s >= self.config.trigger_min_span_s)

    def problem(self, now: float | None = None, headroom: float = 1.0) -> RatioProblem:
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

    def evaluate_current(self, label: str, reason: str) -> Decision:
        return evaluate_ratios(self.problem(), [self._ratios[n] for n in self.nodes], label, reason)

    def decode_note(self) -> str:
        """Names the slowest input decode, which pruning cannot shrink (smaller frames or a faster stage-1 can)."""
        if not self._decode_s:
            return ""
        node, seconds = max(self._decode_s.items(), key=lambda item: item[1])
        return f"; {node} spends {seconds * 1e3:.1f} ms a request decoding its input, which pruning cannot shrink"
