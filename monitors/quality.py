"""Quality over sliding windows of labelled events, and the sequential test of two models.

``WindowedQuality`` is a binary classifier's, ``WindowedMulticlass`` and
``WindowedRegression`` the others' (the spec's ``label.type``); each ``add``s a
labelled event and returns its loss (0/1, or the absolute error).

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
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from riverflow.monitors.prequential import macro_f1

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

    headline = accuracy  # what the charts and segments show

    def add(self, label: Any, probability: Any) -> float:
        """``update``, as a loss: 0 if the decision was right, else 1."""
        return 0.0 if self.update(label, probability) else 1.0

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


class WindowedRegression:
    """A regressor's MAE, RMSE and R² over its last ``size`` labelled events (River's
    definitions, R² 0 while the window's labels are all equal), and its mean
    absolute error over the last ``recent``. Running sums, recomputed from the
    window once per ``size`` events so that float error does not pile up."""

    def __init__(self, size: int, recent: int | None = None) -> None:
        self.size = size
        self.events: deque[tuple[float, float]] = deque(maxlen=size)  # (label, value)
        self.recent_errors: deque[float] = deque(maxlen=recent or size)
        self.count = 0
        self._sums = [0.0, 0.0, 0.0, 0.0]  # |error|, error^2, y, y^2 over the window

    def add(self, label: Any, value: Any) -> float:
        """Add one labelled event; returns its absolute error (what drift watches)."""
        if len(self.events) == self.size:
            self._move(*self.events[0], -1.0)
        self.events.append((float(label), value))
        self._move(float(label), value, 1.0)
        self.count += 1
        if self.count % self.size == 0:
            self._sums = [0.0, 0.0, 0.0, 0.0]
            for y, v in self.events:
                self._move(y, v, 1.0)
        error = abs(float(label) - value)
        self.recent_errors.append(error)
        return error

    def _move(self, y: float, value: float, sign: float) -> None:
        e = y - value
        for i, v in enumerate((abs(e), e * e, y, y * y)):
            self._sums[i] += sign * v

    @property
    def full(self) -> bool:
        return len(self.events) == self.size

    def headline(self) -> float:
        """What the charts and segments show: the MAE."""
        return self._sums[0] / len(self.events) if self.events else 0.0

    def as_dict(self) -> dict[str, float]:
        n = len(self.events)
        if not n:
            return {"mae": 0.0, "rmse": 0.0, "r2": 0.0, "window": 0.0}
        abs_e, sq_e, sy, syy = self._sums
        total = syy - sy * sy / n
        # a window of equal labels (up to rounding) has no variance to explain
        r2 = 1.0 - sq_e / total if total > 1e-12 * max(syy, 1.0) else 0.0
        return {"mae": abs_e / n, "rmse": math.sqrt(max(sq_e, 0.0) / n), "r2": r2,
                "window": float(n)}  # fmt: skip


class WindowedMulticlass:
    """A multiclass classifier's accuracy, macro-F1 and log loss over its last
    ``size`` labelled events, and its accuracy over the last ``recent``."""

    def __init__(self, size: int, recent: int | None = None) -> None:
        self.size = size
        self.events: deque[tuple[str, str, float]] = deque(maxlen=size)  # label, class, p(label)
        self.confusion: dict[tuple[str, str], int] = {}
        self.loss = 0.0
        self.correct = _Count(size)
        self.recent = _Count(recent or size)
        self.count = 0

    def add(self, label: Any, answer: Any) -> float:
        """Add one labelled event (the predicted class and the class probabilities);
        returns 0 if the prediction was right, else 1."""
        predicted, probabilities = answer
        y, p = str(label), str(predicted)
        if len(self.events) == self.size:
            oy, op, oq = self.events[0]
            self.confusion[(oy, op)] -= 1
            if not self.confusion[(oy, op)]:
                del self.confusion[(oy, op)]
            self.loss += math.log(oq)
        q = min(max(float(probabilities.get(y, 0.0)), _EPS), 1.0)
        self.events.append((y, p, q))
        self.confusion[(y, p)] = self.confusion.get((y, p), 0) + 1
        self.loss -= math.log(q)
        self.count += 1
        if self.count % self.size == 0:
            self.loss = -sum(math.log(e[2]) for e in self.events)
        right = y == p
        self.correct.add(right)
        self.recent.add(right)
        return 0.0 if right else 1.0

    @property
    def full(self) -> bool:
        return len(self.correct) == self.size

    def accuracy(self) -> float:
        return self.correct.rate()

    headline = accuracy

    def as_dict(self) -> dict[str, float]:
        n = len(self.events)
        return {"accuracy": self.accuracy(), "macro_f1": macro_f1(self.confusion),
                "log_loss": self.loss / n if n else 0.0, "window": float(n)}  # fmt: skip


MAX_BET = 0.5  # at most half the wealth at stake on one label
MIN_BET_PAIRS = 100  # recent pairs needed before any bet


def kelly_bet(sum_d: ArrayLike, sum_abs: ArrayLike, n: ArrayLike) -> np.ndarray:
    """The fraction of its wealth the e-process stakes on the next label, from the
    recent pairs only: half of Kelly's ``mean(D) / mean(D^2)`` (``sum_abs``: the sum
    of D^2, which is the sum of |D| for D in {-1, 0, +1})
    (half: a bet sized on an estimate is safer smaller), 0 unless the challenger
    has been ahead over at least ``MIN_BET_PAIRS`` pairs, at most ``MAX_BET``.
    Takes arrays (the simulation bets for many runs at once) as well as numbers."""
    sum_d, sum_abs, n = (np.asarray(v, dtype=float) for v in (sum_d, sum_abs, n))
    ahead = (n >= MIN_BET_PAIRS) & (sum_d > 0)
    out: np.ndarray = np.where(
        ahead, np.minimum(MAX_BET, 0.5 * sum_d / np.maximum(sum_abs, 1)), 0.0
    )
    return out


class RecentGains:
    """The last ``window`` paired differences D of a duel, with their running sum and
    sum of squares: what its next bet is sized on (``kelly_bet``) and its recent gain.
    Every ``window`` additions the sums are taken afresh, so rounding cannot drift."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.sum = 0.0
        self.sum_sq = 0.0
        self._added = 0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, d: float) -> None:
        values = self.values
        if len(values) == values.maxlen:
            old = values[0]
            self.sum -= old
            self.sum_sq -= old * old
        values.append(d)
        self.sum += d
        self.sum_sq += d * d
        self._added += 1
        if self._added % (values.maxlen or 1) == 0:
            self.sum, self.sum_sq = sum(values), sum(v * v for v in values)

    def bet(self) -> float:
        """The fraction of its wealth the duel stakes on its next pair."""
        return kelly_bet_one(self.sum, self.sum_sq, len(self.values))

    def mean(self) -> float:
        return self.sum / max(len(self.values), 1)


