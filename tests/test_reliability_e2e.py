"""Forged messages and lost frames, end to end: gateway and two nodes as subprocesses, a real mosquitto.

The forger uses the operator's (admin) credential, i.e. a leaked one the ACL cannot stop: these are the
gateway's and nodes' own defences. Every test ends by checking accepted = rows + failures.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from camera.simulator import synthetic_scene
from shared.bus import publish_size
from shared.imaging import encode_jpeg
from shared.settings import BrokerSettings, NodeSettings
from tests.conftest import (
    STARTUP_S,
    Processes,
    Recorder,
    component_env,
    login,
    mqtt_client,
    open_reader,
    start_two_stage_site,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(broker, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reliability")
    db = workdir / "edgeprune.db"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
                        EDGEPRUNE_NODE_UPLINK_MBIT_S="100000", EDGEPRUNE_NODE_QUEUE_SIZE="4",
                        EDGEPRUNE_GATEWAY_STATS_SILENCE_S="6", EDGEPRUNE_GATEWAY_RESULT_TIMEOUT_S="30",
                        EDGEPRUNE_GATEWAY_REJOIN_HOLD_S="1")
    procs = Processes(workdir, env)
    recorder = Recorder(broker, "edgeprune/error/+", "edgeprune/node/+/prune/#")
    forger = mqtt_client(broker)
    try:
        reader = start_two_stage_site(procs, db)
        stage_nodes = [s["node_id"] for s in reader.placement()["stages"]]
        yield SimpleNamespace(procs=procs, reader=reader, recorder=recorder, forger=forger, broker=broker,
                              stage_nodes=stage_nodes, photo=encode_jpeg(synthetic_scene(np.random.default_rng(5), 96)))
    finally:
        forger.loop_stop()
        forger.disconnect()
        recorder.close()
        procs.stop_all()


def send(site, topic: str, payload: bytes, retain: bool = False, **user: str) -> None:
    props = None
    if user:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = list(user.items())
    site.forger.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(5)


def errors_of_kind(site, kind: str) -> list[dict]:
    return [r for t, p, _ in list(site.recorder.messages) if t.startswith("edgeprune/error/")
            for r in [json.loads(p)] if r["kind"] == kind]


def row(site, request_id: str) -> dict | None:
    found = site.reader._rows("SELECT * FROM requests WHERE request_id = ?", (request_id,))
    return found[0] if found else None


def settled(site, accepted_at_least: int = 0) -> dict:
    """Wait until stage 1 accepted that many frames and none is in flight; return the accounting."""
    wait_until(lambda: site.reader.accounting()["accepted"] >= accepted_at_least, 60, "frames not accepted")
    wait_until(lambda: site.reader.accounting()["in_flight"] == 0, 60, "frames still in flight")
    accounting = site.reader.accounting()
    assert accounting["accepted"] == accounting["rows"] + accounting["failures"]
    return accounting


def fake_result(request_id: str, camera_id: str, label: str = "tiger") -> bytes:
    hop = {"stage": 1, "node_id": "node-1", "prune_ratio": 0.0, "received_ts": 1.0, "started_ts": 1.0,
           "finished_ts": 1.0, "published_ts": 1.0}
    return json.dumps({"request_id": request_id, "camera_id": camera_id, "capture_ts": time.time(), "label": label,
                       "label_index": 0, "confidence": 1.0, "hops": [hop]}).encode()


def test_forged_results_never_become_or_replace_rows(site):
    # a made-up result for a frame nobody took
    send(site, "edgeprune/pipeline/results/node-1", fake_result("IMG-FAKE", "cam-f"))
    wait_until(lambda: errors_of_kind(site, "unknown_result"), 20, "unknown result not reported")
    # a fake result sent first for an id, then the genuine frame with that id
    send(site, "edgeprune/pipeline/results/node-1", fake_result("IMG-1", "cam-f"))
    send(site, "edgeprune/camera/cam-f/frame", site.photo, request_id="IMG-1")
    wait_until(lambda: row(site, "IMG-1"), 30, "the genuine frame vanished")
    genuine = row(site, "IMG-1")
    # a second, different result for a stored request
    send(site, "edgeprune/pipeline/results/node-1", fake_result("IMG-1", "cam-f"))
    wait_until(lambda: errors_of_kind(site, "conflict_result"), 20, "conflicting result not reported")
    time.sleep(1.0)
    assert row(site, "IMG-FAKE") is None
    assert row(site, "IMG-1") == genuine and len(json.loads(genuine["hops"])) == 2  # both stages: not the fake
    settled(site)


def test_a_payload_speaks_only_for_the_device_its_topic_names(site):
    """The broker ties each results, accepted and error topic to its login (test_security.py); the gateway refuses
    a payload that claims another device than the topic names, and only nodes can end a frame."""
    claim_node1 = {"request_id": "FORGED-1", "camera_id": "cam-f", "node_id": "node-1", "capture_ts": time.time(),
                   "received_ts": time.time()}
    send(site, "edgeprune/pipeline/accepted/node-2", json.dumps(claim_node1).encode())  # node-2 speaking as node-1
    send(site, "edgeprune/pipeline/results/node-2", fake_result("FORGED-1", "cam-f"))  # its last hop is node-1's
    wait_until(lambda: len(errors_of_kind(site, "identity_mismatch")) >= 2, 20, "the forged identities not reported")
    # a camera reports a failure in a node's name, then in its own name for a frame a node accepted
    forged_error = {"component": "node-1", "ts": time.time(), "topic": "x", "kind": "bad_image", "message": "x",
                    "request_id": "IMG-2"}
    send(site, "edgeprune/error/trap-7", json.dumps(forged_error).encode())
    wait_until(lambda: len(errors_of_kind(site, "identity_mismatch")) >= 3, 20, "the forged error not reported")
    send(site, "edgeprune/error/trap-7", json.dumps({**forged_error, "component": "trap-7"}).encode())
    send(site, "edgeprune/camera/cam-f/frame", site.photo, request_id="IMG-2")
    wait_until(lambda: row(site, "IMG-2"), 30, "a camera's error record ended a node's frame")
    settled(site)
    assert site.reader._rows("SELECT * FROM accepted WHERE request_id = 'FORGED-1'") == []
    assert row(site, "FORGED-1") is None
    assert site.reader._rows("SELECT * FROM failures WHERE request_id IN ('FORGED-1', 'IMG-2')") == []


def test_forged_prune_state_is_overwritten_not_adopted(site):
    node = site.stage_nodes[0]
    topic = f"edgeprune/node/{node}/prune/set"
    send(site, topic, json.dumps({"ratio": 0.9, "seq": 1_000_000, "issued_at": time.time()}).encode(), retain=True)
    wait_until(lambda: errors_of_kind(site, "foreign_desired"), 20, "forged desired state not reported")

    def applied() -> dict | None:
        states = site.recorder.json_on(f"edgeprune/node/{node}/prune/state")
        return states[-1] if states else None
    wait_until(lambda: applied() and applied()["seq"] > 1_000_000, 20,
               "the node was not put back to the gateway's prune state")
    assert applied()["ratio"] != 0.9
    desired = site.recorder.json_on(topic)[-1]
    assert desired["ratio"] != 0.9 and desired["seq"] == 1_000_001
    assert "overwrote" in desired["reason"]


def test_burst_drops_are_persisted_failures(site):
    """Without ``[node] flow_control`` (the default) the broker sends up to its in-flight limit and a work queue of 4
    sheds the rest, each recorded with its request id (with flow control: tests/test_node_flow_e2e.py)."""
    before = site.reader.accounting()["accepted"]
    for _ in range(60):
        site.forger.publish("edgeprune/camera/cam-burst/frame", site.photo, qos=1)
    accounting = settled(site, before + 60)
    dropped = accounting["failures_by_reason"].get("dropped", 0)
    assert dropped > 0, accounting
    burst = site.reader._rows("SELECT COUNT(*) AS n FROM accepted WHERE camera_id = 'cam-burst'")[0]["n"]
    assert burst == 60


def test_a_frame_over_the_size_limit_is_refused_by_the_broker_or_recorded_by_the_node(site):
    """One limit from shared/settings.py: the broker's packet limit is the node's payload limit plus MQTT overhead,
    so a frame between the two reaches stage 1 and is recorded as its failure; a frame over the broker's limit
    closes the camera's connection (docs/mqtt.md, "Frame size") and reaches nobody."""
    topic, limit = "edgeprune/camera/cam-big/frame", BrokerSettings().max_packet_size
    payload = site.photo + bytes(limit - publish_size(topic, site.photo, {"request_id": "BIG-1"}))
    assert len(payload) > NodeSettings().max_payload_bytes
    send(site, topic, payload, request_id="BIG-1")
    failed = "SELECT reason FROM failures WHERE request_id = 'BIG-1'"
    wait_until(lambda: site.reader._rows(failed), 30, "a frame over the node's limit was not recorded as a failure")
    assert site.reader._rows(failed) == [{"reason": "oversized"}]

    reasons: list[int] = []
    camera = login(mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5), site.broker)
    camera.on_disconnect = lambda c, u, f, rc, p: reasons.append(rc.value)
    camera.connect("127.0.0.1", site.broker.port)
    camera.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("request_id", "BIG-2")]
    try:
        camera.publish(topic, payload + bytes(16), qos=1, properties=props)
        wait_until(lambda: reasons, 30, "the broker took a frame over its limit")
    finally:
        camera.loop_stop()  # paho would send it again on every reconnect
        camera.disconnect()
    # 149 Packet too large when paho reads the broker's DISCONNECT, 128 when the socket closed under its write first
    assert reasons[0] in (128, 149)
    settled(site)
    assert site.reader._rows("SELECT * FROM accepted WHERE request_id = 'BIG-2'") == []


