"""`edgeprune bench collect_core`: the collector's own per-result work, measured on real bridged results."""

from __future__ import annotations

import argparse

from edgeprune.bench import collect_core


def test_collect_core_handles_every_result_and_reports_its_rate() -> None:
    figures = collect_core.run(argparse.Namespace(results=200, repeats=3, sites=4))
    assert figures["results"] == 200 and figures["results_per_s"] > 0
    assert figures["min_per_s"] <= figures["results_per_s"] <= figures["max_per_s"]
    assert figures["us_per_result"] == 1e6 / figures["results_per_s"]
