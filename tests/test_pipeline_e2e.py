"""End to end through a real mosquitto: gateway and two node agents as subprocesses."""

from __future__ import annotations

import json
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from camera.simulator import camera_frame, synthetic_scene
from edgeprune.dataset import RenderConfig, _backgrounds, render_frame
from gateway.export import Filters, detections_page, write_camtrap_dp
from gateway.store import Reader
from node_agent.runtime import block_input_shape
from shared import wire
from shared.imaging import decode_frame, encode_jpeg, encode_png, textured_scene
from shared.model import build_model
from tests.conftest import (STARTUP_S, Processes, Recorder, component_env, login, mosquitto_pub_login,
                            start_two_stage_site, wait_until)

pytestmark = pytest.mark.integration
NODE_MAX_PAYLOAD = 300_000


@pytest.fixture(scope="module")
def pipeline(broker, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    db = workdir / "edgeprune.db"
    # fast links, so the planner's best plan uses both nodes (the test is about the data path)
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_WINDOW_S="2",
                        EDGEPRUNE_NODE_WIRE_DTYPE="float32",
                        EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5", EDGEPRUNE_NODE_UPLINK_MBIT_S="100000",
                        EDGEPRUNE_NODE_MAX_PAYLOAD_BYTES=str(NODE_MAX_PAYLOAD),
                        EDGEPRUNE_GATEWAY_THUMBNAIL_BUDGET_MB="1")
    procs = Processes(workdir, env)
    recorder = Recorder(broker, "edgeprune/error/+", "edgeprune/node/+/status")
    try:
        reader = start_two_stage_site(procs, db)
        placement = reader.placement()
        stage_nodes = [s["node_id"] for s in placement["stages"]]
        stage2 = placement["stages"][1]["first_block"]
        yield SimpleNamespace(procs=procs, reader=reader, recorder=recorder, broker=broker, env=env,
                              stage_nodes=stage_nodes, stage2_block=stage2,
                              stage2_shape=block_input_shape(build_model(), stage2))
    finally:
        recorder.close()
        procs.stop_all()


def results_for(reader: Reader, camera_id: str) -> list[dict]:
    return [r for r in reader.recent_requests(0, limit=100_000) if r["camera_id"] == camera_id]


def hops_of(reader: Reader, request_id: str) -> list[dict]:
    (raw,) = reader.db.execute("SELECT hops FROM requests WHERE request_id = ?", (request_id,)).fetchone()
    return json.loads(raw)


def test_camera_publishes_a_folder_of_real_files_and_their_decode_is_accounted(pipeline, tmp_path):
    """Files at native size, looping in name order; stage 1's decode shows in hops, rows and node stats."""
    folder = tmp_path / "trap"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode_jpeg(textured_scene(1000, 750, seed=1)))
    (folder / "b.PNG").write_bytes(encode_png(textured_scene(256, 192, seed=2)))
    (folder / "notes.txt").write_text("not a frame")
    stage1 = pipeline.stage_nodes[0]
    stats = Recorder(pipeline.broker, f"edgeprune/node/{stage1}/stats")
    cam = pipeline.procs.start("camera-files", "camera", "--camera-id", "cam-files", "--count", "3", "--rate", "10",
                               "--arrival", "fixed", "--images", str(folder))
    assert cam.wait(60) == 0, pipeline.procs.log("camera-files")
    wait_until(lambda: len(results_for(pipeline.reader, "cam-files")) == 3, 60, "the 3 file frames were not classified")
    rows = sorted(results_for(pipeline.reader, "cam-files"), key=lambda r: r["request_id"])
    model = build_model()
    for row, name in zip(rows, ["a.jpg", "b.PNG", "a.jpg"]):
        with torch.inference_mode():
            expected = int(model(torch.from_numpy(decode_frame((folder / name).read_bytes()))).argmax())
        assert row["label_index"] == expected
        first_hop = hops_of(pipeline.reader, row["request_id"])[0]
        assert first_hop["decode_s"] > 0 and row["decode_s"] >= first_hop["decode_s"]
        assert row["transfer_s"] == pytest.approx(row["e2e_s"] - row["queue_s"] - row["decode_s"] - row["compute_s"])
    try:  # stats describe one interval: the one that saw these frames reports their decode apart
        wait_until(lambda: any((m["decode_mean_s"] or 0) > 0 and m["compute_mean_s"] > 0
                               for m in stats.json_on(f"edgeprune/node/{stage1}/stats")),
                   30, "stage 1's stats never reported a decode time")
    finally:
        stats.close()


