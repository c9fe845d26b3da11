"""Calibration fits: recover known parameters from noisy data, reject unusable curves, round-trip as JSON."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.special import expit

from gateway.curves import AccuracyFit, SliceLatencyFit, fit_accuracy, fit_latency

LADDER = np.round(np.arange(10) * 0.1, 1)


def noisy_latency(c0: float, c1: float, c2: float, repeats: int = 5, noise: float = 0.02, seed: int = 0):
    rng = np.random.default_rng(seed)
    ratios = np.repeat(LADDER, repeats)
    kept = 1 - ratios
    return ratios, (c0 + c1 * kept + c2 * kept ** 2) * (1 + rng.normal(0, noise, len(ratios)))


def test_quadratic_recovers_known_coefficients_from_noisy_times():
    ratios, times = noisy_latency(0.002, 0.001, 0.012)
    fit = fit_latency(ratios, times)
    np.testing.assert_allclose(fit.quadratic.coef, (0.002, 0.001, 0.012), atol=6e-4)
    assert fit.quadratic.r2 > 0.99
    assert fit.quadratic.rmse < fit.linear.rmse


def test_line_mispredicts_mac_bound_slices_and_best_picks_the_quadratic():
    # Like the reference slice with output channels pruned: 13.5 ms at 0, roughly (1-p)^2 after.
    ratios, times = noisy_latency(0.0005, 0.0, 0.013, repeats=1, seed=1)
    fit = fit_latency(ratios, times)
    assert 0.9 < fit.linear.r2 < 0.97
    assert fit.linear.min_on(0.9) <= 0  # the line goes negative at high ratios
    assert fit.quadratic.min_on(0.9) > 0
    assert fit.best() is fit.quadratic
    assert fit.best().predict(0.5) == pytest.approx(0.0005 + 0.013 * 0.25, rel=0.1)


def test_a_fit_predicting_non_positive_time_is_rejected_even_when_more_accurate():
    # A U-shape: the quadratic fits better but dips below zero between the measurements.
    fit = fit_latency([0.0, 0.3, 0.6, 0.9], [1.0, 0.02, 0.02, 1.0])
    assert fit.quadratic.rmse < fit.linear.rmse and fit.quadratic.min_on(0.9) <= 0
    assert fit.best() is fit.linear


def test_no_usable_latency_fit_raises():
    fit = fit_latency([0.0, 0.1, 0.8, 0.9], [1.0, 0.9, 0.03, 0.005])
    assert fit.quadratic.min_on(0.9) <= 0 and fit.linear.min_on(0.9) <= 0  # both dip below zero
    with pytest.raises(ValueError, match="re-calibrate"):
        fit.best()


@pytest.mark.parametrize("ratios,times", [
    ([0.0, 0.5], [1.0, 0.5]),            # too few distinct ratios for a quadratic
    ([0.0, 0.5, 1.0], [1.0, 0.5, 0.1]),  # ratio 1 removes everything
    ([0.0, 0.5, 0.9], [1.0, 0.0, 0.1]),  # a non-positive time is a broken measurement
])
def test_latency_fit_rejects_bad_measurements(ratios, times):
    with pytest.raises(ValueError):
        fit_latency(ratios, times)


def test_latency_fit_round_trips_through_json():
    fit = fit_latency(*noisy_latency(0.002, 0.001, 0.012))
    again = SliceLatencyFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert again == fit
    assert again.best().predict(0.35) == fit.best().predict(0.35)


def logistic_table(gains, offset, top, chance, noise=0.0, seed=0):
    vectors = np.array(list(itertools.product(LADDER, repeat=len(gains))))
    accuracy = chance + (top - chance) * expit(vectors @ np.asarray(gains) - offset)
    accuracy += np.random.default_rng(seed).normal(0, noise, len(vectors))
    return vectors, np.clip(accuracy, 0, 1)


def test_logistic_recovers_known_parameters_from_noisy_accuracies():
    vectors, accuracy = logistic_table((-6.0, -3.0), offset=-4.0, top=0.93, chance=0.1, noise=0.01)
    fit = fit_accuracy(vectors, accuracy, chance=0.1)
    np.testing.assert_allclose(fit.gains, (-6.0, -3.0), rtol=0.1)
    assert fit.offset == pytest.approx(-4.0, abs=0.4)
    assert fit.top == pytest.approx(0.93, abs=0.02)
    assert fit.rmse == pytest.approx(0.01, rel=0.3)  # the residual is the noise, not misfit
    assert fit.r2 > 0.99


def test_gains_are_never_positive_even_if_noise_says_pruning_helps():
    vectors, accuracy = logistic_table((-5.0, 0.0), offset=-3.0, top=0.9, chance=0.1)
    accuracy = accuracy + 0.01 * vectors[:, 1]  # stage 2 "improves" accuracy slightly when pruned
    fit = fit_accuracy(vectors, accuracy, chance=0.1)
    assert fit.gains[1] <= 0.0
    assert fit.gains[0] == pytest.approx(-5.0, rel=0.1)


def test_required_score_is_where_the_logistic_meets_the_floor():
    fit = fit_accuracy(*logistic_table((-6.0, -3.0), offset=-4.0, top=0.93, chance=0.1), chance=0.1)
    score = fit.required_score(0.8)
    on_floor = (score / fit.gains[0], 0.0)
    assert fit.logistic(on_floor) == pytest.approx(0.8)
    assert fit.required_score(0.05) == -np.inf  # below chance: always met
    assert fit.required_score(0.99) == np.inf  # above the top: never met


def test_lookup_is_the_best_measurement_that_prunes_at_least_as_much():
    fit = AccuracyFit(gains=(-1.0, -1.0), offset=-3.0, top=0.9, chance=0.1, r2=0.5, rmse=0.1,
                      vectors=((0.0, 0.0), (0.5, 0.5), (0.5, 0.2), (0.9, 0.9)),
                      accuracies=(0.90, 0.70, 0.80, 0.30))
    assert fit.lookup((0.0, 0.0)) == 0.90
    assert fit.lookup((0.3, 0.1)) == 0.80  # dominated by (0.5, 0.2) and (0.5, 0.5): the better one
    assert fit.lookup((0.5, 0.3)) == 0.70  # only (0.5, 0.5) and (0.9, 0.9) prune as much
    assert fit.lookup((0.95, 0.0)) == 0.1  # nothing measured that far: assume chance
    assert fit.predictor("measured")((0.3, 0.1)) == 0.80
    assert fit.predictor("logistic")((0.3, 0.1)) == fit.logistic((0.3, 0.1))


def test_accuracy_fit_needs_more_vectors_than_parameters():
    with pytest.raises(ValueError, match="at least 5"):
        fit_accuracy([[0.0, 0.0], [0.5, 0.5], [0.9, 0.9], [0.5, 0.0]], [0.9, 0.7, 0.2, 0.8])


def test_accuracy_fit_round_trips_through_json():
    fit = fit_accuracy(*logistic_table((-6.0, -3.0), offset=-4.0, top=0.93, chance=0.1, noise=0.01), chance=0.1)
    again = AccuracyFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert again == fit
    assert again.lookup((0.3, 0.3)) == fit.lookup((0.3, 0.3))


def test_block_calibration_serves_any_placement():
    from gateway.curves import AccuracyFit, accuracy_for_slices

    block_fit = AccuracyFit(gains=(-1.0, -2.0, -3.0, 0.0), offset=-4.0, top=0.9, chance=0.1, r2=0.99, rmse=0.01,
                            vectors=((0.0, 0.0, 0.0, 0.0), (0.2, 0.5, 0.5, 0.5)), accuracies=(0.9, 0.6))
    two = accuracy_for_slices(block_fit, [(0, 1), (2, 3)])
    assert two.gains == (-3.0, -3.0)
    for p, q in [(0.0, 0.0), (0.3, 0.1), (0.5, 0.5)]:  # a slice at p prunes each of its blocks at p
        assert two.logistic((p, q)) == pytest.approx(block_fit.logistic((p, p, q, q)))
    assert two.vectors[1] == (0.2, 0.5)  # least-pruned block of each slice: still a lower bound
    assert two.lookup((0.2, 0.5)) == 0.6 and two.lookup((0.3, 0.5)) == block_fit.chance
    with pytest.raises(ValueError, match="cover"):
        accuracy_for_slices(block_fit, [(0, 1), (3, 3)])
