"""`edgeprune bench overhead`: raw paho hops and the real 2-stage pipeline in one run; the per-hop breakdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgeprune.bench.overhead import CAMERA_ID, hop_sizes
from edgeprune.bench.pipeline import hop_breakdown

PARTS = ["transfer to stage 1", "stage 1 queue", "stage 1 decode", "stage 1 compute", "stage 1 encode",
         "transfer to stage 2", "stage 2 queue", "stage 2 decode", "stage 2 compute", "stage 2 encode",
         "transfer to gateway", "end to end", "non-compute"]


def hop(stage: int, received: float, started: float, decode: float, compute: float, published: float) -> dict:
    return {"stage": stage, "received_ts": received, "started_ts": started, "decode_s": decode,
            "finished_ts": started + decode + compute, "published_ts": published}


def test_hop_breakdown_splits_decode_from_compute_and_counts_the_rest_as_non_compute():
    rows = [{"capture_ts": 100.0, "finish_ts": 100.0265, "received_ts": 100.030,
             "hops": [hop(1, 100.002, 100.003, 0.001, 0.010, 100.0145),
                      hop(2, 100.017, 100.0175, 0.0005, 0.008, 100.0265)]}]
    parts = {name: figures["p50_ms"] for name, figures in hop_breakdown(rows).items()}
    assert list(parts) == PARTS
    expected = {"transfer to stage 1": 2.0, "stage 1 queue": 1.0, "stage 1 decode": 1.0, "stage 1 compute": 10.0,
                "stage 1 encode": 0.5, "transfer to stage 2": 2.5, "stage 2 queue": 0.5, "stage 2 decode": 0.5,
                "stage 2 compute": 8.0, "stage 2 encode": 0.5, "transfer to gateway": 3.5, "end to end": 30.0,
                "non-compute": 12.0}
    assert parts == pytest.approx(expected, abs=1e-6)
    # every part but the two computes adds up to the non-compute time of the frame
    assert sum(v for k, v in parts.items() if k not in ("end to end", "non-compute") and "compute" not in k) \
        == pytest.approx(parts["non-compute"])


def test_hop_breakdown_reads_hops_of_nodes_without_a_decode_time():
    rows = [{"capture_ts": 0.0, "finish_ts": 0.7, "received_ts": 1.0,
             "hops": [{"stage": 1, "received_ts": 0.1, "started_ts": 0.2, "finished_ts": 0.6, "published_ts": 0.7}]}]
    parts = hop_breakdown(rows)
    assert parts["stage 1 decode"]["p50_ms"] == 0.0 and parts["stage 1 compute"]["p50_ms"] == pytest.approx(400)


def test_the_baseline_sends_the_bytes_the_stages_send():
    """The raw hops carry what the pipeline carries: stage 1's real activation, byte for byte."""
    import time

    from camera.simulator import camera_frame
    from node_agent.runtime import Request, StageRuntime
    from shared.model import build_model
    from shared.schemas import StageAssignment

    stages = [{"first_block": 0, "last_block": 2}, {"first_block": 3, "last_block": 5}]
    frame_bytes, activation_bytes, result_bytes = hop_sizes(stages)
    frame = camera_frame(np.random.default_rng(0), 64, "png")
    stage1 = StageRuntime(build_model(), "node-1", StageAssignment(stage=1, node_id="node-1", first_block=0,
                                                                   last_block=2), 2, "out")
    now = time.time()
    request = Request("edgeprune/camera/x/frame", frame,
                      {"request_id": f"{CAMERA_ID}-{int(now * 1000):x}-000001", "capture_ts": repr(now)}, now,
                      CAMERA_ID)
    assert frame_bytes == len(frame)
    assert activation_bytes == len(stage1.run(request, now).payload)
    assert 200 < result_bytes < 2000


@pytest.mark.integration
def test_quick_run_writes_both_parts_per_hop(tmp_path):
    out = tmp_path / "overhead.json"
    # 20 frames a second: still one frame in flight at a time here (~20 ms each), and the run's traffic takes
    # 4 s instead of 16 s: a test of the machinery, not a measurement
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", "overhead", "--quick", "--rate", "20",
                           "--run-dir", str(tmp_path / "run"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy(), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["split"] == [[0, 2], [3, 5]]  # the shipped profile's 2-stage split
    assert set(document["hop_bytes"]) == {"frame", "activation", "result"}
    for mode in ("callback", "worker"):
        raw = document["raw"][mode]
        assert raw["messages"] == 20
        assert raw["hops 2+3"]["p50_ms"] <= raw["total, 3 hops"]["p50_ms"]
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in sorted((tmp_path / "run").rglob("*.log")))
    assert document["results"] == document["frames_sent"] == 20, logs  # every frame came back
    pipeline = document["pipeline"]
    assert list(pipeline) == PARTS
    assert 0 < pipeline["non-compute"]["p50_ms"] <= pipeline["end to end"]["p50_ms"]
    assert document["non_compute_p50_ms"] == pipeline["non-compute"]["p50_ms"]
    assert document["raw_floor_p50_ms"] == document["raw"]["callback"]["total, 3 hops"]["p50_ms"]
    assert "raw paho hops" in proc.stdout and "non-compute" in proc.stdout  # the tables
