"""Feature declarations and how their values derive from tile aggregates.

A feature is an aggregation of one event field per entity over an event-time
window. Windows are made of tiles (time buckets): a window of length ``W`` with
``B`` buckets of width ``W / B`` covers the event's own bucket and the ``B - 1``
before it. Features that share an entity and a window share one group of tiles;
all the groups of one entity value are kept together (one Redis value).

An entity is one event field (``card_id``) or several (``[card_id, merchant]``,
a composite key). A feature whose entity is not the event key reads (and
updates) that other entity's aggregates: ``{entity: merchant}`` on a card event
joins the merchant's window onto it.

Lateness: per entity value the store keeps the newest event time seen (the
watermark ``w``). An event with ``ts >= w - lateness`` lands in its own bucket,
however out of order. An older one is *too late*: it changes no aggregate and
is scored with the entity's current window (the one ending at the newest
bucket); the snapshot says so (``late``) and the scorer counts it.

Session windows (``window: {session: 30m, grace: 5m}``) are not tiled: per
entity the store keeps the sessions an event may still join (``features.sessions``
says which and why that is a bounded few). Features sharing an entity, a gap and
a grace share one ``SessionGroup``.

A feature says where its values come from: ``source: events`` (the default:
everything above, computed by the scorer as events come) or ``source: labels``,
fed by the labels the learner learns (``features.labelled``): ``count`` (labels,
or with ``when: clicked`` positive ones), ``sum`` and ``rate`` of the label field
(``rate`` smoothed toward the global rate with ``prior: m``), and ``since`` (seconds
since the newest label, or positive one, in the window). ``FeaturePlan`` plans the
events-sourced ones only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``'10m'`` -> 600.0 seconds. Units: ms, s, m, h, d."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 10m, 1h, 7d)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


Duration = Annotated[str, AfterValidator(_check_duration)]


class Aggregation(StrEnum):
    """What a feature computes over its window."""

    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    STD = "std"  # population standard deviation, from sum and sum of squares
    MIN = "min"
    MAX = "max"
    DISTINCT = "distinct"  # HyperLogLog in Redis (standard error 0.81%), exact in memory
    DISTINCT_EXACT = "distinct_exact"  # a set of values per tile: exact, costs memory
    LAST = "last"  # the field's value in the entity's previous event in the window
    SINCE_PREVIOUS = "since_previous"  # seconds since that previous event
    ZSCORE = "zscore"  # (value - window mean) / window std, 0 when std is 0
    DURATION = "duration"  # session windows: seconds from the session's first event to its last
    # fed by labels only (``source: labels``, ``features.labelled``)
    RATE = "rate"  # the label field's mean (clicks / shown), smoothed with ``prior``
    SINCE = "since"  # seconds from the read time back to the window's newest label


class FeatureSource(StrEnum):
    """What feeds a feature's windows."""

    EVENTS = "events"  # the events stream, as the scorer reads it
    LABELS = "labels"  # the labels the learner learns, at their event's time


NO_FIELD = {
    Aggregation.COUNT, Aggregation.SINCE_PREVIOUS, Aggregation.DURATION, Aggregation.SINCE,
}  # fmt: skip
# what a label-fed feature computes, and what only a label-fed one does
LABEL_AGGS = {Aggregation.COUNT, Aggregation.SUM, Aggregation.RATE, Aggregation.SINCE}
LABEL_ONLY = {Aggregation.RATE, Aggregation.SINCE}
# label-fed aggregations that may count positive labels only (``when``)
WHEN_AGGS = {Aggregation.COUNT, Aggregation.SINCE}
# what a session window computes (``duration`` only there)
SESSION_AGGS = {
    Aggregation.COUNT, Aggregation.DURATION, Aggregation.SUM, Aggregation.MEAN,
    Aggregation.MIN, Aggregation.MAX,
}  # fmt: skip
BUCKETS = 12  # tiles per window unless a feature says
# a session's state grows with grace / session (see ``SessionGroup.max_sessions``)
MAX_GRACE_PER_GAP = 10


