"""The champion replica a scorer serves, following the registry's pointer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from riverflow.models.errors import ModelError
from riverflow.models.registry import ChampionPointer, ModelRegistry, ModelVersion

log = logging.getLogger(__name__)


def positive_probability(model: Any, x: dict[str, Any]) -> float:
    """P(label is true) from a River classifier's ``predict_proba_one``."""
    proba = model.predict_proba_one(x)
    return float(proba.get(True, proba.get(1, 0.0)))


class ChampionReplica:
    """Serves the champion; swaps in a new version between batches.

    ``refresh`` reads the pointer at once when the registry announces a move
    (``ModelRegistry.watch_pointer``: Redis pub/sub), else at most every
    ``poll_s`` seconds (the safety net: a lost announcement, a channel that is
    down), so a swap costs one GET per poll interval, and a blob download only
    when it moved. Until a version is pointed at, it serves ``fresh`` (version 0).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        fresh: Callable[[], ModelVersion],
        poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.poll_s = poll_s
        self.clock = clock
        self.watch = registry.watch_pointer()
        if self.watch is not None:
            self.watch.start()  # before reading the pointer: no move falls between
        pointer = registry.champion()
        if pointer is None:
            self.current = fresh()
        else:
            self.current = registry.load(pointer.model, pointer.version)
        self._next_poll = clock() + poll_s
        self._refused: ChampionPointer | None = None

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def version(self) -> int:
        return self.current.version

    def refresh(self, force: bool = False) -> bool:
        """Follow the champion pointer; True when the served version changed."""
        now = self.clock()
        announced = self.watch is not None and self.watch.moved()
        if not force and not announced and now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        pointer = self.registry.champion()
        if self.watch is not None and not self.watch.listening:
            self.watch.start()  # lost, and Redis answers again: a move since is polled
        if pointer is None or pointer in (ChampionPointer(self.name, self.version), self._refused):
            return False
        try:
            self.current = self.registry.load(pointer.model, pointer.version)
        except ModelError as exc:
            # keep serving the version we trust rather than stop scoring
            log.error("champion %s refused, still serving %s v%s: %s",
                      pointer, self.name, self.version, exc)  # fmt: skip
            self._refused = pointer
            return False
        return True
