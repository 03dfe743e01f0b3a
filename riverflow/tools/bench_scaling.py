"""Scaling figures on the real broker and Redis, each stage its own process.

``python -m riverflow.tools.bench_scaling scorers --scorers 1,2``: the backlog
drain of N scorer processes in one consumer group (confluent host, at least
once), for each N in turn, repeated ``--rounds`` times alternating, so that the
counts compare within one run on a shared machine. The scorers join the group
on an empty topic and are stopped (SIGSTOP) once every partition is assigned;
the backlog is produced, then they are resumed together: the drain is timed
from the first prediction to the last, with no join or rebalance inside it.

``python -m riverflow.tools.bench_scaling learner --labels 20000``: the learner's
maximum label rate. One scorer scores the events first (and stops); the learner
starts, learns a first ``--warmup`` labels (its index of the predictions topic
caught up, its models built), then the rest are produced at once and the drain
of their evaluations is timed, first to last.

Servers: those the settings name (``RIVERFLOW_KAFKA_BOOTSTRAP``,
``RIVERFLOW_REDIS_URL``), or a local stack started for the run. Prints the
figures as JSON (and writes them to ``--json``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec
from riverflow.streams.kafka_io import ensure_topics
from riverflow.streams.topics import Topics
from riverflow.tools.bench import (
    ProcessUsage,
    TopicWatch,
    produce_backlog,
    renamed_spec_file,
    stream,
)
from riverflow.tools.stack import Endpoints, local_stack, stop_processes


class Arrivals(TopicWatch):
    """Reads a topic from its start in a thread, noting when each event id first
    arrived (wall clock)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.at: dict[str, float] = {}
        super().__init__(bootstrap, topic, from_start=True)

    def seen(self, record: dict[str, Any], now: float) -> None:
        self.at.setdefault(record["event_id"], now)

    def wait_for(self, count: int, timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.at) < count:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a stage exited before its outputs were all in")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stalled at {len(self.at)} of {count} outputs")
            time.sleep(0.02)

    def rate(self, ids: list[str]) -> float:
        """Outputs per second of ``ids``, first to last."""
        times = [self.at[i] for i in ids]
        return (len(times) - 1) / (max(times) - min(times))


def start_stage(
    stage: str, spec_file: Path, ep: Endpoints, logfile: Path, **settings: Any
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
        "RIVERFLOW_REDIS_URL": ep.redis_url, "RIVERFLOW_SPEC": str(spec_file),
        "RIVERFLOW_METRICS_PORT": "0",
        **{f"RIVERFLOW_{k.upper()}": str(v) for k, v in settings.items()},
    }  # fmt: skip
    with logfile.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "riverflow.cli", "run", stage], env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_assigned(bootstrap: str, group: str, members: int, partitions: int) -> None:
    """Until the group is stable with ``members`` members holding every partition."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 120
    while True:
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
        except KafkaException as exc:  # the coordinator not ready yet: asked again
            if time.monotonic() > deadline:
                raise RuntimeError(f"group {group} never described: {exc}") from exc
            time.sleep(0.5)
            continue
        held = sum(len(m.assignment.topic_partitions) for m in desc.members)
        stable = desc.state == ConsumerGroupState.STABLE
        if stable and len(desc.members) == members and held == partitions:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"group {group}: {len(desc.members)} members hold {held}")
        time.sleep(0.5)


def scorer_drain(
    spec: PipelineSpec, ep: Endpoints, scorers: int, events: int, partitions: int,
    workdir: Path, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The backlog drain of ``scorers`` scorer processes over ``partitions``."""
    name = f"scale{scorers}-{uuid.uuid4().hex[:6]}"
    spec_file = renamed_spec_file(spec, workdir, name)
    topics = Topics(name)
    ensure_topics(ep.kafka_bootstrap, topics.all(), partitions=partitions)
    backlog, _ = stream(events, seed, prefix=f"{name}-")
    arrivals = Arrivals(ep.kafka_bootstrap, topics.predictions)
    procs = [
        start_stage(
            "scorer", spec_file, ep, workdir / f"{name}-{i}.log", partitions=partitions,
            instance_id=f"{name}-{i}", batch_timeout_s=0.002,
            session_timeout_s=60,  # stopped (SIGSTOP) while the backlog is produced
        )
        for i in range(scorers)
    ]  # fmt: skip
    try:
        wait_assigned(ep.kafka_bootstrap, f"riverflow-{name}-scorer", scorers, partitions)
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        produce_backlog(ep.kafka_bootstrap, topics.events, spec.events.key, backlog).flush(60)
        usage = [ProcessUsage(p.pid) for p in procs]
        servers = {n: ProcessUsage(pid) for n, pid in ep.pids.items()}
        cpu0 = [u.cpu_s() for u in usage]
        server0 = {n: u.cpu_s() for n, u in servers.items()}
        for p in procs:
            p.send_signal(signal.SIGCONT)
        arrivals.wait_for(events, 600, procs)
        ids = [e["event_id"] for e in backlog]
        per_m = 1e6 / events
        return {
            "scorers": scorers,
            "partitions": partitions,
            "events": events,
            "drain_events_per_s": arrivals.rate(ids),
            "scorer_cpu_s_per_million": [
                (u.cpu_s() - c) * per_m for u, c in zip(usage, cpu0, strict=True)
            ],
            **{f"{n}_cpu_s_per_million": (u.cpu_s() - server0[n]) * per_m
               for n, u in servers.items()},
        }  # fmt: skip
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        stop_processes(procs)
        arrivals.close()


