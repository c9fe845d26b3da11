"""`edgeprune bench pipeline` end to end on a tiny scenario: real broker, gateway, nodes and camera."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeprune.bench.pipeline import _full_restore, _timeline, failure_reasons, load_scenario
from shared.settings import ControllerSettings

pytestmark = pytest.mark.integration

TINY = """
name = "tiny"
duration_s = 14
slo_s = 0.2
window_s = 2
seed = 5

[[nodes]]
id = "node-1"
speed = 10.0

[[nodes]]
id = "node-2"
speed = 10.0

[imbalance]
node-2 = 1.1

[[slowdowns]]
node = "node-1"
factor = 8.0
start_s = 1
end_s = 9

[arrivals]
kind = "poisson"
rate_hz = 8.0

[controller]
trigger_window_s = 3
trigger_min_span_s = 1
cooldown_s = 2
min_samples = 3

[quick]
duration_s = 8
slowdowns = [{ node = "node-1", factor = 8.0, start_s = 1, end_s = 5 }]
"""


def test_tiny_scenario_reports_every_frame_sent_and_the_pruning(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", "pipeline", "--scenario", str(scenario),
                           "--policies", "bottleneck", "--run-dir", str(tmp_path / "run"), "--json", str(out),
                           "--plots", str(tmp_path / "plots")],
                          capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["scenario"] == "tiny" and "sleep" in document["emulation"]
    result = document["policies"]["bottleneck"]
    for key in ("frames", "attainment", "p50_s", "p95_s", "p99_s", "failed", "accuracy_predicted_mean",
                "accuracy_measured", "reaction_s", "full_restore_s", "reprunes_after_restore"):
        assert key in result
    assert result["frames"] == result["results"] + result["failed"] > 0
    assert result["attainment"] == result["met"] / result["frames"]
    assert result["labelled"] == result["results"]  # the benchmark's camera labels every frame
    assert 0 <= result["accuracy_measured"] <= 1
    assert result["prune_events"] >= 1 and result["reaction_s"] is not None  # 8x on 10x-host stages saturates
    assert "bottleneck" in proc.stdout  # the table
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "tiny-accuracy.png", "tiny-attainment.png", "tiny-latency.png"]


def test_quick_oracle_run_sweeps_the_rate_and_its_prunes_are_the_gateways(tmp_path):
    """One cluster only (a sweep point costs a fresh cluster): the oracle at the scenario's own rate."""
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", "pipeline", "--scenario", str(scenario),
                           "--quick", "--policies", "oracle", "--rates", "1", "--run-dir", str(tmp_path / "run"),
                           "--json", str(out), "--plots", str(tmp_path / "plots")],
                          capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = json.loads(out.read_text())
    result = document["policies"]["oracle"]
    onset, end = document["slowdowns"][0]["start_s"], document["slowdowns"][0]["end_s"]
    # the plan: node-1 pruned for its true 8x at the onset, everything back to 0 at the end
    assert [step["at_s"] for step in document["oracle_plan"]] == [onset, end]
    assert document["oracle_plan"][0]["ratios"]["node-1"] > 0 and document["oracle_plan"][0]["ratios"]["node-2"] == 0
    assert document["oracle_plan"][1]["ratios"] == {"node-1": 0.0, "node-2": 0.0}
    # ... published through the gateway, which recorded one prune and one restore, in that order, after the onset
    assert result["prune_events"] == 1 and result["restore_events"] == 1
    (pruned_at, first, pruned), (restored_at, second, restored) = result["ratio_series"]
    assert (first, second) == ("prune", "restore") and onset <= pruned_at < restored_at
    assert pruned["node-1"] == document["oracle_plan"][0]["ratios"]["node-1"] and restored["node-1"] == 0
    assert result["reaction_s"] is not None and result["full_restore_s"] is not None
    unpruned = document["oracle_plan"][1]["predicted_accuracy"]  # at ratios 0
    floor = ControllerSettings().accuracy_floor_relative * unpruned
    assert floor - 1e-9 <= result["accuracy_predicted_worst"] < unpruned
    [row] = document["rate_sweep"]
    assert row["policy"] == "oracle" and row["rate_multiplier"] == 1.0
    assert row["attainment"] == result["attainment"] and 0 <= row["attainment"] <= 1
    assert row["arrival_hz"] == result["frames"] / document["duration_s"] > 0
    assert 0 <= row["accuracy_measured"] <= 1 and row["p95_s"] > 0
    assert "attainment against arrival rate" in proc.stdout
    assert (tmp_path / "plots" / "tiny-quick-rates.png").stat().st_size > 0
    replot = subprocess.run([sys.executable, "-m", "edgeprune", "bench", "pipeline", "--replot", str(out),
                             "--plots", str(tmp_path / "replot")], capture_output=True, text=True, timeout=120,
                            env=os.environ.copy())
    assert replot.returncode == 0, replot.stderr[-3000:]
    assert (tmp_path / "replot" / "tiny-quick-rates.png").stat().st_size > 0


