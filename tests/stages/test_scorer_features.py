"""The scorer's features: other entities joined onto an event, late events counted."""

from __future__ import annotations

import gc
from typing import Any

import orjson
import pytest
import yaml

from riverflow.assembly import build_scorer, memory_backends
from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import PipelineSpec, load_spec, parse_spec
from riverflow.streams.contracts import Message, Prediction
from riverflow.tools.generator import FraudStreamConfig, transactions
from tests.helpers import assert_aggregations_match, brute_force_features


def spec_with(features: list[dict[str, Any]]) -> PipelineSpec:
    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["features"] = features
    # the fraud example's linear candidate selects fraud features these specs replace
    data["models"]["candidates"] = data["models"]["candidates"][:1]
    return parse_spec(data)


def predictions(rt: EmbeddedRuntime) -> dict[str, Prediction]:
    out = [Prediction.decode(v) for _, v in rt.messages(rt.topics.predictions)]
    return {p.event_id: p for p in out}


def test_merchant_and_card_merchant_aggregates_join_onto_card_events(settings: Settings) -> None:
    spec = spec_with([
        {"name": "card_n_1h", "agg": "count", "window": "1h"},
        {"name": "merchant_amount_max_24h", "agg": "max", "field": "amount", "window": "24h",
         "entity": "merchant"},
        {"name": "pair_n_24h", "agg": "count", "window": "24h",
         "entity": ["card_id", "merchant"]},
        {"name": "card_merchants_24h", "agg": "distinct_exact", "field": "merchant",
         "window": "24h"},
    ])  # fmt: skip
    events = [e for e, _ in transactions(2000, FraudStreamConfig(cards=30, mean_gap_s=20.0))]
    rt = EmbeddedRuntime(spec, settings)
    for e in events:
        rt.produce(rt.topics.events, e["card_id"].encode(), orjson.dumps(e))
    rt.drain()
    got = predictions(rt)
    expected = brute_force_features(events, spec.features, "card_id", "ts")
    for event_id, values in expected.items():
        assert_aggregations_match(got[event_id].features, values, spec.features)
    assert max(p.features["pair_n_24h"] for p in got.values()) >= 2


def test_a_too_late_event_is_scored_on_the_current_window_and_counted(
    settings: Settings,
) -> None:
    spec = spec_with([{"name": "n_1h", "agg": "count", "window": "1h"}])  # lateness 10m
    event = {"card_id": "c1", "amount": 5.0, "merchant": "m", "category": "fuel",
             "country": "FR", "channel": "pos"}  # fmt: skip
    rt = EmbeddedRuntime(spec, settings)
    for i, ts in enumerate([10_000.0, 9_700.0, 8_000.0, 10_010.0]):
        rec = {**event, "event_id": f"e{i}", "ts": ts}
        rt.produce(rt.topics.events, b"c1", orjson.dumps(rec))
    rt.drain()
    got = predictions(rt)
    assert [got[f"e{i}"].features["n_1h"] for i in range(4)] == [1.0, 1.0, 2.0, 3.0]
    assert rt.scorer.counters.late_events == 1
    assert rt.scorer.status()["late_events"] == 1  # exported as riverflow_stage_status


def test_a_batch_leaves_the_cyclic_collector_as_it_found_it(settings: Settings) -> None:
    """The scorer holds the collector off for a batch only: on again after it (also
    when the batch fails), and off still for a caller that turned it off."""
    spec = load_spec(DEFAULT_SPEC)
    scorer = build_scorer(spec, settings, *memory_backends(spec, settings))
    events = [e for e, _ in transactions(50, FraudStreamConfig(cards=5))]
    batch = [Message(spec.topics.events, 0, i, None, orjson.dumps(e)) for i, e in enumerate(events)]
    seen: list[bool] = []
    update = scorer.store.update_and_read

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return update(*args, **kwargs)

    scorer.store.update_and_read = spy  # type: ignore[method-assign]
    assert gc.isenabled()
    assert len(scorer.process(batch)) == len(batch)
    assert seen == [False] and gc.isenabled()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("store down")

    scorer.store.update_and_read = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        scorer.process(batch)
    assert gc.isenabled()
    scorer.store.update_and_read = spy  # type: ignore[method-assign]
    gc.disable()
    try:
        scorer.process(batch)
        assert not gc.isenabled()
    finally:
        gc.enable()
