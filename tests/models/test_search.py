"""Online model search: a candidate's ``search:`` in the spec, its configurations, and
successive halving in the learner on the embedded runtime."""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import orjson
import pytest
from river import linear_model, metrics, optim

from riverflow.embedded import EmbeddedRuntime
from riverflow.models.factory import build_model, search_configs, search_plan
from riverflow.models.search import SuccessiveHalving
from riverflow.monitors.prequential import PrequentialMetrics
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, SpecError, parse_spec
from riverflow.streams.contracts import Evaluation, ModelEvent

LRS = [0.0005, 0.005, 0.05, 2.0]  # 0.05 without L2 is clearly best on this concept
L2S = [0.0, 0.05]
BUDGET = 100
N = 3000


def spec_data(search: dict[str, Any] | None = None, **candidate: Any) -> dict[str, Any]:
    logreg = {
        "name": "logreg",
        "estimator": {
            "class": "river.linear_model.LogisticRegression",
            "params": {"optimizer": {"class": "river.optim.SGD", "params": {"lr": 0.05}}},
        },
        **candidate,
    }
    if search is not None:
        logreg["search"] = search
    return {
        "name": "searched",
        "events": {
            "fields": {
                "event_id": "str",
                "key": "str",
                "x1": "float",
                "x2": "float",
                "ts": "timestamp",
            },
            "key": "key",
            "event_id": "event_id",
            "time": "ts",
        },
        "label": {"field": "y", "event_id": "event_id"},
        "models": {"inputs": ["x1", "x2"], "candidates": [logreg]},
    }


GRID = {
    "space": {"estimator.params.optimizer.params.lr": LRS, "estimator.params.l2": L2S},
    "budget": BUDGET,
}


def stream(seed: int) -> list[tuple[dict[str, Any], bool]]:
    """A seeded logistic concept: P(y) = sigmoid(3 x1 - 2 x2 + 0.5)."""
    rng = random.Random(seed)
    out = []
    for i in range(N):
        x1, x2 = rng.gauss(0, 1), rng.gauss(0, 1)
        p = 1 / (1 + math.exp(-(3 * x1 - 2 * x2 + 0.5)))
        event = {"event_id": f"e{i}", "key": f"k{i % 50}", "x1": x1, "x2": x2, "ts": 1e9 + i}
        out.append((event, rng.random() < p))
    return out


def hindsight(data: list[tuple[dict[str, Any], bool]]) -> dict[tuple[float, float], float]:
    """Each configuration's prequential log loss over the whole stream, in plain River."""
    out = {}
    for lr in LRS:
        for l2 in L2S:
            model = linear_model.LogisticRegression(optimizer=optim.SGD(lr), l2=l2)
            loss = metrics.LogLoss()
            for event, y in data:
                x = {"x1": event["x1"], "x2": event["x2"]}
                proba = model.predict_proba_one(x)
                if proba:
                    loss.update(y, proba)
                model.learn_one(x, y)
            out[lr, l2] = loss.get()
    return out


def run(
    spec: PipelineSpec, data: list[tuple[dict[str, Any], bool]], rt: EmbeddedRuntime | None = None
) -> EmbeddedRuntime:
    """``data`` through a runtime (a new one, or ``rt`` going on): events, then their labels."""
    rt = rt or EmbeddedRuntime(spec, Settings(label_wait_s=0.0, snapshot_every_labels=500))
    for start in range(0, len(data), 250):
        chunk = data[start : start + 250]
        for event, _ in chunk:
            rt.produce(rt.topics.events, event["key"].encode(), orjson.dumps(event))
        rt.step()
        for event, y in chunk:
            label = {"event_id": event["event_id"], "y": y}
            rt.produce(rt.topics.labels, event["event_id"].encode(), orjson.dumps(label))
        rt.drain()
    rt.publish()
    return rt


def name(lr: float, l2: float) -> str:
    return f"logreg@lr={lr:.4g},l2={l2:.4g}"


