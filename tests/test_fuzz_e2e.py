"""Fuzz every topic a component subscribes to, through a real broker: no crash, no hang, no `internal`
error (an input no check caught), every bad message reported, and the next valid frame still served."""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from node_agent.runtime import block_input_shape
from shared import wire
from shared.model import build_model
from tests.conftest import Processes, Recorder, component_env, mqtt_client, start_two_stage_site, wait_until

pytestmark = pytest.mark.integration
NODE_MAX_PAYLOAD = 200_000


@pytest.fixture(scope="module")
def site(broker, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    db = workdir / "edgeprune.db"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_NODE_UPLINK_MBIT_S="100000",
                        EDGEPRUNE_NODE_MAX_PAYLOAD_BYTES=str(NODE_MAX_PAYLOAD))
    procs = Processes(workdir, env)
    recorder = Recorder(broker, "edgeprune/error/+")
    client = mqtt_client(broker)
    try:
        reader = start_two_stage_site(procs, db)
        placement = reader.placement()
        yield procs, reader, recorder, client, placement
    finally:
        client.loop_stop()
        client.disconnect()
        recorder.close()
        procs.stop_all()


def image_bytes(width: int, height: int, mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    try:
        Image.new(mode, (width, height)).save(buf, format=fmt)
    except (OSError, KeyError):  # a mode this format cannot hold: PNG holds them all
        buf = io.BytesIO()
        Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def activation(block: int, shape: tuple[int, ...], fill: float, dtype: str, cut: int | None) -> bytes:
    payload = wire.encode(wire.Activation("fuzz", "cam-fuzz", 1.0, block, np.full(shape, fill, dtype=dtype)))
    return payload[:cut] if cut is not None else payload


def json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=40))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.text(max_size=12), inner, max_size=6)),
                        max_leaves=20)


def payloads(stage2_block: int, stage2_shape: tuple[int, ...]):
    # JSON objects with the right keys and wrong or out-of-range values, for the control schemas
    keys = ["ratio", "seq", "issued_at", "cmd", "factor", "node_id", "request_id", "camera_id", "capture_ts",
            "label", "label_index", "confidence", "hops", "version", "stages", "n_blocks", "ts", "kind"]
    near_valid = st.dictionaries(st.sampled_from(keys), st.one_of(json_values(), st.sampled_from(
        [math.inf, -1, 1e308, "slowdown", "prune", "retire", "calibrate", "node-1", ""])), max_size=8)
    shapes = st.one_of(st.just(stage2_shape), st.tuples(st.just(1), st.integers(1, 40), st.integers(1, 9),
                                                         st.integers(1, 9)))
    return st.one_of(
        st.binary(max_size=2048),
        json_values().map(lambda v: json.dumps(v).encode()),
        near_valid.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.builds(activation, st.one_of(st.just(stage2_block), st.integers(0, 70)), shapes,
                  st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e4]), st.sampled_from(["float16", "float32"]),
                  st.one_of(st.none(), st.integers(0, 60))),
        st.builds(image_bytes, st.integers(1, 300), st.integers(1, 300),
                  st.sampled_from(["L", "RGB", "RGBA", "1", "I;16", "P"]), st.sampled_from(["PNG", "BMP", "GIF"])),
        st.builds(lambda b: b"\x89PNG\r\n\x1a\n" + b, st.binary(max_size=512)),
        st.builds(lambda b: b"\xff\xd8\xff" + b, st.binary(max_size=512)),
        st.builds(lambda n: struct.pack("<4sBBBBHd", b"EPAT", 1, n % 4, n % 9, 0, 0, math.nan) + b"\x00" * n,
                  st.integers(0, 64)),
    )


def test_fuzzing_every_subscribed_topic_breaks_nothing(site):
    procs, reader, recorder, client, placement = site
    stage2 = placement["stages"][1]["first_block"]
    stage2_shape = block_input_shape(build_model(), stage2)
    stage1_node, stage2_node = (s["node_id"] for s in placement["stages"])
    topics = [  # every subscription of the nodes and the gateway (status: not the three real words)
        "edgeprune/camera/cam-fuzz/frame", "edgeprune/pipeline/stage/2/in", "edgeprune/placement",
        f"edgeprune/node/{stage1_node}/cmd", f"edgeprune/node/{stage2_node}/prune/set",
        "edgeprune/pipeline/results/node-9", "edgeprune/pipeline/accepted/node-9", "edgeprune/node/node-9/status",
        "edgeprune/node/node-9/stats", "edgeprune/node/node-9/profile", "edgeprune/node/node-9/calibration",
        "edgeprune/error/fuzzer", "edgeprune/component/gateway/cmd",
    ]
    sent: list[str] = []

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(topic=st.sampled_from(topics), payload=payloads(stage2, stage2_shape))
    def fuzz(topic: str, payload: bytes) -> None:
        if topic.endswith("/status") and payload in (b"online", b"offline", b"stopped"):
            return
        client.publish(topic, payload, qos=1).wait_for_publish(5)
        sent.append(topic)

    fuzz()
    client.publish("edgeprune/camera/cam-fuzz/frame", b"\xff\xd8" + bytes(NODE_MAX_PAYLOAD + 1), qos=1)
    for name in ("gateway", "node-1", "node-2"):
        assert procs.procs[name].poll() is None, f"{name} died under fuzzing"
    # the pipeline still serves a valid frame afterwards
    placement = reader.placement()
    client.publish("edgeprune/camera/cam-after/frame", image_bytes(64, 48, "RGB", "PNG"), qos=1)
    wait_until(lambda: reader._rows("SELECT 1 FROM requests WHERE camera_id = 'cam-after'"), 60,
               "no result after fuzzing")
    records = [json.loads(p) for t, p, _ in list(recorder.messages) if t != "edgeprune/error/fuzzer"]
    kinds = {r["kind"] for r in records}
    internal = [r for r in records if r["kind"] == "internal"]
    assert not internal, f"inputs no check caught: {internal[:3]}"
    assert len(records) >= len(sent) // 2, (len(records), len(sent), kinds)  # most fuzz is rejected and reported
    wait_until(lambda: reader._rows("SELECT COUNT(*) AS n FROM errors")[0]["n"] >= len(records) // 2, 30,
               "error records were not persisted")
    assert placement is not None
