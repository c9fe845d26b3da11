"""Weeks unattended on an SD card: what to delete, and what to stop writing when the disk fills. Pure.

The gateway's tick asks :func:`cutoffs` which rows are old enough to delete (``[gateway] keep_days``)
and :func:`disk_mode` how much detail the free space still allows; :class:`gateway.store.Store`
carries both out. Classification never stops for the disk: the guard sheds stored detail in order
of bulk, thumbnails and per-hop timings (``hops``, about half a result row) first, then per-frame rows,
while SLO windows and error records (a few rows a minute) keep being written. Thumbnails are also held
to a size budget (``[gateway] thumbnail_budget_mb``, oldest deleted first: :func:`thumbnail_budget_bytes`).
"""

from __future__ import annotations

from enum import Enum
from typing import get_args

from shared.settings import RetainedTable

DAY_S = 86400.0

# The time column each prunable table is aged by, on the gateway's clock: a result by its receipt, not by its last
# stage's finish (a node whose clock is far off, e.g. a Pi booted without network time, must not expire its rows).
TIME_COLUMN: dict[str, str] = {
    "requests": "received_ts", "windows": "start_ts", "runs": "started_ts", "placements": "issued_at",
    "prune_events": "ts", "calibrations": "measured_at", "errors": "ts", "thumbnails": "ts",
}
assert set(TIME_COLUMN) == set(get_args(RetainedTable)), "TIME_COLUMN and settings.RetainedTable must agree"


def cutoffs(keep_days: dict[str, float], now: float) -> dict[str, tuple[str, float]]:
    """``{table: (time column, oldest timestamp kept)}`` for every table with a retention period."""
    return {table: (TIME_COLUMN[table], now - days * DAY_S) for table, days in keep_days.items()}


class DiskMode(str, Enum):
    NORMAL = "normal"          # everything is stored
    LEAN = "lean"              # results without per-hop detail (hops stored as NULL)
    WINDOWS_ONLY = "windows"   # no per-frame rows; SLO windows, errors and state only


def disk_mode(free_mb: float, min_free_mb: float) -> DiskMode:
    """LEAN below ``min_free_mb``, WINDOWS_ONLY below a quarter of it; ``min_free_mb`` 0 turns the guard off."""
    if min_free_mb <= 0 or free_mb >= min_free_mb:
        return DiskMode.NORMAL
    return DiskMode.LEAN if free_mb >= min_free_mb / 4 else DiskMode.WINDOWS_ONLY


def disk_mode_message(mode: DiskMode, free_mb: float, min_free_mb: float) -> str:
    """The error record written when the guard changes mode (one per change, not one per frame)."""
    if mode is DiskMode.NORMAL:
        return f"free disk space back to {free_mb:.0f} MB (>= {min_free_mb:.0f} MB): storing full detail again"
    shed = "per-hop timings (hops) and thumbnails" if mode is DiskMode.LEAN else "per-frame result rows"
    return (f"only {free_mb:.0f} MB free on the database's disk (guard at {min_free_mb:.0f} MB): no longer "
            f"storing {shed}; classification goes on. Copy the database off and free space.")


def thumbnail_budget_bytes(budget_mb: float) -> int:
    """``[gateway] thumbnail_budget_mb`` in bytes (MiB, as the disk guard's MB); 0: no thumbnails are kept."""
    return int(budget_mb * 2**20)
