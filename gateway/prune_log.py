"""Pure: the ``prune_events`` rows of the controller's actions, and what latency followed each (its follow-up).

Three pieces hold end-to-end latencies, each for its own reason: :class:`gateway.slo.SloWindows` groups *every*
result into fixed windows and forgets each once summarised; the controller keeps a sliding window that dies with
it, so a controller rebuilt for a new placement never judges it by the old one's latencies; :class:`PruneLog`
outlives those rebuilds, because an event's follow-up is due ``follow_up_s`` later, often after the rebuild it
caused.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from gateway.controller_actions import Held, Infeasible, SetRatios

log = logging.getLogger(__name__)


class PruneLog:
    def __init__(self, follow_up_s: float):
        self.follow_up_s = follow_up_s
        self.recent: deque[tuple[float, float]] = deque()  # (ts, end-to-end latency) of the last few follow-ups
        self._awaiting_follow_up: list[dict] = []
        self._last_event_ts: dict[str, float] = {}  # per event kind: keeps (ts, kind) unique

    def observe_latency(self, ts: float, e2e_s: float) -> None:
        self.recent.append((ts, e2e_s))
        # kept for 4 follow-ups, and as long as an event still awaits its follow-up (one resumed after a restart)
        horizon = min([ts - 4 * self.follow_up_s] + [r["ts"] for r in self._awaiting_follow_up])
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()

    def resume(self, events: list[dict], latencies: list[tuple[float, float]]) -> None:
        """A previous run's events (``ts``, ``kind``) whose follow-up it had not written, and the latencies of the
        results it stored after them (receipt time, end-to-end, in time order), given at start: each follow-up is
        written when due, as if the gateway had not stopped. Missed: results it received but had not stored (they
        come again from the broker, later) and those held in the broker while it was down."""
        self._awaiting_follow_up.extend({"ts": e["ts"], "kind": e["kind"]} for e in events)
        self.recent.extendleft(reversed(latencies))

    def row(self, action: SetRatios | Infeasible | Held, nodes: Sequence[str]) -> dict:
        """The prune_events row of an action over ``nodes`` (the controller's order of ``decision.ratios``).

        Rows are keyed on (ts, kind), and one decision can make several actions of one kind at one instant
        (restore-all: a hold and a release per node), so a later one is stamped a microsecond after the last:
        none overwrites another."""
        kind = {SetRatios: "set", Infeasible: "infeasible", Held: "held"}[type(action)]
        ts = max(action.ts, self._last_event_ts.get(kind, float("-inf")) + 1e-6)
        self._last_event_ts[kind] = ts
        d = action.decision
        row = {"ts": ts, "kind": kind, "policy": d.policy, "reason": action.reason,
               "source": getattr(action, "source", None),
               "ratios": dict(zip(nodes, d.ratios)), "changed": getattr(action, "ratios", {}),
               "predicted_stage_s": list(d.stage_latency_s), "predicted_bottleneck_s": d.bottleneck_s,
               "predicted_accuracy": d.accuracy, "budget_s": d.budget_s, "infeasible": d.infeasible,
               "metrics": asdict(action.metrics)}
        log.warning("prune event (%s): %s -> %s", kind, action.reason, row["ratios"])
        self._awaiting_follow_up.append(row)
        return row

    def follow_ups(self, now: float) -> list[dict]:
        """Observed latency in the ``follow_up_s`` after each event: did the decision work?"""
        done = [r for r in self._awaiting_follow_up if now >= r["ts"] + self.follow_up_s]
        self._awaiting_follow_up = [r for r in self._awaiting_follow_up if now < r["ts"] + self.follow_up_s]
        rows = []
        for row in done:
            after = np.array([lat for ts, lat in self.recent if row["ts"] < ts <= row["ts"] + self.follow_up_s])
            rows.append({"ts": row["ts"], "kind": row["kind"], "observed_count": int(after.size),
                         "observed_p50_s": float(np.percentile(after, 50)) if after.size else None,
                         "observed_p95_s": float(np.percentile(after, 95)) if after.size else None})
        return rows
