"""The confluent-kafka host, on clients built by the factories it is given: its client
settings are passed in, a batch's offsets are committed only after its outputs are
acknowledged, and each batch is reported to the stage's reporter."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, TopicPartition

from riverflow.stages.common import guarded
from riverflow.streams import confluent_host, kafka_io
from riverflow.streams.confluent_host import (
    LINGER_BATCH,
    Checkpointing,
    ClientSettings,
    ConfluentHost,
    ConsumerState,
    HostSettings,
)
from riverflow.streams.contracts import Message, Output
from riverflow.streams.kafka_io import KafkaIOError
from riverflow.streams.topics import Topics
from tests.conftest import REPO_ROOT
from tests.helpers import within


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        self._at = (topic, partition, offset)
        self._value = value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._at[0]

    def partition(self) -> int:
        return self._at[1]

    def offset(self) -> int:
        return self._at[2]

    def key(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, 1_000


class FakeConsumer:
    """Hands out ``pending`` (the first by poll, the rest by consume), then nothing."""

    def __init__(self, config: dict[str, Any], log: list[str], pending: list[FakeMessage]):
        self.config, self.log, self.pending = config, log, pending
        self.assigned: list[TopicPartition] = []
        self.callbacks: dict[str, Any] = {}
        self.commits: list[tuple[dict[tuple[str, int], int], bool]] = []
        self.unanswered: list[list[TopicPartition]] = []  # async commits, answered by a poll
        self.answer_commits = True
        self.seeks: list[tuple[int, int]] = []
        self.before_poll: Any = None
        self.arriving: list[FakeMessage] = []
        self.stats: list[str] = []  # librdkafka's statistics, one served by each poll
        self.committed_at: dict[int, int] = {}  # the group's committed offset per partition
        self.partition_count = 2  # of every topic, as the broker's metadata says
        # the committed records' offsets per partition, as a client of no group reads
        # them (host_on_fakes' ``logged``); None: the stage's own consumer
        self.logged: dict[int, list[int]] | None = None

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks
        self.log.append(f"subscribe {','.join(topics)}")

    def list_topics(self, topic: str, timeout: float) -> Any:
        meta = SimpleNamespace(partitions=dict.fromkeys(range(self.partition_count)), error=None)
        return SimpleNamespace(topics={topic: meta})

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions
        if self.logged is not None:
            logged = self.logged
            self.pending = [FakeMessage(tp.topic, tp.partition, o, b"") for tp in partitions
                            for o in logged.get(tp.partition, []) if o >= tp.offset]  # fmt: skip

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.log.append(f"incremental_assign {[(tp.partition, tp.offset) for tp in partitions]}")
        self.assigned = [*self.assigned, *partitions]

    def poll(self, timeout: float) -> FakeMessage | None:
        if self.before_poll is not None:
            self.before_poll(self)
        while self.answer_commits and self.unanswered:  # librdkafka serves callbacks in poll
            self.config["on_commit"](None, self.unanswered.pop(0))
        if self.stats:
            self.config["stats_cb"](self.stats.pop(0))
        return self.pending.pop(0) if self.pending else None

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        if timeout > 0:
            self.log.append(f"linger {timeout:g}")
            self.pending += self.arriving  # what comes while the batch lingers
            self.arriving = []
        taken, self.pending = self.pending[:n], self.pending[n:]
        return taken

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.log.append("commit" if asynchronous else "commit sync")
        self.commits.append(({(tp.topic, tp.partition): tp.offset for tp in offsets}, asynchronous))
        if asynchronous:
            self.unanswered.append(offsets)

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, tp.offset))
        self.pending.append(FakeMessage(tp.topic, tp.partition, tp.offset, b"again"))

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, 10

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.committed_at.get(tp.partition, -1001))
                for tp in partitions]  # fmt: skip

    def close(self) -> None:
        self.log.append("close")

    def assignment(self) -> list[TopicPartition]:
        return self.assigned

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.log.append(f"pause {len(partitions)}")

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.log.append(f"resume {len(partitions)}")


class FakeProducer:
    def __init__(self, config: dict[str, Any], log: list[str]) -> None:
        self.config, self.log = config, log
        self.fail_commits = 0
        self.commit_error = KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)
        self.unacked: list[int] = []  # what successive flushes leave unacknowledged
        self.deliveries: list[tuple[Any, Any]] = []  # (callback, error) not served yet
        self.acks_from = 0.0  # the broker acknowledges nothing before this (monotonic)
        self.refused: set[int] = set()  # which produce calls (0, 1, ...) the broker refuses
        self.produced = 0
        self.offsets_hang: threading.Event | None = None  # send_offsets returns once set
        self.abort_hang: threading.Event | None = None  # abort_transaction, the same

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any = None) -> None:
        self.log.append(f"produce {topic}")
        err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if self.produced in self.refused else None
        self.produced += 1
        if on_delivery is not None:
            self.deliveries.append((on_delivery, err))

    def _serve(self) -> None:
        """librdkafka serves delivery reports in poll and flush, once the broker acked."""
        if time.monotonic() < self.acks_from:
            return
        served, self.deliveries = self.deliveries, []
        for on_delivery, err in served:
            self.log.append("ack" if err is None else "refused")
            on_delivery(err, None)

    def poll(self, timeout: float) -> int:
        if time.monotonic() < self.acks_from:
            time.sleep(min(timeout, 0.01))
        self._serve()
        return 0

    def flush(self, timeout: float) -> int:
        self.log.append("flush")
        time.sleep(max(0.0, min(timeout, self.acks_from - time.monotonic())))
        self._serve()
        return self.unacked.pop(0) if self.unacked else 0

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.log.append("purge")

    def init_transactions(self, timeout: float) -> None:
        self.log.append("init_transactions")

    def begin_transaction(self) -> None:
        self.log.append("begin")

    def send_offsets_to_transaction(
        self, offsets: list[TopicPartition], metadata: Any, timeout: float
    ) -> None:
        assert metadata == "group-metadata"
        if self.offsets_hang is not None:
            self.offsets_hang.wait()
            return
        self.log.append("offsets " + ",".join(f"{tp.partition}:{tp.offset}" for tp in offsets))

    def commit_transaction(self, timeout: float) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            self.log.append("commit_transaction failed")
            raise KafkaException(self.commit_error)
        self.log.append("commit_transaction")

    def abort_transaction(self, timeout: float) -> None:
        if self.abort_hang is not None:
            self.abort_hang.wait()
            return
        self.log.append("abort")


class Echo:
    """A processor writing each message's value to ``out``; stops the host after ``stop_after``
    non-empty batches."""

    stage = "echo"

    def __init__(self, stop_after: int = 1) -> None:
        self.batches: list[list[Message]] = []
        self.stop_after = stop_after
        self.host: ConfluentHost | None = None

    def process(self, batch: Sequence[Message]) -> list[Output]:
        if batch:
            self.batches.append(list(batch))
            if len(self.batches) >= self.stop_after and self.host is not None:
                self.host.stop()
        return [Output("out", None, m.value or b"") for m in batch]

    def status(self) -> dict[str, float]:
        return {"batches": float(len(self.batches))}


class Reporter:
    """Records what a host reports (the stage's metrics exporter in production)."""

    def __init__(self) -> None:
        self.observed: list[tuple[list[Message], list[Output], str]] = []
        self.lag: dict[tuple[str, int], int] = {}
        self.status: dict[str, float] = {}
        self.degraded: list[tuple[str | None, str]] = []  # (reason, source), in order

    def observe(
        self, batch: Sequence[Message], outputs: Sequence[Output], seconds: float, dlq_topic: str
    ) -> None:
        self.observed.append((list(batch), list(outputs), dlq_topic))

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag[(topic, partition)] = lag

    def set_status(self, status: dict[str, float]) -> None:
        self.status = status

    def heartbeat(self) -> None:
        pass

    def set_degraded(self, reason: str | None, source: str = "stage") -> None:
        self.degraded.append((reason, source))


def host_on_fakes(
    processor: Echo, pending: list[FakeMessage], clients: dict[str, Any] | None = None,
    host: dict[str, Any] | None = None, logged: dict[int, list[int]] | None = None,
    **kwargs: Any,
) -> tuple[ConfluentHost, list[str]]:  # fmt: skip
    """A host on fake clients. The stage's consumers (made with the host's callbacks)
    hand out ``pending``; a client of no group (a probe, a look into skipped offsets)
    reads ``logged``, the committed records' offsets per partition."""
    log: list[str] = []

    def make_consumer(config: dict[str, Any]) -> FakeConsumer:
        if "on_commit" in config:
            return FakeConsumer(config, log, pending)
        apart = FakeConsumer(config, [], [])
        apart.logged = logged or {}
        return apart

    settings = ClientSettings(
        **(clients or {}),
        make_consumer=make_consumer,
        make_producer=lambda config: FakeProducer(config, log),
    )
    loop = HostSettings(
        "broker:9092", "group-a", batch_size=10, poll_s=0.01, dlq_topic="dlq", **(host or {})
    )
    host = ConfluentHost(processor, "in", loop, settings, **kwargs)
    processor.host = host
    return host, log


def run(host: ConfluentHost) -> None:
    # not the main thread: the host then leaves pytest's signal handlers alone
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


def run_raising(host: ConfluentHost) -> list[BaseException]:
    """``run``, for a host expected to stop by raising: what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            host.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    return raised


def test_client_settings_passed_in_are_laid_over_the_hosts_own() -> None:
    host, _ = host_on_fakes(
        Echo(), [], clients={"consumer": {"fetch.wait.max.ms": 1}, "producer": {"linger.ms": 0}}
    )
    consumer, producer = host.consumer.config, host.producer.config
    assert consumer["bootstrap.servers"] == "broker:9092" and consumer["group.id"] == "group-a"
    assert consumer["fetch.wait.max.ms"] == 1
    assert consumer["enable.auto.commit"] is False
    assert producer["linger.ms"] == 0 and producer["enable.idempotence"] is True


def test_a_batch_is_committed_after_its_outputs_are_acknowledged_and_reported() -> None:
    processor, reporter = Echo(), Reporter()
    pending = [FakeMessage("in", 0, 3, b"a"), FakeMessage("in", 1, 7, b"b")]
    host, log = host_on_fakes(processor, pending, metrics=reporter)
    run(host)
    assert [m.value for m in processor.batches[0]] == [b"a", b"b"]
    # produced without a flush; committable once both acks are in
    assert log[:6] == ["subscribe in", "produce out", "produce out", "ack", "ack", "commit"]
    assert host.consumer.commits[0] == ({("in", 0): 4, ("in", 1): 8}, True)
    batch, outputs, dlq = reporter.observed[0]
    assert [m.offset for m in batch] == [3, 7] and len(outputs) == 2 and dlq == "dlq"
    assert reporter.lag == {("in", 0): 6, ("in", 1): 2}  # high watermark 10
    assert reporter.status == {"batches": 1.0}


def test_checkpointed_positions_are_assigned_and_saved_after_writes_never_committed() -> None:
    processor, saved = Echo(), []
    positions = {1: 5}
    checkpoint = Checkpointing(
        positions, lambda: saved.append(len(processor.batches)),
        on_stop=lambda: [Output("out", None, b"final")],
    )  # fmt: skip
    host, log = host_on_fakes(processor, [FakeMessage("in", 1, 5, b"a")], checkpoint=checkpoint)
    run(host)
    assigned = {tp.partition: tp.offset for tp in host.consumer.assigned}
    assert assigned[1] == 5 and assigned[0] < 0  # partition 0 from the beginning
    assert "commit" not in log
    assert saved == [1, 1]  # after the batch's write, and after the final outputs' write
    assert log.count("flush") >= 2


def test_partitions_added_to_a_checkpointed_source_are_read_from_their_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The learner assigns itself every labels partition from its checkpoint. One added
    to the topic while it runs (``kafka-topics.sh --alter --partitions 3``) was read
    only after a restart; it is found within ``PARTITIONS_EVERY_S`` and read from its
    first offset. A partition read from where its checkpoint assigned it (0 at 3, the
    log starting at 0, nothing committed: the learner commits nothing) is no warning
    of skipped offsets, as it was at every learner's start."""
    caplog.set_level(logging.INFO, logger="riverflow.streams.confluent_host")
    monkeypatch.setattr(kafka_io, "PARTITIONS_EVERY_S", 0.0)
    processor = Echo(stop_after=2)
    checkpoint = Checkpointing({0: 3}, lambda: None)
    host, log = host_on_fakes(processor, [FakeMessage("in", 0, 3, b"a")], checkpoint=checkpoint)
    polls, sent = 0, False

    def partition_added(consumer: FakeConsumer) -> None:
        nonlocal polls, sent
        polls += 1
        if polls == 2:
            consumer.partition_count = 3
        if not sent and any(tp.partition == 2 for tp in consumer.assigned):
            consumer.pending.append(FakeMessage("in", 2, 0, b"new"))  # fetched once assigned
            sent = True

    host.consumer.before_poll = partition_added
    run(host)
    assert [[(m.partition, m.offset) for m in b] for b in processor.batches] == [[(0, 3)], [(2, 0)]]
    assert log.count("incremental_assign [(2, -2)]") == 1  # OFFSET_BEGINNING, once
    reads = [r.getMessage() for r in caplog.records if "read from offset" in r.getMessage()]
    assert reads == ["echo: in[0] read from offset 3 on (assigned at 3)",
                     "echo: in[2] read from offset 0 on (the log's start)"]  # fmt: skip
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and "read from offset" in r.getMessage()]  # fmt: skip


