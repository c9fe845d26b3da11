"""Fixed-width text tables: how every command (benchmarks, profile, place, train, dataset, calibrate) prints rows."""

from __future__ import annotations

import math
from typing import Any


def format_table(title: str, rows: list[dict[str, Any]]) -> str:
    """A plain fixed-width table; floats with 4 significant digits."""
    if not rows:
        return f"{title}\n(no rows)\n"
    columns = list(rows[0].keys())
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return "" if value is None else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(v.rjust(w) for v, w in zip(cells, widths))  # noqa: E731
    return "\n".join([title, line(columns), line(["-" * w for w in widths]), *map(line, body)]) + "\n"
