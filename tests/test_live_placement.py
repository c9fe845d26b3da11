"""When the gateway (re-)places the pipeline: start, loss of a node, rejoin with hysteresis; and when it publishes."""

from __future__ import annotations

import pytest

from gateway.live_placement import Handover, LivePlacement, PlacementRules, slowed_for_moves
from shared.schemas import BlockProfile, DecodeCost, ModelProfile, NodeProfile
from tests.conftest import even_split

RULES = PlacementRules(startup_wait_s=20, rejoin_hold_s=10, min_gain=0.1)


def offer(node: str, speed: float = 1.0, fingerprint: str = "abc", n_blocks: int = 6) -> NodeProfile:
    blocks = [BlockProfile(name=f"b{i}", latency_s=0.010 * speed, param_bytes=1000, activation_bytes=1000,
                           output_bytes=1000) for i in range(n_blocks)]
    profile = ModelProfile(model="trapnet", host="h", threads=1, repeats=1, warmup=0, wire_dtype="float16",
                           blocks=blocks)
    return NodeProfile(node_id=node, model_fingerprint=fingerprint, memory_mb=100, uplink_mbit_s=1000,
                       profile=profile)


def live_with(nodes: list[str], now: float = 0.0, **speeds: float) -> LivePlacement:
    live = LivePlacement(RULES, "trapnet", "abc", nodes, started=now)
    for node in nodes:
        live.set_status(node, "online", now)
        live.set_offer(offer(node, speeds.get(node.replace("-", "_"), 1.0)))
    return live


def placed(placement) -> list[str]:
    return [s.node_id for s in placement.stages]


def test_waits_for_every_configured_node_then_uses_all():
    live = LivePlacement(RULES, "trapnet", "abc", ["a", "b", "c"], started=0)
    for node in ("a", "b"):
        live.set_status(node, "online", 0)
        live.set_offer(offer(node))
    assert live.tick(1) is None  # c is still missing and the start-up wait is not over
    live.set_status("c", "online", 2)
    live.set_offer(offer("c"))
    first = live.tick(2)
    assert sorted(placed(first)) == ["a", "b", "c"]
    assert live.tick(3) is None  # nothing changed: no new placement


def test_places_on_those_present_after_the_startup_wait():
    live = LivePlacement(RULES, "trapnet", "abc", ["a", "b"], started=0)
    live.set_status("a", "online", 0)
    live.set_offer(offer("a"))
    assert live.tick(19) is None
    assert placed(live.tick(20)) == ["a"]


def test_lost_node_is_replaced_at_once_by_the_survivors():
    live = live_with(["a", "b", "c"])
    first = live.tick(1)
    live.set_status("b", "offline", 5)
    second = live.tick(5)
    assert second is not None and "b" not in placed(second)
    assert second.version > first.version
    covered = [blk for s in second.stages for blk in range(s.first_block, s.last_block + 1)]
    assert covered == list(range(6))


def test_rejoining_node_waits_for_the_hold_and_is_used_when_it_helps():
    live = live_with(["a", "b"])
    live.tick(1)
    live.set_status("b", "offline", 5)
    assert placed(live.tick(5)) == ["a"]
    live.set_status("b", "online", 10)
    assert live.tick(15) is None  # still inside rejoin_hold_s
    rejoined = live.tick(20)
    assert rejoined is not None and sorted(placed(rejoined)) == ["a", "b"]


def test_flapping_node_never_gets_placed_while_it_flaps():
    live = live_with(["a", "b"])
    live.tick(1)
    live.set_status("b", "offline", 2)
    live.tick(2)
    changes = 0
    for t in range(3, 60, 4):  # online for 2 s, offline for 2 s, again and again
        live.set_status("b", "online", t)
        changes += live.tick(t + 1) is not None
        live.set_status("b", "offline", t + 2)
        changes += live.tick(t + 3) is not None
    assert changes == 0


def test_joining_node_that_gains_too_little_is_declined_and_not_re_evaluated():
    # a is fast enough alone; b is so slow that splitting cannot gain 10%
    live = LivePlacement(RULES, "trapnet", "abc", ["a", "b"], started=0)
    live.set_status("a", "online", 0)
    live.set_offer(offer("a", speed=0.1))
    assert placed(live.tick(20)) == ["a"]
    live.set_status("b", "online", 21)
    live.set_offer(offer("b", speed=100.0))
    assert live.tick(40) is None
    assert live.tick(41) is None