def learner_rate(
    spec: PipelineSpec, ep: Endpoints, labels: int, warmup: int, workdir: Path, seed: int
) -> dict[str, Any]:
    """Labels per second one learner learns (every candidate of ``spec``)."""
    name = f"learn-{uuid.uuid4().hex[:6]}"
    spec_file = renamed_spec_file(spec, workdir, name)
    topics = Topics(name)
    ensure_topics(ep.kafka_bootstrap, topics.all(), partitions=3)
    events, truth = stream(warmup + labels, seed, prefix=f"{name}-")
    predictions = Arrivals(ep.kafka_bootstrap, topics.predictions)
    produce_backlog(ep.kafka_bootstrap, topics.events, spec.events.key, events).flush(60)
    scorer = start_stage("scorer", spec_file, ep, workdir / f"{name}-scorer.log",
                         partitions=3, instance_id=f"{name}-scorer")  # fmt: skip
    try:
        predictions.wait_for(len(events), 600, [scorer])
    finally:
        stop_processes([scorer])  # its offsets committed: the learner sees them scored
        predictions.close()
    evaluations = Arrivals(ep.kafka_bootstrap, topics.evaluations)
    learner = start_stage("learner", spec_file, ep, workdir / f"{name}-learner.log",
                          partitions=3, scored_dir=workdir / f"{name}-scored")  # fmt: skip
    try:
        prod = produce_backlog(ep.kafka_bootstrap, topics.labels, "event_id", truth[:warmup])
        evaluations.wait_for(warmup, 300, [learner])
        time.sleep(2.0)  # its snapshot and checkpoint after the warm-up
        usage, servers = ProcessUsage(learner.pid), {n: ProcessUsage(p) for n, p in ep.pids.items()}
        cpu0, server0 = usage.cpu_s(), {n: u.cpu_s() for n, u in servers.items()}
        produce_backlog(ep.kafka_bootstrap, topics.labels, "event_id", truth[warmup:]).flush(60)
        prod.flush(10)
        evaluations.wait_for(warmup + labels, 900, [learner])
        per_m = 1e6 / labels
        return {
            "labels": labels,
            "candidates": [c.name for c in spec.models.candidates],
            "labels_per_s": evaluations.rate([lab["event_id"] for lab in truth[warmup:]]),
            "learner_cpu_s_per_million": (usage.cpu_s() - cpu0) * per_m,
            **{f"{n}_cpu_s_per_million": (u.cpu_s() - server0[n]) * per_m
               for n, u in servers.items()},
        }  # fmt: skip
    finally:
        stop_processes([learner])
        evaluations.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m riverflow.tools.bench_scaling")
    parser.add_argument("what", choices=["scorers", "learner"])
    parser.add_argument("--spec", type=Path, default=Path("examples/fraud-bench.yaml"))
    parser.add_argument("--scorers", default="1,2", help="scorer counts, each in turn")
    parser.add_argument("--rounds", type=int, default=2, help="scorers: times each count runs")
    parser.add_argument("--events", type=int, default=60_000, help="scorers: backlog per drain")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--labels", type=int, default=20_000, help="learner: labels timed")
    parser.add_argument("--warmup", type=int, default=1_000, help="learner: labels before")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="riverflow-scaling-") as tmp:
        workdir = Path(tmp)
        with local_stack(Settings(), workdir / "stack") as ep:
            log(f"load average at start: {os.getloadavg()}")
            if args.what == "scorers":
                counts = [int(n) for n in args.scorers.split(",")]
                for r in range(args.rounds):
                    for n in counts:
                        fig = scorer_drain(spec, ep, n, args.events, args.partitions, workdir,
                                           args.seed + r)  # fmt: skip
                        fig["load_average"] = os.getloadavg()
                        figures.append(fig)
                        log(f"{n} scorer(s): {fig['drain_events_per_s']:,.0f} events/s")
            else:
                fig = learner_rate(spec, ep, args.labels, args.warmup, workdir, args.seed)
                fig["load_average"] = os.getloadavg()
                figures.append(fig)
                log(f"learner: {fig['labels_per_s']:,.0f} labels/s")
    text = orjson.dumps(figures, option=orjson.OPT_INDENT_2)
    print(text.decode())
    if args.json:
        args.json.write_bytes(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
