"""Random event streams for the feature-store property tests (unit and integration).

Every aggregation over every kind of window (10m, 1h, 24h, 7d), on the card, on
the merchant (another entity's aggregate joined onto a card event) and on the
composite key card + merchant. Amounts are multiples of 0.25, so sums and sums
of squares are exact and count/sum/min/max/last compare exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from hypothesis import strategies as st

from riverflow.features.definitions import Aggregation, FeaturePlan, FeatureSpec
from riverflow.features.store import FeatureRequest, FeatureSnapshot, FeatureStore, feature_request

LATENESS_S = 600.0
START_TS = 1_767_225_600.0
FEATURES = [
    FeatureSpec.model_validate(d)
    for d in [
        {"name": "n_10m", "agg": "count", "window": "10m"},
        {"name": "sum_10m", "agg": "sum", "field": "amount", "window": "10m"},
        {"name": "last_10m", "agg": "last", "field": "amount", "window": "10m"},
        {"name": "mean_1h", "agg": "mean", "field": "amount", "window": "1h"},
        {"name": "std_1h", "agg": "std", "field": "amount", "window": "1h"},
        {"name": "min_1h", "agg": "min", "field": "amount", "window": "1h"},
        {"name": "since_1h", "agg": "since_previous", "window": "1h"},
        {"name": "merchants_1h", "agg": "distinct", "field": "merchant", "window": "1h"},
        {"name": "max_24h", "agg": "max", "field": "amount", "window": "24h"},
        {"name": "z_24h", "agg": "zscore", "field": "amount", "window": "24h"},
        {"name": "merchants_24h", "agg": "distinct_exact", "field": "merchant", "window": "24h"},
        {"name": "n_7d", "agg": "count", "window": "7d", "buckets": 7},
        {"name": "merchant_n_1h", "agg": "count", "window": "1h", "entity": "merchant"},
        {"name": "merchant_sum_1h", "agg": "sum", "field": "amount", "window": "1h",
         "entity": "merchant"},
        {"name": "pair_n_24h", "agg": "count", "window": "24h", "buckets": 24,
         "entity": ["card_id", "merchant"]},
        {"name": "pair_last_24h", "agg": "last", "field": "amount", "window": "24h",
         "buckets": 24, "entity": ["card_id", "merchant"]},
    ]
]  # fmt: skip
PLAN = FeaturePlan.build(FEATURES, "card_id", LATENESS_S)
# without HyperLogLogs: the Redis store computes these in the scorer's process
EXACT_FEATURES = [f for f in FEATURES if f.agg is not Aggregation.DISTINCT]
EXACT_PLAN = FeaturePlan.build(EXACT_FEATURES, "card_id", LATENESS_S)

# gaps between event times: bursts, and jumps that roll every kind of window over
GAPS = [0.0, 0.5, 7.0, 49.0, 301.0, 1799.0, 3600.0, 43_201.0, 200_000.0]


@st.composite
def event_streams(draw: st.DrawFn, min_size: int = 1, max_size: int = 60) -> list[dict[str, Any]]:
    """Events of 3 cards at 4 merchants; some out of order within the lateness, some beyond."""
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 2),
                st.integers(0, 3),
                st.integers(-400, 4000),
                st.sampled_from(GAPS),
                st.one_of(st.just(0.0), st.floats(0.0, 2 * LATENESS_S)),
            ),
            min_size=min_size,
            max_size=max_size,
        )
    )
    return events_of(steps)


def events_of(steps: Sequence[tuple[int, int, int, float, float]]) -> list[dict[str, Any]]:
    """Events from drawn steps: (card, merchant, amount in quarters, gap after the
    previous event, how far behind the clock its time is)."""
    clock = START_TS
    events = []
    for i, (card, merchant, quarters, gap, back) in enumerate(steps):
        clock += gap
        events.append(
            {"event_id": f"e{i}", "card_id": f"c{card}", "merchant": f"m{merchant}",
             "amount": quarters / 4, "ts": round(clock - back, 3)}
        )  # fmt: skip
    return events


def requests(events: Sequence[dict[str, Any]], plan: FeaturePlan = PLAN) -> list[FeatureRequest]:
    return [
        feature_request(plan, e, e["event_id"], e["ts"], orjson.dumps({"amount": e["amount"]}))
        for e in events
    ]


def run_batches(
    store: FeatureStore, reqs: Sequence[FeatureRequest], size: int
) -> list[FeatureSnapshot]:
    out: list[FeatureSnapshot] = []
    for i in range(0, len(reqs), size):
        out += store.update_and_read(reqs[i : i + size])
    return out
