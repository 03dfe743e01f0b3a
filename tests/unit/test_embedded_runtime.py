"""The embedded runtime: predictions, DLQ, delayed labels, exactly-once learning."""

from __future__ import annotations

import base64

import orjson

from models.registry import ChampionPointer
from riverflow.embedded import EmbeddedRuntime
from riverflow.generator import BAD_KINDS, FraudStreamConfig, corrupt, transactions, with_labels
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from streams.contracts import DeadLetter, Evaluation, Prediction


def run(spec: PipelineSpec, settings: Settings, n: int, bad_every: int = 0) -> EmbeddedRuntime:
    rt = EmbeddedRuntime(spec, settings)
    produced = 0
    for kind, rec in with_labels(n, FraudStreamConfig(drift_at=(n // 2,))):
        if kind == "event":
            produced += 1
            value = orjson.dumps(rec)
            if bad_every and produced % bad_every == 0:
                value = corrupt(rec, BAD_KINDS[(produced // bad_every) % len(BAD_KINDS)])
            rt.produce(rt.topics.events, rec["card_id"].encode(), value)
        else:
            rt.produce(rt.topics.labels, rec["event_id"].encode(), orjson.dumps(rec))
        if produced % 300 == 0:
            rt.step()
    rt.drain()
    return rt


def test_one_prediction_per_valid_event_and_bad_ones_in_dlq(
    fraud_spec: PipelineSpec, settings: Settings
) -> None:
    rt = run(fraud_spec, settings, 3000, bad_every=100)
    predictions = [Prediction.model_validate_json(v) for _, v in rt.messages(rt.topics.predictions)]
    ids = [p.event_id for p in predictions]
    assert len(ids) == len(set(ids)) == 3000 - 30
    letters = [DeadLetter.model_validate_json(v) for _, v in rt.messages(rt.topics.dlq)]
    scorer_letters = [d for d in letters if d.stage == "scorer"]
    assert {d.error_kind for d in scorer_letters} == set(BAD_KINDS)
    assert len(scorer_letters) == 30
    # the DLQ keeps the original bytes and where they came from
    first = scorer_letters[0]
    original = rt.messages(rt.topics.events)[first.offset][1]
    assert base64.b64decode(first.payload_b64 or "") == original
    # the 30 labels of refused events never find a snapshot: orphans after label_wait_s=0
    orphans = [d for d in letters if d.stage == "learner"]
    assert len(orphans) == 30 and {d.error_kind for d in orphans} == {"orphan_label"}


def test_every_label_is_learned_exactly_once(fraud_spec: PipelineSpec, settings: Settings) -> None:
    rt = run(fraud_spec, settings, 2000)
    # the same labels again (a replayed topic) are not learned twice
    for key, value in list(rt.messages(rt.topics.labels))[:500]:
        rt.produce(rt.topics.labels, key, value)
    rt.drain()
    evaluations = [Evaluation.model_validate_json(v) for _, v in rt.messages(rt.topics.evaluations)]
    assert sorted(e.event_id for e in evaluations) == sorted(
        orjson.loads(v)["event_id"] for _, v in rt.messages(rt.topics.events)
    )
    assert rt.learner.learned == 2000 and rt.learner.duplicates == 500
    assert rt.learner.metrics.count == 2000


def test_the_scorer_follows_the_models_the_learner_publishes(
    fraud_spec: PipelineSpec,
) -> None:
    rt = run(fraud_spec, Settings(snapshot_every_labels=500, model_poll_s=1e-6), 3000)
    versions = [
        Prediction.model_validate_json(v).version for _, v in rt.messages(rt.topics.predictions)
    ]
    assert versions[0] == 0  # a fresh model until the first snapshot
    assert versions == sorted(versions) and versions[-1] >= 4
    name = fraud_spec.models.champion_spec.name
    assert rt.registry.champion() == ChampionPointer(name, rt.learner.version)
    assert rt.learner.version == 6
    assert {
        p.model
        for p in map(
            Prediction.model_validate_json, (v for _, v in rt.messages(rt.topics.predictions))
        )
    } == {name}


def test_the_model_learns_the_fraud_pattern(fraud_spec: PipelineSpec, settings: Settings) -> None:
    rt = run(fraud_spec, settings, 6000)
    assert rt.learner.metrics.as_dict()["roc_auc"] > 0.8


def test_runs_are_deterministic(fraud_spec: PipelineSpec) -> None:
    def probabilities() -> list[tuple[str, float, int]]:
        rt = run(fraud_spec, Settings(snapshot_every_labels=400, model_poll_s=1e-6), 2000)
        preds = [Prediction.model_validate_json(v) for _, v in rt.messages(rt.topics.predictions)]
        return [(p.event_id, p.probability, p.version) for p in preds]

    assert probabilities() == probabilities()


def test_a_label_before_its_event_waits_then_is_learned(fraud_spec: PipelineSpec) -> None:
    rt = EmbeddedRuntime(fraud_spec, Settings(label_wait_s=60))
    events = [rec for kind, rec in with_labels(10, FraudStreamConfig()) if kind == "event"]
    label = {"event_id": events[0]["event_id"], "is_fraud": True}
    rt.produce(rt.topics.labels, None, orjson.dumps(label))
    rt.drain()
    assert rt.learner.learned == 0 and list(rt.learner.pending) == [label["event_id"]]
    assert rt.messages(rt.topics.dlq) == []
    rt.produce(rt.topics.events, None, orjson.dumps(events[0]))
    rt.drain()
    assert rt.learner.learned == 1 and not rt.learner.pending
    evaluation = Evaluation.model_validate_json(rt.messages(rt.topics.evaluations)[0][1])
    assert evaluation.event_id == label["event_id"] and evaluation.label is True


def test_predictions_explain_themselves_when_the_spec_asks(fraud_spec: PipelineSpec) -> None:
    data = fraud_spec.model_dump(by_alias=True)
    data["models"]["explain"] = 2
    data["models"]["champion"] = "fraud-logreg"
    spec = PipelineSpec.model_validate(data)
    rt = run(spec, Settings(snapshot_every_labels=500, model_poll_s=1e-6), 1500)
    last = Prediction.model_validate_json(rt.messages(rt.topics.predictions)[-1][1])
    assert last.model == "fraud-logreg" and last.version >= 1
    terms = last.explanation or []
    assert len(terms) == 2 and abs(terms[0]["contribution"]) >= abs(terms[1]["contribution"])
    assert {t["feature"] for t in terms} <= {"amount", "tx_count_1h", "amount_sum_1h",
                                              "amount_mean_24h"}  # fmt: skip
    assert terms[0]["weight"] * terms[0]["value"] == terms[0]["contribution"]


def test_tree_explanations_are_its_decision_path() -> None:
    from river import tree

    from models.explain import explain

    model = tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-3)
    for event, fraud in transactions(6000, FraudStreamConfig()):
        model.learn_one({"amount": event["amount"], "category": event["category"]}, fraud)
    path = explain(model, {"amount": 10.0, "category": "grocery"}, 5) or []
    assert path and "amount" in path[0]["rule"]
