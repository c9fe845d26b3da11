"""The gateway: publishes the placement, collects results and node health, keeps the SQLite log.

Transport, storage and start-up I/O only; decisions live in pure modules this class feeds: the SLO
windows (:mod:`gateway.slo`), the live placement (:mod:`gateway.live_placement`, which plans with
:mod:`gateway.placement`) and the pruning controller (:mod:`gateway.control_loop`). Three threads:
paho's network thread runs the handlers (parse, feed, buffer), the tick thread makes the periodic
decisions, and the store's writer thread alone touches the disk.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from gateway.control_loop import ControlLoop, Effects, LadderMismatch
from gateway.curves import AccuracyFit
from gateway.live_placement import LivePlacement, PlacementRules
from gateway.operator import LABELS, Overrides
from gateway.slo import SloWindows
from gateway.store import Store
from shared.bus import Bus
from shared.model import MODEL_NAME, accuracy_model_beside, build_model, model_fingerprint
from shared.schemas import (
    BadMessage,
    CameraCommand,
    CommandReply,
    ErrorRecord,
    GatewayCommand,
    ManualPruneCommand,
    NodeProfile,
    NodeSlowdownCommand,
    NodeStats,
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
    return {
        "request_id": result.request_id, "camera_id": result.camera_id, "capture_ts": result.capture_ts,
        "finish_ts": finish_ts, "e2e_s": e2e, "queue_s": queue_s, "compute_s": compute_s,
        "transfer_s": e2e - queue_s - compute_s, "label": result.label, "label_index": result.label_index,
        "confidence": result.confidence, "prune_ratios": [h.prune_ratio for h in result.hops],
        "hops": [h.model_dump() for h in result.hops],
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
        self.fingerprint = model_fingerprint(build_model(settings.checkpoint))
        self.live = LivePlacement(rules, MODEL_NAME, self.fingerprint, settings.nodes, started=time.time())
        self.control = ControlLoop(self.operator.controller_settings(), self.operator.slo_s,
                                   load_block_accuracy(settings.accuracy_model, self.fingerprint, settings.checkpoint),
                                   follow_up_s=settings.window_s)
        self.control.automatic = self.operator.automatic
        self._lock = threading.Lock()  # guards the SLO windows, live placement, the control loop and seen ids
        self._seen_results: OrderedDict[str, None] = OrderedDict()  # the newest result ids, oldest first
        self.duplicate_results = 0
        self.tick_failures = 0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="gateway-tick", daemon=True)

    def start(self) -> None:
        self.bus.subscribe(self.topics.results, self._on_result, qos=1)
        self.bus.subscribe(self.topics.node_status_filter, self._on_status, qos=1)
        self.bus.subscribe(self.topics.node_stats_filter, self._on_stats, qos=0)
        self.bus.subscribe(self.topics.errors_filter, self._on_error, qos=1)
        self.bus.subscribe(self.topics.node_profile_filter, self._on_profile, qos=1)
        self.bus.subscribe(self.topics.node_calibration_filter, self._on_calibration, qos=1)
        self.bus.subscribe(self.topics.node_prune_desired_filter, self._on_own_desired, qos=1)
        self.bus.subscribe(self.topics.component_command(self.settings.gateway_id), self._on_command, qos=1)
        self.bus.on_connected = self.publish_placement
        for offer_json in self.store.stored_offers(self.fingerprint):
            self.live.set_offer(NodeProfile.model_validate_json(offer_json))
        self.store.add_run({"started_ts": time.time(), "gateway_id": self.settings.gateway_id,
                            "slo_s": self.operator.slo_s, "window_s": self.settings.window_s,
                            "nodes": self.settings.nodes})
        self._ticker.start()
        self.store.start_writer(self.settings.flush_interval_s, self._on_store_failure)
        self.bus.start()

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=5)
        for window in self.slo.close_all():
            self.store.add_window(window.row())
        self.bus.stop()
        self.store.close()

    def publish_placement(self) -> None:
        """Retained, so nodes that (re)connect later learn their stage at once."""
        with self._lock:
            placement = self.live.current
        if placement is not None:
            self.bus.publish(self.topics.placement, to_json(placement), qos=1, retain=True)

    # --- handlers (paho's network thread: parse, buffer, return) ---------------------------
    def _on_result(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Count each request once: QoS 1 may deliver a result twice, and the first delivery is the one kept."""
        finish_ts = time.time()
        result = parse_json(Result, payload)
        row = result_row(result, finish_ts)
        with self._lock:
            if result.request_id in self._seen_results:
                self.duplicate_results += 1
                log.debug("ignored a redelivered result %s (%d so far)", result.request_id, self.duplicate_results)
                return
            self._seen_results[result.request_id] = None
            if len(self._seen_results) > self.settings.max_tracked_results:
                self._seen_results.popitem(last=False)
            self.slo.add(finish_ts, row["e2e_s"])
            self.control.observe_latency(finish_ts, row["e2e_s"])
            self.store.add_request(row)  # under the lock: a window row is never buffered before its requests

    def _on_status(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:  # cleared when the node was retired
            return
        node_id = self.topics.node_id_from_topic(topic)
        status = payload.decode("utf-8", "replace")
        if node_id is None or status not in STATUSES:
            raise BadMessage("bad_status", f"status {status[:40]!r} is not one of {', '.join(STATUSES)}")
        now = time.time()
        with self._lock:
            self.live.set_status(node_id, status, now)
        self.store.update_node({"node_id": node_id, "status": status, "status_ts": now})

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
        with self._lock:
            self.control.observe_stats(stats)
        self.store.update_node({**stats.model_dump(exclude={"ts"}), "last_seen": stats.ts})

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
        if row is not None:
            self.store.add_calibration(row)

    def _on_own_desired(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Our retained desired states come back after a restart: continue their seq numbers."""
        node_id = self.topics.node_id_from_topic(topic)
        if payload and node_id:
            desired = parse_json(PruneDesired, payload)
            with self._lock:
                self.control.recover_desired(node_id, desired)

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
            placed = self.live.current and self.live.current.stage_of(node_id)
            if placed and node_id in self.live.eligible():
                raise BadMessage("rejected_command", f"retire {node_id}: it is online and in the placement; "
                                 "stop it first")
            self.live.forget(node_id)
            self.control.forget(node_id)
        for topic in self.topics.node_topics(node_id):
            self.bus.publish(topic, b"", qos=1, retain=True)
        self.store.update_node({"node_id": node_id, "status": "retired", "status_ts": time.time()})
        log.info("retired %s: its retained topics are cleared", node_id)

    def _carry_out(self, effects: Effects) -> None:
        for node_id, desired in effects.publish.items():
            self.bus.publish(self.topics.node_prune_desired(node_id), to_json(desired), qos=1, retain=True)
        for row in effects.events:
            self.store.add_prune_event(row)

    def _on_error(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        self.store.add_error(parse_json(ErrorRecord, payload).model_dump())

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
                self.control.set_placement(placement)
            effects = self.control.tick(now)
            status = {**self.control.status(), "settings": self.operator.effective()}
            windows = self.slo.close_due(now)
        if placement is not None:
            self.publish_placement()
            self.store.add_placement(placement.model_dump())
        self._carry_out(effects)
        self.store.set_controller_status(now, status)
        for window in windows:
            self.store.add_window(window.row())
