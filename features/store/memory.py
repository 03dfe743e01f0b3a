"""The embedded runtime's store: the tiles in dictionaries, computed with
``features.tiles`` as the Redis store's in-process path computes them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import orjson

from riverflow.features.definitions import FeaturePlan
from riverflow.features.store.base import (
    ORPHAN,
    Claim,
    FeatureRequest,
    FeatureSnapshot,
    encode_snapshot,
    packed,
    with_served,
)
from riverflow.features.tiles import Engine, Entity
from riverflow.streams.contracts import ServedPrediction


class MemoryFeatureStore:
    """The embedded runtime's store: same semantics as Redis, in dictionaries.

    Keys do not expire here: the embedded runtime serves bounded runs (demo, tests).
    """

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.engine = Engine(plan)
        self.entities: dict[tuple[str, str], Entity] = {}
        self.batches = {"in_process": 0, "server": 0, "refused": 0}
        self.snapshots: dict[str, bytes] = {}
        self.learned: dict[str, str] = {}

    def update_and_read(
        self, batch: Sequence[FeatureRequest], commit: bool = True
    ) -> list[FeatureSnapshot]:
        out = []
        entities, step = self.entities, self.engine.step
        self.batches["in_process"] += 1
        for req in batch:
            stored = self.snapshots.get(req.event_id)
            if stored is not None:
                out.append(FeatureSnapshot.decode(req.event_id, stored, replayed=True))
                continue
            ents = {}
            for name, value in req.entities.items():
                ent = entities.get((name, value))
                if ent is None:
                    ent = entities[name, value] = Entity()
                ents[name] = ent
            vectors, late, _ = step(ents, req.ts, req.numbers, req.distinct)
            self.snapshots[req.event_id] = encode_snapshot(req.context, vectors, late)
            out.append(FeatureSnapshot(req.event_id, orjson.loads(req.context), vectors, late=late))
        return out

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> bool:
        for event_id, prediction in served:
            raw = self.snapshots.get(event_id)
            stored = None if raw is None else with_served(raw, packed(prediction))
            if stored is not None:
                self.snapshots[event_id] = stored
        return True

    def claim_snapshots(
        self, event_ids: Sequence[str], tokens: Sequence[str], stale: Callable[[str], bool]
    ) -> list[FeatureSnapshot | Claim]:
        out: list[FeatureSnapshot | Claim] = []
        for event_id, token in zip(event_ids, tokens, strict=True):
            raw = self.snapshots.get(event_id)
            marked = self.learned.get(event_id)
            if marked == ORPHAN:
                out.append(Claim.ORPHANED)
            elif raw is None:
                out.append(Claim.MISSING)
            elif marked is not None and not stale(marked):
                out.append(Claim.DUPLICATE)
            else:
                self.learned[event_id] = token
                out.append(FeatureSnapshot.decode(event_id, raw))
        return out

    def mark_orphans(self, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            self.learned.setdefault(event_id, ORPHAN)

    def release_learned(self, event_ids: Sequence[str], keep_s: float) -> None:
        if keep_s > 0:
            return  # keys do not expire here
        for event_id in event_ids:
            self.snapshots.pop(event_id, None)
            self.learned.pop(event_id, None)

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        aggregates: list[list[float] | None] = []
        for gi, g in enumerate(self.plan.groups):
            value = entities.get(g.entity_name)
            ent = None if value is None else self.entities.get((g.entity_name, value))
            aggregates.append(None if ent is None else self.engine.read(gi, ent, at))
        return self.plan.current_values(aggregates)
