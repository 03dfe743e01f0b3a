"""What a model predicts for the spec's label, and how its predictions are scored.

One ``Target`` per pipeline, from ``label.type``: a bool label is served as the
probability of true (binary classifiers), an int or float label as the
predicted value (regressors), a category as the predicted class and each
declared class's probability (multiclass classifiers). The scorer serves with
it, the learner tests-then-trains with it, the monitor scores with it
(``kind`` picks the metrics: ``monitors.prequential.metrics_for``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from river import base

from riverflow.models.errors import ModelSpecError
from riverflow.streams.contracts import CandidatePrediction, Label, LabelType


class Target:
    """The label's kind: which estimators fit it, what a prediction of it holds."""

    def __init__(
        self, type: LabelType = LabelType.BOOL, classes: Sequence[str | int] | None = None
    ) -> None:
        """The spec's ``label.type`` and, for a category, its ``label.classes``."""
        self.type = type
        self.classes: tuple[str | int, ...] = tuple(classes or ())

    @property
    def kind(self) -> str:
        """binary, multiclass or regression."""
        if self.type is LabelType.BOOL:
            return "binary"
        return "regression" if self.type.regression else "multiclass"

    def misfit(self, class_path: str, estimator: Any) -> str | None:
        """Why an estimator does not fit the label, or None (River's ``Regressor`` and
        ``Classifier`` bases tell, as ``utils.inspect`` does)."""
        if self.type.regression:
            if not isinstance(estimator, base.Regressor):
                return (f"{class_path} is not a regressor; the label is {self.type.value}: "
                        "its candidates predict a number")  # fmt: skip
            return None
        if not isinstance(estimator, base.Classifier):
            what = "binary" if self.type is LabelType.BOOL else "multiclass"
            return (f"{class_path} is not a classifier; the label is {self.type.value}: "
                    f"its candidates are {what} classifiers")  # fmt: skip
        if self.type is LabelType.CATEGORY and not estimator._multiclass:
            return (f"{class_path} is a binary classifier; the category label has "
                    f"{len(self.classes)} classes (river.multiclass.OneVsRestClassifier "
                    "makes it multiclass)")  # fmt: skip
        return None

    def check(self, name: str, class_path: str, estimator: Any) -> None:
        """Refuse an estimator whose kind does not fit the label (``ModelSpecError``)."""
        why = self.misfit(class_path, estimator)
        if why is not None:
            raise ModelSpecError(f"model {name!r}: {why}")

    def predict(
        self,
        model: Any,
        x: dict[str, Any],
        version: int,
        label: Label | None = None,
        proba: dict[Any, float] | None = None,
    ) -> tuple[Any, CandidatePrediction]:
        """What ``model`` predicts for ``x``: what its metrics score (the probabilities
        River gives, or the value) and the prediction as it is written (with its
        absolute error if the number ``label`` is given). ``proba``: a classifier's
        ``predict_proba_one(x)`` if the caller has it already."""
        if self.type.regression:
            number = float(model.predict_one(x))
            error = None if label is None else abs(float(label) - number)
            return number, CandidatePrediction(version, None, number, error=error)
        if proba is None:
            proba = model.predict_proba_one(x)
        if self.type is LabelType.BOOL:
            return proba, CandidatePrediction(version, float(proba.get(True, proba.get(1, 0.0))))
        value, probabilities = self._classes(proba)
        return proba, CandidatePrediction(version, None, value, probabilities)

    def _classes(self, proba: dict[Any, float]) -> tuple[str | int, dict[str, float]]:
        """The predicted class and every declared class's probability (uniform before
        the model has learned any)."""
        probabilities = {str(c): float(proba.get(c, 0.0)) for c in self.classes}
        total = sum(probabilities.values())
        if total <= 0:
            probabilities = {k: 1.0 / len(self.classes) for k in probabilities}
        else:
            probabilities = {k: p / total for k, p in probabilities.items()}
        best = max(self.classes, key=lambda c: probabilities[str(c)])  # first declared on ties
        return best, probabilities

    def right(self, model: Any, x: dict[str, Any], label: Label) -> bool:
        """Whether a classifier's decision for ``x`` is ``label`` (a rollback target's
        shadow score)."""
        _, p = self.predict(model, x, 0)
        if self.type is LabelType.BOOL:
            return ((p.probability or 0.0) >= 0.5) == label
        return p.value == label
