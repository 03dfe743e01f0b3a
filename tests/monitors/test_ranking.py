"""Ranking metrics: NDCG by hand, CTR@k, coverage and popularity share over a window."""

from __future__ import annotations

import math

import pytest

from riverflow.monitors.ranking import RankingQuality, dcg, ndcg


def test_ndcg_by_hand() -> None:
    assert dcg([1, 0, 1], 3) == pytest.approx(1 + 1 / math.log2(4))
    assert ndcg([0, 1], 2) == pytest.approx((1 / math.log2(3)) / 1.0)
    assert ndcg([1, 1, 0], 3) == 1.0 and ndcg([0, 0, 0], 3) == 0.0
    assert ndcg([3, 2, 1], 3) == 1.0 > ndcg([1, 2, 3], 3)
    # against every relevant item there was, not only those shown
    assert ndcg([1, 0], 2, ideal=[1, 1, 1]) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_window_metrics_and_eviction() -> None:
    q = RankingQuality(k=2, window=3, catalogue=10)
    q.add(["a", "b", "x"], [True, False])
    q.add(["a", "c"], [False, True])
    q.add(["a", "b"], [False, False])
    m = q.as_dict()
    assert m["ctr_at_2"] == pytest.approx(2 / 6)
    assert m["ndcg_at_2"] == pytest.approx((1.0 + 1 / math.log2(3) + 0.0) / 3)
    assert m["coverage"] == pytest.approx(3 / 10)
    assert m["popularity_share"] == pytest.approx(3 / 6)  # "a": the head, 3 of 6 slots
    q.add(["d", "e"], [True, True])  # the first request leaves the window
    m = q.as_dict()
    assert len(q) == 3 and m["ctr_at_2"] == pytest.approx(3 / 6)
    assert m["coverage"] == pytest.approx(5 / 10)  # a b c d e: "x" was never shown
    with pytest.raises(ValueError, match="clicks for 1 of 2"):
        q.add(["a", "b"], [True])
