"""The Lua scripts compute what the Python engine computes, bit for bit, on a real
redis-server.

The same random streams (three cards at four merchants, events late and out of
order, amounts of any sign and any bits) go through every path:

- ``update_and_read.lua`` (with ``prelude.lua``; the server path of a store
  holding no entities) against ``features.tiles`` reading every window tile by
  tile, oldest first (``Kernel.incremental`` off): the same additions in the
  same order, so every number of every snapshot is the same double, sums and
  sums of squares included. The same holds when a scorer computing in process
  and a scorer on the server take turns on one namespace, so that commits are
  refused and each reads the tiles the other wrote;
- ``features.tiles`` as a scorer runs it (running totals; through ``commit.lua``
  and reloads from Redis) against ``update_and_read.lua``: the same counts,
  ``since_previous``, minima, maxima, last and current values and exact distinct
  counts. Sums and sums of squares add in another order there (a running total
  gains each event and loses each tile leaving the window), so they agree to
  within the rounding of what was added: 1e-12 of the sum of the terms' magnitudes;
- ``read.lua`` against ``Engine.read``;
- ``record_served.lua`` against ``base.with_served``, byte for byte, and
  ``claim.lua`` against the embedded store's claims.

The plan is every aggregation but ``distinct``: a HyperLogLog's count is an
estimate, not the engine's exact one.

Numbers are compared as doubles (``float.hex``): Redis' cmsgpack sends a double
that is a whole number as an integer, which ``float`` restores exactly, but it
sends -0.0 as 0, so the streams carry no -0.0.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riverflow.features.store import (
    FeatureRequest,
    FeatureSnapshot,
    MemoryFeatureStore,
    RedisFeatureStore,
)
from riverflow.features.tiles import Engine
from riverflow.streams.contracts import ServedPrediction
from tests.feature_streams import EXACT_PLAN, LATENESS_S, event_streams, run_batches
from tests.feature_streams import requests as stream_requests
from tests.session_streams import PLAN as SESSION_PLAN
from tests.session_streams import brute_force as session_brute_force
from tests.session_streams import requests as session_requests
from tests.session_streams import session_streams

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# amounts whose sums round (i / 997), any double in range (+ 0.0 makes -0.0 0.0,
# see the module docstring), and multiples of 0.25 (ties: repeated minima, maxima)
AMOUNTS = st.one_of(
    st.integers(-(10**7), 10**7).map(lambda i: i / 997),
    st.floats(-1e4, 1e4, allow_nan=False).map(lambda x: x + 0.0),
    st.integers(-400, 4000).map(lambda q: q / 4),
)


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Long enough that windows fill, roll over and hold tiles added in several
    orders; a few events exactly as late as their card allows (still counted)."""
    events = draw(event_streams(min_size=20, max_size=80))
    amounts = draw(st.lists(AMOUNTS, min_size=len(events), max_size=len(events)))
    at_limit = draw(st.sets(st.integers(0, len(events) - 1), max_size=3))
    newest: dict[str, float] = {}
    out = []
    for i, (event, amount) in enumerate(zip(events, amounts, strict=True)):
        card = event["card_id"]
        ts = newest[card] - LATENESS_S if i in at_limit and card in newest else event["ts"]
        newest[card] = max(newest.get(card, ts), ts)
        out.append({**event, "amount": amount, "ts": ts})
    return out


def tile_by_tile(engine: Engine) -> None:
    """Running totals off: every window added up from its tiles, oldest first,
    as the Lua does."""
    for kernel in engine.kernels:
        kernel.incremental = False


def reference() -> MemoryFeatureStore:
    store = MemoryFeatureStore(EXACT_PLAN)
    tile_by_tile(store.engine)
    return store


def redis_store(client: redis.Redis, ns: str, cached: int = 15_000) -> RedisFeatureStore:
    return RedisFeatureStore(client, ns, EXACT_PLAN, horizon_s=3600, cached_entities=cached)


