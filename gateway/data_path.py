"""The data path's accounting: which accepted frames, results, duplicates and thumbnails are stored, which frames
failed or were lost and where each was last known, and the SLO windows the counted results fall into.

Pure (time passed in, rows written into the caller's :class:`~gateway.effects.Effects`); which results count is
:class:`gateway.accounting.RequestLedger`'s judgement, this class turns its verdicts into rows and refusals.
:class:`gateway.coordinator.Coordinator` calls it and passes what counted on to the control loop.
"""

from __future__ import annotations

from collections import deque

from gateway.accounting import LOST, WARNING_KINDS, RequestLedger, Verdict
from gateway.effects import Effects
from gateway.slo import SloWindows
from gateway.store import result_row
from shared.schemas import AcceptedRequest, BadMessage, ErrorRecord, Result
from shared.settings import GatewaySettings


class DataPath:
    def __init__(self, settings: GatewaySettings, slo_s: float, open_requests: list[dict]):
        """``open_requests``: the requests the database remembers as accepted and not yet ended."""
        self.settings = settings
        self.slo = SloWindows(settings.window_s, slo_s)
        self.ledger = RequestLedger()
        for row in open_requests:
            self.ledger.restore(row["request_id"], row["camera_id"], row["received_ts"], bool(row["stored"]),
                                row["reason"], row.get("node_id"))
        self.redelivered_results = 0
        self._departures: deque[tuple[float, str]] = deque()  # (when, node) a node went offline or silent

    def result(self, result: Result, payload: bytes, now: float, out: Effects) -> dict | None:
        """Count each accepted request once (gateway/accounting.py): QoS 1 may deliver a result twice, and the
        first delivery is the one kept; a result no stage 1 announced, or a different second one, is refused,
        unless it is the same frame served twice (a ``duplicates`` row).

        Returns the stored row (for the controller) when the result counts. The SLO windows judge its latency to
        the last stage's finish (``e2e_s``); a window takes it when it arrives (``now``), since a window once
        closed takes no more."""
        row = {**result_row(result), "received_ts": now}
        verdict = self.ledger.result(result.request_id, result.camera_id, payload, result.capture_ts)
        if verdict is Verdict.REDELIVERED:
            self.redelivered_results += 1
            return None
        if verdict is Verdict.DUPLICATE:  # served twice: counted in the accounting, not an error; the first stays
            out.write("add_duplicate", {"request_id": result.request_id, "ts": now,
                                        "node_id": result.hops[-1].node_id, "label": result.label,
                                        "confidence": result.confidence})
            return None
        if verdict not in (Verdict.UNKNOWN, Verdict.CONFLICT):
            self.slo.add(now, row["e2e_s"], row["correct"])
            out.write("add_request", row)
            return row
        why = ("no stage 1 accepted this request" if verdict is Verdict.UNKNOWN
               else "a different result for this request came first (or another camera's)")
        raise BadMessage(f"{verdict.value}_result", f"result for {result.request_id[:128]!r} from camera "
                         f"{result.camera_id} not stored: {why}")

    def accepted(self, accepted: AcceptedRequest, now: float, out: Effects) -> bool:
        """A frame stage 1 announced; True the first time (it counts as an arrival)."""
        if not self.ledger.accept(accepted.request_id, accepted.camera_id, now, accepted.node_id):
            return False
        out.write("add_accepted", accepted.model_dump())
        return True

    def thumbnail(self, node_id: str, request_id: str, jpeg: bytes, now: float, out: Effects) -> None:
        """Store a (checked: shared/thumbnail.py) thumbnail of a frame ``node_id`` itself accepted, once."""
        camera_id = self.ledger.thumbnail(request_id, node_id)
        if camera_id is None:
            raise BadMessage("unknown_thumbnail", f"thumbnail of {request_id[:128]!r} from {node_id} not stored: "
                             "that node accepted no such frame, or sent its thumbnail already")
        out.write("add_thumbnail", {"request_id": request_id, "camera_id": camera_id, "ts": now,
                                    "bytes": len(jpeg), "jpeg": jpeg})

    def error(self, record: ErrorRecord, out: Effects) -> None:
        """Store an error record; one that names a frame a pipeline node (or this gateway) gave up on ends it."""
        out.write("add_error", record.model_dump())
        # only a pipeline node (or this gateway) can end a frame: a camera's or the page's error is stored, never
        # turned into a frame's failure
        may_fail_frames = record.component in self.settings.nodes or record.component == self.settings.gateway_id
        if record.request_id and record.component in self.settings.nodes:
            self.ledger.held_by(record.request_id, record.component)
        if record.request_id and record.kind not in WARNING_KINDS and may_fail_frames:
            if self.ledger.fail(record.request_id, record.kind):
                out.write("add_failure", {"request_id": record.request_id, "ts": record.ts,
                                          "reason": record.kind, "component": record.component,
                                          "node_id": self.ledger.last_known(record.request_id)[1],
                                          "message": record.message})

    def departed(self, node_id: str, now: float) -> None:
        """A node went offline or silent: frames lost meanwhile name it (kept for as long as a frame can be lost)."""
        self._departures.append((now, node_id))
        while self._departures and self._departures[0][0] < now - 2 * self.settings.result_timeout_s:
            self._departures.popleft()

    def expire(self, now: float) -> list[str]:
        """The requests given up as lost now (their rows are :meth:`lost_row`'s)."""
        return self.ledger.expire(now, self.settings.result_timeout_s)

    def lost_row(self, request_id: str, now: float) -> dict:
        """A frame given up as lost, with where it was last known to be and which nodes left while it was in
        flight (the likely place it died: the gateway hears of a frame only from stage 1, a node's report or its
        result, not from every hop)."""
        accepted_ts, node_id = self.ledger.last_known(request_id)
        gone = sorted({n for ts, n in self._departures if accepted_ts is not None and ts >= accepted_ts})
        where = f"; last known at {node_id}" if node_id else ""
        left = f"; offline or silent while it was in flight: {', '.join(gone)}" if gone else ""
        return {"request_id": request_id, "ts": now, "reason": LOST, "component": self.settings.gateway_id,
                "node_id": node_id, "message": f"no result or failure report within "
                f"{self.settings.result_timeout_s:g} s{where}{left}"}
