"""Online model search: a candidate's parameter space, tried side by side on every
label and pruned by successive halving on the prequential metric.

A candidate's ``search:`` (``models.spec.SearchSpec``) names parameters by their
path in the candidate (``estimator.params.l2``,
``estimator.params.optimizer.params.lr``, ``preprocessing.0.params.with_std``, or
``preprocessing`` itself for a choice of steps) and gives each a grid (a list)
or a range (``{log_uniform: [1e-3, 1e-1], n: 4}``, expanded to ``n`` fixed
points). Every combination is a *configuration*, named after the candidate and
its values (``fraud-logreg@lr=0.01,l2=0.001``).

``SuccessiveHalving`` trains the configurations side by side, test then train on
every label, like the candidates. Rung ``i`` lasts ``budget * eta**i`` labels;
at its end the best ``1/eta`` of the configurations alive (by their prequential
metric since the round began) go on and the others are dropped, until
``survivors`` are left. The survivors then join the learner's candidates as
ordinary challengers, so the monitor's promotion test, rollback and retirement
treat them as any other. Each rung's decision is returned as a model-event
(``prune``) carrying the metric of every configuration alive at that rung, the
rung's label budget and what was kept; a round's start is one too (``search``).

Why not River's ``model_selection``: its ``SuccessiveHalvingClassifier`` is the
same algorithm, and the rung arithmetic here follows it. But it is one
estimator over a *total* budget fixed in advance and, once that is spent, it
keeps predicting with the best model inside itself: its choice is neither
published as a version of its own nor visible to the monitor's significance
test, and it keeps no per-rung evidence that could be written out as events. A
stream has no end to budget for, a drift alarm must restart the search, and its
choices must be auditable, so the rungs are run here and River supplies the
estimators and metrics. ``BanditClassifier`` (epsilon-greedy, UCB) never drops
a model, so memory and CPU stay at K models for good; ``GreedyRegressor`` is for
regression only.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from riverflow.streams.contracts import ModelEvent

# a parameter's path in a candidate: one or more ``params.NAME`` steps from the
# estimator or a preprocessing step, or ``preprocessing`` (a choice of steps)
PATH = re.compile(r"^(estimator|preprocessing\.\d+)(\.params\.[A-Za-z_]\w*)+$|^preprocessing$")
LOWER_IS_BETTER = {"log_loss"}


class Metric(Protocol):
    """What a configuration is scored with (``monitors.prequential.PrequentialMetrics``)."""

    def update(self, label: bool, proba: dict[Any, float]) -> None: ...

    def as_dict(self) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...


def path_error(candidate: Mapping[str, Any], path: str) -> str | None:
    """Why ``path`` names no parameter of ``candidate`` (its spec as a mapping), or None.

    Every step but the last must exist: a nested River object
    (``{class: ..., params: ...}``) to descend into. The last parameter may be left
    to its default in the spec; the estimator's signature checks it when built.
    """
    if not PATH.match(path):
        return (
            "not a parameter path: estimator.params.NAME[.params.NAME...], "
            "preprocessing.I.params.NAME[...] or preprocessing"
        )
    if path == "preprocessing":
        return None
    head, *rest = path.split(".params.")
    node: Any
    if head == "estimator":
        node = candidate.get("estimator")
    else:
        steps = candidate.get("preprocessing") or []
        i = int(head.split(".")[1])
        if i >= len(steps):
            return f"the candidate has {len(steps)} preprocessing step(s)"
        node = steps[i]
    where = head
    for name in rest[:-1]:
        params = dict(node.get("params") or {})
        inner = params.get(name)
        if not (isinstance(inner, Mapping) and "class" in inner):
            have = ", ".join(sorted(params)) or "none set"
            return (
                f"{where}.params has no River object {name!r} to set "
                f"{rest[-1]!r} in (parameters set: {have})"
            )
        node, where = inner, f"{where}.params.{name}"
    return None


def with_value(candidate: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``candidate`` (a spec as a mapping) with ``path`` set to ``value``."""
    out = copy.deepcopy(dict(candidate))
    if path == "preprocessing":
        out["preprocessing"] = copy.deepcopy(value)
        return out
    head, *rest = path.split(".params.")
    node = out["estimator"] if head == "estimator" else out["preprocessing"][int(head[14:])]
    for name in rest[:-1]:
        node = node["params"][name]
    node.setdefault("params", {})[rest[-1]] = copy.deepcopy(value)
    return out


def short_keys(paths: Sequence[str]) -> dict[str, str]:
    """The names a configuration's values go by: each path's last parameter name,
    with as many parameters before it as make them distinct."""
    steps = {p: [s for s in re.split(r"\.params\.|\.", p) if s] for p in paths}
    for depth in range(1, 1 + max((len(s) for s in steps.values()), default=1)):
        keys = {p: ".".join(s[-depth:]) for p, s in steps.items()}
        if len(set(keys.values())) == len(keys):
            return keys
    return {p: p for p in paths}


def value_text(value: Any) -> str:
    """A value as a configuration's name shows it: numbers in 4 significant digits,
    a River object by its class name, a list of steps joined by ``+``."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping) and "class" in value:
        return str(value["class"]).rpartition(".")[2]
    if isinstance(value, list):
        return "+".join(value_text(v) for v in value) or "none"
    return str(value)


def configurations(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grids, in a fixed order: the first path varies slowest."""
    paths = list(space)
    return [dict(zip(paths, values, strict=True)) for values in itertools.product(*space.values())]


def config_name(base: str, assignment: Mapping[str, Any]) -> str:
    """``base@key=value,...`` for one configuration of ``base``'s search."""
    keys = short_keys(list(assignment))
    return base + "@" + ",".join(f"{keys[p]}={value_text(v)}" for p, v in assignment.items())


