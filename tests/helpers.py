"""Brute-force references the tests compare the real thing against, and a wait."""

from __future__ import annotations

import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

from riverflow.features.definitions import Aggregation, FeatureSpec, entity_value, parse_duration
from riverflow.features.store import Claim, FeatureRequest, FeatureStore
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import ServedPrediction, pair_id

# How far each aggregation may stray from the brute force: exact where the store
# adds exactly representable numbers in any order; mean / std / z-score divide
# and take roots of sums built in another order; HLL is an estimate (0.81%
# standard error in Redis; exact in memory).
EXACT = {
    Aggregation.COUNT, Aggregation.SUM, Aggregation.MIN, Aggregation.MAX, Aggregation.LAST,
    Aggregation.DISTINCT_EXACT, Aggregation.SINCE_PREVIOUS,
}  # fmt: skip
FLOAT_REL = 1e-6
HLL_REL = 0.02


def brute_force_features(
    events: Iterable[dict[str, Any]],
    features: list[FeatureSpec],
    key: str,
    time: str,
    lateness_s: float = 0.0,
    wanted: Container[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Each event's feature values (of those whose event id is ``wanted``, default
    all), recomputed from every earlier event of its entity.

    Semantics (see features.definitions): an event's window is its own time
    bucket of width window/buckets and the buckets-1 before it, over the events
    of its entity that arrived before it, and itself. An event older than its
    entity's newest event minus ``lateness_s`` is too late: it counts nowhere
    and sees the window ending at the entity's newest bucket. ``last`` and
    ``since_previous`` are about the newest (by event time; then by arrival)
    earlier event in the window. Session windows: ``session_value``.
    """
    accepted: dict[tuple[tuple[str, ...], str], list[dict[str, Any]]] = defaultdict(list)
    in_sessions: dict[tuple[str, tuple[str, ...], str], list[dict[str, Any]]] = defaultdict(list)
    newest: dict[tuple[tuple[str, ...], str], float] = {}
    out: dict[str, dict[str, float]] = {}
    for event in events:
        values: dict[str, float] = {}
        ts = event[time]
        entities = set()
        counted = wanted is None or event["event_id"] in wanted
        for f in features:
            fields = f.entity_fields(key)
            entity = (fields, entity_value(fields, event))
            if f.session is not None:
                kept = in_sessions[(f.name, *entity)]
                values[f.name], _ = session_value(f, event, kept, newest.get(entity), time)
                continue
            entities.add(entity)
            past = accepted[entity]
            if not counted:
                continue
            # (``newest``: the latest time of the entity's events so far, accepted ones)
            late = bool(past) and ts < newest[entity] - lateness_s
            width = parse_duration(f.window) / f.buckets

            def bucket(t: float, width: float = width) -> int:
                return int(t // width)

            end = bucket(newest[entity]) if late else bucket(ts)
            earlier = [e for e in past if end - f.buckets < bucket(e[time]) <= end]
            window = earlier if late else [*earlier, event]
            values[f.name] = _aggregate(f, event, window, earlier, time)
        for entity in entities:
            past = accepted[entity]
            if not past or ts >= newest[entity] - lateness_s:
                past.append(event)
        for f in features:
            fields = f.entity_fields(key)
            entity = (fields, entity_value(fields, event))
            newest[entity] = max(newest.get(entity, ts), ts)
        if counted:
            out[event["event_id"]] = values
    return out


def session_value(
    f: FeatureSpec,
    event: dict[str, Any],
    accepted: list[dict[str, Any]],
    newest: float | None,
    time: str,
) -> tuple[float, bool]:
    """A session feature's value for ``event`` and whether it was late, given the
    events of its entity accepted so far (``event`` is added if it is not late) and
    the newest event time of the entity before it.

    Late: older than the grace before ``newest``. Sessions: the accepted events
    sorted by time, cut where one follows the one before by the gap or more. An
    event is scored with the session holding it; a late one with the session
    holding the newest event."""
    window = f.session
    assert window is not None
    ts = event[time]
    late = newest is not None and ts < newest - window.grace_s
    if not late:
        accepted.append(event)
    at = newest if late else ts
    sessions: list[list[dict[str, Any]]] = []
    for e in sorted(accepted, key=lambda e: e[time]):
        if sessions and e[time] - sessions[-1][-1][time] < window.gap_s:
            sessions[-1].append(e)
        else:
            sessions.append([e])
    session = next(s for s in sessions if s[0][time] <= at <= s[-1][time])
    if f.agg is Aggregation.COUNT:
        return float(len(session)), late
    if f.agg is Aggregation.DURATION:
        return session[-1][time] - session[0][time], late
    assert f.field is not None
    xs = [float(e[f.field]) for e in session]
    match f.agg:
        case Aggregation.SUM:
            return math.fsum(xs), late
        case Aggregation.MEAN:
            return math.fsum(xs) / len(xs), late
        case Aggregation.MIN:
            return min(xs), late
    return max(xs), late


def _aggregate(
    f: FeatureSpec,
    event: dict[str, Any],
    window: list[dict[str, Any]],
    earlier: list[dict[str, Any]],
    time: str,
) -> float:
    previous = None
    for e in earlier:  # in arrival order: the last of equal times wins
        if previous is None or e[time] >= previous[time]:
            previous = e
    if f.agg is Aggregation.COUNT:
        return float(len(window))
    if f.agg is Aggregation.SINCE_PREVIOUS:
        if previous is None:
            return parse_duration(f.window)
        return max(event[time] - previous[time], 0.0)
    assert f.field is not None
    if f.agg in (Aggregation.DISTINCT, Aggregation.DISTINCT_EXACT):
        return float(len({str(e[f.field]) for e in window}))
    if f.agg is Aggregation.LAST:
        return float(previous[f.field]) if previous is not None else 0.0
    xs = [float(e[f.field]) for e in window]
    if f.agg is Aggregation.MIN:
        return min(xs, default=0.0)
    if f.agg is Aggregation.MAX:
        return max(xs, default=0.0)
    total = math.fsum(xs)
    if f.agg is Aggregation.SUM:
        return total
    mean = total / len(xs) if xs else 0.0
    if f.agg is Aggregation.MEAN:
        return mean
    var = math.fsum((x - mean) ** 2 for x in xs) / len(xs) if xs else 0.0
    mean_sq = math.fsum(x * x for x in xs) / len(xs) if xs else 0.0
    std = math.sqrt(var) if var > 1e-12 * mean_sq else 0.0  # the store's noise floor
    if f.agg is Aggregation.STD:
        return std
    return (float(event[f.field]) - mean) / std if std else 0.0


def assert_features_match(
    got: dict[str, float], expected: dict[str, float], rel: float = 1e-9
) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=rel, abs_tol=1e-9), (name, got, expected)


def assert_aggregations_match(
    got: dict[str, float], expected: dict[str, float], features: list[FeatureSpec]
) -> None:
    """Each feature within its aggregation's tolerance (``EXACT``, ``FLOAT_REL``, ``HLL_REL``)."""
    assert got.keys() == expected.keys()
    for f in features:
        g, e = got[f.name], expected[f.name]
        if f.agg in EXACT:
            ok = g == e
        elif f.agg is Aggregation.DISTINCT:
            ok = abs(g - e) <= max(1.0, HLL_REL * e)
        else:
            ok = math.isclose(g, e, rel_tol=FLOAT_REL, abs_tol=FLOAT_REL)
        assert ok, (f.name, f.agg.value, g, e)


def check_labels_are_claimed_once(store: FeatureStore) -> None:
    """The claim contract, for every store: each event's label is claimed once, unless
    the learning that claimed it was lost (a learner crash); an event the learner
    does not hold is never marked."""

    def tokens(ids: list[str], run: str) -> list[str]:
        return [f"{run}:{i}" for i in ids]

    def never(_token: str) -> bool:
        return False

    ids = [f"claim-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    known = [True, True, False]
    first = store.claim_labels(ids, tokens(ids, "run1"), known, never)
    assert first == [Claim.CLAIMED, Claim.CLAIMED, Claim.MISSING]
    assert store.claim_labels(ids, tokens(ids, "run1"), known, never) == [
        Claim.DUPLICATE, Claim.DUPLICATE, Claim.MISSING,
    ]  # fmt: skip
    # a mark whose learning was lost (the learner crashed before its snapshot) is taken
    # over where the learner holds the event; where it does not, the label waits
    lost = store.claim_labels(
        ids[:2], tokens(ids[:2], "run2"), [True, False], lambda t: t.startswith("run1")
    )
    assert lost == [Claim.CLAIMED, Claim.MISSING]
    assert store.claim_labels(ids[:1], ["run3"], [True], lambda t: t.startswith("run1")) == [
        Claim.DUPLICATE  # run2 holds it now
    ]
    # the unknown event was never marked: once held, it is claimed
    assert store.claim_labels(ids[2:], ["run4"], [True], never) == [Claim.CLAIMED]
    # an orphan mark wins over everything; an event learned already is not made one
    store.mark_orphans([ids[0]])
    assert store.claim_labels(ids[:1], ["run5"], [True], never) == [Claim.DUPLICATE]
    orphan = f"claim-{uuid.uuid4().hex[:8]}-orphan"
    store.mark_orphans([orphan])
    assert store.claim_labels([orphan], ["run5"], [True], lambda t: True) == [Claim.ORPHANED]


def check_the_first_served_prediction_is_kept(
    store: FeatureStore, reqs: list[FeatureRequest]
) -> None:
    """The served contract, for every store: the first prediction recorded for an
    event stays with its snapshot; replays and the learner's claim return it."""
    first, later = ServedPrediction("tree", 3, 0.125), ServedPrediction("tree", 4, 0.875)
    ids = [r.event_id for r in reqs[:3]]
    snaps = store.update_and_read(reqs[:2])
    assert [s.served for s in snaps] == [None, None]
    # reqs[2] was never scored: nothing to record it with, and nothing is created
    store.record_served([(ids[0], first), (ids[2], first)])
    store.record_served([(ids[0], later), (ids[1], later)])  # a replay: ids[0] keeps `first`
    again = store.update_and_read(reqs[:3])
    assert [s.replayed for s in again] == [True, True, False]
    assert [s.served for s in again] == [first, later, None]
    assert again[0].inputs == snaps[0].inputs and again[0].aggregates == snaps[0].aggregates


def assert_served_matches(evaluations: Iterable[Any], predictions: Mapping[str, Any]) -> None:
    """Every evaluation carries the prediction that was served for its event, as emitted."""
    for e in evaluations:
        p = predictions[e.event_id]
        assert e.served is not None, e.event_id
        assert (e.served.model, e.served.version, e.served.probability) == (
            p.model, p.version, p.probability
        ), e.event_id  # fmt: skip


def slate_recount(
    spec: PipelineSpec, requests: Iterable[dict[str, Any]], wanted: Container[str] | None = None
) -> dict[str, dict[str, float]]:
    """Each (request, candidate) pair's events-sourced features (by pair id; those
    ``wanted``, default all), recounted from the requests in order: a request counts
    once in each entity it touches, with its first candidate there, and its other
    pairs see what that one saw. (Label-fed features: ``tests.label_streams.brute_force``.)"""
    slate = spec.events.slate
    assert slate is not None
    requests = list(requests)
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for f in spec.events_features:
        fields = f.entity_fields(spec.events.key)
        first: dict[tuple[str, str], str] = {}  # (request, entity value) -> the pair counted
        stream, pairs = [], []
        for request in requests:
            rid = request[spec.events.event_id]
            for item in request[slate.field]:
                pair = {**request, **item, "event_id": pair_id(rid, item[slate.item_id])}
                touch = (rid, entity_value(fields, pair))
                if touch not in first:
                    first[touch] = pair["event_id"]
                    stream.append(pair)
                if wanted is None or pair["event_id"] in wanted:
                    pairs.append((pair["event_id"], first[touch]))
        counted = brute_force_features(stream, [f], spec.events.key, spec.events.time,
                                       wanted={counted_as for _, counted_as in pairs})  # fmt: skip
        for pid, counted_as in pairs:
            out[pid][f.name] = counted[counted_as][f.name]
    return dict(out)


def within(seconds: float, condition: Callable[[], bool], every_s: float = 0.05) -> bool:
    """Whether ``condition()`` comes true within ``seconds`` (asked every ``every_s``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return False
