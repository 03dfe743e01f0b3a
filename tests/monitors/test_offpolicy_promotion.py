"""A slate pipeline promotes a challenger on its off-policy clicks: the weights are the
two policies' chances, the test does not promote an equal or worse challenger however
often it is looked at, a better one is promoted and the evidence says why; on the
monitor stage, from the served slates and the clicks."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import numpy as np
import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from riverflow.embedded import EmbeddedRuntime
from riverflow.models.registry import ChampionPointer, MemoryRegistry
from riverflow.monitors.offpolicy import (
    OffPolicyDuel,
    epsilon_greedy_levels,
    explored_weights,
)
from riverflow.monitors.policy import Decision, PipelineMonitor
from riverflow.monitors.quality import kelly_bet
from riverflow.monitors.spec import MonitorSpec
from riverflow.settings import Settings
from riverflow.spec import load_spec, parse_spec
from riverflow.streams.contracts import Message, ModelEvent
from riverflow.tools.recsys import EpsilonGreedy, RecsysConfig, RecsysWorld
from tests.monitors.registries import LosesAReply

KEY = b"k" * 32

# -- the weights --------------------------------------------------------------------


def test_the_weights_make_the_challengers_clicks_unbiased_over_every_served_order() -> None:
    """Every order an epsilon-greedy policy can serve 4 candidates in, with its chance:
    the expected weighted clicks on the top 2 are exactly the clicks the challenger's
    ranking, served with the same exploration, would get (position-based clicks)."""
    eps, n, k = 0.3, 4, 2
    greedy, target = ("a", "b", "c", "d"), ("c", "a", "b", "d")
    rng = random.Random(3)
    click = {(x, pos): rng.random() for x in greedy for pos in range(k)}  # P(click x at pos)
    expected = 0.0
    for order in itertools.permutations(greedy):
        chance = eps / math.factorial(n) + (1 - eps) * (order == greedy)
        p = [(1 - eps) * (x == g) + eps / n for x, g in zip(order, greedy, strict=True)]
        w = explored_weights(order, p, target, k)
        expected += chance * sum(w[pos] * click[(order[pos], pos)] for pos in range(k))
    truth = sum(((1 - eps) * (x == target[pos]) + eps / n) * click[(x, pos)]
                for x in greedy for pos in range(k))  # fmt: skip
    assert expected == pytest.approx(truth, rel=1e-12)


def test_the_weights_of_one_slate() -> None:
    # served greedy (every propensity 1 - 0.2 + 0.2 / 4 = 0.85); the challenger agrees at
    # position 0 only: weight 1 there, low / high = 0.05 / 0.85 at position 1
    w = explored_weights("abcd", [0.85] * 4, "acbd", 2)
    assert w == pytest.approx((1.0, 0.05 / 0.85))
    # an exploration that put the challenger's item at position 1: high / low
    w = explored_weights("dcba", [0.05] * 4, "acbd", 2)
    assert w == pytest.approx((1.0, 0.85 / 0.05))
    # no exploration: 1 where it agrees with the served order, else 0
    assert explored_weights("abc", [1.0] * 3, "acb", 2) == (1.0, 0.0)
    assert epsilon_greedy_levels([0.85, 0.05, 0.05, 0.05]) == pytest.approx((0.85, 0.05))
    with pytest.raises(ValueError, match="are not an epsilon-greedy slate's"):
        epsilon_greedy_levels([0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        epsilon_greedy_levels([1.0, 0.0])


# -- the test: not promoting what is not better, however often looked at ---------------

RUNS, REQUESTS, WARMUP, WINDOW = 400, 3_000, 50, 1_000
N, K, EPS = 6, 3, 0.2
EXAMINED = 0.7 ** np.arange(K)


def simulated_gains(relevance: np.ndarray, seed: int) -> np.ndarray:
    """(RUNS, REQUESTS) gains D of a challenger ranking the candidates in reverse, the
    champion in order, served epsilon-greedy, clicks position-based:
    ``relevance[i] * EXAMINED[pos]`` for candidate i."""
    rng = np.random.default_rng(seed)
    explored = rng.random((RUNS, REQUESTS)) < EPS
    random_order = rng.random((RUNS, REQUESTS, N)).argsort(axis=-1)[..., :K]
    served = np.where(explored[..., None], random_order, np.arange(K))
    high, low = 1 - EPS + EPS / N, EPS / N
    p = np.where(served == np.arange(K), high, low)
    q = np.where(served == N - 1 - np.arange(K), high, low)
    clicks = rng.random(served.shape) < relevance[served] * EXAMINED
    return ((q / p - 1) * clicks).sum(axis=-1) / K


def crossings(d: np.ndarray, alpha: float) -> np.ndarray:
    """Per run, the first request where ``OffPolicyDuel``'s e-process (its bet,
    ``kelly_bet`` on the last ``WINDOW`` gains, after ``WARMUP``) reaches 1/alpha, or -1."""
    runs, t = d.shape
    cs = np.concatenate([np.zeros((runs, 1)), np.cumsum(d, axis=1)], axis=1)
    cs2 = np.concatenate([np.zeros((runs, 1)), np.cumsum(d * d, axis=1)], axis=1)
    idx = np.arange(t)
    start = np.maximum(idx - WINDOW, 0)
    bets = kelly_bet(cs[:, idx] - cs[:, start], cs2[:, idx] - cs2[:, start], idx - start)
    bets[:, :WARMUP] = 0.0
    log_wealth = np.cumsum(np.log1p(bets * d), axis=1)
    crossed = log_wealth >= math.log(1 / alpha)
    return np.where(crossed.any(axis=1), crossed.argmax(axis=1), -1)


def peeked_interval(d: np.ndarray) -> np.ndarray:
    """Whether the one-sided 95% normal interval of the mean gain cleared 0 at any
    request after the warm-up: the interval the page shows, read after every request."""
    t = np.arange(1, d.shape[1] + 1)
    mean = np.cumsum(d, axis=1) / t
    var = np.cumsum(d * d, axis=1) / t - mean**2
    cleared = mean - 1.645 * np.sqrt(np.maximum(var, 0) / t) > 0
    return cleared[:, WARMUP:].any(axis=1)


def upper_tolerance(alpha: float, runs: int) -> float:
    """Promotions a rate-alpha rule stays under in 99.9% of suites (normal approximation)."""
    return alpha * runs + 3.1 * math.sqrt(runs * alpha * (1 - alpha))


@pytest.mark.parametrize(
    "relevance",
    [np.full(N, 0.3), np.linspace(0.5, 0.05, N)],
    ids=["equal: every ranking alike", "worse: the challenger ranks in reverse"],
)
def test_a_challenger_that_is_not_better_is_promoted_at_most_at_rate_alpha(
    relevance: np.ndarray,
) -> None:
    """400 seeded streams of 3,000 requests each, the e-process looked at after every
    request at alpha 0.05: at most alpha of them promote (binomial tolerance). The
    normal interval read the same way promotes an equal challenger far more often."""
    d = simulated_gains(relevance, seed=1)
    promoted = int((crossings(d, 0.05) >= 0).sum())
    assert promoted <= upper_tolerance(0.05, RUNS), promoted
    if relevance.std() == 0:  # the gain's mean is exactly 0: peeking is what fails
        peeked = int(peeked_interval(d).sum())
        assert peeked > upper_tolerance(0.05, RUNS), peeked


def test_the_duel_is_the_simulated_e_process() -> None:
    """``OffPolicyDuel`` fed the same gains (as clicks and weights of one position)
    crosses where the simulation does; a better challenger crosses in most runs."""
    d = simulated_gains(np.linspace(0.05, 0.5, N), seed=2)[:20]  # the reverse is better
    expected = crossings(d, 0.05)
    assert (expected >= 0).sum() >= 15
    for run, gains in enumerate(d):
        duel = OffPolicyDuel(WARMUP, WINDOW)
        crossed = -1
        for t, gain in enumerate(gains):
            duel.update([True], [gain + 1.0])  # X = gain + 1, Y = 1: D = gain
            if crossed < 0 and duel.e_value() >= 20:
                crossed = t
        assert crossed == expected[run]


# -- promotion in the monitor ---------------------------------------------------------


class Fixed:
    """A model the registry can sign (the monitor only reads its metadata here)."""

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return {True: 0.5, False: 0.5}


def slate_monitor(
    spec: MonitorSpec, registry: MemoryRegistry | None = None
) -> tuple[PipelineMonitor, MemoryRegistry]:
    registry = registry or MemoryRegistry(KEY)
    for name in ("popularity", "relevance"):
        registry.publish(name, Fixed(), {"parent": None, "metrics": {"labels": 5_000}})
    registry.move(ChampionPointer("popularity", 1), "advance", None, "")
    monitor = PipelineMonitor("recsys", spec, registry, "popularity", explores=True)
    monitor.refresh()
    return monitor, registry


def serve(
    monitor: PipelineMonitor, world: RecsysWorld, requests: int, start: int, challenger: Any
) -> tuple[list[Decision], int]:
    """``requests`` of ``world``, served epsilon-greedy (0.1) by popularity, each ranked
    by ``challenger`` in the shadow; the decisions, and the request that promoted."""
    rng = random.Random(start)
    logging = EpsilonGreedy(world.by_popularity, 0.1, rng)
    k = world.config.shown
    out: list[Decision] = []
    at = -1
    for n, req in enumerate(world.requests(requests, start=start)):
        served, propensities = logging(req)
        top = list(challenger(req))[:k]
        monitor.on_ranked_slate(req.request_id, "popularity", served, propensities,
                                {"relevance": top})  # fmt: skip
        decisions = monitor.on_ranked_request(req.request_id, world.clicks(req, served, rng))
        monitor.raise_owed()  # (as the stage does: a check Redis being down stopped)
        if decisions and at < 0:
            at = n
        out += decisions
    return out, at


def test_a_slate_promotion_whose_write_failed_is_made_by_the_next_settle_as_without_it() -> None:
    # the promotion's write meets Redis down: that request is taken in once, the check
    # is owed, and the stage's next call (Redis back) makes the same promotion
    world = RecsysWorld(RecsysConfig(seed=11, shift_at=()))
    monitor, _ = slate_monitor(MonitorSpec())
    (clean,), at = serve(monitor, world, 10_000, 0, world.by_relevance)
    monitor, registry = slate_monitor(MonitorSpec(), LosesAReply(KEY))
    registry.armed = registry.refuses = True
    with pytest.raises(RedisConnectionError):
        serve(monitor, world, at + 1, 0, world.by_relevance)
    assert registry.champion() == ChampionPointer("popularity", 1)
    (promote,) = monitor.settle() + monitor.refresh()
    assert (promote.kind, promote.model, promote.reason) == ("promote", "relevance", clean.reason)
    assert promote.evidence == clean.evidence  # (each request in the duel once)
    assert registry.champion() == monitor.champion == ChampionPointer("relevance", 1)
    assert monitor.settle() == []


def test_a_better_ranking_is_promoted_within_10000_requests_with_its_evidence() -> None:
    """Logged by epsilon-greedy popularity (epsilon 0.1, 20 candidates, 5 shown), a
    challenger ranking by true relevance (about three times the clicks) is promoted
    within 10,000 paired requests at alpha 0.001; the champion changes, and the
    evidence names the method, the estimate with its interval, the champion's CTR@k
    as served, the requests, and an anytime-valid lower bound on the gain."""
    world = RecsysWorld(RecsysConfig(seed=11, shift_at=()))
    monitor, registry = slate_monitor(MonitorSpec())
    decisions, at = serve(monitor, world, 10_000, 0, world.by_relevance)
    (promote,) = decisions
    assert 0 < at < 10_000
    assert (promote.kind, promote.model, promote.version) == ("promote", "relevance", 1)
    assert registry.champion() == ChampionPointer("relevance", 1)
    assert monitor.champion_name == "relevance" and not monitor.slate_duels
    ev = promote.evidence
    assert ev["method"] == "paired item-position IPS gain, one-sided betting e-process"
    assert ev["alpha"] == 0.001 and ev["e_value"] >= 1_000
    assert ev["from"] == "popularity v1" and ev["trained_labels"] == 5_000
    warmup = math.ceil(500 / 5)  # promote.min_labels shown items
    assert ev["warmup_requests"] == warmup and ev["requests"] == at + 1 - warmup
    # the challenger's CTR@k as it would be served (0.9 its ranking, 0.1 a random order)
    reqs = list(world.requests(at + 1))
    served_as = sum(0.9 * world.expected_clicks(r, world.by_relevance(r))
                    + 0.1 * sum(world.relevance(r, i) for i in r.slate) / len(r.slate)
                    * sum(world.examined(p) for p in range(5)) for r in reqs)  # fmt: skip
    truth = served_as / (at + 1) / 5
    assert ev["challenger_ctr_low"] < ev["challenger_ctr_at_k"] < ev["challenger_ctr_high"]
    assert abs(ev["challenger_ctr_at_k"] - truth) < 0.05, (ev, truth)
    assert ev["champion_ctr_at_k"] < 0.15 < 0.25 < ev["challenger_ctr_at_k"]
    assert ev["gain"] == pytest.approx(ev["challenger_ctr_at_k"] - ev["champion_ctr_at_k"],
                                       abs=1e-5)  # fmt: skip
    assert 0 < ev["gain_lower_bound"] < ev["gain"]
    assert "off-policy IPS" in promote.reason and "e-value" in promote.reason
    event = ModelEvent.decode(promote.as_event().encode())
    assert event.evidence["requests"] == ev["requests"]

    # requests served by the old champion (in flight at the change) are no evidence, and
    # no promotion is taken while cooling
    assert serve(monitor, world, 500, 20_000, world.by_popularity) == ([], -1)
    assert not monitor.slate_duels


def test_an_equal_ranking_is_not_promoted_and_promotion_respects_the_policy() -> None:
    world = RecsysWorld(RecsysConfig(seed=11, shift_at=()))
    # the champion's own ranking: every weight 1, every gain 0
    monitor, registry = slate_monitor(MonitorSpec())
    assert serve(monitor, world, 3_000, 0, world.by_popularity) == ([], -1)
    assert monitor.slate_duels["relevance"].e_value() == 1.0
    # promotion off, or the challenger's version not ready: the better one waits
    off = MonitorSpec(promote={"enabled": False})
    monitor, registry = slate_monitor(off)
    assert serve(monitor, world, 6_000, 0, world.by_relevance) == ([], -1)
    assert monitor.slate_duels["relevance"].e_value() >= 1_000  # would have promoted
    monitor, registry = slate_monitor(MonitorSpec(promote={"min_labels": 10_000}))
    assert serve(monitor, world, 6_000, 0, world.by_relevance) == ([], -1)
    assert registry.champion() == ChampionPointer("popularity", 1)


def test_a_fraud_pipeline_is_not_promoted_on_slates() -> None:
    """Without ``explores`` the monitor keeps no off-policy duel: the fraud promotion is
    the paired e-process on labels, as before."""
    monitor, _ = slate_monitor(MonitorSpec())
    monitor.explores = False
    monitor.on_evaluation(True, {"popularity": (1, 0.9), "relevance": (1, 0.9)})
    assert "relevance" in monitor.duels
    monitor.explores = True
    monitor.duels.clear()
    monitor.on_evaluation(True, {"popularity": (1, 0.9), "relevance": (1, 0.9)})
    assert not monitor.duels  # a slate pipeline's challengers are judged by their rankings


# -- on the monitor stage -------------------------------------------------------------


@pytest.mark.parametrize(("epsilon", "explores"), [(0.0, False), (0.1, True)])
def test_only_a_slate_pipeline_that_explores_promotes_off_policy(
    epsilon: float, explores: bool
) -> None:
    """Served without exploration, a challenger's rankings cannot be weighed (it counts
    only where it agrees with the champion): such a pipeline promotes on its shown
    items' labels, as fraud does."""
    data = load_spec("examples/recsys.yaml").model_dump(mode="json", by_alias=True)
    data["events"]["slate"]["epsilon"] = epsilon
    rt = EmbeddedRuntime(parse_spec(data), Settings())
    assert rt.monitor.core.explores is explores


