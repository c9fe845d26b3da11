"""Operator commands to the gateway without a broker: validation in words, replies, persistence, audit log."""

from __future__ import annotations

import json
from typing import get_args

import pytest

from gateway.operator import Overrides
from gateway.service import Gateway
from gateway.store import Reader
from shared.operator_settings import LABELS, validate_setting
from shared.schemas import BadMessage, CommandReply, OperatorSetting, SliceCalibration
from shared.settings import ControllerSettings, GatewaySettings, MqttSettings
from tests.conftest import even_split
from tests.test_controller_e2e import write_accuracy_model

LADDER = [round(0.1 * i, 1) for i in range(10)]


@pytest.mark.parametrize("setting,value,words", [
    ("slo_s", "-1", "greater than 0"), ("slo_s", "abc", "valid number"), ("cooldown_s", -3, "greater than or equal"),
    ("accuracy_floor_relative", 2, "less than or equal to 1"), ("policy", "fastest", "bottleneck, paper, off"),
    ("ladder", "0,0.5", "unknown setting"), ("move_blocks", "yes", "on or off"),
])
def test_bad_values_are_refused_in_words(setting, value, words):
    with pytest.raises(ValueError, match=words):
        validate_setting(setting, value)


def test_every_setting_a_command_may_name_has_a_label_and_a_check():
    assert list(LABELS) == list(get_args(OperatorSetting))


def test_overrides_merge_stored_values_and_drop_ones_no_longer_valid():
    o = Overrides(GatewaySettings(slo_s=0.5), ControllerSettings(), {"slo_s": 0.3, "cooldown_s": "soon",
                                                                     "policy": "off"})
    assert o.values == {"slo_s": 0.3, "policy": "off"} and o.slo_s == 0.3 and not o.automatic
    assert o.controller_settings().policy == "adaptive"  # 'off' is the control loop's, not the policy's (default kept)
    assert o.change("cooldown_s", "5") == (15.0, 5.0) and o.controller_settings().cooldown_s == 5.0
    with pytest.raises(ValueError):
        o.change("slo_s", 0)
    assert o.slo_s == 0.3  # a refused change leaves everything as it was


def test_moving_blocks_defaults_to_the_gateway_setting_and_the_operator_switches_it():
    o = Overrides(GatewaySettings(replace_on_violation=True), ControllerSettings(), {})
    assert o.move_blocks and o.effective()["move_blocks"] == "on"
    assert o.change("move_blocks", "off") == ("on", "off") and not o.move_blocks
    assert o.controller_settings() == ControllerSettings()  # a gateway switch, not a controller setting
    assert not Overrides(GatewaySettings(), ControllerSettings(), {}).move_blocks


def test_the_move_switch_reaches_the_tick_and_a_moved_placement_still_moves_back_when_off(tmp_path):
    gateway = calibrated_gateway(tmp_path)
    coordinator = gateway.coordinator
    calls = []
    coordinator.placing.replace_for_slowdowns = lambda now, effects, move, controller: calls.append(move)
    coordinator.tick(100.0)
    assert calls == []  # off (the default): nothing is moved
    assert send(gateway, {"cmd": "set", "setting": "move_blocks", "value": "on", "id": "m1"}).ok
    coordinator.tick(101.0)
    assert calls == [True]
    coordinator.placing.replaced = True  # a placement moved for a slowdown, then the operator switches moves off
    assert send(gateway, {"cmd": "set", "setting": "move_blocks", "value": "off", "id": "m2"}).ok
    coordinator.tick(102.0)
    assert calls == [True, False]  # asked only to move back once the slowdowns are gone
    gateway.store.close()


class FakeBus:
    def __init__(self):
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic, payload, qos=0, retain=False, user=None):
        self.published.append((topic, payload, retain))

    def on(self, suffix: str) -> list[tuple[dict, bool]]:
        return [(json.loads(p), r) for t, p, r in self.published if t.endswith(suffix)]


def calibrated_gateway(tmp_path) -> Gateway:
    accuracy = tmp_path / "accuracy.json"
    write_accuracy_model(accuracy)
    gateway = Gateway(GatewaySettings(db_path=tmp_path / "g.db", nodes=["a", "b"], accuracy_model=accuracy),
                      MqttSettings())
    gateway.bus = FakeBus()
    placement = even_split(6, ["a", "b"])
    gateway.coordinator.control.set_placement(placement)
    for stage in placement.stages:
        gateway.coordinator.control.add_calibration(SliceCalibration(
            node_id=stage.node_id, placement_version=1, first_block=stage.first_block, last_block=stage.last_block,
            ratios=LADDER, latency_s=[0.02 * (0.1 + 0.9 * (1 - p) ** 2) for p in LADDER], measured_at=1.0))
    assert gateway.coordinator.control.controller is not None
    return gateway


