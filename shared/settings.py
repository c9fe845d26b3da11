"""Every setting of every component, with its default, range and meaning: the one source of defaults.

Values come from, highest priority first: command-line flags, environment variables
``EDGEPRUNE_<SECTION>_<FIELD>`` (e.g. ``EDGEPRUNE_NODE_QUEUE_SIZE=8``), then the section
``[<section>]`` of an optional TOML file named by ``--config`` or ``EDGEPRUNE_CONFIG``.
``edgeprune config`` prints them all; docs/configuration.md is generated from these classes.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from shared.ladder import DEFAULT_LADDER
from shared.schemas import NodeRole
from shared.topics import validate_id

CONFIG_ENV = "EDGEPRUNE_CONFIG"
_file_values: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("file_values", default={})


class SettingsError(Exception):
    """A setting is invalid; the message is one line naming the field and where it came from."""


class _FileSection(PydanticBaseSettingsSource):
    """Values of this component's section of the TOML file (set by :func:`load`)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _file_values.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get())


class _Section(BaseSettings):
    section: ClassVar[str]

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _FileSection(settings_cls)


def _ids(value: Any) -> Any:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return value


# The one place that sizes a frame: the node's input limit, and the broker's packet limit with room for
# the MQTT header, topic and user properties on top. A 12 MP camera JPEG can be ~9 MB, a 20-24 MP one
# 12-15 MB; 16 MiB takes them all (what a camera sees beyond it: docs/mqtt.md, "Frame size").
FRAME_LIMIT_BYTES = 16 << 20
MQTT_OVERHEAD_BYTES = 64 << 10


class MqttSettings(_Section):
    section: ClassVar[str] = "mqtt"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_MQTT_", extra="forbid")

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    keepalive_s: int = Field(15, ge=5, le=600, description="MQTT keepalive; the last will fires after ~1.5x this.")
    username: str | None = Field(None, description="Broker user name (when the broker requires auth).")
    password: SecretStr | None = Field(None, description="Broker password.")
    tls_ca: Path | None = Field(None, description="CA certificate file; set it to connect over TLS.")
    topic_root: str = Field("edgeprune", min_length=1, max_length=64, pattern=r"^[^+#$\s]+$",
                            description="Root of the topic tree, to share a broker between deployments.")
    reconnect_max_s: int = Field(30, ge=1, le=600, description="Longest wait between reconnect attempts.")
    session_expiry_s: int = Field(3600, ge=0, le=7 * 86400,
                                  description="How long the broker keeps a disconnected component's session "
                                  "(subscriptions and queued QoS 1 messages); 0 = none.")


class BrokerSettings(_Section):
    section: ClassVar[str] = "broker"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_BROKER_", extra="forbid")

    bind: str = Field("127.0.0.1", description="Address mosquitto listens on (0.0.0.0 to serve other devices).")
    port: int = Field(1883, ge=1, le=65535, description="Port mosquitto listens on.")
    data_dir: Path = Field(Path("run/broker"), description="Persistence folder (retained messages, sessions).")
    max_packet_size: int = Field(FRAME_LIMIT_BYTES + MQTT_OVERHEAD_BYTES, ge=1024, le=256 << 20,
                                 description="Largest MQTT packet (payload + headers) the broker accepts, bytes; "
                                 "keep it above the node's max_payload_bytes plus MQTT overhead.")
    max_queued_messages: int = Field(1000, ge=0, description="Per-client queue bound for offline/slow clients.")
    allow_anonymous: bool = Field(False, description="Accept clients without a user name (a closed lab network only).")
    credentials_dir: Path | None = Field(None, description="Password file and ACL (`edgeprune credentials`); "
                                         "default: <data_dir>/credentials.")
    tls_port: int | None = Field(None, ge=1, le=65535, description="Also listen with TLS on this port.")
    tls_dir: Path | None = Field(None, description="Folder with ca.crt, server.crt, server.key for the TLS "
                                 "listener (install.sh --tls makes a self-signed set).")
    tls_bind: str | None = Field(None, description="Address the TLS listener listens on; default: bind. A central "
                                 "broker serves sites over TLS (0.0.0.0) and its collector on plain loopback.")

    @property
    def credentials_folder(self) -> Path:
        return self.credentials_dir or self.data_dir / "credentials"


