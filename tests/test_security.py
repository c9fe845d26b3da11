"""The broker's login and ACL, against a real mosquitto from our generated config (MQTT v5 reason codes)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeprune.bench.intruder import Login
from edgeprune.broker import free_port, start_broker, stop_process
from edgeprune.credentials import Credentials, render_acl
from shared.bus import Bus
from shared.settings import BrokerSettings, MqttSettings
from tests.conftest import AUTH, can_connect

pytestmark = pytest.mark.integration
NOT_AUTHORIZED = 135


class Publisher(Login):
    """A v5 client logged in as one user (made on demand); ``publish`` returns "accepted" for success (0) and
    'no matching subscribers' (16), else the reason code of the broker's PUBACK."""

    def __init__(self, broker, name: str, role: str):
        settings = AUTH[broker.port].settings(name, role)
        super().__init__(broker.port, name, settings.password.get_secret_value())

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> int | str:
        code = super().publish(topic, payload, retain)
        assert code is not None, f"no PUBACK for {topic}"
        return "accepted" if code < 128 else code


@pytest.fixture
def as_user(broker):
    made: list[Publisher] = []

    def make(name: str, role: str) -> Publisher:
        made.append(Publisher(broker, name, role))
        return made[-1]
    yield make
    for publisher in made:
        publisher.close()


def test_anonymous_and_wrong_password_are_refused(broker):
    assert not can_connect(broker.port, None, None)
    assert not can_connect(broker.port, "node-1", "not-the-password")
    assert can_connect(broker.port, "node-1", AUTH[broker.port].credentials.password("node-1"))


def test_camera_publishes_only_its_own_frames(as_user):
    camera = as_user("cam-sec", "camera")
    assert camera.publish("edgeprune/camera/cam-sec/frame", b"\xff\xd8") == "accepted"
    assert camera.publish("edgeprune/camera/cam-other/frame", b"\xff\xd8") == NOT_AUTHORIZED
    assert camera.publish("edgeprune/node/node-1/prune/set", b'{"ratio": 0.9}') == NOT_AUTHORIZED
    assert camera.publish("edgeprune/pipeline/results/cam-sec") == NOT_AUTHORIZED
    assert camera.publish("edgeprune/pipeline/accepted/cam-sec") == NOT_AUTHORIZED
    assert camera.publish("edgeprune/pipeline/thumbnail/cam-sec", b"\xff\xd8\xff") == NOT_AUTHORIZED
    assert camera.publish("edgeprune/pipeline/stage/2/in") == NOT_AUTHORIZED
    assert camera.publish("edgeprune/component/gateway/cmd", b'{"cmd": "prune"}') == NOT_AUTHORIZED
    assert camera.publish("edgeprune/node/node-1/cmd", b'{"cmd": "slowdown"}') == NOT_AUTHORIZED


def test_node_speaks_only_for_itself(as_user):
    node = as_user("node-1", "node")
    assert node.publish("edgeprune/node/node-1/stats") == "accepted"
    assert node.publish("edgeprune/pipeline/stage/2/in", b"x") == "accepted"
    assert node.publish("edgeprune/pipeline/p1/stage/2/in", b"x") == "accepted"  # a parallel pipeline's stage
    assert node.publish("edgeprune/pipeline/results/node-1") == "accepted"
    assert node.publish("edgeprune/pipeline/accepted/node-1") == "accepted"
    assert node.publish("edgeprune/pipeline/thumbnail/node-1", b"\xff\xd8\xff") == "accepted"
    assert node.publish("edgeprune/pipeline/thumbnail/node-2", b"\xff\xd8\xff") == NOT_AUTHORIZED
    assert node.publish("edgeprune/pipeline/results/node-2") == NOT_AUTHORIZED  # results in another's name
    assert node.publish("edgeprune/pipeline/accepted/node-2") == NOT_AUTHORIZED
    assert node.publish("edgeprune/error/node-2") == NOT_AUTHORIZED
    assert node.publish("edgeprune/node/node-2/prune/set") == NOT_AUTHORIZED
    assert node.publish("edgeprune/node/node-2/status", b"offline") == NOT_AUTHORIZED
    assert node.publish("edgeprune/node/node-1/prune/set") == NOT_AUTHORIZED  # only the gateway sets it
    assert node.publish("edgeprune/node/node-2/cmd") == NOT_AUTHORIZED
    assert node.publish("edgeprune/placement") == NOT_AUTHORIZED
    assert node.publish("edgeprune/component/gateway/cmd") == NOT_AUTHORIZED
    assert node.publish("edgeprune/camera/cam-1/frame") == NOT_AUTHORIZED


