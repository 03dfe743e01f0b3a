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

Promotion on these logs (``OffPolicyDuel``) needs more than an interval: a test
the monitor may look at after every request. It compares, request by request,
the champion's clicks as served (on-policy, exploration included) with an IPS
estimate of the clicks the challenger would have had, served the same way (its
ranking in place of the champion's, the same exploration around it); see the
class for why that difference makes a valid e-process.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from riverflow.monitors.quality import RecentGains


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


# -- promotion: a paired, anytime-valid test -------------------------------------------


def epsilon_greedy_levels(propensities: Sequence[float]) -> tuple[float, float]:
    """The two propensities of a slate served epsilon-greedy (the scorer's exploration:
    with chance epsilon a uniformly random order of its n candidates): ``high``, the
    greedy ranking's item at its own position (``1 - epsilon + epsilon / n``), and
    ``low``, any other item at a position (``epsilon / n``); ``high + (n - 1) * low = 1``.
    From the whole served slate's propensities, in any order; a slate whose positions all
    have the same one was served in the greedy order (every one ``high``, at least
    1 / n) or in a random order that matched it nowhere (every one ``low``).
    ValueError if the propensities are not of that form."""
    n = len(propensities)
    if n == 0:
        raise ValueError("no propensities: an empty slate")
    if any(not (0.0 < p <= 1.0) for p in propensities):  # (also refuses NaN)
        raise ValueError(f"propensities {list(propensities)[:5]}: each must be in (0, 1]")
    if n == 1:
        return 1.0, 1.0  # one candidate: shown at its only position by every policy
    high, low = max(propensities), min(propensities)
    if high == low:
        if high >= 1 / n:
            low = (1.0 - high) / (n - 1)
        else:
            high = 1.0 - (n - 1) * low
    fits = math.isclose(high + (n - 1) * low, 1.0, abs_tol=1e-6) and all(
        math.isclose(p, high, abs_tol=1e-9) or math.isclose(p, low, abs_tol=1e-9)
        for p in propensities
    )
    if not fits:
        raise ValueError(
            f"propensities {high:.6g} .. {low:.6g} of {n} candidates are not an "
            "epsilon-greedy slate's (two values, high + (n - 1) * low = 1)"
        )
    return high, low


def explored_weights(
    served: Sequence[object], propensities: Sequence[float], target: Sequence[object], k: int
) -> tuple[float, ...]:
    """For each of the first ``k`` served positions, ``q / p``: the chance that the
    target's policy (the same epsilon-greedy exploration around ``target``, its ranking,
    instead of the served one's) would have shown that item there, over the chance the
    logging policy did. ``served`` and ``propensities`` are the whole served slate in
    order (every candidate: the levels are read from them); ``target`` at least its top
    ``k``. Without exploration (every propensity 1) the weight is 1 where the target
    agrees with the served ranking and 0 elsewhere."""
    if len(served) != len(propensities) or len(served) < k:
        raise ValueError(f"a served slate of {len(served)} items and {len(propensities)} "
                         f"propensities, need {k} shown positions")  # fmt: skip
    high, low = epsilon_greedy_levels(propensities)
    weights = []
    for pos in range(k):
        agrees = pos < len(target) and target[pos] == served[pos]
        weights.append(((high - low) * agrees + low) / propensities[pos])
    return tuple(weights)


# the lower confidence bound's grid of gains (clicks per shown slot): 0, then 1e-4 up
# to ~0.94 in steps of 25%
GAIN_GRID = np.concatenate(([0.0], 1e-4 * 1.25 ** np.arange(42)))


class OffPolicyDuel:
    """A challenger's ranking against the champion's on the same served requests, as a
    test that stays valid however often it is looked at (``quality.PairedDuel``'s
    discipline, for clicks logged with propensities).

    Per completed request with ``k`` shown positions, clicks ``c`` and the challenger's
    weights ``w = q / p`` (``explored_weights``):

    - the champion's CTR@k as served, on-policy: ``Y = sum(c) / k``, in [0, 1];
    - the challenger's, off-policy: ``X = sum(w * c) / k``, the item-position IPS
      estimate of the clicks per shown slot it would have had, served with the same
      exploration. Unbiased (given the past) when clicks follow the position-based
      model and every item the challenger's policy could show at a position had a
      positive propensity; without exploration it counts only where the two agree, so
      it is biased low, never high;
    - ``D = X - Y``, the gain. ``X >= 0`` and ``Y <= 1``, so ``D >= -1``: bounded
      below, and unbounded above (up to ``1 / low``, the weight of a random
      exploration's match, ``n / epsilon``).

    The wealth, 1 at first, is multiplied by ``1 + lambda * D`` with lambda chosen
    from the requests before (``quality.kelly_bet`` on the last ``window`` gains:
    half of Kelly's ``mean(D) / mean(D^2)``, 0 until 100 requests show the challenger
    ahead, at most ``MAX_BET`` = 0.5), after ``warmup`` requests. If the challenger is
    not better (for every request, given the past, ``E[D] <= 0``: its expected clicks
    served that way no more than the champion's) each factor has expectation at most 1,
    and it is at least ``1 - MAX_BET > 0`` because ``D >= -1``: a nonnegative
    supermartingale, which by Ville's inequality ever reaches ``1 / alpha`` with
    probability at most ``alpha``. The one-sided test needs the lower bound only; a
    large D (a click the challenger would have shown, found by a rare exploration)
    grows the wealth and can never sink it. That is why the difference is taken
    against the champion's on-policy clicks (at most 1) and why the IPS weights need
    no clipping or normalising: clipping would bias the challenger low (still valid,
    less powerful), self-normalising would bias it either way (not valid).

    The same bets give a lower confidence bound on the gain that holds at every
    request at once (``lower_bound``): the wealth of the test of ``E[D] <= m`` is kept
    for a grid of m (``GAIN_GRID``), and the bound is the largest m whose wealth
    reached ``1 / alpha``; it is above 0 exactly when the test rejects.
    """

    def __init__(self, warmup: int, window: int) -> None:
        if warmup < 0 or window < 1:
            raise ValueError(f"warmup {warmup}, window {window}: need warmup >= 0, window >= 1")
        self.warmup = warmup
        self.seen = 0
        self.recent = RecentGains(window)  # D of the last requests
        self.log_wealth = np.zeros(len(GAIN_GRID))  # of the test of E[D] <= m, per m
        # after the warm-up: requests, and the sums of X, X^2, Y
        self.n = 0
        self._x = self._xx = self._y = 0.0

    def update(self, clicks: Sequence[bool], weights: Sequence[float]) -> None:
        """One completed request: the clicks on its shown positions and the challenger's
        weights there (``explored_weights``)."""
        k = len(weights)
        if k == 0 or len(clicks) != k:
            raise ValueError(f"{len(clicks)} clicks for {k} weighted positions")
        if any(not (w >= 0.0 and math.isfinite(w)) for w in weights):
            raise ValueError(f"weights {list(weights)}: each must be finite and >= 0")
        y = sum(map(bool, clicks)) / k
        x = sum(w for w, c in zip(weights, clicks, strict=True) if c) / k
        d = x - y
        self.seen += 1
        if self.seen > self.warmup:
            bet = self.recent.bet()
            if bet:
                self.log_wealth += np.log1p(bet * (d - GAIN_GRID))
            self.n += 1
            self._x += x
            self._xx += x * x
            self._y += y
        self.recent.add(d)

    def e_value(self) -> float:
        """The wealth of the test of ``E[D] <= 0``."""
        return math.exp(float(self.log_wealth[0]))

    def lower_bound(self, alpha: float) -> float:
        """A lower bound on the challenger's gain in clicks per shown slot, valid at
        every request at once with probability ``1 - alpha``: the largest gain of the grid
        whose test (``E[D] <= m``) has rejected at ``alpha``; -inf while none has."""
        rejected = np.flatnonzero(self.log_wealth >= math.log(1 / alpha))
        return float(GAIN_GRID[rejected.max()]) if rejected.size else -math.inf

    def recent_gain(self) -> float:
        """The mean gain over the last ``window`` requests (the warm-up's included)."""
        return self.recent.mean()

    def challenger_ctr(self) -> float:
        return self._x / self.n if self.n else math.nan

    def champion_ctr(self) -> float:
        return self._y / self.n if self.n else math.nan

    def challenger_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The normal interval of the challenger's CTR@k after the warm-up: for one
        look, to read the estimate by (the decision is the e-value)."""
        n = self.n
        if n < 2:
            return math.nan, math.nan
        mean = self._x / n
        var = max(self._xx / n - mean * mean, 0.0) * n / (n - 1)
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(var / n)
        return mean - half, mean + half

    def as_evidence(self, alpha: float) -> dict[str, float | int | str]:
        low, high = self.challenger_interval()
        return {
            "method": "paired item-position IPS gain, one-sided betting e-process",
            "requests": self.n,
            "warmup_requests": self.warmup,
            "challenger_ctr_at_k": round(self.challenger_ctr(), 6),
            "challenger_ctr_low": round(low, 6),
            "challenger_ctr_high": round(high, 6),
            "champion_ctr_at_k": round(self.champion_ctr(), 6),
            "gain": round(self.challenger_ctr() - self.champion_ctr(), 6),
            "gain_lower_bound": self.lower_bound(alpha),
            "e_value": self.e_value(),
            "recent_requests": len(self.recent),
            "recent_gain": round(self.recent_gain(), 6),
        }
