"""The tile arithmetic, in Python: one event's update and window read per tile group.

Both stores compute with this when the state is in the process: the embedded
store always, the Redis store unless its commit is refused (see
``features.store.redis_store``). The Lua in ``features/store/lua/prelude.lua``
does the same steps on the Redis server. One difference: here a window's count,
sums, sums of squares, minima and maxima are kept as running totals (an
in-order event, the common case, reads its window without visiting its tiles; a
min or max is looked for again only when the tile holding it leaves the window),
where the Lua adds the tiles up; sums can then differ in the last bits. Windows
with distinct sets, and out-of-order events, are read tile by tile here too.

``Kernel`` works out once per group where each number sits in a tile, since
its methods run per event.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Iterator, Sequence
from operator import itemgetter
from typing import Any

import msgpack
import msgspec

from riverflow.features.definitions import FeaturePlan, TileGroup
from riverflow.features.sessions import SessionKernel

# |event time| the tiles take, in seconds (~31 million years): a bucket index stays an
# exact integer (< 2**53) and a msgpack int64. The validator refuses far less
# (settings event_time_min_s / event_time_max_s); this is the store's own limit.
MAX_TIME_S = 1e15
NAN = float("nan")


def check_time(ts: float) -> float:
    """``ts`` if the tiles can take it, else ValueError naming it."""
    if not -MAX_TIME_S <= ts <= MAX_TIME_S:  # also refuses NaN
        raise ValueError(f"event time {ts!r} is out of the feature store's range")
    return ts


class Tiles:
    """One group's tiles of one entity value, by bucket in bucket order, and its
    newest bucket. ``tot``: the count, sums, sums of squares, minima and maxima
    of the window ending at the newest bucket, kept as events come (None: not
    worked out yet)."""

    __slots__ = ("hb", "tiles", "tot")

    def __init__(self, hb: int) -> None:
        self.tiles: dict[int, list[Any]] = {}
        self.hb = hb
        self.tot: list[Any] | None = None


class Entity:
    """One entity value: its watermark (newest event time), its tiles per group and
    its sessions per session group (``features.sessions``)."""

    __slots__ = ("groups", "sessions", "w")

    def __init__(self) -> None:
        self.w: float | None = None
        self.groups: dict[int, Tiles] = {}
        self.sessions: dict[int, list[list[Any]]] = {}


class Kernel:
    """One tile group's per-event steps, with its offsets worked out once.

    A tile here is the record the Lua scripts store: ``[bucket, n, newest ts,
    sums, sums of squares, minima, maxima, newest values, then per exact and per
    approximate distinct field: the set of values]`` (``TileGroup.layout`` says
    which fields keep which stat).
    """

    def __init__(self, g: TileGroup) -> None:
        sums, squares, mins, maxs, lasts, currents = g.layout
        self.buckets, self.keep, self.width = g.buckets, g.keep, g.bucket_s
        o = 3
        self.sum_at = tuple((o + j, i) for j, i in enumerate(sums))
        o += len(sums)
        self.square_at = tuple((o + j, i) for j, i in enumerate(squares))
        o += len(squares)
        self.min_at = tuple((o + j, i) for j, i in enumerate(mins))
        o += len(mins)
        self.max_at = tuple((o + j, i) for j, i in enumerate(maxs))
        o += len(maxs)
        self.last_at = tuple((o + j, i) for j, i in enumerate(lasts))
        self.last_range = (o, o + len(lasts))
        o += len(lasts)
        self.sets_at = o
        self.nsets = len(g.exact) + len(g.approx)
        self.record = o + len(g.exact)  # values per stored tile (HyperLogLogs are keys)
        self.seeds = (*mins, *maxs, *lasts)  # a new tile starts at the event's value
        self.zeros = [0.0] * (len(sums) + len(squares))
        self.currents = tuple(currents)
        # (position in the aggregate's part, position in a tile), for ``vector``
        self.sum_o = tuple(enumerate(o for o, _ in self.sum_at))
        self.square_o = tuple(enumerate(o for o, _ in self.square_at))
        self.min_o = tuple(enumerate(o for o, _ in self.min_at))
        self.max_o = tuple(enumerate(o for o, _ in self.max_at))
        self.set_o = tuple((j, self.sets_at + j) for j in range(self.nsets))
        self.no_lasts = [0] * len(lasts)
        self.total_at = tuple(o for o, _ in (*self.sum_at, *self.square_at))
        # per min and max field: its place in ``Tiles.tot``, in a tile, in the
        # event's numbers, and whether it is a minimum
        extremes = [(o, i, True) for o, i in self.min_at] + [(o, i, False) for o, i in self.max_at]
        base = 1 + len(self.total_at)
        self.extreme_at = tuple((base + j, o, i, low) for j, (o, i, low) in enumerate(extremes))
        # windows kept as running totals; distinct sets are read tile by tile
        self.incremental = not self.nsets
        # ``compact`` keeps a one-event tile as its time and one value per field,
        # from which ``solo`` rebuilds every stat: per field the tile position
        # holding its value as it came (a min, max or last), else its sum (0.0 +
        # x), else its square; per stat position: (how, which field)
        stats = (*self.sum_at, *self.square_at, *self.min_at, *self.max_at, *self.last_at)
        kinds = {o: "sum" for o, _ in self.sum_at} | {o: "square" for o, _ in self.square_at}
        fields = sorted({i for _, i in stats})
        source = {}
        for i in fields:
            at = sorted(o for o, j in stats if j == i)
            source[i] = next((o for o in at if o not in kinds), at[0])
        self.solo_from = tuple(source[i] for i in fields)
        how = {"sum": 1, "square": 2}
        self.solo_rebuild = tuple(
            (0 if source[i] == o else how.get(kinds.get(o, ""), 0), fields.index(i))
            for o, i in sorted(stats)
        )
        self.nsolo = len(fields)

    def add(self, tiles: Tiles, b: int, ts: float, xs: list[float], strings: list[str]) -> None:
        if b > tiles.hb:
            self._advance(tiles, b)
        t = tiles.tiles.get(b)
        if t is None:
            t = [b, 0, ts, *self.zeros, *[xs[i] for i in self.seeds]]
            if self.nsets:
                t += [set() for _ in range(self.nsets)]
            older = b < tiles.hb and any(k > b for k in tiles.tiles)
            tiles.tiles[b] = t
            if older:  # kept in bucket order: reads add tiles oldest first
                tiles.tiles = dict(sorted(tiles.tiles.items()))
        t[1] += 1
        if ts >= t[2]:
            t[2] = ts
            for o, i in self.last_at:
                t[o] = xs[i]
        for o, i in self.sum_at:
            t[o] += xs[i]
        for o, i in self.square_at:
            x = xs[i]
            t[o] += x * x
        for o, i in self.min_at:
            if xs[i] < t[o]:
                t[o] = xs[i]
        for o, i in self.max_at:
            if xs[i] > t[o]:
                t[o] = xs[i]
        if strings:
            o = self.sets_at
            for j, s in enumerate(strings):
                t[o + j].add(s)
        tot = tiles.tot
        if tot is not None and b > tiles.hb - self.buckets:
            tot[0] += 1
            j = 1
            for _, i in self.sum_at:
                tot[j] += xs[i]
                j += 1
            for _, i in self.square_at:
                x = xs[i]
                tot[j] += x * x
                j += 1
            for j, _, i, lowest in self.extreme_at:
                v, x = tot[j], xs[i]
                if v is None or (x < v if lowest else x > v):
                    tot[j] = x

    def _advance(self, tiles: Tiles, b: int) -> None:
        """Move the newest bucket to ``b``: tiles leaving the window leave ``tot``;
        tiles older than a window plus the lateness (never read again) go."""
        first_new, first_old = b - self.buckets + 1, tiles.hb - self.buckets + 1
        cutoff = b - self.keep
        tot, dead, extremes_left = tiles.tot, [], False
        for k, t in tiles.tiles.items():
            if k >= first_new:
                break
            if tot is not None and k >= first_old:
                tot[0] -= t[1]
                j = 1
                for o in self.total_at:
                    tot[j] -= t[o]
                    j += 1
                for j, o, _, _ in self.extreme_at:
                    if t[o] == tot[j]:
                        extremes_left = True
            if k <= cutoff:
                dead.append(k)
        for k in dead:
            del tiles.tiles[k]
        tiles.hb = b
        if extremes_left and tot is not None:  # a leaving tile held a min or max
            self._extremes(tiles, tot)

    def _extremes(self, tiles: Tiles, tot: list[Any]) -> None:
        """The window's minima and maxima in ``tot``, from its tiles."""
        if not self.extreme_at:
            return
        first = tiles.hb - self.buckets + 1
        for j, o, _, lowest in self.extreme_at:
            values = [t[o] for k, t in tiles.tiles.items() if k >= first]
            tot[j] = (min(values) if lowest else max(values)) if values else None

    def totals(self, tiles: Tiles) -> list[Any]:
        """``tot`` worked out from the tiles (once per group loaded)."""
        first = tiles.hb - self.buckets + 1
        tot: list[Any] = [0, *self.zeros]
        for k, t in tiles.tiles.items():
            if k >= first:
                tot[0] += t[1]
                j = 1
                for o in self.total_at:
                    tot[j] += t[o]
                    j += 1
        tot += [None] * len(self.extreme_at)
        self._extremes(tiles, tot)
        return tot

    def event(self, tiles: Tiles, ts: float, xs: list[float], strings: list[str]) -> list[Any]:
        """Add an event that is not too late and read its window (ending at its bucket)."""
        b = int(ts // self.width)
        if b < tiles.hb or not self.incremental:  # out of order, or min/max/sets: scan
            newest, prev = self.previous(tiles, b)
            self.add(tiles, b, ts, xs, strings)
            return self.vector(tiles, b, since(ts, newest), prev, xs)
        # in order: the newest earlier event in the window is in the newest tile
        top = tiles.tiles.get(tiles.hb)
        if top is not None and tiles.hb > b - self.buckets:
            a, z = self.last_range
            gap = ts - top[2]
            head = [1, gap if gap > 0 else 0.0]
            prev = top[a:z]  # before this event updates the tile
        else:
            head, prev = [0, 0], self.no_lasts
        if tiles.tot is None:
            tiles.tot = self.totals(tiles)
        self.add(tiles, b, ts, xs, strings)
        tot = tiles.tot
        out = [tot[0], *head, *tot[1:], *prev]
        if self.currents:
            out += [xs[i] for i in self.currents]
        return out

    def previous(self, tiles: Tiles | None, end: int) -> tuple[float | None, list[Any]]:
        """Time and ``last`` values of the newest event in the window ending at ``end``."""
        if tiles is None:
            return None, []
        first = end - self.buckets + 1
        newest: float | None = None
        tile = None
        for k, t in tiles.tiles.items():
            if k > end:
                break
            if k >= first and (newest is None or t[2] > newest):
                newest, tile = t[2], t
        if tile is None:
            return None, []
        a, b = self.last_range
        return newest, tile[a:b]

    def vector(
        self,
        tiles: Tiles | None,
        end: int,
        since: float | None,
        prev: list[Any],
        xs: list[float],
    ) -> list[Any]:
        """The group aggregate of the window ending at ``end`` (layout: features.definitions),
        its tiles added oldest first."""
        n = 0
        s = [0.0] * len(self.sum_o)
        q = [0.0] * len(self.square_o)
        lo: list[Any] = [None] * len(self.min_o)
        hi: list[Any] = [None] * len(self.max_o)
        sets: list[set[str]] = [set() for _ in range(self.nsets)]
        if tiles is not None:
            first = end - self.buckets + 1
            sum_o, square_o, min_o, max_o = self.sum_o, self.square_o, self.min_o, self.max_o
            set_o = self.set_o
            for k, t in tiles.tiles.items():
                if k > end:
                    break
                if k < first:
                    continue
                n += t[1]
                for j, o in sum_o:
                    s[j] += t[o]
                for j, o in square_o:
                    q[j] += t[o]
                for j, o in min_o:
                    if lo[j] is None or t[o] < lo[j]:
                        lo[j] = t[o]
                for j, o in max_o:
                    if hi[j] is None or t[o] > hi[j]:
                        hi[j] = t[o]
                for j, o in set_o:
                    sets[j] |= t[o]
        out: list[Any] = [n, 0 if since is None else 1, since or 0, *s, *q]
        if lo or hi:
            out += [0 if v is None else v for v in (*lo, *hi)]
        out += prev if prev else self.no_lasts
        if self.currents:
            out += [xs[i] if xs else 0 for i in self.currents]
        if sets:
            out += [len(v) for v in sets]
        return out

    def pack(self, tiles: Tiles) -> list[Any]:
        """``[newest bucket, [tile, ...], window totals]`` (an exact set as a map of
        value -> true).

        The Lua scripts write a group's tiles flat, one after the other (cmsgpack
        unpacks one flat array ~2.5x faster than a table per tile), without the
        totals, and read both layouts; here the tiles go as they are, which costs
        msgpack's C code only. The totals go too, so a scorer that reads the
        entity again (after a restart) continues the same running sums, to the bit.
        """
        if not self.nsets:
            stored = [tiles.hb, list(tiles.tiles.values())]
        else:
            at = self.sets_at
            stored = [
                tiles.hb,
                [t[:at] + [dict.fromkeys(v, True) for v in t[at : self.record]]
                 for t in tiles.tiles.values()],
            ]  # fmt: skip
        if tiles.tot is not None:
            stored.append(tiles.tot)
        return stored

    def unpack(self, stored: list[Any]) -> Tiles:
        hb, stored_tiles = stored[0], stored[1]
        tiles = Tiles(hb)
        if len(stored) > 2:  # written by a scorer, with its running totals
            tiles.tot = stored[2]
        r, at = self.record, self.sets_at
        if stored_tiles and isinstance(stored_tiles[0], list):  # written here: a list per tile
            records = stored_tiles
        else:  # written by Lua: flat
            records = [stored_tiles[p : p + r] for p in range(0, len(stored_tiles), r)]
        if self.nsets:
            records = [t[:at] + [set(v) for v in t[at:]] for t in records]
        # in bucket order (Lua appends a late bucket's tile at the end)
        tiles.tiles = {t[0]: t for t in sorted(records, key=itemgetter(0))}
        return tiles

    def solo(self, values: Sequence[float]) -> list[float]:
        """The stats of a one-event tile from its values (``solo_from``): what
        ``add`` makes of a new tile's first event, bit for bit."""
        out = []
        for how, j in self.solo_rebuild:
            x = values[j]
            out.append(x if how == 0 else 0.0 + x if how == 1 else 0.0 + x * x)
        return out

    def compact(
        self, tiles: Tiles, w: float, ints: list[Any], floats: list[float], rest: list[Any]
    ) -> None:
        """Append ``tiles`` to the three parts of ``compact_entity``: small integers,
        doubles, and what is neither (distinct sets, and running totals the tiles
        do not give again). ``w``: the entity's watermark, which most groups'
        newest bucket and newest tile time repeat."""
        hb, at = tiles.hb, self.sets_at
        base = int(w // self.width) if w == w else 0  # NaN: no watermark
        ints += (base - hb, len(tiles.tiles))
        solo, solo_from = self.solo, self.solo_from
        for k, t in tiles.tiles.items():
            ts = t[2]
            # per tile a code: 2 x (n, or 0 for a tile of one event kept as its
            # values) + 1 if its time is ``w``; with how far behind the newest
            # bucket it is, in one byte of msgpack when both are small
            same = 1 if ts == w and ts else 0  # (a zero's sign would be lost)
            code = 2 * t[1] + same
            stats = t[3:at]
            if t[1] == 1 and not self.nsets:
                values = [t[o] for o in solo_from]
                # equal, and bit for bit (only a zero may differ while equal: its sign)
                if solo(values) == stats and 0.0 not in stats:
                    code, stats = same, values
            behind = hb - k
            if code < 8 and behind < 16:
                ints.append(8 * behind + code)
            else:
                ints += (-1 - behind, code)
            if not same:
                floats.append(ts)
            floats += stats
            if self.nsets:
                rest.append([list(v) for v in t[at:]])
        tot = tiles.tot
        if tot is None:
            ints.append(0)
            return
        # a count, minima and maxima are what the tiles give; a running sum may
        # differ from the tiles' sum in its last bits
        fresh, e = self.totals(tiles), 1 + len(self.total_at)
        if fresh[0] != tot[0] or fresh[e:] != tot[e:] or 0.0 in tot[e:]:
            ints.append(3)
            rest.append(tot)
        elif fresh[1:e] == tot[1:e] and 0.0 not in tot[1:e]:
            ints.append(1)
        else:
            ints.append(2)
            floats += tot[1:e]

    def expand(
        self,
        ints: Sequence[Any],
        p: int,
        floats: Sequence[float],
        d: int,
        rest: Iterator[Any],
        w: float,
    ) -> tuple[Tiles, int, int]:
        """The inverse of ``compact``, from ``ints[p:]``, ``floats[d:]`` and the next
        items of ``rest``; returns the tiles and where the first two parts stop."""
        hb = (int(w // self.width) if w == w else 0) - ints[p]
        n = ints[p + 1]
        p += 2
        tiles = Tiles(hb)
        stored = tiles.tiles
        width, nsolo = self.sets_at - 3, self.nsolo
        for _ in range(n):
            x = ints[p]
            if x >= 0:
                b, code = hb - (x >> 3), x & 7
                p += 1
            else:
                b, code = hb + 1 + x, ints[p + 1]
                p += 2
            if code & 1:
                ts = w
            else:
                ts = floats[d]
                d += 1
            if code < 2:
                t = [b, 1, ts, *self.solo(floats[d : d + nsolo])]
                d += nsolo
            else:
                t = [b, code >> 1, ts, *floats[d : d + width]]
                d += width
                if self.nsets:
                    t += [set(v) for v in next(rest)]
            stored[b] = t
        flag = ints[p]
        if flag == 1 or flag == 2:
            tiles.tot = tot = self.totals(tiles)
            if flag == 2:
                e = 1 + len(self.total_at)
                tot[1:e] = floats[d : d + e - 1]
                d += e - 1
        elif flag == 3:
            tiles.tot = next(rest)
        return tiles, p + 1, d


def since(ts: float, newest: float | None) -> float | None:
    if newest is None:
        return None
    gap = ts - newest
    return gap if gap > 0 else 0.0  # an out-of-order event comes right after the newest one


# a window's aggregate as at no time (``Engine.window``), and its newest event's time
Window = tuple[float | None, list[Any]]


def at_time(window: Window, ts: float) -> list[Any]:
    """A window's aggregate at event time ``ts`` (in the bucket it ends in): a copy with
    the time since its newest event, as ``Kernel.vector`` writes it."""
    newest, vector = window
    out = list(vector)
    gap = since(ts, newest)
    if gap is not None:
        out[1], out[2] = 1, gap or 0
    return out


class Engine:
    """A plan's kernels, and one event's whole step over its entities."""

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.kernels = [Kernel(g) for g in plan.groups]
        self.lateness = plan.lateness_s
        self.shape = [
            (gi, k, g.entity_name, g.numbers, (*g.exact, *g.approx))
            for gi, (k, g) in enumerate(zip(self.kernels, plan.groups, strict=True))
        ]
        self.tiled = {g.entity_name for g in plan.groups}  # entities with tiles
        self.session_kernels = [SessionKernel(g) for g in plan.sessions]
        self.session_shape = [
            (si, k, g.entity_name, g.numbers)
            for si, (k, g) in enumerate(zip(self.session_kernels, plan.sessions, strict=True))
        ]

    def step(
        self,
        ents: dict[str, Entity],
        ts: float,
        numbers: dict[str, float],
        distinct: dict[str, str],
        read_only: Collection[str] = (),
    ) -> tuple[list[list[Any] | None], bool, list[str]]:
        """Add one event to its entities (``ents``: entity name -> its state) and
        read its windows: the group aggregates (tile groups', then session
        groups'), whether it was too late for some window, and the entity names
        it changed. The entities in ``read_only`` (or left out of ``ents``) are left
        alone and their groups' aggregates, sessions' too, are None (a slate's pair
        whose request counted there already: ``FeatureRequest.read_only``)."""
        check_time(ts)
        if read_only:
            ents = {name: ent for name, ent in ents.items() if name not in read_only}
        lateness = self.lateness
        if self.session_shape:
            # an entity with no tiles (only sessions) is never too late for them
            tiled = self.tiled
            too_late = {
                name: name in tiled and ent.w is not None and ts < ent.w - lateness
                for name, ent in ents.items()
            }
        else:
            too_late = {
                name: ent.w is not None and ts < ent.w - lateness for name, ent in ents.items()
            }
        vectors: list[list[Any] | None] = []
        for gi, k, name, fields, strings in self.shape:
            ent = ents.get(name)
            if ent is None:  # read only
                vectors.append(None)
                continue
            tiles = ent.groups.get(gi)
            xs = [float(numbers[f]) for f in fields]
            strs = [distinct[f] for f in strings] if strings else []
            if not too_late[name]:
                if tiles is None:
                    tiles = ent.groups[gi] = Tiles(int(ts // k.width))
                vectors.append(k.event(tiles, ts, xs, strs))
                continue
            # too late: counted nowhere, scored with the window ending at the newest bucket
            end = int(ts // k.width) if tiles is None else tiles.hb
            newest, prev = k.previous(tiles, end)
            vectors.append(k.vector(tiles, end, since(ts, newest), prev, xs))
        if self.session_shape:
            return self._sessions(ents, ts, numbers, vectors, too_late)
        changed = []
        for name, ent in ents.items():
            if not too_late[name]:
                changed.append(name)
                if ent.w is None or ts > ent.w:
                    ent.w = ts
        return vectors, any(too_late.values()), changed

    def _sessions(
        self,
        ents: dict[str, Entity],
        ts: float,
        numbers: dict[str, float],
        vectors: list[list[Any] | None],
        too_late: dict[str, bool],
    ) -> tuple[list[list[Any] | None], bool, list[str]]:
        """``step``'s session groups, after its tile groups (``vectors``, and
        ``too_late`` per entity for them)."""
        late = any(too_late.values())
        tiled = self.tiled
        applied = {name for name, was in too_late.items() if name in tiled and not was}
        for si, sk, name, fields in self.session_shape:
            ent = ents.get(name)
            if ent is None:  # read only
                vectors.append(None)
                continue
            sessions = ent.sessions.get(si)
            if sessions is None:
                sessions = ent.sessions[si] = []
            vector, session_late = sk.event(
                sessions, ts, [float(numbers[f]) for f in fields], ent.w
            )
            vectors.append(vector)
            if session_late:
                late = True
            else:
                applied.add(name)
        changed = []
        for name, ent in ents.items():
            if name in applied:
                changed.append(name)
                if ent.w is None or ts > ent.w:
                    ent.w = ts
        return vectors, late, changed

    def read(self, gi: int, ent: Entity, at: float | None) -> list[Any] | None:
        """Group ``gi``'s aggregate of ``ent`` at event time ``at`` (default: its newest)."""
        tiles = ent.groups.get(gi)
        if ent.w is None or tiles is None:
            return None
        ts = ent.w if at is None else check_time(at)
        end = tiles.hb if at is None else int(ts // self.kernels[gi].width)
        window = self.window(gi, ent, end)
        return None if window is None else at_time(window, ts)

    def window(self, gi: int, ent: Entity, end: int) -> Window | None:
        """Group ``gi``'s aggregate of ``ent`` over the window ending in bucket ``end``,
        as at no time in particular: ``at_time`` gives it at one (the same for every
        time in that bucket but the time since the newest event). None: no state."""
        tiles = ent.groups.get(gi)
        if ent.w is None or tiles is None:
            return None
        k = self.kernels[gi]
        newest, prev = k.previous(tiles, end)
        return newest, k.vector(tiles, end, None, prev, [])

    def read_session(self, si: int, ent: Entity, at: float | None) -> list[Any] | None:
        """Session group ``si``'s aggregate of ``ent``: the session open at event time
        ``at`` (default: the newest), ``SessionKernel.read``."""
        if at is not None:
            check_time(at)
        return self.session_kernels[si].read(ent.sessions.get(si) or [], at)


# msgspec's msgpack encoder: an entity state in ~2.6 us against ~6.3 with msgpack's
# Packer (a fraud-bench entity with full windows, ~820 B; docs/benchmarks.md). What it
# writes, Redis's cmsgpack reads (a string of 32-255 bytes goes as str8, not raw16; the
# Lua scripts read both); an entity's state holds no bytes, which it would write as
# bin, which cmsgpack refuses. Not for what a scorer holds (``compact_entity``): its
# bytes keep the encoder's spare capacity, ~40% more memory per held entity
_encode = msgspec.msgpack.Encoder().encode


def encode_entity(engine: Engine, ent: Entity) -> bytes:
    """``pack_entity``, encoded: the state the store writes for the Lua scripts."""
    return _encode(pack_entity(engine, ent))


def pack_entity(engine: Engine, ent: Entity) -> list[Any]:
    """An entity as the Lua scripts store it: ``[w, {group index (1-based) -> group}]``,
    and ``{session group index (1-based) -> sessions, flat}`` if it keeps any."""
    out = [ent.w, {gi + 1: engine.kernels[gi].pack(t) for gi, t in ent.groups.items()}]
    sessions = _packed_sessions(engine, ent) if ent.sessions else None
    if sessions:
        out.append(sessions)
    return out


def _packed_sessions(engine: Engine, ent: Entity) -> dict[int, list[Any]]:
    kernels = engine.session_kernels
    return {si + 1: kernels[si].pack(s) for si, s in ent.sessions.items() if s}


def _unpack_sessions(engine: Engine, ent: Entity, stored: Any) -> None:
    """Sessions as ``_packed_sessions`` (or Lua: a list when the keys are 1..n) made
    them; those of session groups this plan lacks are left out."""
    pairs = enumerate(stored, 1) if isinstance(stored, list) else stored.items()
    kernels = engine.session_kernels
    for si, flat in pairs:
        if 0 < si <= len(kernels) and flat:
            ent.sessions[si - 1] = kernels[si - 1].unpack(flat)


def compact_entity(engine: Engine, ent: Entity, version: int) -> bytes:
    """An entity and its version in few bytes, for a cache holding many: its
    integers as msgpack, its doubles as raw bytes, one object with no reference.
    ``expand_entity`` gives back the same numbers, bit for bit. A tile of one
    event keeps its time and its values only; running totals that the tiles
    add up to exactly are not kept (``expand_entity`` adds them up again).

    Tiles that Redis wrote may hold integral doubles as integers; they come
    back as floats of the same value."""
    ints: list[Any] = [version, len(ent.groups)]
    floats: list[float] = [NAN if ent.w is None else ent.w]
    rest: list[Any] = []
    w = floats[0]
    kernels = engine.kernels
    for gi, tiles in ent.groups.items():
        ints.append(gi)
        kernels[gi].compact(tiles, w, ints, floats, rest)
    sessions = _packed_sessions(engine, ent) or None
    return msgpack.packb([ints, array("d", floats).tobytes(), rest or None, sessions])


# An entity whose stored state (``encode_entity``) is this small is held as that state,
# which the batch that last changed it made for Redis anyway, rather than compacted:
# a slate's entities (a tile or two: ~37 bytes stored) are ~16 bytes larger so, and
# holding and expanding them again cost ~1.5 us against ~5 (docs/benchmarks.md)
HELD_AS_STORED_BYTES = 96
_AS_STORED = 0  # a held entity's first byte then (a compact one's is a msgpack array's)


def held_entity(engine: Engine, ent: Entity, version: int, stored: bytes | None = None) -> bytes:
    """What a scorer's cache holds of an entity and its version: ``stored`` (its
    state as ``encode_entity`` made it, if the caller has it) if that is at most
    ``HELD_AS_STORED_BYTES``, else ``compact_entity``. ``expand_held`` reverses both."""
    if stored is not None and len(stored) <= HELD_AS_STORED_BYTES:
        return bytes((_AS_STORED,)) + version.to_bytes(8, "little", signed=True) + stored
    return compact_entity(engine, ent, version)


def expand_held(engine: Engine, held: bytes) -> tuple[Entity, int]:
    """The entity and version ``held_entity`` made ``held`` of."""
    if held[0] == _AS_STORED:
        stored = msgpack.unpackb(held[9:], strict_map_key=False)
        return unpack_entity(engine, stored), int.from_bytes(held[1:9], "little", signed=True)
    return expand_entity(engine, held)


def expand_entity(engine: Engine, compact: bytes) -> tuple[Entity, int]:
    """The entity and version ``compact_entity`` made ``compact`` of."""
    ints, raw, rest, sessions = msgpack.unpackb(compact, strict_map_key=False)
    doubles = array("d")
    doubles.frombytes(raw)
    floats = doubles.tolist()
    others = iter(rest or ())
    ent = Entity()
    w = floats[0]
    ent.w = None if w != w else w  # NaN: no event counted yet
    p, d = 2, 1
    kernels = engine.kernels
    for _ in range(ints[1]):
        gi = ints[p]
        ent.groups[gi], p, d = kernels[gi].expand(ints, p + 1, floats, d, others, w)
    if sessions:
        _unpack_sessions(engine, ent, sessions)
    return ent, ints[0]


def unpack_entity(engine: Engine, stored: Sequence[Any] | None) -> Entity:
    """The inverse of ``pack_entity``. Lua packs a table whose keys are 1..n as
    an array, so the groups arrive as a list or a map."""
    ent = Entity()
    if stored:
        ent.w = stored[0]
        groups = stored[1]
        pairs = enumerate(groups, 1) if isinstance(groups, list) else groups.items()
        for gi, group in pairs:
            ent.groups[gi - 1] = engine.kernels[gi - 1].unpack(group)
        if len(stored) > 2 and stored[2]:
            _unpack_sessions(engine, ent, stored[2])
    return ent
