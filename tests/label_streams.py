"""Seeded label streams from the recommendation world, and the label-fed features
recomputed from scratch: shared by the memory and the Redis tests of
``features.labelled``.

Requests come in time order; each is served by popularity and its shown items
are labelled: a click is learned a few seconds after its request, a timeout
negative ``AFTER_S`` after it. Before a request is scored, the labels learned by
then are written (in batches, one batch sent twice: a learner restarted from its
checkpoint); then its candidates, and a user and an item never seen, are read at
its time and compared with a recount of every label written so far.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from riverflow.features.definitions import FeatureSpec, entity_value, parse_duration
from riverflow.features.labelled import LabelFeatures, LabelPlan, LearnedLabel
from riverflow.tools.recsys import RecsysConfig, RecsysWorld

AFTER_S = 600.0  # a shown item with no click is a negative this long after its request
LATENESS_S = 2 * AFTER_S  # labels come out of order by up to AFTER_S

FEATURES = [
    FeatureSpec.model_validate(f)
    for f in [
        {"name": "user_ctr_1h", "agg": "rate", "field": "clicked", "window": "1h",
         "source": "labels", "prior": 20},
        {"name": "user_raw_ctr_1h", "agg": "rate", "field": "clicked", "window": "1h",
         "source": "labels"},
        {"name": "user_shown_1h", "agg": "count", "window": "1h", "source": "labels"},
        {"name": "user_clicks_1h", "agg": "count", "window": "1h", "source": "labels",
         "when": "clicked"},
        {"name": "item_shown_30m", "agg": "count", "window": "30m", "buckets": 6,
         "entity": "item_id", "source": "labels"},
        {"name": "item_ctr_30m", "agg": "rate", "field": "clicked", "window": "30m",
         "buckets": 6, "entity": "item_id", "source": "labels", "prior": 10},
        {"name": "item_clicks_30m", "agg": "sum", "field": "clicked", "window": "30m",
         "buckets": 6, "entity": "item_id", "source": "labels"},
        {"name": "user_cat_ctr_2h", "agg": "rate", "field": "clicked", "window": "2h",
         "entity": ["user_id", "category"], "source": "labels", "prior": 5},
        {"name": "user_cat_since_click", "agg": "since", "window": "2h",
         "entity": ["user_id", "category"], "source": "labels", "when": "clicked"},
        {"name": "item_since_shown", "agg": "since", "window": "30m", "buckets": 6,
         "entity": "item_id", "source": "labels"},
        {"name": "user_click_recency", "agg": "since", "window": "2h", "source": "labels",
         "when": "clicked", "decay": "20m"},
    ]
]  # fmt: skip
PLAN = LabelPlan.build(FEATURES, "clicked", "user_id", LATENESS_S)
NEWCOMER = {"user_id": "u-new", "item_id": "i-new", "category": "c0"}


@dataclass(frozen=True)
class Scored:
    """A request at scoring time: its time and its candidates' fields."""

    ts: float
    pairs: list[dict[str, Any]]


def world(requests: int, seed: int) -> tuple[list[Scored], list[tuple[float, LearnedLabel]]]:
    """``requests`` scored requests (with a newcomer pair each) and their labels,
    each with the time it is learned, in the order they are learned."""
    w = RecsysWorld(
        RecsysConfig(seed=seed, users=25, items=60, categories=4, slate=8, shown=4,
                     mean_gap_s=20.0, shift_at=())
    )  # fmt: skip
    rng = random.Random(seed)
    scored, labels = [], []
    for request in w.requests(requests):
        fields = [
            {"user_id": request.user, "item_id": item, "category": f"c{w.category[item]}",
             "device": request.device}
            for item in request.slate
        ]  # fmt: skip
        scored.append(Scored(request.ts, [*fields, NEWCOMER]))
        ranking = w.by_popularity(request)
        by_item = {f["item_id"]: f for f in fields}
        for item, clicked in zip(ranking, w.clicks(request, ranking, rng), strict=False):
            learned = request.ts + (rng.uniform(1.0, 60.0) if clicked else AFTER_S)
            pair = f"{request.request_id}/{item}"
            labels.append((learned, LearnedLabel(pair, by_item[item], clicked, request.ts)))
    labels.sort(key=lambda x: x[0])
    return scored, labels