class SiteSettings(_Section):
    """This site's link to a central broker (a Mosquitto bridge in the site broker's config)."""

    section: ClassVar[str] = "site"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_SITE_", extra="forbid")

    site_id: str = Field("", max_length=64, pattern=r"^[^/+#$\s]*$",
                         description="This site's id at the centre; empty: no bridge (a stand-alone site).")
    central_host: str = Field("127.0.0.1", description="Central broker host the site's broker bridges to.")
    central_port: int = Field(1883, ge=1, le=65535, description="Central broker port.")
    bridge_username: str | None = Field(None, description="The bridge's own user name at the central broker.")
    bridge_password: SecretStr | None = Field(None, description="The bridge's password at the central broker.")
    bridge_tls_ca: Path | None = Field(None, description="CA certificate of the central broker; set it for TLS.")
    bridge_keepalive_s: int = Field(10, ge=5, le=600, description="Bridge keepalive: how fast a cut link is noticed.")
    bridge_restart_max_s: int = Field(30, ge=1, le=3600, description="Longest wait between bridge reconnects.")


class CollectSettings(_Section):
    """The central role that writes every site's results into one database (SQLite or PostgreSQL)."""

    section: ClassVar[str] = "collect"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_COLLECT_", extra="forbid")

    db: str = Field("run/central.sqlite", description="Every site's rows (site column): an SQLite file, or a "
                    "`postgresql://` URL (docs/scaling.md).")
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="How long the central broker keeps queuing "
                                  "for the collector while it is down (its persistent session).")


class NodeSettings(_Section):
    section: ClassVar[str] = "node"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_NODE_", extra="forbid")

    node_id: str = Field("node-1", description="This device's id; one topic level, unique in the deployment.")
    checkpoint: Path | None = Field(None, description="Model checkpoint; default: the one shipped in shared/assets.")
    threads: int = Field(1, ge=1, le=64, description="torch intra-op threads for inference.")
    queue_size: int = Field(16, ge=1, le=10000,
                            description="Bounded work queue; when full, the request that would be served last is "
                            "dropped, counted and reported (with flow_control it holds only QoS 0 input and an input "
                            "re-sent after a reconnect).")
    flow_control: bool = Field(False, description="Take one QoS 1 input at a time (MQTT v5 Receive Maximum 1), so a "
                               "backlog waits in the broker and is never dropped; costs the deadline order of a "
                               "backlog (docs/reliability.md, 'Flow control'); off: the broker sends up to its "
                               "max_inflight_messages and a full work queue sheds, recorded.")
    deadline_order: bool = Field(True, description="Serve first the requests that can still meet the gateway's SLO "
                                 "(earliest deadline), late ones after them, marked `deferred`; off: arrival order. It "
                                 "orders the work queue: with flow_control a backlog waits in the broker, in order.")
    wire_dtype: Literal["float16", "float32"] = Field("float16", description="Precision of activations sent on.")
    handover_timeout_s: float = Field(5.0, gt=0, le=600, description="In a move, how long after this node took a "
                                      "stage topic over it waits for the old reader's hand-over marker before serving "
                                      "the inputs it held meanwhile (a duplicate at worst; docs/placement.md).")
    stats_interval_s: float = Field(2.0, gt=0, le=3600, description="How often stats are published.")
    max_payload_bytes: int = Field(FRAME_LIMIT_BYTES, ge=1024, description="Inputs larger than this are rejected "
                                   "(a frame: accepted, then recorded as the failure `oversized`).")
    max_frame_age_s: float = Field(300.0, ge=0, description="A frame captured longer ago than this when stage 1 "
                                   "would run it is recorded as `expired`, not run (0 = never).")
    capture_past_s: float = Field(86400.0, gt=0, description="A capture time further before arrival is implausible: "
                                  "reported, and the frame is timed from its arrival.")
    capture_future_s: float = Field(300.0, ge=0, description="Clock skew allowed for capture times after arrival.")
    memory_mb: float = Field(0.0, ge=0, description="Memory a slice may use, MB; 0 = half of this device's RAM.")
    uplink_mbit_s: float = Field(1000.0, gt=0, description="Bandwidth to the next stage, for placement.")
    profile_repeats: int = Field(10, ge=1, le=1000, description="Timed runs per block when profiling at start.")
    emulated_slowdown: float = Field(1.0, ge=1.0, le=1000.0,
                                     description="Emulate a slower device from the start (profile included).")
    device_model: Path | None = Field(None, description="A device model JSON (shared/device_model.py, written by "
                                      "`edgeprune bench pipeline`): each stage then takes exactly slowdown x the "
                                      "model's time of its blocks at its ratio, the same device for every run "
                                      "(empty: stretch by this node's own calibration).")
    profile: Path | None = Field(None, description="A profile.json (`edgeprune profile`) to offer the planner "
                                 "instead of measuring at start (empty: measure): the same file gives the same "
                                 "placement every start.")
    reduced_decode: bool = Field(True, description="Decode camera frames straight at (about) the model's input "
                                 "size; false decodes every pixel first (only to benchmark against).")
    role: NodeRole = Field("stage", description="`stage`: the planner may give this node a stage or make it the "
                           "ingest node (decoding frames for stage 1); `ingest`: only the ingest node.")

    _check_id = field_validator("node_id")(lambda v: validate_id("node", v))
    _empty_profile = field_validator("profile", "device_model", mode="before")(lambda v: None if v == "" else v)


