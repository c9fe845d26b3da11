"""The whole control loop through a real broker: a node slows down, it is pruned, it recovers, it is restored.

The gateway runs the default policy, ``adaptive``: it prunes on the first slowed frames' compute, so the slowed
node is pruned before its queue holds more than a few frames (the reactive trigger waits seconds of violation).
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.curves import SliceLatencyFit
from shared.model import DEFAULT_CHECKPOINT
from tests.conftest import STARTUP_S, Processes, Recorder, component_env, login, open_reader, wait_until

pytestmark = pytest.mark.integration
SLO_S = 0.250
RATE_HZ = 5.0
# The slowed node's unpruned slice is emulated to take the SLO itself, whatever this machine's speed: over
# the 0.2 s frame interval its queue grows by 0.25 s a second, while its calibrated speed-up at p=0.9
# (2.7-4x here) brings it under the 0.1 s stage budget, where the queue drains at once. A fixed factor made
# both depend on how loaded the machine was during calibration.
SLOWED_STAGE_S = SLO_S
# LAT_trigger = SLO + margin: unslowed, the median latency was 9-37 ms here, and in a 28 s load spike 22 of 140
# results passed SLO + 5 ms but only 3 passed SLO + 0.1 s (half must, for 2 s, to fire); slowed, it passes
# 0.35 s by the third frame and keeps growing
TRIGGER_MARGIN_S = 0.1
# Judge "under the SLO" over the results of the last few seconds: a backlog built before the prune took
# effect must not count against the pruned pipeline for the rest of the test
RECENT_WINDOW_S = 4.0


def write_accuracy_model(path, n_blocks: int = 6) -> None:
    """A known per-block accuracy model (the real one comes from `edgeprune calibrate`).

    Besides uniform ratios, either stage of any two-stage placement pruned alone at 0.9 was
    "measured" at 0.9: the default 'measured' predictor lets the controller prune one stage that far.
    """
    gains = [-1.0] * n_blocks
    vectors = [[0.0] * n_blocks, [0.5] * n_blocks, [0.9] * n_blocks]
    accuracies = [0.948, 0.9, 0.6]
    for cut in range(1, n_blocks):
        vectors += [[0.9] * cut + [0.0] * (n_blocks - cut), [0.0] * cut + [0.9] * (n_blocks - cut)]
        accuracies += [0.9, 0.9]
    fit = {"gains": gains, "offset": -6.0, "top": 0.95, "chance": 0.1, "r2": 1.0, "rmse": 0.0,
           "vectors": vectors, "accuracies": accuracies}
    path.write_text(json.dumps({"model": "trapnet", "model_fingerprint": None, "fit": fit}))


def publish(port: int, topic: str, payload: dict) -> None:
    """A one-shot command, never retained."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    login(client, port)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def command(port: int, node: str, payload: dict) -> None:
    publish(port, f"edgeprune/node/{node}/cmd", payload)


