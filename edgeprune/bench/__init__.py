"""Benchmarks behind ``edgeprune bench NAME``.

Each module ``edgeprune.bench.NAME`` defines ``add_arguments(parser)`` and ``run(args) -> dict``;
the returned dict holds ``tables`` (title -> list of row dicts) and any other figures. The
command prints every table and, with ``--json PATH``, writes the same dict as JSON, so the
figures in the docs and in the JSON are the same numbers.
"""

from __future__ import annotations

import json
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


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
