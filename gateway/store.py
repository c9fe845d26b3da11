"""SQLite storage for the gateway (writer) and the web page (readers), through sqlite-utils.

One writer: :class:`Store` buffers rows and writes them in one transaction per
:meth:`Store.flush`, called from the gateway's tick thread. Readers open the file read-only,
so the web page can never block or corrupt the gateway's writes (WAL mode lets them run
side by side). The schema is documented in docs/database.md.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import quote

import sqlite_utils
from pydantic import TypeAdapter

from gateway.handback import HeldInput
from gateway.retention import DiskMode
from shared.schemas import INGEST_STAGE, Hop, Result

log = logging.getLogger(__name__)

WriteMode = Literal["upsert", "insert_ignore", "insert"]
JsonValue = object  # a column holding any JSON value (a number, a string, a list, null)


class JsonText(str):
    """A JSON column's value already written as JSON (by pydantic, in Rust): stored as it is, not encoded again."""


HOPS = TypeAdapter(list[Hop])


class Table(NamedTuple):
    """A table: its columns (``list``, ``dict`` and :data:`JsonValue` columns hold JSON), primary key, and how
    rows are written.

    ``upsert``: the latest state wins and partial rows (a node's stats, an event's follow-up) merge;
    ``insert_ignore``: the first row with a key stays (QoS 1 may redeliver a result); ``insert``: every row.
    """

    columns: dict[str, type]
    pk: str | tuple[str, ...]
    write: WriteMode

    @property
    def json_columns(self) -> frozenset[str]:
        return frozenset(name for name, kind in self.columns.items() if kind in (list, dict, JsonValue))

    @property
    def sql_columns(self) -> dict[str, type]:
        """The column types SQLite is given: a JSON value is stored as text."""
        return {name: str if kind is JsonValue else kind for name, kind in self.columns.items()}


SITE_SCHEMA: dict[str, Table] = {
    "requests": Table({
        "request_id": str, "camera_id": str, "capture_ts": float, "finish_ts": float, "e2e_s": float,
        "queue_s": float, "compute_s": float, "transfer_s": float, "label": str, "label_index": int,
        "confidence": float, "prune_ratios": list, "hops": list, "decode_s": float, "true_label": int,
        "correct": int, "scientific_name": str, "late": int, "received_ts": float,
    }, "request_id", "insert_ignore"),
    "windows": Table({
        "start_ts": float, "end_ts": float, "count": int, "slo_s": float, "met": int,
        "attainment_pct": float, "p50_s": float, "p95_s": float, "p99_s": float, "labelled": int,
        "accuracy_measured": float,
    }, "start_ts", "insert_ignore"),
    "nodes": Table({
        "node_id": str, "status": str, "status_ts": float, "last_seen": float, "stage": int,
        "first_block": int, "last_block": int, "placement_version": int, "queue_depth": int,
        "queue_capacity": int, "processed": int, "dropped": int, "errors": dict,
        "compute_mean_s": float, "compute_p95_s": float, "queue_wait_mean_s": float,
        "cpu_percent": float, "prune_ratio": float, "emulated_slowdown": float, "decode_mean_s": float,
        "clock_offset_s": float, "late_served": int,
    }, "node_id", "upsert"),
    "errors": Table({
        "id": int, "ts": float, "component": str, "topic": str, "kind": str, "message": str,
        "request_id": str,
    }, "id", "insert"),
    "runs": Table({
        "started_ts": float, "gateway_id": str, "slo_s": float, "window_s": float, "nodes": list,
        "max_clock_offset_s": float,
    }, "started_ts", "insert_ignore"),
    "profiles": Table({  # the offer exactly as the node sent it (str), validated again when read back
        "node_id": str, "model_fingerprint": str, "ts": float, "memory_mb": float, "uplink_mbit_s": float,
        "profile": str,
    }, ("node_id", "model_fingerprint"), "upsert"),
    "calibrations": Table({
        "node_id": str, "measured_at": float, "placement_version": int, "first_block": int, "last_block": int,
        "fit": dict, "best": str, "r2_linear": float, "r2_quadratic": float,
    }, ("node_id", "measured_at"), "upsert"),
    "prune_events": Table({
        "ts": float, "kind": str, "policy": str, "source": str, "reason": str, "ratios": dict, "changed": dict,
        "predicted_stage_s": list, "predicted_bottleneck_s": float, "predicted_accuracy": float, "budget_s": float,
        "infeasible": int, "metrics": dict, "observed_count": int, "observed_p50_s": float, "observed_p95_s": float,
    }, ("ts", "kind"), "upsert"),
    "controller": Table({
        "id": int, "ts": float, "status": dict,
    }, "id", "upsert"),
    "placements": Table({
        "version": int, "issued_at": float, "model": str, "n_blocks": int, "stages": list,
        "bottleneck_s": float, "ingest_node": str,
    }, "version", "insert_ignore"),
    "operator_settings": Table({
        "setting": str, "value": JsonValue, "ts": float, "by": str,
    }, "setting", "upsert"),
    "operator_actions": Table({
        "id": int, "ts": float, "by": str, "action": str, "target": str, "old": JsonValue, "new": JsonValue,
    }, "id", "insert"),
    "cameras": Table({
        "camera_id": str, "location_name": str, "latitude": float, "longitude": float, "start_ts": float,
        "end_ts": float, "updated_ts": float,
    }, "camera_id", "upsert"),
    # Accounting (gateway/accounting.py): every frame stage 1 accepted ends as one `requests` row or one failure.
    "accepted": Table({
        "request_id": str, "camera_id": str, "node_id": str, "capture_ts": float, "received_ts": float,
        "claimed_capture_ts": float,
    }, "request_id", "insert_ignore"),
    "failures": Table({
        "request_id": str, "ts": float, "reason": str, "component": str, "message": str, "node_id": str,
    }, "request_id", "insert_ignore"),
    # A frame served twice (a replica killed between publishing and acknowledging): the first result is the row.
    "duplicates": Table({
        "request_id": str, "ts": float, "node_id": str, "label": str, "confidence": float,
    }, ("request_id", "ts"), "insert_ignore"),
    "issued_desired": Table({"node_id": str, "payload": str}, "node_id", "upsert"),
    # A gone node's broker session the gateway is to take over (gateway/placing.py), by the input it subscribed to (a
    # replica's share group names the run's token: kept here only, shown nowhere); empty once done or the node is back
    "takeovers": Table({"node_id": str, "served": str, "ts": float}, "node_id", "upsert"),
    # Inputs taken back from a gone node's session that wait for a stage to read them (gateway/handback.py): the
    # broker no longer has them, so a restarted gateway takes them from here; done (and the payload dropped) once sent
    "held_inputs": Table({"key": str, "topic": str, "payload": bytes, "user": dict, "next_block": int,
                          "since": float, "done": int}, "key", "upsert"),
    # `[gateway] thumbnail_budget_mb`: a small JPEG of each frame (shared/thumbnail.py), oldest deleted past the budget
    "thumbnails": Table({"request_id": str, "camera_id": str, "ts": float, "bytes": int, "jpeg": bytes},
                        "request_id", "insert_ignore"),
}
# A column an older file gains, filled from the rows it already has: before `received_ts`, `finish_ts` was the
# gateway's receipt of the result (it is now the last stage's publish time).
BACKFILL = {("requests", "received_ts"): "finish_ts"}
INDEXES = {"requests": [["finish_ts"], ["camera_id", "capture_ts"], ["e2e_s"], ["capture_ts", "request_id"],
                        ["received_ts"]],  # retention ages results by it (gateway/retention.py)
           "errors": [["ts"]], "operator_actions": [["ts"]], "accepted": [["received_ts"]], "thumbnails": [["ts"]]}