def test_stale_and_implausible_capture_times(site):
    now = time.time()
    send(site, "edgeprune/camera/cam-t/frame", site.photo, request_id="OLD-CLOCK", capture_ts=repr(now - 28e6))
    send(site, "edgeprune/camera/cam-t/frame", site.photo, request_id="STALE", capture_ts=repr(now - 400))
    wait_until(lambda: row(site, "OLD-CLOCK"), 30, "frame with an implausible capture time not stored")
    stored = row(site, "OLD-CLOCK")
    assert stored["e2e_s"] < 120 and stored["capture_ts"] > now - 120  # timed from its arrival
    assert errors_of_kind(site, "implausible_capture_ts")
    wait_until(lambda: errors_of_kind(site, "expired"), 30, "stale frame not reported as expired")
    # the error topic can be faster than the gateway's commit of the failure (and of the frame's acceptance)
    wait_until(lambda: site.reader.accounting()["failures_by_reason"].get("expired", 0) >= 1, 30,
               "the expired frame is not recorded as a failure")
    accounting = settled(site)
    assert accounting["failures_by_reason"].get("expired", 0) >= 1 and row(site, "STALE") is None
    assert accounting["implausible_capture_ts"] >= 1


def test_bad_camera_id_is_refused_at_stage_one(site):
    send(site, "edgeprune/camera/bad cam/frame", site.photo)
    wait_until(lambda: errors_of_kind(site, "bad_camera_id"), 20, "camera id with a space not refused")
    assert errors_of_kind(site, "bad_camera_id")[-1]["component"] == site.stage_nodes[0]
    assert not errors_of_kind(site, "internal")


