"""Random streams for the session-window property tests (unit and integration), and
the brute force they are checked against.

Three cards at four merchants; event times whole seconds (their differences are
exact), some events out of order within their grace, some beyond it; amounts
multiples of 0.25 (sums exact in any order). Session groups: 30m gap and 5m grace
on the card, a 10m gap with a 25m grace (several sessions open at once) on the
card, no grace on the merchant, and the card + merchant pair.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from riverflow.features.definitions import FeaturePlan, FeatureSpec, entity_value
from riverflow.features.store import FeatureRequest
from tests.feature_streams import events_of
from tests.feature_streams import requests as stream_requests
from tests.helpers import session_value

# tile lateness far beyond any event's: a snapshot is late only for a session
TILE_LATENESS_S = 10 * 86_400.0
WINDOWS: dict[str, dict[str, Any]] = {
    "s30": {"session": "30m", "grace": "5m"},
    "s10": {"session": "10m", "grace": "25m"},
    "m20": {"session": "20m"},
    "p30": {"session": "30m", "grace": "10m"},
}
ENTITIES: dict[str, Any] = {"s30": None, "s10": None, "m20": "merchant",
                            "p30": ["card_id", "merchant"]}  # fmt: skip
AGGS = ("count", "duration", "sum", "mean", "min", "max")
SESSION_FEATURES = [
    FeatureSpec.model_validate(
        {"name": f"{w}_{agg}", "agg": agg, "window": window, "entity": ENTITIES[w]}
        | ({} if agg in ("count", "duration") else {"field": "amount"})
    )
    for w, window in WINDOWS.items()
    for agg in AGGS
]
FEATURES = [
    FeatureSpec.model_validate({"name": "n_1h", "agg": "count", "window": "1h"}),
    *SESSION_FEATURES,
]
PLAN = FeaturePlan.build(FEATURES, "card_id", TILE_LATENESS_S)

# gaps between event times: bursts, around each session gap, and long pauses
GAPS = [0, 1, 60, 599, 600, 601, 1199, 1200, 1799, 1800, 1801, 3000, 7200]


@st.composite
def session_streams(draw: st.DrawFn, min_size: int = 1, max_size: int = 60) -> list[dict[str, Any]]:
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 2),
                st.integers(0, 3),
                st.integers(-400, 4000),
                st.sampled_from(GAPS),
                st.one_of(st.just(0), st.integers(0, 2400)),
            ),
            min_size=min_size,
            max_size=max_size,
        )
    )
    return events_of(steps)


def requests(events: Sequence[dict[str, Any]], plan: FeaturePlan = PLAN) -> list[FeatureRequest]:
    return stream_requests(events, plan)


def brute_force(
    events: Sequence[dict[str, Any]], plan: FeaturePlan = PLAN
) -> list[tuple[dict[str, float], bool]]:
    """Per event: its session features recomputed from every earlier event of the
    same entity that was not late (``tests.helpers.session_value``), and whether it
    was late for some session."""
    accepted: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    newest: dict[tuple[str, ...], float] = {}
    out = []
    for event in events:
        values: dict[str, float] = {}
        late = False
        for f in plan.features:
            if f.session is None:
                continue
            fields = f.entity_fields("card_id")
            entity = entity_value(fields, event)
            values[f.name], was_late = session_value(
                f, event, accepted[f.name, entity], newest.get((*fields, entity)), "ts"
            )
            late = late or was_late
        for f in plan.features:
            fields = f.entity_fields("card_id")
            at = (*fields, entity_value(fields, event))
            newest[at] = max(newest.get(at, event["ts"]), event["ts"])
        out.append((values, late))
    return out
