"""A slate's pairs scored at once give what River gives one by one, and leave the
model as River leaves it."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import pytest
from river import facto, linear_model, optim

from riverflow.models import batched
from riverflow.models.batched import positive_probabilities
from riverflow.models.champion import positive_probability
from riverflow.models.factory import Select, build_candidates
from riverflow.spec import load_spec


def pair(rng: random.Random, users: int = 300) -> dict[str, Any]:
    return {
        "user_id": f"u{rng.randrange(users)}", "category": f"c{rng.randrange(12)}",
        "quality": rng.random(), "device": rng.choice(["ios", "android", "web"]),
        "page": rng.choice(["home", "search"]), "user_ctr_24h": rng.random() * 0.2,
        "item_ctr_24h": rng.random() * 0.2, "user_category_ctr_7d": rng.random() * 0.2,
        "user_category_click_recency_7d": rng.random() * (rng.random() < 0.3),
    }  # fmt: skip


def trained(model: Any, n: int = 3_000, seed: int = 3) -> Any:
    rng = random.Random(seed)
    for _ in range(n):
        x = pair(rng, users=100)
        model.learn_one(x, rng.random() < 0.1 + 0.5 * (x["category"] == "c3"))
    return model


def assert_same(model: Any, xs: list[dict[str, Any]]) -> None:
    """Batched against one by one, each on its own copy of ``model``."""
    one, many = copy.deepcopy(model), copy.deepcopy(model)
    expected = [positive_probability(one, x) for x in xs]
    got = positive_probabilities(many, xs)
    assert got == pytest.approx(expected, abs=1e-12, rel=1e-12)
    final_one = one if not hasattr(one, "steps") else list(one.steps.values())[-1]
    final_many = many if not hasattr(many, "steps") else list(many.steps.values())[-1]
    if isinstance(final_one, facto.FMClassifier):
        # unseen users got latent vectors, drawn in the same order: the same model after
        assert list(final_many.latents) == list(final_one.latents)
        for key, vector in final_one.latents.items():
            np.testing.assert_array_equal(final_many.latents[key], vector)
        assert final_many.weights == final_one.weights


def test_a_factorization_machine_scores_a_batch_as_river_does() -> None:
    fm = trained(facto.FMClassifier(n_factors=8, seed=1, intercept=-2.0))
    rng = random.Random(9)
    xs = [pair(rng) for _ in range(500)]  # users 100-299 were never seen
    assert_same(fm, xs)
    # single inputs (no pairwise term: no latent vector touched) and mixed sizes
    assert_same(fm, [{"quality": 0.3}, {"user_id": "new"}, {}, *xs[:3], {"page": "x"}])


def test_the_recsys_candidates_score_a_batch_as_river_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's pipelines (Select, crosses, hashing, FM and logistic regression);
    its champion, an FM behind a Select, on the path that reads the selected inputs
    in place."""
    selected = []
    fm_selected = batched._fm_selected
    monkeypatch.setattr(batched, "_fm_selected", lambda *a: selected.append(1) or fm_selected(*a))
    spec = load_spec("recsys")
    rng = random.Random(5)
    xs = [{**pair(rng), "item_id": f"i{rng.randrange(50)}"} for _ in range(300)]
    for name, model in build_candidates(spec.models).items():
        for x in xs[:200]:
            model.learn_one(x, x["category"] in ("c1", "c2"))
        assert_same(model, xs[200:])
        assert name  # every candidate checked
    assert selected


def test_an_fm_behind_a_select_whose_one_hot_names_may_coincide_scores_as_river_does() -> None:
    """``page`` "x_y" and ``page_x`` "y" are both River's input ``page_x_y``: the
    selected inputs of one prediction are not always distinct, and River's dictionary
    keeps the last. So do the batch's predictions; and an input River refuses (None)
    is refused the same way."""
    model = Select("page", "page_x", "quality") | facto.FMClassifier(n_factors=4, seed=3)
    rng = random.Random(2)
    xs = [
        {"page": rng.choice(["x_y", "home"]), "page_x": rng.choice(["y", "z"]),
         "quality": rng.random()}
        for _ in range(200)
    ]  # fmt: skip
    for x in xs[:100]:
        model.learn_one(x, x["page"] == "x_y")
    assert_same(model, xs[100:])
    distinct = Select("page", "quality") | facto.FMClassifier(n_factors=4, seed=3)
    for x in xs[:100]:
        distinct.learn_one(x, x["page"] == "x_y")
    assert_same(distinct, xs[100:])
    for m in (model, distinct):
        with pytest.raises(TypeError):
            positive_probability(copy.deepcopy(m), {**xs[0], "quality": None})
        with pytest.raises(TypeError):
            positive_probabilities(copy.deepcopy(m), [xs[1], {**xs[0], "quality": None}])


def test_other_models_and_an_empty_batch() -> None:
    logreg = linear_model.LogisticRegression(optimizer=optim.SGD(0.05))
    numeric = [{"quality": q / 10, "user_ctr_24h": 0.1} for q in range(10)]
    for x in numeric:
        logreg.learn_one(x, x["quality"] > 0.5)
    assert positive_probabilities(logreg, numeric) == [
        positive_probability(logreg, x) for x in numeric
    ]
    assert positive_probabilities(facto.FMClassifier(), []) == []


def test_the_learners_prequential_prediction_of_an_fm_is_rivers_step_after_step() -> None:
    """The learner predicts each label's pair with ``fm_proba_one`` and then learns it:
    the same probabilities as River's ``predict_proba_one`` before each step, and the
    same model after all of them (an unseen user's latent vector drawn where River
    draws it); None for a model it does not score."""
    spec = load_spec("recsys")
    models = build_candidates(spec.models)
    ours, rivers = models["recsys-fm"], copy.deepcopy(models["recsys-fm"])
    rng = random.Random(4)
    for n in range(1_500):
        x = pair(rng, users=60 + n // 10)  # new users keep coming
        label = rng.random() < 0.1 + 0.5 * (x["category"] == "c3")
        got, expected = batched.fm_proba_one(ours, x), rivers.predict_proba_one(x)
        assert got is not None and got.keys() == expected.keys() == {False, True}
        assert got[True] == pytest.approx(expected[True], abs=1e-12, rel=1e-12)
        ours.learn_one(x, label)
        rivers.learn_one(x, label)
    fm, river_fm = list(ours.steps.values())[-1], list(rivers.steps.values())[-1]
    assert list(fm.latents) == list(river_fm.latents)
    for key, vector in river_fm.latents.items():
        np.testing.assert_array_equal(fm.latents[key], vector)
    assert fm.weights == river_fm.weights and fm.intercept == river_fm.intercept
    assert batched.fm_proba_one(models["recsys-logreg"], x) is None
