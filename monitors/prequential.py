"""Prequential (test-then-train) metrics of a model: a binary classifier's, a
regressor's or a multiclass classifier's (the spec's ``label.type``)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any, Protocol

from river import metrics, stats


class PrequentialMetrics:
    """Accuracy, ROC AUC and log loss over every label seen, updated before learning.

    Scored like ``river.evaluate.progressive_val_score``: the metrics take the
    model's ``predict_proba_one`` as it is, and a model with no prediction yet
    (an empty dict) is not scored for that label. ``count`` counts every label.

    River's ROC AUC updates one confusion matrix per threshold for each label
    (ten, most of what a label costs here). ``update`` only counts the label
    under how many thresholds its probability passes, and the matrices get
    those counts when the metrics are read (``as_dict``, ``state``): every
    total then holds the same number as label by label (whole counts, exact in
    a float), in the same order.
    """

    def __init__(self) -> None:
        self.accuracy = metrics.Accuracy()
        self._roc_auc = metrics.ROCAUC()
        self.log_loss = metrics.LogLoss()
        self.count = 0
        # ROC AUC's thresholds, ascending: a probability is above the first ``k``
        # of them, k = bisect_left(thresholds, p) (thresholds below p)
        self._thresholds = list(self._roc_auc.thresholds)
        self._pending: dict[tuple[bool, int], int] = {}  # (label, k) -> labels not applied

    def update(self, label: bool, proba: dict[Any, float]) -> None:
        self.count += 1
        if not proba:
            return
        p = proba.get(True, 0.0)
        self.accuracy.update(label, p >= 0.5)
        cell = (label == self._roc_auc.pos_val, bisect_left(self._thresholds, p))
        self._pending[cell] = self._pending.get(cell, 0) + 1
        self.log_loss.update(label, proba)

    @property
    def roc_auc(self) -> metrics.ROCAUC:
        """River's ROC AUC, with every label counted so far."""
        if self._pending:
            for (y, k), n in self._pending.items():  # in the order they first came
                for i, cm in enumerate(self._roc_auc.cms):
                    cm.update(y, i < k, float(n))
                    cm.n_samples += n - 1  # as n updates of one label each
            self._pending = {}
        return self._roc_auc

    def as_dict(self) -> dict[str, float]:
        return {
            "labels": float(self.count),
            "accuracy": float(self.accuracy.get()),
            "roc_auc": float(self.roc_auc.get()),
            "log_loss": float(self.log_loss.get()),
        }

    def state(self) -> dict[str, Any]:
        """Everything the metrics hold, as plain numbers (the learner checkpoint's JSON).

        River has no export of a metric's state, so this reads its confusion
        matrices (cells ``[label, predicted, weight]``) and the running mean of the
        log loss; ``from_state`` rebuilds them so the metrics continue exactly
        (river is pinned; tests/monitors/test_prequential.py checks the round trip).
        """
        mean = self.log_loss._mean
        return {
            "count": self.count,
            "accuracy": _cells(self.accuracy.cm),
            "roc_auc": [_cells(cm) for cm in self.roc_auc.cms],
            "log_loss": {"n": mean.n, "mean": mean.get()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrequentialMetrics:
        """The metrics whose ``state()`` this was."""
        restored = cls()
        restored.count = int(state["count"])
        _refill(restored.accuracy.cm, state["accuracy"])
        cms = restored.roc_auc.cms
        if len(state["roc_auc"]) != len(cms):
            raise ValueError(f"ROC AUC state has {len(state['roc_auc'])} thresholds, "
                             f"expected {len(cms)}")  # fmt: skip
        for cm, cells in zip(cms, state["roc_auc"], strict=True):
            _refill(cm, cells)
        loss = state["log_loss"]
        restored.log_loss._mean = stats.Mean._from_state(float(loss["n"]), float(loss["mean"]))
        return restored


def _cells(cm: metrics.ConfusionMatrix) -> list[list[Any]]:
    return [[y, p, w] for y, row in cm.data.items() for p, w in row.items()]


def _refill(cm: metrics.ConfusionMatrix, cells: list[list[Any]]) -> None:
    # one weighted update per cell: the weights are counts of whole labels, so every
    # total the metrics read comes out the same as label by label (only
    # ``n_samples``, which no metric here reads, counts cells instead)
    for y, p, w in cells:
        cm.update(bool(y), bool(p), float(w))


class RegressionMetrics:
    """MAE, RMSE and R² of a regressor over every label seen, updated before learning.

    River's definitions (``metrics.MAE``, ``RMSE``, ``R2``: 1 - SS_res / SS_tot, 0
    until two labels or while every label was the same), kept as running sums of
    plain numbers so that ``state`` is the checkpoint's JSON: the labels' mean and
    sum of squared deviations by Welford's update (no cancellation over millions of
    labels), and the sums of absolute and squared errors.
    """

    def __init__(self) -> None:
        self.count = 0
        self.abs_error = 0.0
        self.sq_error = 0.0
        self.mean_y = 0.0
        self.m2_y = 0.0

    def update(self, label: float, value: float) -> None:
        self.count += 1
        error = float(label) - value
        self.abs_error += abs(error)
        self.sq_error += error * error
        delta = label - self.mean_y
        self.mean_y += delta / self.count
        self.m2_y += delta * (label - self.mean_y)

    def as_dict(self) -> dict[str, float]:
        n = self.count
        r2 = 1.0 - self.sq_error / self.m2_y if n > 1 and self.m2_y > 0 else 0.0
        return {
            "labels": float(n),
            "mae": self.abs_error / n if n else 0.0,
            "rmse": math.sqrt(self.sq_error / n) if n else 0.0,
            "r2": r2,
        }

    def state(self) -> dict[str, Any]:
        return {"kind": "regression", "count": self.count, "abs_error": self.abs_error,
                "sq_error": self.sq_error, "mean_y": self.mean_y, "m2_y": self.m2_y}  # fmt: skip

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RegressionMetrics:
        restored = cls()
        restored.count = int(state["count"])
        for name in ("abs_error", "sq_error", "mean_y", "m2_y"):
            setattr(restored, name, float(state[name]))
        return restored


class MulticlassMetrics:
    """Accuracy, macro-F1 and log loss of a multiclass classifier over every label
    seen, updated before learning, as River defines them (``metrics.Accuracy``,
    ``MacroF1``: the mean of each class's F1 over the classes seen as labels or
    predictions, ``CrossEntropy``: probabilities clamped to [1e-15, 1]).

    A model with no prediction yet (an empty ``predict_proba_one``) is not scored
    for that label; ``count`` counts every label. The state is the confusion
    counts and the log loss's sum: plain numbers.
    """

    def __init__(self) -> None:
        self.count = 0
        self.scored = 0
        self.confusion: dict[tuple[str, str], int] = {}  # (label, predicted) as text -> n
        self.loss = 0.0

    def update(self, label: Any, proba: Mapping[Any, float]) -> None:
        self.count += 1
        if not proba:
            return
        predicted = max(proba, key=proba.__getitem__)
        cell = (str(label), str(predicted))
        self.confusion[cell] = self.confusion.get(cell, 0) + 1
        self.scored += 1
        self.loss -= math.log(min(max(float(proba.get(label, 0.0)), 1e-15), 1.0))

    def as_dict(self) -> dict[str, float]:
        return {
            "labels": float(self.count),
            "accuracy": confusion_accuracy(self.confusion),
            "macro_f1": macro_f1(self.confusion),
            "log_loss": self.loss / self.scored if self.scored else 0.0,
        }

    def state(self) -> dict[str, Any]:
        return {"kind": "multiclass", "count": self.count, "scored": self.scored,
                "confusion": [[y, p, n] for (y, p), n in self.confusion.items()],
                "loss": self.loss}  # fmt: skip

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MulticlassMetrics:
        restored = cls()
        restored.count, restored.scored = int(state["count"]), int(state["scored"])
        restored.confusion = {(str(y), str(p)): int(n) for y, p, n in state["confusion"]}
        restored.loss = float(state["loss"])
        return restored


def confusion_accuracy(confusion: Mapping[tuple[str, str], int]) -> float:
    total = sum(confusion.values())
    return sum(n for (y, p), n in confusion.items() if y == p) / total if total else 0.0


def macro_f1(confusion: Mapping[tuple[str, str], int]) -> float:
    """River's macro-F1 of confusion counts: the mean F1 over every class seen (0 for
    a class never predicted right)."""
    classes = {c for cell in confusion for c in cell}
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = confusion.get((c, c), 0)
        fp = sum(n for (y, p), n in confusion.items() if p == c and y != c)
        fn = sum(n for (y, p), n in confusion.items() if y == c and p != c)
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(classes)


class Metrics(Protocol):
    """What the learner keeps of each candidate, whatever its kind."""

    count: int

    def update(self, label: Any, scored: Any) -> None:
        """Score one prediction (River's probabilities, or a regressor's value) on its label."""
        ...

    def as_dict(self) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...


def metrics_for(kind: str) -> Metrics:
    """Fresh prequential metrics of a ``binary``, ``multiclass`` or ``regression`` model
    (``models.target.Target.kind``)."""
    if kind == "regression":
        return RegressionMetrics()
    if kind == "multiclass":
        return MulticlassMetrics()
    return PrequentialMetrics()


def metrics_from_state(state: Mapping[str, Any]) -> Metrics:
    """The prequential metrics whose ``state()`` this was, of whichever target kind
    (a state without ``kind`` is a binary classifier's, as before there were others)."""
    kind = state.get("kind", "binary")
    if kind == "regression":
        return RegressionMetrics.from_state(state)
    if kind == "multiclass":
        return MulticlassMetrics.from_state(state)
    return PrequentialMetrics.from_state(state)
