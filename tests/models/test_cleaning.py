"""The spec's ``clean:`` rules: what each does, what it learns, what a spec may not say."""

from __future__ import annotations

import pickle
import random
import statistics
from typing import Any

import pytest
import yaml
from river import compose

from riverflow.models.cleaning import Clean, FieldCleaning, cleaning_of
from riverflow.models.factory import build_candidates
from riverflow.settings import DEFAULT_SPEC
from riverflow.spec import SpecError, parse_spec


def rules(**fields: dict[str, Any]) -> dict[str, FieldCleaning]:
    return {name: FieldCleaning.model_validate(r) for name, r in fields.items()}


def test_mean_and_median_are_learned_from_the_values_events_carried_not_the_imputed() -> None:
    clean = Clean(rules(a={"impute": "mean"}, b={"impute": "median"}))
    rng = random.Random(3)
    seen_a, seen_b = [], []
    for i in range(2000):
        a = None if i % 3 == 0 else rng.gauss(10, 2)
        b = None if i % 4 == 0 else rng.expovariate(0.1)
        x, done = clean.clean({"a": a, "b": b})
        clean.learn_one({"a": a, "b": b})
        if a is not None:
            seen_a.append(a)
            assert x["a"] == a
        else:
            assert ("a", "impute") in done
        if b is not None:
            seen_b.append(b)
    x, done = clean.clean({"a": None, "b": None})
    assert x["a"] == pytest.approx(statistics.fmean(seen_a), rel=1e-9)
    assert x["b"] == pytest.approx(statistics.median(seen_b), rel=0.05)  # P², an estimate
    assert done == [("a", "impute"), ("b", "impute")]


def test_a_fallback_before_anything_is_learned_then_the_statistic() -> None:
    clean = Clean(rules(a={"impute": "mean", "value": 42.0}, c={"impute": "mode"}))
    assert clean.clean({"a": None, "c": None})[0] == {"a": 42.0, "c": "__other__"}
    for v in ("x", "y", "y"):
        clean.learn_one({"a": 1.0, "c": v})
    assert clean.clean({"a": None, "c": None})[0] == {"a": 1.0, "c": "y"}


def test_clipping_to_fixed_and_to_learned_quantile_bounds() -> None:
    fixed = Clean(rules(a={"clip": [0, 100]}))
    assert fixed.clean({"a": 250.0}) == ({"a": 100}, [("a", "clip")])
    assert fixed.clean({"a": 50.0}) == ({"a": 50.0}, [])
    learned = Clean(rules(a={"clip": {"quantiles": [0.05, 0.95]}}))
    assert learned.clean({"a": 1e9})[0] == {"a": 1e9}  # nothing learned: nothing clipped
    for v in range(1, 1001):
        learned.learn_one({"a": float(v)})
    x, done = learned.clean({"a": 1e9})
    assert 900 < x["a"] < 1000 and done == [("a", "clip")]
    assert 0 < learned.clean({"a": -5.0})[0]["a"] < 100


def test_categories_past_the_cap_go_to_the_bucket() -> None:
    clean = Clean(rules(c={"max_categories": 2, "other": "rare"}))
    for v in ("a", "b", "c"):
        clean.learn_one({"c": v})
    assert clean.clean({"c": "a"}) == ({"c": "a"}, [])
    assert clean.clean({"c": "c"}) == ({"c": "rare"}, [("c", "bucket")])
    assert clean.is_new("c", "z") and not clean.is_new("c", "b")


def test_an_optional_field_without_a_value_is_left_out_and_absent_fields_are_not_added() -> None:
    clean = Clean(rules(a={"required": False}, b={"impute": "constant", "value": 0}))
    assert clean.clean({"a": None, "b": None, "z": 1}) == ({"b": 0, "z": 1}, [("b", "impute")])
    assert clean.clean({"z": 1}) == ({"z": 1}, [])  # a candidate that did not select them


def spec_with_clean(clean: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["clean"] = clean
    return data


@pytest.mark.parametrize(
    ("clean", "error"),
    [
        ({"nope": {}}, "clean.nope: not an event field"),
        ({"card_id": {"required": False}}, "clean.card_id: the event's key cannot be optional"),
        ({"ts": {"impute": "mean"}}, "clean.ts: the event's time cannot be optional"),
        ({"country": {"impute": "mean"}}, "clean.country: mean, median and clip need a numeric"),
        ({"amount": {"max_categories": 3}}, "clean.amount: max_categories needs a str field"),
        ({"amount": {"impute": "constant"}}, "impute: constant needs value"),
        ({"amount": {"impute": "constant", "value": "x"}}, "clean.amount.value: 'x' is not a"),
        ({"amount": {"impute": "mean", "required": True}}, "a required field is never missing"),
        ({"amount": {"clip": [5, 1]}}, "clip: low 5.0 is above high 1.0"),
        ({"amount": {"clip": {"quantiles": [0.9, 0.1]}}}, "need 0 <= low < high <= 1"),
        ({"amount": {"required": False}}, "'amount' may be missing (clean.amount) and has no "),
        ({"merchant": {"required": False}}, "a personal field (events.pii) cannot be optional"),
        ({"amount": {"impute": "mean", "wat": 1}}, "clean.amount.wat"),
    ],
)
def test_a_broken_cleaning_spec_is_refused_naming_the_field(
    clean: dict[str, Any], error: str
) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec_with_clean(clean))
    assert error in str(caught.value), str(caught.value)


def test_every_candidate_starts_with_the_clean_step_and_it_is_copied_with_the_model() -> None:
    spec = parse_spec(spec_with_clean({"amount": {"impute": "median"}}))
    for name, model in build_candidates(spec.models, clean=spec.clean).items():
        assert isinstance(model, compose.Pipeline), name
        step = cleaning_of(model)
        assert step is not None and step.rules == spec.clean
        step.learn_one({"amount": 7.0})
        # a published version is the model pickled (and signed, models.registry): its
        # statistics stay with it, so a rollback restores the cleaning of its model
        copy = pickle.loads(pickle.dumps(model))
        step.learn_one({"amount": 1e6})
        step.learn_one({"amount": 1e6})
        copied = cleaning_of(copy)
        assert copied is not None and copied.clean({"amount": None})[0]["amount"] == 7.0
