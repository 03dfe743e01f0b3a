"""Label-free monitoring: drift of the inputs and scores, and input anomaly scores.

Needs no labels, so it sees a change as soon as the predictions do:

- every feature and the score (``score``: the served probability) is compared
  between a reference window and the recent window with the two-sample
  Kolmogorov-Smirnov test; an alarm re-collects the reference from the next
  predictions, so one shift raises one alarm;
- River's ``HalfSpaceTrees`` (inputs min-max scaled) scores how unusual each
  prediction's feature vector is, and the recent scores are summarised.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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

    def update(self, features: dict[str, float], probability: float) -> list[tuple[str, float]]:
        """One prediction; returns ``(input, p_value)`` of every input that drifted now."""
        self.seen += 1
        values = {**features, "score": probability}
        for name, value in values.items():
            item = self.inputs.get(name)
            if item is None:
                item = self.inputs[name] = _Input([], deque(maxlen=self.spec.window))
            if len(item.reference) < self.spec.reference:
                item.reference.append(value)
            else:
                item.recent.append(value)
        if self.anomaly is not None and self.seen % self.spec.anomaly_every == 0 and features:
            self.scores.append(float(self.anomaly.score_one(features)))
            self.anomaly.learn_one(features)
        if self.seen % self.spec.every:
            return []
        from scipy import stats  # imported here: it takes seconds, and only this needs it

        drifted = []
        for name, item in self.inputs.items():
            if len(item.recent) < self.spec.window:
                continue
            result = stats.ks_2samp(item.reference, list(item.recent))
            item.statistic, item.p_value = float(result.statistic), float(result.pvalue)
            if item.p_value < self.spec.alpha:
                item.alarms += 1
                drifted.append((name, item.p_value))
                item.reference, item.recent = [], deque(maxlen=self.spec.window)
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