# Tables whose rows are bulky keep fewer unwritten rows than max_pending while the disk fails (memory on a Pi).
MAX_PENDING = {"thumbnails": 256}
MAX_BACKOFF_S = 30.0

# --- the central store (gateway/collect.py): every site's rows, in the gateway's own table definitions --------------
CENTRAL_COLUMNS: dict[str, type] = {"site": str, "deployment": str, "model_fingerprint": str}


def central_table(table: Table, pk: tuple[str, ...] | None = None, drop: tuple[str, ...] = (),
                  write: WriteMode | None = None) -> Table:
    """``table`` as the centre keeps it: where each row came from first (the site, the camera's deployment
    ``<site>/<camera_id>``, the fingerprint of the model that classified it; NULL where a row has none), the site's
    own columns, then ``received_at`` (when the centre got it), and the site in the key."""
    own = (table.pk,) if isinstance(table.pk, str) else table.pk
    columns = {name: kind for name, kind in table.columns.items() if name not in drop}
    return Table({**CENTRAL_COLUMNS, **columns, "received_at": float}, ("site", *(pk or own)), write or table.write)


CENTRAL_SCHEMA: dict[str, Table] = {
    # a bridge's redelivery or a collector restart stores nothing twice: every table is keyed and insert_ignore
    # the centre knows when it got a row (received_at), not when the site's gateway did
    "requests": central_table(SITE_SCHEMA["requests"], drop=("received_ts",)),
    "errors": central_table(SITE_SCHEMA["errors"], pk=("component", "ts", "kind", "topic"), drop=("id",),
                            write="insert_ignore"),
    "node_status": central_table(Table({"component": str, "kind": str, "status": str}, "kind", "insert_ignore"),
                                 pk=("kind", "component", "received_at")),
    "cameras": central_table(SITE_SCHEMA["cameras"], drop=("updated_ts",), write="upsert"),  # its camera deployments
    "models": Table({"site": str, "node_id": str, "model_fingerprint": str, "received_at": float},
                    ("site", "node_id"), "upsert"),  # which model each site's node runs (its retained profile)
}
# The ecologists' aggregate over a time window (rows and mean confidence per site and label, docs/scaling.md) can
# be answered from the first index alone: in PostgreSQL, once vacuumed, an index-only scan of 1/16 of the pages.
CENTRAL_INDEXES = {"requests": [["capture_ts", "site", "label", "confidence"], ["site", "camera_id", "capture_ts"],
                                ["received_at"]],
                   "errors": [["ts"]]}
CENTRAL_RETIRED_INDEXES = {"requests": [["capture_ts"]]}  # dropped at start: the covering index above took its place


