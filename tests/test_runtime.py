"""Node logic without a broker: stages chained in-process equal the whole model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from camera.simulator import camera_frame
from node_agent.runtime import IngestRuntime, Request, StageRuntime, frame_metadata
from shared import wire
from shared.imaging import decode_frame, encode_jpeg, textured_scene
from shared.model import build_model
from shared.schemas import BadMessage, Result, StageAssignment, parse_json
from tests.conftest import even_split


def chain(model, placement, frame: bytes, wire_dtype: str, props=None) -> Result:
    runtimes = [StageRuntime(model, s.node_id, s, len(placement.stages), f"out/{s.stage}", wire_dtype)
                for s in placement.stages]
    req = Request("edgeprune/camera/cam/frame", frame, props or {}, 100.0, camera_id="cam")
    for rt in runtimes:
        out = rt.run(req, started_ts=req.received_ts + 0.001)
        req = Request(out.topic, out.payload, out.user or {}, req.received_ts + 0.01)  # as the agent publishes
    return parse_json(Result, out.payload)


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
@pytest.mark.parametrize("wire_dtype,tol", [("float32", 1e-6), ("float16", 2e-3)])
def test_chained_stages_equal_whole_model(n_nodes, wire_dtype, tol):
    model = build_model()
    placement = even_split(model.n_blocks, [f"n{i}" for i in range(n_nodes)])
    rng = np.random.default_rng(0)
    for _ in range(3):
        frame = camera_frame(rng, 64, "png")
        result = chain(model, placement, frame, wire_dtype, {"request_id": "r1", "capture_ts": "99.5"})
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(decode_frame(frame))), 1)[0]
        assert result.label_index == int(probs.argmax())
        assert result.confidence == pytest.approx(float(probs.max()), abs=tol)
        assert (result.request_id, result.capture_ts, result.camera_id) == ("r1", 99.5, "cam")
        assert [h.stage for h in result.hops] == list(range(1, n_nodes + 1))


def test_stage_loads_the_entry_statistics_of_the_ratio_its_input_was_pruned_at():
    """The keep mask on the wire tells the next stage its upstream's ratio (shipped entry tables)."""
    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    first, second = (StageRuntime(model, s.node_id, s, 2, f"out/{s.stage}", "float16") for s in placement.stages)
    assert second.slice.entry_tables and not first.slice.entry_tables  # the stem never follows a slice
    frame = Request("edgeprune/camera/cam/frame", camera_frame(np.random.default_rng(2), 64, "png"), {}, 1.0, "cam")
    second.slice.set_ratio(0.5)
    for upstream in (0.9, 0.0, 0.3):
        first.slice.set_ratio(upstream)
        out = first.run(frame, started_ts=1.0)
        second.run(Request(out.topic, out.payload, {}, 1.01), started_ts=1.01)
        assert second.slice.entry_upstream == upstream


@pytest.mark.parametrize("n_nodes", [1, 3])
def test_ground_truth_label_travels_to_the_result(n_nodes):
    model = build_model()
    placement = even_split(model.n_blocks, [f"n{i}" for i in range(n_nodes)])
    frame = camera_frame(np.random.default_rng(1), 64, "png")
    assert chain(model, placement, frame, "float16", {"true_label": "7"}).true_label == 7
    assert chain(model, placement, frame, "float16").true_label is None


def test_frame_without_properties_gets_id_and_arrival_time():
    model = build_model()
    placement = even_split(model.n_blocks, ["a"])
    result = chain(model, placement, camera_frame(np.random.default_rng(1), 80, "jpeg"), "float16")
    assert result.request_id.startswith("cam-") and result.capture_ts == 100.0


@pytest.mark.parametrize("props,match", [({"capture_ts": "yesterday"}, "not a number"),
                                         ({"capture_ts": "nan"}, "not a valid epoch"),
                                         ({"request_id": "x" * 200}, "longer than 128"),
                                         ({"true_label": "-1"}, "not a class index"),
                                         ({"true_label": "cat"}, "not a class index"),
                                         ({"true_label": "123456"}, "not a class index")])
def test_bad_frame_properties_are_rejected(props, match):
    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    with pytest.raises(BadMessage, match=match):
        chain(model, placement, camera_frame(np.random.default_rng(1), 64, "png"), "float16", props)


def _activation_for(model, frame: bytes, block: int) -> wire.Activation:
    """What the whole model has made of ``frame`` before ``block``, as an upstream stage sends it (float32)."""
    with torch.inference_mode():
        x = model.run_blocks(torch.from_numpy(decode_frame(frame)), 0, block - 1) if block else \
            torch.from_numpy(decode_frame(frame))
    return wire.Activation("r", "c", 1.0, block, x.numpy())


