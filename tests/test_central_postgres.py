"""The central role on PostgreSQL: a real server (Debian's binaries, a temp cluster on a free loopback port), two
site Mosquittos bridged to a central Mosquitto, `edgeprune collect --db postgresql://...` as a real process. The
bridge is cut, then the database (with the collector killed while it holds unwritten rows); every frame a site
published is stored exactly once, with its site, deployment and model fingerprint."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from edgeprune.broker import free_port, start_broker, stop_process
from shared.bus import Bus
from shared.schemas import Hop, ModelProfile, NodeProfile, Result, to_json
from shared.settings import BrokerSettings, MqttSettings, SiteSettings
from shared.topics import Topics
from tests.conftest import STARTUP_S, Processes, component_env, wait_until

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[central]')")
from edgeprune.pgserver import PostgresServer, PostgresUnavailable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOPICS = Topics()
SITES = ("valley", "ridge")
FINGERPRINT = "f1ngerpr1nt"


@pytest.fixture(scope="module")
def postgres():
    """One server for the module's tests (initdb + start take seconds)."""
    try:
        server = PostgresServer(durable=False)
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.close()


def result(site: str, n: int) -> bytes:
    hop = Hop(stage=1, node_id=f"pi-{site}", prune_ratio=0.25, received_ts=1.0, started_ts=1.0, finished_ts=1.1,
              published_ts=1.2)
    return to_json(Result(request_id=f"{site}-{n}", camera_id="cam-1", capture_ts=float(n), label="deer",
                          label_index=1, scientific_name="Capreolus capreolus", confidence=0.9, hops=[hop]))


def profile(node_id: str) -> bytes:
    model = ModelProfile.model_validate_json((ROOT / "shared" / "assets" / "trapnet.profile.json").read_text())
    return to_json(NodeProfile(node_id=node_id, model_fingerprint=FINGERPRINT, memory_mb=512, uplink_mbit_s=50,
                               profile=model))


def count(url: str, sql: str = "SELECT count(*) FROM requests") -> int:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return conn.execute(sql).fetchone()[0]
    except psycopg.Error:  # the collector has not made the tables yet, or the server is stopped
        return -1


def publish(buses: dict[str, Bus], first: int, n: int) -> None:
    for site, bus in buses.items():
        for i in range(first, first + n):
            bus.publish(TOPICS.results(f"pi-{site}"), result(site, i), qos=1).wait_for_publish(10)


def test_two_sites_into_postgres_through_a_bridge_cut_and_a_database_restart(tmp_path, postgres) -> None:
    central_port = free_port()
    central_settings = BrokerSettings(port=central_port, data_dir=tmp_path / "central", allow_anonymous=True)
    central = start_broker(central_settings, log_file=open(tmp_path / "central.log", "w"))
    sites, buses = {}, {}
    processes = Processes(tmp_path, component_env(MqttSettings(port=central_port), EDGEPRUNE_MQTT_RECONNECT_MAX_S="1"))
    try:
        for site in SITES:
            port = free_port()
            sites[site] = start_broker(
                BrokerSettings(port=port, data_dir=tmp_path / site, allow_anonymous=True),
                log_file=open(tmp_path / f"{site}.log", "w"),
                site=SiteSettings(site_id=site, central_port=central_port, bridge_keepalive_s=5,
                                  bridge_restart_max_s=2))
            buses[site] = Bus(MqttSettings(port=port), f"pi-{site}", TOPICS.node_status(f"pi-{site}"))
            buses[site].start()
            buses[site].publish(TOPICS.node_profile(f"pi-{site}"), profile(f"pi-{site}"), qos=1,
                                retain=True).wait_for_publish(10)
        processes.start("collect", "collect", "--db", postgres.url)
        wait_until(lambda: count(postgres.url, "SELECT count(*) FROM models") == 2, STARTUP_S,
                   "the sites' profiles never reached PostgreSQL")

        publish(buses, 0, 5)
        publish(buses, 0, 5)  # a redelivery of every one: stored once
        publish(buses, 5, 1)  # in order behind the repeats: once it is stored, so were they (or not)
        wait_until(lambda: count(postgres.url) == 12, 60, "results did not reach PostgreSQL")

        # the bridge cut: the central broker goes away; the sites' bridges queue, then catch up
        stop_process(central)
        publish(buses, 6, 10)
        central = start_broker(central_settings, log_file=open(tmp_path / "central-2.log", "w"))
        wait_until(lambda: count(postgres.url) == 32, 120, "results queued across the bridge cut were lost")

        # the database cut: the collector keeps the rows unacknowledged while writes fail; killed then, the
        # central broker hands them to the next collector, which writes them once the server is back
        postgres.stop()
        publish(buses, 16, 10)
        wait_until(lambda: re.search(r"writing .* failed \(\d+ so far\)", processes.log("collect")), 60,
                   "the collector never tried to write the rows it held")
        processes.procs["collect"].send_signal(signal.SIGKILL)
        processes.procs["collect"].wait(10)
        postgres.start()
        processes.start("collect-2", "collect", "--db", postgres.url)
        wait_until(lambda: count(postgres.url) == 52, STARTUP_S, "rows unwritten at the database cut were lost")
    finally:
        for bus in buses.values():
            bus.stop()
        processes.stop_all()
        for proc in sites.values():
            stop_process(proc)
        stop_process(central)
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute("SELECT count(DISTINCT (site, request_id)) FROM requests").fetchone()[0] == 52
        assert conn.execute("SELECT site, deployment, model_fingerprint, count(*) FROM requests GROUP BY 1, 2, 3 "
                            "ORDER BY 1").fetchall() == [("ridge", "ridge/cam-1", FINGERPRINT, 26),
                                                         ("valley", "valley/cam-1", FINGERPRINT, 26)]
        assert conn.execute("SELECT DISTINCT prune_ratios, hops->0->>'node_id' FROM requests WHERE site = 'ridge'"
                            ).fetchall() == [([0.25], "pi-ridge")]
        assert conn.execute("SELECT count(*) FROM node_status WHERE status = 'online'").fetchone()[0] >= 2
    assert "Traceback" not in processes.log("collect-2")


