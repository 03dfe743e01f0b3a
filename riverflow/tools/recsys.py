"""A seeded recommendation world: users with tastes, items with quality, position bias.

Real recommendation data sets are not available offline (River's MovieLens
downloads at run time), so the recommendation use case is exercised here:

- **Users** have latent tastes over item categories (a Dirichlet draw: most users
  care about a few categories). **Items** have a category, a quality (Beta) and a
  long-tailed popularity (Zipf weights over a random order of the catalogue); a
  request's slate of candidates is drawn by popularity, so popular items are
  candidates far more often.
- **Clicks** follow the position-based model: the user examines position k with
  probability ``position_bias ** k`` and clicks an examined item with its
  relevance ``sigmoid(-4 + 1.5 * affinity + 2 * quality)``, where the affinity is
  the user's taste for the item's category times the number of categories (1 on
  average). Only the ``shown`` first positions are seen.
- **Seasons**: at each position in ``shift_at`` the categories' meaning rotates
  (a fixed random permutation of every user's tastes), so what users like
  changes all at once: drift, challengers and rollback have something to do.

Because relevance is known, a ranking's expected clicks are exact
(``expected_clicks``): the true value an off-policy estimate is checked against.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from riverflow.spec import PipelineSpec
from riverflow.streams.kafka_io import produce_one, producer, read_topic

log = logging.getLogger(__name__)

DEVICES = ("mobile", "desktop", "tablet")
PAGES = ("home", "search", "item")


@dataclass(frozen=True)
class RecsysConfig:
    """Knobs of the simulated world; every field has a sane default."""

    seed: int = 7
    users: int = 2_000
    items: int = 1_000
    categories: int = 12
    slate: int = 20  # candidates per request
    shown: int = 5  # the top k of a ranking the user sees
    position_bias: float = 0.7  # chance to examine position k: position_bias ** k
    taste_concentration: float = 0.3  # Dirichlet alpha: lower, more focused tastes
    popularity_exponent: float = 1.1  # Zipf exponent of how often an item is a candidate
    shift_at: tuple[int, ...] = (20_000,)  # request positions where the season changes
    mean_gap_s: float = 0.5
    start_ts: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Request:
    """One ranking request: who, in which context, and the candidates."""

    position: int  # in the stream
    request_id: str
    user: str
    ts: float
    device: str
    page: str
    slate: tuple[str, ...]

    def as_event(self) -> dict[str, object]:
        return {"request_id": self.request_id, "user": self.user, "ts": self.ts,
                "device": self.device, "page": self.page, "slate": list(self.slate)}  # fmt: skip


@dataclass
class RecsysWorld:
    """The users, items and seasons of ``config`` (see the module docstring)."""

    config: RecsysConfig = field(default_factory=RecsysConfig)

    def __post_init__(self) -> None:
        c = self.config
        rng = random.Random(c.seed)
        self._rng = rng
        self.item_ids = [f"i{n:05d}" for n in range(c.items)]
        self.category = {i: rng.randrange(c.categories) for i in self.item_ids}
        self.quality = {i: rng.betavariate(2.0, 5.0) for i in self.item_ids}
        order = list(self.item_ids)
        rng.shuffle(order)
        self.popularity = {i: 1.0 / (r + 1) ** c.popularity_exponent for r, i in enumerate(order)}
        self.user_ids = [f"u{n:05d}" for n in range(c.users)]
        self.taste = {u: _dirichlet(rng, c.categories, c.taste_concentration)
                      for u in self.user_ids}  # fmt: skip
        # each season maps a category to the one whose taste it takes
        self.seasons: list[list[int]] = [list(range(c.categories))]
        for _ in c.shift_at:
            perm = list(range(c.categories))
            rng.shuffle(perm)
            self.seasons.append([perm[k] for k in self.seasons[-1]])
        # cumulative once: ``choices`` given plain weights adds them all up on every call
        self._cum_weights = list(itertools.accumulate(self.popularity[i] for i in self.item_ids))

    def season(self, position: int) -> int:
        return sum(position >= s for s in self.config.shift_at)

    def requests(self, n: int, start: int = 0) -> Iterator[Request]:
        """``n`` requests from stream position ``start`` (seeded by the config's seed
        and ``start``: the same call gives the same requests)."""
        c = self.config
        rng = random.Random(f"{c.seed}-{start}")
        ts = c.start_ts + start * c.mean_gap_s
        for pos in range(start, start + n):
            ts += rng.expovariate(1.0 / c.mean_gap_s)
            slate: list[str] = []
            while len(slate) < c.slate:  # distinct candidates, drawn by popularity
                for item in rng.choices(self.item_ids, cum_weights=self._cum_weights, k=c.slate):
                    if item not in slate and len(slate) < c.slate:
                        slate.append(item)
            yield Request(pos, f"r{c.seed}-{pos:08d}", rng.choice(self.user_ids), round(ts, 3),
                          rng.choice(DEVICES), rng.choice(PAGES), tuple(slate))  # fmt: skip

    def relevance(self, request: Request, item: str, season: int | None = None) -> float:
        """The chance the user clicks ``item`` if examined, in the season at the
        request (or in ``season``: what a ranking learned earlier would believe)."""
        c = self.config
        season_map = self.seasons[self.season(request.position) if season is None else season]
        affinity = self.taste[request.user][season_map[self.category[item]]] * c.categories
        return 1.0 / (1.0 + math.exp(4.0 - 1.5 * affinity - 2.0 * self.quality[item]))

    def event(self, request: Request) -> dict[str, Any]:
        """``request`` as the recsys example's request event (examples/recsys.yaml)."""
        items = [{"item_id": i, "category": f"c{self.category[i]}",
                  "quality": round(self.quality[i], 4)} for i in request.slate]  # fmt: skip
        return {"request_id": request.request_id, "user_id": request.user, "ts": request.ts,
                "device": request.device, "page": request.page, "items": items}  # fmt: skip

    def click_labels(
        self, prediction: Mapping[str, Any], rng: random.Random
    ) -> list[dict[str, Any]]:
        """The clicks a ranked prediction (``Prediction.slate``) of one of this world's
        requests gets, as label messages (only clicks: a shown item with none is labelled
        negative by the timeout, ``label.after``)."""
        request_id = str(prediction["event_id"])
        position = int(request_id.rsplit("-", 1)[1])
        user = str(prediction["entity"])
        ranking = [str(c["item"]) for c in prediction["slate"]]
        request = Request(position, request_id, user, 0.0, "", "", tuple(ranking))
        clicked = self.clicks(request, ranking, rng)
        return [{"request_id": request_id, "item_id": item, "clicked": True}
                for item, click in zip(ranking, clicked, strict=False) if click]  # fmt: skip

    def examined(self, k: int) -> float:
        return self.config.position_bias**k

    def expected_clicks(self, request: Request, ranking: Sequence[str]) -> float:
        """Expected clicks on the shown top of ``ranking``: the true value of a policy."""
        shown = ranking[: self.config.shown]
        return sum(self.relevance(request, item) * self.examined(k) for k, item in enumerate(shown))

    def clicks(self, request: Request, ranking: Sequence[str], rng: random.Random) -> list[bool]:
        """Whether each shown position (the top ``shown`` of ``ranking``) was clicked."""
        return [rng.random() < self.relevance(request, item) * self.examined(k)
                for k, item in enumerate(ranking[: self.config.shown])]  # fmt: skip

    def by_popularity(self, request: Request) -> list[str]:
        """The popularity baseline's ranking of a request's candidates."""
        return sorted(request.slate, key=lambda i: (-self.popularity[i], i))

    def by_relevance(self, request: Request) -> list[str]:
        """The best ranking there is (it knows the relevance)."""
        return sorted(request.slate, key=lambda i: (-self.relevance(request, i), i))