def test_retained_garbage_on_a_data_topic_is_reported_and_cleared(site):
    send(site, "edgeprune/pipeline/stage/2/in", b"garbage", retain=True)
    wait_until(lambda: errors_of_kind(site, "retained_data"), 20, "retained data not reported")
    replayed: list[bytes] = []
    probe = mqtt_client(site.broker)
    probe.on_message = lambda c, u, msg: replayed.append(msg.payload) if msg.retain else None

    def cleared() -> bool:  # each subscribe replays what is retained now: only this subscribe's replay counts
        replayed.clear()
        probe.subscribe("edgeprune/pipeline/stage/2/in", qos=1)
        time.sleep(0.5)
        return not replayed
    wait_until(cleared, 20, "the retained garbage is still replayed")
    probe.loop_stop()
    probe.disconnect()
    assert not errors_of_kind(site, "truncated")  # it was never run


def test_hung_node_is_taken_out_by_stats_silence_and_back_when_it_resumes(site):
    node = site.stage_nodes[1]
    proc = site.procs.procs[node]
    status = lambda: next(n["status"] for n in site.reader.nodes() if n["node_id"] == node)  # noqa: E731
    proc.send_signal(signal.SIGSTOP)  # connected, keepalive not yet expired, but doing nothing
    try:
        wait_until(lambda: status() == "silent", 30, "a hung node was not noticed from its silence")
        wait_until(lambda: [s["node_id"] for s in site.reader.placement()["stages"]] == [site.stage_nodes[0]], 30,
                   "the pipeline was not re-placed around the hung node")
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_until(lambda: status() == "online", 30, "the resumed node is not online again")
    wait_until(lambda: len(site.reader.placement()["stages"]) == 2, 60, "the resumed node was not placed again")
    site.stage_nodes[:] = [s["node_id"] for s in site.reader.placement()["stages"]]
    send(site, "edgeprune/camera/cam-resume/frame", site.photo, request_id="RESUMED")
    wait_until(lambda: row(site, "RESUMED"), 30, "no result after the node resumed")
    settled(site)


