"""A slate pipeline's drift alarm: a drop of the served ranking's quality per request
(a one-sided CUSUM, armed after a warm-up), raised as the monitor's drift alarm with
its fresh challenger; none while a model learns from cold, none on a rise, and the
per-label error detector of other pipelines unchanged."""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import pytest
from pydantic import ValidationError
from rich.console import Console

from riverflow.models.registry import MemoryRegistry
from riverflow.monitors.drift import RankingDriftMonitor, RankingDriftSpec
from riverflow.monitors.policy import LabelSource, PipelineMonitor
from riverflow.monitors.ranking import RankingMonitor, ShownItem
from riverflow.monitors.spec import MonitorSpec
from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.tools.demo_recsys import run_recsys_demo

SHOWN = 5


def ctr(rng: random.Random, p: float) -> float:
    """One request's clicks per shown slot, each of ``SHOWN`` clicked with chance ``p``."""
    return sum(rng.random() < p for _ in range(SHOWN)) / SHOWN


def alarms_at(level: Callable[[int], float], n: int, seed: int,
              spec: RankingDriftSpec | None = None) -> list[int]:  # fmt: skip
    """The requests (0-based) at which the detector alarms on a CTR of ``level(i)``."""
    detector = RankingDriftMonitor(spec)
    rng = random.Random(seed)
    return [i for i in range(n) if detector.update(ctr(rng, level(i)))]


def learn_then_shift(i: int) -> float:
    """A model learning from cold (0.1 to 0.34 over 3,000 requests), steady, then a
    season change at request 8,000 halves its CTR, and it relearns part of it."""
    if i < 3_000:
        return 0.1 + 0.24 * i / 3_000
    if i < 8_000:
        return 0.34
    return 0.17 + 0.1 * min(1.0, (i - 8_000) / 4_000)


@pytest.mark.parametrize("seed", range(5))
def test_a_drop_is_found_within_tens_of_requests_and_the_learning_is_no_alarm(seed: int) -> None:
    [alarm] = alarms_at(learn_then_shift, 16_000, seed)
    assert 8_000 <= alarm < 8_100


def test_the_alarm_names_the_levels_and_the_detector_warms_up_again() -> None:
    detector = RankingDriftMonitor()
    rng = random.Random(1)
    for _ in range(3_000):
        assert not detector.update(ctr(rng, 0.4))
    fired = [detector.update(ctr(rng, 0.1)) for _ in range(3_000)]
    assert fired.count(True) == 1  # then warming up: the new level is its reference
    last = detector.last
    assert 0.38 < last["level_before"] < 0.42 and last["level_after"] < 0.2
    assert last["cusum"] > detector.spec.threshold and detector.alarms == 1
    assert detector.requests == 3_000 - fired.index(True) - 1


def test_no_alarm_during_the_warm_up_nor_on_a_rise_nor_on_a_steady_signal() -> None:
    # a drop within the first min_requests: the model is still learning
    assert alarms_at(lambda i: 0.4 if i < 1_000 else 0.1, 6_000, 2) == []
    # a sudden rise (a better model) is no drift
    assert alarms_at(lambda i: 0.1 if i < 5_000 else 0.4, 10_000, 3) == []
    # a steady signal, with clicks rare or common
    for p in (0.02, 0.3):
        assert alarms_at(lambda i, p=p: p, 100_000, 4) == []


def test_a_quality_outside_0_1_is_refused_and_the_spec_is_checked() -> None:
    detector = RankingDriftMonitor()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="per-request ranking quality in"):
            detector.update(bad)
    with pytest.raises(ValidationError):
        RankingDriftSpec(signal="clicks")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        RankingDriftSpec(threshold=0)


# -- in the ranking monitor: per serving model -------------------------------------


def serve(monitor: RankingMonitor, rng: random.Random, n: int, p: float, start: int,
          served: tuple[str, int] = ("champ", 1)) -> int:  # fmt: skip
    """``n`` completed requests of ``SHOWN`` items served by ``served``, each clicked
    with chance ``p``; the next request number."""
    for r in range(start, start + n):
        for pos in range(SHOWN):
            shown = ShownItem(f"i{pos}", pos, rng.random() < p, 1.0, {})
            monitor.on_item(f"r{r}", SHOWN, shown, served)
    return start + n


