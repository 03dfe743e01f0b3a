"""The online store: tiles per entity, point-in-time snapshots, event-id dedup.

Two implementations with one behaviour: ``RedisFeatureStore`` (one Lua call per
batch: update the tiles, read the windows, store the snapshot, all atomically)
and ``MemoryFeatureStore`` for the embedded runtime. Both process a batch in
order, run the same steps, add floats in the same order and so return
bit-identical values; the one exception is ``distinct``, a HyperLogLog in Redis
(standard error 0.81%) and an exact count in memory.

Redis key layout (prefix ``rf:{ns}:``)::

    rf:{ns}:ent:{entity}:{value}          msgpack [w, {group -> {hb, t}}]: the newest
                                          event time, and per tile group its newest
                                          bucket and its tiles {bucket -> [n, newest ts,
                                          per number: sum, sum of squares, min, max,
                                          newest value, per exact-distinct field: set]}
                                          TTL = longest window + its bucket + lateness
    rf:{ns}:ent:{entity}:{value}:hll:{group}:{j}:{bucket}
                                          HyperLogLog of the j-th distinct field, same TTL
    rf:{ns}:snap:{event id}               the snapshot the event was scored with and,
                                          once scored, the prediction served for it;
                                          TTL = label horizon; its presence marks
                                          the event as seen (dedup)
    rf:{ns}:learned:{event id}            the token of the label learned for this event
                                          (the learner's run and the label's offset),
                                          TTL = horizon

``{entity}`` is the entity's field, or fields joined by ``+`` for a composite
key (``card_id+merchant``, value ``c00042|m0017``). Tiles older than the window
plus the lateness are dropped when their entity is written.

A snapshot is msgpack ``[model inputs JSON, [aggregate vector per group], late]``;
the vector layout is in ``features.definitions`` and ``FeaturePlan.values``
turns it into feature values, for the scorer and the learner alike. Once the
event is scored, ``record_served`` makes it ``[..., late, [model, version,
probability]]`` (a fourth element, written once: the first prediction served
is the one kept), so the learner's claim returns both in the same read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import msgpack
import orjson

from features.definitions import FeaturePlan, TileGroup, entity_value
from features.errors import FeatureStoreError


@dataclass(frozen=True)
class FeatureRequest:
    """One event's part in a batch update: what to add, where, and its model inputs."""

    event_id: str
    ts: float
    entities: dict[str, str]  # entity name (``card_id``, ``card_id+merchant``) -> value
    numbers: dict[str, float]
    context: bytes  # JSON of the model inputs taken from the event
    distinct: dict[str, str] = field(default_factory=dict)  # fields counted distinct, as str


def feature_request(
    plan: FeaturePlan, event: Mapping[str, Any], event_id: str, ts: float, context: bytes
) -> FeatureRequest:
    """What the plan needs from one event: its entity keys, numbers and distinct values."""
    return FeatureRequest(
        event_id=event_id,
        ts=ts,
        entities={"+".join(e): entity_value(e, event) for e in plan.entities},
        numbers={f: event[f] for f in plan.number_fields},
        context=context,
        distinct={f: str(event[f]) for f in plan.distinct_fields},
    )


@dataclass(frozen=True)
class ServedPrediction:
    """The prediction a scorer served for an event: what the user got."""

    model: str
    version: int
    probability: float

    def encode(self) -> bytes:
        return msgpack.packb([self.model, self.version, float(self.probability)])


@dataclass(frozen=True)
class FeatureSnapshot:
    """What an event was scored with: its model inputs and its window aggregates,
    and the prediction served for it once one was recorded."""

    event_id: str
    inputs: dict[str, Any]
    aggregates: list[list[float]]
    replayed: bool = False
    late: bool = False  # too late for some window: scored, but not counted there
    served: ServedPrediction | None = None

    @classmethod
    def decode(cls, event_id: str, raw: bytes, replayed: bool = False) -> FeatureSnapshot:
        context, aggregates, late, *rest = msgpack.unpackb(raw)
        served = ServedPrediction(*rest[0]) if rest else None
        return cls(event_id, orjson.loads(context), aggregates, replayed, bool(late), served)