def test_camera_with_an_empty_image_folder_says_so(pipeline, tmp_path):
    cam = pipeline.procs.start("camera-empty", "camera", "--images", str(tmp_path))
    assert cam.wait(30) == 2
    assert f"no .jpg, .jpeg or .png files in {tmp_path}" in pipeline.procs.log("camera-empty")


def test_fifty_frames_classified_in_order_and_equal_to_single_process_model(pipeline):
    cam = pipeline.procs.start("camera", "camera", "--camera-id", "cam-e2e", "--count", "50", "--rate", "25",
                               "--arrival", "fixed", "--seed", "7")
    assert cam.wait(STARTUP_S) == 0, pipeline.procs.log("camera")
    wait_until(lambda: len(results_for(pipeline.reader, "cam-e2e")) == 50, 60,
               "not all 50 frames reached the requests table")
    rows = {r["request_id"].rsplit("-", 1)[1]: r for r in results_for(pipeline.reader, "cam-e2e")}
    assert len(rows) == 50

    model = build_model()
    rng = np.random.default_rng(7)
    for i in range(50):
        row = rows[f"{i:06d}"]
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(decode_frame(camera_frame(rng, 64, "png")))), 1)[0]
        assert row["label_index"] == int(probs.argmax()), f"frame {i}"
        assert row["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)

        hops = hops_of(pipeline.reader, row["request_id"])
        assert [h["stage"] for h in hops] == [1, 2]
        assert [h["node_id"] for h in hops] == pipeline.stage_nodes
        times = [row["capture_ts"]]
        for h in hops:
            times += [h["received_ts"], h["started_ts"], h["finished_ts"], h["published_ts"]]
        times.append(row["finish_ts"])
        assert times == sorted(times), f"timestamps out of order for frame {i}: {times}"
        assert row["e2e_s"] == pytest.approx(row["finish_ts"] - row["capture_ts"])
    # a result falls in the window of its receipt at the gateway (docs/database.md), which on a loaded host can be
    # a window after its last stage finished
    (last_received,) = pipeline.reader.db.execute(
        "SELECT MAX(received_ts) FROM requests WHERE camera_id = 'cam-e2e'").fetchone()
    wait_until(lambda: any(w["end_ts"] > last_received for w in pipeline.reader.windows()), 30,
               "the SLO windows of these frames were not written")
    slo_s = pipeline.reader.current_run()["slo_s"]
    windows = pipeline.reader.windows(limit=10_000)
    for w in windows:  # every window agrees with the requests table: same count, `met` is latency <= SLO
        count, met = pipeline.reader.db.execute(
            "SELECT COUNT(*), SUM(e2e_s <= ?) FROM requests WHERE received_ts >= ? AND received_ts < ?",
            (slo_s, w["start_ts"], w["end_ts"])).fetchone()
        assert (w["count"], w["met"], w["slo_s"]) == (count, met, slo_s), w
    assert sum(w["count"] for w in windows if w["start_ts"] <= last_received) >= 50


def test_jpeg_from_plain_mosquitto_pub_is_classified(pipeline, tmp_path):
    pixels = synthetic_scene(np.random.default_rng(3), 120)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode_jpeg(pixels))
    pub = ["mosquitto_pub", *mosquitto_pub_login(pipeline.broker), "-q", "1", "-f", str(photo)]
    subprocess.run([*pub, "-t", "edgeprune/camera/trap-7/frame"], check=True, timeout=10)
    # the documented optional extras: MQTT v5 user properties for the request id and capture time
    captured = round(time.time() - 2.0, 2)
    subprocess.run([*pub, "-t", "edgeprune/camera/trap-8/frame", "-V", "mqttv5",
                    "-D", "publish", "user-property", "request_id", "IMG_0042",
                    "-D", "publish", "user-property", "capture_ts", repr(captured)], check=True, timeout=10)
    wait_until(lambda: results_for(pipeline.reader, "trap-7") and results_for(pipeline.reader, "trap-8"), 30,
               "the JPEGs never came out as rows")
    (plain,) = results_for(pipeline.reader, "trap-7")
    (tagged,) = results_for(pipeline.reader, "trap-8")
    with torch.inference_mode():
        expected = int(build_model()(torch.from_numpy(decode_frame(photo.read_bytes()))).argmax())
    assert plain["label_index"] == tagged["label_index"] == expected
    assert plain["request_id"].startswith("trap-7-")
    assert (tagged["request_id"], tagged["capture_ts"]) == ("IMG_0042", captured)


