"""The learner's Kafka host: one confluent-kafka loop over every label partition.

The learner does not commit offsets to a consumer group. Its read positions are
part of its checkpoint, saved with the model versions they produced, so a
restarted learner reads from exactly where its models stopped learning: labels
after that point are read again and learned once more by the restored models,
labels before it never (see ``Learner._stale`` for the learned-markers).
One learner per pipeline (River models learn sequentially), so partitions are
assigned, not balanced by a group.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streams.contracts import Message, Output
from streams.kafka_io import MAX_MESSAGE_BYTES, KafkaIOError, produce_all, producer

log = logging.getLogger(__name__)


class PositionedProcessor(Protocol):
    """A processor that knows where in each partition it stands."""

    stage: str
    positions: dict[int, int]

    def process(self, batch: list[Message]) -> list[Output]: ...

    def commit(self) -> None: ...


def run_learner_loop(
    learner: PositionedProcessor,
    source: str,
    bootstrap: str,
    batch_size: int,
    batch_timeout_s: float,
    tick_s: float,
    on_stop: Callable[[], list[Output]],
) -> None:
    """Feed ``source`` to ``learner`` from its positions until SIGTERM / SIGINT.

    Outputs of a batch are acknowledged by the broker before the learner commits
    its checkpoint and the next batch is read; ``on_stop``'s outputs (the final
    snapshot's model-events) are written on a clean stop.
    """
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"riverflow-{learner.stage}-unused",  # required; nothing is committed
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
        }
    )
    meta = consumer.list_topics(source, timeout=10).topics.get(source)
    if meta is None or meta.error is not None:
        consumer.close()
        raise KafkaIOError(f"no topic {source!r} on {bootstrap}")
    consumer.assign(
        [TopicPartition(source, p, learner.positions.get(p, OFFSET_BEGINNING))
         for p in sorted(meta.partitions)]
    )  # fmt: skip
    prod = producer(bootstrap)
    next_tick = time.monotonic() + tick_s
    try:
        while not stopping:
            batch = []
            for m in consumer.consume(batch_size, timeout=batch_timeout_s):
                err = m.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    raise KafkaIOError(f"reading {source}: {err}")
                partition, offset = m.partition(), m.offset()
                if err is None and partition is not None and offset is not None:
                    batch.append(Message(source, partition, offset, m.key(), m.value()))
            now = time.monotonic()
            if batch or now >= next_tick:
                next_tick = now + tick_s
                produce_all(prod, ((o.topic, o.key, o.value) for o in learner.process(batch)))
                learner.commit()
        produce_all(prod, ((o.topic, o.key, o.value) for o in on_stop()))
        learner.commit()
    finally:
        consumer.close()
