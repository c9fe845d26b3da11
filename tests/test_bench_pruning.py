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
