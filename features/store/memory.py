"""The embedded runtime's store: the tiles in dictionaries, computed with
``features.tiles`` as the Redis store's in-process path computes them."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import orjson

from riverflow.features.definitions import FeaturePlan
from riverflow.features.store.base import (
    ORPHAN,
    Claim,
    FeatureRequest,
    FeatureSnapshot,
    encode_snapshot,
    evict_oldest,
    packed,
    with_served,
)
from riverflow.features.tiles import Engine, Entity
from riverflow.streams.contracts import ServedPrediction


class MemoryFeatureStore:
    """The embedded runtime's store: same semantics as Redis, in dictionaries.

    What Redis expires is bounded here by count as well as by time, so that a
    long run holds what is in flight, not its history: a learned label's mark
    (and an orphan's) goes ``keep_s`` after its release or once ``max_released``
    newer ones are kept, whichever comes first; the snapshots, which only
    recognise replays, are the newest ``max_snapshots`` (Redis: those of the
    replay window).
    """

    def __init__(
        self,
        plan: FeaturePlan,
        max_snapshots: int = 100_000,
        max_released: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan
        self.engine = Engine(plan)
        self.entities: dict[tuple[str, str], Entity] = {}
        self.batches = {"in_process": 0, "server": 0, "refused": 0}
        self.snapshots: dict[str, bytes] = {}
        self.learned: dict[str, str] = {}
        self.max_snapshots = max_snapshots
        self.max_released = max_released
        self.clock = clock
        self._order: deque[str] = deque()  # snapshot ids, oldest first (some gone since)
        self._released: deque[tuple[float, str]] = deque()  # (when it goes, event id)

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
            vectors, late, _ = step(ents, req.ts, req.numbers, req.distinct, req.read_only)
            self.snapshots[req.event_id] = encode_snapshot(req.context, vectors, late)
            self._order.append(req.event_id)
            out.append(FeatureSnapshot(req.event_id, orjson.loads(req.context), vectors, late=late))
        self._order = evict_oldest(self.snapshots, self._order, self.max_snapshots)
        return out

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> bool:
        for event_id, prediction in served:
            raw = self.snapshots.get(event_id)
            stored = None if raw is None else with_served(raw, packed(prediction))
            if stored is not None:
                self.snapshots[event_id] = stored
        return True

    def claim_labels(
        self,
        event_ids: Sequence[str],
        tokens: Sequence[str],
        known: Sequence[bool],
        stale: Callable[[str], bool],
    ) -> list[Claim]:
        out: list[Claim] = []
        marks = self.learned
        for event_id, token, held in zip(event_ids, tokens, known, strict=True):
            marked = marks.get(event_id)
            if marked == ORPHAN:
                out.append(Claim.ORPHANED)
            elif marked is not None and not stale(marked):
                out.append(Claim.DUPLICATE)
            elif held:
                marks[event_id] = token
                out.append(Claim.CLAIMED)
            else:
                out.append(Claim.MISSING)
        return out

    def mark_orphans(self, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            self.learned.setdefault(event_id, ORPHAN)
        self._release(event_ids, math.inf)  # Redis: the horizon's TTL; here by count

    def release_learned(self, event_ids: Sequence[str], keep_s: float) -> None:
        if keep_s <= 0:
            for event_id in event_ids:
                self.learned.pop(event_id, None)
            return
        self._release(event_ids, self.clock() + keep_s)

    def _release(self, event_ids: Sequence[str], until: float) -> None:
        released = self._released
        released.extend((until, event_id) for event_id in event_ids)
        now = self.clock()
        while released and (len(released) > self.max_released or released[0][0] <= now):
            _, event_id = released.popleft()
            self.learned.pop(event_id, None)

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        aggregates: list[list[float] | None] = []
        for gi, g in enumerate(self.plan.groups):
            value = entities.get(g.entity_name)
            ent = None if value is None else self.entities.get((g.entity_name, value))
            aggregates.append(None if ent is None else self.engine.read(gi, ent, at))
        for si, sg in enumerate(self.plan.sessions):
            value = entities.get(sg.entity_name)
            ent = None if value is None else self.entities.get((sg.entity_name, value))
            aggregates.append(None if ent is None else self.engine.read_session(si, ent, at))
        return self.plan.current_values(aggregates)
