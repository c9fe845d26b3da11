"""Forged messages from every role of a site, for the soak: what each login must not be able to say.

Two kinds of attempt. *Refused*: a topic the login may not write; the broker must answer the PUBLISH with
reason code 135 (not authorised), so nothing reaches anyone. *Rejected*: a topic the login may write carrying a
payload that claims another device (a node announcing a frame or reporting an error in another node's name, a
camera's error record in a node's name); the broker delivers it and the gateway must refuse it with a recorded
reason (``identity_mismatch`` in ``errors``). Either way nothing may be stored under a forged identity: every
forged payload names a request id starting with :data:`FORGED_PREFIX`, which must never reach ``requests`` or
``accepted``. The admin login may write anything by design (docs/security.md) and is not tried.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared.topics import Topics

NOT_AUTHORISED = 135
FORGED_PREFIX = "intruder-"


@dataclass(frozen=True)
class Attempt:
    login: str
    role: str  # the login's role: camera, node, web or gateway
    topic: str
    payload: bytes
    claim: str  # who the message would speak for: the device its topic or payload names, or "gateway" for control
    expect: str  # "refused" by the broker's ACL, or "rejected" by the gateway with a recorded reason

    @property
    def request_id(self) -> str | None:
        """The forged request id the payload carries (what a stored row would be found by), if any."""
        try:
            value = json.loads(self.payload).get("request_id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None


def _accepted(request_id: str, node_id: str) -> bytes:
    now = time.time()
    return json.dumps({"request_id": request_id, "camera_id": "cam-x", "node_id": node_id, "capture_ts": now,
                       "received_ts": now}).encode()


def _error(request_id: str, component: str) -> bytes:
    return json.dumps({"component": component, "ts": time.time(), "topic": "x", "kind": "bad_image",
                       "message": "forged", "request_id": request_id}).encode()


def attempts(node_ids: list[str], camera_id: str, gateway_id: str = "gateway") -> list[Attempt]:
    """Every forgery the soak tries: each role (camera, node, page, gateway) on topics it may not write, and each
    role able to write a data or error topic claiming another device there."""
    topics = Topics()
    node, other = node_ids[0], node_ids[1]
    rid = iter(f"{FORGED_PREFIX}{k}" for k in range(1000))
    refused = [  # (login, topic, payload, the identity it claims)
        (camera_id, topics.camera_frame("cam-someone-else"), b"\xff\xd8", "cam-someone-else"),
        (camera_id, topics.results(camera_id), b"{}", "a node (a result)"),
        (camera_id, topics.accepted(camera_id), _accepted(next(rid), camera_id), "a node (an announcement)"),
        (camera_id, topics.stage_input(2), b"x", "a stage-1 node (an activation)"),
        (camera_id, topics.node_prune_desired(node), b'{"ratio": 0.9}', gateway_id),
        (camera_id, topics.component_command(gateway_id), b'{"cmd": "restore"}', "an operator (web, admin)"),
        (node, topics.results(other), b"{}", other),
        (node, topics.accepted(other), _accepted(next(rid), other), other),
        (node, topics.errors(other), _error(next(rid), other), other),
        (node, topics.node_status(other), b"offline", other),
        (node, topics.node_prune_desired(other), b'{"ratio": 0.9}', gateway_id),
        (node, topics.node_prune_desired(node), b'{"ratio": 0.9}', gateway_id),
        (node, topics.node_command(other), b'{"cmd": "slowdown", "factor": 50}', gateway_id),
        (node, topics.placement, b"{}", gateway_id),
        (node, topics.component_command(gateway_id), b'{"cmd": "restore"}', "an operator (web, admin)"),
        (node, topics.camera_frame(camera_id), b"\xff\xd8", camera_id),
        ("web", topics.node_command(node), b'{"cmd": "slowdown", "factor": 50}', gateway_id),
        ("web", topics.node_prune_desired(node), b'{"ratio": 0.9}', gateway_id),
        ("web", topics.placement, b"{}", gateway_id),
        ("web", topics.results("web"), b"{}", "a node (a result)"),
        (gateway_id, topics.results(gateway_id), b"{}", "a node (a result)"),
        (gateway_id, topics.accepted(node), _accepted(next(rid), node), node),
        (gateway_id, topics.component_command("web"), b"{}", "an operator (web, admin)"),
    ]
    rejected = [
        (node, topics.accepted(node), _accepted(next(rid), other), other),  # node speaking as the other node
        (node, topics.errors(node), _error(next(rid), other), other),
        (camera_id, topics.errors(camera_id), _error(next(rid), node), node),  # a camera's error in a node's name
    ]
    roles = {camera_id: "camera", "web": "web", gateway_id: "gateway", **{n: "node" for n in node_ids}}
    return ([Attempt(login, roles[login], topic, payload, claim, "refused") for login, topic, payload, claim in refused]
            + [Attempt(login, roles[login], topic, payload, claim, "rejected")
               for login, topic, payload, claim in rejected])


class Login:
    """One MQTT v5 client logged in as ``user``; :meth:`publish` returns the broker's PUBACK reason code."""

    def __init__(self, port: int, user: str, password: str, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self._acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"intruder-{user}", protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.on_publish = self._on_publish
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: rc.is_failure or connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not connected.wait(timeout_s):
            self.close()
            raise RuntimeError(f"{user} could not log in")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acked:
            self._acks[mid] = reason_code.value
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int | None:
        """The PUBACK's reason code, None if none came in time."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            if not self._acked.wait_for(lambda: info.mid in self._acks, self.timeout_s):
                return None
            return self._acks.pop(info.mid)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def try_all(port: int, password_of, node_ids: list[str], camera_id: str) -> list[dict]:
    """Send every attempt once, each login on its own connection; one row per attempt with the broker's answer."""
    tried = attempts(node_ids, camera_id)
    logins: dict[str, Login] = {}
    rows = []
    try:
        for attempt in tried:
            if attempt.login not in logins:
                logins[attempt.login] = Login(port, attempt.login, password_of(attempt.login))
            code = logins[attempt.login].publish(attempt.topic, attempt.payload)
            rows.append({"role": attempt.role, "login": attempt.login, "topic": attempt.topic, "claim": attempt.claim,
                         "request_id": attempt.request_id, "expect": attempt.expect, "puback": code,
                         "refused": code == NOT_AUTHORISED})
    finally:
        for login in logins.values():
            login.close()
    return rows


def verdict(rows: list[dict], mismatches_recorded: int, stored_forged: int) -> dict:
    """The forged phase's summary: every refused attempt refused, every rejected one recorded, nothing stored."""
    refused = [r for r in rows if r["expect"] == "refused"]
    rejected = [r for r in rows if r["expect"] == "rejected"]
    return {"forged_sent": len(rows), "forged_refused_by_broker": sum(r["refused"] for r in refused),
            "forged_should_be_refused": len(refused), "forged_delivered_to_gateway": sum(
                not r["refused"] for r in rejected), "forged_rejected_recorded": mismatches_recorded,
            "forged_should_be_rejected": len(rejected), "forged_stored": stored_forged,
            "forged_not_refused": [f"{r['login']} -> {r['topic']}" for r in refused if not r["refused"]]}