def stuck_producer(
    monkeypatch: pytest.MonkeyPatch, host: ConfluentHost, log: list[str]
) -> tuple[FakeProducer, list[FakeProducer]]:
    """The host's producer never acknowledged, with short stuck-producer timings: it,
    and the producers the host makes after it."""
    monkeypatch.setattr(confluent_host, "STUCK_ACKS_S", 0.5)
    monkeypatch.setattr(confluent_host, "DEAF_PROBE_S", 0.5)
    monkeypatch.setattr(confluent_host, "DEAF_AFTER_S", 1.0)
    stuck = host.producer
    stuck.acks_from, stuck.unacked = time.monotonic() + 3600, [1] * 1000
    made: list[FakeProducer] = []

    def new_producer(config: dict[str, Any]) -> FakeProducer:
        made.append(FakeProducer(config, log))
        return made[-1]

    host._make_producer = new_producer
    return stuck, made


def test_a_checkpointed_stage_whose_producer_is_stuck_writes_through_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librdkafka #5430, seen in a learner after a broker restart: a partition the
    producer was told has leader -1 (the broker shutting down) is never routed again,
    and its outputs wait for acks until ``write_timeout_s`` stops the stage. Once they
    have waited ``STUCK_ACKS_S`` and a new client has reached Kafka for
    ``DEAF_AFTER_S``, a new producer writes them again; the old one is purged."""
    processor, saved = Echo(), []
    checkpoint = Checkpointing({1: 5}, lambda: saved.append(len(processor.batches)))
    host, log = host_on_fakes(processor, [FakeMessage("in", 1, 5, b"a")], checkpoint=checkpoint)
    stuck, made = stuck_producer(monkeypatch, host, log)
    run(host)
    [fresh] = made
    assert fresh.config == stuck.config and fresh.produced == 1  # the output, again
    assert host.producer is fresh and saved == [1]  # written, then checkpointed
    assert within(5, lambda: "purge" in log)


def test_an_at_least_once_stage_whose_producer_is_stuck_consumes_its_batches_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scorer's path (at least once, outputs acknowledged in the background):
    with its producer stuck (librdkafka #5430), the batches from the first one not
    acknowledged are consumed again and their outputs written through a new
    producer, instead of the stage stopping at ``write_timeout_s``; nothing is
    committed past them before that."""
    processor = Echo(stop_after=3)
    first = [FakeMessage("in", 1, 5, b"a"), FakeMessage("in", 1, 6, b"b")]
    host, log = host_on_fakes(processor, first, host={"commit_interval_s": 0.0})
    host.settings = replace(host.settings, batch_size=1)  # two batches in flight
    stuck, made = stuck_producer(monkeypatch, host, log)
    run(host)
    [fresh] = made
    assert host.consumer.seeks == [(1, 5)]  # back to the first unacknowledged batch
    again = processor.batches[2]
    assert [(m.partition, m.offset, m.value) for m in again] == [(1, 5, b"again")]
    assert fresh.config == stuck.config and fresh.produced == 1 and "ack" in log
    assert host.producer is fresh and stuck.produced == 2
    committed = [offsets for offsets, _ in host.consumer.commits]
    assert committed and all(o == {("in", 1): 6} for o in committed)  # only once acked
    assert within(5, lambda: "purge" in log)


