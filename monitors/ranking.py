"""Ranking quality over a window of served requests.

Per request the monitor knows the ranking served, which of the shown items were
clicked, and (for NDCG against a known truth, as on the simulator) optionally
graded gains. Over the last ``window`` requests:

- ``ctr_at_k``: clicks on the top k per shown slot (clicks / (k * requests));
- ``ndcg_at_k``: mean NDCG@k with the clicks (or given gains) as relevance; a
  request with no click has no ideal ranking and counts as 0, as the usual
  definition over logged clicks does;
- ``coverage``: distinct items shown in the window over the catalogue size
  (the catalogue as declared, else the distinct items seen as candidates);
- ``popularity_share``: share of the shown slots taken by the 10% most shown
  items of the window: 1.0 is a ranking that only ever shows the head.

Memory: the window's shown items and gains (k + k numbers per request) and a
count per distinct item shown in it (at most k * window).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence

HEAD_SHARE = 0.1  # the "head" of popularity_share: this share of distinct items shown


def dcg(gains: Sequence[float], k: int) -> float:
    """Discounted cumulative gain of the first ``k`` gains (log2 discount)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))


def ndcg(gains: Sequence[float], k: int, ideal: Sequence[float] | None = None) -> float:
    """``dcg(gains)`` over the best DCG of the same gains (or of ``ideal``, all the
    relevant gains there were); 0 when there is nothing relevant."""
    best = dcg(sorted(ideal if ideal is not None else gains, reverse=True), k)
    return dcg(gains, k) / best if best > 0 else 0.0


class RankingQuality:
    """CTR@k, NDCG@k, coverage and popularity share over the last ``window`` requests."""

    def __init__(self, k: int, window: int = 10_000, catalogue: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"k: {k}, need at least 1")
        self.k = k
        self.catalogue = catalogue
        self._rows: deque[tuple[tuple[str, ...], tuple[float, ...], float]] = deque(maxlen=window)
        self._shown: Counter[str] = Counter()
        self._candidates: set[str] = set()  # only without a declared catalogue size

    def add(
        self,
        ranking: Sequence[str],
        clicks: Sequence[bool],
        gains: Sequence[float] | None = None,
        candidates: Sequence[str] = (),
    ) -> None:
        """One served request: its ranking, the clicks on its shown top, and
        optionally graded gains of the shown items (default: the clicks)."""
        shown = tuple(ranking[: self.k])
        clicked = tuple(float(bool(c)) for c in clicks[: self.k])
        if len(clicked) < len(shown):
            raise ValueError(f"clicks for {len(clicked)} of {len(shown)} shown positions")
        value = ndcg(list(gains[: self.k]) if gains is not None else clicked, self.k)
        if len(self._rows) == self._rows.maxlen:
            old, _, _ = self._rows[0]
            self._shown.subtract(old)
            for item in old:
                if self._shown[item] <= 0:
                    del self._shown[item]
        self._rows.append((shown, clicked, value))
        self._shown.update(shown)
        if self.catalogue is None and len(self._candidates) < 10_000_000:
            self._candidates.update(candidates or ranking)

    def __len__(self) -> int:
        return len(self._rows)

    def as_dict(self) -> dict[str, float]:
        n = len(self._rows)
        if not n:
            return {}
        slots = sum(len(s) for s, _, _ in self._rows)
        clicks = sum(sum(c) for _, c, _ in self._rows)
        catalogue = self.catalogue or max(len(self._candidates), 1)
        head = max(1, math.ceil(HEAD_SHARE * len(self._shown)))
        top = sum(n for _, n in self._shown.most_common(head))
        return {
            f"ctr_at_{self.k}": clicks / (self.k * n),
            f"ndcg_at_{self.k}": sum(v for _, _, v in self._rows) / n,
            "coverage": len(self._shown) / catalogue,
            "popularity_share": top / slots if slots else 0.0,
        }
