"""The pruning benchmarks' arithmetic: the paper's logistic accuracy model, latency fits, speed-up by input size."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_latency_model_fits_an_intercept_and_a_per_mmac_cost():
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
    row = fit_row({"model": "m"}, vectors, measured, uniform, chance=0.1)
    assert row["worse_than_uniform_at_max"] == "1/20"
    assert {"gamma_1", "gamma_3", "delta", "fit_rmse", "uniform_rmse", "controller_fit_r2"} <= set(row)


def test_speedup_by_input_size_tells_a_fixed_cost_from_a_dearer_mac():
    """Synthetic timings: 0.1 ms per call plus 20 us per MMAC full, 1.37x dearer per MMAC when pruned."""
    from edgeprune.bench.speedup import fixed_cost_rows, size_rows

    sizes = [64, 128, 448]
    macs = {size: (30e6 * (size / 64) ** 2, 15e6 * (size / 64) ** 2) for size in sizes}

    def seconds(size: int, variant: int, jitter: float) -> list[float]:
        per_mmac = 20e-6 * (1.37 if variant else 1.0)
        return [(1e-4 + per_mmac * macs[size][variant] / 1e6) * jitter] * 3

    rounds = [{size: (seconds(size, 0, j), seconds(size, 1, j)) for size in sizes} for j in (1.0, 1.5)]
    rows = size_rows(sizes, macs, rounds, 0.3)
    assert [r["MAC_reduction"] for r in rows] == [2.0] * 3
    # load that slows both variants alike (jitter) cancels in the ratio
    assert all(r["round_min"] == pytest.approx(r["round_max"]) == pytest.approx(r["speedup"]) for r in rows)
    assert rows[-1]["time_per_MAC_pruned_over_full"] == pytest.approx(1.37, rel=0.01)
    full, pruned = fixed_cost_rows(sizes, rounds, 0.3)
    # 64 px: 0.1 + 0.6 ms, 448 px: 0.1 + 29.4 ms; the true fixed share there, 0.34%, is below the bound
    assert full["fixed_share_at_most_448px"] == pytest.approx(0.7 / 29.5)
    assert full["fixed_share_at_most_128px"] == pytest.approx(0.7 / 2.5)
    assert pruned["fixed_share_at_most_448px"] > 0.1 / (0.1 + 20 * 1.37 * 15 * 49 / 1000)


@pytest.mark.filterwarnings("ignore::scipy.optimize.OptimizeWarning")  # random frames: a flat logistic fit
def test_each_model_is_timed_and_evaluated_at_its_own_input_size(monkeypatch, tmp_path):
    """A 32-px and a 48-px checkpoint in one run: frames rendered, and slices timed, at each one's size."""
    import argparse

    import torch

    from edgeprune.bench import pruning
    from edgeprune.dataset import FrameSplit
    from edgeprune.training import regime_config, save_checkpoint
    from shared.model import TrapNetConfig, make_model

    rendered = []

    def fake_frames(config):  # tiny random frames instead of the synthetic set: the sizes are what is tested
        rendered.append(config.size)
        rng = np.random.default_rng(config.size)
        n = 300
        return {"test": FrameSplit(rng.integers(0, 255, (n, config.size, config.size, 3), dtype=np.uint8),
                                   rng.integers(0, 10, n), rng.random(n) < 0.3)}

    monkeypatch.setattr(pruning, "load_frames", fake_frames)
    models = {}
    for size in (32, 48):
        torch.manual_seed(size)
        config = TrapNetConfig(width=16, input_size=size)
        models[size] = tmp_path / f"m{size}.pt"
        save_checkpoint(models[size], make_model(config).eval(), regime_config("ours", model=config), {},
                        {"data": {"blank_fraction": 0.0}})
    args = argparse.Namespace(quick=True, slices="0-1,2-3,4-5", model=[f"s{k}={p}" for k, p in models.items()],
                              mixed=8, seed=0, data_seed=0, plots=tmp_path / "plots")
    result = pruning.run(args)
    assert rendered == [32, 48]
    costs = {(r["model"], r["ratio"]): r["MMACs"] for r in result["tables"]["Slice cost per ratio (batch 1)"]
             if r["slice"].startswith("1 ")}
    # the same architecture timed once per size: the first slice's MACs grow with the pixel count
    assert costs[("s48 (resnet, 48 px)", 0.0)] == pytest.approx(costs[("s32 (resnet, 32 px)", 0.0)] * (48 / 32) ** 2)
