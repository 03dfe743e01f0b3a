"""The field-dropping scenario on the real broker and Redis: an upstream producer stops
sending the amount for a while. The scorer's missing-rate series (the one
RiverflowFieldMissing alerts on) rises and falls back, a schema change is reported
each way, imputation keeps every prediction flowing and nothing goes to the DLQ."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import yaml

from riverflow.streams.contracts import ModelEvent, Prediction
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.generator import FraudStreamConfig, dropping, with_labels
from riverflow.tools.stack import Endpoints
from tests.integration.conftest import StageFactory, collect

N, DROP, WINDOW = 1600, (400, 900), 100
MISSING = {"field": "amount", "measure": "missing_rate"}


def settles(check: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    """Whether ``check`` holds within the timeout (a stage's gauges follow its batches)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_dropped_field_raises_the_missing_rate_and_imputation_keeps_predictions_flowing(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory
) -> None:
    data = yaml.safe_load(spec_file.read_text())
    assert "amount" in data["clean"], "the fraud example imputes the amount"
    data["monitors"] = {"quality": {"window": WINDOW}}
    spec_file.write_text(yaml.safe_dump(data))
    name = data["name"]
    topics = [f"{name}.{t}" for t in ("events", "labels", "predictions", "evaluations",
                                       "dlq", "model-events")]  # fmt: skip
    ensure_topics(stack.kafka_bootstrap, topics, partitions=1)
    scorer = start_stage("scorer", partitions=1, model_poll_s=0.05)
    start_stage("learner", partitions=1, snapshot_every_labels=200)

    config = FraudStreamConfig(drift_at=(), label_delay=20)
    records = [
        (f"{name}.events" if kind == "event" else f"{name}.labels",
         rec.get("card_id", rec["event_id"]).encode(), orjson.dumps(rec))
        for kind, rec in dropping(with_labels(N, config), ("amount", *DROP))
    ]  # fmt: skip
    events_before = [r for r in records if r[0].endswith(".events")][: DROP[0] + 3 * WINDOW]
    cut = records.index(events_before[-1]) + 1
    out = producer(stack.kafka_bootstrap)

    # in the middle of the drop: the last complete windows had no amount at all
    produce_all(out, records[:cut])
    collect(stack.kafka_bootstrap, f"{name}.predictions", len(events_before), settle_s=0)
    assert settles(lambda: scorer.metric("riverflow_field_quality", **MISSING) == 1.0)

    produce_all(out, records[cut:])
    predictions = [Prediction.decode(m.value()) for m in
                   collect(stack.kafka_bootstrap, f"{name}.predictions", N)]  # fmt: skip
    assert len({p.event_id for p in predictions}) == N == len(predictions)
    imputed = [p for p in predictions if p.cleaned.get("amount") == "impute"]
    assert len(imputed) == DROP[1] - DROP[0]
    assert all(p.inputs["amount"] is None for p in imputed)
    assert not collect(stack.kafka_bootstrap, f"{name}.dlq", 0, timeout_s=5, settle_s=1)

    # after it: the series falls back, the counters and the schema changes say what was
    assert settles(lambda: scorer.metric("riverflow_field_quality", **MISSING) == 0.0)
    cleaned = scorer.metric("riverflow_cleaned_values", field="amount", rule="impute")
    assert cleaned == DROP[1] - DROP[0]
    assert scorer.metric("riverflow_event_freshness_seconds", partition="0") > 0
    events = [ModelEvent.decode(m.value()) for m in
              collect(stack.kafka_bootstrap, f"{name}.model-events", 2, settle_s=1)]  # fmt: skip
    changes = [(e.evidence or {}).get("change") for e in events if e.kind == "schema_change"]
    assert changes == ["missing", "restored"]
    # the learner trained through the gap: every label joined its scored event
    assert len(collect(stack.kafka_bootstrap, f"{name}.evaluations", N)) == N
