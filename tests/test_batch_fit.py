"""The steps-vs-examples trade-off fit (experiments/batch_fit.py): McCandlish et al.'s hyperbola recovered from
points generated from it, bootstrap intervals that cover the truth and shrink with the noise, degenerate sweeps."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import batch_fit

S_MIN, B_CRIT = 300.0, 400.0  # E_min = 120,000 examples
BATCHES = np.repeat(2.0 ** np.arange(5, 13), 2)  # 32 .. 4096, two runs each


def _points(noise, seed):
    """Steps to target from the hyperbola, written independently of the module: E = E_min (1 + B / B_crit), S = E / B,
    times lognormal noise of the given log standard deviation."""
    e_min = S_MIN * B_CRIT
    steps = e_min * (1 + BATCHES / B_CRIT) / BATCHES
    return steps * np.exp(noise * np.random.default_rng(seed).standard_normal(len(steps)))


def test_noise_free_points_give_the_exact_hyperbola():
    fit = batch_fit.fit_tradeoff(BATCHES, _points(0.0, 0), n_boot=20)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-6) and fit.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=1e-6) and fit.rms_log_residual < 1e-6
    # The fitted curve is the trade-off (S/S_min - 1)(E/E_min - 1) = 1 at every batch.
    s = batch_fit.predicted_steps(BATCHES, fit.s_min, fit.b_crit)
    np.testing.assert_allclose((s / fit.s_min - 1) * (BATCHES * s / fit.e_min - 1), 1.0, rtol=1e-9)
    assert not fit.at_bound and not fit.excluded


def test_noisy_points_are_fit_within_intervals_that_shrink_with_the_noise():
    truth = {"s_min": S_MIN, "e_min": S_MIN * B_CRIT, "b_crit": B_CRIT}
    fits = {noise: batch_fit.fit_tradeoff(BATCHES, _points(noise, 1), n_boot=300, seed=2) for noise in (0.1, 0.02)}
    for noise, fit in fits.items():
        assert fit.resamples == 300 and fit.n_points == len(BATCHES)
        assert 0.5 * noise < fit.rms_log_residual < 1.5 * noise, (noise, fit.rms_log_residual)
        for name, value in truth.items():
            lo, hi = fit.intervals[name]
            assert lo < value < hi, (noise, name, lo, value, hi)
            assert lo <= getattr(fit, name) <= hi
    for name in truth:
        (lo1, hi1), (lo2, hi2) = fits[0.1].intervals[name], fits[0.02].intervals[name]
        assert math.log(hi2 / lo2) < 0.5 * math.log(hi1 / lo1), name  # 5x less noise: much narrower


def test_points_that_never_reached_the_target_are_excluded_and_reported():
    steps = list(_points(0.02, 3))
    steps[0], steps[5], steps[9] = None, float("nan"), float("inf")
    fit = batch_fit.fit_tradeoff(BATCHES, steps, n_boot=50)
    assert fit.n_points == len(BATCHES) - 3
    assert [b for b, _, _ in fit.excluded] == [BATCHES[0], BATCHES[5], BATCHES[9]]
    assert "excluded 3" in fit.summary() and "did not reach the target" in fit.summary()
    assert fit.b_crit == pytest.approx(B_CRIT, rel=0.15)


@pytest.mark.parametrize(
    "batches,steps,message",
    [
        ([64, 128], [100, 60], "at least 3 points that reached the target, got 2"),
        ([64, 128, 256, 512], [100, None, float("nan"), 40], r"got 2 \(2 excluded"),
        ([256, 256, 256], [50, 52, 49], "at least 2 distinct batch sizes, got only B=256"),
        ([64, 0, 128], [100, 90, 60], "batch size 0 is not a positive number"),
        ([64, 128, 256], [100, 60], "3 batch sizes and 2 step counts"),
    ],
)
def test_degenerate_sweeps_are_one_line_errors(batches, steps, message):
    with pytest.raises(ValueError, match=message) as err:
        batch_fit.fit_tradeoff(batches, steps, n_boot=10)
    assert "\n" not in str(err.value)


def test_a_sweep_below_the_critical_batch_is_flagged():
    """Perfect scaling (S proportional to 1/B): every batch is far below B_crit, which the sweep cannot resolve."""
    batches = np.array([32.0, 64, 128, 256])
    fit = batch_fit.fit_tradeoff(batches, 64000 / batches, n_boot=20)
    assert fit.at_bound and fit.b_crit > 1000 * batches.max() / 2
    assert "does not resolve it" in fit.summary()
