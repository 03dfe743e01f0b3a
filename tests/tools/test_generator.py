"""The synthetic stream is reproducible and its fraud pattern drifts where configured."""

from __future__ import annotations

from riverflow.tools.generator import FraudStreamConfig, concept_at, transactions, with_labels


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    a = list(transactions(500, FraudStreamConfig(seed=1)))
    assert a == list(transactions(500, FraudStreamConfig(seed=1)))
    assert a != list(transactions(500, FraudStreamConfig(seed=2)))


def test_fraud_pattern_changes_at_the_drift_point() -> None:
    config = FraudStreamConfig(drift_at=(4000,))
    frauds = [(i, e) for i, (e, fraud) in enumerate(transactions(8000, config)) if fraud]
    before = [e for i, e in frauds if i < 4000]
    after = [e for i, e in frauds if i >= 4000]
    assert len(before) > 30 and len(after) > 30
    assert all(e["channel"] == "online" and e["amount"] > 50 for e in before)
    assert all(e["category"] == "digital" and e["amount"] <= 5 for e in after)
    assert concept_at(3999, config) == 0 and concept_at(4000, config) == 1


def test_each_label_follows_its_event_after_the_delay() -> None:
    config = FraudStreamConfig(label_delay=50)
    arrivals = list(with_labels(300, config))
    position = {(kind, rec["event_id"]): i for i, (kind, rec) in enumerate(arrivals)}
    events = [rec["event_id"] for kind, rec in arrivals if kind == "event"]
    assert len(arrivals) == 600
    for event_id in events:
        assert position[("label", event_id)] > position[("event", event_id)]
    assert position[("label", events[0])] == 51  # right after the 51st event
