"""The gateway re-plans for a new arrival rate: a real mosquitto, the gateway as a process, a real SQLite file.

Nodes are stood in for by their retained status and profile (the planner needs nothing else) and the frames
by stage 1's accepted-frame records, the gateway's measure of the arrival rate; the hysteresis is shrunk to
seconds (rate_window_s 3, rate_dwell_s 3). Two rates, one after the other: two rate_replan events, each
planned for about the rate it saw, with the hybrid plan for it.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import pytest

from shared.bus import Bus
from shared.model import DEFAULT_CHECKPOINT, build_model, model_fingerprint
from shared.schemas import AcceptedRequest, ModelProfile, NodeProfile, to_json
from shared.topics import Topics
from tests.conftest import STARTUP_S, Processes, component_env, wait_until

pytestmark = pytest.mark.integration
TOPICS = Topics()
NODES = ["node-1", "node-2"]


def rate_events(db) -> list[dict]:
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT metrics, reason FROM prune_events WHERE kind = 'rate_replan' ORDER BY ts")
            return [{**json.loads(metrics), "reason": reason} for metrics, reason in rows]
    except sqlite3.OperationalError:  # the gateway has not created the table yet
        return []


def send_frames(bus: Bus, hz: float, until, timeout_s: float = 60.0) -> float:
    """Accepted-frame records at ``hz`` until ``until()`` holds (checked twice a second); returns the rate actually
    sent (a loaded machine lags). The gateway re-plans while the rate lasts: sending on until it has, not for a fixed
    time, is as fast as the trigger and as slow as the machine."""
    started, sent, checked = time.monotonic(), 0, 0.0
    while (elapsed := time.monotonic() - started) < timeout_s:
        if elapsed - checked >= 0.5:
            checked = elapsed
            if until():
                break
        if sent < elapsed * hz:
            now = time.time()
            record = AcceptedRequest(request_id=uuid.uuid4().hex, camera_id="cam-1", node_id="node-1",
                                     capture_ts=now, received_ts=now)
            bus.publish(TOPICS.accepted("node-1"), to_json(record), qos=1)
            sent += 1
        else:
            time.sleep(0.005)
    assert until(), f"the gateway did not re-plan within {timeout_s:g} s of frames at {hz:g}/s"
    return sent / (time.monotonic() - started)


def test_gateway_re_plans_for_each_persistent_rate(fresh_broker, tmp_path) -> None:
    db = tmp_path / "gateway.db"
    env = component_env(fresh_broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES=",".join(NODES),
                        EDGEPRUNE_GATEWAY_STATS_SILENCE_S="3600", EDGEPRUNE_GATEWAY_RATE_WINDOW_S="3",
                        EDGEPRUNE_GATEWAY_RATE_DWELL_S="3", EDGEPRUNE_GATEWAY_RATE_MIN_INTERVAL_S="0",
                        EDGEPRUNE_GATEWAY_RATE_BAND="0.5",
                        EDGEPRUNE_GATEWAY_PREPARE_TIMEOUT_S="1")  # stand-ins never confirm a subscription
    processes = Processes(tmp_path, env)
    bus = Bus(fresh_broker, "stage-1-stand-in", TOPICS.component_status("stage-1-stand-in"))
    fingerprint = model_fingerprint(build_model(None))
    profile = ModelProfile.model_validate_json(DEFAULT_CHECKPOINT.with_name("trapnet.profile.json").read_text())
    try:
        bus.start()
        for node in NODES:  # what a node agent offers when it starts
            offer = NodeProfile(node_id=node, model_fingerprint=fingerprint, memory_mb=500, uplink_mbit_s=100,
                                profile=profile)
            bus.publish(TOPICS.node_profile(node), to_json(offer), qos=1, retain=True)
            bus.publish(TOPICS.node_status(node), b"online", qos=1, retain=True)
        processes.start("gateway", "gateway")
        wait_until(lambda: db.exists() and sqlite3.connect(db).execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'placements'").fetchone()[0], STARTUP_S,
            "the gateway did not start")
        wait_until(lambda: sqlite3.connect(db).execute("SELECT count(*) FROM placements").fetchone()[0] > 0,
                   STARTUP_S, "the gateway did not place the two nodes")

        quiet = send_frames(bus, 4, lambda: len(rate_events(db)) >= 1)
        busy = send_frames(bus, 24, lambda: len(rate_events(db)) >= 2)
    finally:
        bus.stop()
        processes.stop_all()
    first, second = rate_events(db)[:2]
    assert first["planned_for_hz"] is None and 0.5 * quiet < first["arrival_hz"] < 2 * quiet
    assert second["planned_for_hz"] == first["arrival_hz"] and second["arrival_hz"] > 1.5 * first["arrival_hz"]
    assert 0.5 * busy < second["arrival_hz"] < 2 * busy
    for event in (first, second):  # what the planner chose for that rate, and that nothing moved (log mode)
        assert event["plan"]["pipelines"] and event["plan"]["sustainable_hz"] > 0
        assert event["mode"] == "log" and event["placement_version"] is None and "logged only" in event["reason"]
    assert "Traceback" not in processes.log("gateway")
