"""Schemas of every JSON payload on the bus.

Each receiver parses with :func:`parse_json` so that malformed input raises one
:class:`BadMessage` with a readable reason, never anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from shared.topics import validate_id

Id = Field(min_length=1, max_length=64, pattern=r"^[^/+#$\s]+$")
MAX_PIPELINES = 8  # parallel pipelines a placement may hold (gateway.hybrid.MAX_PARALLEL plans no more)
MAX_LABEL_INDEX = 9999  # a class index; labelled frames beyond it are rejected as malformed
TRUE_LABEL_PROPERTY = "true_label"  # MQTT v5 user property: the ground-truth class index of a labelled test frame
INGEST_STAGE = 0  # the hop number of an ingest node's decode, before stage 1
NodeRole = Literal["stage", "ingest"]  # what a node may be placed as: a stage (or the ingest), or only the ingest


class BadMessage(ValueError):
    """A received payload that does not follow its schema; ``kind`` names the failure class."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


def parse_json(model: type[M], payload: bytes, max_bytes: int = 1 << 20) -> M:
    """Validate a JSON payload against ``model``; raise :class:`BadMessage` on any problem.

    pydantic parses the bytes itself (in Rust): no Python objects in between, which is most of what a receiver of
    thousands of messages a second spends (the central collector, docs/scaling.md)."""
    if len(payload) > max_bytes:
        raise BadMessage("oversized", f"{model.__name__} payload of {len(payload)} B exceeds {max_bytes} B")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # not JSON, or not UTF-8
            raise BadMessage("bad_json", f"{model.__name__} payload is not JSON: {first['msg']}") from None
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BadMessage("bad_schema", f"{model.__name__}: {where}: {first['msg']}") from None


def to_json(model: BaseModel) -> bytes:
    return model.model_dump_json().encode("utf-8")


class StageAssignment(_Strict):
    """One pipeline stage: the node that runs blocks ``first_block..last_block`` (inclusive).

    ``replicas``: further nodes serving the same stage (docs/scaling.md, "Replicated stages"); they and
    ``node_id`` then read the stage's input through one MQTT v5 shared subscription, so the broker hands
    each message to one of them. Empty (the default, and what older gateways send): one node, as before.

    ``pipeline``: which of several parallel pipelines (each its own cut of the model, docs/scaling.md, "Parallel
    pipelines") the stage belongs to; 0 (the default, left out of the message) for the one pipeline of older plans.
    """

    stage: int = Field(ge=1, le=64)
    node_id: str = Id
    first_block: int = Field(ge=0)
    last_block: int = Field(ge=0)
    replicas: list[Annotated[str, Id]] = Field(default_factory=list, max_length=63)
    pipeline: int = Field(0, ge=0, le=MAX_PIPELINES - 1)

    @model_validator(mode="after")
    def _ordered(self) -> StageAssignment:
        if self.last_block < self.first_block:
            raise ValueError("last_block must be >= first_block")
        return self

    @model_serializer(mode="wrap")
    def _without_defaults(self, handler):
        """A one-node stage of the first pipeline serialises exactly as before, so nodes that predate replicas and
        parallel pipelines still parse it."""
        data = handler(self)
        if not self.replicas:
            data.pop("replicas", None)
        if not self.pipeline:
            data.pop("pipeline", None)
        return data

    @property
    def nodes(self) -> list[str]:
        """Every node serving this stage, ``node_id`` first."""
        return [self.node_id, *self.replicas]

    @property
    def replicated(self) -> bool:
        return bool(self.replicas)