RetainedTable = Literal["requests", "windows", "runs", "placements", "prune_events", "calibrations", "errors",
                        "thumbnails"]
"""Tables with a time column that ``[gateway] keep_days`` can bound (gateway/retention.py)."""
DEFAULT_KEEP_DAYS: dict[str, float] = {"requests": 365, "windows": 365, "runs": 365, "placements": 90,
                                       "prune_events": 90, "calibrations": 30, "errors": 30, "thumbnails": 365}


class GatewaySettings(_Section):
    section: ClassVar[str] = "gateway"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_GATEWAY_", extra="forbid")

    gateway_id: str = Field("gateway", description="Component id on the bus.")
    db_path: Path = Field(Path("run/edgeprune.db"), description="SQLite file for requests and SLO windows.")
    nodes: Annotated[list[str], NoDecode] = Field(["node-1", "node-2"], min_length=1, max_length=64,
                                                  description="Node ids the pipeline may use (comma-separated in env).")
    slo_s: float = Field(0.5, gt=0, le=600, description="End-to-end latency objective per frame, seconds.")
    window_s: float = Field(10.0, gt=0, le=3600, description="Length of one SLO accounting window, seconds.")
    flush_interval_s: float = Field(0.5, gt=0, le=60, description="Longest a result waits before its batch is written.")
    max_pending_rows: int = Field(20_000, ge=100, le=1_000_000, description=(
        "Rows per table kept while the database cannot be written (full or locked); beyond it the oldest "
        "are dropped, counted and logged."))
    startup_wait_s: float = Field(20.0, ge=0, le=3600,
                                  description="How long to wait for every configured node before placing on those "
                                  "present.")
    rejoin_hold_s: float = Field(10.0, ge=0, le=3600,
                                 description="A (re)joining node must stay online this long before it is used.")
    prepare_timeout_s: float = Field(15.0, gt=0, le=600, description="A new placement is published once every node "
                                     "that needs a new input for it has subscribed, or after this long.")
    replan_min_gain: float = Field(0.1, ge=0, lt=1,
                                   description="Re-place for a joining node only if the bottleneck improves by this "
                                   "fraction; also what a dedicated ingest node must gain over decoding on stage 1.")
    accuracy_model: Path | None = Field(None, description="Per-block accuracy calibration (JSON from `edgeprune "
                                        "calibrate`); default: the one shipped beside the checkpoint.")
    frame_megapixels: float = Field(0.0, ge=0, le=40, description="Size of this site's camera frames, megapixels "
                                    "(12 for a 4000x3000 trap): the planner charges its decode to stage 1. 0 = frames "
                                    "already at the model's size.")
    clock_beacon_s: float = Field(2.0, gt=0, le=3600,
                                  description="How often the gateway publishes its time beacon (nodes measure their "
                                              "clock offset from it).")
    max_clock_offset_s: float = Field(0.05, gt=0, le=3600,
                                      description="A node whose clock is further than this from the gateway's is "
                                                  "flagged, and the latencies it stamps are marked unreliable.")
    keep_days: dict[RetainedTable, float] = Field(
        DEFAULT_KEEP_DAYS, description="Days each table's rows are kept (JSON in env); tables you name override "
                                       "their default, results are kept longest. Node, profile and controller state "
                                       "is never pruned.")
    maintenance_interval_s: float = Field(600.0, gt=0, le=86400,
                                          description="How often old rows are deleted, the WAL is truncated and "
                                                      "free disk space is checked.")
    min_free_mb: float = Field(1024.0, ge=0, description="Below this much free space on the database's disk the "
                               "gateway stops storing per-hop detail (`hops`); below a quarter of it, per-frame rows "
                               "too (SLO windows, errors and classification go on). 0 = no guard.")
    thumbnail_budget_mb: float = Field(0.0, ge=0, le=1_000_000, description=(
        "Keep a thumbnail (a JPEG of at most 240 px, ~6 KB) of every frame, shown beside its detection and exported "
        "with Camtrap DP, in at most this many MB of the database: past it the oldest are deleted (checked every "
        "maintenance_interval_s). 0 = none: off by default, since camera traps also photograph people, and "
        "keeping their pictures is the site's decision (docs/api.md, \"Thumbnails\")."))
    recalibrate_below_r2: float = Field(0.5, ge=0, le=1, description="A slice calibration whose best latency fit "
                                        "explains less of the variance than this (R², e.g. a busy host's noise) is "
                                        "kept, and the node is asked to calibrate again, at most "
                                        "recalibrate_attempts times per placement. 0 = never.")
    recalibrate_attempts: int = Field(2, ge=0, le=10, description="How many times per placement a node is asked to "
                                      "re-calibrate a poorly fitting slice (recalibrate_below_r2), or one no "
                                      "latency curve fits (refused, so the controller stays off meanwhile).")
    stats_silence_s: float = Field(10.0, gt=0, le=3600, description="A node with no stats for this long is "
                                   "treated as offline (hung) until it speaks again; keep it above the nodes' "
                                   "stats_interval_s.")
    result_timeout_s: float = Field(120.0, gt=0, le=86400, description="An accepted frame with neither a result "
                                    "nor a failure report after this long is recorded as failed (`lost`).")
    replace_on_violation: bool = Field(
        False, description="Run-time re-partitioning: when the controller acts on a violation (with `adaptive`: "
                           "on every decision it makes for a slowdown), re-plan block boundaries with the measured "
                           "slowdowns and prune the new slices (and move back once they are gone); needs the "
                           "controller running. Off by default: a move rebuilds slices on every node it touches.")
    placement_mode: Literal["pipeline", "hybrid", "data", "parallel"] = Field(
        "pipeline", description="`pipeline`: one pipeline over the nodes. `hybrid`: the hybrid planner's plan for "
                                "`hybrid_arrival_hz` and the SLO: one pipeline or parallel pipelines (each its own "
                                "cut of the model), whose stages may be served by several nodes "
                                "(replicas sharing the stage's input through an MQTT shared subscription; "
                                "docs/scaling.md). "
                                "`data`: the whole model on every node that holds it, as replicas of one stage. "
                                "`parallel`: the hybrid planner's best plan of at least two parallel pipelines "
                                "(for comparisons: `hybrid` takes them when they are best).")
    hybrid_arrival_hz: float = Field(1.0, gt=0, le=10000, description="The arrival rate (frames/s) a `hybrid` "
                                     "placement is planned for. It does not change which plan is chosen: unpruned, "
                                     "the planner takes the plan sustaining the highest rate within the SLO at any "
                                     "rate (docs/scaling.md).")
    checkpoint: Path | None = Field(None, description="The checkpoint the nodes run (set it with [node] checkpoint "
                                    "when you train your own): the gateway places only nodes with these weights and "
                                    "loads their accuracy model; default: the one shipped in shared/assets.")
    # Re-planning for a persistent change of the arrival rate (gateway/arrival.py, docs/placement.md).
    rate_replan: Literal["off", "log", "apply"] = Field(
        "log", description="On a persistent arrival-rate change, run the hybrid planner for the new rate: 'log' "
                           "records its plan (prune_events kind rate_replan; nothing moves), 'apply' also publishes "
                           "it when a placement can run it (blocks move, nodes re-calibrate), 'off' does neither.")
    rate_window_s: float = Field(3600.0, gt=0, le=7 * 86400, description="The arrival rate is the frames stage 1 "
                                 "accepted over this window; long enough to average camera-trap bursts.")
    rate_band: float = Field(0.5, gt=0, lt=1, description="A rate within ± this fraction of the rate the current plan "
                             "was made for counts as unchanged.")
    rate_dwell_s: float = Field(7200.0, ge=0, le=30 * 86400, description="The rate must stay outside the band, on "
                                "one side, this long before a re-plan: bursts shorter than this minus rate_window_s "
                                "never trigger one.")
    rate_min_interval_s: float = Field(14400.0, ge=0, le=30 * 86400,
                                       description="At least this long between two rate re-plans.")
    rate_floor_hz: float = Field(0.05, gt=0, description="Rates below this count as this (a quiet night's change "
                                 "from 0.01 to 0.03 frames/s is not a new season).")

    _split_nodes = field_validator("nodes", mode="before")(_ids)

    @field_validator("nodes")
    @classmethod
    def _unique_ids(cls, nodes: list[str]) -> list[str]:
        for node in nodes:
            validate_id("node", node)
        if len(set(nodes)) != len(nodes):
            raise ValueError("node ids must be unique")
        return nodes

    @field_validator("keep_days")
    @classmethod
    def _positive_days(cls, keep: dict[str, float]) -> dict[str, float]:
        if any(days <= 0 for days in keep.values()):
            raise ValueError("keep_days values must be positive")
        return {**DEFAULT_KEEP_DAYS, **keep}