def kelly_bet_one(sum_d: float, sum_abs: float, n: int) -> float:
    """``kelly_bet`` of one duel, in plain floats (the same value: it runs per label,
    and numpy's scalar overhead was ~8 us of it)."""
    if n >= MIN_BET_PAIRS and sum_d > 0:
        return min(MAX_BET, 0.5 * sum_d / max(sum_abs, 1.0))
    return 0.0


ERROR_SCALE = 3.0  # a regressor's error difference is clipped at this many mean errors


class PairedDuel:
    """A challenger B against the champion A on the labels both predicted, as a
    test that stays valid however often it is looked at.

    Per paired label D is a loss difference in [-1, 1], A's loss minus B's:

    - a classifier (``update``): +1 when only B is right, -1 when only A is, 0 when
      both or neither are;
    - a regressor (``update_errors``): the difference of their absolute errors,
      divided by a scale and clipped to [-1, 1]. The scale is ``ERROR_SCALE`` times
      the mean absolute error of both over the pairs *before* this one, so it is
      fixed before the label is seen (predictable), as the bet is.

    After ``warmup`` pairs (a fresh model is not judged on its first labels) the
    e-process bets a fraction lambda of its wealth on B, chosen from the labels
    before (``kelly_bet`` over the last ``window`` pairs), and its wealth is
    multiplied by ``1 + lambda * D``. If B is not better (for every label, given
    the past, E[D] <= 0: B right alone no more likely than A right alone, or B's
    scaled, clipped error no smaller than A's in expectation) each factor has
    expectation at most 1, and it is at least ``1 - MAX_BET > 0`` since |D| <= 1:
    the wealth is a nonnegative supermartingale started at 1, and by Ville's
    inequality it ever reaches ``1 / alpha`` with probability at most ``alpha``.
    Nothing in that argument needs D to take three values: boundedness and a bet
    and scale fixed from the past are what it rests on, which is why the error
    difference is clipped and its scale comes from earlier pairs only. A bet of 0
    while B is behind (a young model) costs nothing, so the evidence is not held
    back by B's infancy.
    """

    def __init__(self, warmup: int, window: int) -> None:
        self.warmup = warmup
        self.seen = 0
        self.recent = RecentGains(window)  # D of the last pairs
        self.log_wealth = 0.0
        self.wins = self.ties = self.losses = 0  # after the warm-up
        self._errors = 0.0  # a regressor duel: the sum of both models' mean |error| per pair
        self._regression = False

    def update(self, a_right: bool, b_right: bool) -> None:
        """A label both classifiers predicted: was each right."""
        self._add(float(int(b_right) - int(a_right)))

    def update_errors(self, a_error: float, b_error: float) -> None:
        """A label both regressors predicted: the absolute error of each."""
        self._regression = True
        scale = ERROR_SCALE * self._errors / self.seen if self.seen else 0.0
        if scale > 0:
            d = max(-1.0, min(1.0, (a_error - b_error) / scale))
        else:  # no error before (or no pair): only the sign can be told
            d = float((a_error > b_error) - (a_error < b_error))
        self._errors += (a_error + b_error) / 2
        self._add(d)

    def _add(self, d: float) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            bet = self.recent.bet()
            if bet:
                self.log_wealth += math.log1p(bet * d)
            if d > 0:
                self.wins += 1
            elif d < 0:
                self.losses += 1
            else:
                self.ties += 1
        self.recent.add(d)

    @property
    def n(self) -> int:
        """Pairs counted (after the warm-up)."""
        return self.wins + self.ties + self.losses

    def state(self) -> dict[str, Any]:
        """What a restarted monitor takes back (``restored``): the pairs seen, the
        wealth, the counts and the recent differences (a classifier's, each -1, 0 or +1,
        as one character: ``-``, ``0``, ``+``)."""
        recent: str | list[float] = (
            list(self.recent.values) if self._regression
            else "".join("-0+"[int(d) + 1] for d in self.recent.values)
        )  # fmt: skip
        return {"seen": self.seen, "log_wealth": self.log_wealth, "wins": self.wins,
                "ties": self.ties, "losses": self.losses, "errors": self._errors,
                "regression": self._regression, "recent": recent}  # fmt: skip

    @classmethod
    def restored(cls, warmup: int, window: int, state: dict[str, Any]) -> PairedDuel:
        """The duel ``state`` saved, going on from where it was: the wealth is the one
        its bets earned, so the e-process stays valid across the restart as long as no
        pair is counted twice (the monitor stage skips the pairs it replays).
        ``KeyError``, ``TypeError`` or ``ValueError`` if ``state`` is not one."""
        duel = cls(warmup, window)
        duel.seen, duel.log_wealth = int(state["seen"]), float(state["log_wealth"])
        duel.wins, duel.ties, duel.losses = (int(state[k]) for k in ("wins", "ties", "losses"))
        duel._errors, duel._regression = float(state["errors"]), bool(state["regression"])
        recent = state["recent"]
        values = [float("-0+".index(c) - 1) for c in recent] if isinstance(recent, str) else recent
        for d in values[-window:]:
            duel.recent.add(float(d))
        return duel

    def e_value(self) -> float:
        return math.exp(self.log_wealth)

    def recent_gain(self) -> float:
        """B's accuracy minus A's over the recent pairs (a regressor's: the mean of D,
        its scaled error reduction)."""
        return self.recent.mean()

    def as_evidence(self) -> dict[str, float | int]:
        if self._regression:
            counts = {"challenger_lower_error": self.wins, "champion_lower_error": self.losses,
                      "equal_error": self.ties}  # fmt: skip
        else:
            counts = {"challenger_only_right": self.wins, "champion_only_right": self.losses,
                      "both_or_neither_right": self.ties}  # fmt: skip
        return {
            "n": self.n,
            "warmup": self.warmup,
            **counts,
            "e_value": self.e_value(),
            "recent_pairs": len(self.recent),
            "recent_gain": round(self.recent_gain(), 6),
        }
