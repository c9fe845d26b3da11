"""The Bus's acknowledgements without a broker: messages go through the routes it registers with paho.

docs/reliability.md: the gateway acknowledges a QoS 1 message only once the rows it carries are committed
(``Bus.acknowledge_after``), and a node's replica only once it has served the input. These run the Bus's own
dispatch with paho's ``ack`` recorded, so a Bus that acknowledges too early fails here, in milliseconds.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from shared.bus import Bus
from shared.schemas import BadMessage
from shared.settings import MqttSettings


class Wired:
    """A Bus whose paho routes and acknowledgements are recorded instead of reaching a broker."""

    def __init__(self, monkeypatch, manual_ack: bool = False):
        self.bus = Bus(MqttSettings(), "gw", "edgeprune/component/gw/status", manual_ack=manual_ack)
        self.routes: dict[str, object] = {}
        self.acked: list[int] = []
        self.published: list[str] = []
        monkeypatch.setattr(self.bus.client, "message_callback_add", lambda sub, cb: self.routes.__setitem__(sub, cb))
        monkeypatch.setattr(self.bus.client, "message_callback_remove", lambda sub: self.routes.pop(sub, None))
        monkeypatch.setattr(self.bus.client, "ack", lambda mid, qos: self.acked.append(mid))
        monkeypatch.setattr(self.bus, "publish", lambda topic, *args, **kwargs: self.published.append(topic))

    def deliver(self, topic: str, mid: int, qos: int = 1, payload: bytes = b"{}", retain: bool = False) -> None:
        msg = mqtt.MQTTMessage(mid=mid, topic=topic.encode())
        msg.qos, msg.payload, msg.retain = qos, payload, retain
        (route,) = [cb for sub, cb in self.routes.items() if mqtt.topic_matches_sub(sub, topic)]
        route(self.bus.client, None, msg)


def test_with_acknowledge_after_a_message_is_acknowledged_only_when_the_deferral_runs(monkeypatch):
    wired = Wired(monkeypatch)
    deferred = []
    wired.bus.acknowledge_after(deferred.append)  # the gateway passes its store's after_commit
    handled = []
    wired.bus.subscribe("edgeprune/pipeline/results/+", lambda t, p, u: handled.append(t))
    wired.deliver("edgeprune/pipeline/results/n1", mid=5)
    assert handled == ["edgeprune/pipeline/results/n1"]
    assert wired.acked == [] and len(deferred) == 1  # handled, not yet committed: the broker still holds it
    deferred[0]()
    assert wired.acked == [5]
    wired.deliver("edgeprune/pipeline/results/n1", mid=0, qos=0)  # QoS 0 has nothing to acknowledge
    assert len(deferred) == 1 and wired.acked == [5]


def test_a_rejected_message_is_reported_and_acknowledged_through_the_deferral_too(monkeypatch):
    wired = Wired(monkeypatch)
    deferred = []
    wired.bus.acknowledge_after(deferred.append)

    def refuse(topic, payload, user):
        raise BadMessage("bad_schema", "not a result")
    wired.bus.subscribe("edgeprune/pipeline/results/+", refuse)
    wired.deliver("edgeprune/pipeline/results/n1", mid=6)
    assert wired.bus.errors["bad_schema"] == 1 and wired.published == [wired.bus.topics.errors("gw")]
    assert wired.acked == []
    deferred[0]()
    assert wired.acked == [6]


def test_an_acknowledgement_deferred_past_a_reconnect_is_dropped(monkeypatch):
    """The broker re-sends an unacknowledged message on the new connection and may reuse its packet id."""
    wired = Wired(monkeypatch)
    deferred = []
    wired.bus.acknowledge_after(deferred.append)
    wired.bus.subscribe("edgeprune/pipeline/accepted/+", lambda t, p, u: None)
    wired.deliver("edgeprune/pipeline/accepted/n1", mid=7)
    wired.bus.client.on_disconnect(wired.bus.client, None, None, 0, None)
    deferred[0]()
    assert wired.acked == []


@pytest.mark.parametrize("handler_raises", [False, True])
def test_a_manual_ack_bus_acknowledges_once_the_handler_has_returned(monkeypatch, handler_raises):
    wired = Wired(monkeypatch, manual_ack=True)
    acked_during = []

    def handler(topic, payload, user):
        acked_during.extend(wired.acked)
        if handler_raises:
            raise ValueError("a bug")
    wired.bus.subscribe("edgeprune/node/n1/cmd", handler)
    wired.deliver("edgeprune/node/n1/cmd", mid=8)
    assert acked_during == [] and wired.acked == [8]


def test_a_deferred_ack_subscription_is_acknowledged_when_its_handler_says_so(monkeypatch):
    """A replica holds its input in its broker session until it has served it (docs/scaling.md)."""
    wired = Wired(monkeypatch, manual_ack=True)
    held = []
    wired.bus.subscribe("$share/g/edgeprune/pipeline/stage/2/in", lambda t, p, u, ack: held.append(ack),
                        deferred_ack=True)
    wired.deliver("edgeprune/pipeline/stage/2/in", mid=9)
    assert wired.acked == [] and len(held) == 1
    held[0]()
    held[0]()  # once only
    assert wired.acked == [9]

    def refuse(topic, payload, user, ack):
        raise BadMessage("bad_magic", "not an activation")
    wired.bus.subscribe("$share/g/edgeprune/pipeline/stage/3/in", refuse, deferred_ack=True)
    wired.deliver("edgeprune/pipeline/stage/3/in", mid=10)
    assert wired.acked == [9, 10]  # reported: done with


def test_wait_subscribed_holds_until_every_subscription_of_the_connect_is_acknowledged(monkeypatch):
    """Another client's publish is not ordered after our SUBSCRIBE: a test or readiness check must wait for SUBACKs."""
    wired = Wired(monkeypatch)
    sent = iter(range(40, 50))
    monkeypatch.setattr(wired.bus.client, "subscribe", lambda topic, options=None: (0, next(sent)))
    monkeypatch.setattr(wired.bus.client, "socket", lambda: None)
    monkeypatch.setattr(wired.bus.client, "publish", lambda *args, **kwargs: None)
    wired.bus.subscribe("edgeprune/a", lambda t, p, u: None)
    wired.bus.subscribe("edgeprune/b", lambda t, p, u: None)
    connect = wired.bus.client.on_connect
    success = mqtt.ReasonCode(mqtt.PacketTypes.CONNACK, "Success")
    granted = [mqtt.ReasonCode(mqtt.PacketTypes.SUBACK, "Granted QoS 1")]
    connect(wired.bus.client, None, None, success, None)
    assert not wired.bus.wait_subscribed(0)
    wired.bus.client.on_subscribe(wired.bus.client, None, 40, granted, None)
    assert not wired.bus.wait_subscribed(0)
    wired.bus.client.on_subscribe(wired.bus.client, None, 41, granted, None)
    assert wired.bus.wait_subscribed(0)
    wired.bus.client.on_disconnect(wired.bus.client, None, None, 0, None)
    assert not wired.bus.wait_subscribed(0)  # a reconnect subscribes again