def batches(n: int, per: int = 2) -> list[FakeMessage]:
    """``n`` batches' worth of messages on partitions 0 and 1 (offsets 0, 1, ...)."""
    return [FakeMessage("in", i % 2, i // 2, b"x") for i in range(n * per)]


def test_commits_are_bounded_one_in_flight_and_the_final_offsets_committed_at_stop() -> None:
    # 20 batches, commits never answered: one async commit is sent, never one per batch
    processor = Echo(stop_after=20)
    host, log = host_on_fakes(processor, [], host={"commit_interval_s": 0.0})
    host.consumer.answer_commits = False
    host.settings = replace(host.settings, batch_size=2)
    host.consumer.pending = batches(20)
    run(host)
    assert len(processor.batches) == 20
    commits = host.consumer.commits
    assert [sync for _, sync in commits] == [True, False]  # one async in flight, one final
    assert commits[0][0] == {("in", 0): 1, ("in", 1): 1}  # after the first batch
    assert commits[-1][0] == {("in", 0): 20, ("in", 1): 20}  # the last batch's, synchronously
    assert log[-1] == "close" and log.index("commit sync") > max(
        i for i, e in enumerate(log) if e == "flush"
    )


def test_commits_follow_the_interval_with_the_latest_offsets() -> None:
    # answered at once, but at most one per interval: 1 h here, so one async + the final
    processor = Echo(stop_after=10)
    host, _ = host_on_fakes(processor, batches(10), host={"commit_interval_s": 3600.0})
    host.settings = replace(host.settings, batch_size=2)
    run(host)
    assert [sync for _, sync in host.consumer.commits] == [True, False]


def test_revoked_partitions_get_their_acknowledged_offsets_committed_synchronously() -> None:
    processor = Echo(stop_after=3)
    host, _ = host_on_fakes(processor, batches(2), host={"commit_interval_s": 3600.0})
    host.settings = replace(host.settings, batch_size=2)
    polls = 0

    def revoke_after_two_batches(consumer: FakeConsumer) -> None:
        nonlocal polls
        polls += 1
        if polls == 3:  # inside the poll after the second batch, as librdkafka calls it
            consumer.callbacks["on_revoke"](consumer, [TopicPartition("in", 1)])
            consumer.pending.append(FakeMessage("in", 0, 9, b"y"))

    host.consumer.before_poll = revoke_after_two_batches
    run(host)
    commits = host.consumer.commits
    assert commits[0] == ({("in", 0): 1, ("in", 1): 1}, True)
    assert commits[1] == ({("in", 1): 2}, False)  # on revoke: partition 1 only, and waited for
    assert commits[2] == ({("in", 0): 10}, False)  # at the stop: partition 1 is not ours


def test_offsets_skipped_at_a_partition_first_read_are_read_again_to_tell_a_loss_from_markers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # where a member began each partition assigned to it is logged once. Past the
    # group's committed offset (or past the log's start, with none committed) the
    # offsets between were skipped. Under exactly once a transaction's commit marker
    # takes an offset, and a reader of a transactional topic skipped one at nearly
    # every rebalance: a warning each time (seen: the monitor, "offsets 608-608
    # skipped", after a pause of the machine). They are read again: a committed record
    # there was lost to the stage (a warning), none is markers or aborted records
    monkeypatch.setattr(confluent_host, "GAP_LOOK_S", 0.3)
    processor = Echo(stop_after=2)
    # the log as a client of no group reads it, read_committed: partition 0 begins at
    # 3 (0-2 were a transaction's aborted records and its marker), partition 2 holds a
    # committed record at 5, partition 4 nothing the look reaches
    logged = {0: [3, 4, 5], 2: [5, 6], 3: [0], 1: [7]}
    host, _ = host_on_fakes(processor, [], logged=logged)
    host.consumer.committed_at = {1: 7, 2: 4, 4: 1}
    polls = 0

    def assigned_in_the_first_poll(consumer: FakeConsumer) -> None:
        nonlocal polls
        polls += 1
        if polls == 1:  # as librdkafka calls it, inside a poll
            consumer.callbacks["on_assign"](
                consumer, [TopicPartition("in", p) for p in (0, 1, 2, 3, 4)]
            )
            consumer.pending += [FakeMessage("in", 0, 3, b"a"), FakeMessage("in", 0, 4, b"b")]
        elif polls == 2:  # (partition 0 read on: logged once)
            consumer.pending += [FakeMessage("in", p, o, b"c")
                                 for p, o in ((0, 5), (1, 7), (2, 6), (3, 0), (4, 3))]  # fmt: skip

    host.consumer.before_poll = assigned_in_the_first_poll
    with caplog.at_level(logging.INFO, logger="riverflow.streams.confluent_host"):
        run(host)
        for thread in threading.enumerate():
            if thread.name == "gap-look":
                thread.join(10)
    assert len(processor.batches) == 2
    lines = {(r.levelname, r.getMessage()) for r in caplog.records
             if "read from offset" in r.getMessage()}  # fmt: skip
    assert lines == {
        ("INFO", "echo: in[0] read from offset 3 on, past where it begins (no offset "
                 "committed; the log starts at 0): offsets 0-2 hold no committed record "
                 "(transaction markers, or records of aborted transactions)"),
        ("INFO", "echo: in[3] read from offset 0 on (the log's start)"),
        ("INFO", "echo: in[1] read from offset 7 on"),
        ("WARNING", "echo: in[2] read from offset 6 on, past where it begins (committed "
                    "4): offsets 4-5 skipped: 1 committed record(s) among them not read"),
        ("WARNING", "echo: in[4] read from offset 3 on, past where it begins (committed "
                    "1): offsets 1-2 skipped (records of aborted transactions, or not read; "
                    "not read again within 0.3 s)"),
    }  # fmt: skip


def test_static_membership_and_session_settings_reach_the_consumer() -> None:
    host, _ = host_on_fakes(Echo(), [], host={"instance_id": "scorer-a", "session_timeout_s": 7.5})
    config = host.consumer.config
    assert config["group.instance.id"] == "scorer-a"
    assert config["session.timeout.ms"] == 7500 and config["heartbeat.interval.ms"] == 1500
    assert "transactional.id" not in host.producer.config


def test_exactly_once_commits_outputs_and_offsets_in_one_transaction_per_batch() -> None:
    processor = Echo(stop_after=2)
    host, log = host_on_fakes(
        processor, batches(2),
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 0},
    )  # fmt: skip
    host.settings = replace(host.settings, batch_size=2)
    assert host.producer.config["transactional.id"] == "group-a.scorer-a"
    assert host.consumer.config["isolation.level"] == "read_committed"
    run(host)
    assert log[:8] == [
        "init_transactions", "subscribe in", "begin", "produce out", "produce out",
        "offsets 0:1,1:1", "commit_transaction", "begin",
    ]  # fmt: skip
    assert not host.consumer.commits  # offsets go with the transaction only


def test_a_failed_transaction_is_aborted_and_its_batch_comes_again() -> None:
    processor = Echo(stop_after=2)
    host, log = host_on_fakes(
        processor, [FakeMessage("in", 0, 5, b"a"), FakeMessage("in", 1, 8, b"b")],
        host={"instance_id": "scorer-a", "exactly_once": True},
    )  # fmt: skip
    host.settings = replace(host.settings, transaction_interval_s=0)
    host.producer.fail_commits = 1
    run(host)
    assert log.count("abort") == 1 and host.consumer.seeks == [(0, 5), (1, 8)]
    assert [m.offset for m in processor.batches[1]] == [5, 8]  # read again from the seek
    assert log[-4:] == ["offsets 0:6,1:9", "commit_transaction", "flush", "close"]


# the broker away past the commit's timeout (a restart): the transaction can be neither
# committed nor aborted by this producer
TIMED_OUT = KafkaError(KafkaError._TIMED_OUT, "Failed to end transaction", retriable=True)


def test_a_transaction_that_cannot_be_ended_gets_a_new_producer_and_its_batch_again() -> None:
    """After a broker restart an exactly-once scorer's commit timed out and the stage
    stopped. A new producer with the same transactional.id fences the old one and
    aborts what it left open; the batch is read again and committed through it."""
    processor = Echo(stop_after=2)
    host, log = host_on_fakes(
        processor, [FakeMessage("in", 0, 5, b"a"), FakeMessage("in", 1, 8, b"b")],
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 0},
    )  # fmt: skip
    first = host.producer
    first.fail_commits, first.commit_error = 3, TIMED_OUT  # each of its 3 tries
    run(host)
    assert host.producer is not first
    assert host.producer.config["transactional.id"] == "group-a.scorer-a"
    assert log.count("init_transactions") == 2 and "abort" not in log  # (the new one aborts)
    assert host.consumer.seeks == [(0, 5), (1, 8)]
    assert [m.offset for m in processor.batches[1]] == [5, 8]  # read again from the seek
    assert log[-4:] == ["offsets 0:6,1:9", "commit_transaction", "flush", "close"]


