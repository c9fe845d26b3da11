"""Pure gateway pieces: SLO windows, placement validation, result rows, the SQLite store."""

from __future__ import annotations

import pytest

from gateway.store import result_row
from gateway.slo import SloWindows
from gateway.store import Reader, Store
from shared.schemas import Hop, Placement, Result
from tests.conftest import even_split


def test_windows_close_once_with_attainment_and_percentiles():
    w = SloWindows(window_s=10, slo_s=0.5)
    for i, lat in enumerate([0.1, 0.2, 0.6, 0.4]):
        w.add(100 + i, lat)
    w.add(112, 0.9)
    assert w.close_due(109.9) == []
    (first,) = w.close_due(110)
    assert (first.start_ts, first.count, first.met, first.attainment_pct) == (100, 4, 3, 75.0)
    assert first.p50_s == pytest.approx(0.3)
    assert w.close_due(115) == []
    (second,) = w.close_all()
    assert second.count == 1 and second.attainment_pct == 0.0


def test_window_counts_a_latency_exactly_at_the_slo_as_met_and_reports_true_percentiles():
    w = SloWindows(window_s=10, slo_s=0.10)
    for k in range(1, 21):  # 0.01 s ... 0.20 s, in shuffled order
        w.add(100 + (k * 7) % 20 * 0.1, k / 100)
    (window,) = w.close_all()
    assert (window.count, window.met, window.attainment_pct) == (20, 10, 50.0)  # 0.01 ... 0.10 inclusive
    # linear interpolation between order statistics (numpy's default), worked by hand:
    # p50 = 0.10 + 0.5·0.01, p95 at rank 0.95·19 = 18.05 -> 0.19 + 0.05·0.01, p99 at 18.81 -> 0.19 + 0.81·0.01
    assert window.p50_s == pytest.approx(0.105)
    assert window.p95_s == pytest.approx(0.1905)
    assert window.p99_s == pytest.approx(0.1981)


def test_windows_measure_accuracy_on_labelled_frames_only():
    w = SloWindows(window_s=10, slo_s=0.5)
    for i, correct in enumerate([1, 0, 1, None, 1]):
        w.add(100 + i, 0.1, correct)
    w.add(111, 0.1)
    first, second = w.close_all()
    assert (first.count, first.labelled, first.accuracy_measured) == (5, 4, 0.75)
    assert (second.labelled, second.accuracy_measured) == (0, None)


@pytest.mark.parametrize("n_blocks,nodes", [(6, ["a", "b"]), (6, ["a", "b", "c", "d"]), (3, list("abcdef"))])
def test_even_split_covers_every_block_once(n_blocks, nodes):
    p = even_split(n_blocks, nodes)
    covered = [b for s in p.stages for b in range(s.first_block, s.last_block + 1)]
    assert covered == list(range(n_blocks))


@pytest.mark.parametrize("stages,msg", [
    ([(1, "a", 0, 2), (2, "b", 4, 5)], "starts at block 4"),
    ([(1, "a", 0, 2), (2, "a", 3, 5)], "two stages"),
    ([(1, "a", 0, 2)], "cover blocks 0..2"),
    ([(2, "a", 0, 5)], "numbered"),
])
def test_placement_must_be_a_contiguous_cover(stages, msg):
    with pytest.raises(ValueError, match=msg):
        Placement(version=1, model="m", n_blocks=6, issued_at=0, stages=[
            dict(stage=s, node_id=n, first_block=first, last_block=last) for s, n, first, last in stages])


def _result(request_id: str, capture: float) -> Result:
    hop = lambda st, t: Hop(stage=st, node_id=f"n{st}", prune_ratio=0.0, received_ts=t,  # noqa: E731
                            started_ts=t + 0.01, finished_ts=t + 0.03, published_ts=t + 0.031)
    return Result(request_id=request_id, camera_id="cam", capture_ts=capture, label="cat", label_index=2,
                  confidence=0.8, hops=[hop(1, capture + 0.005), hop(2, capture + 0.04)])


def test_result_row_splits_time_into_queue_compute_transfer():
    row = result_row(_result("r", 10.0))
    assert row["finish_ts"] == pytest.approx(10.071)  # the last stage's publish time
    assert row["e2e_s"] == pytest.approx(0.071)
    assert row["queue_s"] == pytest.approx(0.02) and row["compute_s"] == pytest.approx(0.04)
    assert row["transfer_s"] == pytest.approx(0.011)
    assert row["prune_ratios"] == [0.0, 0.0]


def test_store_batches_ignores_duplicate_results_and_reads_back(tmp_path):
    store = Store(tmp_path / "e.db")
    store.add_run({"started_ts": 1.0, "gateway_id": "g", "slo_s": 0.5, "window_s": 10, "nodes": ["a"]})
    for rid, cap in [("r1", 10.0), ("r2", 11.0), ("r1", 10.5)]:  # a later, different r1 must not replace it
        store.add_request(result_row(_result(rid, cap)))
    store.update_node({"node_id": "a", "status": "online", "status_ts": 1.0})
    store.update_node({"node_id": "a", "stage": 1, "queue_depth": 3, "errors": {"bad_image": 2}})
    reader = Reader(tmp_path / "e.db")
    assert reader.nodes() == []  # nothing is visible before the batch is flushed
    assert store.flush() == 6
    (node,) = reader.nodes()
    assert (node["status"], node["stage"], node["queue_depth"], node["errors"]) == ("online", 1, 3, {"bad_image": 2})
    assert [(r["request_id"], r["capture_ts"]) for r in reader.recent_requests(0)] == [("r1", 10.0), ("r2", 11.0)]
    totals = reader.totals(slo_s=0.5)
    assert totals["results"] == 2 and totals["attainment_pct"] == 100.0
    assert reader.current_run()["nodes"] == ["a"]
    store.close()
    with pytest.raises(FileNotFoundError, match="gateway"):
        Reader(tmp_path / "missing.db")


