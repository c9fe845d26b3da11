"""Fixtures that start real parts: mosquitto on a free loopback port, components as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from paho.mqtt.enums import CallbackAPIVersion

from edgeprune.broker import free_port, start_broker, stop_process
from edgeprune.credentials import Credentials, default_users
from shared.model import MODEL_NAME
from shared.schemas import Placement, StageAssignment
from shared.settings import BrokerSettings, MqttSettings

# Hypothesis's timing checks (a deadline per example, a limit on time spent generating data) measure how loaded
# the machine is, not the code: on a shared 2-core machine they fail at random. Set once for every property test,
# on top of the active profile (Hypothesis's own "ci" profile, where it detects CI, drops them too).
hypothesis_settings.register_profile("loaded_machine", hypothesis_settings(), deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("loaded_machine")


@pytest.fixture(autouse=True)
def _variant_builders_end_with_their_test() -> Iterator[None]:
    """A stage built in a test prunes its variants in a background thread: let it finish inside that test,
    so no builder runs on through later tests (one crashed the interpreter during another test)."""
    yield
    from shared.pruning import wait_for_builders

    wait_for_builders(timeout_s=120)


class BrokerAuth:
    """The credentials of one test broker: users are made on demand and the broker reloaded (SIGHUP)."""

    def __init__(self, credentials: Credentials, proc: subprocess.Popen, port: int):
        self.credentials = credentials
        self.proc = proc
        self.port = port

    def env(self, name: str, role: str) -> dict[str, str]:
        """Connect as ``name`` with ``role``; the broker knows the user once this returns."""
        if self.credentials.ensure(name, role):
            self.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: can_connect(self.port, name, self.credentials.password(name)), 10,
                       f"broker did not load user {name}")
        return self.credentials.env(name)

    def settings(self, name: str, role: str) -> MqttSettings:
        env = self.env(name, role)
        return MqttSettings(port=self.port, username=name, password=env["EDGEPRUNE_MQTT_PASSWORD"])


AUTH: dict[int, BrokerAuth] = {}  # by broker port: component_env and Processes find the broker's users here


def can_connect(port: int, username: str | None, password: str | None) -> bool:
    """True when the broker accepts this login (MQTT v5 CONNACK success)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return False
    accepted = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: rc.is_failure or accepted.set()
    client.loop_start()
    ok = accepted.wait(3)
    client.loop_stop()
    client.disconnect()
    return ok


@contextmanager
def running_broker(data_dir: Path) -> Iterator[MqttSettings]:
    """A real mosquitto from our template with auth and ACL on, on a free loopback port, in ``data_dir``.

    Yields the operator's (admin) settings; components started by :class:`Processes` log in with
    their own role's credentials (``AUTH[port]``), made on demand.
    """
    port = free_port()
    credentials = Credentials(data_dir / "credentials")
    for name, role in default_users(["node-1", "node-2", "node-3"], []).items():
        credentials.add(name, role)
    with open(data_dir / "mosquitto.log", "w") as log:
        proc = start_broker(BrokerSettings(port=port, data_dir=data_dir), log_file=log)
    AUTH[port] = BrokerAuth(credentials, proc, port)
    try:
        yield MqttSettings(port=port, username="admin", password=credentials.password("admin"))
    finally:
        AUTH.pop(port, None)
        stop_process(proc)


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[MqttSettings]:
    """One broker for a test module (see :func:`running_broker`)."""
    with running_broker(tmp_path_factory.mktemp("broker")) as settings:
        yield settings


@pytest.fixture
def fresh_broker(tmp_path_factory) -> Iterator[MqttSettings]:
    """A broker of a test's own: nothing retained by an earlier test (see :func:`running_broker`)."""
    with running_broker(tmp_path_factory.mktemp("broker")) as settings:
        yield settings


def role_of(args: tuple[str, ...], env: dict[str, str]) -> tuple[str, str] | None:
    """(user, role) a component started with ``edgeprune *args`` logs in as; None for tools."""
    def flag(name: str, env_name: str, default: str) -> str:
        return args[args.index(name) + 1] if name in args else env.get(env_name, default)
    command = args[0] if args else ""
    if command == "node":
        return flag("--node-id", "EDGEPRUNE_NODE_NODE_ID", "node-1"), "node"
    if command == "camera":
        if "--trace-csv" in args or "--cameras" in args:  # one process standing for several cameras: one login
            return "admin", "admin"                     # is one device, so it publishes as the operator
        return flag("--camera-id", "EDGEPRUNE_CAMERA_CAMERA_ID", "cam-1"), "camera"
    if command == "gateway":
        return env.get("EDGEPRUNE_GATEWAY_GATEWAY_ID", "gateway"), "gateway"
    if command == "web":
        return "web", "web"
    return None