class SessionWindow(BaseModel):
    """``{session: 30m, grace: 5m}``: a session closes after ``session`` without an
    event (event time); an event up to ``grace`` older than its entity's newest
    one still joins (or bridges) its sessions, an older one is late."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session: Duration
    grace: Duration | None = Field(None, description="default: no out-of-order event joins")

    @property
    def gap_s(self) -> float:
        return parse_duration(self.session)

    @property
    def grace_s(self) -> float:
        return parse_duration(self.grace) if self.grace else 0.0

    def model_post_init(self, _context: object) -> None:
        if self.grace_s > MAX_GRACE_PER_GAP * self.gap_s:
            raise ValueError(
                f"session window: grace {self.grace} exceeds {MAX_GRACE_PER_GAP} x the "
                f"session gap {self.session} (each entity would keep up to "
                f"grace / session + 2 sessions)"
            )


ANY_FIELD = {Aggregation.DISTINCT, Aggregation.DISTINCT_EXACT}  # strings count too


class FeatureSpec(BaseModel):
    """One online feature, e.g. ``{name: amount_sum_1h, agg: sum, field: amount, window: 1h}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    agg: Aggregation
    field: str | None = Field(None, description="event field aggregated (not for count)")
    window: Duration | SessionWindow
    buckets: int = Field(BUCKETS, ge=1, le=1000, description="tiles per window (not sessions)")
    entity: str | tuple[str, ...] | None = Field(
        None, description="entity key field(s); default: the event key"
    )
    source: FeatureSource = Field(
        FeatureSource.EVENTS, description="events (the scorer's stream) or labels (learned)"
    )
    prior: float | None = Field(
        None, ge=0, description="labels, rate: weight m of the global rate, "
        "(positives + m x global rate) / (labels + m)"
    )  # fmt: skip
    when: str | None = Field(
        None, description="labels, count and since: only labels whose this field (the "
        "label field) is true"
    )  # fmt: skip
    decay: Duration | None = Field(
        None, description="labels, since: read exp(-seconds / decay) instead of the "
        "seconds: 1 just after a label, toward 0 as it ages, 0 with none in the window "
        "(a value in [0, 1] that a linear or factorization model learns from)",
    )  # fmt: skip

    def model_post_init(self, _context: object) -> None:
        if self.source is FeatureSource.LABELS:
            self._check_labelled()
        else:
            if self.agg in LABEL_ONLY:
                raise ValueError(f"feature {self.name!r}: {self.agg.value} needs source: labels")
            for option in ("prior", "when", "decay"):
                if getattr(self, option) is not None:
                    raise ValueError(f"feature {self.name!r}: {option} needs source: labels")
        if self.agg in NO_FIELD and self.field is not None:
            raise ValueError(f"feature {self.name!r}: {self.agg.value} takes no field")
        if self.agg not in NO_FIELD and self.field is None:
            raise ValueError(f"feature {self.name!r}: {self.agg.value} needs a field")
        if isinstance(self.entity, tuple) and not self.entity:
            raise ValueError(f"feature {self.name!r}: entity needs at least one field")
        if isinstance(self.window, SessionWindow):
            if self.agg not in SESSION_AGGS:
                allowed = ", ".join(sorted(a.value for a in SESSION_AGGS))
                raise ValueError(
                    f"feature {self.name!r}: a session window computes {allowed}, "
                    f"not {self.agg.value}"
                )
            # (a dumped spec carries the default: taken back as it is)
            if self.buckets != BUCKETS:
                raise ValueError(f"feature {self.name!r}: a session window has no buckets")
        elif self.agg is Aggregation.DURATION:
            raise ValueError(f"feature {self.name!r}: duration needs a session window")

    def _check_labelled(self) -> None:
        """What a label-fed feature may say (its ``field`` and ``when`` are checked
        against the label field by ``features.labelled.LabelPlan``)."""
        if self.agg not in LABEL_AGGS:
            allowed = ", ".join(sorted(a.value for a in LABEL_AGGS))
            raise ValueError(
                f"feature {self.name!r}: source: labels computes {allowed}, not {self.agg.value}"
            )
        if isinstance(self.window, SessionWindow):
            raise ValueError(f"feature {self.name!r}: source: labels takes no session window")
        if self.prior is not None and self.agg is not Aggregation.RATE:
            raise ValueError(f"feature {self.name!r}: prior needs agg: rate")
        if self.when is not None and self.agg not in WHEN_AGGS:
            raise ValueError(f"feature {self.name!r}: when needs agg: count or since")
        if self.decay is not None and self.agg is not Aggregation.SINCE:
            raise ValueError(f"feature {self.name!r}: decay needs agg: since")

    @property
    def session(self) -> SessionWindow | None:
        return self.window if isinstance(self.window, SessionWindow) else None

    def entity_fields(self, default: str) -> tuple[str, ...]:
        if self.entity is None:
            return (default,)
        return (self.entity,) if isinstance(self.entity, str) else self.entity


