"""A node's job and input subscription as placements and prepare commands come (node_agent/assignment.py): pure,
so every move the node agent makes under the gateway's handover is checked here without a broker or a model."""

from __future__ import annotations

from node_agent.assignment import Assignment, Listen
from shared.schemas import INGEST_STAGE, Placement, StageAssignment
from shared.topics import Topics

TOPICS = Topics()
TOKEN = "tok3n-abcd"


def placement(version: int, *stages: tuple, ingest: str | None = None, token: str | None = None) -> Placement:
    """``stages``: (node, first_block, last_block[, pipeline[, replicas]]) in order; stage numbers follow."""
    numbered, counts = [], {}
    for node, first, last, *rest in stages:
        pipeline = rest[0] if rest else 0
        counts[pipeline] = counts.get(pipeline, 0) + 1
        numbered.append(StageAssignment(stage=counts[pipeline], node_id=node, first_block=first, last_block=last,
                                        pipeline=pipeline, replicas=rest[1] if len(rest) > 1 else []))
    return Placement(version=version, model="trapnet", n_blocks=6, stages=numbered, issued_at=0.0,
                     ingest_node=ingest, share_token=token)


def placed(node: str, p: Placement) -> tuple[Assignment[str], Listen]:
    """A node of ``node`` with ``p`` in force (its runtime: the string "built v<version>")."""
    a: Assignment[str] = Assignment(node, TOPICS)
    switch = a.place(p)
    return a, a.take(switch)


def test_the_job_of_a_node_under_a_placement():
    p = placement(1, ("a", 0, 1), ("b", 2, 5, 0, ["c"]), ingest="e", token=TOKEN)
    ingest, first, second = p.job_of("e"), p.job_of("a"), p.job_of("c")
    assert ingest.ingest and ingest.stage == INGEST_STAGE and ingest.takes_frames and not ingest.is_last
    assert (first.stage, first.first_block, first.last_block, first.takes_frames, first.is_last) == (1, 0, 1, False,
                                                                                                      False)
    assert second.is_last and second.shares_input and second.assignment.nodes == ["b", "c"]
    assert p.job_of("x") is None and p.all_nodes() == ["a", "b", "c", "e"]


def test_a_first_placement_subscribes_the_jobs_input():
    a, listen = placed("b", placement(1, ("a", 0, 1), ("b", 2, 5)))
    assert listen == Listen((), TOPICS.stage_input_filter(2)) and a.version == 1 and a.job.stage == 2


def test_a_node_prepares_ahead_of_a_placement_and_takes_what_it_prepared():
    a, _ = placed("c", placement(1, ("a", 0, 1), ("b", 2, 5)))
    assert a.job is None and a.listening is None  # not placed: idle
    coming = placement(2, ("a", 0, 1), ("b", 2, 3), ("c", 4, 5))
    preparation = a.prepare(coming)
    assert preparation.build == coming.job_of("c") and preparation.subscribe == TOPICS.stage_input_filter(3)
    a.hold(preparation, "built v2")
    # a plain input before its placement: no node reads stage 3 under v1, so it was routed under v2, for c (a
    # restarted node's stage: upstream switched first; left unserved it was lost, test_reliability_e2e under load)
    assert a.prepared_for(TOPICS.stage_input(3)) == "built v2"
    switch = a.place(coming)
    assert switch.runtime == "built v2" and not switch.keep
    assert a.take(switch) == Listen()  # subscribed already, while preparing
    assert a.listening == TOPICS.stage_input_filter(3) and a.prepared is None and a.serves(TOPICS.stage_input(3))


def test_the_same_work_under_a_newer_plan_keeps_the_runtime_and_needs_no_preparation():
    a, _ = placed("a", placement(1, ("a", 0, 1), ("b", 2, 5)))
    newer = placement(2, ("a", 0, 1), ("b", 2, 3), ("c", 4, 5))
    preparation = a.prepare(newer)
    assert preparation.build is None and preparation.subscribe is None  # reported prepared at once
    switch = a.place(newer)
    assert switch.keep and switch.listen == Listen() and a.version == 2 and a.placement is newer


def test_a_replica_joining_switches_the_kept_stage_to_a_shared_subscription():
    a, _ = placed("b", placement(1, ("a", 0, 1), ("b", 2, 5)))
    switch = a.place(placement(2, ("a", 0, 1), ("b", 2, 5, 0, ["c"]), token=TOKEN))
    shared = TOPICS.shared(2, TOKEN)
    assert switch.keep and switch.listen == Listen((TOPICS.stage_input_filter(2),), shared)


def test_a_prepared_placement_that_never_came_is_unsubscribed_and_not_used():
    a, _ = placed("c", placement(1, ("a", 0, 1), ("b", 2, 5)))
    never = a.prepare(placement(2, ("a", 0, 1), ("b", 2, 3), ("c", 4, 5)))
    a.hold(never, "built v2")
    instead = placement(3, ("a", 0, 1), ("c", 2, 5))
    preparation = a.prepare(instead)
    assert preparation.unsubscribe == (TOPICS.stage_input_filter(3),)
    assert preparation.subscribe == TOPICS.stage_input_filter(2)
    a.hold(preparation, "built v3")
    # v4 comes without its own preparation: v3's runtime is not v4's, its subscription goes
    switch = a.place(placement(4, ("c", 0, 5)))
    assert switch.runtime is None and not switch.keep
    assert a.take(switch) == Listen((TOPICS.stage_input_filter(2),), TOPICS.camera_frame_filter)