def test_timeline_tells_prunes_from_restores_and_times_the_full_restore():
    events = [{"ts": 10.0, "kind": "set", "changed": '{"a": 0.5}', "reason": ""},
              {"ts": 12.0, "kind": "held", "changed": "{}", "reason": ""},
              {"ts": 30.0, "kind": "set", "changed": '{"a": 0.2}', "reason": ""},
              {"ts": 40.0, "kind": "set", "changed": '{"a": 0.0}', "reason": ""}]
    timeline = _timeline(events)
    assert [kind for _, kind, _ in timeline] == ["prune", "restore", "restore"]
    assert _full_restore(timeline, end_ts=25.0) == (15.0,)
    assert _full_restore(timeline[:2], end_ts=25.0) is None  # still pruned at the end of the run
    moved = [(5.0, "replace", {}), (33.0, "replace", {})]
    assert _full_restore(moved, end_ts=25.0) == (8.0,)


def test_failure_reasons_count_each_dropped_frame_once():
    """A full-queue drop is in the node's counter and on the error topic: the reasons add up to the failures."""
    reasons = failure_reasons(failed=46, dropped=19, errors={"dropped": 19, "stale_placement": 27})
    assert reasons == {"dropped_full_queue": 19, "error_stale_placement": 27, "lost_or_unfinished": 0}
    assert sum(reasons.values()) == 46
    # the counter's last report preceded the last drops: the error records count them
    assert failure_reasons(failed=12, dropped=9, errors={"dropped": 11}) == {
        "dropped_full_queue": 11, "lost_or_unfinished": 1}
    assert failure_reasons(failed=3, dropped=0, errors={}) == {"dropped_full_queue": 0, "lost_or_unfinished": 3}


def test_shipped_scenarios_load_with_their_quick_variants():
    for name in ("paper", "hetero4", "scale8"):
        full, quick = load_scenario(name), load_scenario(name, quick=True)
        assert quick.duration_s < full.duration_s and full.slowdowns and quick.slowdowns
        assert all(e.node_id in full.nodes for e in full.slowdowns)
    with pytest.raises(SystemExit, match="no scenario 'nope'"):
        load_scenario("nope")


def test_frames_that_ran_other_slices_in_a_move_are_not_predicted_as_the_placements():
    from edgeprune.bench.pipeline import ran_elsewhere

    stage = {"first_block": 2, "last_block": 3}
    assert not ran_elsewhere({"first_block": 2, "n_blocks": 2}, stage)
    assert not ran_elsewhere({"stage": 2}, stage)  # a node that predates block records
    assert ran_elsewhere({"first_block": 1, "n_blocks": 3}, stage)  # ran block 1 at full width first
    assert ran_elsewhere({"first_block": 4, "n_blocks": 0}, stage)  # only forwarded
