"""The embedded runtime: in-memory topics, the memory store, the same processors.

Deterministic: one thread, batches taken in log order, events before labels in
each step. It serves the demo and fast tests; scale is the Kafka runtime's job.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

from riverflow.assembly import (
    build_learner,
    build_monitor,
    build_scorer,
    label_feature_store,
    memory_backends,
)
from riverflow.features.scored import MemoryScoredEvents
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.stages.common import guarded
from riverflow.stages.timeouts import Timeouts, label_timeout
from riverflow.streams.contracts import Message, Output

TRIM_AT = 4096  # a topic's passed records are dropped once this many have piled up


class EmbeddedLog:
    """Append-only in-memory topics with one partition each.

    A topic named in ``retain`` (None: every topic) keeps all its records, each
    copied to its own size (orjson 3.12+ hands out small bytes with a 4 KiB
    allocation behind them). Any other topic drops what its reader has passed
    (``trim``), and a topic nobody reads keeps only its count: memory is then
    bounded by what is in flight, not by how long the stream has run.
    """

    def __init__(self, retain: Collection[str] | None = None) -> None:
        self.retain = None if retain is None else frozenset(retain)
        self.topics: dict[str, list[tuple[bytes | None, bytes]]] = defaultdict(list)
        self.base: dict[str, int] = defaultdict(int)  # the offset of a topic's first record

    def kept(self, topic: str) -> bool:
        return self.retain is None or topic in self.retain

    def append(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self.kept(topic) and value:  # (a hostile test's value may be None)
            value = bytes(memoryview(value))
        self.topics[topic].append((key, value))

    def count(self, topic: str) -> int:
        """Records ever appended to ``topic`` (its end offset)."""
        return self.base[topic] + len(self.topics[topic])

    def read(self, topic: str, offset: int, limit: int) -> list[Message]:
        start = offset - self.base[topic]
        if start < 0:
            raise ValueError(f"{topic}: offset {offset} was trimmed (first: {self.base[topic]})")
        records = self.topics[topic][start : start + limit]
        return [Message(topic, 0, offset + i, k, v) for i, (k, v) in enumerate(records)]

    def trim(self, topic: str, upto: int) -> None:
        """Drop the records before offset ``upto`` of a topic that is not retained."""
        if self.kept(topic):
            return
        records, n = self.topics[topic], upto - self.base[topic]
        if n > 0 and (n >= TRIM_AT or n == len(records)):  # amortised: few list moves
            del records[:n]
            self.base[topic] = upto

    def write(self, outputs: list[Output]) -> None:
        for o in outputs:
            self.append(o.topic, o.key, o.value)


class LogTimers:
    """The labels by timeout's queue (``stages.timeouts.TimerQueue``) over a topic of
    the embedded log: its one partition, ``limit`` records a fetch."""

    def __init__(self, log: EmbeddedLog, topic: str, limit: int) -> None:
        self.log = log
        self.topic = topic
        self.limit = limit

    def start(self, positions: Mapping[int, int]) -> dict[int, int]:
        return {0: positions.get(0, self.log.base[self.topic])}

    def fetch(self, positions: Mapping[int, int]) -> Mapping[int, Sequence[Message]]:
        return {0: self.log.read(self.topic, positions.get(0, 0), self.limit)}

    def close(self) -> None:
        pass


@contextmanager
def young_collections() -> Iterator[None]:
    """The cyclic GC walks only what is made inside the block: what existed before
    it (the process's startup, the models, the state) is frozen, then unfrozen.

    The Kafka hosts freeze their startup heap for good (``kafka_runtime``); this
    runtime lives in its caller's process, so it gives the heap back after each
    step, and a cycle that became garbage meanwhile is collected then. Full
    collections over that heap cost ~15% of a fraud-bench drain without it. A
    process that froze its heap itself keeps it as it is.
    """
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class EmbeddedRuntime:
    """A scorer, a learner and a monitor over one in-memory log.

    ``retain``: the topics whose every record is kept for ``messages`` (None, the
    default: all, for tests and short runs); the others keep only what is not
    read yet (``EmbeddedLog``). The demo and the bench retain none.

    ``clock``: the one time every stage goes by (a prediction's ``scored_at``, a
    label's wait, snapshots every ``snapshot_every_s``, decisions, the registry's
    stamps); default the process's clocks. A replay passes event time, so that a
    run depends on its input only (``riverflow.replay``). ``on_output``: called
    with every batch of records a stage writes, before a topic nobody reads here
    drops them.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        settings: Settings,
        retain: Collection[str] | None = None,
        clock: Callable[[], float] | None = None,
        on_output: Callable[[list[Output]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.topics = spec.topics
        self.log = EmbeddedLog(retain)
        self.on_output = on_output
        self.store, self.registry = memory_backends(spec, settings, clock)
        # label-fed features: the learner writes what the scorer reads
        self.label_features = label_feature_store(spec, settings)
        wall, steady = (time.time, time.monotonic) if clock is None else (clock, clock)
        # the scorer and the learner follow the monitor's decisions at once (a read of
        # the in-memory registry per batch): runs are deterministic, not paced by the clock
        self.scorer = build_scorer(
            spec, settings, self.store, self.registry, model_poll_s=0, clock=wall,
            label_features=self.label_features,
        )  # fmt: skip
        # the learner joins labels to the predictions, as on Kafka: the runtime indexes
        # every prediction before it hands the learner the labels that follow
        self.scored = MemoryScoredEvents()
        self.indexed = 0  # the predictions the learner's index has read
        # labels by timeout trail the predictions, never past what the index has read
        timeout = label_timeout(spec.label, settings.label_horizon_s)
        # ... and never before the learner has read the labels in the log (it reads a
        # batch of them a step): no default beats a label that came before it
        self.timeouts = None if timeout is None else Timeouts(
            timeout, LogTimers(self.log, spec.topics.predictions, 10 * settings.batch_size),
            lambda: {0: self.indexed}, clock=wall, limit=10 * settings.batch_size,
            labels_read=lambda: wall() if self._labels_read() else None,
        )  # fmt: skip
        # versions every snapshot_every_labels, with no floor in time: what a run
        # publishes depends on its input, not on how fast the machine is
        self.learner = build_learner(
            spec, settings.model_copy(update={"snapshot_min_interval_s": 0.0}), self.store,
            self.registry, self.scored, registry_poll_s=0,
            clock=steady, timeouts=self.timeouts, label_features=self.label_features,
        )  # fmt: skip
        self.monitor = build_monitor(
            spec, self.registry, dlq_keep_bytes=settings.dlq_keep_bytes, clock=wall
        )
        # each behind the last resort the Kafka hosts run it with (streams.guard)
        self.guards = {
            p.stage: guarded(p, self.topics, settings.outage_limit_s, settings.dlq_keep_bytes)
            for p in (self.scorer, self.learner, self.monitor)
        }
        t = self.topics
        self.offsets = {t.events: 0, t.labels: 0, t.predictions: 0, t.evaluations: 0}

    def produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.log.append(topic, key, value)

    def step(self) -> int:
        """Process one batch of events, then one of labels; returns messages consumed."""
        with young_collections():
            return self._step()

    def _step(self) -> int:
        done = 0
        for topic, processor in (
            (self.topics.events, self.guards["scorer"]),
            (self.topics.labels, self.guards["learner"]),
        ):
            if topic == self.topics.labels:
                self._index_predictions()
            batch = self.log.read(topic, self.offsets[topic], self.settings.batch_size)
            if batch:
                self._write(processor.process(batch))
                self.offsets[topic] += len(batch)
                self.learner.commit()
                done += len(batch)
        done += self._timeouts()
        watched = []
        for topic in (self.topics.predictions, self.topics.evaluations):
            batch = self.log.read(topic, self.offsets[topic], self.settings.batch_size)
            self.offsets[topic] += len(batch)
            watched += batch
        if watched:
            self._write(self.guards["monitor"].process(watched))
            done += len(watched)
        for topic, offset in self.offsets.items():
            if topic == self.topics.predictions:
                offset = min(offset, self.indexed)
                if self.timeouts is not None:
                    offset = min(offset, self.timeouts.positions.get(0, offset))
            self.log.trim(topic, offset)
        for topic in (self.topics.dlq, self.topics.model_events):  # nobody reads them here
            self.log.trim(topic, self.log.count(topic))
        return done

    def _timeouts(self) -> int:
        """Label the scored events whose timeout fell due (the learner does it with
        every batch of labels; this ticks it when none came); returns how many
        predictions the timeouts passed."""
        if self.timeouts is None or not self.timeouts.due():
            return 0
        before = self.timeouts.positions.get(0, 0)
        self._write(self.guards["learner"].process([]))
        self.learner.commit()
        return self.timeouts.positions.get(0, 0) - before

    def _write(self, outputs: list[Output]) -> None:
        if self.on_output is not None and outputs:
            self.on_output(outputs)
        self.log.write(outputs)

    def publish(self) -> None:
        """Publish every candidate's state now, as a Kafka learner does at a clean stop."""
        self._write(self.learner.publish())
        self.learner.commit()

    def _labels_read(self) -> bool:
        """Whether the learner has read every label in the log."""
        return self.learner.positions.get(0, 0) >= self.log.count(self.topics.labels)

    def _index_predictions(self) -> None:
        topic = self.topics.predictions
        end = self.log.count(topic)
        if end > self.indexed:
            self.scored.add(self.log.read(topic, self.indexed, end - self.indexed))
            self.indexed = end

    def drain(self) -> None:
        """Process everything produced so far, then retry labels still waiting."""
        while self.step():
            pass
        if self.learner.pending:
            self._index_predictions()
            self._write(self.guards["learner"].process([]))
            self.learner.commit()

    def messages(self, topic: str) -> list[tuple[bytes | None, bytes]]:
        """Every record of a retained topic."""
        if not self.log.kept(topic):
            raise ValueError(f"{topic} is not retained: pass it in EmbeddedRuntime(retain=...)")
        return list(self.log.topics[topic])