# What a group's tiles keep per numeric field, by aggregation: only what is read.
STATS = ("sum", "square", "min", "max", "last", "current")
NEEDS = {
    Aggregation.SUM: ("sum",),
    Aggregation.MEAN: ("sum",),
    Aggregation.STD: ("sum", "square"),
    Aggregation.ZSCORE: ("sum", "square", "current"),
    Aggregation.MIN: ("min",),
    Aggregation.MAX: ("max",),
    Aggregation.LAST: ("last",),
}

# Layout of one group's aggregate vector (what a snapshot stores per group):
#   [n, has_previous, seconds since the previous event,
#    the window's sums, sums of squares, minima, maxima (per field that needs them),
#    the previous event's values (``last`` fields), this event's values (``zscore``),
#    per exact-distinct field: count, per approximate-distinct field: count]
HEAD = 3


@dataclass(frozen=True)
class TileGroup:
    """Features sharing one entity and window: one set of tiles per entity value.

    ``stats[k]`` are the fields whose ``STATS[k]`` the group keeps, ``numbers``
    every numeric field it reads from events.
    """

    entity: tuple[str, ...]
    window_s: float
    buckets: int
    lateness_s: float
    stats: tuple[tuple[str, ...], ...] = ((),) * len(STATS)
    exact: tuple[str, ...] = ()
    approx: tuple[str, ...] = ()

    @cached_property
    def numbers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for fields in self.stats for f in fields))

    def indexes(self, stat: str) -> list[int]:
        """Positions in ``numbers`` of the fields that keep ``stat``."""
        numbers = self.numbers
        return [numbers.index(f) for f in self.stats[STATS.index(stat)]]

    @cached_property
    def layout(self) -> tuple[list[int], ...]:
        """Per stat of ``STATS``: positions in ``numbers`` of the fields keeping it."""
        return tuple(self.indexes(stat) for stat in STATS)

    def offset(self, stat: str, name: str) -> int:
        """Where ``stat`` of field ``name`` sits in the group aggregate vector."""
        k = STATS.index(stat)
        return HEAD + sum(len(s) for s in self.stats[:k]) + self.stats[k].index(name)

    def distinct_offset(self, name: str) -> int:
        base = HEAD + sum(len(s) for s in self.stats)
        if name in self.exact:
            return base + self.exact.index(name)
        return base + len(self.exact) + self.approx.index(name)

    @property
    def entity_name(self) -> str:
        return "+".join(self.entity)

    @property
    def name(self) -> str:
        return f"{self.entity_name}:{self.window_s:g}s:{self.buckets}"

    @property
    def bucket_s(self) -> float:
        return self.window_s / self.buckets

    @property
    def keep(self) -> int:
        """Buckets kept behind the newest one: a window plus the allowed lateness,
        and one spare so a late event's whole window is still there."""
        return self.buckets + math.ceil(self.lateness_s / self.bucket_s) + 1

    @property
    def ttl_s(self) -> float:
        return self.window_s + self.bucket_s + self.lateness_s

    def bucket(self, ts: float) -> int:
        """The tile index holding event time ``ts`` (seconds)."""
        return int(ts // self.bucket_s)


# Layout of one session group's aggregate vector: [n, duration, the session's sums,
# minima, maxima (per field that needs them)]; a kept session is the same after
# its first and last event times: [first, last, n, sums, minima, maxima]
SESSION_STATS = ("sum", "min", "max")
SESSION_NEEDS = {
    Aggregation.SUM: "sum", Aggregation.MEAN: "sum", Aggregation.MIN: "min",
    Aggregation.MAX: "max",
}  # fmt: skip


@dataclass(frozen=True)
class SessionGroup:
    """Session features sharing one entity, gap and grace: one list of sessions per
    entity value. ``stats[k]``: the fields whose ``SESSION_STATS[k]`` it keeps."""

    entity: tuple[str, ...]
    gap_s: float
    grace_s: float
    stats: tuple[tuple[str, ...], ...] = ((),) * len(SESSION_STATS)

    @cached_property
    def numbers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for fields in self.stats for f in fields))

    @cached_property
    def layout(self) -> tuple[list[int], ...]:
        """Per stat of ``SESSION_STATS``: positions in ``numbers`` of its fields."""
        return tuple([self.numbers.index(f) for f in fields] for fields in self.stats)

    def offset(self, stat: str, name: str) -> int:
        """Where ``stat`` of field ``name`` sits in the group aggregate vector."""
        k = SESSION_STATS.index(stat)
        return 2 + sum(len(s) for s in self.stats[:k]) + self.stats[k].index(name)

    @property
    def entity_name(self) -> str:
        return "+".join(self.entity)

    @property
    def name(self) -> str:
        return f"{self.entity_name}:session:{self.gap_s:g}s:grace:{self.grace_s:g}s"

    @property
    def record(self) -> int:
        """Numbers per kept session."""
        return 3 + sum(len(s) for s in self.stats)

    @property
    def max_sessions(self) -> int:
        """Sessions kept per entity at most: those an event within the grace may still
        join end less than gap + grace before the newest event, and a gap apart."""
        return math.floor(self.grace_s / self.gap_s) + 2

    @property
    def ttl_s(self) -> float:
        return self.gap_s + self.grace_s


