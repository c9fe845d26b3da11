"""The paper's logistic accuracy model, as the pruning benchmark fits it."""

from __future__ import annotations

import numpy as np

from edgeprune.bench.pruning import fit_error, fit_logistic, logistic, parse_slices


def test_logistic_fit_recovers_known_parameters_and_reports_its_error():
    rng = np.random.default_rng(0)
    ratios = rng.choice([0.0, 0.1, 0.3, 0.5, 0.7, 0.9], size=(60, 3))
    gammas, delta = np.array([-4.0, -1.5, -6.0]), -2.5
    acc = logistic(ratios, *gammas, delta)
    fitted_g, fitted_d = fit_logistic(ratios, acc + rng.normal(0, 0.005, len(acc)))
    np.testing.assert_allclose(fitted_g, gammas, rtol=0.15)
    assert abs(fitted_d - delta) < 0.3
    error = fit_error(ratios, acc, fitted_g, fitted_d)
    assert error["rmse"] < 0.01 and error["r2"] > 0.95
    # A model that ignores the ratios cannot explain the data: its error shows it.
    assert fit_error(ratios, acc, np.zeros(3), fitted_d)["rmse"] > 5 * error["rmse"]


def test_logistic_is_the_papers_formula():
    p = np.array([[0.2, 0.4]])
    expected = 1 / (1 + np.exp(-((-3 * 0.2) + (-1 * 0.4) - (-2))))
    np.testing.assert_allclose(logistic(p, -3.0, -1.0, -2.0), [expected])


def test_slices_are_parsed_as_block_ranges():
    assert parse_slices("0-1,2-3,4-5") == [(0, 1), (2, 3), (4, 5)]


def test_latency_model_separates_the_fixed_cost_that_caps_the_speedup():
    from edgeprune.bench.pruning import latency_model_rows

    rows = [{"model": "m", "slice": "1", "ratio": p, "MMACs": macs, "ms_1t": 0.4 + 0.02 * macs,
             "speedup_1t": (0.4 + 0.02 * 30) / (0.4 + 0.02 * macs)}
            for p, macs in ((0.0, 30.0), (0.3, 15.0), (0.5, 8.0), (0.9, 1.0))]
    (row,) = latency_model_rows(rows)
    assert abs(row["fixed_ms"] - 0.4) < 1e-9 and abs(row["us_per_MMAC"] - 20.0) < 1e-6
    assert abs(row["fixed_share_p0"] - 0.4) < 1e-9
    assert row["MAC_reduction_p0.3"] == 2.0 and row["speedup_p0.3"] < 2.0


def test_fit_row_counts_mixes_that_measure_below_the_uniform_ladder():
    from edgeprune.bench.pruning import fit_row

    rng = np.random.default_rng(1)
    vectors = rng.choice([0.0, 0.5, 0.9], size=(20, 3))
    uniform = {0.0: 0.9, 0.5: 0.8, 0.9: 0.5}
    measured = np.asarray([uniform[max(v)] + 0.01 for v in vectors])
    measured[3] = uniform[max(vectors[3])] - 0.05  # one mix worse than uniform at its largest ratio
    row = fit_row({"model": "m"}, vectors, measured, uniform)
    assert row["worse_than_uniform_at_max"] == "1/20"
    assert {"gamma_1", "gamma_3", "delta", "fit_rmse", "uniform_rmse", "controller_fit_r2"} <= set(row)
