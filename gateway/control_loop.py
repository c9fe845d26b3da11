"""Joins the live placement, the nodes' calibrations and the pure controller; no MQTT, no clock, no files.

The gateway feeds it what arrives and publishes what :meth:`ControlLoop.tick` returns: retained
``PruneDesired`` messages and rows for the ``prune_events`` table. The controller only runs once
every node of the current placement has calibrated its slice *for that placement* and an
accuracy model is given (the gateway loads it at start-up); until then :attr:`ControlLoop.disabled_reason` says why.
Which curve counts for which node is :mod:`gateway.slice_curves`'s; the event rows and their follow-ups are
:mod:`gateway.prune_log`'s; this module rebuilds the controller over them and turns its actions into effects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.controller import DeviceMemory, PruningController
from gateway.controller_actions import SetRatios
from gateway.curves import AccuracyFit, PipelineMix, ReplicaAccuracy, accuracy_for_slices
from gateway.prune_log import PruneLog
from gateway.slice_curves import LadderMismatch, SliceCurves
from shared.schemas import ModelProfile, NodeStats, Placement, PruneDesired, Result, SliceCalibration
from shared.settings import ControllerSettings

log = logging.getLogger(__name__)


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
        self.placement: Placement | None = None
        self.controller: PruningController | None = None
        self.curves = SliceCurves()
        self.prune_log = PruneLog(follow_up_s)
        self._memory: DeviceMemory | None = None  # the last controller's knowledge of the devices
        self.desired: dict[str, PruneDesired] = {}  # the last state issued per node; ``source`` "manual": held
        self.automatic = True  # False for the operator's policy 'off': only manual holds change ratios

    @property
    def disabled_reason(self) -> str | None:
        if self.block_accuracy is None:
            return "no accuracy model (run `edgeprune calibrate` or set [gateway] accuracy_model)"
        if self.placement is None:
            return "no placement yet"
        return self.curves.waiting_reason(self.placement.node_ids())

    # --- inputs --------------------------------------------------------------------------
    def set_placement(self, placement: Placement, profiles: Mapping[str, ModelProfile] | None = None) -> list[dict]:
        """A new placement invalidates calibrations of other slices; ratios carry over per node.

        A node's latest calibration that fits its slice in this placement is used at once (table rows returned):
        a restarted gateway receives the nodes' retained calibrations before it has re-established the
        placement, and nodes that keep their blocks never measure again, so dropping those messages left the
        controller off until some later re-placement.

        A node that moved to other blocks gets a *provisional* curve until it has measured its new slice: its
        last calibration scaled by its own profile's time of the new blocks over the old ones (``profiles``).
        Without it the controller paused for the whole re-calibration (~8 s in ``bench pipeline``'s paper
        scenario) just when a move made for a slowed node needs pruning most.
        """
        self.placement = placement
        slices = {n: (s.first_block, s.last_block) for s in placement.stages for n in s.nodes}
        rows = []
        for calibration in self.curves.keep_for(slices):
            try:
                row = self.add_calibration(calibration)
            except ValueError as exc:  # refused when it arrived too (LadderMismatch included): logged then
                log.info("%s's earlier calibration is unusable for placement v%d: %s", calibration.node_id,
                         placement.version, exc)
                continue
            if row is not None:
                rows.append(row)
        self.curves.predict_moved(slices, profiles or {})
        self._rebuild()
        return rows

    def add_calibration(self, calibration: SliceCalibration) -> dict | None:
        """Fit the node's latency curve if it is for its slice in the current placement; returns a table row.

        The ratios a node calibrates are the variants it has. A configured ladder with a ratio the node
        lacks is refused (LadderMismatch, and the controller stays off): the node would silently snap it
        to its nearest variant, and the controller would predict times and accuracy it never gets.
        """
        stage = self.placement.stage_of(calibration.node_id) if self.placement else None
        blocks = (stage.first_block, stage.last_block) if stage is not None else None
        try:
            row = self.curves.add(calibration, blocks, self.settings.ladder)
        except LadderMismatch:
            self._rebuild()
            raise
        if row is not None:
            self._rebuild()
        return row

    @property
    def holds(self) -> dict[str, float]:
        """The operator's holds: the nodes whose last desired state was issued ``manual``.

        One source of truth: a hold is set, kept and released only by issuing a node's desired state (a release
        issues it ``auto``), so the state itself says whether the node is held. The gateway keeps every state it
        issues in SQLite and publishes it retained; a restart recovers both the ratio and the hold from it
        (:meth:`recover_desired`), and a held node that leaves the placement is held again when placed again.
        """
        return {node: d.ratio for node, d in self.desired.items() if d.source == "manual"}

    def recover_desired(self, node_id: str, desired: PruneDesired) -> None:
        """A desired state of ours from before a restart: keep its seq, its ratio and whether it is a hold."""
        if node_id not in self.desired or desired.seq > self.desired[node_id].seq:
            self.desired[node_id] = desired
            self._rebuild()

    def observe_latency(self, ts: float, e2e_s: float) -> None:
        """Keep it for the prune events' follow-ups (:mod:`gateway.prune_log` says why there too), and hand the
        sample to the running controller."""
        self.prune_log.observe_latency(ts, e2e_s)
        if self.controller:
            self.controller.observe_latency(ts, e2e_s)

    def observe_result(self, ts: float, result: Result) -> None:
        """Each stage's compute on a completed frame: the adaptive controller's per-frame slowdown signal. Hops a
        node ran under another placement (another slice, another stage) say nothing about its current curve, nor
        do hops against a provisional curve: how much pruning speeds up differs from block to block (measured: a
        first block alone does not speed up at all), so its error would read as a slowdown that grows with the
        ratio; the slowdown carried over the move stands until the node's own calibration arrives."""
        if self.controller is None or self.placement is None:
            return
        for hop in result.hops:
            stage = self.placement.stage_of(hop.node_id)
            if stage is None or stage.stage != hop.stage or hop.node_id in self.curves.provisional:
                continue
            if hop.first_block is not None and (hop.first_block, hop.first_block + hop.n_blocks - 1) != (
                    stage.first_block, stage.last_block):  # served in flight during a move: other blocks
                continue
            self.controller.observe_frame(ts, hop.node_id, hop.compute_s, hop.prune_ratio)

    def observe_arrival(self, ts: float, capture_ts: float | None = None) -> None:
        """A frame stage 1 accepted (at ``ts``, captured at ``capture_ts``): the arrival rate the adaptive controller
        keeps every stage up with."""
        if self.controller:
            self.controller.observe_arrival(ts, capture_ts)

    def observe_stats(self, stats: NodeStats) -> None:
        if self.controller and stats.compute_mean_s is not None:
            self.controller.observe_node(stats.ts, stats.node_id, stats.compute_mean_s, stats.queue_depth,
                                         stats.prune_ratio, stats.decode_mean_s)

    def _rebuild(self) -> None:
        if self.controller is not None:
            self._memory = self.controller.memory()
        if self.disabled_reason is not None:
            if self.controller is not None:
                log.info("pruning controller paused: %s", self.disabled_reason)
            self.controller = None
            return
        nodes = self.placement.node_ids()
        accuracy = self.accuracy_model()
        initial = {n: self.desired[n].ratio for n in nodes if n in self.desired}
        pipelines = self.placement.pipelines
        # the broker deals frames in turn to every first-stage reader of every pipeline (docs/scaling.md); a stage's
        # replicas split its pipeline's share; a frame crosses the stages of one pipeline only
        readers = sum(len(stages[0].nodes) for stages in pipelines)
        shares = {n: len(stages[0].nodes) / readers / len(s.nodes) for stages in pipelines for s in stages
                  for n in s.nodes}
        self.controller = PruningController(nodes, self.curves.fits, accuracy, self.slo_s, self.settings, initial,
                                            n_stages=max(len(stages) for stages in pipelines), arrival_shares=shares,
                                            held=self.holds)
        if self._memory is not None:
            self.controller.recall(self._memory)
        log.info("pruning controller running over %s (policy %s, budget %.1f ms per stage)", nodes,
                 self.settings.policy, self.controller.budget_s * 1e3)

    def accuracy_model(self) -> AccuracyFit | PipelineMix | ReplicaAccuracy:
        """The expected accuracy over the placement's nodes: parallel pipelines weighed by their share of the frames
        (the broker deals them in turn to every first-stage reader), replicas that may run different ratios by theirs.
        """
        stages, pipelines = self.placement.stages, self.placement.pipelines
        accuracy = accuracy_for_slices(self.block_accuracy, [(s.first_block, s.last_block) for s in stages],
                                       first_readers=[len(p[0].nodes) for p in pipelines])
        if len(self.placement.node_ids()) > len(stages):
            return ReplicaAccuracy.equal_shares(accuracy, [len(s.nodes) for s in stages])
        return accuracy

    # --- decisions -----------------------------------------------------------------------
    def tick(self, now: float) -> Effects:
        effects = Effects(events=self.prune_log.follow_ups(now))
        if self.controller is not None and self.automatic:
            self._apply(self.controller.tick(now), now, effects)
        return effects

    def reconfigure(self, now: float, settings: ControllerSettings, slo_s: float, automatic: bool) -> Effects:
        """An operator changed a setting: rebuild the controller with it, keeping the manual holds."""
        holds = self.controller.manual if self.controller else {}
        self.settings, self.slo_s, self.automatic = settings, slo_s, automatic
        self._rebuild()
        effects = Effects()
        for node, ratio in holds.items():
            if self.controller is not None and node in self.controller.nodes:
                self._apply(self.controller.set_manual(now, node, ratio), now, effects)
        return effects

    def restore_all(self, now: float) -> Effects:
        """Operator's "restore all": every node back to its full slice (0) and into the controller's hands."""
        if self.controller is None:
            raise ValueError(f"the pruning controller is off ({self.disabled_reason})")
        effects = Effects()
        for node in self.controller.nodes:
            self._apply(self.controller.set_manual(now, node, 0.0) + self.controller.release_manual(now, node),
                        now, effects)
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
            effects.events.append(self.prune_log.row(action, self.controller.nodes))
            if isinstance(action, SetRatios):
                for node, ratio in action.ratios.items():
                    seq = self.desired[node].seq + 1 if node in self.desired else 1
                    self.desired[node] = PruneDesired(ratio=ratio, seq=seq, issued_at=now, source=action.source,
                                                      reason=action.reason[:500])
                    effects.publish[node] = self.desired[node]

    def forget(self, node_id: str) -> None:
        """A retired node: no desired state, no curve."""
        self.desired.pop(node_id, None)
        self.curves.forget(node_id)
        if self.controller is not None:  # a node that comes back is measured afresh, and is not held
            self.controller.forget_device(node_id)
        if self._memory is not None:
            self._memory = self._memory.without(node_id)

    def status(self) -> dict:
        """For the operator page."""
        c = self.controller
        return {"enabled": c is not None, "reason": self.disabled_reason,
                "policy": self.settings.policy if self.automatic else "off", "slo_s": self.slo_s,
                "manual": c.manual if c else {}, "ladder": list(self.settings.ladder),
                "ratios": {n: d.ratio for n, d in self.desired.items()},
                "slowdowns": {n: c.slowdown(n) for n in c.nodes} if c else {},
                "budget_s": c.budget_s if c else None, "provisional_curves": sorted(self.curves.provisional),
                "accuracy_floor": c.accuracy_floor if c else None}
