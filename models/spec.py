"""How the spec declares a model: River estimators by import path and parameters."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EstimatorSpec(BaseModel):
    """``{class: river.tree.HoeffdingTreeClassifier, params: {grace_period: 100}}``.

    A parameter that is itself a mapping with a ``class`` key is built the same
    way, so estimators can nest (e.g. a preprocessing step inside a meta model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_path: str = Field(alias="class", pattern=r"^[A-Za-z_][\w.]*$")
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(BaseModel):
    """The champion model: optional preprocessing steps, then the estimator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    estimator: EstimatorSpec
    preprocessing: list[EstimatorSpec] = Field(default_factory=list)
    inputs: list[str] = Field(
        default_factory=list, description="event fields given to the model besides the features"
    )
