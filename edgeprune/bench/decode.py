"""Camera-frame decoding: full vs reduced decode per format and size, its share of stage 1, and a real
two-stage pipeline's frame rate with 12 MP frames before and after, with the planner's prediction, and
(reduced decode) without and with a third node decoding as the ingest stage, in one run.

Frames are made here, nothing is downloaded: scikit-image's bundled CC0 photos, upscaled to the
frame size with a little sensor-like noise, so the JPEGs are as large as a camera trap's
(~0.3 B per pixel: a 12 MP frame of 3-4 MB). "before" is the full decode every frame had until
decoding was reduced (``decode_frame(..., reduced=False)``, the node setting
``reduced_decode = false``); "after" is today's path. Both run in the same process, interleaved,
so the machine's load affects both alike.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.imaging import (ACCEPTED_FORMATS, INPUT_SIZE, decode_frame, decode_pixels, encode_jpeg, encode_png,
                            fit_square, frame_size, normalise, reduce_towards)

FRAMES = (("jpeg", 0.3), ("jpeg", 2.0), ("jpeg", 12.0), ("jpeg", 20.0), ("png", 0.3), ("png", 2.0))
PIPELINE_MEGAPIXELS = 12.0
TARGET_DECODE_SPEEDUP = 4.0
TARGET_PIPELINE_SPEEDUP = 4.0
TARGET_PREDICTION_ERROR = 0.2
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=9, help="timed decodes per frame and path (median)")
    parser.add_argument("--accuracy-frames", type=int, default=300,
                        help="test-split frames for the accuracy check (0 skips it)")
    parser.add_argument("--accuracy-megapixels", type=float, default=2.0,
                        help="size the test frames are upscaled to and JPEG-encoded at for the accuracy check")
    parser.add_argument("--pipeline-seconds", type=float, default=20.0,
                        help="measured time per pipeline run (0 skips the pipeline runs)")
    parser.add_argument("--in-flight", type=int, default=6,
                        help="frames in flight in the pipeline runs (closed loop: enough to keep both stages busy)")


def photo_like(megapixels: float, seed: int, noise: float = 6.0) -> np.ndarray:
    """A bundled photo upscaled to a 4:3 frame of ``megapixels``, with Gaussian sensor-like noise."""
    import skimage.data
    from PIL import Image

    photo = getattr(skimage.data, PHOTOS[seed % len(PHOTOS)])()
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    big = Image.fromarray(photo[..., :3]).resize(frame_size(megapixels), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    pixels = np.asarray(big, dtype=np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encoded(fmt: str, megapixels: float, seed: int = 0) -> bytes:
    pixels = photo_like(megapixels, seed)
    return encode_jpeg(pixels) if fmt == "jpeg" else encode_png(pixels)


def median_s(*fns, repeats: int) -> list[float]:
    """Median seconds of each function, timed in turn within every repeat so that both see the same load."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def stage_one_slice_s(ratios: tuple[float, ...] = (0.0, 0.5), repeats: int = 20) -> tuple[tuple[int, int], dict]:
    """Today's stage 1 of a two-node pipeline (planned from this machine's profile, model-sized frames)
    and its median compute at each ratio."""
    import torch

    from gateway.placement import Device, plan_pipeline
    from shared.model import INPUT_SIZE, build_model
    from shared.profiling import profile_model
    from shared.pruning import PrunableSlice

    torch.set_num_threads(1)
    model = build_model()
    blocks = profile_model(model, threads=1, repeats=10).blocks
    devices = [Device(f"d{i}", 1 << 40, 1e12) for i in range(2)]
    plan = plan_pipeline({d.id: blocks for d in devices}, devices, frame_bytes=0, camera_bandwidth_bps=1.0)
    first = plan.stages[0]
    prunable = PrunableSlice(model, first.first_block, first.last_block)
    x = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    times = {}
    with torch.inference_mode():
        for ratio in ratios:
            module = prunable.module(ratio)
            (times[ratio],) = median_s(lambda: module(x), repeats=repeats)
    return (first.first_block, first.last_block), times


