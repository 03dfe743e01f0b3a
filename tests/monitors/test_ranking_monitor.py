"""Ranking metrics per model in the monitor: slate evaluations grouped by request,
CTR@k and NDCG@k per serving model, every candidate's re-ranked NDCG, coverage and
popularity share of the served slates; on the monitor stage, in /metrics."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from riverflow.embedded import EmbeddedRuntime
from riverflow.monitors.exporter import MonitorMetrics
from riverflow.monitors.ranking import OpenRequests, RankingMonitor, ShownItem
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, SpecError, parse_spec
from riverflow.streams.contracts import DeadLetter, Message
from riverflow.tools.recsys import EpsilonGreedy, RecsysConfig, RecsysWorld


def item(name: str, position: int, clicked: bool = False, **scores: tuple[int, float]) -> ShownItem:
    return ShownItem(name, position, clicked, 1.0, scores)


def brute_ndcg(clicks: list[bool], k: int) -> float:
    """NDCG@k by definition: DCG of the order over the best DCG of every order."""
    gains = [float(c) for c in clicks]

    def dcg_of(order: tuple[float, ...]) -> float:
        return sum(g / math.log2(i + 2) for i, g in enumerate(order[:k]))

    best = max(dcg_of(p) for p in itertools.permutations(gains))
    return dcg_of(tuple(gains)) / best if best else 0.0


# -- grouping by request ------------------------------------------------------------


def test_a_request_completes_when_its_shown_items_are_in_whatever_their_order() -> None:
    """Clicks come first, the timeout negatives later; requests interleave."""
    buffer = OpenRequests(capacity=10)
    assert buffer.add("r1", 3, item("b", 1, True)) is None  # a click, early
    assert buffer.add("r2", 2, item("x", 0)) is None
    assert buffer.add("r1", 3, item("c", 2)) is None
    assert len(buffer) == 2
    done = buffer.add("r1", 3, item("a", 0), served=("champ", 4))
    assert done is not None and done.request == "r1" and done.served == ("champ", 4)
    assert [i.item for i in done.items] == ["a", "b", "c"] and done.clicks == [False, True, False]
    assert len(buffer) == 1 and buffer.completed == 1  # r2 still waits for its second item


def test_the_buffer_is_bounded_the_oldest_request_is_evicted_and_counted() -> None:
    buffer = OpenRequests(capacity=2)
    buffer.add("r1", 2, item("a", 0, True))
    buffer.add("r2", 2, item("a", 0))
    buffer.add("r3", 2, item("a", 0))  # the third open request: r1, the oldest, goes
    assert len(buffer) == 2 and buffer.evicted == 1
    # r1's timeout negative comes later: dropped, not a request that can never complete
    assert buffer.add("r1", 2, item("b", 1)) is None
    assert buffer.late == 1 and len(buffer) == 2
    assert buffer.add("r2", 2, item("b", 1)) is not None  # the others complete as ever
    # a position labelled twice is counted and ignored
    assert buffer.add("r3", 2, item("a", 0)) is None and buffer.duplicates == 1
    assert buffer.add("r3", 2, item("b", 1)) is not None
    assert (buffer.completed, buffer.evicted, len(buffer)) == (2, 1, 0)


# -- metrics per model ----------------------------------------------------------------


def test_ndcg_ctr_and_reranked_ndcg_equal_a_brute_force_computation() -> None:
    rng = random.Random(5)
    k, n = 4, 60
    monitor = RankingMonitor(window=1000, open_requests=100)
    served_ndcg, ctr, rerank = [], [], {"champ": [], "chall": []}  # type: ignore[var-annotated]
    for r in range(n):
        clicks = [rng.random() < 0.3 for _ in range(k)]
        scores = [{"champ": (3, rng.random()), "chall": (7, rng.random())} for _ in range(k)]
        served_ndcg.append(brute_ndcg(clicks, k))
        ctr.append(sum(clicks) / k)
        for name in rerank:
            order = sorted(range(k), key=lambda p: (-scores[p][name][1], p))
            rerank[name].append(brute_ndcg([clicks[p] for p in order], k))
        positions = list(range(k))
        rng.shuffle(positions)  # the evaluations come in any order
        for p in positions:
            shown = ShownItem(f"i{p}", p, clicks[p], 1.0, scores[p])
            monitor.on_item(f"r{r}", k, shown, ("champ", 3))
    view = monitor.view(champion="champ")
    rows = {m.name: m for m in view.models}
    assert view.k == k and view.requests["completed"] == n and view.requests["open"] == 0
    champ, chall = rows["champ"], rows["chall"]
    assert (champ.role, champ.version, champ.served, champ.reranked) == ("champion", 3, n, n)
    assert (chall.role, chall.version, chall.served, chall.reranked) == ("challenger", 7, 0, n)
    assert champ.metrics["ndcg_at_k"] == pytest.approx(sum(served_ndcg) / n)
    assert champ.metrics["ctr_at_k"] == pytest.approx(sum(ctr) / n)
    for name, values in rerank.items():
        assert rows[name].metrics["rerank_ndcg_at_k"] == pytest.approx(sum(values) / n)
    assert "ctr_at_k" not in chall.metrics  # it served nothing: no served figures


def test_each_serving_model_has_its_own_figures_and_an_idle_one_leaves() -> None:
    monitor = RankingMonitor(window=3, open_requests=100)

    def request(r: str, served: tuple[str, int], clicks: list[bool]) -> None:
        for p, c in enumerate(clicks):
            monitor.on_item(r, 2, item(f"i{p}", p, c, a=(1, 0.9 - p), b=(2, 0.1 + p)), served)

    request("r1", ("a", 1), [True, False])
    request("r2", ("a", 1), [True, False])
    request("r3", ("b", 2), [False, False])
    rows = {m.name: m for m in monitor.view("b").models}
    assert rows["a"].metrics["ctr_at_k"] == 0.5 and rows["a"].metrics["ndcg_at_k"] == 1.0
    assert rows["b"].metrics["ctr_at_k"] == 0.0 and rows["b"].served == 1
    assert rows["a"].metrics["rerank_ndcg_at_k"] == pytest.approx(2 / 3)  # 1, 1, 0
    # b puts the clicked first item last: 1/log2(3) each time it had a click
    assert rows["b"].metrics["rerank_ndcg_at_k"] == pytest.approx(2 / math.log2(3) / 3)
    assert rows["b"].role == "champion" and rows["a"].role == "challenger"
    for r in range(4, 8):  # a full window of requests served by b alone
        request(f"r{r}", ("b", 3), [False, True])
    rows = {m.name: m for m in monitor.view("b").models}
    assert rows["a"].served == 0 and "ctr_at_k" not in rows["a"].metrics
    assert rows["b"].version == 2  # the candidate's version names the row, as quality does
    # a point per model every window // 20 (here: every) completed request
    series = monitor.view("b").series
    assert [p.requests for p in series["b"]] == list(range(1, 8))
    assert series["b"][2].metrics["ctr_at_k"] == 0.0 and series["b"][3].version == 2
    assert not monitor.view("b", series=False).series
    monitor.forget("a")  # retired: its re-ranked figures and its line go
    assert "a" not in monitor.view("b").series


def test_coverage_and_popularity_share_of_the_served_slates() -> None:
    monitor = RankingMonitor(window=4, open_requests=10, head=0.25)
    # candidates a, b, c, d; a is a candidate every time: the most popular (the head)
    monitor.on_slate("pop", 1, ["a", "b"], ["a", "b", "c", "d"])
    monitor.on_slate("pop", 1, ["a", "c"], ["a", "c", "b"])
    monitor.on_slate("div", 5, ["d", "c"], ["a", "d", "c", "a"])
    rows = {m.name: m for m in monitor.view("pop").models}
    assert rows["pop"].metrics == {"coverage": 3 / 4, "popularity_share": 2 / 4}
    # each serving model over its own slates: div saw three candidates, a the head
    assert rows["div"].metrics == {"coverage": 2 / 3, "popularity_share": 0.0}
    assert rows["div"].version == 5 and rows["div"].served == 0


# -- a realistic stream from the seeded world --------------------------------------------


def test_the_better_ranker_has_the_better_reranked_ndcg_on_a_simulated_stream() -> None:
    """The world's relevance ranking against its popularity baseline, each scoring the
    shown items; popularity serves: the relevance ranker's re-ranking of the same shown
    items has the higher NDCG, and the served slates favour the popular head."""
    world = RecsysWorld(RecsysConfig(seed=3, shift_at=()))
    rng = random.Random(1)
    k = world.config.shown
    monitor = RankingMonitor(window=5000, open_requests=1000)
    pending: list[tuple[str, ShownItem]] = []
    for req in world.requests(2000):
        served = world.by_popularity(req)
        monitor.on_slate("popularity", 1, served[:k], list(req.slate))
        clicks = world.clicks(req, served, rng)  # of the shown top only
        for p, (name, clicked) in enumerate(zip(served[:k], clicks, strict=True)):
            scores = {"popularity": (1, world.popularity[name]),
                      "relevance": (1, world.relevance(req, name))}  # fmt: skip
            pending.append((req.request_id, ShownItem(name, p, clicked, 1.0, scores)))
        if len(pending) > 40:  # labels arrive out of order, across requests
            rng.shuffle(pending)
            for request, shown in pending[:20]:
                monitor.on_item(request, k, shown, ("popularity", 1))
            del pending[:20]
    for request, shown in pending:
        monitor.on_item(request, k, shown, ("popularity", 1))
    view = monitor.view("popularity")
    rows = {m.name: m.metrics for m in view.models}
    assert view.requests["completed"] == 2000 and view.requests["evicted"] == 0
    assert rows["relevance"]["rerank_ndcg_at_k"] > rows["popularity"]["rerank_ndcg_at_k"] + 0.05
    assert 0 < rows["popularity"]["coverage"] < 1
    assert rows["popularity"]["popularity_share"] > 0.5


# -- the monitor stage and /metrics ---------------------------------------------------------


def slate_evaluation(request: str, item: str, position: int, clicked: bool,
                     **extra: Any) -> dict[str, Any]:  # fmt: skip
    """A slate evaluation as the contract has it; ``extra`` fields override."""
    return {"event_id": f"{request}/{item}", "label": clicked, "labels_seen": 1,
            "predictions": {"fraud-hoeffding": {"version": 2, "probability": 0.1 * position}},
            "served": {"model": "fraud-hoeffding", "version": 2, "probability": 0.3},
            "request": request, "position": position, "shown": 2, "propensity": 1.0,
            "defaulted": not clicked, **extra}  # fmt: skip


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for f in registry.collect()
            for s in f.samples if s.name == name}  # fmt: skip


def test_the_monitor_stage_reports_a_slate_pipelines_ranking_and_refuses_bad_slates(
    fraud_spec: PipelineSpec,
) -> None:
    registry = CollectorRegistry()
    rt = EmbeddedRuntime(fraud_spec, Settings())
    monitor, t = rt.monitor, rt.topics
    monitor.metrics = MonitorMetrics(registry)
    fraud = {"event_id": "e1", "label": True, "labels_seen": 1,
             "predictions": {"fraud-hoeffding": {"version": 2, "probability": 0.7}}}  # fmt: skip
    monitor.process([Message(t.evaluations, 0, 0, b"e1", orjson.dumps(fraud))])
    # a fraud pipeline: no ranking, no panel, no ranking samples
    assert monitor.ranking is None and monitor.view().ranking is None
    assert not samples(registry, "riverflow_ranking_quality")
    assert not samples(registry, "riverflow_ranking_requests")

    records = [
        slate_evaluation("r1", "b", 1, True),
        slate_evaluation("r1", "a", 0, False),
        slate_evaluation("r2", "a", 3, False),  # position beyond shown: refused
        slate_evaluation("r3", "a", 0, False, event_id="r9/a"),  # not the pair's request
        slate_evaluation("r4", "a", 0, False, propensity=0.0),
    ]
    slate = {"event_id": "r1", "entity": "u1", "probability": None, "model": "fraud-hoeffding",
             "version": 2, "features": {}, "event_time": 1.0, "scored_at": 1.5, "shown": 2,
             "slate": [{"item": i, "position": p, "score": 0.5, "shown": p < 2,
                        "propensity": 1.0} for p, i in enumerate("abcd")]}  # fmt: skip
    batch = [Message(t.evaluations, 0, n + 1, b"k", orjson.dumps(r)) for n, r in enumerate(records)]
    batch.append(Message(t.predictions, 0, 0, b"u1", orjson.dumps(slate)))
    broken = {**slate, "event_id": "r5", "slate": [{"item": 3, "position": 0}]}
    batch.append(Message(t.predictions, 0, 1, b"u1", orjson.dumps(broken)))
    out = monitor.process(batch)
    letters = [DeadLetter.decode(o.value) for o in out if o.topic == t.dlq]
    assert [(d.topic, d.offset) for d in letters] == [(t.evaluations, n) for n in (3, 4, 5)] + [
        (t.predictions, 1)
    ]
    assert "position 3 is not one of 2 shown" in letters[0].error
    assert "does not name the pair" in letters[1].error and "propensity" in letters[2].error
    assert "slate: not a slate prediction" in letters[3].error
    assert monitor.core.labels == 3  # the refused ones are not taken in anywhere

    view = monitor.view()
    assert view.ranking is not None and view.ranking.requests["completed"] == 1
    (row,) = view.ranking.models
    assert (row.name, row.version, row.role) == ("fraud-hoeffding", 2, "champion")
    assert row.metrics == {
        "rerank_ndcg_at_k": 1.0,  # its scores put the clicked b first, the slate had it second
        "ctr_at_k": 0.5, "ndcg_at_k": 1 / math.log2(3),
        "coverage": 0.5, "popularity_share": 0.5,
    }  # fmt: skip
    exported = samples(registry, "riverflow_ranking_quality")
    assert exported[("fraud-hoeffding", "2", "ctr_at_k")] == 0.5
    assert exported[("fraud-hoeffding", "2", "coverage")] == 0.5
    assert samples(registry, "riverflow_ranking_requests")[("completed",)] == 1


def test_the_exporter_drops_a_models_old_version_from_the_ranking_gauges() -> None:
    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry)
    monitor = RankingMonitor(window=10, open_requests=10)
    rt_view = _view_with(monitor)
    monitor.on_item("r1", 1, item("a", 0, True, m=(1, 0.5)), ("m", 1))
    metrics.update(rt_view(), [])
    assert set(samples(registry, "riverflow_ranking_quality")) == {
        ("m", "1", "rerank_ndcg_at_k"),
        ("m", "1", "ctr_at_k"),
        ("m", "1", "ndcg_at_k"),
    }
    monitor.on_item("r2", 1, item("a", 0, False, m=(2, 0.5)), ("m", 2))
    metrics.update(rt_view(), [])
    exported = samples(registry, "riverflow_ranking_quality")
    assert {labels[1] for labels in exported} == {"2"}
    assert exported[("m", "2", "ctr_at_k")] == 0.5


def _view_with(monitor: RankingMonitor) -> Any:
    from riverflow.monitors.view import MonitorView

    def view() -> MonitorView:
        v = MonitorView(pipeline="recsys", updated=0.0, window=10, champion=None)
        v.ranking = monitor.view("m")
        return v

    return view


def test_the_request_buffer_is_a_setting_of_the_spec(fraud_spec: PipelineSpec) -> None:
    data = fraud_spec.model_dump(mode="json", by_alias=True)
    spec = parse_spec({**data, "monitors": {"ranking": {"open_requests": 50, "window": 20}}})
    monitor = EmbeddedRuntime(spec, Settings()).monitor
    record = slate_evaluation("r1", "a", 0, True)
    monitor.process([Message(monitor.topics.evaluations, 0, 0, b"k", orjson.dumps(record))])
    assert monitor.ranking is not None and monitor.ranking.open.capacity == 50
    assert monitor.ranking.window == 20
    with pytest.raises(SpecError, match="open_requests"):
        parse_spec({**data, "monitors": {"ranking": {"open_requests": 0}}})


# -- off-policy estimates of the challengers ------------------------------------------------


def test_a_challengers_offpolicy_ctr_covers_its_true_ctr_on_a_simulated_stream() -> None:
    """Served by epsilon-greedy popularity with its propensities logged, the relevance
    ranking (never served as such) is estimated at its true CTR@k, known exactly in the
    simulator, within the interval; a request it did not rank counts for nothing."""
    world = RecsysWorld(RecsysConfig(seed=11, shift_at=()))
    rng = random.Random(3)  # (a 95% interval: one seed in 20 misses; this one does not)
    k, n = world.config.shown, 4000
    logging = EpsilonGreedy(world.by_popularity, 0.3, rng)
    monitor = RankingMonitor(window=n, open_requests=100)
    truth = 0.0
    for req in world.requests(n, start=3 * n):
        served, propensities = logging(req)
        target = world.by_relevance(req)
        truth += world.expected_clicks(req, target) / k / n
        monitor.on_targets(req.request_id, {"relevance": (2, target[:k])})
        clicks = world.clicks(req, served, rng)
        for p in range(k):
            shown = ShownItem(served[p], p, clicks[p], propensities[p], {})
            monitor.on_item(req.request_id, k, shown, ("popularity", 1))
    (row,) = [m for m in monitor.view("popularity").models if m.name == "relevance"]
    m = row.metrics
    assert row.version == 2 and m["offpolicy_requests"] == n and m["offpolicy_matched"] > 0
    assert m["offpolicy_ctr_low"] <= truth <= m["offpolicy_ctr_high"], (m, truth)
    assert abs(m["offpolicy_ctr_at_k"] - truth) < 0.02
    assert m["offpolicy_ctr_high"] - m["offpolicy_ctr_low"] < 0.1


def test_shadow_rankings_wait_in_a_bounded_buffer_and_a_dropped_one_is_counted() -> None:
    monitor = RankingMonitor(window=10, open_requests=2)
    for r in range(3):
        monitor.on_targets(f"r{r}", {"c": (1, ["a", "b"])})
    requests = monitor.view("m").requests
    assert (requests["shadow_waiting"], requests["shadow_dropped"]) == (2, 1)
    for r in range(3):  # r0's ranking was dropped: only r1 and r2 are estimated
        for p, item in enumerate("ab"):
            monitor.on_item(f"r{r}", 2, ShownItem(item, p, p == 0, 1.0, {}), ("m", 1))
    (row,) = [m for m in monitor.view("m").models if m.name == "c"]
    assert row.metrics["offpolicy_requests"] == 2 and row.metrics["offpolicy_ctr_at_k"] == 0.5
    assert monitor.view("m").requests["shadow_waiting"] == 0


class ByQuality:
    """Ranks items by their ``quality`` input: a challenger the registry can sign."""

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return {True: x["quality"], False: 1 - x["quality"]}


def test_the_monitor_ranks_every_nth_slate_by_each_challengers_latest_version(
    fraud_spec: PipelineSpec,
) -> None:
    """The challenger's published version ranks the whole slate from each item's
    inputs and features; its off-policy CTR then comes from the served clicks."""
    data = fraud_spec.model_dump(mode="json", by_alias=True)
    spec = parse_spec({**data, "monitors": {"ranking": {"offpolicy_every": 2}}})
    rt = EmbeddedRuntime(spec, Settings())
    monitor, t = rt.monitor, rt.topics
    rt.registry.publish("by-quality", ByQuality(), {"parent": None, "metrics": {"labels": 1}})
    quality = {"a": 0.1, "b": 0.9, "c": 0.5}

    def request(r: int, served: str) -> list[Message]:
        """Request r served in the order ``served``, its first two shown, the first clicked."""
        slate = [{"item": i, "position": p, "score": 0.5, "shown": p < 2, "propensity": 1.0,
                  "inputs": {"item": i, "quality": quality[i]}, "features": {"f": 1.0}}
                 for p, i in enumerate(served)]  # fmt: skip
        prediction = {"event_id": f"r{r}", "entity": "u1", "probability": None,
                      "model": "fraud-hoeffding", "version": 2, "features": {}, "inputs": {},
                      "event_time": 1.0, "scored_at": 1.5, "shown": 2, "slate": slate}  # fmt: skip
        out = [Message(t.predictions, 0, r, b"u1", orjson.dumps(prediction))]
        for p, item in enumerate(served[:2]):
            record = slate_evaluation(f"r{r}", item, p, p == 0)
            record["predictions"]["by-quality"] = {"version": 1, "probability": quality[item]}
            out.append(Message(t.evaluations, 0, 10 * r + p, b"k", orjson.dumps(record)))
        return out

    monitor.process(request(0, "abc")[1:])  # the challenger's first evaluation: now watched
    # ranked in the shadow: every second slate (r2, r4); it would show b, c as r2 and r4 were
    out = monitor.process([m for r in range(1, 5) for m in request(r, "abc" if r % 2 else "bca")])
    assert not [o for o in out if o.topic == t.dlq]
    view = monitor.view()
    assert view.ranking is not None
    rows = {m.name: m for m in view.ranking.models}
    m = rows["by-quality"].metrics
    assert (m["offpolicy_requests"], m["offpolicy_matched"]) == (2, 4)
    assert m["offpolicy_ctr_at_k"] == 0.5  # one click on its two positions, every time
    assert "offpolicy_requests" not in rows["fraud-hoeffding"].metrics  # the champion's own
    assert rows["by-quality"].version == 1  # the version that ranked
