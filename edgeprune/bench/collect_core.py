"""The central collector's own work per result, without a broker or a database: results/s of
``Collector.handle`` on bridged results (pydantic validation of the bytes, the `requests` row, the model
fingerprint, the row buffered with its JSON columns encoded).

What one process could do if paho-mqtt's packet handling, the acknowledgements and the database writes cost
nothing; ``bench collect`` measures the whole (docs/scaling.md, "Measured").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgeprune.bench.collect import result_template


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=int, default=20_000, help="results handled per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the figures are their median")
    parser.add_argument("--sites", type=int, default=20, help="sites the results come from")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.collect import MAX_PENDING, Collector, open_store
    from shared.topics import Topics

    if args.results * args.repeats > MAX_PENDING:
        raise SystemExit(f"bench collect_core: at most {MAX_PENDING} results in all (they stay buffered)")
    template = result_template()
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "central.sqlite")  # buffers only: its writer is never started
        collector = Collector(SimpleNamespace(topics=Topics()), store)
        for repeat in range(args.repeats):
            messages = [(f"sites/site-{i % args.sites:02d}/edgeprune/pipeline/results/pi-b",
                         template.replace("RID", f"{repeat}-{i}").encode()) for i in range(args.results)]
            start = time.perf_counter()
            for topic, payload in messages:
                collector.handle(topic, payload, {})
            rates.append(args.results / (time.perf_counter() - start))
        assert collector.received["requests"] == args.results * args.repeats and not store.dropped
        store.db.close()  # not Store.close: the buffered rows are not the point
    rates.sort()
    row = {"results": args.results, "repeats": args.repeats, "results_per_s": rates[len(rates) // 2],
           "us_per_result": 1e6 / rates[len(rates) // 2], "min_per_s": rates[0], "max_per_s": rates[-1]}
    return {"tables": {"bench collect_core": [row]}, **row}