def test_results_published_while_the_gateway_is_down_are_stored_after_it_restarts(site):
    site.procs.procs["gateway"].kill()  # no clean exit: buffered rows not yet written are lost with it
    site.procs.procs["gateway"].wait()
    for i in range(8):
        send(site, "edgeprune/camera/cam-away/frame", site.photo, request_id=f"AWAY-{i}")
        time.sleep(0.3)
    time.sleep(2.0)  # the nodes serve them; the broker queues the gateway's messages in its session
    site.procs.start("gateway", "gateway")
    away = "SELECT COUNT(*) AS n FROM accepted WHERE camera_id = 'cam-away'"
    wait_until(lambda: site.reader._rows(away)[0]["n"] == 8, 60, "frames accepted while the gateway was down lost")
    settled(site)
    stored = site.reader._rows("SELECT COUNT(*) AS n FROM requests WHERE camera_id = 'cam-away'")[0]["n"]
    assert stored >= 1  # served while the gateway was away, stored when it came back (others: a failure each)
    # the nodes kept their slices, so they do not calibrate again: the restarted gateway must take their retained
    # calibrations, or nothing is pruned until some later re-placement
    restarted = time.time()
    wait_until(lambda: (site.reader.controller_status() or {}).get("enabled")
               and site.reader._rows("SELECT MAX(ts) AS ts FROM controller")[0]["ts"] > restarted, 30,
               "the restarted gateway's pruning controller stayed off")