def test_an_empty_frame_is_stored_as_blank_for_the_page_and_the_export(pipeline, tmp_path):
    """The shipped model's blank class reaches the requests table by name, where the page's species filter
    (and the Camtrap DP export, tests/test_export.py) find it."""
    model, backgrounds = build_model(), _backgrounds()
    for j in range(20):  # the first of a few unseen empty frames the model, in one process, calls blank
        frame = encode_png(render_frame(None, backgrounds, np.random.default_rng([0, 200_000 + j]), RenderConfig(),
                                        night=False))
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(decode_frame(frame))), 1)[0]
        if model.config.class_names[int(probs.argmax())] == "blank" and probs.max() > 0.9:
            break
    else:
        pytest.fail("the shipped model called none of 20 empty frames blank")
    photo = tmp_path / "empty.png"
    photo.write_bytes(frame)
    subprocess.run(["mosquitto_pub", *mosquitto_pub_login(pipeline.broker), "-q", "1", "-f", str(photo),
                    "-t", "edgeprune/camera/trap-empty/frame"], check=True, timeout=10)
    wait_until(lambda: results_for(pipeline.reader, "trap-empty"), 30, "the empty frame never came out as a row")
    (row,) = results_for(pipeline.reader, "trap-empty")
    assert (row["label"], row["label_index"]) == ("blank", len(model.config.class_names) - 1)
    rows, _ = detections_page(pipeline.reader.db.conn, Filters(camera_id="trap-empty", label="blank"))
    assert [r["request_id"] for r in rows] == [row["request_id"]]


