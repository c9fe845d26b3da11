"""`edgeprune bench replicas --quick` end to end (real broker, gateway, four node agents, camera), and its rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeprune.bench.replicas import sustainable


def test_a_rate_is_sustained_only_if_every_lower_rate_was_too():
    points = [{"arrival_hz": r, "attainment": a} for r, a in [(8, 1.0), (16, 0.97), (24, 0.9), (32, 0.99)]]
    assert sustainable(points, 0.95) == 16  # 32 passed, but 24 did not: a lucky point is not a capacity
    assert sustainable([{"arrival_hz": 8, "attainment": 0.5}], 0.95) == 0.0


@pytest.mark.integration
def test_quick_run_writes_the_issue_json(tmp_path):
    out = tmp_path / "replicas.json"
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", "replicas", "--quick", "--strategies",
                           "hybrid+prune", "--run-dir", str(tmp_path / "run"), "--json", str(out),
                           "--plot", str(tmp_path / "replicas.png")],
                          capture_output=True, text=True, timeout=400, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = json.loads(out.read_text())
    assert [(p["strategy"], p["arrival_hz"]) for p in document["rates"]] == [("hybrid+prune", 2.0),
                                                                             ("hybrid+prune", 6.0)]
    for point in document["rates"]:
        assert 0.0 <= point["attainment"] <= 1.0 and point["results"] > 0
        assert point["accuracy_measured"] is not None and point["labelled"] == point["results"]
    assert set(document["sustainable_hz"]) == {"hybrid+prune"}
    # --quick runs the two fastest nodes (starting four node agents cost more than the rest of the run)
    assert sorted(n for s in document["placements"]["hybrid+prune"] for n in s["nodes"]) == ["node-1", "node-2"]
    assert set(document["nodes"]) == {"node-1", "node-2"}
    assert [row["nodes"] for row in document["planner"]] == [10] and document["planner"][0]["solve_s"] > 0
    assert (tmp_path / "replicas.png").stat().st_size > 0
    assert "sustainable rate" in proc.stdout