class Processes:
    """Components started as subprocesses (`python -m edgeprune ...`), stopped with SIGTERM."""

    def __init__(self, workdir: Path, env: dict[str, str], python: str = sys.executable):
        self.workdir = workdir
        self.env = env
        self.python = python  # another venv's interpreter, e.g. one installed from an offline bundle
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**self.env, **(extra_env or {})}
        auth = AUTH.get(int(env.get("EDGEPRUNE_MQTT_PORT", 0)))
        identity = role_of(args, env)
        if auth is not None and identity is not None:
            env.update(auth.env(*identity))
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen([self.python, "-m", "edgeprune", *args], cwd=self.workdir,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text()

    def stop_all(self) -> None:
        """SIGTERM every component first, then wait for each: stopped one by one, their shutdowns add up."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            stop_process(proc)


def start_two_stage_site(procs: Processes, db: Path):
    """Gateway and node-1/node-2 started; returns the database reader once both nodes hold a stage."""
    procs.start("gateway", "gateway")
    procs.start("node-1", "node", "--node-id", "node-1")
    procs.start("node-2", "node", "--node-id", "node-2")
    reader = open_reader(db)
    wait_until(lambda: sorted(n["stage"] for n in reader.nodes() if n["stage"]) == [1, 2], STARTUP_S,
               "nodes did not take two stages")
    return reader


def component_env(mqtt_settings: MqttSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
    # the reactive controller unless a test asks for another: it prunes only on seconds of end-to-end violation,
    # while the default adaptive one reacts to three slow frames, which a shared CI machine's load can produce in
    # tests that compare results with the unpruned model (tests that test pruning name their policy)
    env.update({"EDGEPRUNE_MQTT_PORT": str(mqtt_settings.port), "PYTHONUNBUFFERED": "1",
                "EDGEPRUNE_CONTROLLER_POLICY": "bottleneck"})
    if mqtt_settings.username:  # tools log in as the operator; Processes gives components their own user
        env.update({"EDGEPRUNE_MQTT_USERNAME": mqtt_settings.username,
                    "EDGEPRUNE_MQTT_PASSWORD": mqtt_settings.password.get_secret_value()})
    env.update(extra)
    return env


class Recorder:
    """A plain paho client that records every message on the topics it is given."""

    def __init__(self, settings: MqttSettings, *filters: str):
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        login(self.client, settings)
        self.client.connect("127.0.0.1", settings.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert ready.wait(5), "subscription not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def json_on(self, topic: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def login(client: mqtt.Client, settings: MqttSettings | int) -> mqtt.Client:
    """Give a plain paho client the credentials in ``settings``, or the operator's of the broker on that port."""
    if isinstance(settings, int):
        auth = AUTH.get(settings)
        if auth is None:
            return client
        settings = auth.settings("admin", "admin")
    if settings.username:
        client.username_pw_set(settings.username, settings.password.get_secret_value())
    return client


def mqtt_client(settings: MqttSettings) -> mqtt.Client:
    """A connected, running MQTT v5 client logged in with ``settings``."""
    client = login(mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5), settings)
    client.connect("127.0.0.1", settings.port)
    client.loop_start()
    return client


def mosquitto_pub_login(settings: MqttSettings) -> list[str]:
    """mosquitto_pub/sub arguments for the broker and login in ``settings``."""
    args = ["-h", "127.0.0.1", "-p", str(settings.port)]
    if settings.username:
        args += ["-u", settings.username, "-P", settings.password.get_secret_value()]
    return args


def wait_until(predicate, timeout: float, message: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    assert predicate(), message


# How long a component process may take to start (import torch, profile, connect): on a shared 2-core machine
# under load the gateway took over 30 s and a camera 18 s, and 3 of 6 e2e runs here failed on a 30 s limit.
STARTUP_S = 120.0


def open_reader(db: Path, timeout: float = STARTUP_S):
    """A read-only view of the gateway's database, once the gateway has created it."""
    from gateway.store import Reader

    def attempt():
        try:
            return Reader(db)
        except FileNotFoundError:
            return None
    wait_until(lambda: attempt() is not None, timeout, f"gateway did not create {db}")
    return attempt()


def even_split(n_blocks: int, nodes: list[str]) -> Placement:
    """Contiguous slices of (nearly) equal block counts: a simple valid placement for unit tests."""
    n = min(len(nodes), n_blocks)
    bounds = [round(i * n_blocks / n) for i in range(n + 1)]
    stages = [StageAssignment(stage=i + 1, node_id=nodes[i], first_block=bounds[i], last_block=bounds[i + 1] - 1)
              for i in range(n)]
    return Placement(version=1, model=MODEL_NAME, n_blocks=n_blocks, stages=stages, issued_at=0.0)
