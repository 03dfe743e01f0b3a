"""The promotion test's error rate under continuous monitoring, by simulation.

The monitor looks at the evidence after every label. A test that is only valid
for one look (McNemar's at a fixed sample size) promotes a challenger that is
no better far more often than its alpha when it is looked at again and again;
the e-process (``quality.PairedDuel``) keeps the rate at or below alpha
however often it is looked at (Ville's inequality). Both are run here on the
same seeded pairs of equal models, so this fails if either claim breaks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from riverflow.monitors.quality import PairedDuel, kelly_bet, kelly_bet_one
from riverflow.monitors.spec import PromotePolicy

RUNS, LABELS = 500, 3_000
ALPHA = 0.05  # large, so 500 runs can tell a broken test from a sound one
WARMUP = PromotePolicy().min_labels
WINDOW = 1_000  # the old test's sliding window (monitors.window's default)


def paired_outcomes(
    rng: np.random.Generator, runs: int, labels: int, a_only: float, b_only: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per run and label: was only A right, was only B right (both right or wrong
    otherwise, with probability ``1 - a_only - b_only``)."""
    u = rng.random((runs, labels))
    return u < a_only, (u >= a_only) & (u < a_only + b_only)


def sequential_crossing(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Per run: the first label where ``PairedDuel``'s e-process (after the warm-up,
    betting ``kelly_bet`` on the last ``WINDOW`` pairs) reaches 1/alpha, or -1.
    The same arithmetic as the class, for every run at once."""
    d = b.astype(int) - a.astype(int)
    runs, labels = d.shape
    log_wealth = np.zeros(runs)
    first = np.full(runs, -1)
    sum_d, sum_abs = np.zeros(runs), np.zeros(runs)
    for t in range(labels):
        if t >= WARMUP:
            bet = kelly_bet(sum_d, sum_abs, min(t, WINDOW))
            log_wealth += np.log1p(bet * d[:, t])
            crossed = (first < 0) & (log_wealth >= math.log(1 / alpha))
            first[crossed] = t + 1
        if t >= WINDOW:
            sum_d -= d[:, t - WINDOW]
            sum_abs -= np.abs(d[:, t - WINDOW])
        sum_d += d[:, t]
        sum_abs += np.abs(d[:, t])
    return first


def mcnemar_every_label(a: np.ndarray, b: np.ndarray, alpha: float, margin: float) -> np.ndarray:
    """Per run: did the old rule ever promote (McNemar, continuity-corrected, on the
    last ``WINDOW`` pairs, p < alpha and a gain of at least ``margin``, after the
    warm-up), checked after every label."""
    ca = np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(a, axis=1)], axis=1)
    cb = np.concatenate([np.zeros((b.shape[0], 1)), np.cumsum(b, axis=1)], axis=1)
    t = np.arange(WARMUP, a.shape[1] + 1)
    start = np.maximum(t - WINDOW, 0)
    a_only, b_only = ca[:, t] - ca[:, start], cb[:, t] - cb[:, start]
    n = t - start
    diff = np.abs(a_only - b_only)
    stat = np.where(diff > 1, (diff - 1) ** 2 / np.maximum(a_only + b_only, 1), 0.0)
    p = special.erfc(np.sqrt(stat / 2))
    return ((p < alpha) & ((b_only - a_only) / n >= margin)).any(axis=1)


def upper_tolerance(alpha: float, runs: int) -> float:
    """The promotion rate 500 sound runs stay under but by chance (one in 10,000)."""
    return float(stats.binom.ppf(1 - 1e-4, runs, alpha)) / runs


@pytest.fixture(scope="module")
def equal_models() -> tuple[np.ndarray, np.ndarray]:
    """500 runs of 3,000 labels of two models right 85% of the time each, differing on
    10% of the labels (5% each way): neither is better."""
    return paired_outcomes(np.random.default_rng(19), RUNS, LABELS, 0.05, 0.05)


def test_equal_models_are_promoted_at_most_at_rate_alpha(
    equal_models: tuple[np.ndarray, np.ndarray],
) -> None:
    a, b = equal_models
    # the e-process alone, without the margin the monitor also asks for
    rate = float((sequential_crossing(a, b, ALPHA) >= 0).mean())
    assert rate <= upper_tolerance(ALPHA, RUNS), rate
    # what this replaces: McNemar after every label (with its margin) promotes
    # several times as often
    old = float(mcnemar_every_label(a, b, ALPHA, PromotePolicy().margin).mean())
    assert old > upper_tolerance(ALPHA, RUNS), old
    print(f"false promotions: {rate:.3f} sequential, {old:.3f} McNemar every label")


def test_a_challenger_five_points_better_is_promoted_within_3000_labels() -> None:
    # champion right on 85%, challenger on 90%: 7.5% of labels only B, 2.5% only A
    a, b = paired_outcomes(np.random.default_rng(7), 200, 3_000, 0.025, 0.075)
    alpha = PromotePolicy().alpha
    first = sequential_crossing(a, b, alpha)
    assert (first >= 0).all(), "a better challenger was never promoted"
    # the first 500 pairs are the warm-up: about 800 labels of evidence in half the runs
    assert np.median(first) <= 1_500, first


def test_the_duel_is_the_simulated_e_process() -> None:
    a, b = paired_outcomes(np.random.default_rng(3), 4, 2_000, 0.05, 0.07)
    first = sequential_crossing(a, b, ALPHA)
    for run in range(4):
        duel = PairedDuel(WARMUP, WINDOW)
        crossed = -1
        for t in range(2_000):
            duel.update(bool(a[run, t]), bool(b[run, t]))
            if crossed < 0 and duel.e_value() >= 1 / ALPHA:
                crossed = t + 1
        assert crossed == first[run]
        assert duel.n == 2_000 - WARMUP
        assert duel.wins == b[run, WARMUP:].sum() and duel.losses == a[run, WARMUP:].sum()


def test_one_duels_bet_is_the_simulations_bet() -> None:
    """The per-label bet in plain floats is the array one (``kelly_bet``), to the bit:
    the simulation that sizes the promotion and the duel must bet alike."""
    for n in (0, 99, 100, 101, 5_000):
        for sum_d in (-3.0, 0.0, 0.5, 1.0, 7.0, 60.0, 2_500.0):
            for sum_abs in (0.0, 0.3, 1.0, 9.0, 80.0, 5_000.0):
                one = kelly_bet_one(sum_d, sum_abs, n)
                assert one == float(kelly_bet(sum_d, sum_abs, n)), (sum_d, sum_abs, n)
                assert isinstance(one, float)
