"""Build River estimators from their spec: import by path, never ``eval``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from river import base, compose

from riverflow.models.errors import ModelSpecError
from riverflow.models.spec import EstimatorSpec, ModelSpec, ModelsSpec
from riverflow.models.target import Target

# Only River's own estimators can be named in a spec: a spec is data, and an
# import path outside this namespace could run arbitrary code on import.
ALLOWED_PREFIX = "river."


def build_estimator(spec: EstimatorSpec) -> base.Estimator:
    """Instantiate one estimator, nested River parameters included."""
    built = _build(spec, base.Estimator)
    assert isinstance(built, base.Estimator)
    return built


def _build(spec: EstimatorSpec, kind: type[base.Base]) -> base.Base:
    path = spec.class_path
    if not path.startswith(ALLOWED_PREFIX):
        raise ModelSpecError(f"{path!r}: only River estimators ({ALLOWED_PREFIX}*) can be named")
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"{path!r}: no module {module_name!r}") from exc
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, kind)):
        what = "estimator" if kind is base.Estimator else "component"
        raise ModelSpecError(f"{path!r}: no River {what} class {class_name!r} there")
    params = {name: _build_param(value) for name, value in spec.params.items()}
    try:
        return cls(**params)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(cls).parameters)
        raise ModelSpecError(f"{path}: bad parameters ({exc}); it accepts: {accepted}") from exc
    except (ValueError, AssertionError) as exc:
        raise ModelSpecError(f"{path}: bad parameter value ({exc})") from exc


def _build_param(value: Any) -> Any:
    if isinstance(value, dict) and "class" in value:
        # optimizers, losses, initializers...: any River object, not only estimators
        return _build(EstimatorSpec.model_validate(value), base.Base)
    return value


class Select(compose.Select):
    """``compose.Select`` in the spec's key order.

    River's keeps the keys in a set, whose order changes from process to process
    (string hashing): a seeded weight initializer would then give the features
    different draws in the scorer, the learner and a test.
    """

    def __init__(self, *keys: base.typing.FeatureName) -> None:
        super().__init__(*keys)
        self.ordered = tuple(keys)

    def transform_one(self, x: dict[base.typing.FeatureName, Any]) -> dict[Any, Any]:
        return {k: x[k] for k in self.ordered}


def build_model(spec: ModelSpec, target: Target | None = None) -> base.Estimator:
    """A candidate: its selected inputs, preprocessing steps piped into the estimator.

    The estimator must fit the ``target`` (default: a bool label, a binary
    classifier): a regressor for a number, a multiclass classifier for a category.
    """
    estimator = build_estimator(spec.estimator)
    (target or Target()).check(spec.name, spec.estimator.class_path, estimator)
    steps: list[base.Estimator] = [build_estimator(s) for s in spec.preprocessing]
    if spec.select:
        # e.g. a linear model given only the numeric values: River scalers refuse strings
        steps.insert(0, Select(*spec.select))
    if not steps:
        return estimator
    return compose.Pipeline(*steps, estimator)


def build_candidates(spec: ModelsSpec, target: Target | None = None) -> dict[str, base.Estimator]:
    """Every candidate of the spec, fresh; the first bad one raises ``ModelSpecError``."""
    return {c.name: build_model(c, target) for c in spec.candidates}
