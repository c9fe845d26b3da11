"""A node's control connection over a real broker: one-shot commands do not outlive the process they were meant for.

docs/reliability.md, "Commands after a node restart": the control connection (placement, commands, prune state,
clock) starts a new broker session when a node process starts, so a `slowdown` or `prepare` queued while the node
was dead is not applied by its next run; the retained placement and prune state come again on subscribe.
"""

from __future__ import annotations

import threading

from node_agent.agent import control_bus
from shared.bus import Bus
from shared.schemas import PruneDesired, SlowdownCommand, to_json
from shared.topics import Topics
from tests.conftest import AUTH, wait_until

WAIT_S = 30.0


def run_control(mqtt, topics: Topics, received: list[tuple[str, bytes]], node: str = "node-1") -> Bus:
    """A node process's control connection (as the agent makes it), subscribed and connected."""
    control = control_bus(AUTH[mqtt.port].settings(node, "node"), node)
    lock = threading.Lock()

    def keep(topic: str, payload: bytes, _user: dict[str, str]) -> None:
        with lock:
            received.append((topic, payload))
    control.subscribe(topics.node_command(node), keep)
    control.subscribe(topics.node_prune_desired(node), keep)
    control.start()
    assert control.wait_subscribed(WAIT_S), "control connection not subscribed"
    return control


def test_a_command_queued_while_the_node_was_dead_is_not_applied_by_its_next_run(broker):
    topics = Topics()
    operator = Bus(broker, "ops-control-test", None)
    operator.start()
    first: list[tuple[str, bytes]] = []
    run_control(broker, topics, first).stop()  # the node's previous run: its session is left in the broker

    stale = to_json(SlowdownCommand(cmd="slowdown", factor=50))
    operator.publish(topics.node_command("node-1"), stale, qos=1).wait_for_publish(WAIT_S)
    desired = PruneDesired(ratio=0.25, seq=7, issued_at=1.0)
    operator.publish(topics.node_prune_desired("node-1"), to_json(desired), qos=1,
                     retain=True).wait_for_publish(WAIT_S)

    second: list[tuple[str, bytes]] = []
    control = run_control(broker, topics, second)  # the node restarted
    fresh = to_json(SlowdownCommand(cmd="slowdown", factor=2))
    operator.publish(topics.node_command("node-1"), fresh, qos=1).wait_for_publish(WAIT_S)
    try:
        wait_until(lambda: (topics.node_command("node-1"), fresh) in second, WAIT_S, "the live command did not come")
        commands = [payload for topic, payload in second if topic == topics.node_command("node-1")]
        assert commands == [fresh]  # the one sent while it was dead is gone with its run
        assert (topics.node_prune_desired("node-1"), to_json(desired)) in second  # retained state comes again
    finally:
        control.stop()
        operator.publish(topics.node_prune_desired("node-1"), b"", qos=1, retain=True).wait_for_publish(WAIT_S)
        operator.stop()


def test_a_command_sent_while_the_running_node_reconnects_still_comes(broker):
    """Only a new run starts afresh: a reconnect of the same run (a network gap) resumes the session."""
    topics = Topics()
    operator = Bus(broker, "ops-control-test", None)
    operator.start()
    received: list[tuple[str, bytes]] = []
    control = run_control(broker, topics, received, node="node-2")
    try:
        control.client.loop_stop()  # no reconnect until the command is queued in the session
        control.client.socket().close()
        command = to_json(SlowdownCommand(cmd="slowdown", factor=3))
        operator.publish(topics.node_command("node-2"), command, qos=1).wait_for_publish(WAIT_S)
        control.client.loop_start()
        wait_until(lambda: (topics.node_command("node-2"), command) in received, WAIT_S,
                   "a command sent during the gap was lost")
    finally:
        control.stop()
        operator.stop()
