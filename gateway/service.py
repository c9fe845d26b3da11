"""The gateway's transport: subscribes, parses, and carries out what the coordinator decides.

Every decision lives in :class:`gateway.coordinator.Coordinator` (pure; time passed in, effects returned); this
class turns MQTT messages into its calls and its :class:`~gateway.effects.Effects` into publishes and store
rows, and does the start-up I/O (the model's fingerprint, the accuracy model, what the database remembers).
Four threads: paho's network thread runs the handlers (parse, decide, buffer), the tick thread makes the periodic
decisions, the planner thread makes hybrid placements (seconds on dozens of nodes, so outside the lock: a tick only
asks for one, :class:`Planner`), and the store's writer thread alone touches the disk (and, after each write,
acknowledges to the broker the messages whose rows it wrote: docs/reliability.md). One lock serialises the
coordinator's calls; the store rows a call returns are buffered under it (a window row is never buffered before its
requests), its messages published after it, the retained desired prune states (which a restarted gateway recalls
from its database) only once the store has written their rows (``Publish.after_write``).
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time

from gateway.accuracy_model import load_block_accuracy
from gateway.coordinator import STATUSES, Coordinator, plan_for_rate
from gateway.effects import Effects, Publish
from gateway.live_placement import PlanWanted, solve
from gateway.operator import Overrides
from gateway.retention import DiskMode, cutoffs, disk_mode, disk_mode_message, thumbnail_budget_bytes
from gateway.store import Store
from shared.bus import Bus, drain_session
from shared.imaging import model_input_bytes
from shared.model import build_model, model_fingerprint
from shared.schemas import (
    AcceptedRequest,
    BadMessage,
    ErrorRecord,
    NodeProfile,
    NodeStats,
    Result,
    SliceCalibration,
    parse_json,
)
from shared.settings import ControllerSettings, GatewaySettings, MqttSettings
from shared.thumbnail import check_thumbnail, thumbnail_request_id
from shared.topics import Topics

log = logging.getLogger(__name__)
MAX_TICK_BACKOFF_S = 30.0


class Planner:
    """Solves the hybrid placements ticks ask for, one at a time on its own thread, outside the gateway's lock;
    the newest question wins (one asked while another is solved replaces any still waiting), and every answer goes
    back through ``answer`` (the coordinator refuses one whose inputs changed meanwhile)."""

    def __init__(self, answer):
        self._answer = answer
        self._wanted: PlanWanted | None = None
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gateway-planner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def ask(self, wanted: PlanWanted) -> None:
        with self._cv:
            self._wanted = wanted
            self._cv.notify()

    def stop(self, timeout: float) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)  # a solve under way is not interrupted; the thread is a daemon

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopped or self._wanted is not None)
                if self._stopped:
                    return
                wanted, self._wanted = self._wanted, None
            try:
                solved = solve(wanted)
            except Exception as exc:  # a bug must not leave the question open for good: answered as no plan
                log.exception("hybrid planning failed")
                solved = f"planner failed: {type(exc).__name__}: {exc}"
            if self._stopped:  # the gateway stopped while it was solved: its store is closed
                return
            try:
                self._answer(wanted, solved, time.time())
            except Exception:
                log.exception("the hybrid plan could not be carried out")


class Gateway:
    def __init__(self, settings: GatewaySettings, mqtt_settings: MqttSettings,
                 controller_settings: ControllerSettings | None = None):
        self.settings = settings
        self.topics = Topics(mqtt_settings.topic_root)
        self.bus = Bus(mqtt_settings, settings.gateway_id, self.topics.component_status(settings.gateway_id))
        self.store = Store(settings.db_path, max_pending=settings.max_pending_rows)
        self.mqtt_settings = mqtt_settings
        model = build_model(settings.checkpoint)
        fingerprint = model_fingerprint(model)
        now = time.time()
        resume_since = now - max(10 * settings.result_timeout_s, 3600.0)  # open requests, prune events
        self.coordinator = Coordinator(
            settings, Overrides(settings, controller_settings or ControllerSettings(), self.store.operator_settings()),
            self.topics, fingerprint, model_input_bytes(model.config.input_size),
            load_block_accuracy(settings.accuracy_model, fingerprint, settings.checkpoint),
            self.store.issued_desired(), self.store.open_requests(resume_since), now,
            self.store.pending_takeovers(), self.store.last_placement_version(),
            self.store.awaiting_follow_ups(resume_since, settings.window_s),
            self.store.held_inputs(now - settings.result_timeout_s))
        self._lock = threading.Lock()  # serialises the coordinator's calls
        self.tick_failures = 0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="gateway-tick", daemon=True)
        self.planner = Planner(lambda *answer: self._decide(self.coordinator.on_plan, *answer))

    def start(self) -> None:
        self.bus.subscribe(self.topics.accepted_filter, self._on_accepted, qos=1)
        self.bus.subscribe(self.topics.results_filter, self._on_result, qos=1, data=True)
        clear = self._on_refused_retained  # garbage left retained on a device's state topics
        self.bus.subscribe(self.topics.node_status_filter, self._on_status, qos=1, refused_retained=clear)
        self.bus.subscribe(self.topics.component_status_filter, self._on_component_status, qos=1,
                           refused_retained=clear)
        self.bus.subscribe(self.topics.node_stats_filter, self._on_stats, qos=0)
        self.bus.subscribe(self.topics.errors_filter, self._on_error, qos=1)
        self.bus.subscribe(self.topics.node_profile_filter, self._on_profile, qos=1, refused_retained=clear)
        self.bus.subscribe(self.topics.node_calibration_filter, self._on_calibration, qos=1)
        self.bus.subscribe(self.topics.node_prune_desired_filter, self._on_own_desired, qos=1)
        self.bus.subscribe(self.topics.component_command(self.settings.gateway_id), self._on_command, qos=1)
        self.bus.subscribe(self.topics.placement, self._on_own_placement, qos=1)
        if self.settings.thumbnail_budget_mb > 0:
            # QoS 0: the broker queues none for a gateway that is away, so thumbnails never crowd results out of
            # its bounded session queue (max_queued_messages); a thumbnail lost so is a frame shown without one
            self.bus.subscribe(self.topics.thumbnail_filter, self._on_thumbnail, qos=0, data=True)
        self.bus.on_connected = self.publish_placement
        fingerprint = self.coordinator.fingerprint
        self.coordinator.remember_offers([NodeProfile.model_validate_json(offer)
                                          for offer in self.store.stored_offers(fingerprint)])
        self.store.add_run({"started_ts": time.time(), "gateway_id": self.settings.gateway_id,
                            "slo_s": self.coordinator.operator.slo_s, "window_s": self.settings.window_s,
                            "nodes": self.settings.nodes, "max_clock_offset_s": self.settings.max_clock_offset_s})
        self._ticker.start()
        self.planner.start()
        self.store.start_writer(self.settings.flush_interval_s, self._on_store_failure, self.maintain,
                                self.settings.maintenance_interval_s)
        self.bus.acknowledge_after(self.store.after_commit)  # a SIGKILL loses no received message (docs/reliability.md)
        self.bus.start()

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=5)
        self.planner.stop(timeout=5)
        self._decide(self.coordinator.close)
        self.store.close()  # the last write acknowledges its messages while still connected; later ones come again
        self.bus.stop()

    def _decide(self, entry, *args) -> None:
        """Run one coordinator entry point under the lock and carry out its effects; raise its refusal, if any."""
        with self._lock:
            effects = entry(*args)
            self._write(effects)
            for message in effects.publish:  # queued under the lock: the calls' retained states go out in order
                if message.after_write:
                    self.store.after_write(functools.partial(self._publish, message))
        self._send(effects)

    def _write(self, effects: Effects) -> None:
        for method, args in effects.store:
            getattr(self.store, method)(*args)

    def _send(self, effects: Effects) -> None:
        for message in effects.publish:
            if not message.after_write:
                self._publish(message)
        for node_id, served in effects.drains:
            threading.Thread(target=self._hand_over, args=(node_id, served), name=f"drain-{node_id}",
                             daemon=True).start()
        if effects.refusal is not None:
            raise effects.refusal

    def _publish(self, message: Publish) -> None:
        self.bus.publish(message.topic, message.payload, qos=message.qos, retain=message.retain, user=message.user)

    def publish_placement(self) -> None:
        """The active placement, retained (also on every reconnect of the bus)."""
        self._decide(self.coordinator.placement_message)

    # --- handlers (paho's network thread: parse, decide, buffer, return) ---------------------------
    def _on_result(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        finish_ts = time.time()
        result = parse_json(Result, payload)
        self._check_speaker(topic, result.hops[-1].node_id if result.hops else None, "result's last hop")
        self._decide(self.coordinator.on_result, result, payload, finish_ts)

    def _on_accepted(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        accepted = parse_json(AcceptedRequest, payload)
        self._check_speaker(topic, accepted.node_id, "announcement's node_id")
        self._decide(self.coordinator.on_accepted, accepted, time.time())

    def _on_thumbnail(self, topic: str, payload: bytes, props: dict[str, str]) -> None:
        check_thumbnail(payload)
        request_id = thumbnail_request_id(props)
        self._decide(self.coordinator.on_thumbnail, self.topics.publisher(topic), request_id, payload, time.time())

    def _on_status(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:  # cleared when the node was retired
            return
        self._decide(self.coordinator.on_status, self.topics.node_id_from_topic(topic),
                     payload.decode("utf-8", "replace"), time.time())

    def _on_component_status(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Read only to keep the topic clean: an availability is one of STATUSES (garbage is reported, then
        cleared by :meth:`_on_refused_retained`)."""
        status = payload.decode("utf-8", "replace")
        if payload and status not in STATUSES:
            raise BadMessage("bad_status", f"status {status[:40]!r} is not one of {', '.join(STATUSES)}")

    def _on_refused_retained(self, topic: str, kind: str) -> None:
        self._decide(self.coordinator.on_refused_retained, topic, kind)

    def _hand_over(self, node_id: str, served: str) -> None:
        """A node that held an input is gone and placed around: take its broker session over and end it.

        A node acknowledges an input only once served, so everything it had not finished is still in its session,
        which Mosquitto would also keep feeding (docs/reliability.md, "Faults"). Taking the session over ends it and
        returns the held messages; the coordinator re-sends them to where the placement in force reads them
        (gateway/handback.py). A node killed between publishing an output and acknowledging its input is served
        twice; the first result is the row, the second a ``duplicates`` row (gateway/accounting.py).
        """
        try:
            held = drain_session(self.mqtt_settings, node_id, [served])
        except ConnectionError as exc:
            log.error("could not take over %s's session: %s", node_id, exc)
            self.store.add_error({"ts": time.time(), "component": self.settings.gateway_id, "topic": served,
                                  "kind": "drain_failed", "message": str(exc), "request_id": None})
            return
        self._decide(self.coordinator.on_drained, node_id, served, held, time.time())

    def _on_profile(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:  # a retired node's cleared profile
            return
        offer = parse_json(NodeProfile, payload)
        if offer.node_id != self.topics.node_id_from_topic(topic):
            raise BadMessage("bad_schema", f"profile of {offer.node_id} published on {topic}")
        self._decide(self.coordinator.on_profile, offer, payload, time.time())

    def _on_stats(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        self._decide(self.coordinator.on_stats, parse_json(NodeStats, payload), time.time())

    def _on_calibration(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:
            return
        self._decide(self.coordinator.on_calibration, parse_json(SliceCalibration, payload))

    def _on_own_desired(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        node_id = self.topics.node_id_from_topic(topic)
        if not payload or not node_id:
            return
        self._decide(self.coordinator.on_desired, node_id, payload, time.time())

    def _on_own_placement(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        self._decide(self.coordinator.on_placement, payload, time.time())

    def _on_command(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        self._decide(self.coordinator.on_command, payload, time.time())

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
        self._decide(self.coordinator.on_error, record)

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
        """The coordinator's tick; a hybrid placement is planned on the planner thread and a due rate re-plan here,
        both outside the lock (seconds on many nodes, docs/scaling.md), so results keep being handled meanwhile."""
        with self._lock:
            decided = self.coordinator.begin_tick(now)
        if decided.plan_wanted is not None:
            self.planner.ask(decided.plan_wanted)
        plan = plan_for_rate(decided.rate_request) if decided.rate_request is not None else None
        self._decide(self.coordinator.end_tick, decided, plan)

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
        deleted["thumbnails over budget"] = self.store.trim_thumbnails(
            thumbnail_budget_bytes(self.settings.thumbnail_budget_mb))
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items() if n))
        self.store.checkpoint()
