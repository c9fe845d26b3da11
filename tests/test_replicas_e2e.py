"""Replicated stages end to end: the gateway places two node agents as replicas of one stage (a hybrid plan), a
camera's frames are spread between them by the broker, one replica is killed (or hung) while it holds frames, and
every frame it held is served by the survivor: accepted = rows + failures, with nothing lost."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import STARTUP_S, Processes, component_env, mqtt_client, open_reader, wait_until

pytestmark = pytest.mark.integration
PROFILE = Path(__file__).resolve().parents[1] / "shared" / "assets" / "trapnet.profile.json"  # same plan every run


def run_replica_fault(broker, tmp_path: Path, fault) -> None:
    """Two replicas of one stage, node-2 made slow so frames pile up in what it holds, 30 frames sent, then
    ``fault(procs)`` hits node-2: the gateway must take its session over and the survivor serve what it held."""
    db = tmp_path / "edgeprune.db"
    # result_timeout_s stays at its 120 s: a frame left with the faulty replica would still be in flight when
    # the wait below gives up, so the test cannot pass by recording it lost
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_PLACEMENT_MODE="hybrid", EDGEPRUNE_GATEWAY_HYBRID_ARRIVAL_HZ="20",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_STATS_SILENCE_S="3",
                        EDGEPRUNE_NODE_PROFILE=str(PROFILE), EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
                        EDGEPRUNE_NODE_QUEUE_SIZE="64", EDGEPRUNE_NODE_MAX_FRAME_AGE_S="0")
    procs = Processes(tmp_path, env)
    try:
        procs.start("gateway", "gateway")
        procs.start("node-1", "node", "--node-id", "node-1")
        procs.start("node-2", "node", "--node-id", "node-2")
        reader = open_reader(db)
        wait_until(lambda: sorted(n["node_id"] for n in reader.nodes() if n["stage"] == 1) == ["node-1", "node-2"],
                   STARTUP_S, "the two nodes did not both take stage 1 as replicas")
        stages = reader.placement()["stages"]
        assert len(stages) == 1 and sorted([stages[0]["node_id"], *stages[0]["replicas"]]) == ["node-1", "node-2"]

        admin = mqtt_client(broker)  # node-2 becomes slow, so frames pile up in what it holds
        admin.publish("edgeprune/node/node-2/cmd", json.dumps({"cmd": "slowdown", "factor": 300}), qos=1)
        camera = procs.start("cam-1", "camera", "--camera-id", "cam-1", "--count", "30", "--rate", "10")
        assert camera.wait(STARTUP_S) == 0
        time.sleep(0.5)
        fault(procs)
        wait_until(lambda: any(e["kind"] == "handover" for e in reader.errors(50)), 60,
                   "the gateway did not take over the faulty replica's session")
        handover = next(e for e in reader.errors(50) if e["kind"] == "handover")
        wait_until(lambda: reader.accounting()["accepted"] == 30 and reader.accounting()["in_flight"] == 0, 90,
                   f"frames still in flight: {reader.accounting()}")
        accounting = reader.accounting()
        assert accounting["rows"] + accounting["failures"] == accounting["accepted"] == 30
        assert "lost" not in accounting["failures_by_reason"], accounting
        held = int(handover["message"].split(": ")[1].split()[0])
        assert held > 0, f"node-2 held nothing at the fault: the test proves nothing ({handover['message']})"
        with sqlite3.connect(db) as connection:
            hops = [json.loads(h) for (h,) in connection.execute("SELECT hops FROM requests")]
        assert sum([h["node_id"] for h in hop] == ["node-1"] for hop in hops) >= held  # the survivor served them
        admin.loop_stop()
        admin.disconnect()
    finally:
        if "node-2" in procs.procs:
            procs.procs["node-2"].send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        procs.stop_all()


def test_a_killed_replica_hands_what_it_held_to_the_survivor(fresh_broker, tmp_path):
    run_replica_fault(fresh_broker, tmp_path, lambda procs: procs.procs["node-2"].kill())  # no clean exit: its will


def test_a_hung_replica_is_taken_over_like_a_dead_one(fresh_broker, tmp_path):
    """SIGSTOP: its connection stays up, so no will comes; its stats stop, and after stats_silence_s the gateway
    takes its session over (the broker closes the hung connection) and re-publishes what it held."""
    run_replica_fault(fresh_broker, tmp_path, lambda procs: procs.procs["node-2"].send_signal(signal.SIGSTOP))
