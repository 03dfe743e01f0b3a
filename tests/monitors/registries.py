"""Registries whose pointer move meets Redis going away, for the monitor's tests."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from riverflow.models.registry import MemoryRegistry


class LosesAReply(MemoryRegistry):
    """Once ``armed``, its next pointer move is made and then raises: Redis went away
    before its answer came back (with ``refuses``, before the move was made)."""

    armed = False
    refuses = False

    def _compare_and_set(self, *args: Any) -> bool:
        if self.armed and self.refuses:
            self.armed = False
            raise RedisConnectionError("Error 111 connecting to localhost:6379.")
        moved = super()._compare_and_set(*args)
        if self.armed:
            self.armed = False
            raise RedisConnectionError("Connection closed by server.")
        return moved