# A stored snapshot is a 3-element msgpack array (fixarray header 0x93) until its
# served prediction is added as a fourth element (header 0x94): the header byte
# says whether one is stored, without decoding the record.
_UNSERVED, _SERVED = 0x93, 0x94


def _with_served(raw: bytes, served: bytes) -> bytes | None:
    """The stored snapshot with its served prediction added, or None if it has one."""
    if raw[0] != _UNSERVED:
        return None
    return bytes([_SERVED]) + raw[1:] + served


class Claim(Enum):
    """Why a label's snapshot was not handed out."""

    MISSING = "missing"  # the event has not been scored (yet)
    DUPLICATE = "duplicate"  # a label for this event was learned already


class FeatureStore(Protocol):
    """What the processors (and the read path) need from a store."""

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        """Add each event to its tiles and read its windows, in order.

        An event id seen before is not counted again: its stored snapshot is
        returned with ``replayed=True`` (and its ``served`` prediction, if any).
        """
        ...

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> None:
        """Store the prediction served for each event with its snapshot.

        The first one recorded for an event stays: a replayed event does not
        overwrite it. Events without a stored snapshot are skipped.
        """
        ...

    def claim_snapshots(
        self, event_ids: Sequence[str], tokens: Sequence[str], stale: Callable[[str], bool]
    ) -> list[FeatureSnapshot | Claim]:
        """The snapshot of each event (with its served prediction), marking it
        learned under its token.

        An event already marked is a ``DUPLICATE``, unless ``stale(its token)``
        says that learning was lost (a learner crashed before its snapshot):
        then the mark is taken over and the snapshot handed out again.
        """
        ...

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        """Current feature values of the given entities (name -> value), changing nothing.

        Windows end at event time ``at``, by default at each entity's newest
        event; ``last`` is then the newest value. Features of entities not
        given, and z-scores (they need an event), are left out.
        """
        ...


def _encode_snapshot(context: bytes, vectors: list[list[float]], late: bool) -> bytes:
    return msgpack.packb([context.decode(), vectors, int(late)])


class _Tiles:
    """One group's tiles of one entity value.

    A tile is ``[n, newest ts, sums, sums of squares, minima, maxima, newest
    values (as ``TileGroup.layout`` says which fields keep which), then per exact
    and per approximate distinct field: the set of values]``.
    """

    __slots__ = ("hb", "tiles")

    def __init__(self, hb: int) -> None:
        self.tiles: dict[int, list[Any]] = {}
        self.hb = hb  # newest bucket

    def add(self, g: TileGroup, b: int, ts: float, xs: list[float], strings: list[str]) -> None:
        sums, squares, mins, maxs, lasts, _ = g.layout
        t = self.tiles.get(b)
        if t is None:
            t = [0, ts, *(0.0 for _ in sums), *(0.0 for _ in squares)]
            t += [xs[i] for i in (*mins, *maxs, *lasts)]
            t += [set() for _ in strings]
            self.tiles[b] = t
        t[0] += 1
        newest = ts >= t[1]
        if newest:
            t[1] = ts
        o = 2
        for i in sums:
            t[o] += xs[i]
            o += 1
        for i in squares:
            t[o] += xs[i] * xs[i]
            o += 1
        for i in mins:
            if xs[i] < t[o]:
                t[o] = xs[i]
            o += 1
        for i in maxs:
            if xs[i] > t[o]:
                t[o] = xs[i]
            o += 1
        for i in lasts:
            if newest:
                t[o] = xs[i]
            o += 1
        for j, s in enumerate(strings):
            t[o + j].add(s)
        if b > self.hb:
            self.hb = b
        for old in [k for k in self.tiles if k <= self.hb - g.keep]:
            del self.tiles[old]


