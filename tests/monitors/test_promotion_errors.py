"""Promotion of a regressor on paired absolute errors: the same e-process as the
classifiers' (``quality.PairedDuel``), on the clipped, scaled error difference.

On seeded pairs of equal regressors it promotes at most at rate alpha however
often it is looked at; a regressor with errors 15% smaller is promoted. The
vectorised simulation is the class's arithmetic (checked on a few runs), so the
rate measured over many runs is the monitor's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from riverflow.monitors.quality import ERROR_SCALE, PairedDuel, kelly_bet
from riverflow.monitors.spec import PromotePolicy

RUNS, LABELS = 400, 3_000
ALPHA = 0.05  # large, so 400 runs can tell a broken test from a sound one
WARMUP = PromotePolicy().min_labels
WINDOW = 1_000


def paired_errors(
    rng: np.random.Generator, runs: int, labels: int, b_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute errors of A and B per run and label: each label has its own
    difficulty (shared by both, as a hard order is hard for every model), and B's
    errors are ``b_factor`` times what they would be as A's."""
    difficulty = rng.uniform(1.0, 6.0, (runs, labels))
    a = np.abs(rng.normal(0.0, difficulty))
    b = b_factor * np.abs(rng.normal(0.0, difficulty))
    return a, b


def sequential_crossing(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Per run: the first label where the e-process reaches 1/alpha, or -1."""
    runs, labels = a.shape
    log_wealth = np.zeros(runs)
    first = np.full(runs, -1)
    errors = np.zeros(runs)  # sum over the pairs before of both models' mean error
    ds = np.zeros((runs, labels))
    sum_d, sum_sq = np.zeros(runs), np.zeros(runs)
    for t in range(labels):
        scale = ERROR_SCALE * errors / t if t else np.zeros(runs)
        diff = a[:, t] - b[:, t]
        d = np.where(scale > 0, np.clip(diff / np.where(scale > 0, scale, 1), -1, 1),
                     np.sign(diff))  # fmt: skip
        errors += (a[:, t] + b[:, t]) / 2
        ds[:, t] = d
        if t >= WARMUP:
            bet = kelly_bet(sum_d, sum_sq, min(t, WINDOW))
            log_wealth += np.log1p(bet * d)
            crossed = (first < 0) & (log_wealth >= math.log(1 / alpha))
            first[crossed] = t + 1
        if t >= WINDOW:
            sum_d -= ds[:, t - WINDOW]
            sum_sq -= ds[:, t - WINDOW] ** 2
        sum_d += d
        sum_sq += d * d
    return first


def test_equal_regressors_are_promoted_at_most_at_rate_alpha() -> None:
    a, b = paired_errors(np.random.default_rng(23), RUNS, LABELS, 1.0)
    rate = float((sequential_crossing(a, b, ALPHA) >= 0).mean())
    tolerance = float(stats.binom.ppf(1 - 1e-4, RUNS, ALPHA)) / RUNS
    assert rate <= tolerance, rate


def test_a_regressor_with_smaller_errors_is_promoted() -> None:
    a, b = paired_errors(np.random.default_rng(29), 100, LABELS, 0.85)
    first = sequential_crossing(a, b, PromotePolicy().alpha)
    assert (first >= 0).mean() >= 0.95, first
    assert np.median(first[first >= 0]) <= 2_000


@pytest.mark.parametrize("b_factor", [1.0, 0.85])
def test_the_duel_is_the_simulated_e_process(b_factor: float) -> None:
    a, b = paired_errors(np.random.default_rng(31), 3, 2_000, b_factor)
    first = sequential_crossing(a, b, ALPHA)
    for run in range(3):
        duel = PairedDuel(WARMUP, WINDOW)
        crossed = -1
        for t in range(2_000):
            duel.update_errors(float(a[run, t]), float(b[run, t]))
            if crossed < 0 and duel.e_value() >= 1 / ALPHA:
                crossed = t + 1
        assert crossed == first[run]
        evidence = duel.as_evidence()
        assert evidence["n"] == 2_000 - WARMUP
        assert evidence["challenger_lower_error"] == (a[run, WARMUP:] > b[run, WARMUP:]).sum()
