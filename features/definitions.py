"""Feature declarations and how their values derive from tile aggregates.

A feature is an aggregation of one event field per entity over an event-time
window. Windows are made of tiles (time buckets): a window of length ``W`` with
``B`` buckets of width ``W / B`` covers the event's own bucket and the ``B - 1``
before it. Features that share an entity and a window share one group of tiles,
so one Redis hash serves all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
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


class FeatureSpec(BaseModel):
    """One online feature, e.g. ``{name: amount_sum_1h, agg: sum, field: amount, window: 1h}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    agg: Aggregation
    field: str | None = Field(None, description="event field aggregated (not for count)")
    window: Duration
    buckets: int = Field(12, ge=1, le=1000, description="tiles per window")
    entity: str | None = Field(None, description="entity key field; default: the event key")

    def model_post_init(self, _context: object) -> None:
        if self.agg is Aggregation.COUNT and self.field is not None:
            raise ValueError(f"feature {self.name!r}: count takes no field")
        if self.agg is not Aggregation.COUNT and self.field is None:
            raise ValueError(f"feature {self.name!r}: {self.agg.value} needs a field")


@dataclass(frozen=True)
class TileGroup:
    """Features sharing one entity and window: one hash of tiles per entity value."""

    entity: str
    window_s: float
    buckets: int
    sum_fields: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.entity}:{self.window_s:g}s:{self.buckets}"

    @property
    def bucket_s(self) -> float:
        return self.window_s / self.buckets

    def bucket(self, ts: float) -> int:
        """The tile index holding event time ``ts`` (seconds)."""
        return int(ts // self.bucket_s)


@dataclass(frozen=True)
class FeaturePlan:
    """How the declared features map onto tile groups, in a fixed order.

    A group's aggregate is ``[count, sum(field_1), ..., sum(field_k)]`` over the
    window; each feature reads its value from there.
    """

    features: tuple[FeatureSpec, ...]
    groups: tuple[TileGroup, ...]
    # per feature: (group index, position of its sum in the group aggregate or -1)
    _slots: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, features: list[FeatureSpec], default_entity: str) -> FeaturePlan:
        order: dict[tuple[str, float, int], list[str]] = {}
        for f in features:
            key = (f.entity or default_entity, parse_duration(f.window), f.buckets)
            sums = order.setdefault(key, [])
            if f.field is not None and f.field not in sums:
                sums.append(f.field)
        groups = tuple(TileGroup(e, w, b, tuple(s)) for (e, w, b), s in order.items())
        keys = list(order)
        slots = []
        for f in features:
            gi = keys.index((f.entity or default_entity, parse_duration(f.window), f.buckets))
            pos = -1 if f.field is None else 1 + groups[gi].sum_fields.index(f.field)
            slots.append((gi, pos))
        return cls(tuple(features), groups, tuple(slots))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def values(self, aggregates: list[list[float]]) -> dict[str, float]:
        """Feature values from the group aggregates one event saw."""
        out: dict[str, float] = {}
        for f, (gi, pos) in zip(self.features, self._slots, strict=True):
            agg = aggregates[gi]
            count = agg[0]
            if f.agg is Aggregation.COUNT:
                out[f.name] = count
            elif f.agg is Aggregation.SUM:
                out[f.name] = agg[pos]
            else:
                out[f.name] = agg[pos] / count if count else 0.0
        return out
