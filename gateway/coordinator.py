"""The gateway's decisions: what each message and each tick changes, and what must be published and stored.

Pure: no MQTT, no SQLite, no clock. Time is passed in and every entry point returns :class:`Effects` (messages to
publish, rows for the store, replica sessions to take over, and the refusal to report when a message was refused);
:mod:`gateway.service` subscribes, parses, calls one entry point under its lock and carries the effects out.
It owns the live placement and its handover (:mod:`gateway.live_placement`), the control loop
(:mod:`gateway.control_loop`), the re-partitioning for slowdowns, the arrival-rate trigger and its re-plan
(:mod:`gateway.arrival`, :mod:`gateway.hybrid`), the request ledger and the guards of the gateway's own retained
states (:mod:`gateway.accounting`), the SLO windows (:mod:`gateway.slo`), the operator's settings and commands
(:mod:`gateway.operator`) and node liveness (:mod:`gateway.liveness`).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field, replace
from functools import wraps

from gateway.accounting import LOST, WARNING_KINDS, DesiredGuard, RequestLedger, Verdict
from gateway.arrival import ArrivalMeter, RateRules, RateTrigger, levels_from_fits
from gateway.control_loop import ControlLoop, LadderMismatch
from gateway.control_loop import Effects as ControlEffects
from gateway.curves import AccuracyFit
from gateway.hybrid import HybridPlan, HybridRequest, plan_hybrid
from gateway.live_placement import (
    Handover,
    HybridTarget,
    LivePlacement,
    PlacementRules,
    one_pipeline,
    slowed_for_moves,
)
from gateway.liveness import Liveness
from gateway.operator import LABELS, Overrides
from gateway.placement import InfeasiblePlacement
from gateway.store import result_row
from gateway.slo import SloWindows
from shared.clock import offset_suspect
from shared.model import MODEL_NAME
from shared.schemas import (
    AcceptedRequest,
    BadMessage,
    CalibrateCommand,
    CameraCommand,
    ClockBeacon,
    CommandReply,
    ErrorRecord,
    GatewayCommand,
    ManualPruneCommand,
    NodeProfile,
    NodeSlowdownCommand,
    NodeStats,
    Placement,
    PrepareCommand,
    PruneDesired,
    RestoreAllCommand,
    Result,
    RetireCommand,
    SetSettingCommand,
    SliceCalibration,
    SlowdownCommand,
    parse_json,
    to_json,
)
from shared.settings import GatewaySettings
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics

log = logging.getLogger(__name__)
STATUSES = (AVAILABILITY_ONLINE, AVAILABILITY_OFFLINE, AVAILABILITY_STOPPED)
# Refusals of a payload that is garbage whoever sent it (not, e.g., a well-formed profile of another model)
GARBAGE = frozenset({"bad_json", "bad_schema", "bad_status", "oversized"})


def command_id(payload: bytes) -> str | None:
    """The ``id`` of a command, read leniently so even a command that fails validation gets its answer."""
    try:
        value = json.loads(payload.decode("utf-8")).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes | str
    qos: int = 1
    retain: bool = False


@dataclass
class Effects:
    """What the service must carry out after one call, each list in order."""

    publish: list[Publish] = field(default_factory=list)
    store: list[tuple[str, tuple]] = field(default_factory=list)  # (a `Store` method, its arguments)
    drains: list[tuple[str, str]] = field(default_factory=list)   # (a gone replica, its shared input topic)
    refusal: BadMessage | None = None  # the message was refused: reported once the rest is carried out

    def send(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self.publish.append(Publish(topic, payload, qos, retain))

    def write(self, method: str, *args) -> None:
        self.store.append((method, args))

    def rows(self, method: str) -> list:
        """The first argument of every call of ``method`` (for tests and logs)."""
        return [args[0] for m, args in self.store if m == method]

    def sent(self, topic: str) -> list[bytes | str]:
        return [p.payload for p in self.publish if p.topic == topic]


@dataclass
class Tick:
    """What a tick decided under the service's lock, before a rate re-plan is planned outside it."""

    now: float
    placement: Placement | None
    control: ControlEffects
    planned_for_hz: float | None
    rate_request: HybridRequest | None
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