def entity_value(fields: tuple[str, ...], event: Mapping[str, object]) -> str:
    """The key of one entity in an event; composite keys join their parts with ``|``."""
    return "|".join([str(event[f]) for f in fields])  # (a list: faster than a generator)


@dataclass(frozen=True)
class FeaturePlan:
    """How the declared features map onto tile groups and session groups, in a
    fixed order. A snapshot's aggregates are one vector per tile group, then one
    per session group."""

    features: tuple[FeatureSpec, ...]
    groups: tuple[TileGroup, ...]
    # per feature: (aggregate index, up to three offsets in its vector, -1 unused)
    _slots: tuple[tuple[int, int, int, int], ...]
    lateness_s: float = 0.0
    sessions: tuple[SessionGroup, ...] = ()

    @classmethod
    def build(
        cls, features: list[FeatureSpec], default_entity: str, lateness_s: float = 0.0
    ) -> FeaturePlan:
        for f in features:
            if f.source is not FeatureSource.EVENTS:
                raise ValueError(
                    f"feature {f.name!r} is fed by labels: it belongs in a "
                    "features.labelled.LabelPlan, not in the events' plan"
                )
        kinds: dict[tuple[tuple[str, ...], float, int], dict[str, list[str]]] = {}
        spans: dict[tuple[tuple[str, ...], float, float], dict[str, list[str]]] = {}
        for f in features:
            if (sw := f.session) is not None:
                key = (f.entity_fields(default_entity), sw.gap_s, sw.grace_s)
                kept = spans.setdefault(key, {k: [] for k in SESSION_STATS})
                stat = SESSION_NEEDS.get(f.agg)
                if stat is not None and f.field is not None and f.field not in kept[stat]:
                    kept[stat].append(f.field)
                continue
            need = kinds.setdefault(
                _group_key(f, default_entity), {k: [] for k in (*STATS, "exact", "approx")}
            )
            if f.field is None:
                continue
            wanted = {Aggregation.DISTINCT: ("approx",), Aggregation.DISTINCT_EXACT: ("exact",)}
            for stat in wanted.get(f.agg) or NEEDS[f.agg]:
                if f.field not in need[stat]:
                    need[stat].append(f.field)
        keys = list(kinds)
        groups = tuple(
            TileGroup(
                e, w, b, lateness_s, tuple(tuple(n[k]) for k in STATS),
                tuple(n["exact"]), tuple(n["approx"]),
            )
            for (e, w, b), n in kinds.items()
        )  # fmt: skip
        span_keys = list(spans)
        sessions = tuple(
            SessionGroup(e, gap, grace, tuple(tuple(n[k]) for k in SESSION_STATS))
            for (e, gap, grace), n in spans.items()
        )
        slots = []
        for f in features:
            offsets = [-1, -1, -1]
            if (sw := f.session) is not None:
                si = span_keys.index((f.entity_fields(default_entity), sw.gap_s, sw.grace_s))
                stat = SESSION_NEEDS.get(f.agg)
                if stat is not None:
                    offsets[0] = sessions[si].offset(stat, f.field or "")
                slots.append((len(groups) + si, offsets[0], offsets[1], offsets[2]))
                continue
            gi = keys.index(_group_key(f, default_entity))
            g = groups[gi]
            if f.agg in (Aggregation.DISTINCT, Aggregation.DISTINCT_EXACT):
                offsets[0] = g.distinct_offset(f.field or "")
            elif f.field is not None:
                for i, stat in enumerate(NEEDS[f.agg]):
                    offsets[i] = g.offset(stat, f.field)
            slots.append((gi, offsets[0], offsets[1], offsets[2]))
        return cls(tuple(features), groups, tuple(slots), lateness_s, sessions)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @cached_property
    def entities(self) -> list[tuple[str, ...]]:
        """Every entity (one or more fields) a feature is kept for."""
        return list(dict.fromkeys([*(g.entity for g in self.groups),
                                   *(g.entity for g in self.sessions)]))  # fmt: skip

    @cached_property
    def named_entities(self) -> list[tuple[str, tuple[str, ...]]]:
        """``entities`` with their names (fields joined by ``+``), built once."""
        return [("+".join(e), e) for e in self.entities]

    def entity_values(self, event: Mapping[str, object]) -> dict[str, str]:
        """Every entity's key in ``event`` (name -> value; as ``entity_value``)."""
        return {
            name: str(event[e[0]]) if len(e) == 1 else "|".join([str(event[f]) for f in e])
            for name, e in self.named_entities
        }

    @cached_property
    def number_fields(self) -> list[str]:
        return sorted({f for g in self.groups for f in g.numbers}
                      | {f for g in self.sessions for f in g.numbers})  # fmt: skip

    @cached_property
    def distinct_fields(self) -> list[str]:
        return sorted({f for g in self.groups for f in (*g.exact, *g.approx)})

    def entity_keys(self, fields: Mapping[str, object]) -> dict[str, str]:
        """The entities (name -> key) that ``fields`` (field -> value) fully name."""
        return {
            "+".join(e): entity_value(e, fields)
            for e in self.entities
            if all(f in fields for f in e)
        }

    @cached_property
    def _readers(self) -> list[tuple[str, int, Callable[[list[float]], float], bool]]:
        """Per feature: name, group index, how to read it from the group aggregate,
        whether it needs an event (z-score). Built once: ``values`` runs per event."""
        return [
            (f.name, slot[0], self._reader(f, slot), f.agg is Aggregation.ZSCORE)
            for f, slot in zip(self.features, self._slots, strict=True)
        ]

    def _reader(
        self, f: FeatureSpec, slot: tuple[int, int, int, int]
    ) -> Callable[[list[float]], float]:
        if f.session is None:
            return _reader(f, slot, self.groups[slot[0]])
        a = slot[1]
        match f.agg:
            case Aggregation.COUNT:
                return lambda v: float(v[0])
            case Aggregation.DURATION:
                return lambda v: float(v[1])
            case Aggregation.MEAN:
                return lambda v: v[a] / v[0] if v[0] else 0.0
        return lambda v: float(v[a]) if v[0] else 0.0  # sum, min, max

    def values(self, aggregates: list[list[float]]) -> dict[str, float]:
        """Feature values from the group aggregates one event saw (tile groups',
        then session groups')."""
        return {name: read(aggregates[gi]) for name, gi, read, _ in self._readers}

    def group_values(self, gi: int, aggregate: list[float]) -> dict[str, float]:
        """The part of ``current_values`` that group ``gi``'s aggregate gives."""
        return {name: read(aggregate) for name, read in self._group_readers[gi]}

    @cached_property
    def timed_groups(self) -> frozenset[int]:
        """The tile groups whose ``group_values`` change with the read time within one
        tile bucket: those with a ``since_previous`` feature (the time since the newest
        event). The others' are the same at every time of the bucket."""
        return frozenset(
            slot[0]
            for f, slot in zip(self.features, self._slots, strict=True)
            if f.session is None and f.agg is Aggregation.SINCE_PREVIOUS
        )

    @cached_property
    def _group_readers(self) -> list[list[tuple[str, Callable[[list[float]], float]]]]:
        """``current_values``' readers by group (built once: ``group_values`` runs per
        pair)."""
        out: list[list[tuple[str, Callable[[list[float]], float]]]] = [
            [] for _ in (*self.groups, *self.sessions)
        ]
        for name, gi, read, needs_event in self._readers:
            if not needs_event:
                out[gi].append((name, read))
        return out

    def current_values(self, aggregates: list[list[float] | None]) -> dict[str, float]:
        """Values read outside an event (``FeatureStore.read``): groups without an
        entity value are left out, and so is the z-score, which needs an event."""
        return {
            name: read(agg)
            for name, gi, read, needs_event in self._readers
            if (agg := aggregates[gi]) is not None and not needs_event
        }


