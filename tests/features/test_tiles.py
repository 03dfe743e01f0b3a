"""The compact form the scorer's cache keeps its entities in: exact, and small."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from riverflow.features.tiles import Engine, Entity, compact_entity, expand_entity, pack_entity
from riverflow.spec import load_spec
from tests.feature_streams import EXACT_PLAN, PLAN, START_TS, event_streams

BENCH_SPEC = Path(__file__).parents[2] / "examples" / "fraud-bench.yaml"


def bits(vectors: list[list[Any]]) -> list[list[str]]:
    return [[float(x).hex() for x in v] for v in vectors]


def replay(engine: Engine, events: list[dict[str, Any]], recompact: set[int]) -> list[Any]:
    """Every event's vectors; after the events at ``recompact``, every entity
    compacted and expanded again, as the scorer's cache does."""
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
                ents[k], version = expand_entity(engine, compact_entity(engine, ent, versions[k]))
                assert version == versions[k]
    out.append(sorted((k, pack_entity(engine, ent)) for k, ent in ents.items()))
    return out


@settings(max_examples=300, deadline=None)
@given(
    events=event_streams(),
    recompact=st.sets(st.integers(0, 60)),
    plan=st.sampled_from([PLAN, EXACT_PLAN]),
    incremental=st.booleans(),
)
def test_a_compacted_entity_expands_to_the_same_numbers_bit_for_bit(
    events: list[dict[str, Any]], recompact: set[int], plan: Any, incremental: bool
) -> None:
    engines = [Engine(plan), Engine(plan)]
    if not incremental:  # windows added up tile by tile: running totals never made
        for engine in engines:
            for kernel in engine.kernels:
                kernel.incremental = False
    assert replay(engines[0], events, recompact) == replay(engines[1], events, set())


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
