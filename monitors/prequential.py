"""Prequential (test-then-train) metrics of a binary classifier."""

from __future__ import annotations

from river import metrics


class PrequentialMetrics:
    """Accuracy, ROC AUC and log loss over every label seen, updated before learning."""

    def __init__(self) -> None:
        self.accuracy = metrics.Accuracy()
        self.roc_auc = metrics.ROCAUC()
        self.log_loss = metrics.LogLoss()
        self.count = 0

    def update(self, label: bool, probability: float) -> None:
        self.count += 1
        self.accuracy.update(label, probability >= 0.5)
        self.roc_auc.update(label, {True: probability, False: 1.0 - probability})
        self.log_loss.update(label, {True: probability, False: 1.0 - probability})

    def as_dict(self) -> dict[str, float]:
        return {
            "labels": float(self.count),
            "accuracy": float(self.accuracy.get()),
            "roc_auc": float(self.roc_auc.get()),
            "log_loss": float(self.log_loss.get()),
        }
