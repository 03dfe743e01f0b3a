"""Random streams for the session-window property tests (unit and integration), and
the brute force they are checked against.

Three cards at four merchants; event times whole seconds (their differences are
exact), some events out of order within their grace, some beyond it; amounts
multiples of 0.25 (sums exact in any order). Session groups: 30m gap and 5m grace
on the card, a 10m gap with a 25m grace (several sessions open at once) on the
card, no grace on the merchant, and the card + merchant pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from hypothesis import strategies as st

from riverflow.features.definitions import FeaturePlan, FeatureSpec
from riverflow.features.store import FeatureRequest, feature_request

START_TS = 1_767_225_600.0
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
def session_streams(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 60
) -> list[dict[str, Any]]:
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
    clock = START_TS
    events = []
    for i, (card, merchant, quarters, gap, back) in enumerate(steps):
        clock += gap
        events.append(
            {"event_id": f"e{i}", "card_id": f"c{card}", "merchant": f"m{merchant}",
             "amount": quarters / 4, "ts": clock - back}
        )  # fmt: skip
    return events


def requests(events: Sequence[dict[str, Any]], plan: FeaturePlan = PLAN) -> list[FeatureRequest]:
    return [
        feature_request(plan, e, e["event_id"], e["ts"], orjson.dumps({"amount": e["amount"]}))
        for e in events
    ]


def brute_force(
    events: Sequence[dict[str, Any]], plan: FeaturePlan = PLAN
) -> list[tuple[dict[str, float], bool]]:
    """Per event: its session features recomputed from every earlier event of the
    same entity that was not late, and whether it was late for some session.

    Late: older than the grace before the newest event of its entity so far.
    A session: events sorted by time, cut where two follow each other by the gap
    or more. An event is scored with the session holding it; a late one with the
    session holding the newest event."""
    out = []
    for i, event in enumerate(events):
        values: dict[str, float] = {}
        late = False
        for f in plan.features:
            window = f.session
            if window is None:
                continue
            fields = f.entity_fields("card_id")
            mine = [e for e in events[: i + 1] if all(e[x] == event[x] for x in fields)]
            accepted = _accepted(mine, window.grace_s)
            if accepted[-1] is mine[-1]:
                at = event["ts"]
            else:
                late = True
                at = max(e["ts"] for e in mine)
            session = _session_of(accepted, at, window.gap_s)
            values[f.name] = _aggregate(f.agg.value, session)
        out.append((values, late))
    return out


def _accepted(events: Sequence[dict[str, Any]], grace: float) -> list[dict[str, Any]]:
    kept = []
    newest: float | None = None
    for e in events:
        if newest is None or e["ts"] >= newest - grace:
            kept.append(e)
        newest = e["ts"] if newest is None else max(newest, e["ts"])
    return kept


def _session_of(
    events: Sequence[dict[str, Any]], at: float, gap: float
) -> list[dict[str, Any]]:
    ordered = sorted(events, key=lambda e: e["ts"])
    sessions: list[list[dict[str, Any]]] = []
    for e in ordered:
        if sessions and e["ts"] - sessions[-1][-1]["ts"] < gap:
            sessions[-1].append(e)
        else:
            sessions.append([e])
    return next(s for s in sessions if s[0]["ts"] <= at <= s[-1]["ts"])


def _aggregate(agg: str, session: Sequence[dict[str, Any]]) -> float:
    amounts = [e["amount"] for e in session]
    match agg:
        case "count":
            return float(len(session))
        case "duration":
            return session[-1]["ts"] - session[0]["ts"]
        case "sum":
            return sum(amounts)
        case "mean":
            return sum(amounts) / len(amounts)
        case "min":
            return min(amounts)
    return max(amounts)