@pytest.mark.parametrize("block", [0, 1, 2, 3, 4, 5])
def test_a_stage_serves_an_activation_for_another_block_as_the_whole_model_would(block):
    """While the placement moves, the middle stage (blocks 2..3) gets activations for other blocks: it runs the
    missing blocks (or forwards what has run its blocks), its output equals the whole model's, and the hop says
    which blocks ran."""
    model = build_model()
    middle = StageAssignment(stage=2, node_id="b", first_block=2, last_block=3)
    stage = StageRuntime(model, "b", middle, 3, "out", "float32")
    act = _activation_for(model, camera_frame(np.random.default_rng(5), 64, "png"), block)
    out = wire.decode(stage.run(Request("t", wire.encode(act), {}, 0.0), 0.0).payload)
    ran = max(0, 4 - block)
    assert out.next_block == block + ran and out.keep_mask is None
    with torch.inference_mode():
        expected = model.run_blocks(torch.from_numpy(act.tensor), block, 3).numpy() if ran else act.tensor
    np.testing.assert_allclose(out.tensor, expected, rtol=1e-5, atol=1e-5)
    (hop,) = out.hops
    assert (hop.stage, hop.first_block, hop.n_blocks) == (2, block, ran)


@pytest.mark.parametrize("block", [1, 3])
def test_the_last_stage_runs_the_missing_blocks_to_the_whole_models_result(block):
    model = build_model()
    last = StageAssignment(stage=2, node_id="b", first_block=2, last_block=model.n_blocks - 1)
    stage = StageRuntime(model, "b", last, 2, "out", "float32")
    frame = camera_frame(np.random.default_rng(6), 64, "png")
    act = _activation_for(model, frame, block)
    result = parse_json(Result, stage.run(Request("t", wire.encode(act), {}, 0.0), 0.0).payload)
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(decode_frame(frame))), 1)[0]
    assert result.label_index == int(probs.argmax())
    assert result.confidence == pytest.approx(float(probs.max()), abs=1e-5)
    assert (result.hops[0].first_block, result.hops[0].n_blocks) == (block, model.n_blocks - block)


def test_a_pruned_upstreams_activation_entering_mid_slice_runs_zero_filled_at_full_width():
    """The upstream ran one block more than the placement says, pruned: its kept channels, zero-filled."""
    model = build_model()
    two = even_split(model.n_blocks, ["a", "b"])
    upstream = StageAssignment(stage=1, node_id="a", first_block=0, last_block=two.stages[0].last_block + 1)
    up = StageRuntime(model, "a", upstream, 2, "out", "float32")
    up.slice.set_ratio(0.5)
    frame = Request("edgeprune/camera/cam/frame", camera_frame(np.random.default_rng(7), 64, "png"), {}, 1.0, "cam")
    sent = wire.decode(up.run(frame, 1.0).payload)
    assert sent.keep_mask is not None and not sent.keep_mask.all()
    second = StageRuntime(model, "b", two.stages[1], 2, "out", "float32")
    result = parse_json(Result, second.run(Request("t", wire.encode(sent), {}, 1.0), 1.0).payload)
    with torch.inference_mode():
        logits = model.run_blocks(torch.from_numpy(sent.full_tensor()), sent.next_block, model.n_blocks - 1)
    assert result.confidence == pytest.approx(float(torch.softmax(logits, 1)[0].max()), abs=1e-5)
    assert [(h.first_block, h.n_blocks) for h in result.hops] == [
        (0, sent.next_block), (sent.next_block, model.n_blocks - sent.next_block)]


def test_an_activation_no_stage_could_run_or_forward_is_stale():
    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    first = StageRuntime(model, "a", placement.stages[0], 2, "out", "float16", behind_ingest=True)
    second = StageRuntime(model, "b", placement.stages[1], 2, "out", "float16")
    past_the_model = wire.encode(wire.Activation("r", "c", 1.0, model.n_blocks, np.zeros((1, 8), np.float16)))
    for stage in (first, second):  # no block n_blocks exists, and nothing comes after the last stage
        with pytest.raises(BadMessage) as err:
            stage.run(Request("t", past_the_model, {}, 0.0), 0.0)
        assert err.value.kind == "stale_placement"


