"""``label.type``: how a label of each type is validated, and the spec errors that
name a label or a candidate that does not fit."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from riverflow.settings import DEFAULT_SPEC
from riverflow.spec import SpecError, load_spec, parse_spec
from riverflow.streams.schema import LabelSpec
from riverflow.streams.validation import Invalid, label_validator


def validate(label: dict[str, Any], value: object) -> dict[str, Any] | Invalid:
    check = label_validator(LabelSpec.model_validate(label), 10_000)
    return check(orjson.dumps({"event_id": "e1", "y": value}))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("1", True), ("0", False),
     ("TRUE", True), ("false", False)],
)  # fmt: skip
def test_a_bool_label_takes_its_usual_forms(value: object, expected: bool) -> None:
    assert validate({"field": "y"}, value) == {"event_id": "e1", "y": expected}


@pytest.mark.parametrize(
    ("label", "value", "expected"),
    [
        ({"type": "int"}, 30, 30),
        ({"type": "int"}, 30.0, 30),  # a whole number written as a float
        ({"type": "float"}, 12.5, 12.5),
        ({"type": "float"}, 12, 12.0),
        ({"type": "category", "classes": ["bike", "car", 3]}, "car", "car"),
        ({"type": "category", "classes": ["bike", "car", 3]}, 3, 3),
        ({"type": "category", "classes": ["bike", "car", 3]}, "3", 3),  # its text
        ({"type": "category", "classes": ["1", "2"]}, 2, "2"),
    ],
)
def test_labels_of_each_type_are_coerced_to_it(
    label: dict[str, Any], value: object, expected: object
) -> None:
    record = validate({"field": "y", **label}, value)
    assert isinstance(record, dict)
    assert record["y"] == expected and type(record["y"]) is type(expected)


@pytest.mark.parametrize(
    ("label", "value", "kind", "says"),
    [
        ({}, 2, "wrong_type", "y: '2' is not a boolean"),
        ({"type": "int"}, 30.5, "wrong_type", "y:"),
        ({"type": "float"}, "fast", "wrong_type", "y:"),
        ({"type": "float"}, True, "wrong_type", "y:"),
        ({"type": "float"}, 1e300, "out_of_range", "y:"),
        ({"type": "category", "classes": ["bike", "car"]}, "boat", "wrong_value",
         "y: 'boat' is not one of the declared classes (bike, car)"),
        ({"type": "category", "classes": ["bike", "car"]}, True, "wrong_value", "y:"),
        ({"type": "category", "classes": ["bike", "car"]}, None, "wrong_value", "y:"),
    ],
)  # fmt: skip
def test_a_label_that_is_not_of_its_type_is_refused_naming_the_field(
    label: dict[str, Any], value: object, kind: str, says: str
) -> None:
    refused = validate({"field": "y", **label}, value)
    assert isinstance(refused, Invalid)
    assert refused.kind == kind and says in refused.message, refused


def test_a_missing_label_is_refused_for_every_type() -> None:
    check = label_validator(LabelSpec(field="y", type="category", classes=["a", "b"]), 1000)
    refused = check(b'{"event_id": "e1"}')
    assert isinstance(refused, Invalid) and refused.kind == "missing_field"
    assert "y" in refused.message


def fraud_with(**changes: Any) -> dict[str, Any]:
    data = load_spec(DEFAULT_SPEC).model_dump(mode="json", by_alias=True)
    for path, value in changes.items():
        section, name = path.split("__")
        data[section] = {**data[section], name: value}
    return data


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (fraud_with(label__type="text"), "label.type"),
        (fraud_with(label__type="category"), "a category label declares at least two classes"),
        (fraud_with(label__classes=["a", "b"]), "only a category label has classes"),
        (fraud_with(label__type="category", label__classes=["1", 1]), "each class is declared"),
        # fraud's candidates are classifiers: a number label needs regressors
        (fraud_with(label__type="float"),
         "models.candidates.0.estimator: river.tree.HoeffdingTreeClassifier is not a regressor"),
        # and fraud-logreg is a binary classifier
        (fraud_with(label__type="category", label__classes=["a", "b", "c"]),
         "models.candidates.1.estimator: river.linear_model.LogisticRegression is a binary"),
    ],
)  # fmt: skip
def test_a_label_or_a_candidate_that_does_not_fit_is_a_spec_error(
    data: dict[str, Any], says: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert says in str(info.value)


def test_a_regressor_for_a_bool_label_is_a_spec_error() -> None:
    data = load_spec("examples/delivery.yaml").model_dump(mode="json", by_alias=True)
    data["label"] = {"field": "late", "type": "bool"}
    with pytest.raises(SpecError, match="LinearRegression is not a classifier; the label is bool"):
        parse_spec(data)
    data["label"] = {"field": "delivery_minutes", "type": "int"}
    data["monitors"] = {"detector": {"kind": "ddm"}}
    with pytest.raises(SpecError, match="ddm watches 0/1 errors"):
        parse_spec(data)


def test_a_model_search_on_a_label_that_is_not_bool_is_a_spec_error() -> None:
    data = load_spec("examples/delivery.yaml").model_dump(mode="json", by_alias=True)
    linear = data["models"]["candidates"][0]
    linear["search"] = {"space": {"estimator.params.l2": [0.0, 0.01]}}
    with pytest.raises(SpecError, match=r"candidates\.0\.search: the model search ranks binary"):
        parse_spec(data)