class CameraSettings(_Section):
    section: ClassVar[str] = "camera"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_CAMERA_", extra="forbid")

    camera_id: str = Field("cam-1", description="Camera id; the frame topic's level.")
    rate_hz: float = Field(2.0, gt=0, le=1000, description="Mean frames per second.")
    arrival: Literal["fixed", "poisson", "bursts", "replay"] = Field(
        "poisson", description="Arrival process: 'fixed' or 'poisson' at rate_hz; 'bursts' of camera-trap sequences "
                               "(camera/arrivals.py); 'replay' of trace_csv's capture times.")
    cameras: int = Field(1, ge=1, le=1000, description="Cameras simulated by 'bursts' (ids camera_id-1..N when > 1).")
    time_scale: float = Field(1.0, gt=0, le=100000,
                              description="'bursts'/'replay': divide every trace time by this (10 = 10x faster).")
    duration_s: float = Field(0.0, ge=0, description="'bursts'/'replay': stop after this many (scaled) seconds; "
                                                     "0 = a whole trace (bursts: one day of trace time).")
    trace_csv: Path | None = Field(None, description="'replay': CSV file with one row per captured frame.")
    time_column: str = Field("datetime", description="'replay': column of capture times.")
    camera_column: str | None = Field(None, description="'replay': column naming the camera (else camera_id).")
    time_format: str | None = Field(None, description="'replay': strptime format of time_column; default: "
                                                      "epoch seconds or ISO 8601.")
    labelled: bool = Field(False, description="Publish labelled test frames of the synthetic dataset, with the "
                                              "ground truth in the true_label user property (benchmarks).")
    count: int = Field(0, ge=0, description="Frames to send; 0 = until stopped.")
    seed: int = Field(0, description="Seed of the synthetic scenes and the arrival process.")
    image_format: Literal["png", "jpeg"] = Field("png", description="Encoding of published frames.")
    size: int = Field(64, ge=16, le=4096, description="Side of the synthetic frames, pixels.")
    images: Path | None = Field(None, description="Folder of JPEG/PNG files to publish as they are (native size, "
                                "in name order, looping) instead of synthetic frames.")

    _check_id = field_validator("camera_id")(lambda v: validate_id("camera", v))


