"""A reader that trails a topic from positions its caller moves: the learner's labels
by timeout read the predictions topic this way (``riverflow.stages.timeouts``)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from riverflow.streams.contracts import Message
from riverflow.streams.kafka_io import (
    SIDE_READER_PREFETCH,
    PartitionWatch,
    Stall,
    groupless_reader,
    offsets_since,
    renewed_reader,
)

log = logging.getLogger(__name__)


class TrailingReader:
    """Every partition of ``topic``, read without a consumer group (nothing committed,
    no rebalance) into a buffer of at most ``buffered`` records per partition.

    The caller says where it is (``fetch(positions)``) and moves on at its own pace,
    a record's time after it was written: what it has passed leaves the buffer,
    and a partition whose buffer is full is paused until it drains, so memory is
    that of the buffers (and librdkafka's prefetch, ``kafka_io.SIDE_READER_PREFETCH``),
    however far behind the end the caller trails. A partition with no position
    starts at its first record no older than ``since_s``.

    A consumer that stops fetching (``kafka_io.Stall``: behind the end of a partition
    it is not paused on, nothing read for ``STALL_S``) is replaced by a new one from
    where it read to; without that the timeouts would fall due no more.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        since_s: float,
        buffered: int = 1000,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.since_s = since_s
        self.buffered = buffered
        self._settings = {
            "auto.offset.reset": "earliest",  # a position the topic no longer has
            **SIDE_READER_PREFETCH,
            **(config or {}),
        }
        self._group = f"riverflow-trailing-{topic}"
        self.consumer, self.partitions = groupless_reader(
            bootstrap, topic, self._group, **self._settings
        )
        self._stall = Stall()
        self._buffers: dict[int, deque[Message]] = {}
        self._next: dict[int, int] = {}  # the offset after the last record read, per partition
        self._passed: dict[int, int] = {}  # where the caller was last
        self._paused: set[int] = set()
        self._added = PartitionWatch(topic, self.partitions)

    def start(self, positions: Mapping[int, int]) -> dict[int, int]:
        start = {p: positions[p] for p in self.partitions if p in positions}
        new = [p for p in self.partitions if p not in start]
        if new:
            start.update(offsets_since(self.consumer, self.topic, new, self.since_s))
        self._assign(start)
        return dict(start)

    def _assign(self, positions: Mapping[int, int]) -> None:
        self.consumer.assign([TopicPartition(self.topic, p, o) for p, o in positions.items()])
        self._buffers = {p: deque() for p in positions}
        self._next = dict(positions)
        self._passed = dict(positions)
        self._paused.clear()

    def fetch(self, positions: Mapping[int, int]) -> Mapping[int, Sequence[Message]]:
        """Per partition, its buffered records from ``positions`` on; a partition added
        to the topic since (``kafka_io.PartitionWatch``) joins from its start."""
        added = self._added.added(self.consumer) if self._buffers else []
        if added:
            start = offsets_since(self.consumer, self.topic, added, self.since_s)
            self.partitions = sorted([*self.partitions, *added])
            for p, o in start.items():
                self._buffers[p] = deque()
                self._next[p] = self._passed[p] = o
            self.consumer.incremental_assign(
                [TopicPartition(self.topic, p, o) for p, o in start.items()]
            )
        if any(
            p not in self._buffers or at < self._passed[p] or at > self._next[p]
            for p, at in positions.items()
        ):  # the caller went back (or elsewhere): read again from where it is
            self._assign({**self._next, **positions})
        for p, at in positions.items():
            buffer = self._buffers[p]
            while buffer and buffer[0].offset < at:
                buffer.popleft()
            self._passed[p] = at
        self._fill()
        return self._buffers

    def _fill(self) -> None:
        resume = [p for p in self._paused if len(self._buffers[p]) < self.buffered // 2]
        if resume:
            self.consumer.resume([TopicPartition(self.topic, p) for p in resume])
            self._paused.difference_update(resume)
            # paused is not silent: the fetch after a resume may come back empty (the
            # broker answers later), and a pause of STALL_S or more is no stall
            self._stall.heard()
        room = sum(max(0, self.buffered - len(b)) for b in self._buffers.values())
        while room > 0:
            batch: list[Any] = self.consumer.consume(min(room, 1000), timeout=0)
            if not batch:
                if self._stall.look():
                    self._check_stall()
                return
            self._stall.heard()
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("reading %s: %s", self.topic, err)
                    continue
                p = msg.partition()
                if p not in self._buffers or msg.offset() < self._next[p]:
                    continue  # fetched before a seek back
                ts_type, ts = msg.timestamp()
                self._buffers[p].append(
                    Message(msg.topic(), p, msg.offset(), msg.key(), msg.value(),
                            ts if ts_type else None)
                )  # fmt: skip
                self._next[p] = msg.offset() + 1
                room -= 1
            full = [p for p, b in self._buffers.items()
                    if len(b) >= self.buffered and p not in self._paused]  # fmt: skip
            if full:
                self.consumer.pause([TopicPartition(self.topic, p) for p in full])
                self._paused.update(full)

    def _check_stall(self) -> None:
        """A new consumer if it has stalled on a partition it reads (not paused)."""
        reading = {p: self._next[p] for p in self._buffers if p not in self._paused}
        why = self._stall.check(self.consumer, self.topic, reading)
        if why is not None:
            self._renew(why)

    def _renew(self, why: str) -> None:
        self.consumer = renewed_reader(self.consumer, self.bootstrap, self.topic, self._group,
                                       self._settings, self._next, why)  # fmt: skip
        if self._paused:
            self.consumer.pause([TopicPartition(self.topic, p) for p in self._paused])
        self._stall.heard()

    def close(self) -> None:
        self.consumer.close()
