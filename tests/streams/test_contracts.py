"""One writer, one reader: every record a run writes reads back with its contract and
encodes to the same bytes."""

from __future__ import annotations

import orjson
import pytest

from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, parse_spec
from riverflow.streams.contracts import (
    DeadLetter,
    Evaluation,
    Message,
    ModelEvent,
    Prediction,
    Record,
)
from riverflow.tools.generator import BAD_KINDS, FraudStreamConfig, corrupt, with_labels


@pytest.fixture(scope="module")
def rt(fraud_spec: PipelineSpec) -> EmbeddedRuntime:
    """Explained predictions and replays, segments, refused events and labels, and a
    corrupted label burst the monitor rolls back: every optional field gets written."""
    data = fraud_spec.model_dump(mode="json", by_alias=True)
    data["models"] = {**data["models"], "explain": 2, "champion": "fraud-logreg"}
    data["monitors"] = {**data["monitors"], "segment": "merchant"}
    spec = parse_spec(data)
    rt = EmbeddedRuntime(spec, Settings(label_wait_s=0.0, snapshot_every_labels=500))
    config = FraudStreamConfig(drift_at=(), flipped_labels=(3000, 3600))
    produced = 0
    for kind, rec in with_labels(6000, config):
        if kind == "label":
            rt.produce(rt.topics.labels, rec["event_id"].encode(), orjson.dumps(rec))
            continue
        produced += 1
        value = orjson.dumps(rec)
        if produced % 97 == 0:
            value = corrupt(rec, BAD_KINDS[produced % len(BAD_KINDS)])
            orphan = {"event_id": f"never-scored-{produced}", "label": True}
            rt.produce(rt.topics.labels, None, orjson.dumps(orphan))
        rt.produce(rt.topics.events, rec["card_id"].encode(), value)
        if produced % 500 == 0:
            rt.step()
    # replays of events served by a version before the current one: not explained
    for key, value in rt.messages(rt.topics.events)[:20]:
        rt.produce(rt.topics.events, key, value)
    rt.drain()
    bad = Message(rt.topics.predictions, 0, 0, b"c1", orjson.dumps({"event_id": "e1"}))
    rt.log.write(rt.monitor.process([bad]))
    return rt


CONTRACTS: list[tuple[str, type[Record]]] = [
    ("predictions", Prediction),
    ("evaluations", Evaluation),
    ("dlq", DeadLetter),
    ("model_events", ModelEvent),
]


@pytest.mark.parametrize(("topic", "contract"), CONTRACTS, ids=[t for t, _ in CONTRACTS])
def test_every_record_written_reads_back_and_encodes_the_same(
    rt: EmbeddedRuntime, topic: str, contract: type[Record]
) -> None:
    written = [value for _, value in rt.messages(getattr(rt.topics, topic))]
    assert written
    for value in written:
        assert contract.decode(value).encode() == value


def test_the_run_wrote_every_optional_field(rt: EmbeddedRuntime) -> None:
    t = rt.topics
    predictions = [orjson.loads(v) for _, v in rt.messages(t.predictions)]
    assert any("explanation" in p for p in predictions)
    assert any("explanation" not in p for p in predictions if p["replayed"])
    evaluations = [orjson.loads(v) for _, v in rt.messages(t.evaluations)]
    assert all("segment" in e for e in evaluations)
    assert {d.stage for d in map(DeadLetter.decode, (v for _, v in rt.messages(t.dlq)))} == {
        "scorer",
        "learner",
        "monitor",
    }
    events = [orjson.loads(v) for _, v in rt.messages(t.model_events)]
    kinds = {(e["kind"], e.get("by")) for e in events}
    assert {("published", None), ("advance", None), ("rollback", "monitor")} <= kinds
    assert any(e["kind"] == "advance" and e["previous"] is None for e in events)
    assert any(e["kind"] == "advance" and e["reason"] == "" for e in events)
    assert all("reason" not in e for e in events if e["kind"] == "published")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id":"e","entity":"c","probability":0.5,"model":"m","version":1,'
        b'"features":{},"event_time":1.5,"scored_at":2.5,"replayed":false}',
        b'{"event_id":"e","entity":"c","probability":0.5,"model":"m","version":1,'
        b'"features":{},"event_time":1.5,"scored_at":2.5,"replayed":false,"explanation":null}',
    ],
    ids=["not asked", "asked, the model cannot say"],
)
def test_an_explanation_is_written_only_when_asked_for(raw: bytes) -> None:
    assert Prediction.decode(raw).encode() == raw