class Placement(_Strict):
    """Retained on the placement topic: the whole pipeline, in order, covering every block once."""

    version: int = Field(ge=0, description="Increases with every re-plan; nodes ignore older versions.")
    model: str = Field(min_length=1, max_length=64)
    n_blocks: int = Field(ge=1)
    stages: list[StageAssignment] = Field(min_length=1, max_length=64)
    issued_at: float
    bottleneck_s: float | None = None
    ingest_node: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[^/+#$\s]+$",
                                    description="The node that decodes camera frames and sends stage 1 the "
                                    "model-sized input (stage 1 then reads its stage input); None: stage 1 decodes.")
    share_token: str | None = Field(None, min_length=8, max_length=32, pattern=r"^[A-Za-z0-9_-]+$",
                                    description="Names the shared-subscription groups of replicated stages "
                                                "(shared/topics.py: share_group); set when a stage has replicas.")
    slo_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                description="The gateway's current end-to-end SLO (the operator may change it): "
                                "nodes serve requests that can still meet it first (docs/reliability.md).")
    thumbnails: bool = Field(False, description="The node that accepts camera frames (stage 1 or the ingest node) "
                             "sends a thumbnail of each (shared/thumbnail.py): the site's gateway stores them "
                             "(`[gateway] thumbnail_budget_mb`).")

    @model_validator(mode="after")
    def _contiguous(self) -> Placement:
        """Each pipeline (listed one after the other, numbered from 0) covers every block once, in stages 1..n."""
        numbers = [s.pipeline for s in self.stages]
        if numbers != sorted(numbers) or sorted(set(numbers)) != list(range(numbers[-1] + 1)):
            raise ValueError(f"pipelines must be numbered 0..m and listed in order (got {numbers})")
        nodes = set()
        for j, stages in enumerate(self.pipelines):
            expected = 0
            for i, stage in enumerate(stages, start=1):
                if stage.stage != i:
                    raise ValueError(f"pipeline {j}'s stages must be numbered 1..n in order (got {stage.stage} at "
                                     f"position {i})")
                if stage.first_block != expected:
                    raise ValueError(f"pipeline {j} stage {i} starts at block {stage.first_block}, expected {expected}")
                for node in stage.nodes:
                    if node in nodes:
                        raise ValueError(f"node {node} appears in two stages (or twice in one)")
                    nodes.add(node)
                expected = stage.last_block + 1
            if expected != self.n_blocks:
                raise ValueError(f"pipeline {j}'s stages cover blocks 0..{expected - 1} but the model has "
                                 f"{self.n_blocks}")
        if self.ingest_node in nodes:
            raise ValueError(f"node {self.ingest_node} cannot both ingest and run a stage")
        if self.ingest_node is not None and len(self.pipelines) > 1:
            raise ValueError("an ingest node feeds one pipeline: parallel pipelines decode their own frames")
        if self.share_token is None and any(self.shares_input(s) for s in self.stages):
            raise ValueError("a placement with replicated stages or parallel pipelines needs a share_token")
        return self

    @model_serializer(mode="wrap")
    def _without_unused_fields(self, handler):
        """A placement without replicas, SLO or thumbnails serialises exactly as before (older nodes forbid unknown
        fields)."""
        data = handler(self)
        for name in ("share_token", "slo_s", "thumbnails"):
            if getattr(self, name) in (None, False):
                data.pop(name, None)
        return data

    def stage_of(self, node_id: str) -> StageAssignment | None:
        """The stage ``node_id`` serves, as its only node or as one of its replicas."""
        return next((s for s in self.stages if node_id in s.nodes), None)

    def job_of(self, node_id: str) -> Job | None:
        """What ``node_id`` does under this placement: ingest, serve a stage, or nothing (None)."""
        behind_ingest = self.ingest_node is not None
        if self.ingest_node == node_id:
            return Job(stage=INGEST_STAGE, takes_frames=True)
        stage = self.stage_of(node_id)
        if stage is None:
            return None
        return Job(stage=stage.stage, pipeline=stage.pipeline, first_block=stage.first_block,
                   last_block=stage.last_block, n_stages=len(self.pipeline_of(stage)),
                   takes_frames=stage.stage == 1 and not behind_ingest, shares_input=self.shares_input(stage),
                   behind_ingest=behind_ingest, assignment=stage)

    @property
    def pipelines(self) -> list[list[StageAssignment]]:
        """The stages of each pipeline, pipeline 0 first (one list for a placement of one pipeline)."""
        found: dict[int, list[StageAssignment]] = {}
        for stage in self.stages:
            found.setdefault(stage.pipeline, []).append(stage)
        return [found[j] for j in sorted(found)]

    def pipeline_of(self, stage: StageAssignment) -> list[StageAssignment]:
        """The stages of ``stage``'s pipeline, in order."""
        return [s for s in self.stages if s.pipeline == stage.pipeline]

    def is_last(self, stage: StageAssignment) -> bool:
        """Whether ``stage`` ends its pipeline (its nodes publish results)."""
        return stage.stage == len(self.pipeline_of(stage))

    def shares_input(self, stage: StageAssignment) -> bool:
        """Whether ``stage``'s nodes read their input through a shared subscription: it has replicas, or it is the
        first stage of parallel pipelines (one group over every pipeline's first stage deals the frames out)."""
        return stage.replicated or (stage.stage == 1 and len(self.pipelines) > 1)

    def node_ids(self) -> list[str]:
        """Every placed node, in stage order (a stage's replicas after its first node)."""
        return [n for s in self.stages for n in s.nodes]

    def all_nodes(self) -> list[str]:
        """Every node with a job: the stages' (:meth:`node_ids`), then the ingest node if there is one."""
        return self.node_ids() + ([self.ingest_node] if self.ingest_node is not None else [])


