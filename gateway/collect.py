"""The central collector: every site's results, node status and errors in one database with a ``site`` column.

Sites forward those topics to the central broker through Mosquitto's own bridge (see
``mosquitto/bridge.conf.template``); at the centre they arrive below ``sites/<site_id>/``.
Ecologists then query all sites at once. Control never passes through here: each site's gateway
keeps running its own pipeline whether or not the centre is reachable.

``parse_central`` is pure (topic + payload -> a row, or BadMessage); the tables are the gateway's own
definitions (``gateway.store.CENTRAL_SCHEMA``), written by a :class:`gateway.store.Store` — an SQLite file
(the default) or :class:`PostgresStore` — whose one writer thread commits in batches; ``Collector`` wires
them to the bus and acknowledges each message only once its row is committed, so a collector killed
mid-batch gets the message again and the keys make the second delivery a no-op.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gateway.store import (
    CENTRAL_INDEXES,
    CENTRAL_RETIRED_INDEXES,
    CENTRAL_SCHEMA,
    JsonValue,
    Store,
    Table,
    connect_read_only,
    result_row,
)
from shared.schemas import BadMessage, ErrorRecord, NodeProfile, Result, parse_json
from shared.topics import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, AVAILABILITY_STOPPED, Topics, validate_id

log = logging.getLogger(__name__)

STATUSES = {AVAILABILITY_ONLINE, AVAILABILITY_OFFLINE, AVAILABILITY_STOPPED}
# Rows wait in the buffer until committed; unacknowledged messages are bounded by the broker's receive maximum
# (65535 per connection), so this bound is only reached across reconnects while the database is down.
MAX_PENDING = 200_000
FLUSH_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Row:
    """A table's row, and the node whose model fingerprint it takes (the result's last stage; a node's status)."""

    table: str
    values: dict
    node: str | None = None


def deployment(site: str, camera_id: str) -> str:
    """A camera at a site: the central Camtrap DP deploymentID (``gateway.export`` via :func:`central_views`)."""
    return f"{site}/{camera_id}"


def parse_central(topics: Topics, topic: str, payload: bytes, received_at: float) -> Row | None:
    """The row one message at the central broker becomes; BadMessage if it is not a site's known topic.

    None for an empty payload: a site clearing a retained message (a profile, a status, a stray retained result
    its gateway removes), which the bridge forwards like any publish; there is nothing to store.
    A result becomes the site gateway's own `requests` row (``gateway.store.result_row``), its finish time
    the last stage's publish time (the site's clock, not the centre's arrival after a cut link)."""
    split = topics.split_central(topic)
    if split is None:
        raise BadMessage("bad_topic", f"{topic} is not below a site's prefix")
    site, local = split
    root = topics.root + "/"
    if not local.startswith(root):
        raise BadMessage("bad_topic", f"{topic}: site {site} uses another topic root")
    parts = local[len(root):].split("/")
    if len(parts) == 3 and parts[:2] == ["pipeline", "results"]:
        table = "requests"
    elif len(parts) == 3 and parts[0] == "node" and parts[2] == "profile":
        table = "models"
    elif len(parts) == 3 and parts[0] in ("node", "component") and parts[2] == "status":
        table = "node_status"
    elif len(parts) == 2 and parts[0] == "error":
        table = "errors"
    else:
        raise BadMessage("bad_topic", f"{topic}: not a forwarded topic")
    if not payload:
        return None
    where = {"site": site, "received_at": received_at}
    if table == "requests":
        result = parse_json(Result, payload)
        return Row(table, {**where, "deployment": deployment(site, result.camera_id), **result_row(result)},
                   result.hops[-1].node_id)
    if table == "models":
        profile = parse_json(NodeProfile, payload)
        return Row(table, {**where, "node_id": profile.node_id, "model_fingerprint": profile.model_fingerprint})
    if table == "node_status":
        status = payload.decode("utf-8", errors="replace")
        if status not in STATUSES:
            raise BadMessage("bad_status", f"{topic}: unknown availability {status[:40]!r}")
        return Row(table, {**where, "component": parts[1], "kind": parts[0], "status": status},
                   parts[1] if parts[0] == "node" else None)
    # the gateway's own `errors` row (gateway/data_path.py): the record's fields are the table's columns
    return Row(table, {**where, **parse_json(ErrorRecord, payload).model_dump()})