def test_slowed_node_is_pruned_and_restored_when_it_recovers(broker, tmp_path):
    db = tmp_path / "edgeprune.db"
    accuracy = tmp_path / "accuracy.json"
    write_accuracy_model(accuracy)
    env = component_env(
        broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_SLO_S=str(SLO_S),
        EDGEPRUNE_GATEWAY_WINDOW_S="2", EDGEPRUNE_GATEWAY_ACCURACY_MODEL=str(accuracy),
        EDGEPRUNE_NODE_UPLINK_MBIT_S="100000", EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
        # the shipped profile on both nodes: the same split (blocks 0-2 | 3-5) every run, not one measuring noise picks
        EDGEPRUNE_NODE_PROFILE=str(DEFAULT_CHECKPOINT.with_name("trapnet.profile.json")),
        EDGEPRUNE_CONTROLLER_TRIGGER_MARGIN_S=str(TRIGGER_MARGIN_S), EDGEPRUNE_CONTROLLER_TRIGGER_WINDOW_S="4",
        EDGEPRUNE_CONTROLLER_TRIGGER_MIN_SPAN_S="2", EDGEPRUNE_CONTROLLER_COOLDOWN_S="3",
        EDGEPRUNE_CONTROLLER_RESTORE_WINDOW_S="3",
        # a shared 2-core CI machine makes compute several times slower than calibrated at moments; the
        # emulated slowdown is 85-131x here
        EDGEPRUNE_CONTROLLER_SLOWDOWN_GONE="5.0", EDGEPRUNE_CONTROLLER_DETECT_MARGIN="4.0",
        EDGEPRUNE_CONTROLLER_POLICY="adaptive")
    procs = Processes(tmp_path, env)
    recorder = Recorder(broker, "edgeprune/node/+/prune/state")
    try:
        procs.start("gateway", "gateway")
        procs.start("node-1", "node", "--node-id", "node-1")
        procs.start("node-2", "node", "--node-id", "node-2")
        reader = open_reader(db)
        wait_until(lambda: (reader.controller_status() or {}).get("enabled"), 90,
                   "the controller never started (placement + calibrations + accuracy model)")
        slowed, other = [s["node_id"] for s in reader.placement()["stages"]]
        procs.start("camera", "camera", "--camera-id", "cam-c", "--rate", str(RATE_HZ), "--arrival", "fixed")

        def recent(after: float) -> list[dict]:
            """Results of the last RECENT_WINDOW_S seconds that completed after ``after``."""
            return reader.recent_requests(max(after, time.time() - RECENT_WINDOW_S))

        def p50(rows: list[dict]) -> float:
            return float(np.median([r["e2e_s"] for r in rows])) if len(rows) >= 10 else float("inf")

        wait_until(lambda: p50(recent(0)) < SLO_S, STARTUP_S, "the unslowed pipeline does not meet the SLO")
        assert reader.prune_events() == []  # nothing fires while the SLO is met

        unpruned_s = calibrated_curve(db, slowed).predict(0.0)  # what the node emulates from, fitted alike
        command(broker.port, slowed, {"cmd": "slowdown", "factor": SLOWED_STAGE_S / unpruned_s})
        wait_until(lambda: any(e["kind"] == "set" and e["changed"].get(slowed, 0) > 0 for e in reader.prune_events()),
                   40, f"no pruning of the slowed node {slowed}")
        event = next(e for e in reader.prune_events() if e["kind"] == "set")
        assert event["ratios"][other] == 0.0, "the node that was not slowed must not be pruned"
        assert event["policy"] == "adaptive" and f"{slowed} " in event["reason"]
        # its queue grows by one frame a second while slowed; three slowed frames are enough evidence
        assert event["metrics"]["queue_depths"].get(slowed, 0) <= 3, "pruned only after a backlog built up"
        floor = reader.controller_status()["accuracy_floor"]
        assert floor == pytest.approx(0.9 * 0.948), "the floor is 90% of the unpruned accuracy in the model file"
        assert event["predicted_accuracy"] >= floor
        wait_until(lambda: any(p == slowed and s["ratio"] > 0 for p, s in applied_states(recorder)), 10,
                   "the node did not apply the ratio")
        wait_until(lambda: p50(recent(event["ts"])) < SLO_S, 30, "latency did not return under the SLO")
        judged = recent(event["ts"])
        slowed_stage_ratios = [r["prune_ratios"][0] for r in judged]  # the slowed node runs the first stage
        assert sum(r > 0 for r in slowed_stage_ratios) > len(judged) / 2, "the recovery must come from pruning"

        command(broker.port, slowed, {"cmd": "slowdown", "factor": 1.0})
        # one ladder step per 3 s restore window at best; load spikes rightly pause it (the restore took 18-28 s
        # in most runs here, 86 s in one where other jobs made the unslowed latency reach 2.9 s)
        wait_until(lambda: all(r == 0.0 for r in reader.controller_status()["ratios"].values()), 150,
                   "ratios did not return to 0 after the slowdown was removed")
        wait_until(lambda: [s["ratio"] for p, s in applied_states(recorder) if p == slowed][-1] == 0.0, 10,
                   "the node did not restore its full slice")
        kinds = [e["policy"] for e in reader.prune_events()]
        assert "restore" in kinds

        # the operator holds the other node at 0.5 (one-shot command to the gateway), then releases it
        publish(broker.port, "edgeprune/component/gateway/cmd", {"cmd": "prune", "node_id": other, "ratio": 0.5})
        wait_until(lambda: [s["ratio"] for p, s in applied_states(recorder) if p == other][-1:] == [0.5], 15,
                   "the manual hold was not applied")
        publish(broker.port, "edgeprune/component/gateway/cmd", {"cmd": "prune", "node_id": other, "ratio": None})
        wait_until(lambda: any(e["policy"] == "release" for e in reader.prune_events()), 15, "release not logged")
    finally:
        recorder.close()
        procs.stop_all()


def calibrated_curve(db, node: str):
    """The best latency curve the gateway fitted to the node's latest calibration."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (fit,) = conn.execute("SELECT fit FROM calibrations WHERE node_id = ? ORDER BY measured_at DESC LIMIT 1",
                              (node,)).fetchone()
    return SliceLatencyFit.from_dict(json.loads(fit)).best()


def applied_states(recorder: Recorder) -> list[tuple[str, dict]]:
    return [(t.split("/")[2], json.loads(p)) for t, p, _ in recorder.messages if t.endswith("/prune/state") and p]
