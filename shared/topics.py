"""The MQTT topic tree: the one place that names topics.

Conventions (as in Home Assistant and Frigate):
- ``…/status`` availability topics are retained and driven by the last will:
  ``online`` on every connect, ``offline`` by the broker's will, ``stopped`` on a clean exit.
- State topics (placement, applied prune state) are retained so a late joiner sees the truth.
- Commands (``…/cmd``) are one-shot and never retained: a retained command would replay
  on every restart.
- Control and results are JSON; activations use the binary format of :mod:`shared.wire`.

Every topic hangs below one configurable root (default ``edgeprune``) so several
deployments can share a broker.
"""

from __future__ import annotations

from dataclasses import dataclass

AVAILABILITY_ONLINE = "online"
AVAILABILITY_OFFLINE = "offline"
AVAILABILITY_STOPPED = "stopped"

_FORBIDDEN_IN_ID = set("/+#$ \t\n\r\x00")

# At a central broker every site's topics hang below ``sites/<site_id>/`` (the site's bridge adds it).
CENTRAL_PREFIX = "sites"


def validate_id(kind: str, value: str) -> str:
    """An id becomes one topic level: it must not contain wildcards or separators."""
    if not value or len(value) > 64 or any(ch in _FORBIDDEN_IN_ID for ch in value):
        raise ValueError(
            f"{kind} id {value!r} must be 1-64 characters without '/', '+', '#', '$' or spaces"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names below ``root``. Construct once from settings and pass around."""

    root: str = "edgeprune"

    # --- cameras -----------------------------------------------------------------------
    def camera_frame(self, camera_id: str) -> str:
        """Where a camera publishes a raw JPEG/PNG frame (``mosquitto_pub -f photo.jpg``)."""
        return f"{self.root}/camera/{validate_id('camera', camera_id)}/frame"

    @property
    def camera_frame_filter(self) -> str:
        return f"{self.root}/camera/+/frame"

    def camera_id_from_frame_topic(self, topic: str) -> str | None:
        parts = topic.split("/")
        root_parts = self.root.split("/")
        n = len(root_parts)
        if parts[:n] != root_parts or len(parts) != n + 3:
            return None
        if parts[n] != "camera" or parts[n + 2] != "frame":
            return None
        return parts[n + 1]

    # --- pipeline data path ------------------------------------------------------------
    def stage_input(self, stage: int, pipeline: int = 0) -> str:
        """Activations entering stage ``stage`` (1..n) of pipeline ``pipeline``; stage 1 reads it only behind an
        ingest node (the model-sized input it decoded), else camera frames. Pipeline 0's topics are those of the
        one pipeline before parallel pipelines (``pipeline/stage/<k>/in``); pipeline j > 0 has its own
        (``pipeline/p<j>/stage/<k>/in``), so each pipeline's stages hand activations only to each other."""
        if stage < 1:
            raise ValueError(f"stage {stage}: stages are numbered from 1")
        if pipeline < 0:
            raise ValueError(f"pipeline {pipeline}: pipelines are numbered from 0")
        return f"{self.root}/pipeline/{f'p{pipeline}/' if pipeline else ''}stage/{stage}/in"

    def stage_input_filter(self, stage: int, behind_ingest: bool = False, pipeline: int = 0) -> str:
        """What stage ``stage``'s nodes subscribe to: camera frames for stage 1 (unless an ingest node decodes
        them and sends stage 1 its input), else its activation topic."""
        if stage == 1 and not behind_ingest:
            return self.camera_frame_filter
        return self.stage_input(stage, pipeline)

    def shared(self, stage: int, token: str, behind_ingest: bool = False, pipeline: int = 0) -> str:
        """A replicated stage's input as an MQTT v5 shared subscription (``$share/<group>/<filter>``):
        the broker hands each message to one of the stage's replicas, no dispatcher of our own."""
        return (f"$share/{self.share_group(stage, token, pipeline)}/"
                f"{self.stage_input_filter(stage, behind_ingest, pipeline)}")

    def share_group(self, stage: int, token: str, pipeline: int = 0) -> str:
        """The shared-subscription group of a stage's replicas (one level: the root's ``/`` become ``-``).

        Stage 1 has one group whatever the pipeline: every pipeline's first stage joins it, so the broker deals
        each camera frame to exactly one pipeline. A later stage's group is its pipeline's own.

        ``token`` is the placement's ``share_token``, which only nodes (and the gateway) may read: Mosquitto
        2.0's ACL file does not check subscriptions, only deliveries, so any user who named the group could
        join it and have its share dropped at delivery (tests/test_replicas_broker.py)."""
        own = f"p{pipeline}-" if pipeline and stage > 1 else ""
        return (f"{self.root.replace('/', '-')}-{own}stage-{stage}-"
                f"{validate_id('share token', token)}")

    def results(self, node_id: str) -> str:
        """Classification results the last stage ``node_id`` publishes (JSON). Every data topic a device writes
        names it, so the broker's ACL decides who may speak for whom (docs/security.md)."""
        return f"{self.root}/pipeline/results/{validate_id('node', node_id)}"

    @property
    def results_filter(self) -> str:
        return f"{self.root}/pipeline/results/+"

    def accepted(self, node_id: str) -> str:
        """Stage 1 (or the ingest node) ``node_id`` announces each frame it took (JSON
        :class:`shared.schemas.AcceptedRequest`)."""
        return f"{self.root}/pipeline/accepted/{validate_id('node', node_id)}"

    @property
    def accepted_filter(self) -> str:
        return f"{self.root}/pipeline/accepted/+"

    def thumbnail(self, node_id: str) -> str:
        """A small JPEG of a frame the node ``node_id`` accepted and decoded (shared/thumbnail.py), its request id
        in the ``request_id`` user property; sent only when the placement asks for thumbnails."""
        return f"{self.root}/pipeline/thumbnail/{validate_id('node', node_id)}"

    @property
    def thumbnail_filter(self) -> str:
        return f"{self.root}/pipeline/thumbnail/+"

    def publisher(self, topic: str) -> str | None:
        """The device a results, accepted, thumbnail or error topic names (its last level), or None for others."""
        parts = topic.split("/")
        n = len(self.root.split("/"))
        if parts[:n] != self.root.split("/"):
            return None
        if len(parts) == n + 3 and parts[n] == "pipeline" and parts[n + 1] in ("results", "accepted", "thumbnail"):
            return parts[-1] or None
        if len(parts) == n + 2 and parts[n] == "error":
            return parts[-1] or None
        return None

    def is_data_topic(self, topic: str) -> bool:
        """Frames, activations, results and thumbnails: never meant to be retained."""
        parts = topic.split("/")
        n = len(self.root.split("/"))
        return (self.camera_id_from_frame_topic(topic) is not None
                or (parts[n:n + 1] == ["pipeline"] and parts[n + 1:n + 2] in (["results"], ["thumbnail"])
                    and len(parts) == n + 3)
                or self._is_stage_input(parts[n:]))

    def pipeline_of_input(self, topic: str) -> int:
        """The pipeline whose stage input ``topic`` is (``pipeline/p<j>/stage/<k>/in``: j), 0 for any other topic."""
        parts = topic.split("/")[len(self.root.split("/")):]
        if self._is_stage_input(parts) and len(parts) == 5:
            return int(parts[1][1:])
        return 0

    @staticmethod
    def _is_stage_input(parts: list[str]) -> bool:
        """``pipeline/stage/<k>/in`` or ``pipeline/p<j>/stage/<k>/in`` (below the root)."""
        if len(parts) == 5 and parts[0] == "pipeline" and parts[1][:1] == "p" and parts[1][1:].isdigit():
            parts = parts[:1] + parts[2:]
        return len(parts) == 4 and parts[:2] == ["pipeline", "stage"] and parts[-1] == "in"

    # --- placement and control ---------------------------------------------------------
    @property
    def placement(self) -> str:
        """Retained: which node runs which blocks (JSON :class:`shared.schemas.Placement`)."""
        return f"{self.root}/placement"

    # Per-node topics: ``<root>/node/<node_id>/<leaf>``; the gateway subscribes with ``+`` for the id.
    def _node(self, node_id: str, leaf: str) -> str:
        return f"{self.root}/node/{validate_id('node', node_id)}/{leaf}"

    def _every_node(self, leaf: str) -> str:
        return f"{self.root}/node/+/{leaf}"

    def node_status(self, node_id: str) -> str:
        """Retained availability, driven by the last will."""
        return self._node(node_id, "status")

    @property
    def node_status_filter(self) -> str:
        return self._every_node("status")

    def node_stats(self, node_id: str) -> str:
        return self._node(node_id, "stats")

    @property
    def node_stats_filter(self) -> str:
        return self._every_node("stats")

    def node_profile(self, node_id: str) -> str:
        """Retained: the node's measured block profile and resources (:class:`shared.schemas.NodeProfile`)."""
        return self._node(node_id, "profile")

    @property
    def node_profile_filter(self) -> str:
        return self._every_node("profile")

    def node_calibration(self, node_id: str) -> str:
        """Retained: latency of the node's current slice per prune ratio (:class:`SliceCalibration`)."""
        return self._node(node_id, "calibration")

    @property
    def node_calibration_filter(self) -> str:
        return self._every_node("calibration")

    def node_prune_desired(self, node_id: str) -> str:
        """Retained desired prune state, set by the gateway's controller or an operator."""
        return self._node(node_id, "prune/set")

    @property
    def node_prune_desired_filter(self) -> str:
        return self._every_node("prune/set")

    def node_prune_state(self, node_id: str) -> str:
        """Retained prune state actually applied by the node."""
        return self._node(node_id, "prune/state")

    def node_command(self, node_id: str) -> str:
        """One-shot commands to a node; never retained."""
        return self._node(node_id, "cmd")

    def node_id_from_topic(self, topic: str) -> str | None:
        parts = topic.split("/")
        root_parts = self.root.split("/")
        n = len(root_parts)
        if parts[:n] != root_parts or len(parts) < n + 3 or parts[n] != "node":
            return None
        return parts[n + 1]

    def component_status(self, component_id: str) -> str:
        """Availability of a non-node component (gateway, camera, web)."""
        return f"{self.root}/component/{validate_id('component', component_id)}/status"

    @property
    def component_status_filter(self) -> str:
        return f"{self.root}/component/+/status"

    def is_device_state(self, topic: str) -> bool:
        """A device's own retained availability (``node/<id>/status``, ``component/<id>/status``) or profile
        (``node/<id>/profile``): topics its device rewrites when it starts, which the gateway may clear."""
        parts = topic.split("/")
        n = len(self.root.split("/"))
        if parts[:n] != self.root.split("/") or len(parts) != n + 3 or not parts[n + 1]:
            return False
        return (parts[n], parts[n + 2]) in {("node", "status"), ("node", "profile"), ("component", "status")}

    def component_command(self, component_id: str) -> str:
        """One-shot commands to the gateway (manual prune, retire); never retained."""
        return f"{self.root}/component/{validate_id('component', component_id)}/cmd"

    def component_reply(self, component_id: str) -> str:
        """One-shot answers of the gateway to commands carrying an ``id`` (:class:`CommandReply`); never retained."""
        return f"{self.root}/component/{validate_id('component', component_id)}/reply"

    def node_topics(self, node_id: str) -> list[str]:
        """Every retained topic a node or the gateway keeps about the node (cleared on retirement)."""
        return [self.node_status(node_id), self.node_profile(node_id), self.node_calibration(node_id),
                self.node_prune_desired(node_id), self.node_prune_state(node_id)]

    # --- the site's clock -------------------------------------------------------------
    @property
    def clock(self) -> str:
        """The gateway's time beacon (JSON :class:`shared.schemas.ClockBeacon`), periodic, never retained:
        nodes and ``edgeprune doctor`` measure their offset to the gateway's clock from it."""
        return f"{self.root}/clock"

    # --- errors ------------------------------------------------------------------------
    def errors(self, component_id: str) -> str:
        """Error records (JSON :class:`shared.schemas.ErrorRecord`) a component reports about bad input."""
        return f"{self.root}/error/{validate_id('component', component_id)}"

    @property
    def errors_filter(self) -> str:
        return f"{self.root}/error/+"

    # --- past one site: what a site's bridge forwards to the central broker -------------
    @property
    def bridged(self) -> list[str]:
        """Patterns (relative to the root) a site forwards to the centre: results, availability, errors, and the
        nodes' retained profiles (the centre reads the model fingerprint a result was classified with off them).

        Out only: commands, placement and prune state stay at the site (control stays local).
        """
        return ["pipeline/results/+", "node/+/status", "component/+/status", "error/+", "node/+/profile"]

    def central_prefix(self, site_id: str) -> str:
        """What a site's bridge puts before a local topic at the centre (ends in ``/``)."""
        return f"{CENTRAL_PREFIX}/{validate_id('site', site_id)}/{self.root}/"

    def central(self, local_filter: str) -> str:
        """The central broker's filter for a local topic of every site, e.g. ``sites/+/edgeprune/error/+``."""
        return f"{CENTRAL_PREFIX}/+/{local_filter}"

    def split_central(self, topic: str) -> tuple[str, str] | None:
        """(site id, the topic as the site published it) of a topic at the central broker, or None."""
        parts = topic.split("/", 2)
        if len(parts) != 3 or parts[0] != CENTRAL_PREFIX or not parts[1]:
            return None
        return parts[1], parts[2]