def doubles(values: Sequence[Any]) -> list[str]:
    return [float(x).hex() for x in values]


def snapshot_bits(snapshots: Sequence[FeatureSnapshot]) -> list[Any]:
    return [(s.event_id, s.late, [doubles(v) for v in s.aggregates]) for s in snapshots]


def sums_at(engine: Engine) -> list[tuple[slice, slice]]:
    """Per group: where its sums and its sums of squares sit in its aggregate
    (after count, has-previous and since_previous; layout: features.definitions)."""
    out = []
    for k in engine.kernels:
        squares = 3 + len(k.sum_o)
        out.append((slice(3, squares), slice(squares, squares + len(k.square_o))))
    return out


def new_namespace() -> str:
    return f"p{uuid.uuid4().hex[:8]}"


@SETTINGS
@given(events=streams(), batch=st.integers(1, 25))
def test_the_update_script_adds_up_as_the_engine(
    redis_client: redis.Redis, events: list[dict[str, Any]], batch: int
) -> None:
    reqs = stream_requests(events, EXACT_PLAN)
    server = redis_store(redis_client, new_namespace(), cached=0)
    on_server = run_batches(server, reqs, batch)
    assert server.batches["in_process"] == 0
    assert snapshot_bits(on_server) == snapshot_bits(run_batches(reference(), reqs, batch))


@SETTINGS
@given(
    events=streams(),
    batch=st.integers(1, 25),
    cached=st.sampled_from([1, 15_000]),
)
def test_the_running_totals_agree_with_the_update_script(
    redis_client: redis.Redis, events: list[dict[str, Any]], batch: int, cached: int
) -> None:
    """A scorer's own path (holding one entity or all: reloads from Redis too)."""
    reqs = stream_requests(events, EXACT_PLAN)
    scorer = redis_store(redis_client, new_namespace(), cached)
    in_process = run_batches(scorer, reqs, batch)
    assert scorer.batches["server"] == 0
    on_server = run_batches(redis_store(redis_client, new_namespace(), cached=0), reqs, batch)
    magnitude = math.fsum(abs(e["amount"]) for e in events)
    squares_magnitude = math.fsum(e["amount"] ** 2 for e in events)
    layout = sums_at(scorer.engine)
    for got, want in zip(in_process, on_server, strict=True):
        assert got.late == want.late
        for g, w, (sums, squares) in zip(got.aggregates, want.aggregates, layout, strict=True):
            for at, terms in ((sums, magnitude), (squares, squares_magnitude)):
                for x, y in zip(g[at], w[at], strict=True):
                    assert math.isclose(x, y, rel_tol=0.0, abs_tol=1e-12 * terms), (g, w)
            # count, has-previous, since_previous, then from the minima on
            rest = slice(squares.stop, None)
            assert doubles(g[:3] + g[rest]) == doubles(w[:3] + w[rest]), (got.event_id, g, w)


@SETTINGS
@given(
    events=streams(),
    batch=st.integers(1, 8),
    turns=st.lists(st.integers(0, 1), min_size=2),
    cached=st.sampled_from([1, 15_000]),
    at=st.floats(-3600.0, 3600.0),
)
def test_scorers_taking_turns_and_the_read_script_agree_with_the_engine(
    redis_client: redis.Redis,
    events: list[dict[str, Any]],
    batch: int,
    turns: list[int],
    cached: int,
    at: float,
) -> None:
    """One scorer in process (its windows added up tile by tile, so that every
    number can be compared), one on the server, taking ``turns`` on a namespace:
    the first one's commits are refused whenever the other wrote its entities,
    and each reads the tiles the other wrote (a list per tile from Python, flat
    from Lua)."""
    ns = new_namespace()
    scorers = [redis_store(redis_client, ns, cached), redis_store(redis_client, ns, cached=0)]
    tile_by_tile(scorers[0].engine)
    reqs = stream_requests(events, EXACT_PLAN)
    got = []
    for n, i in enumerate(range(0, len(reqs), batch)):
        got += scorers[turns[n % len(turns)]].update_and_read(reqs[i : i + batch])
    memory = reference()
    assert snapshot_bits(got) == snapshot_bits(run_batches(memory, reqs, batch))
    newest = max(e["ts"] for e in events)
    for entities in {str(r.entities): r.entities for r in reqs}.values():
        for when in (None, newest + at, newest + 7 * 86_400.0):
            want = memory.read(entities, when)
            assert {k: float(v).hex() for k, v in scorers[1].read(entities, when).items()} == {
                k: float(v).hex() for k, v in want.items()
            }


