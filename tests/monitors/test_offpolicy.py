"""Off-policy estimates of a ranking policy's clicks, checked against the simulator's truth."""

from __future__ import annotations

import math
import random

import pytest

from riverflow.monitors.offpolicy import OffPolicyEstimator
from riverflow.tools.recsys import EpsilonGreedy, RecsysConfig, RecsysWorld

SEEDS, REQUESTS = 8, 4000


def test_ips_and_snips_cover_the_true_clicks_of_a_policy_never_served() -> None:
    """Logged by epsilon-greedy popularity, estimating the relevance ranking: the
    true expected clicks (known exactly in the simulator) falls inside the 95%
    interval on (nearly) every seeded run, and the estimates centre on it."""
    world = RecsysWorld(RecsysConfig(seed=11, shift_at=()))
    covered = {"ips": 0, "snips": 0}
    errors = {"ips": [], "snips": []}  # type: dict[str, list[float]]
    for seed in range(SEEDS):
        rng = random.Random(seed)
        logging = EpsilonGreedy(world.by_popularity, 0.3, rng)
        estimator = OffPolicyEstimator(positions=5)
        truth = 0.0
        for req in world.requests(REQUESTS, start=seed * REQUESTS):
            served, propensities = logging(req)
            target = world.by_relevance(req)
            estimator.add(served, propensities, world.clicks(req, served, rng), target)
            truth += world.expected_clicks(req, target)
        truth /= REQUESTS
        for est in (estimator.ips(), estimator.snips()):
            covered[est.method] += est.low <= truth <= est.high
            errors[est.method].append(est.value - truth)
            assert est.requests == REQUESTS and est.matched > 0
    # a 95% interval misses 1 run in 20: allow one miss in 8
    assert covered["ips"] >= SEEDS - 1 and covered["snips"] >= SEEDS - 1, covered
    for method, errs in errors.items():  # no bias worth the name
        assert abs(sum(errs) / SEEDS) < 0.05, (method, errs)


def test_the_served_policy_itself_is_estimated_at_its_logged_clicks() -> None:
    world = RecsysWorld(RecsysConfig(seed=2, shift_at=()))
    rng = random.Random(0)
    estimator = OffPolicyEstimator(positions=5)
    clicks = 0
    for req in world.requests(3000):
        ranking = world.by_popularity(req)
        c = world.clicks(req, ranking, rng)
        estimator.add(ranking, [1.0] * 5, c, ranking)  # deterministic: propensity 1
        clicks += sum(c)
    assert estimator.ips().value == pytest.approx(clicks / 3000)
    assert estimator.snips().value == pytest.approx(clicks / 3000)


def test_bad_logs_are_refused_and_unmatched_positions_say_so() -> None:
    estimator = OffPolicyEstimator(positions=2)
    with pytest.raises(ValueError, match=r"propensity 0\.0 is not in"):
        estimator.add(["a", "b"], [0.0, 0.5], [True, False], ["a", "b"])
    with pytest.raises(ValueError, match="needs 2 shown positions"):
        estimator.add(["a"], [1.0], [True], ["a"])
    for _ in range(10):
        estimator.add(["a", "b"], [0.5, 0.5], [True, False], ["a", "c"])
    assert math.isnan(estimator.snips().value)  # the target never agreed at position 2
    assert estimator.ips().value == pytest.approx(2.0)