def test_the_ranking_monitor_queues_an_alarm_of_the_serving_model() -> None:
    monitor = RankingMonitor(window=500, open_requests=100, drift=RankingDriftSpec())
    rng = random.Random(6)
    n = serve(monitor, rng, 3_000, 0.35, 0)
    assert monitor.take_alarms() == []
    n = serve(monitor, rng, 200, 0.1, n)
    [alarm] = monitor.take_alarms()
    assert (alarm.model, alarm.version) == ("champ", 1)
    assert 3_000 <= int(alarm.request[1:]) < 3_100
    assert alarm.evidence["detector"] == "ranking_cusum"
    assert alarm.evidence["signal"] == "ctr_at_k" and alarm.evidence["request"] == alarm.request
    assert "ctr_at_k of champ's served rankings fell from 0.3" in alarm.reason
    assert monitor.take_alarms() == []  # taken


def test_a_rollback_or_a_new_serving_model_warms_up_afresh() -> None:
    monitor = RankingMonitor(window=500, open_requests=100, drift=RankingDriftSpec())
    rng = random.Random(7)
    n = serve(monitor, rng, 3_000, 0.35, 0, ("champ", 5))
    n = serve(monitor, rng, 300, 0.1, n, ("champ", 4))  # rolled back: a new level
    n = serve(monitor, rng, 300, 0.1, n, ("other", 1))  # a promoted model: its own
    assert monitor.take_alarms() == []
    assert RankingMonitor(window=500, open_requests=100).drift is None  # none asked for


# -- in the policy: the drift alarm and its fresh challenger ----------------------------


def slate_policy() -> PipelineMonitor:
    registry = MemoryRegistry(b"k" * 32)
    registry.publish("m", object(), {"parent": None, "metrics": {"labels": 1000}})
    monitor = PipelineMonitor("p", MonitorSpec(), registry, "m")
    monitor.refresh()
    monitor.error_drift = False  # what the stage does for a slate pipeline
    return monitor


def test_a_ranking_alarm_of_the_champion_starts_a_fresh_challenger() -> None:
    monitor = slate_policy()
    rng = random.Random(8)
    for _ in range(3_000):  # its error rate jumps: no alarm, the detector is the ranking's
        wrong = rng.random() < (0.05 if monitor.labels < 1_500 else 0.5)
        assert monitor.on_evaluation(True, {"m": (1, 0.1 if wrong else 0.9)}) == []
    source = LabelSource("r9/i3")
    assert monitor.on_ranking_drift("other", "x", {}, source) == []  # not the champion
    evidence = {"detector": "ranking_cusum", "level_before": 0.34, "level_after": 0.17}
    drift, challenger = monitor.on_ranking_drift("m", "ctr_at_k fell", evidence, source)
    assert (drift.kind, drift.model, drift.reason) == ("drift", "m", "ctr_at_k fell")
    assert drift.champion is True
    assert drift.evidence["level_after"] == 0.17 and "error_rate" in drift.evidence
    event = drift.as_event()
    assert event.event_id == "r9/i3" and event.evidence is not None
    assert event.evidence["detector"] == "ranking_cusum"
    assert (challenger.kind, challenger.model) == ("challenger", "m.r1")
    assert "m.r1" in monitor.registry.challengers()


# -- end to end: the recommendation demo's world, smaller -------------------------------


def test_the_season_change_raises_the_drift_alarm_and_nothing_before_it() -> None:
    """The recommendation example on a small seeded world (embedded runtime): the
    ranker learns its 60 users from cold, the season changes at request 3,500, and
    the monitor's one drift alarm is the ranking detector's, tripped by a request
    served after the change. A detector that alarmed while the model learned, or
    not at all, fails it."""
    spec = load_spec("examples/recsys.yaml")
    result = run_recsys_demo(spec, Settings(), requests=7_000, seed=11, window=500,
                             console=Console(file=io.StringIO()), world_users=60,
                             world_items=200)  # fmt: skip
    shift = result.shift_at
    before = result.mean("ndcg", shift // 2, shift)
    assert before > result.mean("ndcg", shift, shift + 500) + 0.1  # the shift costs
    [alarm] = result.drift_alarms
    assert "served rankings fell" in alarm.reason
    assert shift <= alarm.request < shift + 300
    assert any(f"fresh {spec.models.champion} started" in d for d in result.decisions)