def test_web_sends_only_gateway_commands(as_user):
    web = as_user("web", "web")
    assert web.publish("edgeprune/component/gateway/cmd", b'{"cmd": "retire", "node_id": "node-9"}') == "accepted"
    assert web.publish("edgeprune/node/node-1/cmd") == NOT_AUTHORIZED
    assert web.publish("edgeprune/node/node-1/prune/set") == NOT_AUTHORIZED


def test_gateway_owns_control_topics(as_user):
    gateway = as_user("gateway", "gateway")
    assert gateway.publish("edgeprune/node/node-3/cmd", b'{"cmd": "calibrate"}') == "accepted"
    assert gateway.publish("edgeprune/pipeline/results/gateway") == NOT_AUTHORIZED
    assert gateway.publish("edgeprune/pipeline/accepted/node-1") == NOT_AUTHORIZED
    assert gateway.publish("edgeprune/component/web/cmd") == NOT_AUTHORIZED


def test_acl_names_each_device_once_and_scopes_patterns_by_user():
    acl = render_acl({"node-1": "node", "cam-1": "camera"}, "site", "gw")
    assert "pattern write site/error/%u" in acl
    assert "user cam-1\ntopic write site/camera/cam-1/frame\n" in acl
    assert "topic read site/node/node-1/prune/set" in acl and "node-2" not in acl


def test_init_rewrites_an_older_acl_with_this_versions_rights(tmp_path):
    """An upgrade that gives a role a new topic (a node's thumbnails) reaches a site made before it: install.sh
    re-runs `credentials init`, which rewrites the ACL even when every user exists already."""
    import sys

    def init() -> None:
        subprocess.run([sys.executable, "-m", "edgeprune", "credentials", "--dir", str(tmp_path), "init", "--nodes",
                        "node-1"], check=True, capture_output=True, timeout=60)
    init()
    acl = tmp_path / "acl"
    assert "topic write edgeprune/pipeline/thumbnail/node-1\n" in acl.read_text()
    acl.write_text(acl.read_text().replace("topic write edgeprune/pipeline/thumbnail/node-1\n", ""))
    init()
    assert "topic write edgeprune/pipeline/thumbnail/node-1\n" in acl.read_text()


def make_test_certificates(folder) -> None:
    """The same self-signed CA + server certificate install.sh --tls makes."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "server.crt", "-extfile", "san.ext")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_listener_takes_a_client_that_trusts_the_site_ca(tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    make_test_certificates(tls)
    settings = BrokerSettings(port=free_port(), tls_port=free_port(), tls_dir=tls, data_dir=tmp_path / "broker")
    credentials = Credentials(settings.credentials_folder)
    password = credentials.add("node-1", "node")
    proc = start_broker(settings)
    try:
        bus = Bus(MqttSettings(port=settings.tls_port, username="node-1", password=password, tls_ca=tls / "ca.crt"),
                  "node-1", "edgeprune/node/node-1/status")
        bus.start(wait_s=10)
        assert bus.connected
        bus.stop()
    finally:
        stop_process(proc)


def test_a_node_cannot_speak_for_another_nodes_availability_even_through_its_last_will(broker):
    """The gateway re-places on a node's status, and MQTT does not tell it who published one: the broker's ACL is
    what makes a status count only from the node it names. Checked for the last will too, which the broker itself
    publishes when a connection drops: a will node-1 sets on node-2's status never arrives, its own does (after)."""
    auth = AUTH[broker.port]
    seen: list[tuple[str, bytes]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.username_pw_set("admin", auth.credentials.password("admin"))
    watcher.on_message = lambda c, u, msg: seen.append((msg.topic, msg.payload))
    watcher.connect("127.0.0.1", broker.port)
    watcher.loop_start()
    watcher.subscribe("edgeprune/node/+/status", qos=1)
    try:
        for victim in ("node-2", "node-1"):  # its own will last: it proves a dropped connection sends the will
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"will-{victim}", protocol=mqtt.MQTTv5)
            client.username_pw_set("node-1", auth.settings("node-1", "node").password.get_secret_value())
            client.will_set(f"edgeprune/node/{victim}/status", f"forged-{victim}", qos=1)
            connected = threading.Event()
            client.on_connect = lambda c, u, f, rc, p, done=connected: rc.is_failure or done.set()
            client.connect("127.0.0.1", broker.port)
            client.loop_start()
            if connected.wait(10):
                client.socket().shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the broker sends the will
            client.loop_stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ("edgeprune/node/node-1/status", b"forged-node-1") not in seen:
            time.sleep(0.1)
        assert ("edgeprune/node/node-1/status", b"forged-node-1") in seen  # its own will is delivered
        assert not [p for t, p in seen if t == "edgeprune/node/node-2/status"]
    finally:
        watcher.loop_stop()
        watcher.disconnect()
