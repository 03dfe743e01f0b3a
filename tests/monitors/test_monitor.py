"""The monitor stage on the embedded runtime: drift, fresh challengers, promotion, rollback."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import numpy as np
import orjson
import pytest
from scipy import stats

from riverflow.embedded import EmbeddedRuntime
from riverflow.models.registry import MemoryRegistry
from riverflow.monitors.distribution import DistributionMonitor, KsTests
from riverflow.monitors.policy import PipelineMonitor
from riverflow.monitors.quality import WindowedQuality
from riverflow.monitors.spec import LabelFreeSpec, MonitorSpec
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, SpecError, parse_spec
from riverflow.streams.contracts import DeadLetter, Evaluation, Message, ModelEvent, Prediction
from riverflow.tools.generator import FraudStreamConfig, with_labels

FLIP_START, FLIP_END = 3000, 3600


def run(spec: PipelineSpec, n: int, config: FraudStreamConfig) -> EmbeddedRuntime:
    # every version kept: the tests read the metadata of each one that served
    settings = Settings(label_wait_s=0.0, snapshot_every_labels=500, registry_keep_versions=10**6)
    rt = EmbeddedRuntime(spec, settings)
    produced = 0
    for kind, rec in with_labels(n, config):
        if kind == "event":
            produced += 1
            rt.produce(rt.topics.events, rec["card_id"].encode(), orjson.dumps(rec))
            if produced % 500 == 0:
                rt.step()
        else:
            rt.produce(rt.topics.labels, rec["event_id"].encode(), orjson.dumps(rec))
    rt.drain()
    return rt


def events(rt: EmbeddedRuntime) -> list[ModelEvent]:
    return [ModelEvent.decode(v) for _, v in rt.messages(rt.topics.model_events)]


@pytest.fixture(scope="module")
def flipped(fraud_spec: PipelineSpec) -> EmbeddedRuntime:
    """6,000 events; the labels of events 3,000-3,599 are flipped (a bad labelling job)."""
    return run(fraud_spec, 6000, FraudStreamConfig(drift_at=(), flipped_labels=(3000, 3600)))


@pytest.fixture(scope="module")
def drifting(fraud_spec: PipelineSpec) -> EmbeddedRuntime:
    """12,000 events; the fraud pattern switches at event 6,000."""
    return run(fraud_spec, 12000, FraudStreamConfig(drift_at=(6000,)))


def test_a_corrupted_label_burst_is_never_answered_by_a_worse_model(
    flipped: EmbeddedRuntime,
) -> None:
    """The labels are all the monitor knows: during the burst no earlier version does
    better on them, so none is rolled back to; a rollback, if any, names a target
    that beat the champion on the recent labels. Served quality is back over the
    last 1,000 events (1,400 after the burst's end)."""
    rt = flipped
    for e in events(rt):
        if e.kind == "rollback" and e.by == "monitor":
            ev = e.evidence or {}
            assert ev["target_only_right"] > ev["champion_only_right"]
            assert ev["sign_test_p"] < ev["alpha"]
            assert ev["target_window_accuracy"] > ev["champion_window_accuracy"]
    raw = (v for _, v in rt.messages(rt.topics.predictions))
    served = [p for p in map(Prediction.decode, raw)]
    truth = {e.event_id: e.label for e in map(Evaluation.decode, (v for _, v in
             rt.messages(rt.topics.evaluations)))}  # fmt: skip
    after = [(p.probability >= 0.5) == truth[p.event_id] for p in served[-1000:]
             if p.event_id in truth]  # fmt: skip
    assert len(after) > 900 and sum(after) / len(after) > 0.95


def test_no_prediction_is_served_by_a_model_that_is_not_ready(
    flipped: EmbeddedRuntime, drifting: EmbeddedRuntime, fraud_spec: PipelineSpec
) -> None:
    min_labels = fraud_spec.monitors.promote.min_labels
    for rt in (flipped, drifting):
        raw = (v for _, v in rt.messages(rt.topics.predictions))
        served = {(p.model, p.version) for p in map(Prediction.decode, raw)}
        for model, version in served:
            if version == 0:  # the spec's champion, fresh, before the first snapshot
                assert model == fraud_spec.models.champion_spec.name
                continue
            trained = rt.registry.meta(model, version)["metrics"]["labels"]
            assert trained > 0
            if model not in {c.name for c in fraud_spec.models.candidates}:
                assert trained >= min_labels, f"{model} v{version} served after {trained} labels"


def test_drift_alarm_starts_a_fresh_challenger_that_learns(drifting: EmbeddedRuntime) -> None:
    rt = drifting
    log = events(rt)
    champion_at_alarm = None
    drifts = [e for e in log if e.kind == "drift"]
    assert drifts and all(e.evidence and e.evidence["detector"] == "adwin" for e in drifts)
    challengers = [e for e in log if e.kind == "challenger"]
    assert challengers, "no fresh challenger after the drift"
    fresh = challengers[0]
    assert fresh.model.endswith(".r1") and fresh.evidence is not None
    champion_at_alarm = fresh.evidence["base"]
    assert fresh.model.startswith(str(champion_at_alarm))
    marker = next(m for m in rt.monitor.history.markers if m.kind == "challenger")
    assert marker.labels > 6000, "started before the drift"
    assert any(e.kind == "started" and e.model == fresh.model for e in log)  # by the learner
    evaluations = [Evaluation.decode(v) for _, v in rt.messages(rt.topics.evaluations)]
    trained = [e for e in evaluations if fresh.model in e.predictions]
    assert len(trained) > 1000
    # the fresh one is a new model: its first predictions carry no published version yet
    assert trained[0].predictions[fresh.model].version == 0


def test_promotions_carry_significant_evidence_and_respect_the_cooldown(
    drifting: EmbeddedRuntime, flipped: EmbeddedRuntime, fraud_spec: PipelineSpec
) -> None:
    policy = fraud_spec.monitors
    for rt in (drifting, flipped):
        promotions = [e for e in events(rt) if e.kind == "promote" and e.by == "monitor"]
        for p in promotions:
            ev = p.evidence or {}
            assert ev["warmup"] == policy.promote.min_labels
            assert ev["e_value"] >= 1 / policy.promote.alpha
            assert ev["challenger_only_right"] > ev["champion_only_right"]
        markers = rt.monitor.history.markers
        decided = [m for m in markers if m.kind in ("promote", "rollback")]
        for a, b in itertools.pairwise(decided):  # a rollback may come sooner
            assert b.labels - a.labels >= (policy.cooldown if b.kind == "promote"
                                           else policy.rollback.window)  # fmt: skip
    assert any(e.kind == "promote" for e in events(drifting))


def test_the_scorers_follow_the_monitors_decisions(drifting: EmbeddedRuntime) -> None:
    rt = drifting
    predictions = [Prediction.decode(v) for _, v in rt.messages(rt.topics.predictions)]
    moves = [e for e in events(rt) if e.kind in ("promote", "rollback") and e.by == "monitor"]
    assert moves
    served = [(p.model, p.version) for p in predictions]
    for move in moves[:-1]:  # the last may come after the last event was scored
        assert (move.model, move.version) in served
    rt.scorer.champion.refresh(force=True)  # what its next poll does
    pointer = rt.registry.champion()
    assert pointer is not None
    assert (rt.scorer.champion.name, rt.scorer.champion.version) == (pointer.model, pointer.version)


def test_the_view_shows_champion_challengers_series_and_markers(drifting: EmbeddedRuntime) -> None:
    view = drifting.monitor.view()
    pointer = drifting.registry.champion()
    assert pointer is not None and view.champion == {"model": pointer.model,
                                                      "version": pointer.version}  # fmt: skip
    roles = {c.name: c.role for c in view.candidates}
    assert roles[pointer.model] == "champion" and list(roles.values()).count("champion") == 1
    assert all(len(view.series[c.name]) > 10 for c in view.candidates)
    assert {"drift", "challenger", "promote"} <= {m.kind for m in view.markers}
    for c in view.candidates:
        assert set(c.metrics) >= {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"}
    assert "score" in view.distributions and view.anomaly["scored"] > 0


def test_segments_are_reported_without_the_models_seeing_the_field(
    fraud_spec: PipelineSpec,
) -> None:
    data = fraud_spec.model_dump(mode="json", by_alias=True)
    segmented = parse_spec({**data, "monitors": {"segment": "merchant"}})
    config = FraudStreamConfig(drift_at=())
    a, b = run(fraud_spec, 1500, config), run(segmented, 1500, config)
    probs = [[orjson.loads(v)["probability"] for _, v in rt.messages(rt.topics.predictions)]
             for rt in (a, b)]  # fmt: skip
    assert probs[0] == probs[1]  # merchant is not a model input: the models never saw it
    view = b.monitor.view()
    assert view.segments is not None and view.segments.field == "merchant"
    assert sum(v["n"] for v in view.segments.by.values()) == 1500
    evaluations = [Evaluation.decode(v) for _, v in b.messages(b.topics.evaluations)]
    # the example marks merchant personal: segments are its tokens, never the raw ids
    pii = b.scorer.pii
    assert pii is not None
    assert {e.segment for e in evaluations} <= {pii.token(f"m{i:04d}") for i in range(340)}


def test_windowed_metrics_equal_rivers_rolling_metrics_and_exact_roc_auc() -> None:
    from river import metrics, utils

    rng = random.Random(11)
    quality = WindowedQuality(300)
    river = {name: utils.Rolling(cls, window_size=300) for name, cls in (
        ("accuracy", metrics.Accuracy), ("precision", metrics.Precision),
        ("recall", metrics.Recall), ("f1", metrics.F1), ("log_loss", metrics.LogLoss))}  # fmt: skip
    events = []
    for _ in range(2_000):
        label = rng.random() < 0.2
        p = round(min(1.0, max(0.0, rng.gauss(0.6 if label else 0.35, 0.2))), 2)  # ties
        events.append((label, p))
        quality.update(label, p)
        for name, metric in river.items():
            metric.update(label, {True: p, False: 1 - p} if name == "log_loss" else p >= 0.5)
    ours = quality.as_dict()
    for name, metric in river.items():
        assert math.isclose(ours[name], metric.get(), rel_tol=1e-9), name
    window = events[-300:]
    pos = [p for y, p in window if y]
    neg = [p for y, p in window if not y]
    pairs = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    assert math.isclose(ours["roc_auc"], pairs / (len(pos) * len(neg)), rel_tol=1e-12)


def test_stale_challengers_are_retired_and_the_cap_holds(fraud_spec: PipelineSpec) -> None:
    spec = MonitorSpec(challengers={"patience": 100, "max": 1}, cooldown=0)
    registry = MemoryRegistry(b"k" * 32)
    monitor = PipelineMonitor("fraud", spec, registry, "fraud-hoeffding")
    registry.start_challenger("fraud-hoeffding.r1", "fraud-hoeffding", "test")
    monitor.refresh()
    for i in range(150):
        both = {"fraud-hoeffding": (1, 0.9), "fraud-hoeffding.r1": (0, 0.9)}
        monitor.on_evaluation(i % 2 == 0, both)
    decisions = monitor.refresh()
    assert [(d.kind, d.model) for d in decisions] == [("retire", "fraud-hoeffding.r1")]
    assert registry.challengers() == {}


def test_label_free_drift_fires_on_a_shift_and_not_on_a_stationary_stream() -> None:
    rng = random.Random(5)
    spec = LabelFreeSpec(anomaly=False)
    steady = DistributionMonitor(spec)
    alarms = sum(len(steady.update({"x": rng.gauss(0, 1)}, rng.random())) for _ in range(50_000))
    assert alarms == 0
    shifting = DistributionMonitor(spec)
    fired: list[int] = []
    for i in range(6_000):
        x = rng.gauss(0 if i < 3_000 else 0.5, 1)
        if shifting.update({"x": x}, 0.5):
            fired.append(i)
    assert fired and 3_000 < fired[0] <= 4_000


def test_label_free_ks_tests_give_scipys_statistic_and_p_value_every_time() -> None:
    rng = random.Random(8)
    ks = KsTests()
    pairs = 0
    for i in range(600):
        # two window sizes; samples shifted apart little by little (small to tiny
        # p-values); values rounded so that some repeat (ties)
        n1, n2 = (200, 100) if i % 3 else (120, 90)
        reference = [round(rng.gauss(0, 1), 1) for _ in range(n1)]
        recent = [round(rng.gauss(i / 600, 1), 1) for _ in range(n2)]
        result = stats.ks_2samp(reference, recent)
        ordered = np.sort(np.asarray(reference))
        assert ks(ordered, recent) == (float(result.statistic), float(result.pvalue))
        pairs += 1
    assert len(ks.results) < pairs / 3  # most were remembered, not computed again


def test_a_bad_record_goes_to_the_dlq_and_the_rest_is_read(fraud_spec: PipelineSpec) -> None:
    rt = EmbeddedRuntime(fraud_spec, Settings())
    t = rt.topics
    prediction = {"fraud-hoeffding": {"version": 0, "probability": 0.7}}
    good = {"event_id": "e1", "label": True, "labels_seen": 1, "predictions": prediction}
    batch = [
        Message(t.evaluations, 0, 0, b"e0", b"{not json"),
        Message(t.evaluations, 0, 1, b"e1", orjson.dumps(good)),
        Message(t.predictions, 0, 0, b"c1", orjson.dumps({"event_id": "e1"})),
    ]
    out = rt.monitor.process(batch)
    letters = [DeadLetter.decode(o.value) for o in out if o.topic == t.dlq]
    assert [(d.offset, d.error_kind) for d in letters] == [(0, "bad_record"), (0, "bad_record")]
    assert "predictions" in letters[1].error and "entity" in letters[1].error
    assert rt.monitor.core.labels == 1


@pytest.mark.parametrize(
    ("monitors", "message"),
    [
        ({"detector": {"kind": "adwin", "params": {"nope": 1}}}, "detector"),
        ({"detector": {"kind": "magic"}}, "monitors.detector.kind"),
        ({"segment": "planet"}, "monitors.segment: 'planet' is not an event field"),
        ({"rollback": {"window": 5000}}, "rollback.window"),
    ],
)
def test_broken_monitor_specs_are_refused_naming_the_field(
    fraud_spec: PipelineSpec, monitors: dict[str, Any], message: str
) -> None:
    data = fraud_spec.model_dump(mode="json", by_alias=True)
    with pytest.raises(SpecError, match=message):
        parse_spec({**data, "monitors": monitors})
