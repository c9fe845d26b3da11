"""Past one site: a site's Mosquitto bridges results, status and errors to a central Mosquitto, where
`edgeprune collect` writes them into one SQLite file with a site column (PostgreSQL: test_central_postgres.py).
Two real brokers on loopback, the collector as a real subprocess; the link is cut (central broker stopped) and
restored."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from edgeprune.broker import free_port, render_config, start_broker, stop_process
from gateway.collect import open_store, parse_central
from shared.bus import Bus
from shared.schemas import BadMessage, ErrorRecord, Hop, Result, to_json
from shared.settings import BrokerSettings, MqttSettings, SiteSettings, load
from shared.topics import Topics
from tests.conftest import STARTUP_S, Processes, Recorder, component_env, wait_until

ROOT = Path(__file__).resolve().parents[1]
NOT_AUTHORIZED = 135
SITE_QUEUE = 50  # the site broker's max_queued_messages: what the bridge may hold while the centre is away
TOPICS = Topics()


def result(n: int) -> bytes:
    hop = Hop(stage=1, node_id="pi-a", prune_ratio=0.0, received_ts=1.0, started_ts=1.0, finished_ts=1.1,
              published_ts=1.1)
    return to_json(Result(request_id=f"r{n}-{uuid.uuid4().hex[:6]}", camera_id="cam-1", capture_ts=float(n),
                          label="deer", label_index=1, scientific_name="Capreolus capreolus", confidence=0.9,
                          hops=[hop]))


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
        bus.publish(TOPICS.results("pi-a"), result(n), qos=1).wait_for_publish(10)


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
    local = Recorder(site_mqtt, TOPICS.results_filter)  # the site's own gateway view
    try:
        processes.start("collect", "collect", "--db", str(db))
        bus.start()
        wait_until(lambda: rows(db, "node_status") >= 1, STARTUP_S, "the node's status never reached the centre")
        bus.report_error("edgeprune/camera/x/frame", "bad_json", "not JSON")
        publish_results(bus, 0, 5)
        wait_until(lambda: rows(db, "requests") == 5, 60, "results did not reach the centre")
        wait_until(lambda: rows(db, "errors") == 1, 60, "the error record did not reach the centre")

        # Link cut: the site keeps working (its own subscribers get every result), the bridge queues.
        stop_process(central)
        publish_results(bus, 5, 30)
        wait_until(lambda: len(local.messages) == 35, 30, "the site stopped working without the centre")
        assert rows(db, "requests") == 5
        central = start_broker(central_settings, log_file=open(tmp_path / "central-2.log", "w"))
        wait_until(lambda: rows(db, "requests") == 35, 120, "queued results were lost across the cut")
        assert dropped_at(site_mqtt) == 0

        # Beyond the queue limit: exactly SITE_QUEUE more arrive, and the site broker counts the rest as dropped.
        stop_process(central)
        publish_results(bus, 35, SITE_QUEUE + 20)
        central = start_broker(central_settings, log_file=open(tmp_path / "central-3.log", "w"))
        wait_until(lambda: rows(db, "requests") == 35 + SITE_QUEUE, 120, "the bridge's queue did not drain")
        time.sleep(3)  # nothing beyond the limit trickles in later
        assert rows(db, "requests") == 35 + SITE_QUEUE
        # The counter covers every drop on the broker (one run counted 21 for these 20): at least the overflow.
        wait_until(lambda: dropped_at(site_mqtt) >= 20, 60, "the site broker did not count the overflow")
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(DISTINCT request_id) FROM requests").fetchone()[0] == 35 + SITE_QUEUE
            assert {r[0] for r in conn.execute("SELECT site FROM requests")} == {"valley"}
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


def test_parse_central_rows_and_refusals(tmp_path) -> None:
    row = parse_central(TOPICS, "sites/valley/edgeprune/pipeline/results/pi-a", result(1), 5.0)
    assert row.table == "requests" and row.values["label"] == "deer"
    assert (row.values["site"], row.values["deployment"], row.values["received_at"]) == ("valley", "valley/cam-1", 5.0)
    assert row.values["finish_ts"] == 1.1 and row.values["prune_ratios"] == [0.0]  # the site's clock, not arrival
    with sqlite3.connect(tmp_path / "old.db") as old:  # a central file from before the shared schema and the taxon
        old.execute("CREATE TABLE results (site TEXT NOT NULL, request_id TEXT NOT NULL, camera_id TEXT NOT NULL, "
                    "capture_ts REAL NOT NULL, label TEXT NOT NULL, label_index INTEGER NOT NULL, "
                    "confidence REAL NOT NULL, hops TEXT NOT NULL, received_at REAL NOT NULL, "
                    "PRIMARY KEY (site, request_id))")
        old.execute("INSERT INTO results VALUES ('ridge', 'r0', 'cam-2', 1.0, 'fox', 2, 0.8, '[]', 2.0)")
        old.execute("CREATE TABLE node_status (site TEXT NOT NULL, component TEXT NOT NULL, kind TEXT NOT NULL, "
                    "status TEXT NOT NULL, received_at REAL NOT NULL)")
        old.execute("INSERT INTO node_status VALUES ('ridge', 'pi-b', 'node', 'online', 2.0)")
    store = open_store(tmp_path / "old.db")
    store.add(row.table, row.values)
    store.add(row.table, row.values)  # a redelivery
    store.close()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT site, deployment, label, scientific_name FROM requests ORDER BY site").fetchall() \
            == [("ridge", "ridge/cam-2", "fox", ""), ("valley", "valley/cam-1", "deer", "Capreolus capreolus")]
        assert conn.execute("SELECT site, component, status FROM node_status").fetchall() == [("ridge", "pi-b",
                                                                                              "online")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert not tables & {"results", "node_status_v1", "errors_v1"}
    status = parse_central(TOPICS, "sites/ridge/edgeprune/node/pi-b/status", b"offline", 5.0)
    assert status.values == {"site": "ridge", "component": "pi-b", "kind": "node", "status": "offline",
                             "received_at": 5.0}
    error = ErrorRecord(component="cam", ts=1.0, topic="t", kind="bad_json", message="m")
    stored = parse_central(TOPICS, "sites/ridge/edgeprune/error/cam", to_json(error), 5.0)
    # the gateway's own errors row (every field of the record), keyed by site
    assert (stored.table, stored.node) == ("errors", None)
    assert stored.values == {"site": "ridge", "received_at": 5.0, "component": "cam", "ts": 1.0, "topic": "t",
                             "kind": "bad_json", "message": "m", "request_id": None}
    for topic, payload, kind in [("edgeprune/pipeline/results/pi-a", result(1), "bad_topic"),
                                 ("sites/valley/other/pipeline/results/pi-a", result(1), "bad_topic"),
                                 ("sites/valley/edgeprune/pipeline/results", result(1), "bad_topic"),
                                 ("sites/valley/edgeprune/node/pi-b/status", b"maybe", "bad_status"),
                                 ("sites/valley/edgeprune/pipeline/results/pi-a", b"{", "bad_json")]:
        with pytest.raises(BadMessage) as caught:
            parse_central(TOPICS, topic, payload, 5.0)
        assert caught.value.kind == kind


def env_file(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def publish_code(port: int, username: str, password: str, topic: str) -> int:
    """The reason code of the central broker's PUBACK to one QoS 1 publish by ``username`` (MQTT v5)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    acked, codes = threading.Event(), []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    client.on_publish = lambda c, u, mid, rc, p: (codes.append(rc.value), acked.set())
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, result(99), qos=1)
        assert acked.wait(10), f"no PUBACK for {topic}"
        return codes[0]
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_central_role_takes_a_site_over_tls_with_its_bridge_login_only(tmp_path, monkeypatch) -> None:
    """What `install.sh --role central --tls --sites valley,ridge` sets up: the central broker from
    docs/central.example.toml (plain listener on loopback for the collector, TLS for the sites, logins and
    an ACL), and a site whose broker is configured from nothing but the bridge-valley.env file it is given."""
    from edgeprune.credentials import Credentials, central_users
    from tests.test_security import make_test_certificates

    tls = tmp_path / "tls"
    tls.mkdir()
    make_test_certificates(tls)
    central_settings = load(BrokerSettings, ROOT / "docs" / "central.example.toml", port=free_port(),
                            data_dir=tmp_path / "central", tls_port=free_port(), tls_bind="127.0.0.1", tls_dir=tls)
    assert central_settings.bind == "127.0.0.1" and central_settings.max_queued_messages >= 20 * SITE_QUEUE
    credentials = Credentials(central_settings.credentials_folder)
    for name, role in central_users(["valley", "ridge"]).items():
        credentials.add(name, role)
    central = start_broker(central_settings, log_file=open(tmp_path / "central.log", "w"))
    bridge_env = env_file(credentials.env_file("bridge-valley"))  # copied to the site as /etc/edgeprune/broker.env
    for name, value in bridge_env.items():
        monkeypatch.setenv(name, value)
    site_settings = load(SiteSettings, central_port=central_settings.tls_port, bridge_tls_ca=tls / "ca.crt",
                         bridge_keepalive_s=5, bridge_restart_max_s=2)
    assert site_settings.site_id == "valley" and site_settings.bridge_username == "bridge-valley"
    site_port = free_port()
    site = start_broker(BrokerSettings(port=site_port, data_dir=tmp_path / "site", allow_anonymous=True),
                        log_file=open(tmp_path / "site.log", "w"), site=site_settings)
    db = tmp_path / "central.sqlite"
    processes = Processes(tmp_path, component_env(MqttSettings(port=central_settings.port),
                                                  **env_file(credentials.env_file("collect"))))
    bus = Bus(MqttSettings(port=site_port), "pi-a", TOPICS.node_status("pi-a"))
    try:
        processes.start("collect", "collect", "--db", str(db))
        bus.start()
        wait_until(lambda: rows(db, "node_status") >= 1, STARTUP_S, "nothing reached the centre over TLS")
        publish_results(bus, 0, 3)
        wait_until(lambda: rows(db, "requests") == 3, 60, "results did not reach the centre over TLS")
        password = credentials.password("bridge-valley")
        # the valley bridge's login writes for valley only; the collector only reads
        assert publish_code(central_settings.port, "bridge-valley", password,
                            "sites/valley/edgeprune/pipeline/results/pi-a") < 128
        assert publish_code(central_settings.port, "bridge-valley", password,
                            "sites/ridge/edgeprune/pipeline/results/pi-a") == NOT_AUTHORIZED
        assert publish_code(central_settings.port, "collect", credentials.password("collect"),
                            "sites/valley/edgeprune/pipeline/results/pi-a") == NOT_AUTHORIZED
        wait_until(lambda: rows(db, "requests") == 4, 30, "the bridge user's own write did not arrive")
        time.sleep(1)
        assert rows(db, "requests", site="ridge") == 0
    finally:
        bus.stop()
        processes.stop_all()
        stop_process(site)
        stop_process(central)
    assert "Traceback" not in processes.log("collect")
    assert "bridge-valley" in (tmp_path / "central.log").read_text()  # the bridge logged in as itself


