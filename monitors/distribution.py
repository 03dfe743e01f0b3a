"""Label-free monitoring: drift of the inputs and scores, and input anomaly scores.

Needs no labels, so it sees a change as soon as the predictions do:

- every feature and the score (``score``: the served probability) is compared
  between a reference window and the recent window with the two-sample
  Kolmogorov-Smirnov test; an alarm re-collects the reference from the next
  predictions, so one shift raises one alarm. SciPy's exact p-value costs
  about a millisecond and depends only on the statistic and the two window
  sizes, so the monitor works the statistic out itself and asks SciPy once
  per statistic it has not met yet (``KsTests``);
- River's ``HalfSpaceTrees`` (inputs min-max scaled) scores how unusual each
  prediction's feature vector is, and the recent scores are summarised.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import anomaly, compose, preprocessing

from riverflow.monitors.spec import LabelFreeSpec
from riverflow.monitors.view import DistributionView


@dataclass
class _Input:
    reference: list[float]
    recent: deque[float]
    statistic: float = 0.0
    p_value: float = 1.0
    alarms: int = 0
    ordered: Any = None  # the reference sorted, once it is full (it changes no more then)


class KsTests:
    """``scipy.stats.ks_2samp`` (two-sided, exact up to 10,000 per sample), its
    results remembered by the statistic they come from.

    The statistic is found as SciPy finds it (both samples sorted, the gap of
    their empirical CDFs at every value) and taken, as SciPy's exact test
    takes it, as a whole multiple ``h`` of ``1 / lcm(n1, n2)``; SciPy's
    statistic and p-value are a function of ``(n1, n2, h)`` alone. With fixed
    window sizes ``h`` takes few values, so most tests cost a sort and two
    searches instead of the p-value's computation. Beyond 10,000 a sample
    SciPy's p-value is asymptotic, a function of the statistic itself: then
    every test is SciPy's.
    """

    MAX_KEPT = 10_000
    EXACT_UP_TO = 10_000  # scipy.stats.ks_2samp's MAX_AUTO_N

    def __init__(self) -> None:
        self.results: dict[tuple[int, int, int], tuple[float, float]] = {}

    def __call__(self, ordered: Any, sample: list[float]) -> tuple[float, float]:
        """Statistic and p-value of ``ordered`` (a sorted array) against ``sample``."""
        other = np.sort(np.asarray(sample, dtype=float))
        n1, n2 = len(ordered), len(other)
        both = np.concatenate([ordered, other])
        gaps = (np.searchsorted(ordered, both, side="right") / n1
                - np.searchsorted(other, both, side="right") / n2)  # fmt: skip
        d = max(float(np.clip(-gaps.min(), 0, 1)), float(gaps.max()))
        key = (n1, n2, round(d * (n1 // math.gcd(n1, n2) * n2)))
        exact = max(n1, n2) <= self.EXACT_UP_TO
        found = self.results.get(key) if exact else None
        if found is None:
            from scipy import stats  # imported here: it takes seconds, and only this needs it

            result = stats.ks_2samp(ordered, other)
            found = (float(result.statistic), float(result.pvalue))
            if exact:
                if len(self.results) >= self.MAX_KEPT:
                    self.results.clear()
                self.results[key] = found
        return found


class DistributionMonitor:
    """Feeds on predictions; ``update`` returns the inputs whose distribution drifted."""

    def __init__(self, spec: LabelFreeSpec, seed: int = 42) -> None:
        self.spec = spec
        self.inputs: dict[str, _Input] = {}
        self.seen = 0
        self.anomaly: compose.Pipeline | None = None
        if spec.anomaly:
            self.anomaly = compose.Pipeline(
                preprocessing.MinMaxScaler(),
                anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=seed),
            )
        self.scores: deque[float] = deque(maxlen=1_000)
        self.ks = KsTests()

    def update(self, features: dict[str, float], probability: float) -> list[tuple[str, float]]:
        """One prediction; returns ``(input, p_value)`` of every input that drifted now."""
        self.seen += 1
        inputs, reference = self.inputs, self.spec.reference
        for name, value in {**features, "score": probability}.items():
            item = inputs.get(name)
            if item is None:
                item = inputs[name] = _Input([], deque(maxlen=self.spec.window))
            if len(item.reference) < reference:
                item.reference.append(value)
            else:
                item.recent.append(value)
        if self.anomaly is not None and self.seen % self.spec.anomaly_every == 0 and features:
            self.scores.append(float(self.anomaly.score_one(features)))
            self.anomaly.learn_one(features)
        if self.seen % self.spec.every:
            return []
        drifted = []
        for name, item in self.inputs.items():
            if len(item.recent) < self.spec.window:
                continue
            if item.ordered is None:
                item.ordered = np.sort(np.asarray(item.reference, dtype=float))
            item.statistic, item.p_value = self.ks(item.ordered, list(item.recent))
            if item.p_value < self.spec.alpha:
                item.alarms += 1
                drifted.append((name, item.p_value))
                item.reference, item.recent = [], deque(maxlen=self.spec.window)
                item.ordered = None
        return drifted

    def views(self) -> dict[str, DistributionView]:
        return {
            name: DistributionView(statistic=i.statistic, p_value=i.p_value, alarms=i.alarms)
            for name, i in self.inputs.items()
        }

    def anomaly_summary(self) -> dict[str, float]:
        if not self.scores:
            return {}
        ordered = sorted(self.scores)
        return {
            "mean": sum(ordered) / len(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "scored": float(len(ordered)),
        }
