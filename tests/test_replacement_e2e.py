"""A node dies (SIGKILL: only its last will speaks), the survivors take over; it returns and is used again."""

from __future__ import annotations

import json
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import STARTUP_S, Processes, Recorder, component_env, login, open_reader, wait_until

pytestmark = pytest.mark.integration


def test_gateway_replaces_over_survivors_and_takes_the_node_back(broker, tmp_path):
    db = tmp_path / "edgeprune.db"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_REJOIN_HOLD_S="2",
                        EDGEPRUNE_MQTT_KEEPALIVE_S="5", EDGEPRUNE_NODE_UPLINK_MBIT_S="100000",
                        EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5")
    procs = Processes(tmp_path, env)
    try:
        procs.start("gateway", "gateway")
        procs.start("node-1", "node", "--node-id", "node-1")
        procs.start("node-2", "node", "--node-id", "node-2")
        reader = open_reader(db)
        wait_until(lambda: (reader.placement() or {}).get("stages", []).__len__() == 2, STARTUP_S,
                   "no 2-stage placement")
        first = reader.placement()
        victim = first["stages"][1]["node_id"]
        survivor = first["stages"][0]["node_id"]

        procs.procs[victim].kill()  # no clean exit: the broker's will announces `offline`
        wait_until(lambda: [s["node_id"] for s in reader.placement()["stages"]] == [survivor], 30,
                   "the gateway did not re-place over the survivor")
        assert reader.placement()["version"] > first["version"]

        def classified(camera_id: str) -> list[dict]:
            return [r for r in reader.recent_requests(0) if r["camera_id"] == camera_id]

        cam_a = procs.start("cam-a", "camera", "--camera-id", "cam-a", "--count", "3", "--rate", "5")
        assert cam_a.wait(STARTUP_S) == 0
        wait_until(lambda: len(classified("cam-a")) == 3, 30, "frames were not classified by the survivor")
        assert all(r["prune_ratios"] == [0.0] for r in classified("cam-a"))  # one hop: the survivor alone

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
        wait_until(lambda: len(reader.placement()["stages"]) == 2, STARTUP_S, "the returning node was not used again")
        cam_b = procs.start("cam-b", "camera", "--camera-id", "cam-b", "--count", "2", "--rate", "5")
        assert cam_b.wait(STARTUP_S) == 0
        wait_until(lambda: len(classified("cam-b")) == 2, 30, "frames were not classified after the rejoin")
        assert all(len(r["prune_ratios"]) == 2 for r in classified("cam-b"))
    finally:
        procs.stop_all()


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