class WebSettings(_Section):
    section: ClassVar[str] = "web"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_WEB_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address the operator page listens on.")
    port: int = Field(8080, ge=1, le=65535, description="Port of the operator page.")
    db_path: Path = Field(Path("run/edgeprune.db"), description="The gateway's SQLite file (read only).")
    recent_s: float = Field(300.0, gt=0, le=86400, description="How far back the latency chart looks, seconds.")
    gateway_id: str = Field("gateway", description="The gateway the page sends operator commands to.")
    command_timeout_s: float = Field(5.0, gt=0, le=120, description="How long the page waits for the gateway's "
                                     "answer to a command.")
    password_hash: SecretStr | None = Field(None, description="Operator password hash, set by `edgeprune passwd`; "
                                            "none = nobody can log in.")
    secret_key: SecretStr | None = Field(None, description="Signs session cookies and CSRF tokens; none = a random "
                                         "key per start. Logins are held in the page's process: a restart ends "
                                         "them either way.")
    public_status: bool = Field(False, description="Show the overview and detections read-only without login.")
    login_attempts_per_minute: int = Field(5, ge=1, le=1000,
                                           description="Failed logins allowed per name and client address per "
                                           "minute (4x that per address, whatever the names).")
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="How long a login lasts.")
    demo: bool = Field(False, description="Show the demo's emulated-slowdown control on the page (`edgeprune demo` "
                       "sets it; a real site has no use for it).")


