"""The sustained-rate search of ``riverflow bench``, on synthetic measurements."""

from __future__ import annotations

from typing import Any

from riverflow.tools.bench import Sustained, search_sustained


def test_the_search_finds_the_highest_rate_that_holds_within_its_resolution() -> None:
    capacity = 4_321
    best, tried = search_sustained(lambda rate: rate <= capacity, 1_000, 8_000, steps=6)
    assert best <= capacity
    assert capacity - best <= (8_000 - 1_000) / 2**6
    assert tried[0] == 1_000 and len(tried) == 7


def test_the_search_goes_below_its_first_rate_when_that_fails() -> None:
    best, tried = search_sustained(lambda rate: rate <= 300, 1_000, 5_000, steps=3)
    assert (best, tried) == (250, [1_000, 500, 250, 375])


def test_nothing_sustained_is_zero() -> None:
    best, tried = search_sustained(lambda rate: False, 500, 5_000, steps=2)
    assert (best, tried) == (0, [500, 250, 125])


def test_a_rate_that_failed_bounds_the_search_even_if_a_lower_one_held() -> None:
    # a noisy machine: 3,000 failed once, so nothing at or above it is reported
    outcomes = {1_000: True, 3_000: False, 2_000: True, 2_500: True, 2_750: False}
    best, tried = search_sustained(lambda rate: outcomes[rate], 1_000, 5_000, steps=4)
    assert best == 2_500
    assert tried == [1_000, 3_000, 2_000, 2_500, 2_750]


def hold(**overrides: Any) -> dict[str, Any]:
    base = {"rate": 1_000, "offered_per_s": 1_000.0, "sent": 10_000, "received": 10_000,
            "end_lag": 20, "p99_ms": 40.0}  # fmt: skip
    return {**base, **overrides}


def test_a_hold_is_sustained_when_lag_and_latency_stay_bounded() -> None:
    rule = Sustained(max_end_lag_s=0.5, max_p99_ms=500, min_offered=0.95)
    assert rule.holds(hold())
    assert not rule.holds(hold(end_lag=501))  # more than 0.5 s of arrivals waiting
    assert not rule.holds(hold(p99_ms=501.0))
    assert not rule.holds(hold(received=9_999))  # a prediction never came back
    assert not rule.holds(hold(offered_per_s=940.0))  # the bench's producer fell behind
