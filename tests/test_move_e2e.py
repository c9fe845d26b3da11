"""Blocks move while frames flow, and no frame is lost: a third node joins a two-stage pipeline under a steady
camera, the gateway re-partitions over three (every stage's blocks move), and every frame stage 1 accepted ends
as a stored result. A real mosquitto, the gateway, nodes and camera as processes, a real SQLite file.

A join is the move's trigger here because it comes at a known moment without a controller; what a move does to
the frames in flight (stages switching one after another, activations for the old cut, queued work) is the same
for the re-partitioning on a violation (``[gateway] replace_on_violation``), docs/placement.md.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pytest

from shared.model import DEFAULT_CHECKPOINT
from tests.conftest import STARTUP_S, Processes, component_env, open_reader, wait_until

pytestmark = pytest.mark.integration


def test_frames_in_flight_during_a_move_all_end_as_results(broker, tmp_path):
    db = tmp_path / "edgeprune.db"
    env = component_env(
        broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2,node-3",
        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_STARTUP_WAIT_S="1",
        EDGEPRUNE_GATEWAY_REJOIN_HOLD_S="1", EDGEPRUNE_GATEWAY_REPLAN_MIN_GAIN="0",
        EDGEPRUNE_NODE_UPLINK_MBIT_S="100000", EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
        # the shipped profile on every node: the same cuts every run (2 stages, then 3), not measuring noise's
        EDGEPRUNE_NODE_PROFILE=str(DEFAULT_CHECKPOINT.with_name("trapnet.profile.json")),
        # slices slow enough that frames wait in queues and between stages when the cut moves; a queue that
        # never overflows (a full queue drops frames: load shedding, not what a move costs)
        EDGEPRUNE_NODE_EMULATED_SLOWDOWN="20", EDGEPRUNE_NODE_QUEUE_SIZE="10000")
    procs = Processes(tmp_path, env)
    try:
        procs.start("gateway", "gateway")
        procs.start("node-1", "node", "--node-id", "node-1")
        procs.start("node-2", "node", "--node-id", "node-2")
        reader = open_reader(db)
        wait_until(lambda: len((reader.placement() or {}).get("stages", [])) == 2, STARTUP_S,
                   "no two-stage placement")
        before = reader.placement()
        camera = procs.start("camera", "camera", "--camera-id", "cam-m", "--rate", "10", "--arrival", "fixed")

        def hops_seen() -> set[int]:
            return {len(r["prune_ratios"]) for r in reader.recent_requests(0) if r["camera_id"] == "cam-m"}

        wait_until(lambda: 2 in hops_seen(), STARTUP_S, "no frame went through the two-stage pipeline")
        procs.start("node-3", "node", "--node-id", "node-3")
        wait_until(lambda: len(reader.placement()["stages"]) == 3, STARTUP_S, "the gateway did not move to 3 stages")
        after = reader.placement()
        cuts = [(s["first_block"], s["last_block"]) for s in after["stages"]]
        assert cuts[:2] != [(s["first_block"], s["last_block"]) for s in before["stages"]], "no block moved"
        wait_until(lambda: 3 in hops_seen(), 60, "no frame went through the three-stage pipeline")
        camera.terminate()
        camera.wait(30)
        wait_until(lambda: reader.accounting()["in_flight"] == 0, 150, "frames still in flight")
        accounting = reader.accounting()
        assert accounting["accepted"] > 0
        assert accounting["failures"] == 0, f"frames failed in the move: {accounting['failures_by_reason']}"
        assert accounting["rows"] == accounting["accepted"]
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            hops = [h for (raw,) in conn.execute("SELECT hops FROM requests") for h in json.loads(raw)]
        placed = cuts + [(s["first_block"], s["last_block"]) for s in before["stages"]]
        moved = [h for h in hops if (h["first_block"], h["first_block"] + h["n_blocks"] - 1) not in placed]
        print(f"{accounting['accepted']} frames, none lost; {len(moved)} hops ran or forwarded other blocks "
              f"than a placement's stage: {[(h['stage'], h['first_block'], h['n_blocks']) for h in moved]}")
    finally:
        procs.stop_all()
