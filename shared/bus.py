"""MQTT transport shared by every component: availability, resubscription, guarded handlers.

Components hand their logic plain ``(topic, payload, properties)`` callbacks; this module owns
paho-mqtt (2.x, MQTT v5), the last will, reconnects and what happens when a handler rejects
input: the error is logged, counted and published on the component's error topic, and the
component carries on with the next message.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import ssl
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from shared import mqtt_properties
from shared.schemas import BadMessage, ErrorRecord, to_json
from shared.settings import MqttSettings
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics

log = logging.getLogger(__name__)
mqtt_properties.install()

Handler = Callable[[str, bytes, dict[str, str]], None]
Ack = Callable[[], None]
# A handler that acknowledges the message itself (``ack``), once its work is done: until then the broker
# keeps the message in the receiver's session, so a receiver that dies does not take it along.
DeferredHandler = Callable[[str, bytes, dict[str, str], Ack], None]


def user_properties(msg: mqtt.MQTTMessage) -> dict[str, str]:
    props = getattr(msg, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


def _routing_filter(topic_filter: str) -> str:
    """What a message's topic is matched against: a shared subscription's messages carry the plain topic."""
    return topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter


def _client(settings: MqttSettings, client_id: str, manual_ack: bool = False) -> mqtt.Client:
    """A paho MQTT v5 client with the component's login and, if configured, TLS."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=manual_ack)
    if settings.username:
        client.username_pw_set(settings.username, settings.password.get_secret_value() if settings.password else None)
    if settings.tls_ca:
        client.tls_set(ca_certs=str(settings.tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def publish_size(topic: str, payload: bytes, user: dict[str, str] | None = None) -> int:
    """Bytes of the MQTT v5 PUBLISH (QoS 1) that carries this message: an upper bound by at most a few bytes."""
    props = sum(5 + len(k.encode()) + len(v.encode()) for k, v in (user or {}).items())
    return 5 + 2 + len(topic.encode()) + 2 + 4 + props + len(payload)


def publish_properties(user: dict[str, str]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = list(user.items())
    return props


class Bus:
    """One MQTT connection for one component, with an availability topic driven by the last will."""

    def __init__(self, settings: MqttSettings, component_id: str, status_topic: str | None, manual_ack: bool = False,
                 receive_maximum: int | None = None, client_id: str | None = None, fresh_session: bool = False):
        """The client id is the component id and every connect resumes the broker's session for it (MQTT v5
        clean start off, session expiry ``session_expiry_s``): QoS 1 messages queued while the component was
        away (a restart of it or of the broker, a network gap) are delivered when it is back. A clean start
        on a process's first connect would be neater, but Mosquitto 2.0 does not keep such a session across
        its own restart (measured: docs/reliability.md).

        ``manual_ack``: QoS 1 messages are acknowledged after their handler returns, or, for subscriptions
        made with ``deferred_ack``, when the handler's ``ack`` is called (docs/scaling.md, replicated stages).
        ``receive_maximum``: at most this many QoS 1 messages unacknowledged at a time (MQTT v5 flow control, in
        the CONNECT): the broker holds the rest in the session until acknowledgements free the window. Without it
        Mosquitto sends up to its ``max_inflight_messages`` (64).
        ``client_id`` (default: the component id) and ``status_topic`` None: a second connection of a component, with
        a session of its own and no availability topic (the node's control connection).
        ``fresh_session``: this process's first connect starts a new session (clean start, paho's
        ``MQTT_CLEAN_START_FIRST_ONLY``), discarding what was queued for a previous run; its reconnects resume it. For
        a connection that carries one-shot commands and retained state only: a command must not outlive the process
        it was meant for, and retained state comes again on subscribe (docs/reliability.md)."""
        self.settings = settings
        self.topics = Topics(settings.topic_root)
        self.component_id = component_id
        self.status_topic = status_topic
        self.errors: Counter[str] = Counter()
        self.manual_ack = manual_ack
        self.receive_maximum = receive_maximum
        self.clean_start: bool | int = mqtt.MQTT_CLEAN_START_FIRST_ONLY if fresh_session else False
        self._handlers: dict[str, tuple[Handler, SubscribeOptions]] = {}
        self._routes: dict[str, Callable] = {}  # filter -> its dispatch (paho routes by _routing_filter)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._resubscribing: set[int] = set()  # SUBSCRIBE packet ids of this connect's subscriptions not yet acked
        self._subscribed_all = threading.Event()  # every subscription of this connect acknowledged
        self._connection = 0  # counts connects and disconnects: an acknowledgement is only valid on its own
        self._defer_ack: Callable[[Callable[[], None]], None] | None = None
        self._subscribed: dict[int, Callable[[], None]] = {}  # SUBSCRIBE packet id -> call on its SUBACK
        self._leave: list[str] = []  # to unsubscribe at the next connect, unless handled (leave_on_connect)
        self._network_thread: int | None = None  # paho's, which alone may write the socket (flush)
        self._closing = False  # stop() has begun: no more flushes (a DISCONNECT must go through paho's loop)
        self.on_connected: Callable[[], None] | None = None
        self.refusal: str | None = None  # the broker's last reason for refusing us (e.g. "Not authorized")
        # the largest packet the broker takes (its CONNACK says, MQTT v5); a larger publish gets us disconnected
        self.max_packet_size: int | None = None
        client = _client(settings, client_id or component_id, manual_ack=manual_ack)
        if status_topic is not None:
            client.will_set(status_topic, AVAILABILITY_OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=settings.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_unrouted
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self.client = client

    def acknowledge_after(self, defer: Callable[[Callable[[], None]], None]) -> None:
        """Acknowledge each QoS 1 message when ``defer`` calls the function it is given, not when its handler
        returns (call before :meth:`start`).

        The gateway passes its store's ``after_commit``: a message is acknowledged once the rows it carries are
        in SQLite, so if the process dies first the broker still holds it in the session and sends it again on
        the next connect. The acknowledgement may come from another thread: like ``publish``, paho's ``ack`` only
        queues a packet for its network thread.
        """
        self._defer_ack = defer
        self.manual_ack = True
        # unacknowledged messages count against the window: without a large one Mosquitto sends at most
        # max_inflight_messages (64) per acknowledgement delay
        self.receive_maximum = self.receive_maximum or 65535
        self.client.manual_ack_set(True)

    def leave_on_connect(self, filters: list[str]) -> None:
        """At the next connect, unsubscribe those of ``filters`` this process has no handler for: a previous run's
        subscriptions, which the resumed session keeps. Through one left in a stage's shared group the broker went on
        dealing this client a share of an input it no longer reads, which it acknowledged unserved (lost frames:
        docs/reliability.md). :meth:`wait_subscribed` waits for these unsubscriptions too."""
        with self._lock:
            self._leave = list(filters)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, wait_s: float | None = 10.0) -> None:
        """Connect in the background (retrying forever); optionally wait for the first connect."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        if self.receive_maximum is not None:
            props.ReceiveMaximum = self.receive_maximum
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s,
                                  clean_start=self.clean_start, properties=props)
        self.client.loop_start()
        if wait_s is not None and not self._connected.wait(wait_s):
            log.warning("%s: broker %s:%d not reachable yet; still retrying",
                        self.component_id, self.settings.host, self.settings.port)

    def stop(self) -> None:
        """Clean exit: announce ``stopped`` (the will is not sent on a clean disconnect)."""
        if self._connected.is_set() and self.status_topic is not None:
            info = self.client.publish(self.status_topic, AVAILABILITY_STOPPED, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        with self._lock:
            self._closing = True
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Whether, within ``timeout_s``, the broker acknowledged every subscription made before the connect:
        only then does a message published by another client reach this component (two connections' packets
        are not ordered), so a readiness check or a test waits here before it publishes."""
        return self._subscribed_all.wait(timeout_s)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("%s: broker refused connection: %s", self.component_id, reason_code)
            self.refusal = str(reason_code)
            return
        self.refusal = None
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        with self._lock:
            self._connection += 1
            self._network_thread = threading.get_ident()
        sock = client.socket()
        if sock is not None:  # small activations must not wait for Nagle's algorithm (~40 ms on Linux)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.status_topic is not None:
            client.publish(self.status_topic, AVAILABILITY_ONLINE, qos=1, retain=True)
        with self._lock:  # registered before paho's thread can handle a SUBACK
            for topic_filter, (_, options) in self._handlers.items():
                _, mid = client.subscribe(topic_filter, options=options)
                if mid is not None:
                    self._resubscribing.add(mid)
            for topic_filter in self._leave:
                if topic_filter not in self._handlers:
                    _, mid = client.unsubscribe(topic_filter)
                    if mid is not None:
                        self._resubscribing.add(mid)
            self._leave = []
            if not self._resubscribing:
                self._subscribed_all.set()
        self._connected.set()
        log.info("%s: connected to %s:%d", self.component_id, self.settings.host, self.settings.port)
        if self.on_connected:
            self.on_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        with self._lock:
            self._connection += 1
            self._subscribed_all.clear()
            self._resubscribing.clear()
        if reason_code != 0:
            log.warning("%s: lost broker connection (%s); reconnecting", self.component_id, reason_code)

    # --- messaging -----------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler | DeferredHandler, qos: int = 1, data: bool = False,
                  subscribed: Callable[[], None] | None = None, deferred_ack: bool = False,
                  refused_retained: Callable[[str, str], None] | None = None) -> None:
        """Route ``topic_filter`` to ``handler``; the subscription comes back after reconnects.

        ``data``: frames, activations or results, never meant to be retained. A retained one (replayed
        on every subscribe) is reported as ``retained_data`` instead of served; the gateway clears it.
        ``subscribed``: called (in paho's thread) once the broker has acknowledged the subscription, i.e.
        messages published from then on reach this handler; never called if not connected now.
        ``deferred_ack`` (a Bus made with ``manual_ack``): ``handler`` is a :data:`DeferredHandler` and
        acknowledges each message itself; if it raises, the message is acknowledged (it was reported).
        ``refused_retained``: called with the topic and the refusal's kind when ``handler`` refused a retained
        message (after it was reported); retained messages then keep their flag even when published live.
        """
        def dispatch(client, userdata, msg: mqtt.MQTTMessage) -> None:
            ack = self._acker(msg)
            if data and msg.retain:
                if msg.payload:  # an empty one is the gateway clearing such a message: nothing to report
                    self.report_error(msg.topic, "retained_data", f"retained message of {len(msg.payload)} B on a "
                                      "data topic: not served (the gateway clears it)")
                ack()
                return
            if not deferred_ack:
                refused = self._guarded(handler, msg)
                if refused is not None and msg.retain and refused_retained is not None:
                    self._guarded(lambda t, p, u: refused_retained(t, refused), msg)
                ack()
            elif self._guarded(lambda t, p, u: handler(t, p, u, ack), msg) is not None:
                ack()
        # retain-as-published: a live message sent with the retain flag keeps it, so it is caught at once
        options = SubscribeOptions(qos=qos, retainAsPublished=data or refused_retained is not None)
        with self._lock:
            self._handlers[topic_filter] = (handler, options)
            self._routes[topic_filter] = dispatch
        self.client.message_callback_add(_routing_filter(topic_filter), dispatch)
        if self._connected.is_set():
            with self._lock:  # registered before paho's thread can handle the SUBACK
                _, mid = self.client.subscribe(topic_filter, options=options)
                if subscribed is not None and mid is not None:
                    self._subscribed[mid] = subscribed

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            subscribed = self._subscribed.pop(mid, None)
            self._settled(mid)
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.error("%s: broker refused a subscription: %s", self.component_id, ", ".join(refused))
        elif subscribed is not None:
            subscribed()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            self._settled(mid)

    def _settled(self, mid: int) -> None:
        """A (un)subscription of this connect was acknowledged (caller holds the lock)."""
        if mid in self._resubscribing:
            self._resubscribing.discard(mid)
            if not self._resubscribing:
                self._subscribed_all.set()

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop ``topic_filter``. A plain and a shared subscription of one topic have one route in paho (a shared
        one's messages carry the plain topic): the one left keeps it, or its messages would go unrouted."""
        routing = _routing_filter(topic_filter)
        with self._lock:
            self._handlers.pop(topic_filter, None)
            self._routes.pop(topic_filter, None)
            left = [dispatch for other, dispatch in self._routes.items() if _routing_filter(other) == routing]
        if left:
            self.client.message_callback_add(routing, left[-1])
        else:
            self.client.message_callback_remove(routing)
        self.client.unsubscribe(topic_filter)

    def fits(self, topic: str, payload: bytes, user: dict[str, str] | None = None) -> bool:
        """Whether the broker takes this publish (True until its CONNACK said otherwise). Check before sending:
        a packet over its limit closes the connection (reason code 149), and paho sends it again on reconnect."""
        return self.max_packet_size is None or publish_size(topic, payload, user) <= self.max_packet_size

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                user: dict[str, str] | None = None) -> mqtt.MQTTMessageInfo:
        props = publish_properties(user) if user else None
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def on_publish_refused(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(mid)`` (on paho's thread) for each QoS 1 publish the broker answers with a failure reason
        code (PUBACK >= 128: not authorised, quota exceeded). Only for a connection that never calls :meth:`flush` (a
        camera): paho calls ``on_publish`` under its callback lock."""
        def on_publish(client, userdata, mid, reason_code, properties) -> None:
            if reason_code.is_failure:
                callback(mid)

        self.client.on_publish = on_publish

    def flush(self) -> None:
        """Write what is queued for the broker now, from a handler (paho's network thread; a no-op elsewhere).

        A publish from a handler is otherwise written only once the handler returns: a node that serves a request
        in its handler sends the announcement and the input's acknowledgement before the compute, and the output
        right after it. This is the write half of paho's ``loop_write`` without its error handling: that calls
        ``on_disconnect`` under paho's callback lock, which the handler already holds (a deadlock on a broken
        connection); a failed write stays queued and paho's loop meets the error again after the handler, and
        handles it there. Nothing else writes the socket meanwhile: this is the network thread. Not once
        :meth:`stop` has begun (paho handles a DISCONNECT's write under that lock too), and this Bus sets no
        ``on_publish`` (which paho would call under it) unless :meth:`on_publish_refused` asked, as a camera does."""
        with self._lock:
            if self._closing or threading.get_ident() != self._network_thread or self.client.socket() is None:
                return
            write = getattr(self.client, "_packet_write", None)  # private in paho 2.x: without it, the write
            if write is not None:                                 # waits until the handler returns, as before
                write()  # loop_write minus its disconnect handling (see above)

    def unread_bytes(self) -> int:
        """Bytes the broker has sent that the network thread has not read yet (0 if not connected): from a
        handler, whether more input arrived while it worked."""
        sock = self.client.socket()
        if sock is None:
            return 0
        try:
            waiting = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return 0
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes paho's socket holds already
        return waiting + (pending() if pending else 0)

    def _on_unrouted(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        """A message for no handler of this process (e.g. a previous run's subscription kept in the session)."""
        log.debug("%s: no handler for %s; ignored", self.component_id, msg.topic)
        self._acker(msg)()

    def _acker(self, msg: mqtt.MQTTMessage) -> Ack:
        """Acknowledges ``msg`` once (a no-op for QoS 0 and for a Bus that acknowledges automatically); with
        :meth:`acknowledge_after`, the acknowledgement is handed over to be sent later."""
        if not self.manual_ack or msg.qos == 0:
            return lambda: None
        with self._lock:
            connection = self._connection
        once = threading.Lock()  # held once acknowledged (a Lock, not an Event: this runs for every message)

        def ack() -> None:
            if not once.acquire(blocking=False):
                return
            if self._defer_ack is not None:
                self._defer_ack(lambda: self._ack(connection, msg.mid, msg.qos))
            else:
                self._ack(connection, msg.mid, msg.qos)
        return ack

    def _ack(self, connection: int, mid: int, qos: int) -> None:
        """Acknowledge on the connection the message came on. After a reconnect the broker re-sends it (same
        session) and may give its packet id to another message once acknowledged: a late ack is dropped."""
        with self._lock:
            current = connection == self._connection
        if current:
            self.client.ack(mid, qos)

    def _guarded(self, handler: Handler, msg: mqtt.MQTTMessage) -> str | None:
        """Run ``handler``; the kind of the refusal when it rejected the message (reported, never raised), else
        None."""
        try:
            handler(msg.topic, msg.payload, user_properties(msg))
            return None
        except BadMessage as exc:
            self.report_error(msg.topic, exc.kind, str(exc))
            return exc.kind
        except Exception as exc:  # a bug must not kill the network loop: log it loudly and go on
            log.exception("%s: handler for %s failed", self.component_id, msg.topic)
            self.report_error(msg.topic, "internal", f"{type(exc).__name__}: {exc}")
            return "internal"

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


def drain_session(settings: MqttSettings, client_id: str, filters: list[str], wait_s: float = 10.0,
                  quiet_s: float = 1.0) -> list[tuple[str, bytes, dict[str, str]]]:
    """Take over a dead client's session and end it: what the broker held for it, then nothing more.

    Mosquitto 2 keeps a disconnected member of a shared subscription in the group while its session lives:
    the messages in flight to it stay there, unacknowledged, and it keeps getting its share of new ones; with
    no session (expiry 0) it drops them instead (eclipse-mosquitto/mosquitto#2662). Connecting with the dead
    client's id resumes its session, so the broker re-sends what it held; ``filters`` are unsubscribed at once
    and the session expires on disconnect, so it leaves the group. Returns (topic, payload, user properties)
    of every message received, for the caller to re-publish (docs/scaling.md). No will, no status: the dead
    client's own availability topic keeps saying ``offline``.
    """
    received: list[tuple[str, bytes, dict[str, str]]] = []
    last = [time.monotonic()]
    ready = threading.Event()
    client = _client(settings, client_id)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            for topic_filter in filters:
                c.unsubscribe(topic_filter)
            ready.set()

    def on_message(c, userdata, msg: mqtt.MQTTMessage) -> None:
        received.append((msg.topic, msg.payload, user_properties(msg)))
        last[0] = time.monotonic()

    client.on_connect = on_connect
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0  # the resumed session ends with this connection
    try:
        client.connect(settings.host, settings.port, keepalive=settings.keepalive_s, clean_start=False,
                       properties=props)
    except OSError as exc:
        raise ConnectionError(f"cannot reach the broker to drain {client_id}'s session: {exc}") from exc
    client.loop_start()
    try:
        if not ready.wait(wait_s):
            raise ConnectionError(f"the broker did not accept {client_id}'s session takeover within {wait_s:g} s")
        last[0] = time.monotonic()
        while time.monotonic() - last[0] < quiet_s:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return received


def read_retained(settings: MqttSettings, topic: str, wait_s: float = 10.0, grace_s: float = 1.0) -> bytes | None:
    """The message retained on ``topic`` (None: none, or the broker is not reachable), read on a connection of its own
    with a clean session and a client id the broker assigns, so it touches no component's session.

    A restarted node reads its placement this way before it resumes its session: the broker re-sends what the
    session held at once, before the retained placement on the node's own connection (one client's messages come
    in order, and acknowledged inputs are what frees the window for it), so only a node that knows its stage by
    then can serve them instead of acknowledging them away (docs/reliability.md). ``grace_s``: how long after the
    SUBACK a retained message may still come (Mosquitto sends it right behind).
    """
    received: list[bytes] = []
    subscribed = threading.Event()
    got = threading.Event()
    client = _client(settings, "")

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            c.subscribe(topic, qos=1)

    def on_message(c, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and not received:
            received.append(msg.payload)
            got.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = on_message
    try:
        client.connect(settings.host, settings.port, keepalive=settings.keepalive_s, clean_start=True)
    except OSError as exc:
        log.warning("cannot reach the broker to read %s: %s", topic, exc)
        return None
    client.loop_start()
    try:
        if subscribed.wait(wait_s):
            got.wait(grace_s)
        else:
            log.warning("no SUBACK for %s within %g s", topic, wait_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return received[0] if received and received[0] else None