def result_row(result: Result) -> dict:
    """One `requests` row: where the time of a request went (the gateway's and, keyed by site, the centre's).

    End to end runs from capture to the last stage's publish time, not to whenever the result reaches a gateway
    or the centre: results the broker held while the gateway was down are not slow frames (docs/database.md).
    The gateway adds its own receipt as ``received_ts``."""
    finish_ts = result.hops[-1].published_ts
    e2e = finish_ts - result.capture_ts
    queue_s = sum(h.queue_s for h in result.hops)
    compute_s = sum(h.compute_s for h in result.hops)
    decode_s = sum(h.decode_s for h in result.hops)
    return {
        "request_id": result.request_id, "camera_id": result.camera_id, "capture_ts": result.capture_ts,
        "finish_ts": finish_ts, "e2e_s": e2e, "queue_s": queue_s, "compute_s": compute_s, "decode_s": decode_s,
        "transfer_s": e2e - queue_s - decode_s - compute_s, "label": result.label, "label_index": result.label_index,
        "scientific_name": result.scientific_name, "confidence": result.confidence,
        "prune_ratios": [h.prune_ratio for h in result.hops if h.stage != INGEST_STAGE],
        "hops": JsonText(HOPS.dump_json(result.hops).decode()), "true_label": result.true_label,
        "late": int(any(h.deferred for h in result.hops)),
        "correct": None if result.true_label is None else int(result.label_index == result.true_label),
    }


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=float)  # numpy scalars become plain numbers


def encode_row(row: dict, json_columns: dict[str, bool]) -> dict:
    """The row as stored: its JSON columns (:func:`json_columns`) as compact JSON text."""
    encoded = dict(row)
    for k in json_columns.keys() & row.keys():
        v = row[k]
        # a JSON value column stores null as "null" (the value was given); a list/dict column left out is NULL
        if not isinstance(v, JsonText) and (v is not None or json_columns[k]):
            encoded[k] = _json(v)
    return encoded


def json_columns(table: Table) -> dict[str, bool]:
    """``table``'s JSON columns, each with whether None is stored as JSON ``null`` (a :data:`JsonValue` column)."""
    return {name: table.columns[name] is JsonValue for name in table.json_columns}


def decode_row(table: str, row: dict) -> dict:
    """Inverse of :func:`encode_row` for the columns present (an empty or NULL JSON column reads as None)."""
    json_columns = SITE_SCHEMA[table].json_columns
    return {k: (json.loads(v) if v else None) if k in json_columns else v for k, v in row.items()}


