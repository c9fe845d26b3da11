"""The node agent: the node's two MQTT connections, and the gateway's placements and commands carried out.

What to build, subscribe or report for a placement or a prepare command is decided by
:class:`node_agent.assignment.Assignment`; this module carries it out on the node's two connections, and hands each
input for the job in force to the data path (:class:`node_agent.serving.Server`: admission, the work queue, the
inference thread, each input acknowledged once served). It also applies the gateway's commands and prune state,
publishes the calibrations the data path measures (:class:`node_agent.calibration.CalibrationSchedule` says when),
and a stats thread publishes health every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from node_agent.assignment import Assignment, Listen
from node_agent.calibration import CalibrationSchedule, FinishedCalibration
from node_agent.health import CpuMeter
from node_agent.input_handover import InputHandover
from node_agent.offer import measure_offer
from node_agent.runtime import IngestRuntime, Request, SliceCalibrator, StageRuntime
from node_agent.serving import Server
from shared import handover, routing, wire
from shared.bus import Ack, Bus, read_retained
from shared.clock import ClockOffset
from shared.device_model import load_device_model
from shared.model import build_model, model_fingerprint
from shared.schemas import (BadMessage, CalibrateCommand, ClockBeacon, DeviceSpeedCommand, Job, NodeCommand,
                            NodeProfile, NodeStats, Placement, PrepareCommand, PruneDesired, PruneState,
                            SlowdownCommand, parse_json, to_json)
from shared.settings import MqttSettings, NodeSettings
from shared.topics import Topics

log = logging.getLogger(__name__)
# ``[node] flow_control``: unacknowledged inputs the broker may send at once (MQTT v5 Receive Maximum). 1, not the
# work queue's size: Mosquitto 2.0.x, on the acknowledgement of any but the newest message in flight, sends up to a
# whole window more (measured: window 4, acknowledging the oldest, 31 held after 10 acknowledgements)
INPUT_WINDOW = 1


def control_client_id(node_id: str) -> str:
    """The node's control connection's MQTT client id: no device id contains '/', so it is no other's."""
    return f"{node_id}/control"


def control_bus(mqtt_settings: MqttSettings, node_id: str) -> Bus:
    """The node's control connection: placement, commands, prune state and the clock beacon. Each run starts a new
    session: a command queued while the node was dead (a `slowdown`, a `prepare` for a placement long gone) is not
    applied by its next run; the placement and prune state are retained and come again on subscribe."""
    return Bus(mqtt_settings, node_id, None, client_id=control_client_id(node_id), fresh_session=True)