def _previous(tiles: _Tiles | None, g: TileGroup, end: int) -> tuple[float | None, list[float]]:
    """Time and ``last`` values of the newest event in the window ending at bucket ``end``."""
    newest: float | None = None
    tile: list[Any] | None = None
    for k in range(end - g.buckets + 1, end + 1):
        t = None if tiles is None else tiles.tiles.get(k)
        if t is not None and (newest is None or t[1] > newest):
            newest, tile = t[1], t
    if tile is None:
        return None, []
    sums, squares, mins, maxs, lasts, _ = g.layout
    o = 2 + len(sums) + len(squares) + len(mins) + len(maxs)
    return newest, tile[o : o + len(lasts)]


def _vector(
    tiles: _Tiles | None,
    g: TileGroup,
    end: int,
    since: float | None,
    prev: list[float],
    xs: list[float],
) -> list[float]:
    """The group aggregate of the window ending at ``end`` (layout: features.definitions)."""
    sums, squares, mins, maxs, lasts, currents = g.layout
    ns, nq, nmin, nmax = len(sums), len(squares), len(mins), len(maxs)
    nsets = len(g.exact) + len(g.approx)
    n = 0
    s, q = [0.0] * ns, [0.0] * nq
    lo: list[float | None] = [None] * nmin
    hi: list[float | None] = [None] * nmax
    sets: list[set[str]] = [set() for _ in range(nsets)]
    for k in range(end - g.buckets + 1, end + 1):
        t = None if tiles is None else tiles.tiles.get(k)
        if t is None:
            continue
        n += t[0]
        o = 2
        for j in range(ns):
            s[j] += t[o + j]
        o += ns
        for j in range(nq):
            q[j] += t[o + j]
        o += nq
        for j in range(nmin):
            low = lo[j]
            if low is None or t[o + j] < low:
                lo[j] = t[o + j]
        o += nmin
        for j in range(nmax):
            high = hi[j]
            if high is None or t[o + j] > high:
                hi[j] = t[o + j]
        o += nmax + len(lasts)
        for j in range(nsets):
            sets[j] |= t[o + j]
    out: list[float] = [n, 0 if since is None else 1, since or 0, *s, *q]
    out += [0 if v is None else v for v in (*lo, *hi)]
    out += [prev[j] if prev else 0 for j in range(len(lasts))]
    out += [xs[i] if xs else 0 for i in currents]
    out += [len(v) for v in sets]
    return out


def _since(ts: float, newest: float | None) -> float | None:
    if newest is None:
        return None
    gap = ts - newest
    return gap if gap > 0 else 0.0  # an out-of-order event comes right after the newest one


class _Entity:
    """One entity value: its watermark and its tiles per group (a Redis entity key's twin)."""

    __slots__ = ("groups", "w")

    def __init__(self) -> None:
        self.w: float | None = None  # newest event time
        self.groups: dict[int, _Tiles] = {}


