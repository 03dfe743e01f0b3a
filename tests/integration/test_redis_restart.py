"""State survives a Redis restart: the local stack's redis-server keeps an
append-only file, so the champion pointer, the versions, the pointer history and
the learner's checkpoint come back, and no version number is handed out twice.
``stack status`` and ``stack down`` find a server restarted by hand on its port.

Each test runs its own redis-server (in a tmp dir), not the session's.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.registry import ChampionPointer, RedisRegistry
from riverflow.settings import Settings
from riverflow.tools.stack import (
    REDIS_DURABILITY,
    ServerProcess,
    pid_listening_on,
    stack_down,
    stack_status,
    start_redis,
)

KEY = b"restart-test-key"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    started = start_redis(tmp_path / "redis")
    yield started
    pid = pid_listening_on(started.port)
    if pid is not None:  # whichever process holds the port now (a restart's)
        ServerProcess("redis", pid, started.address, started.log).stop(5)


def restart(server: ServerProcess, tmp_path: Path, sig: signal.Signals) -> ServerProcess:
    os.kill(server.pid, sig)
    deadline = time.monotonic() + 10
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.alive()
    return start_redis(tmp_path / "redis", port=server.port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_registry_and_checkpoint_survive_a_restart(
    server: ServerProcess, tmp_path: Path, sig: signal.Signals
) -> None:
    registry = RedisRegistry(redis.Redis.from_url(server.address), "fraud", KEY, keep_versions=2)
    for v in range(1, 6):
        assert registry.publish("m", {"v": v}, {"parent": v - 1}) == v
        if v in (1, 4):
            registry.promote(ChampionPointer("m", v))
        if v == 3:
            registry.save_checkpoint(LearnerCheckpoint({"m": 3}, {"m": {}}, 30, {0: 31}, []))
    before = (registry.champion(), registry.history(), registry.versions("m"))
    assert before[2] == [1, 3, 4, 5]  # pruned: 2 was neither champion nor checkpointed
    time.sleep(1.5)  # appendfsync everysec: a SIGKILL loses at most the last second

    restart(server, tmp_path, sig)
    again = RedisRegistry(redis.Redis.from_url(server.address), "fraud", KEY, keep_versions=2)
    assert (again.champion(), again.history(), again.versions("m")) == before
    saved = again.checkpoint()
    assert saved is not None and saved.versions == {"m": 3} and saved.positions == {0: 31}
    assert again.load("m", 4).model == {"v": 4}
    assert again.publish("m", {"v": 6}, {"parent": 5}) == 6  # never a number given before


def test_a_version_number_is_not_reused_when_redis_lost_the_sequence(
    server: ServerProcess,
) -> None:
    client = redis.Redis.from_url(server.address)
    registry = RedisRegistry(client, "fraud", KEY)
    for v in range(1, 4):
        registry.publish("m", {"v": v}, {"parent": v - 1})
    client.delete("rf:fraud:model:m:seq")  # e.g. restored from an older backup
    assert registry.publish("m", {"v": 4}, {"parent": 3}) == 4
    assert registry.meta("m", 4)["version"] == 4 and registry.load("m", 1).model == {"v": 1}


def test_stack_status_and_down_find_a_redis_restarted_by_hand(
    tmp_path: Path, server: ServerProcess
) -> None:
    settings = Settings(cache_dir=tmp_path / "cache")
    state = settings.cache_dir / "stack" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"redis": {**server.__dict__, "log": str(server.log)}}))
    [status] = stack_status(settings)
    assert status.alive() and status.pid == server.pid and status.durability == REDIS_DURABILITY

    replaced = restart(server, tmp_path, signal.SIGKILL)  # a new process on the same port
    [status] = stack_status(settings)
    assert status.alive() and status.pid == replaced.pid != server.pid
    assert stack_down(settings) == ["redis"]
    deadline = time.monotonic() + 10
    while pid_listening_on(server.port) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_listening_on(server.port) is None
