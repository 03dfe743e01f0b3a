"""The embedded store: every aggregation equals a brute-force recount; replays never
double count; the read path returns what the next event would build on."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from riverflow.features.store import FeatureRequest, MemoryFeatureStore
from riverflow.spec import PipelineSpec
from riverflow.tools.generator import FraudStreamConfig, transactions
from tests.feature_streams import FEATURES, LATENESS_S, PLAN, event_streams, requests, run_batches
from tests.helpers import (
    assert_aggregations_match,
    assert_features_match,
    brute_force_features,
    check_labels_are_claimed_once,
    check_the_first_served_prediction_is_kept,
)


def fraud_requests(spec: PipelineSpec, n: int, **config: object) -> list[FeatureRequest]:
    out = []
    for event, _ in transactions(n, FraudStreamConfig(**config)):  # type: ignore[arg-type]
        out.append(
            FeatureRequest(
                event["event_id"], event["ts"], {"card_id": event["card_id"]},
                {"amount": event["amount"]}, orjson.dumps({"amount": event["amount"]}),
            )
        )  # fmt: skip
    return out


def test_windows_equal_brute_force(fraud_spec: PipelineSpec) -> None:
    # few cards and a short gap: windows hold many events and buckets roll over
    config = {"cards": 20, "mean_gap_s": 30.0}
    events = [e for e, _ in transactions(3000, FraudStreamConfig(**config))]  # type: ignore[arg-type]
    plan = fraud_spec.feature_plan()
    store = MemoryFeatureStore(plan)
    snaps = run_batches(store, fraud_requests(fraud_spec, 3000, **config), 250)
    expected = brute_force_features(events, fraud_spec.features, "card_id", "ts")
    assert max(s.aggregates[0][0] for s in snaps) > 5  # the test exercises real windows
    for snap in snaps:
        assert_features_match(plan.values(snap.aggregates), expected[snap.event_id])


@settings(max_examples=300, deadline=None)
@given(events=event_streams(), batch=st.integers(1, 25))
def test_every_aggregation_equals_brute_force(events: list[dict[str, Any]], batch: int) -> None:
    snaps = run_batches(MemoryFeatureStore(PLAN), requests(events), batch)
    expected = brute_force_features(events, FEATURES, "card_id", "ts", LATENESS_S)
    for snap in snaps:
        assert_aggregations_match(PLAN.values(snap.aggregates), expected[snap.event_id], FEATURES)


def test_out_of_order_events_within_lateness_count_and_later_ones_do_not() -> None:
    events = [
        {"event_id": "a", "card_id": "c", "merchant": "m", "amount": 1.0, "ts": 10_000.0},
        {"event_id": "b", "card_id": "c", "merchant": "m", "amount": 2.0, "ts": 9_500.0},
        {"event_id": "c", "card_id": "c", "merchant": "m", "amount": 4.0, "ts": 9_000.0},
        {"event_id": "d", "card_id": "c", "merchant": "m", "amount": 8.0, "ts": 10_001.0},
    ]
    snaps = MemoryFeatureStore(PLAN).update_and_read(requests(events))
    late = [s.late for s in snaps]
    assert late == [False, False, True, False]  # 'c' is 1000 s behind, lateness is 600 s
    values = [PLAN.values(s.aggregates) for s in snaps]
    assert [v["sum_10m"] for v in values] == [1.0, 2.0, 3.0, 11.0]  # b sits 500 s back
    assert values[2]["last_10m"] == 1.0  # the late event sees the current window
    assert values[3]["n_7d"] == 3.0


def test_a_replayed_batch_changes_nothing(fraud_spec: PipelineSpec) -> None:
    store = MemoryFeatureStore(fraud_spec.feature_plan())
    reqs = fraud_requests(fraud_spec, 500, cards=10)
    first = store.update_and_read(reqs)

    def state() -> dict[Any, Any]:
        return {
            k: (e.w, {gi: (t.hb, copy.deepcopy(t.tiles)) for gi, t in e.groups.items()})
            for k, e in store.entities.items()
        }

    before = state()
    again = store.update_and_read(reqs)
    assert all(s.replayed for s in again)
    assert [s.aggregates for s in again] == [s.aggregates for s in first]
    assert state() == before


def test_the_read_path_returns_the_current_values() -> None:
    store = MemoryFeatureStore(PLAN)
    events = [
        {"event_id": "a", "card_id": "c1", "merchant": "m1", "amount": 3.0, "ts": 1000.0},
        {"event_id": "b", "card_id": "c1", "merchant": "m2", "amount": 5.0, "ts": 1010.0},
    ]
    store.update_and_read(requests(events))
    now = store.read({"card_id": "c1"})
    assert now["n_10m"] == 2 and now["sum_10m"] == 8.0 and now["last_10m"] == 5.0
    assert now["since_1h"] == 0.0 and now["merchants_24h"] == 2
    assert "z_24h" not in now and "merchant_n_1h" not in now  # needs an event / an entity
    later = store.read({"card_id": "c1", "merchant": "m1"}, at=1010.0 + 86_400)
    assert later["n_10m"] == 0 and later["n_7d"] == 2 and later["merchant_n_1h"] == 0
    assert store.read({"card_id": "nobody"}) == {}


def test_each_label_is_claimed_once(fraud_spec: PipelineSpec) -> None:
    check_labels_are_claimed_once(MemoryFeatureStore(fraud_spec.feature_plan()))


def test_the_first_served_prediction_is_kept(fraud_spec: PipelineSpec) -> None:
    check_the_first_served_prediction_is_kept(
        MemoryFeatureStore(fraud_spec.feature_plan()), fraud_requests(fraud_spec, 3)
    )
