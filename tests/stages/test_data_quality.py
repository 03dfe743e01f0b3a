"""Cleaning and data quality through the embedded pipeline: a field that goes missing
for a while is imputed (not refused), named in each prediction, reported as a
schema change and counted per field; the learner trains on exactly the inputs the
scorer served."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml

from riverflow.embedded import EmbeddedRuntime
from riverflow.models.champion import positive_probability
from riverflow.models.cleaning import cleaning_of
from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import PipelineSpec, parse_spec
from riverflow.streams.contracts import DeadLetter, Evaluation, ModelEvent, Prediction
from riverflow.tools.generator import FraudStreamConfig, dropping, with_labels

N, DROP = 3000, (1000, 1600)  # amount missing from the events at positions [1000, 1600)


def fraud_spec(clean: bool = True, **changes: Any) -> PipelineSpec:
    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["monitors"] = {"quality": {"window": 200}}
    if not clean:
        data.pop("clean")
    data.update(changes)
    return parse_spec(data)


def run(spec: PipelineSpec, settings: Settings, extra: list[bytes] = ()) -> EmbeddedRuntime:  # type: ignore[assignment]
    rt = EmbeddedRuntime(spec, settings)
    records = dropping(with_labels(N, FraudStreamConfig(drift_at=())), ("amount", *DROP))
    for kind, rec in records:
        topic = rt.topics.events if kind == "event" else rt.topics.labels
        rt.produce(topic, rec.get("card_id", "").encode() or None, orjson.dumps(rec))
    for value in extra:
        rt.produce(rt.topics.events, b"c1", value)
    rt.drain()
    return rt


def records(rt: EmbeddedRuntime, topic: str, kind: type[Any]) -> list[Any]:
    return [kind.decode(v) for _, v in rt.messages(topic)]


def test_a_dropped_field_is_imputed_named_and_reported_and_nothing_is_refused(
    settings: Settings,
) -> None:
    spec = fraud_spec()
    rt = run(spec, settings)
    predictions = {p.event_id: p for p in records(rt, rt.topics.predictions, Prediction)}
    assert len(predictions) == N and not rt.messages(rt.topics.dlq)
    for i in range(N):
        p = predictions[f"e7-{i:08d}"]
        if DROP[0] <= i < DROP[1]:
            assert p.inputs["amount"] is None and p.cleaned.get("amount") == "impute", i
        else:
            assert p.inputs["amount"] is not None and "impute" not in p.cleaned.values(), i
    changes = [
        e.evidence for e in records(rt, rt.topics.model_events, ModelEvent)
        if e.kind == "schema_change"
    ]  # fmt: skip
    assert [(c["change"], c["field"]) for c in changes] == [
        ("missing", "amount"), ("restored", "amount")
    ]  # fmt: skip
    quality = rt.scorer.quality
    assert quality.cleaned["amount", "impute"] == DROP[1] - DROP[0]
    status = rt.scorer.status()
    assert status["missing_rate:amount"] == 0.0  # the last window is after the drop
    assert status["cleaned:amount:impute"] == DROP[1] - DROP[0]
    assert "freshness_s:0" in status
    panel = rt.monitor.view(series=False).data_quality
    assert panel["window"] == 200 and panel["fields"]["amount"]["missing"] == 0.0


def test_the_learner_trains_on_exactly_what_the_scorer_served(settings: Settings) -> None:
    rt = run(fraud_spec(), settings)
    predictions = {p.event_id: p for p in records(rt, rt.topics.predictions, Prediction)}
    evaluations = records(rt, rt.topics.evaluations, Evaluation)
    assert len(evaluations) == N
    checked_served = 0
    for ev in evaluations:
        p = predictions[ev.event_id]
        # the learner's model inputs are the scorer's, raw: each model's own Clean
        # step imputes and clips them, in both stages alike
        assert ev.inputs == {**p.inputs, **p.features}, ev.event_id
        if checked_served < 300 and p.inputs["amount"] is None:
            assert p.version > 0  # published: the first version serves the first labels
            version = rt.registry.load(p.model, p.version)
            x = {**p.inputs, **p.features}
            assert positive_probability(version.model, x) == pytest.approx(p.probability)
            checked_served += 1
    assert checked_served == 300
    # the statistics were learned from the amounts events carried, never imputed ones
    for candidate in rt.learner.candidates.values():
        step = cleaning_of(candidate.model)
        assert step is not None
        carried = sum(1 for ev in evaluations if ev.inputs["amount"] is not None)
        assert step.summary()["amount"]["seen"] == carried, candidate.name


def test_without_cleaning_the_dropped_events_are_refused_and_counted_missing(
    settings: Settings,
) -> None:
    rt = run(fraud_spec(clean=False), settings)
    dead = [d for d in records(rt, rt.topics.dlq, DeadLetter) if d.stage == "scorer"]
    assert len(dead) == DROP[1] - DROP[0]  # (their labels follow them: never scored)
    assert {d.error_kind for d in dead} == {"missing_field"}
    assert all(d.error.startswith("amount:") for d in dead)
    changes = [e.evidence["change"] for e in records(rt, rt.topics.model_events, ModelEvent)
               if e.kind == "schema_change"]  # fmt: skip
    assert changes == ["missing", "restored"]


def test_type_errors_and_undeclared_fields_are_counted_per_field(settings: Settings) -> None:
    base = {"event_id": "x1", "card_id": "c1", "merchant": "m", "category": "grocery",
            "country": "FR", "channel": "pos", "ts": 1_767_225_600.0}  # fmt: skip
    bad = [orjson.dumps({**base, "event_id": f"bad{i}", "amount": "12 EUR"}) for i in range(3)]
    extra = orjson.dumps({**base, "event_id": "new", "amount": 3.0, "loyalty_tier": "gold"})
    rt = run(fraud_spec(), settings, [*bad, extra, extra.replace(b'"new"', b'"new2"')])
    status = rt.scorer.status()
    assert status["type_errors:amount"] == 3
    new = [e.evidence for e in records(rt, rt.topics.model_events, ModelEvent)
           if e.kind == "schema_change" and e.evidence["change"] == "new_field"]  # fmt: skip
    assert new == [{"change": "new_field", "field": "loyalty_tier", "window": 200}]
