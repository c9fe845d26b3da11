"""The central collector: every site's results, node status and errors in one SQLite file with a ``site`` column.

Sites forward those topics to the central broker through Mosquitto's own bridge (see
``mosquitto/bridge.conf.template``); at the centre they arrive below ``sites/<site_id>/``.
Ecologists then query all sites at once. Control never passes through here: each site's gateway
keeps running its own pipeline whether or not the centre is reachable.

``parse_central`` is pure (topic + payload -> a row, or BadMessage); ``CentralStore`` is the
SQLite file; ``Collector`` wires them to the bus.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shared.schemas import BadMessage, ErrorRecord, Result, parse_json
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    site TEXT NOT NULL, request_id TEXT NOT NULL, camera_id TEXT NOT NULL, capture_ts REAL NOT NULL,
    label TEXT NOT NULL, label_index INTEGER NOT NULL, confidence REAL NOT NULL,
    scientific_name TEXT NOT NULL DEFAULT '',  -- the label's taxon, as the site's model names it
    hops TEXT NOT NULL,            -- JSON list of the stages' Hop records, as the site's gateway stores them
    received_at REAL NOT NULL,     -- when the centre wrote it (later than capture after a cut link)
    PRIMARY KEY (site, request_id)
);
CREATE TABLE IF NOT EXISTS node_status (
    site TEXT NOT NULL, component TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (
    site TEXT NOT NULL, component TEXT NOT NULL, ts REAL NOT NULL, topic TEXT NOT NULL, kind TEXT NOT NULL,
    message TEXT NOT NULL, request_id TEXT, received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_time ON results (capture_ts);
"""

STATUSES = {AVAILABILITY_ONLINE, AVAILABILITY_OFFLINE, AVAILABILITY_STOPPED}


@dataclass(frozen=True)
class Row:
    table: str
    values: dict


def parse_central(topics: Topics, topic: str, payload: bytes, received_at: float) -> Row:
    """The row one message at the central broker becomes; BadMessage if it is not a site's known topic."""
    split = topics.split_central(topic)
    if split is None:
        raise BadMessage("bad_topic", f"{topic} is not below a site's prefix")
    site, local = split
    root = topics.root + "/"
    if not local.startswith(root):
        raise BadMessage("bad_topic", f"{topic}: site {site} uses another topic root")
    parts = local[len(root):].split("/")
    if len(parts) == 3 and parts[:2] == ["pipeline", "results"]:
        result = parse_json(Result, payload)
        return Row("results", {"site": site, "request_id": result.request_id, "camera_id": result.camera_id,
                               "capture_ts": result.capture_ts, "label": result.label,
                               "label_index": result.label_index, "confidence": result.confidence,
                               "scientific_name": result.scientific_name,
                               "hops": json.dumps([h.model_dump() for h in result.hops]), "received_at": received_at})
    if len(parts) == 3 and parts[0] in ("node", "component") and parts[2] == "status":
        status = payload.decode("utf-8", errors="replace")
        if status not in STATUSES:
            raise BadMessage("bad_status", f"{topic}: unknown availability {status[:40]!r}")
        return Row("node_status", {"site": site, "component": parts[1], "kind": parts[0], "status": status,
                                   "received_at": received_at})
    if len(parts) == 2 and parts[0] == "error":
        record = parse_json(ErrorRecord, payload)
        return Row("errors", {"site": site, "component": record.component, "ts": record.ts, "topic": record.topic,
                              "kind": record.kind, "message": record.message, "request_id": record.request_id,
                              "received_at": received_at})
    raise BadMessage("bad_topic", f"{topic}: not a forwarded topic")


class CentralStore:
    """One SQLite file for every site (WAL, so ecologists can query it while the collector writes)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        if "scientific_name" not in columns:  # a file written before results carried the taxon
            self._db.execute("ALTER TABLE results ADD COLUMN scientific_name TEXT NOT NULL DEFAULT ''")
        self._lock = threading.Lock()

    def write(self, row: Row) -> bool:
        """Insert ``row``; False for a result already stored (QoS 1 may deliver twice after a cut link)."""
        columns = ", ".join(row.values)
        marks = ", ".join("?" for _ in row.values)
        with self._lock:
            cursor = self._db.execute(f"INSERT OR IGNORE INTO {row.table} ({columns}) VALUES ({marks})",
                                      tuple(row.values.values()))
        return cursor.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Collector:
    """Subscribes at the central broker to every site's forwarded topics and writes them down."""

    def __init__(self, bus, store: CentralStore):
        self.bus = bus
        self.store = store
        self.topics: Topics = bus.topics
        self.written: Counter[str] = Counter()
        self.duplicates = 0

    def start(self) -> None:
        for pattern in self.topics.bridged:
            self.bus.subscribe(self.topics.central(f"{self.topics.root}/{pattern}"), self._on_message, qos=1)
        self.bus.start()

    def _on_message(self, topic: str, payload: bytes, _user: dict[str, str]) -> None:
        row = parse_central(self.topics, topic, payload, time.time())
        if self.store.write(row):
            self.written[row.table] += 1
        else:
            self.duplicates += 1

    def stop(self) -> None:
        self.bus.stop()
        self.store.close()
