"""Prequential (test-then-train) metrics of a binary classifier."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

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