class ControllerSettings(_Section):
    """The pruning controller (gateway/controller.py): trigger, restore and policy; times in seconds."""

    section: ClassVar[str] = "controller"
    model_config = SettingsConfigDict(env_prefix="EDGEPRUNE_CONTROLLER_", extra="forbid", frozen=True)

    policy: Literal["adaptive", "bottleneck", "paper"] = Field("adaptive", description=(
        "'adaptive' (ours, docs/controller.md): acts on the first slowed frames' compute and on the arrival rate, "
        "with the end-to-end trigger as a safety net; 'bottleneck': the same ratio solver behind the sustained "
        "end-to-end trigger only; 'paper': the paper's rule behind that trigger."))
    ladder: Annotated[tuple[float, ...], NoDecode] = Field(DEFAULT_LADDER, description=(
        "Ratios the controller chooses from, ascending from 0, each < 1; every node must have a variant for each "
        "(the gateway refuses a ladder a node's calibration does not cover)."))
    max_ratio: float = Field(0.9, ge=0, lt=1, description="Highest ratio a policy may choose (p_max).")
    accuracy_floor_relative: float = Field(
        0.9, gt=0, le=1, description="A_min as a fraction of the predicted unpruned accuracy.")
    accuracy_model: Literal["logistic", "measured"] = Field(
        "measured", description="Accuracy predictor: 'measured' (best calibrated accuracy among vectors pruning "
                                "at least as much: a lower bound) or the paper's fitted 'logistic' (docs/controller.md "
                                "shows where it overrates accuracy).")
    budget_fraction: float = Field(
        0.8, gt=0, le=1, description="Stage budget = this × SLO / stages; the rest of the SLO is for transport "
                                     "and queueing.")
    trigger_margin_s: float = Field(0.05, ge=0, description="LAT_trigger = SLO + this.")
    trigger_window_s: float = Field(10.0, gt=0, description="Sliding window the violation fraction is taken over.")
    trigger_fraction: float = Field(0.5, gt=0, le=1,
                                    description="Fraction of requests over LAT_trigger in the window that fires.")
    trigger_min_span_s: float = Field(
        5.0, ge=0, description="Violating requests must span at least this long: a burst shorter never fires.")
    min_samples: int = Field(5, ge=1, description="Fewest requests in a window to judge it (trigger or restore).")
    cooldown_s: float = Field(15.0, ge=0, description="LAT_cooldown: no new action this long after one.")
    restore_window_s: float = Field(20.0, gt=0, description="Headroom must hold this long before each restore step.")
    restore_latency_fraction: float = Field(0.7, gt=0, lt=1, description="Headroom: latency ≤ this × SLO.")
    restore_fraction: float = Field(0.95, gt=0, le=1,
                                    description="Fraction of requests in the restore window that must have headroom.")
    slowdown_gone: float = Field(1.25, ge=1, description="A node's slowdown at or below this counts as gone.")
    slowdown_smoothing: float = Field(0.7, gt=0, le=1,
                                      description="EWMA weight of the newest slowdown sample (1 = no smoothing).")
    fast_restore: bool = Field(True, description="Once a node's slowdown is gone, restore it in one decision to the "
                                                 "lowest ratio its curve fits within restore_headroom x the budget "
                                                 "(then the step-wise restore confirms any rest).")
    fast_restore_confirm_s: float = Field(
        2.0, ge=0, description="A node's slowdown must stay gone this long (and the latency not be violating) "
                               "before a fast restore.")
    restore_max_queue: int = Field(2, ge=0, le=10000, description=(
        "adaptive: no ratio is lowered while a node of the pipeline reports more requests than this queued (a "
        "burst's frames still waiting need the burst's pace after its arrivals have stopped)."))
    restore_headroom: float = Field(0.8, gt=0, le=1,
                                    description="A fast restore picks a ratio predicted within this x the stage "
                                    "budget.")
    detect_frames: int = Field(3, ge=1, le=50, description=(
        "adaptive: a node's slowdown estimate moves when this many consecutive frames' compute agree it is off "
        "(one slow frame is a scheduling spike, not a slowdown)."))
    detect_margin: float = Field(0.5, gt=0, le=10, description=(
        "adaptive: frames agree a node is slower when compute / calibrated > estimate x (1 + this), faster when "
        "< estimate / (1 + this)."))
    arrival_window_s: float = Field(2.0, gt=0, le=60, description=(
        "adaptive: the arrival rate each stage must keep up with is the frames stage 1 accepted over this window "
        "(short, so a burst counts while it is on)."))
    burst_window_s: float = Field(0.5, ge=0, le=60, description=(
        "adaptive: the rate over this shorter window counts too when it is higher (the arrival rate is the larger "
        "of the two), so a burst is seen within a tick of its start rather than as it fills arrival_window_s; "
        "0 turns it off."))
    utilisation: float = Field(0.8, gt=0, le=1, description=(
        "adaptive: each stage's time per frame must stay under this / (its share of the arrival rate); 0 < u < 1 "
        "leaves room for a queue to drain."))

    _split_ladder = field_validator("ladder", mode="before")(
        lambda v: [float(x) for x in v.split(",")] if isinstance(v, str) else v)

    @model_validator(mode="after")
    def _consistent(self) -> ControllerSettings:
        ladder = self.ladder
        if not ladder or ladder[0] != 0.0 or any(b <= a for a, b in zip(ladder, ladder[1:])) or ladder[-1] >= 1:
            raise ValueError("ladder must start at 0, increase, and stay below 1")
        if self.trigger_min_span_s > self.trigger_window_s:
            raise ValueError("trigger_min_span_s must not exceed trigger_window_s")
        return self