def test_calibrator_measures_every_ratio_one_run_at_a_time():
    from node_agent.runtime import SliceCalibrator, block_input_shape
    from shared.pruning import PrunableSlice

    model = build_model()
    prunable = PrunableSlice(model, 0, 2, ladder=(0.0, 0.5, 0.9))
    calibrator = SliceCalibrator(prunable, block_input_shape(model, 0), repeats=3)
    steps = 0
    while not calibrator.step():
        steps += 1
    assert steps + 1 == 3 * (1 + 3)  # one untimed and three timed runs per ratio
    latencies = calibrator.latencies()
    # one median per ratio; how much faster pruning makes a slice is the benchmark's business
    # (`edgeprune bench pruning`), a timing comparison here would flake on a loaded machine
    assert len(latencies) == 3 and all(0 < t < 1.0 for t in latencies)


def test_calibrator_on_an_emulated_device_measures_the_device():
    from node_agent.runtime import SliceCalibrator, block_input_shape
    from shared.device_model import DeviceModel
    from shared.pruning import PrunableSlice

    model = build_model()
    ladder = (0.0, 0.5, 0.9)
    prunable = PrunableSlice(model, 0, 2, ladder=ladder)
    device = DeviceModel("fp", model.n_blocks, ladder, {(a, b): (30.0, 20.0, 10.0)  # far slower than this host
                                                        for a in range(model.n_blocks)
                                                        for b in range(a, model.n_blocks)})
    calibrator = SliceCalibrator(prunable, block_input_shape(model, 0), repeats=2, device_model=device)
    while not calibrator.step():
        pass
    assert calibrator.latencies() == [30.0, 20.0, 10.0]  # as a request would take on it, not this host's time


def test_emulated_slowdown_adds_the_fitted_calibrated_compute_not_a_sample_or_this_requests_jitter(monkeypatch):
    import node_agent.runtime as runtime_module
    from gateway.curves import fit_latency

    model = build_model()
    placement = even_split(model.n_blocks, ["a"])
    stage = StageRuntime(model, "a", placement.stages[0], 1, "out", "float16")
    slept: list[float] = []
    real_sleep, this_thread = runtime_module.time.sleep, threading.current_thread()

    def sleep(seconds: float) -> None:  # time.sleep is global: another test's leftover thread must not count
        if threading.current_thread() is this_thread:
            slept.append(seconds)
        else:
            real_sleep(seconds)
    monkeypatch.setattr(runtime_module.time, "sleep", sleep)
    frame = Request("edgeprune/camera/cam/frame", camera_frame(np.random.default_rng(3), 64, "png"), {}, 1.0, "cam")
    stage.run(frame, 1.0, slowdown=5.0)  # not calibrated yet: four times this request's own compute
    assert len(slept) == 1 and slept[0] > 0
    ladder = stage.slice.ladder
    # compute falling with the kept channels, and one sample at the top ratio taken while the machine was busy
    latencies = [0.0002 + 0.0018 * (1 - r) ** 2 for r in ladder]
    latencies[-1] *= 3
    stage.use_calibration(latencies)
    predicted = fit_latency(ladder, latencies).best()  # what the gateway's controller predicts from
    for ratio in (0.0, ladder[-1]):
        stage.slice.set_ratio(ratio)
        stage.run(frame, 1.0, slowdown=5.0)
    assert slept[1:] == [pytest.approx(4 * predicted.predict(0.0)), pytest.approx(4 * predicted.predict(ladder[-1]))]
    assert slept[-1] < 4 * latencies[-1] * 0.75  # the fit, not the busy sample


def test_activation_of_the_wrong_shape_is_rejected_as_bad_shape():
    from node_agent.runtime import block_input_shape

    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    second = StageRuntime(model, "b", placement.stages[1], 2, "out", "float16")
    n, c, h, w = block_input_shape(model, second.assignment.first_block)
    wrong = [np.zeros((n, c, h - 1, w), np.float16),  # a spatial size the block does not take
             np.zeros((n, c + 1, h, w), np.float16)]  # one channel too many, no mask
    mask = np.ones(c - 1, dtype=bool)  # a mask of the wrong full width, consistent with its tensor
    wrong_masked = wire.Activation("r", "c", 1.0, second.assignment.first_block,
                                   np.zeros((n, c - 1, h, w), np.float16), mask)
    payloads = [wire.encode(wire.Activation("r", "c", 1.0, second.assignment.first_block, t)) for t in wrong]
    for payload in [*payloads, wire.encode(wrong_masked)]:
        with pytest.raises(BadMessage) as err:
            second.run(Request("t", payload, {}, 0.0), 0.0)
        assert err.value.kind == "bad_shape"
    right = wire.encode(wire.Activation("r", "c", 1.0, second.assignment.first_block,
                                        np.zeros((n, c, h, w), np.float16)))
    assert parse_json(Result, second.run(Request("t", right, {}, 0.0), 0.0).payload).request_id == "r"


