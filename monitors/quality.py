"""Quality over sliding windows of labelled events, and the sequential test of two models.

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

import numpy as np
from numpy.typing import ArrayLike

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


MAX_BET = 0.5  # at most half the wealth at stake on one label
MIN_BET_PAIRS = 100  # recent pairs needed before any bet


def kelly_bet(sum_d: ArrayLike, sum_abs: ArrayLike, n: ArrayLike) -> np.ndarray:
    """The fraction of its wealth the e-process stakes on the next label, from the
    recent pairs only: half of Kelly's ``mean(D) / mean(D^2)`` for D in {-1, 0, +1}
    (half: a bet sized on an estimate is safer smaller), 0 unless the challenger
    has been ahead over at least ``MIN_BET_PAIRS`` pairs, at most ``MAX_BET``.
    Takes arrays (the simulation bets for many runs at once) as well as numbers."""
    sum_d, sum_abs, n = (np.asarray(v, dtype=float) for v in (sum_d, sum_abs, n))
    ahead = (n >= MIN_BET_PAIRS) & (sum_d > 0)
    out: np.ndarray = np.where(
        ahead, np.minimum(MAX_BET, 0.5 * sum_d / np.maximum(sum_abs, 1)), 0.0
    )
    return out


class PairedDuel:
    """A challenger B against the champion A on the labels both predicted, as a
    test that stays valid however often it is looked at.

    Per paired label D is +1 when only B is right, -1 when only A is, 0 when both
    or neither are. After ``warmup`` pairs (a fresh model is not judged on its
    first labels) the e-process bets a fraction lambda of its wealth on B, chosen
    from the labels before (``kelly_bet`` over the last ``window`` pairs), and
    its wealth is multiplied by ``1 + lambda * D``. If B is not better (for every
    label, given the past, B right alone no more likely than A right alone) each
    factor has expectation at most 1: the wealth is a nonnegative supermartingale
    started at 1, and by Ville's inequality it ever reaches ``1 / alpha`` with
    probability at most ``alpha``. A bet of 0 while B is behind (a young model)
    costs nothing, so the evidence is not held back by B's infancy.
    """

    def __init__(self, warmup: int, window: int) -> None:
        self.warmup = warmup
        self.seen = 0
        self.recent: deque[int] = deque(maxlen=window)  # D of the last pairs
        self.sum_d = self.sum_abs = 0
        self.log_wealth = 0.0
        self.wins = self.ties = self.losses = 0  # after the warm-up

    def update(self, a_right: bool, b_right: bool) -> None:
        d = int(b_right) - int(a_right)
        self.seen += 1
        if self.seen > self.warmup:
            bet = float(kelly_bet(self.sum_d, self.sum_abs, len(self.recent)))
            if bet:
                self.log_wealth += math.log1p(bet * d)
            if d > 0:
                self.wins += 1
            elif d < 0:
                self.losses += 1
            else:
                self.ties += 1
        if len(self.recent) == self.recent.maxlen:
            old = self.recent[0]
            self.sum_d -= old
            self.sum_abs -= abs(old)
        self.recent.append(d)
        self.sum_d += d
        self.sum_abs += abs(d)

    @property
    def n(self) -> int:
        """Pairs counted (after the warm-up)."""
        return self.wins + self.ties + self.losses

    def e_value(self) -> float:
        return math.exp(self.log_wealth)

    def recent_gain(self) -> float:
        """B's accuracy minus A's over the recent pairs."""
        return self.sum_d / max(len(self.recent), 1)

    def as_evidence(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "warmup": self.warmup,
            "challenger_only_right": self.wins,
            "champion_only_right": self.losses,
            "both_or_neither_right": self.ties,
            "e_value": self.e_value(),
            "recent_pairs": len(self.recent),
            "recent_gain": round(self.recent_gain(), 6),
        }