class MemoryFeatureStore:
    """The embedded runtime's store: same semantics as Redis, in dictionaries.

    Keys do not expire here: the embedded runtime serves bounded runs (demo, tests).
    """

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.entities: dict[tuple[str, str], _Entity] = {}
        self.snapshots: dict[str, bytes] = {}
        self.learned: dict[str, str] = {}

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        out = []
        for req in batch:
            stored = self.snapshots.get(req.event_id)
            if stored is not None:
                out.append(FeatureSnapshot.decode(req.event_id, stored, replayed=True))
                continue
            ents = {}
            for name in req.entities:
                ent = self.entities.setdefault((name, req.entities[name]), _Entity())
                too_late = ent.w is not None and req.ts < ent.w - self.plan.lateness_s
                ents[name] = (ent, too_late)
            vectors = []
            for gi, g in enumerate(self.plan.groups):
                ent, too_late = ents[g.entity_name]
                tiles = ent.groups.get(gi)
                xs = [float(req.numbers[f]) for f in g.numbers]
                end = g.bucket(req.ts)
                if too_late and tiles is not None:
                    end = tiles.hb
                newest, prev = _previous(tiles, g, end)
                if not too_late:
                    if tiles is None:
                        tiles = ent.groups[gi] = _Tiles(end)
                    tiles.add(g, end, req.ts, xs, [req.distinct[f] for f in (*g.exact, *g.approx)])
                vectors.append(_vector(tiles, g, end, _since(req.ts, newest), prev, xs))
            for ent, too_late in ents.values():
                if not too_late and (ent.w is None or req.ts > ent.w):
                    ent.w = req.ts
            raw = _encode_snapshot(req.context, vectors, any(late for _, late in ents.values()))
            self.snapshots[req.event_id] = raw
            out.append(FeatureSnapshot.decode(req.event_id, raw))
        return out

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> None:
        for event_id, prediction in served:
            raw = self.snapshots.get(event_id)
            stored = None if raw is None else _with_served(raw, prediction.encode())
            if stored is not None:
                self.snapshots[event_id] = stored

    def claim_snapshots(
        self, event_ids: Sequence[str], tokens: Sequence[str], stale: Callable[[str], bool]
    ) -> list[FeatureSnapshot | Claim]:
        out: list[FeatureSnapshot | Claim] = []
        for event_id, token in zip(event_ids, tokens, strict=True):
            raw = self.snapshots.get(event_id)
            marked = self.learned.get(event_id)
            if raw is None:
                out.append(Claim.MISSING)
            elif marked is not None and not stale(marked):
                out.append(Claim.DUPLICATE)
            else:
                self.learned[event_id] = token
                out.append(FeatureSnapshot.decode(event_id, raw))
        return out

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        aggregates: list[list[float] | None] = []
        for gi, g in enumerate(self.plan.groups):
            value = entities.get(g.entity_name)
            ent = None if value is None else self.entities.get((g.entity_name, value))
            tiles = None if ent is None else ent.groups.get(gi)
            if ent is None or ent.w is None or tiles is None:
                aggregates.append(None)
                continue
            ts, end = (ent.w, tiles.hb) if at is None else (at, g.bucket(at))
            newest, prev = _previous(tiles, g, end)
            aggregates.append(_vector(tiles, g, end, _since(ts, newest), prev, []))
        return self.plan.current_values(aggregates)