def test_a_frame_leaves_a_thumbnail_that_the_export_holds_as_its_media_file(pipeline, tmp_path):
    """Stage 1 makes it from its own decode and sends it; the gateway checks and stores it; Camtrap DP names it."""
    from shared.thumbnail import check_thumbnail
    from tests.test_export import camtrap_dp_errors

    captured = round(time.time() - 1.0, 2)
    _publish(pipeline.broker, "edgeprune/component/gateway/cmd", json.dumps({
        "cmd": "camera", "camera_id": "trap-thumb", "location_name": "test plot", "latitude": -19.0,
        "longitude": 23.0, "start_ts": captured - 3600}).encode())
    photo = tmp_path / "IMG_0100.JPG"
    # 2.8 MP (under the fixture's 300 kB node limit at quality 50): decoded at 1/8 for the model, 240x180
    photo.write_bytes(encode_jpeg(textured_scene(1920, 1440, seed=5), quality=50))
    subprocess.run(["mosquitto_pub", *mosquitto_pub_login(pipeline.broker), "-q", "1", "-f", str(photo),
                    "-t", "edgeprune/camera/trap-thumb/frame", "-V", "mqttv5",
                    "-D", "publish", "user-property", "request_id", "IMG_0100",
                    "-D", "publish", "user-property", "capture_ts", repr(captured)], check=True, timeout=10)
    wait_until(lambda: results_for(pipeline.reader, "trap-thumb"), 30, "the frame never came out as a row")
    wait_until(lambda: pipeline.reader.thumbnail("IMG_0100"), 30, "the frame's thumbnail was not stored")
    wait_until(pipeline.reader.cameras, 30, "the camera's deployment was not stored")
    jpeg = pipeline.reader.thumbnail("IMG_0100")
    assert check_thumbnail(jpeg) == (240, 180)
    (stored,) = pipeline.reader.db.execute("SELECT camera_id, bytes FROM thumbnails WHERE request_id = 'IMG_0100'")
    assert stored == ("trap-thumb", len(jpeg))
    out = tmp_path / "package"
    write_camtrap_dp(pipeline.reader.db.conn, Filters(camera_id="trap-thumb"), out, created=time.time())
    assert camtrap_dp_errors(out) == []
    media = (out / "media.csv").read_text()
    assert "IMG_0100,trap-thumb,activityDetection," in media and ",media/IMG_0100.jpg,false,IMG_0100.jpg," in media
    assert (out / "media" / "IMG_0100.jpg").read_bytes() == jpeg


