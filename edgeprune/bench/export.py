"""Exports and detection paging at scale: peak memory of `edgeprune export` as the table grows, and the
cost of a deep detections page against the first.

For each size a synthetic ``requests`` table (three described cameras, four labels) is written to a
temporary SQLite file; each export runs as its own `edgeprune export` process whose peak resident
memory is the kernel's high-water mark for it (VmHWM). Streaming means the peak stays flat while rows grow.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.export import Filters, detections_page
from gateway.store import Store, connect_read_only

LABELS = ("zebra", "giraffe", "bird", "dog")
T0 = 1.78e9


def add_arguments(parser) -> None:
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated table sizes")
    parser.add_argument("--formats", default="csv,camtrap-dp", help="comma-separated export formats")


def synthetic_database(path: Path, n: int) -> None:
    Store(path).close()
    conn = sqlite3.connect(path)
    rows = ((f"r{i:09d}", f"cam-{i % 3}", T0 + i, T0 + i + 0.2, 0.2, 0.01, 0.15, 0.04, LABELS[i % 4], i % 4,
             0.5 + (i % 50) / 100, "[0.0,0.3]", "[]") for i in range(n))
    conn.executemany("INSERT INTO requests (request_id, camera_id, capture_ts, finish_ts, e2e_s, queue_s, "
                     "compute_s, transfer_s, label, label_index, confidence, prune_ratios, hops) "
                     "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.executemany("INSERT INTO cameras (camera_id, location_name, latitude, longitude, start_ts) "
                     "VALUES (?,?,?,?,?)", [(f"cam-{k}", f"site {k}", -19.0 - k, 23.0 + k, T0 - 86400)
                                            for k in range(3)])
    conn.commit()
    conn.close()


# Runs `edgeprune export` and reports VmHWM: the peak resident memory of this process image only (the
# rusage figure would include the bench process it was forked from).
_MEASURED = ("import sys; from edgeprune.cli import main; code = main(sys.argv[1:]); "
             "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr); "
             "sys.exit(code)")


def export_peak(db: Path, fmt: str, out: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one `edgeprune export` process."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, "export", "--db", str(db), "--format", fmt,
                           "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"edgeprune export --format {fmt} failed: {proc.stderr[-500:]}")
    hwm_kb = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return hwm_kb / 1024, seconds


def page_ms(conn: sqlite3.Connection, after: tuple[float, str] | None, repeats: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        detections_page(conn, Filters(), limit=100, after=after)
    return (time.perf_counter() - started) / repeats * 1e3


def run(args) -> dict:
    sizes = [int(n) for n in args.rows.split(",")]
    formats = args.formats.split(",")
    exports, paging = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            db = Path(tmp) / f"requests-{n}.db"
            synthetic_database(db, n)
            for fmt in formats:
                peak_mb, seconds = export_peak(db, fmt, Path(tmp) / f"out-{n}-{fmt}")
                exports.append({"rows": n, "format": fmt, "peak_rss_mb": peak_mb, "seconds": seconds,
                                "rows_per_s": n / seconds})
            conn = connect_read_only(db)
            deep = (T0 + n // 10, f"r{n // 10:09d}")  # 90 % of the way back from the newest
            first, last = page_ms(conn, None), page_ms(conn, deep)
            paging.append({"rows": n, "first_page_ms": first, "page_at_90pct_ms": last, "ratio": last / first})
            conn.close()
            db.unlink()
    return {"tables": {"streaming export, one edgeprune export process each (peak memory must stay flat)": exports,
                       "detections page of 100, newest first (keyset)": paging}}