@dataclass
class Configuration:
    """One configuration under search: its live model and its prequential metric."""

    name: str
    values: dict[str, Any]  # its short keys -> values
    model: Any
    metrics: Metric
    version: int = 0  # its last version in the registry (0: none yet)


@dataclass(frozen=True)
class SearchPlan:
    """How one candidate's configurations are searched (from its ``SearchSpec``)."""

    base: str
    names: tuple[str, ...]  # every configuration, in the spec's order
    values: dict[str, dict[str, Any]]  # configuration -> its short keys -> values
    budget: int
    eta: int
    survivors: int
    metric: str
    on_drift: str  # fresh | warm | off


@dataclass
class SuccessiveHalving:
    """One candidate's search; see the module docstring.

    ``build``: a fresh model of a configuration; ``new_metrics``: a metric, fresh
    (None) or continuing from its ``state()``.
    """

    plan: SearchPlan
    build: Callable[[str], Any]
    new_metrics: Callable[[dict[str, Any] | None], Metric]
    alive: dict[str, Configuration] = field(default_factory=dict)
    round: int = 0
    rung: int = 0
    seen: int = 0  # labels learned this round
    rung_end: int = 0  # ``seen`` at which the current rung is judged
    done: bool = True

    def start(self, reason: str, warm: Mapping[str, Any] | None = None) -> ModelEvent:
        """Begin a round over every configuration: built fresh, or continuing a copy
        of the model given in ``warm`` for it."""
        warm = warm or {}
        self.alive = {
            name: Configuration(
                name,
                self.plan.values[name],
                copy.deepcopy(warm[name]) if name in warm else self.build(name),
                self.new_metrics(None),
            )
            for name in self.plan.names
        }
        self.round += 1
        self.rung = self.seen = 0
        self.rung_end = self.plan.budget
        self.done = False
        evidence = {
            "round": self.round,
            "configurations": list(self.plan.names),
            "warm": sorted(n for n in self.plan.names if n in warm),
            "budget": self.plan.budget,
            "eta": self.plan.eta,
            "survivors": self.plan.survivors,
            "metric": self.plan.metric,
        }
        return self._event("search", f"round {self.round} of {len(self.alive)}: {reason}", evidence)

    def learn(self, x: dict[str, Any], label: bool) -> list[ModelEvent]:
        """Test then train every configuration alive on one label; the pruning
        decision if a rung ends with it."""
        if self.done:
            return []
        for c in self.alive.values():
            c.metrics.update(label, c.model.predict_proba_one(x))
            c.model.learn_one(x, label)
        self.seen += 1
        if self.seen < self.rung_end:
            return []
        return [self._prune()]

    def score(self, c: Configuration) -> float:
        value = c.metrics.as_dict()[self.plan.metric]
        return value if math.isfinite(value) else math.inf

    def _prune(self) -> ModelEvent:
        lower = self.plan.metric in LOWER_IS_BETTER
        scores = {n: self.score(c) for n, c in self.alive.items()}
        # ties keep the spec's order: sorted is stable
        ranked = sorted(self.alive, key=lambda n: scores[n] if lower else -scores[n])
        keep = max(self.plan.survivors, math.ceil(len(ranked) / self.plan.eta))
        kept, pruned = ranked[:keep], ranked[keep:]
        budget = self.plan.budget * self.plan.eta**self.rung
        evidence = {
            "round": self.round,
            "rung": self.rung,
            "budget": budget,
            "labels": self.seen,
            "metric": self.plan.metric,
            "scores": {n: round(s, 6) if math.isfinite(s) else None for n, s in scores.items()},
            "kept": kept,
            "pruned": pruned,
        }
        self.alive = {n: self.alive[n] for n in kept}
        self.rung += 1
        self.rung_end = self.seen + self.plan.budget * self.plan.eta**self.rung
        self.done = len(self.alive) <= self.plan.survivors
        evidence["done"] = self.done
        reason = (
            f"rung {self.rung - 1} after {budget} labels: kept {len(kept)}, "
            f"pruned {len(pruned)} by {self.plan.metric} (best {ranked[0]})"
        )
        return self._event("prune", reason, evidence)

    def take_survivors(self) -> list[Configuration]:
        """The configurations left by a finished round (the search lets go of them)."""
        assert self.done
        out, self.alive = list(self.alive.values()), {}
        return out

    def state(self) -> dict[str, Any]:
        """Where the round is, as plain data (the learner checkpoint's): each
        configuration alive is named with its version, published beforehand."""
        return {
            "round": self.round, "rung": self.rung, "seen": self.seen,
            "rung_end": self.rung_end, "done": self.done,
            "alive": {n: {"version": c.version, "metrics": c.metrics.state()}
                      for n, c in self.alive.items()},
        }  # fmt: skip

    def restore(self, state: dict[str, Any], load: Callable[[str, int], Any]) -> None:
        """Continue the round ``state`` describes; ``load(name, version)``: a
        configuration's published model."""
        self.round, self.rung, self.seen = state["round"], state["rung"], state["seen"]
        self.rung_end, self.done = state["rung_end"], state["done"]
        self.alive = {
            name: Configuration(name, self.plan.values[name], load(name, int(c["version"])),
                                self.new_metrics(c["metrics"]), int(c["version"]))
            for name, c in state["alive"].items()
            if name in self.plan.values
        }  # fmt: skip

    def _event(self, kind: str, reason: str, evidence: dict[str, Any]) -> ModelEvent:
        return ModelEvent(kind=kind, model=self.plan.base, version=0, reason=reason,
                          evidence=evidence, by="learner")  # fmt: skip
