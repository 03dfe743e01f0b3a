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


def test_metrics_hold_what_rivers_own_metrics_hold_label_by_label() -> None:
    from river import metrics

    rng = random.Random(5)
    ours = PrequentialMetrics()
    accuracy, roc_auc, log_loss = metrics.Accuracy(), metrics.ROCAUC(), metrics.LogLoss()
    # probabilities on the thresholds themselves, at the ends, and anywhere between
    edges = [*roc_auc.thresholds, 0.0, 1.0, 1 / 9, 0.5]
    for i in range(5000):
        p = rng.choice(edges) if i % 7 == 0 else rng.random()
        label, proba = rng.random() < 0.3, {True: p, False: 1 - p}
        ours.update(label, proba)
        accuracy.update(label, p >= 0.5)
        roc_auc.update(label, proba)
        log_loss.update(label, proba)
        if i % 997 == 0:  # read midway too: the counts so far go in, the rest later
            assert ours.as_dict()["roc_auc"] == roc_auc.get()
    assert ours.as_dict() == {
        "labels": 5000.0,
        "accuracy": accuracy.get(),
        "roc_auc": roc_auc.get(),
        "log_loss": log_loss.get(),
    }
    for mine, theirs in zip(ours.roc_auc.cms, roc_auc.cms, strict=True):
        cells = [[(y, list(row.items())) for y, row in cm.data.items()] for cm in (mine, theirs)]
        assert cells[0] == cells[1]  # the same cells, in the same order
        assert (mine.n_samples, mine.total_weight) == (theirs.n_samples, theirs.total_weight)
