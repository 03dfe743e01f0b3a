"""The recommendation row of ``riverflow bench``: the confluent scorer on
``examples/recsys.yaml``, ranking slates of 20 candidates.

- **drain**: requests waiting in the topic, scored first to last: requests/s, and
  scored items/s (each request is 20 (user, item) pairs to read features for and score);
- **latency**: requests offered at a fixed rate (1,000/s by default), each one's
  time from produce to its ranked prediction on the topic (p50, p99), after the
  same rate held ``warmup_seconds`` unjudged; whether the lag stayed bounded
  (``bench.Sustained``). If it did not, a second point at ``fallback_share`` of the
  drain (rounded down to 50/s): what this machine does sustain, and at what latency.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from riverflow.spec import PipelineSpec, load_spec
from riverflow.streams.kafka_io import ensure_topics
from riverflow.streams.topics import Topics
from riverflow.tools.bench import (
    PredictionClock,
    ProcessUsage,
    Sustained,
    drain_rate,
    offer,
    produce_backlog,
    renamed_spec_file,
)
from riverflow.tools.recsys import RecsysConfig, RecsysWorld
from riverflow.tools.stack import Endpoints, stop_processes


@dataclass(frozen=True)
class SlateBench:
    """What the recommendation row runs."""

    requests: int = 5_000  # the drain's backlog
    slate: int = 20
    rate: int = 1_000  # requests/s of the latency point
    seconds: float = 8.0
    seed: int = 11
    # paced at the rate before the point (not judged): a broker fresh from the drain
    # spends its first paced seconds compiling the small requests' paths (84% of a
    # core, against ~50% later at 700 requests/s; docs/benchmarks.md)
    warmup_seconds: float = 15.0
    # the share of the drain held when ``rate`` is not sustained (0: none). Paced
    # requests cost more than a drain's (docs/benchmarks.md): of drains of 905-958
    # requests/s this box held 550/s at the edge, 600/s not
    fallback_share: float = 0.5


def slate_requests(
    world: RecsysWorld,
) -> Callable[[int, int, str, float | None], list[dict[str, Any]]]:
    """``bench.offer``'s event maker for ``world``: ``n`` requests from stream position
    ``seed * n`` (each call new ones), ids prefixed, times from ``start_ts``."""

    def make(n: int, seed: int, prefix: str, start_ts: float | None) -> list[dict[str, Any]]:
        w = world
        if start_ts is not None:
            w = RecsysWorld(replace(world.config, start_ts=start_ts))
        out = []
        for r in w.requests(n, start=seed * n):
            event = w.event(r)
            event["request_id"] = prefix + event["request_id"]
            out.append(event)
        return out

    return make


def measure_slates(
    ep: Endpoints, workdir: Path, cfg: SlateBench, server_pids: dict[str, int],
    log: Callable[[str], None], spec: PipelineSpec | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The drain and the latency of the confluent scorer on the recsys example."""
    spec = spec or load_spec("recsys")
    name = f"bench-slates-{uuid.uuid4().hex[:6]}"
    spec_file = renamed_spec_file(spec, workdir, name)
    topics = Topics(name)
    ensure_topics(ep.kafka_bootstrap, topics.all(), partitions=3)
    world = RecsysWorld(RecsysConfig(seed=cfg.seed, slate=cfg.slate, users=20_000, items=5_000))
    make = slate_requests(world)
    backlog = make(cfg.requests, 0, "d", None)
    prod = produce_backlog(ep.kafka_bootstrap, topics.events, spec.events.key, backlog)
    newest = backlog[-1]["ts"]
    del backlog
    env = {
        **os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
        "RIVERFLOW_REDIS_URL": ep.redis_url, "RIVERFLOW_SPEC": str(spec_file),
        "RIVERFLOW_HOST": "confluent", "RIVERFLOW_BATCH_TIMEOUT_S": "0.002",
        "RIVERFLOW_METRICS_PORT": "0", "RIVERFLOW_INSTANCE_ID": f"{name}-0",
    }  # fmt: skip
    clock = PredictionClock(ep.kafka_bootstrap, topics.predictions)
    logpath = workdir / f"{name}.log"
    with logpath.open("wb") as logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "riverflow.cli", "run", "scorer"], env=env,
            stdout=logfile, stderr=subprocess.STDOUT,
        )  # fmt: skip
    servers = {server: ProcessUsage(pid) for server, pid in server_pids.items()}
    try:
        drain = drain_rate("the slate scorer", proc, clock, cfg.requests, servers, logpath)
        out: dict[str, Any] = {
            "requests": cfg.requests, "slate": cfg.slate,
            "drain_requests_per_s": drain["drain_events_per_s"],
            "drain_items_per_s": drain["drain_events_per_s"] * cfg.slate,
            "cpu_s_per_million_requests": drain["cpu_s_per_million"],
        }  # fmt: skip
        log(f"slates: drained {cfg.requests:,} requests of {cfg.slate} at "
            f"{out['drain_requests_per_s']:,.0f} requests/s "
            f"({out['drain_items_per_s']:,.0f} items/s)")  # fmt: skip
        gc.collect()
        gc.freeze()
        start = [newest + 1.0]  # each hold's requests start after the last one's

        def hold(rate: int, seconds: float, seed: int, prefix: str) -> dict[str, Any]:
            row = offer(prod, clock, topics.events, spec.events.key, rate, seconds,
                        cfg.seed + seed, prefix, start[0], make, ("request_id", "ts"))  # fmt: skip
            start[0] = row.pop("last_ts") + 1.0
            return row

        try:
            if cfg.warmup_seconds:
                out["warmup"] = warm = hold(cfg.rate, cfg.warmup_seconds, 2, "w")
                log(f"slates: warm-up, {cfg.rate:,} requests/s for {cfg.warmup_seconds:g} s "
                    f"(not judged): p99 {warm['p99_ms']:.1f} ms, "
                    f"end lag {warm['end_lag']:,}")  # fmt: skip
            out["latency"] = {}
            row = _judged(out, hold(cfg.rate, cfg.seconds, 1, "r"), log)
            lower = int(out["drain_requests_per_s"] * cfg.fallback_share) // 50 * 50
            if not row["sustained"] and 0 < lower < cfg.rate:
                # offer waited for every request sent to come back: no backlog is left.
                # A shorter warm-up: the broker's paths are warm by now
                hold(lower, cfg.warmup_seconds / 3, 3, "v")
                _judged(out, hold(lower, cfg.seconds, 4, "s"), log)
        finally:
            gc.unfreeze()
        out["peak_rss_mb"] = ProcessUsage(proc.pid).peak_rss_mb()
    finally:
        stop_processes([proc])
        clock.close()
    return out


def _judged(out: dict[str, Any], row: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """``row`` (a latency point) judged (``bench.Sustained``), kept in ``out`` and logged."""
    rate = row["rate"]
    row["sustained"] = Sustained().holds(row)
    out["latency"][str(rate)] = row
    bounded = "lag bounded" if row["sustained"] else "lag grows: not sustained"
    log(f"slates: {rate:,} requests/s for {row['seconds']:g} s: p50 {row['p50_ms']:.1f} ms, "
        f"p99 {row['p99_ms']:.1f} ms, end lag {row['end_lag']:,} ({bounded})")  # fmt: skip
    return row
