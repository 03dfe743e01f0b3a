"""CPU per event of the scorer's feature store on fraud-bench's features (not project code).

``riverflow features bench`` times the store on its own small feature set, whose entity
states are ~260 bytes; fraud-bench's are ~490 here (and ~920 in the pipeline's bench,
whose cards have a day of events). This runs the store as the scorer does (in process,
``update_and_read`` then ``record_served``: one ``commit.lua`` call a batch) on
fraud-bench's feature plan, after 20,000 events that fill the windows, and prints
redis-server's CPU (``INFO cpu``) and this process's per event, the entity states
written per event and their mean size::

    python docs/bench/store_commit.py redis://127.0.0.1:6379/0 1000

Compare two commits by running it alternately from a checkout of each, on one
redis-server with the stack's settings (AOF, fsync every second)."""

from __future__ import annotations

import statistics
import sys
import time
import uuid

import redis

import riverflow.features.store.redis_store as redis_store
from riverflow.spec import load_spec
from riverflow.streams.contracts import ServedPrediction
from riverflow.tools.bench_features import bench_requests

WARM, MEASURED = 20_000, 60_000


def main(url: str, batch: int) -> None:
    sizes: list[int] = []
    encode = redis_store.encode_entity

    def counted(engine: object, ent: object) -> bytes:
        state: bytes = encode(engine, ent)  # type: ignore[arg-type]
        sizes.append(len(state))
        return state

    redis_store.encode_entity = counted  # type: ignore[assignment]
    spec = load_spec("examples/fraud-bench.yaml")
    plan = spec.feature_plan()
    client = redis.Redis.from_url(url)
    store = redis_store.RedisFeatureStore(
        client, f"store-commit-{uuid.uuid4().hex[:8]}", plan, 600, 100_000
    )
    reqs = bench_requests(plan, spec, WARM + MEASURED, 7)

    def run(part: list) -> int:
        done = 0
        for i in range(0, len(part), batch):
            snaps = store.update_and_read(part[i : i + batch], commit=False)
            store.record_served([(s.event_id, ServedPrediction("b", 1, 0.5)) for s in snaps])
            done += len(snaps)
        return done

    run(reqs[:WARM])
    sizes.clear()
    info = client.info("cpu")
    redis_cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    cpu = time.process_time()
    n = run(reqs[WARM:])
    cpu = time.process_time() - cpu
    info = client.info("cpu")
    redis_cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"]) - redis_cpu
    print(
        f"batch {batch}: redis {redis_cpu / n * 1e6:.2f} us/event, client {cpu / n * 1e6:.2f}"
        f" us/event, states/event {len(sizes) / n:.2f}, mean state {statistics.mean(sizes):.0f} B"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
