"""shared/mqtt_properties.py: paho's MQTT v5 property tables made once, not per packet, with paho's behaviour kept."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

import shared.bus  # noqa: F401  (installs the shared tables, as every component does by using the bus)


def test_every_packet_shares_one_read_only_set_of_tables() -> None:
    first, second = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.CONNACK)
    assert first.names is second.names and first.properties is second.properties and first.types is second.types
    with pytest.raises(TypeError):  # shared, so nobody may change them for everybody
        first.names["Nonsense"] = 99  # type: ignore[index]


def test_clearing_drops_every_property_and_keeps_the_tables() -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("a", "b")]
    props.ContentType = "application/json"
    props.clear()
    assert props.isEmpty() and not hasattr(props, "UserProperty") and not hasattr(props, "ContentType")
    assert set(vars(props)) == {"packetType", "types", "names", "properties"}
    assert props.clear.__func__ is Properties.clear and getattr(Properties.clear, "shares_tables", False)


def test_properties_round_trip_and_are_still_checked() -> None:
    sent = Properties(PacketTypes.PUBLISH)
    sent.UserProperty = [("camera", "trap-1"), ("site", "valley")]
    sent.MessageExpiryInterval = 60
    received, _ = Properties(PacketTypes.PUBLISH).unpack(sent.pack())
    assert received.UserProperty == [("camera", "trap-1"), ("site", "valley")]
    assert received.MessageExpiryInterval == 60 and received.json() == sent.json()
    with pytest.raises(MQTTException):
        received.Nonsense = 1
    with pytest.raises(MQTTException):  # a CONNACK's property on a PUBLISH
        received.AssignedClientIdentifier = "x"
    with pytest.raises(MQTTException):
        Properties(PacketTypes.CONNECT).ReceiveMaximum = 0