def test_a_transactional_call_that_never_returns_is_given_up_for_a_new_producer() -> None:
    """After a broker restart librdkafka's send_offsets_to_transaction blocked for good,
    past its own timeout (librdkafka#5456), and the exactly-once scorer never scored
    again. The stage is degraded while the call waits; past 1.5 times the timeout it is
    given up, a new producer ends the transaction, and the batch comes again and commits."""
    processor = Echo(stop_after=2)
    reporter = Reporter()
    host, log = host_on_fakes(
        processor, [FakeMessage("in", 0, 5, b"a"), FakeMessage("in", 1, 8, b"b")],
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 0,
              "transaction_timeout_s": 1.0},
        metrics=reporter,
    )  # fmt: skip
    first = host.producer
    first.offsets_hang = threading.Event()
    started = time.monotonic()
    try:
        run(host)
    finally:
        first.offsets_hang.set()
    assert 1.5 <= time.monotonic() - started < 5
    assert host.producer is not first and log.count("init_transactions") == 2
    assert host.consumer.seeks == [(0, 5), (1, 8)]
    assert [m.offset for m in processor.batches[1]] == [5, 8]  # read again from the seek
    assert log[-4:] == ["offsets 0:6,1:9", "commit_transaction", "flush", "close"]
    waits = reporter.degraded.index(("Kafka: a transaction waits for it", "kafka"))
    assert "has not returned in 1.5 s" in str(reporter.degraded[waits + 1][0])
    assert reporter.degraded[-1] == (None, "kafka")  # up again once the new one committed


def test_an_abort_that_never_returns_is_given_up_for_a_new_producer_too() -> None:
    processor = Echo(stop_after=2)
    host, log = host_on_fakes(
        processor, [FakeMessage("in", 0, 5, b"a")],
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 0,
              "transaction_timeout_s": 1.0},
    )  # fmt: skip
    first = host.producer
    first.fail_commits, first.abort_hang = 1, threading.Event()  # an abortable error first
    try:
        run(host)
    finally:
        first.abort_hang.set()
    assert host.producer is not first and log.count("init_transactions") == 2
    assert [m.offset for m in processor.batches[1]] == [5]  # read again, then committed
    assert log[-4:] == ["offsets 0:6", "commit_transaction", "flush", "close"]


def test_transactions_failing_again_and_again_stop_the_host_naming_the_instance_id() -> None:
    """Another process with our transactional.id fences every new producer: the host
    stops with an error naming the setting, rather than fence it back for good."""
    host, log = host_on_fakes(
        Echo(stop_after=10), [FakeMessage("in", 0, 5, b"a")],
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 0},
    )  # fmt: skip

    def failing(config: dict[str, Any]) -> FakeProducer:
        made = FakeProducer(config, log)
        made.fail_commits, made.commit_error = 3, TIMED_OUT
        return made

    host._make_producer = failing
    host.producer = failing(host.producer.config)
    raised = run_raising(host)
    assert len(raised) == 1 and isinstance(raised[0], KafkaIOError)
    assert "3 times within 60 s" in str(raised[0]) and "RIVERFLOW_INSTANCE_ID" in str(raised[0])
    assert log.count("init_transactions") == 3


def test_exactly_once_needs_an_instance_id_and_a_consumer_group() -> None:
    with pytest.raises(ValueError, match="instance id"):
        host_on_fakes(Echo(), [], host={"exactly_once": True})
    with pytest.raises(ValueError, match="consumer group"):
        host_on_fakes(
            Echo(), [], host={"exactly_once": True, "instance_id": "a"},
            checkpoint=Checkpointing({}, lambda: None),
        )  # fmt: skip


def test_exactly_once_on_faust_is_refused_with_a_clear_error() -> None:
    from riverflow.errors import RiverflowError
    from riverflow.kafka_runtime import check_guarantee
    from riverflow.settings import Settings

    check_guarantee(Settings(host="faust"))  # at least once on Faust: fine
    with pytest.raises(RiverflowError, match="exactly_once needs the confluent host"):
        check_guarantee(Settings(host="faust", processing_guarantee="exactly_once"))


def test_the_default_instance_id_is_stable_and_tells_two_scorers_on_one_host_apart() -> None:
    from riverflow.kafka_runtime import instance_id
    from riverflow.settings import Settings

    first, again = instance_id("scorer", Settings()), instance_id("scorer", Settings())
    assert first == again and first.startswith("scorer-") and first.endswith("-9401")
    assert instance_id("scorer", Settings(metrics_port=9411)) != first
    assert instance_id("scorer", Settings(instance_id="blue-1")) == "blue-1"
    assert instance_id("scorer", Settings(metrics_port=0)) is None  # dynamic: nothing to tell


def test_a_transaction_spans_the_batches_of_its_interval_and_a_revoke_commits_it() -> None:
    processor = Echo(stop_after=3)
    host, log = host_on_fakes(
        processor, batches(2),
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 3600},
    )  # fmt: skip
    host.settings = replace(host.settings, batch_size=2)
    polls = 0

    def revoke_after_two_batches(consumer: FakeConsumer) -> None:
        nonlocal polls
        polls += 1
        if polls == 3:
            consumer.callbacks["on_revoke"](consumer, [TopicPartition("in", 1)])
            consumer.pending.append(FakeMessage("in", 0, 9, b"y"))

    host.consumer.before_poll = revoke_after_two_batches
    run(host)
    assert log.count("begin") == 2  # two batches in the first, the third in the second
    assert [e for e in log if e.startswith("offsets")] == ["offsets 0:2,1:2", "offsets 0:10"]
    assert log.index("offsets 0:2,1:2") < log.index("produce out", log.index("begin", 3))


