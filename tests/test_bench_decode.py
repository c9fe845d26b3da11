"""The decode benchmark's frames and its JSON, on small frames (timings live in the benchmark, not here)."""

from __future__ import annotations

import argparse

from edgeprune.bench import decode as bench


def test_photo_like_frames_compress_like_a_camera_traps():
    payload = bench.encoded("jpeg", 0.3)
    assert 0.1 < len(payload) / 0.3e6 < 0.6  # bytes per pixel of a trap's JPEG (a 12 MP frame of ~2-5 MB)
    assert len(bench.encoded("png", 0.3)) > 2 * len(payload)


def test_json_has_the_figures_the_issue_asks_for(monkeypatch):
    monkeypatch.setattr(bench, "FRAMES", (("jpeg", 0.05), ("png", 0.05)))
    monkeypatch.setattr(bench, "PIPELINE_MEGAPIXELS", 0.05)
    args = argparse.Namespace(repeats=1, accuracy_frames=4, accuracy_megapixels=0.05, pipeline_seconds=0,
                              in_flight=1)
    result = bench.run(args)
    assert [(r["format"], r["megapixels"]) for r in result["decode"]] == [("jpeg", 0.05), ("png", 0.05)]
    assert all(r["before_ms"] > 0 and r["after_ms"] > 0 and 0 < r["share_p0.5_after"] < 1 for r in result["decode"])
    assert all(r["minimal_ms"] > 0 for r in result["decode"])
    steps = result["decode_steps"]
    assert steps["draft_size"] == [129, 97]  # 258x194 decoded at 1/2, the largest reduction still >= 64 px
    assert steps["load_ms"] > 0 and set(result["host_load_1min"]) == {"start", "after_decode"}
    assert result["accuracy"]["frames"] == 4
    assert [t["target"] for t in result["targets"]] == ["12 MP JPEG decode >= 4x faster"]
