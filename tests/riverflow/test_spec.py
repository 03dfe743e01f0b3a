"""The spec loads, and a broken spec is refused with the offending field named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from riverflow.models.errors import ModelSpecError
from riverflow.models.factory import build_candidates, build_model
from riverflow.models.spec import ModelSpec
from riverflow.models.target import Target
from riverflow.settings import DEFAULT_SPEC
from riverflow.spec import SpecError, load_spec, parse_spec


def fraud_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_SPEC.read_text())
    return data


def test_fraud_example_loads_and_builds_its_model() -> None:
    spec = load_spec(DEFAULT_SPEC)
    assert spec.topics.events == "fraud.events"
    assert spec.feature_plan().names == [
        "tx_count_1h",
        "amount_sum_1h",
        "amount_mean_24h",
        "tx_in_session",
        "amount_in_session",
    ]
    models = build_candidates(spec.models)
    assert spec.models.champion_spec.name == "fraud-hoeffding"
    assert type(models["fraud-hoeffding"]).__name__ == "HoeffdingTreeClassifier"
    # the linear candidate sees only the numbers: River's scalers refuse strings
    linear = models["fraud-logreg"]
    x = {"amount": 10.0, "category": "food", "country": "FR", "channel": "web",
         "tx_count_1h": 1.0, "amount_sum_1h": 10.0, "amount_mean_24h": 10.0}  # fmt: skip
    linear.learn_one(x, True)
    assert 0.0 < linear.predict_proba_one(x)[True] < 1.0


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["features"][1].update(field="amt"), "features.1.field: 'amt' is not"),
        (lambda d: d["features"][1].update(field="country"), "'country' is not a numeric"),
        (lambda d: d["features"][0].update(window="1 hour"), "not a duration"),
        (lambda d: d["features"][0].update(agg="median"), "features.0.agg"),
        (lambda d: d["events"].update(key="card"), "events.key: 'card' is not an event field"),
        (lambda d: d["events"]["fields"].update(amount="decimal"), "events.fields.amount"),
        (lambda d: d["models"]["inputs"].append("zip"), "models.inputs.4: 'zip'"),
        (lambda d: d["models"].update(champion="nope"), "models: champion: 'nope' is not a"),
        (
            lambda d: d["models"]["candidates"].append(d["models"]["candidates"][0]),
            "models: candidates.2.name: duplicate candidate 'fraud-hoeffding'",
        ),
        (
            lambda d: d["models"]["candidates"][1]["select"].append("zip"),
            "models.candidates.1.select.4: 'zip' is not a model input",
        ),
        (lambda d: d["models"].update(candidates=[]), "models.candidates: List should have"),
        (lambda d: d.pop("label"), "label: Field required"),
        (lambda d: d.update(extra=1), "extra: Extra inputs are not permitted"),
    ],
)
def test_broken_spec_names_the_offending_field(mutate: Any, expected: str) -> None:
    data = fraud_data()
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert expected in str(info.value)


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ({"class": "river.tree.NoSuchTree"}, "no River estimator class 'NoSuchTree'"),
        ({"class": "river.nosuchmodule.X"}, "no module 'river.nosuchmodule'"),
        ({"class": "os.system"}, "only River estimators"),
        ({"class": "river.tree.HoeffdingTreeClassifier", "params": {"depth": 3}}, "bad parameters"),
        ({"class": "river.linear_model.LinearRegression"}, "is not a classifier"),
        ({"class": "river.metrics.Accuracy"}, "no River estimator class"),
    ],
)
def test_unknown_model_classes_and_bad_params_are_clear(
    estimator: dict[str, Any], expected: str
) -> None:
    spec = ModelSpec.model_validate({"name": "m", "estimator": estimator})
    with pytest.raises(ModelSpecError, match=expected):
        build_model(spec)


def test_pipeline_of_preprocessing_and_nested_params() -> None:
    spec = ModelSpec.model_validate(
        {
            "name": "m",
            "preprocessing": [{"class": "river.preprocessing.StandardScaler"}],
            "estimator": {
                "class": "river.linear_model.LogisticRegression",
                "params": {"optimizer": {"class": "river.optim.SGD", "params": {"lr": 0.05}}},
            },
        }
    )
    model = build_model(spec)
    model.learn_one({"a": 1.0}, True)
    assert 0.0 <= model.predict_proba_one({"a": 1.0})[True] <= 1.0
    assert model["LogisticRegression"].optimizer.learning_rate == 0.05


def test_every_example_spec_loads_and_builds_its_champion() -> None:
    examples = sorted((DEFAULT_SPEC.parent).glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        spec = load_spec(path)
        assert (
            build_model(spec.models.champion_spec, Target(spec.label.type, spec.label.classes))
            is not None
        ), path
