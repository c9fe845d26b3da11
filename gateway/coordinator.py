"""The gateway's decisions: what each message and each tick changes, and what must be published and stored.

Pure: no MQTT, no SQLite, no clock. Time is passed in and every entry point returns :class:`Effects` (messages to
publish, rows for the store, gone nodes' sessions to take over, and the refusal to report when a message was refused);
:mod:`gateway.service` subscribes, parses, calls one entry point under its lock and carries the effects out.

The coordinator routes each message to the part that owns its idea and joins what they decide:

- :class:`~gateway.data_path.DataPath`: the request ledger (results, accepted frames, duplicates, thumbnails,
  failures and lost frames) and the SLO windows;
- :class:`~gateway.placing.Placing`: the live placement and its handover, the retained placement and its guard,
  the takeover of gone nodes' sessions, re-partitioning for slowdowns;
- :class:`~gateway.rate_replan.RateReplan`: the arrival rate, its trigger and the re-plan for it;
- :class:`~gateway.desired_states.DesiredStates`: the retained prune states the control loop decides;
- :class:`~gateway.commands.OperatorCommands`: operator commands and settings;

and itself the control loop (:mod:`gateway.control_loop`) and what feeds it, node liveness
(:mod:`gateway.liveness`), clock suspects, re-calibration requests and the time beacon.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import wraps

from gateway.commands import OperatorCommands
from gateway.control_loop import ControlLoop, LadderMismatch
from gateway.control_loop import Effects as ControlEffects
from gateway.curves import AccuracyFit
from gateway.data_path import DataPath
from gateway.desired_states import DesiredStates
from gateway.effects import Effects
from gateway.handback import HeldInput
from gateway.hybrid import HybridPlan, HybridRequest
from gateway.live_placement import PlanWanted, solve
from gateway.liveness import Liveness
from gateway.operator import Overrides
from gateway.placing import Placing
from gateway.rate_replan import RateReplan, plan_for_rate
from shared.clock import offset_suspect
from shared.schemas import (
    AcceptedRequest,
    BadMessage,
    CalibrateCommand,
    ClockBeacon,
    ErrorRecord,
    NodeProfile,
    NodeStats,
    Placement,
    PrepareCommand,
    Result,
    SliceCalibration,
    to_json,
)
from shared.settings import GatewaySettings
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics

log = logging.getLogger(__name__)
STATUSES = (AVAILABILITY_ONLINE, AVAILABILITY_OFFLINE, AVAILABILITY_STOPPED)
# Refusals of a payload that is garbage whoever sent it (not, e.g., a well-formed profile of another model)
GARBAGE = frozenset({"bad_json", "bad_schema", "bad_status", "oversized"})


@dataclass
class Tick:
    """What a tick decided under the service's lock, before a rate re-plan is planned outside it."""

    now: float
    placement: Placement | None
    control: ControlEffects
    planned_for_hz: float | None
    rate_request: HybridRequest | None
    plan_wanted: PlanWanted | None  # a hybrid placement to plan outside the lock, answered by :meth:`on_plan`
    status: dict
    windows: list
    lost: list[str]
    silent: list[str]
    ready: Placement | None
    ask: list[str]
    overdue: Placement | None
    late: list[str]
    out: Effects  # decided so far (e.g. calibrations a new placement made usable)


def _entry(method):
    """An entry point: collects what it decides into fresh :class:`Effects`; a refusal is returned with them."""
    @wraps(method)
    def run(self, *args, **kwargs) -> Effects:
        self._out = Effects()
        try:
            method(self, *args, **kwargs)
        except BadMessage as exc:
            self._out.refusal = exc
        out, self._out = self._out, Effects()
        return out
    return run


