"""The spec's label-fed features: what ``source: labels`` may say, and errors that
name the option at fault. Events-sourced features read as before."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from riverflow.features.definitions import FeaturePlan, FeatureSource, FeatureSpec
from riverflow.features.labelled import LabelPlan


def spec(**f: Any) -> FeatureSpec:
    return FeatureSpec.model_validate({"name": "f", "window": "24h", **f})


def test_the_recommendation_features_parse() -> None:
    features = [
        spec(name="user_ctr_24h", agg="rate", field="clicked", source="labels", prior=20),
        spec(name="user_shown_24h", agg="count", source="labels"),
        spec(name="user_clicks_24h", agg="count", source="labels", when="clicked"),
        spec(name="item_ctr_24h", agg="rate", field="clicked", entity="item_id",
             source="labels", prior=20),
        spec(name="user_cat_ctr_7d", agg="rate", field="clicked", window="7d",
             entity=["user_id", "category"], source="labels"),
        spec(name="user_cat_since_click", agg="since", window="30d",
             entity=["user_id", "category"], source="labels", when="clicked"),
    ]  # fmt: skip
    assert features[0].source is FeatureSource.LABELS and features[0].prior == 20
    plan = LabelPlan.build(features, "clicked", "user_id", 3600.0)
    assert plan.names == [f.name for f in features]
    # user, the global rate (a prior), item, user x category over 7d and over 30d
    assert [g.entity_name for g in plan.tiles.groups] == [
        "user_id", "@all", "item_id", "user_id+category", "user_id+category",
    ]  # fmt: skip


def test_events_features_are_unchanged_and_read_back_from_a_dump() -> None:
    f = spec(agg="sum", field="amount", entity="card_id")
    assert f.source is FeatureSource.EVENTS and f.prior is None and f.when is None
    assert FeatureSpec.model_validate(f.model_dump(mode="json")) == f
    assert FeaturePlan.build([f], "card_id").names == ["f"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"agg": "rate", "field": "clicked"}, "rate needs source: labels"),
        ({"agg": "since"}, "since needs source: labels"),
        ({"agg": "mean", "field": "amount", "prior": 5}, "prior needs source: labels"),
        ({"agg": "count", "when": "clicked"}, "when needs source: labels"),
        ({"agg": "mean", "field": "clicked", "source": "labels"}, "source: labels computes"),
        ({"agg": "count", "source": "labels", "prior": 5}, "prior needs agg: rate"),
        ({"agg": "sum", "field": "clicked", "source": "labels", "when": "clicked"},
         "when needs agg: count or since"),
        ({"agg": "rate", "source": "labels"}, "rate needs a field"),
        ({"agg": "since", "field": "clicked", "source": "labels"}, "since takes no field"),
        ({"agg": "rate", "field": "clicked", "source": "labels", "prior": -1},
         "greater than or equal to 0"),
        ({"agg": "count", "source": "labels", "window": {"session": "30m"}},
         "takes no session window"),
        ({"agg": "count", "source": "clicks"}, "'events' or 'labels'"),
        ({"agg": "count", "source": "labels", "decay": "1h"}, "decay needs agg: since"),
        ({"agg": "max", "field": "amount", "decay": "1h"}, "decay needs source: labels"),
        ({"agg": "since", "source": "labels", "decay": "soon"}, "soon"),
    ],
)  # fmt: skip
def test_bad_options_are_refused_naming_them(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**options)


def test_the_events_plan_refuses_label_fed_features() -> None:
    with pytest.raises(ValueError, match="'f' is fed by labels"):
        FeaturePlan.build([spec(agg="count", source="labels")], "user_id")


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (spec(agg="rate", field="quality", source="labels"),
         "field 'quality' is not the label field 'clicked'"),
        (spec(agg="count", source="labels", when="shown"),
         "when 'shown' is not the label field 'clicked'"),
        (spec(agg="count", source="labels", entity="@all"), "'@' is reserved"),
        (spec(agg="count"), "takes source: labels only"),
    ],
)  # fmt: skip
def test_a_label_plan_checks_features_against_the_label(feature: FeatureSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabelPlan.build([feature], "clicked", "user_id", 0.0)
