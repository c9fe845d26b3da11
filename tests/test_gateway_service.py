"""The gateway in-process over a real broker and a real SQLite file: duplicates, a failing disk, a failing tick."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.effects import Effects
from gateway.service import Gateway
from gateway.store import Reader
from shared.schemas import AcceptedRequest, Hop, Result, to_json
from shared.settings import GatewaySettings, MqttSettings
from tests.conftest import AUTH, Recorder, even_split, login, mqtt_client, wait_until
from tests.test_control_loop import running_loop
from tests.test_handback import activation
from tests.test_operator import FakeBus, calibrated_gateway, send

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(fresh_broker, tmp_path) -> Iterator[Gateway]:
    """A gateway whose controller already runs over nodes a and b (calibrated, accuracy model given)."""
    mqtt_settings = AUTH[fresh_broker.port].settings("gateway", "gateway")
    settings = GatewaySettings(db_path=tmp_path / "edgeprune.db", nodes=["a", "b"], flush_interval_s=0.1,
                               slo_s=0.1, window_s=3600, startup_wait_s=3600)
    gw = Gateway(settings, mqtt_settings)
    gw.coordinator.control = running_loop()
    gw.start()
    assert gw.bus.wait_subscribed(30), "the gateway's subscriptions were never acknowledged"
    yield gw
    if not gw._stop.is_set():  # a test may stop it itself, to close the open SLO window
        gw.stop()


def result(label: str, confidence: float) -> Result:
    now = time.time()
    hop = Hop(stage=1, node_id="a", prune_ratio=0.0, received_ts=now - 0.05, started_ts=now - 0.04,
              finished_ts=now - 0.02, published_ts=now - 0.01)
    return Result(request_id="frame-1", camera_id="cam", capture_ts=now - 0.06, label=label, label_index=1,
                  confidence=confidence, hops=[hop])


def test_a_redelivered_result_is_counted_once_and_never_replaces_the_first(gateway, fresh_broker):
    client = mqtt_client(fresh_broker)
    topics = gateway.topics
    first = to_json(result("cat", 0.9))
    accepted = AcceptedRequest(request_id="frame-1", camera_id="cam", node_id="a", capture_ts=time.time() - 0.06,
                               received_ts=time.time() - 0.05)
    client.publish(topics.accepted("a"), to_json(accepted), qos=1).wait_for_publish(10)
    wait_until(lambda: gateway.coordinator.data_path.ledger.in_flight == 1, 20, "the accepted request never arrived")
    last = result("cat", 0.9).hops[-1].node_id
    client.publish(topics.results(last), first, qos=1).wait_for_publish(10)
    client.publish(topics.results(last), first, qos=1).wait_for_publish(10)  # a QoS 1 redelivery
    client.publish(topics.results(last), to_json(result("dog", 0.4)), qos=1).wait_for_publish(10)  # not identical
    client.loop_stop()
    client.disconnect()
    data_path = gateway.coordinator.data_path
    wait_until(lambda: data_path.redelivered_results == 1 and gateway.bus.errors["conflict_result"] == 1, 20,
               "the second and third deliveries never arrived")
    assert gateway.coordinator.control.controller.metrics(time.time()).trigger_samples == 1  # one controller sample
    assert len(gateway.coordinator.control.prune_log.recent) == 1
    wait_until(lambda: Reader(gateway.settings.db_path).recent_requests(0), 20, "no request row written")
    gateway.stop()  # closes the open SLO window into the table
    reader = Reader(gateway.settings.db_path)
    (row,) = reader.recent_requests(0)
    assert (row["label"], row["confidence"]) == ("cat", 0.9)
    (window,) = reader.windows()
    assert window["count"] == 1


def test_a_failing_disk_neither_stops_control_decisions_nor_loses_the_rows(gateway, fresh_broker):
    failing = {"on": True}
    real_write = gateway.store._write

    def write(pending):
        if failing["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real_write(pending)

    gateway.store._write = write
    topics = gateway.topics
    recorder = Recorder(fresh_broker, topics.errors_filter, topics.node_prune_desired("b"))
    try:
        client = mqtt_client(fresh_broker)
        command = json.dumps({"cmd": "prune", "node_id": "b", "ratio": 0.5})
        client.publish(topics.component_command(gateway.settings.gateway_id), command, qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        # the decision is published although nothing can be written
        wait_until(lambda: recorder.json_on(topics.node_prune_desired("b")), 20, "no desired state published")
        assert recorder.json_on(topics.node_prune_desired("b"))[-1]["ratio"] == 0.5
        errors_topic = topics.errors(gateway.settings.gateway_id)
        wait_until(lambda: any(e["kind"] == "store_write_failed" for e in recorder.json_on(errors_topic)), 20,
                   "the failing write was not reported")
        assert gateway.store.write_failures >= 1
        assert Reader(gateway.settings.db_path).prune_events() == []
        failing["on"] = False
        wait_until(lambda: Reader(gateway.settings.db_path).prune_events(), 60,
                   "the gateway did not write once the disk worked again")
        (event,) = Reader(gateway.settings.db_path).prune_events()
        assert event["policy"] == "manual" and event["changed"] == {"b": 0.5}
        # the controller's status row comes with the tick after the command: a flush of its own, maybe a later one
        wait_until(lambda: ((Reader(gateway.settings.db_path).controller_status() or {}).get("ratios") or {}).get("b")
                   == 0.5, 30, "the controller's status was not written once the disk worked again")
    finally:
        recorder.close()


def test_a_failing_tick_is_reported_and_ticking_goes_on(gateway, fresh_broker):
    calls = {"n": 0}
    real_tick = gateway.coordinator.control.tick

    def tick(now):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in one tick")
        return real_tick(now)

    recorder = Recorder(fresh_broker, gateway.topics.errors_filter)
    try:
        gateway.coordinator.control.tick = tick
        errors_topic = gateway.topics.errors(gateway.settings.gateway_id)
        wait_until(lambda: any(e["kind"] == "tick_failed" for e in recorder.json_on(errors_topic)), 20,
                   "the failing tick was not reported")
        wait_until(lambda: calls["n"] >= 3, 30, "the tick thread stopped after one failure")
        assert gateway.tick_failures == 1
    finally:
        recorder.close()


def test_pending_rows_are_bounded_while_the_disk_fails(tmp_path):
    from gateway.store import Store
    store = Store(tmp_path / "e.db", max_pending=100)
    store._write = lambda pending: (_ for _ in ()).throw(sqlite3.OperationalError("locked"))
    for i in range(250):
        store.add_error({"ts": float(i), "component": "x", "topic": "t", "kind": "k", "message": str(i)})
    with pytest.raises(sqlite3.OperationalError):
        store.flush()
    assert len(store._pending["errors"]) == 100 and store.dropped["errors"] == 150
    del store._write  # the disk works again: the newest 100 rows are written
    assert store.flush() == 100
    assert [e["ts"] for e in Reader(tmp_path / "e.db").errors(limit=1)] == [249.0]
    store.close()


def test_what_a_restarted_gateway_resumes_is_in_its_database_until_done(tmp_path):
    """Pending takeovers, issued desired states and the last placement version are read back at start; a takeover
    done or a retired node's state (stored empty) is not."""
    from gateway.store import Store
    store = Store(tmp_path / "e.db")
    store.set_takeover("node-2", "edgeprune/pipeline/stage/2/in", 1.0)
    store.set_takeover("node-3", "$share/edgeprune-stage-2-tok3n/edgeprune/pipeline/stage/2/in", 1.0)
    store.set_issued_desired("node-2", b'{"ratio":0.5}')
    store.set_issued_desired("node-3", b'{"ratio":0.3}')
    store.flush()
    store.set_takeover("node-3", "", 2.0)  # taken over
    store.set_issued_desired("node-3", b"")  # retired
    store.close()
    reopened = Store(tmp_path / "e.db")
    assert reopened.last_placement_version() == 0
    for version in (7, 9):
        reopened.add_placement({"version": version, "issued_at": 1.0, "model": "trapnet", "n_blocks": 6, "stages": []})
    reopened.flush()
    assert reopened.last_placement_version() == 9
    assert reopened.pending_takeovers() == {"node-2": "edgeprune/pipeline/stage/2/in"}
    assert reopened.issued_desired() == {"node-2": b'{"ratio":0.5}'}
    reopened.close()