class FencedMessage(FakeMessage):
    """What poll returns once the broker fenced a static member: a fatal error."""

    def __init__(self, flagged: bool = True) -> None:
        super().__init__("in", 0, -1, b"")
        self.flagged = flagged  # librdkafka may set the code without the fatal flag

    def error(self) -> Any:
        return KafkaError(KafkaError._FATAL, "Static consumer fenced", fatal=self.flagged)


def test_a_fenced_static_member_rejoins_and_stops_when_fenced_again_and_again() -> None:
    # once: what a session that expired while the broker was down ends in
    processor = Echo()
    pending = [FencedMessage(flagged=False), FakeMessage("in", 0, 0, b"a")]
    host, log = host_on_fakes(processor, pending, host={"instance_id": "monitor-a"})
    run(host)
    assert log[:3] == ["subscribe in", "close", "subscribe in"]
    assert [m.value for m in processor.batches[0]] == [b"a"]
    assert host.consumer.config["group.instance.id"] == "monitor-a"
    # twice within a minute (two broker restarts that outlast the session): rejoined
    processor = Echo()
    pending = [FencedMessage(), FencedMessage(), FakeMessage("in", 0, 0, b"b")]
    host, log = host_on_fakes(processor, pending, host={"instance_id": "monitor-a"})
    run(host)
    assert log.count("close") >= 2 and [m.value for m in processor.batches[0]] == [b"b"]
    # three times within a minute: another process runs with our instance id
    host, log = host_on_fakes(Echo(), [FencedMessage(), FencedMessage(), FencedMessage()],
                              host={"instance_id": "monitor-a"})  # fmt: skip
    raised = run_raising(host)
    assert len(raised) == 1 and "RIVERFLOW_INSTANCE_ID" in str(raised[0])


class Picky(Echo):
    """Accepts input only while fewer than ``room`` messages are held back (the learner
    with its waiting list full); a tick lets one go."""

    def __init__(self, room: int) -> None:
        super().__init__(stop_after=99)
        self.room, self.held = room, 0
        self.ticks = 0

    def accepting(self) -> bool:
        return self.held < self.room

    def process(self, batch: Sequence[Message]) -> list[Output]:
        if not batch:
            self.ticks += 1
            self.held = max(0, self.held - 1)
            if self.ticks >= 5 and self.host is not None:
                self.host.stop()
            return []
        self.held += len(batch)
        return super().process(batch)


def test_input_is_paused_while_the_processor_accepts_none_and_resumed_after() -> None:
    processor = Picky(room=2)
    pending = [FakeMessage("in", 0, o, b"x") for o in range(3)]
    positions = {0: 0}
    host, log = host_on_fakes(
        processor, pending, host={"tick_s": 0.0},
        checkpoint=Checkpointing(positions, after_write=lambda: None),
    )  # fmt: skip
    run(host)
    # 3 held (> room 2): paused; ticks let them go; resumed once there is room
    assert "pause 2" in log and "resume 2" in log
    assert log.index("pause 2") < log.index("resume 2")


def test_a_transient_consumer_error_is_logged_and_the_batch_goes_on() -> None:
    class Transient(FakeMessage):
        def error(self) -> Any:
            return KafkaError(KafkaError._MAX_POLL_EXCEEDED, "poll interval exceeded")

    processor = Echo()
    pending = [FakeMessage("in", 0, 0, b"a"), Transient("in", 0, -1, b""),
               FakeMessage("in", 0, 1, b"b")]  # fmt: skip
    host, _ = host_on_fakes(processor, pending)
    run(host)
    assert [m.value for m in processor.batches[0]] == [b"a", b"b"]


def test_an_exactly_once_host_commits_its_transaction_before_its_guard_waits() -> None:
    # a batch waiting out Redis must not hold a transaction the broker aborts meanwhile
    guard = guarded(Echo(), Topics("t"))
    host, _ = host_on_fakes(guard, [], host={"instance_id": "scorer-a", "exactly_once": True})
    assert guard.on_wait == [host._commit_before_waiting]
    plain = guarded(Echo(), Topics("t"))
    host_on_fakes(plain, [])
    assert plain.on_wait == []


def before_polls(steps: dict[int, Callable[[FakeConsumer], None]]) -> Callable[..., None]:
    """A ``before_poll`` that runs ``steps[n]`` before the consumer's n-th poll."""
    polls = 0

    def before(consumer: FakeConsumer) -> None:
        nonlocal polls
        polls += 1
        if polls in steps:
            steps[polls](consumer)

    return before


def second_batch(consumer: FakeConsumer) -> None:
    """Partition 0 at 6 and partition 1 at 8 arrive (after the first batch, 0 at 5)."""
    consumer.pending += [FakeMessage("in", 0, 6, b"b"), FakeMessage("in", 1, 8, b"c")]


class WaitsInItsSecondBatch(Echo):
    """Its second batch waits out an outage: the guard's hook runs in the middle of it."""

    def process(self, batch: Sequence[Message]) -> list[Output]:
        if len(self.batches) == 1 and batch and self.host is not None:
            self.host._commit_before_waiting()
        return super().process(batch)


def test_a_batch_read_past_a_transaction_that_failed_while_it_waited_is_read_again() -> None:
    """The open transaction (partition 0 at 5) is committed as the next batch (0 at 6, 1
    at 8) starts waiting out Redis, and fails: partition 0 is rewound to 5 under that
    batch. Committed with the next transaction, the batch's offsets would pass 5, whose
    prediction was aborted: lost to a crash or a rebalance before it was read again
    (here a revoke of another partition commits at once). The batch is dropped, its
    partition 1 rewound too, and both are read again."""
    processor = WaitsInItsSecondBatch(stop_after=3)
    host, log = host_on_fakes(
        processor, [FakeMessage("in", 0, 5, b"a")],
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 3600},
    )  # fmt: skip
    host.settings = replace(host.settings, batch_size=2)
    host.producer.fail_commits = 1  # abortable

    def revoke(consumer: FakeConsumer) -> None:
        consumer.callbacks["on_revoke"](consumer, [TopicPartition("in", 2)])

    host.consumer.before_poll = before_polls({2: second_batch, 3: revoke})
    run(host)
    # (the fake consumer hands out the message at each seek, not the ones after it)
    assert [[m.offset for m in b] for b in processor.batches] == [[5], [6, 8], [5, 8]]
    assert host.consumer.seeks == [(0, 5), (1, 8)]
    assert [e for e in log if e.startswith("offsets")] == ["offsets 0:6", "offsets 0:6,1:9"]
    assert log.count("produce out") == 3  # the dropped batch's outputs never went out


class SlowSecondBatch(Echo):
    """Its second batch takes ``seconds`` (Redis stalled without an error), logged."""

    def __init__(self, seconds: float, log: list[str], stop_after: int) -> None:
        super().__init__(stop_after)
        self.seconds, self.log = seconds, log

    def process(self, batch: Sequence[Message]) -> list[Output]:
        if len(self.batches) == 1 and batch:
            self.log.append("slow batch starts")
            time.sleep(self.seconds)
            self.log.append("slow batch ends")
        return super().process(batch)