def test_a_gateway_killed_before_writing_loses_nothing_it_had_received(fresh_broker, tmp_path):
    """Announcements, results and failure reports the gateway had received but not yet written when it was
    SIGKILLed are sent again by the broker (acknowledged only after the write) and end as exactly one row or
    one failure each. The gateway writes every 60 s here, so the kill surely hits unwritten data (checked)."""
    db = tmp_path / "edgeprune.db"
    procs = Processes(tmp_path, component_env(fresh_broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db),
                                              EDGEPRUNE_GATEWAY_NODES="node-1,node-2"))
    refusals = Recorder(fresh_broker, "edgeprune/error/gateway")
    sender = mqtt_client(fresh_broker)
    ids = [f"CRASH-{i}" for i in range(10)]
    ours = "request_id LIKE 'CRASH-%'"

    def handled_up_to_here(mark: str) -> None:
        """Once the gateway refuses this command it has handled every message published before it. A refusal is
        reported at once; an answer would wait for the write this test keeps from happening (commands.py)."""
        command = json.dumps({"cmd": "prune", "node_id": mark, "ratio": 0.5}).encode()  # its controller is off
        def refused() -> bool:  # sent again until then: before its first subscribe a command reaches nobody
            sender.publish("edgeprune/component/gateway/cmd", command, qos=1).wait_for_publish(5)
            time.sleep(0.5)
            return any(mark in r["message"] for r in refusals.json_on("edgeprune/error/gateway"))
        wait_until(refused, STARTUP_S, f"gateway did not refuse {mark}")

    try:
        procs.start("gateway", "gateway", extra_env={"EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S": "60"})
        reader = open_reader(db)
        handled_up_to_here("barrier-subscribed")
        for i, request_id in enumerate(ids):
            accepted = {"request_id": request_id, "camera_id": "cam-crash", "node_id": "node-1",
                        "capture_ts": time.time(), "received_ts": time.time()}
            sender.publish("edgeprune/pipeline/accepted/node-1", json.dumps(accepted).encode(), qos=1)
            if i < 7:
                sender.publish("edgeprune/pipeline/results/node-1", fake_result(request_id, "cam-crash"), qos=1)
            else:  # a queue-full drop reported by the node: a failure with its reason
                error = {"component": "node-1", "ts": time.time(), "topic": "edgeprune/camera/cam-crash/frame",
                         "kind": "dropped", "message": "work queue full", "request_id": request_id}
                sender.publish("edgeprune/error/node-1", json.dumps(error).encode(), qos=1)
        handled_up_to_here("barrier-received")
        procs.procs["gateway"].kill()
        procs.procs["gateway"].wait()
        # the precondition that makes this test mean something: all of it was still unwritten
        assert reader._rows(f"SELECT COUNT(*) AS n FROM accepted WHERE {ours}")[0]["n"] == 0

        procs.start("gateway", "gateway", extra_env={"EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S": "0.2"})

        def count(table: str) -> int:
            return reader._rows(f"SELECT COUNT(*) AS n FROM {table} WHERE {ours}")[0]["n"]

        wait_until(lambda: count("accepted") == 10 and count("requests") + count("failures") == 10, STARTUP_S,
                   "announcements, results or failures the killed gateway had received were lost")
        handled_up_to_here("barrier-restarted")  # anything still to come (a duplicate) has come
        time.sleep(0.5)  # ... and been written (every 0.2 s)
        assert (count("accepted"), count("requests"), count("failures")) == (10, 7, 3)
        assert not reader._rows("SELECT * FROM errors WHERE kind LIKE '%_result' AND message LIKE '%CRASH-%'")
        accounting = reader.accounting()
        assert accounting["accepted"] == accounting["rows"] + accounting["failures"] == 10
    finally:
        sender.loop_stop()
        sender.disconnect()
        refusals.close()
        procs.stop_all()