@pytest.mark.parametrize("seed", [1, 2])
def test_search_prunes_to_a_survivor_that_is_best_in_hindsight(seed: int) -> None:
    """8 configurations, halved at rungs of 100, 200 and 400 labels: the one left
    is the best on the whole stream computed apart in plain River; each rung's
    model-event holds every alive configuration's metric (the first rung's equal to
    River's over its 100 labels) and its budget; the survivor is then an ordinary
    challenger: evaluated, published, in the monitor's view with the search's rungs."""
    data = stream(seed)
    spec = parse_spec(spec_data(GRID))
    rt = run(spec, data)
    events = [ModelEvent.decode(v) for _, v in rt.messages(rt.topics.model_events)]
    prunes = [e for e in events if e.kind == "prune"]
    assert [e.evidence["budget"] for e in prunes] == [100, 200, 400]  # type: ignore[index]
    assert [len(e.evidence["kept"]) for e in prunes] == [4, 2, 1]  # type: ignore[index]
    alive = {name(lr, l2) for lr in LRS for l2 in L2S}
    for e in prunes:
        ev = e.evidence or {}
        assert e.by == "learner" and e.model == "logreg"
        assert set(ev["scores"]) == alive  # every configuration alive at the rung
        assert set(ev["kept"]) | set(ev["pruned"]) == alive
        worst_kept = max(ev["scores"][n] for n in ev["kept"])
        assert all(ev["scores"][n] >= worst_kept for n in ev["pruned"])
        alive = set(ev["kept"])
    first = hindsight(data[:BUDGET])
    for (lr, l2), loss in first.items():
        assert prunes[0].evidence["scores"][name(lr, l2)] == pytest.approx(loss, abs=1e-6)  # type: ignore[index]

    whole = hindsight(data)
    best = min(whole, key=whole.__getitem__)
    assert alive == {name(*best)}, whole
    survivor = name(*best)
    assert survivor in rt.learner.candidates
    started = [e for e in events if e.kind == "started" and e.model == survivor]
    assert started and "survived round 1" in str(started[0].reason)
    assert any(e.kind == "published" and e.model == survivor for e in events)
    last = Evaluation.decode(rt.messages(rt.topics.evaluations)[-1][1])
    assert set(last.predictions) == {"logreg", survivor}  # pruned ones are gone
    view = rt.monitor.view()
    assert survivor in {c.name for c in view.candidates}
    search = view.searches["logreg"]
    assert search.done and [r.budget for r in search.rungs] == [100, 200, 400]
    assert search.rungs[-1].kept == [survivor]
    assert {m.kind for m in view.markers} >= {"search", "prune"}


def test_configurations_are_the_grid_with_ranges_expanded() -> None:
    spec = parse_spec(
        spec_data(
            {
                "space": {
                    "estimator.params.optimizer.params.lr": {"log_uniform": [0.001, 0.1], "n": 3},
                    "estimator.params.l2": [0.0, 0.01],
                }
            }
        )
    )
    configs = search_configs(spec.models.candidates[0])
    assert [c.name for c in configs] == [
        "logreg@lr=0.001,l2=0", "logreg@lr=0.001,l2=0.01", "logreg@lr=0.01,l2=0",
        "logreg@lr=0.01,l2=0.01", "logreg@lr=0.1,l2=0", "logreg@lr=0.1,l2=0.01",
    ]  # fmt: skip
    model = build_model(configs[3])
    assert model.l2 == 0.01 and model.optimizer.lr.learning_rate == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("search", "says"),
    [
        ({"space": {"estimator.params.l2": []}},
         "search.space.estimator.params.l2: an empty grid"),
        ({"space": {"estimator.params.optimiser.params.lr": [0.1, 0.2]}},
         "has no River object 'optimiser' to set 'lr' in (parameters set: optimizer)"),
        ({"space": {"estimator.l2": [0.1, 0.2]}}, "not a parameter path"),
        ({"space": {"preprocessing.0.params.with_std": [True, False]}},
         "the candidate has 0 preprocessing step(s)"),
        ({"space": {"estimator.params.l2": [0.0, 0.1, 0.2],
                    "estimator.params.optimizer.params.lr": [0.1, 0.2, 0.3]}, "max_configs": 8},
         "3 x 3 = 9 configurations, more than max_configs 8"),
        ({"space": {"estimator.params.l2": {"log_uniform": [0.0, 0.1], "n": 3}}},
         "bounds must be above 0"),
        ({"space": {"estimator.params.l2": [0.1]}}, "nothing to search"),
        ({"space": {"estimator.params.l2": [0.1, 0.100001]}}, "configurations named alike"),
    ],
)  # fmt: skip
def test_a_bad_search_is_a_spec_error_naming_it(search: dict[str, Any], says: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_data(search))
    assert says in str(err.value)
    assert "models.candidates.0" in str(err.value)