# Shared by both scripts; mirrors the Python above step for step, so both stores
# add in the same order. G[g]: B buckets per window, keep (buckets kept behind
# the newest), S Q MN MX L C (1-based positions in the event's numbers of the
# fields keeping sum, square, min, max, last; and the z-score fields), nx exact
# and na approximate distinct fields, ent (the group's entity, an index into the
# event's entity keys), ttl (ms) of its key, R (numbers per tile record). An
# entity key holds msgpack [w, {group index -> [newest bucket, tiles]}], a
# group's tiles flat, one record of R values per bucket: [bucket, n, newest ts,
# stats..., sets...]; flat because cmsgpack (un)packs one big array ~2.5x
# faster than a table per tile. ``idx`` maps a bucket to its record's offset.
_PRELUDE = """
local cache, order = {}, {}
local function load(key)
  local st = cache[key]
  if st then return st end
  st = {g = {}}
  local raw = redis.call('GET', key)
  if raw then
    local d = cmsgpack.unpack(raw)
    st.w = d[1]
    for gi, gd in pairs(d[2]) do st.g[gi] = {hb = gd[1], F = gd[2]} end
  end
  cache[key] = st
  order[#order + 1] = key
  return st
end
local function grp(st, gi, g)
  local gs = st.g[gi]
  if gs and not gs.idx then
    gs.idx = {}
    local F = gs.F
    for p = 0, #F - 1, g.R do gs.idx[F[p + 1]] = p end
  end
  return gs
end
local function previous(gs, g, e)
  local newest, base = nil, nil
  if gs then
    local F, idx = gs.F, gs.idx
    for k = e - g.B + 1, e do
      local p = idx[k]
      if p and (newest == nil or F[p + 3] > newest) then newest = F[p + 3]; base = p + 1 end
    end
  end
  local pv = {}
  if base then
    local o = base + 2 + #g.S + #g.Q + #g.MN + #g.MX
    for j = 1, #g.L do pv[j] = gs.F[o + j] end
  end
  return newest, pv
end
local function vector(gs, g, key, gi, e, since, pv, xs)
  local n = 0
  local s, q, lo, hi, sets = {}, {}, {}, {}, {}
  local ns, nq, nmin, nmax = #g.S, #g.Q, #g.MN, #g.MX
  for j = 1, ns do s[j] = 0 end
  for j = 1, nq do q[j] = 0 end
  for j = 1, g.nx do sets[j] = {} end
  if gs then
    local F, idx = gs.F, gs.idx
    for k = e - g.B + 1, e do
      local p = idx[k]
      if p then
        n = n + F[p + 2]
        local o = p + 3
        for j = 1, ns do s[j] = s[j] + F[o + j] end
        o = o + ns
        for j = 1, nq do q[j] = q[j] + F[o + j] end
        o = o + nq
        for j = 1, nmin do
          if lo[j] == nil or F[o + j] < lo[j] then lo[j] = F[o + j] end
        end
        o = o + nmin
        for j = 1, nmax do
          if hi[j] == nil or F[o + j] > hi[j] then hi[j] = F[o + j] end
        end
        o = o + nmax + #g.L
        for j = 1, g.nx do
          for v in pairs(F[o + j]) do sets[j][v] = true end
        end
      end
    end
  end
  local out = {n, since and 1 or 0, since or 0}
  for j = 1, ns do out[#out + 1] = s[j] end
  for j = 1, nq do out[#out + 1] = q[j] end
  for j = 1, nmin do out[#out + 1] = lo[j] or 0 end
  for j = 1, nmax do out[#out + 1] = hi[j] or 0 end
  for j = 1, #g.L do out[#out + 1] = pv[j] or 0 end
  for j = 1, #g.C do out[#out + 1] = xs[g.C[j]] or 0 end
  for j = 1, g.nx do
    local c = 0
    for _ in pairs(sets[j]) do c = c + 1 end
    out[#out + 1] = c
  end
  for j = 1, g.na do
    local hk = {}
    for k = e - g.B + 1, e do hk[#hk + 1] = key .. ':hll:' .. gi .. ':' .. j .. ':' .. k end
    out[#out + 1] = redis.call('PFCOUNT', unpack(hk))
  end
  return out
end
local function since_of(ts, newest)
  if newest == nil then return nil end
  local gap = ts - newest
  if gap > 0 then return gap end
  return 0
end
"""

