"""How the spec declares models: candidates built from River estimators by import
path and parameters, one of them the champion the scorers serve first."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from riverflow.models.search import config_name, configurations, path_error

MAX_CONFIGS = 64  # the most a search's ``max_configs`` may allow


class EstimatorSpec(BaseModel):
    """``{class: river.tree.HoeffdingTreeClassifier, params: {grace_period: 100}}``.

    A parameter that is itself a mapping with a ``class`` key is built the same
    way, so estimators can nest (e.g. a preprocessing step inside a meta model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_path: str = Field(alias="class", pattern=r"^[A-Za-z_][\w.]*$")
    params: dict[str, Any] = Field(default_factory=dict)


class RangeSpec(BaseModel):
    """``{log_uniform: [1e-3, 1e-1], n: 4}`` or ``{uniform: [0, 1], n: 3}``: ``n``
    points from low to high, evenly spaced on a log or a linear scale (the same
    points every time: a search is repeatable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    log_uniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    n: int = Field(ge=2, le=MAX_CONFIGS)

    @model_validator(mode="after")
    def _check(self) -> RangeSpec:
        if (self.log_uniform is None) == (self.uniform is None):
            raise ValueError("a range is either log_uniform: [low, high] or uniform: [low, high]")
        low, high = self.log_uniform or self.uniform or (0.0, 0.0)
        if not low < high:
            raise ValueError(f"range [{low}, {high}]: low must be below high")
        if self.log_uniform is not None and low <= 0:
            raise ValueError(f"log_uniform [{low}, {high}]: bounds must be above 0")
        return self

    def values(self) -> list[float]:
        if self.log_uniform is not None:
            lo, hi = (math.log10(v) for v in self.log_uniform)
            points = [10 ** (lo + (hi - lo) * i / (self.n - 1)) for i in range(self.n)]
        else:
            low, high = self.uniform or (0.0, 0.0)
            points = [low + (high - low) * i / (self.n - 1) for i in range(self.n)]
        return [float(f"{p:.6g}") for p in points]


class SearchSpec(BaseModel):
    """A candidate's parameter space, searched online (``riverflow.models.search``).

    ``space`` maps a parameter path to a grid (a list) or a range. Rung ``i`` of
    successive halving lasts ``budget * eta**i`` labels and keeps the best
    ``1/eta`` by ``metric``, until ``survivors`` are left: they become challengers.
    ``on_drift``: what a drift alarm of the champion does to the search: start it
    again with every configuration ``fresh``, or ``warm`` (a survivor continues its
    model, the others start fresh), or nothing (``off``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: dict[str, list[Any] | RangeSpec] = Field(min_length=1)
    budget: int = Field(200, ge=1, description="labels of the first rung, per configuration")
    eta: int = Field(2, ge=2, description="each rung keeps the best 1/eta")
    survivors: int = Field(1, ge=1, description="configurations that become challengers")
    metric: Literal["log_loss", "accuracy", "roc_auc"] = "log_loss"
    max_configs: int = Field(
        16, ge=2, le=MAX_CONFIGS, description="the most configurations trained at once (K)"
    )
    on_drift: Literal["fresh", "warm", "off"] = "fresh"

    def grid(self) -> dict[str, list[Any]]:
        """Every path's values, ranges expanded."""
        return {p: v.values() if isinstance(v, RangeSpec) else v for p, v in self.space.items()}

    def configurations(self) -> list[dict[str, Any]]:
        """Every combination of values (path -> value), the first path varying slowest."""
        return configurations(self.grid())


class ModelSpec(BaseModel):
    """One candidate: optional preprocessing steps, then the estimator; ``search``
    tries other values of its parameters online (its own values are not among them
    unless listed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    estimator: EstimatorSpec
    preprocessing: list[EstimatorSpec] = Field(default_factory=list)
    select: list[str] = Field(
        default_factory=list,
        description="the inputs and features this candidate sees (default: all of them)",
    )
    crosses: list[list[str]] = Field(
        default_factory=list,
        description="pairs (or more) of inputs crossed into one categorical input "
        "(``user_id*category``: its value joins theirs), after `select`; a hasher in "
        "`preprocessing` keeps their weights bounded",
    )
    search: SearchSpec | None = None

    @model_validator(mode="after")
    def _check_crosses(self) -> ModelSpec:
        for i, cross in enumerate(self.crosses):
            if len(cross) < 2 or len(set(cross)) != len(cross):
                raise ValueError(f"crosses.{i}: cross two or more different inputs")
            missing = [n for n in cross if self.select and n not in self.select]
            if missing:
                raise ValueError(f"crosses.{i}: {missing[0]!r} is not selected (select)")
        return self

    @model_validator(mode="after")
    def _check_search(self) -> ModelSpec:
        search = self.search
        if search is None:
            return self
        mine = self.model_dump(by_alias=True)
        for path, values in search.space.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"search.space.{path}: an empty grid (list at least one value)")
            why = path_error(mine, path)
            if why is not None:
                raise ValueError(f"search.space.{path}: {why}")
        sizes = [len(v) for v in search.grid().values()]
        total = math.prod(sizes)
        if total > search.max_configs:
            product = " x ".join(map(str, sizes))
            raise ValueError(
                f"search: {product} = {total} configurations, more than max_configs "
                f"{search.max_configs} (the most trained at once)"
            )
        names = [config_name(self.name, a) for a in search.configurations()]
        twins = sorted({n for n in names if names.count(n) > 1})
        if twins:
            raise ValueError(
                f"search: configurations named alike ({', '.join(twins)}): values that "
                "differ only past 4 significant digits cannot be told apart"
            )
        if total <= search.survivors:
            raise ValueError(
                f"search: {total} configuration(s) and {search.survivors} survivor(s): "
                "nothing to search"
            )
        return self


class ModelsSpec(BaseModel):
    """The candidates of a pipeline; they all learn, the champion is served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[str] = Field(
        default_factory=list, description="event fields given to the models besides the features"
    )
    champion: str | None = Field(
        None, description="the candidate served until a version is promoted (default: the first)"
    )
    explain: int = Field(
        0, ge=0, description="each prediction names its top N contributing features (0 = off)"
    )
    candidates: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ModelsSpec:
        names: set[str] = set()
        for i, c in enumerate(self.candidates):
            if c.name in names:
                raise ValueError(f"candidates.{i}.name: duplicate candidate {c.name!r}")
            names.add(c.name)
        if self.champion is not None and self.champion not in names:
            raise ValueError(f"champion: {self.champion!r} is not a candidate")
        return self

    @property
    def champion_spec(self) -> ModelSpec:
        """The candidate served before any version is published or promoted."""
        name = self.champion or self.candidates[0].name
        return next(c for c in self.candidates if c.name == name)

    def candidate(self, name: str) -> ModelSpec | None:
        return next((c for c in self.candidates if c.name == name), None)
