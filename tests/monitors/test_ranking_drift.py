"""A slate pipeline's drift alarm: a drop of the served ranking's quality per request
(a one-sided CUSUM, armed after a warm-up), raised as the monitor's drift alarm with
its fresh challenger; none while a model learns from cold, none on a rise, and the
per-label error detector of other pipelines unchanged."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from riverflow.embedded import EmbeddedRuntime
from riverflow.models.registry import MemoryRegistry
from riverflow.monitors.drift import RankingDriftMonitor, RankingDriftSpec
from riverflow.monitors.policy import LabelSource, PipelineMonitor
from riverflow.monitors.ranking import RankingMonitor, ShownItem
from riverflow.monitors.spec import MonitorSpec
from riverflow.settings import Settings
from riverflow.spec import SpecError, load_spec, parse_spec
from riverflow.streams.contracts import Message, ModelEvent
from riverflow.tools.recsys import RecsysConfig, RecsysWorld, Request

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
    assert monitor.watches["m"].drift.alarms == 1  # the page's count of its alarms
    assert "m.r1" in monitor.registry.challengers()


# -- on the monitor stage: the seeded world's season change -------------------------------

SHIFT = 6_000


def ranker(world: RecsysWorld, rng: random.Random) -> Callable[[Request], list[str]]:
    """A ranker learning from cold: by popularity at first, by the users' tastes on more
    and more requests (all from request 3,000) but for a swing back to popularity over
    requests 1,600-1,900, still by the first season's tastes for 2,000 requests after
    the season changes, then by the new ones."""

    def rank(req: Request) -> list[str]:
        swing = 1_600 <= req.position < 1_900
        learned = not swing and rng.random() < req.position / 3_000
        season = 0 if req.position < SHIFT + 2_000 else None
        if not learned:
            return world.by_popularity(req)
        return sorted(req.slate, key=lambda i: (-world.relevance(req, i, season), i))

    return rank


def stage_decisions(
    shift: bool, seed: int = 5, drift: dict[str, Any] | None = None
) -> list[tuple[int, ModelEvent]]:
    """9,000 requests of a seeded world (a season change at ``SHIFT`` if ``shift``)
    served by ``ranker``, their clicks as slate evaluations to an embedded runtime's
    monitor stage (the example's spec, its ``monitors.ranking.drift`` set to ``drift``
    if given), a batch of 100 requests at a time, the items interleaved across
    requests: the model-events it writes, with the batch's end."""
    world = RecsysWorld(RecsysConfig(seed=seed, users=200, items=500,
                                     shift_at=(SHIFT,) if shift else ()))  # fmt: skip
    rng = random.Random(seed)
    rank = ranker(world, rng)
    spec = load_spec("examples/recsys.yaml")
    if drift is not None:
        data = spec.model_dump(mode="json", by_alias=True)
        spec = parse_spec({**data, "monitors": {"ranking": {"drift": drift}}})
    rt = EmbeddedRuntime(spec, Settings())
    k = world.config.shown
    out: list[tuple[int, ModelEvent]] = []
    batch: list[dict[str, Any]] = []
    for req in world.requests(9_000):
        ranking = rank(req)
        for position, (item, clicked) in enumerate(
            zip(ranking, world.clicks(req, ranking, rng), strict=False)
        ):
            p = 0.2 if position == 0 else 0.1  # what the model said: the detector ignores it
            batch.append({"event_id": f"{req.request_id}/{item}", "label": clicked,
                          "labels_seen": 1, "predictions": {"recsys-fm": {"version": 1,
                                                                          "probability": p}},
                          "served": {"model": "recsys-fm", "version": 1, "probability": p},
                          "request": req.request_id, "position": position, "shown": k,
                          "propensity": 1.0, "defaulted": not clicked})  # fmt: skip
        if (req.position + 1) % 100 == 0:
            rng.shuffle(batch)
            t, at = rt.topics.evaluations, rt.monitor.core.labels  # (offsets count on)
            messages = [Message(t, 0, at + n, b"k", orjson.dumps(r)) for n, r in enumerate(batch)]
            events = [ModelEvent.decode(o.value) for o in rt.monitor.process(messages)
                      if o.topic == rt.topics.model_events]  # fmt: skip
            out += [(req.position + 1, e) for e in events]
            batch = []
    assert rt.monitor.core.labels == 9_000 * k and rt.monitor.core.error_drift is False
    return out


def test_the_season_change_raises_one_drift_alarm_and_a_fresh_challenger() -> None:
    """The ranker's clicks halve at the season change: one drift alarm, tripped by a
    request served after it and raised within 300 requests, none while the ranker
    learned from cold nor while it relearns; the policy starts a fresh challenger."""
    events = stage_decisions(shift=True)
    drifts = [(at, e) for at, e in events if e.kind == "drift"]
    assert len(drifts) == 1, [e.reason for _, e in drifts]
    at, alarm = drifts[0]
    assert alarm.evidence is not None and alarm.event_id is not None
    tripped = int(str(alarm.evidence["request"]).rsplit("-", 1)[1])
    assert SHIFT <= tripped < SHIFT + 300 and at <= SHIFT + 400
    assert alarm.event_id.startswith(str(alarm.evidence["request"]) + "/")
    assert alarm.evidence["detector"] == "ranking_cusum" and alarm.champion is True
    assert alarm.evidence["level_after"] < 0.75 * alarm.evidence["level_before"]
    assert "ctr_at_k of recsys-fm's served rankings fell" in (alarm.reason or "")
    [challenger] = [e for _, e in events if e.kind == "challenger"]
    assert challenger.model == "recsys-fm.r1"


def test_without_a_season_change_the_learning_ranker_raises_no_alarm() -> None:
    assert [e.reason for _, e in stage_decisions(shift=False) if e.kind == "drift"] == []


def test_the_detector_is_a_setting_of_the_spec() -> None:
    """``monitors.ranking.drift``: a threshold the season change's drop never sums
    to raises no alarm."""
    events = stage_decisions(shift=True, drift={"threshold": 10_000})
    assert [e for _, e in events if e.kind == "drift"] == []
    data = load_spec("examples/recsys.yaml").model_dump(mode="json", by_alias=True)
    with pytest.raises(SpecError, match=r"monitors\.ranking\.drift\.signal"):
        parse_spec({**data, "monitors": {"ranking": {"drift": {"signal": "clicks"}}}})
