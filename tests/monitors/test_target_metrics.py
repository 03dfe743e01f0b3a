"""Regression and multiclass metrics: the prequential ones (the learner's, kept in
its checkpoint) and the windowed ones (the monitor's) agree with River's and
numpy's definitions, and survive a checkpoint."""

from __future__ import annotations

import math
import random

import numpy as np
import orjson
import pytest
from river import metrics

from riverflow.monitors.prequential import (
    MulticlassMetrics,
    PrequentialMetrics,
    RegressionMetrics,
    metrics_from_state,
)
from riverflow.monitors.quality import WindowedMulticlass, WindowedRegression

CLASSES = ["bike", "car", "foot"]


def regression_pairs(n: int, seed: int = 3) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.gauss(30.0, 8.0)
        out.append((y, y + rng.gauss(0.5, 4.0)))
    return out


def multiclass_pairs(n: int, seed: int = 5) -> list[tuple[str, dict[str, float]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(CLASSES)
        weights = {c: rng.random() + (1.5 if c == label else 0.0) for c in CLASSES}
        total = sum(weights.values())
        out.append((label, {} if i < 3 else {c: w / total for c, w in weights.items()}))
    return out


def test_regression_metrics_are_rivers() -> None:
    ours = RegressionMetrics()
    mae, rmse, r2 = metrics.MAE(), metrics.RMSE(), metrics.R2()
    for y, value in regression_pairs(2_000):
        ours.update(y, value)
        for m in (mae, rmse, r2):
            m.update(y, value)
    got = ours.as_dict()
    assert got["labels"] == 2_000
    assert got["mae"] == pytest.approx(mae.get(), rel=1e-9)
    assert got["rmse"] == pytest.approx(rmse.get(), rel=1e-9)
    assert got["r2"] == pytest.approx(r2.get(), rel=1e-9)
    assert 0.5 < got["r2"] < 1.0


def test_multiclass_metrics_are_rivers_and_unscored_labels_are_counted_only() -> None:
    ours = MulticlassMetrics()
    acc, f1, loss = metrics.Accuracy(), metrics.MacroF1(), metrics.CrossEntropy()
    for label, proba in multiclass_pairs(1_500):
        ours.update(label, proba)
        if proba:  # as river.evaluate.progressive_val_score: no prediction, no score
            acc.update(label, max(proba, key=proba.__getitem__))
            f1.update(label, max(proba, key=proba.__getitem__))
            loss.update(label, proba)
    got = ours.as_dict()
    assert got["labels"] == 1_500
    assert got["accuracy"] == pytest.approx(acc.get(), rel=1e-12)
    assert got["macro_f1"] == pytest.approx(f1.get(), rel=1e-12)
    assert got["log_loss"] == pytest.approx(loss.get(), rel=1e-9)


@pytest.mark.parametrize("kind", [RegressionMetrics, MulticlassMetrics, PrequentialMetrics])
def test_metrics_continue_exactly_from_a_checkpoint(kind: type) -> None:
    if kind is RegressionMetrics:
        stream: list[tuple[object, object]] = list(regression_pairs(600))
    elif kind is MulticlassMetrics:
        stream = list(multiclass_pairs(600))
    else:
        rng = random.Random(1)
        stream = [(rng.random() < 0.3, {True: p, False: 1 - p})
                  for p in (rng.random() for _ in range(600))]  # fmt: skip
    whole, first = kind(), kind()
    for label, answer in stream:
        whole.update(label, answer)
    for label, answer in stream[:400]:
        first.update(label, answer)
    # the checkpoint holds plain JSON; the restored metrics know their own kind
    restored = metrics_from_state(orjson.loads(orjson.dumps(first.state())))
    assert type(restored) is kind
    for label, answer in stream[400:]:
        restored.update(label, answer)
    for name, value in whole.as_dict().items():
        assert restored.as_dict()[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_windowed_regression_is_the_last_window() -> None:
    pairs = regression_pairs(2_345)
    window = WindowedRegression(500, recent=100)
    errors = [window.add(y, v) for y, v in pairs]
    assert errors[-1] == pytest.approx(abs(pairs[-1][0] - pairs[-1][1]))
    y = np.array([p[0] for p in pairs[-500:]])
    v = np.array([p[1] for p in pairs[-500:]])
    got = window.as_dict()
    assert got["window"] == 500 and window.full
    assert got["mae"] == pytest.approx(np.abs(y - v).mean(), rel=1e-9)
    assert got["rmse"] == pytest.approx(math.sqrt(((y - v) ** 2).mean()), rel=1e-9)
    r2 = 1 - ((y - v) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert got["r2"] == pytest.approx(r2, rel=1e-9)
    assert window.headline() == got["mae"]


def test_windowed_multiclass_is_the_last_window() -> None:
    stream = [
        (label, proba or {c: 1 / 3 for c in CLASSES}) for label, proba in multiclass_pairs(1_234)
    ]
    window = WindowedMulticlass(300, recent=50)
    losses = []
    for label, proba in stream:
        predicted = max(CLASSES, key=lambda c: proba[c])
        losses.append(window.add(label, (predicted, proba)))
    last = stream[-300:]
    acc, f1, loss = metrics.Accuracy(), metrics.MacroF1(), metrics.CrossEntropy()
    for label, proba in last:
        predicted = max(CLASSES, key=lambda c: proba[c])
        acc.update(label, predicted)
        f1.update(label, predicted)
        loss.update(label, proba)
    got = window.as_dict()
    assert got["accuracy"] == pytest.approx(acc.get()) == window.headline()
    assert got["macro_f1"] == pytest.approx(f1.get())
    assert got["log_loss"] == pytest.approx(loss.get(), rel=1e-9)
    assert set(losses) == {0.0, 1.0}
