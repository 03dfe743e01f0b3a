"""Where an event's end-to-end time goes in the Kafka scorer, at a paced rate.

    python -m riverflow.tools.latency_probe --rate 1000 --seconds 20 \
        --variants base,nagle --rounds 2

Starts a throwaway Kafka + Redis, then for each variant in turn (alternated over
``--rounds``) a scorer process on the confluent-kafka loop with every phase of
its loop timed (poll wait, consume, validate, Redis update call, champion
refresh, record_served call, produce + flush for acks, commit) and its GC
pauses noted. The driver sends events at ``--rate`` and reads the
predictions back (the same paced producer and reading consumer as
``riverflow bench``), notes each event's delivery ack, and splits every
event's latency into: input (produce call -> the scorer's poll returns it),
queued (in the scorer before its batch started: poll-to-process gap), process,
write (produce + flush), output (ack -> read by the bench's consumer). A
separate process measures how late a 1 ms sleep wakes up (the box's scheduling
delay). Prints p50 / p99 of every segment for all events and for the slowest
1%, per variant, and writes everything as JSON (``--json``).

A diagnostic, not a test: the variants are configuration overrides tried on
the scorer and the bench's own clients (see ``VARIANTS``). The scorer's clients
get them as ``ClientSettings``, and are built by that same parameter as clients
that time their calls; the scorer's store, champion and validator are timed by
wrappers handed to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from confluent_kafka import Consumer, Producer
from confluent_kafka import Message as KafkaMessage

from riverflow.assembly import build_scorer, redis_backends, redis_client
from riverflow.cli import endpoints
from riverflow.features.store import (
    Claim,
    FeatureRequest,
    FeatureSnapshot,
    FeatureStore,
)
from riverflow.kafka_runtime import host_settings
from riverflow.models.champion import ChampionReplica
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec
from riverflow.stages.scorer import Scorer
from riverflow.streams.confluent_host import ClientSettings, ConfluentHost
from riverflow.streams.contracts import Message, Output, ServedPrediction
from riverflow.streams.kafka_io import client_config, ensure_topics
from riverflow.streams.schema import EventSchema
from riverflow.streams.validation import Invalid, RecordValidator
from riverflow.tools.bench import PredictionClock, ProcessUsage, paced, stream
from riverflow.tools.stack import Endpoints, local_stack

PROBE = [sys.executable, "-m", "riverflow.tools.latency_probe"]  # its own processes run it too

# the scorer's and the bench's librdkafka overrides, and the scorer's GC handling, per variant
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "nagle": {  # no Nagle on every client's sockets
        "consumer": {"socket.nagle.disable": True},
        "producer": {"socket.nagle.disable": True},
        "bench": {"socket.nagle.disable": True},
    },
    "nolinger": {  # produce at once (linger 0) in scorer and bench
        "producer": {"linger.ms": 0},
        "bench": {"linger.ms": 0},
    },
    "fetch1": {"consumer": {"fetch.wait.max.ms": 1}, "bench_fetch": {"fetch.wait.max.ms": 1}},
    # the scorer freezes its startup heap and then its heap after every batch, as
    # `riverflow run scorer` does (kafka_runtime, HostSettings(freeze_gc=True));
    # before 2026-11-27 09:10 "base" froze neither, until 09:40 only the startup heap
    "startfreeze": {"batch_freeze": False},  # the startup heap only
    "nofreeze": {"gc_freeze": False, "batch_freeze": False},
    "commit100": {"commit_every_s": 0.1},  # offsets committed at most every 100 ms
    "clients": {  # nagle + nolinger + fetch1
        "consumer": {"socket.nagle.disable": True, "fetch.wait.max.ms": 1},
        "producer": {"socket.nagle.disable": True, "linger.ms": 0},
        "bench": {"socket.nagle.disable": True, "linger.ms": 0},
        "bench_fetch": {"socket.nagle.disable": True, "fetch.wait.max.ms": 1},
    },
}


# -- scorer side: the real scorer, its loop timed ------------------------------------


class LoopTrace:
    """The scorer's loop as the probe's clients and wrappers see it: per batch, when it
    was taken, processed and written, and the wall time of every timed call in it."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.phases: dict[str, float] = {}  # the current batch's timed calls, by phase
        self.current: dict[str, Any] = {}

    def add(self, phase: str, since: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.time() - since

    def taking(self, at: float) -> None:
        """The loop polls for its next batch: the one before is closed."""
        self.phases = {}
        self.current = {"t_take0": at}

    def processed(self, batch: Sequence[Message], at: float) -> None:
        self.current.update(
            n=len(batch), first=self.phases.get("poll", 0.0), rest=self.phases.get("consume", 0.0),
            offsets=[(m.partition, m.offset) for m in batch], t_process0=at,
            t_process1=time.time(),
        )  # fmt: skip

    def written(self) -> None:
        """The outputs were flushed (once per batch; a flush at shutdown is not)."""
        if self.current.get("n") and "t_write1" not in self.current:
            # the phases dict stays open: the commit after the write lands in it too
            self.current.update(t_write1=time.time(), phases=self.phases)
            self.batches.append(self.current)


class TimedConsumer(Consumer):
    """The host's consumer, its calls timed into ``trace``. ``commit_every_s`` > 0: offsets
    are committed at most that often (an experiment)."""

    def __init__(
        self, config: dict[str, Any], trace: LoopTrace, commit_every_s: float = 0.0
    ) -> None:
        super().__init__(config)
        self.trace, self.commit_every_s, self._committed = trace, commit_every_s, 0.0

    def poll(self, timeout: float = -1) -> KafkaMessage | None:
        t0 = time.time()
        self.trace.taking(t0)
        try:
            return super().poll(timeout)
        finally:
            self.trace.add("poll", t0)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[KafkaMessage]:
        t0 = time.time()
        try:
            return super().consume(num_messages, timeout)
        finally:
            self.trace.add("consume", t0)
            self.trace.current["t_taken"] = time.time()

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.commit_every_s:
            if time.monotonic() - self._committed < self.commit_every_s:
                return None
            self._committed = time.monotonic()
        t0 = time.time()
        try:
            return super().commit(*args, **kwargs)
        finally:
            self.trace.add("commit", t0)


class TimedProducer(Producer):
    """The host's producer, its calls timed into ``trace``."""

    def __init__(self, config: dict[str, Any], trace: LoopTrace) -> None:
        super().__init__(config)
        self.trace = trace

    def produce(self, *args: Any, **kwargs: Any) -> None:
        t0 = time.time()
        self.trace.current.setdefault("t_write0", t0)
        try:
            super().produce(*args, **kwargs)
        finally:
            self.trace.add("produce", t0)

    def flush(self, timeout: float = -1) -> int:
        t0 = time.time()
        try:
            return super().flush(timeout)
        finally:
            self.trace.add("flush", t0)
            self.trace.written()


class TimedStore:
    """The scorer's feature store; its two calls per batch timed into ``trace``."""

    def __init__(self, inner: FeatureStore, trace: LoopTrace) -> None:
        self.inner, self.trace = inner, trace
        self.batches = inner.batches  # the same counters: the store updates them in place

    def update_and_read(
        self, batch: Sequence[FeatureRequest], commit: bool = True
    ) -> list[FeatureSnapshot]:
        t0 = time.time()
        try:
            return self.inner.update_and_read(batch, commit)
        finally:
            self.trace.add("update", t0)

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> bool:
        t0 = time.time()
        try:
            return self.inner.record_served(served)
        finally:
            self.trace.add("record", t0)

    def claim_labels(
        self,
        event_ids: Sequence[str],
        tokens: Sequence[str],
        known: Sequence[bool],
        stale: Callable[[str], bool],
    ) -> list[Claim]:
        return self.inner.claim_labels(event_ids, tokens, known, stale)

    def mark_orphans(self, event_ids: Sequence[str]) -> None:
        self.inner.mark_orphans(event_ids)

    def release_learned(self, event_ids: Sequence[str], keep_s: float) -> None:
        self.inner.release_learned(event_ids, keep_s)

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        return self.inner.read(entities, at)


class TimedChampion(ChampionReplica):
    """The champion replica, its ``refresh`` timed into ``trace``."""

    def __init__(self, served: ChampionReplica, trace: LoopTrace) -> None:
        # follows the same registry as ``served``, starting from the version it serves
        super().__init__(served.registry, lambda: served.current, served.poll_s, served.clock)
        self.trace = trace

    def refresh(self, force: bool = False) -> bool:
        t0 = time.time()
        try:
            return super().refresh(force)
        finally:
            self.trace.add("refresh", t0)


class TimedValidator(RecordValidator):
    """The scorer's event validator, each call timed into ``trace``."""

    def __init__(self, schema: EventSchema, max_bytes: int, trace: LoopTrace) -> None:
        super().__init__(schema.fields, max_bytes)
        self.trace = trace

    def __call__(self, raw: bytes | None) -> dict[str, Any] | Invalid:
        t0 = time.time()
        try:
            return super().__call__(raw)
        finally:
            self.trace.add("validate", t0)


class TimedProcessor:
    """The scorer as its host runs it; each non-empty batch noted in ``trace``."""

    def __init__(self, inner: Scorer, trace: LoopTrace) -> None:
        self.inner, self.trace, self.stage = inner, trace, inner.stage

    def process(self, batch: Sequence[Message]) -> list[Output]:
        t0 = time.time()
        out = self.inner.process(batch)
        if batch:
            self.trace.processed(batch, t0)
        return out

    def status(self) -> dict[str, float]:
        return self.inner.status()


def run_scorer(trace_path: Path, variant: dict[str, Any]) -> None:
    """The scorer as ``riverflow run scorer`` hosts it on the confluent loop (settings
    from the environment), with the ``variant``'s overrides and every phase timed."""
    settings = Settings()
    spec = load_spec(settings.spec)
    ep = endpoints(settings)
    trace = LoopTrace()
    store, registry = redis_backends(spec, settings, redis_client(settings, ep.redis_url))
    scorer = build_scorer(spec, settings, TimedStore(store, trace), registry)
    scorer.champion = TimedChampion(scorer.champion, trace)
    scorer.validate = TimedValidator(spec.events, settings.max_event_bytes, trace)
    commit_every_s = variant.get("commit_every_s", 0.0)
    clients = ClientSettings(
        consumer=variant.get("consumer", {}), producer=variant.get("producer", {}),
        make_consumer=lambda conf: TimedConsumer(conf, trace, commit_every_s),
        make_producer=lambda conf: TimedProducer(conf, trace),
    )  # fmt: skip
    # as ``riverflow run scorer`` hosts it, but for the variant's choice of freezing
    loop = replace(
        host_settings("scorer", spec, settings, ep, settings.model_poll_s),
        freeze_gc=variant.get("batch_freeze", True),
    )
    host = ConfluentHost(TimedProcessor(scorer, trace), spec.topics.events, loop, clients)

    gcs: list[tuple[float, float, int]] = []
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.time()
        else:
            gcs.append((gc_started[0], time.time() - gc_started[0], info["generation"]))

    gc.callbacks.append(on_gc)
    if variant.get("gc_freeze", True):
        # kafka_runtime.freeze_startup_heap, not imported: that module loads Faust,
        # whose objects would change what the GC variants measure
        gc.collect()
        gc.freeze()
    try:
        host.run()
    finally:
        trace_path.write_bytes(orjson.dumps({"batches": trace.batches, "gc": gcs}))


# -- scheduling delay of the box -----------------------------------------------------


def run_oversleep(out: Path) -> None:
    """Sleep 1 ms in a loop; keep every wake-up later than 2 ms (time, lateness)."""
    late: list[tuple[float, float]] = []
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    n = 0
    while not stop[0]:
        t0 = time.perf_counter()
        time.sleep(0.001)
        over = time.perf_counter() - t0 - 0.001
        n += 1
        if over > 0.002:
            late.append((time.time(), over))
    out.write_bytes(orjson.dumps({"wakeups": n, "late": late}))


# -- driver ----------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def jvm_gc(pid: int) -> dict[str, float]:
    """The broker JVM's collection counts and seconds so far (``jstat -gc``)."""
    done = subprocess.run(["jstat", "-gc", str(pid)], capture_output=True, text=True, check=False)
    lines = done.stdout.split("\n")
    if done.returncode != 0 or len(lines) < 2:
        return {}
    # a collector without some column (ZGC has no young generation) prints "-"
    values = [0.0 if v == "-" else float(v) for v in lines[1].split()]
    return dict(zip(lines[0].split(), values, strict=True))


def measure(
    name: str, variant: dict[str, Any], ep: Endpoints, base_spec: dict[str, Any], workdir: Path,
    rate: int, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    spec_name = f"probe{uuid.uuid4().hex[:6]}"
    spec = PipelineSpec.model_validate({**base_spec, "name": spec_name})
    spec_file = workdir / f"{spec_name}.yaml"
    spec_file.write_text(yaml.safe_dump({**base_spec, "name": spec_name}))
    ensure_topics(ep.kafka_bootstrap, spec.topics.all(), partitions=3)
    trace, sleeps = workdir / f"{spec_name}.trace.json", workdir / f"{spec_name}.sleep.json"
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": ep.redis_url, "RIVERFLOW_SPEC": str(spec_file)}  # fmt: skip
    rds = redis.Redis.from_url(ep.redis_url)
    rds.config_set("latency-monitor-threshold", 5)  # Redis notes every event over 5 ms
    rds.latency_reset()
    scorer = subprocess.Popen([*PROBE, "_scorer", str(trace), json.dumps(variant)], env=env)
    prober = subprocess.Popen([*PROBE, "_oversleep", str(sleeps)])
    clock = PredictionClock(ep.kafka_bootstrap, spec.topics.predictions, variant.get("bench_fetch"))
    prod = Producer({**client_config(ep.kafka_bootstrap), "linger.ms": 1,
                     "enable.idempotence": True, **variant.get("bench", {})})  # fmt: skip
    key = spec.events.key
    acked: dict[str, tuple[float, int, int]] = {}

    def send(events: list[dict[str, Any]], at: float) -> dict[str, float]:
        sent: dict[str, float] = {}
        for e in paced(events, at):
            eid = e["event_id"]

            def on_delivery(err: Any, msg: Any, eid: str = eid) -> None:
                if err is None:
                    acked[eid] = (time.time(), msg.partition(), msg.offset())

            sent[eid] = time.time()
            prod.produce(
                spec.topics.events, orjson.dumps(e), e[key].encode(), on_delivery=on_delivery
            )
            prod.poll(0)
        prod.flush(30)
        return sent

    try:
        warm, _ = stream(int(rate * 3), 5, prefix="w")  # the scorer joins, loads, warms up
        deadline = time.monotonic() + 120
        while not clock.arrivals and time.monotonic() < deadline:
            send(warm[:10], rate)
            time.sleep(0.5)
        clock.wait_for_ids(send(warm, rate), 30)
        events, _ = stream(int(rate * seconds), 7, prefix=f"{name}-")
        jvm0 = jvm_gc(ep.pids["kafka"]) if "kafka" in ep.pids else {}
        usage = {"scorer": ProcessUsage(scorer.pid)} | {
            k: ProcessUsage(v) for k, v in ep.pids.items()
        }
        cpu0 = {k: u.cpu_s() for k, u in usage.items()}
        rds.latency_reset()
        sent = send(events, rate)
        clock.wait_for_ids(sent, 60)
        jvm1 = jvm_gc(ep.pids["kafka"]) if jvm0 else {}
        cpu_us = {k: (u.cpu_s() - cpu0[k]) / len(sent) * 1e6 for k, u in usage.items()}
        # LATENCY LATEST: [event, last time, last ms, max ms] per kind of slow event
        redis_spikes = {e[0].decode(): e[3] for e in rds.execute_command("LATENCY LATEST")}
    finally:
        scorer.send_signal(signal.SIGTERM)
        prober.send_signal(signal.SIGTERM)
        scorer.wait(60)
        prober.wait(10)
        clock.close()
    tr = orjson.loads(trace.read_bytes())
    by_offset: dict[tuple[int, int], dict[str, Any]] = {}
    for b in tr["batches"]:
        for p, o in b["offsets"]:
            by_offset[(p, o)] = b
    rows = []
    for eid, t_sent in sent.items():
        if eid not in clock.arrivals or eid not in acked:
            continue
        t_ack, p, o = acked[eid]
        b = by_offset.get((p, o))
        if b is None:
            continue
        rows.append({
            "t_sent": t_sent, "t_arrived": clock.arrivals[eid],
            "total": clock.arrivals[eid] - t_sent,
            "input_ack": t_ack - t_sent,
            "input": b["t_taken"] - t_sent,
            "queued": b["t_process0"] - b["t_taken"],
            "process": b["t_process1"] - b["t_process0"],
            "write": b["t_write1"] - b["t_write0"],
            "output": clock.arrivals[eid] - b["t_write1"],
        })  # fmt: skip
    rows.sort(key=lambda r: r["total"])
    tail = rows[int(len(rows) * 0.99) :]
    segs = ["total", "input_ack", "input", "queued", "process", "write", "output"]
    result: dict[str, Any] = {"variant": name, "events": len(rows), "sent": len(sent)}
    result["all"] = {
        s: {"p50": _pct([r[s] for r in rows], 0.5), "p99": _pct([r[s] for r in rows], 0.99)}
        for s in segs
    }
    result["slowest_1pct_mean_ms"] = {s: sum(r[s] for r in tail) / len(tail) * 1000 for s in segs}
    window = [b for b in tr["batches"] if b["t_take0"] >= min(sent.values())]
    phases = sorted({k for b in window for k in b["phases"]})
    result["batches"] = len(window)
    result["batch_size_mean"] = sum(b["n"] for b in window) / max(1, len(window))
    result["phases_ms"] = {
        k: {"p50": _pct([b["phases"].get(k, 0.0) for b in window], 0.5),
            "p99": _pct([b["phases"].get(k, 0.0) for b in window], 0.99),
            "max": _pct([b["phases"].get(k, 0.0) for b in window], 1.0)}
        for k in phases
    }  # fmt: skip
    t0, t1 = min(sent.values()), max(clock.arrivals.values())
    window_gc = [(t, d, g) for t, d, g in tr["gc"] if t0 <= t <= t1]
    result["gc"] = {
        f"gen{g}": {"n": len(ds), "max_ms": max(ds, default=0) * 1000, "total_ms": sum(ds) * 1000}
        for g in (0, 1, 2)
        for ds in [[d for _, d, gen in window_gc if gen == g]]
    }
    # how many of the slowest 1% were in flight while the scorer ran a gen-2 collection
    gen2 = [(t, t + d) for t, d, g in window_gc if g == 2]
    result["slowest_1pct_during_gen2"] = sum(
        any(a < r["t_arrived"] and b > r["t_sent"] for a, b in gen2) for r in tail
    )
    sl = orjson.loads(sleeps.read_bytes())
    late = [d for t, d in sl["late"] if t0 <= t <= t1]
    result["oversleep"] = {"wakeups": sl["wakeups"], "late_over_2ms": len(late),
                           "late_over_10ms": sum(d > 0.01 for d in late),
                           "max_ms": max(late, default=0) * 1000}  # fmt: skip
    result["redis_latency_events_over_5ms"] = redis_spikes
    if jvm1:
        young, full = jvm1["YGC"] - jvm0["YGC"], jvm1["FGC"] - jvm0["FGC"]
        result["broker_gc"] = {
            "young": young, "young_s": jvm1["YGCT"] - jvm0["YGCT"], "full": full,
            "full_s": jvm1["FGCT"] - jvm0["FGCT"],
        }  # fmt: skip
    result["load"] = os.getloadavg()
    result["cpu_us_per_event"] = cpu_us  # while the events were sent and came back
    return result


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "_scorer":
        run_scorer(Path(sys.argv[2]), json.loads(sys.argv[3]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "_oversleep":
        run_oversleep(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--spec", default="examples/fraud-bench.yaml")
    ap.add_argument("--json", default="")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of a discarded first run")
    args = ap.parse_args()
    settings = Settings()
    base_spec = load_spec(args.spec).model_dump(mode="json", by_alias=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="riverflow-probe-") as tmp, \
            local_stack(settings, Path(tmp) / "stack") as ep:  # fmt: skip
        if args.warmup:  # a fresh broker's JVM is slow for its first minute
            measure("warmup", {}, ep, base_spec, Path(tmp), args.rate, args.warmup)
        for rnd in range(args.rounds):
            for name in args.variants.split(","):
                r = measure(name, VARIANTS[name], ep, base_spec, Path(tmp), args.rate, args.seconds)
                r["round"] = rnd + 1
                r["broker_jvm"] = settings.kafka_jvm_options
                results.append(r)
                a, s = r["all"], r["slowest_1pct_mean_ms"]
                print(f"[{rnd + 1}] {name}: load {r['load'][0]:.1f}, "
                      f"{r['events']}/{r['sent']} events, {r['batches']} batches of "
                      f"{r['batch_size_mean']:.1f}; total p50 {a['total']['p50']:.1f} "
                      f"p99 {a['total']['p99']:.1f} ms", flush=True)  # fmt: skip
                print("    slowest 1% mean ms: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()))
                print("    segment p50/p99 ms: " + ", ".join(
                    f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in a.items()))  # fmt: skip
                print("    phase p50/p99/max ms: " + ", ".join(
                    f"{k} {v['p50']:.2f}/{v['p99']:.1f}/{v['max']:.1f}"
                    for k, v in r["phases_ms"].items()))  # fmt: skip
                print(
                    f"    gc {r['gc']}; slowest 1% during a gen-2 GC: "
                    f"{r['slowest_1pct_during_gen2']}; oversleep {r['oversleep']}; "
                    f"redis {r['redis_latency_events_over_5ms']}; broker {r.get('broker_gc')}; "
                    f"CPU us/event {r['cpu_us_per_event']}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
