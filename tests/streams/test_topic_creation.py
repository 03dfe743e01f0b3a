"""``ensure_topics`` against a cluster that is starting up: a KRaft broker just
restarted refuses a creation ("All brokers are currently fenced") until it is
unfenced, a second or so later. The creation is asked again for ``START_WAIT_S``;
any other refusal is an error at once. (The cluster is a fake: a real broker is
fenced for too short and too unpredictable a moment to test against.)"""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from riverflow.streams import kafka_io
from riverflow.streams.kafka_io import KafkaIOError, ensure_topics

FENCED = KafkaError(
    KafkaError.INVALID_REPLICATION_FACTOR,
    "Unable to replicate the partition 1 time(s): All brokers are currently fenced.",
)
TOO_MANY = KafkaError(
    KafkaError.INVALID_REPLICATION_FACTOR,
    "Unable to replicate the partition 3 time(s): The target replication factor of 3 "
    "cannot be reached because only 1 broker(s) are registered.",
)


class Cluster:
    """An admin client's view of a cluster that refuses the first ``refusals``
    creation requests with ``error``."""

    def __init__(self, error: KafkaError, refusals: int) -> None:
        self.error, self.refusals = error, refusals
        self.topics: dict[str, Any] = {}
        self.asked = 0

    def __call__(self, config: dict[str, Any]) -> Cluster:  # as AdminClient(config)
        return self

    def list_topics(self, timeout: float) -> SimpleNamespace:
        return SimpleNamespace(topics=dict(self.topics))

    def create_topics(self, new: list[Any]) -> dict[str, Future[None]]:
        self.asked += 1
        out: dict[str, Future[None]] = {}
        for topic in new:
            future: Future[None] = Future()
            if self.asked <= self.refusals:
                future.set_exception(KafkaException(self.error))
            else:
                leader = SimpleNamespace(leader=1)
                self.topics[topic.topic] = SimpleNamespace(error=None, partitions={0: leader})
                future.set_result(None)
            out[topic.topic] = future
        return out


def test_a_cluster_still_fencing_its_broker_gets_the_creation_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = Cluster(FENCED, refusals=2)
    monkeypatch.setattr(kafka_io, "AdminClient", cluster)
    assert ensure_topics("127.0.0.1:1", ["a.events", "a.labels"], 1) == ["a.events", "a.labels"]
    assert cluster.asked == 3 and set(cluster.topics) == {"a.events", "a.labels"}


def test_a_cluster_that_stays_fenced_or_refuses_for_good_is_an_error_naming_the_topic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = Cluster(TOO_MANY, refusals=99)
    monkeypatch.setattr(kafka_io, "AdminClient", cluster)
    with pytest.raises(KafkaIOError, match=r"creating topic a\.events: .*replication factor of 3"):
        ensure_topics("127.0.0.1:1", ["a.events"], 1, replication=3)
    assert cluster.asked == 1  # not a start-up: not asked again

    fenced = Cluster(FENCED, refusals=99)
    monkeypatch.setattr(kafka_io, "AdminClient", fenced)
    monkeypatch.setattr(kafka_io, "START_WAIT_S", 1.2)
    with pytest.raises(KafkaIOError, match=r"creating topic a\.events: .*fenced"):
        ensure_topics("127.0.0.1:1", ["a.events"], 1)
    assert 2 <= fenced.asked <= 4