# --- PostgreSQL ------------------------------------------------------------------------------------------------
PG_TYPES = {str: "TEXT", float: "DOUBLE PRECISION", int: "BIGINT", list: "JSONB", dict: "JSONB", JsonValue: "JSONB"}


def is_postgres(db: str | Path) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _keys(table: Table) -> tuple[str, ...]:
    return (table.pk,) if isinstance(table.pk, str) else table.pk


def pg_schema_sql(schema: dict[str, Table], indexes: dict[str, list[list[str]]],
                  retired: dict[str, list[list[str]]] = CENTRAL_RETIRED_INDEXES) -> list[str]:
    """DDL for ``schema``, safe to run on every start: a table an older version made gets its new columns, and
    loses the ``retired`` indexes (each costs every write)."""
    statements = []
    for name, table in schema.items():
        columns = ", ".join(f"{_q(c)} {PG_TYPES[kind]}" for c, kind in table.columns.items())
        statements.append(f"CREATE TABLE IF NOT EXISTS {_q(name)} ({columns}, "
                          f"PRIMARY KEY ({', '.join(map(_q, _keys(table)))}))")
        statements += [f"ALTER TABLE {_q(name)} ADD COLUMN IF NOT EXISTS {_q(c)} {PG_TYPES[kind]}"
                       for c, kind in table.columns.items()]
    for name, table_indexes in indexes.items():
        statements += [f"CREATE INDEX IF NOT EXISTS {_q('_'.join([name, *cols]))} ON {_q(name)} "
                       f"({', '.join(map(_q, cols))})" for cols in table_indexes]
    return statements + [f"DROP INDEX IF EXISTS {_q('_'.join([name, *cols]))}"
                         for name, table_indexes in retired.items() for cols in table_indexes]


def _on_conflict(table: Table) -> str:
    """The table's write mode as the end of an INSERT (``upsert`` rows replace every column: central rows are
    whole)."""
    if table.write == "insert_ignore":
        return " ON CONFLICT DO NOTHING"
    if table.write == "upsert":
        keys = _keys(table)
        updates = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in table.columns if c not in keys)
        return f" ON CONFLICT ({', '.join(map(_q, keys))}) DO UPDATE SET {updates}"
    return ""


def pg_insert_sql(name: str, table: Table) -> str:
    """One row's INSERT with the table's write mode."""
    columns = ", ".join(map(_q, table.columns))
    return (f"INSERT INTO {_q(name)} ({columns}) VALUES ({', '.join(['%s'] * len(table.columns))})"
            + _on_conflict(table))


class Staging(NamedTuple):
    """A batch's way in: COPY into a temporary table of the session, then one INSERT ... SELECT with the table's
    write mode (COPY itself has no ON CONFLICT). COPY costs the collector a quarter of the CPU per row of a
    pipelined executemany and takes half the time (measured, docs/scaling.md)."""

    create: str
    copy: str
    insert: str


def pg_staging_sql(name: str, table: Table) -> Staging:
    stage = _q(f"_in_{name}")
    columns = ", ".join(map(_q, table.columns))
    return Staging(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
        f"({', '.join(f'{_q(c)} {PG_TYPES[kind]}' for c, kind in table.columns.items())}) ON COMMIT DELETE ROWS",
        f"COPY {stage} ({columns}) FROM STDIN",
        f"INSERT INTO {_q(name)} ({columns}) SELECT {columns} FROM {stage}" + _on_conflict(table))


def last_per_key(table: Table, rows: list[dict]) -> list[dict]:
    """An ``upsert`` table's rows with one per key, the last (what row-by-row upserts leave); one INSERT may not
    update a row twice. Other tables' rows as they are (``insert_ignore`` keeps the first, as row by row)."""
    if table.write != "upsert":
        return rows
    keys = _keys(table)
    return list({tuple(row.get(k) for k in keys): row for row in rows}.values())


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    import psycopg.conninfo

    params = psycopg.conninfo.conninfo_to_dict(url)
    return " ".join(f"{k}={'***' if k == 'password' else v}" for k, v in params.items())


