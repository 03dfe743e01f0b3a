"""The confluent-kafka host, on clients built by the factories it is given: its client
settings are passed in, a batch's offsets are committed only after its outputs are
acknowledged, and each batch is reported to the stage's reporter."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, TopicPartition

from riverflow.streams.confluent_host import (
    Checkpointing,
    ClientSettings,
    ConfluentHost,
    HostSettings,
)
from riverflow.streams.contracts import Message, Output


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

    def subscribe(self, topics: list[str]) -> None:
        self.log.append(f"subscribe {','.join(topics)}")

    def list_topics(self, topic: str, timeout: float) -> Any:
        meta = SimpleNamespace(partitions={0: None, 1: None}, error=None)
        return SimpleNamespace(topics={topic: meta})

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def poll(self, timeout: float) -> FakeMessage | None:
        return self.pending.pop(0) if self.pending else None

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        taken, self.pending = self.pending[:n], self.pending[n:]
        return taken

    def commit(self, asynchronous: bool) -> None:
        self.log.append("commit")

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, 10

    def close(self) -> None:
        self.log.append("close")


class FakeProducer:
    def __init__(self, config: dict[str, Any], log: list[str]) -> None:
        self.config, self.log = config, log

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any) -> None:
        self.log.append(f"produce {topic}")

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        self.log.append("flush")
        return 0


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


def host_on_fakes(
    processor: Echo, pending: list[FakeMessage], clients: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[ConfluentHost, list[str]]:  # fmt: skip
    log: list[str] = []
    settings = ClientSettings(
        **(clients or {}),
        make_consumer=lambda config: FakeConsumer(config, log, pending),
        make_producer=lambda config: FakeProducer(config, log),
    )
    loop = HostSettings("broker:9092", "group-a", batch_size=10, poll_s=0.01, dlq_topic="dlq")
    host = ConfluentHost(processor, "in", loop, settings, **kwargs)
    processor.host = host
    return host, log


def run(host: ConfluentHost) -> None:
    # not the main thread: the host then leaves pytest's signal handlers alone
    thread = threading.Thread(target=host.run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


def test_client_settings_passed_in_are_laid_over_the_hosts_own() -> None:
    host, _ = host_on_fakes(
        Echo(), [], clients={"consumer": {"fetch.wait.max.ms": 1}, "producer": {"linger.ms": 0}}
    )
    consumer, producer = host.consumer.config, host.producer.config
    assert consumer["bootstrap.servers"] == "broker:9092" and consumer["group.id"] == "group-a"
    assert consumer["fetch.wait.max.ms"] == 1
    assert consumer["enable.auto.commit"] is False
    assert producer["linger.ms"] == 0 and producer["enable.idempotence"] is True


def test_a_batch_is_committed_after_its_outputs_are_flushed_and_reported() -> None:
    processor, reporter = Echo(), Reporter()
    pending = [FakeMessage("in", 0, 3, b"a"), FakeMessage("in", 1, 7, b"b")]
    host, log = host_on_fakes(processor, pending, metrics=reporter)
    run(host)
    assert [m.value for m in processor.batches[0]] == [b"a", b"b"]
    assert log[:5] == ["subscribe in", "produce out", "produce out", "flush", "commit"]
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
