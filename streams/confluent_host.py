"""A plain confluent-kafka loop hosting a processor (the default host; Faust is the other).

Per batch: block for the first message, then take whatever else is already
fetched (up to ``batch_size``) without waiting, so a quiet stream is served at
once and a busy one in large batches. Outputs are produced without per-message
flush, and without waiting for their acks either: the next batch is processed
while they travel (at most ``MAX_IN_FLIGHT`` batches unacknowledged). A batch's
offsets become committable once its outputs, and those of every batch before
it, are acknowledged. Waiting for each batch's acks before taking the next held
the scorer at ~4,500 events/s under paced load (small batches, one broker round
trip each) against 14,600/s draining a backlog (docs/benchmarks.md). The
learner (``Checkpointing``) still waits for each batch's acks: its checkpoint
is saved only once they are in.

Offset commits are bounded (at least once, the default): the latest committable
offset per partition is committed asynchronously at most every
``commit_interval_s``, and never while the previous commit is in flight (its
``on_commit`` callback ends it). Committing after every batch queued thousands
of OffsetCommitRequests on the coordinator connection, and heartbeats waited
behind them until the session expired (issue 13's soak). When partitions are
revoked, and at a clean stop, their final offsets are committed synchronously.
A crash therefore replays what was acknowledged since the last commit (about
``commit_interval_s`` of events), which the store's event-id dedup absorbs.

Exactly once (``HostSettings.exactly_once``): outputs and offsets go in Kafka
transactions (``send_offsets_to_transaction`` with the consumer's group
metadata) that commit together or not at all. A transaction spans the batches
of ``transaction_interval_s`` (0.1 s): a transaction per batch cost ~28% of the
drain rate (five broker round trips each). A failed transaction is aborted and
the consumer rewound to its first offsets, so its batches are processed again;
one that cannot be aborted (the broker away, or fenced) is ended by a new producer
with the same ``transactional.id`` (``_renew_producer``), and renewed three times
within a minute (another process has our id) the host stops. A revoke commits the
open transaction first (its offsets must not
go with the partitions); partitions lost abort it.

Group membership: with ``instance_id`` the consumer is a static member
(``group.instance.id``): a restarted process with the same id takes back its
partitions at once, without a rebalance; a member that does not come back loses
them after ``session_timeout_s``. See docs/architecture.md, "Delivery and
failover".

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

import contextlib
import gc
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as CallTimedOut
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

import orjson
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
    DEAF_AFTER_S,
    DEAF_PROBE_S,
    MAX_MESSAGE_BYTES,
    STUCK_ACKS_S,
    FreshReach,
    KafkaIOError,
    PartitionWatch,
    Stall,
    client_config,
    kafka_error,
    produce_all,
    produce_one,
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


# fenced this many times within this long: another process has our instance id (each
# broker restart that outlasts the session fences us once; two such within a minute
# happen, a process that takes our id back every few seconds fences us far more)
FENCED_TIMES = 3
FENCED_AGAIN_S = 60.0
MAX_IN_FLIGHT = 4  # batches whose outputs may await their acks while the next is processed
# a batch lingers (up to ``HostSettings.linger_s``) only while events come at this rate
# or more, and only as long as it takes to gather about ``LINGER_BATCH`` of them: a
# slower stream is served without waiting (lingering from 2,000/s moved the p99 at
# 1,000/s from 6.3 to 10.7 ms), a faster one waits less (docs/benchmarks.md)
LINGER_FROM_RATE = 5_000.0
LINGER_BATCH = 200
RATE_WINDOW_S = 0.25  # how far back the source's rate is followed


@dataclass
class _InFlight:
    """A batch whose outputs were produced: the offsets it makes committable once
    every one of them is acknowledged."""

    offsets: dict[tuple[str, int], int]  # next offset per source partition
    firsts: dict[tuple[str, int], int]  # its first offset per source partition
    outputs: int
    waiting: int  # outputs not acknowledged yet
    since: float  # when they were produced (monotonic)
    errors: list[str] = field(default_factory=list)

    def on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))
        self.waiting -= 1


# exactly once: a transactional call that waits past TXN_LATE_S makes the stage degraded;
# one that has not returned after TXN_GIVE_UP times its own timeout is given up as timed
# out (a new producer ends the transaction): librdkafka's send_offsets_to_transaction can
# block past its timeout when the group coordinator goes away (seen after a broker
# restart, 67 s and on; librdkafka#5456, open for 2.16)
TXN_LATE_S = 1.0
TXN_GIVE_UP = 1.5
# exactly once: a batch still being processed once the open transaction (the batches
# before it) has been open this share of ``transaction_timeout_s`` has that transaction
# committed from the side (``_watch_transaction``): Redis stalling a batch for seconds
# without an error (a CLIENT PAUSE, a slow disk) made the broker abort it, fencing the
# producer, and three of those within a minute stopped the stage
TXN_WATCH_SHARE = 0.5


class _CallThread:
    """Runs the calls submitted, one after another, on a daemon thread of its own. Not a
    ``ThreadPoolExecutor``: the interpreter joins its threads at exit, and a call stuck
    in a client library would hold the process."""

    def __init__(self, name: str) -> None:
        self._calls: SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._calls = SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, call: Callable[..., Any], *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        self._calls.put((done, call, args))
        return done

    def close(self) -> None:
        """The thread ends once the call it runs, if any, returns."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            done, call, args = item
            try:
                done.set_result(call(*args))
            except BaseException as exc:  # handed to whoever waits on it
                done.set_exception(exc)


PROBE_S = 1.0  # while Kafka is unreachable, a broker is asked this often whether it is back
STATS_S = 1.0  # how often librdkafka reports the consumer's connections (``ConsumerState``)
# the consumer group's coordinator unreachable while a broker answers: degraded after
# this many session timeouts, a new consumer after GROUP_STUCK_TIMES (at least
# GROUP_STUCK_MIN_S); stuck again within GROUP_STUCK_AGAIN_S of that, the host stops
GROUP_DEGRADED_TIMES = 2
GROUP_STUCK_TIMES = 4
GROUP_STUCK_MIN_S = 20.0
GROUP_STUCK_AGAIN_S = 600.0
CLOSE_WAIT_S = 0.5  # a consumer being replaced gets this long to close before its successor reads
# replaced consumers whose close has not ended (each keeps its threads and buffers): with
# this many, the next replacement stops the host instead (its supervisor starts a new
# process), so the clients a process leaks stay bounded
HUNG_CLOSES_MAX = 3
LET_GO_S = 10.0  # a stuck producer, purged, serves its delivery reports this long as it goes
GAP_LOOK_S = 5.0  # offsets skipped at a partition's first read are read again this long at most
# (DEAF_PROBE_S, DEAF_AFTER_S and STUCK_ACKS_S, from kafka_io: during an outage a new
# client asks a broker every DEAF_PROBE_S; once one has answered, a consumer that still
# reaches no broker DEAF_AFTER_S later is replaced; a stage's outputs unacknowledged
# STUCK_ACKS_S while a new client has reached Kafka for DEAF_AFTER_S: its producer is
# stuck, and a new one writes them again (a checkpointed stage), or their batches are
# consumed again and a new one writes theirs (at least once))


