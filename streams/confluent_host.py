"""A plain confluent-kafka loop hosting a processor (the default host; Faust is the other).

Per batch: block for the first message, then take whatever else is already
fetched (up to ``batch_size``) without waiting, so a quiet stream is served at
once and a busy one in large batches. Outputs are produced without per-message
flush; one flush per batch waits for their acks, and only then are the
batch's offsets committed. A crash therefore replays at most the uncommitted
batch, which the store's event-id dedup absorbs.

Two ways to read: in a consumer group (the scorer: partitions are balanced
between replicas, offsets committed to the group), or from positions the
processor keeps itself (the learner, ``Checkpointing``: every partition assigned
from the offsets saved in its checkpoint; nothing committed to Kafka,
``after_write`` saves the checkpoint once a batch's outputs are acknowledged).

The host holds transport only: what it reads and how it batches
(``HostSettings``), its clients' settings (``ClientSettings``, passed in), and
where it reports each batch (a ``StageReporter``, passed in).

``HostSettings.freeze_gc`` (the scorer) freezes the heap after every batch, so
the cyclic GC never walks the feature state the process keeps; what it gives up
is collecting a reference cycle that outlives its batch (the scorer's steady
state makes none: tests/integration/test_scorer_gc.py).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from riverflow.streams.contracts import Message, Output, Processor
from riverflow.streams.hosting import HostSettings, StageReporter
from riverflow.streams.kafka_io import (
    MAX_MESSAGE_BYTES,
    KafkaIOError,
    produce_all,
    producer_config,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSettings:
    """The host's confluent-kafka clients: librdkafka settings laid over the host's
    own, and what builds each client from its final settings (the latency probe
    passes clients that time their calls)."""

    consumer: Mapping[str, Any] = field(default_factory=dict)
    producer: Mapping[str, Any] = field(default_factory=dict)
    make_consumer: Callable[[dict[str, Any]], Consumer] = Consumer
    make_producer: Callable[[dict[str, Any]], Producer] = Producer


@dataclass(frozen=True)
class Checkpointing:
    """Read from positions the processor keeps itself, not a consumer group's offsets.

    Every partition of the one source is assigned from ``positions`` (the dict is
    read when the host starts); nothing is committed to Kafka; ``after_write``
    saves the checkpoint once a batch's outputs are acknowledged. ``on_stop``:
    outputs to write at a clean stop, saved the same way.
    """

    positions: dict[int, int]
    after_write: Callable[[], None]
    on_stop: Callable[[], list[Output]] | None = None


class ConfluentHost:
    """Runs ``processor`` over ``source`` (one topic, or several in a consumer group)
    until ``stop()`` or SIGTERM/SIGINT."""

    def __init__(
        self,
        processor: Processor,
        source: str | list[str],
        settings: HostSettings,
        clients: ClientSettings | None = None,
        metrics: StageReporter | None = None,
        checkpoint: Checkpointing | None = None,
    ) -> None:
        clients = clients or ClientSettings()
        self.processor = processor
        self.sources = [source] if isinstance(source, str) else list(source)
        self.settings = settings
        self.metrics = metrics
        self.checkpoint = checkpoint
        self._stop = threading.Event()
        self.consumer = clients.make_consumer(
            {
                "bootstrap.servers": settings.bootstrap,
                "group.id": settings.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
                "fetch.wait.max.ms": 10,
                "partition.assignment.strategy": "cooperative-sticky",
                **clients.consumer,
            }
        )
        self.producer = clients.make_producer(
            producer_config(settings.bootstrap, **{"linger.ms": 1, **clients.producer})
        )

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        tick_s, checkpoint = self.settings.tick_s, self.checkpoint
        if checkpoint is None:
            self.consumer.subscribe(self.sources)
        else:
            self._assign(checkpoint.positions)
        next_tick = time.monotonic() + (tick_s or 0)
        try:
            while not self._stop.is_set():
                batch = self._take()
                started = time.perf_counter()
                outputs = self.processor.process(batch) if batch else []
                if tick_s is not None and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick_s
                    outputs += self.processor.process([])
                self._write(outputs)
                if batch and checkpoint is None:
                    self.consumer.commit(asynchronous=True)
                if checkpoint is not None and (batch or outputs):
                    checkpoint.after_write()
                if self.metrics is not None:
                    self._observe(batch, outputs, time.perf_counter() - started)
                if self.settings.freeze_gc:
                    # what outlives a batch (cached feature state) leaves the cyclic
                    # GC's generations: collections then walk one batch's objects,
                    # never the whole cache (a full pass over 100,000 cached
                    # entities took ~2 s). O(1); see docs/architecture.md
                    gc.freeze()
            if checkpoint is not None and checkpoint.on_stop is not None:
                self._write(checkpoint.on_stop())  # a clean stop: its outputs are written too
                checkpoint.after_write()
        finally:
            self.producer.flush(30)
            self.consumer.close()  # leaves the group (async commits are flushed)

    def _assign(self, positions: dict[int, int]) -> None:
        if len(self.sources) != 1:
            raise ValueError("positions are kept for one source topic only")
        source = self.sources[0]
        meta = self.consumer.list_topics(source, timeout=10).topics.get(source)
        if meta is None or meta.error is not None:
            raise KafkaIOError(f"no topic {source!r}")
        self.consumer.assign(
            [TopicPartition(source, p, positions.get(p, OFFSET_BEGINNING))
             for p in sorted(meta.partitions)]
        )  # fmt: skip

    def _observe(self, batch: list[Message], outputs: list[Output], seconds: float) -> None:
        assert self.metrics is not None
        self.metrics.set_status(self.processor.status())
        if not batch and not outputs:
            self.metrics.heartbeat()
            return
        self.metrics.observe(batch, outputs, seconds, self.settings.dlq_topic)
        last: dict[tuple[str, int], int] = {}
        for m in batch:
            last[(m.topic, m.partition)] = m.offset
        for (topic, partition), offset in last.items():
            # cached=True: the high watermark from the last fetch, no broker round trip
            _, high = self.consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            )
            if high >= 0:
                self.metrics.set_lag(topic, partition, max(0, high - offset - 1))

    def _take(self) -> list[Message]:
        first = self.consumer.poll(self.settings.poll_s)
        if first is None:
            return []
        raw = [first, *self.consumer.consume(self.settings.batch_size - 1, timeout=0)]
        batch = []
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            # a message without error always has its topic, partition and offset
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            assert topic is not None and partition is not None and offset is not None
            ts_type, ts = m.timestamp()
            stamp = ts if ts_type != TIMESTAMP_NOT_AVAILABLE else None
            batch.append(Message(topic, partition, offset, m.key(), m.value(), stamp))
        return batch

    def _write(self, outputs: list[Output]) -> None:
        # Raises when an output is not acknowledged: the batch is then not committed
        # and will be consumed again after a restart.
        if outputs:
            produce_all(self.producer, ((o.topic, o.key, o.value) for o in outputs))
