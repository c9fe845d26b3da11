"""Past one site: a site's Mosquitto bridges results, status and errors to a central Mosquitto, where
`edgeprune collect` writes them into one SQLite file with a site column. Two real brokers on loopback,
the collector as a real subprocess; the link is cut (central broker stopped) and restored."""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from edgeprune.broker import free_port, render_config, start_broker, stop_process
from gateway.collect import parse_central
from shared.bus import Bus
from shared.schemas import BadMessage, ErrorRecord, Hop, Result, to_json
from shared.settings import BrokerSettings, MqttSettings, SiteSettings
from shared.topics import Topics
from tests.conftest import STARTUP_S, Processes, Recorder, component_env, wait_until

SITE_QUEUE = 50  # the site broker's max_queued_messages: what the bridge may hold while the centre is away
TOPICS = Topics()


def result(n: int) -> bytes:
    hop = Hop(stage=1, node_id="pi-a", prune_ratio=0.0, received_ts=1.0, started_ts=1.0, finished_ts=1.1,
              published_ts=1.1)
    return to_json(Result(request_id=f"r{n}-{uuid.uuid4().hex[:6]}", camera_id="cam-1", capture_ts=float(n),
                          label="deer", label_index=1, confidence=0.9, hops=[hop]))


def rows(db, table: str, site: str = "valley") -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute(f"SELECT count(*) FROM {table} WHERE site = ?", (site,)).fetchone()[0]
    except sqlite3.OperationalError:  # the collector has not created the file yet
        return 0


def dropped_at(settings: MqttSettings) -> int:
    """The site broker's own count of messages it dropped (queues full): the overflow, counted."""
    recorder = Recorder(settings, "$SYS/broker/publish/messages/dropped")
    try:
        wait_until(lambda: recorder.messages, 30, "no $SYS dropped counter")  # $SYS is published every 10 s
        return int(recorder.messages[-1][1])
    finally:
        recorder.close()


def publish_results(bus: Bus, first: int, count: int) -> None:
    for n in range(first, first + count):
        bus.publish(TOPICS.results, result(n), qos=1).wait_for_publish(10)


def test_bridge_forwards_a_site_to_the_centre_and_catches_up_after_a_cut(tmp_path) -> None:
    central_port, site_port = free_port(), free_port()
    # the bridge is under test here, not logins (tests/test_security.py): both brokers let anyone in
    central_settings = BrokerSettings(port=central_port, data_dir=tmp_path / "central", allow_anonymous=True)
    central = start_broker(central_settings, log_file=open(tmp_path / "central.log", "w"))
    site = start_broker(BrokerSettings(port=site_port, data_dir=tmp_path / "site", max_queued_messages=SITE_QUEUE,
                                       allow_anonymous=True),
                        log_file=open(tmp_path / "site.log", "w"),
                        site=SiteSettings(site_id="valley", central_port=central_port, bridge_keepalive_s=5,
                                          bridge_restart_max_s=2))
    site_mqtt = MqttSettings(port=site_port)
    db = tmp_path / "central.sqlite"
    processes = Processes(tmp_path, component_env(MqttSettings(port=central_port), EDGEPRUNE_MQTT_RECONNECT_MAX_S="2"))
    bus = Bus(site_mqtt, "pi-a", TOPICS.node_status("pi-a"))  # plays the site's last stage
    local = Recorder(site_mqtt, TOPICS.results)  # the site's own gateway view
    try:
        processes.start("collect", "collect", "--db", str(db))
        bus.start()
        wait_until(lambda: rows(db, "node_status") >= 1, STARTUP_S, "the node's status never reached the centre")
        bus.report_error("edgeprune/camera/x/frame", "bad_json", "not JSON")
        publish_results(bus, 0, 5)
        wait_until(lambda: rows(db, "results") == 5, 60, "results did not reach the centre")
        wait_until(lambda: rows(db, "errors") == 1, 60, "the error record did not reach the centre")

        # Link cut: the site keeps working (its own subscribers get every result), the bridge queues.
        stop_process(central)
        publish_results(bus, 5, 30)
        wait_until(lambda: len(local.messages) == 35, 30, "the site stopped working without the centre")
        assert rows(db, "results") == 5
        central = start_broker(central_settings, log_file=open(tmp_path / "central-2.log", "w"))
        wait_until(lambda: rows(db, "results") == 35, 120, "queued results were lost across the cut")
        assert dropped_at(site_mqtt) == 0

        # Beyond the queue limit: exactly SITE_QUEUE more arrive, and the site broker counts the rest as dropped.
        stop_process(central)
        publish_results(bus, 35, SITE_QUEUE + 20)
        central = start_broker(central_settings, log_file=open(tmp_path / "central-3.log", "w"))
        wait_until(lambda: rows(db, "results") == 35 + SITE_QUEUE, 120, "the bridge's queue did not drain")
        time.sleep(3)  # nothing beyond the limit trickles in later
        assert rows(db, "results") == 35 + SITE_QUEUE
        # The counter covers every drop on the broker (one run counted 21 for these 20): at least the overflow.
        wait_until(lambda: dropped_at(site_mqtt) >= 20, 60, "the site broker did not count the overflow")
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(DISTINCT request_id) FROM results").fetchone()[0] == 35 + SITE_QUEUE
            assert {r[0] for r in conn.execute("SELECT site FROM results")} == {"valley"}
    finally:
        local.close()
        bus.stop()
        processes.stop_all()
        stop_process(site)
        stop_process(central)
    assert "Traceback" not in processes.log("collect")


