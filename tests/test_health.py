"""A node's health figures (node_agent/health.py): counts since start, latency figures since the last report."""

from __future__ import annotations

import pytest

from node_agent.health import Health


def test_latency_figures_cover_the_requests_since_the_last_report_and_counts_all_since_start():
    health = Health()
    health.served(compute_s=0.010, decode_s=0.002, queue_wait_s=0.1, late=False)
    health.served(compute_s=0.030, decode_s=0.004, queue_wait_s=0.3, late=True)
    assert health.drop() == 1
    first = health.report()
    assert (first["processed"], first["late_served"], first["dropped"]) == (2, 1, 1)
    assert first["compute_mean_s"] == pytest.approx(0.020) and first["compute_p95_s"] == pytest.approx(0.029)
    assert first["decode_mean_s"] == pytest.approx(0.003) and first["queue_wait_mean_s"] == pytest.approx(0.2)
    second = health.report()  # nothing served since: no figures, the counts stand
    assert (second["processed"], second["late_served"], second["dropped"]) == (2, 1, 1)
    assert second["compute_mean_s"] is None and second["queue_wait_mean_s"] is None and second["decode_mean_s"] is None