ALL_SECTIONS: tuple[type[_Section], ...] = (
    MqttSettings, BrokerSettings, NodeSettings, GatewaySettings, ControllerSettings, CameraSettings, WebSettings,
    SiteSettings, CollectSettings)

S = TypeVar("S", bound=_Section)


def _read_file(config_file: Path | None) -> dict[str, Any]:
    path = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def load(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build ``cls`` from flags (``overrides`` that are not None), env and the config file."""
    data = _read_file(config_file).get(cls.section, {})
    if not isinstance(data, dict):
        raise SettingsError(f"[{cls.section}] in the config file must be a table")
    token = _file_values.set(data)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "?"
        env = f"{cls.model_config['env_prefix']}{str(err['loc'][0]).upper()}" if err["loc"] else ""
        shown = repr(err.get("input")) if not isinstance(err.get("input"), dict) else ""
        raise SettingsError(
            f"invalid setting {cls.section}.{name}{' = ' + shown if shown else ''}: {err['msg']} "
            f"(set by flag, {env} or [{cls.section}] {name} in the config file)") from None
    finally:
        _file_values.reset(token)


def non_defaults(settings: _Section) -> dict[str, Any]:
    """The fields of ``settings`` that differ from their defaults, as ``section.field``: what a run changed."""
    return {f"{settings.section}.{name}": getattr(settings, name) for name, info in type(settings).model_fields.items()
            if getattr(settings, name) != info.get_default(call_default_factory=True)}


def describe() -> str:
    """Markdown table of every setting (used by ``edgeprune config`` and docs/configuration.md)."""
    lines = ["# Configuration", "",
             "Generated from `shared/settings.py` by `make config-docs` (`edgeprune config`).",
             "Priority: command-line flag > environment variable > `[section]` of the TOML file named by",
             f"`--config` or `{CONFIG_ENV}` > default. An invalid value stops the component with one line",
             "naming the field. Example file: [edgeprune.example.toml](edgeprune.example.toml).", ""]
    for cls in ALL_SECTIONS:
        lines += [f"## [{cls.section}]", "", "| field | env var | default | meaning |", "|---|---|---|---|"]
        for name, info in cls.model_fields.items():
            default = info.default
            shown = "(none)" if default is None else (",".join(default) if isinstance(default, list) else default)
            env = f"{cls.model_config['env_prefix']}{name.upper()}"
            lines.append(f"| `{name}` | `{env}` | `{shown}` | {info.description or ''} |")
        lines.append("")
    return "\n".join(lines)