def send(gateway: Gateway, command: dict) -> CommandReply:
    try:
        gateway._on_command("edgeprune/component/gateway/cmd", json.dumps(command).encode(), {})
    finally:
        gateway.store.flush()  # the writer's next write: desired states go out once it is committed
    return CommandReply.model_validate(gateway.bus.on("/component/gateway/reply")[-1][0])


def test_commands_are_answered_applied_logged_and_settings_survive_a_restart(tmp_path):
    gateway = calibrated_gateway(tmp_path)
    reply = send(gateway, {"cmd": "set", "setting": "slo_s", "value": 0.3, "id": "c1", "by": "ana"})
    assert reply.ok and reply.id == "c1" and "0.5 -> 0.3" in reply.message
    coordinator = gateway.coordinator
    assert coordinator.control.slo_s == 0.3 and coordinator.control.controller.slo_s == 0.3
    assert coordinator.data_path.slo.slo_s == 0.3

    reply = send(gateway, {"cmd": "prune", "node_id": "b", "ratio": 0.5, "id": "c2", "by": "ana"})
    assert reply.ok
    desired, retained = gateway.bus.on("/node/b/prune/set")[-1]
    assert retained and desired["ratio"] == 0.5 and desired["source"] == "manual"
    # a later setting change rebuilds the controller but keeps the hold
    assert send(gateway, {"cmd": "set", "setting": "cooldown_s", "value": "4", "id": "c3", "by": "ana"}).ok
    assert coordinator.control.controller.manual == {"b": 0.5} and coordinator.control.settings.cooldown_s == 4.0

    with pytest.raises(BadMessage):  # the bus reports the rejection; the reply says it in words
        send(gateway, {"cmd": "prune", "node_id": "b", "ratio": 0.55, "id": "c4"})
    (reply, _), = [(r, k) for r, k in gateway.bus.on("/component/gateway/reply") if r["id"] == "c4"]
    assert not reply["ok"] and "not on the ladder" in reply["message"]

    send(gateway, {"cmd": "node_slowdown", "node_id": "a", "factor": 3, "id": "c5"})
    (forwarded, retained), = gateway.bus.on("/node/a/cmd")
    assert forwarded == {"cmd": "slowdown", "factor": 3.0} and not retained

    assert send(gateway, {"cmd": "restore_all", "id": "c6", "by": "ana"}).ok
    assert gateway.bus.on("/node/b/prune/set")[-1][0]["ratio"] == 0.0 and coordinator.control.controller.manual == {}

    assert send(gateway, {"cmd": "set", "setting": "policy", "value": "off", "id": "c7"}).ok
    assert not coordinator.control.automatic and coordinator.control.status()["policy"] == "off"
    gateway.store.close()

    actions = Reader(tmp_path / "g.db")._rows("SELECT * FROM operator_actions ORDER BY id")
    assert [(a["by"], a["action"], a["target"], a["old"], a["new"]) for a in actions[:3]] == [
        ("ana", "set slo_s", "gateway", "0.5", "0.3"), ("ana", "hold", "b", "null", "0.5"),
        ("ana", "set cooldown_s", "gateway", "15.0", "4.0")]
    assert [a["action"] for a in actions[3:]] == ["slowdown", "restore_all", "set policy"]

    restarted = calibrated_gateway(tmp_path)
    again = restarted.coordinator
    assert again.operator.slo_s == 0.3 and again.control.slo_s == 0.3 and again.data_path.slo.slo_s == 0.3
    assert again.control.settings.cooldown_s == 4.0 and not again.control.automatic
    restarted.store.close()


def test_a_command_that_fails_validation_still_gets_an_answer(tmp_path):
    gateway = calibrated_gateway(tmp_path)
    with pytest.raises(BadMessage, match="greater than 0"):
        send(gateway, {"cmd": "set", "setting": "slo_s", "value": -2, "id": "bad"})
    reply = CommandReply.model_validate(gateway.bus.on("/component/gateway/reply")[-1][0])
    assert reply.id == "bad" and not reply.ok and "greater than 0" in reply.message
    assert gateway.coordinator.control.slo_s == 0.5
    gateway.store.close()


def test_the_placement_carries_the_slo_and_is_republished_when_the_operator_changes_it(tmp_path):
    gateway = calibrated_gateway(tmp_path)
    gateway.coordinator.placing.handover.active = even_split(6, ["a", "b"])
    gateway.publish_placement()
    assert send(gateway, {"cmd": "set", "setting": "slo_s", "value": 0.3, "id": "c1"}).ok
    assert send(gateway, {"cmd": "set", "setting": "cooldown_s", "value": 4, "id": "c2"}).ok  # not the nodes' business
    published = gateway.bus.on("/placement")
    assert [(p["version"], p["slo_s"], retained) for p, retained in published] == [(1, 0.5, True), (1, 0.3, True)]