class ByQuality:
    """Ranks items by their ``quality`` input: a challenger the registry can sign."""

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return {True: x["quality"], False: 1 - x["quality"]}


def test_the_monitor_stage_promotes_a_challenger_whose_rankings_get_more_clicks() -> None:
    """The recsys spec's monitor, fed served slates (epsilon-greedy, 0.5, over 4 items,
    2 shown, in the champion's bad order) and each shown item's evaluation: the
    challenger's version ranks every slate in the shadow, and is promoted on the
    clicks, with a ``promote`` model-event naming the off-policy evidence."""
    data = load_spec("examples/recsys.yaml").model_dump(mode="json", by_alias=True)
    data["events"]["slate"]["epsilon"] = 0.5
    monitors = {"ranking": {"offpolicy_every": 1}, "promote": {"min_labels": 10}}
    rt = EmbeddedRuntime(parse_spec({**data, "monitors": monitors}), Settings())
    monitor, t = rt.monitor, rt.topics
    assert monitor.core.explores
    rt.registry.publish("by-quality", ByQuality(), {"parent": None, "metrics": {"labels": 50}})
    quality = {"a": 0.05, "b": 0.2, "c": 0.5, "d": 0.9}  # also each item's click chance
    champion = monitor.core.champion_name
    rng = random.Random(4)
    eps, greedy = 0.5, list("abcd")  # the champion's order: the worst first

    def request(r: int) -> list[Message]:
        served = greedy if rng.random() >= eps else rng.sample(greedy, 4)
        slate = [{"item": i, "position": p, "score": 0.5, "shown": p < 2,
                  "propensity": (1 - eps) * (i == greedy[p]) + eps / 4,
                  "inputs": {"item_id": i, "quality": quality[i]}, "features": {}}
                 for p, i in enumerate(served)]  # fmt: skip
        prediction = {"event_id": f"r{r}", "entity": "u1", "probability": None,
                      "model": champion, "version": 0, "features": {}, "inputs": {},
                      "event_time": 1.0, "scored_at": 1.5, "shown": 2, "slate": slate}  # fmt: skip
        out = [Message(t.predictions, 0, r, b"u1", orjson.dumps(prediction))]
        for e in slate[:2]:
            clicked = rng.random() < quality[e["item"]]
            record = {"event_id": f"r{r}/{e['item']}", "label": clicked, "labels_seen": 1,
                      "predictions": {champion: {"version": 0, "probability": 0.5},
                                      "by-quality": {"version": 1,
                                                     "probability": quality[e["item"]]}},
                      "served": {"model": champion, "version": 0, "probability": 0.5},
                      "request": f"r{r}", "position": e["position"], "shown": 2,
                      "propensity": e["propensity"], "defaulted": not clicked}  # fmt: skip
            out.append(Message(t.evaluations, 0, 10 * r + e["position"], b"k",
                               orjson.dumps(record)))  # fmt: skip
        return out

    monitor.process(request(0)[1:])  # the challenger's first evaluation: now watched
    events = []
    for batch in range(1, 40):
        out = monitor.process([m for r in range(batch * 50, batch * 50 + 50)
                               for m in request(r)])  # fmt: skip
        assert not [o for o in out if o.topic == t.dlq]
        events += [ModelEvent.decode(o.value) for o in out if o.topic == t.model_events]
        if events:
            break
    (event,) = events
    assert (event.kind, event.model, event.version) == ("promote", "by-quality", 1)
    assert event.evidence["method"].startswith("paired item-position IPS")
    assert event.evidence["challenger_ctr_at_k"] > event.evidence["champion_ctr_at_k"]
    assert rt.registry.champion() == ChampionPointer("by-quality", 1)