# ARGV: snapshot ttl ms, lateness s, the group parameters, then the batch
# (msgpack): per event [snapshot key, context JSON, ts, [entity keys],
# [per group: [bucket, [numbers], [exact then approximate distinct strings]]]].
_UPDATE_AND_READ = (
    _PRELUDE
    + """
local function add(st, gi, g, key, b, ts, xs, strs)
  local gs = st.g[gi]
  if not gs then gs = {hb = b, F = {}, idx = {}}; st.g[gi] = gs end
  local F = gs.F
  local p = gs.idx[b]
  if not p then
    p = #F
    gs.idx[b] = p
    F[p + 1] = b; F[p + 2] = 0; F[p + 3] = ts
    local m = p + 3
    for j = 1, #g.S + #g.Q do m = m + 1; F[m] = 0 end
    for j = 1, #g.MN do m = m + 1; F[m] = xs[g.MN[j]] end
    for j = 1, #g.MX do m = m + 1; F[m] = xs[g.MX[j]] end
    for j = 1, #g.L do m = m + 1; F[m] = xs[g.L[j]] end
    for j = 1, g.nx do m = m + 1; F[m] = {} end
  end
  F[p + 2] = F[p + 2] + 1
  local newest = ts >= F[p + 3]
  if newest then F[p + 3] = ts end
  local o = p + 3
  for j = 1, #g.S do F[o + j] = F[o + j] + xs[g.S[j]] end
  o = o + #g.S
  for j = 1, #g.Q do
    local x = xs[g.Q[j]]
    F[o + j] = F[o + j] + x * x
  end
  o = o + #g.Q
  for j = 1, #g.MN do
    local x = xs[g.MN[j]]
    if x < F[o + j] then F[o + j] = x end
  end
  o = o + #g.MN
  for j = 1, #g.MX do
    local x = xs[g.MX[j]]
    if x > F[o + j] then F[o + j] = x end
  end
  o = o + #g.MX
  if newest then
    for j = 1, #g.L do F[o + j] = xs[g.L[j]] end
  end
  o = o + #g.L
  for j = 1, g.nx do F[o + j][strs[j]] = true end
  for j = 1, g.na do
    local hk = key .. ':hll:' .. gi .. ':' .. j .. ':' .. b
    redis.call('PFADD', hk, strs[g.nx + j])
    redis.call('PEXPIRE', hk, g.ttl)
  end
  if b > gs.hb then gs.hb = b end
  st.dirty = g.ttl
  return gs
end

local snap_ttl = ARGV[1]
local lateness = tonumber(ARGV[2])
local G = cmsgpack.unpack(ARGV[3])
local batch = cmsgpack.unpack(ARGV[4])
local out = {}
for n = 1, #batch do
  local ev = batch[n]
  local stored = redis.call('GET', ev[1])
  if stored then
    out[n] = '=' .. stored
  else
    local ts, keys = ev[3], ev[4]
    local ents, too_late, late = {}, {}, 0
    for e = 1, #keys do
      ents[e] = load(keys[e])
      too_late[e] = ents[e].w ~= nil and ts < ents[e].w - lateness
      if too_late[e] then late = 1 end
    end
    local vecs = {}
    for gi = 1, #G do
      local g, gd = G[gi], ev[5][gi]
      local st = ents[g.ent]
      local gs = grp(st, gi, g)
      local b = gd[1]
      local e = b
      if too_late[g.ent] and gs then e = gs.hb end
      local newest, pv = previous(gs, g, e)
      if not too_late[g.ent] then gs = add(st, gi, g, keys[g.ent], b, ts, gd[2], gd[3]) end
      vecs[gi] = vector(gs, g, keys[g.ent], gi, e, since_of(ts, newest), pv, gd[2])
    end
    for e = 1, #keys do
      if not too_late[e] and (ents[e].w == nil or ts > ents[e].w) then ents[e].w = ts end
    end
    local snap = cmsgpack.pack({ev[2], vecs, late})
    redis.call('SET', ev[1], snap, 'PX', snap_ttl)
    out[n] = snap
  end
end
for _, key in ipairs(order) do
  local st = cache[key]
  if st.dirty then
    local groups = {}
    for gi, gs in pairs(st.g) do
      local g, F = G[gi], gs.F
      local oldest = gs.hb - g.keep
      local kept = F
      for p = 0, #F - 1, g.R do
        if F[p + 1] <= oldest then kept = nil; break end
      end
      if not kept then
        kept = {}
        for p = 0, #F - 1, g.R do
          if F[p + 1] > oldest then
            for x = 1, g.R do kept[#kept + 1] = F[p + x] end
          end
        end
      end
      groups[gi] = {gs.hb, kept}
    end
    redis.call('SET', key, cmsgpack.pack({st.w, groups}), 'PX', st.dirty)
  end
end
return out
"""
)

