"""Where a frame's non-compute time goes: raw paho hops against the real 2-stage pipeline, in one run.

One mosquitto (with the project's logins and ACL, through :class:`edgeprune.demo.Demo`) serves both parts:

* **raw baseline** — paho clients and nothing of ours: a source publishes, two relays (each its own process)
  pass the message on, a sink receives; the three hops carry a camera frame, the stage-1 activation and the
  result at the sizes the shipped model's 2-stage split really sends, QoS 1 as the pipeline does. Each relay
  republishes either from paho's callback (``callback``: the floor) or from a worker thread fed by a queue
  (``worker``: the hand-off a node agent makes between paho's thread and its inference thread).
* **pipeline** — gateway and two node agents at p = 0 and device speed 1 (no emulated sleep), frames at a low
  fixed rate, every hop split into transfer, queue wait, decode, compute and encode from the hop records the
  gateway logs (:func:`edgeprune.bench.pipeline.hop_breakdown`), and the non-compute part of each frame:
  end-to-end latency minus the stages' compute (``non_compute_p50_ms``), against the ``callback`` chain's three
  hops (``raw_floor_p50_ms``) measured in the same run. Publishing (the socket write, and paho's hand-off to its
  network thread when the output is made off it) falls inside the next transfer: a hop record is stamped once its
  output is built, before it is published.

The raw baseline (:mod:`edgeprune.bench.raw_hops`) imports paho itself (the one place besides ``shared/bus.py``):
it measures paho with nothing of ours around it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from edgeprune.bench.pipeline import PolicyRun, Scenario, hop_breakdown
from edgeprune.bench.raw_hops import relay_chains
from gateway.store import Reader
from shared.settings import MqttSettings

CAMERA_ID = "overhead"


def add_arguments(parser) -> None:
    parser.add_argument("--rate", type=float, default=5.0, help="frames (and raw messages) per second: low, "
                        "so one frame is in flight at a time")
    parser.add_argument("--frames", type=int, default=300, help="frames through the pipeline")
    parser.add_argument("--messages", type=int, default=200, help="messages through each raw relay chain")
    parser.add_argument("--quick", action="store_true", help="20 frames and 20 messages (for tests)")
    parser.add_argument("--run-dir", type=Path, default=Path("run/bench-overhead"), help="logs and database")


def run(args) -> dict:
    frames, messages = (20, 20) if args.quick else (args.frames, args.messages)
    scenario = Scenario(name="overhead", description="2 nodes at p=0, device speed 1, fixed-rate frames",
                        duration_s=frames / args.rate, slo_s=10.0, window_s=5.0, seed=0,
                        nodes={"node-1": 1.0, "node-2": 1.0}, imbalance={}, slowdowns=(), arrivals={},
                        controller={"max_ratio": 0.0})
    bench = PolicyRun(scenario, "none", args.run_dir)
    try:
        bench.start_pipeline()
        bench.bus.unsubscribe(bench.topics.camera_frame_filter)  # the demo's frame counter: not part of a site
        bench.prepare()
        _wait_for_calibrations(bench)  # calibration runs in idle moments: let it finish before measuring
        stages = Reader(bench.db).placement()["stages"]
        sizes = hop_sizes(stages)
        mqtt = MqttSettings(host="127.0.0.1", port=bench.port, username="admin",
                            password=bench.site.credentials.password("admin"), topic_root=bench.topics.root)
        raw = relay_chains(mqtt, sizes, messages, args.rate)
        rows = _pipeline_frames(bench, frames, args.rate)
    finally:
        bench.stop_processes()
    hops = hop_breakdown(rows) if rows else {}
    document = {
        "host": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "rate_fps": args.rate, "frames_sent": frames, "results": len(rows),
        "split": [[s["first_block"], s["last_block"]] for s in stages],
        "hop_bytes": dict(zip(("frame", "activation", "result"), sizes)),
        "raw": raw, "pipeline": hops,
    }
    if hops:  # the figure: the pipeline's non-compute median against the raw floor of the same run
        floor = raw["callback"]["total, 3 hops"]["p50_ms"]
        document |= {"non_compute_p50_ms": hops["non-compute"]["p50_ms"], "raw_floor_p50_ms": floor,
                     "non_compute_over_floor": hops["non-compute"]["p50_ms"] / floor}
    raw_rows = [{"relay": mode, "part": part, **figures} for mode, result in raw.items()
                for part, figures in result.items() if part != "messages"]
    document["tables"] = {"raw paho hops at the pipeline's sizes (ms)": raw_rows,
                          "pipeline, 2 stages at p = 0, device speed 1 (ms)": [{"part": k, **v}
                                                                               for k, v in hops.items()]}
    if hops:
        document["tables"]["non-compute median against the raw floor, same run"] = [
            {k: document[k] for k in ("non_compute_p50_ms", "raw_floor_p50_ms", "non_compute_over_floor")}]
    return document


def _wait_for_calibrations(bench: PolicyRun, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        bench._check_alive()
        if set(bench.node_ids) <= Reader(bench.db).calibrated_nodes():
            return
        time.sleep(0.5)
    raise SystemExit(f"the nodes did not calibrate within {timeout_s:.0f} s; see {bench.run_dir}/*.log")


def hop_sizes(stages: list[dict]) -> tuple[int, int, int]:
    """Bytes of a camera frame, of the activation stage 1 sends and of the result, as the pipeline makes them."""
    from camera.simulator import camera_frame
    from node_agent.runtime import block_input_shape
    from shared import wire
    from shared.model import build_model
    from shared.schemas import Hop, Result, to_json
    from shared.settings import CameraSettings

    camera = CameraSettings()
    frame = camera_frame(np.random.default_rng(0), camera.size, camera.image_format)
    model = build_model()
    now = time.time()
    request_id = f"{CAMERA_ID}-{int(now * 1000):x}-000000"
    hops = [Hop(stage=s, node_id=f"node-{s}", prune_ratio=0.0, received_ts=now, started_ts=now, finished_ts=now,
                published_ts=now, decode_s=0.0) for s in (1, 2)]
    shape = block_input_shape(model, stages[1]["first_block"])
    activation = wire.encode(wire.Activation(request_id, CAMERA_ID, now, stages[1]["first_block"],
                                             np.zeros(shape, dtype=np.float16), None, hops[:1]))
    result = to_json(Result(request_id=request_id, camera_id=CAMERA_ID, capture_ts=now,
                            label=max(model.config.class_names, key=len), label_index=0, confidence=0.5, hops=hops))
    return len(frame), len(activation), len(result)


def _pipeline_frames(bench: PolicyRun, frames: int, rate: float) -> list[dict]:
    bench.opt.camera_args = ("--camera-id", CAMERA_ID, "--arrival", "fixed", "--rate", f"{rate:g}",
                             "--count", str(frames))
    bench.start_camera()
    print(f"pipeline: {frames} frames at {rate:g} frames/s", file=sys.stderr, flush=True)
    camera = bench.site.procs["camera"]
    if camera.wait(timeout=frames / rate * 4 + 120) != 0:
        raise SystemExit(f"the camera exited with code {camera.returncode}; see {bench.run_dir}/camera.log")
    # the last results reach the database (a batch every flush_interval_s); on a loaded host the stages may still
    # be working through a queue: wait while results keep coming, up to 30 s after the last new one
    rows: list[dict] = []
    deadline = time.monotonic() + 30.0
    while True:
        latest = Reader(bench.db).frames(CAMERA_ID)
        if len(latest) > len(rows):
            rows, deadline = latest, time.monotonic() + 30.0
        if len(rows) >= frames or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)