_KEYS: dict[tuple[str, tuple[str, ...]], str] = {}  # a label's entity values, worked out once


def brute_force(
    labels: list[LearnedLabel],
    pairs: list[dict[str, Any]],
    at: float,
    features: list[FeatureSpec] = FEATURES,
    key: str = "user_id",
    cache: dict[tuple[str, tuple[str, ...]], str] = _KEYS,
) -> list[dict[str, float]]:
    """Every label-fed feature (of ``features``, ``key`` the default entity) of each
    of ``pairs`` at ``at``, counted from ``labels`` (those written so far, none too
    late): a label counts if its bucket lies in the window ending at ``at``'s bucket.
    ``cache``: each label's entity values by pair id (one per stream of labels)."""
    out: list[dict[str, float]] = [{} for _ in pairs]
    for f in features:
        window_s = parse_duration(str(f.window))
        width = window_s / f.buckets
        end = math.floor(at / width)
        entity = f.entity_fields(key)
        first = end - f.buckets + 1
        inside = [x for x in labels if first <= math.floor(x.ts / width) <= end]
        overall = sum(x.value for x in inside) / len(inside) if inside else 0.0
        by_entity: dict[str, list[LearnedLabel]] = {}
        for x in inside:
            value = cache.get((x.pair_id, entity))
            if value is None:
                value = cache[x.pair_id, entity] = entity_value(entity, x.fields)
            by_entity.setdefault(value, []).append(x)
        for pair, values in zip(pairs, out, strict=True):
            mine = by_entity.get(entity_value(entity, pair), [])
            n, s = float(len(mine)), float(sum(x.value for x in mine))
            if f.agg == "count":
                values[f.name] = s if f.when else n
            elif f.agg == "sum":
                values[f.name] = s
            elif f.agg == "rate":
                rate = s / n if n else 0.0
                if f.prior:
                    rate = (s + f.prior * overall) / (n + f.prior)
                values[f.name] = rate
            else:  # since
                times = [x.ts for x in mine if x.value or not f.when]
                values[f.name] = since_value(f, at, max(times) if times else None)
    return out


def since_value(f: FeatureSpec, at: float, newest: float | None) -> float:
    """A ``since`` feature read at ``at`` with its window's newest counted label at
    ``newest`` (None: none): the seconds back to it, at most the window (the window if
    none); with ``decay``, ``exp(-seconds / decay)``, 0 if none."""
    window_s = parse_duration(str(f.window))
    if newest is None:
        return 0.0 if f.decay else window_s
    ago = min(window_s, max(0.0, at - newest))
    return math.exp(-ago / parse_duration(f.decay)) if f.decay else ago


def batches(
    labels: list[tuple[float, LearnedLabel]], scored: list[Scored]
) -> Iterator[tuple[list[LearnedLabel], Scored | None]]:
    """Per scored request: the labels learned since the previous one, then it."""
    i = 0
    for request in scored:
        due = []
        while i < len(labels) and labels[i][0] <= request.ts:
            due.append(labels[i][1])
            i += 1
        yield due, request


def check_stream(features: LabelFeatures, requests: int, seed: int) -> dict[str, int]:
    """Run a seeded stream through ``features``; every read equals the recount.
    Returns totals: labels counted, duplicates, late, pairs checked, newcomer
    reads that were smoothed (a prior at work), since-click reads under the window."""
    scored, labels = world(requests, seed)
    written: list[LearnedLabel] = []
    totals = {"counted": 0, "duplicates": 0, "late": 0, "pairs": 0, "smoothed": 0, "recent": 0}
    for n, (due, request) in enumerate(batches(labels, scored)):
        if due:
            result = features.write(due)
            if n % 17 == 0:  # the learner restarted: the batch comes again
                again = features.write(due)
                assert again.counted == 0 and again.duplicates == len(due)
                totals["duplicates"] += again.duplicates
            totals["counted"] += result.counted
            totals["late"] += result.late
            written += due
        assert request is not None
        got = features.read(request.pairs, request.ts)
        wanted = brute_force(written, request.pairs, request.ts)
        for pair, values, want in zip(request.pairs, got, wanted, strict=True):
            assert values.keys() == want.keys()
            for name, value in values.items():
                assert math.isclose(value, want[name], rel_tol=1e-12, abs_tol=1e-12), (
                    name, value, want[name], pair, request.ts,
                )  # fmt: skip
            totals["pairs"] += 1
        newcomer = got[-1]
        if newcomer["user_ctr_1h"] not in (0.0, newcomer["user_raw_ctr_1h"]):
            totals["smoothed"] += 1
        totals["recent"] += sum(v["user_cat_since_click"] < 7200 for v in got)
    return totals


