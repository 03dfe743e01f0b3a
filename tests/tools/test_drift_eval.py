"""How drift-eval scores alarms and decisions against known drifts, on small streams."""

from __future__ import annotations

import itertools

from riverflow.tools.drift_streams import (
    ALL_FUNCTIONS,
    GRADUAL_WIDTH,
    DriftWindows,
    alarm_figures,
    concepts,
    drift_profile,
    drifting_stream,
)


def test_a_drift_the_error_stream_cannot_show_is_undetectable_and_out_of_recall() -> None:
    # the first change raises the error from 0% to 50%; the second leaves it at 50%
    errors = [False] * 2_000 + [i % 2 == 0 for i in range(4_000)]
    profile = drift_profile(errors, [2_000, 4_000], stream="sea")
    assert [p["detectable"] for p in profile] == [True, False]
    assert profile[0]["error_before"] == 0.0 and profile[0]["error_after"] == 0.5
    windows = DriftWindows([2_000, 4_000], events=6_000, every=2_000, accept=500)
    # an alarm at each change: the second answers a real change, it is not false,
    # but recall is over the one drift that can be seen
    figures = alarm_figures([2_050, 4_200, 5_000], windows, [p["detectable"] for p in profile])
    assert (figures["detectable"], figures["undetectable"], figures["detected"]) == (1, 1, 1)
    assert figures["recall"] == 1.0 and figures["mean_delay"] == 50
    assert figures["detected_undetectable"] == 1 and figures["delays"] == [50, 200]
    assert figures["false_at"] == [5_000] and figures["false_per_100k"] == 100_000 / 6_000


def test_no_detectable_drift_leaves_recall_undefined_not_perfect() -> None:
    windows = DriftWindows([1_000], events=2_000, every=1_000)
    figures = alarm_figures([], windows, [False])
    assert figures["recall"] is None and figures["mean_delay"] is None


def test_a_stationary_stretch_is_the_second_half_of_a_fixed_concept() -> None:
    windows = DriftWindows([20_000, 40_000], events=60_000, every=20_000, accept=2_000)
    assert [windows.stationary(i) for i in (9_999, 10_000, 19_999, 20_000, 29_999, 30_000)] == [
        False, True, True, False, False, True
    ]  # fmt: skip
    assert windows.in_drift(21_999) and not windows.in_drift(22_000)
    # a gradual change: settled half the time between the end of one and the next
    gradual = DriftWindows([7_500], events=40_000, every=20_000, accept=2_000, width=5_000)
    end = 7_500 + 5_000 - 1
    assert not gradual.stationary(end + 7_499) and gradual.stationary(end + 7_500)
    assert gradual.in_drift(end + 1_999) and not gradual.in_drift(end + 2_000)


def test_agrawal_all_goes_through_every_function_including_the_near_constant_ones() -> None:
    assert concepts("agrawal-all", 10) == list(ALL_FUNCTIONS)
    samples, drifts = drifting_stream(1_000, 100, seed=1, stream="agrawal-all")
    assert drifts == list(range(100, 1_000, 100)) and len(list(samples)) == 1_000


def test_a_gradual_drift_mixes_the_concepts_across_its_width() -> None:
    every = 20_000
    samples, starts = drifting_stream(2 * every, every, seed=3, stream="sea-gradual")
    assert starts == [every - GRADUAL_WIDTH // 2]
    # SEA variant 0 labels x0 + x1 > 8, variant 1 x0 + x1 > 9: count labels only the
    # new concept gives (sum between 8 and 9, labelled as variant 1 does)
    rows = list(samples)
    assert len(rows) == 2 * every and set(rows[0][0]) == {"x0", "x1", "x2"}

    def new_share(lo: int, hi: int) -> float:
        between = [y for x, y in itertools.islice(rows, lo, hi) if 8 < x["x0"] + x["x1"] <= 9]
        return sum(not y for y in between) / len(between)

    assert new_share(0, 10_000) < 0.05  # before: the old concept
    assert 0.2 < new_share(every - 500, every + 500) < 0.8  # the middle: both
    assert new_share(every + 10_000, 2 * every) > 0.95  # after: the new one