@SETTINGS
@given(
    events=streams(),
    batch=st.integers(1, 25),
    cached=st.sampled_from([0, 15_000]),
    data=st.data(),
)
def test_a_read_only_entity_is_left_alone_on_every_path(
    redis_client: redis.Redis,
    events: list[dict[str, Any]],
    batch: int,
    cached: int,
    data: st.DataObject,
) -> None:
    """Pairs of a slate read nothing from and add nothing to the entities their
    request counted in already (``FeatureRequest.read_only``): the script and the
    in-process path (against the engine) agree on every snapshot, their read-only
    groups empty, and on what the entities hold after."""
    store = redis_store(redis_client, new_namespace(), cached)
    if cached:
        tile_by_tile(store.engine)
    check_read_only(store, reference(), stream_requests(events, EXACT_PLAN), batch, data)


def check_read_only(
    store: RedisFeatureStore,
    memory: MemoryFeatureStore,
    reqs: list[FeatureRequest],
    batch: int,
    data: st.DataObject,
) -> None:
    """Marks some of each request's entities read-only (drawn from ``data``), runs
    the requests through ``store`` and ``memory`` in batches of ``batch``: the same
    snapshots, None exactly for the read-only entities' groups (tiles' and
    sessions'), and the same entities after, read at the newest time."""
    names = sorted(reqs[0].entities)
    marks = data.draw(st.lists(st.sets(st.sampled_from(names)), min_size=len(reqs),
                               max_size=len(reqs)))  # fmt: skip
    reqs = [replace(r, read_only=tuple(sorted(m))) for r, m in zip(reqs, marks, strict=True)]
    got, want = run_batches(store, reqs, batch), run_batches(memory, reqs, batch)

    def bits(snapshots: Sequence[FeatureSnapshot]) -> list[Any]:  # Lua's false is None here
        return [(s.event_id, s.late, [doubles(v) if isinstance(v, list) else None
                                      for v in s.aggregates]) for s in snapshots]  # fmt: skip

    assert bits(got) == bits(want)
    plan = memory.engine.plan
    groups = [g.entity_name for g in plan.groups] + [g.entity_name for g in plan.sessions]
    for snap, req in zip(want, reqs, strict=True):
        assert [v is None for v in snap.aggregates] == [n in req.read_only for n in groups]
    newest = max(r.ts for r in reqs)
    for entities in {str(r.entities): r.entities for r in reqs}.values():
        assert {k: float(v).hex() for k, v in store.read(entities, newest).items()} == {
            k: float(v).hex() for k, v in memory.read(entities, newest).items()
        }


served_batches = st.lists(
    st.lists(
        st.tuples(
            st.integers(0, 12),  # an event of the stream, or one never scored
            st.text(max_size=8),
            st.integers(0, 2**31),
            st.floats(0.0, 1.0),
        ),
        max_size=6,
        # one prediction per event and batch, as the scorer records them (a commit
        # keeps the last of two for one event, the scripts the first)
        unique_by=lambda served: served[0],
    ),
    max_size=3,
)
claim_rounds = st.lists(
    st.tuples(
        st.lists(st.integers(0, 12), max_size=6, unique=True),
        st.sampled_from(["a", "b", "c"]),  # the learner's run in the token
        st.sets(st.sampled_from(["a", "b", "c"])),  # runs that crashed (stale)
    ),
    max_size=4,
)


