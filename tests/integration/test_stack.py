"""The local stack: real servers, ready when usable, jars cached after the first fetch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient

from riverflow.settings import Settings
from riverflow.tools.stack import Endpoints, StackError, kafka_libs, start_redis


def test_the_broker_and_redis_answer(stack: Endpoints, redis_client: redis.Redis) -> None:
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    assert admin.list_topics(timeout=10).brokers
    assert redis_client.ping()
    assert stack.kafka_bootstrap.startswith("127.0.0.1:")


def test_second_start_reuses_the_cached_jars(
    stack: Endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings()
    # Without Maven on PATH a fetch would fail: the cache alone must serve.
    monkeypatch.setenv("PATH", "/nonexistent")
    libs = kafka_libs(settings)
    assert any(p.name.startswith("kafka_2.13-") for p in libs.iterdir())


def test_missing_redis_server_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError, match="apt-get install redis-server"):
        start_redis(tmp_path / "redis")
    assert os.environ["PATH"] == str(tmp_path)