def test_bridge_section_forwards_only_data_out_and_uses_its_own_credential(tmp_path) -> None:
    config = render_config(BrokerSettings(data_dir=tmp_path), SiteSettings(
        site_id="valley", central_host="centre.example", central_port=8883, bridge_username="bridge-valley",
        bridge_password="s3cret", bridge_tls_ca=tmp_path / "ca.pem"))
    bridge = config[config.index("# === BRIDGE"):]
    topic_lines = [line for line in bridge.splitlines() if line.startswith("topic ")]
    assert topic_lines and all(" out 1 edgeprune/ sites/valley/edgeprune/" in line for line in topic_lines)
    assert not any(" in " in line or " both " in line for line in topic_lines)  # control stays local
    assert "address centre.example:8883" in bridge and "remote_username bridge-valley" in bridge
    assert "remote_password s3cret" in bridge and f"bridge_cafile {tmp_path / 'ca.pem'}" in bridge
    assert "# === BRIDGE" not in render_config(BrokerSettings(data_dir=tmp_path), SiteSettings())


def test_parse_central_rows_and_refusals() -> None:
    row = parse_central(TOPICS, "sites/valley/edgeprune/pipeline/results", result(1), 5.0)
    assert row.table == "results" and row.values["site"] == "valley" and row.values["label"] == "deer"
    status = parse_central(TOPICS, "sites/ridge/edgeprune/node/pi-b/status", b"offline", 5.0)
    assert status.values == {"site": "ridge", "component": "pi-b", "kind": "node", "status": "offline",
                             "received_at": 5.0}
    error = ErrorRecord(component="cam", ts=1.0, topic="t", kind="bad_json", message="m")
    assert parse_central(TOPICS, "sites/ridge/edgeprune/error/cam", to_json(error), 5.0).table == "errors"
    for topic, payload, kind in [("edgeprune/pipeline/results", result(1), "bad_topic"),
                                 ("sites/valley/other/pipeline/results", result(1), "bad_topic"),
                                 ("sites/valley/edgeprune/node/pi-b/status", b"maybe", "bad_status"),
                                 ("sites/valley/edgeprune/pipeline/results", b"{", "bad_json")]:
        with pytest.raises(BadMessage) as caught:
            parse_central(TOPICS, topic, payload, 5.0)
        assert caught.value.kind == kind
