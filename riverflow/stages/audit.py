"""The audit log made whole: every pointer move the registry holds reaches
``{ns}.model-events``.

Whoever moves the champion pointer (the learner advancing it, the monitor promoting or
rolling back, ``riverflow models promote``) writes the move to Redis first, then its
model-event to Kafka. A process killed between the two leaves a move in the registry's
history that the audit log never gets: the restarted process finds the pointer moved
and has nothing to write. ``AuditReconciler`` (run by the monitor stage) compares the
history with the topic and writes each move missing from it, as the mover would have
(``PointerMove.as_event``), marked ``evidence.recovered`` with how late it came.

A move is looked for once it is ``grace_s`` old (its mover had that long to write it:
its producer waits out a Kafka outage, so the default is minutes), then never again: a
watermark on the moves' times moves past it. An event is the move's when its kind,
model, version and time (``at``) are the move's: the learner and the CLI write the
move's own record, the monitor its decision stamped with the move's time. A mover that
held its event longer than ``grace_s`` and still wrote it gives the log the move twice,
the same record but for the mark: read the log by (kind, model, version, at).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from riverflow.errors import outage
from riverflow.models.registry import HISTORY_KEEP, ModelRegistry, PointerMove
from riverflow.streams.contracts import ModelEvent

log = logging.getLogger(__name__)

MOVE_KINDS = frozenset({"advance", "promote", "rollback"})
WINDOW_S = 86_400.0  # how far back a monitor starting afresh looks for moves
SLACK_S = 300.0  # the log is read from this much before the oldest move (clocks differ)
RECENT = 500  # moves read from the history at a time (all of it if that is too few)

MoveKey = tuple[str, str, int, float]


def move_key(kind: str, model: str, version: int, at: float | None) -> MoveKey | None:
    """What tells one logged move from another (None: not a move's record)."""
    if kind not in MOVE_KINDS or at is None:
        return None
    return (kind, model, int(version), float(at))


class AuditReconciler:
    """Writes the pointer moves the audit log lacks (see the module docstring).

    ``logged(since_s)``: the model-events of the last ``since_s`` seconds (a read of
    the topic; it may raise, and is tried again ``every_s`` later). ``every_s``: how
    often ``run`` looks, at most. ``window_s``: how old a move may be and still be
    looked for (the log must keep at least that)."""

    def __init__(
        self,
        registry: ModelRegistry,
        logged: Callable[[float], Iterable[ModelEvent]],
        grace_s: float = 300.0,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        window_s: float = WINDOW_S,
    ) -> None:
        self.registry = registry
        self.logged = logged
        self.grace_s = grace_s
        self.every_s = every_s
        self.clock = clock
        self.window_s = window_s
        # the moves looked for (by key, with their times): by key, not by a time
        # watermark, as movers' clocks differ; only those still in the last read of the
        # history are kept (a move read again is looked for again: the log has it)
        self.checked: dict[MoveKey, float] = {}
        self._next = -math.inf
        self._read_all = True  # the first look reads the whole history
        self.recovered = 0  # moves written by this reconciler

    def run(self) -> list[ModelEvent]:
        """The model-events of the moves the log lacks, once each (none until ``every_s``
        after the last look). A read that raises is logged and tried again then."""
        now = self.clock()
        if now < self._next:
            return []
        self._next = now + self.every_s
        try:
            return self._reconcile(now)
        except Exception as exc:
            # a server away, or a record it cannot read: the next run looks again. Never
            # raised into the monitor's batch (the guard would take it for the batch's)
            why = outage(exc)
            log.log(logging.WARNING if why else logging.ERROR,
                    "audit: the model-events were not checked (again in %g s): %s",
                    self.every_s, why or exc, exc_info=why is None)  # fmt: skip
            return []

    def _reconcile(self, now: float) -> list[ModelEvent]:
        until = now - self.grace_s
        moves = [m for m in self._unchecked(now - self.window_s) if m.at <= until]
        if not moves:
            return []
        logged: set[MoveKey] = set()
        for event in self.logged(now - min(m.at for m in moves) + SLACK_S):
            key = move_key(event.kind, event.model, event.version, event.at)
            if key is not None:
                logged.add(key)
        out = []
        for m in moves:
            key = _key(m)
            self.checked[key] = m.at
            if key in logged:
                continue
            event = replace(
                m.as_event(), evidence={"recovered": True, "late_s": round(now - m.at, 3)}
            )
            out.append(event)
            log.warning("audit: the %s to %s at %.3f was not in the model-events: written now",
                        m.kind, m.to, m.at)  # fmt: skip
        self.recovered += len(out)
        return out

    def _unchecked(self, horizon: float) -> list[PointerMove]:
        """The history's moves since ``horizon`` not looked for yet, oldest first: the
        newest ``RECENT`` of it, or all of it the first time or when all of those are
        new."""
        recent = self.registry.recent_moves(HISTORY_KEEP if self._read_all else RECENT)
        first = recent[0] if recent else None
        if (
            not self._read_all and first is not None and len(recent) == RECENT
            and first.at > horizon and _key(first) not in self.checked
        ):  # fmt: skip
            recent = self.registry.recent_moves(HISTORY_KEEP)
        self._read_all = False
        oldest = min((m.at for m in recent), default=math.inf)
        self.checked = {k: at for k, at in self.checked.items() if at >= oldest}
        return [m for m in recent if m.at > horizon and _key(m) not in self.checked]


def _key(m: PointerMove) -> MoveKey:
    return (m.kind, m.to.model, m.to.version, m.at)
