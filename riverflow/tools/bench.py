"""``riverflow bench``: what the pipeline costs, measured in one run on one machine.

1. the limit: River alone, in memory, predict + learn of every candidate of
   the spec (what the learner does per label) on the same events and feature
   values the pipeline computes; also the champion alone, and its predict
   alone (what a scorer does);
2. the embedded runtime end to end (scorer + learner, memory store);
3. the Kafka runtime per host (Faust agent, confluent-kafka loop), scorer as its
   own process on the real broker and Redis: the drain rate of a backlog (an
   upper bound; timed after ``drain_warmup`` events, so that the windows are as
   full as in the paced holds), the maximum sustained rate (searched: paced arrivals held at
   a rate, sustained when the backlog stays bounded, see ``Sustained``), then
   end-to-end latency (produce call -> prediction read by a consumer) at fixed
   offered rates, including 80% of the maximum sustained rate (the bench's producer
   lingers ``LINGER_MS``, or ``BATCHED_LINGER_MS`` from ``BATCHED_FROM_RATE``);
4. two peers on the same broker and Redis, each its own process, their backlog
   drain measured as the scorer's (``riverflow.tools.bench_peers``): **bare**
   (consume -> decode -> champion predict -> produce, no features, no Redis, no
   learner: the transport-plus-model limit) and the **textbook** Faust agent (one
   awaited Redis call per event, as tutorials write it; on fewer events);
5. peak RSS and CPU seconds per million events of every process involved.

Every throughput is reported beside its ratios to the limit and to bare of the
same run (``ratios``): the machine is shared and noisy, ratios within one run are
what compare.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import orjson
import yaml
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer, TopicPartition
from rich.table import Table

from riverflow.embedded import EmbeddedRuntime
from riverflow.features.store import MemoryFeatureStore, feature_request
from riverflow.models.champion import positive_probability
from riverflow.models.factory import build_model
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.kafka_io import client_config, ensure_topics, produce_all, producer
from riverflow.streams.topics import Topics
from riverflow.tools.bench_peers import forget_textbook_state, peer_command
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints, local_stack, stop_processes

CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")
# the bench's producer stands for the user's. It lingers LINGER_MS; a hold from
# BATCHED_FROM_RATE goes through one that lingers BATCHED_LINGER_MS (librdkafka's
# default, as ``kafka_io.producer``'s): at 12,000-20,000/s the 1 ms one cost the broker
# ~10 us an event more on the same two cores (docs/benchmarks.md), while a slow stream's
# events would wait up to 5 ms in the producer, inside the measured latency
LINGER_MS = 1
BATCHED_LINGER_MS = 5
BATCHED_FROM_RATE = 5_000


@dataclass
class ProcessUsage:
    """CPU seconds and peak resident memory of one process, read from /proc."""

    pid: int

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


@dataclass(frozen=True)
class Sustained:
    """When a rate held for a while counts as sustained: the lag stayed bounded.

    The lag is the pipeline's consumer lag as a whole: events offered whose
    prediction was not read yet, sampled four times a second during the hold.
    A scorer short of the rate by d events/s ends a hold of T seconds with
    d x T waiting, so the lag at the end (the median of the samples in the last
    quarter of the hold, so that one stall does not decide) must be at most
    ``max_end_lag_s`` seconds of arrivals. Also: every event came back, the
    paced producer reached ``min_offered`` of the rate (else the harness, not
    the scorer, was the limit), and the hold's p99 end-to-end latency was at
    most ``max_p99_ms`` (a guard: at lag bounded the p99 is noise from the box).
    """

    max_end_lag_s: float = 0.5
    max_p99_ms: float = 1_000.0
    min_offered: float = 0.95

    def holds(self, hold: dict[str, Any]) -> bool:
        rate = hold["rate"]
        return (
            hold["received"] == hold["sent"]
            and hold["offered_per_s"] >= self.min_offered * rate
            and hold["end_lag"] <= self.max_end_lag_s * rate
            and hold["p99_ms"] <= self.max_p99_ms
        )


def search_sustained(
    holds: Callable[[int], bool], first: int, high: int, steps: int
) -> tuple[int, list[int]]:
    """The highest rate below ``high`` that ``holds``, by bisection; and the rates tried.

    ``first`` is tried first, then ``steps`` bisections between the highest rate
    that held (0 before any) and the lowest that did not (``high`` is assumed
    not to hold: pass a rate above capacity, e.g. a little above the drain
    rate). Each rate is tried once: on a noisy machine a rate may fail once and
    hold the next time, so the answer is a lower bound of what the pipeline did.
    """
    best, fail, tried = 0, high, []
    rate = first
    for _ in range(steps + 1):
        if rate <= best or rate >= fail:
            break
        tried.append(rate)
        if holds(rate):
            best = rate
        else:
            fail = rate
        rate = (best + fail) // 2
    return best, tried


@dataclass
class BenchConfig:
    """What to run; the defaults take 8-10 minutes on 2 cores (``quick()``: ~4)."""

    events: int = 100_000  # limit, embedded, and each host's backlog drain
    rates: tuple[int, ...] = (1_000, 5_000)
    rate_seconds: float = 8.0  # each fixed-rate latency point
    hosts: tuple[str, ...] = ("faust", "confluent")
    # at_least_once, exactly_once or both: "both" adds two drains of the confluent scorer,
    # exactly once then at least once again (the cost of transactions, beside the noise)
    guarantee: str = "at_least_once"
    seed: int = 11
    hold_seconds: float = 12.0  # each rate tried by the sustained search
    # paced, at the search's first rate, before it (not judged): for its first ~10 s of
    # paced traffic the freshly started broker took 80-100% of a core against 20-45%
    # later at the same rates (JIT warm-up; docs/benchmarks.md), and starved the scorer
    warmup_seconds: float = 15.0
    search_steps: int = 4  # bisections after the first rate
    search_first: float = 0.5  # the first rate tried, as a fraction of the drain rate
    search_high: float = 1.1  # the search's upper bound, same
    sustained: Sustained = field(default_factory=Sustained)
    peers: bool = True  # the bare and textbook rows (``riverflow.tools.bench_peers``)
    textbook_events: int = 5_000  # its drain: ~500/s, so about ten seconds
    slates: bool = True  # the recommendation row (``riverflow.tools.bench_slates``)
    # events a host's scorer drains before the timed drain (None: the spec's longest
    # window of event time, at most ``MAX_DRAIN_WARMUP``): the timed drain then runs on
    # entity states as full as those of the paced holds after it, which the search's
    # ratio compares it to (a card's fraud-bench state is ~520 B while its 24 h windows
    # fill, ~820 B once full; docs/benchmarks.md)
    drain_warmup: int | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A shorter run: fewer events, shorter holds, fewer search steps."""
        base: dict[str, Any] = {"events": 30_000, "rate_seconds": 5.0, "hold_seconds": 6.0,
                                "search_steps": 3}  # fmt: skip
        return cls(**{**base, **overrides})


