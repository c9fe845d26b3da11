"""The nodes' retained desired prune states (``prune/set``): only this gateway writes them.

Pure. What the control loop decides goes out through :meth:`DesiredStates.carry_out` (remembered as the gateway's
own, and persisted so a restarted gateway still knows them); a state that comes back on the topic is either the
gateway's own (its sequence numbers continue) or forged, and then overwritten above the forged sequence number.
A restarted gateway takes its states (each node's ratio, and whether the operator holds it: ``source``) from its
database at start (:meth:`DesiredStates.recall`): they are its own record, in force before any retained copy comes
back, and the retained copies are checked against them.
"""

from __future__ import annotations

import logging

from gateway.accounting import DesiredGuard
from gateway.control_loop import ControlLoop
from gateway.control_loop import Effects as ControlEffects
from gateway.effects import Effects
from shared.schemas import BadMessage, PruneDesired, parse_json, to_json
from shared.topics import Topics

log = logging.getLogger(__name__)


class DesiredStates:
    def __init__(self, topics: Topics, issued: dict[str, bytes]):
        """``issued``: the desired states the database remembers this gateway publishing, per node."""
        self.topics = topics
        self.guard = DesiredGuard(issued)

    def recall(self, issued: dict[str, bytes], control: ControlLoop) -> None:
        """The states the database remembers this gateway issuing, back in force at start (ratios and holds)."""
        for node_id, payload in issued.items():
            try:
                control.recover_desired(node_id, PruneDesired.model_validate_json(payload))
            except ValueError as exc:  # written by an older version that no longer validates: the retained one decides
                log.warning("ignoring the stored desired state of %s: %s", node_id, exc)

    def carry_out(self, effects: ControlEffects, out: Effects) -> None:
        """The control loop's decisions: retained desired states (remembered as our own) and prune_events rows."""
        for node_id, desired in effects.publish.items():
            payload = to_json(desired)
            self.guard.issue(node_id, payload)
            out.write("set_issued_desired", node_id, payload)
            out.send(self.topics.node_prune_desired(node_id), payload, retain=True, after_write=True)
        for row in effects.events:
            out.write("add_prune_event", row)

    def received(self, node_id: str, payload: bytes, now: float, control: ControlLoop, out: Effects) -> None:
        """Our retained desired states come back after a restart: continue their seq numbers."""
        if not self.guard.own(node_id, payload):
            self._overwrite_foreign(node_id, payload, now, control, out)
            raise BadMessage("foreign_desired", f"desired prune state on {self.topics.node_prune_desired(node_id)} "
                             f"was not issued by this gateway and was overwritten: {payload[:200]!r}")
        control.recover_desired(node_id, parse_json(PruneDesired, payload))

    def _overwrite_foreign(self, node_id: str, payload: bytes, now: float, control: ControlLoop,
                           out: Effects) -> None:
        """Only this gateway writes prune/set: re-issue its own state (unpruned if none) above the forged seq,
        since the node may already have applied the forgery and ignores lower sequence numbers."""
        try:
            forged_seq = PruneDesired.model_validate_json(payload).seq
        except ValueError:
            forged_seq = -1  # unreadable: the node rejected it too
        ours = self.guard.issued(node_id)
        base = PruneDesired.model_validate_json(ours) if ours else PruneDesired(ratio=0.0, seq=0, issued_at=0.0)
        corrected = base.model_copy(update={"seq": max(base.seq, forged_seq) + 1, "issued_at": now,
                                            "reason": "overwrote a desired state this gateway did not issue"})
        control.recover_desired(node_id, corrected)
        self.carry_out(ControlEffects(publish={node_id: corrected}), out)

    def forget(self, node_id: str, out: Effects) -> None:
        """A retired node: its state is no longer ours to defend, nor to recall at the next start."""
        self.guard.forget(node_id)
        out.write("set_issued_desired", node_id, b"")
