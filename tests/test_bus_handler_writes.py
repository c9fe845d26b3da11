"""A handler that works on paho's network thread (a node serving a request at once) can send before it returns, and
can tell whether more input arrived meanwhile: on a real mosquitto."""

from __future__ import annotations

import threading

import pytest

from node_agent.serving import ACKS_ONLY_BYTES
from shared.bus import Bus
from shared.topics import Topics
from tests.conftest import mqtt_client, wait_until

pytestmark = pytest.mark.integration
TOPICS = Topics("edgeprune")
IN, OUT = "edgeprune/test/hop/in", "edgeprune/test/hop/out"


def _bus(broker) -> Bus:
    bus = Bus(broker, "hop-test", TOPICS.component_status("hop-test"))
    bus.start()
    return bus


def test_a_handler_flushes_its_publish_before_it_returns(broker):
    outside = mqtt_client(broker)
    seen = threading.Event()
    outside.on_message = lambda *_: seen.set()
    subscribed = threading.Event()
    outside.on_subscribe = lambda *_: subscribed.set()
    outside.subscribe(OUT, qos=1)
    bus = _bus(broker)
    delivered_while_handling: list[bool] = []

    def handler(topic: str, payload: bytes, props: dict[str, str]) -> None:
        bus.publish(OUT, b"announced", qos=1)
        bus.flush()  # without it the message waits in paho's queue until this handler returns
        delivered_while_handling.append(seen.wait(30))

    try:
        assert subscribed.wait(30)
        done = threading.Event()
        bus.subscribe(IN, handler, subscribed=done.set)
        wait_until(done.is_set, 30, "the bus did not subscribe")
        bus.flush()  # off the network thread: does nothing (paho's thread alone writes the socket)
        outside.publish(IN, b"go", qos=1)
        wait_until(lambda: delivered_while_handling, 60, "the handler did not run")
        assert delivered_while_handling == [True]
    finally:
        bus.stop()
        outside.loop_stop()
        outside.disconnect()


def test_a_handler_sees_input_that_arrived_while_it_worked(broker):
    outside = mqtt_client(broker)
    bus = _bus(broker)
    waiting: list[int] = []
    handled: list[bytes] = []

    def handler(topic: str, payload: bytes, props: dict[str, str]) -> None:
        handled.append(payload)
        if payload == b"first":  # hold paho's thread while the second message comes in
            outside.publish(IN, b"second" * 100, qos=1)
            wait_until(lambda: bus.unread_bytes() > ACKS_ONLY_BYTES, 30, "the second message never arrived")
            waiting.append(bus.unread_bytes())

    try:
        done = threading.Event()
        bus.subscribe(IN, handler, subscribed=done.set)
        wait_until(done.is_set, 30, "the bus did not subscribe")
        outside.publish(IN, b"first", qos=1)
        wait_until(lambda: len(handled) == 2, 60, "the second message was not handled after the first")
        assert waiting and waiting[0] > 600  # the whole second message was waiting, unread
        assert bus.unread_bytes() <= ACKS_ONLY_BYTES  # read since: nothing waits
    finally:
        bus.stop()
        outside.loop_stop()
        outside.disconnect()
