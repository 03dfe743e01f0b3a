"""Drift detection on error streams, its scoring, and the challenger policy."""

from __future__ import annotations

import random

import pytest

from riverflow.models.errors import ModelSpecError
from riverflow.monitors.drift import DetectorKind, DetectorSpec, ErrorDriftMonitor, build_detector
from riverflow.tools.drift_streams import (
    FUNCTIONS,
    concept_disagreement,
    default_model,
    drift_profile,
    drifting_stream,
    prequential_errors,
    recovery_times,
    score,
)


def bernoulli(rates: list[tuple[float, int]], seed: int = 1) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < p for p, n in rates for _ in range(n)]


@pytest.mark.parametrize("kind", list(DetectorKind))
def test_a_jump_in_the_error_rate_is_detected_quickly(kind: DetectorKind) -> None:
    monitor = ErrorDriftMonitor(DetectorSpec(kind=kind))
    alarms = [i for i, e in enumerate(bernoulli([(0.05, 5000), (0.45, 2000)])) if monitor.update(e)]
    after = [a for a in alarms if a >= 5000]
    assert after and after[0] - 5000 < 400


def test_adwin_stays_quiet_on_a_stationary_error_stream() -> None:
    monitor = ErrorDriftMonitor()
    assert not any(monitor.update(e) for e in bernoulli([(0.1, 200_000)]))


def test_a_model_getting_better_raises_no_alarm() -> None:
    monitor = ErrorDriftMonitor()
    errors = bernoulli([(0.4, 3000), (0.05, 3000)])
    assert not any(monitor.update(e) for e in errors)
    assert monitor.detector.estimation < 0.2  # ADWIN did see the change, downward


def test_bad_detector_parameters_are_named() -> None:
    with pytest.raises(ModelSpecError, match="adwin: bad parameters"):
        build_detector(DetectorSpec(kind=DetectorKind.ADWIN, params={"sensitivity": 3}))


def test_scoring_counts_first_alarm_per_episode_and_the_rest_as_false() -> None:
    s = score("x", alarms=[50, 1010, 1020, 2500, 3900], drifts=[1000, 3000], n=5000, accept=500)
    assert (s.detected, s.delays, s.false_alarms) == (1, [10], 4)
    assert s.recall == 0.5 and s.false_per_100k == 80  # 4 in 5,000 events


def test_recovery_time_is_measured_after_the_drift() -> None:
    correct = [True] * 2000 + [False] * 300 + [True] * 2700
    # back within 2 points once at most 20 of the last 1000 are wrong: 2280 + 1000 - 2000
    assert recovery_times(correct, [2000], window=1000) == [1280]


def test_every_drift_of_the_evaluation_stream_is_a_real_concept_change() -> None:
    # neighbouring concepts (cyclically) label at least 40% of the same samples differently
    pairs = zip(FUNCTIONS, FUNCTIONS[1:] + FUNCTIONS[:1], strict=True)
    assert min(concept_disagreement(a, b, n=3000) for a, b in pairs) >= 0.4
    # it labels the same samples by both functions: 6 and 8 (left out) nearly agree
    assert concept_disagreement(6, 8, n=3000) < 0.1


def test_the_drift_profile_shows_the_error_rising_at_each_drift() -> None:
    samples, drifts = drifting_stream(24_000, 8_000, seed=3)
    profile = drift_profile(prequential_errors(samples, default_model), drifts)
    assert [(p["at"], p["from"], p["to"]) for p in profile] == [
        (8000, FUNCTIONS[0], FUNCTIONS[1]), (16000, FUNCTIONS[1], FUNCTIONS[2])
    ]  # fmt: skip
    assert all(p["error_after"] > p["error_before"] + 0.2 for p in profile)
    assert all(p["detectable"] and p["disagreement"] > 0.4 for p in profile)
