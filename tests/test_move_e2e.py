"""Blocks move while frames flow, and no frame is lost: a third node joins a two-stage pipeline under a steady
camera, the gateway re-partitions over three (every stage's blocks move), and every frame stage 1 accepted ends
as a stored result. Then a node dies (SIGKILL: only its last will speaks), the survivors take over; retired, every
retained topic about it is cleared; it returns and is used again. A real mosquitto, the gateway, nodes and camera
as processes, a real SQLite file; one site for both stories, since starting one is most of either's time.

A join is the move's trigger here because it comes at a known moment without a controller; what a move does to
the frames in flight (stages switching one after another, activations for the old cut, queued work) is the same
for the re-partitioning on a violation (``[gateway] replace_on_violation``), docs/placement.md.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from contextlib import closing

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from shared.model import DEFAULT_CHECKPOINT
from tests.conftest import STARTUP_S, Processes, Recorder, component_env, login, open_reader, wait_until

pytestmark = pytest.mark.integration


def test_frames_in_flight_during_a_move_all_end_as_results_and_a_dead_node_is_replaced(broker, tmp_path):
    db = tmp_path / "edgeprune.db"
    env = component_env(
        broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2,node-3",
        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_STARTUP_WAIT_S="1",
        EDGEPRUNE_GATEWAY_REJOIN_HOLD_S="1", EDGEPRUNE_GATEWAY_REPLAN_MIN_GAIN="0",
        EDGEPRUNE_MQTT_KEEPALIVE_S="5", EDGEPRUNE_NODE_UPLINK_MBIT_S="100000", EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
        # the shipped profile on every node: the same cuts every run (2 stages, then 3), not measuring noise's
        EDGEPRUNE_NODE_PROFILE=str(DEFAULT_CHECKPOINT.with_name("trapnet.profile.json")),
        # slices slow enough that frames wait in queues and between stages when the cut moves; a queue that
        # never overflows (a full queue drops frames: load shedding, not what a move costs)
        EDGEPRUNE_NODE_EMULATED_SLOWDOWN="20", EDGEPRUNE_NODE_QUEUE_SIZE="10000")
    procs = Processes(tmp_path, env)
    try:
        procs.start("gateway", "gateway")
        procs.start("node-1", "node", "--node-id", "node-1")
        procs.start("node-2", "node", "--node-id", "node-2")
        reader = open_reader(db)
        wait_until(lambda: len((reader.placement() or {}).get("stages", [])) == 2, STARTUP_S,
                   "no two-stage placement")
        before = reader.placement()
        camera = procs.start("camera", "camera", "--camera-id", "cam-m", "--rate", "10", "--arrival", "fixed")

        def hops_seen() -> set[int]:
            return {len(r["prune_ratios"]) for r in reader.recent_requests(0) if r["camera_id"] == "cam-m"}

        wait_until(lambda: 2 in hops_seen(), STARTUP_S, "no frame went through the two-stage pipeline")
        procs.start("node-3", "node", "--node-id", "node-3")
        wait_until(lambda: len(reader.placement()["stages"]) == 3, STARTUP_S, "the gateway did not move to 3 stages")
        after = reader.placement()
        cuts = [(s["first_block"], s["last_block"]) for s in after["stages"]]
        assert cuts[:2] != [(s["first_block"], s["last_block"]) for s in before["stages"]], "no block moved"
        wait_until(lambda: 3 in hops_seen(), 60, "no frame went through the three-stage pipeline")
        camera.terminate()
        camera.wait(30)
        wait_until(lambda: reader.accounting()["in_flight"] == 0, 150, "frames still in flight")
        accounting = reader.accounting()
        assert accounting["accepted"] > 0
        assert accounting["failures"] == 0, f"frames failed in the move: {accounting['failures_by_reason']}"
        assert accounting["rows"] == accounting["accepted"]
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            hops = [h for (raw,) in conn.execute("SELECT hops FROM requests") for h in json.loads(raw)]
        placed = cuts + [(s["first_block"], s["last_block"]) for s in before["stages"]]
        moved = [h for h in hops if (h["first_block"], h["first_block"] + h["n_blocks"] - 1) not in placed]
        print(f"{accounting['accepted']} frames, none lost; {len(moved)} hops ran or forwarded other blocks "
              f"than a placement's stage: {[(h['stage'], h['first_block'], h['n_blocks']) for h in moved]}")

        replaced_over_survivors_and_taken_back(broker, procs, reader)
    finally:
        procs.stop_all()


def replaced_over_survivors_and_taken_back(broker, procs: Processes, reader) -> None:
    """The last stage's node dies, the survivors take over; retired, nothing retained about it is left; it returns
    and is used again."""
    first = reader.placement()
    victim = first["stages"][-1]["node_id"]
    survivors = [s["node_id"] for s in first["stages"][:-1]]

    procs.procs[victim].kill()  # no clean exit: the broker's will announces `offline`
    wait_until(lambda: sorted(s["node_id"] for s in reader.placement()["stages"]) == sorted(survivors), 30,
               "the gateway did not re-place over the survivors")
    assert reader.placement()["version"] > first["version"]

    def classified(camera_id: str) -> list[dict]:
        return [r for r in reader.recent_requests(0) if r["camera_id"] == camera_id]

    cam_a = procs.start("cam-a", "camera", "--camera-id", "cam-a", "--count", "3", "--rate", "5")
    assert cam_a.wait(STARTUP_S) == 0
    wait_until(lambda: len(classified("cam-a")) == 3, 30, "frames were not classified by the survivors")
    assert all(len(r["prune_ratios"]) == len(survivors) for r in classified("cam-a"))  # the survivors alone

    # retiring the dead node clears every retained topic about it: nothing replays for it any more
    held = retained_about(broker.port, victim)
    assert held, "the dead node left no retained topics: the clearing below would prove nothing"
    watcher = Recorder(broker, f"edgeprune/node/{victim}/#")
    try:
        publish_command(broker.port, {"cmd": "retire", "node_id": victim})
        wait_until(lambda: set(held) <= {t for t, p, _ in watcher.messages if p == b""}, 15,
                   f"the gateway did not publish an empty retained message on each of {held}")
    finally:
        watcher.close()
    assert retained_about(broker.port, victim) == [], "retained topics of a retired node remain"

    procs.start(victim, "node", "--node-id", victim)  # it may come back: it offers itself anew
    wait_until(lambda: len(reader.placement()["stages"]) == len(survivors) + 1, STARTUP_S,
               "the returning node was not used again")
    cam_b = procs.start("cam-b", "camera", "--camera-id", "cam-b", "--count", "2", "--rate", "5")
    assert cam_b.wait(STARTUP_S) == 0
    wait_until(lambda: len(classified("cam-b")) == 2, 30, "frames were not classified after the rejoin")
    assert all(len(r["prune_ratios"]) == len(survivors) + 1 for r in classified("cam-b"))


def publish_command(port: int, payload: dict) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    login(client, port)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish("edgeprune/component/gateway/cmd", json.dumps(payload), qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def retained_about(port: int, node: str) -> list[str]:
    """Topics under the node that a fresh subscriber gets as retained messages.

    Silence proves nothing (a late subscription looks the same), so once the node's filter is
    acknowledged a second subscription fetches a marker retained on a control topic: the broker
    queues a subscription's retained messages while it handles that SUBSCRIBE and sends one
    client's messages in order, so when the marker arrives every retained message about the node
    has arrived before it.
    """
    marker = f"edgeprune/test/marker/{uuid.uuid4().hex}"  # below the root: the ACL lets the admin user use it
    got: list[str] = []
    acknowledged, marked = threading.Event(), threading.Event()

    def on_message(client, userdata, msg) -> None:
        if msg.topic == marker:
            marked.set()
        elif msg.retain and msg.payload:
            got.append(msg.topic)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *args: acknowledged.set()
    login(client, port)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(marker, b"marker", qos=1, retain=True).wait_for_publish(5)
        client.subscribe(f"edgeprune/node/{node}/#", qos=1)
        assert acknowledged.wait(10), "subscription to the node's topics not acknowledged"
        client.subscribe(marker, qos=1)
        assert marked.wait(10), "the retained marker never arrived"
        client.publish(marker, b"", qos=1, retain=True).wait_for_publish(5)  # leave the broker as found
    finally:
        client.loop_stop()
        client.disconnect()
    return got