@SETTINGS
@given(
    events=streams(),
    in_process=st.booleans(),
    served=served_batches,
    claims=claim_rounds,
)
def test_the_served_and_claim_scripts_agree_with_the_embedded_store(
    redis_client: redis.Redis,
    events: list[dict[str, Any]],
    in_process: bool,
    served: list[list[tuple[int, str, int, float]]],
    claims: list[tuple[list[int], str, set[str]]],
) -> None:
    """Every stored snapshot byte for byte, whichever script (or commit) stored the
    snapshot and its first served prediction; and every label claim the same."""
    reqs = stream_requests(events[:10], EXACT_PLAN)
    store = redis_store(redis_client, new_namespace(), 15_000 if in_process else 0)
    memory = MemoryFeatureStore(EXACT_PLAN)
    predictions = [
        [(f"e{i}", ServedPrediction(model, version, p)) for i, model, version, p in batch]
        for batch in served
    ]
    if in_process:  # the scorer's path: the first predictions go with the commit
        store.update_and_read(reqs, commit=False)
        assert store.record_served(predictions[0] if predictions else [])
        memory.update_and_read(reqs)
        memory.record_served(predictions[0] if predictions else [])
    else:  # the snapshots as the server stored them, in both
        store.update_and_read(reqs)
        for r in reqs:
            memory.snapshots[r.event_id] = store.stored_snapshot(r.event_id, r.ts)
    for batch in predictions[1:] if in_process else predictions:
        assert store.record_served(batch) and memory.record_served(batch)
    for r in reqs:
        assert store.stored_snapshot(r.event_id, r.ts) == memory.snapshots[r.event_id]
    for n, (picked, run, crashed) in enumerate(claims):
        ids = [f"e{i}" for i in picked]
        tokens = [f"{run}:{n}"] * len(ids)
        known = [i < len(reqs) for i in picked]  # the learner holds the scored ones

        def stale(token: str, crashed: set[str] = crashed) -> bool:
            return token.split(":")[0] in crashed

        assert store.claim_labels(ids, tokens, known, stale) == memory.claim_labels(
            ids, tokens, known, stale
        )
    for event_id, token in memory.learned.items():
        assert redis_client.get(store.learned_key(event_id)) == token.encode()


def session_store(client: redis.Redis, ns: str, cached: int, plan: Any = None) -> RedisFeatureStore:
    return RedisFeatureStore(client, ns, plan or SESSION_PLAN, horizon_s=3600,
                             cached_entities=cached)  # fmt: skip


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    events=session_streams(min_size=10),
    batch=st.integers(1, 8),
    turns=st.lists(st.integers(0, 2), min_size=1),
    at=st.integers(-3600, 3600),
)
def test_session_features_agree_on_every_path_with_brute_force(
    redis_client: redis.Redis,
    events: list[dict[str, Any]],
    batch: int,
    turns: list[int],
    at: int,
) -> None:
    """Sessions through ``update_and_read.lua``, a scorer computing in process
    (holding every entity, or one: reloads from Redis) and ``commit.lua``, taking
    turns on one namespace (each reads the sessions the others wrote): every
    number as the embedded store gives it, and every session feature as the brute
    force recomputes it; ``read.lua`` as ``MemoryFeatureStore.read``."""
    ns = new_namespace()
    scorers = [session_store(redis_client, ns, 0), session_store(redis_client, ns, 15_000),
               session_store(redis_client, ns, 1)]  # fmt: skip
    reqs = session_requests(events)
    got = []
    for n, i in enumerate(range(0, len(reqs), batch)):
        got += scorers[turns[n % len(turns)]].update_and_read(reqs[i : i + batch])
    memory = MemoryFeatureStore(SESSION_PLAN)
    assert snapshot_bits(got) == snapshot_bits(run_batches(memory, reqs, batch))
    for snap, (values, late) in zip(got, session_brute_force(events), strict=True):
        assert snap.late == late
        assert {k: SESSION_PLAN.values(snap.aggregates)[k] for k in values} == values
    newest = max(e["ts"] for e in events)
    for entities in {str(r.entities): r.entities for r in reqs}.values():
        for when in (None, newest + at):
            want = memory.read(entities, when)
            assert scorers[0].read(entities, when) == want


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    events=session_streams(min_size=10),
    batch=st.integers(1, 8),
    cached=st.sampled_from([0, 15_000]),
    data=st.data(),
)
def test_a_read_only_entity_keeps_its_sessions_on_every_path(
    redis_client: redis.Redis,
    events: list[dict[str, Any]],
    batch: int,
    cached: int,
    data: st.DataObject,
) -> None:
    """A slate's pairs with session windows: an entity their request counted in
    already gets no event in its sessions and gives no aggregate (tile groups' nor
    session groups'), on the server and in process alike, and what the entities
    hold after is the same."""
    assert SESSION_PLAN.sessions
    store = session_store(redis_client, new_namespace(), cached)
    check_read_only(store, MemoryFeatureStore(SESSION_PLAN), session_requests(events), batch, data)