def matching_prefix(
    labels: list[LearnedLabel],
    pairs: list[dict[str, Any]],
    at: float,
    served: list[dict[str, float]],
    features: list[FeatureSpec],
    key: str,
    between: tuple[int, int],
    lateness_s: float = math.inf,
) -> int | None:
    """The length ``k`` (within ``between``, inclusive) of a prefix of ``labels`` (in
    the order they were learned) whose recount (``brute_force``) gives every one of
    ``pairs`` at ``at`` exactly the ``served`` values; None if no prefix does.

    Where a scorer and a learner run apart, which labels a read saw is not known,
    but they were a prefix of the learner's: counted incrementally here, prefix by
    prefix, rather than recounted for each. A label older than ``lateness_s`` behind
    its entity's newest one (or, for the global rate, the newest of all) counts
    nowhere there, as in the store."""
    lo, hi = between
    state = []  # per feature: its window's bounds, the global (n, s), per entity [n, s, newest]
    for f in features:
        width = parse_duration(str(f.window)) / f.buckets
        end = math.floor(at / width)
        entity = f.entity_fields(key)
        mine = {entity_value(entity, p): [0.0, 0.0, -math.inf] for p in pairs}
        state.append((f, width, end - f.buckets + 1, end, entity, [0.0, 0.0], mine))

    def values() -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        for pair in pairs:
            got: dict[str, float] = {}
            for f, _, _, _, entity, (gn, gs), mine in state:
                n, s, newest = mine[entity_value(entity, pair)]
                if f.agg == "count":
                    got[f.name] = s if f.when else n
                elif f.agg == "sum":
                    got[f.name] = s
                elif f.agg == "rate":
                    rate = s / n if n else 0.0
                    if f.prior:
                        rate = (s + f.prior * (gs / gn if gn else 0.0)) / (n + f.prior)
                    got[f.name] = rate
                else:
                    got[f.name] = since_value(f, at, newest if newest > -math.inf else None)
            out.append(got)
        return out

    def equal(a: list[dict[str, float]]) -> bool:
        return all(
            math.isclose(v, s[name], rel_tol=1e-9, abs_tol=1e-9)
            for got, s in zip(a, served, strict=True) for name, v in got.items()
        )  # fmt: skip

    newest: dict[tuple[tuple[str, ...], str], float] = {}  # an entity's newest label

    def fresh(entity: tuple[str, ...], value: str, ts: float) -> bool:
        w = newest.get((entity, value), -math.inf)
        return ts >= w - lateness_s

    for k in range(hi + 1):
        if k >= lo and equal(values()):
            return k
        if k == len(labels):
            break
        x = labels[k]
        entities = {f.entity_fields(key) for f in features} | {("@all",)}
        counts = {e: fresh(e, "1" if e == ("@all",) else entity_value(e, x.fields), x.ts)
                  for e in entities}  # fmt: skip
        for e in entities:
            v = "1" if e == ("@all",) else entity_value(e, x.fields)
            newest[e, v] = max(newest.get((e, v), -math.inf), x.ts)
        for f, width, first, end, entity, totals, mine in state:
            if not first <= math.floor(x.ts / width) <= end:
                continue
            if counts[("@all",)]:
                totals[0] += 1
                totals[1] += float(x.value)
            kept = mine.get(entity_value(entity, x.fields))
            if kept is not None and counts[entity]:
                kept[0] += 1
                kept[1] += float(x.value)
                if x.value or not f.when:
                    kept[2] = max(kept[2], x.ts)
    return None