class _StuckProducer(Exception):
    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} outputs unacknowledged")
        self.waiting = waiting


# the final flush, commit and close of a host that is its process end by then (else the
# process exits, status 1): a client waiting on a broker that never answers held a
# SIGTERMed scorer for over a minute
STOP_DEADLINE_S = 60.0


@dataclass(frozen=True)
class ConsumerState:
    """What a consumer's librdkafka statistics (``stats_cb``) say of its connections.

    ``brokers_up``: whether a broker it knows of is connected (None: it knows none).
    librdkafka's own ``_ALL_BROKERS_DOWN`` is not enough: it counts only brokers that
    have tried to connect since, so a restarted broker could come and go unreported.
    ``coordinator``: "" while the group's coordinator is found and
    connected, else what it waits on; None without a group.
    """

    brokers_up: bool | None
    coordinator: str | None

    @classmethod
    def parse(cls, raw: str | bytes) -> ConsumerState:
        stats = orjson.loads(raw)
        brokers = stats.get("brokers") or {}
        # every broker object counts: those learned from metadata, the bootstrap ones
        # (all that is left while librdkafka re-bootstraps: it drops the learned ones
        # once all are down) and the group coordinator's
        known = [b for b in brokers.values() if b.get("source") != "internal"]
        up = any(b.get("state") == "UP" for b in known) if known else None
        group = stats.get("cgrp")
        if not group:
            return cls(up, None)
        waits = []
        if group.get("state") != "up":
            waits.append(f"group state {group.get('state')}")
        coordinator = brokers.get("GroupCoordinator")
        if coordinator is not None and coordinator.get("state") != "UP":
            waits.append(f"coordinator connection {coordinator.get('state')}")
        return cls(up, ", ".join(waits))


def _once_more(times: deque[float]) -> int:
    """One more time now in ``times`` (those older than ``FENCED_AGAIN_S`` dropped):
    how many are left."""
    now = time.monotonic()
    times.append(now)
    while now - times[0] > FENCED_AGAIN_S:
        times.popleft()
    return len(times)


