"""What Mosquitto 2 does with a shared subscription whose member dies, on a real broker with our config and ACL.

Characterisation, not wishful thinking: these tests pin the behaviour the replica design relies on
(docs/scaling.md, "Replicated stages"): a dead member's session keeps what was in flight to it and keeps
receiving its share; with no session those messages vanish (eclipse-mosquitto/mosquitto#2662); taking the
session over (`shared.bus.drain_session`) returns every message and takes the member out of the group.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared import routing
from shared.bus import Bus, drain_session
from shared.schemas import Placement, StageAssignment
from shared.topics import Topics
from tests.conftest import AUTH, mqtt_client, wait_until

pytestmark = pytest.mark.integration
TOPICS = Topics()
STAGE = 2
TOKEN = "t0k3n-of-the-test"


class Member:
    """A node-role client in the stage's shared group that acknowledges nothing until told (it holds its input)."""

    def __init__(self, port: int, node: str, session_expiry_s: int, role: str = "node",
                 receive_maximum: int | None = None):
        self.got: list[int] = []
        self.granted = threading.Event()
        self.refused = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=node, protocol=mqtt.MQTTv5, manual_ack=True)
        settings = AUTH[port].settings(node, role)
        self.client.username_pw_set(settings.username, settings.password.get_secret_value())
        self.client.on_message = lambda c, u, msg: self.got.append(int(msg.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: (self.refused if codes[0].is_failure
                                                                  else self.granted).set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        if receive_maximum is not None:  # MQTT v5 flow control, as a node with [node] flow_control
            props.ReceiveMaximum = receive_maximum
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        self.client.subscribe(TOPICS.shared(STAGE, TOKEN), qos=1)
        wait_until(lambda: self.granted.is_set() or self.refused.is_set(), 10, "no SUBACK")

    def die(self) -> None:
        """Gone without a DISCONNECT, as a killed process: the broker sees the socket close."""
        self.client._sock.close()
        self.client.loop_stop()


def publish(port: int, numbers: range) -> None:
    client = mqtt_client(AUTH[port].settings("admin", "admin"))
    for n in numbers:
        client.publish(TOPICS.stage_input(STAGE), str(n), qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def test_nodes_share_a_stage_input_and_a_camera_in_the_group_black_holes_its_share(fresh_broker):
    port = fresh_broker.port
    node = Member(port, "node-1", 60)
    node.client.on_message = lambda c, u, msg: (node.got.append(int(msg.payload)), c.ack(msg.mid, msg.qos))
    publish(port, range(10))
    wait_until(lambda: sorted(node.got) == list(range(10)), 15, "the node did not get the stage input")
    # Mosquitto 2.0's ACL file checks deliveries, not subscriptions: a camera that names the group joins it,
    # and its share is dropped at delivery. Hence the group's name carries the placement's secret token.
    camera = Member(port, "cam-9", 60, role="camera")
    assert camera.granted.is_set(), "Mosquitto now refuses the subscription: the token is no longer needed"
    publish(port, range(10, 20))
    wait_until(lambda: len(node.got) + len(camera.got) >= 15, 15, "nothing more reached the node")
    time.sleep(1.0)
    assert camera.got == [] and len(node.got) < 20, "Mosquitto no longer drops a refused member's share"


def test_a_dead_members_messages_stay_in_its_session_until_drained(fresh_broker):
    port = fresh_broker.port
    survivor, victim = Member(port, "node-1", 3600), Member(port, "node-2", 3600)
    survivor.client.on_message = lambda c, u, msg: (survivor.got.append(int(msg.payload)), c.ack(msg.mid, msg.qos))
    publish(port, range(10))
    wait_until(lambda: len(survivor.got) + len(victim.got) == 10, 15, "the group did not get the 10 messages")
    held = list(victim.got)
    assert held, "round robin gave the victim nothing to hold"
    victim.die()
    time.sleep(1.0)
    publish(port, range(10, 20))
    wait_until(lambda: any(n >= 10 for n in survivor.got), 15, "the survivor got nothing after the death")
    time.sleep(1.0)
    # Mosquitto 2 keeps the dead member in the group: part of the new messages went to its session, too
    missing = set(range(20)) - set(survivor.got)
    assert set(held) <= missing and missing - set(held), "the dead member's session no longer takes a share"

    gateway = AUTH[port].settings("gateway", "gateway")
    drained = drain_session(gateway, "node-2", [TOPICS.shared(STAGE, TOKEN)])
    assert sorted(int(p) for _, p, _ in drained) == sorted(missing)  # everything it held, nothing else
    assert {t for t, _, _ in drained} == {TOPICS.stage_input(STAGE)}  # the real topic: re-publishable as is

    publish(port, range(20, 30))  # the session ended and left the group: the survivor gets all of them
    wait_until(lambda: set(range(20, 30)) <= set(survivor.got), 15, "the drained member still takes a share")


def test_without_a_session_mosquitto_drops_what_was_in_flight_to_a_dead_member(fresh_broker):
    """eclipse-mosquitto/mosquitto#2662 as Mosquitto 2 here does it: why replicas keep their session."""
    port = fresh_broker.port
    survivor, victim = Member(port, "node-1", 0), Member(port, "node-2", 0)
    survivor.client.on_message = lambda c, u, msg: (survivor.got.append(int(msg.payload)), c.ack(msg.mid, msg.qos))
    publish(port, range(10))
    wait_until(lambda: len(survivor.got) + len(victim.got) == 10, 15, "the group did not get the 10 messages")
    held = set(victim.got)
    assert held
    victim.die()
    publish(port, range(10, 20))
    wait_until(lambda: set(range(10, 20)) <= set(survivor.got), 15, "new messages did not reach the survivor")
    time.sleep(2.0)
    assert not held & set(survivor.got), "Mosquitto now re-sends a dead member's in-flight messages: revisit"
    gateway = AUTH[port].settings("gateway", "gateway")
    assert drain_session(gateway, "node-2", [TOPICS.shared(STAGE, TOKEN)]) == []  # nothing left anywhere: lost


def test_a_member_that_falls_behind_still_gets_every_other_message(fresh_broker):
    """Mosquitto deals a group's messages in turn, not by readiness: a member holding more unacknowledged messages
    than the broker's max_inflight_messages (64) is still handed its share (queued in its session), so a slow
    replica sets its stage's pace. The hybrid planner's stage rate, r x the slowest replica's, rests on this."""
    port = fresh_broker.port
    fast, slow = Member(port, "node-1", 3600), Member(port, "node-2", 3600)  # slow acknowledges nothing
    fast.client.on_message = lambda c, u, msg: (fast.got.append(int(msg.payload)), c.ack(msg.mid, msg.qos))
    publish(port, range(200))
    wait_until(lambda: len(fast.got) >= 100, 15, "the fast member did not get its half")
    time.sleep(1.0)
    assert len(fast.got) == 100 and len(slow.got) <= 100, (len(fast.got), len(slow.got))


def test_with_flow_control_too_the_group_is_dealt_in_turn_not_by_readiness(fresh_broker):
    """With a receive window of 1 ([node] flow_control) a member holding one unacknowledged message gets no more
    sent, but Mosquitto still assigns it every other message, queued in its session: the fast member gets half, not
    all. So parallel pipelines take frames in proportion to their first-stage readers, whatever their speed
    (gateway/curves.py: PipelineMix; docs/scaling.md)."""
    port = fresh_broker.port
    fast, slow = Member(port, "node-1", 3600, receive_maximum=1), Member(port, "node-2", 3600, receive_maximum=1)
    fast.client.on_message = lambda c, u, msg: (fast.got.append(int(msg.payload)), c.ack(msg.mid, msg.qos))
    publish(port, range(200))  # each routed on receipt: the group's shares are fixed once this returns
    wait_until(lambda: len(fast.got) >= 100, 15, "the fast member did not get its half")
    assert len(slow.got) == 1  # its window: one unacknowledged message at a time
    drained = drain_session(AUTH[port].settings("gateway", "gateway"), "node-2", [TOPICS.shared(STAGE, TOKEN)])
    held = sorted(int(p) for _, p, _ in drained)
    assert len(held) == 100 and sorted(fast.got + held) == list(range(200)), (len(fast.got), len(held))


def test_a_hung_members_session_is_taken_over_with_what_it_held_in_order(fresh_broker):
    """A hung member (SIGSTOP: its connection stays up, it reads and acknowledges nothing) is taken over while
    still connected: the broker closes its connection and hands the gateway everything in flight to it or queued
    for it, in the order published, other subscriptions' messages (the placement) included; it sends no will then,
    nor when the old socket finally closes. The gateway's takeover of a silent replica
    (gateway/placing.py: ``_take_over``) rests on this; the node shows as silent until it speaks again."""
    port = fresh_broker.port
    settings = AUTH[port].settings("node-2", "node")
    hung = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="node-2", protocol=mqtt.MQTTv5, manual_ack=True)
    hung.username_pw_set(settings.username, settings.password.get_secret_value())
    hung.will_set(TOPICS.node_status("node-2"), "offline", qos=1, retain=True)
    subacks: list[int] = []
    hung.on_subscribe = lambda c, u, mid, codes, p: subacks.append(mid)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    hung.connect("127.0.0.1", port, keepalive=600, clean_start=False, properties=props)
    hung.loop_start()
    hung.subscribe(TOPICS.placement, qos=1)
    hung.subscribe(TOPICS.shared(STAGE, TOKEN), qos=1)
    wait_until(lambda: len(subacks) == 2, 10, "no SUBACK")
    hung.loop_stop()  # hung: the socket stays open, nothing is read or acknowledged any more

    watcher = mqtt_client(AUTH[port].settings("watcher", "admin"))
    wills: list[bytes] = []
    watcher.on_message = lambda c, u, msg: wills.append(msg.payload)
    watcher.subscribe(TOPICS.node_status("node-2"), qos=1)
    publish(port, range(5))
    admin = mqtt_client(AUTH[port].settings("admin", "admin"))
    admin.publish(TOPICS.placement, b"v2", qos=1).wait_for_publish(5)
    admin.loop_stop()
    admin.disconnect()
    publish(port, range(5, 10))

    gateway = AUTH[port].settings("gateway", "gateway")
    drained = drain_session(gateway, "node-2", [TOPICS.shared(STAGE, TOKEN)])
    assert [p.decode() for _, p, _ in drained] == [*map(str, range(5)), "v2", *map(str, range(5, 10))]
    hung._sock.close()
    time.sleep(2.0)
    assert wills == [], "Mosquitto now sends a taken-over client's will (the gateway starts no second takeover)"
    watcher.loop_stop()
    watcher.disconnect()


def test_a_restarted_node_leaves_the_group_its_previous_run_joined_when_the_placement_moved_it(fresh_broker):
    """node-2 read stage 2 as a replica, was killed, and came back (before the gateway took its session over) under a
    placement that makes it stage 1. Its resumed session kept the old run's membership of stage 2's group, so the
    broker went on dealing it a share of stage 2's input, which the new process had no handler for and acknowledged
    away: every other frame lost for as long as the session lived. It leaves the groups the placement it starts under
    names, except the one it reads."""
    port = fresh_broker.port
    Member(port, "node-2", 3600).die()  # the previous run, a stage-2 replica
    live = Member(port, "node-3", 60)
    live.client.on_message = lambda c, u, msg: (live.got.append(int(msg.payload)), c.ack(msg.mid, msg.qos))
    placement = Placement(version=2, model="m", n_blocks=6, issued_at=0.0, share_token=TOKEN, stages=[
        StageAssignment(stage=1, node_id="node-2", first_block=0, last_block=2),
        StageAssignment(stage=2, node_id="node-3", first_block=3, last_block=5, replicas=["node-1"])])
    restarted = Bus(AUTH[port].settings("node-2", "node"), "node-2", TOPICS.node_status("node-2"), manual_ack=True)
    restarted.leave_on_connect(routing.input_filters(TOPICS, placement))
    restarted.subscribe(routing.input_filter(TOPICS, placement, "node-2"), lambda t, p, u: None, data=True)
    restarted.start()
    try:
        assert restarted.wait_subscribed(30), "the restarted node's subscriptions were never acknowledged"
        publish(port, range(20))
        wait_until(lambda: len(live.got) == 20, 15, f"stage 2's live replica got {len(live.got)} of 20")
    finally:
        restarted.stop()
        live.die()
