"""Session windows, in Python: one event's step over an entity's sessions.

A session is a run of one entity's events, in event time, each less than
``gap`` (the window's ``session``) after the one before. A session group keeps,
per entity value, the sessions an event may still join, oldest first, each one
flat record ``[first ts, last ts, n, sums..., minima..., maxima...]``
(``SessionGroup.stats`` says which fields keep which).

One event at ``ts``, ``w`` being the newest event time of its entity before it:

- **late** if ``ts < w - grace``: it changes nothing and is scored with the
  entity's newest session (the one holding ``w``); the snapshot says ``late``,
  and the scorer counts it (``late_events`` in ``/metrics``);
- otherwise it joins every kept session it is less than ``gap`` from (``first -
  gap < ts < last + gap``): those and the event become one session (an event
  within the grace may bridge two), or the event starts one of its own. It is
  scored with that session, itself included: its count, duration (last - first
  event time), sums, minima and maxima;
- then sessions with ``last + gap <= max(w, ts) - grace`` are dropped: an event
  that is not late is at or after ``max(w, ts) - grace``, so it can never join
  them again. What stays ends less than gap + grace before the newest event,
  each a gap after the one before: at most ``floor(grace / gap) + 2`` sessions.

So a feature value is the aggregate that recomputing over every event of the
entity seen so far that was not late gives for the session holding the event
(``tests/features/test_sessions.py`` checks it against that recomputation).

The Lua in ``features/store/lua/prelude.lua`` does the same steps on the Redis
server, adding in the same order: the joined sessions are added to the event
oldest first, so both give the same doubles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from riverflow.features.definitions import SessionGroup


class SessionKernel:
    """One session group's steps, with its offsets worked out once."""

    def __init__(self, g: SessionGroup) -> None:
        self.gap, self.grace = g.gap_s, g.grace_s
        sums, mins, maxs = g.layout
        self.sums, self.mins, self.maxs = sums, mins, maxs
        self.record = g.record
        o = 3
        self.sum_at = range(o, o + len(sums))
        o += len(sums)
        self.min_at = range(o, o + len(mins))
        o += len(mins)
        self.max_at = range(o, o + len(maxs))
        self.empty: list[Any] = [0, 0.0] + [0.0] * (self.record - 3)

    def vector(self, s: Sequence[Any] | None) -> list[Any]:
        """The aggregate vector of session ``s`` (layout: ``features.definitions``)."""
        if s is None:
            return list(self.empty)
        return [s[2], s[1] - s[0], *s[3:]]

    def event(
        self, sessions: list[list[Any]], ts: float, xs: Sequence[float], w: float | None
    ) -> tuple[list[Any], bool]:
        """Add an event (``xs``: the group's numbers) to ``sessions`` (changed in
        place) unless it is late; its session's vector, and whether it was late."""
        if w is not None and ts < w - self.grace:
            return self.vector(sessions[-1] if sessions else None), True
        gap = self.gap
        new: list[Any] = [ts, ts, 1, *(xs[i] for i in self.sums)]
        new += [xs[i] for i in self.mins]
        new += [xs[i] for i in self.maxs]
        kept: list[list[Any]] = []
        placed = False
        for s in sessions:
            if s[0] - gap < ts < s[1] + gap:
                self.merge(new, s)
                continue
            if not placed and s[0] > ts:
                kept.append(new)
                placed = True
            kept.append(s)
        if not placed:
            kept.append(new)
        newest = ts if w is None or ts > w else w
        horizon = newest - self.grace
        sessions[:] = [s for s in kept if s[1] + gap > horizon]
        return self.vector(new), False

    def merge(self, into: list[Any], s: Sequence[Any]) -> None:
        """Add session ``s`` to ``into``."""
        if s[0] < into[0]:
            into[0] = s[0]
        if s[1] > into[1]:
            into[1] = s[1]
        into[2] += s[2]
        for o in self.sum_at:
            into[o] += s[o]
        for o in self.min_at:
            if s[o] < into[o]:
                into[o] = s[o]
        for o in self.max_at:
            if s[o] > into[o]:
                into[o] = s[o]

    def read(self, sessions: Sequence[Sequence[Any]], at: float | None) -> list[Any] | None:
        """The vector of the session open at event time ``at`` (default: the newest
        session): the newest that began at or before ``at`` and had not closed by
        then (``at < last + gap``); an empty one if none is open; None if the
        entity keeps no session."""
        if not sessions:
            return None
        if at is None:
            return self.vector(sessions[-1])
        for s in reversed(sessions):
            if s[0] <= at:
                return self.vector(s) if at < s[1] + self.gap else self.vector(None)
        return self.vector(None)

    def pack(self, sessions: Sequence[Sequence[Any]]) -> list[Any]:
        """The sessions flat, one record after the other (as the Lua stores them)."""
        return [x for s in sessions for x in s]

    def unpack(self, flat: Sequence[Any]) -> list[list[Any]]:
        """The inverse of ``pack``; the counts as integers, every other number a
        float (Redis sends a whole double as an integer)."""
        r = self.record
        out = []
        for p in range(0, len(flat), r):
            s = [float(x) for x in flat[p : p + r]]
            s[2] = int(s[2])
            out.append(s)
        return out
