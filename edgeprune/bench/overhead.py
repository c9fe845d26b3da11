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
  end-to-end latency minus the stages' compute. Publishing (paho's hand-off to its network thread and the
  socket write) falls inside the next transfer: a hop record is stamped before its output is published.

The raw baseline imports paho itself (the one place besides ``shared/bus.py``): it measures paho with nothing
of ours around it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edgeprune.bench.pipeline import PolicyRun, Scenario, hop_breakdown, query
from gateway.store import Reader
from shared.settings import MqttSettings

CAMERA_ID = "overhead"
RELAY_MODES = ("callback", "worker")
_STAMPS = struct.Struct("<I3d")  # sequence number, then when the source sent it and relay 1 and 2 received it


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
                            password=bench.credentials.password("admin"), topic_root=bench.topics.root)
        raw = {mode: relay_chain(mqtt, sizes, messages, args.rate, mode) for mode in RELAY_MODES}
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
    raw_rows = [{"relay": mode, "part": part, **figures} for mode, result in raw.items()
                for part, figures in result.items() if part != "messages"]
    document["tables"] = {"raw paho hops at the pipeline's sizes (ms)": raw_rows,
                          "pipeline, 2 stages at p = 0, device speed 1 (ms)": [{"part": k, **v}
                                                                               for k, v in hops.items()]}
    return document


def _wait_for_calibrations(bench: PolicyRun, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        bench._check_alive()
        done = {r["node_id"] for r in query(Reader(bench.db), "SELECT node_id FROM calibrations")}
        if set(bench.node_ids) <= done:
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
    bench.procs[-1][1].wait(timeout=frames / rate * 4 + 120)
    deadline = time.monotonic() + 30.0  # the last results reach the database (a batch every flush_interval_s)
    while True:
        rows = query(Reader(bench.db), "SELECT capture_ts, finish_ts, e2e_s, hops FROM requests WHERE camera_id = ? "
                                       "ORDER BY capture_ts", (CAMERA_ID,))
        if len(rows) >= frames or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


# --- the raw baseline ------------------------------------------------------------------------------------------
def _client(mqtt: MqttSettings, name: str):
    """A plain paho client (MQTT v5, the project's login, TCP_NODELAY as shared/bus.py sets it), connected."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    client.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
    client.connect(mqtt.host, mqtt.port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def _relay(mqtt: MqttSettings, index: int, in_topic: str, out_topic: str, out_size: int, mode: str,
           ready, stop) -> None:
    """One relay process: stamp the arrival into the message, resize it to the next hop's size, publish it on."""
    client = _client(mqtt, f"bench-relay-{mode}-{index}")
    subscribed = threading.Event()
    work: queue.Queue = queue.Queue()

    def forward(payload: bytes, received: float) -> None:
        seq, *stamps = _STAMPS.unpack_from(payload)
        stamps[index] = received
        out = bytearray(out_size)
        _STAMPS.pack_into(out, 0, seq, *stamps)
        client.publish(out_topic, bytes(out), qos=1)

    def on_message(_client, _userdata, msg) -> None:
        received = time.time()
        if mode == "callback":
            forward(msg.payload, received)
        else:
            work.put((msg.payload, received))

    def worker() -> None:
        while not stop.is_set():
            try:
                forward(*work.get(timeout=0.2))
            except queue.Empty:
                pass

    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.loop_start()
    client.subscribe(in_topic, qos=1)
    subscribed.wait(10)
    if mode == "worker":
        threading.Thread(target=worker, daemon=True).start()
    ready.set()
    stop.wait()
    client.loop_stop()
    client.disconnect()


def relay_chain(mqtt: MqttSettings, sizes: tuple[int, int, int], messages: int, rate: float, mode: str) -> dict:
    """Source -> relay 1 -> relay 2 -> sink, one message at a time at ``rate``; per-hop and total (ms)."""
    base = f"{mqtt.topic_root}/bench/overhead/{mode}"
    topics = [f"{base}/hop{i}" for i in (1, 2, 3)]
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    readies = [context.Event() for _ in (1, 2)]
    relays = [context.Process(target=_relay, args=(mqtt, i, topics[i - 1], topics[i], sizes[i], mode, readies[i - 1],
                                                   stop), daemon=True) for i in (1, 2)]
    for relay in relays:
        relay.start()
    arrivals: dict[int, tuple[tuple[float, ...], float]] = {}
    got = threading.Event()
    sink = _client(mqtt, f"bench-sink-{mode}")
    subscribed = threading.Event()

    def on_message(_client, _userdata, msg) -> None:
        received = time.time()
        seq, *stamps = _STAMPS.unpack_from(msg.payload)
        arrivals[seq] = (tuple(stamps), received)
        got.set()

    sink.on_message = on_message
    sink.on_subscribe = lambda *_: subscribed.set()
    sink.loop_start()
    sink.subscribe(topics[2], qos=1)
    source = _client(mqtt, f"bench-source-{mode}")
    source.loop_start()
    try:
        if not (subscribed.wait(10) and all(r.wait(120) for r in readies)):
            raise SystemExit("the raw relays did not start; is the broker up?")
        warmup = 10
        print(f"raw relay ({mode}): {messages} messages at {rate:g}/s", file=sys.stderr, flush=True)
        started = time.monotonic()
        for seq in range(warmup + messages):
            time.sleep(max(0.0, started + seq / rate - time.monotonic()))
            payload = bytearray(sizes[0])
            _STAMPS.pack_into(payload, 0, seq, time.time(), 0.0, 0.0)
            source.publish(topics[0], bytes(payload), qos=1)
        deadline = time.monotonic() + 30
        while len(arrivals) < warmup + messages and time.monotonic() < deadline:
            got.wait(1.0)
            got.clear()
    finally:
        stop.set()
        for client in (source, sink):
            client.loop_stop()
            client.disconnect()
        for relay in relays:
            relay.join(10)
    parts: dict[str, list[float]] = {}
    for seq, ((sent, relay1, relay2), received) in arrivals.items():
        if seq < warmup:
            continue
        for name, value in (("hop 1 (frame)", relay1 - sent), ("hop 2 (activation)", relay2 - relay1),
                            ("hop 3 (result)", received - relay2), ("total, 3 hops", received - sent),
                            ("hops 2+3", received - relay1)):
            parts.setdefault(name, []).append(value)
    out = {name: {"p50_ms": 1000 * float(np.percentile(v, 50)), "p99_ms": 1000 * float(np.percentile(v, 99))}
           for name, v in parts.items()}
    out["messages"] = sum(1 for seq in arrivals if seq >= warmup)
    return out
