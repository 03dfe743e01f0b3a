"""The forms the scorer's cache keeps its entities in (compact, or as stored when that
is small): exact, and small."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from riverflow.features.tiles import (
    HELD_AS_STORED_BYTES,
    Engine,
    Entity,
    compact_entity,
    encode_entity,
    expand_entity,
    expand_held,
    held_entity,
    pack_entity,
)
from riverflow.spec import load_spec
from tests.feature_streams import EXACT_PLAN, PLAN, START_TS, event_streams

BENCH_SPEC = Path(__file__).parents[2] / "examples" / "fraud-bench.yaml"


def bits(vectors: list[list[Any]]) -> list[list[str]]:
    return [[float(x).hex() for x in v] for v in vectors]


def replay(
    engine: Engine, events: list[dict[str, Any]], recompact: set[int], stored: bool = False
) -> list[Any]:
    """Every event's vectors; after the events at ``recompact``, every entity
    compacted and expanded again, as the scorer's cache does (``stored``: held as
    ``held_entity`` holds it with its stored state, which small ones are kept as)."""
    ents: dict[tuple[str, str], Entity] = {}
    versions: dict[tuple[str, str], int] = {}
    out = []
    for i, e in enumerate(events):
        names = {g.entity_name: g.entity for g in engine.plan.groups}
        keys = {n: (n, "|".join(str(e[f]) for f in fields)) for n, fields in names.items()}
        mine = {n: ents.setdefault(k, Entity()) for n, k in keys.items()}
        vectors, late, _ = engine.step(mine, e["ts"], {"amount": e["amount"]},
                                       {"merchant": e["merchant"]})  # fmt: skip
        out.append((bits(vectors), late))
        if i in recompact:
            for k, ent in ents.items():
                versions[k] = versions.get(k, 0) + 1
                if stored:
                    held = held_entity(engine, ent, versions[k], encode_entity(engine, ent))
                    ents[k], version = expand_held(engine, held)
                else:
                    held = compact_entity(engine, ent, versions[k])
                    ents[k], version = expand_entity(engine, held)
                assert version == versions[k]
    out.append(sorted((k, pack_entity(engine, ent)) for k, ent in ents.items()))
    return out


@settings(max_examples=300, deadline=None)
@given(
    events=event_streams(),
    recompact=st.sets(st.integers(0, 60)),
    plan=st.sampled_from([PLAN, EXACT_PLAN]),
    incremental=st.booleans(),
    stored=st.booleans(),
)
def test_a_compacted_entity_expands_to_the_same_numbers_bit_for_bit(
    events: list[dict[str, Any]], recompact: set[int], plan: Any, incremental: bool,
    stored: bool,
) -> None:  # fmt: skip
    engines = [Engine(plan), Engine(plan)]
    if not incremental:  # windows added up tile by tile: running totals never made
        for engine in engines:
            for kernel in engine.kernels:
                kernel.incremental = False
    assert replay(engines[0], events, recompact, stored) == replay(engines[1], events, set())


def test_a_held_fraud_bench_entity_costs_at_most_460_bytes() -> None:
    """The scorer's cache holds 500,000 entities by default in the 300 MB scorer
    budget: an entity held there compact, with its key and its slot in the dictionary,
    costs at most 460 bytes after a day of 20 events (the slot grows to ~40 B
    at 500,000 entities: docs/architecture.md, "Capacity")."""
    engine = Engine(load_spec(BENCH_SPEC).feature_plan())
    rng = random.Random(1)
    n = 5_000
    events = sorted(
        (START_TS + rng.uniform(0, 86_400), card, round(rng.lognormvariate(3.3, 0.9), 2))
        for card in range(n)
        for _ in range(20)
    )
    ents: dict[int, Entity] = {}
    for ts, card, amount in events:
        engine.step({"card_id": ents.setdefault(card, Entity())}, ts, {"amount": amount}, {})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = {f"c{card:07d}": compact_entity(engine, ent, 20) for card, ent in ents.items()}
        per_entity = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_entity <= 460, f"{per_entity:.0f} bytes per held entity"
    ent, version = expand_entity(engine, held["c0000042"])
    assert version == 20 and pack_entity(engine, ent) == pack_entity(engine, ents[42])


def test_a_small_entity_is_held_as_stored_and_a_large_one_compact() -> None:
    """The scorer holds an entity whose stored state is small (a slate's user, item or
    user x category: a tile or two) as that state, which its last commit encoded
    anyway, and a larger one compact (smaller by half: the 460 bytes above). Either
    comes back as the same numbers with its version."""
    recsys, fraud = (
        Engine(load_spec("recsys").feature_plan()),
        Engine(load_spec(BENCH_SPEC).feature_plan()),
    )
    small, large = Entity(), Entity()
    recsys.step({"item_id": small}, START_TS, {}, {})
    recsys.step({"item_id": small}, START_TS + 5_000.0, {}, {})
    for i in range(20):
        fraud.step({"card_id": large}, START_TS + 4_000.0 * i, {"amount": 3.0 + i}, {})
    for engine, ent, version, as_stored in (
        (recsys, small, 2**62 + 7, True),
        (fraud, large, 2**40, False),
    ):
        state = encode_entity(engine, ent)
        assert (len(state) <= HELD_AS_STORED_BYTES) is as_stored
        held = held_entity(engine, ent, version, state)
        assert (held == compact_entity(engine, ent, version)) is not as_stored
        assert held_entity(engine, ent, version) == compact_entity(engine, ent, version)
        back, got = expand_held(engine, held)
        assert got == version and pack_entity(engine, back) == pack_entity(engine, ent)
        if not as_stored:
            assert len(held) < len(state) / 1.5
