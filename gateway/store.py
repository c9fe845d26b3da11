"""SQLite storage for the gateway (writer) and the web page (readers), through sqlite-utils.

One writer: :class:`Store` buffers rows and writes them in one transaction per
:meth:`Store.flush`, called from the gateway's tick thread. Readers open the file read-only,
so the web page can never block or corrupt the gateway's writes (WAL mode lets them run
side by side). The schema is documented in docs/database.md.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import sqlite_utils

SCHEMA: dict[str, tuple[dict[str, type], dict[str, Any]]] = {
    "requests": ({
        "request_id": str, "camera_id": str, "capture_ts": float, "finish_ts": float, "e2e_s": float,
        "queue_s": float, "compute_s": float, "transfer_s": float, "label": str, "label_index": int,
        "confidence": float, "prune_ratios": str, "hops": str, "true_label": int, "correct": int,
    }, {"pk": "request_id"}),
    "windows": ({
        "start_ts": float, "end_ts": float, "count": int, "slo_s": float, "met": int,
        "attainment_pct": float, "p50_s": float, "p95_s": float, "p99_s": float, "labelled": int,
        "accuracy_measured": float,
    }, {"pk": "start_ts"}),
    "nodes": ({
        "node_id": str, "status": str, "status_ts": float, "last_seen": float, "stage": int,
        "first_block": int, "last_block": int, "placement_version": int, "queue_depth": int,
        "queue_capacity": int, "processed": int, "dropped": int, "errors": str,
        "compute_mean_s": float, "compute_p95_s": float, "queue_wait_mean_s": float,
        "cpu_percent": float, "prune_ratio": float, "emulated_slowdown": float,
    }, {"pk": "node_id"}),
    "errors": ({
        "id": int, "ts": float, "component": str, "topic": str, "kind": str, "message": str,
        "request_id": str,
    }, {"pk": "id"}),
    "runs": ({
        "started_ts": float, "gateway_id": str, "slo_s": float, "window_s": float, "nodes": str,
    }, {"pk": "started_ts"}),
    "profiles": ({
        "node_id": str, "model_fingerprint": str, "ts": float, "memory_mb": float, "uplink_mbit_s": float,
        "profile": str,
    }, {"pk": ("node_id", "model_fingerprint")}),
    "calibrations": ({
        "node_id": str, "measured_at": float, "placement_version": int, "first_block": int, "last_block": int,
        "fit": str, "best": str, "r2_linear": float, "r2_quadratic": float,
    }, {"pk": ("node_id", "measured_at")}),
    "prune_events": ({
        "ts": float, "kind": str, "policy": str, "source": str, "reason": str, "ratios": str, "changed": str,
        "predicted_stage_s": str, "predicted_bottleneck_s": float, "predicted_accuracy": float, "budget_s": float,
        "infeasible": int, "metrics": str, "observed_count": int, "observed_p50_s": float, "observed_p95_s": float,
    }, {"pk": ("ts", "kind")}),
    "controller": ({
        "id": int, "ts": float, "status": str,
    }, {"pk": "id"}),
    "placements": ({
        "version": int, "issued_at": float, "model": str, "n_blocks": int, "stages": str,
        "bottleneck_s": float,
    }, {"pk": "version"}),
}
INDEXES = {"requests": [["finish_ts"], ["camera_id", "capture_ts"], ["e2e_s"]], "errors": [["ts"]]}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class Store:
    """The gateway's single writer. Methods only buffer; :meth:`flush` writes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite_utils.Database(sqlite3.connect(str(path), check_same_thread=False))
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        for name, (columns, opts) in SCHEMA.items():
            self.db[name].create(columns, **opts, if_not_exists=True)
            existing = self.db[name].columns_dict
            for column, kind in columns.items():  # a database from an older version gains new columns
                if column not in existing:
                    self.db[name].add_column(column, kind)
        for name, indexes in INDEXES.items():
            for cols in indexes:
                self.db[name].create_index(cols, if_not_exists=True)
        self._lock = threading.Lock()
        self._pending: dict[str, list[dict]] = {name: [] for name in SCHEMA}

    def add_request(self, row: dict) -> None:
        row = dict(row, prune_ratios=_json(row["prune_ratios"]), hops=_json(row["hops"]))
        self._buffer("requests", row)

    def add_window(self, row: dict) -> None:
        self._buffer("windows", row)

    def update_node(self, row: dict) -> None:
        """Merge known fields of a node (status or stats), keeping the others."""
        if "errors" in row:
            row = dict(row, errors=_json(row["errors"]))
        self._buffer("nodes", row)

    def add_error(self, row: dict) -> None:
        self._buffer("errors", row)

    def add_run(self, row: dict) -> None:
        """One row per gateway start: the SLO and window the following rows are judged against."""
        self._buffer("runs", dict(row, nodes=_json(row["nodes"])))

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
        self._buffer("controller", {"id": 1, "ts": ts, "status": _json(status)})

    def add_placement(self, row: dict) -> None:
        self._buffer("placements", dict(row, stages=_json(row["stages"])))

    def _buffer(self, table: str, row: dict) -> None:
        with self._lock:
            self._pending[table].append(row)

    def flush(self) -> int:
        """Write everything buffered in one transaction; returns the number of rows written."""
        with self._lock:
            pending, self._pending = self._pending, {name: [] for name in SCHEMA}
        written = 0
        with self.db.conn:
            for table, rows in pending.items():
                if not rows:
                    continue
                if table in ("nodes", "profiles", "prune_events", "controller", "calibrations"):
                    # latest state wins; partial updates (a node's stats, an event's follow-up) merge
                    for row in rows:
                        self.db[table].upsert(row, pk=SCHEMA[table][1]["pk"])
                elif table in ("requests", "placements", "windows", "runs"):
                    self.db[table].insert_all(rows, ignore=True)  # QoS 1 may redeliver a result
                else:
                    self.db[table].insert_all(rows)
                written += len(rows)
        return written

    def close(self) -> None:
        self.flush()
        self.db.close()