def transactional_id(settings: HostSettings) -> str:
    """The producer's ``transactional.id``: stable per group and instance, so a restarted
    process fences its predecessor (and aborts what that one left open)."""
    if not settings.instance_id:
        raise ValueError("exactly_once needs an instance id (RIVERFLOW_INSTANCE_ID)")
    return f"{settings.group}.{settings.instance_id}"


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
        if settings.exactly_once and checkpoint is not None:
            raise ValueError("exactly_once needs a consumer group, not checkpointed positions")
        self.exactly_once = settings.exactly_once
        self._committable: dict[tuple[str, int], int] = {}  # next offset, acknowledged
        self._in_flight: deque[_InFlight] = deque()  # batches awaiting acks, oldest first
        # the oldest batch's acks late: which batch, and its stuck producer's watch
        self._late: tuple[_InFlight, Callable[[int], None]] | None = None
        self._committed: dict[tuple[str, int], int] = {}  # what the last commit sent
        self._commit_in_flight = False
        self._next_commit = 0.0
        self._txn_started: float | None = None  # the open transaction's start
        self._txn_first: dict[tuple[str, int], int] = {}  # its first offset per partition
        self._txn_next: dict[tuple[str, int], int] = {}  # its next offset per partition
        # partitions rewound (to these offsets) under the batch in hand, by a transaction
        # that failed while the batch waited (``_commit_before_waiting``)
        self._rewound_under_batch: dict[tuple[str, int], int] = {}
        # the transaction's state is changed by the main thread outside ``process`` and,
        # while it is inside (``_processing``), by the guard's hook and the watch
        self._txn_lock = threading.Lock()
        self._processing = False
        self._watch_failed: BaseException | None = None  # raised in the main thread
        # partitions assigned and not read from since: where each starts is logged
        self._unread: set[tuple[str, int]] = set()
        # the offset each was assigned at, if any (a group's member is assigned none: it
        # begins at the group's committed offset)
        self._assigned_at: dict[tuple[str, int], int] = {}
        # reading from the processor's positions: partitions added to the source since
        self._added: PartitionWatch | None = None
        session_ms = int(settings.session_timeout_s * 1000)
        consumer: dict[str, Any] = {
            **client_config(settings.bootstrap),
            "group.id": settings.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
            # how long the broker holds a fetch that finds nothing new: it answers
            # as soon as a record is appended, but every empty fetch costs it 1.4-2 ms
            # of CPU (10 ms here held a fifth of a core while idle; 100 ms costs
            # ~1%, and 500 ms did no better: docs/benchmarks.md)
            "fetch.wait.max.ms": 100,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": session_ms,
            # a fifth: the survivors learn of a dead member's rebalance within ~1 s of its expiry
            "heartbeat.interval.ms": max(100, session_ms // 5),
            "max.poll.interval.ms": int(settings.max_poll_interval_s * 1000),
            "isolation.level": "read_committed",
            "statistics.interval.ms": int(STATS_S * 1000),
        }
        if settings.instance_id:
            consumer["group.instance.id"] = settings.instance_id
        self._consumer_config = {**consumer, **clients.consumer}
        self._make_consumer = clients.make_consumer
        self._fenced_at: deque[float] = deque()  # when the consumer was fenced lately
        self._renewed_at: deque[float] = deque()  # when the producer was renewed lately
        self._txn_thread: _CallThread | None = None  # runs the calls _txn_call bounds
        self._generation = 0  # of the consumer: one replaced is closed apart (_new_consumer)
        self._closing: list[threading.Thread] = []  # replaced consumers' closes not ended
        self.consumer = self._create_consumer()
        self._paused = False  # the processor asked for no input (backpressure)
        self._rate = 0.0  # events/s the source brought lately (an average over batches)
        self._last_take = time.monotonic()
        self._kafka_down_since: float | None = None  # degraded: the broker is unreachable
        self._kafka_up_at = -math.inf  # when the last outage ended
        self._next_probe = 0.0
        self._reach = FreshReach()  # a new client's reach of Kafka (outage)
        # the group's coordinator unreachable while a broker answers (see _on_stats)
        self._group_lost_since: float | None = None
        self._group_stuck: str | None = None  # why the consumer is to be replaced
        # (reading from the processor's positions) whether the consumer still fetches
        self._stall = Stall()
        self._group_degraded = False
        self._group_replaced_at: float | None = None
        hooks = getattr(processor, "on_wait", None)  # streams.guard.Guard
        if settings.exactly_once and isinstance(hooks, list):
            # a batch waiting out a Redis outage must not hold a transaction open:
            # the broker aborts it after transaction_timeout_s, fencing the producer
            hooks.append(self._commit_before_waiting)
        # lz4: a batch's records (JSON) shrink ~3.4x, and the broker's CPU per record
        # with them (warm broker: ~5 -> ~4 us; docs/benchmarks.md); every consumer
        # riverflow runs is librdkafka, which reads it as it comes
        producer: dict[str, Any] = {
            "linger.ms": 1, "compression.type": "lz4", "error_cb": self._on_client_error,
        }  # fmt: skip
        if settings.exactly_once:
            producer["transactional.id"] = transactional_id(settings)
            producer["transaction.timeout.ms"] = int(settings.transaction_timeout_s * 1000)
        self._producer_config = producer_config(
            settings.bootstrap, **{**producer, **clients.producer}
        )
        self._make_producer = clients.make_producer
        self.producer = clients.make_producer(self._producer_config)

    def stop(self) -> None:
        self._stop.set()

    def _exit_after(self, deadline_s: float) -> threading.Timer:
        """A timer that ends the process (status 1) unless cancelled within ``deadline_s``."""

        def overdue() -> None:
            log.error("%s: the Kafka clients did not close within %.0f s (waiting on a "
                      "broker): exiting now", self.processor.stage, deadline_s)  # fmt: skip
            logging.shutdown()
            os._exit(1)

        timer = threading.Timer(deadline_s, overdue)
        timer.daemon = True
        timer.start()
        return timer

    def run(self) -> None:
        # the host is the process (the main thread): it takes the signals, and bounds its
        # clients' closing (what was not committed is replayed, the event-id dedup
        # absorbs it); a clean stop's own outputs and checkpoint are not cut short
        process = threading.current_thread() is threading.main_thread()
        if process:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        tick_s, checkpoint = self.settings.tick_s, self.checkpoint
        if self.exactly_once:
            # fences an earlier producer with our transactional.id and aborts what it left open
            self.producer.init_transactions(self.settings.transaction_timeout_s * 3)
            watch = threading.Thread(target=self._watch_transaction,
                                     name=f"{self.processor.stage}-transaction-watch",
                                     daemon=True)  # fmt: skip
            watch.start()
        self._start_reading()
        next_tick = time.monotonic() + (tick_s or 0)
        try:
            while not self._stop.is_set():
                if self._kafka_down_since is not None:
                    self._probe_kafka()
                if self._group_stuck is not None:
                    self._replace_stuck_consumer(self._group_stuck)
                self._backpressure()
                batch = self._take()
                started = time.perf_counter()
                with self._processing_batch():
                    outputs = self.processor.process(batch) if batch else []
                    if tick_s is not None and time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + tick_s
                        outputs += self.processor.process([])
                if self.exactly_once:
                    self._transact(batch, outputs)
                elif checkpoint is None:
                    self._send(batch, outputs)
                    self._settle()
                    self._commit_due()
                else:
                    self._write(outputs)
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
            if self.exactly_once:
                self._end_transaction()
        finally:
            self._stop.set()  # (the transaction watch ends too)
            deadline = self._exit_after(STOP_DEADLINE_S) if process else None
            try:
                self.producer.flush(30)
                if checkpoint is None and not self.exactly_once:
                    self._settle(raising=False)  # what was acknowledged is committed
                    self._commit_now(None)
                # a static member stays in the group: its partitions wait for it to come
                # back until the session times out; a dynamic one leaves
                self.consumer.close()
            finally:
                if self._txn_thread is not None:
                    self._txn_thread.close()
                if deadline is not None:
                    deadline.cancel()

    # -- offsets (at least once) --

    def _send(self, batch: list[Message], outputs: list[Output]) -> None:
        """Produce a batch's outputs without waiting for their acks (``_settle`` marks
        its offsets committable once they are in); at most ``MAX_IN_FLIGHT`` batches
        wait at once."""
        if not batch and not outputs:
            return
        offsets: dict[tuple[str, int], int] = {}
        firsts: dict[tuple[str, int], int] = {}
        for m in batch:
            offsets[(m.topic, m.partition)] = m.offset + 1
            firsts.setdefault((m.topic, m.partition), m.offset)
        entry = _InFlight(offsets, firsts, len(outputs), len(outputs), time.monotonic())
        prod = self.producer
        for o in outputs:
            produce_one(prod, o.topic, o.key, o.value, entry.on_delivery)
        self._in_flight.append(entry)
        while len(self._in_flight) > MAX_IN_FLIGHT:
            prod.poll(0.05)
            self._settle()

    def _settle(self, raising: bool = True) -> None:
        """Serve the producer's delivery reports and make committable the offsets of
        the batches acknowledged so far, in order. Raises (``raising``) when an output
        was refused, or a batch has waited ``write_timeout_s`` for its acks: the
        batches from it on are then not committed, and are consumed again after a
        restart."""
        self.producer.poll(0)
        queue = self._in_flight
        while queue and queue[0].waiting <= 0:
            entry = queue[0]
            if entry.errors:  # it stays first: no batch after it is ever marked
                if raising:
                    raise KafkaIOError(f"outputs refused: {entry.errors[:3]}")
                return
            queue.popleft()
            self._committable.update(entry.offsets)
            down = self._kafka_down_since
            if entry.outputs and down is not None and entry.since >= down:
                # the broker is back (an ack of a batch sent before the outage was
                # seen says nothing: it may have come in just before the broker went)
                self._kafka_up()
        if queue and raising:
            waited = time.monotonic() - queue[0].since
            if waited > 1.0:
                late = self._late
                if late is None or late[0] is not queue[0]:
                    late = self._late = (queue[0], self._stuck_watch())
                try:
                    late[1](sum(e.waiting for e in queue))  # reports the late acks
                except _StuckProducer as stuck:
                    self._consume_unacknowledged_again(stuck.waiting)
                    return
            if waited > self.settings.write_timeout_s:
                raise KafkaIOError(
                    f"{sum(e.waiting for e in queue)} outputs unacknowledged after "
                    f"{waited:.0f}s (write_timeout_s)"
                )

    def _drain_writes(self) -> None:
        """Wait until every batch produced is acknowledged (or the write timeout)."""
        while self._in_flight:
            self.producer.poll(0.05)
            self._settle()

    def _pending(self, partitions: set[tuple[str, int]] | None) -> list[TopicPartition]:
        return [
            TopicPartition(t, p, o)
            for (t, p), o in self._committable.items()
            if self._committed.get((t, p)) != o and (partitions is None or (t, p) in partitions)
        ]

    def _commit_due(self) -> None:
        """Commit the latest offsets asynchronously: at most one commit in flight, at most
        one per ``commit_interval_s``."""
        now = time.monotonic()
        if self._commit_in_flight or now < self._next_commit:
            return
        offsets = self._pending(None)
        if not offsets:
            return
        self._next_commit = now + self.settings.commit_interval_s
        self._commit_in_flight = True
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # e.g. no assignment any more: the next one retries
            self._commit_in_flight = False
            log.warning("offset commit not sent: %s", exc)
            return
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def _commit_now(self, partitions: set[tuple[str, int]] | None) -> None:
        """Commit the final offsets of ``partitions`` (None: all) and wait for the broker."""
        offsets = self._pending(partitions)
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # what was not committed is replayed (dedup)
                log.warning("final offset commit failed: %s", exc)
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        self._commit_in_flight = False
        if err is not None:
            # the offsets stay committable: the next commit sends them again
            log.warning("offset commit failed: %s", err)
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if self._committed.get(key) == tp.offset:
                    del self._committed[key]

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions go to another member: commit what was acknowledged on them first
        (called inside a poll, so no batch is half done and no transaction is open)."""
        if self._replaced(consumer):
            return
        gone = {(tp.topic, tp.partition) for tp in partitions}
        if self.exactly_once:
            self._end_transaction()  # the open transaction holds their offsets
        else:
            self._drain_writes()  # the batches read from them must be acknowledged first
            self._commit_now(gone)
        self._forget(gone)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a revoke (the session expired): they may be
        someone else's already, so nothing is committed for them (an open transaction
        is aborted and what it read read again)."""
        if self._replaced(consumer):
            return
        if self.exactly_once and self._txn_started is not None:
            self._abort()
            self._rewind()
        self._forget({(tp.topic, tp.partition) for tp in partitions})

    def _replaced(self, consumer: Any) -> bool:
        """Whether a rebalance callback comes from a consumer replaced since
        (``_new_consumer``): its close, in a thread of its own, revokes what it held,
        which the host forgot as it replaced it."""
        return consumer is not self.consumer

    def _forget(self, partitions: set[tuple[str, int]]) -> None:
        for key in partitions:
            self._committable.pop(key, None)
            self._committed.pop(key, None)
            self._unread.discard(key)
            self._assigned_at.pop(key, None)
            for entry in self._in_flight:  # acknowledged later, they commit nothing here
                entry.offsets.pop(key, None)

    # -- transactions (exactly once) --

    def _transact(self, batch: list[Message], outputs: list[Output]) -> None:
        """Add the batch's outputs and offsets to the open transaction (beginning one if
        none is open); commit it once it has been open ``transaction_interval_s``."""
        if self._rewound_under_batch:
            if batch:
                self._drop_batch(batch)
                return
            self._rewound_under_batch = {}  # (a tick: it read nothing past them)
        prod = self.producer
        if batch or outputs:
            try:
                if self._txn_started is None:
                    prod.begin_transaction()
                    self._txn_started = time.monotonic()
                for o in outputs:
                    while True:
                        try:
                            prod.produce(o.topic, value=o.value, key=o.key)
                            break
                        except BufferError:  # local queue full: let deliveries drain
                            prod.poll(0.05)
            except KafkaException as exc:
                self._failed_transaction(exc, batch)
                return
            for m in batch:
                self._txn_first.setdefault((m.topic, m.partition), m.offset)
                self._txn_next[(m.topic, m.partition)] = m.offset + 1
        started = self._txn_started
        if (
            started is not None
            and time.monotonic() - started >= self.settings.transaction_interval_s
        ):
            self._end_transaction()

    def _commit_before_waiting(self) -> None:
        """The guard's hook, called as a batch starts waiting out an outage: commit the
        open transaction, which the broker would abort meanwhile. If that fails, its
        partitions are rewound under the batch in hand, which was read past them: that
        batch is dropped as it ends (``_drop_batch``) and read again after them.
        Committed with the next transaction, its offsets would pass what the failed one
        held, lost to a crash or a rebalance before they were read again."""
        with self._txn_lock:
            self._end_under_batch()

    def _end_under_batch(self) -> None:
        """``_commit_before_waiting``'s work, the lock held."""
        firsts = dict(self._txn_first)
        if not self._end_transaction():
            self._rewound_under_batch.update(firsts)

    @contextlib.contextmanager
    def _processing_batch(self) -> Iterator[None]:
        """The processor at work on a batch: meanwhile the transaction watch may end the
        open transaction. Raises what the watch raised (a transaction that could not be
        ended by any producer)."""
        if not self.exactly_once:
            yield
            return
        with self._txn_lock:
            self._processing = True
        try:
            yield
        finally:
            with self._txn_lock:
                self._processing = False
                failed, self._watch_failed = self._watch_failed, None
        if failed is not None:
            raise failed

    def _watch_transaction(self) -> None:
        """While the processor works on a batch, commit the open transaction (the
        batches before it) once it has been open ``TXN_WATCH_SHARE`` of
        ``transaction_timeout_s``, as the guard's hook does when a batch starts waiting
        out an outage. A Redis that stalls without an error (a ``CLIENT PAUSE``, a slow
        disk) holds a batch for seconds: the broker aborted the transaction under it
        and fenced the producer, and three of those within a minute stopped the stage
        (``FENCED_TIMES``), blaming another process."""
        limit = self.settings.transaction_timeout_s * TXN_WATCH_SHARE
        every = min(0.25, limit / 4)
        while not self._stop.wait(every):
            with self._txn_lock:
                started = self._txn_started
                if not self._processing or started is None:
                    continue
                if time.monotonic() - started < limit:
                    continue
                log.warning(
                    "%s: a batch still in process (Redis stalled, the process paused?) "
                    "holds the transaction open %.1f s: it is committed before the broker "
                    "aborts it at transaction_timeout_s (%g s)", self.processor.stage,
                    time.monotonic() - started,
                    self.settings.transaction_timeout_s,
                )  # fmt: skip
                try:
                    self._end_under_batch()
                except BaseException as exc:  # (a new producer refused): the main thread's
                    self._watch_failed = exc
                    return

    def _drop_batch(self, batch: list[Message]) -> None:
        """A batch read past offsets that were rewound under it: its outputs are dropped,
        and its partitions that were not rewound are, to its first offsets (the others are
        read again from earlier ones). It comes again, as a replay."""
        rewound, self._rewound_under_batch = self._rewound_under_batch, {}
        firsts: dict[tuple[str, int], int] = {}
        for m in batch:
            firsts.setdefault((m.topic, m.partition), m.offset)
        log.warning("%s: a batch read past a transaction that failed under it is read again",
                    self.processor.stage)  # fmt: skip
        self._rewind({key: o for key, o in firsts.items() if key not in rewound})

    def _end_transaction(self) -> bool:
        """Commit the open transaction with its offsets (``send_offsets_to_transaction``
        with the consumer's group metadata: a member of an older generation is fenced);
        on an abortable error, abort it and rewind to its first offsets. False if it
        failed."""
        if self._txn_started is None:
            return True
        try:
            if self._txn_next:
                self._txn_call(
                    self.producer.send_offsets_to_transaction,
                    [TopicPartition(t, p, o) for (t, p), o in self._txn_next.items()],
                    self.consumer.consumer_group_metadata(),
                )  # fmt: skip
            for attempt in range(3):
                try:
                    self._txn_call(self.producer.commit_transaction)
                    break
                except KafkaException as exc:
                    err = kafka_error(exc)
                    if attempt == 2 or err is None or not err.retriable():
                        raise
        except KafkaException as exc:
            self._failed_transaction(exc, [])
            return False
        if self._kafka_down_since is not None:  # committed: the broker answers
            self._kafka_up()
        self._txn_started = None
        self._txn_first.clear()
        self._txn_next.clear()
        return True

    def _txn_call(self, call: Callable[..., None], *args: Any) -> None:
        """``call(*args, transaction_timeout_s)``, a transactional call of the producer, on
        a thread of its own: these calls block while the broker is away, and the stage
        says it is degraded once one has waited ``TXN_LATE_S``. One that has not returned
        after ``TXN_GIVE_UP`` times its timeout raises ``_TIMED_OUT`` (the caller ends the
        transaction with a new producer) and is left to its thread."""
        timeout = self.settings.transaction_timeout_s
        if self._txn_thread is None:
            self._txn_thread = _CallThread(f"{self.processor.stage}-transaction")
        pending = self._txn_thread.submit(call, *args, timeout)
        try:
            pending.result(TXN_LATE_S)
            return
        except CallTimedOut:
            self._kafka_down("Kafka: a transaction waits for it")
        try:
            pending.result(max(0.0, timeout * TXN_GIVE_UP - TXN_LATE_S))
        except CallTimedOut:
            self._txn_thread.close()
            self._txn_thread = None
            name = getattr(call, "__name__", "a transactional call")
            raise KafkaException(KafkaError(
                KafkaError._TIMED_OUT,
                f"{name} has not returned in {timeout * TXN_GIVE_UP:g} s, past its own "
                f"timeout of {timeout:g} s",
            )) from None  # fmt: skip

    def _failed_transaction(self, exc: KafkaException, batch: list[Message]) -> None:
        """Abort the open transaction and rewind every partition it read (and ``batch``'s)
        to where it began, so that what it held is processed again. One that cannot be
        aborted (timed out: the broker away; fatal: the broker aborted it, as it does
        one open past ``transaction_timeout_s``, and took the producer's epoch) is ended
        by a new producer (``_renew_producer``)."""
        err = kafka_error(exc)
        for m in batch:
            self._txn_first.setdefault((m.topic, m.partition), m.offset)
        if err is not None and not err.fatal() and err.txn_requires_abort():
            log.warning("transaction aborted, its batches come again: %s", exc)
            self._abort()
        else:
            self._renew_producer(exc)
        self._rewind()

    def _abort(self) -> None:
        """Abort the open transaction; one that cannot be is ended by a new producer."""
        try:
            if self._txn_started is not None:
                self._txn_call(self.producer.abort_transaction)
        except KafkaException as exc:
            self._renew_producer(exc)
        self._txn_started = None
        self._txn_next.clear()

    def _renew_producer(self, exc: KafkaException) -> None:
        """A new transactional producer with our ``transactional.id`` in place of one
        whose transaction could not be ended: its ``init_transactions`` fences the old
        one and aborts what it left open, so nothing of it is read committed (what it
        read is read again: the caller rewinds). Seen after a broker restart: the
        scorer's offsets waited 10 s for a coordinator that was down, and the stage
        stopped. Asked again while Kafka is away, up to ``write_timeout_s``. Renewed
        ``FENCED_TIMES`` within ``FENCED_AGAIN_S``, it stops: another process with our
        id fences each new producer (and is fenced by it)."""
        times = _once_more(self._renewed_at)
        if times >= FENCED_TIMES:
            raise KafkaIOError(
                f"transaction failed ({exc}) {times} times within {FENCED_AGAIN_S:g} s: "
                f"another process may run with transactional.id "
                f"{transactional_id(self.settings)!r}; give each its own RIVERFLOW_INSTANCE_ID"
            ) from exc
        self._kafka_down(f"Kafka: transaction failed: {exc}")
        log.warning("%s: the transaction could not be ended (%s): a new producer with our "
                    "transactional.id aborts it, its batches come again",
                    self.processor.stage, exc)  # fmt: skip
        old, self._txn_started = self.producer, None
        self._txn_next.clear()

        def let_go() -> None:
            try:
                old.purge(in_queue=True, in_flight=True, blocking=False)
                old.flush(0)
            except KafkaException as closing:  # a fatal producer may refuse
                log.info("letting the old producer go: %s", closing)

        threading.Thread(target=let_go, name="fenced-producer", daemon=True).start()
        self.producer = self._make_producer(self._producer_config)
        deadline = time.monotonic() + self.settings.write_timeout_s
        while True:
            try:
                self.producer.init_transactions(self.settings.transaction_timeout_s)
                break
            except KafkaException as again:
                err = kafka_error(again)
                if err is None or not err.retriable() or time.monotonic() >= deadline:
                    raise KafkaIOError(f"no new transactional producer: {again}") from again
                log.warning("%s: a new transactional producer waits for Kafka: %s",
                            self.processor.stage, again)  # fmt: skip
        if self._kafka_down_since is not None:
            self._kafka_up()

    def _rewind(self, firsts: dict[tuple[str, int], int] | None = None) -> None:
        """The consumer moved back to ``firsts`` (default: the open transaction's,
        then forgotten)."""
        for (topic, partition), offset in (self._txn_first if firsts is None else firsts).items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its next owner reads it
                log.warning("rewind of %s[%d] skipped: %s", topic, partition, exc)
        if firsts is None:
            self._txn_first.clear()

    def _assign(self, positions: dict[int, int]) -> None:
        if len(self.sources) != 1:
            raise ValueError("positions are kept for one source topic only")
        source = self.sources[0]
        meta = self.consumer.list_topics(source, timeout=10).topics.get(source)
        if meta is None or meta.error is not None:
            raise KafkaIOError(f"no topic {source!r}")
        assigned = [TopicPartition(source, p, positions.get(p, OFFSET_BEGINNING))
                    for p in sorted(meta.partitions)]  # fmt: skip
        self.consumer.assign(assigned)
        self._on_assign(self.consumer, assigned)
        self._added = PartitionWatch(source, meta.partitions)

    def _take_added(self) -> None:
        """Partitions added to the source since it was assigned (the learner's labels
        topic altered to more partitions), assigned from their start: before, their
        labels were read only after a restart."""
        assert self._added is not None
        added = self._added.added(self.consumer)
        if added:
            source = self.sources[0]
            assigned = [TopicPartition(source, p, OFFSET_BEGINNING) for p in added]
            self.consumer.incremental_assign(assigned)
            self._on_assign(self.consumer, assigned)

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
        if self._added is not None:
            self._take_added()
        first = self.consumer.poll(self.settings.poll_s)
        if first is None:
            self._pace(0)
            self._watch_fetching()
            return []
        self._stall.heard()
        size = self.settings.batch_size
        raw = [first, *self.consumer.consume(size - 1, timeout=0)]
        short = min(size, LINGER_BATCH) - len(raw)
        if short > 0 and self.settings.linger_s and self._rate >= LINGER_FROM_RATE:
            # events come fast: a few ms more (at most linger_s) make the batch several
            # times larger, and with it everything paid per batch (a Redis call,
            # produce requests, the broker's fetches) several times smaller per event
            # (docs/benchmarks.md). Only up to about LINGER_BATCH: a batch that
            # gathered while the last one was processed goes at once (lingering on
            # it held each event ~50 ms at 11,000/s)
            linger = min(self.settings.linger_s, short / self._rate)
            raw += self.consumer.consume(short, timeout=linger)
        self._pace(len(raw))
        batch = []
        firsts: dict[tuple[str, int], int] = {}  # partitions read for the first time
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                # a fatal error may come as a message whose error has the code only
                fatal = err.fatal() or err.code() == KafkaError._FATAL
                if fatal and self.settings.instance_id and self.checkpoint is None:
                    self._rejoin(err)
                    return []
                if fatal:
                    raise KafkaException(err)
                # transient (a broker away, a poll interval exceeded): librdkafka
                # recovers by itself; the messages of this batch are still good
                log.warning("consumer: %s", err)
                continue
            # a message without error always has its topic, partition and offset
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            assert topic is not None and partition is not None and offset is not None
            if self._unread and (topic, partition) in self._unread:
                self._unread.discard((topic, partition))
                firsts[(topic, partition)] = offset
            ts_type, ts = m.timestamp()
            stamp = ts if ts_type != TIMESTAMP_NOT_AVAILABLE else None
            batch.append(Message(topic, partition, offset, m.key(), m.value(), stamp))
        if firsts:
            self._first_reads(firsts)
        return batch

    def _first_reads(self, firsts: dict[tuple[str, int], int]) -> None:
        """Log where partitions assigned to us are first read. Asks the group's
        committed offsets of the partitions not read from the log's start (once per
        assignment). One read past where it should begin (the committed offset, the
        log's start without one, or where the processor assigned it) skipped the
        offsets between: transaction markers and records of aborted transactions
        (read_committed), or records lost to the stage. A thread reads them again to
        tell which (``_look_into``): under exactly once a transaction's commit marker
        takes an offset, so a reader of a transactional topic skips one at nearly every
        restart or rebalance, which was a warning each time."""
        gaps = self._first_read_gaps(firsts)
        if gaps:
            threading.Thread(target=self._look_into, args=(gaps,), name="gap-look",
                             daemon=True).start()  # fmt: skip

    def _first_read_gaps(
        self, firsts: dict[tuple[str, int], int]
    ) -> list[tuple[str, int, int, int, str]]:
        """``_first_reads``' work: each partition read past where it should begin, as
        ``(topic, partition, from, to, where)``; the others are logged."""
        gaps: list[tuple[str, int, int, int, str]] = []
        lows = {}
        for (topic, partition), offset in firsts.items():
            low, _ = self.consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            )
            at = self._assigned_at.pop((topic, partition), -1)
            if at >= 0:  # assigned at a position the processor keeps (its checkpoint)
                expected = max(at, low)
                if offset > expected:
                    gaps.append((topic, partition, expected, offset,
                                 f"past where it was assigned ({at})"))  # fmt: skip
                else:
                    log.info("%s: %s[%d] read from offset %d on (assigned at %d)",
                             self.processor.stage, topic, partition, offset, at)  # fmt: skip
            elif low >= 0 and offset <= low:
                log.info("%s: %s[%d] read from offset %d on (the log's start)",
                         self.processor.stage, topic, partition, offset)  # fmt: skip
            else:
                lows[(topic, partition)] = low
        if not lows:
            return gaps
        try:
            asked = self.consumer.committed([TopicPartition(t, p) for t, p in lows], timeout=5)
        except KafkaException as exc:
            log.info("%s: the committed offsets of %s not read: %s",
                     self.processor.stage, sorted(lows), exc)  # fmt: skip
            return gaps
        committed = {(tp.topic, tp.partition): tp.offset for tp in asked}
        for (topic, partition), low in lows.items():
            offset, begin = firsts[(topic, partition)], committed.get((topic, partition), -1)
            # where the group's position began: its committed offset, the log's start
            # without one (auto.offset.reset=earliest, as for one the log no longer has)
            expected = max(begin, low) if begin >= 0 else low
            if expected < 0 or offset <= expected:
                log.info("%s: %s[%d] read from offset %d on", self.processor.stage, topic,
                         partition, offset)  # fmt: skip
                continue
            where = "committed" if begin >= 0 else "no offset committed; the log starts at"
            gaps.append((topic, partition, expected, offset,
                         f"past where it begins ({where} {expected})"))  # fmt: skip
        return gaps

    def _look_into(self, gaps: list[tuple[str, int, int, int, str]]) -> None:
        """Read the skipped offsets of each gap ``(topic, partition, from, to, where)``
        again, read_committed, with a consumer of no group: a committed record among
        them was lost to the stage (a warning), none means they were transaction
        markers or records of aborted transactions (info). Not read again within
        ``GAP_LOOK_S``, the gap is a warning that says so."""
        stage = self.processor.stage
        ends = {(t, p): to for t, p, _, to, _ in gaps}
        found = dict.fromkeys(ends, 0)
        why = f"not read again within {GAP_LOOK_S:g} s"
        try:
            look = self._make_consumer(self._groupless_config())
            try:
                look.assign([TopicPartition(t, p, start) for t, p, start, _, _ in gaps])
                deadline = time.monotonic() + GAP_LOOK_S
                while ends and time.monotonic() < deadline:
                    for m in look.consume(500, 0.2):
                        key, offset = (m.topic(), m.partition()), m.offset()
                        if m.error() is not None or offset is None or key not in ends:
                            continue
                        if offset < ends[key]:
                            found[key] += 1
                        else:
                            del ends[key]
            finally:
                look.close()
        except KafkaException as exc:
            why = f"not read again: {exc}"
        for topic, partition, start, to, where in gaps:
            head = (f"{stage}: {topic}[{partition}] read from offset {to} on, {where}: "
                    f"offsets {start}-{to - 1}")  # fmt: skip
            n = found[(topic, partition)]
            if n:
                log.warning("%s skipped: %d committed record(s) among them not read", head, n)
            elif (topic, partition) in ends:
                log.warning("%s skipped (records of aborted transactions, or not read; %s)",
                            head, why)  # fmt: skip
            else:
                log.info("%s hold no committed record (transaction markers, or records of "
                         "aborted transactions)", head)  # fmt: skip

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._replaced(consumer):
            return
        self._unread.update((tp.topic, tp.partition) for tp in partitions)
        self._assigned_at.update(((tp.topic, tp.partition), tp.offset) for tp in partitions)

    def _watch_fetching(self) -> None:
        """Reading from the processor's own positions (the learner), a consumer silent
        for ``STALL_S`` while the source has more is replaced (``_replace_stuck_consumer``
        assigns a new one there): seen after a broker restart, a consumer that fetched
        nothing again while Kafka answered, its labels never read and none timing out.
        A group's member is watched through its group instead (``_on_stats``); a paused
        consumer is not watched."""
        if self._paused:  # silent on purpose (_backpressure): not a stall
            self._stall.heard()
            return
        if self.checkpoint is None or self._group_stuck is not None or not self._stall.look():
            return
        positions = self.checkpoint.positions
        at = {tp.partition: positions.get(tp.partition, OFFSET_BEGINNING)
              for tp in self.consumer.assignment()}  # fmt: skip
        why = self._stall.check(self.consumer, self.sources[0], at)
        if why is not None:
            self._group_stuck = f"Kafka: the consumer stalled ({why})"

    def _pace(self, taken: int) -> None:
        """Follow the source's rate: an average over batches, each weighted by the time
        it covers (about the last quarter second: after a burst, a slow stream is
        served without lingering again within a second)."""
        now = time.monotonic()
        span = max(now - self._last_take, 1e-4)
        self._last_take = now
        weight = min(1.0, span / RATE_WINDOW_S)
        self._rate += weight * (taken / span - self._rate)

    def _backpressure(self) -> None:
        """Pause the assigned partitions while the processor accepts no input (the
        learner with its waiting list full), resume when it does; ticks go on."""
        accepting = getattr(self.processor, "accepting", None)
        if accepting is None or accepting() != self._paused:
            return
        partitions = self.consumer.assignment()
        if self._paused:
            self.consumer.resume(partitions)
            log.info("%s: reading again", self.processor.stage)
        else:
            self.consumer.pause(partitions)
            log.warning("%s: input paused until the processor catches up", self.processor.stage)
        self._paused = not self._paused

    def _rejoin(self, err: KafkaError) -> None:
        """The static member was fenced: a new consumer joins with the same instance id.

        A session that expired while the broker was unreachable ends this way (the
        old member's next request is refused once its id is taken over), and so
        does a second process started with our instance id. The first is survived
        (``_new_consumer``). The second fences us again and again soon after we
        rejoin: at ``FENCED_TIMES`` fences within ``FENCED_AGAIN_S`` the host stops
        with an error naming the setting.
        """
        times = _once_more(self._fenced_at)
        if times >= FENCED_TIMES:
            raise KafkaIOError(
                f"Kafka consumer stopped: {err}. Fenced {times} times within "
                f"{FENCED_AGAIN_S:g} s: another process is in group {self.settings.group!r} "
                f"as {self.settings.instance_id!r}; give each its own RIVERFLOW_INSTANCE_ID"
            )
        log.warning("consumer fenced (%s): rejoining group %s", err, self.settings.group)
        self._new_consumer()

    def _new_consumer(self) -> None:
        """Replace the consumer with a new one in the group (the same instance id), or
        assigned at the processor's positions when it keeps them (``Checkpointing``).

        Nothing is committed for the partitions (they may be another member's by
        now; an open transaction is aborted and what it read is read again by
        whoever owns them). The old consumer closes in a thread of its own, heard
        from no more (``_create_consumer``, ``_replaced``): the new one reads
        meanwhile. A wedged one's close hangs on its broker for as long as the broker
        handle does (librdkafka: a broker dropped from the metadata, as after a 20 s
        freeze of a single broker, was seen "terminating" for good); the process
        was deaf for ``CLOSE_WAIT_S`` more while it waited for it. With
        ``HUNG_CLOSES_MAX`` of them still closing, the host stops instead."""
        self._closing = [t for t in self._closing if t.is_alive()]
        if len(self._closing) >= HUNG_CLOSES_MAX:
            raise KafkaIOError(f"{len(self._closing)} replaced consumers have not finished "
                               "closing (each holds its client's threads and buffers): "
                               "stopping, for a new process")  # fmt: skip
        if self.exactly_once and self._txn_started is not None:
            self._abort()
        self._txn_first.clear()
        self._commit_in_flight = False
        self._forget(set(self._committable) | set(self._committed))
        for entry in self._in_flight:  # read by the old member: nothing to commit
            entry.offsets.clear()
        old = self.consumer
        self._group_lost_since = self._group_stuck = None
        self._reach = FreshReach()
        self.consumer = self._create_consumer()

        def close() -> None:
            started = time.monotonic()
            try:
                old.close()
            except (KafkaException, RuntimeError) as exc:  # a fatal consumer may refuse
                log.info("closing the replaced consumer: %s", exc)
            log.info("the replaced consumer closed after %.1f s", time.monotonic() - started)

        closing = threading.Thread(target=close, name="closing-consumer", daemon=True)
        closing.start()
        # one that closes at once (a fenced one) is gone before the new one joins
        closing.join(CLOSE_WAIT_S)
        if closing.is_alive():
            self._closing.append(closing)
        self._start_reading()

    def _start_reading(self) -> None:
        """The consumer joins the group on the sources, or, where the processor keeps
        its own positions (``Checkpointing``), is assigned every partition from them."""
        if self.checkpoint is None:
            self.consumer.subscribe(
                self.sources,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        else:
            self._assign(self.checkpoint.positions)

    def _create_consumer(self) -> Consumer:
        """A consumer whose callbacks (commits, errors, statistics) reach the host while
        it is the host's: a replaced one may go on serving them as it closes, in a
        thread of its own."""
        self._generation += 1
        generation = self._generation

        def current(callback: Callable[..., None]) -> Callable[..., None]:
            def served(*args: Any) -> None:
                if generation == self._generation:
                    callback(*args)

            return served

        callbacks = {"on_commit": current(self._on_commit),
                     "error_cb": current(self._on_client_error),
                     "stats_cb": current(self._on_stats)}  # fmt: skip
        return self._make_consumer({**callbacks, **self._consumer_config})

    # -- the group's coordinator (librdkafka statistics) --

    def _on_stats(self, raw: str) -> None:
        """librdkafka's statistics of the consumer (every ``STATS_S``, served by poll):
        no broker connected is an outage (degraded until a broker answers the probe);
        a group coordinator out of reach while a broker answers is degraded after
        ``GROUP_DEGRADED_TIMES`` session timeouts, and the consumer is replaced after
        ``GROUP_STUCK_TIMES`` (librdkafka has been seen waiting on it for good after
        a broker restart). Acted on by the loop, never inside the consumer's poll."""
        try:
            state = ConsumerState.parse(raw)
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            log.info("unreadable consumer statistics: %s", exc)
            return
        # (statistics written before a broker answered the probe are not news: served
        # just after it, they would say it down again for a second)
        if state.brokers_up is False and time.monotonic() - self._kafka_up_at > 1.5 * STATS_S:
            self._kafka_down("Kafka: no broker connected")
        if self.checkpoint is not None or state.coordinator is None:
            return  # no group
        if not state.coordinator or not state.brokers_up:
            # in the group, or Kafka away altogether (the outage says so)
            self._group_lost_since = None
            if self._group_degraded and self.metrics is not None:
                self.metrics.set_degraded(None, "group")
            self._group_degraded = False
            return
        now = time.monotonic()
        if self._group_lost_since is None:
            self._group_lost_since = now
        lost = now - self._group_lost_since
        session = self.settings.session_timeout_s
        group = self.settings.group
        why = f"Kafka: group {group} out of reach for {lost:.0f} s ({state.coordinator})"
        if lost >= GROUP_DEGRADED_TIMES * session and self.metrics is not None:
            self.metrics.set_degraded(why, "group")
            self._group_degraded = True
        if lost >= max(GROUP_STUCK_MIN_S, GROUP_STUCK_TIMES * session):
            self._group_stuck = why

    def _replace_stuck_consumer(self, why: str) -> None:
        """The group's coordinator stayed out of reach while a broker answered: a new
        consumer joins; stuck again soon after, the host stops (a supervisor starts a
        new process)."""
        now = time.monotonic()
        last = self._group_replaced_at
        if last is not None and now - last < GROUP_STUCK_AGAIN_S:
            raise KafkaIOError(f"{why}, again within {GROUP_STUCK_AGAIN_S:g} s of a new "
                               "consumer: stopping")  # fmt: skip
        log.warning("%s: a new consumer joins", why)
        self._group_replaced_at = now
        self._new_consumer()

    def _write(self, outputs: list[Output]) -> None:
        # Raises when an output is not acknowledged: the batch is then not committed
        # and will be consumed again after a restart.
        if not outputs:
            return
        records = [(o.topic, o.key, o.value) for o in outputs]
        deadline = time.monotonic() + self.settings.write_timeout_s
        while True:
            try:
                left = max(0.0, deadline - time.monotonic())
                produce_all(self.producer, records, left, self._stuck_watch())
                break
            except _StuckProducer as stuck:  # all of them again, through a new producer
                self._replace_producer(stuck.waiting)
        if self._kafka_down_since is not None:  # acknowledged: the broker is back
            self._kafka_up()

    def _stuck_watch(self) -> Callable[[int], None]:
        """Called with how many outputs wait (``produce_all``'s ``waiting``, and
        ``_settle``'s): reports late acks, and (in no transaction) raises
        ``_StuckProducer`` once they have waited ``STUCK_ACKS_S``
        and a new client has reached Kafka for ``DEAF_AFTER_S`` (asked every
        ``DEAF_PROBE_S``): a producer back from an outage reconnects within that."""
        started = time.monotonic()
        reach = FreshReach()

        def waiting(left: int) -> None:
            self._acks_late(left)
            now = time.monotonic()
            if self.exactly_once or now - started < STUCK_ACKS_S:
                return
            up = reach.reached_for(now, self._fresh_client_reaches_kafka, DEAF_PROBE_S)
            if up is not None and up >= DEAF_AFTER_S:
                raise _StuckProducer(left)

        return waiting

    def _consume_unacknowledged_again(self, waiting: int) -> None:
        """At least once, the producer stuck: a new one, and the consumer moved back to
        the first batch not acknowledged. Its batches and the ones after it are
        processed again (the store's event-id dedup serves the same outputs) and
        written through the new producer; the old one's are purged."""
        firsts: dict[tuple[str, int], int] = {}
        for entry in self._in_flight:
            for tp, offset in entry.firsts.items():
                firsts.setdefault(tp, offset)
        self._in_flight.clear()
        self._late = None
        self._replace_producer(waiting)
        self._rewind(firsts)

    def _replace_producer(self, waiting: int) -> None:
        """A new producer in place of one stuck (librdkafka #5430: a partition it was
        told has leader -1, as a broker shuts down, stays without a leader for good,
        "new leader-1 not found in cache"); the old one's messages are purged and it
        is let go in the background."""
        log.warning("%s: %d outputs unacknowledged for %.0f s while Kafka answers a new "
                    "client: a new producer writes them again", self.processor.stage,
                    waiting, STUCK_ACKS_S)  # fmt: skip
        old, self.producer = self.producer, self._make_producer(self._producer_config)

        def let_go() -> None:
            old.purge(in_queue=True, in_flight=True, blocking=False)
            old.flush(LET_GO_S)

        threading.Thread(target=let_go, name="stuck-producer", daemon=True).start()

    # -- Kafka outages (degraded on /healthz while they last) --

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's errors outside any request (served by poll and flush): every
        broker unreachable is an outage; the others it recovers from by itself."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._kafka_down(f"Kafka: {err.str()}")
        else:
            log.info("Kafka client: %s", err)

    def _acks_late(self, waiting: int) -> None:
        """A batch's outputs have waited over a second for their acks."""
        self._kafka_down(f"Kafka: {waiting} outputs wait for their acks")

    def _kafka_down(self, reason: str) -> None:
        now = time.monotonic()
        if self._kafka_down_since is None:
            log.warning("%s degraded: %s", self.processor.stage, reason)
            self._kafka_down_since = now
            self._next_probe = now + PROBE_S
        if self.metrics is not None:
            self.metrics.set_degraded(reason, "kafka")

    def _kafka_up(self) -> None:
        assert self._kafka_down_since is not None
        log.warning(
            "%s: Kafka reachable again after %.1fs",
            self.processor.stage, time.monotonic() - self._kafka_down_since,
        )  # fmt: skip
        self._kafka_down_since = None
        self._reach = FreshReach()
        self._kafka_up_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.set_degraded(None, "kafka")

    def _probe_kafka(self) -> None:
        """While degraded, ask a broker for the source's metadata every ``PROBE_S``: an
        answer ends the outage (a quiet stage writes nothing that could tell it)."""
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + PROBE_S
        try:
            self.consumer.list_topics(self.sources[0], timeout=PROBE_S)
        except KafkaException:
            self._check_deaf(now)
            return
        self._kafka_up()

    def _check_deaf(self, now: float) -> None:
        """Our consumer reaches no broker: does a new client? One that has for
        ``DEAF_AFTER_S`` while ours still has not means ours is stuck (seen after a
        broker restart under load: the consumer's statistics said no broker connected
        for over a minute, and no fetch came, while the other stages' clients were
        back within a second); a new consumer joins (``_replace_stuck_consumer``), or,
        reading from the processor's own positions (the learner), is assigned there."""
        up = self._reach.reached_for(now, self._fresh_client_reaches_kafka, DEAF_PROBE_S)
        if up is not None and up >= DEAF_AFTER_S:
            down = now - (self._kafka_down_since or now)
            self._group_stuck = (f"Kafka: the consumer reached no broker for {down:.0f} s, "
                                 f"while a new client has for {up:.0f} s")  # fmt: skip

    def _groupless_config(self) -> dict[str, Any]:
        """The consumer's settings for a client of its own that joins no group (it
        only names the group: librdkafka needs one) and reports no statistics."""
        return {k: v for k, v in self._consumer_config.items()
                if k not in ("group.instance.id", "statistics.interval.ms")}  # fmt: skip

    def _fresh_client_reaches_kafka(self) -> bool:
        """Whether a new consumer (in no group) gets the source's metadata."""
        try:
            client = self._make_consumer(self._groupless_config())
        except KafkaException as exc:
            log.info("a client to probe Kafka: %s", exc)
            return False
        try:
            client.list_topics(self.sources[0], timeout=PROBE_S)
            return True
        except KafkaException:
            return False
        finally:
            client.close()  # in no group: nothing to leave