def test_node_with_another_model_is_refused():
    live = LivePlacement(RULES, "trapnet", "abc", ["a"], started=0)
    reason = live.set_offer(offer("a", fingerprint="zzz"))
    assert reason and "same checkpoint" in reason
    live.set_status("a", "online", 0)
    assert live.eligible() == [] and live.tick(100) is None


def test_infeasible_memory_is_reported_not_raised():
    live = LivePlacement(RULES, "trapnet", "abc", ["a"], started=0)
    big = offer("a")
    live.set_offer(big.model_copy(update={"memory_mb": 0.001}))
    live.set_status("a", "online", 0)
    assert live.tick(1) is None
    assert live.last_error and "MB" in live.last_error


def test_memory_caps_round_to_whole_bytes():
    """2.01 MB is 2,009,999.99... B in floating point: truncating it refused a slice of exactly 2,010,000 B."""
    block = BlockProfile(name="b0", latency_s=0.01, param_bytes=2_000_000, activation_bytes=10_000, output_bytes=100)
    profile = ModelProfile(model="trapnet", host="h", threads=1, repeats=1, warmup=0, wire_dtype="float16",
                           blocks=[block])
    live = LivePlacement(RULES, "trapnet", "abc", ["a"], started=0)
    live.set_status("a", "online", 0)
    live.set_offer(NodeProfile(node_id="a", model_fingerprint="abc", memory_mb=2.01, uplink_mbit_s=1000,
                               profile=profile))
    assert placed(live.tick(1)) == ["a"] and live.last_error is None


def test_stage_one_pays_the_frame_decode_so_it_gets_fewer_blocks_when_frames_are_large():
    def with_decode(node: str, per_megapixel_s: float) -> NodeProfile:
        cost = DecodeCost(fixed_s=0.001, per_megapixel_s=per_megapixel_s, megapixels=[0.3, 4.0],
                          seconds=[0.001 + 0.3 * per_megapixel_s, 0.001 + 4 * per_megapixel_s])
        return offer(node).model_copy(update={"decode": cost})

    def plan(megapixels: float, slow_decoder: float):
        live = LivePlacement(RULES, "trapnet", "abc", ["a", "b"], started=0.0, frame_megapixels=megapixels)
        for node, per_mp in (("a", slow_decoder), ("b", 0.001)):
            live.set_status(node, "online", 0.0)
            live.set_offer(with_decode(node, per_mp))
        return live.tick(0.0)

    small = plan(0.0, slow_decoder=0.001)
    assert [(s.first_block, s.last_block) for s in small.stages] == [(0, 2), (3, 5)]
    large = plan(12.0, slow_decoder=0.001)  # 13 ms of decode: stage 1 keeps 2 blocks (33 ms), stage 2 takes 4 (40)
    assert [(s.first_block, s.last_block) for s in large.stages] == [(0, 1), (2, 5)]
    assert large.bottleneck_s == pytest.approx(0.040)
    # the node that decodes faster takes stage 1
    assert placed(plan(12.0, slow_decoder=0.004)) == ["b", "a"]


def test_frames_at_the_models_size_are_planned_without_a_decode_charge():
    """frame_megapixels 0: a device's fixed decode cost (measured on large JPEGs) must not shrink stage 1."""
    live = LivePlacement(RULES, "trapnet", "abc", ["a", "b"], started=0.0, frame_megapixels=0.0)
    costly = DecodeCost(fixed_s=0.025, per_megapixel_s=0.01, megapixels=[0.3, 4.0], seconds=[0.028, 0.065])
    for node in ("a", "b"):
        live.set_status(node, "online", 0.0)
        live.set_offer(offer(node).model_copy(update={"decode": costly}))
    assert [(s.first_block, s.last_block) for s in live.tick(0.0).stages] == [(0, 2), (3, 5)]


def blocks_of(placement, node: str) -> int:
    stage = placement.stage_of(node)
    return stage.last_block - stage.first_block + 1


