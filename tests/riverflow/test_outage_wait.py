"""What a stage does outside its batches (startup, creating topics, restoring,
committing a checkpoint) waits out a server that is down, and only that."""

from __future__ import annotations

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException

from riverflow.assembly import through_outage


def flaky(failures: list[BaseException]) -> object:
    calls = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "done"

    call.calls = calls  # type: ignore[attr-defined]
    return call


def test_a_broker_or_redis_down_at_startup_is_waited_for() -> None:
    call = flaky([
        KafkaException(KafkaError(KafkaError._TRANSPORT, "Connection refused")),
        KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down")),
        # a topic just created has no leader yet (the learner's first offsets_for_times)
        KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, "Failed to get offsets")),
        redis.ConnectionError("Error 111 connecting"),
    ])  # fmt: skip
    assert through_outage(call, 30.0, "creating topics") == "done"  # type: ignore[arg-type]
    assert len(call.calls) == 5  # type: ignore[attr-defined]


def test_a_refusal_is_raised_at_once_and_an_outage_after_the_wait() -> None:
    refused = KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied"))
    call = flaky([refused])
    with pytest.raises(KafkaException, match="denied"):
        through_outage(call, 30.0, "creating topics")  # type: ignore[arg-type]
    assert len(call.calls) == 1  # type: ignore[attr-defined]
    down = [redis.ConnectionError("Error 111")] * 10
    with pytest.raises(redis.ConnectionError):
        through_outage(flaky(down), 0.5, "Redis")  # type: ignore[arg-type]
