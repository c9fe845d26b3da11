"""Weeks on an SD card: retention, WAL truncation and the disk-space guard, on a real SQLite file."""

from __future__ import annotations

import sqlite3

import pytest

from gateway.retention import DAY_S, DiskMode, cutoffs, disk_mode, disk_mode_message
from gateway.store import Store
from shared.settings import GatewaySettings, SettingsError, load


def request(i: int, finish_ts: float) -> dict:
    return {"request_id": f"r{i}", "camera_id": "cam-1", "capture_ts": finish_ts - 0.1, "finish_ts": finish_ts,
            "received_ts": finish_ts + 0.01,
            "e2e_s": 0.1, "queue_s": 0.0, "compute_s": 0.05, "transfer_s": 0.05, "label": "zebra",
            "label_index": 9, "confidence": 0.9, "prune_ratios": [0.0], "hops": [{"stage": 1}]}


def test_cutoffs_per_table():
    assert cutoffs({"requests": 365, "errors": 30}, now=400 * DAY_S) == {
        "requests": ("received_ts", 35 * DAY_S), "errors": ("ts", 370 * DAY_S)}


def test_a_result_is_kept_by_its_receipt_whatever_its_nodes_clock_said(tmp_path):
    """finish_ts is the last node's clock (issue 25, item 6): a Pi that booted without network time stamps 1970,
    and its frames must not expire at the next maintenance."""
    store = Store(tmp_path / "db.sqlite")
    now = 1000 * DAY_S
    store.add_request({**request(0, now), "finish_ts": 1.0, "e2e_s": 1.0 - (now - 0.1)})
    store.flush()
    assert store.delete_older(cutoffs({"requests": 365}, now)) == {"requests": 0}
    store.close()


def test_default_policy_keeps_results_longest():
    keep = GatewaySettings().keep_days
    assert keep["requests"] == max(keep.values()) and keep["windows"] == max(keep.values())


def test_keep_days_rejects_unknown_tables_and_non_positive_days(monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_GATEWAY_KEEP_DAYS", '{"nodes": 3}')
    with pytest.raises(SettingsError, match="keep_days"):
        load(GatewaySettings)
    monkeypatch.setenv("EDGEPRUNE_GATEWAY_KEEP_DAYS", '{"errors": 0}')
    with pytest.raises(SettingsError, match="positive"):
        load(GatewaySettings)


def test_disk_mode_sheds_detail_in_order_of_bulk():
    assert disk_mode(2000, 1000) is DiskMode.NORMAL
    assert disk_mode(999, 1000) is DiskMode.LEAN
    assert disk_mode(249, 1000) is DiskMode.WINDOWS_ONLY
    assert disk_mode(0, 0) is DiskMode.NORMAL  # guard off
    assert "hops" in disk_mode_message(DiskMode.LEAN, 999, 1000)
    assert "classification goes on" in disk_mode_message(DiskMode.WINDOWS_ONLY, 10, 1000)


def test_store_deletes_expired_rows_only(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    now = 1000 * DAY_S
    for i, age_days in enumerate((400, 100, 1)):
        store.add_request(request(i, now - age_days * DAY_S))
        store.add_error({"ts": now - age_days * DAY_S, "component": "g", "topic": "", "kind": "k",
                         "message": "m", "request_id": None})
    store.flush()
    deleted = store.delete_older(cutoffs({"requests": 365, "errors": 30}, now))
    assert deleted == {"requests": 1, "errors": 2}
    rows = [r[0] for r in store.db.execute("SELECT request_id FROM requests ORDER BY request_id").fetchall()]
    assert rows == ["r1", "r2"]
    store.close()


def test_lean_mode_drops_hops_and_windows_only_mode_drops_rows(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_request(request(0, 10.0))
    store.disk_mode = DiskMode.LEAN
    store.add_request(request(1, 11.0))
    store.disk_mode = DiskMode.WINDOWS_ONLY
    store.add_request(request(2, 12.0))
    store.flush()
    rows = store.db.execute("SELECT request_id, hops IS NULL FROM requests ORDER BY request_id").fetchall()
    assert rows == [("r0", 0), ("r1", 1)]
    store.close()


def test_checkpoint_truncates_the_wal(tmp_path):
    path = tmp_path / "db.sqlite"
    store = Store(path)
    for i in range(500):
        store.add_request(request(i, float(i)))
    store.flush()
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 0
    store.checkpoint()
    assert wal.stat().st_size == 0
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM requests").fetchone() == (500,)
    store.close()


def test_gateway_maintenance_records_low_disk_and_keeps_windows(tmp_path):
    """A guard threshold above any real disk: the gateway records the condition once and stops per-frame rows."""
    from gateway.service import Gateway
    from shared.settings import MqttSettings

    settings = GatewaySettings(db_path=tmp_path / "edgeprune.db", min_free_mb=1e12, keep_days={"requests": 1})
    gateway = Gateway(settings, MqttSettings(port=1))  # never started: no broker needed
    now = 100 * DAY_S
    gateway.store.add_request(request(0, now - 2 * DAY_S))
    gateway.store.flush()
    gateway.maintain(now)
    gateway.maintain(now + 1)  # the condition is recorded once, not on every pass
    gateway.store.add_request(request(1, now))
    gateway.store.add_window({"start_ts": now, "end_ts": now + 10, "count": 1, "slo_s": 0.5, "met": 1,
                              "attainment_pct": 100.0, "p50_s": 0.1, "p95_s": 0.1, "p99_s": 0.1})
    gateway.store.flush()
    db = gateway.store.db
    assert gateway.store.disk_mode is DiskMode.WINDOWS_ONLY
    assert [r[0] for r in db.execute("SELECT kind FROM errors").fetchall()] == ["disk_space"]
    assert db.execute("SELECT COUNT(*) FROM requests").fetchone() == (0,)  # expired one deleted, new one shed
    assert db.execute("SELECT COUNT(*) FROM windows").fetchone() == (1,)
    gateway.store.close()


def test_naming_one_table_keeps_the_others_defaults(monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_GATEWAY_KEEP_DAYS", '{"requests": 120}')
    keep = load(GatewaySettings).keep_days
    assert keep["requests"] == 120 and keep["errors"] == GatewaySettings().keep_days["errors"]