def slow_second_batch(fail_commits: int, batches: int) -> tuple[SlowSecondBatch, list[str]]:
    """A host whose transactions end only by stop or its watch (an interval of an hour),
    timing out after 1 s, stopping after ``batches``; the second batch takes 0.9 s."""
    log: list[str] = []
    processor = SlowSecondBatch(0.9, log, stop_after=batches)
    host, _ = host_on_fakes(
        processor, [FakeMessage("in", 0, 5, b"a")],
        host={"instance_id": "scorer-a", "exactly_once": True, "transaction_interval_s": 3600,
              "transaction_timeout_s": 1.0},
    )  # fmt: skip
    host.consumer.log = host.producer.log = log
    host.settings = replace(host.settings, batch_size=2)
    host.producer.fail_commits = fail_commits
    host.consumer.before_poll = before_polls({2: second_batch})
    run(host)
    return processor, log


def test_a_transaction_open_under_a_slow_batch_is_committed_before_the_broker_aborts_it() -> None:
    """A batch held by a Redis that stalls without an error (CLIENT PAUSE) outlived the
    transaction open under it (the batch before, partition 0 at 5): the broker aborted
    it at ``transaction_timeout_s`` and fenced the producer, and three such stalls in a
    minute stopped the stage. It is committed while the batch is processed, half way to
    the timeout; the slow batch's outputs go in the next transaction."""
    processor, log = slow_second_batch(fail_commits=0, batches=2)
    assert [[m.offset for m in b] for b in processor.batches] == [[5], [6, 8]]
    slow = log[log.index("slow batch starts") : log.index("slow batch ends")]
    assert slow == ["slow batch starts", "offsets 0:6", "commit_transaction"]
    assert "abort" not in log
    # the slow batch's transaction, committed at the stop
    assert [e for e in log if e.startswith("offsets")] == ["offsets 0:6", "offsets 0:7,1:9"]


def test_a_transaction_the_watch_could_not_commit_has_the_slow_batch_read_again() -> None:
    """The watch's commit fails (abortable): the transaction is aborted and partition 0
    rewound to 5 under the slow batch, which is dropped as it ends and read again, as
    when the guard's hook fails: nothing of it is committed past what was aborted."""
    processor, log = slow_second_batch(fail_commits=1, batches=3)
    slow = log[log.index("slow batch starts") : log.index("slow batch ends")]
    assert slow == ["slow batch starts", "offsets 0:6", "commit_transaction failed", "abort"]
    assert [[m.offset for m in b] for b in processor.batches] == [[5], [6, 8], [5, 8]]
    assert log.count("produce out") == 3  # the slow batch's outputs never went out


class StopsWhenUp(Reporter):
    """Stops the processor's host once the stage is no longer degraded."""

    def __init__(self, processor: Echo) -> None:
        super().__init__()
        self.processor = processor

    def set_degraded(self, reason: str | None, source: str = "stage") -> None:
        super().set_degraded(reason, source)
        if reason is None and self.processor.host is not None:
            self.processor.host.stop()


def test_outputs_waiting_for_their_acks_make_the_stage_degraded_until_acknowledged() -> None:
    processor = Echo(stop_after=99)
    reporter = StopsWhenUp(processor)
    host, log = host_on_fakes(processor, [FakeMessage("in", 0, 0, b"a")], metrics=reporter)
    host.producer.acks_from = time.monotonic() + 1.5  # the broker away for 1.5 s
    run(host)
    late = ("Kafka: 1 outputs wait for their acks", "kafka")
    assert reporter.degraded[0] == late and reporter.degraded[-1] == (None, "kafka")
    assert set(reporter.degraded[:-1]) == {late}
    assert log.index("commit") > log.index("ack")  # committed only once acknowledged
    assert len(reporter.observed) == 1  # the stage went on meanwhile


def stats(broker: str = "UP", group: str | None = "up", coordinator: str = "UP") -> str:
    """librdkafka's statistics of a consumer, cut to what the host reads (the field
    names are checked against a real consumer's in tests/integration)."""
    brokers: dict[str, Any] = {
        "127.0.0.1:9092/1": {"nodeid": 1, "source": "learned", "state": broker},
    }
    out: dict[str, Any] = {"name": "rdkafka#consumer-1", "brokers": brokers}
    if group is not None:
        brokers["GroupCoordinator"] = {"nodeid": -1, "source": "logical", "state": coordinator}
        out["cgrp"] = {"state": group, "join_state": "steady", "assignment_size": 2}
    return orjson.dumps(out).decode()


def test_consumer_statistics_say_whether_a_broker_and_the_group_coordinator_are_reached() -> None:
    assert ConsumerState.parse(stats()) == ConsumerState(True, "")
    assert ConsumerState.parse(stats(group=None)) == ConsumerState(True, None)
    assert ConsumerState.parse(stats("CONNECT", "wait-coord", "DOWN")) == ConsumerState(
        False, "group state wait-coord, coordinator connection DOWN"
    )
    # the coordinator's connection alone counts: a member with no partitions fetches
    # nothing, so its broker connection may be idle
    assert ConsumerState.parse(stats("INIT")) == ConsumerState(True, "")
    assert ConsumerState.parse(stats(coordinator="TRY_CONNECT")).coordinator == (
        "coordinator connection TRY_CONNECT"
    )
    assert ConsumerState.parse('{"brokers": {}}') == ConsumerState(None, None)  # none known
    # all learned brokers down, librdkafka re-bootstraps: it drops them for the bootstrap
    # ones (seen in CI: the outage went unseen when only learned brokers counted)
    rebootstrapping = {"brokers": {"127.0.0.1:9092/bootstrap": {
        "nodeid": -1, "source": "configured", "state": "CONNECT"}}}  # fmt: skip
    assert ConsumerState.parse(orjson.dumps(rebootstrapping)).brokers_up is False


def test_no_broker_connected_makes_the_stage_degraded_until_a_broker_answers() -> None:
    # librdkafka's _ALL_BROKERS_DOWN may never come (it counts only brokers that tried
    # to connect since): the statistics tell it every second
    processor = Echo(stop_after=99)
    reporter = StopsWhenUp(processor)
    host, _ = host_on_fakes(processor, [], metrics=reporter)
    host.consumer.stats = [stats("CONNECT", "wait-coord", "CONNECT")]
    run(host)  # the probe (a metadata request) answers after PROBE_S
    assert reporter.degraded == [("Kafka: no broker connected", "kafka"), (None, "kafka")]


