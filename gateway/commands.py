"""Operator commands on ``<root>/component/gateway/cmd``: each obeyed (or refused in words), answered on the reply
topic when it carries an ``id``, and logged as an ``operator_actions`` row.

Pure (time passed in, effects written into the caller's :class:`~gateway.effects.Effects`). A command acts through
the parts the coordinator composes: the control loop (holds, restores, settings), the placement (retire, the SLO the
nodes order their queues by), the SLO windows and the desired states; the settings' labels and validation are
:mod:`shared.operator_settings`'s.
"""

from __future__ import annotations

import json
import logging

from gateway.control_loop import ControlLoop
from gateway.data_path import DataPath
from gateway.desired_states import DesiredStates
from gateway.effects import Effects
from gateway.operator import Overrides
from gateway.placing import Placing
from shared.operator_settings import LABELS
from shared.schemas import (
    BadMessage,
    CameraCommand,
    CommandReply,
    GatewayCommand,
    ManualPruneCommand,
    NodeSlowdownCommand,
    RestoreAllCommand,
    RetireCommand,
    SetSettingCommand,
    SlowdownCommand,
    parse_json,
    to_json,
)
from shared.settings import GatewaySettings
from shared.topics import Topics

log = logging.getLogger(__name__)


def command_id(payload: bytes) -> str | None:
    """The ``id`` of a command, read leniently so even a command that fails validation gets its answer."""
    try:
        value = json.loads(payload.decode("utf-8")).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


class OperatorCommands:
    def __init__(self, settings: GatewaySettings, topics: Topics, operator: Overrides, data_path: DataPath,
                 placing: Placing, desired: DesiredStates):
        self.settings = settings
        self.topics = topics
        self.operator = operator
        self.data_path = data_path
        self.placing = placing
        self.desired = desired
        self._handlers = {ManualPruneCommand: self._prune, RetireCommand: self._retire,
                          SetSettingCommand: self._set, RestoreAllCommand: self._restore_all,
                          NodeSlowdownCommand: self._slowdown, CameraCommand: self._camera}

    def obey(self, payload: bytes, now: float, control: ControlLoop, out: Effects) -> None:
        """Obey an operator command and, when it carries an ``id``, answer on the reply topic either way; a refused
        command raises its BadMessage after the answer."""
        answer_to = command_id(payload)
        try:
            command = parse_json(GatewayCommand, payload).root
            handler = self._handlers.get(type(command))
            if handler is None:
                raise BadMessage("rejected_command", f"unsupported command {command.cmd!r}")
            done = handler(command, command.by or "mqtt", now, control, out)
        except BadMessage as exc:
            self._reply(answer_to, False, str(exc), now, out)
            raise
        self._reply(answer_to, True, done, now, out)

    def _reply(self, answer_to: str | None, ok: bool, message: str, now: float, out: Effects) -> None:
        if answer_to is not None:
            reply = CommandReply(id=answer_to, ok=ok, message=message[:2000], ts=now)
            # once the command's rows are committed (the operator action, a hold's desired state): an answer the page
            # shows must not outlive a gateway killed before it wrote them (docs/reliability.md, "Gateway killed")
            out.send(self.topics.component_reply(self.settings.gateway_id), to_json(reply), after_write=True)

    # --- one handler per command: returns what was done in words, raises BadMessage when it cannot be done ------
    def _prune(self, command: ManualPruneCommand, by: str, now: float, control: ControlLoop, out: Effects) -> str:
        old = control.desired.get(command.node_id)
        try:
            effects = control.manual(now, command.node_id, command.ratio)
        except ValueError as exc:
            raise BadMessage("rejected_command", f"prune {command.node_id}: {exc}") from None
        self.desired.carry_out(effects, out)
        action = "release" if command.ratio is None else "hold"
        self._log_action(now, by, action, command.node_id, old.ratio if old else None, command.ratio, out)
        return (f"{command.node_id} released to the controller" if command.ratio is None
                else f"{command.node_id} held at ratio {command.ratio:g}")

    def _retire(self, command: RetireCommand, by: str, now: float, control: ControlLoop, out: Effects) -> str:
        """Forget a node for good: clear every retained topic about it, so nothing replays for it."""
        node_id = command.node_id
        if self.placing.in_use(node_id):
            raise BadMessage("rejected_command", f"retire {node_id}: it is online and in the placement; "
                             "stop it first")
        self.placing.live.forget(node_id)
        control.forget(node_id)
        self.desired.forget(node_id, out)
        for topic in self.topics.node_topics(node_id):
            out.send(topic, b"", retain=True)
        out.write("update_node", {"node_id": node_id, "status": "retired", "status_ts": now})
        log.info("retired %s: its retained topics are cleared", node_id)
        self._log_action(now, by, "retire", node_id, None, None, out)
        return f"{node_id} retired"

    def _set(self, command: SetSettingCommand, by: str, now: float, control: ControlLoop, out: Effects) -> str:
        setting = command.setting
        try:
            old, new = self.operator.change(setting, command.value)
        except ValueError as exc:
            raise BadMessage("rejected_command", f"set {setting}: {exc}") from None
        effects = control.reconfigure(now, self.operator.controller_settings(), self.operator.slo_s,
                                      self.operator.automatic)
        self.data_path.slo.slo_s = self.operator.slo_s
        self.placing.follow_slo(self.operator.slo_s)
        self.desired.carry_out(effects, out)
        if setting == "slo_s":
            self.placing.publish(out)  # the same version: nodes keep their stage and take the new deadlines
        out.write("set_operator_setting", setting, new, now, by)
        self._log_action(now, by, f"set {setting}", "gateway", old, new, out)
        return f"{LABELS[setting]}: {old} -> {new}"

    def _restore_all(self, command: RestoreAllCommand, by: str, now: float, control: ControlLoop,
                     out: Effects) -> str:
        old = {n: d.ratio for n, d in control.desired.items()}
        try:
            effects = control.restore_all(now)
        except ValueError as exc:
            raise BadMessage("rejected_command", f"restore all: {exc}") from None
        self.desired.carry_out(effects, out)
        self._log_action(now, by, "restore_all", "*", old, {n: 0.0 for n in old}, out)
        return "every node restored to ratio 0 and handed back to the controller"

    def _slowdown(self, command: NodeSlowdownCommand, by: str, now: float, control: ControlLoop,
                  out: Effects) -> str:
        if not (command.node_id in self.placing.live.allowed or command.node_id in control.desired):
            raise BadMessage("rejected_command", f"slowdown: unknown node {command.node_id!r}")
        forwarded = SlowdownCommand(cmd="slowdown", factor=command.factor)
        out.send(self.topics.node_command(command.node_id), to_json(forwarded))
        self._log_action(now, by, "slowdown", command.node_id, None, command.factor, out)
        return f"{command.node_id} told to emulate a {command.factor:g}x slower device"

    def _camera(self, command: CameraCommand, by: str, now: float, control: ControlLoop, out: Effects) -> str:
        row = command.model_dump(exclude={"cmd", "id", "by"})
        out.write("set_camera", {**row, "updated_ts": now})
        self._log_action(now, by, "camera", command.camera_id, None, row, out)
        return f"camera {command.camera_id} deployment saved"

    def _log_action(self, now: float, by: str, action: str, target: str, old, new, out: Effects) -> None:
        log.info("operator action by %s: %s %s: %r -> %r", by, action, target, old, new)
        out.write("add_operator_action", {"ts": now, "by": by, "action": action, "target": target,
                                          "old": old, "new": new})

