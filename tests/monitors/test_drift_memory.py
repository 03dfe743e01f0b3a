"""A monitor killed after its champion's errors rose, and started again, still raises the
drift alarm (and starts the fresh challenger it brings): its saved memory carries the
champion's drift detector. Before, the restarted monitor's fresh detector saw only the
errors since the restart, found no change in them, and never raised it."""

from __future__ import annotations

import base64
import random

import orjson
import pytest
from river import linear_model

from riverflow.assembly import build_monitor
from riverflow.models.registry import ChampionPointer, MemoryRegistry
from riverflow.monitors.drift import DetectorKind, DetectorSpec, ErrorDriftMonitor
from riverflow.spec import PipelineSpec, load_spec, parse_spec
from riverflow.stages import monitor as monitor_stage
from riverflow.stages.monitor import Monitor
from riverflow.streams.contracts import Message, ModelEvent
from riverflow.tools.recsys import RecsysConfig, RecsysWorld
from tests.monitors.test_duel_memory import registry_with_two
from tests.monitors.test_monitor_retry import KEY, drifting_spec, evaluations
from tests.monitors.test_ranking_drift import ranker

BATCH = 10
FALLS_AT = 500  # the champion right on 95% of the labels, then on 10%


def feed(monitor: Monitor, msgs: list[Message]) -> list[ModelEvent]:
    """``msgs`` in batches; the drift alarms and fresh challengers written."""
    out = [o for i in range(0, len(msgs), BATCH) for o in monitor.process(msgs[i : i + BATCH])]
    events = [ModelEvent.decode(o.value) for o in out if o.topic == monitor.topics.model_events]
    return [e for e in events if e.kind in ("drift", "challenger")]


def detector_evidence(events: list[ModelEvent]) -> list[tuple[str, str, object]]:
    return [(e.kind, e.model, (e.evidence or {}).get("statistic")) for e in events]


@pytest.mark.parametrize("replayed", [0, 5])
def test_a_monitor_restarted_after_its_champion_fell_still_raises_the_drift_alarm(
    fraud_spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch, replayed: int
) -> None:
    spec = drifting_spec(fraud_spec)
    msgs = evaluations(spec, falls_at=FALLS_AT)
    whole = feed(build_monitor(spec, registry_with_two()), msgs)
    assert [e.kind for e in whole] == ["drift", "challenger"]
    alarm_at = (whole[0].evidence or {}).get("labels")
    assert isinstance(alarm_at, int) and FALLS_AT < alarm_at < FALLS_AT + 20

    monkeypatch.setattr(monitor_stage, "MEMORY_EVERY_S", 0.0)  # saved after every batch
    registry = registry_with_two()
    killed_at = FALLS_AT + 5  # the errors have risen; the alarm has not come yet
    first = build_monitor(spec, registry)
    assert feed(first, msgs[:killed_at]) == []
    # SIGKILLed; the group committed offsets ``replayed`` records behind the memory
    again = build_monitor(spec, registry)
    assert detector_evidence(feed(again, msgs[killed_at - replayed :])) == detector_evidence(whole)
    assert again.core.fresh.keys() == {"fraud-hoeffding.r1"}


def test_a_saved_detector_is_taken_back_only_if_signed_by_us_and_of_the_spec() -> None:
    spec = DetectorSpec()
    drift = ErrorDriftMonitor(spec)
    for i in range(300):
        drift.update(float(i % 10 == 0))
    state = drift.state(KEY)

    back = ErrorDriftMonitor.restored(spec, state, KEY)
    assert back is not None
    assert back.statistic() == drift.statistic()
    assert [back.update(1.0) for _ in range(60)] == [drift.update(1.0) for _ in range(60)]

    assert ErrorDriftMonitor.restored(spec, state, b"x" * 32) is None  # another key
    blob = bytearray(base64.b64decode(state["detector"]))
    blob[-5] ^= 1  # one bit of the pickle changed
    tampered = {**state, "detector": base64.b64encode(bytes(blob)).decode()}
    assert ErrorDriftMonitor.restored(spec, tampered, KEY) is None
    assert ErrorDriftMonitor.restored(spec, {**state, "detector": "not base64!"}, KEY) is None
    other = DetectorSpec(kind=DetectorKind.ADWIN, params={"delta": 0.01})
    assert ErrorDriftMonitor.restored(other, state, KEY) is None  # other parameters