def plan_for_rate(request: HybridRequest) -> HybridPlan | None:
    """The hybrid plan for a new arrival rate, None when there is none (logged). Seconds on many nodes
    (docs/placement.md): the service runs it outside its lock."""
    try:
        return plan_hybrid(request)
    except (InfeasiblePlacement, ValueError) as exc:
        log.error("no hybrid plan for %.3g frames/s: %s", request.arrival_hz, exc)
        return None


class Coordinator:
    def __init__(self, settings: GatewaySettings, operator: Overrides, topics: Topics, fingerprint: str,
                 input_bytes: int, block_accuracy: AccuracyFit | None, issued_desired: dict[str, bytes],
                 open_requests: list[dict], now: float):
        self.settings = settings
        self.operator = operator
        self.topics = topics
        self.fingerprint = fingerprint
        self.slo = SloWindows(settings.window_s, operator.slo_s)
        rules = PlacementRules(settings.startup_wait_s, settings.rejoin_hold_s, settings.replan_min_gain)
        hybrid = (HybridTarget(settings.hybrid_arrival_hz, operator.slo_s,
                               whole_model=settings.placement_mode == "data")
                  if settings.placement_mode != "pipeline" else None)
        self.live = LivePlacement(rules, MODEL_NAME, fingerprint, settings.nodes, started=now,
                                  frame_megapixels=settings.frame_megapixels, input_bytes=input_bytes, hybrid=hybrid)
        self.handover = Handover(settings.prepare_timeout_s)
        self._recalibrations: dict[tuple[str, int], int] = {}  # (node, placement version) -> times asked
        self.control = ControlLoop(operator.controller_settings(), operator.slo_s, block_accuracy,
                                   follow_up_s=settings.window_s)
        self.control.automatic = operator.automatic
        self.guard = DesiredGuard(issued_desired)
        self.placement_guard = DesiredGuard()
        self.liveness = Liveness(settings.stats_silence_s)
        self.arrivals = ArrivalMeter(settings.rate_window_s, started=now)  # frames stage 1 accepted
        self.rate_trigger = RateTrigger(RateRules(settings.rate_window_s, settings.rate_band, settings.rate_dwell_s,
                                                  settings.rate_min_interval_s, settings.rate_floor_hz))
        self.ledger = RequestLedger()
        for row in open_requests:
            self.ledger.restore(row["request_id"], row["camera_id"], row["received_ts"], bool(row["stored"]),
                                row["reason"], row.get("node_id"))
        self._replaced = False  # the placement was last moved for slowdowns (move back once they are gone)
        self.redelivered_results = 0
        self._departures: deque[tuple[float, str]] = deque()  # (when, node) a node went offline or silent
        self._taken_over: set[str] = set()  # gone replicas whose session was taken over, until heard from again
        self._next_beacon = 0.0
        self._clock_suspects: set[str] = set()  # nodes whose clock offset is over the limit (logged once)
        self._out = Effects()  # what the entry point being run has decided so far

    def remember_offers(self, offers: list[NodeProfile]) -> None:
        """Profiles nodes offered before a restart, so the gateway can plan at once."""
        for offer in offers:
            self.live.set_offer(offer)

    # --- messages ------------------------------------------------------------------------------
    @_entry
    def on_result(self, result: Result, payload: bytes, now: float) -> None:
        """Count each accepted request once (gateway/accounting.py): QoS 1 may deliver a result twice, and the
        first delivery is the one kept; a result no stage 1 announced, or a different second one, is refused,
        unless it is the same frame served twice (a ``duplicates`` row).

        The SLO windows and the controller judge its latency to the last stage's finish (``e2e_s``); a window takes
        it when it arrives (``now``), since a window once closed takes no more."""
        row = {**result_row(result), "received_ts": now}
        verdict = self.ledger.result(result.request_id, result.camera_id, payload, result.capture_ts)
        if verdict is Verdict.REDELIVERED:
            self.redelivered_results += 1
            return
        if verdict is Verdict.DUPLICATE:  # served twice: counted in the accounting, not an error; the first stays
            self._out.write("add_duplicate", {"request_id": result.request_id, "ts": now,
                                              "node_id": result.hops[-1].node_id, "label": result.label,
                                              "confidence": result.confidence})
            return
        if verdict not in (Verdict.UNKNOWN, Verdict.CONFLICT):
            self.slo.add(now, row["e2e_s"], row["correct"])
            self.control.observe_latency(now, row["e2e_s"])
            self.control.observe_result(now, result)
            self._out.write("add_request", row)
            return
        why = ("no stage 1 accepted this request" if verdict is Verdict.UNKNOWN
               else "a different result for this request came first (or another camera's)")
        raise BadMessage(f"{verdict.value}_result", f"result for {result.request_id[:128]!r} from camera "
                         f"{result.camera_id} not stored: {why}")

    @_entry
    def on_accepted(self, accepted: AcceptedRequest, now: float) -> None:
        if self.ledger.accept(accepted.request_id, accepted.camera_id, now, accepted.node_id):
            self.arrivals.add(now)
            self.control.observe_arrival(now)
            self._out.write("add_accepted", accepted.model_dump())

    @_entry
    def on_thumbnail(self, node_id: str, request_id: str, jpeg: bytes, now: float) -> None:
        """Store a (checked: shared/thumbnail.py) thumbnail of a frame ``node_id`` itself accepted, once."""
        camera_id = self.ledger.thumbnail(request_id, node_id)
        if camera_id is None:
            raise BadMessage("unknown_thumbnail", f"thumbnail of {request_id[:128]!r} from {node_id} not stored: "
                             "that node accepted no such frame, or sent its thumbnail already")
        self._out.write("add_thumbnail", {"request_id": request_id, "camera_id": camera_id, "ts": now,
                                          "bytes": len(jpeg), "jpeg": jpeg})

    @_entry
    def on_status(self, node_id: str | None, status: str, now: float) -> None:
        if node_id is None or status not in STATUSES:
            raise BadMessage("bad_status", f"status {status[:40]!r} is not one of {', '.join(STATUSES)}")
        if status == AVAILABILITY_ONLINE:
            self.liveness.heard(node_id, now)
        else:
            self.liveness.gone(node_id)
            self._departed(node_id, now)
        self.live.set_status(node_id, status, now)
        self._out.write("update_node", {"node_id": node_id, "status": status, "status_ts": now})
        if status == AVAILABILITY_ONLINE:
            self._taken_over.discard(node_id)
        else:
            self._take_over(node_id)

    def _take_over(self, node_id: str) -> None:
        """A replica is gone (offline, or silent: hung but still connected): what its broker session held goes
        back to the stage (service: _hand_over), once per departure: a later ``offline`` (a will) starts no second
        takeover, which would cut the node off again if it had resumed meanwhile."""
        placement = self.live.current
        served = placement.stage_of(node_id) if placement else None
        if served is None or not served.replicated or node_id in self._taken_over:
            return
        self._taken_over.add(node_id)
        shared = self.topics.shared(served.stage, placement.share_token, placement.ingest_node is not None)
        self._out.drains.append((node_id, shared))

    @_entry
    def on_stats(self, stats: NodeStats, now: float) -> None:
        self._taken_over.discard(stats.node_id)
        if self.liveness.heard(stats.node_id, now):  # a hung node resumed: a (re)joining node again
            self.live.set_status(stats.node_id, AVAILABILITY_ONLINE, now)
            log.warning("%s speaks again after %.0f s of silence", stats.node_id, self.liveness.silence_s)
            self._out.write("update_node", {"node_id": stats.node_id, "status": AVAILABILITY_ONLINE,
                                            "status_ts": now})
        self.control.observe_stats(stats)
        ready = self.handover.prepared(stats.node_id, stats.prepared_version) if stats.prepared_version else None
        if ready is not None:
            self._activate(ready)
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
        unusable = self.live.set_offer(offer)
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
            measured = ", ".join(f"{r:g}:{t * 1e3:.2f}" for r, t in zip(calibration.ratios, calibration.latency_s))
            raise BadMessage("bad_calibration", f"calibration of {calibration.node_id} (ratio:ms {measured}): "
                             f"{exc}") from None
        if row is None:
            return
        self._out.write("add_calibration", row)
        r2 = max(row["r2_linear"], row["r2_quadratic"])
        if r2 < self.settings.recalibrate_below_r2:
            self._recalibrate(calibration.node_id, calibration.placement_version, r2)

    def _recalibrate(self, node_id: str, placement_version: int, r2: float) -> None:
        """A flat or noisy latency curve (measured while the host was busy) would make the controller predict that
        pruning this slice buys nothing: keep it, and ask the node to measure again, a bounded number of times."""
        key = (node_id, placement_version)
        asked = self._recalibrations.get(key, 0)
        if asked >= self.settings.recalibrate_attempts:
            return
        self._recalibrations[key] = asked + 1
        log.warning("%s: its slice's latency fit explains only R²=%.2f of the calibration (below %.2f): asking it to "
                    "calibrate again (%d of %d)", node_id, r2, self.settings.recalibrate_below_r2, asked + 1,
                    self.settings.recalibrate_attempts)
        self._out.send(self.topics.node_command(node_id), to_json(CalibrateCommand(cmd="calibrate")))

    @_entry
    def on_error(self, record: ErrorRecord) -> None:
        self._out.write("add_error", record.model_dump())
        # only a pipeline node (or this gateway) can end a frame: a camera's or the page's error is stored, never
        # turned into a frame's failure
        may_fail_frames = record.component in self.settings.nodes or record.component == self.settings.gateway_id
        if record.request_id and record.component in self.settings.nodes:
            self.ledger.held_by(record.request_id, record.component)
        if record.request_id and record.kind not in WARNING_KINDS and may_fail_frames:
            if self.ledger.fail(record.request_id, record.kind):
                self._out.write("add_failure", {"request_id": record.request_id, "ts": record.ts,
                                                "reason": record.kind, "component": record.component,
                                                "node_id": self.ledger.last_known(record.request_id)[1],
                                                "message": record.message})
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
        """The active placement, retained, so nodes that (re)connect later learn their stage at once; with the
        current SLO, which nodes order their queues by (docs/reliability.md)."""
        self._publish_placement()

    def _publish_placement(self) -> None:
        placement = self.handover.active
        if placement is not None:
            payload = to_json(placement.model_copy(update={"slo_s": self.operator.slo_s,
                                                           "thumbnails": self.settings.thumbnail_budget_mb > 0}))
            self.placement_guard.issue("placement", payload)
            self._out.send(self.topics.placement, payload, retain=True)

    @_entry
    def on_placement(self, payload: bytes, now: float) -> None:
        """Only this gateway places: anything else on the placement topic is reported and replaced."""
        current = self.handover.active
        if current is None or self.placement_guard.own("placement", payload):
            return  # not placing yet (a retained placement of a previous run stands), or our own echo
        try:  # the nodes ignore versions below what they saw: go above a forged one
            forged_version = Placement.model_validate_json(payload).version
        except ValueError:
            forged_version = -1
        if forged_version >= current.version:  # a pending placement would be ignored too: the planner proposes again
            corrected = current.model_copy(update={"version": forged_version + 1, "issued_at": now})
            self.live.current = self.handover.active = corrected
            self.handover.pending = None
            self._record_placement(corrected)  # a new version is published: `placements` keeps every one
        self._publish_placement()
        raise BadMessage("foreign_placement", f"placement not issued by this gateway, replaced: {payload[:200]!r}")

    @_entry
    def on_desired(self, node_id: str, payload: bytes, now: float) -> None:
        """Our retained desired states come back after a restart: continue their seq numbers."""
        if not self.guard.own(node_id, payload):
            self._overwrite_foreign_desired(node_id, payload, now)
            raise BadMessage("foreign_desired", f"desired prune state on {self.topics.node_prune_desired(node_id)} "
                             f"was not issued by this gateway and was overwritten: {payload[:200]!r}")
        self.control.recover_desired(node_id, parse_json(PruneDesired, payload))

    def _overwrite_foreign_desired(self, node_id: str, payload: bytes, now: float) -> None:
        """Only this gateway writes prune/set: re-issue its own state (unpruned if none) above the forged seq,
        since the node may already have applied the forgery and ignores lower sequence numbers."""
        try:
            forged_seq = PruneDesired.model_validate_json(payload).seq
        except ValueError:
            forged_seq = -1  # unreadable: the node rejected it too
        ours = self.guard.issued(node_id)
        base = PruneDesired.model_validate_json(ours) if ours else PruneDesired(ratio=0.0, seq=0, issued_at=0.0)
        corrected = base.model_copy(update={"seq": max(base.seq, forged_seq) + 1, "issued_at": now,
                                            "reason": "overwrote a desired state this gateway did not issue"})
        self.control.recover_desired(node_id, corrected)
        self._carry_out(ControlEffects(publish={node_id: corrected}))

    def _carry_out(self, effects: ControlEffects) -> None:
        """The control loop's decisions: retained desired states (remembered as our own) and prune_events rows."""
        for node_id, desired in effects.publish.items():
            payload = to_json(desired)
            self.guard.issue(node_id, payload)
            self._out.write("set_issued_desired", node_id, payload)
            self._out.send(self.topics.node_prune_desired(node_id), payload, retain=True)
        for row in effects.events:
            self._out.write("add_prune_event", row)

    # --- operator commands ------------------------------------------------------------------------
    @_entry
    def on_command(self, payload: bytes, now: float) -> None:
        """Obey an operator command and, when it carries an ``id``, answer on the reply topic either way."""
        answer_to = command_id(payload)
        try:
            command = parse_json(GatewayCommand, payload).root
            done = self._obey(command, now)
        except BadMessage as exc:
            self._reply(answer_to, False, str(exc), now)
            raise
        self._reply(answer_to, True, done, now)

    def _reply(self, answer_to: str | None, ok: bool, message: str, now: float) -> None:
        if answer_to is not None:
            reply = CommandReply(id=answer_to, ok=ok, message=message[:2000], ts=now)
            self._out.send(self.topics.component_reply(self.settings.gateway_id), to_json(reply))

    def _obey(self, command, now: float) -> str:
        """Carry out one command; returns what was done in words, raises BadMessage when it cannot be."""
        by = command.by or "mqtt"
        if isinstance(command, ManualPruneCommand):
            old = self.control.desired.get(command.node_id)
            try:
                effects = self.control.manual(now, command.node_id, command.ratio)
            except ValueError as exc:
                raise BadMessage("rejected_command", f"prune {command.node_id}: {exc}") from None
            self._carry_out(effects)
            action = "release" if command.ratio is None else "hold"
            self._log_action(now, by, action, command.node_id, old.ratio if old else None, command.ratio)
            return (f"{command.node_id} released to the controller" if command.ratio is None
                    else f"{command.node_id} held at ratio {command.ratio:g}")
        if isinstance(command, RetireCommand):
            self._retire(command.node_id, now)
            self._log_action(now, by, "retire", command.node_id, None, None)
            return f"{command.node_id} retired"
        if isinstance(command, SetSettingCommand):
            return self._change_setting(now, by, command.setting, command.value)
        if isinstance(command, RestoreAllCommand):
            old = {n: d.ratio for n, d in self.control.desired.items()}
            try:
                effects = self.control.restore_all(now)
            except ValueError as exc:
                raise BadMessage("rejected_command", f"restore all: {exc}") from None
            self._carry_out(effects)
            self._log_action(now, by, "restore_all", "*", old, {n: 0.0 for n in old})
            return "every node restored to ratio 0 and handed back to the controller"
        if isinstance(command, NodeSlowdownCommand):
            if not (command.node_id in self.live.allowed or command.node_id in self.control.desired):
                raise BadMessage("rejected_command", f"slowdown: unknown node {command.node_id!r}")
            forwarded = SlowdownCommand(cmd="slowdown", factor=command.factor)
            self._out.send(self.topics.node_command(command.node_id), to_json(forwarded))
            self._log_action(now, by, "slowdown", command.node_id, None, command.factor)
            return f"{command.node_id} told to emulate a {command.factor:g}x slower device"
        if isinstance(command, CameraCommand):
            row = command.model_dump(exclude={"cmd", "id", "by"})
            self._out.write("set_camera", {**row, "updated_ts": now})
            self._log_action(now, by, "camera", command.camera_id, None, row)
            return f"camera {command.camera_id} deployment saved"
        raise BadMessage("rejected_command", f"unsupported command {command.cmd!r}")

    def _retire(self, node_id: str, now: float) -> None:
        """Forget a node for good: clear every retained topic about it, so nothing replays for it."""
        placed = self.live.current and (self.live.current.stage_of(node_id)
                                         or self.live.current.ingest_node == node_id)
        if placed and node_id in self.live.eligible():
            raise BadMessage("rejected_command", f"retire {node_id}: it is online and in the placement; "
                             "stop it first")
        self.live.forget(node_id)
        self.control.forget(node_id)
        self.guard.forget(node_id)
        for topic in self.topics.node_topics(node_id):
            self._out.send(topic, b"", retain=True)
        self._out.write("update_node", {"node_id": node_id, "status": "retired", "status_ts": now})
        log.info("retired %s: its retained topics are cleared", node_id)

    def _change_setting(self, now: float, by: str, setting: str, value: float | str) -> str:
        try:
            old, new = self.operator.change(setting, value)
        except ValueError as exc:
            raise BadMessage("rejected_command", f"set {setting}: {exc}") from None
        effects = self.control.reconfigure(now, self.operator.controller_settings(), self.operator.slo_s,
                                           self.operator.automatic)
        self.slo.slo_s = self.operator.slo_s
        if self.live.hybrid is not None:  # the next hybrid plan (a node joins or leaves) is made for the new SLO
            self.live.hybrid = replace(self.live.hybrid, slo_s=self.operator.slo_s)
        self._carry_out(effects)
        if setting == "slo_s":
            self._publish_placement()  # the same version: nodes keep their stage and take the new deadlines
        self._out.write("set_operator_setting", setting, new, now, by)
        self._log_action(now, by, f"set {setting}", "gateway", old, new)
        return f"{LABELS[setting]}: {old} -> {new}"

    def _log_action(self, now: float, by: str, action: str, target: str, old, new) -> None:
        log.info("operator action by %s: %s %s: %r -> %r", by, action, target, old, new)
        self._out.write("add_operator_action", {"ts": now, "by": by, "action": action, "target": target,
                                                "old": old, "new": new})

    # --- periodic work ----------------------------------------------------------------------------
    def tick(self, now: float) -> Effects:
        """One whole tick (the service splits it: :meth:`begin_tick` under its lock, the rate re-plan's planning
        outside it, :meth:`end_tick` under it again)."""
        decided = self.begin_tick(now)
        plan = plan_for_rate(decided.rate_request) if decided.rate_request is not None else None
        return self.end_tick(decided, plan)

    def begin_tick(self, now: float) -> Tick:
        self._out = Effects()
        placement = self.live.tick(now)
        if placement is not None:
            self._place_controller(placement)
        effects = self.control.tick(now)
        if placement is None and (self.operator.move_blocks or self._replaced):  # switched off: still move back
            placement = self._replace_for_slowdowns(now, effects, self.operator.move_blocks)
        planned_for_hz = self.rate_trigger.planned_hz
        rate_request = (self._rate_replan_due(now) if self.settings.rate_replan != "off" and placement is None
                        else None)
        status = {**self.control.status(), "settings": self.operator.effective(),
                  "arrival": {"rate_hz": self.arrivals.rate(now), **self.rate_trigger.status(now)}}
        windows = self.slo.close_due(now)
        lost = self.ledger.expire(now, self.settings.result_timeout_s)
        silent = self.liveness.newly_silent(now)
        for node_id in silent:  # hung: stop sending it work now, not when the broker's will fires
            self._take_over(node_id)  # a hung replica's held input goes to the others, as a dead one's does
            self.live.set_status(node_id, AVAILABILITY_OFFLINE, now)
            self._departed(node_id, now)
        ready, ask = self.handover.propose(placement, now) if placement is not None else (None, [])
        overdue, late = self.handover.expire(now)
        out, self._out = self._out, Effects()
        return Tick(now, placement, effects, planned_for_hz, rate_request, status, windows, lost, silent, ready, ask,
                    overdue, late, out)

    def end_tick(self, tick: Tick, plan: HybridPlan | None) -> Effects:
        """The rest of a tick, given the rate re-plan's plan (None when none was due or none was found)."""
        self._out = tick.out
        now, placement, effects, ready, ask = tick.now, tick.placement, tick.control, tick.ready, tick.ask
        if tick.rate_request is not None:
            placement = self._replan_for_rate(now, tick.rate_request, plan, tick.planned_for_hz, effects)
            if placement is not None:
                ready, ask = self.handover.propose(placement, now)
        for node_id in tick.silent:
            log.warning("%s: no stats for %.0f s: treated as offline (hung?)", node_id, self.settings.stats_silence_s)
            self._out.write("update_node", {"node_id": node_id, "status": "silent", "status_ts": now})
        for request_id in tick.lost:
            self._out.write("add_failure", self._lost_row(request_id, now))
        for node_id in ask:
            self._out.send(self.topics.node_command(node_id), to_json(PrepareCommand(cmd="prepare",
                                                                                     placement=placement)))
        if tick.late:
            log.warning("placement v%d published although %s did not confirm its input subscription within %g s",
                        tick.overdue.version, ", ".join(tick.late), self.settings.prepare_timeout_s)
        if ready or tick.overdue:
            self._activate(ready or tick.overdue)
        self._carry_out(effects)
        self._out.write("set_controller_status", now, tick.status)
        for window in tick.windows:
            self._out.write("add_window", window.row())
        if now >= self._next_beacon:
            self._next_beacon = now + self.settings.clock_beacon_s
            self._out.send(self.topics.clock, to_json(ClockBeacon(gateway_id=self.settings.gateway_id, ts=now)),
                           qos=0)
        out, self._out = self._out, Effects()
        return out

    def _departed(self, node_id: str, now: float) -> None:
        """A node went offline or silent: frames lost meanwhile name it (kept for as long as a frame can be lost)."""
        self._departures.append((now, node_id))
        while self._departures and self._departures[0][0] < now - 2 * self.settings.result_timeout_s:
            self._departures.popleft()

    def _lost_row(self, request_id: str, now: float) -> dict:
        """A frame given up as lost, with where it was last known to be and which nodes left while it was in
        flight (the likely place it died: the gateway hears of a frame only from stage 1, a node's report or its
        result, not from every hop)."""
        accepted_ts, node_id = self.ledger.last_known(request_id)
        gone = sorted({n for ts, n in self._departures if accepted_ts is not None and ts >= accepted_ts})
        where = f"; last known at {node_id}" if node_id else ""
        left = f"; offline or silent while it was in flight: {', '.join(gone)}" if gone else ""
        return {"request_id": request_id, "ts": now, "reason": LOST, "component": self.settings.gateway_id,
                "node_id": node_id, "message": f"no result or failure report within "
                f"{self.settings.result_timeout_s:g} s{where}{left}"}

    @_entry
    def close(self) -> None:
        """The gateway stops: the open SLO windows are written."""
        for window in self.slo.close_all():
            self._out.write("add_window", window.row())

    def _activate(self, placement: Placement) -> None:
        """Publish a placement every node that needed a new input for it is subscribed for (or timed out)."""
        log.info("placement v%d: publishing", placement.version)
        self._publish_placement()
        self._record_placement(placement)

    def _record_placement(self, placement: Placement) -> None:
        self._out.write("add_placement", placement.model_dump(exclude={"share_token"}))  # a secret: not stored

    def _place_controller(self, placement: Placement) -> None:
        """The control loop follows a new placement; calibrations it could use only now are stored now."""
        for row in self.control.set_placement(placement, self.live.profiles()):
            self._out.write("add_calibration", row)

    def _replace_for_slowdowns(self, now: float, effects: ControlEffects, move: bool) -> Placement | None:
        """Re-partition when the controller reacted to a sustained violation (``move``: moves are on), and back
        when slowdowns are gone.

        Called under the lock. The move is logged as a ``replace`` row in ``prune_events``.
        """
        controller = self.control.controller
        if controller is None:  # paused, e.g. while the nodes calibrate the slices of the last move
            return None
        slowdowns = slowed_for_moves({n: controller.slowdown(n) for n in controller.nodes},
                                     controller.config.slowdown_gone)
        violated = move and any(e.get("kind") in ("set", "infeasible", "held") and "reason" in e
                                for e in effects.events)
        gone = all(k == 1.0 for k in slowdowns.values())
        if not (violated or (gone and self._replaced)):
            return None
        placement = self.live.replan_for_slowdowns(slowdowns if violated else {}, now)
        if placement is None:
            return None
        self._replaced = violated
        self._place_controller(placement)
        effects.events.append({"ts": now, "kind": "replace", "policy": "replace", "source": "auto",
                               "reason": f"placement v{placement.version}: " + ", ".join(
                                   f"{s.node_id}:{s.first_block}-{s.last_block}" for s in placement.stages),
                               "metrics": {"slowdowns": slowdowns}})
        return placement

    def _rate_replan_due(self, now: float) -> HybridRequest | None:
        """What to ask the hybrid planner when the arrival rate has changed for good (gateway/arrival.py); None
        when no re-plan is due."""
        if self.live.current is None:
            return None
        problem = self.live.eligible_problem()
        target = self.rate_trigger.observe(now, self.arrivals.rate(now)) if problem is not None else None
        if target is None:
            return None
        config, fit = self.control.settings, self.control.block_accuracy
        if fit is None or fit.n_stages != problem.n_blocks:  # no accuracy model: no pruning levels either
            return HybridRequest(problem, target, self.operator.slo_s)
        predict = fit.predictor(config.accuracy_model)
        return HybridRequest(problem, target, self.operator.slo_s,
                             levels_from_fits(config.ladder, self.control.fits, config.max_ratio),
                             predict, config.accuracy_floor_relative * predict([0.0] * problem.n_blocks))

    def _replan_for_rate(self, now: float, request: HybridRequest, plan: HybridPlan | None,
                         previous_hz: float | None, effects: ControlEffects) -> Placement | None:
        """Log the plan for the new rate; with ``rate_replan = "apply"`` also adopt it when a placement can run it.

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
        elif one_pipeline(plan) is None:
            outcome = "not published: a placement cannot run parallel pipelines (one set of stage topics)"
        else:
            placement = self.live.adopt_hybrid(plan, now, f"arrival rate {target:.3g}/s")
            if placement is not None:
                self._place_controller(placement)
            outcome = (f"published as placement v{placement.version}" if placement
                       else "nothing moved (the placement already runs it, or one of its nodes left meanwhile)")
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
