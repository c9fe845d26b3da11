"""A node's job and input subscription as placements and prepare commands come: pure (no MQTT, no model).

The node agent asks this module what to do and carries it out: build a runtime, subscribe, unsubscribe, report
itself prepared (docs/architecture.md, "Moving stages"). Two messages drive it, both from the gateway:

- a *prepare* command names a placement not published yet (:class:`gateway.live_placement.Handover`): the node
  builds that placement's runtime and subscribes its input ahead of it, and reports the version prepared once the
  broker acknowledged the subscription; what arrives on that input meanwhile is another node's, unless the
  subscription is shared (the broker dealt it to this node alone) or no node reads that input under the placement in
  force (it was routed under the placement to come): those it serves with the prepared runtime;
- a *placement* puts a job in force: the prepared runtime if it was prepared for this version, a new one
  otherwise, or the one in force when the work is the same (:attr:`shared.schemas.Job.work`), so pruning and
  calibration state survive a re-plan that leaves this node's slice alone. An older placement than the one in
  force is ignored.

The runtimes themselves are the agent's (``R`` is opaque here). Not thread-safe: the agent calls it under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from shared import routing
from shared.schemas import Job, Placement
from shared.topics import Topics

R = TypeVar("R")  # the agent's runtime for a job: a model slice or the ingest node's decoder


@dataclass(frozen=True)
class Prepared(Generic[R]):
    """A runtime built and an input subscribed ahead of placement ``version``."""

    version: int
    job: Job
    input_filter: str
    runtime: R
    placement: Placement


@dataclass(frozen=True)
class Preparation:
    """What to do for a prepare command, in order: unsubscribe ``unsubscribe``; build ``build``'s runtime and hand
    it to :meth:`Assignment.hold`; then subscribe ``subscribe`` and report ``version`` prepared once the broker
    acknowledged it, or (``subscribe`` None) report it at once."""

    version: int
    unsubscribe: tuple[str, ...] = ()
    build: Job | None = None  # None: the work in force is the same, nothing to build or subscribe
    input_filter: str | None = None
    subscribe: str | None = None
    placement: Placement | None = None  # the placement prepared for (with ``build``)


@dataclass(frozen=True)
class Listen:
    """The input subscription to change: unsubscribe these, then subscribe that (None: keep what is subscribed)."""

    unsubscribe: tuple[str, ...] = ()
    subscribe: str | None = None


@dataclass(frozen=True)
class Switch(Generic[R]):
    """What a placement asks of the node: the job (None: idle) and, unless ``keep`` (the same work: the runtime in
    force stays, its assignment updated, ``listen`` already decided), the runtime to take: ``runtime`` prepared for
    it, or a new one built for ``job``; then :meth:`Assignment.take`."""

    placement: Placement
    job: Job | None
    keep: bool = False
    runtime: R | None = None
    input_filter: str | None = None
    prepared_filter: str | None = None
    listen: Listen | None = None


class Assignment(Generic[R]):
    """The job in force, the input it reads, and what is prepared for a placement to come."""

    def __init__(self, node_id: str, topics: Topics):
        self.node_id = node_id
        self.topics = topics
        self.version: int | None = None  # of the placement in force
        self.placement: Placement | None = None  # the one in force: where outputs go
        self.job: Job | None = None
        self.listening: str | None = None  # the subscription the job in force reads
        self.prepared: Prepared[R] | None = None
        self.prepared_version: int | None = None  # the last version reported prepared

    # --- a placement to come -----------------------------------------------------------------------------------
    def prepare(self, placement: Placement) -> Preparation | None:
        """A prepare command for ``placement``; None when there is nothing to prepare (no job in it for this node,
        or it is no newer than the one in force)."""
        job = placement.job_of(self.node_id)
        old, self.prepared = self.prepared, None
        if job is None or (self.version is not None and placement.version <= self.version):
            return None
        input_filter = routing.input_filter(self.topics, placement, self.node_id)
        stale = (old.input_filter,) if old and old.input_filter not in (input_filter, self.listening) else ()
        if self._same_work(job):  # the same slice; at most how its input is shared changes, when the placement comes
            return Preparation(placement.version, stale)
        return Preparation(placement.version, stale, job, input_filter,
                           None if input_filter == self.listening else input_filter, placement)

    def hold(self, preparation: Preparation, runtime: R) -> None:
        """The runtime built for ``preparation``: taken when its placement comes."""
        self.prepared = Prepared(preparation.version, preparation.build, preparation.input_filter, runtime,
                                 preparation.placement)

    def reported(self, version: int) -> None:
        self.prepared_version = version

    # --- a placement --------------------------------------------------------------------------------------------
    def place(self, placement: Placement) -> Switch[R] | None:
        """A placement came; None when it is older than the one in force (ignored). With the same work the switch
        is done here (``keep``); otherwise the agent builds what it must and calls :meth:`take`."""
        if self.version is not None and placement.version < self.version:
            return None
        prepared, self.prepared = self.prepared, None
        job = placement.job_of(self.node_id)
        input_filter = routing.input_filter(self.topics, placement, self.node_id)
        prepared_filter = prepared.input_filter if prepared else None
        if job is not None and self._same_work(job):  # under a newer plan: keep the slice and its state
            return Switch(placement, job, keep=True,
                          listen=self._enter(placement, job, input_filter, prepared_filter))
        runtime = prepared.runtime if job is not None and prepared and prepared.version == placement.version else None
        return Switch(placement, job, runtime=runtime, input_filter=input_filter, prepared_filter=prepared_filter)

    def take(self, switch: Switch[R]) -> Listen:
        """The agent holds the runtime for ``switch``'s job now: it is in force."""
        return self._enter(switch.placement, switch.job, switch.input_filter, switch.prepared_filter)

    # --- inputs -------------------------------------------------------------------------------------------------
    def serves(self, topic: str) -> bool:
        """Whether ``topic`` is the input the job in force reads."""
        return self.job is not None and self._reads(self.job, self.listening, topic)

    def prepared_for(self, topic: str, handed_over: bool = False) -> R | None:
        """The prepared runtime, for an input that came on the subscription joined ahead of its placement and can
        only be this node's: through a shared subscription (the broker gave it to this node alone among the stage's
        readers), or on a topic no node reads under the placement in force here, so it was routed under the
        placement to come (e.g. a restarted node's stage: upstream had the new placement first). Left unserved, it
        would be lost. An input some node reads now is that node's until the placement comes, or until that node
        handed the topic over (``handed_over``: its marker came, :meth:`leaving_reader`)."""
        prepared = self.prepared
        if prepared is None or not self._reads(prepared.job, prepared.input_filter, topic):
            return None
        if handed_over or prepared.input_filter.startswith("$share/") or not self._read_in_force(topic):
            return prepared.runtime
        return None

    def leaving_reader(self, topic: str) -> str | None:
        """The node this one takes ``topic`` over from: it reads the topic under the placement in force and not
        under the one prepared here, whose job here reads it through a plain subscription. Its inputs are held until
        that node's hand-over marker (:mod:`node_agent.input_handover`). None for camera frames (a node may not
        publish a marker on a camera's topic) and shared inputs (the broker deals each to one reader)."""
        prepared, in_force = self.prepared, self.placement
        if (prepared is None or in_force is None or prepared.job.takes_frames
                or prepared.input_filter.startswith("$share/")
                or not self._reads(prepared.job, prepared.input_filter, topic)):
            return None
        for node in in_force.all_nodes():
            if node != self.node_id and self._reads_under(in_force, node, topic) and not self._reads_under(
                    prepared.placement, node, topic):
                return node
        return None

    def _reads_under(self, placement: Placement, node: str, topic: str) -> bool:
        job = placement.job_of(node)
        return job is not None and self._reads(job, routing.input_filter(self.topics, placement, node), topic)

    def _read_in_force(self, topic: str) -> bool:
        """Whether some node reads ``topic`` under the placement in force here."""
        placement = self.placement
        return placement is not None and any(self._reads_under(placement, node, topic)
                                             for node in placement.all_nodes())

    # --- helpers ------------------------------------------------------------------------------------------------
    def _same_work(self, job: Job) -> bool:
        return self.job is not None and self.job.work == job.work

    def _enter(self, placement: Placement, job: Job | None, input_filter: str | None,
               prepared_filter: str | None) -> Listen:
        """Put ``job`` in force; subscribe its input instead of the old one, keeping the one subscribed ahead of the
        placement if it is the new one."""
        self.version, self.placement, self.job = placement.version, placement, job
        old, self.listening = self.listening, input_filter
        stale = tuple(f for f in dict.fromkeys((old, prepared_filter)) if f is not None and f != input_filter)
        new = input_filter if input_filter and input_filter not in (old, prepared_filter) else None
        return Listen(stale, new)

    def _reads(self, job: Job, subscription: str | None, topic: str) -> bool:
        """Whether ``topic`` is the input ``job`` reads through ``subscription``."""
        if job.takes_frames:
            return self.topics.camera_id_from_frame_topic(topic) is not None
        if subscription is not None and subscription.startswith("$share/"):  # $share/<group>/<topic>
            subscription = subscription.split("/", 2)[2]
        return topic == subscription