# ARGV: the group parameters, then per group: its entity key ('' to skip it), the
# end bucket and the read time ('' and '' for "at the newest event").
_READ = (
    _PRELUDE
    + """
local G = cmsgpack.unpack(ARGV[1])
local out = {}
local a = 2
for gi = 1, #G do
  local key = ARGV[a]
  out[gi] = ''
  if key ~= '' then
    local st = load(key)
    local gs = grp(st, gi, G[gi])
    if st.w ~= nil and gs then
      local e = tonumber(ARGV[a + 1]) or gs.hb
      local ts = tonumber(ARGV[a + 2]) or st.w
      local newest, pv = previous(gs, G[gi], e)
      out[gi] = cmsgpack.pack(vector(gs, G[gi], key, gi, e, since_of(ts, newest), pv, {}))
    end
  end
  a = a + 3
end
return out
"""
)

# ARGV[1]: msgpack [[snapshot key, msgpack [model, version, probability]], ...]. Adds the
# served prediction as the snapshot's fourth element unless it has one (see _UNSERVED).
_RECORD_SERVED = """
local batch = cmsgpack.unpack(ARGV[1])
for n = 1, #batch do
  local key = batch[n][1]
  local snap = redis.call('GET', key)
  if snap and string.byte(snap, 1) == 147 then  -- 0x93: no served prediction yet
    redis.call('SET', key, '\\148' .. string.sub(snap, 2) .. batch[n][2], 'KEEPTTL')
  end
end
return {}
"""

# KEYS: pairs (snapshot key, learned key); ARGV[1]: learned-marker ttl ms, then a token
# per pair. Returns per pair: '?' (no snapshot), the snapshot (marked now), or
# '=' .. the existing token .. newline .. the snapshot (marked before).
_CLAIM = """
local out = {}
for i = 1, #KEYS, 2 do
  local snap = redis.call('GET', KEYS[i])
  if not snap then
    out[#out + 1] = '?'
  elseif redis.call('SET', KEYS[i + 1], ARGV[(i + 1) / 2 + 1], 'NX', 'PX', ARGV[1]) then
    out[#out + 1] = snap
  else
    out[#out + 1] = '=' .. redis.call('GET', KEYS[i + 1]) .. '\\n' .. snap
  end
end
return out
"""


_LUA_STATS = ("S", "Q", "MN", "MX", "L", "C")  # names of definitions.STATS in the scripts


