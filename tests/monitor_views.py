"""Monitor views as the monitor stage would serve them, built without running it."""

from __future__ import annotations

import math
import random
from typing import get_args

from riverflow.monitors.ranking import RankingMonitor, ShownItem
from riverflow.monitors.view import (
    CandidateView,
    DistributionView,
    Marker,
    MarkerKind,
    MonitorView,
    RungView,
    SearchView,
    SegmentView,
    SeriesPoint,
)
from riverflow.tools.recsys import EpsilonGreedy, RecsysConfig, RecsysWorld

START = 1_790_000_000.0  # unix seconds of the first point


def realistic_view(points: int = 300, every: int = 50, seed: int = 3) -> MonitorView:
    """Three candidates over ``points`` windows (one every ``every`` labels) with an abrupt
    drift at 40%, a fresh challenger started by its alarm and promoted later, a rollback,
    a retirement and a feature drift, a model search of logreg pruned at a rung: one
    marker of every kind, in the order they happen."""
    rng = random.Random(seed)
    drift_at = int(points * 0.4) * every
    challenger_at = drift_at + 5 * every
    promote_at = int(points * 0.7) * every
    rollback_at = int(points * 0.8) * every

    def accuracy(labels: int, before: float, after: float, recover: float) -> float:
        if labels < drift_at:
            level = before
        else:  # drops at the drift, then climbs back towards ``recover``
            level = recover - (recover - after) * math.exp(-(labels - drift_at) / (20 * every))
        return min(1.0, max(0.0, level + rng.gauss(0, 0.008)))

    series: dict[str, list[SeriesPoint]] = {"hoeffding": [], "logreg": [], "hoeffding-fresh": []}
    for i in range(1, points + 1):
        labels, at = i * every, START + i * 10.0
        series["hoeffding"].append(
            SeriesPoint(
                labels=labels,
                at=at,
                version=1 + labels // 1000,
                value=accuracy(labels, 0.93, 0.71, 0.80),
            )
        )
        series["logreg"].append(
            SeriesPoint(
                labels=labels,
                at=at,
                version=1 + labels // 1000,
                value=accuracy(labels, 0.90, 0.74, 0.83),
            )
        )
        if labels >= challenger_at:
            series["hoeffding-fresh"].append(
                SeriesPoint(
                    labels=labels,
                    at=at,
                    version=1 + (labels - challenger_at) // 1000,
                    value=accuracy(labels, 0.5, 0.60, 0.91),
                )
            )

    def at(labels: int) -> float:
        return START + labels / every * 10.0

    configs = ["logreg@lr=0.01", "logreg@lr=0.1", "logreg@lr=1"]
    scores = {"logreg@lr=0.01": 0.31, "logreg@lr=0.1": 0.29, "logreg@lr=1": 0.52}
    rung = RungView(rung=0, budget=200, labels=200, kept=configs[:2], scores=scores)
    search = SearchView(base="logreg", round=1, metric="log_loss", configurations=configs,
                        rungs=[rung])  # fmt: skip
    markers = [
        Marker(
            labels=every,
            at=at(every),
            kind="search",
            model="logreg",
            text="round 1 of 3: the spec's search",
        ),
        Marker(
            labels=200,
            at=at(200),
            kind="prune",
            model="logreg",
            text="rung 0 after 200 labels: kept 2, pruned 1 by log_loss",
        ),
        Marker(
            labels=drift_at + 3 * every,
            at=at(drift_at + 3 * every),
            kind="drift",
            model="hoeffding",
            text="ADWIN: error rate 0.07 -> 0.27 over 600 labels",
        ),
        Marker(
            labels=drift_at + 4 * every,
            at=at(drift_at + 4 * every),
            kind="feature_drift",
            model="amount_mean_1h",
            text="KS 0.31, p 1e-9 (reference vs recent 2000)",
        ),
        Marker(
            labels=challenger_at,
            at=at(challenger_at),
            kind="challenger",
            model="hoeffding-fresh",
            text="fresh challenger started from hoeffding",
        ),
        Marker(
            labels=promote_at,
            at=at(promote_at),
            kind="promote",
            model="hoeffding-fresh",
            text="promoted: right on 91.2% vs 80.4% of the same 2000 events",
        ),
        Marker(
            labels=rollback_at,
            at=at(rollback_at),
            kind="rollback",
            model="hoeffding",
            text="rolled back: champion accuracy fell 0.12 below its previous version",
        ),
        Marker(
            labels=rollback_at + 10 * every,
            at=at(rollback_at + 10 * every),
            kind="retire",
            model="logreg",
            text="retired: 300 windows behind the champion",
        ),
    ]
    assert {m.kind for m in markers} == set(get_args(MarkerKind))
    last = points * every
    return MonitorView(
        pipeline="fraud",
        updated=at(last),
        metric="accuracy",
        window=1000,
        champion={"model": "hoeffding", "version": 1 + last // 1000},
        candidates=[
            CandidateView(
                name="hoeffding",
                role="champion",
                version=1 + last // 1000,
                labels=last,
                metrics={
                    "accuracy": 0.81,
                    "precision": 0.42,
                    "recall": 0.61,
                    "f1": 0.5,
                    "roc_auc": 0.88,
                    "log_loss": 0.31,
                },
                drift_alarms=1,
            ),
            CandidateView(
                name="logreg",
                role="challenger",
                version=1 + last // 1000,
                labels=last,
                metrics={
                    "accuracy": 0.83,
                    "precision": 0.45,
                    "recall": 0.55,
                    "f1": 0.49,
                    "roc_auc": 0.9,
                    "log_loss": 0.29,
                },
            ),
            CandidateView(
                name="hoeffding-fresh",
                role="challenger",
                version=3,
                labels=last - challenger_at,
                base="hoeffding",
                metrics={
                    "accuracy": 0.91,
                    "precision": 0.61,
                    "recall": 0.7,
                    "f1": 0.65,
                    "roc_auc": 0.95,
                    "log_loss": 0.21,
                },
            ),
        ],
        series=series,
        markers=markers,
        segments=SegmentView(
            field="channel",
            metric="accuracy",
            gap=0.07,
            by={
                "web": {"n": 5200, "accuracy": 0.86},
                "pos": {"n": 7100, "accuracy": 0.79},
                "atm": {"n": 1700, "accuracy": 0.82},
            },
        ),
        distributions={
            "amount_mean_1h": DistributionView(statistic=0.31, p_value=1e-9, alarms=1),
            "tx_count_10m": DistributionView(statistic=0.04, p_value=0.41, alarms=0),
            "score": DistributionView(statistic=0.12, p_value=0.002, alarms=0),
        },
        anomaly={"mean": 0.42, "p99": 0.93},
        searches={"logreg": search},
        data_quality={
            "window": 1000,
            "fields": {
                "amount": {"missing": 0.25, "impute": 0.25, "clip": 0.01, "bucket": 0.0},
                "channel": {"missing": 0.0, "impute": 0.0, "clip": 0.0, "bucket": 0.03},
            },
            "freshness_s": {"mean": 0.8, "max": 2.5},
        },
    )


def empty_view() -> MonitorView:
    """What the monitor serves before any label arrived."""
    return MonitorView(pipeline="fraud", updated=START, window=1000, champion=None)


def ranking_view(requests: int = 300) -> MonitorView:
    """A slate pipeline's view: ``realistic_view``'s candidates, and the ranking panel of
    a ``RankingMonitor`` fed a stream of the seeded recommendation world, served by
    epsilon-greedy popularity (``hoeffding``), ranked in the shadow by relevance
    (``logreg``: re-ranked NDCG, and its off-policy CTR from the logged propensities)."""
    world = RecsysWorld(RecsysConfig(seed=5, shift_at=()))
    rng = random.Random(5)
    k = world.config.shown
    serve = EpsilonGreedy(world.by_popularity, 0.2, rng)
    monitor = RankingMonitor(window=200, open_requests=200, clock=lambda: START)
    for req in world.requests(requests):
        served, propensities = serve(req)
        monitor.on_slate("hoeffding", 16, served[:k], list(req.slate))
        monitor.on_targets(req.request_id, {"logreg": (16, world.by_relevance(req)[:k])})
        clicks = world.clicks(req, served, rng)
        for p, (item, clicked) in enumerate(zip(served[:k], clicks, strict=True)):
            scores = {"hoeffding": (16, world.popularity[item]),
                      "logreg": (16, world.relevance(req, item))}  # fmt: skip
            if p or req.position % 50:  # a few requests still await a label
                shown = ShownItem(item, p, clicked, propensities[p], scores)
                monitor.on_item(req.request_id, k, shown, ("hoeffding", 16))
    view = realistic_view()
    view.pipeline = "recsys"
    view.ranking = monitor.view("hoeffding")
    return view
