"""How the learner meets Redis at startup: a malformed URL is a one-line error, an
outage is waited out (up to ``outage_limit_s``), then reported."""

from __future__ import annotations

import socket

import pytest
import redis

from riverflow.assembly import ConnectionFailed, redis_client, through_outage
from riverflow.cli import main
from riverflow.settings import Settings


@pytest.mark.parametrize(
    ("url", "says"),
    [("foo://localhost:6379", "schemes"), ("redis://localhost:abc/0", "Port could not be cast")],
)
def test_a_malformed_redis_url_is_an_error_line_not_a_traceback(
    url: str, says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConnectionFailed, match="malformed"):
        redis_client(Settings(), url)
    monkeypatch.setenv("RIVERFLOW_REDIS_URL", url)
    monkeypatch.setenv("RIVERFLOW_KAFKA_BOOTSTRAP", "localhost:1")
    assert main(["models", "list"]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: Redis URL") and says in err and "Traceback" not in err


def test_an_unreachable_redis_is_retried_until_the_wait_is_over() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(redis_retries=0, redis_connect_timeout_s=0.2)
    calls = []

    def ping() -> None:
        calls.append(1)
        redis_client(settings, f"redis://127.0.0.1:{port}/0")

    with pytest.raises(ConnectionFailed, match="unreachable"):
        through_outage(ping, 1.0, "test")
    assert len(calls) >= 3  # retried with backoff, then given up

    def down() -> ConnectionFailed:  # what redis_client raises for an unreachable Redis
        failed = ConnectionFailed("Redis unreachable at 127.0.0.1:1")
        failed.__cause__ = redis.ConnectionError("Error 111")
        return failed

    answers = iter([down(), down(), None])

    def flaky() -> str:
        answer = next(answers)
        if answer is not None:
            raise answer
        return "up"

    assert through_outage(flaky, 30.0, "test") == "up"
