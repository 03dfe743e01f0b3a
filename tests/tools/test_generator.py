"""The synthetic stream is reproducible and its fraud pattern drifts where configured."""

from __future__ import annotations

from typing import Any

from riverflow.tools.generator import (
    DeliveryStreamConfig,
    FraudStreamConfig,
    concept_at,
    deliveries,
    history,
    stream_for,
    transactions,
    with_labels,
)


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


def test_the_delivery_stream_is_seeded_and_its_rides_slow_down_at_the_drift_point() -> None:
    config = DeliveryStreamConfig(seed=4, drift_at=(3000,))
    orders = list(deliveries(6000, config))
    assert orders == list(deliveries(6000, DeliveryStreamConfig(seed=4, drift_at=(3000,))))
    assert orders != list(deliveries(6000, DeliveryStreamConfig(seed=5, drift_at=(3000,))))

    def minutes_per_km(part: list[tuple[dict[str, Any], float]]) -> float:
        far = [m for e, m in part if e["distance_km"] > 3]
        near = [m for e, m in part if e["distance_km"] < 1]
        return (sum(far) / len(far) - sum(near) / len(near)) / 3

    before, after = minutes_per_km(orders[:3000]), minutes_per_km(orders[3000:])
    assert after > 1.5 * before > 0


def test_the_stream_that_fits_a_spec_is_chosen_by_its_label_field() -> None:
    assert stream_for("delivery_minutes") == "delivery"
    assert stream_for("is_fraud") == stream_for("anything") == "fraud"
    assert stream_for("is_fraud", "delivery") == "delivery"
    kinds = [kind for kind, _ in history("delivery", 300, seed=1)]
    assert kinds.count("event") == kinds.count("label") == 300