def _group_key(f: FeatureSpec, default_entity: str) -> tuple[tuple[str, ...], float, int]:
    assert isinstance(f.window, str)  # session windows are grouped apart
    return (f.entity_fields(default_entity), parse_duration(f.window), f.buckets)


def _reader(
    f: FeatureSpec, slot: tuple[int, int, int, int], group: TileGroup
) -> Callable[[list[float]], float]:
    _, a, b, c = slot
    window_s = group.window_s
    match f.agg:
        case Aggregation.COUNT:
            return lambda v: float(v[0])
        case Aggregation.SINCE_PREVIOUS:
            # no previous event in the window: at least a window ago
            return lambda v: float(v[2]) if v[1] else window_s
        case Aggregation.LAST:
            return lambda v: float(v[a]) if v[1] else 0.0
        case Aggregation.MEAN:
            return lambda v: v[a] / v[0] if v[0] else 0.0
        case Aggregation.STD:
            return lambda v: _std(v[0], v[a], v[b])
        case Aggregation.ZSCORE:
            return lambda v: _zscore(v[0], v[a], v[b], v[c])
    return lambda v: float(v[a])  # sum, min, max, distinct: kept as they are


def _zscore(n: float, total: float, squares: float, x: float) -> float:
    mean = total / n if n else 0.0
    std = _std(n, total, squares)
    return (x - mean) / std if std else 0.0


def _std(n: float, total: float, squares: float) -> float:
    if not n:
        return 0.0
    mean_sq = squares / n
    var = mean_sq - (total / n) ** 2
    # sum-of-squares variance carries rounding noise ~1e-15 * mean_sq: below a
    # margin over it the true variance is indistinguishable from 0
    return math.sqrt(var) if var > 1e-12 * mean_sq else 0.0
