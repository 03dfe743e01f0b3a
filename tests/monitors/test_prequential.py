"""Prequential metrics kept as plain numbers continue exactly where they were."""

from __future__ import annotations

import random

import orjson

from riverflow.monitors.prequential import PrequentialMetrics


def test_metrics_rebuilt_from_their_json_state_continue_identically() -> None:
    rng = random.Random(3)
    live = PrequentialMetrics()
    live.update(True, {})  # a model with no prediction yet is counted, not scored
    for _ in range(3000):
        live.update(rng.random() < 0.2, {True: rng.random(), False: 0.0})
    restored = PrequentialMetrics.from_state(orjson.loads(orjson.dumps(live.state())))
    assert restored.as_dict() == live.as_dict()
    for _ in range(3000):
        label, proba = rng.random() < 0.2, {True: rng.random()}
        live.update(label, proba)
        restored.update(label, proba)
    assert restored.as_dict() == live.as_dict() and restored.state() == live.state()
