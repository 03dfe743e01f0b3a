"""The audit log made whole: every version the registry stores and every pointer move
it holds reaches ``{ns}.model-events``.

Whoever stores a version (the learner publishing it, ``riverflow models import``) or
moves the champion pointer (the learner advancing it, the monitor promoting or rolling
back, ``riverflow models promote``) writes to Redis first, then its model-event to
Kafka. A process killed between the two leaves in the registry a version or a move that
the audit log never gets: the restarted process finds it done and has nothing to write.
``AuditReconciler`` (run by the monitor stage) compares the registry's versions and
pointer history with the topic and writes each one missing from it, as its maker would
have (``published`` with its parent and labels seen, or ``imported``, from the version's
metadata; a move's ``PointerMove.as_event``), marked ``evidence.recovered`` with how late
it came.

Each look runs in a thread beside the monitor's batches (a read of the topic with Kafka
away waits out its timeouts); what it finds is written with the next batch or tick. A
version or move is looked for once it is ``grace_s`` old (its maker had that long to write it:
its producer waits out a Kafka outage, so the default is minutes), then not again: what
was looked for is remembered by its key, not by a time (movers' clocks differ). A
version's record is known by its kind, model and version (numbers are never used twice);
a move's by its kind, model, version and time (``at``): the learner and the CLI write the
move's own record, the monitor its decision stamped with the move's time. A maker that
held its event longer than ``grace_s`` and still wrote it gives the log the record twice,
the same but for the mark: read the log by those keys.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from riverflow.errors import outage
from riverflow.models.errors import ModelError
from riverflow.models.registry import HISTORY_KEEP, ModelRegistry, PointerMove
from riverflow.streams.contracts import ModelEvent

log = logging.getLogger(__name__)

MOVE_KINDS = frozenset({"advance", "promote", "rollback"})
VERSION_KINDS = frozenset({"published", "imported"})  # a version stored, by the learner or the CLI
WINDOW_S = 86_400.0  # how far back a monitor starting afresh looks for moves
SLACK_S = 300.0  # the log is read from this much before the oldest move (clocks differ)
RECENT = 500  # moves read from the history at a time (all of it if that is too few)

# (kind, model, version, the move's time): a version's own record has no time, and its
# number is never used twice
Key = tuple[str, str, int, float | None]
MoveKey = tuple[str, str, int, float]


def event_key(event: ModelEvent) -> Key | None:
    """What tells one logged move or stored version from another (None: neither)."""
    if event.kind in MOVE_KINDS and event.at is not None:
        return (event.kind, event.model, int(event.version), float(event.at))
    if event.kind in VERSION_KINDS:
        return (event.kind, event.model, int(event.version), None)
    return None


class AuditReconciler:
    """Writes the versions and pointer moves the audit log lacks (see the module docstring).

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
        # the moves looked for, by key (its last field is the move's time): not by a time
        # watermark, as movers' clocks differ; only those still in the last read of the
        # history are kept (a move read again is looked for again: the log has it)
        self.checked: set[MoveKey] = set()
        self.versions_checked: set[tuple[str, int]] = set()  # (name, version) looked for
        self._next = -math.inf
        self._read_all = True  # the first look reads the whole history
        self.recovered = 0  # versions and moves written by this reconciler
        # a look runs in a thread of its own: a read of the topic with Kafka away waits
        # out its timeouts (up to a minute), which the monitor's batches must not
        self._looking: threading.Thread | None = None
        self._found: list[ModelEvent] = []  # by the last look, not yet handed out
        self._lock = threading.Lock()

    def run(self) -> list[ModelEvent]:
        """The model-events of the moves the last look found missing from the log, once
        each; starts the next look if ``every_s`` passed since the last one began (and
        it is over). Never waits for a look, never raises: a look whose read raised is
        logged, and the next one looks again."""
        with self._lock:
            out, self._found = self._found, []
        self.recovered += len(out)
        now = self.clock()
        if now >= self._next and not self.looking():
            self._next = now + self.every_s
            self._looking = threading.Thread(
                target=self._look, args=(now,), name="audit", daemon=True
            )
            self._looking.start()
        return out

    def looking(self) -> bool:
        return self._looking is not None and self._looking.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the look under way, if any (for a caller that must have its result)."""
        if self._looking is not None:
            self._looking.join(timeout_s)

    def _look(self, now: float) -> None:
        try:
            found = self._reconcile(now)
        except Exception as exc:
            # a server away, or a record it cannot read: the next look tries again
            why = outage(exc)
            log.log(logging.WARNING if why else logging.ERROR,
                    "audit: the model-events were not checked (again in %g s): %s",
                    self.every_s, why or exc, exc_info=why is None)  # fmt: skip
            return
        with self._lock:
            self._found += found

    def _reconcile(self, now: float) -> list[ModelEvent]:
        horizon, until = now - self.window_s, now - self.grace_s
        moves = [m for m in self._unchecked(horizon) if m.at <= until]
        versions = self._new_versions(horizon, until)
        if not moves and not versions:
            return []
        oldest = min([m.at for m in moves] + [created for *_, created in versions])
        logged = {k for e in self.logged(now - oldest + SLACK_S) if (k := event_key(e))}
        out = []
        for kind, name, version, meta, created in versions:  # (a version before its moves)
            self.versions_checked.add((name, version))
            if (kind, name, version, None) in logged:
                continue
            parent, seen = meta.get("parent"), meta.get("labels_seen")
            out.append(ModelEvent(
                kind=kind, model=name, version=version,
                parent=int(parent) if kind == "published" and parent is not None else None,
                labels_seen=int(seen) if kind == "published" and seen is not None else None,
                evidence=_recovered(now, created),
            ))  # fmt: skip
            log.warning("audit: %s v%d %s at %.3f was not in the model-events: written now",
                        name, version, kind, created)  # fmt: skip
        for m in moves:
            key = _key(m)
            self.checked.add(key)
            if key in logged:
                continue
            out.append(replace(m.as_event(), evidence=_recovered(now, m.at)))
            log.warning("audit: the %s to %s at %.3f was not in the model-events: written now",
                        m.kind, m.to, m.at)  # fmt: skip
        return out

    def _new_versions(
        self, horizon: float, until: float
    ) -> list[tuple[str, str, int, dict[str, Any], float]]:
        """The stored versions not looked for yet, created since ``horizon`` and by
        ``until``: (kind of their record, name, version, metadata, created). A version
        created before ``horizon`` (or with no time), or of a model search's
        configuration (never logged), is not looked for; one pruned meanwhile is passed
        over."""
        listed = {(n, v) for n in self.registry.names() for v in self.registry.versions(n)}
        self.versions_checked &= listed
        out = []
        for name, version in sorted(listed - self.versions_checked):
            try:
                meta = self.registry.meta(name, version)
            except ModelError:
                continue
            raw = meta.get("created")
            created = float(raw) if isinstance(raw, int | float) else -math.inf
            # a model search's configurations are stored for its checkpoint, not logged
            if created <= horizon or "search" in meta:
                self.versions_checked.add((name, version))
            elif created <= until:
                kind = "imported" if "imported_from" in meta else "published"
                out.append((kind, name, version, meta, created))
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
        self.checked = {k for k in self.checked if k[3] >= oldest}
        return [m for m in recent if m.at > horizon and _key(m) not in self.checked]


def _key(m: PointerMove) -> MoveKey:
    return (m.kind, m.to.model, m.to.version, m.at)


def _recovered(now: float, at: float) -> dict[str, Any]:
    return {"recovered": True, "late_s": round(now - at, 3)}