class PostgresStore(Store):
    """A :class:`Store` whose tables live in PostgreSQL (psycopg 3): the same buffering, batching, after-commit
    callbacks and back-off; each batch is one transaction, each table's rows COPY'd in (:class:`Staging`). A lost
    connection (the server restarted) is opened again at the next batch."""

    def __init__(self, url: str, max_pending: int = MAX_PENDING, schema: dict[str, Table] = CENTRAL_SCHEMA,
                 indexes: dict[str, list[list[str]]] = CENTRAL_INDEXES):
        self._url = url
        self.rejected: Counter[str] = Counter()  # table -> rows the server refused (e.g. a NUL character in a text)
        super().__init__(redacted(url), max_pending, schema, indexes)  # type: ignore[arg-type]

    def _connect(self):
        """A session with the staging tables (temporary: each session has its own)."""
        import psycopg

        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        for staging in self._staging.values():
            conn.execute(staging.create)
        return conn

    def _open(self, schema: dict[str, Table], indexes: dict[str, list[list[str]]]):
        self._sql = {name: pg_insert_sql(name, table) for name, table in schema.items()}
        self._staging = {name: pg_staging_sql(name, table) for name, table in schema.items()}
        conn = self._connect()
        with conn.transaction():
            for statement in pg_schema_sql(schema, indexes):
                conn.execute(statement)
        return conn

    def _write(self, pending: dict[str, list[dict]]) -> int:
        import psycopg

        if not pending:  # an idle collector does not touch the server
            return 0
        if self.db.closed or self.db.broken:
            self.db.close()
            self.db = self._connect()
        try:
            with self.db.transaction(), self.db.cursor() as cursor:
                for name, rows in pending.items():
                    staging = self._staging[name]
                    with cursor.copy(staging.copy) as copy:
                        for row in last_per_key(self.schema[name], rows):
                            copy.write_row(self._values(name, row))
                    cursor.execute(staging.insert)
        except psycopg.OperationalError:  # the server is away: the rows stay buffered, the writer retries
            raise
        except psycopg.Error:  # a row the server refuses (SQLite would take it): one bad row must not stall all
            return self._write_one_by_one(pending)
        return sum(len(rows) for rows in pending.values())

    def _values(self, name: str, row: dict) -> list:
        return [row.get(c) for c in self.schema[name].columns]

    def _write_one_by_one(self, pending: dict[str, list[dict]]) -> int:
        """Each row in its own transaction; a row refused again is logged, counted in ``rejected`` and dropped."""
        import psycopg

        written = 0
        for name, rows in pending.items():
            for row in rows:
                try:
                    with self.db.transaction():
                        self.db.execute(self._sql[name], self._values(name, row))
                    written += 1
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    self.rejected[name] += 1
                    log.error("PostgreSQL refused a %s row (%d so far), dropped: %s: %.300r", name,
                              sum(self.rejected.values()), exc, row)
        return written


# --- SQLite ----------------------------------------------------------------------------------------------------
def migrate_sqlite_v1(path: Path) -> None:
    """A central file from before the shared schema (`results`, and `node_status`/`errors` without keys): keep
    their rows by moving them aside, so :class:`Store` creates the keyed tables and :func:`copy_v1` fills them."""
    if not path.exists():
        return
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "results" in tables:
            for name in ("node_status", "errors"):
                if name in tables:
                    conn.execute(f"ALTER TABLE {name} RENAME TO {name}_v1")


def copy_v1(db) -> None:
    """Second half of :func:`migrate_sqlite_v1`: the old rows into the new tables, once, then the old tables go."""
    tables = set(db.table_names())
    if "results" not in tables:
        return
    with db.conn:
        taxon = "scientific_name" if "scientific_name" in db["results"].columns_dict else "''"
        db.execute("INSERT OR IGNORE INTO requests (site, deployment, request_id, camera_id, capture_ts, label, "
                   "label_index, confidence, scientific_name, hops, received_at) SELECT site, site || '/' || "
                   f"camera_id, request_id, camera_id, capture_ts, label, label_index, confidence, {taxon}, hops, "
                   "received_at FROM results")
        for name, columns in (("node_status", "site, component, kind, status, received_at"),
                              ("errors", "site, component, ts, topic, kind, message, request_id, received_at")):
            if f"{name}_v1" in tables:
                db.execute(f"INSERT OR IGNORE INTO {name} ({columns}) SELECT {columns} FROM {name}_v1")
                db.execute(f"DROP TABLE {name}_v1")
        db.execute("DROP TABLE results")
    log.warning("moved the rows of an older central file into the shared schema (results -> requests)")