def test_a_consumer_whose_group_coordinator_stays_out_of_reach_is_replaced_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # seen after a broker restart: librdkafka's JoinGroup waited in the coordinator's
    # out-queue for good while the broker answered everything else
    monkeypatch.setattr(confluent_host, "GROUP_STUCK_MIN_S", 0.0)
    log: list[str] = []
    consumers: list[FakeConsumer] = []
    stuck = stats(group="wait-broker-transport", coordinator="CONNECT")
    feeds = [
        [stuck] * 1000,  # 0.08 s (4 session timeouts) at a poll every 0.01 s: replaced
        [stats()] * 3 + [stuck] * 1000,  # the new one joins, then is out of reach again
    ]

    def make_consumer(config: dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(config, log, [])
        consumer.stats = feeds[len(consumers)]
        consumer.before_poll = lambda _: time.sleep(0.01)  # nothing comes: poll waits
        consumers.append(consumer)
        return consumer

    clients = ClientSettings(
        make_consumer=make_consumer, make_producer=lambda config: FakeProducer(config, log)
    )
    settings = HostSettings(
        "broker:9092", "group-a", batch_size=10, poll_s=0.01, dlq_topic="dlq",
        instance_id="scorer-a", session_timeout_s=0.02,
    )  # fmt: skip
    reporter = Reporter()
    host = ConfluentHost(Echo(), "in", settings, clients, metrics=reporter)

    raised = run_raising(host)
    assert len(consumers) == 2 and consumers[0].config["group.instance.id"] == "scorer-a"
    assert log[:3] == ["subscribe in", "close", "subscribe in"]
    reasons = [r for r, source in reporter.degraded if source == "group"]
    assert reasons[0] is not None and reasons[0].startswith("Kafka: group group-a out of reach")
    assert None in reasons  # the new consumer was in the group a while
    assert len(raised) == 1 and "again within 600 s of a new consumer" in str(raised[0])


def unreachable(topic: str, timeout: float) -> Any:
    """A metadata request no broker answers."""
    raise KafkaException(KafkaError(KafkaError._TRANSPORT))


def quiet_host(
    processor: Echo, setup: Callable[[Any, int], None], consumer: type[FakeConsumer] = FakeConsumer,
    instance_id: str | None = None, **kwargs: Any,
) -> tuple[ConfluentHost, list[Any], list[str]]:  # fmt: skip
    """A host on fakes whose consumers have nothing to give (poll waits) unless ``setup``
    (given each consumer and how many were made before it) says otherwise; ``kwargs``:
    the host's own (metrics, checkpoint). The host, every consumer it made, the clients'
    log."""
    log: list[str] = []
    made: list[Any] = []

    def make_consumer(config: dict[str, Any]) -> FakeConsumer:
        made_one = consumer(config, log, [])
        made_one.before_poll = lambda _: time.sleep(0.005)  # nothing comes: poll waits
        setup(made_one, len(made))
        made.append(made_one)
        return made_one

    clients = ClientSettings(
        make_consumer=make_consumer, make_producer=lambda config: FakeProducer(config, log)
    )
    settings = HostSettings("broker:9092", "group-a", batch_size=10, poll_s=0.01,
                            dlq_topic="dlq", instance_id=instance_id)  # fmt: skip
    host = ConfluentHost(processor, "in", settings, clients, **kwargs)
    processor.host = host
    return host, made, log


def deaf_host(
    monkeypatch: pytest.MonkeyPatch, processor: Echo, reporter: Reporter, others_reach: bool,
    checkpoint: Checkpointing | None = None,
) -> tuple[ConfluentHost, list[FakeConsumer], list[str]]:  # fmt: skip
    """A host whose first consumer reaches no broker for good (its statistics say so,
    its metadata requests fail); the clients made after it reach one if
    ``others_reach``. The host, every consumer it made, the clients' log."""
    monkeypatch.setattr(confluent_host, "DEAF_PROBE_S", 0.0)
    monkeypatch.setattr(confluent_host, "DEAF_AFTER_S", 0.05)
    monkeypatch.setattr(confluent_host, "PROBE_S", 0.01)

    def setup(consumer: FakeConsumer, before: int) -> None:
        if not before:
            consumer.stats = [stats("CONNECT", "wait-coord", "CONNECT")] * 10_000
        if not before or not others_reach:
            consumer.list_topics = unreachable  # type: ignore[method-assign]

    return quiet_host(processor, setup, metrics=reporter, checkpoint=checkpoint,
                      instance_id="scorer-a")  # fmt: skip


def test_a_consumer_that_reaches_no_broker_while_a_new_client_does_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # seen in CI after a broker restart: the scorer's consumer said "no broker
    # connected" for over a minute and fetched nothing; every other client was back
    reporter = StopsWhenUp(Echo(stop_after=99))
    host, made, log = deaf_host(monkeypatch, reporter.processor, reporter, others_reach=True)
    run(host)
    probes = [c for c in made[1:] if "group.instance.id" not in c.config]
    joined = [c for c in made[1:] if "group.instance.id" in c.config]
    # new clients in no group asked for metadata; then one consumer replaced the deaf one,
    # with our instance id, and its answer ended the outage
    assert probes and all(c.callbacks == {} for c in probes)
    assert len(joined) == 1 and joined[0].config["group.instance.id"] == "scorer-a"
    assert log.count("subscribe in") == 2
    assert reporter.degraded[0] == ("Kafka: no broker connected", "kafka")
    assert reporter.degraded[-1] == (None, "kafka")


def test_a_deaf_consumer_reading_from_the_processors_positions_is_assigned_there_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the learner: no group, every partition assigned from the positions it has read to
    positions = {0: 40, 1: 7}
    reporter = StopsWhenUp(Echo(stop_after=99))
    host, made, log = deaf_host(monkeypatch, reporter.processor, reporter, others_reach=True,
                                checkpoint=Checkpointing(positions, lambda: None))  # fmt: skip
    deaf = host.consumer
    answered = FakeConsumer.list_topics.__get__(deaf)  # its start: it was assigned
    deaf.list_topics = lambda topic, timeout: (  # type: ignore[method-assign]
        unreachable(topic, timeout) if deaf.assigned else answered(topic, timeout)
    )
    deaf.before_poll = lambda _: positions.update({1: 9})  # read on meanwhile
    run(host)
    assigned = [c for c in made if c.assigned]
    assert len(assigned) == 2 and "subscribe in" not in log  # the first, and its successor
    assert {(tp.partition, tp.offset) for tp in assigned[1].assigned} == {(0, 40), (1, 9)}
    assert reporter.degraded[-1] == (None, "kafka")


def test_a_consumer_is_not_replaced_while_no_new_client_reaches_a_broker_either(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, made, _ = deaf_host(monkeypatch, Echo(stop_after=99), Reporter(), others_reach=False)
    threading.Timer(0.5, host.stop).start()
    run(host)
    assert len(made) > 3  # it asked, with new clients, many times
    assert [c for c in made if "group.instance.id" in c.config] == made[:1]  # never replaced


def test_a_replaced_consumer_closing_apart_is_not_heard_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a wedged consumer's close may serve its statistics for long, in its own thread:
    # they must not count against the consumer that replaced it
    monkeypatch.setattr(confluent_host, "GROUP_STUCK_MIN_S", 0.0)
    host, _ = host_on_fakes(Echo(), [], host={"instance_id": "scorer-a",
                                              "session_timeout_s": 0.0})  # fmt: skip
    old = host.consumer
    host._new_consumer()
    stuck = stats(group="wait-broker-transport", coordinator="CONNECT")
    for _ in range(3):
        old.config["stats_cb"](stuck)
    assert host._group_stuck is None
    for _ in range(3):
        host.consumer.config["stats_cb"](stuck)
    assert host._group_stuck is not None


def test_a_replaced_consumer_whose_close_hangs_neither_holds_up_nor_reaches_its_successor() -> None:
    # seen after a broker frozen 20 s: librdkafka dropped the broker from the metadata,
    # and the monitor's consumer, deaf, was replaced; the old one's close then hung on
    # that broker's handle for good, and the monitor waited 10 s more for it
    host, log = host_on_fakes(Echo(), [], host={"instance_id": "monitor-a"})
    old = host.consumer
    host._start_reading()
    released = threading.Event()

    def hang() -> None:
        released.wait(30)
        # a close revokes what the consumer held (librdkafka serves it as it leaves)
        old.callbacks["on_revoke"](old, [TopicPartition("in", 0)])

    old.close = hang  # type: ignore[method-assign]
    replacing = threading.Thread(target=host._new_consumer, daemon=True)
    replacing.start()
    replacing.join(5)
    try:
        assert not replacing.is_alive(), "the new consumer waited for the old one's close"
        assert host.consumer is not old and log.count("subscribe in") == 2
        host._committable[("in", 0)] = 7  # acknowledged since, read by the new consumer
    finally:
        released.set()
    for thread in threading.enumerate():
        if thread.name == "closing-consumer":
            thread.join(10)
    # the old consumer's revoke touched nothing of its successor's
    assert host._committable == {("in", 0): 7} and not host.consumer.commits


def test_replaced_consumers_whose_close_never_ends_are_bounded() -> None:
    # each keeps its client (threads, buffers): without a bound, one leaked per
    # replacement for as long as the process lives
    host, _ = host_on_fakes(Echo(), [], host={"instance_id": "scorer-a"})
    host._start_reading()
    released = threading.Event()
    for _ in range(confluent_host.HUNG_CLOSES_MAX):
        host.consumer.close = lambda: released.wait(30)  # type: ignore[method-assign]
        host._new_consumer()
    try:
        host.consumer.close = lambda: released.wait(30)  # type: ignore[method-assign]
        with pytest.raises(KafkaIOError, match="3 replaced consumers have not finished"):
            host._new_consumer()
    finally:
        released.set()
    for thread in threading.enumerate():
        if thread.name == "closing-consumer":
            thread.join(10)
    host._new_consumer()  # once they have closed, replacing is allowed again


STUCK_ON_CLOSE = """
import time
from riverflow.streams import confluent_host
from tests.streams.test_confluent_host import Echo, host_on_fakes
confluent_host.STOP_DEADLINE_S = 1.0
host, _ = host_on_fakes(Echo(stop_after=99), [])
host.consumer.close = lambda: time.sleep(3600)  # a client that never returns
print("running", flush=True)
host.run()  # the main thread: the host takes SIGTERM
"""


def test_a_stop_is_obeyed_even_if_a_client_never_returns() -> None:
    # seen: a scorer wedged on its group coordinator ignored SIGTERM for over 60 s
    proc = subprocess.Popen([sys.executable, "-c", STUCK_ON_CLOSE], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"running\n"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1  # STOP_DEADLINE_S (1 s here) into the closing
    finally:
        proc.kill()
    assert proc.stderr is not None
    assert b"the Kafka clients did not close within 1 s" in proc.stderr.read()


def test_the_next_batch_is_processed_while_the_last_ones_acks_travel() -> None:
    processor = Echo(stop_after=3)
    host, log = host_on_fakes(processor, batches(3), host={"commit_interval_s": 0.0})
    host.settings = replace(host.settings, batch_size=2)
    host.producer.acks_from = time.monotonic() + 0.5
    run(host)
    assert len(processor.batches) == 3
    # all three batches produced before the first ack came back
    assert log.index("ack") > max(i for i, e in enumerate(log) if e == "produce out")
    assert host.consumer.commits[-1] == ({("in", 0): 3, ("in", 1): 3}, False)


def test_every_broker_down_makes_the_stage_degraded_until_a_broker_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("riverflow.streams.confluent_host.PROBE_S", 0.0)
    reporter = Reporter()
    host, _ = host_on_fakes(Echo(), [], metrics=reporter)
    consumer = host.consumer
    probes: list[str] = []

    def list_topics(topic: str, timeout: float) -> Any:
        probes.append(topic)
        if len(probes) < 3:  # the first two probes find no broker
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "connection refused"))
        host.stop()
        return None

    def before_poll(_: Any) -> None:
        if not reporter.degraded:  # librdkafka reports it from within a poll
            down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
            consumer.config["error_cb"](down)

    consumer.before_poll = before_poll
    consumer.list_topics = list_topics  # type: ignore[method-assign]
    run(host)
    assert probes == ["in"] * 3
    assert reporter.degraded == [("Kafka: 1/1 brokers are down", "kafka"), (None, "kafka")]


def test_a_batch_lingers_to_fill_only_while_events_come_fast() -> None:
    processor = Echo(stop_after=2)
    host, log = host_on_fakes(processor, batches(1), host={"linger_s": 0.02})
    host.settings = replace(host.settings, batch_size=1000)
    host._rate = 2_000.0  # a slow stream: served at once
    host.consumer.arriving = batches(1)
    host._take()
    assert not any(e.startswith("linger") for e in log)
    host._rate = 40_000.0  # a fast one: the batch waits until ~200 are in (~5 ms)
    host.consumer.pending = batches(1)
    batch = host._take()
    assert log[-1] == f"linger {(LINGER_BATCH - 2) / 40_000:g}" and len(batch) == 4
    host._rate = 5_000.0  # slower: it waits longer, but never past linger_s
    host.consumer.pending = batches(1)
    host._take()
    assert log[-1] == "linger 0.02"
    # what gathered while the last batch was processed is enough: it goes at once (a
    # batch lingering on top of it held each event ~50 ms at 11,000/s)
    lingered = len(log)
    host.consumer.pending = batches(1, per=LINGER_BATCH)
    assert len(host._take()) == LINGER_BATCH and len(log) == lingered


def test_a_refused_output_stops_the_host_and_nothing_from_its_batch_on_is_committed() -> None:
    processor = Echo(stop_after=99)
    host, _ = host_on_fakes(processor, batches(3), host={"commit_interval_s": 3600.0})
    host.settings = replace(host.settings, batch_size=2)
    host.producer.refused = {2}  # the second batch's first output
    host.producer.acks_from = time.monotonic() + 0.3  # all three batches sent before any ack
    with pytest.raises(KafkaIOError, match="outputs refused"):
        host.run()
    assert len(processor.batches) == 3
    # the first batch's offsets only: the second and third are consumed again
    assert host.consumer.commits[-1] == ({("in", 0): 1, ("in", 1): 1}, False)


class Ends(FakeConsumer):
    """A consumer whose topic has ``high`` messages in each partition."""

    high = 10

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int]:
        return 0, self.high