class Coordinator:
    def __init__(self, settings: GatewaySettings, operator: Overrides, topics: Topics, fingerprint: str,
                 input_bytes: int, block_accuracy: AccuracyFit | None, issued_desired: dict[str, bytes],
                 open_requests: list[dict], now: float, pending_takeovers: dict[str, str] | None = None,
                 placement_version: int = 0,
                 awaiting_follow_ups: tuple[list[dict], list[tuple[float, float]]] = ([], []),
                 held_inputs: Iterable[HeldInput] = ()):
        """``issued_desired``, ``open_requests``, ``pending_takeovers``, ``placement_version``,
        ``awaiting_follow_ups`` (prune events without a follow-up, with the latencies after them) and ``held_inputs``
        (inputs taken back from gone nodes, not re-sent yet) are what the database remembers of the previous run
        (:class:`~gateway.store.Store`): a restart resumes them."""
        self.settings = settings
        self.operator = operator
        self.topics = topics
        self.fingerprint = fingerprint
        self.data_path = DataPath(settings, operator.slo_s, open_requests)
        self.placing = Placing(settings, operator, topics, fingerprint, input_bytes, now, pending_takeovers,
                               placement_version, held_inputs)
        self.rates = RateReplan(settings, self.placing.live, now)
        self.desired = DesiredStates(topics, issued_desired)
        self.commands = OperatorCommands(settings, topics, operator, self.data_path, self.placing, self.desired)
        self._recalibrations: dict[tuple[str, int], int] = {}  # (node, placement version) -> times asked
        self.control = ControlLoop(operator.controller_settings(), operator.slo_s, block_accuracy,
                                   follow_up_s=settings.window_s)
        self.control.automatic = operator.automatic
        self.control.prune_log.resume(*awaiting_follow_ups)
        self.desired.recall(issued_desired, self.control)
        self.liveness = Liveness(settings.stats_silence_s)
        self._next_beacon = 0.0
        self._clock_suspects: set[str] = set()  # nodes whose clock offset is over the limit (logged once)
        self._out = Effects()  # what the entry point being run has decided so far

    def remember_offers(self, offers: list[NodeProfile]) -> None:
        """Profiles nodes offered before a restart, so the gateway can plan at once."""
        for offer in offers:
            self.placing.live.set_offer(offer)

    # --- messages ------------------------------------------------------------------------------
    @_entry
    def on_result(self, result: Result, payload: bytes, now: float) -> None:
        """Store a result once (:meth:`DataPath.result`); the controller judges the latency of each that counts."""
        row = self.data_path.result(result, payload, now, self._out)
        if row is not None:
            self.control.observe_latency(now, row["e2e_s"])
            self.control.observe_result(now, result)

    @_entry
    def on_accepted(self, accepted: AcceptedRequest, now: float) -> None:
        if self.data_path.accepted(accepted, now, self._out):
            self.rates.arrivals.add(now)
            self.control.observe_arrival(now, accepted.capture_ts)

    @_entry
    def on_thumbnail(self, node_id: str, request_id: str, jpeg: bytes, now: float) -> None:
        self.data_path.thumbnail(node_id, request_id, jpeg, now, self._out)

    @_entry
    def on_status(self, node_id: str | None, status: str, now: float) -> None:
        if node_id is None or status not in STATUSES:
            raise BadMessage("bad_status", f"status {status[:40]!r} is not one of {', '.join(STATUSES)}")
        if status == AVAILABILITY_ONLINE:
            self.liveness.heard(node_id, now)
        else:
            self.liveness.gone(node_id)
            self.data_path.departed(node_id, now)
        self.placing.set_status(node_id, status, now, self._out)
        self._out.write("update_node", {"node_id": node_id, "status": status, "status_ts": now})

    @_entry
    def on_drained(self, node_id: str, served: str, held: list[tuple[str, bytes, dict[str, str]]],
                   now: float) -> None:
        """A gone node's session, taken over (``Effects.drains``): what it held goes back to the stages."""
        self.placing.hand_back(node_id, served, held, now, self._out)

    @_entry
    def on_stats(self, stats: NodeStats, now: float) -> None:
        self.placing.heard(stats.node_id, now, self._out)
        if self.liveness.heard(stats.node_id, now):  # a hung node resumed: a (re)joining node again
            self.placing.set_status(stats.node_id, AVAILABILITY_ONLINE, now, self._out)
            log.warning("%s speaks again after %.0f s of silence", stats.node_id, self.liveness.silence_s)
            self._out.write("update_node", {"node_id": stats.node_id, "status": AVAILABILITY_ONLINE,
                                            "status_ts": now})
        self.control.observe_stats(stats)
        self.placing.in_force(stats.node_id, stats.placement_version, now, self._out)
        handover = self.placing.handover
        ready = handover.prepared(stats.node_id, stats.prepared_version) if stats.prepared_version else None
        if ready is not None:
            self.placing.activate(ready, now, self._out)
        suspect = offset_suspect(stats.clock_offset_s, self.settings.max_clock_offset_s)
        if suspect != (stats.node_id in self._clock_suspects):
            self._clock_suspects ^= {stats.node_id}
            if suspect:
                log.warning("%s: clock is %+.3f s off the gateway's (limit %.3f s): its latencies are unreliable; "
                            "check chrony on it", stats.node_id, stats.clock_offset_s, self.settings.max_clock_offset_s)
        self._out.write("update_node", {**stats.model_dump(exclude={"ts", "prepared_version"}),
                                        "last_seen": stats.ts})

    @_entry
    def on_profile(self, offer: NodeProfile, payload: bytes, now: float) -> None:
        unusable = self.placing.live.set_offer(offer)
        if unusable:
            raise BadMessage("model_mismatch", unusable)
        self._out.write("add_profile", {"node_id": offer.node_id, "model_fingerprint": offer.model_fingerprint,
                                        "ts": now, "memory_mb": offer.memory_mb,
                                        "uplink_mbit_s": offer.uplink_mbit_s, "profile": payload.decode()})

    @_entry
    def on_calibration(self, calibration: SliceCalibration) -> None:
        try:
            row = self.control.add_calibration(calibration)
        except LadderMismatch as exc:
            raise BadMessage("ladder_mismatch", f"calibration of {calibration.node_id} refused: {exc}") from None
        except ValueError as exc:  # a curve that cannot be fitted (e.g. latencies that are all noise)
            self._recalibrate(calibration.node_id, calibration.placement_version,
                              "no latency curve fits its slice's calibration")
            measured = ", ".join(f"{r:g}:{t * 1e3:.2f}" for r, t in zip(calibration.ratios, calibration.latency_s))
            raise BadMessage("bad_calibration", f"calibration of {calibration.node_id} (ratio:ms {measured}): "
                             f"{exc}") from None
        if row is None:
            return
        self._out.write("add_calibration", row)
        r2 = max(row["r2_linear"], row["r2_quadratic"])
        if r2 < self.settings.recalibrate_below_r2:
            self._recalibrate(calibration.node_id, calibration.placement_version,
                              f"its slice's latency fit explains only R²={r2:.2f} of the calibration (below "
                              f"{self.settings.recalibrate_below_r2:.2f})")

    def _recalibrate(self, node_id: str, placement_version: int, why: str) -> None:
        """A calibration measured while the host was busy: a flat or noisy curve (kept: it would make the controller
        predict that pruning this slice buys nothing) or one no curve fits (refused: the controller stays off): ask
        the node to measure again, a bounded number of times per placement."""
        key = (node_id, placement_version)
        asked = self._recalibrations.get(key, 0)
        if asked >= self.settings.recalibrate_attempts:
            return
        self._recalibrations[key] = asked + 1
        log.warning("%s: %s: asking it to calibrate again (%d of %d)", node_id, why,
                    asked + 1, self.settings.recalibrate_attempts)
        self._out.send(self.topics.node_command(node_id), to_json(CalibrateCommand(cmd="calibrate")))

    @_entry
    def on_error(self, record: ErrorRecord) -> None:
        self.data_path.error(record, self._out)
        if record.kind == "retained_data" and self.topics.is_data_topic(record.topic):
            self._out.send(record.topic, b"", retain=True)  # reported; now stop its replays
            log.warning("cleared a retained message on %s", record.topic)

    @_entry
    def on_refused_retained(self, topic: str, kind: str) -> None:
        """A retained message on a device's availability or profile was refused as garbage (and reported): clear
        it, as a retired node's topics and retained data are, or every restart would replay and report it again,
        and a device that is gone never overwrites it. A well-formed refusal (another model's profile) stays."""
        if kind in GARBAGE and self.topics.is_device_state(topic):
            self._out.send(topic, b"", retain=True)
            log.warning("cleared a retained %s message on %s", kind, topic)

    # --- the gateway's own retained states -------------------------------------------------------
    @_entry
    def placement_message(self) -> None:
        self.placing.publish(self._out)

    @_entry
    def on_placement(self, payload: bytes, now: float) -> None:
        self.placing.refuse_foreign(payload, now, self._out)

    @_entry
    def on_desired(self, node_id: str, payload: bytes, now: float) -> None:
        self.desired.received(node_id, payload, now, self.control, self._out)

    # --- operator commands ------------------------------------------------------------------------
    @_entry
    def on_command(self, payload: bytes, now: float) -> None:
        self.commands.obey(payload, now, self.control, self._out)

    # --- periodic work ----------------------------------------------------------------------------
    def tick(self, now: float) -> Effects:
        """One whole tick (the service splits it: :meth:`begin_tick` under its lock, the rate re-plan's planning
        outside it, :meth:`end_tick` under it again; a hybrid placement is planned on its worker thread and handed
        to :meth:`on_plan`). Here all at once."""
        decided = self.begin_tick(now)
        plan = plan_for_rate(decided.rate_request) if decided.rate_request is not None else None
        out = self.end_tick(decided, plan)
        if decided.plan_wanted is not None:
            out.extend(self.on_plan(decided.plan_wanted, solve(decided.plan_wanted), now))
        return out

    def begin_tick(self, now: float) -> Tick:
        self._out = Effects()
        placing = self.placing
        decided = placing.live.decide(now)
        wanted = decided if isinstance(decided, PlanWanted) else None
        placement = None if wanted else decided
        if placement is not None:
            self._place_controller(placement)
        effects = self.control.tick(now)
        if placement is None and (self.operator.move_blocks or placing.replaced):  # switched off: still move back
            placement = placing.replace_for_slowdowns(now, effects, self.operator.move_blocks, self.control.controller)
            if placement is not None:
                self._place_controller(placement)
        planned_for_hz = self.rates.trigger.planned_hz
        rate_request = (self.rates.due(now, self.control, self.operator.slo_s)
                        if placement is None and wanted is None else None)
        status = {**self.control.status(), "settings": self.operator.effective(), "arrival": self.rates.status(now)}
        windows = self.data_path.slo.close_due(now)
        lost = self.data_path.expire(now)
        placing.settle(now, self._out)
        silent = self.liveness.newly_silent(now)
        for node_id in silent:  # hung: stop sending it work now, not when the broker's will fires (and what it
            placing.set_status(node_id, AVAILABILITY_OFFLINE, now, self._out)  # holds goes to the others)
            self.data_path.departed(node_id, now)
        ready, ask = placing.handover.propose(placement, now) if placement is not None else (None, [])
        overdue, late = placing.handover.expire(now)
        out, self._out = self._out, Effects()
        return Tick(now, placement, effects, planned_for_hz, rate_request, wanted, status, windows, lost, silent,
                    ready, ask, overdue, late, out)

    def end_tick(self, tick: Tick, plan: HybridPlan | None) -> Effects:
        """The rest of a tick, given the rate re-plan's plan (None when none was due or none was found)."""
        self._out = tick.out
        now, placement, effects, ready, ask = tick.now, tick.placement, tick.control, tick.ready, tick.ask
        if tick.rate_request is not None:
            placement = self.rates.apply(now, tick.rate_request, plan, tick.planned_for_hz, effects)
            if placement is not None:
                self._place_controller(placement)
                ready, ask = self.placing.handover.propose(placement, now)
        for node_id in tick.silent:
            log.warning("%s: no stats for %.0f s: treated as offline (hung?)", node_id, self.settings.stats_silence_s)
            self._out.write("update_node", {"node_id": node_id, "status": "silent", "status_ts": now})
        for request_id in tick.lost:
            self._out.write("add_failure", self.data_path.lost_row(request_id, now))
        self._prepare(ask, placement)
        if tick.late:
            log.warning("placement v%d published although %s did not confirm its input subscription within %g s",
                        tick.overdue.version, ", ".join(tick.late), self.settings.prepare_timeout_s)
        if ready or tick.overdue:
            self.placing.activate(ready or tick.overdue, now, self._out)
        self.desired.carry_out(effects, self._out)
        self._out.write("set_controller_status", now, tick.status)
        for window in tick.windows:
            self._out.write("add_window", window.row())
        if now >= self._next_beacon:
            self._next_beacon = now + self.settings.clock_beacon_s
            self._out.send(self.topics.clock, to_json(ClockBeacon(gateway_id=self.settings.gateway_id, ts=now)),
                           qos=0)
        out, self._out = self._out, Effects()
        return out

    @_entry
    def on_plan(self, wanted: PlanWanted, solved: HybridPlan | str, now: float) -> None:
        """The hybrid plan a tick asked for (``Tick.plan_wanted``), made outside the lock: placed if still wanted
        (:meth:`LivePlacement.take`), published once the nodes that need a new input are subscribed."""
        placement = self.placing.live.take(wanted, solved, now)
        if placement is None:
            return
        self._place_controller(placement)
        ready, ask = self.placing.handover.propose(placement, now)
        self._prepare(ask, placement)
        if ready is not None:
            self.placing.activate(ready, now, self._out)

    def _prepare(self, nodes: list[str], placement: Placement) -> None:
        """Ask ``nodes`` to subscribe to their input under ``placement`` before it is published."""
        for node_id in nodes:
            self._out.send(self.topics.node_command(node_id), to_json(PrepareCommand(cmd="prepare",
                                                                                     placement=placement)))

    @_entry
    def close(self) -> None:
        """The gateway stops: the open SLO windows are written."""
        for window in self.data_path.slo.close_all():
            self._out.write("add_window", window.row())

    def _place_controller(self, placement: Placement) -> None:
        """The control loop follows a new placement; calibrations it could use only now are stored now."""
        for row in self.control.set_placement(placement, self.placing.live.profiles()):
            self._out.write("add_calibration", row)
