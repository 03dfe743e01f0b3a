"""Brute-force references the tests compare the real thing against."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from features.definitions import Aggregation, FeatureSpec, parse_duration


def brute_force_features(
    events: Iterable[dict[str, Any]], features: list[FeatureSpec], key: str, time: str
) -> dict[str, dict[str, float]]:
    """Each event's feature values, recomputed from every earlier event of its entity.

    Window semantics (see features.definitions): the event's own time bucket of
    width window/buckets and the buckets-1 before it, including the event itself.
    Events of one entity must arrive in time order, as in the generated stream.
    """
    history: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    out: dict[str, dict[str, float]] = {}
    for event in events:
        values: dict[str, float] = {}
        for f in features:
            entity = f.entity or key
            past = history[(entity, str(event[entity]))]
            width = parse_duration(f.window) / f.buckets
            b = math.floor(event[time] / width)
            window = [e for e in [*past, event] if b - f.buckets < math.floor(e[time] / width) <= b]
            if f.agg is Aggregation.COUNT:
                values[f.name] = float(len(window))
            else:
                total = math.fsum(e[f.field] for e in window)  # type: ignore[index]
                values[f.name] = total if f.agg is Aggregation.SUM else total / len(window)
        for entity in {f.entity or key for f in features}:
            history[(entity, str(event[entity]))].append(event)
        out[event["event_id"]] = values
    return out


def assert_features_match(
    got: dict[str, float], expected: dict[str, float], rel: float = 1e-9
) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=rel, abs_tol=1e-9), (name, got, expected)