@dataclass
class BenchResult:
    """Figures of one run; ``as_dict`` is what ``--json`` writes."""

    machine: dict[str, Any]
    spec: dict[str, Any]
    limit: dict[str, float] = field(default_factory=dict)
    embedded: dict[str, float] = field(default_factory=dict)
    kafka: dict[str, dict[str, Any]] = field(default_factory=dict)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)  # "bare", "textbook"
    slates: dict[str, Any] = field(default_factory=dict)  # the recommendation row

    def throughputs(self) -> dict[str, float]:
        """Every events/s figure of the run, by row (the keys of ``ratios``)."""
        rates = {
            "limit": self.limit["predict_learn_events_per_s"],
            "predict_only": self.limit["predict_only_events_per_s"],
        }
        if "champion_predict_learn_events_per_s" in self.limit:  # (not in older figures)
            rates["champion"] = self.limit["champion_predict_learn_events_per_s"]
        if self.embedded:
            rates["embedded"] = self.embedded["events_per_s"]
        for host, fig in self.kafka.items():
            rates[f"{host}: drain"] = fig["drain_events_per_s"]
            if "max_sustained_events_per_s" in fig:
                rates[f"{host}: max sustained"] = fig["max_sustained_events_per_s"]
        for peer, fig in self.peers.items():
            rates[peer] = fig["drain_events_per_s"]
        return rates

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """Each row's events/s divided by the limit's and by bare's (None without bare)."""
        rates = self.throughputs()
        limit, bare = rates["limit"], rates.get("bare")
        return {
            row: {"to_limit": rate / limit, "to_bare": rate / bare if bare else None}
            for row, rate in rates.items()
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "spec": self.spec,
            "limit": self.limit,
            "embedded": self.embedded,
            "kafka": self.kafka,
            "peers": self.peers,
            "slates": self.slates,
            "ratios": self.ratios(),
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    """Latencies in seconds -> p50, p95, p99, p99.9 and max in ms (nearest rank)."""
    if not values:
        nan = float("nan")
        return {"p50_ms": nan, "p95_ms": nan, "p99_ms": nan, "p999_ms": nan}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),  # over 1,000 samples at least to mean more than the max
        "max_ms": ordered[-1] * 1000,
    }


