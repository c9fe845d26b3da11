"""Joins the live placement, the nodes' calibrations and the pure controller; no MQTT, no clock.

The gateway feeds it what arrives and publishes what :meth:`ControlLoop.tick` returns: retained
``PruneDesired`` messages and rows for the ``prune_events`` table. The controller only runs once
every node of the current placement has calibrated its slice *for that placement* and an
accuracy model is loaded; until then :attr:`ControlLoop.disabled_reason` says why.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gateway.controller import Held, Infeasible, PruningController, SetRatios
from gateway.curves import AccuracyFit, SliceLatencyFit, accuracy_for_slices, fit_latency
from shared.model import DEFAULT_CHECKPOINT, MODEL_NAME
from shared.schemas import NodeStats, Placement, PruneDesired, SliceCalibration
from shared.settings import ControllerSettings

log = logging.getLogger(__name__)


def accuracy_model_path(model: str) -> Path:
    """Where `edgeprune calibrate` writes the per-block accuracy model, beside the shipped checkpoint."""
    return DEFAULT_CHECKPOINT.with_name(f"{model}.accuracy.json")


def load_block_accuracy(path: Path | None, fingerprint: str) -> AccuracyFit | None:
    """The per-block accuracy model, if one exists for these weights (None disables the controller)."""
    path = path or accuracy_model_path(MODEL_NAME)
    if not path.exists():
        log.warning("no accuracy model at %s: the pruning controller stays off until `edgeprune calibrate`", path)
        return None
    data = json.loads(path.read_text())
    if data.get("model_fingerprint") not in (None, fingerprint):
        log.warning("accuracy model %s was calibrated for other weights (%s, running %s): controller off",
                    path, data.get("model_fingerprint"), fingerprint)
        return None
    return AccuracyFit.from_dict(data["fit"])


@dataclass
class Effects:
    """What the gateway must do after a tick."""

    publish: dict[str, PruneDesired] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)


class ControlLoop:
    def __init__(self, settings: ControllerSettings, slo_s: float, block_accuracy: AccuracyFit | None,
                 follow_up_s: float):
        self.settings = settings
        self.slo_s = slo_s
        self.block_accuracy = block_accuracy
        self.follow_up_s = follow_up_s
        self.placement: Placement | None = None
        self.controller: PruningController | None = None
        self.fits: dict[str, SliceLatencyFit] = {}
        self._fit_blocks: dict[str, tuple[int, int]] = {}  # which slice each fit was measured on
        self.desired: dict[str, PruneDesired] = {}
        self._recent: deque[tuple[float, float]] = deque()
        self._awaiting_follow_up: list[dict] = []

    @property
    def disabled_reason(self) -> str | None:
        if self.block_accuracy is None:
            return "no accuracy model (run `edgeprune calibrate` or set [gateway] accuracy_model)"
        if self.placement is None:
            return "no placement yet"
        missing = [s.node_id for s in self.placement.stages if s.node_id not in self.fits]
        if missing:
            return f"waiting for the calibration of {', '.join(missing)}"
        return None

    # --- inputs --------------------------------------------------------------------------
    def set_placement(self, placement: Placement) -> None:
        """A new placement invalidates calibrations of other slices; ratios carry over per node."""
        self.placement = placement
        stages = {s.node_id: (s.first_block, s.last_block) for s in placement.stages}
        self.fits = {n: f for n, f in self.fits.items() if self._fit_blocks.get(n) == stages.get(n)}
        self._rebuild()

    def add_calibration(self, calibration: SliceCalibration) -> dict | None:
        """Fit the node's latency curve if it is for its slice in the current placement; returns a table row."""
        stage = self.placement.stage_of(calibration.node_id) if self.placement else None
        if stage is None or (stage.first_block, stage.last_block) != (calibration.first_block,
                                                                      calibration.last_block):
            return None
        fit = fit_latency(calibration.ratios, calibration.latency_s)
        best = fit.best()  # raises ValueError when no fit is usable: keep the previous state then
        self.fits[calibration.node_id] = fit
        self._fit_blocks[calibration.node_id] = (stage.first_block, stage.last_block)
        self._rebuild()
        return {"node_id": calibration.node_id, "measured_at": calibration.measured_at,
                "placement_version": calibration.placement_version, "first_block": calibration.first_block,
                "last_block": calibration.last_block, "fit": json.dumps(fit.to_dict()), "best": best.kind,
                "r2_linear": fit.linear.r2, "r2_quadratic": fit.quadratic.r2}

    def recover_desired(self, node_id: str, desired: PruneDesired) -> None:
        """The retained desired state (ours, from before a restart): keep its seq and ratio."""
        if node_id not in self.desired or desired.seq > self.desired[node_id].seq:
            self.desired[node_id] = desired
            self._rebuild()

    def observe_latency(self, ts: float, e2e_s: float) -> None:
        self._recent.append((ts, e2e_s))
        while self._recent and self._recent[0][0] < ts - 4 * self.follow_up_s:
            self._recent.popleft()
        if self.controller:
            self.controller.observe_latency(ts, e2e_s)

    def observe_stats(self, stats: NodeStats) -> None:
        if self.controller and stats.compute_mean_s is not None:
            self.controller.observe_node(stats.ts, stats.node_id, stats.compute_mean_s, stats.queue_depth,
                                         stats.prune_ratio, stats.decode_mean_s)

    def _rebuild(self) -> None:
        if self.disabled_reason is not None:
            if self.controller is not None:
                log.info("pruning controller paused: %s", self.disabled_reason)
            self.controller = None
            return
        nodes = [s.node_id for s in self.placement.stages]
        accuracy = accuracy_for_slices(self.block_accuracy, [(s.first_block, s.last_block)
                                                             for s in self.placement.stages])
        initial = {n: self.desired[n].ratio for n in nodes if n in self.desired}
        self.controller = PruningController(nodes, self.fits, accuracy, self.slo_s, self.settings, initial)
        log.info("pruning controller running over %s (policy %s, budget %.1f ms per stage)", nodes,
                 self.settings.policy, self.controller.budget_s * 1e3)

    # --- decisions -----------------------------------------------------------------------
    def tick(self, now: float) -> Effects:
        effects = Effects(events=self._follow_ups(now))
        if self.controller is not None:
            self._apply(self.controller.tick(now), now, effects)
        return effects

    def manual(self, now: float, node_id: str, ratio: float | None) -> Effects:
        """Operator override: hold ``node_id`` at ``ratio``, or release it (``None``); ValueError if not possible."""
        if self.controller is None:
            raise ValueError(f"the pruning controller is off ({self.disabled_reason})")
        effects = Effects()
        actions = (self.controller.release_manual(now, node_id) if ratio is None
                   else self.controller.set_manual(now, node_id, ratio))
        self._apply(actions, now, effects)
        return effects

    def _apply(self, actions: list, now: float, effects: Effects) -> None:
        """Each action becomes an event row; each changed ratio the next retained desired state."""
        for action in actions:
            effects.events.append(self._event_row(action))
            if isinstance(action, SetRatios):
                for node, ratio in action.ratios.items():
                    seq = self.desired[node].seq + 1 if node in self.desired else 1
                    self.desired[node] = PruneDesired(ratio=ratio, seq=seq, issued_at=now, source=action.source,
                                                      reason=action.reason[:500])
                    effects.publish[node] = self.desired[node]

    def forget(self, node_id: str) -> None:
        """A retired node: no desired state, no curve."""
        self.desired.pop(node_id, None)
        self.fits.pop(node_id, None)
        self._fit_blocks.pop(node_id, None)

    def _event_row(self, action: SetRatios | Infeasible | Held) -> dict:
        kind = {SetRatios: "set", Infeasible: "infeasible", Held: "held"}[type(action)]
        d = action.decision
        row = {"ts": action.ts, "kind": kind, "policy": d.policy, "reason": action.reason,
               "source": getattr(action, "source", None),
               "ratios": json.dumps(dict(zip(self.controller.nodes, d.ratios))),
               "changed": json.dumps(getattr(action, "ratios", {})),
               "predicted_stage_s": json.dumps(list(d.stage_latency_s)), "predicted_bottleneck_s": d.bottleneck_s,
               "predicted_accuracy": d.accuracy, "budget_s": d.budget_s, "infeasible": d.infeasible,
               "metrics": json.dumps(asdict(action.metrics), default=float)}
        log.warning("prune event (%s): %s -> %s", kind, action.reason, row["ratios"])
        self._awaiting_follow_up.append(row)
        return row

    def _follow_ups(self, now: float) -> list[dict]:
        """Observed latency in the ``follow_up_s`` after each event: did the decision work?"""
        done = [r for r in self._awaiting_follow_up if now >= r["ts"] + self.follow_up_s]
        self._awaiting_follow_up = [r for r in self._awaiting_follow_up if now < r["ts"] + self.follow_up_s]
        rows = []
        for row in done:
            after = np.array([lat for ts, lat in self._recent if row["ts"] < ts <= row["ts"] + self.follow_up_s])
            rows.append({"ts": row["ts"], "kind": row["kind"], "observed_count": int(after.size),
                         "observed_p50_s": float(np.percentile(after, 50)) if after.size else None,
                         "observed_p95_s": float(np.percentile(after, 95)) if after.size else None})
        return rows

    def status(self) -> dict:
        """For the operator page."""
        c = self.controller
        return {"enabled": c is not None, "reason": self.disabled_reason, "policy": self.settings.policy,
                "ratios": {n: d.ratio for n, d in self.desired.items()},
                "slowdowns": {n: c.slowdown(n) for n in c.nodes} if c else {},
                "budget_s": c.budget_s if c else None,
                "accuracy_floor": c.accuracy_floor if c else None}