class Reader:
    """Read-only view for the web page, the demo and ecologists' scripts."""

    def __init__(self, path: Path):
        if not path.exists():
            raise FileNotFoundError(f"database {path} does not exist yet (is the gateway running?)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        missing = set(SCHEMA) - set(self.db.table_names())
        if missing:  # the gateway has created the file but not yet its tables
            conn.close()
            raise FileNotFoundError(f"database {path} has no {', '.join(sorted(missing))} table yet "
                                    "(is the gateway starting?)")

    def _rows(self, sql: str, params: tuple = ()) -> list[dict]:
        cursor = self.db.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]

    def nodes(self) -> list[dict]:
        rows = self._rows("SELECT * FROM nodes ORDER BY stage IS NULL, stage, node_id")
        for row in rows:
            row["errors"] = json.loads(row["errors"]) if row.get("errors") else {}
        return rows

    def recent_requests(self, since_ts: float, limit: int = 2000) -> list[dict]:
        rows = self._rows("SELECT request_id, camera_id, capture_ts, finish_ts, e2e_s, queue_s, compute_s, "
                          "transfer_s, label, label_index, confidence, prune_ratios FROM requests WHERE finish_ts >= ? "
                          "ORDER BY finish_ts DESC LIMIT ?", (since_ts, limit))
        for row in rows:
            row["prune_ratios"] = json.loads(row["prune_ratios"])
        return rows[::-1]

    def windows(self, limit: int = 60) -> list[dict]:
        return self._rows("SELECT * FROM windows ORDER BY start_ts DESC LIMIT ?", (limit,))[::-1]

    def errors(self, limit: int = 20) -> list[dict]:
        return self._rows("SELECT ts, component, topic, kind, message, request_id FROM errors "
                          "ORDER BY ts DESC LIMIT ?", (limit,))

    def placement(self) -> dict | None:
        rows = self._rows("SELECT * FROM placements ORDER BY version DESC LIMIT 1")
        if not rows:
            return None
        return dict(rows[0], stages=json.loads(rows[0]["stages"]))

    def prune_events(self, limit: int = 20) -> list[dict]:
        rows = self._rows("SELECT * FROM prune_events ORDER BY ts DESC LIMIT ?", (limit,))
        for row in rows:
            for key in ("ratios", "changed", "predicted_stage_s", "metrics"):
                row[key] = json.loads(row[key]) if row.get(key) else None
        return rows

    def controller_status(self) -> dict | None:
        rows = self._rows("SELECT status FROM controller WHERE id = 1")
        return json.loads(rows[0]["status"]) if rows else None

    def current_run(self) -> dict | None:
        rows = self._rows("SELECT * FROM runs ORDER BY started_ts DESC LIMIT 1")
        return dict(rows[0], nodes=json.loads(rows[0]["nodes"])) if rows else None

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
