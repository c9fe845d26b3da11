"""Operator overrides of the control settings: adopt one change, merge stored overrides, rebuild settings.

Pure: no MQTT, no clock, no file I/O. Which settings there are and what each accepts is
:mod:`shared.operator_settings` (the page checks with it too). The gateway keeps the overrides in SQLite
(``operator_settings``) and, because :class:`ControllerSettings` is frozen, builds a new one from the configured
settings plus the overrides whenever the operator changes something; the control loop is then rebuilt with it.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from shared.operator_settings import LABELS, POLICY_OFF, validate_setting
from shared.settings import ControllerSettings, GatewaySettings

log = logging.getLogger(__name__)

NOT_CONTROLLER = ("slo_s", "move_blocks")  # operator settings that belong to the gateway, not the controller


class Overrides:
    """The operator's settings on top of the configured ones; ``values`` is what SQLite stores."""

    def __init__(self, gateway: GatewaySettings, controller: ControllerSettings, stored: dict[str, Any]):
        self.gateway = gateway
        self.controller = controller
        self.values: dict[str, float | str] = {}
        for setting, value in stored.items():  # a stored value the current code no longer accepts is dropped
            try:
                self.values = self._checked({**self.values, setting: validate_setting(setting, value)})
            except ValueError as exc:
                log.warning("ignoring stored operator setting %s=%r: %s", setting, value, exc)

    def current(self, setting: str) -> float | str:
        if setting in self.values:
            return self.values[setting]
        if setting == "slo_s":
            return self.gateway.slo_s
        if setting == "policy":
            return self.controller.policy
        if setting == "move_blocks":
            return "on" if self.gateway.replace_on_violation else "off"
        return getattr(self.controller, setting)

    def change(self, setting: str, value: Any) -> tuple[float | str, float | str]:
        """Validate and adopt one change; returns (old, new). ValueError leaves everything as it was."""
        new = validate_setting(setting, value)
        old = self.current(setting)
        self.values = self._checked({**self.values, setting: new})
        return old, new

    def _checked(self, values: dict[str, float | str]) -> dict[str, float | str]:
        self.controller_settings(values)  # cross-field rules (e.g. the ladder) must still hold
        return values

    def controller_settings(self, values: dict[str, float | str] | None = None) -> ControllerSettings:
        values = self.values if values is None else values
        update = {k: v for k, v in values.items()
                  if k not in NOT_CONTROLLER and not (k == "policy" and v == POLICY_OFF)}
        try:
            return ControllerSettings(**{**self.controller.model_dump(), **update})
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from None

    @property
    def slo_s(self) -> float:
        return float(self.current("slo_s"))

    @property
    def automatic(self) -> bool:
        """Policy 'off': the controller neither prunes nor restores on its own; operator holds still apply."""
        return self.current("policy") != POLICY_OFF

    @property
    def move_blocks(self) -> bool:
        """Re-partition for slowdowns (``[gateway] replace_on_violation`` unless the operator switched it)."""
        return self.current("move_blocks") == "on"

    def effective(self) -> dict[str, float | str]:
        return {setting: self.current(setting) for setting in LABELS}
