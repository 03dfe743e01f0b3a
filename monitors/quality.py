"""Quality over sliding windows of labelled events, and the paired test that compares two models.

A window holds the last ``size`` labelled events a model predicted; every
metric is River's, made rolling with ``river.utils.Rolling`` (each update
reverts the event leaving the window).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from river import metrics, utils

METRICS: dict[str, Any] = {
    "accuracy": metrics.Accuracy,
    "precision": metrics.Precision,
    "recall": metrics.Recall,
    "f1": metrics.F1,
    "roc_auc": metrics.ROCAUC,
    "log_loss": metrics.LogLoss,
}
_PROBA = {"roc_auc", "log_loss"}  # these take the probability, the others the decision


class _Count:
    """How many of the last ``size`` flags are set, in O(1) per flag."""

    def __init__(self, size: int) -> None:
        self.flags: deque[bool] = deque(maxlen=size)
        self.set = 0

    def add(self, flag: bool) -> None:
        if len(self.flags) == self.flags.maxlen:
            self.set -= self.flags[0]
        self.flags.append(flag)
        self.set += flag

    def __len__(self) -> int:
        return len(self.flags)

    def rate(self) -> float:
        return self.set / len(self.flags) if self.flags else 0.0


class WindowedQuality:
    """Classification metrics of one model over its last ``size`` labelled events,
    and its accuracy over the last ``recent`` of them."""

    def __init__(self, size: int, recent: int | None = None) -> None:
        self.size = size
        self.metrics: dict[str, Any] = {
            name: utils.Rolling(cls, window_size=size) for name, cls in METRICS.items()
        }
        self.correct = _Count(size)
        self.recent = _Count(recent or size)
        self.count = 0  # every labelled event seen, not only those in the window

    def update(self, label: bool, probability: float) -> bool:
        """Add one labelled event; returns whether the model's decision was right."""
        decision = probability >= 0.5
        proba = {True: probability, False: 1.0 - probability}
        for name, metric in self.metrics.items():
            metric.update(label, proba if name in _PROBA else decision)
        self.count += 1
        self.correct.add(decision == label)
        self.recent.add(decision == label)
        return decision == label

    @property
    def full(self) -> bool:
        return len(self.correct) == self.size

    def accuracy(self) -> float:
        return self.correct.rate()

    def as_dict(self) -> dict[str, float]:
        out = {name: float(m.get()) for name, m in self.metrics.items()}
        out["window"] = float(len(self.correct))
        return out


@dataclass(frozen=True)
class PairedTest:
    """McNemar's test on the events two models both predicted: did B beat A?"""

    n: int
    a_accuracy: float
    b_accuracy: float
    a_only: int  # events A got right and B wrong
    b_only: int  # events B got right and A wrong
    statistic: float  # chi-squared, 1 degree of freedom, continuity-corrected
    p_value: float  # two-sided

    def as_evidence(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "champion_accuracy": round(self.a_accuracy, 6),
            "challenger_accuracy": round(self.b_accuracy, 6),
            "champion_only_right": self.a_only,
            "challenger_only_right": self.b_only,
            "mcnemar_chi2": round(self.statistic, 4),
            "p_value": self.p_value,
        }


class PairedWindow:
    """The last ``size`` events two models both predicted: (A right, B right)."""

    def __init__(self, size: int) -> None:
        self.pairs: deque[tuple[bool, bool]] = deque(maxlen=size)
        self.a_right = self.b_right = self.a_only = self.b_only = 0

    def update(self, a_right: bool, b_right: bool) -> None:
        if len(self.pairs) == self.pairs.maxlen:
            self._count(*self.pairs[0], -1)
        self.pairs.append((a_right, b_right))
        self._count(a_right, b_right, 1)

    def _count(self, a: bool, b: bool, sign: int) -> None:
        self.a_right += sign * a
        self.b_right += sign * b
        self.a_only += sign * (a and not b)
        self.b_only += sign * (b and not a)

    def __len__(self) -> int:
        return len(self.pairs)

    def test(self) -> PairedTest:
        n, a_only, b_only = len(self.pairs), self.a_only, self.b_only
        discordant = a_only + b_only
        stat = (abs(a_only - b_only) - 1) ** 2 / discordant if abs(a_only - b_only) > 1 else 0.0
        p = math.erfc(math.sqrt(stat / 2)) if discordant else 1.0  # chi-squared(1) tail
        return PairedTest(n, self.a_right / max(n, 1), self.b_right / max(n, 1), a_only, b_only,
                          stat, p)  # fmt: skip
