"""Build River estimators from their spec: import by path, never ``eval``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from river import base, compose

from riverflow.models.cleaning import Clean, FieldCleaning
from riverflow.models.errors import ModelSpecError
from riverflow.models.search import SearchPlan, config_name, short_keys, with_value
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


class Crosses(base.Transformer):
    """Crossed inputs: for each cross, one categorical input named by its inputs
    joined with ``*`` whose value joins theirs (``user_id*category: "u7|c3"``); the
    inputs stay as they are. A missing input leaves its crosses out."""

    def __init__(self, crosses: list[list[str]]) -> None:
        self.crosses = [list(c) for c in crosses]
        self._names = ["*".join(c) for c in self.crosses]

    def transform_one(self, x: dict[base.typing.FeatureName, Any]) -> dict[Any, Any]:
        out = dict(x)
        for name, cross in zip(self._names, self.crosses, strict=True):
            values = [x.get(n) for n in cross]
            if None not in values:
                out[name] = "|".join(map(str, values))
        return out


def build_model(
    spec: ModelSpec,
    target: Target | None = None,
    clean: Mapping[str, FieldCleaning] | None = None,
) -> base.Estimator:
    """A candidate: the spec's cleaning (``models.cleaning``), its selected inputs,
    preprocessing steps piped into the estimator.

    The estimator must fit the ``target`` (default: a bool label, a binary
    classifier): a regressor for a number, a multiclass classifier for a category.
    """
    estimator = build_estimator(spec.estimator)
    (target or Target()).check(spec.name, spec.estimator.class_path, estimator)
    steps: list[base.Estimator] = [build_estimator(s) for s in spec.preprocessing]
    if spec.crosses:
        steps.insert(0, Crosses(spec.crosses))
    if spec.select:
        # e.g. a linear model given only the numeric values: River scalers refuse strings
        steps.insert(0, Select(*spec.select))
    if clean:
        steps.insert(0, Clean(clean))
    if not steps:
        return estimator
    return compose.Pipeline(*steps, estimator)


# What a stored model takes on from the spec while it keeps what it learned: how big a
# tree may grow (River's Hoeffding trees; their own setters). Any other parameter of a
# continued candidate stays as it was stored: it changes what the state means.
RUNTIME_PARAMS = ("max_size", "memory_estimate_period")


@dataclass(frozen=True)
class Reconciled:
    """What ``reconcile`` did to a stored model: each as ``"step.param: old -> new"``."""

    applied: list[str]  # the spec's runtime bounds, now the model's
    kept: list[str]  # other parameters the spec changed, kept as stored


def reconcile(stored: Any, spec_model: Any) -> Reconciled:
    """Give ``stored`` (a candidate's model read back from the registry) the spec's
    ``RUNTIME_PARAMS`` where they differ from its own, step by step, and say which
    other parameters of ``spec_model`` (the candidate as the spec builds it now)
    differ from the stored ones."""
    have, want = _steps(stored), _steps(spec_model)
    if list(have) != list(want):
        return Reconciled([], [f"steps: {list(have)} -> {list(want)}"])
    applied: list[str] = []
    kept: list[str] = []
    for name, step in have.items():
        old, new = step._get_params(), want[name]._get_params()
        for param in sorted(old.keys() | new.keys()):
            if old.get(param) == new.get(param):
                continue
            change = f"{name}.{param}: {old.get(param)!r} -> {new.get(param)!r}"
            if param in RUNTIME_PARAMS and param in old and param in new:
                setattr(step, param, new[param])
                applied.append(change)
            else:
                kept.append(change)
    return Reconciled(applied, kept)


def _steps(model: Any) -> dict[str, Any]:
    """A model's steps by name: a pipeline's, or the estimator alone."""
    if isinstance(model, compose.Pipeline):
        return dict(model.steps)
    return {type(model).__name__: model}


def build_candidates(
    spec: ModelsSpec,
    target: Target | None = None,
    clean: Mapping[str, FieldCleaning] | None = None,
) -> dict[str, base.Estimator]:
    """Every candidate of the spec, fresh; the first bad one raises ``ModelSpecError``
    (a configuration of a search too, though only the candidates are returned)."""
    out = {c.name: build_model(c, target, clean) for c in spec.candidates}
    for c in spec.candidates:
        for config in search_configs(c):
            try:
                build_model(config, target, clean)
            except ModelSpecError as exc:
                why = f"model {c.name!r}, search configuration {config.name}: {exc}"
                raise ModelSpecError(why) from None
    return out


def search_configs(spec: ModelSpec) -> list[ModelSpec]:
    """The configurations of a candidate's ``search``, each a candidate of its own
    named ``candidate@key=value,...`` (none without a search)."""
    if spec.search is None:
        return []
    mine = spec.model_dump(by_alias=True, exclude={"search"})
    out = []
    for assignment in spec.search.configurations():
        data = mine
        for path, value in assignment.items():
            data = with_value(data, path, value)
        # validated with the candidate's name (a configuration's has "@" and "=" in it)
        config = ModelSpec.model_validate(data)
        out.append(config.model_copy(update={"name": config_name(spec.name, assignment)}))
    return out


def search_plan(spec: ModelSpec) -> SearchPlan | None:
    """How the learner searches ``spec``'s configurations (None: it has no search)."""
    search = spec.search
    if search is None:
        return None
    assignments = search.configurations()
    names = tuple(config_name(spec.name, a) for a in assignments)
    keys = short_keys(list(search.space))
    values = {
        n: {keys[p]: v for p, v in a.items()} for n, a in zip(names, assignments, strict=True)
    }
    return SearchPlan(spec.name, names, values, search.budget, search.eta, search.survivors,
                      search.metric, search.on_drift)  # fmt: skip


def candidate_spec(spec: ModelsSpec, name: str) -> ModelSpec | None:
    """The candidate ``name`` of the spec, or the configuration of a search so named."""
    found = spec.candidate(name)
    if found is not None or "@" not in name:
        return found
    base = spec.candidate(name.partition("@")[0])
    return next((c for c in search_configs(base) if c.name == name), None) if base else None
