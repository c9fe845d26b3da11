"""MQTT transport shared by every component: availability, resubscription, guarded handlers.

Components hand their logic plain ``(topic, payload, properties)`` callbacks; this module owns
paho-mqtt (2.x, MQTT v5), the last will, reconnects and what happens when a handler rejects
input: the error is logged, counted and published on the component's error topic, and the
component carries on with the next message.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.schemas import BadMessage, ErrorRecord, to_json
from shared.settings import MqttSettings
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, dict[str, str]], None]


def user_properties(msg: mqtt.MQTTMessage) -> dict[str, str]:
    props = getattr(msg, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


def publish_properties(user: dict[str, str]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = list(user.items())
    return props


class Bus:
    """One MQTT connection for one component, with an availability topic driven by the last will."""

    def __init__(self, settings: MqttSettings, component_id: str, status_topic: str,
                 session_expiry_s: int | None = None):
        """``session_expiry_s``: keep a persistent session under the fixed client id ``component_id``, so the
        broker queues QoS 1 messages for this component while it is away (the central collector needs it)."""
        self.settings = settings
        self.session_expiry_s = session_expiry_s
        self.topics = Topics(settings.topic_root)
        self.component_id = component_id
        self.status_topic = status_topic
        self.errors: Counter[str] = Counter()
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.on_connected: Callable[[], None] | None = None
        client_id = component_id if session_expiry_s is not None else f"{component_id}-{id(self):x}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.will_set(status_topic, AVAILABILITY_OFFLINE, qos=1, retain=True)
        if settings.username:
            client.username_pw_set(settings.username,
                                   settings.password.get_secret_value() if settings.password else None)
        if settings.tls_ca:
            client.tls_set(ca_certs=str(settings.tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=settings.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self.client = client

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, wait_s: float | None = 10.0) -> None:
        """Connect in the background (retrying forever); optionally wait for the first connect."""
        if self.session_expiry_s is None:
            self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        else:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
            self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s,
                                      clean_start=False, properties=properties)
        self.client.loop_start()
        if wait_s is not None and not self._connected.wait(wait_s):
            log.warning("%s: broker %s:%d not reachable yet; still retrying",
                        self.component_id, self.settings.host, self.settings.port)

    def stop(self) -> None:
        """Clean exit: announce ``stopped`` (the will is not sent on a clean disconnect)."""
        if self._connected.is_set():
            info = self.client.publish(self.status_topic, AVAILABILITY_STOPPED, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("%s: broker refused connection: %s", self.component_id, reason_code)
            return
        sock = client.socket()
        if sock is not None:  # small activations must not wait for Nagle's algorithm (~40 ms on Linux)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.publish(self.status_topic, AVAILABILITY_ONLINE, qos=1, retain=True)
        with self._lock:
            subs = list(self._handlers.items())
        for topic_filter, (_, qos) in subs:
            client.subscribe(topic_filter, qos=qos)
        self._connected.set()
        log.info("%s: connected to %s:%d", self.component_id, self.settings.host, self.settings.port)
        if self.on_connected:
            self.on_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code != 0:
            log.warning("%s: lost broker connection (%s); reconnecting", self.component_id, reason_code)

    # --- messaging -----------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route ``topic_filter`` to ``handler``; the subscription comes back after reconnects."""
        def dispatch(client, userdata, msg: mqtt.MQTTMessage) -> None:
            self._guarded(handler, msg)
        with self._lock:
            self._handlers[topic_filter] = (handler, qos)
        self.client.message_callback_add(topic_filter, dispatch)
        if self._connected.is_set():
            self.client.subscribe(topic_filter, qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
        self.client.message_callback_remove(topic_filter)
        self.client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                user: dict[str, str] | None = None) -> mqtt.MQTTMessageInfo:
        props = publish_properties(user) if user else None
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def _guarded(self, handler: Handler, msg: mqtt.MQTTMessage) -> None:
        try:
            handler(msg.topic, msg.payload, user_properties(msg))
        except BadMessage as exc:
            self.report_error(msg.topic, exc.kind, str(exc))
        except Exception as exc:  # a bug must not kill the network loop: log it loudly and go on
            log.exception("%s: handler for %s failed", self.component_id, msg.topic)
            self.report_error(msg.topic, "internal", f"{type(exc).__name__}: {exc}")

    def report_error(self, topic: str, kind: str, message: str, request_id: str | None = None) -> None:
        """Log, count and publish one rejected input (never raises)."""
        self.errors[kind] += 1
        log.error("%s: rejected message on %s [%s]: %s", self.component_id, topic, kind, message)
        record = ErrorRecord(component=self.component_id, ts=time.time(), topic=topic[:512], kind=kind[:64],
                             message=message[:2000], request_id=request_id[:128] if request_id else None)
        try:
            self.publish(self.topics.errors(self.component_id), to_json(record), qos=1)
        except (ValueError, RuntimeError) as exc:  # publishing the error must never raise further
            log.error("%s: could not publish error record: %s", self.component_id, exc)

