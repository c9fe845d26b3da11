"""``edgeprune bench NAME [ARGS]``: run a benchmark, print its tables, optionally write JSON.

Benchmark modules are imported only when run, so a benchmark's heavy imports (or a broken
one) never slow down or break the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from edgeprune.bench import BENCHMARKS, write_json
from edgeprune.tables import format_table


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints tables; --json writes the same figures)",
                       description="Run `edgeprune bench NAME --help` for a benchmark's own options.")
    p.add_argument("name", choices=BENCHMARKS, metavar="NAME", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's options")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgeprune.allocator import keep_large_allocations

    keep_large_allocations()
    module = importlib.import_module(f"edgeprune.bench.{args.name}")
    parser = argparse.ArgumentParser(prog=f"edgeprune bench {args.name}", description=module.__doc__)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    module.add_arguments(parser)
    options = parser.parse_args(args.args)
    result = module.run(options)
    for title, rows in result.get("tables", {}).items():
        print(format_table(title, rows))
    if options.json:
        write_json(options.json, result)
        print(f"wrote {options.json}")
    if result.get("failure"):  # the figures are written, but they do not hold (e.g. bench pipeline's devices check)
        print(f"edgeprune bench {args.name}: FAILED: {result['failure']}", file=sys.stderr)
        return 1
    return 0