@pytest.mark.parametrize("stage", [1, 2])
def test_payload_over_the_node_limit_is_rejected_as_oversized(stage):
    """The agent checks every input with this on receipt, once (node_agent.agent._on_input)."""
    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    runtime = StageRuntime(model, "x", placement.stages[stage - 1], 2, "out", "float16", max_payload_bytes=1024)
    frame = Request("edgeprune/camera/cam/frame", camera_frame(np.random.default_rng(4), 64, "png"), {}, 1.0, "cam")
    first = StageRuntime(model, "a", placement.stages[0], 2, "out", "float16")
    payload = frame.payload if stage == 1 else first.run(frame, 1.0).payload
    assert len(payload) > 1024
    with pytest.raises(BadMessage) as err:
        runtime.check_size(payload)
    assert err.value.kind == "oversized"


def test_an_ingest_node_in_front_gives_the_same_result_and_records_the_decode_in_its_own_hop():
    """Stage 1 behind an ingest node reads the decoded input: the model sees the very tensor it would have decoded."""
    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    frame = encode_jpeg(textured_scene(640, 480))
    props = {"request_id": "r1", "capture_ts": "99.5", "true_label": "3"}
    direct = chain(model, placement, frame, "float16", props)

    ingest = IngestRuntime(model, "i", "out/ingest")
    assert ingest.takes_frames
    out = ingest.run(Request("edgeprune/camera/cam/frame", frame, props, 100.0, camera_id="cam"), started_ts=100.001)
    assert out.decode_s > 0 and out.compute_s == 0 and out.user == {"true_label": "3"}
    decoded = wire.decode(out.payload)
    assert decoded.next_block == 0 and decoded.tensor.dtype == np.float32
    assert np.array_equal(decoded.tensor, decode_frame(frame))
    req = Request(out.topic, out.payload, out.user, 100.01)
    for s in placement.stages:
        stage = StageRuntime(model, s.node_id, s, 2, f"out/{s.stage}", "float16", behind_ingest=True)
        assert not stage.takes_frames
        out = stage.run(req, started_ts=req.received_ts + 0.001)
        req = Request(out.topic, out.payload, out.user or {}, req.received_ts + 0.01)
    result = parse_json(Result, out.payload)
    assert (result.label_index, result.confidence) == (direct.label_index, pytest.approx(direct.confidence, abs=1e-6))
    assert (result.request_id, result.capture_ts, result.true_label) == ("r1", 99.5, 3)
    assert [h.stage for h in result.hops] == [0, 1, 2] and result.hops[0].node_id == "i"
    assert result.hops[0].decode_s > 0
    assert result.hops[0].compute_s == pytest.approx(0.0, abs=1e-9)


def test_stage_one_behind_an_ingest_node_refuses_a_raw_frame():
    model = build_model()
    (s,) = even_split(model.n_blocks, ["a"]).stages
    stage = StageRuntime(model, "a", s, 1, "out", "float16", behind_ingest=True)
    frame = Request("edgeprune/pipeline/stage/1/in", camera_frame(np.random.default_rng(1), 64, "png"), {}, 1.0)
    with pytest.raises(BadMessage) as info:
        stage.run(frame, started_ts=1.0)
    assert info.value.kind == "bad_magic"


def test_an_output_goes_to_the_stage_that_runs_its_next_block_under_the_placement_in_force():
    """Work queued before a move was built for the old cut: its output must not go to a stage topic no one reads."""
    from node_agent.runtime import Output
    from node_agent.serving import output_topic
    from shared.topics import Topics

    topics = Topics("edgeprune")
    root = topics.root

    def topic(next_block, placement, old_topic="old"):
        return output_topic(topics, placement, Output(old_topic, b"", "r", 0.0, next_block=next_block), pipeline=0)

    three, two, one = (even_split(6, ["a", "b", "c"][:n]) for n in (3, 2, 1))  # 0-1|2-3|4-5, 0-2|3-5, 0-5
    assert topic(4, three) == f"{root}/pipeline/stage/3/in"
    assert topic(4, two) == f"{root}/pipeline/stage/2/in"  # the old stage 3 is gone
    assert topic(1, two) == f"{root}/pipeline/stage/2/in"  # stage 1 reads frames: the next stage runs block 1
    assert topic(None, three) == "old"  # a result
    assert topic(3, one) is None  # no stage reads block 3 of a one-stage pipeline: see the next test
    assert topic(0, three) is None  # an ingest node's output, but the placement has no ingest node any more
    assert topic(0, three.model_copy(update={"ingest_node": "c"})) == f"{root}/pipeline/stage/1/in"


