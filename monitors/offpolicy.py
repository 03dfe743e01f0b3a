"""How many clicks another ranking policy would get, estimated from the served logs.

Each served request logs, per shown position k, the item shown, the probability
the serving policy had of showing that item there (its propensity) and whether
it was clicked. For a deterministic target ranking, the item-position inverse
propensity estimator (Li et al., 2018, "Offline evaluation of ranking policies
with click models") is

    V_IPS = 1/n * sum_i sum_k [target puts a_ik at k] * c_ik / p_ik

It is unbiased for the target's expected clicks on its shown positions when
clicks follow the position-based model (a click depends on the item and its
position, not on the rest of the ranking) and every (item, position) the target
uses had a positive propensity. The self-normalised variant (SNIPS) divides each
position's sum by the sum of its weights: a little bias, much less variance.

Intervals: for IPS the normal interval of a mean of independent requests; for
SNIPS the delta method (influence of each request on the ratio). Both are
asymptotic: with few matched requests (``matched`` in the result) they are too
narrow, and a decision should wait for more.

Memory: the estimator keeps, per request in its window, two numbers per shown
position; the window is bounded (``window``), oldest requests dropped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class OffPolicyEstimate:
    """A policy value (expected clicks per request) with its interval."""

    method: str  # ips or snips
    value: float
    low: float
    high: float
    requests: int
    matched: int  # (request, position) pairs where the target agreed with the log

    def as_dict(self) -> dict[str, float | int | str]:
        return {"method": self.method, "value": self.value, "low": self.low,
                "high": self.high, "requests": self.requests, "matched": self.matched}  # fmt: skip


class OffPolicyEstimator:
    """Item-position IPS and SNIPS of one target policy over a window of logged requests."""

    def __init__(self, positions: int, window: int = 100_000, confidence: float = 0.95) -> None:
        if positions < 1:
            raise ValueError(f"positions: {positions}, need at least 1")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence: {confidence}, need 0 < confidence < 1")
        self.positions = positions
        self.z = NormalDist().inv_cdf(0.5 + confidence / 2)
        # per request: the target's weight and its weighted click, per position
        self._rows: deque[tuple[tuple[float, ...], tuple[float, ...]]] = deque(maxlen=window)

    def add(
        self,
        shown: Sequence[object],
        propensities: Sequence[float],
        clicks: Sequence[bool],
        target: Sequence[object],
    ) -> None:
        """One logged request: what was shown, how likely each was at its position,
        the clicks, and the target policy's ranking of the same candidates."""
        k = self.positions
        if not (len(shown) >= k and len(propensities) >= k and len(clicks) >= k):
            raise ValueError(f"a logged request needs {k} shown positions")
        weights, rewards = [], []
        for pos in range(k):
            p = propensities[pos]
            if not (0.0 < p <= 1.0) or math.isnan(p):
                raise ValueError(f"position {pos}: propensity {p!r} is not in (0, 1]")
            w = 1.0 / p if pos < len(target) and target[pos] == shown[pos] else 0.0
            weights.append(w)
            rewards.append(w * bool(clicks[pos]))
        self._rows.append((tuple(weights), tuple(rewards)))

    def __len__(self) -> int:
        return len(self._rows)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        w = np.array([r[0] for r in self._rows], dtype=float)
        r = np.array([r[1] for r in self._rows], dtype=float)
        return w, r

    def ips(self) -> OffPolicyEstimate:
        w, r = self._arrays()
        n = len(w)
        if n < 2:
            return OffPolicyEstimate("ips", math.nan, math.nan, math.nan, n, 0)
        per_request = r.sum(axis=1)
        value = float(per_request.mean())
        half = self.z * float(per_request.std(ddof=1)) / math.sqrt(n)
        return OffPolicyEstimate("ips", value, value - half, value + half, n,
                                 int((w > 0).sum()))  # fmt: skip

    def snips(self) -> OffPolicyEstimate:
        w, r = self._arrays()
        n = len(w)
        totals = w.sum(axis=0)
        if n < 2 or not (totals > 0).all():  # a position the target never matched
            return OffPolicyEstimate("snips", math.nan, math.nan, math.nan, n,
                                     int((w > 0).sum()))  # fmt: skip
        per_position = r.sum(axis=0) / totals
        value = float(per_position.sum())
        # delta method: each request's influence on the sum of the positions' ratios
        influence = ((r - w * per_position) / (totals / n)).sum(axis=1)
        half = self.z * float(influence.std(ddof=1)) / math.sqrt(n)
        return OffPolicyEstimate("snips", value, value - half, value + half, n,
                                 int((w > 0).sum()))  # fmt: skip