def minimal_decode(payload: bytes, size: int = INPUT_SIZE):
    """The least a reduced decode can do: draft, load, one resize (no checks, no normalisation).

    The floor ``decode_frame`` is compared against, to show how much of its time is avoidable work.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(payload), formats=ACCEPTED_FORMATS)
    img.draft("RGB", (size, size))
    img.load()
    return img.resize((size, size), Image.Resampling.BILINEAR)


def decode_steps_ms(megapixels: float, repeats: int, size: int = INPUT_SIZE) -> dict[str, Any]:
    """Median ms of each step of the reduced path (``shared.imaging.decode_pixels`` + ``normalise``), one by one.

    The steps are spelled out here only to put a clock between them; the path itself lives in imaging.
    """
    from PIL import Image

    payload = encoded("jpeg", megapixels)
    names = ("open", "draft", "load", "convert", "reduce", "fit", "asarray", "normalise")
    spent: list[list[float]] = [[] for _ in names]
    for repeat in range(repeats + 1):  # the first is a warm-up
        marks = [time.perf_counter()]
        img = Image.open(io.BytesIO(payload), formats=ACCEPTED_FORMATS)
        marks.append(time.perf_counter())
        img.draft("RGB", (size, size))
        marks.append(time.perf_counter())
        img.load()
        marks.append(time.perf_counter())
        rgb = img.convert("RGB")
        marks.append(time.perf_counter())
        rgb = reduce_towards(rgb, size)
        marks.append(time.perf_counter())
        square = fit_square(rgb, size)
        marks.append(time.perf_counter())
        pixels = np.asarray(square, dtype=np.uint8)
        marks.append(time.perf_counter())
        normalise(pixels)
        marks.append(time.perf_counter())
        if repeat:
            for step, (a, b) in zip(spent, itertools.pairwise(marks)):
                step.append((b - a) * 1e3)
    return {"megapixels": megapixels, "draft_size": list(img.size),
            **{f"{n}_ms": statistics.median(s) for n, s in zip(names, spent)}}


def decode_table(repeats: int, slice_s: dict[float, float]) -> list[dict[str, Any]]:
    rows = []
    for fmt, mp in FRAMES:
        payload = encoded(fmt, mp)
        before, after, minimal = median_s(lambda: decode_frame(payload, reduced=False), lambda: decode_frame(payload),
                                          lambda: minimal_decode(payload), repeats=repeats)
        row = {"format": fmt, "megapixels": mp, "mbytes": len(payload) / 1e6,
               "before_ms": before * 1e3, "after_ms": after * 1e3, "speedup": before / after,
               "minimal_ms": minimal * 1e3}
        for ratio, compute in slice_s.items():
            row[f"share_p{ratio:g}_before"] = before / (before + compute)
            row[f"share_p{ratio:g}_after"] = after / (after + compute)
        rows.append(row)
        print(f"  {fmt} {mp:g} MP: {row['before_ms']:.1f} -> {row['after_ms']:.1f} ms "
              f"(draft + load + resize alone: {row['minimal_ms']:.1f} ms)", flush=True)
    return rows


def accuracy_check(n_frames: int, megapixels: float) -> dict[str, Any]:
    """Test-split frames upscaled to camera size, JPEG-encoded, then classified through both decode paths."""
    import torch
    from PIL import Image

    from edgeprune.dataset import load_frames
    from shared.model import build_model

    test = load_frames()["test"]
    n = min(n_frames, len(test))
    model = build_model().eval()
    predictions: dict[str, list[int]] = {"native": [], "before": [], "after": []}
    for image in test.images[:n]:
        big = np.asarray(Image.fromarray(image).resize(frame_size(megapixels), Image.Resampling.BICUBIC))
        jpeg = encode_jpeg(big)
        inputs = {"native": image, "before": decode_pixels(jpeg, reduced=False), "after": decode_pixels(jpeg)}
        with torch.inference_mode():
            for path, pixels in inputs.items():
                predictions[path].append(int(model(torch.from_numpy(normalise(pixels))).argmax()))
    labels = test.labels[:n]
    result = {"frames": n, "megapixels": megapixels}
    for path, predicted in predictions.items():
        result[f"accuracy_{path}"] = float((np.array(predicted) == labels).mean())
    result["agreement_before_after"] = float((np.array(predictions["before"]) == np.array(predictions["after"])).mean())
    return result


class PipelineRun:
    """A real mosquitto on loopback and two node agents (subprocesses), plus an ingest-role node with
    ``ingest``; frames sent in a closed loop, each placement measured in turn."""

    def __init__(self, workdir: Path, reduced: bool, frames: list[bytes], in_flight: int, ingest: bool = False):
        from edgeprune.broker import free_port
        from edgeprune.launcher import SiteLauncher
        from shared.settings import BrokerSettings, MqttSettings

        self.workdir = workdir
        self.frames = frames
        self.in_flight = in_flight
        broker = BrokerSettings(port=free_port(), data_dir=workdir / "broker", max_packet_size=64 << 20)
        self.nodes = [f"{'after' if reduced else 'before'}-{i}" for i in (1, 2)]
        self.ingest_node = f"{self.nodes[0].split('-')[0]}-ingest" if ingest else None
        # the broker takes only logins: each node its own, the benchmark (camera and placer) the operator's
        users = {node: "node" for node in self.nodes + ([self.ingest_node] if ingest else [])}
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
        env.update(EDGEPRUNE_MQTT_PORT=str(broker.port), EDGEPRUNE_MQTT_TOPIC_ROOT="bench",
                   EDGEPRUNE_NODE_REDUCED_DECODE=str(reduced).lower(), EDGEPRUNE_NODE_QUEUE_SIZE="8",
                   EDGEPRUNE_NODE_MAX_PAYLOAD_BYTES=str(64 << 20), PYTHONUNBUFFERED="1")
        self.site = SiteLauncher(workdir, broker, {**users, "bench": "admin"}, env, topic_root="bench")
        self.mqtt = MqttSettings(port=broker.port, topic_root="bench", username="bench",
                                 password=self.site.credentials.password("bench"))
        self.offers: dict[str, Any] = {}
        self.calibrations: dict[str, Any] = {}
        self.results: list[tuple[float, Any]] = []
        self.sent = 0
        self._slots = threading.Semaphore(in_flight)
        self._lock = threading.Lock()

    def start(self) -> None:
        """The broker now; the nodes one by one in :meth:`measure`."""
        self.site.start_broker()

    def start_node(self, node: str) -> None:
        role = {"EDGEPRUNE_NODE_ROLE": "ingest"} if node == self.ingest_node else {}
        self.site.start(node, ["node", "--node-id", node], env=role)

    def stop(self) -> None:
        self.site.stop_all()

    def measure(self, seconds: float, megapixels: float) -> dict[str, Any]:
        """The two stage nodes planned with the frames' decode on stage 1 and, with an ingest node, behind it:
        ``{"stage1": figures, "ingest": figures, "planner": what plan_with_ingest picks over all three nodes}``."""
        from gateway.placement import Device, plan_behind_ingest, plan_pipeline, plan_with_ingest, problem_from_profiles
        from shared.bus import Bus
        from shared.imaging import model_input_bytes
        from shared.profiling import MBIT_BYTES, mb_to_bytes
        from shared.schemas import NodeProfile, Result, SliceCalibration, parse_json
        from shared.topics import Topics

        topics = Topics("bench")
        bus = Bus(self.mqtt, "bench-camera", topics.component_status("bench-camera"))
        bus.subscribe(topics.node_profile_filter, lambda t, p, _: self.offers.update(
            {(o := parse_json(NodeProfile, p)).node_id: o}))
        bus.subscribe(topics.node_calibration_filter, lambda t, p, _: self.calibrations.update(
            {(c := parse_json(SliceCalibration, p)).node_id: c}))
        bus.subscribe(topics.results_filter, lambda t, p, _: self._on_result(parse_json(Result, p)))
        bus.start()
        try:
            everyone = self.nodes + ([self.ingest_node] if self.ingest_node else [])
            for node in everyone:  # one at a time: two nodes profiling at once would slow each other
                self.start_node(node)
                wait_for(lambda: node in self.offers, 300, f"profile of {node}", self.workdir)
            offers = [self.offers[n] for n in everyone]
            devices = [Device(o.node_id, mb_to_bytes(o.memory_mb), o.uplink_mbit_s * MBIT_BYTES) for o in offers]
            decode_s = {o.node_id: o.decode.predict(megapixels) for o in offers}
            blocks = {o.node_id: o.profile.blocks for o in offers}
            plans = {"stage1": plan_pipeline(blocks, devices[:2], frame_bytes=0, camera_bandwidth_bps=1.0,
                                             decode_s={n: decode_s[n] for n in self.nodes})}
            figures = {}
            if self.ingest_node:
                problem = problem_from_profiles(blocks, devices, 0, 1.0, decode_s=decode_s)
                plans["ingest"] = plan_behind_ingest(problem, self.ingest_node, model_input_bytes(), self.nodes)
                chosen = plan_with_ingest(problem, model_input_bytes(), ingest_only={self.ingest_node})
                figures["planner"] = {"ingest_node": chosen.ingest.device if chosen.ingest else None,
                                      "stage_nodes": "+".join(s.device for s in chosen.stages),
                                      "bottleneck_ms": chosen.bottleneck_s * 1e3}
            # with an ingest node the two placements take turns, twice (A B A B): the shared machine's load drifts
            order = list(plans) * (2 if self.ingest_node else 1)
            passes: dict[str, list] = {label: [] for label in plans}
            for version, label in enumerate(order, start=1):
                passes[label].append(self._measure_plan(bus, topics, plans[label], version, seconds))
            for label, plan in plans.items():
                figures[label] = summarise(plan, passes[label])
        finally:
            bus.stop()
        return figures

    def _measure_plan(self, bus, topics, plan, version: int, seconds: float) -> list:
        """Publish ``plan``, wait for its slices' calibrations, then send frames in a closed loop for ``seconds``:
        the (arrival time, result) of every frame after the warm-up."""
        from shared.model import MODEL_NAME
        from shared.schemas import to_json

        placement = plan.to_placement(version, MODEL_NAME, issued_at=time.time())
        bus.publish(topics.placement, to_json(placement), qos=1, retain=True)

        def calibrated(stage) -> bool:  # stage 1's slice is rebuilt whenever the ingest node comes or goes
            c = self.calibrations.get(stage.node_id)
            return (c is not None and (c.first_block, c.last_block) == (stage.first_block, stage.last_block)
                    and (stage.stage != 1 or c.placement_version == version))

        wait_for(lambda: all(calibrated(s) for s in placement.stages), 300, "calibrations", self.workdir)
        with self._lock:
            start = len(self.results)
        deadline = warm = None
        while deadline is None or time.monotonic() < deadline:
            if not self._slots.acquire(timeout=60):
                raise RuntimeError(f"no result for 60 s; node logs in {self.workdir}")
            bus.publish(topics.camera_frame("bench-cam"), self.frames[self.sent % len(self.frames)], qos=1,
                        user={"request_id": f"bench-{self.sent:06d}", "capture_ts": repr(time.time())})
            self.sent += 1
            if deadline is None and len(self.results) - start >= 2 * self.in_flight:  # warmed up
                warm = len(self.results)
                deadline = time.monotonic() + seconds
        with self._lock:
            measured = self.results[warm:]
        wait_for(lambda: len(self.results) >= self.sent, 60, "the frames in flight", self.workdir)  # before the next
        return measured

    def _on_result(self, result) -> None:
        with self._lock:
            self.results.append((time.monotonic(), result))
        self._slots.release()


def summarise(plan, passes: list[list]) -> dict[str, Any]:
    """One placement's figures over its passes: the mean of the passes' rates, medians of the pooled hops."""
    rates = [(len(p) - 1) / (p[-1][0] - p[0][0]) for p in passes]
    measured = [r for p in passes for _, r in p]
    decoding = [r.hops[0] for r in measured]  # stage 1's hop, or the ingest node's before it
    stage_one = [r.hops[1 if plan.ingest else 0] for r in measured]
    figures = {"results": len(measured), "rate_hz": statistics.mean(rates),
               "stage1_blocks": [plan.stages[0].first_block, plan.stages[0].last_block],
               "stage1_measured_ms": statistics.median(h.finished_ts - h.started_ts for h in stage_one) * 1e3,
               "stage1_decode_ms": statistics.median(h.decode_s for h in stage_one) * 1e3,
               "stage1_compute_ms": statistics.median(h.compute_s for h in stage_one) * 1e3,
               "predicted_stage1_ms": plan.stages[0].compute_s * 1e3,
               "predicted_bottleneck_ms": plan.bottleneck_s * 1e3}
    if plan.ingest:
        figures.update(ingest_measured_ms=statistics.median(h.finished_ts - h.started_ts for h in decoding) * 1e3,
                       predicted_ingest_ms=plan.ingest.decode_s * 1e3)
    if len(rates) > 1:
        figures["rate_hz_passes"] = " / ".join(f"{r:.2f}" for r in rates)
    return figures


def wait_for(predicate, timeout_s: float, what: str, workdir: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout_s:.0f} s; node logs in {workdir}")
        time.sleep(0.2)


def pipeline_rates(seconds: float, in_flight: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Rates before and after (decode on stage 1), and "ingest": after's nodes behind a third node that decodes,
    measured in after's run; with the plan the planner picks over after's three nodes."""
    frames = [encode_jpeg(photo_like(PIPELINE_MEGAPIXELS, seed)) for seed in range(3)]
    runs = {}
    for label, reduced in (("before", False), ("after", True)):
        workdir = Path(tempfile.mkdtemp(prefix=f"edgeprune-bench-decode-{label}-"))
        run = PipelineRun(workdir, reduced, frames, in_flight, ingest=reduced)
        run.start()
        try:
            measured = run.measure(seconds, PIPELINE_MEGAPIXELS)
        finally:
            run.stop()
        runs[label] = measured["stage1"]
        print(f"  pipeline {label}: {runs[label]['rate_hz']:.2f} frames/s", flush=True)
        if "ingest" in measured:
            runs["ingest"], picks = measured["ingest"], measured["planner"]
            print(f"  pipeline {label} behind an ingest node: {runs['ingest']['rate_hz']:.2f} frames/s; the planner "
                  f"picks ingest by {picks['ingest_node']}, stages {picks['stage_nodes']}", flush=True)
    return runs, picks


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = os.getloadavg()
    print("stage-1 slice time ...", flush=True)
    stage_one, slice_s = stage_one_slice_s()
    print("decode times ...", flush=True)
    rows = decode_table(args.repeats, slice_s)
    steps = decode_steps_ms(PIPELINE_MEGAPIXELS, args.repeats)
    host_load = {"start": load_at_start[0], "after_decode": os.getloadavg()[0]}
    result: dict[str, Any] = {
        "decode": rows,
        "decode_steps": steps,
        "host_load_1min": host_load,
        "stage1": {"blocks": list(stage_one), **{f"slice_p{r:g}_ms": t * 1e3 for r, t in slice_s.items()}},
        "tables": {"decode time per frame, full (before) vs reduced (after); share = decode / (decode + today's "
                   f"stage-1 slice, blocks {stage_one[0]}-{stage_one[1]}) at p=0 and p=0.5; minimal = draft + "
                   "load + resize alone": rows,
                   f"reduced decode of a {PIPELINE_MEGAPIXELS:g} MP JPEG, step by step (median ms)": [steps],
                   "host load average (1 min) at the start and after the decode table": [host_load]},
    }
    twelve = next(r for r in rows if r["format"] == "jpeg" and r["megapixels"] == PIPELINE_MEGAPIXELS)
    targets = [{"target": f"12 MP JPEG decode >= {TARGET_DECODE_SPEEDUP:g}x faster", "measured": twelve["speedup"],
                "met": twelve["speedup"] >= TARGET_DECODE_SPEEDUP}]
    if args.accuracy_frames:
        print("accuracy through both decode paths ...", flush=True)
        result["accuracy"] = accuracy_check(args.accuracy_frames, args.accuracy_megapixels)
        result["tables"]["test-split accuracy: native 64x64 frames vs upscaled + JPEG through each path"] = [
            result["accuracy"]]
    if args.pipeline_seconds:
        print("two-stage pipeline with 12 MP frames ...", flush=True)
        runs, picks = pipeline_rates(args.pipeline_seconds, args.in_flight)
        result["pipeline"] = runs
        result["pipeline_12mp_hz"] = {label: r["rate_hz"] for label, r in runs.items()}
        result["ingest"] = {"rate_ratio": runs["ingest"]["rate_hz"] / runs["after"]["rate_hz"],
                            "predicted_ratio": runs["after"]["predicted_bottleneck_ms"]
                            / runs["ingest"]["predicted_bottleneck_ms"],
                            **{f"planner_{k}": v for k, v in picks.items()}}
        result["tables"]["ingest node vs decode on stage 1 (rate and predicted ratios: with / without)"] = [
            result["ingest"]]
        result["tables"]["two-stage pipeline, 12 MP JPEG frames, real mosquitto on loopback"] = [
            {"decode": label, **{k: v for k, v in r.items() if k != "stage1_blocks"},
             "stage1_blocks": "-".join(map(str, r["stage1_blocks"]))} for label, r in runs.items()]
        speedup = runs["after"]["rate_hz"] / runs["before"]["rate_hz"]
        error = runs["after"]["predicted_bottleneck_ms"] / runs["after"]["stage1_measured_ms"] - 1
        targets += [{"target": f"pipeline rate >= {TARGET_PIPELINE_SPEEDUP:g}x", "measured": speedup,
                     "met": speedup >= TARGET_PIPELINE_SPEEDUP},
                    {"target": f"predicted bottleneck within {TARGET_PREDICTION_ERROR:.0%} of measured stage 1",
                     "measured": error, "met": abs(error) <= TARGET_PREDICTION_ERROR}]
    result["targets"] = targets
    result["tables"]["targets"] = targets
    return result
