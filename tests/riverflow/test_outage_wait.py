"""What a stage does outside its batches (startup, creating topics, restoring,
committing a checkpoint) waits out a server that is down, and only that."""

from __future__ import annotations

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException

from riverflow.assembly import Refused, through_outage


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


@pytest.mark.parametrize(
    "refused",
    [
        redis.exceptions.AuthenticationError("invalid username-password pair or user is disabled."),
        redis.exceptions.NoPermissionError(
            "this user has no permissions to run the 'ping' command"
        ),
        redis.exceptions.ResponseError("NOPERM No permissions to access a key"),
    ],
    ids=["wrong-password", "no-permission", "noperm-in-a-script"],
)
def test_redis_refusing_the_user_at_startup_is_an_error_at_once(refused: Exception) -> None:
    """A wrong password or an ACL without a command was waited out at startup for the
    whole outage limit (120 s) before the stage gave up: a misconfiguration, named at
    once. A running stage's checkpoint commit still waits it out (an ACL changed under
    it), as its guard does."""
    call = flaky([refused])
    with pytest.raises(Refused, match=r"Redis refused.*RIVERFLOW_REDIS_PASSWORD.*riverflow acls"):
        through_outage(call, 30.0, "Redis")  # type: ignore[arg-type]
    assert len(call.calls) == 1  # type: ignore[attr-defined]
    call = flaky([refused])
    assert through_outage(call, 30.0, "saving the checkpoint", refusals_wait=True) == "done"  # type: ignore[arg-type]
    assert len(call.calls) == 2  # type: ignore[attr-defined]