Ranker = Callable[[Request], Sequence[str]]


@dataclass
class EpsilonGreedy:
    """Serves ``ranker``'s order, or with chance ``epsilon`` a uniformly random order
    of the candidates, and says how likely each shown item was at its position:
    ``(1 - epsilon) * [ranker put it there] + epsilon / len(slate)``."""

    ranker: Ranker
    epsilon: float
    rng: random.Random

    def __call__(self, request: Request) -> tuple[list[str], list[float]]:
        greedy = list(self.ranker(request))
        if self.rng.random() < self.epsilon:
            served = list(request.slate)
            self.rng.shuffle(served)
        else:
            served = greedy
        n = len(request.slate)
        shown = range(min(len(served), len(greedy)))
        propensities = [(1 - self.epsilon) * (served[k] == greedy[k]) + self.epsilon / n
                        for k in shown]  # fmt: skip
        return served, propensities


def _dirichlet(rng: random.Random, k: int, alpha: float) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws) or 1.0
    return [d / total for d in draws]


class SimulatedUsers:
    """The users of ``world`` clicking what a live pipeline shows them: follows the
    predictions topic (in a thread) and writes each request's clicks to the labels
    topic (``RecsysWorld.click_labels``), for the requests it is told of (``expect``)."""

    def __init__(self, bootstrap: str, spec: PipelineSpec, world: RecsysWorld, seed: int) -> None:
        self.bootstrap, self.topics, self.world = bootstrap, spec.topics, world
        self.rng = random.Random(seed)
        self.waiting: set[str] = set()
        self.answered = 0
        self.clicks = 0
        self.stopped: str | None = None  # why the users stopped reading, if they did early
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulated-users", daemon=True)
        self._thread.start()

    def expect(self, request_id: str) -> None:
        with self._lock:
            self.waiting.add(request_id)

    def _run(self) -> None:
        prod = producer(self.bootstrap)
        predictions = read_topic(self.bootstrap, self.topics.predictions, follow=True,
                                 stop=self._stop)  # fmt: skip
        try:
            for msg in predictions:
                if self._stop.is_set():  # the rest of a batch read before it was set
                    continue
                self._answer(msg, prod)
            if not self._stop.is_set():
                self.stopped = "the predictions topic's reader ended"
        except Exception as exc:  # said by wait()'s caller; the traceback to the log
            self.stopped = f"{type(exc).__name__}: {exc}"
            log.exception("the simulated users stopped reading the predictions")
        finally:
            prod.flush(30)

    def _answer(self, msg: Any, prod: Any) -> None:
        try:
            p = orjson.loads(msg.value() or b"{}")
        except orjson.JSONDecodeError:
            return  # not a prediction the users could have been shown
        with self._lock:
            if not isinstance(p, dict) or p.get("event_id") not in self.waiting:
                return
            self.waiting.discard(p["event_id"])
            self.answered += 1
        for click in self.world.click_labels(p, self.rng):
            produce_one(prod, self.topics.labels, click["request_id"].encode(),
                        orjson.dumps(click), _ignore)  # fmt: skip
            self.clicks += 1
        prod.poll(0)

    def wait(self, timeout_s: float) -> bool:
        """Whether every request expected was answered within ``timeout_s`` (False at
        once if the users stopped reading: ``stopped`` says why)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.stopped is None:
            with self._lock:
                if not self.waiting:
                    return True
            time.sleep(0.1)
        return False

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop following the predictions (within a poll, even with none coming) and
        send the clicks made so far; whether the thread was done within ``timeout_s``."""
        self._stop.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def _ignore(*_: Any) -> None:
    """A delivery report not looked at (the producer's flush waits for every one)."""


def fits(spec: PipelineSpec) -> str | None:
    """Why ``spec``'s requests are not what ``RecsysWorld.event`` makes, or None."""
    slate = spec.events.slate
    if slate is None:
        return "the spec has no slate"
    world = RecsysWorld(RecsysConfig(users=1, items=1, slate=1))
    event = world.event(next(world.requests(1)))
    request = {k for k in event if k != "items"}
    if slate.field != "items" or set(spec.events.fields) != request:
        return f"its requests have the fields {sorted(spec.events.fields)}, not {sorted(request)}"
    if set(slate.fields) != set(event["items"][0]):
        return f"its candidates have the fields {sorted(slate.fields)}"
    return None
