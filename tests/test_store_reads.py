"""The one read path into the gateway's SQLite file: the read-only connection factory and Reader's named queries."""

from __future__ import annotations

import sqlite3

import pytest

from gateway.store import Reader, Store, connect_read_only, result_row
from shared.schemas import Hop, Result


def test_a_read_only_connection_opens_the_file_named_even_with_uri_characters(tmp_path):
    """'#', '?' and '%' in a path are URI syntax: pasted into ``file:...?mode=ro`` they name another file."""
    path = tmp_path / "site #1?50%20.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (a)")
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    reader = connect_read_only(path)
    assert reader.execute("SELECT a FROM t").fetchall() == [(1,)]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("INSERT INTO t VALUES (2)")
    reader.close()


def test_a_read_only_connection_never_creates_the_file(tmp_path):
    with pytest.raises(sqlite3.OperationalError):
        connect_read_only(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def _result(request_id: str, camera_id: str, capture: float, true_label: int | None = None) -> Result:
    hop = lambda st, t: Hop(stage=st, node_id=f"n{st}", prune_ratio=0.1 * st, received_ts=t,  # noqa: E731
                            started_ts=t + 0.01, finished_ts=t + 0.03, published_ts=t + 0.031)
    return Result(request_id=request_id, camera_id=camera_id, capture_ts=capture, label="cat", label_index=2,
                  confidence=0.8, true_label=true_label, hops=[hop(1, capture + 0.005), hop(2, capture + 0.04)])


@pytest.fixture
def reader(tmp_path):
    """A gateway log with two cameras' frames, calibrations, errors, prune events, placements and acceptances."""
    store = Store(tmp_path / "g.db")
    for request_id, camera, capture in [("b", "cam-1", 12.0), ("a", "cam-2", 11.0), ("c", "cam-1", 10.0),
                                        ("d", "cam-1", 12.0)]:
        store.add_request(dict(result_row(_result(request_id, camera, capture, true_label=2)),
                               received_ts=capture + 0.1))
        store.add_accepted({"request_id": request_id, "camera_id": camera, "node_id": "n1", "capture_ts": capture,
                            "received_ts": capture + 0.01})
    for node, at, slope in [("n1", 5.0, 1.0), ("n2", 6.0, 2.0), ("n1", 20.0, 3.0)]:
        store.add_calibration({"node_id": node, "measured_at": at, "first_block": 0, "last_block": 2,
                               "fit": {"slope": slope}, "best": "linear"})
    for ts, kind, request_id in [(1.0, "bad_calibration", None), (2.0, "dropped", "a"), (3.0, "dropped", "b"),
                                 (4.0, "bad_calibration", None), (5.0, "rejected_command", "x"),
                                 (6.0, "bad_image", "c")]:
        store.add_error({"ts": ts, "component": "n1", "topic": f"edgeprune/node/n{int(ts)}/calibration",
                         "kind": kind, "message": "m", "request_id": request_id})
    store.add_prune_event({"ts": 30.0, "kind": "set", "changed": {"n1": 0.5}, "reason": "slow"})
    store.add_prune_event({"ts": 20.0, "kind": "replace", "reason": "gone"})
    store.add_prune_event({"ts": 30.0, "kind": "held"})
    for version, issued in [(2, 200.0), (1, 100.0)]:
        store.add_placement({"version": version, "issued_at": issued, "model": "m", "n_blocks": 6,
                             "stages": [{"node_id": "n1", "first_block": 0, "last_block": 5}]})
    store.close()
    reader = Reader(tmp_path / "g.db")
    yield reader
    reader.close()


def test_frames_are_every_stored_frame_or_one_cameras_by_capture_time_with_json_decoded(reader):
    frames = reader.frames()
    assert [f["request_id"] for f in frames] == ["c", "a", "b", "d"]  # equal capture times: by request id
    assert [f["request_id"] for f in reader.frames("cam-1")] == ["c", "b", "d"]
    frame = frames[0]
    assert frame.keys() == {"request_id", "capture_ts", "finish_ts", "received_ts", "e2e_s", "prune_ratios",
                            "hops", "correct"}
    assert frame["prune_ratios"] == pytest.approx([0.1, 0.2]) and frame["correct"] == 1
    assert [h["stage"] for h in frame["hops"]] == [1, 2] and frame["received_ts"] == pytest.approx(10.1)


def test_calibrations_name_the_nodes_measured_since_and_each_nodes_latest_fit(reader):
    assert reader.calibrated_nodes() == {"n1", "n2"}
    assert reader.calibrated_nodes(since_ts=5.5) == {"n1", "n2"}
    assert reader.calibrated_nodes(since_ts=6.0) == {"n1"}
    assert reader.calibration_fits() == {"n1": {"slope": 3.0}, "n2": {"slope": 2.0}}


def test_errors_of_one_kind_after_an_id_and_frames_errors_by_kind(reader):
    assert [(e["id"], e["topic"]) for e in reader.errors_of_kind("bad_calibration")] == [
        (1, "edgeprune/node/n1/calibration"), (4, "edgeprune/node/n4/calibration")]
    assert [e["id"] for e in reader.errors_of_kind("bad_calibration", after_id=1)] == [4]
    # the control plane's kinds are not a frame's failure even where they name a request
    assert reader.frame_errors_by_kind() == {"dropped": 2, "bad_image": 1}


def test_acceptances_prune_history_and_placement_history(reader):
    assert reader.accepted_capture_times() == {"a": 11.0, "b": 12.0, "c": 10.0, "d": 12.0}
    history = reader.prune_history()
    assert [(e["ts"], e["kind"]) for e in history] == [(20.0, "replace"), (30.0, "held"), (30.0, "set")]
    assert history[2]["changed"] == {"n1": 0.5} and history[1]["changed"] is None
    placements = reader.placement_history()
    assert [(p["version"], p["issued_at"]) for p in placements] == [(1, 100.0), (2, 200.0)]
    assert placements[0]["stages"][0]["node_id"] == "n1"


def test_a_closed_reader_reads_no_more(reader):
    reader.close()
    with pytest.raises(sqlite3.ProgrammingError):
        reader.frames()
