"""Features fed by labels: click-through rates, counts and recency, learned as
labels come, read by the scorer.

A label-fed feature (``source: labels`` in the spec, ``features.definitions``)
aggregates the labels the learner has learned, each at its event's time (a
recommendation request's time), per entity: a request field (``user_id``), a
slate item's field (``item_id``) or several (``[user_id, category]``).

- ``count``: labels in the window (times shown); ``when: clicked``: positive ones.
- ``sum`` of the label field: its total (clicks).
- ``rate`` of the label field: ``sum / count`` (clicks / shown), 0 with no label;
  with ``prior: m``, ``(sum + m * global) / (count + m)``, where ``global`` is the
  same window's rate over every label: a new user or item starts at the global
  rate and moves to its own as its labels come.
- ``since``: seconds from the read time back to the newest label in the window
  (``when: clicked``: the newest positive one); the window's length if none. With
  ``decay: d``, ``exp(-seconds / d)`` instead, 0 if none: raw seconds (up to a week)
  saturate an SGD-trained model, this stays in [0, 1].

The windows are the events' tiles (``features.tiles``), kept by the same stores
under their own keys (``rf:{ns}:lab:``): a ``LabelPlan`` turns these features
into a ``FeaturePlan`` whose "events" are labels, with a few derived fields
(``@all``: one entity for the global rate; ``@when``, ``@ts``, ``@when_ts``).
The learner writes a batch of learned labels (``LabelFeatures.write``: one call);
the scorer reads a batch of pairs (``LabelFeatures.read``: one round trip).

Point in time. A label updates the windows at its event's time, when it is
learned: a read at time ``at`` sees the labels learned before it whose tile lies
in the window ending at ``at``'s tile (a label later than ``at`` in that same
tile too: the tile width bounds that look-ahead), and none learned after it.
A label older than its entity's newest label by more than ``lateness_s`` is
counted nowhere (``LabelWrite.late``): ``lateness_s`` covers how far labels come
out of order (a click comes at once, a timeout negative ``after`` later).
A label written again within ``dedup_s`` (a learner restarted from a checkpoint
learns it again) is recognised by its pair id and not counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import msgpack

from riverflow.features.definitions import (
    Aggregation,
    FeaturePlan,
    FeatureSource,
    FeatureSpec,
    entity_value,
    parse_duration,
)
from riverflow.features.store.base import FeatureRequest, FeatureSnapshot
from riverflow.features.store.memory import MemoryFeatureStore
from riverflow.features.store.redis_store import RedisFeatureStore
from riverflow.features.tiles import MAX_TIME_S, Engine, Entity, check_time, unpack_entity

# derived fields of a label "event" (``@`` keeps them apart from the spec's fields)
ALL, WHEN, TS, WHEN_TS = "@all", "@when", "@ts", "@when_ts"
NEVER = -MAX_TIME_S  # ``@when_ts`` of a negative label: older than any time
KEY_PART = "lab:"  # label-fed state sits under rf:{ns}:lab:
# what a group of an entity without labels gives a read (one object: pairs of new
# entities share their values; never changed)
_NOTHING: dict[str, float] = {}


@dataclass(frozen=True)
class LearnedLabel:
    """One learned label, as the learner hands it to ``LabelFeatures.write``.

    ``pair_id``: the labelled pair (``{request}/{item}``; a fraud event's id);
    ``fields``: the request's fields and the item's (the entities are read from
    them); ``value``: the label (bool or number); ``ts``: its event's time (s)."""

    pair_id: str
    fields: Mapping[str, Any]
    value: bool | float
    ts: float


@dataclass(frozen=True)
class LabelWrite:
    """What one ``write`` did: labels counted, labels seen before within the
    dedup window (not counted again), labels too late for some window."""

    counted: int = 0
    duplicates: int = 0
    late: int = 0


@dataclass(frozen=True)
class LabelPlan:
    """The label-fed features of a spec, and the tile plan computing them.

    Per feature ``name`` the tile plan holds what it reads: ``name__n`` (the count),
    ``name__s`` (the sum of the label field, or of ``@when``), ``name__max`` (the
    newest ``@ts`` or ``@when_ts``), ``name__gn`` and ``name__gs`` (the global count
    and sum for the prior).
    """

    features: tuple[FeatureSpec, ...]
    label_field: str
    tiles: FeaturePlan

    @classmethod
    def build(
        cls,
        features: Sequence[FeatureSpec],
        label_field: str,
        default_entity: str,
        lateness_s: float,
    ) -> LabelPlan:
        """``features``: the spec's ``source: labels`` features; ``label_field``: the
        label's field (``clicked``); ``default_entity``: the entity of a feature that
        names none (the events' key); ``lateness_s``: how far behind its entity's
        newest label a label still counts."""
        inner: list[FeatureSpec] = []
        for f in features:
            if f.source is not FeatureSource.LABELS:
                raise ValueError(f"feature {f.name!r}: a label plan takes source: labels only")
            for role, name in (("field", f.field), ("when", f.when)):
                if name is not None and name != label_field:
                    raise ValueError(
                        f"feature {f.name!r}: {role} {name!r} is not the label field "
                        f"{label_field!r} (a label-fed feature aggregates the label)"
                    )
            for name in f.entity_fields(default_entity):
                if name.startswith("@"):
                    raise ValueError(f"feature {f.name!r}: entity {name!r}: '@' is reserved")
            inner += _inner(f, default_entity)
        return cls(
            tuple(features), label_field, FeaturePlan.build(inner, default_entity, lateness_s)
        )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def request(self, label: LearnedLabel) -> FeatureRequest:
        """The tile plan's "event" for one label."""
        value = _number(label)
        ts = check_time(float(label.ts))
        positive = value != 0.0
        derived = {
            self.label_field: value, WHEN: 1.0 if positive else 0.0, TS: ts,
            WHEN_TS: ts if positive else NEVER,
        }  # fmt: skip
        numbers = {f: derived[f] for f in self.tiles.number_fields}
        return FeatureRequest(label.pair_id, ts, self.entity_keys(label.fields), numbers, b"{}")

    def entity_keys(self, fields: Mapping[str, Any]) -> dict[str, str]:
        """Every entity of the plan (name -> value) in a pair's fields."""
        return {name: values[0] for name, values in self.entity_columns([fields]).items()}

    def entity_columns(self, pairs: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
        """``entity_keys`` of many pairs, by entity: name -> each pair's value."""
        try:
            out = {}
            for name, e, one in self._entities:
                if e == (ALL,):
                    out[name] = ["1"] * len(pairs)
                elif one:
                    field = e[0]
                    out[name] = [str(fields[field]) for fields in pairs]
                else:
                    out[name] = [entity_value(e, fields) for fields in pairs]
            return out
        except KeyError:
            missing = next(f for fields in pairs for _, e, _ in self._entities if e != (ALL,)
                           for f in e if f not in fields)  # fmt: skip
            raise ValueError(f"label-fed features: the pair has no field {missing!r}") from None

    @cached_property
    def _entities(self) -> list[tuple[str, tuple[str, ...], bool]]:
        """Per entity of the plan: its name, fields, whether it is one field (built
        once: ``entity_keys`` runs per pair)."""
        return [("+".join(e), e, len(e) == 1) for e in self.tiles.entities]

    def values(self, aggregates: list[list[Any] | None], at: float) -> dict[str, float]:
        """The features from a pair's group aggregates (None: no state) read at ``at``."""
        return self.values_of(self.tiles.current_values(aggregates), at)

    def values_of(self, inner: Mapping[str, float], at: float) -> dict[str, float]:
        """The features from the tile plan's values (``FeaturePlan.current_values``)."""
        return {name: read(inner, at) for name, read in self._readers}

    @cached_property
    def _readers(self) -> list[tuple[str, Callable[[Mapping[str, float], float], float]]]:
        """Per feature: its name and how to read it from the tile plan's values
        (built once: ``values`` runs per pair)."""
        return [(f.name, _reader(f)) for f in self.features]


def _reader(f: FeatureSpec) -> Callable[[Mapping[str, float], float], float]:
    n, s, newest = f"{f.name}__n", f"{f.name}__s", f"{f.name}__max"
    match f.agg:
        case Aggregation.COUNT if f.when:
            return lambda v, _: v.get(s, 0.0)
        case Aggregation.COUNT:
            return lambda v, _: v.get(n, 0.0)
        case Aggregation.SUM:
            return lambda v, _: v.get(s, 0.0)
        case Aggregation.SINCE if f.decay:
            window_s, tau = parse_duration(str(f.window)), parse_duration(f.decay)
            # no label (or no positive one) in the window: 0, as if infinitely long ago
            return lambda v, at: (
                math.exp(-min(window_s, max(0.0, at - v[newest])) / tau)
                if v.get(n) and v.get(newest, NEVER) > NEVER else 0.0
            )  # fmt: skip
        case Aggregation.SINCE:
            window_s = parse_duration(str(f.window))
            # no label (or no positive one) in the window: at least a window ago
            return lambda v, at: (
                min(window_s, max(0.0, at - v.get(newest, NEVER))) if v.get(n) else window_s
            )
    m = f.prior
    if not m:
        return lambda v, _: v[s] / v[n] if v.get(n) else 0.0
    gn, gs = f"{f.name}__gn", f"{f.name}__gs"

    def smoothed(v: Mapping[str, float], _: float) -> float:
        overall = v[gs] / v[gn] if v.get(gn) else 0.0
        return (v.get(s, 0.0) + m * overall) / (v.get(n, 0.0) + m)

    return smoothed


def _inner(f: FeatureSpec, default_entity: str) -> list[FeatureSpec]:
    """The events-style features a label-fed one reads (see ``LabelPlan``)."""

    def part(
        suffix: str, agg: Aggregation, field: str | None = None, entity: Any = None
    ) -> FeatureSpec:
        return FeatureSpec(
            name=f"{f.name}__{suffix}", agg=agg, field=field, window=f.window,
            buckets=f.buckets, entity=entity or f.entity_fields(default_entity),
        )  # fmt: skip

    out = [part("n", Aggregation.COUNT)]
    match f.agg:
        case Aggregation.COUNT if f.when:
            out.append(part("s", Aggregation.SUM, WHEN))
        case Aggregation.SUM | Aggregation.RATE:
            out.append(part("s", Aggregation.SUM, f.field))
        case Aggregation.SINCE:
            out.append(part("max", Aggregation.MAX, WHEN_TS if f.when else TS))
    if f.prior:
        out += [
            part("gn", Aggregation.COUNT, None, (ALL,)),
            part("gs", Aggregation.SUM, f.field, (ALL,)),
        ]
    return out


def _number(label: LearnedLabel) -> float:
    value = label.value
    if isinstance(value, bool | int | float) and math.isfinite(value):
        return float(value)
    raise ValueError(
        f"label-fed features: the label of {label.pair_id!r} is {value!r}, "
        "not a bool or finite number"
    )


class _States(Protocol):
    """Where the label windows live: the tile stores, seen from here."""

    engine: Engine

    def update(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]: ...

    def load(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Entity]: ...

    def forget(self, field: str, value: str) -> int: ...

    def check_layout(self) -> None: ...

    def reset(self) -> int: ...


class _MemoryStates:
    def __init__(self, store: MemoryFeatureStore) -> None:
        self.store = store
        self.engine = store.engine

    def update(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        return self.store.update_and_read(batch)

    def load(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Entity]:
        entities = self.store.entities
        return {k: ent for k in keys if (ent := entities.get(k)) is not None}

    def check_layout(self) -> None:
        """Nothing is stored across runs in memory."""

    def reset(self) -> int:
        n = len(self.store.entities)
        self.store.entities.clear()
        return n

    def forget(self, field: str, value: str) -> int:
        entities = self.store.entities
        gone = [
            (name, v) for name, v in entities
            if field in (parts := name.split("+")) and v.split("|")[parts.index(field)] == value
        ]  # fmt: skip
        for key in gone:
            del entities[key]
        return len(gone)


class _RedisStates:
    def __init__(self, store: RedisFeatureStore) -> None:
        self.store = store
        self.engine = store.engine

    def update(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        return self.store.update_and_read(batch)

    def load(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Entity]:
        order = list(keys)
        if not order:
            return {}
        key = self.store.entity_key
        replies = self.store.stored_states([key(name, value) for name, value in order])
        return {
            k: unpack_entity(self.engine, msgpack.unpackb(raw, strict_map_key=False))
            for k, raw in zip(order, replies, strict=True)
            if raw
        }

    def forget(self, field: str, value: str) -> int:
        return self.store.forget(field, value)[0]

    def check_layout(self) -> None:
        self.store.check_layout()

    def reset(self) -> int:
        return self.store.reset()


class LabelFeatures:
    """Label-fed features over a store: ``write`` (the learner), ``read`` (the scorer).

    ``LabelFeatures.in_memory`` for the embedded runtime, ``LabelFeatures.on_redis``
    in production (see the module docstring for what a read sees).
    """

    def __init__(self, plan: LabelPlan, states: _States) -> None:
        # ``read`` takes a window's part as the same at every time of its tile bucket
        assert not plan.tiles.timed_groups, "a label plan holds no time since an event"
        self.plan = plan
        self._states = states
        self._groups = [g.entity_name for g in plan.tiles.groups]

    @classmethod
    def in_memory(cls, plan: LabelPlan, max_dedup: int = 100_000) -> LabelFeatures:
        """In dictionaries; the last ``max_dedup`` pair ids are recognised."""
        return cls(plan, _MemoryStates(MemoryFeatureStore(plan.tiles, max_snapshots=max_dedup)))

    @classmethod
    def on_redis(
        cls,
        client: Any,
        namespace: str,
        plan: LabelPlan,
        dedup_s: float = 900.0,
        wait_replicas: int = 0,
        wait_timeout_s: float = 1.0,
    ) -> LabelFeatures:
        """On Redis under ``rf:{ns}:lab:`` (one Redis or a cluster: ``client``).

        A write is one Lua call that updates the windows on the server, atomic, so
        any number of learners may write; a pair id is recognised for ``dedup_s``.
        ``wait_replicas``: as ``RedisFeatureStore``'s."""
        store = RedisFeatureStore(
            client, namespace, plan.tiles, horizon_s=dedup_s, cached_entities=0,
            replay_window_s=dedup_s, wait_replicas=wait_replicas,
            wait_timeout_s=wait_timeout_s, key_part=KEY_PART,
        )  # fmt: skip
        return cls(plan, _RedisStates(store))

    @property
    def names(self) -> list[str]:
        """The features ``read`` returns, in spec order."""
        return self.plan.names

    def check_layout(self) -> None:
        """On Redis: refuse a plan laid out differently from the stored state
        (``RedisFeatureStore.check_layout``, ``FeatureLayoutError``); call it at start."""
        self._states.check_layout()

    def forget(self, field: str, value: str) -> int:
        """Erase the windows of the entity whose ``field`` is ``value`` (as stored),
        alone and in every composite entity it is part of (right to erasure);
        returns the entity values deleted. The global rate keeps its counts."""
        return self._states.forget(field, value)

    def reset(self) -> int:
        """Delete every label-fed window and the stored layout (``features reset``);
        returns the entity values deleted."""
        return self._states.reset()

    def write(self, labels: Sequence[LearnedLabel]) -> LabelWrite:
        """Add learned labels to their windows, each at its event time: one call."""
        if not labels:
            return LabelWrite()
        request = self.plan.request
        snapshots = self._states.update([request(label) for label in labels])
        duplicates = sum(s.replayed for s in snapshots)
        late = sum(s.late and not s.replayed for s in snapshots)
        return LabelWrite(len(labels) - duplicates, duplicates, late)

    def read(
        self, pairs: Sequence[Mapping[str, Any]], at: float | Sequence[float]
    ) -> list[dict[str, float]]:
        """Per pair (its request's fields and its item's), the label-fed features at
        event time ``at`` (one time for all, or one per pair): one round trip."""
        times = [float(at)] * len(pairs) if isinstance(at, int | float) else list(at)
        if len(times) != len(pairs):
            raise ValueError(f"read: {len(pairs)} pairs but {len(times)} read times")
        for t in set(times):
            check_time(t)
        plan = self.plan
        columns = plan.entity_columns(pairs)
        states = self._states.load(
            {(name, value) for name, values in columns.items() for value in set(values)}
        )
        engine = self._states.engine
        part = plan.tiles.group_values
        # by group, column-wise: what each pair reads there, as the part of the tile
        # plan's values it gives, once per entity value and window (a slate's pairs
        # share their request's user and the global counts; an item is shown to many
        # requests of a batch, at times in one tile bucket). A label plan's groups hold
        # counts, sums and maxima (``_inner``): a window's part is the same at every
        # time of its bucket. An entity without labels reads nothing
        parts: list[list[dict[str, float]]] = []
        for gi, name in enumerate(self._groups):
            width = engine.kernels[gi].width
            memo: dict[tuple[str, int], dict[str, float]] = {}
            column = []
            for value, t in zip(columns[name], times, strict=True):
                key = (value, int(t // width))
                got = memo.get(key)
                if got is None:
                    ent = states.get((name, value))
                    window = None if ent is None else engine.window(gi, ent, key[1])
                    got = memo[key] = _NOTHING if window is None else part(gi, window[1])
                column.append(got)
            parts.append(column)
        # the values of one set of parts at one time, once (e.g. pairs of new entities)
        done: dict[tuple[Any, ...], dict[str, float]] = {}
        of = plan.values_of
        out = []
        for t, *these in zip(times, *parts, strict=True):
            same = (t, *map(id, these))  # (the memos keep each part alive)
            values = done.get(same)
            if values is None:
                inner: dict[str, float] = {}
                for p in these:
                    inner.update(p)
                values = done[same] = of(inner, t)
            out.append(dict(values))
        return out