@dataclass(frozen=True)
class Job:
    """What one node does under a placement (:meth:`Placement.job_of`), the one answer the node agent, the
    gateway's handover and the doctor share: decode camera frames for stage 1 as the ingest node, or serve one stage
    of one pipeline."""

    stage: int  # INGEST_STAGE for the ingest node
    takes_frames: bool  # reads camera frames: the ingest node, or stage 1 with no ingest node before it
    pipeline: int = 0
    first_block: int | None = None  # None for the ingest node, which runs no block
    last_block: int | None = None
    n_stages: int = 0  # stages in its pipeline
    shares_input: bool = False  # reads through a shared subscription (Placement.shares_input)
    behind_ingest: bool = False  # an ingest node decodes the frames before stage 1
    assignment: StageAssignment | None = field(default=None, compare=False)  # the stage, with all its nodes

    @property
    def ingest(self) -> bool:
        return self.stage == INGEST_STAGE

    @property
    def is_last(self) -> bool:
        """The stage ends its pipeline: its nodes publish results."""
        return not self.ingest and self.stage == self.n_stages

    @property
    def work(self) -> tuple:
        """What the node computes: under a newer placement with the same work a node keeps its slice (and its pruning
        and calibration state), whichever pipeline the stage is in now and however its input is shared."""
        return (self.stage, self.first_block, self.last_block, self.is_last, self.takes_frames)

    @property
    def input(self) -> tuple:
        """What the node reads: a node whose input changes must subscribe before the placement is published."""
        return (self.pipeline, self.stage, self.takes_frames, self.shares_input)


class Hop(_Strict):
    """What one stage did with one request; all times are wall-clock seconds of that node."""

    stage: int = Field(ge=0, le=255, description=f"Pipeline stage; {INGEST_STAGE} = the ingest node's decode.")
    node_id: str = Id
    prune_ratio: float = Field(ge=0.0, le=1.0)
    received_ts: float
    started_ts: float
    finished_ts: float
    published_ts: float
    decode_s: float = Field(0.0, ge=0.0, description="Of started..finished, the time spent turning the payload "
                            "into the slice's input (a frame's JPEG/PNG decode at stage 1); 0 from older nodes.")
    deferred: bool = Field(False, description="The node served this request late: it had missed its deadline "
                           "(capture + SLO) and waited behind the timely ones (docs/reliability.md).")
    first_block: int | None = Field(None, ge=0, le=65534, description="The first model block this hop ran: its "
                                    "stage's first, or another while the placement moves (node_agent.runtime); "
                                    "None from older nodes and for the ingest hop.")
    n_blocks: int | None = Field(None, ge=0, le=65534, description="How many blocks from ``first_block`` it ran "
                                 "(0: it only forwarded an activation that had run its blocks already).")

    @model_validator(mode="after")
    def _blocks_together(self) -> Hop:
        if (self.first_block is None) != (self.n_blocks is None):
            raise ValueError("first_block and n_blocks are given together or not at all")
        return self

    @property
    def queue_s(self) -> float:
        return self.started_ts - self.received_ts

    @property
    def compute_s(self) -> float:
        """The slice's own compute: what pruning can shrink (decode excluded)."""
        return self.finished_ts - self.started_ts - self.decode_s