class RedisFeatureStore:
    """The production store: one Lua call per batch on a real Redis.

    The update script names its keys inside the batch rather than in KEYS, so it
    needs a standalone Redis (or every key of a namespace on one cluster node).
    """

    def __init__(self, client: Any, namespace: str, plan: FeaturePlan, horizon_s: float) -> None:
        self.client = client
        self.plan = plan
        self.prefix = f"rf:{namespace}:"
        self.horizon_ms = str(int(horizon_s * 1000))
        self._update = client.register_script(_UPDATE_AND_READ)
        self._read = client.register_script(_READ)
        self._claim = client.register_script(_CLAIM)
        self._record_served = client.register_script(_RECORD_SERVED)
        self._entities = plan.entities
        names = ["+".join(e) for e in self._entities]
        ttl_s = {name: 0.0 for name in names}
        for g in plan.groups:
            ttl_s[g.entity_name] = max(ttl_s[g.entity_name], g.ttl_s)
        params = []
        for g in plan.groups:
            layout = {k: [i + 1 for i in ix] for k, ix in zip(_LUA_STATS, g.layout, strict=True)}
            params.append(
                {"B": g.buckets, "keep": g.keep, "nx": len(g.exact), "na": len(g.approx),
                 "R": 3 + sum(len(ix) for ix in g.layout[:5]) + len(g.exact),
                 "ent": names.index(g.entity_name) + 1,
                 "ttl": str(int(ttl_s[g.entity_name] * 1000) + 1000), **layout}
            )  # fmt: skip
        self._groups = msgpack.packb(params, use_bin_type=False)
        self._header = [self.horizon_ms, repr(plan.lateness_s), self._groups]
        # what update_and_read packs per event, worked out once (it runs per event)
        self._entity_prefixes = [(name, self.entity_key(name, "")) for name in names]
        self._shape = [(g.bucket_s, g.numbers, (*g.exact, *g.approx)) for g in plan.groups]

    def snapshot_key(self, event_id: str) -> str:
        return f"{self.prefix}snap:{event_id}"

    def entity_key(self, entity_name: str, value: str) -> str:
        return f"{self.prefix}ent:{entity_name}:{value}"

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        if not batch:
            return []
        snap, entities, shape = self.snapshot_key(""), self._entity_prefixes, self._shape
        events = []
        for req in batch:
            ts, nums, strs, ents = float(req.ts), req.numbers, req.distinct, req.entities
            events.append(
                [
                    snap + req.event_id, req.context, ts,
                    [prefix + ents[name] for name, prefix in entities],
                    [
                        [int(ts // width), [float(nums[f]) for f in numbers],
                         [strs[f] for f in strings]]
                        for width, numbers, strings in shape
                    ],
                ]
            )  # fmt: skip
        # bytes as msgpack "raw": Redis' cmsgpack predates the bin type
        blob = msgpack.packb(events, use_bin_type=False)
        raw = self._call(self._update, [], [*self._header, blob])
        out = []
        for req, item in zip(batch, raw, strict=True):
            if item.startswith(b"="):
                out.append(FeatureSnapshot.decode(req.event_id, item[1:], replayed=True))
            else:
                out.append(FeatureSnapshot.decode(req.event_id, item))
        return out

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> None:
        if not served:
            return
        snap = self.snapshot_key("")
        batch = [[snap + event_id, prediction.encode()] for event_id, prediction in served]
        self._call(self._record_served, [], [msgpack.packb(batch, use_bin_type=False)])

    def claim_snapshots(
        self, event_ids: Sequence[str], tokens: Sequence[str], stale: Callable[[str], bool]
    ) -> list[FeatureSnapshot | Claim]:
        if not event_ids:
            return []
        keys = []
        for event_id in event_ids:
            keys += [self.snapshot_key(event_id), self.learned_key(event_id)]
        raw = self._call(self._claim, keys, [self.horizon_ms, *tokens])
        out: list[FeatureSnapshot | Claim] = []
        taken: dict[str, str] = {}
        for event_id, token, item in zip(event_ids, tokens, raw, strict=True):
            if item == b"?":
                out.append(Claim.MISSING)
            elif item.startswith(b"="):
                marked, _, snap = item[1:].partition(b"\n")
                if stale(marked.decode()):
                    taken[self.learned_key(event_id)] = token
                    out.append(FeatureSnapshot.decode(event_id, snap))
                else:
                    out.append(Claim.DUPLICATE)
            else:
                out.append(FeatureSnapshot.decode(event_id, item))
        if taken:  # only after a learner restart: rare, a second round trip is fine
            pipe = self.client.pipeline(transaction=False)
            for key, token in taken.items():
                pipe.set(key, token, px=int(self.horizon_ms))
            pipe.execute()
        return out

    def learned_key(self, event_id: str) -> str:
        return f"{self.prefix}learned:{event_id}"

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        args: list[Any] = [self._groups]
        for g in self.plan.groups:
            value = entities.get(g.entity_name)
            args.append("" if value is None else self.entity_key(g.entity_name, value))
            args += ["", ""] if at is None else [str(g.bucket(at)), repr(float(at))]
        raw = self._call(self._read, [], args)
        aggregates = [msgpack.unpackb(item) if item else None for item in raw]
        return self.plan.current_values(aggregates)

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> list[bytes]:
        import redis

        try:
            return list(script(keys=keys, args=args))
        except redis.ConnectionError as exc:
            raise FeatureStoreError(f"Redis unreachable: {exc}") from exc