def stream(
    n: int, seed: int, prefix: str = "", start_ts: float | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``n`` generated events and their labels, event ids made unique by ``prefix``;
    event times from ``start_ts`` (default: the generator's)."""
    events: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    config = FraudStreamConfig(seed=seed, drift_at=(n // 2,))
    if start_ts is not None:
        config = replace(config, start_ts=start_ts)
    for kind, rec in with_labels(n, config):
        rec = {**rec, "event_id": prefix + rec["event_id"]}
        (events if kind == "event" else labels).append(rec)
    return events, labels


def measure_limit(
    spec: PipelineSpec, events: list[dict[str, Any]], labels: list[dict[str, Any]]
) -> dict[str, float]:
    """River alone on the inputs the scorer would give it (features computed untimed):
    predict + learn of every candidate of the spec, as the learner does for each
    label (the limit); of the champion alone; and the champion's predict alone,
    what a scorer does."""
    plan = spec.feature_plan()
    store = MemoryFeatureStore(plan)
    inputs = spec.models.inputs
    snaps = store.update_and_read(
        [
            feature_request(plan, e, e["event_id"], e[spec.events.time],
                            orjson.dumps({name: e[name] for name in inputs}))
            for e in events
        ]
    )  # fmt: skip
    truth = {lab["event_id"]: lab[spec.label.field] for lab in labels}
    xs = [({**s.inputs, **plan.values(s.aggregates)}, truth[s.event_id]) for s in snaps]
    models: list[Any] = [build_model(c) for c in spec.models.candidates]
    t0 = time.perf_counter()
    for x, y in xs:
        for candidate in models:
            positive_probability(candidate, x)
            candidate.learn_one(x, y)
    all_s = time.perf_counter() - t0
    model: Any = build_model(spec.models.champion_spec)
    t0 = time.perf_counter()
    for x, y in xs:
        positive_probability(model, x)
        model.learn_one(x, y)
    learn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x, _ in xs:
        positive_probability(model, x)
    predict_s = time.perf_counter() - t0
    return {
        "predict_learn_events_per_s": len(xs) / all_s,
        "candidates": float(len(models)),
        "champion_predict_learn_events_per_s": len(xs) / learn_s,
        "predict_only_events_per_s": len(xs) / predict_s,
    }


def measure_embedded(
    spec: PipelineSpec, settings: Settings, events: list[dict[str, Any]],
    labels: list[dict[str, Any]],
) -> dict[str, float]:  # fmt: skip
    rt = EmbeddedRuntime(
        spec, settings.model_copy(update={"snapshot_every_labels": 0, "label_wait_s": 0}),
        retain=(),
    )  # fmt: skip
    for e in events:
        rt.produce(rt.topics.events, e[spec.events.key].encode(), orjson.dumps(e))
    for lab in labels:
        rt.produce(rt.topics.labels, lab["event_id"].encode(), orjson.dumps(lab))
    me = ProcessUsage(os.getpid())
    cpu0, t0 = me.cpu_s(), time.perf_counter()
    rt.drain()
    seconds = time.perf_counter() - t0
    return {
        "events_per_s": len(events) / seconds,
        "cpu_s_per_million": (me.cpu_s() - cpu0) / len(events) * 1e6,
    }


class TopicWatch:
    """Reads a topic in a thread (from its end, or its start with ``from_start``),
    handing each record, decoded, to ``seen`` with the wall time it arrived.

    ``config``: librdkafka settings laid over the reading consumer's own.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        config: Mapping[str, Any] | None = None,
        from_start: bool = False,
    ) -> None:
        self._stop = threading.Event()
        self._consumer = Consumer(
            {**client_config(bootstrap), "group.id": f"bench-{uuid.uuid4().hex}",
             "enable.auto.commit": False, **(config or {})}
        )  # fmt: skip
        meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
        at = OFFSET_BEGINNING if from_start else OFFSET_END
        self._consumer.assign([TopicPartition(topic, p, at) for p in meta.partitions])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def seen(self, record: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        loads = orjson.loads
        while not self._stop.is_set():
            # consume(n, timeout) would wait for n messages: poll one, then drain the rest
            first = self._consumer.poll(0.05)
            if first is None:
                continue
            now = time.time()
            for msg in [first, *self._consumer.consume(1000, timeout=0)]:
                value = msg.value()
                if msg.error() is None and value is not None:
                    self.seen(loads(value), now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


class PredictionClock(TopicWatch):
    """Notes when each event id's prediction arrives, and when it was scored."""

    def __init__(self, bootstrap: str, topic: str, config: Mapping[str, Any] | None = None) -> None:
        self.arrivals: dict[str, float] = {}
        self.scored: dict[str, float] = {}  # the scorer's clock when it scored the event
        super().__init__(bootstrap, topic, config)

    def seen(self, record: dict[str, Any], now: float) -> None:
        self.arrivals[record["event_id"]] = now
        self.scored[record["event_id"]] = record["scored_at"]

    def wait_for_ids(self, ids: dict[str, float], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(i not in self.arrivals for i in ids):
            time.sleep(0.05)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.arrivals) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def paced(records: list[T], rate: float) -> Iterator[T]:
    """Yield records at ``rate`` per second (in 1 ms slices)."""
    start = time.perf_counter()
    for i, rec in enumerate(records):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0.0005:
            time.sleep(delay)
        yield rec


class GcPauses:
    """The garbage collector's pauses in this process while it is ``watch``-ing."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._started = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    @contextmanager
    def watch(self) -> Iterator[None]:
        gc.callbacks.append(self._on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self._on_gc)

    def max_ms(self) -> float:
        return max((s for _, s in self.pauses), default=0.0) * 1000


def fraud_events(n: int, seed: int, prefix: str, start_ts: float | None) -> list[dict[str, Any]]:
    """``n`` events of the fraud stream (``stream``), without their labels."""
    return stream(n, seed, prefix=prefix, start_ts=start_ts)[0]


def offer(
    prod: Producer, clock: PredictionClock, topic: str, key: str, rate: int, seconds: float,
    seed: int, prefix: str, start_ts: float | None = None,
    make: Callable[[int, int, str, float | None], list[dict[str, Any]]] = fraud_events,
    ids: tuple[str, str] = ("event_id", "ts"),
) -> dict[str, Any]:  # fmt: skip
    """Send ``rate`` events/s for ``seconds``, wait for their predictions, and measure
    latency and lag (see ``Sustained``). Event times start at ``start_ts``; the row's
    ``last_ts`` is the newest sent. ``make``: the events (default: the fraud stream's);
    ``ids``: their id and time fields."""
    n = max(1, int(rate * seconds))
    batch = make(n, seed, prefix, start_ts)
    id_field, time_field = ids
    records = [(topic, e[key].encode(), orjson.dumps(e), e[id_field]) for e in batch]
    sent: dict[str, float] = {}
    lags: list[int] = []
    every = max(1, rate // 4)
    returned0 = len(clock.arrivals)  # every earlier event came back (or was given up on)
    driver_gc = GcPauses()
    with driver_gc.watch():
        t_start = time.perf_counter()
        for i, (topic_, k, value, event_id) in enumerate(paced(records, rate)):
            sent[event_id] = time.time()
            while True:
                try:
                    prod.produce(topic_, value, k)
                    break
                except BufferError:
                    prod.poll(0.001)
            prod.poll(0)
            if i % every == every - 1:
                lags.append(i + 1 - (len(clock.arrivals) - returned0))
        offered = n / (time.perf_counter() - t_start)
        prod.flush(30)
        clock.wait_for_ids(sent, 60)
    lat = [clock.arrivals[e] - t for e, t in sent.items() if e in clock.arrivals]
    to_scorer = [clock.scored[e] - t for e, t in sent.items() if e in clock.scored]
    last_quarter = sorted(lags[len(lags) * 3 // 4 :]) or [n]
    return {
        "rate": rate, "seconds": seconds, "offered_per_s": offered, "sent": n,
        "received": len(lat), "end_lag": last_quarter[len(last_quarter) // 2],
        "max_lag": max(lags, default=0), **_percentiles(lat),
        "until_scored_p50_ms": _percentiles(to_scorer)["p50_ms"],
        "bench_gc_max_ms": driver_gc.max_ms(), "last_ts": batch[-1][time_field],
    }  # fmt: skip


def renamed_spec_file(spec: PipelineSpec, workdir: Path, name: str) -> Path:
    """``spec`` renamed ``name`` (so its own topics and keys), written to
    ``workdir/{name}.yaml`` for a stage process to load; the file's path. Callers make
    ``name`` unique, so a run never reads another run's topics."""
    data = spec.model_dump(mode="json", by_alias=True)
    data["name"] = name
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def produce_backlog(bootstrap: str, topic: str, key: str, events: list[dict[str, Any]]) -> Producer:
    """``events`` produced to ``topic`` (keyed by their field ``key``) and
    acknowledged, so a drain starts on the whole backlog; the producer, to send more
    (flushed by the caller)."""
    prod = producer(bootstrap, **{"linger.ms": LINGER_MS})
    produce_all(prod, ((topic, e[key].encode(), orjson.dumps(e)) for e in events))
    return prod


def drain_rate(
    what: str, proc: subprocess.Popen[bytes], clock: PredictionClock, n: int,
    servers: Mapping[str, ProcessUsage], logfile: Path, warmup: int = 0,
) -> dict[str, float]:  # fmt: skip
    """The rate at which ``what`` (``proc``, started on a backlog of ``n`` events)
    returned their predictions (``drain_events_per_s``), and the CPU it and each of
    ``servers`` spent per million events (``cpu_s_per_million``,
    ``{server}_cpu_s_per_million``), from when the first ``warmup`` predictions (at
    least one) had come to the last; the warm-up's own rate is
    ``warmup_events_per_s``. ``RuntimeError`` naming ``what`` (with the end of
    ``logfile``) if it produces nothing within 2 minutes or stalls."""
    usage = ProcessUsage(proc.pid)
    deadline = time.monotonic() + 120
    while not clock.wait_for(1, 1):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace").splitlines()[-15:]  # the workdir goes
            raise RuntimeError(f"{what} produced nothing; the end of its log:\n" + "\n".join(tail))
    began = min(clock.arrivals.values())
    if warmup > 1 and not clock.wait_for(warmup, 600):
        raise RuntimeError(f"{what} stalled at {len(clock.arrivals)} of {n} predictions")
    cpu0 = usage.cpu_s()
    server_cpu0 = {server: u.cpu_s() for server, u in servers.items()}
    # the predictions taken so far, and when the last of them came (the timed drain's
    # start: the reader takes them in polls, so they come in bunches)
    warmed, first = len(clock.arrivals), max(clock.arrivals.values())
    if not clock.wait_for(n, 600):
        raise RuntimeError(f"{what} stalled at {len(clock.arrivals)} of {n} predictions")
    last = max(clock.arrivals.values())
    drained = n - warmed
    if last <= first:  # the reader took every timed prediction in one poll
        raise RuntimeError(f"{what}: {n - warmup} events are too few to time a drain")
    out = {
        "drain_events_per_s": drained / (last - first),
        "cpu_s_per_million": (usage.cpu_s() - cpu0) / drained * 1e6,
    }
    if warmup > 1 and first > began:
        out["warmup_events_per_s"] = (warmed - 1) / (first - began)
    for server, u in servers.items():
        out[f"{server}_cpu_s_per_million"] = (u.cpu_s() - server_cpu0[server]) / drained * 1e6
    return out


MAX_DRAIN_WARMUP = 200_000  # events


def drain_warmup(spec: PipelineSpec, cfg: BenchConfig) -> int:
    """Events drained before a host's timed drain (``BenchConfig.drain_warmup``): by
    default the spec's longest tile window of the bench stream's event time (one
    event a second on average), at most ``MAX_DRAIN_WARMUP``."""
    if cfg.drain_warmup is not None:
        return cfg.drain_warmup
    longest = max((g.window_s for g in spec.feature_plan().groups), default=0.0)
    return min(MAX_DRAIN_WARMUP, math.ceil(longest / FraudStreamConfig().mean_gap_s))


def measure_host(
    host: str, spec: PipelineSpec, ep: Endpoints, cfg: BenchConfig, workdir: Path,
    server_pids: dict[str, int], log: Callable[[str], None],
    guarantee: str = "at_least_once", drain_only: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Drain rate, maximum sustained rate, latency at fixed rates, CPU and RSS of a
    scorer on ``host`` with ``guarantee`` (``drain_only``: the drain alone)."""
    name = f"bench-{host}-{uuid.uuid4().hex[:6]}"
    spec_file = renamed_spec_file(spec, workdir, name)
    topics = Topics(name)
    ensure_topics(ep.kafka_bootstrap, topics.all(), partitions=3)
    warm = drain_warmup(spec, cfg)
    events, _ = stream(warm + cfg.events, cfg.seed, prefix="d")
    key = spec.events.key
    prod = produce_backlog(ep.kafka_bootstrap, topics.events, key, events)
    # each paced run goes on in event time from the one before, as a live stream does
    # (restarting at the drain's first time made every entity see hours-late events)
    newest = [events[-1]["ts"]]
    del events
    env = {
        **os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
        "RIVERFLOW_REDIS_URL": ep.redis_url, "RIVERFLOW_SPEC": str(spec_file),
        "RIVERFLOW_HOST": host, "RIVERFLOW_BATCH_TIMEOUT_S": "0.002", "RIVERFLOW_METRICS_PORT": "0",
        "RIVERFLOW_PROCESSING_GUARANTEE": guarantee, "RIVERFLOW_INSTANCE_ID": f"{name}-0",
    }  # fmt: skip
    clock = PredictionClock(ep.kafka_bootstrap, topics.predictions)
    logpath = workdir / f"{name}.log"
    logfile = logpath.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "riverflow.cli", "run", "scorer"], env=env,
        stdout=logfile, stderr=subprocess.STDOUT,
    )  # fmt: skip
    usage = ProcessUsage(proc.pid)
    servers = {name: ProcessUsage(pid) for name, pid in server_pids.items()}
    out: dict[str, Any] = {}
    seeds = iter(range(cfg.seed + 1, cfg.seed + 1000))
    try:
        out.update(drain_rate(f"{host} scorer", proc, clock, warm + cfg.events, servers,
                              logpath, warm))  # fmt: skip
        out["drain_warmup_events"] = warm
        drain = out["drain_events_per_s"]
        young = out.get("warmup_events_per_s")
        log(f"{host} ({guarantee}): drained {cfg.events:,} at {drain:,.0f} events/s"
            + (f", after {warm:,} at {young:,.0f}/s" if young else ""))  # fmt: skip
        if drain_only:
            out["peak_rss_mb"] = usage.peak_rss_mb()
            return out
        gc.collect()  # what the drain left behind; then the bench's heap is out of the way
        gc.freeze()
        batched = producer(ep.kafka_bootstrap, **{"linger.ms": BATCHED_LINGER_MS})

        def held(rate: int, seconds: float, what: str) -> dict[str, Any]:
            # CPU per event of the scorer and the servers over the hold: on a shared box
            # a hold can fail for want of CPU share at a cost per event the drain had
            cpu0 = {"scorer": usage.cpu_s(), **{n: u.cpu_s() for n, u in servers.items()}}
            fast = rate >= BATCHED_FROM_RATE
            row = offer(batched if fast else prod, clock, topics.events, key, rate, seconds,
                        next(seeds), what, start_ts=newest[0] + 1.0)  # fmt: skip
            row["producer_linger_ms"] = BATCHED_LINGER_MS if fast else LINGER_MS
            newest[0] = row["last_ts"]
            for n, u in (("scorer", usage), *servers.items()):
                row[f"{n}_cpu_us"] = (u.cpu_s() - cpu0[n]) / row["sent"] * 1e6
            row["sustained"] = cfg.sustained.holds(row)
            verdict = "sustained" if row["sustained"] else "not sustained"
            log(f"{host}: {rate:,}/s for {seconds:.0f} s: offered {row['offered_per_s']:,.0f}/s, "
                f"lag at end {row['end_lag']:,}, p50 {row['p50_ms']:.1f} ms, "
                f"p99 {row['p99_ms']:.1f} ms, CPU us/event scorer {row['scorer_cpu_us']:.0f}"
                + "".join(f", {n} {row[f'{n}_cpu_us']:.0f}" for n in servers)
                + f": {verdict}")  # fmt: skip
            return row

        holds: list[dict[str, Any]] = []

        def try_rate(rate: int) -> bool:
            holds.append(held(rate, cfg.hold_seconds, f"s{len(holds)}-"))
            return bool(holds[-1]["sustained"])

        first = int(drain * cfg.search_first)
        # not judged: the first paced seconds after the drain ran slow in trials
        # (p50 0.5 s at a rate that held later), which would cap the whole search
        warmup = held(first, cfg.warmup_seconds, "w-") if cfg.warmup_seconds else None
        best, _ = search_sustained(try_rate, first, int(drain * cfg.search_high), cfg.search_steps)
        out["max_sustained_events_per_s"] = best
        out["search"] = {"criterion": asdict(cfg.sustained), "warmup": warmup, "holds": holds}
        log(f"{host}: max sustained {best:,} events/s")
        out["latency"] = {}
        # slowest first: a rate above capacity leaves a backlog, which must not precede another
        for i, rate in enumerate(sorted({*cfg.rates, int(best * 0.8)})):
            if rate > 0:
                out["latency"][str(rate)] = held(rate, cfg.rate_seconds, f"r{i}-")
        out["peak_rss_mb"] = usage.peak_rss_mb()
        for server, u in servers.items():
            out[f"{server}_peak_rss_mb"] = u.peak_rss_mb()
    finally:
        gc.unfreeze()
        stop_processes([proc])
        clock.close()
        logfile.close()
    return out


def measure_peer(
    peer: str, spec: PipelineSpec, ep: Endpoints, events: list[dict[str, Any]],
    workdir: Path, server_pids: dict[str, int], name: str = "",
) -> dict[str, Any]:  # fmt: skip
    """The backlog drain, CPU and peak RSS of ``peer`` (``riverflow.tools.bench_peers``)
    started on ``events`` waiting in a topic, as the scorer's drain is measured.

    ``name``: of its topics and consumer group (default: a new one)."""
    name = name or f"bench-{peer}-{uuid.uuid4().hex[:6]}"
    spec_file = renamed_spec_file(spec, workdir, name)
    topics = Topics(name)
    ensure_topics(ep.kafka_bootstrap, [topics.events, topics.predictions], partitions=3)
    produce_backlog(ep.kafka_bootstrap, topics.events, spec.events.key, events)
    clock = PredictionClock(ep.kafka_bootstrap, topics.predictions)
    logpath = workdir / f"{name}.log"
    cmd = peer_command(peer, spec_file, ep.kafka_bootstrap, topics.events, topics.predictions,
                       name, ep.redis_url, workdir / f"{name}-data")  # fmt: skip
    with logpath.open("wb") as logfile:
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)
    servers = {server: ProcessUsage(pid) for server, pid in server_pids.items()}
    try:
        out: dict[str, Any] = {"events": len(events)}
        out.update(drain_rate(f"the {peer} peer", proc, clock, len(events), servers, logpath))
        out["peak_rss_mb"] = ProcessUsage(proc.pid).peak_rss_mb()
        for server, u in servers.items():
            out[f"{server}_peak_rss_mb"] = u.peak_rss_mb()
    finally:
        stop_processes([proc])
        clock.close()
        if peer == "textbook":
            forget_textbook_state(ep.redis_url, name)
    return out


def run_bench(
    spec: PipelineSpec, cfg: BenchConfig, settings: Settings, log: Callable[[str], None] = print
) -> BenchResult:
    """Run every part; servers from the settings, or a local stack started for the run."""
    result = BenchResult(
        machine={
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d"),
        },
        spec={
            "name": spec.name,
            "features": len(spec.features),
            "model": spec.models.champion_spec.estimator.class_path,
            "events": cfg.events,
        },
    )
    events, labels = stream(cfg.events, cfg.seed)
    result.limit = measure_limit(spec, events, labels)
    log(
        f"limit: {result.limit['predict_learn_events_per_s']:,.0f} events/s "
        "(predict + learn, every candidate)"
    )
    result.embedded = measure_embedded(spec, settings, events, labels)
    log(f"embedded: {result.embedded['events_per_s']:,.0f} events/s")
    hosts = [h for h in cfg.hosts if h not in ("", "none")]
    if not hosts and not cfg.peers and not cfg.slates:  # (nothing needs a stack)
        return result
    with tempfile.TemporaryDirectory(prefix="riverflow-bench-") as tmp:
        workdir = Path(tmp)
        with local_stack(settings, workdir / "stack") as ep:
            if cfg.peers:  # the hosts' events (their ids unprefixed: the peers' own topics)
                result.peers["bare"] = measure_peer("bare", spec, ep, events, workdir, ep.pids)
                log(f"bare: drained {cfg.events:,} at "
                    f"{result.peers['bare']['drain_events_per_s']:,.0f} events/s")  # fmt: skip
            for host in hosts:
                if cfg.guarantee != "exactly_once":
                    result.kafka[host] = measure_host(host, spec, ep, cfg, workdir, ep.pids, log)
            if cfg.guarantee != "at_least_once" and "confluent" in hosts:
                drains = ["exactly_once"] + (["at_least_once"] if cfg.guarantee == "both" else [])
                for guarantee in drains:
                    result.kafka[f"confluent, {guarantee}"] = measure_host(
                        "confluent", spec, ep, cfg, workdir, ep.pids, log, guarantee, True
                    )
            if cfg.peers and cfg.textbook_events > 0:
                n = min(cfg.textbook_events, cfg.events)
                result.peers["textbook"] = measure_peer(
                    "textbook", spec, ep, events[:n], workdir, ep.pids
                )
                log(f"textbook Faust agent: drained {n:,} at "
                    f"{result.peers['textbook']['drain_events_per_s']:,.0f} events/s")  # fmt: skip
            if cfg.slates:
                from riverflow.tools.bench_slates import SlateBench, measure_slates

                slates = SlateBench(seed=cfg.seed, seconds=cfg.rate_seconds,
                                    warmup_seconds=cfg.warmup_seconds)  # fmt: skip
                result.slates = measure_slates(ep, workdir, slates, ep.pids, log)
    return result


COLUMNS = (
    "what", "events/s", "÷ limit", "÷ bare", "CPU s / M events", "peak RSS MB",
    "p50 / p99 / p99.9 ms",
)  # fmt: skip


def _cpu(fig: Mapping[str, Any]) -> str:
    """A process's CPU per million events (+ each server's during the same drain)."""
    servers = ", ".join(
        f"{k.split('_')[0]} {v:,.0f}"
        for k, v in fig.items()
        if k.endswith("_cpu_s_per_million") and k != "cpu_s_per_million"
    )
    return f"{fig['cpu_s_per_million']:,.0f}" + (f" (+ {servers})" if servers else "")


def report(result: BenchResult) -> Table:
    """The run as a table, every throughput beside its ratios to the limit and to bare."""
    rates, ratios = result.throughputs(), result.ratios()
    spec = result.spec
    title = f"riverflow bench: {spec['events']:,} events, {spec['features']} features"
    table = Table(title=f"{title}, {spec['model']}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "what" else "right")

    def rate_row(row: str, what: str, cpu: str = "", rss: str = "") -> None:
        to_bare = ratios[row]["to_bare"]
        table.add_row(what, f"{rates[row]:,.0f}", f"{ratios[row]['to_limit']:.2f}",
                      "" if to_bare is None else f"{to_bare:.2f}", cpu, rss, "")  # fmt: skip

    rate_row("limit", "River alone: predict + learn, every candidate (the limit)")
    if "champion" in rates:
        rate_row("champion", "River alone: predict + learn, the champion")
    rate_row("predict_only", "River alone: predict only")
    if "bare" in result.peers:
        bare = result.peers["bare"]
        rate_row("bare", "bare: consume → decode → champion predict → produce, drain",
                 _cpu(bare), f"{bare['peak_rss_mb']:,.0f}")  # fmt: skip
    if result.embedded:
        rate_row("embedded", "embedded, scorer + learner + monitor",
                 f"{result.embedded['cpu_s_per_million']:,.0f}")  # fmt: skip
    for host, fig in result.kafka.items():
        warm = fig.get("drain_warmup_events")
        after = f" after {warm:,} not timed (full windows)" if warm else ""
        rate_row(f"{host}: drain", f"Kafka scorer on {host}: backlog drain{after}", _cpu(fig),
                 f"{fig['peak_rss_mb']:,.0f}")  # fmt: skip
        if "warmup_events_per_s" in fig:
            table.add_row(f"  the first {warm:,} (windows filling)",
                          f"{fig['warmup_events_per_s']:,.0f}", "", "", "", "", "")  # fmt: skip
        if "search" not in fig:  # a drain alone (--guarantee)
            continue
        tried = ", ".join(
            f"{h['rate']:,}{'+' if h['sustained'] else '-'}" for h in fig["search"]["holds"]
        )
        rate_row(f"{host}: max sustained", f"  max sustained (tried {tried})")
        for rate, row in fig["latency"].items():
            p999 = row.get("p999_ms", float("nan"))  # (figures written before it had one)
            lat = f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f} / {p999:.1f}"
            back = f"{row['received']:,}/{row['sent']:,} back"
            bounded = "lag bounded" if row["sustained"] else "lag grows"
            what = f"  {host} at {int(rate):,}/s ({back}, {bounded})"
            table.add_row(what, f"{row['offered_per_s']:,.0f}", "", "", "", "", lat)
    if "textbook" in result.peers:
        book = result.peers["textbook"]
        rate_row("textbook", f"textbook Faust agent, Redis call per event ({book['events']:,}), "
                 "drain", _cpu(book), f"{book['peak_rss_mb']:,.0f}")  # fmt: skip
    if result.slates:
        sl = result.slates
        table.add_row(
            f"recsys scorer, slates of {sl['slate']}: drain (requests/s; "
            f"{sl['drain_items_per_s']:,.0f} items/s)",
            f"{sl['drain_requests_per_s']:,.0f}", "", "",
            f"{sl['cpu_s_per_million_requests']:,.0f} / M requests",
            f"{sl['peak_rss_mb']:,.0f}", "",
        )  # fmt: skip
        for rate, row in sl["latency"].items():
            lat = f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f} / {row['p999_ms']:.1f}"
            back = f"{row['received']:,}/{row['sent']:,} back"
            bounded = {True: ", lag bounded", False: ", lag grows"}.get(row.get("sustained"), "")
            what = f"  recsys at {int(rate):,} requests/s ({back}{bounded})"
            table.add_row(what, f"{row['offered_per_s']:,.0f}", "", "", "", "", lat)
    return table
