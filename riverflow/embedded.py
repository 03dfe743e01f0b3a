"""The embedded runtime: in-memory topics, the memory store, the same processors.

Deterministic: one thread, batches taken in log order, events before labels in
each step. It serves the demo and fast tests; scale is the Kafka runtime's job.
"""

from __future__ import annotations

from collections import defaultdict

from riverflow.assembly import build_learner, build_monitor, build_scorer, memory_backends
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.stages.common import guarded
from riverflow.streams.contracts import Message, Output


class EmbeddedLog:
    """Append-only in-memory topics with one partition each."""

    def __init__(self) -> None:
        self.topics: dict[str, list[tuple[bytes | None, bytes]]] = defaultdict(list)

    def append(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.topics[topic].append((key, value))

    def read(self, topic: str, offset: int, limit: int) -> list[Message]:
        records = self.topics[topic][offset : offset + limit]
        return [Message(topic, 0, offset + i, k, v) for i, (k, v) in enumerate(records)]

    def write(self, outputs: list[Output]) -> None:
        for o in outputs:
            self.append(o.topic, o.key, o.value)


class EmbeddedRuntime:
    """A scorer, a learner and a monitor over one in-memory log."""

    def __init__(self, spec: PipelineSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.topics = spec.topics
        self.log = EmbeddedLog()
        self.store, self.registry = memory_backends(spec, settings)
        # the scorer and the learner follow the monitor's decisions at once (a read of
        # the in-memory registry per batch): runs are deterministic, not paced by the clock
        self.scorer = build_scorer(spec, settings, self.store, self.registry, model_poll_s=0)
        self.learner = build_learner(spec, settings, self.store, self.registry, registry_poll_s=0)
        self.monitor = build_monitor(spec, self.registry)
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
        done = 0
        for topic, processor in (
            (self.topics.events, self.guards["scorer"]),
            (self.topics.labels, self.guards["learner"]),
        ):
            batch = self.log.read(topic, self.offsets[topic], self.settings.batch_size)
            if batch:
                self.log.write(processor.process(batch))
                self.offsets[topic] += len(batch)
                self.learner.commit()
                done += len(batch)
        watched = []
        for topic in (self.topics.predictions, self.topics.evaluations):
            batch = self.log.read(topic, self.offsets[topic], self.settings.batch_size)
            self.offsets[topic] += len(batch)
            watched += batch
        if watched:
            self.log.write(self.guards["monitor"].process(watched))
            done += len(watched)
        return done

    def drain(self) -> None:
        """Process everything produced so far, then retry labels still waiting."""
        while self.step():
            pass
        if self.learner.pending:
            self.log.write(self.guards["learner"].process([]))
            self.learner.commit()

    def messages(self, topic: str) -> list[tuple[bytes | None, bytes]]:
        return list(self.log.topics[topic])