def test_labelled_results_record_whether_they_were_right(tmp_path):
    right = result_row(_result("r1", 10.0).model_copy(update={"true_label": 2}))
    wrong = result_row(_result("r2", 10.0).model_copy(update={"true_label": 5}))
    unlabelled = result_row(_result("r3", 10.0))
    assert [(r["true_label"], r["correct"]) for r in (right, wrong, unlabelled)] == [(2, 1), (5, 0), (None, None)]


def test_an_older_database_gains_the_new_columns(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, e2e_s FLOAT)")
    store = Store(tmp_path / "old.db")
    store.add_request(result_row(_result("r1", 10.0).model_copy(update={"true_label": 2})))
    store.flush()
    assert store.db.execute("SELECT correct FROM requests").fetchall() == [(1,)]
    store.close()


def test_a_deferred_hop_round_trips_and_marks_the_request_late(tmp_path):
    import sqlite3

    timely = _result("r1", 10.0)
    deferred = timely.hops[1].model_copy(update={"deferred": True})
    late = timely.model_copy(update={"request_id": "r2", "hops": [timely.hops[0], deferred]})
    back = Result.model_validate_json(late.model_dump_json())
    assert [h.deferred for h in back.hops] == [False, True]
    with pytest.raises(ValueError):
        Hop.model_validate({**deferred.model_dump(), "deferred": "maybe"})
    with sqlite3.connect(tmp_path / "old.db") as conn:  # a file from before the `late` column
        conn.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, e2e_s FLOAT)")
    store = Store(tmp_path / "old.db")
    store.add_request(result_row(timely))
    store.add_request(result_row(back))
    store.flush()
    rows = store.db.execute("SELECT request_id, late, hops FROM requests ORDER BY request_id").fetchall()
    assert [(rid, late) for rid, late, _ in rows] == [("r1", 0), ("r2", 1)]
    assert '"deferred":true' in rows[1][2]
    store.close()


def test_an_older_database_keeps_its_receipt_times_as_received_ts(tmp_path):
    """Rows stored before `received_ts` had the gateway's receipt in `finish_ts`: the migration keeps it there."""
    import sqlite3

    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, finish_ts FLOAT, e2e_s FLOAT)")
        conn.execute("INSERT INTO requests VALUES ('old', 12.5, 2.5)")
    store = Store(tmp_path / "old.db")
    store.add_request({**result_row(_result("new", 10.0)), "received_ts": 30.0})
    store.flush()
    rows = store.db.execute("SELECT request_id, finish_ts, received_ts FROM requests ORDER BY request_id").fetchall()
    assert rows == [("new", pytest.approx(10.071), 30.0), ("old", 12.5, 12.5)]
    store.close()


def test_a_restarted_gateway_still_knows_which_node_took_each_open_frame(tmp_path):
    from gateway.accounting import RequestLedger

    store = Store(tmp_path / "g.db")
    for request_id in ("open", "failed"):
        store.add_accepted({"request_id": request_id, "camera_id": "cam", "node_id": "node-1", "capture_ts": 1.0,
                            "received_ts": 1.0})
    store.add_failure({"request_id": "failed", "ts": 2.0, "reason": "dropped", "component": "node-2",
                       "node_id": "node-2", "message": "full"})
    store.flush()
    ledger = RequestLedger()
    for row in store.open_requests(0.0):
        ledger.restore(row["request_id"], row["camera_id"], row["received_ts"], bool(row["stored"]), row["reason"],
                       row["node_id"])
    assert ledger.in_flight == 1 and ledger.last_known("open") == (1.0, "node-1")
    assert store.db.execute("SELECT node_id FROM failures").fetchall() == [("node-2",)]
    store.close()


def test_the_accounting_counts_duplicates_apart_from_frames(tmp_path):
    store = Store(tmp_path / "g.db")
    store.add_accepted({"request_id": "r", "camera_id": "cam", "node_id": "n1", "capture_ts": 10.0,
                        "received_ts": 10.0})
    store.add_request({**result_row(_result("r", 10.0)), "received_ts": 10.2})
    for ts in (10.5, 10.5, 11.0):  # the second is the first again (a redelivered write): one row
        store.add_duplicate({"request_id": "r", "ts": ts, "node_id": "n2", "label": "cat", "confidence": 0.7})
    store.flush()
    accounting = Reader(tmp_path / "g.db").accounting()
    assert (accounting["accepted"], accounting["rows"], accounting["failures"], accounting["in_flight"],
            accounting["duplicates"]) == (1, 1, 0, 0, 2)
    store.close()
