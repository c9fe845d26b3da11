"""Reduced frame decoding and where its time is accounted: imaging, runtime hops, requests rows, node stats."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gateway.store import result_row
from gateway.store import SITE_SCHEMA, Store
from node_agent.runtime import Request, StageRuntime
from shared.imaging import decode_pixels
from shared.model import build_model
from shared.schemas import BadMessage, Hop, Result, parse_json
from tests.conftest import even_split


def photo(width: int, height: int, fmt: str) -> bytes:
    """A smooth scene with an edge and mild noise, encoded as a camera would."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scene = np.stack([255 * xx / width, 255 * yy / height, 128 + 100 * (xx > width / 2)], axis=-1)
    scene += np.random.default_rng(0).normal(0, 4, scene.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8)).save(buf, format=fmt, quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,width,height", [("JPEG", 1600, 1200), ("PNG", 800, 600), ("JPEG", 300, 97)])
def test_reduced_decode_sees_what_the_full_decode_sees(fmt, width, height):
    payload = photo(width, height, fmt)
    full = decode_pixels(payload, reduced=False).astype(int)
    reduced = decode_pixels(payload).astype(int)
    assert reduced.shape == full.shape == (64, 64, 3)
    assert np.abs(reduced - full).mean() < 3.0  # of 255: the same picture, slightly differently filtered


@pytest.mark.parametrize("mode,options", [("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})])
def test_progressive_grayscale_and_cmyk_jpegs_decode_reduced_too(mode, options):
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo(1600, 1200, "PNG"))).convert(mode).save(buf, format="JPEG", **options)
    reduced = decode_pixels(buf.getvalue()).astype(int)
    assert reduced.shape == (64, 64, 3)
    assert np.abs(reduced - decode_pixels(buf.getvalue(), reduced=False)).mean() < 3.0


def test_reduced_decode_reads_fewer_pixels_of_a_large_jpeg():
    """Draft mode: the decoder itself scales, so the image it hands over is already small."""
    with Image.open(io.BytesIO(photo(1600, 1200, "JPEG"))) as img:
        img.draft("RGB", (64, 64))
        assert img.size == (200, 150)  # 1/8 scale, the largest reduction still >= 64 on both sides


def test_model_sized_frames_decode_identically_both_ways():
    payload = photo(64, 64, "PNG")
    assert np.array_equal(decode_pixels(payload), decode_pixels(payload, reduced=False))


@pytest.mark.parametrize("payload", [b"", b"not an image", photo(64, 64, "JPEG")[:200]])
def test_bad_frames_are_bad_messages_on_the_reduced_path(payload):
    with pytest.raises(BadMessage):
        decode_pixels(payload)


def test_stage_one_hop_accounts_decode_apart_from_compute():
    model = build_model()
    placement = even_split(model.n_blocks, ["a", "b"])
    first, second = (StageRuntime(model, s.node_id, s, 2, f"out/{s.stage}", "float16") for s in placement.stages)
    out = first.run(Request("edgeprune/camera/cam/frame", photo(1600, 1200, "JPEG"), {}, 10.0, "cam"), 10.5)
    assert out.decode_s > 0 and out.compute_s > 0
    final = second.run(Request(out.topic, out.payload, {}, 11.0), 11.0)
    result = parse_json(Result, final.payload)
    hop = result.hops[0]
    assert hop.decode_s == pytest.approx(out.decode_s)
    assert hop.finished_ts - hop.started_ts == pytest.approx(out.decode_s + out.compute_s)
    assert hop.compute_s == pytest.approx(out.compute_s)
    row = result_row(result)
    assert row["decode_s"] == pytest.approx(sum(h.decode_s for h in result.hops))
    assert row["queue_s"] + row["decode_s"] + row["compute_s"] + row["transfer_s"] == pytest.approx(row["e2e_s"])


def test_hops_from_older_nodes_still_parse():
    hop = Hop.model_validate({"stage": 1, "node_id": "a", "prune_ratio": 0.0, "received_ts": 1.0,
                              "started_ts": 1.5, "finished_ts": 2.0, "published_ts": 2.0})
    assert hop.decode_s == 0.0 and hop.compute_s == 0.5


def test_a_database_from_an_older_version_gains_the_decode_columns(tmp_path):
    path = tmp_path / "old.db"
    import sqlite_utils

    old = sqlite_utils.Database(path)
    for table in ("requests", "nodes"):
        columns = {k: v for k, v in SITE_SCHEMA[table].columns.items() if k not in ("decode_s", "decode_mean_s")}
        old[table].create(columns, pk=SITE_SCHEMA[table].pk)
    old.close()
    store = Store(path)
    store.update_node({"node_id": "a", "decode_mean_s": 0.02})
    store.flush()
    assert store.db["nodes"].get("a")["decode_mean_s"] == 0.02
    assert "decode_s" in store.db["requests"].columns_dict
    store.close()


def test_decode_cost_is_measured_per_size_and_fitted_in_pixels():
    from shared.imaging import measure_decode_cost
    from shared.schemas import NodeProfile

    cost = measure_decode_cost(megapixels=(0.05, 0.2), repeats=1)
    assert cost.megapixels == [0.05, 0.2] and all(t > 0 for t in cost.seconds)
    assert cost.per_megapixel_s >= 0 and cost.predict(12.0) >= cost.predict(0.05) > 0
    # an offer from a node that predates decode costs still parses, with none
    older = {"node_id": "a", "model_fingerprint": "f", "memory_mb": 1, "uplink_mbit_s": 1,
             "profile": {"model": "m", "host": "h", "threads": 1, "repeats": 1, "warmup": 0, "wire_dtype": "float16",
                         "blocks": [{"name": "b", "latency_s": 0.1, "param_bytes": 1, "activation_bytes": 1,
                                     "output_bytes": 1}]}}
    assert NodeProfile.model_validate(older).decode is None