def connect_properties(monkeypatch, bus: Bus):
    """What ``bus.start`` would send in its CONNECT (no broker: connect_async and the loop are recorded)."""
    sent = {}
    monkeypatch.setattr(bus.client, "connect_async", lambda *args, **kwargs: sent.update(kwargs))
    monkeypatch.setattr(bus.client, "loop_start", lambda: None)
    bus.start(wait_s=None)
    return sent["properties"]


def test_a_receive_maximum_goes_into_the_connect_and_a_deferring_bus_asks_for_a_large_one(monkeypatch):
    """The node's input connection asks for a window of 1 (docs/reliability.md, "Flow control"); the gateway, which
    acknowledges only after its writes, for 65535; a Bus that asks nothing gets the broker's own limit."""
    node = Bus(MqttSettings(), "node-1", "edgeprune/node/node-1/status", manual_ack=True, receive_maximum=1)
    assert connect_properties(monkeypatch, node).ReceiveMaximum == 1
    gateway = Bus(MqttSettings(), "gw", "edgeprune/component/gw/status")
    gateway.acknowledge_after(lambda ack: ack())
    assert connect_properties(monkeypatch, gateway).ReceiveMaximum == 65535
    plain = Bus(MqttSettings(), "cam-1", "edgeprune/component/cam-1/status")
    assert not hasattr(connect_properties(monkeypatch, plain), "ReceiveMaximum")


def test_a_second_connection_has_its_own_client_id_and_no_will(monkeypatch):
    control = Bus(MqttSettings(), "node-1", None, client_id="node-1/control")
    assert control.client._client_id == b"node-1/control" and control.component_id == "node-1"
    assert control.client._will is False
    published = []
    monkeypatch.setattr(control.client, "publish", lambda *args, **kwargs: published.append(args))
    control._connected.set()
    monkeypatch.setattr(control.client, "disconnect", lambda: None)
    monkeypatch.setattr(control.client, "loop_stop", lambda: None)
    control.stop()
    assert published == []  # no `stopped` on an availability topic it does not have


@pytest.mark.parametrize("dropped", ["plain", "shared"])
def test_dropping_a_plain_or_shared_subscription_keeps_the_other_of_the_same_topic_routed(monkeypatch, dropped):
    """A node whose stage's input becomes shared (or stops being) subscribes the new filter ahead and then drops the
    old one. Both route the same topic in paho (a shared subscription's messages carry the plain topic): dropping one
    removed the other's route too, and its messages were acknowledged unserved as unrouted (the soak's
    replica_death phase: one replica's 34 frames of 194 without a trace)."""
    wired = Wired(monkeypatch)
    plain, shared = "edgeprune/camera/+/frame", "$share/g/edgeprune/camera/+/frame"
    handled = []
    wired.bus.subscribe(plain, lambda t, p, u: handled.append("plain"))
    wired.bus.subscribe(shared, lambda t, p, u: handled.append("shared"))
    wired.bus.unsubscribe(plain if dropped == "plain" else shared)
    wired.deliver("edgeprune/camera/cam-1/frame", mid=7)
    assert handled == ["shared" if dropped == "plain" else "plain"]
    wired.bus.unsubscribe(shared if dropped == "plain" else plain)
    assert wired.routes == {}