class Result(_Strict):
    """Published by the last stage for every classified frame."""

    request_id: str = Field(min_length=1, max_length=128)
    camera_id: str = Id
    capture_ts: float
    label: str = Field(min_length=1, max_length=64)
    label_index: int = Field(ge=0)
    scientific_name: str = Field("", max_length=128, description="The label's taxon, as the model's checkpoint "
                                 "names it ('' when it names none, e.g. blank).")
    confidence: float = Field(ge=0.0, le=1.0)
    hops: list[Hop] = Field(min_length=1, max_length=64)
    true_label: int | None = Field(None, ge=0, le=MAX_LABEL_INDEX,
                                   description="Ground truth of a labelled test frame (the camera's true_label).")


class NodeStats(_Strict):
    """Periodic health of a node agent (every ``stats_interval_s``)."""

    node_id: str = Id
    ts: float
    stage: int | None = None
    first_block: int | None = None
    last_block: int | None = None
    placement_version: int | None = None
    prepared_version: int | None = Field(None, description="The latest placement this node is subscribed for "
                                         "(its answer to a prepare command).")
    queue_depth: int = Field(ge=0)
    queue_capacity: int = Field(ge=1)
    processed: int = Field(ge=0)
    dropped: int = Field(ge=0, description="Requests dropped because the work queue was full.")
    late_served: int = Field(0, ge=0, description="Requests served after they had missed their deadline "
                             "(hop `deferred`), since start.")
    errors: dict[str, int] = Field(default_factory=dict, description="Bad inputs seen, by kind.")
    compute_mean_s: float | None = None
    compute_p95_s: float | None = None
    queue_wait_mean_s: float | None = None
    decode_mean_s: float | None = Field(None, description="Mean input decode per request (frames at stage 1), "
                                        "apart from compute_mean_s: pruning cannot shrink it.")
    cpu_percent: float = Field(ge=0.0)
    prune_ratio: float = Field(ge=0.0, le=1.0)
    emulated_slowdown: float = Field(1.0, ge=1.0, description="Compute stretch set by a `slowdown` command.")
    clock_offset_s: float | None = Field(None, allow_inf_nan=False,
                                         description="This node's clock minus the gateway's, from the time beacon "
                                                     "(None until a beacon arrived).")


class ClockBeacon(_Strict):
    """Published every ``[gateway] clock_beacon_s`` on the clock topic: the gateway's wall clock."""

    gateway_id: str = Id
    ts: float = Field(allow_inf_nan=False)


class DecodeCost(_Strict):
    """A device's cost of decoding one camera frame, fitted as ``fixed_s + per_megapixel_s x megapixels``
    from JPEGs of a few sizes decoded on the device itself (part of its profile: stage 1 pays it)."""

    fixed_s: float = Field(ge=0.0, allow_inf_nan=False)
    per_megapixel_s: float = Field(ge=0.0, allow_inf_nan=False)
    megapixels: list[float] = Field(min_length=2, max_length=16, description="Frame sizes measured.")
    seconds: list[float] = Field(min_length=2, max_length=16, description="Median decode time at each size.")

    def predict(self, megapixels: float) -> float:
        return self.fixed_s + self.per_megapixel_s * megapixels


class ErrorRecord(_Strict):
    """Published on the error topic whenever a component rejects an input."""

    component: str = Id
    ts: float
    topic: str = Field(max_length=512)
    kind: str = Field(max_length=64)
    message: str = Field(max_length=2000)
    request_id: str | None = Field(default=None, max_length=128)


class PruneDesired(_Strict):
    """Retained desired prune state for one node, issued by the gateway."""

    ratio: float = Field(ge=0.0, lt=1.0)
    seq: int = Field(ge=0)
    issued_at: float
    source: Literal["auto", "manual"] = "auto"
    reason: str = Field(default="", max_length=500)


