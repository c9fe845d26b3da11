"""The soak's settling (it reports a phase only once every frame sent is a row or a recorded failure, or, after a
bounded wait, says how many are still open), its per-phase accounting and drop attribution, and its forged phase's
catalogue and a broker-side queue drop, against a real broker."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeprune.bench import intruder
from edgeprune.bench.soak import (CAMERA, Camera, Site, accounting, broker_drop_notices, forged_attempts, handed_over,
                                  settle, with_broker_drops)
from gateway.store import Reader, Store, result_row
from shared.topics import Topics
from tests.conftest import AUTH, wait_until
from tests.test_gateway_logic import _result


def row(attempted: int, accepted: int, rows: int, failures: int) -> dict:
    return {"attempted": attempted, "accepted": accepted, "rows": rows, "failures": failures,
            "unaccounted": attempted - rows - failures, "in_flight": accepted - rows - failures}


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_the_soak_waits_for_frames_not_yet_accepted():
    """A hung stage-1 node's frames wait in the broker, unannounced: every *accepted* frame is settled (the old
    criterion, which reported here with 17 unaccounted) while the frames sent are not."""
    t = FakeTime()
    readings = iter([None, row(78, 61, 48, 13), row(78, 61, 48, 13), row(78, 78, 60, 18)])
    reported = settle(lambda: next(readings), 120, poll_s=1, clock=t.clock, sleep=t.sleep)
    assert reported["unaccounted"] == 0 and reported["rows"] == 60 and reported["settle_s"] == 3


def test_the_soak_reports_what_is_still_open_after_a_bounded_wait():
    t = FakeTime()
    reported = settle(lambda: row(78, 70, 48, 13), 10, poll_s=1, clock=t.clock, sleep=t.sleep)
    assert (reported["unaccounted"], reported["in_flight"], reported["settle_s"]) == (17, 9, 10)


@pytest.mark.integration
def test_every_forgery_the_soak_expects_the_broker_to_refuse_is_refused(broker):
    """The soak's forged phase counts on this split: what the ACL must refuse (reason 135), and what only the
    gateway can reject (a login's own topic, another device's name in the payload), which the broker delivers."""
    auth = AUTH[broker.port]
    auth.settings("cam-soak", "camera")  # the soak's camera, made on demand
    rows = intruder.try_all(broker.port, auth.credentials.password, ["node-1", "node-2"], "cam-soak")
    assert {r["login"] for r in rows} == {"cam-soak", "node-1", "web", "gateway"}
    assert {r["role"] for r in rows} == {"camera", "node", "web", "gateway"}
    not_refused = [f"{r['login']} -> {r['topic']}: {r['puback']}" for r in rows
                   if r["expect"] == "refused" and not r["refused"]]
    assert not_refused == []
    delivered = [r for r in rows if r["expect"] == "rejected"]
    assert delivered and all(r["puback"] is not None and not r["refused"] for r in delivered)


def test_the_forged_verdict_lists_what_got_through():
    rows = [{"login": "node-1", "topic": "t/a", "expect": "refused", "puback": 135, "refused": True},
            {"login": "node-1", "topic": "t/b", "expect": "refused", "puback": 0, "refused": False},
            {"login": "node-1", "topic": "t/c", "expect": "rejected", "puback": 16, "refused": False}]
    summary = intruder.verdict(rows, mismatches_recorded=1, stored_forged=0)
    assert summary["forged_refused_by_broker"] == 1 and summary["forged_should_be_refused"] == 2
    assert summary["forged_not_refused"] == ["node-1 -> t/b"]
    assert summary["forged_delivered_to_gateway"] == 1 and summary["forged_rejected_recorded"] == 1


def test_each_forgery_is_listed_with_its_role_claim_and_what_it_stored(tmp_path):
    """Issue 25's soak JSON: forged[{role, topic, claim, refused, stored}]; stored counts the rows and failure records
    under that forgery's own request id."""
    tried = [{"role": "node", "login": "node-1", "topic": "edgeprune/pipeline/accepted/node-1",
              "claim": "node-2", "request_id": "intruder-1", "expect": "rejected", "puback": 0, "refused": False},
             {"role": "camera", "login": "cam-1", "topic": "edgeprune/pipeline/results/cam-1", "claim": "a node",
              "request_id": None, "expect": "refused", "puback": 135, "refused": True}]
    store = Store(tmp_path / "g.db")
    store.add_accepted({"request_id": "intruder-1", "camera_id": "cam-x", "node_id": "node-2", "capture_ts": 1.0,
                        "received_ts": 1.0})  # what a gateway that believed the forgery would have stored
    store.flush()
    listed = forged_attempts(Reader(tmp_path / "g.db"), tried)
    assert [(f["role"], f["claim"], f["refused"], f["stored"]) for f in listed] == [
        ("node", "node-2", False, 1), ("camera", "a node", True, 0)]
    store.close()