class Store:
    """The gateway's single writer. Methods only buffer; :meth:`flush` writes.

    Buffering never blocks on the disk: a writer thread (:meth:`start_writer`) flushes in the
    background, so a slow or failing SD card never delays a control decision. While writes fail the
    buffer keeps at most ``max_pending`` rows per table, dropping the oldest (counted in
    :attr:`dropped`), and the writer retries with back-off.
    """

    def __init__(self, path: Path, max_pending: int = 20_000, schema: dict[str, Table] = SITE_SCHEMA,
                 indexes: dict[str, list[list[str]]] = INDEXES):
        self.path = path
        self.schema = schema  # SITE_SCHEMA at a gateway, CENTRAL_SCHEMA in the central collector (gateway/collect.py)
        self._json_columns = {name: json_columns(table) for name, table in schema.items()}  # once, not per row
        self.db = self._open(schema, indexes)
        self.max_pending = max_pending
        self.dropped: Counter[str] = Counter()  # table -> rows dropped because the buffer was full
        self.write_failures = 0
        self._lock = threading.Lock()
        self._pending: dict[str, deque[dict]] = {name: deque() for name in schema}
        self._after_commit: list[Callable[[], None]] = []
        self._after_write: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._soon = threading.Event()  # something waits for the next write (after_write): do it now
        self._writer: threading.Thread | None = None
        self.disk_mode = DiskMode.NORMAL  # set by the gateway's disk guard (gateway/retention.py)

    def _open(self, schema: dict[str, Table], indexes: dict[str, list[list[str]]]) -> sqlite_utils.Database:
        """The SQLite file (WAL) with every table and index of ``schema``; columns an older file lacks are added."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite_utils.Database(sqlite3.connect(str(self.path), check_same_thread=False))
        db.enable_wal()
        db.execute("PRAGMA synchronous=NORMAL")
        for name, table in schema.items():
            db[name].create(table.sql_columns, pk=table.pk, if_not_exists=True)
            had = db[name].columns_dict.keys()
            for column in table.columns.keys() - had:  # a file from an older version
                db[name].add_column(column, table.sql_columns[column])
                if BACKFILL.get((name, column)) in had:
                    db.execute(f"UPDATE [{name}] SET [{column}] = [{BACKFILL[name, column]}]")
        for name, table_indexes in indexes.items():
            for cols in table_indexes:
                db[name].create_index(cols, if_not_exists=True)
        return db

    def add_request(self, row: dict) -> None:
        if self.disk_mode is DiskMode.WINDOWS_ONLY:
            return
        if self.disk_mode is DiskMode.LEAN:
            row = dict(row, hops=None)
        self._buffer("requests", row)

    def add_thumbnail(self, row: dict) -> None:
        """A frame's thumbnail; none while the disk guard sheds detail (they are the bulkiest rows)."""
        if self.disk_mode is DiskMode.NORMAL:
            self._buffer("thumbnails", row)

    def trim_thumbnails(self, budget_bytes: int) -> int:
        """Delete the oldest thumbnails until the rest fit in ``budget_bytes``; returns how many were deleted."""
        with self.db.conn:
            return self.db.execute(
                "DELETE FROM thumbnails WHERE request_id IN (SELECT request_id FROM (SELECT request_id, "
                "SUM(bytes) OVER (ORDER BY ts DESC, request_id DESC) AS kept FROM thumbnails) WHERE kept > ?)",
                [budget_bytes]).rowcount

    def add_window(self, row: dict) -> None:
        self._buffer("windows", row)

    def update_node(self, row: dict) -> None:
        """Merge known fields of a node (status or stats), keeping the others."""
        self._buffer("nodes", row)

    def add_error(self, row: dict) -> None:
        self._buffer("errors", row)

    def add_run(self, row: dict) -> None:
        """One row per gateway start: the SLO and window the following rows are judged against."""
        self._buffer("runs", row)

    def add_profile(self, row: dict) -> None:
        self._buffer("profiles", row)

    def stored_offers(self, fingerprint: str) -> list[str]:
        """Profiles nodes offered before (for this model), so a restarted gateway can plan at once."""
        return [r["profile"] for r in self.db["profiles"].rows_where("model_fingerprint = ?", [fingerprint])]

    def add_calibration(self, row: dict) -> None:
        self._buffer("calibrations", row)

    def add_prune_event(self, row: dict) -> None:
        """A new event, or a follow-up (same ``ts`` and ``kind``) adding the latency observed after it."""
        self._buffer("prune_events", row)

    def set_controller_status(self, ts: float, status: dict) -> None:
        self._buffer("controller", {"id": 1, "ts": ts, "status": status})

    def add_placement(self, row: dict) -> None:
        self._buffer("placements", row)

    def set_operator_setting(self, setting: str, value: float | str, ts: float, by: str) -> None:
        self._buffer("operator_settings", {"setting": setting, "value": value, "ts": ts, "by": by})

    def operator_settings(self) -> dict[str, float | str]:
        """What operators set before, so a restarted gateway keeps it."""
        return {r["setting"]: decode_row("operator_settings", r)["value"] for r in self.db["operator_settings"].rows}

    def add_operator_action(self, row: dict) -> None:
        """Who did what when; ``old`` and ``new`` are JSON values (null when there is none)."""
        self._buffer("operator_actions", row)

    def set_camera(self, row: dict) -> None:
        self._buffer("cameras", row)

    def add_accepted(self, row: dict) -> None:
        self._buffer("accepted", row)

    def add_failure(self, row: dict) -> None:
        """An accepted frame that will not become a row, with the reason (first report wins)."""
        self._buffer("failures", row)

    def add_duplicate(self, row: dict) -> None:
        """A second result of a stored frame (served twice); counted, never a second row."""
        self._buffer("duplicates", row)

    def set_issued_desired(self, node_id: str, payload: bytes) -> None:
        """The desired prune state last issued to ``node_id``; empty: forgotten (a retired node)."""
        self._buffer("issued_desired", {"node_id": node_id, "payload": payload.decode()})

    def issued_desired(self) -> dict[str, bytes]:
        """The desired prune states this gateway last issued, by node: in force again at a restart, and what tells
        the retained copies from forgeries."""
        return {r["node_id"]: r["payload"].encode() for r in self.db["issued_desired"].rows if r["payload"]}

    def set_takeover(self, node_id: str, served: str, ts: float) -> None:
        """A gone node's session to take over, by the input it subscribed to; empty: done, or the node is back."""
        self._buffer("takeovers", {"node_id": node_id, "served": served, "ts": ts})

    def pending_takeovers(self) -> dict[str, str]:
        """The takeovers a previous run had not carried out: a restarted gateway carries them out."""
        return {r["node_id"]: r["served"] for r in self.db["takeovers"].rows if r["served"]}

    def hold_input(self, row: dict) -> None:
        """An input taken back and waiting (``done`` 0), or sent or given up (``done`` 1, payload dropped)."""
        self._buffer("held_inputs", row)

    def held_inputs(self, since_ts: float) -> list[HeldInput]:
        """The inputs a previous run held for a stage and had not sent, taken back since ``since_ts``."""
        rows = self.db.execute("SELECT topic, payload, user, next_block, since FROM held_inputs "
                               "WHERE done = 0 AND since >= ? ORDER BY since", [since_ts]).fetchall()
        return [HeldInput(topic, bytes(payload), json.loads(user) if user else {}, next_block, since)
                for topic, payload, user, next_block, since in rows]

    def last_placement_version(self) -> int:
        """The version of the last placement this gateway published (0: none): a restarted one places above it."""
        return self.db.execute("SELECT COALESCE(MAX(version), 0) FROM placements").fetchone()[0]

    def open_requests(self, since_ts: float) -> list[dict]:
        """Accepted since ``since_ts``: whether each has a row or a failure (rebuilds the ledger at start)."""
        return list(self.db.query(
            "SELECT a.request_id, a.camera_id, a.received_ts, a.node_id, r.request_id IS NOT NULL AS stored, f.reason "
            "FROM accepted a LEFT JOIN requests r USING (request_id) LEFT JOIN failures f USING (request_id) "
            "WHERE a.received_ts >= ? ORDER BY a.received_ts", [since_ts]))

    def awaiting_follow_ups(self, since_ts: float, follow_up_s: float) -> tuple[list[dict],
                                                                              list[tuple[float, float]]]:
        """Prune events since ``since_ts`` whose follow-up a previous run had not written, and (receipt time, e2e_s)
        of the results stored in their follow-up windows, in time order: a restarted gateway writes those follow-ups
        (:meth:`gateway.prune_log.PruneLog.resume`)."""
        events = [{"ts": ts, "kind": kind} for ts, kind in self.db.execute(
            "SELECT ts, kind FROM prune_events WHERE observed_count IS NULL AND ts >= ? ORDER BY ts", [since_ts])]
        if not events:
            return [], []
        latencies = self.db.execute(
            "SELECT received_ts, e2e_s FROM requests WHERE received_ts > ? AND received_ts <= ? AND e2e_s IS NOT NULL "
            "ORDER BY received_ts", [events[0]["ts"], events[-1]["ts"] + follow_up_s]).fetchall()
        return events, [(ts, e2e_s) for ts, e2e_s in latencies]

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the thread that writes) once every row buffered so far is committed.

        The gateway acknowledges an MQTT message this way, after the rows it carries are on disk, so a crash
        (SIGKILL, power cut) before the write makes the broker send the message again instead of losing it.
        """
        with self._lock:
            self._after_commit.append(callback)

    def after_write(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the thread that writes) once every row buffered so far is committed, or their write
        failed. The gateway publishes its retained desired prune states this way: a SIGKILL before the write can no
        longer leave a node (and the page) with a state the restarted gateway does not recall, and control still
        goes on while the disk fails (then without that guarantee)."""
        with self._lock:
            self._after_write.append(callback)
        self._soon.set()

    def add(self, table: str, row: dict) -> None:
        """Buffer one row of ``table`` (of this store's schema)."""
        self._buffer(table, row)

    def _buffer(self, table: str, row: dict) -> None:
        row = encode_row(row, self._json_columns[table])
        with self._lock:
            self._keep_bounded(table, [row])

    def _keep_bounded(self, table: str, rows: list[dict]) -> None:
        """Append ``rows`` to the table's buffer, dropping the oldest beyond ``max_pending`` (caller holds the lock)."""
        pending = self._pending[table]
        pending.extend(rows)
        limit = min(self.max_pending, MAX_PENDING.get(table, self.max_pending))
        excess = len(pending) - limit
        if excess > 0:
            for _ in range(excess):
                pending.popleft()
            before = self.dropped[table]
            self.dropped[table] += excess
            if before == 0 or before // 1000 != self.dropped[table] // 1000:
                log.error("database writes are failing: dropped the %d oldest unwritten %s rows so far "
                          "(buffer full at %d)", self.dropped[table], table, limit)

    def flush(self) -> int:
        """Write everything buffered in one transaction; returns the number of rows written.

        If the write fails, the rows go back to the front of the buffer (still bounded) and the error
        is raised: nothing is lost that the bound does not drop.
        """
        with self._lock:
            pending = {name: list(rows) for name, rows in self._pending.items() if rows}
            for rows in self._pending.values():
                rows.clear()
            committed, self._after_commit = self._after_commit, []
            written_or_not, self._after_write = self._after_write, []
        try:
            written = self._write(pending)
        except Exception:
            with self._lock:
                for name, rows in pending.items():
                    newer = list(self._pending[name])
                    self._pending[name].clear()
                    self._keep_bounded(name, rows + newer)
                self._after_commit[:0] = committed
            self._call(written_or_not)
            raise
        self._call(committed + written_or_not)
        return written

    @staticmethod
    def _call(callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:  # e.g. the connection is gone: the broker re-sends what was not acknowledged
                log.exception("after-write callback failed")

    def _write(self, pending: dict[str, list[dict]]) -> int:
        written = 0
        with self.db.conn:
            for name, rows in pending.items():
                table = self.schema[name]
                if table.write == "upsert":
                    for row in rows:
                        self.db[name].upsert(row, pk=table.pk)
                else:
                    self.db[name].insert_all(rows, ignore=table.write == "insert_ignore")
                written += len(rows)
        return written

    def delete_older(self, cutoffs: dict[str, tuple[str, float]]) -> dict[str, int]:
        """Delete rows older than each table's cutoff (:func:`gateway.retention.cutoffs`); rows deleted per table."""
        deleted = {}
        with self.db.conn:
            for table, (column, oldest_kept) in cutoffs.items():
                deleted[table] = self.db.execute(f"DELETE FROM [{table}] WHERE [{column}] < ?", [oldest_kept]).rowcount
        return deleted

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it, so the -wal file cannot grow for weeks."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def start_writer(self, interval_s: float, on_failure: Callable[[Exception], None],
                     maintain: Callable[[float], None] | None = None, maintain_every_s: float = 600.0) -> None:
        """Flush every ``interval_s`` in a thread of its own; on failure call ``on_failure`` and back off.

        ``maintain(now)`` (retention, WAL, disk guard) runs in the same thread every ``maintain_every_s``:
        it is the only thread that writes to the database.
        """
        self._writer = threading.Thread(target=self._write_forever,
                                        args=(interval_s, on_failure, maintain, maintain_every_s),
                                        name="gateway-db-writer", daemon=True)
        self._writer.start()

    def _write_forever(self, interval_s: float, on_failure: Callable[[Exception], None],
                       maintain: Callable[[float], None] | None, maintain_every_s: float) -> None:
        delay = interval_s
        next_maintenance = 0.0
        while not self._wait(delay, backing_off=delay != interval_s):
            try:
                self.flush()
                if maintain is not None and time.time() >= next_maintenance:
                    next_maintenance = time.time() + maintain_every_s
                    maintain(time.time())
                if delay != interval_s:
                    log.warning("database writes work again (after %d failures)", self.write_failures)
                delay = interval_s
            except Exception as exc:  # a full SD card or a locked file: keep the rows, retry later
                self.write_failures += 1
                delay = min(MAX_BACKOFF_S, 2 * delay)
                log.exception("writing %s failed (%d so far); retrying in %.1f s", self.path,
                              self.write_failures, delay)
                on_failure(exc)

    def _wait(self, delay: float, backing_off: bool) -> bool:
        """Until the next write: ``delay``, or less when a callback waits for it (:meth:`after_write`: a prune
        command is not held back by the batching of results), unless the last write failed. True: stop."""
        if backing_off:
            return self._stop.wait(delay)
        self._soon.wait(delay)
        self._soon.clear()
        return self._stop.is_set()

    def close(self) -> None:
        """Stop the writer and write what is left (if the disk still refuses, say how much is lost)."""
        self._stop.set()
        self._soon.set()
        if self._writer is not None:
            self._writer.join(timeout=MAX_BACKOFF_S + 5)
        try:
            self.flush()
        except Exception:
            log.exception("final write of %s failed: %d buffered rows are lost", self.path,
                          sum(len(rows) for rows in self._pending.values()))
        self.db.close()