def test_install_gives_the_collector_a_role_and_a_database(postgres) -> None:
    """What `install.sh --role central --db postgres` runs (packaging/central-db.sh), against the test server; a
    second run (a re-install) keeps the database and gives a login that works."""
    import subprocess

    psql = f"psql -h 127.0.0.1 -p {postgres.port} -U postgres -d postgres"
    urls = []
    for _ in range(2):
        made = subprocess.run(["bash", "-c", 'set -euo pipefail; SUDO=""; say() { :; }; . packaging/central-db.sh; '
                               'central_postgres_url'], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "EDGEPRUNE_PSQL": psql})
        assert made.returncode == 0, made.stderr
        urls.append(made.stdout.strip())
        with psycopg.connect(urls[-1]) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == ("edgeprune", "edgeprune")
            conn.execute("CREATE TABLE IF NOT EXISTS kept (n int)")  # the collector may create its tables
    with psycopg.connect(urls[-1]) as conn:
        assert conn.execute("SELECT to_regclass('kept') IS NOT NULL").fetchone()[0]
    assert urls[0] != urls[1] and urls[0].startswith("postgresql://edgeprune:")


def fresh_database(postgres, name: str) -> str:
    """The URL of an empty database ``name`` on the test server (dropped first if a run left one)."""
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def central_rows(store, sites: dict[str, int]) -> None:
    from gateway.collect import parse_central

    for site, n in sites.items():
        for i in range(n):
            row = parse_central(TOPICS, f"sites/{site}/edgeprune/pipeline/results/pi-{site}", result(site, i), 5.0)
            store.add(row.table, row.values)
    store.flush()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_export_from_the_central_store_per_site_or_all(request, tmp_path, backend) -> None:
    """CSV for all sites; a Camtrap DP package of one site, whose cameras the centre took from its gateway's
    log (one deployment per camera and site), that frictionless accepts."""
    from edgeprune.cli import main
    from gateway.collect import PostgresStore, import_cameras, open_store
    from gateway.store import Store

    if backend == "postgresql":
        db = fresh_database(request.getfixturevalue("postgres"), "export_test")
        store = PostgresStore(db)
    else:
        db = str(tmp_path / "central.sqlite")
        store = open_store(db)
    central_rows(store, {"valley": 3, "ridge": 2})
    gateway = Store(tmp_path / "valley-gateway.sqlite")
    gateway.set_camera({"camera_id": "cam-1", "location_name": "oak", "latitude": 46.5, "longitude": 7.1,
                        "start_ts": 0.0, "end_ts": None, "updated_ts": 1.0})
    gateway.close()
    assert import_cameras(store, "valley", tmp_path / "valley-gateway.sqlite") == 1
    store.close()

    assert main(["export", "--db", db, "--format", "csv", "--out", str(tmp_path / "all.csv")]) == 0
    lines = (tmp_path / "all.csv").read_text().splitlines()
    assert lines[0].startswith("request_id,camera_id,capture_time") and len(lines) == 1 + 5
    assert sorted(line.split(",")[1] for line in lines[1:]) == ["ridge/cam-1"] * 2 + ["valley/cam-1"] * 3
    assert main(["export", "--db", db, "--site", "ridge", "--format", "csv", "--out", str(tmp_path / "r.csv")]) == 0
    assert [line.split(",")[0] for line in (tmp_path / "r.csv").read_text().splitlines()[1:]] == \
        ["ridge/ridge-0", "ridge/ridge-1"]

    out = tmp_path / "valley"
    assert main(["export", "--db", db, "--site", "valley", "--format", "camtrap-dp", "--out", str(out)]) == 0
    deployments = (out / "deployments.csv").read_text().splitlines()
    assert len(deployments) == 2 and deployments[1].startswith("valley/cam-1,valley/cam-1,oak,46.5,7.1")
    assert len((out / "observations.csv").read_text().splitlines()) == 1 + 3
    from tests.test_export import camtrap_dp_errors

    assert camtrap_dp_errors(out) == []  # the official Camtrap DP 1.0 profile and table schemas, offline