class PruneState(_Strict):
    """Retained prune state a node actually applied (echo of :class:`PruneDesired`)."""

    ratio: float = Field(ge=0.0, lt=1.0)
    seq: int = Field(ge=0)
    applied_at: float
    switch_s: float = Field(ge=0.0)


class SliceCalibration(_Strict):
    """Retained on ``node/<id>/calibration``: the node's slice latency at each ladder ratio, measured
    on the node itself right after it takes a stage (the controller's latency curves)."""

    node_id: str = Id
    placement_version: int = Field(ge=0)
    first_block: int = Field(ge=0)
    last_block: int = Field(ge=0)
    ratios: list[float] = Field(min_length=3, max_length=64)
    latency_s: list[float] = Field(min_length=3, max_length=64)
    measured_at: float

    @model_validator(mode="after")
    def _paired(self) -> SliceCalibration:
        if len(self.ratios) != len(self.latency_s):
            raise ValueError("ratios and latency_s must have the same length")
        if any(not 0 <= r < 1 for r in self.ratios) or any(t <= 0 for t in self.latency_s):
            raise ValueError("ratios must lie in [0, 1) and latencies be positive")
        return self


class BlockProfile(_Strict):
    """One block as measured: latency on the measuring device, memory and wire size anywhere."""

    name: str = Field(min_length=1, max_length=64)
    latency_s: float = Field(ge=0, allow_inf_nan=False, description="Median latency at batch 1.")
    param_bytes: int = Field(ge=0, description="Parameters and buffers, as stored in memory.")
    activation_bytes: int = Field(ge=0, description="Peak activation: input + output tensor bytes of the block.")
    output_bytes: int = Field(ge=1, description="Output tensor bytes as sent on the wire.")


class ModelProfile(_Strict):
    """Contents of profile.json."""

    model: str = Field(min_length=1, max_length=64)
    host: str = Field(max_length=256, description="Where it was measured (informational).")
    threads: int = Field(ge=1)
    repeats: int = Field(ge=1)
    warmup: int = Field(ge=0)
    wire_dtype: Literal["float16", "float32"]
    blocks: list[BlockProfile] = Field(min_length=1, max_length=1024)

    def scaled(self, speed_factor: float) -> ModelProfile:
        """The same profile on a device ``speed_factor`` times slower (emulated devices)."""
        blocks = [b.model_copy(update={"latency_s": b.latency_s * speed_factor}) for b in self.blocks]
        return self.model_copy(update={"blocks": blocks})


class NodeProfile(_Strict):
    """Retained on ``<root>/node/<id>/profile``: what a node offers the placement planner."""

    node_id: str = Field(min_length=1, max_length=64)
    model_fingerprint: str = Field(min_length=1, max_length=64,
                                   description="Hash of the node's weights: only same-model nodes are placed.")
    memory_mb: float = Field(gt=0, allow_inf_nan=False, description="Memory a slice may use on this node.")
    uplink_mbit_s: float = Field(gt=0, allow_inf_nan=False, description="Bandwidth to the next stage.")
    profile: ModelProfile
    decode: DecodeCost | None = Field(None, description="This node's cost of decoding one camera frame, "
                                      "charged to whichever node runs stage 1 (absent from older nodes).")
    role: NodeRole = Field("stage", description="`ingest`: the planner may only make it the ingest node.")

    _check_id = field_validator("node_id")(lambda v: validate_id("node", v))


class SlowdownCommand(_Strict):
    """Emulate a transient slowdown (tests, benchmarks, demos): ``factor`` × the device speed's compute."""

    cmd: Literal["slowdown"]
    factor: float = Field(ge=1.0, le=1000.0)


class DeviceSpeedCommand(_Strict):
    """Emulate a slower device type (benchmarks): a base ``factor`` × this host's compute, under transient
    slowdowns. The node re-calibrates after it, as it would on new hardware."""

    cmd: Literal["device_speed"]
    factor: float = Field(ge=1.0, le=1000.0)


class CalibrateCommand(_Strict):
    """Re-measure the node's slice at every ladder ratio (e.g. after changing its hardware or threads)."""

    cmd: Literal["calibrate"]


