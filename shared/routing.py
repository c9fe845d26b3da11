"""Which topic a node reads and where its outputs go under a placement, parallel pipelines included.

Pure (no MQTT): the node agent subscribes and publishes what these say, and the gateway takes a gone replica's
session over with the same subscription. One rule for every placement: a node reads its own stage's input
(shared among the readers when :meth:`shared.schemas.Placement.shares_input` says so: replicas, or the first
stages of parallel pipelines, which the broker deals camera frames to) and hands its output to the stage of its
own pipeline that runs the next block.
"""

from __future__ import annotations

from shared.schemas import Placement
from shared.topics import Topics


def input_filter(topics: Topics, placement: Placement, node_id: str) -> str | None:
    """The subscription ``node_id`` reads under ``placement``: camera frames as the ingest node; its stage's input,
    plain for a stage's only reader, shared otherwise; None when it is not placed."""
    job = placement.job_of(node_id)
    if job is None:
        return None
    if job.ingest:
        return topics.camera_frame_filter
    if job.shares_input:
        return topics.shared(job.stage, placement.share_token, job.behind_ingest, job.pipeline)
    return topics.stage_input_filter(job.stage, job.behind_ingest, job.pipeline)


def input_filters(topics: Topics, placement: Placement) -> list[str]:
    """Every subscription a node may read under ``placement``, whichever its job: camera frames and each stage's input,
    plain and (with the placement's token) shared, stage 1's both in front of and behind an ingest node. A restarted
    node leaves those it does not read: its resumed session may hold a previous run's (docs/reliability.md)."""
    filters = [topics.camera_frame_filter]
    for stage in placement.stages:
        for behind_ingest in ((False, True) if stage.stage == 1 else (False,)):
            filters.append(topics.stage_input_filter(stage.stage, behind_ingest, stage.pipeline))
            if placement.share_token:
                filters.append(topics.shared(stage.stage, placement.share_token, behind_ingest, stage.pipeline))
    return list(dict.fromkeys(filters))


def output_topic(topics: Topics, placement: Placement, pipeline: int, next_block: int) -> str | None:
    """Where an output that next needs block ``next_block`` goes: the stage of pipeline ``pipeline`` (the pipeline of
    the stage that served it; pipeline 0 if ``placement`` has no such pipeline any more) that runs the block, or
    None when no later stage does (the caller keeps its own topic: results).

    Work queued before a move reaches the stage that now runs its next block, even when its old stage is gone;
    stage 1 reads frames, not activations, so an activation for its blocks goes to stage 2 (whose slice serves
    activations for any block)."""
    if next_block == 0:  # an ingest node's decoded frame: stage 1 reads it only behind an ingest node
        return topics.stage_input(1) if placement.ingest_node is not None else None
    pipelines = placement.pipelines
    stages = pipelines[pipeline] if pipeline < len(pipelines) else pipelines[0]
    stage = max(2, max(s.stage for s in stages if s.first_block <= next_block))
    return topics.stage_input(stage, stages[0].pipeline) if stage <= len(stages) else None
