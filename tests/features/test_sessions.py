"""Session windows: every feature value at every event equals a recomputation over
every event seen so far, late and out-of-order events included (the rules are in
``features.sessions``)."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import msgpack
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from riverflow.embedded import EmbeddedRuntime
from riverflow.features.definitions import FeaturePlan, FeatureSpec
from riverflow.features.scored import ScoredEvent, scored_records
from riverflow.features.store import MemoryFeatureStore
from riverflow.features.tiles import (
    Engine,
    Entity,
    compact_entity,
    expand_entity,
    pack_entity,
    unpack_entity,
)
from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import load_spec, parse_spec
from riverflow.streams.contracts import Message
from riverflow.tools.generator import FraudStreamConfig, transactions
from tests.helpers import session_value
from tests.session_streams import PLAN, brute_force, requests, session_streams


@settings(max_examples=400, deadline=None)
@given(events=session_streams(), batch=st.sampled_from([1, 7, 64]))
def test_session_features_equal_brute_force_with_late_events(
    events: list[dict[str, Any]], batch: int
) -> None:
    store = MemoryFeatureStore(PLAN)
    reqs = requests(events)
    snapshots = []
    for i in range(0, len(reqs), batch):
        snapshots += store.update_and_read(reqs[i : i + batch])
    expected = brute_force(events)
    for event, snap, (values, late) in zip(events, snapshots, expected, strict=True):
        got = {k: v for k, v in PLAN.values(snap.aggregates).items() if k in values}
        assert (got, snap.late) == (values, late), event["event_id"]


@settings(max_examples=200, deadline=None)
@given(events=session_streams(min_size=10))
def test_an_entity_keeps_a_bounded_few_sessions(events: list[dict[str, Any]]) -> None:
    engine = Engine(PLAN)
    ents: dict[tuple[str, str], Entity] = {}
    for e in events:
        keys = PLAN.entity_keys(e)
        mine = {n: ents.setdefault((n, v), Entity()) for n, v in keys.items()}
        engine.step(mine, e["ts"], {"amount": e["amount"]}, {})
        for si, g in enumerate(PLAN.sessions):
            assert len(mine[g.entity_name].sessions.get(si, [])) <= g.max_sessions


@settings(max_examples=200, deadline=None)
@given(events=session_streams(), at=st.sets(st.integers(0, 60)))
def test_sessions_survive_the_scorers_cache_and_redis_layout(
    events: list[dict[str, Any]], at: set[int]
) -> None:
    """Compacted (the scorer's cache) or packed as Redis stores it and read back, an
    entity's sessions go on giving the same numbers."""
    engines = [Engine(PLAN), Engine(PLAN)]
    states: list[dict[tuple[str, str], Entity]] = [{}, {}]
    for i, e in enumerate(events):
        outs = []
        for engine, ents in zip(engines, states, strict=True):
            mine = {n: ents.setdefault((n, v), Entity()) for n, v in PLAN.entity_keys(e).items()}
            outs.append(engine.step(mine, e["ts"], {"amount": e["amount"]}, {}))
        assert outs[0] == outs[1]
        if i in at:
            engine, ents = engines[1], states[1]
            for k, ent in ents.items():
                if i % 2:
                    ents[k], _ = expand_entity(engine, compact_entity(engine, ent, 1))
                else:
                    ents[k] = unpack_entity(engine, pack_entity(engine, ent))


def test_a_late_event_bridging_two_sessions_merges_them() -> None:
    plan = FeaturePlan.build(
        [FeatureSpec.model_validate(
            {"name": n, "agg": a, "window": {"session": "30m", "grace": "45m"}, **f})
         for n, a, f in [("n", "count", {}), ("d", "duration", {}),
                         ("total", "sum", {"field": "amount"})]],
        "card_id",
    )  # fmt: skip
    store = MemoryFeatureStore(plan)
    events = [(0, 1.0), (2400, 2.0), (1200, 4.0), (9000, 8.0), (100, 16.0)]
    seen = []
    for i, (ts, amount) in enumerate(events):
        e = {"event_id": f"e{i}", "card_id": "c", "amount": amount, "ts": ts}
        [snap] = store.update_and_read(requests([e], plan))
        seen.append((plan.values(snap.aggregates), snap.late))
    assert seen == [
        ({"n": 1, "d": 0, "total": 1}, False),
        ({"n": 1, "d": 0, "total": 2}, False),  # 40 min later: a new session
        ({"n": 3, "d": 2400, "total": 7}, False),  # 20 min late: bridges both
        ({"n": 1, "d": 0, "total": 8}, False),
        ({"n": 1, "d": 0, "total": 8}, True),  # beyond the grace: late, not counted
    ]
    assert store.read({"card_id": "c"}) == {"n": 1, "d": 0, "total": 8}


@pytest.mark.parametrize(
    ("feature", "problem"),
    [
        ({"agg": "std", "field": "amount", "window": {"session": "30m"}}, "not std"),
        ({"agg": "count", "window": {"session": "30m"}, "buckets": 4}, "no buckets"),
        ({"agg": "duration", "window": "1h"}, "needs a session window"),
        ({"agg": "count", "window": {"session": "1m", "grace": "1h"}}, "exceeds 10 x"),
        ({"agg": "count", "window": {"session": "30m", "gap": "5m"}}, "gap"),
    ],
)
def test_a_wrong_session_feature_is_refused_naming_the_problem(
    feature: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        FeatureSpec.model_validate({"name": "x", **feature})


def test_the_scorer_serves_session_features_the_learner_joins_and_counts_late_ones(
    settings: Settings,
) -> None:
    """Through the embedded pipeline: each prediction carries its event's session
    features as brute force recomputes them; the learner's join (the scored index)
    reads back those values, not the entity's later ones; events beyond the grace
    are counted in ``late_events``."""
    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["features"] = [
        {"name": "tx_in_session", "agg": "count", "window": {"session": "30m", "grace": "5m"}},
        {"name": "amount_in_session", "agg": "sum", "field": "amount",
         "window": {"session": "30m", "grace": "5m"}},
        {"name": "session_s", "agg": "duration", "window": {"session": "30m", "grace": "5m"}},
    ]  # fmt: skip
    data["models"]["candidates"] = data["models"]["candidates"][:1]  # selects other features
    spec = parse_spec(data)
    events = [e for e, _ in transactions(1500, FraudStreamConfig(cards=20, mean_gap_s=30.0))]
    rng = random.Random(7)
    for e in events[::10]:  # out of order: within the grace, or beyond it
        e["ts"] -= rng.choice([60.0, 240.0, 900.0, 4000.0])
    rt = EmbeddedRuntime(spec, settings)
    for e in events:
        rt.produce(rt.topics.events, e["card_id"].encode(), orjson.dumps(e))
    rt.drain()
    messages = [Message(rt.topics.predictions, 0, i, k, v)
                for i, (k, v) in enumerate(rt.messages(rt.topics.predictions))]  # fmt: skip
    records, bad = scored_records(messages)
    assert bad == 0 and len(records) == len(events)
    late = 0
    newest: dict[tuple[str, ...], float] = {}
    accepted: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        joined = ScoredEvent.unpack(e["event_id"], records[e["event_id"]]).features
        was_late = False
        for f in spec.features:
            want, was_late = session_value(
                f, e, accepted[f.name, e["card_id"]], newest.get((e["card_id"],)), "ts"
            )
            assert joined[f.name] == pytest.approx(want, rel=1e-9, abs=1e-9), (f.name, e)
        newest[(e["card_id"],)] = max(newest.get((e["card_id"],), e["ts"]), e["ts"])
        late += was_late
    assert late > 20
    assert rt.scorer.counters.late_events == late
    assert rt.scorer.status()["late_events"] == late  # exported as riverflow_stage_status


def test_the_fraud_examples_sessions_cost_an_entity_a_few_dozen_bytes() -> None:
    """docs/architecture.md, "Session windows": the fraud example's session group
    (count and amount sum) adds ~28 B per kept session to an entity's state, in
    Redis and in the scorer's compact cache; over a day of 20 events per card,
    at most 40 B on average, at most two sessions each."""
    spec = load_spec(DEFAULT_SPEC)
    data = spec.model_dump(mode="json", by_alias=True)
    data["features"] = [f for f in data["features"] if not isinstance(f["window"], dict)]
    tiles_only = parse_spec(data)
    rng = random.Random(1)
    events = sorted(
        (1_767_225_600.0 + rng.uniform(0, 86_400), card, round(rng.lognormvariate(3.3, 0.9), 2))
        for card in range(500)
        for _ in range(20)
    )
    sizes = []
    for plan in (tiles_only.feature_plan(), spec.feature_plan()):
        engine = Engine(plan)
        ents: dict[int, Entity] = {}
        for ts, card, amount in events:
            engine.step({"card_id": ents.setdefault(card, Entity())}, ts, {"amount": amount}, {})
        stored = [len(msgpack.packb(pack_entity(engine, e))) for e in ents.values()]
        held = [len(compact_entity(engine, e, 1)) for e in ents.values()]
        sizes.append((sum(stored) / len(ents), sum(held) / len(ents)))
    [group] = spec.feature_plan().sessions
    assert group.max_sessions == 2
    assert all(len(e.sessions[0]) <= 2 for e in ents.values())
    for without, with_sessions in zip(sizes[0], sizes[1], strict=True):
        assert 28 <= with_sessions - without <= 40