def _publish(broker, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    login(client, broker)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def _activation(block: int, shape: tuple[int, ...]) -> bytes:
    return wire.encode(wire.Activation("probe", "cam-x", 1.0, block, np.zeros(shape, np.float32)))


# (topic, payload from the fixture, component that must report it: gateway or stage1/stage2, error kind)
BAD_INPUTS = [
    ("edgeprune/camera/cam-bad/frame", lambda p: b"\x89PNG this is not an image", "stage1", "bad_image"),
    ("edgeprune/camera/cam-bad/frame", lambda p: b"\xff\xd8" + b"x" * (NODE_MAX_PAYLOAD + 1), "stage1", "oversized"),
    ("edgeprune/pipeline/stage/2/in", lambda p: _activation(p.stage2_block, p.stage2_shape)[:40], "stage2",
     "truncated"),
    ("edgeprune/pipeline/stage/2/in", lambda p: b"NOPE" + _activation(p.stage2_block, p.stage2_shape)[4:], "stage2",
     "bad_magic"),
    ("edgeprune/pipeline/stage/2/in", lambda p: _activation(p.stage2_block, (1, 7, 5, 5)), "stage2", "bad_shape"),
    # a stage serves activations for other blocks during a move (docs/placement.md); one past the model, never
    ("edgeprune/pipeline/stage/2/in", lambda p: _activation(999, p.stage2_shape), "stage2", "stale_placement"),
    ("edgeprune/placement", lambda p: b"{not json", "stage1", "bad_json"),
    ("edgeprune/pipeline/results/node-9", lambda p: b'{"request_id": "x"}', "gateway", "bad_schema"),
    ("edgeprune/node/node-9/stats", lambda p: b"\x00\x01", "gateway", "bad_json"),
    ("edgeprune/node/node-9/status", lambda p: b"sleepy", "gateway", "bad_status"),
    ("edgeprune/node/node-9/profile", lambda p: b'{"node_id": "node-9"}', "gateway", "bad_schema"),
    ("edgeprune/pipeline/thumbnail/node-9", lambda p: encode_png(textured_scene(32, 24)), "gateway", "bad_magic"),
]

def _component(pipeline, role: str) -> str:
    return {"stage1": pipeline.stage_nodes[0], "stage2": pipeline.stage_nodes[1]}.get(role, role)


@pytest.mark.parametrize("topic,payload,role,kind", BAD_INPUTS, ids=[f"{r}-{k}" for _, _, r, k in BAD_INPUTS])
def test_bad_input_is_reported_counted_and_service_continues(pipeline, topic, payload, role, kind):
    component = _component(pipeline, role)
    before = len(pipeline.recorder.json_on(f"edgeprune/error/{component}"))
    _publish(pipeline.broker, topic, payload(pipeline))
    wait_until(lambda: len(pipeline.recorder.json_on(f"edgeprune/error/{component}")) > before, 20,
               f"{component} published no error record for {kind}")
    record = pipeline.recorder.json_on(f"edgeprune/error/{component}")[-1]
    assert record["kind"] == kind and record["topic"] == topic and record["message"]

    if role.startswith("stage"):
        def counted() -> bool:
            node = next(n for n in pipeline.reader.nodes() if n["node_id"] == component)
            return node["errors"].get(kind, 0) >= 1
        wait_until(counted, 20, f"{component} stats do not count {kind}")

    camera_id = f"after-{role}-{kind}".replace("_", "-")
    cam = pipeline.procs.start(camera_id, "camera", "--camera-id", camera_id, "--count", "1", "--seed", "1")
    assert cam.wait(STARTUP_S) == 0
    wait_until(lambda: results_for(pipeline.reader, camera_id), 30, "pipeline stopped serving after bad input")
    for name in ("gateway", "node-1", "node-2"):
        assert pipeline.procs.procs[name].poll() is None, f"{name} died"


def test_bad_command_is_rejected_by_the_node(pipeline):
    node = pipeline.stage_nodes[0]
    _publish(pipeline.broker, f"edgeprune/node/{node}/cmd", b'{"cmd": "explode"}')
    wait_until(lambda: any(r["kind"] == "bad_schema" and r["topic"].endswith("/cmd")
                           for r in pipeline.recorder.json_on(f"edgeprune/error/{node}")), 20,
               "the node did not reject an unknown command")


def test_nodes_announce_stopped_on_clean_exit(pipeline):
    """Runs last in this module: stops node-2 with SIGTERM and expects the retained `stopped`."""
    pipeline.procs.procs["node-2"].terminate()
    assert pipeline.procs.procs["node-2"].wait(60) == 0  # joins its threads (5 s each) under load
    wait_until(lambda: any(t == "edgeprune/node/node-2/status" and p == b"stopped"
                           for t, p, _ in pipeline.recorder.messages), 10, "no 'stopped' status")


def test_replayed_labelled_frames_are_scored_per_camera(pipeline, tmp_path):
    """A CSV of capture times replays as frames of its cameras; each result records the ground truth."""
    trace = tmp_path / "trace.csv"
    trace.write_text("shot,site\n" + "".join(f"01/05/2024 10:00:{s:02d},{site}\n"
                                             for s, site in [(0, "trap a"), (1, "trap a"), (2, "trap b"),
                                                             (3, "trap a"), (5, "trap b"), (6, "trap b")]))
    cam = pipeline.procs.start("camera-replay", "camera", "--trace-csv", str(trace), "--time-column", "shot",
                               "--camera-column", "site", "--time-format", "%d/%m/%Y %H:%M:%S",
                               "--time-scale", "4", "--labelled")
    assert cam.wait(60) == 0, pipeline.procs.log("camera-replay")
    wait_until(lambda: len(results_for(pipeline.reader, "trap_a")) == 3
               and len(results_for(pipeline.reader, "trap_b")) == 3, 30, "replayed frames were not all classified")
    rows = pipeline.reader.db.execute(
        "SELECT true_label, correct, label_index, capture_ts FROM requests WHERE camera_id IN ('trap_a', 'trap_b') "
        "ORDER BY capture_ts").fetchall()
    assert all(t is not None and c == int(t == i) for t, c, i, _ in rows)
    span = rows[-1][3] - rows[0][3]
    assert span >= 6 / 4 - 0.05  # paced by the trace, a quarter of its 6 s