def test_a_parameter_the_estimator_does_not_take_is_refused_at_build() -> None:
    from riverflow.models.errors import ModelSpecError
    from riverflow.models.factory import build_candidates

    spec = parse_spec(spec_data({"space": {"estimator.params.l3": [0.0, 0.1]}}))
    with pytest.raises(ModelSpecError, match=r"search configuration logreg@l3=0: .*it accepts"):
        build_candidates(spec.models)


@pytest.mark.parametrize("warm", [False, True])
def test_a_new_round_starts_fresh_or_warm_from_the_survivor(warm: bool) -> None:
    spec = parse_spec(spec_data(GRID))
    plan = search_plan(spec.models.candidates[0])
    assert plan is not None
    configs = {c.name: c for c in search_configs(spec.models.candidates[0])}
    run_ = SuccessiveHalving(
        plan, lambda n: build_model(configs[n]), lambda _: PrequentialMetrics()
    )
    run_.start("test")
    data = stream(3)
    for event, y in data[:700]:
        run_.learn({"x1": event["x1"], "x2": event["x2"]}, y)
    assert run_.done
    (survivor,) = run_.take_survivors()
    given = copy.deepcopy(survivor.model)
    started = run_.start("drift", {survivor.name: given} if warm else None)
    assert started.kind == "search" and started.evidence["round"] == 2  # type: ignore[index]
    again = run_.alive[survivor.name].model
    assert again is not given  # a copy: the challenger and the search learn apart
    assert (again.weights == given.weights) is warm
    assert started.evidence["warm"] == ([survivor.name] if warm else [])  # type: ignore[index]


def test_the_fraud_example_searches_its_logistic_regression(fraud_spec: PipelineSpec) -> None:
    logreg = fraud_spec.models.candidate("fraud-logreg")
    assert logreg is not None and logreg.search is not None
    names = [c.name for c in search_configs(logreg)]
    assert len(names) == 6 and "fraud-logreg@lr=0.05,l2=0.001" in names


@pytest.mark.parametrize("on_drift", ["warm", "fresh"])
def test_a_drift_alarm_of_the_champion_starts_a_new_round(on_drift: str) -> None:
    """The monitor answers a drift alarm of the champion with a fresh challenger; the
    learner then searches again: warm, the survivor's configuration continues a copy
    of the survivor's model; fresh, every configuration starts anew. The new round's
    survivor is a challenger again."""
    grid = {**GRID, "on_drift": on_drift, "budget": 50}
    spec = parse_spec(spec_data(grid))
    data = stream(4)
    rt = run(spec, data[:1000])  # round 1 is over after 350 labels
    survivor = next(n for n in rt.learner.candidates if "@" in n)
    rt.registry.start_challenger("logreg.r1", "logreg", "drift alarm of champion logreg")
    before = len(rt.messages(rt.topics.model_events))
    run(spec, data[1000:1400], rt)
    events = [ModelEvent.decode(v) for _, v in rt.messages(rt.topics.model_events)[before:]]
    (again,) = [e for e in events if e.kind == "search"]
    ev = again.evidence or {}
    assert ev["round"] == 2 and "drift alarm of the champion" in str(again.reason)
    assert ev["warm"] == ([survivor] if on_drift == "warm" else [])
    assert [len(e.evidence["kept"]) for e in events if e.kind == "prune"] == [4, 2, 1]  # type: ignore[index]
    started = [e.model for e in events if e.kind == "started" and "@" in e.model]
    if on_drift == "fresh":  # the survivor's line starts again from the round's model
        assert len(started) == 1
    assert any("@" in n for n in rt.learner.candidates)


def test_a_dropped_survivor_the_monitor_promotes_is_trained_again() -> None:
    """A survivor a later round dropped may still be promoted (its duel had passed, a
    cool-down held it back): the learner then trains it again from the version served."""
    from riverflow.assembly import memory_backends
    from riverflow.models.registry import ChampionPointer
    from riverflow.stages.search import Searches

    spec = parse_spec(spec_data(GRID))
    _, registry = memory_backends(spec, Settings())
    name = "logreg@lr=0.05,l2=0"
    version = registry.publish(name, linear_model.LogisticRegression(), {"model": name})
    searches = Searches([])
    searches.dropped[name] = "logreg"
    candidates: dict[str, Any] = {}
    assert searches.adopt(ChampionPointer("logreg", 1), registry, candidates) == []
    (event,) = searches.adopt(ChampionPointer(name, version), registry, candidates)
    assert event.kind == "started" and candidates[name].version == version
    assert searches.survivors == {name: "logreg"} and not searches.dropped
