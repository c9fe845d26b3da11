"""Bytes the gateway stores per classified frame, and how many weeks an SD card holds at a frame rate.

Writes realistic result rows (per-hop timings for ``--stages`` stages, UUID request ids, SLO windows
at the frame rate) through the gateway's own :class:`gateway.store.Store` into a fresh SQLite file,
in both disk-guard modes that store per-frame rows (full, and lean: without ``hops``), truncates the
WAL, and divides the file size by the frames. Weeks = (card − system − the guard's reserve) /
(bytes per frame × frames per week).
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path
from typing import Any

from gateway.retention import DiskMode
from gateway.store import result_row
from gateway.store import Store
from shared.schemas import Hop, Result

WEEK_S = 7 * 86400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=20000, help="frames written per mode")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (hops per result)")
    parser.add_argument("--card-gb", type=float, default=32.0, help="SD card size, GB (10^9 bytes)")
    parser.add_argument("--system-gb", type=float, default=8.0,
                        help="space the OS, venv and model take on the card, GB")
    parser.add_argument("--reserve-mb", type=float, default=1024.0, help="[gateway] min_free_mb")
    parser.add_argument("--rates", default="0.1,0.5,2", help="frame rates to state weeks for, frames/s")


def synthetic_result(i: int, stages: int, t: float) -> Result:
    hops = [Hop(stage=s + 1, node_id=f"pi-{chr(97 + s)}", prune_ratio=0.3 if s == 0 else 0.0,
                received_ts=t + 0.01 * s, started_ts=t + 0.01 * s + 0.001, finished_ts=t + 0.01 * s + 0.009,
                published_ts=t + 0.01 * s + 0.0095) for s in range(stages)]
    return Result(request_id=str(uuid.uuid4()), camera_id="trap-1", capture_ts=t - 0.002, label="elephant",
                  label_index=i % 10, confidence=0.87654321, hops=hops)


def bytes_per_frame(path: Path, frames: int, stages: int, mode: DiskMode, rate_hz: float = 1.0) -> float:
    store = Store(path)
    store.disk_mode = mode
    t0 = 1.7e9
    for i in range(frames):
        t = t0 + i / rate_hz
        store.add_request({**result_row(synthetic_result(i, stages, t)), "received_ts": t + 0.05})
        if i % max(1, int(10 * rate_hz)) == 0:  # one 10 s SLO window per 10 s of frames
            store.add_window({"start_ts": t, "end_ts": t + 10, "count": 10, "slo_s": 0.5, "met": 9,
                              "attainment_pct": 90.0, "p50_s": 0.05, "p95_s": 0.2, "p99_s": 0.3})
        if i % 1000 == 999:
            store.flush()
    store.flush()
    store.checkpoint()
    store.close()
    empty = Store(path.with_name("empty.db"))
    empty.checkpoint()
    empty.close()
    baseline = path.with_name("empty.db").stat().st_size
    size = path.stat().st_size
    for p in path.parent.glob("empty.db*"):
        p.unlink()
    return (size - baseline) / frames


def run(args) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",")]
    usable = args.card_gb * 1e9 - args.system_gb * 1e9 - args.reserve_mb * 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in (DiskMode.NORMAL, DiskMode.LEAN):
            per_frame = bytes_per_frame(Path(tmp) / f"{mode.value}.db", args.frames, args.stages, mode)
            row = {"stored": "full" if mode is DiskMode.NORMAL else "lean (no hops)",
                   "bytes_per_frame": round(per_frame, 1)}
            for rate in rates:
                row[f"weeks_at_{rate:g}_fps"] = round(usable / (per_frame * rate * WEEK_S), 1)
            rows.append(row)
    title = (f"{args.frames} frames, {args.stages} stages; weeks on a {args.card_gb:g} GB card "
             f"({args.system_gb:g} GB system, {args.reserve_mb:g} MB reserve)")
    return {"tables": {title: rows}, "usable_bytes": usable, "frames": args.frames, "stages": args.stages}
