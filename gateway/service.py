"""The gateway: publishes the placement, collects results and node health, keeps the SQLite log.

Transport, storage and start-up I/O only; decisions live in pure modules this class feeds: the SLO
windows (:mod:`gateway.slo`), the live placement (:mod:`gateway.live_placement`, which plans with
:mod:`gateway.placement`) and the pruning controller (:mod:`gateway.control_loop`). Three threads:
paho's network thread runs the handlers (parse, feed, buffer), the tick thread makes the periodic
decisions, and the store's writer thread alone touches the disk (and, after each write, acknowledges to the
broker the messages whose rows it wrote: docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

from gateway.accounting import LOST, WARNING_KINDS, DesiredGuard, RequestLedger, Verdict
from gateway.arrival import ArrivalMeter, RateRules, RateTrigger, levels_from_fits
from gateway.control_loop import ControlLoop, Effects, LadderMismatch
from gateway.curves import AccuracyFit
from gateway.hybrid import HybridRequest, plan_hybrid
from gateway.live_placement import Handover, HybridTarget, LivePlacement, PlacementRules, one_pipeline
from gateway.liveness import Liveness
from gateway.operator import LABELS, Overrides
from gateway.placement import InfeasiblePlacement
from gateway.retention import DiskMode, cutoffs, disk_mode, disk_mode_message
from gateway.slo import SloWindows
from gateway.store import Store
from shared.bus import Bus, drain_session
from shared.clock import offset_suspect
from shared.imaging import model_input_bytes
from shared.model import MODEL_NAME, accuracy_model_beside, build_model, model_fingerprint
from shared.schemas import (
    INGEST_STAGE,
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
from shared.settings import ControllerSettings, GatewaySettings, MqttSettings
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics

log = logging.getLogger(__name__)
STATUSES = (AVAILABILITY_ONLINE, AVAILABILITY_OFFLINE, AVAILABILITY_STOPPED)
MAX_TICK_BACKOFF_S = 30.0


def load_block_accuracy(path: Path | None, fingerprint: str, checkpoint: Path | None = None) -> AccuracyFit | None:
    """The per-block accuracy model, if one exists for these weights (None disables the controller).

    Default: the one `edgeprune calibrate` wrote beside ``checkpoint`` (the shipped one if None).
    """
    path = path or accuracy_model_beside(checkpoint)
    if not path.exists():
        log.warning("no accuracy model at %s: the pruning controller stays off until `edgeprune calibrate`", path)
        return None
    data = json.loads(path.read_text())
    if data.get("model_fingerprint") not in (None, fingerprint):
        log.warning("accuracy model %s was calibrated for other weights (%s, running %s): controller off",
                    path, data.get("model_fingerprint"), fingerprint)
        return None
    return AccuracyFit.from_dict(data["fit"])


def result_row(result: Result, finish_ts: float) -> dict:
    """One `requests` row: where the time of a request went."""
    e2e = finish_ts - result.capture_ts
    queue_s = sum(h.queue_s for h in result.hops)
    compute_s = sum(h.compute_s for h in result.hops)
    decode_s = sum(h.decode_s for h in result.hops)
    return {
        "request_id": result.request_id, "camera_id": result.camera_id, "capture_ts": result.capture_ts,
        "finish_ts": finish_ts, "e2e_s": e2e, "queue_s": queue_s, "compute_s": compute_s, "decode_s": decode_s,
        "transfer_s": e2e - queue_s - decode_s - compute_s, "label": result.label, "label_index": result.label_index,
        "scientific_name": result.scientific_name, "confidence": result.confidence, "prune_ratios": [h.prune_ratio for h in result.hops
                                                                   if h.stage != INGEST_STAGE],
        "hops": [h.model_dump() for h in result.hops], "true_label": result.true_label,
        "late": int(any(h.deferred for h in result.hops)),
        "correct": None if result.true_label is None else int(result.label_index == result.true_label),
    }


def _command_id(payload: bytes) -> str | None:
    """The ``id`` of a command, read leniently so even a command that fails validation gets its answer."""
    try:
        value = json.loads(payload.decode("utf-8")).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


class Gateway:
    def __init__(self, settings: GatewaySettings, mqtt_settings: MqttSettings,
                 controller_settings: ControllerSettings | None = None):
        self.settings = settings
        self.topics = Topics(mqtt_settings.topic_root)
        self.bus = Bus(mqtt_settings, settings.gateway_id, self.topics.component_status(settings.gateway_id))
        self.store = Store(settings.db_path, max_pending=settings.max_pending_rows)
        self.operator = Overrides(settings, controller_settings or ControllerSettings(), self.store.operator_settings())
        self.slo = SloWindows(settings.window_s, self.operator.slo_s)
        rules = PlacementRules(settings.startup_wait_s, settings.rejoin_hold_s, settings.replan_min_gain)
        model = build_model(settings.checkpoint)
        self.fingerprint = model_fingerprint(model)
        hybrid = (HybridTarget(settings.hybrid_arrival_hz, self.operator.slo_s,
                               whole_model=settings.placement_mode == "data")
                  if settings.placement_mode != "pipeline" else None)
        self.live = LivePlacement(rules, MODEL_NAME, self.fingerprint, settings.nodes, started=time.time(),
                                  frame_megapixels=settings.frame_megapixels,
                                  input_bytes=model_input_bytes(model.config.input_size), hybrid=hybrid)
        self.handover = Handover(settings.prepare_timeout_s)
        self._recalibrations: dict[tuple[str, int], int] = {}  # (node, placement version) -> times asked
        self.mqtt_settings = mqtt_settings
        self.control = ControlLoop(self.operator.controller_settings(), self.operator.slo_s,
                                   load_block_accuracy(settings.accuracy_model, self.fingerprint, settings.checkpoint),
                                   follow_up_s=settings.window_s)
        self.control.automatic = self.operator.automatic
        self.guard = DesiredGuard(self.store.issued_desired())
        self.placement_guard = DesiredGuard()
        self.liveness = Liveness(settings.stats_silence_s)
        self.arrivals = ArrivalMeter(settings.rate_window_s, started=time.time())  # frames stage 1 accepted
        self.rate_trigger = RateTrigger(RateRules(settings.rate_window_s, settings.rate_band, settings.rate_dwell_s,
                                                  settings.rate_min_interval_s, settings.rate_floor_hz))
        self.ledger = RequestLedger()
        for row in self.store.open_requests(time.time() - max(10 * settings.result_timeout_s, 3600.0)):
            self.ledger.restore(row["request_id"], row["camera_id"], row["received_ts"], bool(row["stored"]),
                                row["reason"])
        self._lock = threading.Lock()  # guards the SLO windows, live placement, the control loop and the ledger
        self._replaced = False  # the placement was last moved for slowdowns (move back once they are gone)
        self.redelivered_results = 0
        self.tick_failures = 0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="gateway-tick", daemon=True)
        self._next_beacon = 0.0
        self._clock_suspects: set[str] = set()  # nodes whose clock offset is over the limit (logged once)

    def start(self) -> None:
        self.bus.subscribe(self.topics.accepted_filter, self._on_accepted, qos=1)
        self.bus.subscribe(self.topics.results_filter, self._on_result, qos=1, data=True)
        self.bus.subscribe(self.topics.node_status_filter, self._on_status, qos=1)
        self.bus.subscribe(self.topics.node_stats_filter, self._on_stats, qos=0)
        self.bus.subscribe(self.topics.errors_filter, self._on_error, qos=1)
        self.bus.subscribe(self.topics.node_profile_filter, self._on_profile, qos=1)
        self.bus.subscribe(self.topics.node_calibration_filter, self._on_calibration, qos=1)
        self.bus.subscribe(self.topics.node_prune_desired_filter, self._on_own_desired, qos=1)
        self.bus.subscribe(self.topics.component_command(self.settings.gateway_id), self._on_command, qos=1)
        self.bus.subscribe(self.topics.placement, self._on_own_placement, qos=1)
        self.bus.on_connected = self.publish_placement
        for offer_json in self.store.stored_offers(self.fingerprint):
            self.live.set_offer(NodeProfile.model_validate_json(offer_json))
        self.store.add_run({"started_ts": time.time(), "gateway_id": self.settings.gateway_id,
                            "slo_s": self.operator.slo_s, "window_s": self.settings.window_s,
                            "nodes": self.settings.nodes, "max_clock_offset_s": self.settings.max_clock_offset_s})
        self._ticker.start()
        self.store.start_writer(self.settings.flush_interval_s, self._on_store_failure, self.maintain,
                                self.settings.maintenance_interval_s)
        self.bus.acknowledge_after(self.store.after_commit)  # a SIGKILL loses no received message (docs/reliability.md)
        self.bus.start()

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=5)
        for window in self.slo.close_all():
            self.store.add_window(window.row())
        self.store.close()  # the last write acknowledges its messages while still connected; later ones come again
        self.bus.stop()

    def publish_placement(self) -> None:
        """Retained, so nodes that (re)connect later learn their stage at once; with the current SLO, which nodes
        order their queues by (docs/reliability.md), so an operator's change of it re-publishes the placement."""
        with self._lock:
            placement = self.handover.active
            payload = (to_json(placement.model_copy(update={"slo_s": self.operator.slo_s}))
                       if placement is not None else None)
            if payload is not None:
                self.placement_guard.issue("placement", payload)
        if payload is not None:
            self.bus.publish(self.topics.placement, payload, qos=1, retain=True)

    def _on_own_placement(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Only this gateway places: anything else on the placement topic is reported and replaced."""
        with self._lock:
            current = self.handover.active
            if current is None or self.placement_guard.own("placement", payload):
                return  # not placing yet (a retained placement of a previous run stands), or our own echo
            try:  # the nodes ignore versions below what they saw: go above a forged one
                forged_version = Placement.model_validate_json(payload).version
            except ValueError:
                forged_version = -1
            if forged_version >= current.version:  # a pending placement would be ignored too: the planner proposes again
                self.live.current = self.handover.active = current.model_copy(update={"version": forged_version + 1})
                self.handover.pending = None
        self.publish_placement()
        raise BadMessage("foreign_placement", f"placement not issued by this gateway, replaced: {payload[:200]!r}")

    # --- handlers (paho's network thread: parse, buffer, return) ---------------------------
    def _on_result(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Count each accepted request once (gateway/accounting.py): QoS 1 may deliver a result twice, and the
        first delivery is the one kept; a result no stage 1 announced, or a different second one, is refused."""
        finish_ts = time.time()
        result = parse_json(Result, payload)
        self._check_speaker(topic, result.hops[-1].node_id if result.hops else None, "result's last hop")
        row = result_row(result, finish_ts)
        with self._lock:
            verdict = self.ledger.result(result.request_id, result.camera_id, payload)
            if verdict is Verdict.REDELIVERED:
                self.redelivered_results += 1
                return
            if verdict not in (Verdict.UNKNOWN, Verdict.CONFLICT):
                self.slo.add(finish_ts, row["e2e_s"], row["correct"])
                self.control.observe_latency(finish_ts, row["e2e_s"])
                self.control.observe_result(finish_ts, result)
                self.store.add_request(row)  # under the lock: a window row is never buffered before its requests
                return
        why = ("no stage 1 accepted this request" if verdict is Verdict.UNKNOWN
               else "a different result for this request came first (or another camera's)")
        raise BadMessage(f"{verdict.value}_result", f"result for {result.request_id[:128]!r} from camera "
                         f"{result.camera_id} not stored: {why}")

    def _on_accepted(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        accepted = parse_json(AcceptedRequest, payload)
        self._check_speaker(topic, accepted.node_id, "announcement's node_id")
        now = time.time()
        with self._lock:
            new = self.ledger.accept(accepted.request_id, accepted.camera_id, now)
            if new:
                self.arrivals.add(now)
                self.control.observe_arrival(now)
        if new:
            self.store.add_accepted(accepted.model_dump())

    def _on_status(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:  # cleared when the node was retired
            return
        node_id = self.topics.node_id_from_topic(topic)
        status = payload.decode("utf-8", "replace")
        if node_id is None or status not in STATUSES:
            raise BadMessage("bad_status", f"status {status[:40]!r} is not one of {', '.join(STATUSES)}")
        now = time.time()
        with self._lock:
            if status == AVAILABILITY_ONLINE:
                self.liveness.heard(node_id, now)
            else:
                self.liveness.gone(node_id)
            self.live.set_status(node_id, status, now)
            placement = self.live.current
            served = placement.stage_of(node_id) if placement else None
        self.store.update_node({"node_id": node_id, "status": status, "status_ts": now})
        if status != AVAILABILITY_ONLINE and served is not None and served.replicated:
            shared = self.topics.shared(served.stage, placement.share_token, placement.ingest_node is not None)
            threading.Thread(target=self._hand_over, args=(node_id, shared), name=f"drain-{node_id}",
                             daemon=True).start()

    def _hand_over(self, node_id: str, shared: str) -> None:
        """A replica is gone: what its broker session held goes back to the stage, and it leaves the group.

        The replica acknowledges its input only once served, so everything it had not finished is still in
        its session, which Mosquitto would keep feeding a share of new input (docs/scaling.md). Taking the
        session over ends it and returns the held messages; re-published on their own topics they reach the
        surviving replicas (or whichever node the new placement gives the stage). A node killed between
        publishing an output and acknowledging its input is served twice; the ledger counts the first result.
        """
        try:
            held = drain_session(self.mqtt_settings, node_id, [shared])
        except ConnectionError as exc:
            log.error("could not take over %s's session: %s", node_id, exc)
            self.store.add_error({"ts": time.time(), "component": self.settings.gateway_id, "topic": "",
                                  "kind": "replica_drain_failed", "message": str(exc), "request_id": None})
            return
        for topic, payload, user in held:
            self.bus.publish(topic, payload, qos=1, user=user or None)
        message = (f"replica {node_id} ({shared}) is gone: {len(held)} messages its session held were "
                   "re-published to its stage, and its session ended")
        (log.warning if held else log.info)("%s", message)
        self.store.add_error({"ts": time.time(), "component": self.settings.gateway_id, "topic": shared,
                              "kind": "replica_handover", "message": message, "request_id": None})

    def _on_profile(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:  # a retired node's cleared profile
            return
        offer = parse_json(NodeProfile, payload)
        if offer.node_id != self.topics.node_id_from_topic(topic):
            raise BadMessage("bad_schema", f"profile of {offer.node_id} published on {topic}")
        with self._lock:
            unusable = self.live.set_offer(offer)
        if unusable:
            raise BadMessage("model_mismatch", unusable)
        self.store.add_profile({"node_id": offer.node_id, "model_fingerprint": offer.model_fingerprint,
                                "ts": time.time(), "memory_mb": offer.memory_mb,
                                "uplink_mbit_s": offer.uplink_mbit_s, "profile": payload.decode()})

    def _on_stats(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        stats = parse_json(NodeStats, payload)
        now = time.time()
        with self._lock:
            if self.liveness.heard(stats.node_id, now):  # a hung node resumed: a (re)joining node again
                self.live.set_status(stats.node_id, AVAILABILITY_ONLINE, now)
                log.warning("%s speaks again after %.0f s of silence", stats.node_id, self.liveness.silence_s)
                self.store.update_node({"node_id": stats.node_id, "status": AVAILABILITY_ONLINE, "status_ts": now})
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
        self.store.update_node({**stats.model_dump(exclude={"ts", "prepared_version"}), "last_seen": stats.ts})

    def _place_controller(self, placement: Placement) -> None:
        """The control loop follows a new placement; calibrations it could use only now are stored now."""
        for row in self.control.set_placement(placement, self.live.profiles()):
            self.store.add_calibration(row)

    def _on_calibration(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:
            return
        calibration = parse_json(SliceCalibration, payload)
        try:
            with self._lock:
                row = self.control.add_calibration(calibration)
        except LadderMismatch as exc:
            raise BadMessage("ladder_mismatch", f"calibration of {calibration.node_id} refused: {exc}") from None
        except ValueError as exc:  # a curve that cannot be fitted (e.g. latencies that are all noise)
            measured = ", ".join(f"{r:g}:{t * 1e3:.2f}" for r, t in zip(calibration.ratios, calibration.latency_s))
            raise BadMessage("bad_calibration", f"calibration of {calibration.node_id} (ratio:ms {measured}): "
                             f"{exc}") from None
        if row is None:
            return
        self.store.add_calibration(row)
        r2 = max(row["r2_linear"], row["r2_quadratic"])
        if r2 < self.settings.recalibrate_below_r2:
            self._recalibrate(calibration.node_id, calibration.placement_version, r2)

    def _recalibrate(self, node_id: str, placement_version: int, r2: float) -> None:
        """A flat or noisy latency curve (measured while the host was busy) would make the controller predict that
        pruning this slice buys nothing: keep it, and ask the node to measure again, a bounded number of times."""
        key = (node_id, placement_version)
        with self._lock:
            asked = self._recalibrations.get(key, 0)
            if asked >= self.settings.recalibrate_attempts:
                return
            self._recalibrations[key] = asked + 1
        log.warning("%s: its slice's latency fit explains only R²=%.2f of the calibration (below %.2f): asking it to "
                    "calibrate again (%d of %d)", node_id, r2, self.settings.recalibrate_below_r2, asked + 1,
                    self.settings.recalibrate_attempts)
        self.bus.publish(self.topics.node_command(node_id), to_json(CalibrateCommand(cmd="calibrate")), qos=1)

    def _on_own_desired(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Our retained desired states come back after a restart: continue their seq numbers."""
        node_id = self.topics.node_id_from_topic(topic)
        if not payload or not node_id:
            return
        with self._lock:
            own = self.guard.own(node_id, payload)
        if not own:
            self._overwrite_foreign_desired(node_id, payload)
            raise BadMessage("foreign_desired", f"desired prune state on {topic} was not issued by this gateway "
                             f"and was overwritten: {payload[:200]!r}")
        desired = parse_json(PruneDesired, payload)
        with self._lock:
            self.control.recover_desired(node_id, desired)

    def _overwrite_foreign_desired(self, node_id: str, payload: bytes) -> None:
        """Only this gateway writes prune/set: re-issue its own state (unpruned if none) above the forged seq,
        since the node may already have applied the forgery and ignores lower sequence numbers."""
        try:
            forged_seq = PruneDesired.model_validate_json(payload).seq
        except ValueError:
            forged_seq = -1  # unreadable: the node rejected it too
        with self._lock:
            ours = self.guard.issued(node_id)
        base = PruneDesired.model_validate_json(ours) if ours else PruneDesired(ratio=0.0, seq=0, issued_at=0.0)
        corrected = base.model_copy(update={"seq": max(base.seq, forged_seq) + 1, "issued_at": time.time(),
                                            "reason": "overwrote a desired state this gateway did not issue"})
        with self._lock:
            self.control.recover_desired(node_id, corrected)
        self._carry_out(Effects(publish={node_id: corrected}))

    def _on_command(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Obey an operator command and, when it carries an ``id``, answer on the reply topic either way."""
        command_id = _command_id(payload)
        try:
            command = parse_json(GatewayCommand, payload).root
            done = self._obey(command, time.time())
        except BadMessage as exc:
            self._reply(command_id, False, str(exc))
            raise
        self._reply(command_id, True, done)

    def _obey(self, command, now: float) -> str:
        """Carry out one command; returns what was done in words, raises BadMessage when it cannot be."""
        by = command.by or "mqtt"
        if isinstance(command, ManualPruneCommand):
            with self._lock:
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
            self.retire(command.node_id)
            self._log_action(now, by, "retire", command.node_id, None, None)
            return f"{command.node_id} retired"
        if isinstance(command, SetSettingCommand):
            return self._change_setting(now, by, command.setting, command.value)
        if isinstance(command, RestoreAllCommand):
            with self._lock:
                old = {n: d.ratio for n, d in self.control.desired.items()}
                try:
                    effects = self.control.restore_all(now)
                except ValueError as exc:
                    raise BadMessage("rejected_command", f"restore all: {exc}") from None
            self._carry_out(effects)
            self._log_action(now, by, "restore_all", "*", old, {n: 0.0 for n in old})
            return "every node restored to ratio 0 and handed back to the controller"
        if isinstance(command, NodeSlowdownCommand):
            with self._lock:
                known = command.node_id in self.live.allowed or command.node_id in self.control.desired
            if not known:
                raise BadMessage("rejected_command", f"slowdown: unknown node {command.node_id!r}")
            forwarded = SlowdownCommand(cmd="slowdown", factor=command.factor)
            self.bus.publish(self.topics.node_command(command.node_id), to_json(forwarded), qos=1)
            self._log_action(now, by, "slowdown", command.node_id, None, command.factor)
            return f"{command.node_id} told to emulate a {command.factor:g}x slower device"
        if isinstance(command, CameraCommand):
            row = command.model_dump(exclude={"cmd", "id", "by"})
            self.store.set_camera({**row, "updated_ts": now})
            self._log_action(now, by, "camera", command.camera_id, None, row)
            return f"camera {command.camera_id} deployment saved"
        raise BadMessage("rejected_command", f"unsupported command {command.cmd!r}")

    def _change_setting(self, now: float, by: str, setting: str, value: float | str) -> str:
        with self._lock:
            try:
                old, new = self.operator.change(setting, value)
            except ValueError as exc:
                raise BadMessage("rejected_command", f"set {setting}: {exc}") from None
            effects = self.control.reconfigure(now, self.operator.controller_settings(), self.operator.slo_s,
                                               self.operator.automatic)
            self.slo.slo_s = self.operator.slo_s
        self._carry_out(effects)
        if setting == "slo_s":
            self.publish_placement()  # the same version: nodes keep their stage and take the new deadlines
        self.store.set_operator_setting(setting, new, now, by)
        self._log_action(now, by, f"set {setting}", "gateway", old, new)
        return f"{LABELS[setting]}: {old} -> {new}"

    def _log_action(self, now: float, by: str, action: str, target: str, old, new) -> None:
        log.info("operator action by %s: %s %s: %r -> %r", by, action, target, old, new)
        self.store.add_operator_action({"ts": now, "by": by, "action": action, "target": target,
                                        "old": old, "new": new})

    def _reply(self, command_id: str | None, ok: bool, message: str) -> None:
        if command_id is not None:
            reply = CommandReply(id=command_id, ok=ok, message=message[:2000], ts=time.time())
            self.bus.publish(self.topics.component_reply(self.settings.gateway_id), to_json(reply), qos=1)

    def retire(self, node_id: str) -> None:
        """Forget a node for good: clear every retained topic about it, so nothing replays for it."""
        with self._lock:
            placed = self.live.current and (self.live.current.stage_of(node_id)
                                             or self.live.current.ingest_node == node_id)
            if placed and node_id in self.live.eligible():
                raise BadMessage("rejected_command", f"retire {node_id}: it is online and in the placement; "
                                 "stop it first")
            self.live.forget(node_id)
            self.control.forget(node_id)
            self.guard.forget(node_id)
        for topic in self.topics.node_topics(node_id):
            self.bus.publish(topic, b"", qos=1, retain=True)
        self.store.update_node({"node_id": node_id, "status": "retired", "status_ts": time.time()})
        log.info("retired %s: its retained topics are cleared", node_id)

    def _replace_for_slowdowns(self, now: float, effects: Effects) -> Placement | None:
        """Re-partition when the controller reacted to a sustained violation, and back when slowdowns are gone.

        Called under the lock. The move is logged as a ``replace`` row in ``prune_events``.
        """
        controller = self.control.controller
        if controller is None:  # paused, e.g. while the nodes calibrate the slices of the last move
            return None
        # a node counts as slowed for a move only beyond slowdown_gone, as for the controller: below it, the noise of
        # a loaded host (estimates of 1.2-2x) re-planned blocks back and forth before any slowdown began
        slowdowns = {n: k if k > controller.config.slowdown_gone else 1.0
                     for n in controller.nodes for k in [controller.slowdown(n)]}
        violated = any(e.get("kind") in ("set", "infeasible", "held") and "reason" in e for e in effects.events)
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
        when no re-plan is due. Called under the lock; the planning itself runs outside it (:meth:`_replan_for_rate`).
        """
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

    def _replan_for_rate(self, now: float, request: HybridRequest, previous_hz: float | None,
                         effects: Effects) -> Placement | None:
        """Plan for the new rate and log it; with ``rate_replan = "apply"`` also adopt it when a placement can run it.

        For one pipeline the best cuts do not depend on the rate; what does is how much to prune up front, and
        whether parallel pipelines or replicated stages are needed. The plan is logged as a ``rate_replan`` row in
        ``prune_events`` (its kind, replicas, ratios, sustainable rate, predicted accuracy). The planner runs
        outside the lock: on many nodes it takes seconds (docs/placement.md), and results keep being stored.
        """
        target = request.arrival_hz
        try:
            plan = plan_hybrid(request)
        except (InfeasiblePlacement, ValueError) as exc:
            log.error("no hybrid plan for %.3g frames/s: %s", target, exc)
            plan = None
        placement = None
        if plan is None:
            outcome = "no plan (see the log)"
        elif self.settings.rate_replan == "log":
            outcome = "logged only ([gateway] rate_replan = log)"
        elif one_pipeline(plan) is None:
            outcome = "not published: a placement cannot run parallel pipelines (one set of stage topics)"
        else:
            with self._lock:
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

    def _carry_out(self, effects: Effects) -> None:
        for node_id, desired in effects.publish.items():
            payload = to_json(desired)
            with self._lock:
                self.guard.issue(node_id, payload)
            self.store.set_issued_desired(node_id, payload)
            self.bus.publish(self.topics.node_prune_desired(node_id), payload, qos=1, retain=True)
        for row in effects.events:
            self.store.add_prune_event(row)

    def _check_speaker(self, topic: str, claimed: str | None, what: str) -> None:
        """A payload speaks only for the device its topic names, which the broker's ACL ties to the login: a node
        announcing frames or publishing results in another node's name is refused (docs/security.md)."""
        publisher = self.topics.publisher(topic)
        if publisher is None or claimed != publisher:
            raise BadMessage("identity_mismatch", f"{topic}: the {what} is {str(claimed)[:64]!r}, not the publisher "
                             f"{publisher!r} the topic names; not stored")

    def _on_error(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        record = parse_json(ErrorRecord, payload)
        self._check_speaker(topic, record.component, "error record's component")
        self.store.add_error(record.model_dump())
        # only a pipeline node (or this gateway) can end a frame: a camera's or the page's error is stored, never
        # turned into a frame's failure
        may_fail_frames = record.component in self.settings.nodes or record.component == self.settings.gateway_id
        if record.request_id and record.kind not in WARNING_KINDS and may_fail_frames:
            with self._lock:
                ended = self.ledger.fail(record.request_id, record.kind)
            if ended:
                self.store.add_failure({"request_id": record.request_id, "ts": record.ts, "reason": record.kind,
                                        "component": record.component, "message": record.message})
        if record.kind == "retained_data" and self.topics.is_data_topic(record.topic):
            self.bus.publish(record.topic, b"", qos=1, retain=True)  # reported; now stop its replays
            log.warning("cleared a retained message on %s", record.topic)

    def _on_store_failure(self, exc: Exception) -> None:
        """The writer thread could not write: say so on the error topic (it retries by itself)."""
        self.bus.report_error(f"database {self.store.path}", "store_write_failed",
                              f"{type(exc).__name__}: {exc} ({self.store.write_failures} failures, "
                              f"dropped so far: {dict(self.store.dropped) or 'none'})")

    # --- periodic work ------------------------------------------------------------------------
    def _tick_forever(self) -> None:
        """Tick until stopped; a failing tick is logged, counted and reported, then retried with back-off."""
        delay = self.settings.flush_interval_s
        while not self._stop.wait(delay):
            try:
                self.tick(time.time())
                delay = self.settings.flush_interval_s
            except Exception as exc:  # a bug or a broken publish must not stop placement and control for good
                self.tick_failures += 1
                delay = min(MAX_TICK_BACKOFF_S, 2 * delay)
                log.exception("gateway tick failed (%d so far); retrying in %.1f s", self.tick_failures, delay)
                self.bus.report_error("periodic tick", "tick_failed",
                                      f"{type(exc).__name__}: {exc}")

    def tick(self, now: float) -> None:
        with self._lock:
            placement = self.live.tick(now)
            if placement is not None:
                self._place_controller(placement)
            effects = self.control.tick(now)
            if self.settings.replace_on_violation and placement is None:
                placement = self._replace_for_slowdowns(now, effects)
            planned_for_hz = self.rate_trigger.planned_hz
            rate_request = (self._rate_replan_due(now) if self.settings.rate_replan != "off" and placement is None
                            else None)
            status = {**self.control.status(), "settings": self.operator.effective(),
                      "arrival": {"rate_hz": self.arrivals.rate(now), **self.rate_trigger.status(now)}}
            windows = self.slo.close_due(now)
            lost = self.ledger.expire(now, self.settings.result_timeout_s)
            silent = self.liveness.newly_silent(now)
            for node_id in silent:  # hung: stop sending it work now, not when the broker's will fires
                self.live.set_status(node_id, AVAILABILITY_OFFLINE, now)
            ready, ask = self.handover.propose(placement, now) if placement is not None else (None, [])
            overdue, late = self.handover.expire(now)
        if rate_request is not None:
            placement = self._replan_for_rate(now, rate_request, planned_for_hz, effects)
            if placement is not None:
                with self._lock:
                    ready, ask = self.handover.propose(placement, now)
        for node_id in silent:
            log.warning("%s: no stats for %.0f s: treated as offline (hung?)", node_id, self.settings.stats_silence_s)
            self.store.update_node({"node_id": node_id, "status": "silent", "status_ts": now})
        for request_id in lost:
            self.store.add_failure({"request_id": request_id, "ts": now, "reason": LOST, "component": "gateway",
                                    "message": "no result or failure report within "
                                               f"{self.settings.result_timeout_s:g} s"})
        for node_id in ask:
            prepare = PrepareCommand(cmd="prepare", placement=placement)
            self.bus.publish(self.topics.node_command(node_id), to_json(prepare), qos=1)
        if late:
            log.warning("placement v%d published although %s did not confirm its input subscription within %g s",
                        overdue.version, ", ".join(late), self.settings.prepare_timeout_s)
        if ready or overdue:
            self._activate(ready or overdue)
        self._carry_out(effects)
        self.store.set_controller_status(now, status)
        for window in windows:
            self.store.add_window(window.row())
        if now >= self._next_beacon:
            self._next_beacon = now + self.settings.clock_beacon_s
            self.bus.publish(self.topics.clock, to_json(ClockBeacon(gateway_id=self.settings.gateway_id,
                                                                    ts=time.time())), qos=0)

    def _activate(self, placement: Placement) -> None:
        """Publish a placement every node that needed a new input for it is subscribed for (or timed out)."""
        log.info("placement v%d: publishing", placement.version)
        self.publish_placement()
        self.store.add_placement(placement.model_dump(exclude={"share_token"}))  # a secret: not stored

    def maintain(self, now: float) -> None:
        """Bound the database: delete expired rows, truncate the WAL, shed stored detail when the disk fills.

        Runs in the store's writer thread (see :meth:`start`), the only thread that writes to the file.
        """
        free_mb = shutil.disk_usage(self.settings.db_path.resolve().parent).free / 2**20
        mode = disk_mode(free_mb, self.settings.min_free_mb)
        if mode is not self.store.disk_mode:
            message = disk_mode_message(mode, free_mb, self.settings.min_free_mb)
            (log.info if mode is DiskMode.NORMAL else log.error)("%s", message)
            self.store.add_error({"ts": now, "component": self.settings.gateway_id, "topic": "",
                                  "kind": "disk_space", "message": message, "request_id": None})
            self.store.disk_mode = mode
        self.store.flush()
        deleted = self.store.delete_older(cutoffs(self.settings.keep_days, now))
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items() if n))
        self.store.checkpoint()
