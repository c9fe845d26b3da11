"""The settings an operator may change: their names, their labels and what each accepts.

Here because two components need them: the page refuses a bad ``set`` command in words before sending it, and
the gateway checks it again when it obeys (its overrides: :mod:`gateway.operator`). Pure; bounds come from the
settings classes themselves (one source of defaults and ranges).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from shared.settings import ControllerSettings, GatewaySettings

POLICY_OFF = "off"
SWITCH = ("on", "off")
LABELS = {"slo_s": "SLO target (s)", "trigger_margin_s": "trigger margin (s)", "cooldown_s": "cooldown (s)",
          "accuracy_floor_relative": "accuracy floor (fraction of unpruned)", "policy": "policy",
          "move_blocks": "move blocks off a slowed node"}


def _adapter(setting: str) -> TypeAdapter:
    if setting == "policy":
        return TypeAdapter(str)
    owner = GatewaySettings if setting == "slo_s" else ControllerSettings
    info = owner.model_fields[setting]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])


def validate_setting(setting: str, value: Any) -> float | str:
    """The value in its proper type, or ValueError saying in words what is wrong with it."""
    if setting not in LABELS:
        raise ValueError(f"unknown setting {setting!r}; one of {', '.join(LABELS)}")
    if setting == "policy":
        allowed = [*ControllerSettings.model_fields["policy"].annotation.__args__, POLICY_OFF]
        if value not in allowed:
            raise ValueError(f"policy must be one of {', '.join(allowed)} (got {value!r})")
        return value
    if setting == "move_blocks":
        if value not in SWITCH:
            raise ValueError(f"{LABELS[setting]} must be on or off (got {value!r})")
        return value
    try:
        return _adapter(setting).validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"{LABELS[setting]}: {exc.errors()[0]['msg'].lower()} (got {value!r})") from None
