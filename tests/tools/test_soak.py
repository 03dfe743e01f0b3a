"""The soak's figures, computed from synthetic arrivals and samples: what a user reads in
its report must be right before it judges a 25-minute run."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from riverflow.settings import Settings
from riverflow.tools import generator
from riverflow.tools.generator import paced
from riverflow.tools.soak import (
    Gaps,
    LagHistogram,
    Ledger,
    SoakConfig,
    event_index,
    learner_less_index,
    redis_window,
    slope_per_min,
    targets,
)


def test_lag_percentiles_are_within_two_percent_and_the_max_is_exact() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(-3, 1) for _ in range(20_000)]
    hist = LagHistogram()
    for v in values:
        hist.add(v)
    ordered = sorted(values)
    for q in (0.5, 0.99):
        exact = ordered[math.ceil(q * len(ordered)) - 1]
        assert hist.quantile_s(q) == pytest.approx(exact, rel=0.021)
    assert hist.max_s == max(values)
    assert len(hist.buckets) < 1000  # bounded, whatever the number of values
    assert math.isnan(LagHistogram().quantile_s(0.5))


def test_gaps_skip_the_warm_up_and_count_the_silence_at_the_end() -> None:
    gaps = Gaps(start=100.0, limit_s=5.0)
    for at in (90.0, 99.0):  # warm-up: a 9 s silence that is not judged
        gaps.arrived(at)
    for at in (101.0, 101.05, 108.05, 108.1):  # 1 s (from the warm-up's end), 7 s
        gaps.arrived(at)
    gaps.close(115.0)  # stalled for the last 6.9 s
    assert gaps.longest == pytest.approx(7.0)
    assert gaps.over_count == 2
    assert gaps.over == [(pytest.approx(101.05), pytest.approx(7.0)),
                         (108.1, pytest.approx(6.9))]  # fmt: skip


def test_a_gap_the_soak_itself_was_held_up_for_is_not_the_pipelines() -> None:
    gaps = Gaps(start=0.0, limit_s=5.0)
    for at in (1.0, 11.0, 12.0, 22.0):  # two 10 s gaps
        gaps.arrived(at)
    gaps.held(2.0, 8.0)  # the soak did not run for 8 s of the first: 2 s is left
    gaps.held(13.0, 4.0)  # only 4 s of the second: 6 s is left, over the limit
    assert gaps.over_count == 2 and gaps.unexplained() == 1
    config = SoakConfig(rate=1500)
    verdict = targets(config, gaps, 0, {"scorer": 0.0}, 0.0, {})[0]
    assert not verdict.passed
    assert "1 while the soak itself was held up, 12.0 s in all" in verdict.value
    gaps.held(17.0, 3.0)  # and 3 s more of the second
    verdict = targets(config, gaps, 0, {"scorer": 0.0}, 0.0, {})[0]
    assert gaps.unexplained() == 0 and verdict.passed


def test_redis_is_judged_once_its_snapshots_and_marks_have_filled() -> None:
    # the defaults: a 15-minute replay window (10 for the marks) and a minute's bucket
    settings = Settings()
    assert redis_window(25 * 60, 60, settings) == (960.0, "from 16 min, once snapshots "
                                                   "and marks filled")  # fmt: skip
    # 12 minutes: too short to judge after 16; the 2nd half after warm-up, said so
    start, when = redis_window(12 * 60, 60, settings)
    assert start == 390.0 and when.startswith("in the 2nd half (snapshots and marks fill")
    shorter = Settings(replay_window_s=60, learned_keep_s=0)
    assert redis_window(12 * 60, 60, shorter)[0] == 120.0


def test_no_prediction_at_all_is_one_gap_as_long_as_the_run() -> None:
    gaps = Gaps(start=10.0, limit_s=5.0)
    gaps.close(70.0)
    assert gaps.longest == 60.0 and gaps.over_count == 1


def test_slope_is_per_minute_and_ignores_noise_around_a_flat_line() -> None:
    assert slope_per_min([(t, 100 + 0.05 * t) for t in range(0, 600, 5)]) == pytest.approx(3.0)
    rng = random.Random(1)
    flat = [(float(t), 200 + rng.uniform(-5, 5)) for t in range(0, 1500, 5)]
    assert abs(slope_per_min(flat)) < 0.2
    assert math.isnan(slope_per_min([(1.0, 5.0)]))


def test_ledger_counts_each_event_once_and_tells_replays_from_duplicates() -> None:
    ledger = Ledger(events=10, start=1000.0)
    for i in range(10):
        ledger.produce(i, 1000.0 + i)
    for i in range(8):  # 8 predicted 0.2 s after their event; 8 and 9 never
        ledger.predict(f"e7-{i:08d}", 1000.2 + i, replayed=False)
    ledger.predict("e7-00000003", 1030.0, replayed=True)  # a replay after a restart
    ledger.predict("e7-00000004", 1030.0, replayed=False)  # a true duplicate
    ledger.predict("x-other", 1030.0, replayed=False)  # not this run's
    assert (ledger.produced, ledger.predicted) == (10, 8)
    assert (ledger.second_replayed, ledger.second_unflagged, ledger.unknown) == (1, 1, 1)
    assert sorted(ledger.sent) == [8, 9]  # produce times are kept only until predicted
    assert ledger.behind(1070.0) == 2
    first = ledger.minutes[0]
    assert first.produced == 10 and first.predicted == 8
    assert first.lag.quantile_s(0.99) == pytest.approx(0.2, rel=0.021)
    assert ledger.minutes[1].max_behind == 2  # noted in the minute of the sample


def test_ledger_finds_labels_learned_twice_or_both_learned_and_orphaned() -> None:
    ledger = Ledger(events=5, start=0.0)
    for event_id in ("e7-00000000", "e7-00000001", "e7-00000001", "e7-00000002"):
        ledger.learn(event_id)
    ledger.orphan("e7-00000002")  # learned, then also sent to the DLQ
    ledger.orphan("e7-00000003")
    ledger.orphan("e7-00000003")  # the same orphan twice counts once
    assert (ledger.labels_learned, ledger.learned_twice) == (3, 1)
    assert (ledger.labels_orphaned, ledger.learned_and_orphaned) == (2, 1)


def test_event_index_reads_the_generators_ids() -> None:
    assert event_index("e7-00012345") == 12345
    assert event_index("nonsense") == -1


def test_targets_pass_only_when_every_figure_is_within_its_limit() -> None:
    config = SoakConfig(rate=1500)
    quiet = Gaps(0.0, 5.0)
    quiet.arrived(1.0)
    flat = {"scorer": 0.2, "learner": -0.1, "monitor": 0.0}
    nothing_lost = {"missing predictions": 0, "orphan labels": 0}
    good = targets(config, quiet, 1500, flat, 0.3, nothing_lost)
    assert all(t.passed for t in good)
    stalled = Gaps(0.0, 5.0)
    stalled.arrived(6.0)
    bad = targets(config, stalled, 1501, {**flat, "scorer": 2.5}, 30.0,
                  {"missing predictions": 852, "orphan labels": 0})  # fmt: skip
    assert [t.name for t in bad if not t.passed] == ["gaps", "lag", "rss", "redis", "complete"]
    assert "missing predictions 852" in bad[-1].value


def test_the_default_warm_up_is_a_quarter_of_a_short_run_and_a_minute_of_a_long_one() -> None:
    assert SoakConfig(minutes=2).warmup == 30.0
    assert SoakConfig(minutes=25).warmup == 60.0
    assert SoakConfig(minutes=25, warmup_s=5).warmup == 5.0
    assert SoakConfig(minutes=25, rate=1500).events == 2_250_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_paced_sends_in_bursts_one_sleep_per_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(generator.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(generator.time, "sleep", clock.sleep)
    sent = [(i, clock.now) for i in paced(range(3000), rate=1500, tick_s=0.01)]
    assert clock.now == pytest.approx(2.0 - 0.01)  # the last tick starts at 1.99 s
    assert clock.sleeps == 199  # one per tick after the first, not one per item
    assert all(at == pytest.approx((i // 15) * 0.01) for i, at in sent)


def test_paced_gives_slots_only_to_what_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(generator.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(generator.time, "sleep", clock.sleep)
    stream = generator.with_labels(1000, generator.FraudStreamConfig(label_delay=50))
    items = list(paced(stream, rate=100, counts=lambda item: item[0] == "event"))
    assert len(items) == 2000  # labels ride along with their events
    assert clock.now == pytest.approx(9.99)  # 1000 events at 100/s


def test_a_late_tick_is_made_up_without_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(generator.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(generator.time, "sleep", clock.sleep)
    for i in paced(range(1000), rate=100):
        if i == 10:
            clock.now += 0.5  # the producer was held up for half a second
    assert clock.now == pytest.approx(9.99)


@pytest.mark.parametrize(
    "args", [("soak", "--rate", "0"), ("soak", "--minutes", "-1"), ("produce", "--rate", "0")]
)
def test_a_rate_or_duration_that_cannot_be_is_an_error_line(args: tuple[str, ...]) -> None:
    done = subprocess.run([sys.executable, "-m", "riverflow.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error:" in done.stderr and "must be positive" in done.stderr


def test_the_learner_is_judged_less_the_most_its_index_has_held() -> None:
    """A memtable flushed leaves its pages in the RSS: the learner's own memory is its
    RSS less the index's high-water mark, flat here though the index empties."""
    index = [(0.0, math.nan), (5.0, 10.0), (10.0, 30.0), (15.0, 2.0), (20.0, 25.0)]
    rss = [(0.0, 150.0), (5.0, 160.0), (10.0, 180.0), (15.0, 180.0), (20.0, 180.0)]
    less = learner_less_index(rss, index)
    assert math.isnan(less[0][1])  # not read yet
    assert [v for _, v in less[1:]] == [150.0, 150.0, 150.0, 150.0]
    assert slope_per_min(less[1:]) == 0.0
    # what grows beyond the index is still seen
    grown = learner_less_index([(t, v + t) for t, v in rss], index)
    assert slope_per_min(grown[1:]) == pytest.approx(60.0)