def test_work_queued_under_a_longer_pipeline_is_finished_here_when_this_node_is_the_only_stage_left():
    """A frame stage 1 took under 0-2 | 3-5 and served once the placement became one stage (0-5, this node): no node
    reads stage 2 any more (the gone node's session taken over, its subscription with it), so the slice in force runs
    blocks 3-5 here and the result equals the whole model's (before, it went to stage 2 and the broker dropped it)."""
    import time

    from node_agent.calibration import CalibrationSchedule
    from node_agent.serving import Server
    from shared.settings import NodeSettings
    from shared.topics import Topics

    model = build_model()
    topics = Topics("edgeprune")
    two, one = even_split(model.n_blocks, ["a", "b"]), even_split(model.n_blocks, ["a"])
    queued_under = StageRuntime(model, "a", two.stages[0], 2, topics.stage_input(2), "float32")
    in_force = StageRuntime(model, "a", one.stages[0], 1, topics.results("a"), "float32")
    sent = []

    class Bus:
        def publish(self, topic, payload, qos=0, user=None, retain=False):
            sent.append((topic, payload))

        def flush(self):
            pass

        def report_error(self, *report):
            sent.append(("error", report))

    server = Server(Bus(), NodeSettings(node_id="a", max_frame_age_s=0), topics, time.time, lambda: one,
                    lambda: in_force, CalibrationSchedule(lambda runtime: None), lambda finished: None)
    frame = camera_frame(np.random.default_rng(4), 64, "png")
    server._serve(queued_under, Request("edgeprune/camera/cam/frame", frame, {"request_id": "r1"}, time.time(),
                                        camera_id="cam"))
    ((topic, payload),) = sent
    assert topic == topics.results("a")
    result = parse_json(Result, payload)
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(decode_frame(frame))), 1)[0]
    assert (result.request_id, result.label_index) == ("r1", int(probs.argmax()))
    assert result.confidence == pytest.approx(float(probs.max()), abs=1e-5)
    assert [(h.node_id, h.first_block, h.n_blocks) for h in result.hops] == [("a", 0, 3), ("a", 3, 3)]

    sent.clear()  # no slice in force here (or one that does not run that block): sent to the old topic, as before
    server._slice_in_force = lambda: None
    server._serve(queued_under, Request("edgeprune/camera/cam/frame", frame, {"request_id": "r2"}, time.time(),
                                        camera_id="cam"))
    assert [topic for topic, _ in sent] == [topics.stage_input(2)]


def test_the_node_that_decodes_a_frame_hands_on_its_reduced_image_for_the_thumbnail():
    """Stage 1 and the ingest node return the image their decode made (a 2000x1500 JPEG at 1/8: 250x188), with no
    second decode; a stage that reads activations has none."""
    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    first, second = (StageRuntime(model, s.node_id, s, 2, f"out/{s.stage}", "float32") for s in placement.stages)
    ingest = IngestRuntime(model, "e", "out/1")
    frame = Request("edgeprune/camera/cam/frame", encode_jpeg(textured_scene(2000, 1500)), {}, 1.0, "cam")
    for runtime in (first, ingest):
        out = runtime.run(frame, started_ts=1.0)
        assert out.frame is not None and out.frame.size == (250, 188) and out.frame.mode == "RGB"
    out = first.run(frame, started_ts=1.0)
    assert second.run(Request(out.topic, out.payload, {}, 1.01), started_ts=1.01).frame is None


def test_a_frames_metadata_is_read_once_so_a_made_up_request_id_stays_the_same():
    """The agent admits a frame (and may correct its capture time) before the runtime decodes it: both must see the
    same request id and time, also when the camera sent none and the node makes them up."""
    req = Request("edgeprune/camera/cam/frame", b"", {}, 100.0, camera_id="cam")
    request_id, capture_ts = frame_metadata(req)
    assert request_id.startswith("cam-") and capture_ts == 100.0
    req.capture_ts = 120.0  # an implausible capture time replaced by the arrival's, as the agent does
    assert frame_metadata(req) == (request_id, 120.0)