def test_a_calibration_without_the_configured_ladder_is_reported_and_keeps_the_controller_off(gateway, fresh_broker):
    from tests.test_control_loop import calibration, loop, placement
    gateway.coordinator.control = loop(ladder=(0.0, 0.25, 0.5))  # the nodes build 0.0, 0.1, ..., 0.9
    gateway.coordinator.control.set_placement(placement(1))
    recorder = Recorder(fresh_broker, gateway.topics.errors_filter)
    try:
        client = mqtt_client(fresh_broker)
        client.publish(gateway.topics.node_calibration("a"), to_json(calibration("a", 0, 2)),
                       qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        errors_topic = gateway.topics.errors(gateway.settings.gateway_id)
        wait_until(lambda: any(e["kind"] == "ladder_mismatch" for e in recorder.json_on(errors_topic)), 20,
                   "the mismatched ladder was not reported")
        (error,) = [e for e in recorder.json_on(errors_topic) if e["kind"] == "ladder_mismatch"]
        assert "0.25" in error["message"] and "a has no variant" in error["message"]
        control = gateway.coordinator.control
        assert control.controller is None and "0.25" in control.disabled_reason
    finally:
        recorder.close()


def test_after_commit_runs_only_once_the_rows_before_it_are_written(tmp_path):
    """The gateway acknowledges a message to the broker through this: never before its rows are on disk."""
    from gateway.store import Store
    store = Store(tmp_path / "e.db")
    acked: list[int] = []
    store.add_accepted({"request_id": "r1", "camera_id": "cam", "node_id": "a", "capture_ts": 1.0, "received_ts": 1.0})
    store.after_commit(lambda: acked.append(Reader(tmp_path / "e.db").db["accepted"].count))
    store._write = lambda pending: (_ for _ in ()).throw(sqlite3.OperationalError("disk full"))
    with pytest.raises(sqlite3.OperationalError):
        store.flush()
    assert acked == []  # not written: not acknowledged (the broker keeps the message)
    del store._write
    store.flush()
    assert acked == [1]  # called once, after the row was committed
    store.flush()
    assert acked == [1]
    store.close()


def test_a_calibration_that_fits_poorly_is_kept_and_measured_again_a_bounded_number_of_times(gateway, fresh_broker):
    from shared.schemas import SliceCalibration
    from tests.test_control_loop import LADDER, loop, placement
    gateway.coordinator.control = loop()
    gateway.coordinator.control.set_placement(placement(1))
    recorder = Recorder(fresh_broker, gateway.topics.node_command("a"))
    noisy = [0.011, 0.013, 0.011, 0.012, 0.013, 0.011, 0.012, 0.011, 0.013, 0.012][:len(LADDER)]  # flat: host noise
    try:
        client = mqtt_client(fresh_broker)
        for attempt in range(4):  # the node answers every request with another poor curve
            flat = SliceCalibration(node_id="a", placement_version=1, first_block=0, last_block=2, ratios=LADDER,
                                    latency_s=noisy, measured_at=time.time() + attempt)  # recent: not retired
            client.publish(gateway.topics.node_calibration("a"), to_json(flat), qos=1).wait_for_publish(10)
        wait_until(lambda: Reader(gateway.settings.db_path).db["calibrations"].count == 4, 20,
                   "the four calibrations were not stored")
        client.loop_stop()
        client.disconnect()
        time.sleep(1.0)  # a third request, if one were (wrongly) sent, would have arrived by now
        asked = [m for m in recorder.json_on(gateway.topics.node_command("a")) if m.get("cmd") == "calibrate"]
        assert len(asked) == gateway.settings.recalibrate_attempts == 2
        # the poor curve is kept meanwhile: a curve is better than none
        assert "a" in gateway.coordinator.control.curves.fits
    finally:
        recorder.close()


def test_garbage_retained_on_device_state_topics_is_reported_once_and_cleared(fresh_broker, tmp_path):
    """Issue 25, item 9, through the real ACL: a node's garbage profile and a camera's garbage availability are
    reported and cleared by the gateway (its login may write component statuses), so no restart replays them."""
    auth = AUTH[fresh_broker.port]
    garbage = {"edgeprune/node/node-9/profile": (auth.settings("node-9", "node"), "bad_json"),
               "edgeprune/component/trap-7/status": (auth.settings("trap-7", "camera"), "bad_status")}
    for topic, (settings, _) in garbage.items():
        device = mqtt_client(settings)
        device.publish(topic, b"{not json", qos=1, retain=True).wait_for_publish(10)
        device.loop_stop()
        device.disconnect()
    settings = GatewaySettings(db_path=tmp_path / "edgeprune.db", nodes=["node-9"], flush_interval_s=0.1)
    gw = Gateway(settings, auth.settings("gateway", "gateway"))
    gw.start()
    retained: dict[str, bytes] = {}
    probe = mqtt_client(fresh_broker)
    probe.on_message = lambda c, u, msg: retained.update({msg.topic: msg.payload}) if msg.retain else None
    try:
        wait_until(lambda: {(e["topic"], e["kind"]) for e in Reader(settings.db_path).errors(50)}
                   >= {(topic, kind) for topic, (_, kind) in garbage.items()}, 30, "the garbage was not reported")

        def replayed() -> dict[str, bytes]:  # what a restarted gateway would be sent
            retained.clear()
            for topic in garbage:
                probe.unsubscribe(topic)
                probe.subscribe(topic, qos=1)
            time.sleep(0.5)
            return dict(retained)
        wait_until(lambda: not replayed(), 30, "the retained garbage is still there")
    finally:
        probe.loop_stop()
        probe.disconnect()
        gw.stop()
    errors = [(e["topic"], e["kind"]) for e in Reader(settings.db_path).errors(50)]
    assert sorted(errors) == sorted((topic, kind) for topic, (_, kind) in garbage.items())  # each reported once


def test_an_operators_hold_survives_a_gateway_restart(gateway, fresh_broker):
    """Held over MQTT, stopped, started again on the same database: the hold and its ratio are in force at once
    (docs/controller.md, "Manual override"); before, the ratio came back with the retained state and the hold not."""
    client = mqtt_client(fresh_broker)
    command = {"cmd": "prune", "node_id": "b", "ratio": 0.5, "id": "hold-1"}
    client.publish(gateway.topics.component_command(gateway.settings.gateway_id), json.dumps(command),
                   qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
    wait_until(lambda: gateway.coordinator.control.status()["manual"] == {"b": 0.5}, 20,
               "the hold command was not obeyed")
    gateway.stop()
    restarted = Gateway(gateway.settings, gateway.bus.settings)
    try:
        control = restarted.coordinator.control
        assert control.desired.get("b") is not None and control.desired["b"].ratio == 0.5
        assert control.holds == {"b": 0.5}
    finally:
        restarted.store.close()


def test_a_takeover_pending_when_the_gateway_stops_is_carried_out_after_its_restart(gateway, fresh_broker):
    """Node b (stage 2) is gone holding 3 activations in its broker session; the gateway stops before a placement
    without b is in force. The restarted gateway takes b's session over once its own placement without b is, and
    the 3 come back (docs/reliability.md); before, it forgot the takeover and they ended `lost`."""
    port, topics = fresh_broker.port, gateway.topics
    node = login(mqtt.Client(CallbackAPIVersion.VERSION2, client_id="b", protocol=mqtt.MQTTv5, manual_ack=True),
                 AUTH[port].settings("b", "node"))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    node.connect("127.0.0.1", port, clean_start=False, properties=props)
    node.loop_start()
    subscribed = threading.Event()
    node.on_subscribe = lambda *_: subscribed.set()
    node.subscribe(topics.stage_input(2), qos=1)
    wait_until(subscribed.is_set, 10, "no SUBACK")
    node._sock.close()  # killed: its session keeps what is sent to its input
    node.loop_stop()

    def place(gw: Gateway, nodes: list[str], version: int) -> None:
        placement = even_split(6, nodes).model_copy(update={"version": version})

        def in_force() -> Effects:
            out = Effects()
            gw.coordinator.placing.live.current = gw.coordinator.placing.handover.active = placement
            gw.coordinator.placing.activate(placement, time.time(), out)
            return out
        gw._decide(in_force)

    place(gateway, ["a", "b"], 7)
    admin = mqtt_client(AUTH[port].settings("admin", "admin"))
    for i in range(3):
        admin.publish(topics.stage_input(2), activation(3, f"held-{i}"), qos=1).wait_for_publish(10)
    admin.publish(topics.node_status("b"), "offline", qos=1, retain=True).wait_for_publish(10)
    admin.loop_stop()
    admin.disconnect()
    db = gateway.settings.db_path
    pending = "SELECT served FROM takeovers WHERE node_id = 'b'"
    wait_until(lambda: sqlite3.connect(db).execute(pending).fetchone() == (topics.stage_input(2),), 20,
               "the pending takeover was not stored")
    gateway.stop()  # before any placement without b

    restarted = Gateway(gateway.settings, gateway.bus.settings)
    restarted.start()
    try:
        place(restarted, ["a"], 8)
        handover = "SELECT message FROM errors WHERE kind = 'handover'"
        wait_until(lambda: sqlite3.connect(db).execute(handover).fetchone() is not None, 30,
                   "the restarted gateway did not take b's session over")
        (message,) = sqlite3.connect(db).execute(handover).fetchone()
        assert message.startswith("b (edgeprune/pipeline/stage/2/in) is gone: 3 inputs its session held were taken")
        wait_until(lambda: sqlite3.connect(db).execute(pending).fetchone() == ("",), 20, "the takeover stays pending")
    finally:
        restarted.stop()


def test_a_result_is_stored_while_a_slow_hybrid_plan_is_being_made(fresh_broker, tmp_path, monkeypatch):
    """Issue 27: a hybrid plan (seconds on dozens of nodes) was made in the tick under the gateway's one lock, so
    meanwhile no result was stored, no command obeyed, no tick ran. The planner here blocks until released."""
    import gateway.live_placement as live_placement
    from tests.test_live_placement import offer

    solving, release = threading.Event(), threading.Event()
    real = live_placement.plan_hybrid

    def slow_plan(*args, **kwargs):
        solving.set()
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(live_placement, "plan_hybrid", slow_plan)
    settings = GatewaySettings(db_path=tmp_path / "edgeprune.db", nodes=["a", "b"], flush_interval_s=0.1,
                               placement_mode="hybrid", window_s=3600)
    gw = Gateway(settings, AUTH[fresh_broker.port].settings("gateway", "gateway"))
    gw.start()
    client = mqtt_client(fresh_broker)
    try:
        assert gw.bus.wait_subscribed(30), "the gateway's subscriptions were never acknowledged"
        for node in ("a", "b"):
            offered = offer(node, fingerprint=gw.coordinator.fingerprint)
            gw._decide(gw.coordinator.on_profile, offered, to_json(offered), time.time())
            gw._decide(gw.coordinator.on_status, node, "online", time.time())
        wait_until(solving.is_set, 30, "the hybrid plan was never asked for")
        accepted = AcceptedRequest(request_id="frame-1", camera_id="cam", node_id="a",
                                   capture_ts=time.time() - 0.06, received_ts=time.time() - 0.05)
        client.publish(gw.topics.accepted("a"), to_json(accepted), qos=1).wait_for_publish(10)
        client.publish(gw.topics.results("a"), to_json(result("cat", 0.9)), qos=1).wait_for_publish(10)
        wait_until(lambda: Reader(settings.db_path).recent_requests(0), 30,
                   "no result stored while the plan was being made")
        assert not release.is_set() and gw.coordinator.placing.live.current is None
        release.set()
        wait_until(lambda: gw.coordinator.placing.live.current is not None, 30, "the plan was never placed")
        assert set(gw.coordinator.placing.live.current.node_ids()) == {"a", "b"}
    finally:
        release.set()
        client.loop_stop()
        client.disconnect()
        gw.stop()


def test_a_hold_and_its_answer_go_out_only_once_its_row_is_committed(fresh_broker, tmp_path, monkeypatch):
    """An operator's hold published before its row was written was undone by a SIGKILL in between (up to one
    ``flush_interval_s``): the node and the page saw a hold the restarted gateway did not know (docs/reliability.md,
    "Gateway killed"). Here the writer is held back; the test writes when it wants."""
    mqtt_settings = AUTH[fresh_broker.port].settings("gateway", "gateway")
    settings = GatewaySettings(db_path=tmp_path / "edgeprune.db", nodes=["a", "b"], flush_interval_s=60,
                               slo_s=0.1, window_s=3600, startup_wait_s=3600)
    gw = Gateway(settings, mqtt_settings)
    gw.coordinator.control = running_loop()
    monkeypatch.setattr(gw.store, "start_writer", lambda *args, **kwargs: None)  # nothing written until flush()
    topics = gw.topics
    desired_topic, reply_topic = topics.node_prune_desired("b"), topics.component_reply(settings.gateway_id)
    recorder = Recorder(fresh_broker, desired_topic, reply_topic)
    gw.start()
    try:
        assert gw.bus.wait_subscribed(30), "the gateway's subscriptions were never acknowledged"
        client = mqtt_client(fresh_broker)
        command = {"cmd": "prune", "node_id": "b", "ratio": 0.5, "id": "hold-1"}
        client.publish(topics.component_command(settings.gateway_id), json.dumps(command), qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        wait_until(lambda: gw.coordinator.control.status()["manual"] == {"b": 0.5}, 20, "the hold was not decided")
        time.sleep(0.5)  # what the gateway would publish before the commit has had time to arrive
        # decided, not yet on disk: neither the state nor the answer is out (a page would show a hold a restart undoes)
        assert recorder.json_on(desired_topic) == [] and recorder.json_on(reply_topic) == []
        gw.store.flush()
        assert gw.store.issued_desired()["b"]  # read from the file: committed
        wait_until(lambda: recorder.json_on(desired_topic) and recorder.json_on(reply_topic), 20,
                   "nothing published after the commit")
        assert recorder.json_on(desired_topic)[-1]["ratio"] == 0.5 and recorder.json_on(reply_topic)[-1]["ok"]
    finally:
        recorder.close()
        gw.stop()


def test_a_prune_events_follow_up_due_across_a_gateway_restart_is_written_by_the_restarted_gateway(tmp_path):
    """An event's follow-up (the latency observed in the ``window_s`` after it) was kept only in memory: a gateway
    restarted before it was due never wrote it, and the event stayed without an outcome (issue 25 leftovers). The
    restarted gateway takes the open events and the latencies stored after them from its database."""
    first = calibrated_gateway(tmp_path)  # its bus records instead of publishing
    send(first, {"cmd": "prune", "node_id": "b", "ratio": 0.5, "id": "hold"})
    (event,) = Reader(first.settings.db_path).prune_events()
    assert event["observed_count"] is None
    first.store.add_request({"request_id": "r1", "camera_id": "cam", "capture_ts": event["ts"], "e2e_s": 0.25,
                             "finish_ts": event["ts"] + 1.0, "received_ts": event["ts"] + 1.0})
    first.store.close()  # stopped (or killed) before the follow-up was due: nothing more of it is written

    restarted = Gateway(first.settings, MqttSettings())
    restarted.bus = FakeBus()
    restarted.tick(event["ts"] + first.settings.window_s + 1.0)
    restarted.store.close()
    (followed,) = Reader(first.settings.db_path).prune_events()
    assert (followed["observed_count"], followed["observed_p50_s"]) == (1, 0.25)
