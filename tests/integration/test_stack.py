"""The local stack: real servers, ready when usable, jars cached after the first fetch."""

from __future__ import annotations

import os
import time
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


def test_redis_does_not_rewrite_its_append_only_file_every_64_mb(tmp_path: Path) -> None:
    """A scorer at ~13,000 events/s appends ~10 MB a second: with Redis' default
    threshold the stack's Redis rewrote its AOF every 3-13 s, a forked child
    serializing the whole dataset on a core the scorer needed (p99 at 13,000/s over
    30 s: 386-1,022 ms; 186-195 ms without: docs/benchmarks.md)."""
    server = start_redis(tmp_path / "redis")
    try:
        client = redis.Redis.from_url(server.address)
        value = os.urandom(512 * 1024)
        pipe = client.pipeline(transaction=False)
        for i in range(200):  # 100 MB: past the default 64 MB
            pipe.set(f"k{i}", value)
        pipe.execute()
        time.sleep(1.0)  # the server checks for a due rewrite ten times a second
        info = client.info("persistence")
        assert info["aof_current_size"] > 64 * 1024 * 1024
        assert info["aof_rewrites"] == 0 and info["aof_rewrite_in_progress"] == 0
    finally:
        server.stop(5)
