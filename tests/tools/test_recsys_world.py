"""The simulated recommendation world: seeded, long-tailed, position-biased, seasonal."""

from __future__ import annotations

import random
import statistics

from riverflow.tools.recsys import EpsilonGreedy, RecsysConfig, RecsysWorld


def test_the_same_config_gives_the_same_world_and_requests() -> None:
    a, b = RecsysWorld(RecsysConfig(seed=3)), RecsysWorld(RecsysConfig(seed=3))
    assert list(a.requests(50)) == list(b.requests(50))
    assert list(a.requests(5, start=100)) == list(b.requests(5, start=100))
    assert list(a.requests(5)) != list(RecsysWorld(RecsysConfig(seed=4)).requests(5))
    req = next(a.requests(1))
    assert len(set(req.slate)) == len(req.slate) == 20
    assert set(req.as_event()) == {"request_id", "user", "ts", "device", "page", "slate"}


def test_popularity_is_long_tailed_in_the_slates() -> None:
    world = RecsysWorld(RecsysConfig(seed=1))
    counts: dict[str, int] = {}
    for req in world.requests(2000):
        for item in req.slate:
            counts[item] = counts.get(item, 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    head = sum(ranked[: len(world.item_ids) // 10])  # the top 10% of the catalogue
    assert head / sum(ranked) > 0.5
    assert len(counts) > len(world.item_ids) // 2  # ...and the tail still shows up


def test_clicks_fall_with_position_and_the_season_change_moves_what_users_like() -> None:
    world = RecsysWorld(RecsysConfig(seed=2, shift_at=(1000,)))
    rng = random.Random(0)
    by_position = [0] * 5
    for req in world.requests(3000):
        for k, clicked in enumerate(world.clicks(req, list(req.slate), rng)):
            by_position[k] += clicked
    assert by_position == sorted(by_position, reverse=True) and by_position[0] > by_position[4]
    # the best ranking before the change, judged after it: worth less than after's best
    before, after = next(world.requests(1, start=999)), next(world.requests(1, start=1000))
    assert world.season(before.position) == 0 and world.season(after.position) == 1
    losses = []
    for req in world.requests(300, start=1000):
        stale = sorted(req.slate, key=lambda i: -world.relevance(req, i, season=0))
        losses.append(world.expected_clicks(req, world.by_relevance(req))
                      - world.expected_clicks(req, stale))  # fmt: skip
    assert statistics.fmean(losses) > 0.02


def test_epsilon_greedy_propensities_are_the_chance_of_each_item_at_its_position() -> None:
    world = RecsysWorld(RecsysConfig(seed=5))
    req = next(world.requests(1))
    policy = EpsilonGreedy(world.by_popularity, 0.2, random.Random(1))
    greedy = world.by_popularity(req)
    seen: dict[tuple[int, str], int] = {}
    draws = 20_000
    for _ in range(draws):
        served, props = policy(req)
        for k in range(5):
            want = 0.8 * (served[k] == greedy[k]) + 0.2 / 20
            assert props[k] == want
        seen[0, served[0]] = seen.get((0, served[0]), 0) + 1
    # the frequency of the greedy head at position 0 is its propensity
    assert abs(seen[0, greedy[0]] / draws - (0.8 + 0.01)) < 0.01
