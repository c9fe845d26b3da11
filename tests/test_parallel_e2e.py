"""Parallel pipelines end to end: a real mosquitto, the gateway in ``placement_mode = "parallel"`` and four node agents
that cannot hold the whole model (so each pipeline has two stages); the broker deals a camera's frames to the two
pipelines' first stages, and every frame is served by exactly one pipeline and stored once."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import STARTUP_S, Processes, component_env, open_reader, wait_until

pytestmark = pytest.mark.integration
PROFILE = Path(__file__).resolve().parents[1] / "shared" / "assets" / "trapnet.profile.json"  # same plan every run
NODES = ["node-1", "node-2", "node-3", "node-4"]
FRAMES = 40


def test_every_frame_is_served_by_exactly_one_of_two_pipelines_and_stored_once(fresh_broker, tmp_path):
    db = tmp_path / "edgeprune.db"
    # 4 MB per node holds the last two blocks (3.7 MB) but not the whole model (5.2 MB): two stages per pipeline
    env = component_env(fresh_broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES=",".join(NODES),
                        EDGEPRUNE_GATEWAY_PLACEMENT_MODE="parallel", EDGEPRUNE_GATEWAY_HYBRID_ARRIVAL_HZ="20",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_NODE_PROFILE=str(PROFILE),
                        EDGEPRUNE_NODE_MEMORY_MB="4", EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
                        EDGEPRUNE_NODE_QUEUE_SIZE="64", EDGEPRUNE_NODE_MAX_FRAME_AGE_S="0")
    procs = Processes(tmp_path, env)
    try:
        procs.start("gateway", "gateway")
        for node in NODES:
            procs.start(node, "node", "--node-id", node)
        reader = open_reader(db)
        wait_until(lambda: sorted(n["node_id"] for n in reader.nodes() if n["stage"] is not None) == NODES,
                   STARTUP_S * 2, "the four nodes did not all take a stage")
        stages = reader.placement()["stages"]
        pipelines: dict[int, list[dict]] = {}
        for stage in stages:
            pipelines.setdefault(stage.get("pipeline", 0), []).append(stage)
        assert sorted(pipelines) == [0, 1] and all(len(p) == 2 for p in pipelines.values()), stages
        members = {j: [n for s in p for n in [s["node_id"], *s.get("replicas", [])]] for j, p in pipelines.items()}

        camera = procs.start("cam-1", "camera", "--camera-id", "cam-1", "--count", str(FRAMES), "--rate", "10")
        assert camera.wait(STARTUP_S) == 0
        wait_until(lambda: reader.accounting()["accepted"] == FRAMES and reader.accounting()["in_flight"] == 0, 120,
                   f"frames still in flight: {reader.accounting()}")
        accounting = reader.accounting()
        assert accounting["rows"] == FRAMES and accounting["failures"] == 0 and accounting["duplicates"] == 0, \
            accounting
        with sqlite3.connect(db) as connection:
            stored = connection.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests").fetchone()
            paths = [[h["node_id"] for h in json.loads(hops)] for (hops,) in
                     connection.execute("SELECT hops FROM requests")]
        assert stored == (FRAMES, FRAMES)  # stored once each
        served_by = [[j for j, nodes in members.items() if path == nodes] for path in paths]
        assert all(len(s) == 1 for s in served_by), paths  # each frame passed one whole pipeline, in its order
        counts = {j: sum(s == [j] for s in served_by) for j in members}
        assert all(n > 0 for n in counts.values()), counts  # the broker dealt frames to both pipelines
    finally:
        procs.stop_all()
