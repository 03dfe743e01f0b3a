"""Where a paced slate request's CPU goes, per process and per scorer thread (not project code).

    python docs/bench/slate_paced.py [--rate 1000] [--seconds 20] [--warmup 20] [--scorers 1]

On a local stack of its own (as ``riverflow bench`` starts it: a broker, a durable
Redis), the confluent scorer on ``examples/recsys.yaml`` drains 2,000 requests of
20 candidates, then is offered ``--rate`` requests/s for ``--warmup`` seconds (not
judged: the broker's first minute costs more) and for ``--seconds`` more, the
measured hold (``riverflow.tools.bench.offer``). Printed: the hold's latency and lag,
the CPU per request of the scorer, the broker, Redis and this process (which makes
the hold's requests before sending them), and of each busy thread of the scorer,
whose one Python thread is what a paced rate is bound by. ``--scorers 2``: two scorer
processes in the group, the three partitions split between them (CPU summed over them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.streams.kafka_io import ensure_topics
from riverflow.streams.topics import Topics
from riverflow.tools.bench import (
    PredictionClock,
    ProcessUsage,
    offer,
    produce_backlog,
    renamed_spec_file,
)
from riverflow.tools.bench_slates import slate_requests
from riverflow.tools.recsys import RecsysConfig, RecsysWorld
from riverflow.tools.stack import local_stack, stop_processes

BACKLOG = 2_000


def thread_cpu_s(pid: int) -> dict[str, tuple[str, float]]:
    """Each thread of ``pid``: its name and CPU seconds so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--scorers", type=int, default=1)
    args = parser.parse_args()
    settings = Settings(kafka_bootstrap="", redis_url="")
    with tempfile.TemporaryDirectory() as d, local_stack(settings, Path(d)) as ep:
        spec, name = load_spec("recsys"), f"paced-{uuid.uuid4().hex[:6]}"
        spec_file = renamed_spec_file(spec, Path(d), name)
        topics = Topics(name)
        ensure_topics(ep.kafka_bootstrap, topics.all(), partitions=3)
        world = RecsysWorld(RecsysConfig(seed=11, slate=20, users=20_000, items=5_000))
        make = slate_requests(world)
        backlog = make(BACKLOG, 0, "d", None)
        prod = produce_backlog(ep.kafka_bootstrap, topics.events, spec.events.key, backlog)
        env = {
            **os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
            "RIVERFLOW_REDIS_URL": ep.redis_url, "RIVERFLOW_SPEC": str(spec_file),
            "RIVERFLOW_HOST": "confluent", "RIVERFLOW_METRICS_PORT": "0",
        }  # fmt: skip
        clock = PredictionClock(ep.kafka_bootstrap, topics.predictions)
        procs = []
        for i in range(args.scorers):
            with open(Path(d) / f"scorer-{i}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "riverflow.cli", "run", "scorer"],
                    env={**env, "RIVERFLOW_INSTANCE_ID": f"{name}-{i}"},
                    stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
        proc = procs[0]
        try:
            if not clock.wait_for(BACKLOG, 180):
                raise SystemExit("the scorer did not drain its backlog within 3 minutes")
            ids = ("request_id", "ts")
            start = backlog[-1]["ts"] + 1.0
            warm = offer(prod, clock, topics.events, spec.events.key, args.rate, args.warmup,
                         5, "w", start, make, ids)  # fmt: skip
            print(f"warm-up {args.rate:,}/s for {args.warmup:g} s: p50 {warm['p50_ms']:.1f} ms, "
                  f"end lag {warm['end_lag']:,}")  # fmt: skip
            usage = {**{f"scorer {i}": ProcessUsage(p.pid) for i, p in enumerate(procs)},
                     "bench": ProcessUsage(os.getpid()),
                     **{k: ProcessUsage(pid) for k, pid in ep.pids.items()}}  # fmt: skip
            before = {k: u.cpu_s() for k, u in usage.items()}
            threads = thread_cpu_s(proc.pid)
            row = offer(prod, clock, topics.events, spec.events.key, args.rate, args.seconds,
                        6, "r", warm["last_ts"] + 1.0, make, ids)  # fmt: skip
            n = row["sent"]
            print(f"held {args.rate:,}/s for {args.seconds:g} s: p50 {row['p50_ms']:.1f} ms, "
                  f"p99 {row['p99_ms']:.1f} ms, end lag {row['end_lag']:,}, until scored "
                  f"(p50) {row['until_scored_p50_ms']:.1f} ms")  # fmt: skip
            for k, u in usage.items():
                print(f"  {k}: {(u.cpu_s() - before[k]) / n * 1e3:.3f} ms CPU per request")
            for tid, (thread, cpu) in thread_cpu_s(proc.pid).items():
                spent = cpu - threads.get(tid, (thread, 0.0))[1]
                if spent / n > 5e-6:
                    print(f"    scorer thread {thread} ({tid}): {spent / n * 1e3:.3f} ms")
        finally:
            stop_processes(procs)
            clock.close()


if __name__ == "__main__":
    main()