def stalled_learner(
    monkeypatch: pytest.MonkeyPatch, positions: dict[int, int], processor: Echo | None = None
) -> tuple[ConfluentHost, list[Ends], Echo]:
    """A host reading from the processor's ``positions`` (the learner) whose first
    consumer fetches nothing, ever (its topic has 10 messages a partition); each one
    made after it hands out what its partitions hold from where it was assigned."""
    monkeypatch.setattr(kafka_io, "STALL_S", 0.05)

    def setup(consumer: Ends, before: int) -> None:
        if not before:
            return
        real_assign = consumer.assign  # a new one: what its partitions hold on from there

        def assign(partitions: list[TopicPartition]) -> None:
            real_assign(partitions)
            consumer.pending += [
                FakeMessage("in", tp.partition, o, b"label")
                for tp in partitions
                for o in range(tp.offset, Ends.high)
            ]

        consumer.assign = assign  # type: ignore[method-assign]

    processor = processor or Echo(stop_after=1)
    host, made, _ = quiet_host(
        processor, setup, Ends, checkpoint=Checkpointing(positions, lambda: None)
    )
    return host, made, processor


def test_a_consumer_reading_from_positions_silent_while_its_topic_has_more_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # seen after a Redis and then a broker restart: the learner said Kafka was back,
    # then sat in its poll reading nothing while labels came, and no timeout fell due
    host, made, processor = stalled_learner(monkeypatch, {0: 4, 1: 10})
    run(host)
    assert len(made) == 2  # the silent one, and the one assigned where it had read to
    assert {(tp.partition, tp.offset) for tp in made[1].assigned} == {(0, 4), (1, 10)}
    assert [m.offset for m in processor.batches[0]] == [4, 5, 6, 7, 8, 9]


class Full(Echo):
    """The learner with its waiting list full: accepts no input (the host pauses it)."""

    def accepting(self) -> bool:
        return False


@pytest.mark.parametrize("positions, processor", [
    ({0: 10, 1: 10}, Echo),  # nothing to read: silence is no stall
    ({0: 4, 1: 10}, Full),  # paused on purpose, behind: no stall either
])  # fmt: skip
def test_a_consumer_reading_from_positions_at_the_end_or_paused_is_kept(
    monkeypatch: pytest.MonkeyPatch, positions: dict[int, int], processor: type[Echo]
) -> None:
    host, made, _ = stalled_learner(monkeypatch, positions, processor(stop_after=1))
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    time.sleep(0.5)  # ten times STALL_S
    host.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert len(made) == 1 and not host.processor.batches
