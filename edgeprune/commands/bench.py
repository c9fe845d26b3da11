"""``edgeprune bench NAME``: run a benchmark, print its tables, optionally write JSON."""

from __future__ import annotations

import importlib
from pathlib import Path

from edgeprune.bench import BENCHMARKS, format_table, write_json


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints tables; --json writes the same figures)")
    names = p.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name in BENCHMARKS:
        module = importlib.import_module(f"edgeprune.bench.{name}")
        bp = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        bp.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
        module.add_arguments(bp)
        bp.set_defaults(func=lambda args, m=module: _run(m, args))


def _run(module, args) -> int:
    result = module.run(args)
    for title, rows in result.get("tables", {}).items():
        print(format_table(title, rows))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
