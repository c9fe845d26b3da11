"""The placement at run time: which placement is live and published, and what follows from it.

Pure (time passed in, messages written into the caller's :class:`~gateway.effects.Effects`). It composes
:class:`gateway.live_placement.LivePlacement` (when to re-place) and :class:`~gateway.live_placement.Handover`
(publish once the nodes are subscribed), and owns the retained placement topic (only this gateway places: a forged
placement is outbid and replaced), the takeover of a gone node's broker session (what it held goes back to the
stages: :mod:`gateway.handback`), and re-partitioning for slowdowns and back.
:class:`gateway.coordinator.Coordinator` makes the control loop follow what it places.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

from gateway.accounting import DesiredGuard
from gateway.control_loop import Effects as ControlEffects
from gateway.controller import PruningController
from gateway.effects import Effects
from gateway.handback import HandBack, HeldInput
from gateway.live_placement import (Handover, HybridTarget, LivePlacement, PlacementRules, input_of,
                                    slowed_for_moves)
from gateway.operator import Overrides
from shared import routing
from shared.model import MODEL_NAME
from shared.schemas import BadMessage, Placement, to_json
from shared.settings import GatewaySettings
from shared.topics import AVAILABILITY_ONLINE, Topics

log = logging.getLogger(__name__)


class Placing:
    def __init__(self, settings: GatewaySettings, operator: Overrides, topics: Topics, fingerprint: str,
                 input_bytes: int, now: float, pending_takeovers: dict[str, str] | None = None,
                 placement_version: int = 0, held_inputs: Iterable[HeldInput] = ()):
        """``pending_takeovers``: gone node -> its input, stored by a previous run that had not taken them over yet;
        ``placement_version``: the last placement a previous run published (placements go on above it);
        ``held_inputs``: inputs a previous run had taken back and not re-sent yet (they wait here again)."""
        self.settings = settings
        self.operator = operator  # its SLO goes out with every placement
        self.topics = topics
        rules = PlacementRules(settings.startup_wait_s, settings.rejoin_hold_s, settings.replan_min_gain)
        hybrid = (HybridTarget(settings.hybrid_arrival_hz, operator.slo_s,
                               whole_model=settings.placement_mode == "data",
                               min_parallel=2 if settings.placement_mode == "parallel" else 1)
                  if settings.placement_mode != "pipeline" else None)
        self.live = LivePlacement(rules, MODEL_NAME, fingerprint, settings.nodes, started=now,
                                  frame_megapixels=settings.frame_megapixels, input_bytes=input_bytes, hybrid=hybrid)
        self.live.seen_version = placement_version
        self.handover = Handover(settings.prepare_timeout_s)
        self.guard = DesiredGuard()  # the placements this gateway issued
        self.replaced = False  # the placement was last moved for slowdowns (move back once they are gone)
        # gone node -> its input, taken over once a placement without it is in force; stored (``takeovers``) until
        # done: a restarted gateway would not know it (the availability stays `offline`, the input is the old run's)
        self._gone: dict[str, str] = dict(pending_takeovers or {})
        self._taken_over: set[str] = set(self._gone)  # gone nodes whose session is (to be) taken over, till heard
        # the previous run's: until its stats come, an `online` availability may be a hung node's, retained from before
        self._resumed: set[str] = set(self._gone)
        self.handback = HandBack(topics, settings.result_timeout_s)
        self.handback.restore(held_inputs)
        self._activated: Placement | None = None  # the last placement published
        self._awaited: dict[str, int] = {}  # nodes whose input the last placements changed: the version to report
        self._unconfirmed: set[str] = set()  # nodes of the last placement published that have not said it is in force
        self._hand_back_by = float("-inf")  # held inputs go out once no node is awaited, or then

    # --- nodes coming and going ----------------------------------------------------------------
    def set_status(self, node_id: str, status: str, now: float, out: Effects) -> None:
        """A node's availability (or its silence, as offline); a gone node's session is taken over once it is
        placed around (:meth:`activate`)."""
        self.live.set_status(node_id, status, now)
        if status != AVAILABILITY_ONLINE:
            self._take_over(node_id, now, out)
        elif node_id not in self._resumed:
            self.heard(node_id, now, out)

    def heard(self, node_id: str, now: float, out: Effects) -> None:
        """The node speaks: its session is its own again, and a later departure takes it over again."""
        self._resumed.discard(node_id)
        self._taken_over.discard(node_id)
        if self._gone.pop(node_id, None) is not None:
            out.write("set_takeover", node_id, "", now)

    def _take_over(self, node_id: str, now: float, out: Effects) -> None:
        """A node that held an input is gone (offline, or silent: hung but still connected): it acknowledges an input
        only once served, so its broker session holds what it had not finished, and keeps collecting what is sent
        to that input meanwhile. Once a placement without it is in force, the session is taken over
        (service: _hand_over) and what it held goes to where that placement reads it (:meth:`hand_back`). Once per
        departure: a later ``offline`` (a will) starts no second takeover, which would cut the node off again if it
        had resumed meanwhile."""
        placement = self.handover.active
        served = routing.input_filter(self.topics, placement, node_id) if placement else None
        if served is None or node_id in self._taken_over:
            return
        self._taken_over.add(node_id)
        self._gone[node_id] = served
        out.write("set_takeover", node_id, served, now)

    def _drain_placed_around(self, now: float, out: Effects) -> None:
        """Take over the session of each gone node the placement last published no longer gives an input, once every
        node of it has it in force (or ``prepare_timeout_s`` after it was published): until a node switched, it
        may still send outputs to the gone node's input, and once the session ended the broker drops them."""
        placement = self._activated
        if placement is None or (self._unconfirmed and now < self._hand_back_by):
            return
        for node_id, served in list(self._gone.items()):
            if placement.job_of(node_id) is None:
                del self._gone[node_id]
                out.drains.append((node_id, served))

    def hand_back(self, node_id: str, served: str, held: list[tuple[str, bytes, dict[str, str]]], now: float,
                  out: Effects) -> None:
        """What a gone node's session held: its inputs re-sent to where the placement in force reads them (or kept
        until one does); recorded as a ``handover`` row in ``errors`` when it held any."""
        before = self._held_keys()
        taken, sent = self.handback.take(held, self.handover.active if self._placed_everywhere(now) else None,
                                           now)
        out.publish.extend(sent)
        self._store_held(before, out)
        out.write("set_takeover", node_id, "", now)  # done: a restart does not take it over again
        message = (f"{node_id} ({served}) is gone: {taken.inputs} inputs its session held were taken back, "
                   f"{taken.sent} re-sent to the stages that read them now, {taken.inputs - taken.sent} waiting for "
                   f"a placement with a stage for them; {taken.other} other messages dropped; its session ended")
        if not taken.inputs:  # a node stopped cleanly (or that had served everything): nothing for the record
            log.info("%s", message)
            return
        log.warning("%s", message)
        out.write("add_error", {"ts": now, "component": self.settings.gateway_id, "topic": served, "kind": "handover",
                                "message": message, "request_id": None})

    def in_use(self, node_id: str) -> bool:
        """Online and in the current placement (a node that must not be retired)."""
        current = self.live.current
        return current is not None and current.job_of(node_id) is not None and node_id in self.live.eligible()

    def follow_slo(self, slo_s: float) -> None:
        """The next hybrid plan (a node joins or leaves) is made for the new SLO."""
        if self.live.hybrid is not None:
            self.live.hybrid = replace(self.live.hybrid, slo_s=slo_s)

    # --- the retained placement --------------------------------------------------------------------
    def publish(self, out: Effects, after_write: bool = False) -> None:
        """The active placement, retained, so nodes that (re)connect later learn their stage at once; with the
        current SLO, which nodes order their queues by (docs/reliability.md). ``after_write``: once the rows written
        before it are committed (a new placement's own row)."""
        placement = self.handover.active
        if placement is not None:
            payload = to_json(placement.model_copy(update={"slo_s": self.operator.slo_s,
                                                           "thumbnails": self.settings.thumbnail_budget_mb > 0}))
            self.guard.issue("placement", payload)
            out.send(self.topics.placement, payload, retain=True, after_write=after_write)

    def activate(self, placement: Placement, now: float, out: Effects) -> None:
        """Publish a placement every node that needed a new input for it is subscribed for (or timed out); gone nodes
        it places around are taken over and inputs taken back earlier that it has a stage for are re-sent once the
        nodes have it in force (:meth:`settle`)."""
        log.info("placement v%d: publishing", placement.version)
        self._record(placement, out)
        # once its row is committed: a gateway killed in between left frames served under a placement the database
        # never had, so no one could say which slices a stored frame ran through (docs/database.md, placements)
        self.publish(out, after_write=True)
        nodes = placement.all_nodes()
        self._unconfirmed = set(nodes)
        self._awaited = {node: version for node, version in self._awaited.items() if node in nodes}  # no input now
        if self._activated is not None:  # unknown before the first: what the nodes read then is not ours to know
            self._awaited.update({node: placement.version for node in nodes
                                  if input_of(placement, node) != input_of(self._activated, node)})
        self._activated = placement
        self._hand_back_by = now + self.handover.timeout_s
        self.settle(now, out)

    def in_force(self, node_id: str, version: int | None, now: float, out: Effects) -> None:
        """A node's stats: the placement it has in force (None: none yet)."""
        if version is None:
            return
        if self._activated is not None and version >= self._activated.version:
            self._unconfirmed.discard(node_id)
        if version >= self._awaited.get(node_id, version + 1):
            del self._awaited[node_id]
        self.settle(now, out)

    def settle(self, now: float, out: Effects) -> None:
        """What waits for the nodes to have the last placement in force: take over the sessions of gone nodes it
        placed around (:meth:`_drain_placed_around`), and re-send the inputs taken back earlier that the active
        placement has a stage for, once each node whose input the last placements changed has said it has them in
        force (or ``prepare_timeout_s`` after the last was published: a node that never says so is likely gone).
        Sent at once, an input raced the placement to a node joining a stage: the node had the input on its input
        connection before the placement on its control one, took it for another node's and acknowledged it
        unserved (the soak: a held activation re-sent as node-2 came back ended ``lost``)."""
        self._drain_placed_around(now, out)
        placement = self.handover.active
        if len(self.handback) and placement is not None and self._placed_everywhere(now):
            before = self._held_keys()
            out.publish.extend(self.handback.release(placement, now))
            self._store_held(before, out)

    def _held_keys(self) -> set[str]:
        return {held.key for held in self.handback.waiting}

    def _store_held(self, before: set[str], out: Effects) -> None:
        """Keep the gateway's database in step with what waits in the hand-back: a drained session's inputs are
        acknowledged away from the broker, so a gateway killed while they wait would lose them (``held_inputs``;
        re-sent or given up: marked done, the payload dropped)."""
        now_waiting = {held.key: held for held in self.handback.waiting}
        for key, held in now_waiting.items():
            if key not in before:
                out.write("hold_input", {"key": key, "topic": held.topic, "payload": held.payload, "user": held.user,
                                         "next_block": held.next_block, "since": held.since, "done": 0})
        for key in before - now_waiting.keys():
            out.write("hold_input", {"key": key, "payload": b"", "done": 1})

    def _placed_everywhere(self, now: float) -> bool:
        return not self._awaited or now >= self._hand_back_by

    def _record(self, placement: Placement, out: Effects) -> None:
        out.write("add_placement", placement.model_dump(exclude={"share_token"}))  # a secret: not stored

    def refuse_foreign(self, payload: bytes, now: float, out: Effects) -> None:
        """Only this gateway places: anything else on the placement topic is reported and replaced."""
        current = self.handover.active
        if current is None:  # not placing yet: a retained placement (of a previous run?) stands until ours, above it
            self._outbid(payload)
            return
        if self.guard.own("placement", payload):
            return  # our own echo
        try:  # the nodes ignore versions below what they saw: go above a forged one
            forged_version = Placement.model_validate_json(payload).version
        except ValueError:
            forged_version = -1
        if forged_version >= current.version:  # a pending placement would be ignored too: the planner proposes again
            corrected = current.model_copy(update={"version": forged_version + 1, "issued_at": now})
            self.live.current = self.handover.active = corrected
            self.handover.pending = None
            self._record(corrected, out)  # a new version is published: `placements` keeps every one
        self.publish(out)
        raise BadMessage("foreign_placement", f"placement not issued by this gateway, replaced: {payload[:200]!r}")

    def _outbid(self, payload: bytes) -> None:
        """A placement on the topic before this gateway places: its first placement goes above it."""
        try:
            self.live.seen_version = max(self.live.seen_version, Placement.model_validate_json(payload).version)
        except ValueError:  # unreadable: the nodes refused it too
            pass

    # --- moves for slowdowns -------------------------------------------------------------------------
    def replace_for_slowdowns(self, now: float, effects: ControlEffects, move: bool,
                              controller: PruningController | None) -> Placement | None:
        """Re-partition when the controller reacted to a sustained violation (``move``: moves are on), and back
        when slowdowns are gone. The move is logged as a ``replace`` row in ``prune_events``."""
        if controller is None:  # paused, e.g. while the nodes calibrate the slices of the last move
            return None
        slowdowns = slowed_for_moves({n: controller.slowdown(n) for n in controller.nodes},
                                     controller.config.slowdown_gone)
        violated = move and any(e.get("kind") in ("set", "infeasible", "held") and "reason" in e
                                for e in effects.events)
        gone = all(k == 1.0 for k in slowdowns.values())
        if not (violated or (gone and self.replaced)):
            return None
        placement = self.live.replan_for_slowdowns(slowdowns if violated else {}, now)
        if placement is None:
            return None
        self.replaced = violated
        effects.events.append({"ts": now, "kind": "replace", "policy": "replace", "source": "auto",
                               "reason": f"placement v{placement.version}: " + ", ".join(
                                   f"{s.node_id}:{s.first_block}-{s.last_block}" for s in placement.stages),
                               "metrics": {"slowdowns": slowdowns}})
        return placement
