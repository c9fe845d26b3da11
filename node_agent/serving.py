"""The node's data path on its input connection: each input from receipt to its acknowledgement.

Paho's network thread takes each input once (:mod:`node_agent.admission`: stage, request id, capture time, size) and,
when the node is idle, serves it there and then: no hand-off in, no wake-up of another thread out
(docs/architecture.md, "Threads and back-pressure"). Otherwise it queues it; one inference thread drains the bounded
queue, timely requests first (:mod:`node_agent.deadline_queue`; a full queue drops a request and counts it, so a slow
node sheds load instead of growing memory; with ``[node] flow_control`` QoS 1 input comes one at a time, so only QoS 0
input can fill it and a backlog waits in the broker instead) and gives the calibration its idle moments. Each input is
acknowledged once served or reported, never on receipt: while this node holds it, its broker session does too
(docs/reliability.md). Which runtime an input is for and the placement in force are the agent's
(:mod:`node_agent.agent`); the calibration runs here, on whichever thread holds the queue's claim, and the agent
publishes what it measured.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from node_agent.admission import Admission, Receipt, Report
from node_agent.calibration import CalibrationSchedule, FinishedCalibration
from node_agent.deadline_queue import DeadlineQueue
from node_agent.health import Health
from node_agent.runtime import IngestRuntime, Output, Request, StageRuntime
from node_agent.thumbnailer import Thumbnailer
from shared import routing
from shared.bus import Ack, Bus
from shared.schemas import BadMessage, Placement, to_json
from shared.settings import NodeSettings
from shared.thumbnail import REQUEST_ID_PROPERTY
from shared.topics import Topics

log = logging.getLogger(__name__)
Runtime = StageRuntime | IngestRuntime
IDLE_WAIT_S = 0.2  # how long the inference thread blocks on an empty queue when nothing is to calibrate
# unread bytes after a request served on paho's thread that still mean "only acknowledgements came meanwhile"
# (an MQTT v5 PUBACK is 4-5 bytes; any frame or activation is far larger): more, and input is waiting
ACKS_ONLY_BYTES = 64
# serve on paho's thread only while a request takes less than this: a hand-off costs ~1 ms, noise beside longer
# work, and paho's thread must not stop answering for long (keepalive, writing what the other threads publish)
SERVE_AT_ONCE_MAX_S = 0.1


def output_topic(topics: Topics, placement: Placement | None, out: Output, pipeline: int) -> str | None:
    """Where an output goes under ``placement`` (the one in force now, not the one its runtime was built under:
    :func:`shared.routing.output_topic`), in the pipeline of the stage that served it; its own topic if it is a
    result; None for an activation no stage of that placement reads (a one-stage pipeline: :meth:`Server._serve`
    runs the rest here)."""
    if out.next_block is None or placement is None:
        return out.topic
    return routing.output_topic(topics, placement, pipeline, out.next_block)


class Server:
    """Admits, serves or queues, publishes and acknowledges; counts what it served and dropped (:meth:`health`).

    ``gateway_time``: the clock capture times and so deadlines are on; ``placement``: the placement in force now
    (where outputs go, whether to send thumbnails); ``slice_in_force``: the stage runtime in force now (None: none);
    ``calibration``: its runs are taken here (the agent requests them) and ``calibrated`` is handed each slice
    measured. ``slowdown``: the emulated device's factor the runtimes serve with (the agent sets it from its
    commands).
    """

    def __init__(self, bus: Bus, settings: NodeSettings, topics: Topics, gateway_time: Callable[[], float],
                 placement: Callable[[], Placement | None], slice_in_force: Callable[[], StageRuntime | None],
                 calibration: CalibrationSchedule, calibrated: Callable[[FinishedCalibration], None]):
        self.bus = bus
        self.settings = settings
        self.topics = topics
        self.admission = Admission(settings, topics)
        self.queue: DeadlineQueue[tuple[Runtime, Request, Ack]] = DeadlineQueue(
            settings.queue_size, gateway_time, ordered=settings.deadline_order)
        self.slowdown = 1.0  # the agent sets it (NodeAgent._emulate)
        self._placement = placement
        self._slice_in_force = slice_in_force
        self.calibration = calibration
        self._calibrated = calibrated
        self._lock = threading.Lock()
        self._health = Health()  # counts and latency figures for the stats (under the lock)
        self._last_serve_s: float | None = None  # how long the last request took to serve (None: none served yet)
        self.thumbnails = Thumbnailer(self._send_thumbnail)  # used while the placement asks for thumbnails
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.thumbnails.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.thumbnails.stop()

    def health(self) -> dict[str, float | int | None]:
        """The stats' counts and latency figures (:meth:`node_agent.health.Health.report`)."""
        with self._lock:
            return self._health.report()

    def receive(self, runtime: Runtime, req: Request, ack: Ack) -> None:
        """Take one input for ``runtime``, on paho's thread: serve it here and now when the node is idle and serves
        quickly (no hand-off to the inference thread, no wake-up of paho's thread for the output), else queue it. It
        is acknowledged once served (or reported), so while this node holds the input its broker session does too,
        and the gateway can hand it to whichever node serves its stage next if this one dies or hangs."""
        if not self._send(self.admission.receive(req, runtime)):  # refused, and reported as the request's failure
            ack()
            return
        last = self._last_serve_s
        if last is not None and last < SERVE_AT_ONCE_MAX_S and self.queue.claim():
            req.deferred = self.queue.late(req.capture_ts)
            self._serve_now(runtime, req, ack)
            return
        dropped = self.queue.put((runtime, req, ack), req.capture_ts)
        if dropped is not None:  # this request or one that would have been served after it
            _, lost, lost_ack = dropped
            with self._lock:
                count = self._health.drop()
            self._report(Report(lost.topic, "dropped", f"work queue full ({self.settings.queue_size}): request "
                                "dropped", lost.request_id))
            lost_ack()  # reported as a failure: done with
            if count in (1, 10, 100) or count % 1000 == 0:
                log.warning("%s: work queue full, %d requests dropped so far", self.settings.node_id, count)

    def _send(self, receipt: Receipt) -> bool:
        """Send what admitting an input decided, in order; whether it is taken."""
        for note in receipt.notes:
            self._report(note)
        if receipt.announcement is not None:
            self.bus.publish(self.topics.accepted(self.settings.node_id), to_json(receipt.announcement), qos=1)
        if receipt.refusal is not None:
            self._report(receipt.refusal)
        return receipt.taken

    def _report(self, report: Report) -> None:
        self.bus.report_error(report.topic, report.kind, report.message, report.request_id)

    def _serve_now(self, runtime: Runtime, req: Request, ack: Ack) -> None:
        """Serve on paho's thread, the queue claimed (:meth:`DeadlineQueue.claim`). The announcement leaves before the
        compute, as it would have before a queued one; the output right after it (:meth:`_serve`), the input's
        acknowledgement or a failure report once it is done. Input that arrived meanwhile (more than a few
        acknowledgements' bytes unread) goes to the queue, so a backlog is still served by deadline and shed when
        full."""
        self.bus.flush()
        try:
            self._serve(runtime, req)
        finally:
            ack()
            self.bus.flush()
            self.queue.done(input_waiting=self.bus.unread_bytes() > ACKS_ONLY_BYTES)

    def _work(self) -> None:
        """The inference thread: serves what was queued, and calibrates in idle moments."""
        while not self._stop.is_set():
            try:
                (runtime, req, ack), deferred = self.queue.get(timeout=self.calibration.wait_s(IDLE_WAIT_S))
            except queue.Empty:
                if self.queue.claim(arriving=False):  # not while paho's thread serves a request
                    try:
                        self._calibrate(idle=True)  # idle for a pause: the right moment for a timed calibration run
                    finally:
                        self.queue.done()
                continue
            req.deferred = deferred
            try:
                self._serve(runtime, req)
            finally:
                ack()  # after the output is handed to the client: a node killed before this leaves it held
                self.queue.done()

    def _calibrate(self, idle: bool) -> None:
        """Give the calibration schedule its chance to run; hand over the curve when a slice is done."""
        finished = self.calibration.tick(time.monotonic(), idle)
        if finished is not None:
            self._calibrated(finished)

    def _serve(self, runtime: Runtime, req: Request) -> None:
        """One request, on whichever thread holds the queue's claim: run it and publish the output, or report why
        not."""
        self._calibrate(idle=False)  # under steady load, still make progress
        expired = self.admission.expired(req, runtime, time.time())
        if expired is not None:
            self._report(expired)
            return
        started = time.time()
        out = self._run(runtime, req, started)
        placement = self._placement()
        pipeline = runtime.assignment.pipeline if isinstance(runtime, StageRuntime) else 0
        topic = output_topic(self.topics, placement, out, pipeline) if out is not None else None
        if out is not None and topic is None:
            out, topic = self._finish_here(out, req, placement, pipeline)
        if out is None:
            return
        self._last_serve_s = time.time() - started
        self.bus.publish(topic, out.payload, qos=1, user=out.user)
        self.bus.flush()  # served on paho's thread: the output leaves now, before the bookkeeping and the thumbnail
        with self._lock:
            self._health.served(out.compute_s, out.decode_s, started - req.received_ts, req.deferred)
        if out.frame is not None and placement is not None and placement.thumbnails:
            self.thumbnails.offer(out.request_id, out.frame)  # made by the thumbnail thread, after it is served

    def _run(self, runtime: Runtime, req: Request, started: float) -> Output | None:
        """``runtime``'s output for ``req``, or None when it failed (reported as the request's failure)."""
        try:
            return runtime.run(req, started, self.slowdown)
        except BadMessage as exc:
            self._report(Report(req.topic, exc.kind, str(exc), req.request_id))
        except Exception as exc:  # never let one request kill the inference thread
            log.exception("%s: inference failed", self.settings.node_id)
            self._report(Report(req.topic, "internal", f"{type(exc).__name__}: {exc}", req.request_id))
        return None

    def _finish_here(self, out: Output, req: Request, placement: Placement | None,
                     pipeline: int) -> tuple[Output | None, str]:
        """An activation no stage of the placement in force reads: this node served it under a longer pipeline
        (queued before the placement lost its other stages), and no node subscribes to its old stage's input any
        more (a gone node's session, once the gateway took it over). The slice in force here runs the rest when it
        covers the block asked for; otherwise it goes to its old stage's topic, as before."""
        here = self._slice_in_force()
        if here is None or not here.assignment.first_block <= out.next_block <= here.assignment.last_block:
            log.warning("%s: no stage reads block %d of %s under the placement in force; sent to %s",
                        self.settings.node_id, out.next_block, out.request_id, out.topic)
            return out, out.topic
        rest = self._run(here, Request(out.topic, out.payload, out.user or {}, time.time(), activation=True,
                                       request_id=req.request_id, capture_ts=req.capture_ts), time.time())
        if rest is None:
            return None, out.topic
        return rest, output_topic(self.topics, placement, rest, pipeline) or rest.topic

    def _send_thumbnail(self, request_id: str, jpeg: bytes) -> None:
        """QoS 0 (docs/mqtt.md): a thumbnail is worth no retransmission, nor room in anyone's session queue."""
        self.bus.publish(self.topics.thumbnail(self.settings.node_id), jpeg, qos=0,
                         user={REQUEST_ID_PROPERTY: request_id})
