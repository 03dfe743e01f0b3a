"""The Redis feature store's CPU per event as a fraud-bench stream ages (not project code).

    python docs/bench/store_phases.py [drain events] [paced events]

Feeds ``examples/fraud-bench.yaml``'s features (1,000 cards, an event a second of
event time) through ``RedisFeatureStore`` as the scorer does (``update_and_read``
without commit, then ``record_served``, the heap frozen after each batch), on a
throwaway ``redis-server``:

- drain-early: the first 50,000 events in batches of 1,000 (the 24 h windows fill);
- drain-late: the rest of the drain events, batches of 1,000;
- paced0-2: three runs of the paced events (new seeds, event time going on), batches
  of 200, as the scorer takes them at ~10,000-15,000 events/s;
- paced-1000: one more, batches of 1,000.

Per phase: process CPU per event, Redis' CPU per event (``INFO cpu``), and the entity
states written per event and their mean size. Needs ``redis-server`` on the PATH. Runs
on the code before the states were encoded with msgspec too (commit e4ee02f), for the
comparison in docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import sys
import time
import uuid

import msgpack
import redis

from riverflow.features.definitions import FeaturePlan
from riverflow.features.store import FeatureRequest, RedisFeatureStore
from riverflow.features.tiles import pack_entity
from riverflow.spec import load_spec
from riverflow.streams.contracts import ServedPrediction
from riverflow.tools.bench_features import bench_requests, local_redis

packb = msgpack.Packer(use_bin_type=False).pack
SPEC = load_spec("examples/fraud-bench.yaml")
PLAN = FeaturePlan.build(list(SPEC.features), SPEC.events.key, 600.0)


def requests(n: int, seed: int, start_ts: float | None = None) -> list[FeatureRequest]:
    return bench_requests(PLAN, SPEC, n, seed, start_ts, prefix=f"{seed}-")


def redis_cpu_s(client: redis.Redis) -> float:
    """The CPU seconds Redis has spent (its main thread and its background ones)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def phase(store: RedisFeatureStore, reqs: list[FeatureRequest], batch: int, name: str) -> float:
    changed = size = 0
    server = redis_cpu_s(store.client)
    cpu = time.process_time()
    for i in range(0, len(reqs), batch):
        snaps = store.update_and_read(reqs[i : i + batch], commit=False)
        pending = store._pending
        if pending is not None:
            changed += len(pending.changed)
        store.record_served([(s.event_id, ServedPrediction("b", 1, 0.5)) for s in snaps])
        gc.freeze()
    cpu = time.process_time() - cpu
    server = redis_cpu_s(store.client) - server
    # the size of a state now, over a sample of the cards (not timed)
    sample = [ent for ent, _ in list(store._cache.values())[:200]]
    size = sum(len(packb(pack_entity(store.engine, e))) for e in sample) // max(1, len(sample))
    print(f"{name}: {len(reqs):,} events in batches of {batch}: {cpu / len(reqs) * 1e6:.1f} us "
          f"CPU per event (Redis {server / len(reqs) * 1e6:.1f}); {changed / len(reqs):.2f} "
          f"entity states written per event, ~{size:,} B each", flush=True)  # fmt: skip
    return reqs[-1].ts


def main() -> None:
    drain = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    paced = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    with local_redis(None) as url:
        store = RedisFeatureStore(redis.Redis.from_url(url), f"p{uuid.uuid4().hex[:6]}", PLAN,
                                  600, 100_000)  # fmt: skip
        first = requests(drain, 7)
        last = phase(store, first[:50_000], 1000, "drain-early")
        last = phase(store, first[50_000:], 1000, "drain-late")
        for k in range(3):
            last = phase(store, requests(paced, 8 + k, last + 1), 200, f"paced{k}")
        phase(store, requests(paced, 20, last + 1), 1000, "paced-1000")
    gc.unfreeze()


if __name__ == "__main__":
    main()
