"""The delivery-time example (a regression pipeline, ``examples/delivery.yaml``) end
to end on the real broker and Redis: scorer, learner and monitor as processes,
predictions that are numbers, evaluations that carry each candidate's absolute
error, the monitor's MAE, RMSE and R² on /metrics, and a label that is no number
in the DLQ naming its field."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest
import yaml

from riverflow.spec import PipelineSpec, shipped_example
from riverflow.streams.contracts import DeadLetter, Evaluation, Prediction
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.generator import history
from riverflow.tools.stack import Endpoints
from tests.integration.conftest import StageFactory, collect
from tests.integration.test_monitor_stage import wait_for

N = 1_500


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """The delivery spec under a unique name: its own topics and Redis keys."""
    example = shipped_example("delivery")
    assert example is not None
    data = yaml.safe_load(example.read_text())
    data["name"] = f"it-{uuid.uuid4().hex[:10]}"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_delivery_example_runs_end_to_end(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory
) -> None:
    t = spec.topics
    ensure_topics(stack.kafka_bootstrap, t.all(), partitions=1, replication=1)
    start_stage("scorer")
    start_stage("learner", snapshot_every_labels=500, label_wait_s=2)
    monitor = start_stage("monitor")
    records = [(t.events if kind == "event" else t.labels,
                str(r["restaurant_id"] if kind == "event" else r["event_id"]).encode(),
                orjson.dumps(r)) for kind, r in history("delivery", N, seed=7)]  # fmt: skip
    bad = b'{"event_id": "d7-00000003", "delivery_minutes": "late"}'
    produce_all(producer(stack.kafka_bootstrap), [*records, (t.labels, b"bad", bad)])

    predictions = [Prediction.decode(m.value()) for m in
                   collect(stack.kafka_bootstrap, t.predictions, N, settle_s=0.5)]  # fmt: skip
    assert len({p.event_id for p in predictions}) == N
    assert all(p.probability is None and type(p.value) is float for p in predictions)

    evaluations = [Evaluation.decode(m.value()) for m in
                   collect(stack.kafka_bootstrap, t.evaluations, N, settle_s=0.5)]  # fmt: skip
    assert len({e.event_id for e in evaluations}) == N
    for e in evaluations:
        # the spec's candidates, and any fresh challenger the drift halfway started
        assert {"delivery-linear", "delivery-tree"} <= set(e.predictions)
        assert all(n.startswith(("delivery-linear", "delivery-tree")) for n in e.predictions)
        for p in e.predictions.values():
            assert isinstance(e.label, float) and p.value is not None
            assert p.error == pytest.approx(abs(e.label - p.value))

    letters = [DeadLetter.decode(m.value()) for m in collect(stack.kafka_bootstrap, t.dlq, 1)]
    assert [(d.stage, d.error_kind) for d in letters] == [("learner", "wrong_type")]
    assert "delivery_minutes" in letters[0].error

    def labels() -> float:
        try:
            return monitor.metric("riverflow_stage_status", stage="monitor", name="labels")
        except (AssertionError, OSError):
            return 0.0

    wait_for("the monitor to see every label", lambda: labels() >= N, 60)
    quality = {
        metric: monitor.metric("riverflow_model_quality", model="delivery-linear", metric=metric)
        for metric in ("mae", "rmse", "r2")
    }
    assert 0 < quality["mae"] < quality["rmse"] < 15
    assert 0 < quality["r2"] <= 1