def test_a_preparation_no_newer_than_the_placement_in_force_is_refused():
    a, _ = placed("c", placement(5, ("a", 0, 1), ("c", 2, 5)))
    assert a.prepare(placement(5, ("c", 0, 5))) is None and a.prepare(placement(4, ("c", 0, 5))) is None
    assert a.prepare(placement(6, ("a", 0, 5))) is None  # no job for c in it


def test_an_older_placement_is_ignored():
    a, _ = placed("b", placement(5, ("a", 0, 1), ("b", 2, 5)))
    assert a.place(placement(4, ("b", 0, 5))) is None
    assert a.version == 5 and a.job.stage == 2 and a.listening == TOPICS.stage_input_filter(2)
    assert a.place(placement(5, ("a", 0, 1), ("b", 2, 5))).keep  # the same version again (a reconnect): kept


def test_ingest_and_stage_switch_both_ways_with_new_runtimes():
    a, listen = placed("e", placement(1, ("a", 0, 5), ingest="e"))
    assert a.job.ingest and listen == Listen((), TOPICS.camera_frame_filter)
    assert a.serves(TOPICS.camera_frame("cam-1")) and not a.serves(TOPICS.stage_input(1))
    to_stage = a.place(placement(2, ("e", 0, 1), ("a", 2, 5)))
    assert not to_stage.keep and to_stage.runtime is None and to_stage.job.takes_frames
    assert a.take(to_stage) == Listen()  # stage 1 with no ingest node reads the camera frames too
    back = a.place(placement(3, ("a", 0, 5), ingest="e"))
    assert not back.keep and back.job.ingest and a.take(back) == Listen()
    # and the stage behind the ingest node reads the decoded input, not the frames
    b, listen = placed("a", placement(3, ("a", 0, 5), ingest="e"))
    assert listen == Listen((), TOPICS.stage_input_filter(1, behind_ingest=True))
    assert b.serves(TOPICS.stage_input(1)) and not b.serves(TOPICS.camera_frame("cam-1"))


def test_parallel_pipelines_share_the_frames_and_keep_their_own_activations():
    two = placement(3, ("a", 0, 2), ("b", 3, 5), ("c", 0, 3, 1), ("d", 4, 5, 1), token=TOKEN)
    first, listen = placed("c", two)
    assert listen.subscribe == TOPICS.shared(1, TOKEN) and first.serves(TOPICS.camera_frame("cam-1"))
    second, listen = placed("d", two)
    assert listen.subscribe == TOPICS.stage_input_filter(2, pipeline=1)
    assert second.serves(TOPICS.stage_input(2, 1)) and not second.serves(TOPICS.stage_input(2))


def test_a_shared_input_dealt_before_its_placement_is_served_by_the_prepared_runtime():
    """The broker gave it to this node alone among the stage's readers: left unserved, it would be lost."""
    a, _ = placed("c", placement(1, ("a", 0, 1), ("b", 2, 5)))
    coming = placement(2, ("a", 0, 1), ("b", 2, 5, 0, ["c"]), token=TOKEN)
    preparation = a.prepare(coming)
    assert preparation.subscribe == TOPICS.shared(2, TOKEN)
    a.hold(preparation, "built v2")
    assert not a.serves(TOPICS.stage_input(2))  # not in force yet
    assert a.prepared_for(TOPICS.stage_input(2)) == "built v2" and a.prepared_for(TOPICS.stage_input(3)) is None


def test_a_plain_input_some_node_reads_now_is_that_nodes_until_the_placement_comes():
    a, _ = placed("c", placement(1, ("a", 0, 1), ("b", 2, 5)))
    coming = placement(2, ("a", 0, 1), ("c", 2, 5))  # c takes over b's stage 2
    a.hold(a.prepare(coming), "built v2")
    assert a.prepared_for(TOPICS.stage_input(2)) is None  # b reads stage 2 under v1 and serves it: not c's yet
    assert a.prepared_for(TOPICS.stage_input(3)) is None  # not what c prepared for


def test_a_node_takes_a_topic_over_from_a_reader_that_leaves_it_but_not_camera_frames_or_a_shared_input():
    """The inputs a prepared node holds until the old reader's hand-over marker (node_agent/input_handover.py)."""
    v1 = placement(1, ("a", 0, 1), ("b", 2, 2), ("c", 3, 5))
    c, _ = placed("c", v1)
    c.hold(c.prepare(placement(2, ("a", 0, 0), ("c", 1, 2), ("b", 3, 5))), "built v2")
    assert c.leaving_reader(TOPICS.stage_input(2)) == "b"  # b reads stage 2 under v1, not under v2
    assert c.leaving_reader(TOPICS.stage_input(3)) is None  # not what c prepared
    c, _ = placed("c", v1)
    c.hold(c.prepare(placement(2, ("a", 0, 0), ("b", 1, 2), ("c", 3, 4), ("d", 5, 5))), "built v2")
    assert c.leaving_reader(TOPICS.stage_input(3)) is None  # c keeps reading stage 3: nobody leaves it
    d, _ = placed("d", placement(1, ("a", 0, 2), ("b", 3, 5)))
    d.hold(d.prepare(placement(2, ("d", 0, 2), ("b", 3, 5))), "built v2")
    assert d.leaving_reader(TOPICS.camera_frame("cam-1")) is None  # frames: a node may not publish a marker there
    e, _ = placed("e", v1)
    e.hold(e.prepare(placement(2, ("a", 0, 1), ("b", 2, 5, 0, ["e"]), token=TOKEN)), "built v2")
    assert e.leaving_reader(TOPICS.stage_input(2)) is None  # shared: the broker deals each input to one reader
