"""Labels that are numbers or classes, end to end on the embedded runtime: what the
predictions and evaluations carry, the metrics the learner and the monitor keep,
labels refused to the DLQ, and a regressor promoted on paired errors."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec, parse_spec
from riverflow.streams.contracts import DeadLetter, Evaluation, ModelEvent, Prediction
from riverflow.tools.generator import DeliveryStreamConfig, delivery_with_labels, history

CLASSES = ["bike", "car", "foot"]


def run(spec: PipelineSpec, settings: Settings, records: Iterable[tuple[str, dict[str, Any]]],
        extra_labels: Iterable[bytes] = ()) -> EmbeddedRuntime:  # fmt: skip
    rt = EmbeddedRuntime(spec, settings)
    for n, (kind, rec) in enumerate(records, 1):
        if kind == "event":
            rt.produce(rt.topics.events, str(rec[spec.events.key]).encode(), orjson.dumps(rec))
        else:
            rt.produce(rt.topics.labels, rec["event_id"].encode(), orjson.dumps(rec))
        if n % 300 == 0:
            rt.step()
    for raw in extra_labels:
        rt.produce(rt.topics.labels, b"bad", raw)
    rt.drain()
    return rt


def decoded(rt: EmbeddedRuntime, topic: str, kind: Any) -> list[Any]:
    return [kind.decode(v) for _, v in rt.messages(topic)]


def test_a_regression_pipeline_predicts_numbers_and_keeps_regression_metrics(
    settings: Settings,
) -> None:
    spec = load_spec("examples/delivery.yaml")
    bad = [b'{"event_id": "d7-00000001", "delivery_minutes": "soon"}',
           b'{"event_id": "d7-00000002"}']  # fmt: skip
    rt = run(spec, settings, history("delivery", 3_000, seed=7), bad)
    predictions = decoded(rt, rt.topics.predictions, Prediction)
    assert len(predictions) == 3_000
    assert all(p.probability is None and type(p.value) is float for p in predictions)
    raw = orjson.loads(rt.messages(rt.topics.predictions)[-1][1])
    assert raw["probability"] is None and "probabilities" not in raw
    evaluations = decoded(rt, rt.topics.evaluations, Evaluation)
    assert len(evaluations) == 3_000
    last = evaluations[-1]
    assert type(last.label) is float
    assert {type(p.value) for p in last.predictions.values()} == {float}
    for p in last.predictions.values():
        assert p.error == pytest.approx(abs(last.label - (p.value or 0.0)))
    assert last.served is not None and last.served.value == predictions[-1].value

    status = rt.learner.status()
    assert status["prequential_labels"] == 3_000
    assert 0 < status["prequential_mae"] < status["prequential_rmse"] < 15
    assert 0.3 < status["prequential_r2"] < 1
    view = rt.monitor.view()
    assert view.metric == "mae"
    champion = next(c for c in view.candidates if c.role == "champion")
    assert set(champion.metrics) == {"mae", "rmse", "r2", "window"}
    assert champion.metrics["mae"] < 10

    refused = [d for d in decoded(rt, rt.topics.dlq, DeadLetter) if d.stage == "learner"]
    assert [d.error_kind for d in refused] == ["wrong_type", "missing_field"]
    assert all("delivery_minutes" in d.error for d in refused)


def multiclass_spec() -> PipelineSpec:
    return parse_spec({
        "name": "travel",
        "events": {"fields": {"event_id": "str", "user": "str", "km": "float", "ts": "timestamp"},
                   "key": "user", "event_id": "event_id", "time": "ts"},
        "label": {"field": "mode", "type": "category", "classes": CLASSES},
        "models": {"inputs": ["km"], "candidates": [
            {"name": "tree", "estimator": {"class": "river.tree.HoeffdingTreeClassifier",
                                           "params": {"grace_period": 50}}},
            {"name": "ovr", "preprocessing": [{"class": "river.preprocessing.StandardScaler"}],
             "estimator": {"class": "river.multiclass.OneVsRestClassifier", "params": {
                 "classifier": {"class": "river.linear_model.LogisticRegression"}}}},
        ]},
    })  # fmt: skip


def trips(n: int, seed: int = 11) -> Iterable[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    for i in range(n):
        km = rng.uniform(0.1, 20.0)
        mode = "foot" if km < 2 else "bike" if km < 7 else "car"
        if rng.random() < 0.1:
            mode = rng.choice(CLASSES)
        yield "event", {"event_id": f"t{i}", "user": f"u{i % 50}", "km": km, "ts": 1e9 + i}
        yield "label", {"event_id": f"t{i}", "mode": mode}


def test_a_multiclass_pipeline_predicts_classes_and_keeps_multiclass_metrics(
    settings: Settings,
) -> None:
    bad = [b'{"event_id": "t1", "mode": "boat"}']
    rt = run(multiclass_spec(), settings, trips(2_000), bad)
    predictions = decoded(rt, rt.topics.predictions, Prediction)
    last = predictions[-1]
    assert last.probability is None and last.value in CLASSES
    assert last.probabilities is not None and set(last.probabilities) == set(CLASSES)
    assert sum(last.probabilities.values()) == pytest.approx(1.0)
    assert max(last.probabilities, key=last.probabilities.__getitem__) == last.value
    evaluation = decoded(rt, rt.topics.evaluations, Evaluation)[-1]
    assert evaluation.label in CLASSES and evaluation.predictions["ovr"].value in CLASSES

    status = rt.learner.status()
    assert {"prequential_accuracy", "prequential_macro_f1", "prequential_log_loss"} <= set(status)
    assert status["prequential_accuracy"] > 0.7
    view = rt.monitor.view()
    assert view.metric == "accuracy"
    for c in view.candidates:
        assert set(c.metrics) == {"accuracy", "macro_f1", "log_loss", "window"}
    refused = [d for d in decoded(rt, rt.topics.dlq, DeadLetter) if d.stage == "learner"]
    assert len(refused) == 1 and refused[0].error_kind == "wrong_value"
    assert "mode: 'boat' is not one of the declared classes" in refused[0].error


def test_a_regressor_with_smaller_errors_is_promoted_on_paired_errors(settings: Settings) -> None:
    data = load_spec("examples/delivery.yaml").model_dump(mode="json", by_alias=True)
    mean = {"name": "delivery-mean", "estimator": {"class": "river.dummy.StatisticRegressor",
            "params": {"statistic": {"class": "river.stats.Mean"}}}}  # fmt: skip
    data["models"]["candidates"] = [mean, data["models"]["candidates"][0]]
    data["models"]["champion"] = "delivery-mean"
    data["monitors"] = {"promote": {"min_labels": 300}, "challengers": {"on_drift": False}}
    spec = parse_spec(data)
    no_drift = DeliveryStreamConfig(drift_at=())
    rt = run(spec, Settings(label_wait_s=0.0, snapshot_every_labels=500),
             delivery_with_labels(3_000, no_drift))  # fmt: skip
    events = decoded(rt, rt.topics.model_events, ModelEvent)
    promoted = [e for e in events if e.kind == "promote"]
    assert [e.model for e in promoted] == ["delivery-linear"]
    evidence = promoted[0].evidence or {}
    assert evidence["e_value"] >= 1 / evidence["alpha"]
    assert evidence["challenger_lower_error"] > evidence["champion_lower_error"]
    # the scorers serve it from then on
    assert decoded(rt, rt.topics.predictions, Prediction)[-1].model == "delivery-linear"


def test_a_replayed_order_gets_the_value_served_first(settings: Settings) -> None:
    spec = load_spec("examples/delivery.yaml")
    records = list(history("delivery", 600, seed=3))
    rt = run(spec, settings, records)
    first = {p.event_id: p for p in decoded(rt, rt.topics.predictions, Prediction)}
    # the same orders again, after the models learned from 600 labels
    for kind, rec in records[:200]:
        if kind == "event":
            rt.produce(rt.topics.events, rec["restaurant_id"].encode(), orjson.dumps(rec))
    rt.drain()
    again = decoded(rt, rt.topics.predictions, Prediction)[len(first) :]
    assert again and all(p.replayed for p in again)
    assert all(p.value == first[p.event_id].value for p in again)


@pytest.mark.parametrize(
    "evaluation",
    [
        {"label": "late", "predictions": {"delivery-linear": {"version": 1, "value": 30.0}}},
        {"label": True, "predictions": {"delivery-linear": {"version": 1, "value": 30.0}}},
        {"label": 31.5, "predictions": {"delivery-linear": {"version": 1, "probability": 0.4}}},
    ],
)
def test_the_monitor_refuses_an_evaluation_that_is_not_of_the_target(
    settings: Settings, evaluation: dict[str, Any]
) -> None:
    spec = load_spec("examples/delivery.yaml")
    rt = EmbeddedRuntime(spec, settings)
    record = {"event_id": "x", "labels_seen": 1, "served": None, **evaluation}
    rt.produce(rt.topics.evaluations, b"x", orjson.dumps(record))
    rt.drain()
    letters = decoded(rt, rt.topics.dlq, DeadLetter)
    assert [(d.stage, d.error_kind) for d in letters] == [("monitor", "bad_record")]
    assert rt.monitor.core.labels == 0