def connect_read_only(path: Path | str, timeout: float = 5.0, check_same_thread: bool = True) -> sqlite3.Connection:
    """The one way to open an SQLite file (a gateway's log, a central store) for reading: read-only, so a reader
    can never create, lock for writing or change it. The path is quoted into the URI: '#', '?' or '%' in a file
    name would otherwise end the path and name another file."""
    uri = f"file:{quote(str(path))}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=check_same_thread)


_ID_STARTS = "request_id LIKE ? ESCAPE '\\'"  # with the parameter _like_prefix(prefix)


def _like_prefix(prefix: str) -> str:
    """The parameter of :data:`_ID_STARTS`: ids that start with ``prefix`` taken literally (phase names such as
    ``node_kill`` hold ``_``, which LIKE would read as any character)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Reader:
    """Read-only view for the web page, the demo and ecologists' scripts."""

    def __init__(self, path: Path):
        if not path.exists():
            raise FileNotFoundError(f"database {path} does not exist yet (is the gateway running?)")
        conn = connect_read_only(path, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        missing = set(SITE_SCHEMA) - set(self.db.table_names())
        if missing:  # the gateway has created the file but not yet its tables
            conn.close()
            raise FileNotFoundError(f"database {path} has no {', '.join(sorted(missing))} table yet "
                                    "(is the gateway starting?)")

    def close(self) -> None:
        self.db.close()

    def _rows(self, sql: str, params: tuple = (), table: str | None = None) -> list[dict]:
        """Rows as dicts; with ``table``, its JSON columns decoded (see :func:`decode_row`)."""
        cursor = self.db.execute(sql, params)
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r)) for r in cursor.fetchall()]
        return [decode_row(table, row) for row in rows] if table else rows

    def nodes(self) -> list[dict]:
        rows = self._rows("SELECT * FROM nodes ORDER BY stage IS NULL, stage, node_id", table="nodes")
        return [dict(row, errors=row["errors"] or {}) for row in rows]

    def recent_requests(self, since_ts: float, limit: int = 2000) -> list[dict]:
        rows = self._rows("SELECT request_id, camera_id, capture_ts, finish_ts, e2e_s, queue_s, compute_s, "
                          "decode_s, transfer_s, label, label_index, scientific_name, confidence, prune_ratios "
                          "FROM requests WHERE finish_ts >= ? ORDER BY finish_ts DESC LIMIT ?", (since_ts, limit),
                          table="requests")
        return rows[::-1]

    def windows(self, limit: int = 60) -> list[dict]:
        return self._rows("SELECT * FROM windows ORDER BY start_ts DESC LIMIT ?", (limit,))[::-1]

    def errors(self, limit: int = 20) -> list[dict]:
        return self._rows("SELECT ts, component, topic, kind, message, request_id FROM errors "
                          "ORDER BY ts DESC LIMIT ?", (limit,))

    def placement(self) -> dict | None:
        rows = self._rows("SELECT * FROM placements ORDER BY version DESC LIMIT 1", table="placements")
        return rows[0] if rows else None

    def prune_events(self, limit: int = 20) -> list[dict]:
        return self._rows("SELECT * FROM prune_events ORDER BY ts DESC LIMIT ?", (limit,), table="prune_events")

    def controller_status(self) -> dict | None:
        rows = self._rows("SELECT status FROM controller WHERE id = 1", table="controller")
        return rows[0]["status"] if rows else None

    def operator_actions(self, limit: int = 20) -> list[dict]:
        return self._rows("SELECT * FROM operator_actions ORDER BY id DESC LIMIT ?", (limit,), table="operator_actions")

    def cameras(self) -> list[dict]:
        return self._rows("SELECT * FROM cameras ORDER BY camera_id")

    def accounting(self) -> dict:
        """Frames accepted at stage 1 = rows + failures + in flight; failures by reason; rows served late (after the
        timely ones, docs/reliability.md); duplicates, second results of frames served twice (not frames)."""
        accepted = self._rows("SELECT COUNT(*) AS n FROM accepted")[0]["n"]
        rows = self._rows("SELECT COUNT(*) AS n FROM requests r JOIN accepted a USING (request_id)")[0]["n"]
        reasons = self._rows("SELECT reason, COUNT(*) AS n FROM failures f WHERE NOT EXISTS "
                             "(SELECT 1 FROM requests r WHERE r.request_id = f.request_id) GROUP BY reason")
        failures = {r["reason"]: r["n"] for r in reasons}
        flagged = self._rows("SELECT COUNT(*) AS n FROM accepted WHERE claimed_capture_ts IS NOT NULL")[0]["n"]
        late = self._rows("SELECT COUNT(*) AS n FROM requests WHERE late = 1")[0]["n"]
        duplicates = self._rows("SELECT COUNT(*) AS n FROM duplicates")[0]["n"]
        return {"accepted": accepted, "rows": rows, "failures": sum(failures.values()),
                "failures_by_reason": failures, "in_flight": accepted - rows - sum(failures.values()),
                "implausible_capture_ts": flagged, "late": late, "duplicates": duplicates}

    def current_run(self) -> dict | None:
        rows = self._rows("SELECT * FROM runs ORDER BY started_ts DESC LIMIT 1", table="runs")
        return rows[0] if rows else None

    def _latency_rank(self, quantile: float, n: int) -> float | None:
        """Nearest-rank quantile of e2e latency, read off the e2e_s index (the page polls this: no sort, no copy)."""
        if not n:
            return None
        offset = min(n - 1, max(0, math.ceil(quantile * n) - 1))
        return self.db.execute("SELECT e2e_s FROM requests ORDER BY e2e_s LIMIT 1 OFFSET ?", (offset,)).fetchone()[0]

    def totals(self, slo_s: float) -> dict:
        row = self._rows("SELECT COUNT(*) AS results, SUM(e2e_s <= ?) AS met, MIN(finish_ts) AS first_ts, "
                         "MAX(finish_ts) AS last_ts FROM requests", (slo_s,))[0]
        n = row["results"] or 0
        p50, p95, p99 = (self._latency_rank(q, n) for q in (0.50, 0.95, 0.99))
        return {"results": n, "slo_s": slo_s, "attainment_pct": 100.0 * (row["met"] or 0) / n if n else None,
                "p50_s": p50, "p95_s": p95, "p99_s": p99, "first_ts": row["first_ts"], "last_ts": row["last_ts"]}

    # --- the operator page's incremental overview (web/overview.py) ---------------------------------------------
    def latest_rowids(self) -> tuple[int, int]:
        """The newest rowid of ``requests`` and of ``windows``: a page's cursor (rows are appended, never rewritten)."""
        row = self.db.execute("SELECT (SELECT IFNULL(MAX(rowid), 0) FROM requests), "
                              "(SELECT IFNULL(MAX(rowid), 0) FROM windows)").fetchone()
        return row[0], row[1]

    def frames_after(self, rowid: int, since_ts: float, limit: int = 2000) -> list[dict]:
        """Frames written after ``rowid`` that finished at or after ``since_ts``, oldest first, with their hops:
        by rowid, not time, so a frame written late (the writer flushes in batches) is never skipped."""
        rows = self._rows("SELECT rowid AS rowid, finish_ts, e2e_s, hops FROM requests WHERE rowid > ? "
                          "AND finish_ts >= ? ORDER BY rowid DESC LIMIT ?", (rowid, since_ts, limit), table="requests")
        return sorted(rows, key=lambda r: r["finish_ts"])

    def windows_after(self, rowid: int, limit: int = 60) -> list[dict]:
        """Windows written after ``rowid`` (the newest ``limit``), oldest first."""
        return self._rows("SELECT rowid AS rowid, * FROM windows WHERE rowid > ? ORDER BY start_ts DESC LIMIT ?",
                          (rowid, limit))[::-1]

    def window_attainment(self, since_ts: float, run_start_ts: float) -> dict:
        """Attainment of the windows that ended since ``since_ts`` and began in this run, from their own verdicts
        (each window was judged against the SLO in force then, which it stores); the p50/p95 of those frames."""
        since_ts = max(since_ts, run_start_ts)
        row = self._rows("SELECT COUNT(*) AS windows, IFNULL(SUM(count), 0) AS frames, IFNULL(SUM(met), 0) AS met, "
                         "MIN(slo_s) AS slo_min_s, MAX(slo_s) AS slo_max_s FROM windows WHERE end_ts >= ? "
                         "AND start_ts >= ?", (since_ts, run_start_ts))[0]
        latencies = [r[0] for r in self.db.execute("SELECT e2e_s FROM requests WHERE finish_ts >= ? ORDER BY e2e_s",
                                                   (since_ts,))]

        def rank(q: float) -> float | None:
            return latencies[min(len(latencies) - 1, max(0, math.ceil(q * len(latencies)) - 1))] if latencies else None
        return {**row, "attainment_pct": 100.0 * row["met"] / row["frames"] if row["frames"] else None,
                "p50_s": rank(0.5), "p95_s": rank(0.95)}

    def nodes_serving_since(self, since_ts: float) -> set[str]:
        """Nodes that ran a hop of a frame finished since ``since_ts`` (an idle node has no slowdown to show)."""
        return {r[0] for r in self.db.execute(
            "SELECT DISTINCT json_extract(h.value, '$.node_id') FROM requests, json_each(requests.hops) AS h "
            "WHERE finish_ts >= ? AND requests.hops IS NOT NULL", (since_ts,))}

    def records_of(self, request_id: str) -> int:
        """How many rows name ``request_id`` as a result, an announcement or a failure (a forged one must have 0)."""
        return sum(self.db.execute(f"SELECT COUNT(*) FROM {table} WHERE request_id = ?", (request_id,)).fetchone()[0]
                   for table in ("requests", "accepted", "failures"))

    def prefix_accounting(self, prefix: str, since_ts: float) -> dict:
        """Where the frames whose request ids start with ``prefix`` went (the soak names each phase's frames so):
        rows; failures not superseded by a row, by reason; announcements; duplicates; ids traced anywhere; and the
        receipt time of the first row of a frame announced after ``since_ts`` (when the pipeline was back)."""
        like = (_like_prefix(prefix),)
        unanswered = f"FROM failures f WHERE {_ID_STARTS} AND NOT EXISTS " \
                     "(SELECT 1 FROM requests r WHERE r.request_id = f.request_id)"
        reasons = self._rows(f"SELECT reason, COUNT(*) AS n {unanswered} GROUP BY reason", like)
        traced = self._rows("SELECT COUNT(*) AS n FROM (" + " UNION ".join(
            f"SELECT request_id FROM {table} WHERE {_ID_STARTS}"
            for table in ("accepted", "requests", "failures")) + ")", like * 3)[0]["n"]
        first = self._rows("SELECT MIN(r.received_ts) AS t FROM requests r JOIN accepted a USING (request_id) "
                           f"WHERE r.{_ID_STARTS} AND a.received_ts >= ?", (*like, since_ts))[0]["t"]
        counts = {name: self._count_with_prefix(table, prefix)
                  for name, table in (("rows", "requests"), ("accepted", "accepted"), ("duplicates", "duplicates"))}
        return {**counts, "failures_by_reason": {r["reason"]: r["n"] for r in reasons}, "traced": traced,
                "first_result_ts": first}

    def failures_with_prefix(self, prefix: str) -> list[dict]:
        """Request id and reason of every failure record whose request id starts with ``prefix``."""
        return self._rows(f"SELECT request_id, reason FROM failures WHERE {_ID_STARTS}", (_like_prefix(prefix),))

    def records_with_prefix(self, prefix: str) -> int:
        """Rows, announcements and failure records whose request id starts with ``prefix`` (forgeries must have 0)."""
        return sum(self._count_with_prefix(table, prefix) for table in ("requests", "accepted", "failures"))

    def _count_with_prefix(self, table: str, prefix: str) -> int:
        row = self.db.execute(f"SELECT COUNT(*) FROM {table} WHERE {_ID_STARTS}", (_like_prefix(prefix),)).fetchone()
        return row[0]

    def errors_since(self, kind: str, since_ts: float) -> list[dict]:
        """Error records of ``kind`` stored at or after ``since_ts``, oldest first."""
        return self._rows("SELECT * FROM errors WHERE kind = ? AND ts >= ? ORDER BY id", (kind, since_ts))

    def controller_status_after(self, since_ts: float) -> dict | None:
        """The controller's stored status if the gateway wrote it after ``since_ts`` (a restarted gateway's own)."""
        rows = self._rows("SELECT status FROM controller WHERE id = 1 AND ts > ?", (since_ts,), table="controller")
        return rows[0]["status"] if rows else None

    def thumbnail(self, request_id: str) -> bytes | None:
        """A frame's stored thumbnail (JPEG bytes), if any."""
        row = self.db.execute("SELECT jpeg FROM thumbnails WHERE request_id = ?", (request_id,)).fetchone()
        return row[0] if row else None

    def placement_number(self, version: int) -> int:
        """The placement's ordinal among those stored (its version is a millisecond timestamp, too long to read)."""
        return self.db.execute("SELECT COUNT(*) FROM placements WHERE version <= ?", (version,)).fetchone()[0]

    # --- what the benches ask of a run's log (edgeprune/bench/) --------------------------------------------------
    def frames(self, camera_id: str | None = None) -> list[dict]:
        """Every stored frame (or one camera's) by capture time, with the times, hops and ratios a bench scores."""
        where, params = ("WHERE camera_id = ? ", (camera_id,)) if camera_id is not None else ("", ())
        return self._rows("SELECT request_id, capture_ts, finish_ts, received_ts, e2e_s, prune_ratios, hops, correct "
                          f"FROM requests {where}ORDER BY capture_ts, request_id", params, table="requests")

    def calibrated_nodes(self, since_ts: float | None = None) -> set[str]:
        """Nodes with a latency calibration (measured after ``since_ts``)."""
        where, params = ("WHERE measured_at > ?", (since_ts,)) if since_ts is not None else ("", ())
        return {r["node_id"] for r in self._rows(f"SELECT node_id FROM calibrations {where}", params)}

    def calibration_fits(self) -> dict[str, dict]:
        """Each node's latest calibration fit (``SliceLatencyFit.to_dict``)."""
        rows = self._rows("SELECT node_id, fit FROM calibrations ORDER BY measured_at", table="calibrations")
        return {r["node_id"]: r["fit"] for r in rows}

    def errors_of_kind(self, kind: str, after_id: int = 0) -> list[dict]:
        """Error records of ``kind`` with an id above ``after_id`` (a poller's cursor), oldest first."""
        return self._rows("SELECT * FROM errors WHERE kind = ? AND id > ? ORDER BY id", (kind, after_id))

    def frame_errors_by_kind(self) -> dict[str, int]:
        """Error records of frames by kind: those naming a request, but not the control plane's (a refused command,
        a calibration that could not be fitted)."""
        rows = self._rows("SELECT kind, COUNT(*) AS n FROM errors WHERE request_id IS NOT NULL AND kind NOT IN "
                          "('rejected_command', 'bad_calibration') GROUP BY kind")
        return {r["kind"]: r["n"] for r in rows}

    def accepted_capture_times(self) -> dict[str, float]:
        """Request id -> capture time of every frame stage 1 accepted (as it announced them)."""
        return {r["request_id"]: r["capture_ts"] for r in self._rows("SELECT request_id, capture_ts FROM accepted")}

    def prune_history(self) -> list[dict]:
        """Every prune event, oldest first."""
        return self._rows("SELECT * FROM prune_events ORDER BY ts, kind", table="prune_events")

    def placement_history(self) -> list[dict]:
        """Every placement issued, oldest first."""
        return self._rows("SELECT * FROM placements ORDER BY issued_at, version", table="placements")
