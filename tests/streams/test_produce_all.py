"""``produce_all`` through a producer that is stuck after a broker restart (librdkafka
#5430, seen in CI: "new leader-1 not found in cache", and ``riverflow produce`` waiting
out its 120 s with the broker up): a new producer sends what was not acknowledged."""

from __future__ import annotations

import time
from typing import Any

import pytest

from riverflow.streams import kafka_io
from riverflow.streams.kafka_io import KafkaIOError, Renewal, produce_all


class Producer:
    """Acknowledges what it was given at its first flush, or (``stuck``) never: a
    purge then reports each message as purged, at its next flush."""

    def __init__(self, stuck: bool = False) -> None:
        self.stuck = stuck
        self.queue: list[tuple[str, bytes | None, bytes, Any]] = []
        self.written: list[bytes] = []
        self.purged = False

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any) -> None:
        self.queue.append((topic, key, value, on_delivery))

    def poll(self, timeout: float) -> int:
        return 0

    def purge(self, in_queue: bool, in_flight: bool, blocking: bool) -> None:
        self.purged = True

    def flush(self, timeout: float) -> int:
        if self.purged:  # reported as purged, as librdkafka does
            for *_, report in self.queue:
                report("Local: Purged in queue", None)
            self.queue = []
            return 0
        if self.stuck:
            time.sleep(min(timeout, 0.02))
            return len(self.queue)
        for _, _, value, report in self.queue:
            self.written.append(value)
            report(None, None)
        self.queue = []
        return 0


@pytest.fixture
def short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_io, "STUCK_ACKS_S", 0.2)
    monkeypatch.setattr(kafka_io, "DEAF_AFTER_S", 0.2)


RECORDS = [("events", b"k", f"m{i}".encode()) for i in range(50)]


def test_a_stuck_producer_is_replaced_and_its_messages_sent_again(short: None) -> None:
    stuck, made = Producer(stuck=True), []

    def make() -> Producer:
        made.append(Producer())
        return made[-1]

    renewal = Renewal(make, lambda: True)
    assert produce_all(stuck, RECORDS, timeout_s=10, renewal=renewal) == 50
    assert stuck.purged and renewal.renewed == 1 and len(made) == 1
    # every message once through the new producer; the old one's purge reports ignored
    assert made[0].written == [v for _, _, v in RECORDS]


def test_a_stuck_producer_is_not_replaced_while_no_new_client_reaches_kafka(short: None) -> None:
    stuck = Producer(stuck=True)
    renewal = Renewal(Producer, lambda: False)
    with pytest.raises(KafkaIOError, match="50 of 50 messages not acknowledged within 1 s"):
        produce_all(stuck, RECORDS, timeout_s=1, renewal=renewal)
    assert renewal.renewed == 0 and not stuck.purged


def test_without_a_renewal_a_stuck_producer_fails_after_the_timeout(short: None) -> None:
    with pytest.raises(KafkaIOError, match=r"not acknowledged within 0\.5 s"):
        produce_all(Producer(stuck=True), RECORDS, timeout_s=0.5)
