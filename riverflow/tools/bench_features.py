"""Feature-store benchmark: update + read throughput and per-batch latency on Redis.

Each batch is what the scorer does per batch with the store: one
``update_and_read(commit=False)``, ``FeaturePlan.values`` for every event, then
``record_served``. In process (the default) that is the arithmetic here and one
Lua call that writes the snapshots with their predictions and the entities; on
the server, one Lua call that updates and reads, and a second that adds the
predictions.
Requests are built before the clock starts. A "feature update + read" is one
feature value of one event: events/s times the number of features.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from riverflow.features.definitions import FeaturePlan, FeatureSpec
from riverflow.features.store import FeatureRequest, RedisFeatureStore, feature_request
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import ServedPrediction
from riverflow.tools.generator import FraudStreamConfig, transactions

# Six features over three tile groups: the card's last hour and day, the merchant's hour.
BENCH_FEATURES = [
    FeatureSpec.model_validate(d)
    for d in [
        {"name": "tx_count_1h", "agg": "count", "window": "1h"},
        {"name": "amount_sum_1h", "agg": "sum", "field": "amount", "window": "1h"},
        {"name": "since_last_tx_1h", "agg": "since_previous", "window": "1h"},
        {"name": "amount_mean_24h", "agg": "mean", "field": "amount", "window": "24h"},
        {"name": "amount_zscore_24h", "agg": "zscore", "field": "amount", "window": "24h"},
        {"name": "merchant_tx_count_1h", "agg": "count", "window": "1h", "entity": "merchant"},
    ]
]


@dataclass(frozen=True)
class BenchResult:
    batch_size: int
    batches: int
    features: int
    events_per_s: float
    p50_ms: float
    p99_ms: float
    # CPU time per batch of this process and of redis-server: what a batch costs
    # when nothing else competes for the cores (wall times on a shared box do not)
    client_cpu_ms: float
    redis_cpu_ms: float

    @property
    def feature_values_per_s(self) -> float:
        return self.events_per_s * self.features


def bench_requests(
    plan: FeaturePlan, spec: PipelineSpec, n: int, seed: int,
    start_ts: float | None = None, prefix: str = "",
) -> list[FeatureRequest]:  # fmt: skip
    """``n`` fraud events of 1,000 cards as the scorer asks for their features; event
    times from ``start_ts`` (default: the generator's), ids made unique by ``prefix``."""
    config = FraudStreamConfig(seed=seed, cards=1000, mean_gap_s=1.0)
    if start_ts is not None:
        config = replace(config, start_ts=start_ts)
    out = []
    for event, _ in transactions(n, config):
        context = orjson.dumps({name: event[name] for name in spec.models.inputs})
        event_id = prefix + event["event_id"]
        out.append(feature_request(plan, event, event_id, event["ts"], context))
    return out


def run_bench(
    client: Any,
    spec: PipelineSpec,
    events: int,
    batch_size: int,
    seed: int = 7,
    path: str = "in-process",
    freeze_gc: bool = True,
) -> BenchResult:
    """Feed ``events`` generated events in batches into a fresh namespace; time each
    batch. ``path``: the store computes ``in-process`` (its default) or on the
    ``server`` (the Lua script it falls back to). ``freeze_gc``: freeze the heap
    after every batch, as the scorer does, so that no collection walks the
    entities the store keeps in the process (the heap is unfrozen at the end)."""
    plan = FeaturePlan.build(BENCH_FEATURES, spec.events.key, 600.0)
    cached = 100_000 if path == "in-process" else 0  # 0: every batch on the server
    store = RedisFeatureStore(client, f"bench-{uuid.uuid4().hex[:8]}", plan, 600, cached)
    reqs = bench_requests(plan, spec, events, seed)
    store.update_and_read(reqs[:batch_size])  # loads the scripts, warms the connection
    latencies = []
    redis_cpu = _redis_cpu_s(client)
    client_cpu = time.process_time()
    started = time.perf_counter()
    for i in range(batch_size, len(reqs), batch_size):
        t0 = time.perf_counter()
        served = []
        for snap in store.update_and_read(reqs[i : i + batch_size], commit=False):
            x = plan.values(snap.aggregates)
            # no model here: a number that differs per event stands in for its probability
            probability = 1 / (1 + x["amount_mean_24h"])
            served.append((snap.event_id, ServedPrediction("bench", 1, probability)))
        if not store.record_served(served):
            raise RuntimeError("the benchmark's namespace is its own: no commit is refused")
        latencies.append(time.perf_counter() - t0)
        if freeze_gc:  # as the scorer does after every batch (HostSettings(freeze_gc=True))
            gc.freeze()
    elapsed = time.perf_counter() - started
    if freeze_gc:
        gc.unfreeze()
    client_cpu = time.process_time() - client_cpu
    redis_cpu = _redis_cpu_s(client) - redis_cpu
    done, n = len(reqs) - batch_size, len(latencies)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return BenchResult(
        batch_size, n, len(plan.features), done / elapsed, cuts[49] * 1000, cuts[98] * 1000,
        client_cpu * 1000 / n, redis_cpu * 1000 / n,
    )  # fmt: skip


def _redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def local_redis(url: str | None) -> Iterator[str]:
    """``url`` if given, else a throwaway redis-server on a free port."""
    if url:
        yield url
        return
    from riverflow.tools.stack import start_redis

    with tempfile.TemporaryDirectory(prefix="riverflow-bench-") as tmp:
        server = start_redis(Path(tmp))
        try:
            yield server.address
        finally:
            server.stop(5)
