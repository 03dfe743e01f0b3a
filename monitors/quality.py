"""Quality over sliding windows of labelled events, and the paired test that compares two models.

A window holds the last ``size`` labelled events a model predicted. Accuracy,
precision, recall, F1 and log loss are kept as running sums (O(1) per event,
the event leaving the window subtracted); ROC AUC is computed exactly from the
window's scores when asked (rank sum, ties averaged). The definitions are
River's (``river.metrics``): a decision is ``probability >= 0.5``, precision,
recall and F1 are 0 when undefined, log loss clamps probabilities to
[1e-15, 1 - 1e-15]; ROC AUC is 0 when the window holds one class only.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

_EPS = 1e-15


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
        self.events: deque[tuple[bool, float]] = deque(maxlen=size)
        self.tp = self.fp = self.fn = self.tn = 0
        self.loss = 0.0
        self.correct = _Count(size)
        self.recent = _Count(recent or size)
        self.count = 0  # every labelled event seen, not only those in the window

    def _add(self, label: bool, probability: float, sign: int) -> None:
        decision = probability >= 0.5
        if decision:
            if label:
                self.tp += sign
            else:
                self.fp += sign
        elif label:
            self.fn += sign
        else:
            self.tn += sign
        p = min(max(probability if label else 1.0 - probability, _EPS), 1.0 - _EPS)
        self.loss -= sign * math.log(p)

    def update(self, label: bool, probability: float) -> bool:
        """Add one labelled event; returns whether the model's decision was right."""
        if len(self.events) == self.size:
            self._add(*self.events[0], -1)
        self.events.append((label, probability))
        self._add(label, probability, 1)
        self.count += 1
        if self.count % self.size == 0:  # keep the running loss from drifting in float
            self.loss = -sum(math.log(min(max(p if y else 1.0 - p, _EPS), 1.0 - _EPS))
                             for y, p in self.events)  # fmt: skip
        right = (probability >= 0.5) == label
        self.correct.add(right)
        self.recent.add(right)
        return right

    @property
    def full(self) -> bool:
        return len(self.correct) == self.size

    def accuracy(self) -> float:
        return self.correct.rate()

    def roc_auc(self) -> float:
        """Exact ROC AUC of the window: the probability a positive outranks a negative."""
        positives = sum(label for label, _ in self.events)
        negatives = len(self.events) - positives
        if not positives or not negatives:
            return 0.0
        ordered = sorted(self.events, key=lambda e: e[1])
        rank_sum, i = 0.0, 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and ordered[j + 1][1] == ordered[i][1]:
                j += 1
            mid = (i + j) / 2 + 1  # the average 1-based rank of a run of ties
            rank_sum += mid * sum(label for label, _ in ordered[i : j + 1])
            i = j + 1
        return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)

    def as_dict(self) -> dict[str, float]:
        n = len(self.events)
        tp, fp, fn = self.tp, self.fp, self.fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "accuracy": self.accuracy(),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "roc_auc": self.roc_auc(),
            "log_loss": self.loss / n if n else 0.0,
            "window": float(n),
        }


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

    def gain(self) -> float:
        """B's accuracy minus A's, as ``test`` works them out (without the test)."""
        n = max(len(self.pairs), 1)
        return self.b_right / n - self.a_right / n

    def test(self) -> PairedTest:
        n, a_only, b_only = len(self.pairs), self.a_only, self.b_only
        discordant = a_only + b_only
        stat = (abs(a_only - b_only) - 1) ** 2 / discordant if abs(a_only - b_only) > 1 else 0.0
        p = math.erfc(math.sqrt(stat / 2)) if discordant else 1.0  # chi-squared(1) tail
        return PairedTest(n, self.a_right / max(n, 1), self.b_right / max(n, 1), a_only, b_only,
                          stat, p)  # fmt: skip