def test_a_rejoining_node_is_sent_nothing_before_it_has_subscribed(fresh_broker, tmp_path):
    """A killed stage-2 node restarts and is placed again: the placement that gives it its stage is published
    only after it reported (stats, ``prepared_version``) that the broker acknowledged its input subscription,
    and no frame sent across the rejoin is lost."""
    db = tmp_path / "edgeprune.db"
    env = component_env(fresh_broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
                        EDGEPRUNE_NODE_UPLINK_MBIT_S="100000", EDGEPRUNE_NODE_QUEUE_SIZE="64",
                        EDGEPRUNE_GATEWAY_STATS_SILENCE_S="3", EDGEPRUNE_GATEWAY_RESULT_TIMEOUT_S="60",
                        EDGEPRUNE_GATEWAY_REJOIN_HOLD_S="1", EDGEPRUNE_GATEWAY_REPLAN_MIN_GAIN="0")
    procs = Processes(tmp_path, env)
    recorder = Recorder(fresh_broker, "edgeprune/placement", "edgeprune/node/+/stats")
    sender = mqtt_client(fresh_broker)
    photo = encode_jpeg(synthetic_scene(np.random.default_rng(7), 96))
    sending = threading.Event()
    sent: list[str] = []

    def camera() -> None:
        while sending.is_set():
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("request_id", f"REJOIN-{len(sent):04d}")]
            sender.publish("edgeprune/camera/cam-rejoin/frame", photo, qos=1, properties=props)
            sent.append(props.UserProperty[0][1])
            time.sleep(0.25)

    def stages() -> list[str]:
        placement = reader.placement()
        return [s["node_id"] for s in placement["stages"]] if placement else []

    try:
        reader = start_two_stage_site(procs, db)
        wait_until(lambda: len(stages()) == 2, STARTUP_S, "the two-stage placement was not recorded")
        first, second = stages()
        procs.procs[second].kill()
        procs.procs[second].wait()
        wait_until(lambda: stages() == [first], 60, "the pipeline was not re-placed around the killed node")
        sending.set()
        threading.Thread(target=camera, daemon=True).start()
        procs.start(second, "node", "--node-id", second)
        wait_until(lambda: sorted(stages()) == sorted([first, second]), STARTUP_S,
                   "the restarted node was not placed again")
        time.sleep(3.0)  # frames flow through the rejoined node
        sending.clear()
        time.sleep(0.5)
        ours = "request_id LIKE 'REJOIN-%'"
        wait_until(lambda: reader._rows(f"SELECT COUNT(*) AS n FROM accepted WHERE {ours}")[0]["n"] == len(sent), 60,
                   "frames were not accepted at stage 1")
        wait_until(lambda: reader.accounting()["in_flight"] == 0, 90, "frames still in flight")

        # the mechanism: each node the rejoin gave a new input (the rejoined one, and the other if it changed stage)
        # said it was subscribed before the placement was published
        messages = [(t, json.loads(p)) for t, p, _ in list(recorder.messages)]
        placed = [(i, [s["node_id"] for s in m["stages"]]) for i, (t, m) in enumerate(messages)
                  if t == "edgeprune/placement"]
        alone_at = max(i for i, nodes in placed if nodes == [first])
        rejoin_at, rejoined = next((i, nodes) for i, nodes in placed if i > alone_at and len(nodes) == 2)
        version = messages[rejoin_at][1]["version"]
        new_input = [n for stage, n in enumerate(rejoined, start=1) if n == second or stage != 1]
        for node in new_input:
            assert any(t == f"edgeprune/node/{node}/stats" and m.get("prepared_version") == version
                       for t, m in messages[:rejoin_at]), f"placement published before {node} had subscribed"
        # the outcome: every frame sent across the rejoin became a row
        lost = reader._rows(f"SELECT reason, COUNT(*) AS n FROM failures WHERE {ours} GROUP BY reason")
        assert not [r for r in lost if r["reason"] != "dropped"], (
            lost, reader._rows(f"SELECT * FROM failures WHERE {ours}"), procs.log("gateway"),
            procs.log(first), procs.log(second))
        rows = reader._rows(f"SELECT COUNT(*) AS n FROM requests WHERE {ours}")[0]["n"]
        assert rows + sum(r["n"] for r in lost) == len(sent) and rows > 0
    finally:
        sending.clear()
        sender.loop_stop()
        sender.disconnect()
        recorder.close()
        procs.stop_all()