def test_every_attempt_names_its_role_and_claim():
    attempts = intruder.attempts(["node-1", "node-2"], "cam-soak")
    assert {a.role for a in attempts} == {"camera", "node", "web", "gateway"}
    assert all(a.claim and a.claim != a.login for a in attempts)  # every forgery claims someone it is not
    assert [a.request_id for a in attempts if a.expect == "rejected"] == ["intruder-4", "intruder-5", "intruder-6"]


def test_the_accounting_names_lost_dropped_and_frames_that_never_reached_stage_1(tmp_path):
    """10 sent: 6 accepted (3 rows, 1 dropped, 1 lost, 1 in flight), 4 never seen by the gateway at all (what a
    broker-side drop leaves)."""
    store = Store(tmp_path / "g.db")
    for n in range(6):
        store.add_accepted({"request_id": f"burst-{n:06d}", "camera_id": "cam", "node_id": "node-1",
                            "capture_ts": 10.0 + n, "received_ts": 10.0 + n})
    for n in range(3):
        store.add_request({**result_row(_result(f"burst-{n:06d}", 10.0 + n)), "received_ts": 10.5 + n})
    for n, reason in ((3, "dropped"), (4, "lost")):
        store.add_failure({"request_id": f"burst-{n:06d}", "ts": 20.0, "reason": reason, "component": "node-1",
                           "node_id": "node-1", "message": reason})
    store.add_accepted({"request_id": "forged-000000", "camera_id": "cam", "node_id": "node-1", "capture_ts": 1.0,
                        "received_ts": 1.0})  # another phase's frame is not counted
    store.flush()
    row = accounting(Reader(tmp_path / "g.db"), "burst", 10, fault_ts=9.0)
    assert (row["rows"], row["failures"], row["lost"], row["dropped"]) == (3, 2, 1, 1)
    assert (row["unaccounted"], row["in_flight"], row["never_reached"]) == (5, 1, 4)
    assert row["recovery_s"] == pytest.approx(1.5)


def test_a_phase_counts_only_ids_that_start_with_its_own_name_taken_literally(tmp_path):
    """LIKE reads ``_`` as any character: ``node_kill-%`` also matched ``nodeXkill-…`` before the prefix was escaped."""
    store = Store(tmp_path / "g.db")
    for request_id in ("node_kill-000001", "nodeXkill-000001", "node_kill_2-000001"):
        store.add_accepted({"request_id": request_id, "camera_id": "cam", "node_id": "node-1", "capture_ts": 1.0,
                            "received_ts": 1.0})
        store.add_failure({"request_id": request_id, "ts": 2.0, "reason": "lost", "component": "node-1",
                           "node_id": "node-1", "message": "lost"})
    store.add_error({"ts": 5.0, "component": "gateway", "topic": "t", "kind": "handover", "message": "early"})
    store.add_error({"ts": 9.0, "component": "gateway", "topic": "t", "kind": "handover", "message": "late"})
    store.set_controller_status(7.0, {"enabled": True})
    store.flush()
    reader = Reader(tmp_path / "g.db")
    assert accounting(reader, "node_kill", 1, fault_ts=0.0)["accepted"] == 1
    assert [r["request_id"] for r in reader.failures_with_prefix("node_kill-")] == ["node_kill-000001"]
    assert reader.records_with_prefix("node_kill-") == 2  # its announcement and its failure record
    assert [r["message"] for r in reader.errors_since("handover", 9.0)] == ["late"]
    assert reader.controller_status_after(6.0) == {"enabled": True} and reader.controller_status_after(7.0) is None
    store.close()