class PrepareCommand(_Strict):
    """Get ready for ``placement`` before it is published: build the slice and subscribe to its input, then say
    so (``prepared_version`` in the node's stats). The gateway publishes it only then, so no stage sends to a
    node that is not yet listening (docs/reliability.md)."""

    cmd: Literal["prepare"]
    placement: Placement


class NodeCommand(RootModel[Annotated[SlowdownCommand | CalibrateCommand | DeviceSpeedCommand | PrepareCommand,
                                      Field(discriminator="cmd")]]):
    """A one-shot command on a node's ``cmd`` topic (never retained)."""


class _GatewayCommandBase(_Strict):
    """Every gateway command may carry an ``id`` (the gateway answers with a :class:`CommandReply`) and ``by``."""

    id: str | None = Field(None, max_length=64, description="Echoed in the gateway's CommandReply.")
    by: str | None = Field(None, max_length=64, description="Who sent it (the operator page's login).")


class ManualPruneCommand(_GatewayCommandBase):
    """Operator override: hold ``node_id`` at ``ratio`` (a ladder ratio), or hand it back with ``null``."""

    cmd: Literal["prune"]
    node_id: str = Id
    ratio: float | None = Field(ge=0.0, lt=1.0)


class RetireCommand(_GatewayCommandBase):
    """A node leaves the deployment for good: the gateway clears its retained topics."""

    cmd: Literal["retire"]
    node_id: str = Id


OperatorSetting = Literal["slo_s", "trigger_margin_s", "cooldown_s", "accuracy_floor_relative", "policy",
                          "move_blocks"]


class SetSettingCommand(_GatewayCommandBase):
    """Operator changes one control setting; the gateway validates it and keeps it across restarts.

    ``policy`` takes ``adaptive``, ``bottleneck``, ``paper`` or ``off`` (manual holds only); ``move_blocks``
    ``on`` or ``off`` (re-partitioning for slowdowns); the others a number.
    """

    cmd: Literal["set"]
    setting: OperatorSetting
    value: float | str


class RestoreAllCommand(_GatewayCommandBase):
    """Release every manual hold and set every node back to ratio 0 (the controller may prune again)."""

    cmd: Literal["restore_all"]


class NodeSlowdownCommand(_GatewayCommandBase):
    """For demonstrations: the gateway forwards it as the node's one-shot ``slowdown`` command."""

    cmd: Literal["node_slowdown"]
    node_id: str = Id
    factor: float = Field(ge=1.0, le=1000.0)


class CameraCommand(_GatewayCommandBase):
    """Operator describes a camera's deployment (Camtrap DP ``deployments``): where and when it stood."""

    cmd: Literal["camera"]
    camera_id: str = Id
    location_name: str = Field(min_length=1, max_length=200)
    latitude: float = Field(ge=-90.0, le=90.0)
    longitude: float = Field(ge=-180.0, le=180.0)
    start_ts: float
    end_ts: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> CameraCommand:
        if self.end_ts is not None and self.end_ts < self.start_ts:
            raise ValueError("the deployment must end after it starts")
        return self


class GatewayCommand(RootModel[Annotated[ManualPruneCommand | RetireCommand | SetSettingCommand | RestoreAllCommand
                                         | NodeSlowdownCommand | CameraCommand, Field(discriminator="cmd")]]):
    """A one-shot command on the gateway's ``cmd`` topic (never retained)."""


class CommandReply(_Strict):
    """The gateway's one-shot answer to a command that carried an ``id``: accepted, or why not."""

    id: str = Field(min_length=1, max_length=64)
    ok: bool
    message: str = Field(max_length=2000)
    ts: float
class AcceptedRequest(_Strict):
    """Stage 1 took a frame: the gateway's record that a result (or a failure) must follow for it."""

    request_id: str = Field(min_length=1, max_length=128)
    camera_id: str = Id
    node_id: str = Id
    capture_ts: float
    received_ts: float
    claimed_capture_ts: float | None = Field(
        default=None, description="The camera's capture time when it was implausible (capture_ts is then arrival).")
