"""The gateway as the site's clock: offset from the beacon, and the flag on /api/status."""

from __future__ import annotations

from gateway.store import Store
from shared.clock import ClockOffset, offset_suspect
from shared.settings import WebSettings
from web.app import create_app


def test_offset_is_the_quickest_delivery_over_recent_beacons():
    clock = ClockOffset(window=3)
    assert clock.offset_s is None
    # this device is 0.2 s behind the gateway; deliveries took 30, 5 and 12 ms
    for gateway_ts, delay in ((100.0, 0.030), (102.0, 0.005), (104.0, 0.012)):
        clock.add(gateway_ts, gateway_ts - 0.2 + delay)
    assert abs(clock.offset_s - (-0.195)) < 1e-9
    clock.add(106.0, 106.0 + 0.5)  # the clock was stepped forward: old samples age out of the window
    clock.add(108.0, 108.0 + 0.5)
    clock.add(110.0, 110.0 + 0.5)
    assert abs(clock.offset_s - 0.5) < 1e-9


def test_suspect_beyond_the_limit_either_way():
    assert offset_suspect(0.2, 0.05) and offset_suspect(-0.2, 0.05)
    assert not offset_suspect(0.01, 0.05) and not offset_suspect(None, 0.05)


def test_api_status_flags_a_node_whose_clock_is_off(tmp_path):
    db = tmp_path / "edgeprune.db"
    store = Store(db)
    store.add_run({"started_ts": 1.0, "gateway_id": "gateway", "slo_s": 0.5, "window_s": 10, "nodes": ["a", "b"],
                   "max_clock_offset_s": 0.05})
    store.update_node({"node_id": "a", "status": "online", "clock_offset_s": 0.004})
    store.update_node({"node_id": "b", "status": "online", "clock_offset_s": -0.3})
    store.close()
    data = create_app(WebSettings(db_path=db, public_status=True)).test_client().get("/api/status").get_json()
    assert data["clock"] == {"max_offset_s": 0.05, "suspect_nodes": ["b"], "latency_reliable": False}
    assert [n["clock_suspect"] for n in data["nodes"]] == [False, True]


def test_store_adds_new_columns_to_an_older_database(tmp_path):
    """A gateway upgraded in the field opens its old database: the new clock column is added, not an error."""
    import sqlite3

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE nodes (node_id TEXT PRIMARY KEY, status TEXT)")
    conn.commit()
    conn.close()
    store = Store(db)
    store.update_node({"node_id": "a", "status": "online", "clock_offset_s": 0.01})
    store.close()
    assert sqlite3.connect(db).execute("SELECT clock_offset_s FROM nodes").fetchone() == (0.01,)
