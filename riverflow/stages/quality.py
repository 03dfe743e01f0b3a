"""Data quality as the scorer sees it: per field and per partition, over windows.

Per declared field, over tumbling windows of ``monitors.quality.window`` events
(the last complete window is what ``/metrics`` shows):

- ``missing_rate``: events without the field (null, absent, or refused for a
  missing required field);
- ``out_of_range_rate``: values the cleaning clipped;
- ``new_category_rate``: categories the serving model's cleaning has not learned
  (fields with ``max_categories``);
- ``type_errors``: events refused for the field's type or range (cumulative, the
  same events the DLQ has).

Per partition, ``freshness_s``: processing time minus event time of the newest
event of the last batch. A field that goes missing in more than
``schema_missing_rate`` of a window, comes back, or an undeclared field that
starts to appear is a schema change: one ``schema_change`` model-event each.
Memory is bounded: counters per declared field, at most ``MAX_EXTRA`` undeclared
names, one float per partition.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

from riverflow.models.cleaning import Rule
from riverflow.monitors.exporter import QUALITY_MEASURES as MEASURES
from riverflow.streams.validation import Invalid

MAX_EXTRA = 1_000  # undeclared field names remembered (each reported once)
TYPE_KINDS = {"wrong_type", "not_finite", "out_of_range", "wrong_value"}


class DataQuality:
    """Counts what the scorer sees and refuses (see the module docstring)."""

    def __init__(
        self,
        fields: Iterable[str],
        window: int = 1_000,
        schema_missing_rate: float = 0.2,
        optional: Iterable[str] = (),
    ) -> None:
        self.fields = list(fields)
        # a valid event has every required field: only these can be missing in one
        self.optional = [f for f in self.fields if f in set(optional)]
        self.window = window
        self.threshold = schema_missing_rate
        self._n = 0
        self._counts: dict[str, Counter[str]] = {m: Counter() for m in MEASURES}
        self.rates: dict[str, dict[str, float]] = {m: {} for m in MEASURES}
        self.type_errors: Counter[str] = Counter()
        self.cleaned: Counter[tuple[str, str]] = Counter()  # (field, rule): cumulative
        self.freshness: dict[int, float] = {}
        self.extra: set[str] = set()
        self._missing: set[str] = set()  # fields reported gone
        self._changes: list[dict[str, Any]] = []
        self.reported: deque[dict[str, Any]] = deque(maxlen=50)  # the last changes

    def observe(
        self,
        event: Mapping[str, Any],
        cleaned: Iterable[tuple[str, Rule]],
        new_categories: Iterable[str] = (),
    ) -> None:
        """One valid event as intake received it (None: missing), what cleaning did."""
        missing = self._counts["missing_rate"]
        for name in self.optional:
            if event[name] is None:
                missing[name] += 1
        for name, rule in cleaned:
            self.cleaned[name, rule] += 1
            if rule == "clip":
                self._counts["out_of_range_rate"][name] += 1
        for name in new_categories:
            self._counts["new_category_rate"][name] += 1
        self._tick()

    def refused(self, invalid: Invalid) -> None:
        """One refused event: a type error, or a required field missing."""
        name = invalid.field
        if name is None or name not in self.fields:
            return
        if invalid.kind == "missing_field":
            self._counts["missing_rate"][name] += 1
            self._tick()
        elif invalid.kind in TYPE_KINDS:
            self.type_errors[name] += 1

    def undeclared(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.extra and len(self.extra) < MAX_EXTRA:
                self.extra.add(name)
                self._changes.append({"change": "new_field", "field": name})

    def fresh(self, partition: int, lag_s: float) -> None:
        self.freshness[partition] = lag_s

    def _tick(self) -> None:
        self._n += 1
        if self._n < self.window:
            return
        for measure, counts in self._counts.items():
            self.rates[measure] = {f: counts[f] / self._n for f in self.fields}
            counts.clear()
        self._n = 0
        for name, rate in self.rates["missing_rate"].items():
            gone = rate > self.threshold
            if gone and name not in self._missing:
                self._missing.add(name)
                self._changes.append({"change": "missing", "field": name, "rate": rate})
            elif not gone and name in self._missing:
                self._missing.discard(name)
                self._changes.append({"change": "restored", "field": name, "rate": rate})

    def changes(self) -> list[dict[str, Any]]:
        """Schema changes seen since the last call, each once."""
        out, self._changes = self._changes, []
        for change in out:
            change["window"] = self.window
        self.reported.extend(out)
        return out

    def status(self) -> dict[str, float]:
        """The stage-status names ``measure:field`` (``monitors.exporter`` labels them)."""
        out: dict[str, float] = {}
        for measure, rates in self.rates.items():
            out.update({f"{measure}:{f}": r for f, r in rates.items()})
        out.update({f"type_errors:{f}": float(n) for f, n in self.type_errors.items()})
        out.update({f"cleaned:{f}:{rule}": float(n) for (f, rule), n in self.cleaned.items()})
        out.update({f"freshness_s:{p}": lag for p, lag in self.freshness.items()})
        return out