def test_central_users_scope_each_bridge_to_its_site(tmp_path) -> None:
    from edgeprune.credentials import Credentials, CredentialsError, central_users, render_acl

    acl = render_acl(central_users(["valley", "ridge"]), "edgeprune", "gateway")
    assert "user bridge-valley\ntopic write sites/valley/#\n" in acl
    assert "user bridge-ridge\ntopic write sites/ridge/#\n" in acl
    assert "user collect\ntopic read sites/#\n" in acl
    with pytest.raises(CredentialsError):
        Credentials(tmp_path).add("valley", "bridge")  # a bridge user's name must say its site

    # what install.sh --role central --sites valley runs
    made = subprocess.run([sys.executable, "-m", "edgeprune", "credentials", "--dir", str(tmp_path / "creds"), "init",
                           "--central", "--sites", "valley"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert Credentials(tmp_path / "creds").users() == {"collect": "collector", "bridge-valley": "bridge"}
    assert env_file(tmp_path / "creds" / "bridge-valley.env")["EDGEPRUNE_SITE_SITE_ID"] == "valley"


def test_a_result_row_leaves_the_ingest_hop_out_of_the_ratios_and_marks_a_deferred_frame_late() -> None:
    """One mapping (gateway.store.result_row) for the gateway's rows and the centre's."""
    from gateway.store import result_row

    hops = [Hop(stage=0, node_id="ingest", prune_ratio=0.0, received_ts=1.0, started_ts=1.0, finished_ts=1.05,
                published_ts=1.05, decode_s=0.04),
            Hop(stage=1, node_id="pi-a", prune_ratio=0.3, received_ts=1.1, started_ts=1.2, finished_ts=1.4,
                published_ts=1.4, deferred=True)]
    labelled = Result(request_id="r", camera_id="cam-1", capture_ts=0.9, label="deer", label_index=1,
                      confidence=0.9, hops=hops, true_label=2)
    assert result_row(labelled)["prune_ratios"] == [0.3] and result_row(labelled)["late"] == 1


def test_an_empty_payload_is_a_retained_clear_not_bad_input() -> None:
    """Clearing a retained message (a node's profile or status, a stray retained result the gateway removes) is an
    empty publish that the bridge forwards like any other: nothing to store, and not a `bad_json` error."""
    for topic in ("sites/valley/edgeprune/node/pi-a/profile", "sites/valley/edgeprune/node/pi-a/status",
                  "sites/valley/edgeprune/pipeline/results/pi-a", "sites/valley/edgeprune/error/cam"):
        assert parse_central(TOPICS, topic, b"", 5.0) is None, topic
    with pytest.raises(BadMessage) as caught:  # still only below a site's known topics
        parse_central(TOPICS, "sites/valley/edgeprune/pipeline/nowhere", b"", 5.0)
    assert caught.value.kind == "bad_topic"