LOG = """1796665000: New client connected from 127.0.0.1:43955 as node-1 (p5, c0, k60).
1796665005: Outgoing messages are being dropped for client node-1.
1796665050: Outgoing messages are being dropped for client gateway.
1796665090: Outgoing messages are being dropped for client node-2.
"""


def test_broker_drop_notices_are_read_from_the_phase_s_part_of_the_broker_log():
    assert broker_drop_notices(LOG, 1796665004.6, 1796665060.0) == ["gateway", "node-1"]
    assert broker_drop_notices(LOG, 1796665060.0, 1796665080.0) == []


def test_frames_that_never_reached_stage_1_are_broker_drops_only_when_the_broker_logged_one():
    row = {"never_reached": 14}
    assert with_broker_drops(row, ["node-1"], refused=2)["broker_dropped"] == 12
    assert with_broker_drops(row, ["node-1"], refused=2)["broker_refused"] == 2
    unexplained = with_broker_drops(row, [], refused=0)  # e.g. still queued when the settle gave up: unaccounted only
    assert (unexplained["broker_dropped"], unexplained["broker_drop_notices"]) == (0, "")


def test_handed_over_sums_the_gateway_s_handover_records():
    message = ("node-2 (edgeprune/camera/+/frame) is gone: {} inputs its session held were taken back, {} re-sent to "
               "the stages that read them now, 0 waiting for a placement with a stage for them; 0 other messages "
               "dropped; its session ended")
    assert handed_over([message.format(7, 7), message.format(2, 2), "unrelated"]) == 9
    assert handed_over([]) == 0


@pytest.mark.integration
def test_a_frame_beyond_the_broker_s_queue_is_acknowledged_to_the_camera_and_only_logged(tmp_path):
    """How a broker-side drop shows up, which the burst phase relies on: the camera's PUBACKs all succeed (nothing
    refused), the broker logs a drop notice naming the subscriber, and the subscriber receives the one in flight
    plus max_queued_messages: the rest never reach it."""
    site = Site(tmp_path / "site")
    site.broker_settings = site.broker_settings.model_copy(update={"max_queued_messages": 5})
    site.start_broker()
    node = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="node-1", protocol=mqtt.MQTTv5, manual_ack=True)
    node.username_pw_set("node-1", site.credentials.password("node-1"))
    received, subscribed = [], threading.Event()
    node.on_message = lambda client, userdata, message: received.append(message)  # never acknowledged: a hung stage
    node.on_subscribe = lambda *a: subscribed.set()
    window = Properties(PacketTypes.CONNECT)
    window.ReceiveMaximum, window.SessionExpiryInterval = 1, 3600
    camera = None
    try:
        node.connect("127.0.0.1", site.port, clean_start=False, properties=window)
        node.loop_start()
        node.subscribe(Topics().camera_frame(CAMERA), qos=1)
        assert subscribed.wait(10)
        camera = Camera(site, seed=0)
        wait_until(lambda: camera.publisher.connected, 10, "the camera did not connect")
        since = time.time()
        camera.send("burst", 20).wait_for_publish(10)
        assert camera.attempted == {"burst": 20} and camera.refused("burst") == 0  # PUBACKs come in order
        log = site.run_dir / "mosquitto.log"
        wait_until(lambda: broker_drop_notices(log.read_text(), since, since + 60) == ["node-1"], 10,
                   f"no drop notice: {log.read_text()[-400:]}")
        node.on_message = lambda client, userdata, message: (received.append(message), client.ack(message.mid, 1))
        for message in list(received):
            node.ack(message.mid, 1)
        wait_until(lambda: len(received) >= 6, 10, f"{len(received)} delivered")
        assert len(received) == 6  # 1 in flight + 5 queued; 14 dropped
    finally:
        if camera:
            camera.close()
        node.loop_stop()
        node.disconnect()
        site.stop_all()
