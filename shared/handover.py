"""The hand-over marker: how a stage topic's old reader tells its new one where it stopped (docs/placement.md).

When a move gives a stage's activation topic another reader, the old reader, once it has switched to its new job,
publishes on that topic an empty message whose MQTT v5 user properties name it and the last input it took from the
topic. Every subscriber of the topic sees the topic's messages in one order (one broker), so the new reader knows
that the inputs up to that one were served and the ones after it were not (``node_agent/input_handover.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas import BadMessage

FROM = "handover_from"  # user property: the node that stopped reading the topic
LAST = "handover_last"  # user property: the request id of the last input it took from it ("" if none)
MAX_ID = 256


@dataclass(frozen=True)
class Marker:
    from_node: str
    last_request_id: str | None


def marker_user(node_id: str, last_request_id: str | None) -> dict[str, str]:
    """The user properties of ``node_id``'s marker (its payload is empty)."""
    return {FROM: node_id, LAST: last_request_id or ""}


def is_marker(user: dict[str, str]) -> bool:
    return FROM in user


def parse_marker(payload: bytes, user: dict[str, str]) -> Marker:
    """The marker these user properties carry; :class:`BadMessage` if it is malformed."""
    from_node, last = user.get(FROM, ""), user.get(LAST, "")
    if payload or not from_node or len(from_node) > MAX_ID or len(last) > MAX_ID:
        raise BadMessage("bad_handover", f"hand-over marker from {from_node[:64]!r}: an empty payload, a node id "
                         f"and a request id of at most {MAX_ID} characters expected")
    return Marker(from_node, last or None)
