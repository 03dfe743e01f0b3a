"""The slate scorer against a lean one, CPU per request in one run (not project code).

Both rank the same 6,000 requests of ``examples/recsys.yaml`` (slates of 20, a world of
20,000 users and 5,000 items, seed 11) in batches of 200, the first 1,000 as warm-up,
on the same Redis. Reported: process CPU per request over the other 5,000, each
figure the best of ``--rounds``.

- **project**: ``Scorer.process`` as the confluent host calls it, the Redis feature
  store and everything it does per pair (snapshots, versions, label-fed reads).
- **lean**: one loop: msgspec typed decode, the three count windows of the example
  (user 1 h, item 24 h, user x category 24 h) in process, the three label-fed CTRs
  looked up (none learned: the prior), the example's FM scored with
  ``riverflow.models.batched`` (batched, as the scorer does), the ranked prediction
  with each item's inputs and features (orjson), and per batch one pipelined Redis
  write-behind of the touched entities and one replay marker per pair (900 s).

It needs ``msgspec`` (``pip install msgspec``) and a Redis at ``--redis`` (it is
flushed)::

    redis-server --port 6391 --save '' --daemonize yes
    python docs/bench/lean_slates.py --redis redis://127.0.0.1:6391/0
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
import orjson
import redis

from riverflow.assembly import build_scorer, redis_backends
from riverflow.models.batched import positive_probabilities
from riverflow.models.factory import build_model
from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.streams.contracts import Message
from riverflow.tools.recsys import RecsysConfig, RecsysWorld

BATCH, WARM, REQUESTS = 200, 1_000, 6_000
PRIOR = 0.05  # a label-fed CTR with no label yet


class Item(msgspec.Struct):
    item_id: str
    category: str
    quality: float


class Request(msgspec.Struct):
    request_id: str
    user_id: str
    device: str
    page: str
    ts: float
    items: list[Item]


class Window:
    """Counts per entity in tiles of ``width`` seconds, the last ``n`` tiles."""

    def __init__(self, width: float, n: int) -> None:
        self.width, self.n = width, n
        self.state: dict[str, dict[int, int]] = {}

    def add(self, key: str, ts: float) -> int:
        b = int(ts // self.width)
        tiles = self.state.setdefault(key, {})
        tiles[b] = tiles.get(b, 0) + 1
        first, total = b - self.n + 1, 0
        for k in list(tiles):
            if k < first:
                del tiles[k]
            else:
                total += tiles[k]
        return total


def lean(client: redis.Redis) -> Callable[[list[bytes]], list[bytes]]:
    decode = msgspec.json.Decoder(Request).decode
    model = build_model(load_spec("recsys").models.champion_spec)
    users, items, crosses = Window(60, 60), Window(3600, 24), Window(3600, 24)
    ctr: dict[str, float] = {}
    recency: dict[str, float] = {}  # exp(-seconds since the last click / 2h), looked up

    def process(batch: list[bytes]) -> list[bytes]:
        pipe = client.pipeline(transaction=False)
        touched: dict[tuple[str, str], Window] = {}
        xs: list[dict[str, Any]] = []
        requests = []
        for raw in batch:
            q = decode(raw)
            n_user = users.add(q.user_id, q.ts)
            touched["u", q.user_id] = users
            rows = []
            for it in q.items:
                cross = f"{q.user_id}|{it.category}"
                features = {
                    "user_requests_1h": n_user,
                    "item_candidacy_24h": items.add(it.item_id, q.ts),
                    "user_category_candidates_24h": crosses.add(cross, q.ts),
                    "user_ctr_24h": ctr.get(q.user_id, PRIOR),
                    "item_ctr_24h": ctr.get(it.item_id, PRIOR),
                    "user_category_ctr_7d": ctr.get(cross, PRIOR),
                    "user_category_click_recency_7d": recency.get(cross, 0.0),
                }
                touched["i", it.item_id] = items
                touched["c", cross] = crosses
                xs.append({"user_id": q.user_id, "item_id": it.item_id,
                           "category": it.category, "quality": it.quality,
                           "device": q.device, "page": q.page, **features})  # fmt: skip
                rows.append((it, features))
                pipe.set(f"lean:snap:{q.request_id}:{it.item_id}", b"1", px=900_000)
            requests.append((q, rows))
        scores = positive_probabilities(model, xs)
        out, at = [], 0
        for q, rows in requests:
            ranked = sorted(zip(scores[at : at + len(rows)], rows, strict=True),
                            key=lambda r: -r[0])  # fmt: skip
            at += len(rows)
            slate = [{"item": it.item_id, "position": k, "score": p, "shown": k < 5,
                      "propensity": 1.0, "inputs": {"category": it.category,
                                                    "quality": it.quality},
                      "features": f}
                     for k, (p, (it, f)) in enumerate(ranked)]  # fmt: skip
            out.append(orjson.dumps({"event_id": q.request_id, "entity": q.user_id,
                                     "model": "recsys-fm", "version": 0, "ts": q.ts,
                                     "slate": slate, "shown": 5}))  # fmt: skip
        for (kind, key), window in touched.items():
            pipe.hset(f"lean:{kind}:{key}", "s", msgpack.packb(window.state[key]))
        pipe.execute()
        return out

    return process


def project(client: redis.Redis) -> Callable[[list[bytes]], list[Any]]:
    spec, settings = load_spec("recsys"), Settings()
    scorer = build_scorer(spec, settings, *redis_backends(spec, settings, client))

    def process(batch: list[bytes]) -> list[Any]:
        msgs = [Message("events", 0, i, None, raw) for i, raw in enumerate(batch)]
        return scorer.process(msgs)

    return process


def cpu_per_request(make: Callable[[redis.Redis], Callable[[list[bytes]], Any]],
                    client: redis.Redis, raws: list[bytes]) -> float:  # fmt: skip
    client.flushdb()
    process = make(client)
    for i in range(0, WARM, BATCH):
        process(raws[i : i + BATCH])
    t0 = time.process_time()
    for i in range(WARM, len(raws), BATCH):
        process(raws[i : i + BATCH])
    return (time.process_time() - t0) / (len(raws) - WARM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6391/0")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis)
    world = RecsysWorld(RecsysConfig(seed=11, slate=20, users=20_000, items=5_000))
    raws = [orjson.dumps(world.event(r)) for r in world.requests(REQUESTS, start=0)]
    best: dict[str, float] = {}
    for _ in range(args.rounds):  # alternated, so a busy spell hits both
        for name, make in (("project", project), ("lean", lean)):
            s = cpu_per_request(make, client, raws)
            best[name] = min(best.get(name, s), s)
            print(f"{name}: {s * 1e3:.2f} ms CPU per request", flush=True)
    for name, s in best.items():
        print(f"best {name}: {s * 1e3:.2f} ms per request, {1 / s:,.0f} requests/s on one core")
    print(f"project / lean speed: {best['lean'] / best['project']:.2f}")


if __name__ == "__main__":
    main()
