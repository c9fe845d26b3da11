"""The gateway: publishes the placement, collects results and node health, keeps the SQLite log.

Transport and storage only; decisions live in pure modules (:mod:`gateway.slo`, and later
the placement planner and the pruning controller) that this class feeds.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from gateway.control_loop import ControlLoop, Effects, load_block_accuracy
from gateway.live_placement import LivePlacement, PlacementRules
from gateway.slo import SloWindows
from gateway.store import Store
from shared.bus import Bus
from shared.model import MODEL_NAME, build_model, model_fingerprint
from shared.profiling import NodeProfile
from shared.schemas import (
    BadMessage,
    ErrorRecord,
    GatewayCommand,
    ManualPruneCommand,
    NodeStats,
    Placement,
    PruneDesired,
    Result,
    RetireCommand,
    SliceCalibration,
    parse_json,
    to_json,
)
from shared.settings import ControllerSettings, GatewaySettings, MqttSettings
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics

log = logging.getLogger(__name__)
STATUSES = (AVAILABILITY_ONLINE, AVAILABILITY_OFFLINE, AVAILABILITY_STOPPED)


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
        "hops": [h.model_dump() for h in result.hops], "true_label": result.true_label,
        "correct": None if result.true_label is None else int(result.label_index == result.true_label),
    }


class Gateway:
    def __init__(self, settings: GatewaySettings, mqtt_settings: MqttSettings,
                 controller_settings: ControllerSettings | None = None):
        self.settings = settings
        self.topics = Topics(mqtt_settings.topic_root)
        self.bus = Bus(mqtt_settings, settings.gateway_id, self.topics.component_status(settings.gateway_id))
        self.store = Store(settings.db_path)
        self.slo = SloWindows(settings.window_s, settings.slo_s)
        rules = PlacementRules(settings.startup_wait_s, settings.rejoin_hold_s, settings.replan_min_gain)
        self.fingerprint = model_fingerprint(build_model())
        self.live = LivePlacement(rules, MODEL_NAME, self.fingerprint, settings.nodes, started=time.time())
        self.control = ControlLoop(controller_settings or ControllerSettings(), settings.slo_s,
                                   load_block_accuracy(settings.accuracy_model, self.fingerprint),
                                   follow_up_s=settings.window_s)
        self._replaced = False  # the placement was last moved for slowdowns (move back once they are gone)
        self._lock = threading.Lock()  # guards the SLO windows, live placement and the control loop
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
                            "slo_s": self.settings.slo_s, "window_s": self.settings.window_s,
                            "nodes": self.settings.nodes})
        self._ticker.start()
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
        finish_ts = time.time()
        result = parse_json(Result, payload)
        row = result_row(result, finish_ts)
        self.store.add_request(row)
        with self._lock:
            self.slo.add(finish_ts, row["e2e_s"], row["correct"])
            self.control.observe_latency(finish_ts, row["e2e_s"])

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
        command = parse_json(GatewayCommand, payload).root
        if isinstance(command, ManualPruneCommand):
            try:
                with self._lock:
                    effects = self.control.manual(time.time(), command.node_id, command.ratio)
            except ValueError as exc:
                raise BadMessage("rejected_command", f"prune {command.node_id}: {exc}") from None
            self._carry_out(effects)
        elif isinstance(command, RetireCommand):
            self.retire(command.node_id)

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

    def _replace_for_slowdowns(self, now: float, effects: Effects) -> Placement | None:
        """Re-partition when the controller reacted to a sustained violation, and back when slowdowns are gone.

        Called under the lock. The move is logged as a ``replace`` row in ``prune_events``.
        """
        controller = self.control.controller
        if controller is None:  # paused, e.g. while the nodes calibrate the slices of the last move
            return None
        slowdowns = {n: controller.slowdown(n) for n in controller.nodes}
        violated = any(e.get("kind") in ("set", "infeasible", "held") and "reason" in e for e in effects.events)
        gone = all(k <= controller.config.slowdown_gone for k in slowdowns.values())
        if not (violated or (gone and self._replaced)):
            return None
        placement = self.live.replan_for_slowdowns(slowdowns if violated else {}, now)
        if placement is None:
            return None
        self._replaced = violated
        self.control.set_placement(placement)
        effects.events.append({"ts": now, "kind": "replace", "policy": "replace", "source": "auto",
                               "reason": f"placement v{placement.version}: " + ", ".join(
                                   f"{s.node_id}:{s.first_block}-{s.last_block}" for s in placement.stages),
                               "metrics": json.dumps({"slowdowns": slowdowns})})
        return placement

    def _carry_out(self, effects: Effects) -> None:
        for node_id, desired in effects.publish.items():
            self.bus.publish(self.topics.node_prune_desired(node_id), to_json(desired), qos=1, retain=True)
        for row in effects.events:
            self.store.add_prune_event(row)

    def _on_error(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        self.store.add_error(parse_json(ErrorRecord, payload).model_dump())

    # --- periodic work (the single database writer) ----------------------------------------
    def _tick_forever(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            self.tick(time.time())

    def tick(self, now: float) -> None:
        with self._lock:
            placement = self.live.tick(now)
            if placement is not None:
                self.control.set_placement(placement)
            effects = self.control.tick(now)
            if self.settings.replace_on_violation and placement is None:
                placement = self._replace_for_slowdowns(now, effects)
            status = self.control.status()
            windows = self.slo.close_due(now)
        if placement is not None:
            self.publish_placement()
            self.store.add_placement({**placement.model_dump(exclude={"stages"}),
                                      "stages": [s.model_dump() for s in placement.stages]})
        self._carry_out(effects)
        self.store.set_controller_status(now, status)
        for window in windows:
            self.store.add_window(window.row())
        self.store.flush()