def test_repartitioning_moves_blocks_off_a_slowed_node_and_back():
    live = live_with(["a", "b"])
    first = live.tick(1)
    assert blocks_of(first, "a") == blocks_of(first, "b") == 3
    assert live.replan_for_slowdowns({"a": 1.1, "b": 1.0}, 2) is None  # too small a gain to move
    moved = live.replan_for_slowdowns({"a": 4.0, "b": 1.0}, 3)
    assert moved is not None and moved.version > first.version
    assert blocks_of(moved, "a") < blocks_of(moved, "b") and sorted(placed(moved)) == ["a", "b"]
    assert live.tick(4) is None  # the live placement keeps the moved plan
    back = live.replan_for_slowdowns({}, 5)  # slowdowns gone: the balanced plan is better again
    assert back is not None and blocks_of(back, "a") == blocks_of(back, "b") == 3


def test_repartitioning_never_leaves_the_slowed_node_out():
    """At 50x the fastest plan runs every block on b; leaving a out is no move: the next tick would re-place a
    (it is eligible), and a node dropped from the placement idles with its queued frames (6 lost in the bench
    test). So a keeps one block."""
    live = live_with(["a", "b"])
    live.tick(1)
    moved = live.replan_for_slowdowns({"a": 50.0, "b": 1.0}, 2)
    assert moved is not None and sorted(placed(moved)) == ["a", "b"] and blocks_of(moved, "a") == 1


def hetero_offer(node: str, speed: float) -> NodeProfile:
    """Blocks of unequal cost, as the benchmark's TrapNet: the stem is cheap, the last block cheapest."""
    costs_ms = [0.56, 2.05, 2.03, 1.53, 1.74, 0.31]
    blocks = [BlockProfile(name=f"b{i}", latency_s=ms * speed / 1e3, param_bytes=1000, activation_bytes=1000,
                           output_bytes=1000) for i, ms in enumerate(costs_ms)]
    return offer(node).model_copy(update={"profile": offer(node).profile.model_copy(update={"blocks": blocks})})


def test_a_second_slowdown_moves_blocks_even_when_a_plan_dropping_the_first_slowed_node_ties():
    """hetero4: node-2 (6x) already holds only the cheapest block when node-4 slows down (4.7x). The best plan
    then drops node-2 (its bottleneck is another stage's, so node-2's block costs nothing to leave out), and
    that must not cancel the move (it did: node-4 kept two blocks at 108 ms for the 60 s of its slowdown)."""
    speeds = {"node-1": 8.0, "node-2": 10.0, "node-3": 12.0, "node-4": 10.0}
    live = LivePlacement(RULES, "trapnet", "abc", list(speeds), started=0.0)
    for node, speed in speeds.items():
        live.set_status(node, "online", 0.0)
        live.set_offer(hetero_offer(node, speed))
    live.tick(1)
    first_move = live.replan_for_slowdowns({"node-2": 6.0}, 2)
    assert first_move is not None and blocks_of(first_move, "node-2") == 1
    second = live.replan_for_slowdowns({"node-2": 6.0, "node-4": 4.7}, 3)
    assert second is not None and sorted(placed(second)) == sorted(speeds)
    # both slowed nodes keep one cheap block each: 39 ms, against 108 ms with node-4's two blocks
    assert blocks_of(second, "node-2") == blocks_of(second, "node-4") == 1
    assert second.bottleneck_s == pytest.approx(0.03924)


def test_a_placement_is_published_only_once_the_nodes_with_a_new_input_are_subscribed():
    handover = Handover(timeout_s=15)
    alone = even_split(6, ["a"])
    assert handover.propose(alone, 0.0) == (None, ["a"])  # nothing published yet: a must subscribe first
    assert handover.prepared("a", alone.version) == alone and handover.active == alone
    rejoin = even_split(6, ["a", "b"]).model_copy(update={"version": 2})
    assert handover.propose(rejoin, 10.0) == (None, ["b"])  # a keeps stage 1 (its input): only b prepares
    assert handover.prepared("b", 1) is None  # an answer for another placement
    assert handover.prepared("a", 2) is None  # a was not asked
    assert handover.active == alone and handover.pending == rejoin
    assert handover.prepared("b", 2) == rejoin and handover.active == rejoin and handover.pending is None