# -- a slate pipeline's ranking drift: the served quality per request -------------------

SLATE_BATCH = 20


def slate_batches(shift_at: int, requests: int) -> list[list[Message]]:
    """The seeded world's requests (its season change at ``shift_at``) ranked by
    ``test_ranking_drift.ranker``, their clicks as slate evaluations of ``recsys-fm``
    v1: a batch every ``SLATE_BATCH`` requests, each with its items shuffled, offsets counting on
    across batches (one partition)."""
    world = RecsysWorld(RecsysConfig(seed=5, users=200, items=500, shift_at=(shift_at,)))
    rng = random.Random(5)
    rank = ranker(world, rng)
    topic = load_spec("examples/recsys.yaml").topics.evaluations
    batches: list[list[Message]] = []
    records: list[dict[str, object]] = []
    offset = 0
    for req in world.requests(requests):
        ranking = rank(req)
        clicks = world.clicks(req, ranking, rng)
        for position, (item, clicked) in enumerate(zip(ranking, clicks, strict=False)):
            served = {"model": "recsys-fm", "version": 1, "probability": 0.1}
            records.append({"event_id": f"{req.request_id}/{item}", "label": clicked,
                            "labels_seen": 1, "predictions": {"recsys-fm": {
                                "version": 1, "probability": 0.1}}, "served": served,
                            "request": req.request_id, "position": position,
                            "shown": world.config.shown, "propensity": 1.0,
                            "defaulted": not clicked})  # fmt: skip
        if (req.position + 1) % SLATE_BATCH == 0:
            rng.shuffle(records)
            batches.append([Message(topic, 0, offset + n, b"k", orjson.dumps(r))
                            for n, r in enumerate(records)])  # fmt: skip
            offset += len(records)
            records = []
    return batches


def ranking_alarms(monitor: Monitor, batches: list[list[Message]]) -> list[dict[str, object]]:
    """The drift alarms' evidence of the ranking detector (the monitor's count of
    labels and the per-item error rate, which a restart starts again, left out)."""
    out = [o for batch in batches for o in monitor.process(batch)]
    events = [ModelEvent.decode(o.value) for o in out if o.topic == monitor.topics.model_events]
    return [{k: v for k, v in (e.evidence or {}).items() if k not in ("error_rate", "labels")}
            for e in events if e.kind == "drift"]  # fmt: skip


@pytest.mark.parametrize("replayed", [0, 137, 1_000])
def test_a_slate_monitor_restarted_after_the_served_quality_fell_still_raises_the_alarm(
    monkeypatch: pytest.MonkeyPatch, replayed: int
) -> None:
    spec = load_spec("examples/recsys.yaml")
    data = spec.model_dump(mode="json", by_alias=True)
    # an alarm needs a deeper sum: it comes some batches after the season changes
    spec = parse_spec({**data, "monitors": {"ranking": {"drift": {"threshold": 60.0}}}})

    def registry() -> MemoryRegistry:
        registry = MemoryRegistry(KEY)
        registry.publish("recsys-fm", linear_model.LogisticRegression(), {})
        registry.move(ChampionPointer("recsys-fm", 1), "advance", None)
        return registry

    shift = 6_000
    batches = slate_batches(shift, 6_600)
    (whole,) = ranking_alarms(build_monitor(spec, registry()), batches)
    tripped = int(str(whole["request"]).rsplit("-", 1)[1])
    assert shift + 2 * SLATE_BATCH <= tripped < shift + 400

    monkeypatch.setattr(monitor_stage, "MEMORY_EVERY_S", 0.0)  # saved after every batch
    shared = registry()
    killed_at = shift // SLATE_BATCH + 1  # batches: the new season's first were served
    assert ranking_alarms(build_monitor(spec, shared), batches[:killed_at]) == []
    # SIGKILLed; the group committed offsets ``replayed`` records behind the memory
    before = batches[killed_at - 1]
    again = [before[len(before) - replayed :]] if replayed else []
    restarted = build_monitor(spec, shared)
    assert ranking_alarms(restarted, again + batches[killed_at:]) == [whole]