def open_store(db: str | Path) -> Store:
    """The central store: ``postgresql://...`` or an SQLite file."""
    if is_postgres(db):
        return PostgresStore(str(db))
    migrate_sqlite_v1(Path(db))
    store = Store(Path(db), MAX_PENDING, CENTRAL_SCHEMA, CENTRAL_INDEXES)
    copy_v1(store.db)
    for name, table_indexes in CENTRAL_RETIRED_INDEXES.items():
        for cols in table_indexes:  # sqlite-utils' names
            store.db.execute(f"DROP INDEX IF EXISTS [idx_{'_'.join([name, *cols])}]")
    return store


# --- reading it back: gateway/export.py's queries over the central tables ------------------------------------------
class _Qmark:
    """A psycopg connection that takes sqlite3's ``?`` placeholders, as gateway/export.py writes them."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def close(self) -> None:
        self.conn.close()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def open_central_for_export(db: str | Path, sites: list[str] | None = None):
    """A connection to the central store (PostgreSQL or SQLite) on which gateway/export.py's queries read the
    chosen sites (all when ``sites`` is empty) as if they were one gateway's: temporary views named `requests` and
    `cameras` shadow the central tables, each camera at each site one deployment (``<site>/<camera_id>``), each
    request id prefixed by its site (unique across sites). None if ``db`` is an SQLite file of one gateway."""
    if is_postgres(db):
        import psycopg

        conn = _Qmark(psycopg.connect(str(db), autocommit=True))
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
    else:
        conn = connect_read_only(db)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        if "site" not in columns:
            conn.close()
            return None
        schema = "main"
    where = f"WHERE site IN ({', '.join(map(_literal, sites))})" if sites else ""
    conn.execute(f"CREATE TEMP VIEW requests AS SELECT site || '/' || request_id AS request_id, "
                 f"deployment AS camera_id, capture_ts, finish_ts, e2e_s, label, label_index, scientific_name, "
                 f"confidence, CAST(prune_ratios AS TEXT) AS prune_ratios FROM {_q(schema)}.requests {where}")
    conn.execute(f"CREATE TEMP VIEW cameras AS SELECT deployment AS camera_id, location_name, latitude, longitude, "
                 f"start_ts, end_ts FROM {_q(schema)}.cameras {where}")
    return conn


def import_cameras(store: Store, site: str, gateway_db: Path) -> int:
    """A site's camera deployments (its gateway's `cameras` table: location, start, end) into the central store,
    so a Camtrap DP export of that site has its deployments. Returns how many."""
    validate_id("site", site)
    with connect_read_only(gateway_db) as conn:
        conn.row_factory = sqlite3.Row
        cameras = [dict(row) for row in conn.execute("SELECT * FROM cameras")]
    now = time.time()
    for camera in cameras:
        camera.pop("updated_ts", None)
        store.add("cameras", {**camera, "site": site, "deployment": deployment(site, camera["camera_id"]),
                              "received_at": now})
    store.flush()
    return len(cameras)


class Collector:
    """Subscribes at the central broker to every site's forwarded topics and buffers their rows.

    Runs on paho's thread only to parse and buffer; the store's writer thread commits and then acknowledges.
    """

    def __init__(self, bus, store: Store):
        self.bus = bus
        self.store = store
        self.topics: Topics = bus.topics
        self.received: Counter[str] = Counter()
        self.models: dict[tuple[str, str], str] = {}  # (site, node) -> the model fingerprint it offered
        for site, node_id, fingerprint in store.db.execute("SELECT site, node_id, model_fingerprint FROM models"):
            self.models[site, node_id] = fingerprint  # a restarted collector knows them before the profiles return

    def start(self, write_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.bus.acknowledge_after(self.store.after_commit)
        self.store.start_writer(write_interval_s, on_failure=lambda exc: None)
        for pattern in self.topics.bridged:
            self.bus.subscribe(self.topics.central(f"{self.topics.root}/{pattern}"), self.handle, qos=1)
        self.bus.start()

    def handle(self, topic: str, payload: bytes, _user: dict[str, str]) -> None:
        """One message from the central broker, on paho's thread: validated, mapped to its row and buffered."""
        row = parse_central(self.topics, topic, payload, time.time())
        if row is None:
            self.received["cleared"] += 1
            return
        values = row.values
        if row.table == "models":
            self.models[values["site"], values["node_id"]] = values["model_fingerprint"]
        elif row.node is not None:
            values["model_fingerprint"] = self.models.get((values["site"], row.node))
        self.store.add(row.table, values)
        self.received[row.table] += 1

    def stop(self) -> None:
        self.bus.stop()
        self.store.close()