def test_a_placement_that_moves_no_input_is_published_at_once_and_a_silent_node_does_not_block_forever():
    handover = Handover(timeout_s=15)
    first = even_split(6, ["a", "b"])
    handover.propose(first, 0.0)
    handover.prepared("a", first.version)
    handover.prepared("b", first.version)
    same_stages = even_split(4, ["a", "b"]).model_copy(update={"version": 2})  # other blocks, same stage numbers
    assert handover.propose(same_stages, 1.0) == (same_stages, [])
    swapped = even_split(6, ["b", "a", "c"]).model_copy(update={"version": 3})
    assert handover.propose(swapped, 2.0) == (None, ["a", "b", "c"])
    handover.prepared("a", 3)
    assert handover.expire(16.0) == (None, [])
    assert handover.expire(17.0) == (swapped, ["b", "c"])  # published anyway, the late ones named
    assert handover.active == swapped


def with_decode_cost(node_offer: NodeProfile, per_megapixel_s: float, role: str = "stage") -> NodeProfile:
    cost = DecodeCost(fixed_s=0.0, per_megapixel_s=per_megapixel_s, megapixels=[0.3, 4.0],
                      seconds=[0.3 * per_megapixel_s, 4.0 * per_megapixel_s])
    return node_offer.model_copy(update={"decode": cost, "role": role})


def with_an_ingest_node(frame_megapixels: float) -> LivePlacement:
    """Stage nodes a and b and node i of the ingest role, all online, each decoding at 5 ms per megapixel."""
    live = LivePlacement(RULES, "trapnet", "abc", ["a", "b", "i"], started=0.0, frame_megapixels=frame_megapixels)
    for node, role in (("a", "stage"), ("b", "stage"), ("i", "ingest")):
        live.set_status(node, "online", 0.0)
        live.set_offer(with_decode_cost(offer(node), 0.005, role))
    return live


def test_an_ingest_node_decodes_when_it_helps_and_its_loss_re_places_without_it():
    # 12 MP at 5 ms/MP = 60 ms of decode, as much as the whole model: stage 1 would be the bottleneck
    live = with_an_ingest_node(frame_megapixels=12.0)
    first = live.tick(0.0)
    assert first.ingest_node == "i" and sorted(placed(first)) == ["a", "b"]
    assert first.bottleneck_s == pytest.approx(0.060)  # the decode alone; a and b run 3 blocks (30 ms) each
    live.set_status("i", "offline", 1.0)
    second = live.tick(1.0)
    # decoding on stage 1 would cost 60 ms + 2 blocks = 80 ms; one survivor decoding, the other running the
    # whole model costs 60 ms: the planner keeps an ingest node
    assert {second.ingest_node, *placed(second)} == {"a", "b"} and second.bottleneck_s == pytest.approx(0.060)


def test_an_ingest_node_stays_idle_when_frames_are_already_model_sized():
    live = with_an_ingest_node(frame_megapixels=0.0)
    placement = live.tick(0.0)
    assert placement.ingest_node is None and "i" not in placed(placement)


def test_an_ingest_node_must_beat_decoding_on_stage_1_by_the_minimum_gain():
    # 0.2 MP at 5 ms/MP = 1 ms of decode on stage 1 against 60 ms of blocks: an ingest node would gain ~1 ms
    live = with_an_ingest_node(frame_megapixels=0.2)
    placement = live.tick(0.0)
    assert placement.ingest_node is None and "i" not in placed(placement)


def test_noise_below_the_gone_threshold_moves_no_block():
    live = live_with(["a", "b"])
    live.tick(1)
    unfiltered = live_with(["a", "b"])
    unfiltered.tick(1)
    assert unfiltered.replan_for_slowdowns({"a": 1.9, "b": 1.0}, 2) is not None  # taken as is, 1.9x would move
    noisy = slowed_for_moves({"a": 1.9, "b": 1.0}, gone=2.0)  # a loaded host's estimate, not a slowdown
    assert noisy == {"a": 1.0, "b": 1.0} and live.replan_for_slowdowns(noisy, 2) is None
    slowed = slowed_for_moves({"a": 4.0, "b": 1.2}, gone=2.0)
    assert slowed == {"a": 4.0, "b": 1.0} and live.replan_for_slowdowns(slowed, 3) is not None
