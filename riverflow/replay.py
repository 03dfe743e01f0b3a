"""Backtesting: the production pipeline run over a file of your own history.

``replay`` feeds events and labels, in the order of their timestamps, through
the embedded runtime (the same scorer, learner and monitor as on Kafka) and
writes every record the stages produce: predictions, evaluations, model-events
(every decision) and dead letters, one JSON document a line.

A replay depends on its input only. Every stage goes by one clock, the replay's
event time: the newest timestamp fed so far. So a prediction's ``scored_at``, a
label's wait for its event (``label_wait_s``), snapshots every
``snapshot_every_s``, the monitor's decisions and the registry's stamps are the
same on any machine, however fast it runs. A label's delay is the difference of
its timestamp and its event's: a label is fed once every record before its time
is in. Records are fed in batches of at most ``batch_size`` records and one
second of event time (``BATCH_SPAN_S``), and every stage drains each batch
before the next: the batching is the input's, not the machine's.

A line that cannot be placed in time (not JSON, no time field, a time that is
not a number) is fed at the time of the record before it, in file order: an
event then goes to the dead-letter file with the reason, as it would on Kafka,
and a label is judged by the learner's own checks. Nothing else is lost.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import orjson

from riverflow.embedded import EmbeddedRuntime
from riverflow.errors import RiverflowError
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import Output

OUTPUT_FILES = ("predictions", "evaluations", "model-events", "dlq")
# a batch holds at most ``batch_size`` records and this much event time: a record
# is processed at most this long (in event time) after it came, as a live stage would
BATCH_SPAN_S = 1.0


class Fed(NamedTuple):
    """One line of input, placed in time."""

    ts: float
    kind: int  # 0: an event, 1: a label (an event comes before a label of the same time)
    seq: int  # its line in its file: the order among records of the same time
    key: bytes | None
    raw: bytes


@dataclass
class ReplayResult:
    """What a replay read and wrote."""

    events: int = 0
    labels: int = 0
    unplaced: int = 0  # lines fed at the time of the record before them
    written: Counter[str] = field(default_factory=Counter)  # records per output file
    first_ts: float | None = None
    last_ts: float | None = None
    champion: tuple[str, int] | None = None  # served at the end
    seconds: float = 0.0  # wall time the replay took


class ReplayClock:
    """The replay's event time: the newest timestamp fed so far."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ts: float) -> None:
        self.now = max(self.now, ts)


def _placed(
    lines: Iterable[bytes], time_field: str, key_field: str | None, kind: int, counts: Counter[str]
) -> Iterator[Fed]:
    """Each non-blank line with its time (or the time of the line before it)."""
    last = -math.inf
    for seq, line in enumerate(lines):
        raw = line.rstrip(b"\r\n")
        if not raw.strip():
            continue
        key: bytes | None = None
        try:
            record = orjson.loads(raw)
            ts = record[time_field]
            if type(ts) not in (int, float) or not math.isfinite(ts):
                raise TypeError(time_field)
            if key_field is not None and isinstance(record.get(key_field), str):
                key = record[key_field].encode()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            counts["unplaced"] += 1
            ts = last if last > -math.inf else 0.0
        last = max(last, float(ts))
        yield Fed(float(ts), kind, seq, key, raw)


def replay_records(
    spec: PipelineSpec,
    events: Iterable[bytes],
    labels: Iterable[bytes],
    sink: Callable[[Output], None],
    settings: Settings | None = None,
    label_time: str = "ts",
    batch_span_s: float = BATCH_SPAN_S,
) -> ReplayResult:
    """Replay ``events`` and ``labels`` (JSON lines, as bytes) through the pipeline of
    ``spec``; every record a stage writes goes to ``sink``. ``label_time``: the labels'
    time field (epoch seconds). ``batch_span_s``: the most event time one batch spans
    (a sparse history replays faster with more, at the cost of a coarser clock)."""
    settings = settings or Settings()
    started = time.perf_counter()
    result = ReplayResult()
    counts: Counter[str] = Counter()
    clock = ReplayClock()

    def written(outputs: list[Output]) -> None:
        for o in outputs:
            sink(o)

    rt = EmbeddedRuntime(spec, settings, retain=(), clock=clock, on_output=written)
    topics = spec.topics
    timeline = heapq.merge(
        _placed(events, spec.events.time, spec.events.key, 0, counts),
        _placed(labels, label_time, spec.label.event_id, 1, counts),
    )
    fed, batch, batch_start = 0, 0, 0.0
    for item in timeline:
        if batch and (batch >= settings.batch_size or item.ts - batch_start > batch_span_s):
            while rt.step():  # what came in this batch's span, processed before what follows
                pass
            batch = 0
        if batch == 0:
            batch_start = item.ts
        if item.kind == 0:
            result.events += 1
            rt.produce(topics.events, item.key, item.raw)
        else:
            result.labels += 1
            rt.produce(topics.labels, item.key, item.raw)
        clock.advance(item.ts)
        result.first_ts = item.ts if result.first_ts is None else min(result.first_ts, item.ts)
        fed += 1
        batch += 1
    while rt.step():
        pass
    # labels still waiting for an event that never came: their wait runs out now
    clock.advance(clock.now + settings.label_wait_s + 1.0)
    rt.drain()
    rt.publish()
    result.last_ts = clock.now if fed else None
    result.unplaced = counts["unplaced"]
    champion = rt.registry.champion()
    result.champion = None if champion is None else (champion.model, champion.version)
    result.seconds = time.perf_counter() - started
    return result


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f


def replay(
    spec: PipelineSpec,
    events: Path,
    labels: Path | None,
    out: Path,
    settings: Settings | None = None,
    label_time: str = "ts",
    batch_span_s: float = BATCH_SPAN_S,
) -> ReplayResult:
    """Replay the JSON-lines files ``events`` and ``labels`` (None: no labels) through
    the pipeline of ``spec``, writing ``predictions.jsonl``, ``evaluations.jsonl``,
    ``model-events.jsonl`` and ``dlq.jsonl`` into the directory ``out``."""
    for path in (events, labels):
        if path is not None and not path.is_file():
            what = "a directory, not a JSON-lines file" if path.is_dir() else "no such file"
            raise RiverflowError(f"{path}: {what}")
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{spec.name}."
    with ExitStack() as files:
        handles: dict[str, IO[bytes]] = {}
        written: Counter[str] = Counter()

        def handle(topic: str) -> IO[bytes]:
            if topic not in handles:
                name = topic.removeprefix(prefix)
                handles[topic] = files.enter_context((out / f"{name}.jsonl").open("wb"))
            return handles[topic]

        for name in OUTPUT_FILES:  # every file is there, if empty
            handle(prefix + name)

        def sink(o: Output) -> None:
            handle(o.topic).write(o.value + b"\n")
            written[o.topic.removeprefix(prefix)] += 1

        result = replay_records(
            spec, _lines(events), _lines(labels) if labels else [], sink, settings,
            label_time, batch_span_s,
        )  # fmt: skip
    result.written = written
    return result
