"""How the spec declares models: candidates built from River estimators by import
path and parameters, one of them the champion the scorers serve first."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EstimatorSpec(BaseModel):
    """``{class: river.tree.HoeffdingTreeClassifier, params: {grace_period: 100}}``.

    A parameter that is itself a mapping with a ``class`` key is built the same
    way, so estimators can nest (e.g. a preprocessing step inside a meta model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_path: str = Field(alias="class", pattern=r"^[A-Za-z_][\w.]*$")
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(BaseModel):
    """One candidate: optional preprocessing steps, then the estimator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    estimator: EstimatorSpec
    preprocessing: list[EstimatorSpec] = Field(default_factory=list)
    select: list[str] = Field(
        default_factory=list,
        description="the inputs and features this candidate sees (default: all of them)",
    )


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