def test_an_added_session_feature_keeps_the_stored_layout(redis_client: redis.Redis) -> None:
    """A session feature added to a spec starts its sessions empty, and a tile
    window added after it is taken too; a session feature needing a statistic its
    group did not keep is refused, naming the group."""
    from riverflow.features.definitions import FeaturePlan, FeatureSpec
    from riverflow.features.store.redis_store import FeatureLayoutError

    def plan(*extra: dict[str, Any]) -> Any:
        base = [{"name": "n_1h", "agg": "count", "window": "1h"}]
        specs = [FeatureSpec.model_validate(f) for f in (*base, *extra)]
        return FeaturePlan.build(specs, "card_id", 0.0)

    ns = new_namespace()
    session = {"window": {"session": "30m", "grace": "5m"}}
    count = {"name": "s_n", "agg": "count", **session}
    late_tiles = {"name": "n_5m", "agg": "count", "window": "5m"}
    session_store(redis_client, ns, 0, plan()).check_layout()
    session_store(redis_client, ns, 0, plan(count)).check_layout()
    session_store(redis_client, ns, 0, plan()).check_layout()  # a scorer not yet upgraded
    session_store(redis_client, ns, 0, plan(count, late_tiles)).check_layout()
    session_store(redis_client, ns, 0, plan(late_tiles, count)).check_layout()
    maximum = {"name": "s_max", "agg": "max", "field": "amount", **session}
    reshaped = plan(count, late_tiles, maximum)
    with pytest.raises(FeatureLayoutError, match=r"session group 1: stored \['session'"):
        session_store(redis_client, ns, 0, reshaped).check_layout()


@settings(SETTINGS, max_examples=30)
@given(events=streams(), batch=st.integers(1, 25), turns=st.lists(st.integers(0, 1), min_size=1))
def test_long_set_values_written_in_process_are_read_by_the_scripts(
    redis_client: redis.Redis, events: list[dict[str, Any]], batch: int, turns: list[int]
) -> None:
    """A scorer in process encodes its entities with msgspec, which writes a string of
    32-255 bytes as str8 (msgpack's Packer wrote raw16): the scripts must read such
    states, here exact sets of merchant names of 40 and 300 characters, while a
    scorer on the server takes turns with it."""
    names = {"m0": "m0" + "x" * 38, "m1": "m1" + "y" * 298}
    events = [{**e, "merchant": names.get(e["merchant"], e["merchant"])} for e in events]
    ns = new_namespace()
    scorers = [redis_store(redis_client, ns), redis_store(redis_client, ns, cached=0)]
    tile_by_tile(scorers[0].engine)
    reqs = stream_requests(events, EXACT_PLAN)
    got = []
    for n, i in enumerate(range(0, len(reqs), batch)):
        got += scorers[turns[n % len(turns)]].update_and_read(reqs[i : i + batch])
    assert snapshot_bits(got) == snapshot_bits(run_batches(reference(), reqs, batch))
