"""Cleaning declared in the spec (``clean:``), as the first step of every candidate.

Per event field, any of:

- ``required: false``: the field may be missing or null (a required one missing
  goes to the DLQ); a field with ``impute`` is optional;
- ``impute``: ``mean``, ``median`` or ``mode`` (running statistics learned online,
  from the values events actually carried; until one is learned, ``value`` if
  given, else 0 for a number and ``other`` for a category), or ``constant`` with
  ``value``;
- ``clip``: ``[low, high]``, or ``{quantiles: [q_low, q_high]}`` learned online
  (River's P² ``stats.Quantile``: constant memory);
- ``max_categories`` (str fields): the first N categories seen are kept, any later
  one is mapped to ``other``.

The rules live in ``Clean``, a River transformer placed before every candidate's
steps. So the scorer (predict) and the learner (learn) apply the same cleaning to
the same raw inputs by construction, and the running statistics are part of each
published model version: a rollback restores the cleaning that matched its model.
The statistics learn only while the pipeline learns (on labelled events), from the
raw values before cleaning, never from imputed ones.

A field an optional rule leaves without a value (``required: false`` and no
``impute``) is left out of ``x``: River's models take an absent feature as
missing, while ``None`` would reach their arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from river import base, stats

Learned = Literal["mean", "median", "mode"]
Rule = Literal["impute", "clip", "bucket"]
RULES: tuple[Rule, ...] = ("impute", "clip", "bucket")
MODE_KEEP = 1_000  # categories whose counts a `mode` keeps without max_categories


class QuantileClip(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    quantiles: tuple[float, float]

    @model_validator(mode="after")
    def _order(self) -> QuantileClip:
        lo, hi = self.quantiles
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"quantiles: need 0 <= low < high <= 1, got {list(self.quantiles)}")
        return self


class FieldCleaning(BaseModel):
    """What cleaning one event field gets (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool | None = Field(
        None, description="may the field be missing or null (default: only with impute)"
    )
    impute: Learned | Literal["constant"] | None = None
    value: str | float | int | bool | None = Field(
        None, description="the constant to impute (or the fallback)"
    )
    clip: tuple[float, float] | QuantileClip | None = None
    max_categories: int | None = Field(None, ge=1, le=1_000_000)
    other: str = Field("__other__", description="the category beyond max_categories")

    @model_validator(mode="after")
    def _check(self) -> FieldCleaning:
        if self.impute is not None and self.required:
            raise ValueError("impute: a required field is never missing (drop required: true)")
        if self.impute == "constant" and self.value is None:
            raise ValueError("impute: constant needs value")
        if self.impute is None and self.value is not None:
            raise ValueError("value: only with impute")
        if isinstance(self.clip, tuple) and not self.clip[0] <= self.clip[1]:
            raise ValueError(f"clip: low {self.clip[0]} is above high {self.clip[1]}")
        return self

    @property
    def optional(self) -> bool:
        return self.required is False or self.impute is not None

    @property
    def numeric(self) -> bool:
        """Whether the rules need a number (mean, median, clip)."""
        return self.impute in ("mean", "median") or self.clip is not None


class _Mode:
    """The most frequent value seen, over at most ``keep`` distinct values."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.counts: dict[Any, int] = {}
        self.best: Any = None

    def update(self, value: Any) -> None:
        if value not in self.counts and len(self.counts) >= self.keep:
            return
        n = self.counts[value] = self.counts.get(value, 0) + 1
        if self.best is None or n > self.counts[self.best]:
            self.best = value

    def get(self) -> Any:
        return self.best


class _FieldState:
    """The running statistics one field's rules learn."""

    def __init__(self, rule: FieldCleaning) -> None:
        self.rule = rule
        self.center: stats.Mean | stats.Quantile | _Mode | None = None
        if rule.impute == "mean":
            self.center = stats.Mean()
        elif rule.impute == "median":
            self.center = stats.Quantile(0.5)
        elif rule.impute == "mode":
            self.center = _Mode(rule.max_categories or MODE_KEEP)
        self.low: stats.Quantile | None = None
        self.high: stats.Quantile | None = None
        if isinstance(rule.clip, QuantileClip):
            self.low, self.high = (stats.Quantile(q) for q in rule.clip.quantiles)
        self.known: set[Any] | None = set() if rule.max_categories else None
        self.seen = 0

    @property
    def full(self) -> bool:
        """Whether the category cap is reached: any category not known is bucketed."""
        return self.known is not None and len(self.known) >= (self.rule.max_categories or 0)

    def learn(self, value: Any) -> None:
        if value is None:
            return
        self.seen += 1
        if self.center is not None:
            self.center.update(value)
        if self.low is not None and self.high is not None:
            self.low.update(value)
            self.high.update(value)
        if self.known is not None and not self.full:
            self.known.add(value)

    def fill(self) -> Any:
        """The value to impute (None: the field has no ``impute``)."""
        if self.rule.impute is None:
            return None
        if self.rule.impute == "constant":
            return self.rule.value
        value = self.center.get() if self.center is not None and self.seen else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            # nothing learned yet: the given value, else 0 for a number, else `other`
            if self.rule.value is not None:
                return self.rule.value
            return self.rule.other if self.rule.impute == "mode" else 0.0
        return value

    def bounds(self) -> tuple[float, float] | None:
        clip = self.rule.clip
        if isinstance(clip, tuple):
            return clip
        low = None if self.low is None else self.low.get()
        high = None if self.high is None else self.high.get()
        if low is None or high is None or self.seen < 2:
            return None
        return low, high


class Clean(base.Transformer):
    """The spec's ``clean:`` rules as a River transformer (see the module docstring)."""

    def __init__(self, rules: Mapping[str, FieldCleaning]) -> None:
        self.rules = dict(rules)
        self._state = {name: _FieldState(rule) for name, rule in self.rules.items()}

    def learn_one(self, x: dict[base.typing.FeatureName, Any]) -> None:
        for name, state in self._state.items():
            if name in x:
                state.learn(x[name])

    def transform_one(self, x: dict[base.typing.FeatureName, Any]) -> dict[Any, Any]:
        return self.clean(x)[0]

    def clean(self, x: Mapping[Any, Any]) -> tuple[dict[Any, Any], list[tuple[str, Rule]]]:
        """``x`` cleaned, and which rule changed which field (the counters, the
        prediction's ``imputed``). A field absent from ``x`` is not the model's:
        it is left absent."""
        out = dict(x)
        done: list[tuple[str, Rule]] = []
        for name, state in self._state.items():
            if name not in out:
                continue
            value = out[name]
            if value is None:
                value = state.fill()
                if value is None:
                    del out[name]
                    continue
                done.append((name, "impute"))
            bounds = state.bounds()
            if bounds is not None and isinstance(value, int | float):
                clipped = min(max(value, bounds[0]), bounds[1])
                if clipped != value:
                    value = clipped
                    done.append((name, "clip"))
            known = state.known
            if known is not None and value not in known and state.full:
                value = state.rule.other
                done.append((name, "bucket"))
            out[name] = value
        return out, done

    def is_new(self, name: str, value: Any) -> bool:
        """Whether a category is one this step has not learned (None: not watched)."""
        state = self._state.get(name)
        known = None if state is None else state.known
        return known is not None and value is not None and value not in known

    def summary(self) -> dict[str, dict[str, Any]]:
        """What each field's rules stand at: the value imputed, the clip bounds."""
        out: dict[str, dict[str, Any]] = {}
        for name, state in self._state.items():
            bounds = state.bounds()
            out[name] = {"fill": state.fill(), "bounds": list(bounds) if bounds else None,
                         "seen": state.seen}  # fmt: skip
        return out


def cleaning_of(model: Any) -> Clean | None:
    """The ``Clean`` step heading a candidate's pipeline, if it has one."""
    steps = getattr(model, "steps", None)
    if not steps:
        return None
    first = next(iter(steps.values()))
    return first if isinstance(first, Clean) else None
