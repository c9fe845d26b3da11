"""Benchmarks behind ``edgeprune bench NAME``.

Each module ``edgeprune.bench.NAME`` defines ``add_arguments(parser)`` and ``run(args) -> dict``;
the returned dict holds ``tables`` (title -> list of row dicts) and any other figures. The
command prints every table and, with ``--json PATH``, writes the same dict as JSON, so the
figures in the docs and in the JSON are the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

BENCHMARKS = [
    "allocator",
    "decode",
    "pipeline",
    "placement",
    "pruning",
    "speedup",
    "agreement",
    "export",
    "storage",
    "soak",
    "overhead",
    "replicas",
    "collect",
    "collect_core",
]


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


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