def test_a_row_postgresql_refuses_is_counted_and_the_rest_are_written(postgres) -> None:
    """PostgreSQL's text cannot hold a NUL character (SQLite's can): that one row is dropped and counted, and the
    batch it came in is written, instead of failing forever and stalling every later write."""
    from gateway.collect import PostgresStore, parse_central

    store = PostgresStore(postgres.url)
    try:
        with store.db.transaction():
            store.db.execute("DELETE FROM requests WHERE site = 'lake'")
        good = parse_central(TOPICS, "sites/lake/edgeprune/pipeline/results/pi-lake", result("lake", 1), 5.0)
        bad = parse_central(TOPICS, "sites/lake/edgeprune/pipeline/results/pi-lake", result("lake", 2), 5.0)
        bad.values["label"] = "de\x00er"
        store.add(good.table, good.values)
        store.add(bad.table, bad.values)
        assert store.flush() == 1
        assert store.rejected["requests"] == 1
        assert store.db.execute("SELECT request_id FROM requests WHERE site = 'lake'").fetchall() == [("lake-1",)]
    finally:
        store.close()


def test_one_batch_holds_a_key_twice(postgres) -> None:
    """A batch goes in as one COPY and one INSERT ... SELECT: a redelivered result in it is stored once, and a
    node's profile sent twice (an upsert table) leaves the last, as row-by-row writes did; the hops are the
    result's own, as JSON the server reads. All without falling back to row by row (kept for refused rows)."""
    from gateway.collect import PostgresStore, parse_central

    store = PostgresStore(postgres.url)
    store._write_one_by_one = lambda pending: pytest.fail(f"the batch fell back to row by row: {list(pending)}")
    try:
        with store.db.transaction():
            store.db.execute("DELETE FROM requests WHERE site = 'fen'")
        for fingerprint in ("old", "new"):
            store.add("models", {"site": "fen", "node_id": "pi-fen", "model_fingerprint": fingerprint,
                                 "received_at": 5.0})
        row = parse_central(TOPICS, "sites/fen/edgeprune/pipeline/results/pi-fen", result("fen", 1), 5.0)
        store.add(row.table, row.values)
        store.add(row.table, dict(row.values))
        store.flush()
        assert store.db.execute("SELECT model_fingerprint FROM models WHERE site = 'fen'").fetchall() == [("new",)]
        assert store.db.execute("SELECT hops -> 0 ->> 'node_id', prune_ratios FROM requests "
                                "WHERE site = 'fen'").fetchall() == [("pi-fen", [0.25])]
    finally:
        store.close()



@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_aggregate_by_time_has_a_covering_index_and_the_index_it_replaced_goes(request, tmp_path, backend) -> None:
    """The ecologists' aggregate (rows and mean confidence per site and label since a time) can be answered from
    one index (PostgreSQL's planner takes it once the table is big and vacuumed; with a few rows it may not:
    docs/scaling.md, measured); a store an older version made loses its single-column capture_ts index (it only
    cost writes)."""
    import sqlite3

    from gateway.collect import PostgresStore, open_store

    if backend == "postgresql":
        db = fresh_database(request.getfixturevalue("postgres"), "index_test")
        PostgresStore(db).close()
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute('CREATE INDEX "requests_capture_ts" ON requests (capture_ts)')  # as the older version did
        PostgresStore(db).close()
        with psycopg.connect(db, autocommit=True) as conn:
            indexes = dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'requests'"))
        assert indexes["requests_capture_ts_site_label_confidence"].endswith(
            "(capture_ts, site, label, confidence)")
    else:
        db = tmp_path / "central.sqlite"
        open_store(db).close()
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE INDEX idx_requests_capture_ts ON requests (capture_ts)")
        open_store(db).close()
        with sqlite3.connect(db) as conn:
            indexes = {r[0]: r[1] for r in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")}
        assert indexes["idx_requests_capture_ts_site_label_confidence"].endswith(
            '("capture_ts", "site", "label", "confidence")')
    assert not {"requests_capture_ts", "idx_requests_capture_ts"} & indexes.keys()
