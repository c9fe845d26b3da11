"""Timely frames first, late frames still served, end to end: gateway and two nodes, a real mosquitto.

The operator sets a generous SLO (30 s), so only frames captured long before (100 s) are late, whatever
the machine's load; stage 1 is slowed so the frames queue behind a first one.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from camera.simulator import synthetic_scene
from shared.imaging import encode_jpeg
from tests.conftest import Processes, Recorder, component_env, mqtt_client, start_two_stage_site, wait_until

pytestmark = pytest.mark.integration
SLO_S = 30.0


def publish(client, topic: str, payload: bytes, **user: str) -> None:
    props = None
    if user:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = list(user.items())
    client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)


def test_late_frames_are_served_after_the_timely_ones_stored_and_marked(broker, tmp_path):
    db = tmp_path / "edgeprune.db"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
                        EDGEPRUNE_NODE_UPLINK_MBIT_S="100000")
    procs = Processes(tmp_path, env)
    recorder = Recorder(broker, "edgeprune/placement")
    client = mqtt_client(broker)
    try:
        reader = start_two_stage_site(procs, db)
        first = reader.placement()["stages"][0]["node_id"]
        command = {"cmd": "set", "setting": "slo_s", "value": SLO_S, "id": "slo"}
        publish(client, "edgeprune/component/gateway/cmd", json.dumps(command).encode())
        wait_until(lambda: any(p.get("slo_s") == SLO_S for p in recorder.json_on("edgeprune/placement")), 60,
                   "the placement was not re-published with the operator's SLO")
        command = {"cmd": "node_slowdown", "node_id": first, "factor": 200, "id": "slow"}
        publish(client, "edgeprune/component/gateway/cmd", json.dumps(command).encode())
        wait_until(lambda: any(n["node_id"] == first and n["emulated_slowdown"] == 200 for n in reader.nodes()), 60,
                   "stage 1 did not slow down")

        photo = encode_jpeg(synthetic_scene(np.random.default_rng(7), 96))
        now = time.time()
        frames = [("FIRST", now), ("STALE-1", now - 100), ("FRESH-1", now), ("STALE-2", now - 90), ("FRESH-2", now)]
        for request_id, capture in frames:
            publish(client, "edgeprune/camera/cam-d/frame", photo, request_id=request_id, capture_ts=repr(capture))

        def rows() -> dict[str, dict]:
            return {r["request_id"]: r for r in reader._rows("SELECT * FROM requests WHERE camera_id = 'cam-d'")}
        wait_until(lambda: len(rows()) == len(frames), 180, "not every frame was stored")
        stored = rows()
        assert {rid: stored[rid]["late"] for rid, _ in frames} == {
            "FIRST": 0, "STALE-1": 1, "FRESH-1": 0, "STALE-2": 1, "FRESH-2": 0}
        hops = {rid: json.loads(stored[rid]["hops"]) for rid, _ in frames}
        assert all(h["deferred"] for rid in ("STALE-1", "STALE-2") for h in hops[rid])  # late at both stages

        # stage 1's order: a fresh frame received before a stale one started is served first; stale: oldest first
        stage1 = {rid: next(h for h in hops[rid] if h["stage"] == 1) for rid, _ in frames}
        overtaken = [(fresh, stale) for fresh in ("FIRST", "FRESH-1", "FRESH-2") for stale in ("STALE-1", "STALE-2")
                     if stage1[fresh]["received_ts"] < stage1[stale]["started_ts"]]
        assert all(stage1[fresh]["started_ts"] < stage1[stale]["started_ts"] for fresh, stale in overtaken), stage1
        assert ("FRESH-1", "STALE-1") in overtaken, stage1  # STALE-1 waited behind FIRST while FRESH-1 came
        if stage1["STALE-2"]["received_ts"] < stage1["STALE-1"]["started_ts"]:
            assert stage1["STALE-1"]["started_ts"] < stage1["STALE-2"]["started_ts"], stage1
        wait_until(lambda: any(n["node_id"] == first and (n["late_served"] or 0) >= 2 for n in reader.nodes()), 30,
                   "stage 1 did not count the late frames it served")
        assert reader.accounting()["late"] == 2  # what the operator page shows
    finally:
        client.loop_stop()
        client.disconnect()
        recorder.close()
        procs.stop_all()
