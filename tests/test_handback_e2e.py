"""A stage's only node killed or hung while it holds frames, end to end (issue 25): what it held comes back from its
broker session and is served elsewhere, so every frame ends as a row, none as ``lost``.

Gateway and two node agents as processes on a real mosquitto, a two-stage pipeline; the victim is slowed 300x so
frames pile up in what it holds, then SIGKILLed (and restarted, as a supervisor would) or SIGSTOPped.
``result_timeout_s`` stays at its 120 s: a frame left with the victim would still be in flight when the waits below
give up, so a test cannot pass by recording it lost.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import STARTUP_S, Processes, component_env, mqtt_client, start_two_stage_site, wait_until

pytestmark = pytest.mark.integration
PROFILE = Path(__file__).resolve().parents[1] / "shared" / "assets" / "trapnet.profile.json"  # same plan every run
FRAMES = 30


def handovers(reader, node: str) -> list[dict]:
    return [e for e in reader.errors(100) if e["kind"] == "handover" and e["message"].startswith(f"{node} ")]


def run_only_node_fault(broker, tmp_path: Path, victim_stage: int, fault, after=None) -> None:
    """``fault(procs, victim)`` hits the only node of stage ``victim_stage`` while it holds frames; once the gateway
    took its session over, ``after(procs, victim)`` (a restart, a resume); then every frame must end as a row or a
    failure other than ``lost``."""
    db = tmp_path / "edgeprune.db"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_STATS_SILENCE_S="3",
                        EDGEPRUNE_GATEWAY_REJOIN_HOLD_S="1", EDGEPRUNE_NODE_PROFILE=str(PROFILE),
                        EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5", EDGEPRUNE_NODE_QUEUE_SIZE="64",
                        EDGEPRUNE_NODE_MAX_FRAME_AGE_S="0", EDGEPRUNE_NODE_UPLINK_MBIT_S="100000")
    procs = Processes(tmp_path, env)
    try:
        reader = start_two_stage_site(procs, db)
        victim = [s["node_id"] for s in reader.placement()["stages"]][victim_stage - 1]
        admin = mqtt_client(broker)
        admin.publish(f"edgeprune/node/{victim}/cmd", json.dumps({"cmd": "slowdown", "factor": 300}),
                      qos=1).wait_for_publish(5)
        camera = procs.start("cam-1", "camera", "--camera-id", "cam-1", "--count", str(FRAMES), "--rate", "10")
        assert camera.wait(STARTUP_S) == 0
        wait_until(lambda: reader.accounting()["accepted"] == FRAMES, 60, "stage 1 did not accept every frame")
        fault(procs, victim)
        wait_until(lambda: handovers(reader, victim), 60, f"the gateway did not take over {victim}'s session")
        (handover,) = handovers(reader, victim)
        held = int(handover["message"].split(": ")[1].split()[0])
        assert held > 0, f"{victim} held nothing at the fault: the test proves nothing ({handover['message']})"
        if after is not None:
            after(procs, victim)
        wait_until(lambda: reader.accounting()["in_flight"] == 0, 120, f"frames still in flight: {reader.accounting()}")
        accounting = reader.accounting()
        assert accounting["accepted"] == FRAMES == accounting["rows"] + accounting["failures"], accounting
        assert accounting["failures_by_reason"] == {}, accounting
        admin.loop_stop()
        admin.disconnect()
    finally:
        for proc in procs.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        procs.stop_all()


def test_a_killed_last_stage_node_hands_what_it_held_to_its_restart(fresh_broker, tmp_path):
    """Stage 2's node dies holding activations; the pipeline becomes node-1 alone, whose stage 1 reads camera frames,
    so those activations have no stage until the restarted node is placed again: the gateway keeps them until then."""
    def kill(procs, victim):
        procs.procs[victim].kill()  # no clean exit: its will
        procs.procs[victim].wait()
    run_only_node_fault(fresh_broker, tmp_path, 2, kill,
                        after=lambda procs, victim: procs.start(victim, "node", "--node-id", victim))


def test_a_hung_first_stage_node_is_taken_over_and_its_frames_served_by_the_other(fresh_broker, tmp_path):
    """SIGSTOP: no will; after stats_silence_s the gateway re-places over node-2 alone, takes the hung node's session
    over (the broker closes its connection) and re-sends its frames on their camera topics; it then resumes and serves
    what it still had in memory, whose results are duplicates, not rows."""
    run_only_node_fault(fresh_broker, tmp_path, 1,
                        lambda procs, victim: procs.procs[victim].send_signal(signal.SIGSTOP),
                        after=lambda procs, victim: procs.procs[victim].send_signal(signal.SIGCONT))
