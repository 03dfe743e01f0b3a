"""Prequential (test-then-train) metrics of a binary classifier."""

from __future__ import annotations

from typing import Any

from river import metrics


class PrequentialMetrics:
    """Accuracy, ROC AUC and log loss over every label seen, updated before learning.

    Scored like ``river.evaluate.progressive_val_score``: the metrics take the
    model's ``predict_proba_one`` as it is, and a model with no prediction yet
    (an empty dict) is not scored for that label. ``count`` counts every label.
    """

    def __init__(self) -> None:
        self.accuracy = metrics.Accuracy()
        self.roc_auc = metrics.ROCAUC()
        self.log_loss = metrics.LogLoss()
        self.count = 0

    def update(self, label: bool, proba: dict[Any, float]) -> None:
        self.count += 1
        if not proba:
            return
        self.accuracy.update(label, proba.get(True, 0.0) >= 0.5)
        self.roc_auc.update(label, proba)
        self.log_loss.update(label, proba)

    def as_dict(self) -> dict[str, float]:
        return {
            "labels": float(self.count),
            "accuracy": float(self.accuracy.get()),
            "roc_auc": float(self.roc_auc.get()),
            "log_loss": float(self.log_loss.get()),
        }