class NodeAgent:
    def __init__(self, settings: NodeSettings, mqtt_settings: MqttSettings):
        self.settings = settings
        self.node_id = settings.node_id
        torch.set_num_threads(settings.threads)
        self.model = build_model(settings.checkpoint)
        self.topics = Topics(mqtt_settings.topic_root)
        # Inputs: acknowledged only once served, so what the node holds stays in its broker session; with
        # ``flow_control`` one at a time (receive window 1), so a backlog waits in that session instead of overflowing
        # the work queue. Control messages come on a connection of their own, or they would wait behind such a backlog
        # (docs/reliability.md, "Flow control"). Everything is published on the input connection, whose will is the
        # node's availability.
        self.bus = Bus(mqtt_settings, self.node_id, self.topics.node_status(self.node_id), manual_ack=True,
                       receive_maximum=INPUT_WINDOW if settings.flow_control else None)
        self.control = control_bus(mqtt_settings, self.node_id)
        self.clock = ClockOffset()
        self.runtime: StageRuntime | None = None
        self.ingest: IngestRuntime | None = None  # set while the placement makes this node the ingest node
        # the job in force, its input and what is prepared ahead of a placement (its placement: where outputs go)
        self.assignment: Assignment[StageRuntime | IngestRuntime] = Assignment(self.node_id, self.topics)
        # a stage topic taken over from another reader in a move: what came before its marker (input_handover.py)
        self.inputs_handover: InputHandover[Request] = InputHandover(settings.handover_timeout_s)
        self._last_taken: dict[str, str | None] = {}  # input topic -> request id of the last activation taken from it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.desired: PruneDesired | None = None
        # a benchmark's one emulated device (shared/device_model.py), checked against this model now
        self.device_model = (load_device_model(settings.device_model, model_fingerprint(self.model))
                             if settings.device_model else None)
        self.calibration = CalibrationSchedule(lambda runtime: SliceCalibrator(
            runtime.slice, runtime.input_shape, device_model=runtime.device_model))
        self.server = Server(self.bus, settings, self.topics, self._gateway_time, self._placement_in_force,
                             self._slice_in_force, self.calibration, self._publish_calibration)
        self._emulate(settings.emulated_slowdown, 1.0)
        self._cpu = CpuMeter()
        self._stats_thread = threading.Thread(target=self._publish_stats_forever, name="stats", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.offer = self.measure_offer()
        self.bus.on_connected = self._announce_offer
        self.control.subscribe(self.topics.placement, self._on_placement)
        self.control.subscribe(self.topics.node_command(self.node_id), self._on_command)
        self.control.subscribe(self.topics.node_prune_desired(self.node_id), self._on_prune_desired)
        self.control.subscribe(self.topics.clock, self._on_clock_beacon, qos=0)
        self.server.start()
        self._stats_thread.start()
        self._resume_placement()
        self.control.start()
        self.bus.start()

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
        self._stats_thread.join(timeout=5)
        self.bus.stop()
        self.control.stop()

    # --- placement -----------------------------------------------------------------------
    def measure_offer(self) -> NodeProfile:
        """What this node offers the planner, measured (or read) as the device serves now."""
        return measure_offer(self.settings, self.model, self.device_model, self.server.slowdown)

    def _resume_placement(self) -> None:
        """Take the job the retained placement gives this node before resuming its session, whose held inputs the
        broker re-sends first: with a stage to serve them under they are served, not acknowledged away
        (:func:`shared.bus.read_retained`). A placement that is bad is reported when it comes on the connection."""
        payload = read_retained(self.bus.settings, self.topics.placement)
        if payload is None:
            return
        try:
            self._on_placement(self.topics.placement, payload, {})
        except ValueError as exc:  # BadMessage
            log.warning("%s: retained placement not taken before connecting: %s", self.node_id, exc)
            return
        with self._lock:
            placement = self.assignment.placement
        if placement is not None:  # a previous run's input, kept in the session, is not this run's
            self.bus.leave_on_connect(routing.input_filters(self.topics, placement))

    def _announce_offer(self) -> None:
        """Retained and re-sent on every connect, like the availability topic."""
        self.bus.publish(self.topics.node_profile(self.node_id), self.offer.model_dump_json(), qos=1, retain=True)

    def _on_placement(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        """Put the placement's job for this node in force (:meth:`node_agent.assignment.Assignment.place`)."""
        if not payload:  # only the gateway places, and it never clears the placement: keep working
            raise BadMessage("bad_placement", "empty placement ignored (the gateway re-publishes the placement)")
        placement = parse_json(Placement, payload)
        if placement.n_blocks != self.model.n_blocks:
            raise BadMessage("bad_placement", f"placement is for {placement.n_blocks} blocks, "
                             f"this node's model has {self.model.n_blocks}")
        with self._lock:
            switch = self.assignment.place(placement)
            if switch is not None and switch.keep and self.runtime is not None:
                self.runtime.assignment = switch.job.assignment
            if switch is not None and switch.keep:
                self.inputs_handover.in_force({self.assignment.listening} - {None}, time.time())
        if switch is None:
            log.info("ignoring placement v%d older than v%d", placement.version, self.assignment.version)
            return
        self.server.queue.slo_s = placement.slo_s  # the gateway re-publishes the placement when the operator changes it
        if switch.keep:
            self._listen(switch.listen)
            self._publish_stats()  # at once: the gateway waits for every node to have it in force (placing.py)
            return
        runtime = switch.runtime
        if switch.job is not None and runtime is None:
            runtime = self._build(switch.job)
        with self._lock:
            left = self.assignment.listening
            listen = self.assignment.take(switch)
            self.runtime = runtime if isinstance(runtime, StageRuntime) else None
            self.ingest = runtime if isinstance(runtime, IngestRuntime) else None
            desired = self.desired
            marker = self._marker_for(left)
            self.inputs_handover.in_force({self.assignment.listening} - {None}, time.time())
        if marker is not None:  # taken nothing more from it since the switch above: its new reader serves the rest
            self.bus.publish(left, b"", qos=1, user=marker)
        self.calibration.request(self.runtime)
        if self.runtime is not None and desired is not None:
            self._apply_ratio(self.runtime, desired)  # a new slice keeps the ratio the gateway wants
        self._listen(listen)
        self._publish_stats()
        job = switch.job
        if job is None:
            log.info("%s: not in the placement; idle", self.node_id)
        elif job.ingest:
            log.info("%s: ingest node: decoding camera frames for stage 1 (placement v%d)", self.node_id,
                     placement.version)
        else:
            log.info("%s: stage %d, blocks %d..%d (placement v%d)", self.node_id, job.stage, job.first_block,
                     job.last_block, placement.version)

    def _marker_for(self, left: str | None) -> dict[str, str] | None:
        """The hand-over marker for the input topic this node stopped reading (under the lock, at the switch), if its
        new reader may be holding its inputs: a plain activation topic (:mod:`shared.handover`)."""
        last_taken, self._last_taken = self._last_taken, {}
        if (left is None or left == self.assignment.listening or left.startswith("$share/")
                or self.topics.camera_id_from_frame_topic(left) is not None or "+" in left or "#" in left):
            return None
        return handover.marker_user(self.node_id, last_taken.get(left))

    def _build(self, job: Job) -> StageRuntime | IngestRuntime:
        """This node's runtime for ``job``: the ingest node's decoder, or the stage's slice."""
        if job.ingest:
            return IngestRuntime(self.model, self.node_id, self.topics.stage_input(1),
                                 self.settings.max_payload_bytes, self.settings.reduced_decode)
        output = (self.topics.results(self.node_id) if job.is_last
                  else self.topics.stage_input(job.stage + 1, job.pipeline))
        return StageRuntime(self.model, self.node_id, job.assignment, job.n_stages, output, self.settings.wire_dtype,
                            self.settings.max_payload_bytes, self.settings.reduced_decode, job.behind_ingest,
                            self.device_model)

    def _prepare(self, placement: Placement) -> None:
        """Before the gateway publishes ``placement``: build this node's runtime and subscribe to its input, and say
        so once the broker has acknowledged the subscription (gateway.live_placement.Handover). Until the placement
        comes, messages on that input are another node's (:meth:`_on_input` leaves them)."""
        with self._lock:
            preparation = self.assignment.prepare(placement)
        if preparation is None:
            return
        for stale in preparation.unsubscribe:  # prepared for a placement that never came
            self.bus.unsubscribe(stale)
        if preparation.build is None:  # the same slice; at most how its input is shared changes, when it comes
            self._report_prepared(preparation.version)
            return
        runtime = self._build(preparation.build)
        with self._lock:
            self.assignment.hold(preparation, runtime)
        if preparation.subscribe is None:
            self._report_prepared(preparation.version)
        else:
            self.bus.subscribe(preparation.subscribe, self._on_input, qos=1, data=True, deferred_ack=True,
                               subscribed=lambda: self._report_prepared(preparation.version))

    def _report_prepared(self, version: int) -> None:
        with self._lock:
            self.assignment.reported(version)
        log.info("%s: subscribed for placement v%d", self.node_id, version)
        self._publish_stats()

    def _listen(self, listen: Listen) -> None:
        """Subscribe the job's input (plain, or shared among a stage's readers) instead of the old one."""
        for stale in listen.unsubscribe:
            self.bus.unsubscribe(stale)
        if listen.subscribe is not None:
            self.bus.subscribe(listen.subscribe, self._on_input, qos=1, data=True, deferred_ack=True)

    def _on_command(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        command = parse_json(NodeCommand, payload).root
        if isinstance(command, SlowdownCommand):
            self._emulate(self.device_speed, command.factor)
            log.warning("%s: emulated slowdown set to %.2fx (device speed %.2fx)", self.node_id, command.factor,
                        self.device_speed)
        elif isinstance(command, DeviceSpeedCommand):
            with self._lock:
                self._emulate(command.factor, self.transient)
                runtime = self.runtime
            self.calibration.request(runtime)  # the controller's curves must describe the new device
            log.warning("%s: emulated device speed set to %.2fx", self.node_id, command.factor)
        elif isinstance(command, PrepareCommand):
            self._prepare(command.placement)
        elif isinstance(command, CalibrateCommand):
            with self._lock:
                runtime = self.runtime
            self.calibration.request(runtime)
            log.info("%s: re-calibrating on request", self.node_id)

    def _emulate(self, device_speed: float, transient: float) -> None:
        """The emulated device the data path serves as: a base factor over this host (``[node] emulated_slowdown``,
        then `device_speed` commands) times the latest `slowdown` command."""
        self.device_speed, self.transient = device_speed, transient
        self.server.slowdown = device_speed * transient

    # --- pruning -------------------------------------------------------------------------
    def _on_prune_desired(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:  # cleared by the gateway when this node is retired
            return
        desired = parse_json(PruneDesired, payload)
        with self._lock:
            if self.desired is not None and desired.seq <= self.desired.seq:
                log.info("%s: ignoring stale prune state seq %d (have %d)", self.node_id, desired.seq,
                         self.desired.seq)
                return
            self.desired = desired
            runtime = self.runtime
        if runtime is not None:
            self._apply_ratio(runtime, desired)

    def _apply_ratio(self, runtime: StageRuntime, desired: PruneDesired) -> None:
        """Swap the slice variant and echo what was applied (retained state)."""
        switch_s = runtime.slice.set_ratio(desired.ratio)
        log.info("%s: prune ratio %.2f (%s: %s), switched in %.3f ms", self.node_id, runtime.slice.ratio,
                 desired.source, desired.reason, switch_s * 1e3)
        state = PruneState(ratio=runtime.slice.ratio, seq=desired.seq, applied_at=time.time(), switch_s=switch_s)
        self.bus.publish(self.topics.node_prune_state(self.node_id), to_json(state), qos=1, retain=True)

    def _publish_calibration(self, finished: FinishedCalibration) -> None:
        """A slice the data path measured, published unless the placement moved on meanwhile."""
        with self._lock:
            version = self.assignment.version
            if finished.target is not self.runtime or version is None:
                return  # the placement moved on meanwhile
        calibration = finished.message(self.node_id, version, self.device_speed, time.time())
        self.bus.publish(self.topics.node_calibration(self.node_id), to_json(calibration), qos=1, retain=True)
        log.info("%s: calibrated blocks %d..%d: %.2f ms at p=0, %.2f ms at p=%.1f", self.node_id,
                 calibration.first_block, calibration.last_block, calibration.latency_s[0] * 1e3,
                 calibration.latency_s[-1] * 1e3, calibration.ratios[-1])

    # --- data path ---------------------------------------------------------------------------
    def _on_input(self, topic: str, payload: bytes, props: dict[str, str], ack: Ack) -> None:
        """An input for the job in force, or one that can only be for the job prepared
        (:meth:`Assignment.prepared_for`), goes to the data path; one another node reads until the placement comes is
        acknowledged and left, unless that node is handing the topic over to this one: then it is held until its
        marker (:mod:`node_agent.input_handover`)."""
        received = time.time()
        if handover.is_marker(props):
            ack()
            self._on_marker(topic, payload, props)
            return
        req = Request(topic, payload, props, received)
        # an activation's request id, for the hand-over; never a camera frame's (no marker there): no header to try
        request_id = None if self.topics.camera_id_from_frame_topic(topic) is not None else _activation_id(payload)
        with self._lock:
            held = self.inputs_handover.holding(topic)
            runtime = None if held else self._runtime_for(topic, request_id)
            old_reader = None if held or runtime is not None else self.assignment.leaving_reader(topic)
            if held or old_reader is not None:
                self.inputs_handover.hold(topic, request_id, req, old_reader)
        if runtime is None:
            ack()
            return
        self.server.receive(runtime, req, ack)

    def _runtime_for(self, topic: str, request_id: str | None) -> StageRuntime | IngestRuntime | None:
        """The runtime that serves an input on ``topic`` here, if any (under the lock)."""
        if self.assignment.serves(topic):
            self._last_taken[topic] = request_id
            return self.runtime or self.ingest
        return self.assignment.prepared_for(topic, self.inputs_handover.handed_over(topic))

    def _on_marker(self, topic: str, payload: bytes, props: dict[str, str]) -> None:
        """Another node stopped reading ``topic``: serve what this node held from it after the last input it took."""
        try:
            marker = handover.parse_marker(payload, props)
        except BadMessage as exc:
            self.bus.report_error(topic, exc.kind, str(exc))
            return
        if marker.from_node == self.node_id:
            return
        with self._lock:
            released = self.inputs_handover.marker(topic, marker.from_node, marker.last_request_id,
                                                   self.assignment.leaving_reader(topic))
        if released is not None:
            log.info("%s: %s handed %s over after %s; serving the %d input(s) held after it", self.node_id,
                     marker.from_node, topic, marker.last_request_id or "taking nothing", len(released))
            self._serve_taken_over(topic, released)

    def _serve_taken_over(self, topic: str, requests: list[Request]) -> None:
        """Inputs held for a topic taken over (acknowledged when held), served by the job that reads it now."""
        with self._lock:
            runtime = ((self.runtime or self.ingest) if self.assignment.serves(topic)
                       else self.assignment.prepared_for(topic, handed_over=True))
        for req in requests:
            if runtime is None:  # another placement took the topic elsewhere meanwhile: say so, never silently
                self.bus.report_error(topic, "handover_unserved", "held for a stage this node no longer takes over",
                                      _activation_id(req.payload))
            else:
                self.server.receive(runtime, req, lambda: None)

    def _release_overdue(self) -> None:
        """Held inputs whose old reader's marker is overdue (it died?): served, a duplicate at worst."""
        with self._lock:
            overdue = self.inputs_handover.expire(time.time())
        for topic, requests in overdue:
            log.warning("%s: no hand-over marker on %s within %g s; serving the %d input(s) held", self.node_id,
                        topic, self.settings.handover_timeout_s, len(requests))
            self._serve_taken_over(topic, requests)

    def _placement_in_force(self) -> Placement | None:
        with self._lock:
            return self.assignment.placement

    def _slice_in_force(self) -> StageRuntime | None:
        with self._lock:
            return self.runtime

    def _gateway_time(self) -> float:
        """Now on the gateway's (and the cameras') clock, which capture times and so deadlines are on."""
        return time.time() - (self.clock.offset_s or 0.0)

    # --- stats ---------------------------------------------------------------------------
    def stats(self) -> NodeStats:
        """Health since the previous call: latency figures describe the node's *current* speed."""
        with self._lock:
            runtime, job = self.runtime, self.assignment.job
            version, prepared_version = self.assignment.version, self.assignment.prepared_version
        return NodeStats(
            node_id=self.node_id, ts=time.time(), stage=job.stage if job else None,
            first_block=job.first_block if job else None, last_block=job.last_block if job else None,
            placement_version=version, queue_depth=self.server.queue.qsize(), queue_capacity=self.settings.queue_size,
            errors=dict(self.bus.errors + self.control.errors), prepared_version=prepared_version,
            **self.server.health(),
            cpu_percent=self._cpu.read(), prune_ratio=runtime.slice.ratio if runtime else 0.0,
            emulated_slowdown=self.server.slowdown, clock_offset_s=self.clock.offset_s)

    def _on_clock_beacon(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        received = time.time()
        self.clock.add(parse_json(ClockBeacon, payload).ts, received)

    def _publish_stats_forever(self) -> None:
        while not self._stop.wait(self.settings.stats_interval_s):
            self._release_overdue()
            self._publish_stats()

    def _publish_stats(self) -> None:
        """Also sent at once when a placement is prepared for or put in force: the gateway publishes a placement, hands
        inputs back and takes a gone node's session over only once the nodes say so (gateway/placing.py)."""
        if self.bus.connected:
            self.bus.publish(self.topics.node_stats(self.node_id), to_json(self.stats()), qos=0)


def _activation_id(payload: bytes) -> str | None:
    """The request id in an activation's header; None for a camera frame or a malformed header."""
    try:
        return wire.peek(payload).request_id
    except BadMessage:
        return None
