"""The online store: tiles per entity, point-in-time snapshots, event-id dedup.

Two implementations with one behaviour: ``RedisFeatureStore`` (one Lua call per
batch: update the tiles, read the windows, store the snapshot, all atomically)
and ``MemoryFeatureStore`` for the embedded runtime. Both process a batch in
order, run the same steps, add floats in the same order and so return
bit-identical values; the one exception is ``distinct``, a HyperLogLog in Redis
(standard error 0.81%) and an exact count in memory.

Redis key layout (prefix ``rf:{ns}:``)::

    rf:{ns}:tile:{group}:{entity value}   hash: "w" newest event time, "hb" newest
                                          bucket, "{bucket}" -> msgpack array
                                          [n, newest ts, per number: sum, sum of
                                          squares, min, max, newest value,
                                          per exact-distinct field: set of values]
                                          TTL = window + one bucket + lateness
    rf:{ns}:tile:{group}:{entity value}:hll:{j}:{bucket}
                                          HyperLogLog of the j-th distinct field, same TTL
    rf:{ns}:snap:{event id}               the snapshot the event was scored with,
                                          TTL = label horizon; its presence marks
                                          the event as seen (dedup)
    rf:{ns}:learned:{event id}            a label was learned for this event, TTL = horizon

``{group}`` is ``{entity}:{window}s:{buckets}`` (``card_id:3600s:12``); a
composite entity is ``card_id+merchant`` and its value ``c00042|m017``. Tiles
older than the window plus the lateness are deleted when their hash is written.

A snapshot is JSON: ``{"x": <model inputs>, "a": [<group aggregate> per group]}``
plus ``"l": 1`` when the event was too late for some window; the group
aggregate layout is in ``features.definitions`` and ``FeaturePlan.values``
turns it into feature values, for the scorer and the learner alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

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
class FeatureSnapshot:
    """What an event was scored with: its model inputs and its window aggregates."""

    event_id: str
    inputs: dict[str, Any]
    aggregates: list[list[float]]
    replayed: bool = False
    late: bool = False  # too late for some window: scored, but not counted there

    @classmethod
    def decode(cls, event_id: str, raw: bytes, replayed: bool = False) -> FeatureSnapshot:
        data = orjson.loads(raw)
        return cls(event_id, data["x"], data["a"], replayed, bool(data.get("l")))


class Claim(Enum):
    """Why a label's snapshot was not handed out."""

    MISSING = "missing"  # the event has not been scored (yet)
    DUPLICATE = "duplicate"  # a label for this event was learned already


class FeatureStore(Protocol):
    """What the processors (and the read path) need from a store."""

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        """Add each event to its tiles and read its windows, in order.

        An event id seen before is not counted again: its stored snapshot is
        returned with ``replayed=True``.
        """
        ...

    def claim_snapshots(self, event_ids: Sequence[str]) -> list[FeatureSnapshot | Claim]:
        """The snapshot of each event, marking it learned; each id is handed out once."""
        ...

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        """Current feature values of the given entities (name -> value), changing nothing.

        Windows end at event time ``at``, by default at each entity's newest
        event; ``last`` is then the newest value. Features of entities not
        given, and z-scores (they need an event), are left out.
        """
        ...


def _fmt(value: float) -> str:
    # 17 significant digits round-trip a double exactly; Lua uses the same format.
    return f"{value:.17g}"


def _encode_snapshot(context: bytes, vectors: list[str], late: bool) -> bytes:
    tail = ',"l":1}' if late else "}"
    return b'{"x":' + context + b',"a":[' + ",".join(vectors).encode() + b"]" + tail.encode()


class _Entity:
    """One entity value's tiles in one group (the memory twin of a Redis tile hash).

    A tile is ``[n, newest ts, per number: sum, squares, min, max, newest value,
    per exact and per approximate distinct field: set of values]``.
    """

    __slots__ = ("hb", "tiles", "w")

    def __init__(self) -> None:
        self.tiles: dict[int, list[Any]] = {}
        self.w: float | None = None  # newest event time (the watermark)
        self.hb: int | None = None  # newest bucket

    def previous(self, g: TileGroup, end: int) -> tuple[float | None, list[float]]:
        """Time and values of the newest event in the window ending at bucket ``end``."""
        newest: float | None = None
        tile: list[Any] | None = None
        for k in range(end - g.buckets + 1, end + 1):
            t = self.tiles.get(k)
            if t is not None and (newest is None or t[1] > newest):
                newest, tile = t[1], t
        if tile is None:
            return None, []
        return newest, [tile[2 + 5 * j + 4] for j in range(len(g.numbers))]

    def add(self, g: TileGroup, b: int, ts: float, xs: list[float], strings: list[str]) -> None:
        t = self.tiles.get(b)
        if t is None:
            t = [0, ts]
            for x in xs:
                t += [0.0, 0.0, x, x, x]
            t += [set() for _ in strings]
            self.tiles[b] = t
        t[0] += 1
        newest = ts >= t[1]
        if newest:
            t[1] = ts
        for j, x in enumerate(xs):
            o = 2 + 5 * j
            t[o] += x
            t[o + 1] += x * x
            if x < t[o + 2]:
                t[o + 2] = x
            if x > t[o + 3]:
                t[o + 3] = x
            if newest:
                t[o + 4] = x
        for j, s in enumerate(strings):
            t[2 + 5 * len(xs) + j].add(s)
        if self.w is None or ts > self.w:
            self.w = ts
        if self.hb is None or b > self.hb:
            self.hb = b
        for old in [k for k in self.tiles if k <= self.hb - g.keep]:
            del self.tiles[old]

    def vector(
        self, g: TileGroup, end: int, since: float | None, prev: list[float], xs: list[float]
    ) -> str:
        """The group aggregate of the window ending at ``end`` (JSON array text)."""
        nn, nsets = len(g.numbers), len(g.exact) + len(g.approx)
        n = 0
        s, q = [0.0] * nn, [0.0] * nn
        lo: list[float | None] = [None] * nn
        hi: list[float | None] = [None] * nn
        sets: list[set[str]] = [set() for _ in range(nsets)]
        for k in range(end - g.buckets + 1, end + 1):
            t = self.tiles.get(k)
            if t is None:
                continue
            n += t[0]
            for j in range(nn):
                o = 2 + 5 * j
                s[j] += t[o]
                q[j] += t[o + 1]
                if lo[j] is None or t[o + 2] < lo[j]:
                    lo[j] = t[o + 2]
                if hi[j] is None or t[o + 3] > hi[j]:
                    hi[j] = t[o + 3]
            for j in range(nsets):
                sets[j] |= t[2 + 5 * nn + j]
        out = [_fmt(n), "0" if since is None else "1", _fmt(since or 0.0)]
        for j in range(nn):
            low, high = lo[j], hi[j]
            out += [_fmt(s[j]), _fmt(q[j])]
            out += [_fmt(0.0 if low is None else low), _fmt(0.0 if high is None else high)]
            out += [_fmt(prev[j] if prev else 0.0), _fmt(xs[j] if xs else 0.0)]
        out += [_fmt(len(v)) for v in sets]
        return "[" + ",".join(out) + "]"


def _since(ts: float, newest: float | None) -> float | None:
    if newest is None:
        return None
    gap = ts - newest
    return gap if gap > 0 else 0.0  # an out-of-order event comes right after the newest one


class MemoryFeatureStore:
    """The embedded runtime's store: same semantics as Redis, in dictionaries.

    Keys do not expire here: the embedded runtime serves bounded runs (demo, tests).
    """

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.entities: dict[tuple[str, str], _Entity] = {}
        self.snapshots: dict[str, bytes] = {}
        self.learned: set[str] = set()

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        out = []
        for req in batch:
            stored = self.snapshots.get(req.event_id)
            if stored is not None:
                out.append(FeatureSnapshot.decode(req.event_id, stored, replayed=True))
                continue
            vectors, late = [], False
            for g in self.plan.groups:
                ent = self.entities.setdefault((g.name, req.entities[g.entity_name]), _Entity())
                xs = [float(req.numbers[f]) for f in g.numbers]
                too_late = ent.w is not None and req.ts < ent.w - g.lateness_s
                end = ent.hb if too_late and ent.hb is not None else g.bucket(req.ts)
                newest, prev = ent.previous(g, end)
                if too_late:
                    late = True
                else:
                    strings = [req.distinct[f] for f in (*g.exact, *g.approx)]
                    ent.add(g, end, req.ts, xs, strings)
                vectors.append(ent.vector(g, end, _since(req.ts, newest), prev, xs))
            raw = _encode_snapshot(req.context, vectors, late)
            self.snapshots[req.event_id] = raw
            out.append(FeatureSnapshot.decode(req.event_id, raw))
        return out

    def claim_snapshots(self, event_ids: Sequence[str]) -> list[FeatureSnapshot | Claim]:
        out: list[FeatureSnapshot | Claim] = []
        for event_id in event_ids:
            raw = self.snapshots.get(event_id)
            if raw is None:
                out.append(Claim.MISSING)
            elif event_id in self.learned:
                out.append(Claim.DUPLICATE)
            else:
                self.learned.add(event_id)
                out.append(FeatureSnapshot.decode(event_id, raw))
        return out

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        aggregates: list[list[float] | None] = []
        for g in self.plan.groups:
            value = entities.get(g.entity_name)
            ent = None if value is None else self.entities.get((g.name, value))
            if ent is None or ent.w is None or ent.hb is None:
                aggregates.append(None)
                continue
            ts, end = (ent.w, ent.hb) if at is None else (at, g.bucket(at))
            newest, prev = ent.previous(g, end)
            aggregates.append(orjson.loads(ent.vector(g, end, _since(ts, newest), prev, [])))
        return self.plan.current_values(aggregates)


# Shared by both scripts. A group's parameters G[g]: B buckets per window, keep
# (buckets kept behind the newest), nn numbers, nx exact and na approximate
# distinct fields, ttl (ms), late (allowed lateness, s). Tiles mirror
# ``_Entity`` above, step for step, so both stores round alike.
_PRELUDE = """
local fmt = function(v) return string.format('%.17g', v) end
local function group(a, i)
  return {B = tonumber(a[i]), keep = tonumber(a[i + 1]), nn = tonumber(a[i + 2]),
          nx = tonumber(a[i + 3]), na = tonumber(a[i + 4]), ttl = a[i + 5],
          late = tonumber(a[i + 6])}
end
local cache, order = {}, {}
local function load(key, g)
  local st = cache[key]
  if st then return st end
  st = {t = {}, dirty = {}, g = g}
  local flat = redis.call('HGETALL', key)
  for j = 1, #flat, 2 do
    local f = flat[j]
    if f == 'w' then st.w = tonumber(flat[j + 1])
    elseif f == 'hb' then st.hb = tonumber(flat[j + 1])
    else st.t[tonumber(f)] = cmsgpack.unpack(flat[j + 1]) end
  end
  cache[key] = st
  order[#order + 1] = key
  return st
end
local function previous(st, g, e)
  local newest, tile = nil, nil
  for k = e - g.B + 1, e do
    local t = st.t[k]
    if t and (newest == nil or t[2] > newest) then newest = t[2]; tile = t end
  end
  local pv = {}
  if tile then for j = 1, g.nn do pv[j] = tile[2 + 5 * (j - 1) + 5] end end
  return newest, pv
end
local function vector(st, g, key, e, since, pv, xs)
  local n = 0
  local s, q, lo, hi, sets = {}, {}, {}, {}, {}
  for j = 1, g.nn do s[j] = 0; q[j] = 0 end
  for j = 1, g.nx do sets[j] = {} end
  for k = e - g.B + 1, e do
    local t = st.t[k]
    if t then
      n = n + t[1]
      for j = 1, g.nn do
        local o = 2 + 5 * (j - 1)
        s[j] = s[j] + t[o + 1]
        q[j] = q[j] + t[o + 2]
        if lo[j] == nil or t[o + 3] < lo[j] then lo[j] = t[o + 3] end
        if hi[j] == nil or t[o + 4] > hi[j] then hi[j] = t[o + 4] end
      end
      for j = 1, g.nx do
        for v in pairs(t[2 + 5 * g.nn + j]) do sets[j][v] = true end
      end
    end
  end
  local out = {fmt(n), since and '1' or '0', fmt(since or 0)}
  for j = 1, g.nn do
    out[#out + 1] = fmt(s[j]); out[#out + 1] = fmt(q[j])
    out[#out + 1] = fmt(lo[j] or 0); out[#out + 1] = fmt(hi[j] or 0)
    out[#out + 1] = fmt(pv[j] or 0); out[#out + 1] = fmt(xs[j] or 0)
  end
  for j = 1, g.nx do
    local c = 0
    for _ in pairs(sets[j]) do c = c + 1 end
    out[#out + 1] = fmt(c)
  end
  for j = 1, g.na do
    local hk = {}
    for k = e - g.B + 1, e do hk[#hk + 1] = key .. ':hll:' .. j .. ':' .. k end
    out[#out + 1] = fmt(redis.call('PFCOUNT', unpack(hk)))
  end
  return '[' .. table.concat(out, ',') .. ']'
end
local function since_of(ts, newest)
  if newest == nil then return nil end
  local gap = ts - newest
  if gap > 0 then return gap end
  return 0
end
"""

# ARGV: snapshot ttl ms, group count, 7 parameters per group; then per event:
# context JSON, ts, then per group: bucket, numbers, exact and approximate strings.
# KEYS: per event: its snapshot key, then its tile key per group.
_UPDATE_AND_READ = (
    _PRELUDE
    + """
local function add(st, g, key, b, ts, xs, strs)
  local t = st.t[b]
  if not t then
    t = {0, ts}
    for j = 1, g.nn do
      local x = xs[j]
      t[#t + 1] = 0; t[#t + 1] = 0; t[#t + 1] = x; t[#t + 1] = x; t[#t + 1] = x
    end
    for j = 1, g.nx do t[#t + 1] = {} end
    st.t[b] = t
  end
  t[1] = t[1] + 1
  local newest = ts >= t[2]
  if newest then t[2] = ts end
  for j = 1, g.nn do
    local o = 2 + 5 * (j - 1)
    local x = xs[j]
    t[o + 1] = t[o + 1] + x
    t[o + 2] = t[o + 2] + x * x
    if x < t[o + 3] then t[o + 3] = x end
    if x > t[o + 4] then t[o + 4] = x end
    if newest then t[o + 5] = x end
  end
  for j = 1, g.nx do t[2 + 5 * g.nn + j][strs[j]] = true end
  for j = 1, g.na do
    local hk = key .. ':hll:' .. j .. ':' .. b
    redis.call('PFADD', hk, strs[g.nx + j])
    redis.call('PEXPIRE', hk, g.ttl)
  end
  st.dirty[b] = true
  if st.w == nil or ts > st.w then st.w = ts end
  if st.hb == nil or b > st.hb then st.hb = b end
end

local snap_ttl = ARGV[1]
local ng = tonumber(ARGV[2])
local G = {}
local i = 3
for g = 1, ng do G[g] = group(ARGV, i); i = i + 7 end
local out = {}
local k = 1
while i <= #ARGV do
  local snapkey = KEYS[k]
  local ctx = ARGV[i]
  local ts = tonumber(ARGV[i + 1])
  i = i + 2
  local stored = redis.call('GET', snapkey)
  if stored then
    out[#out + 1] = '=' .. stored
    for g = 1, ng do i = i + 1 + G[g].nn + G[g].nx + G[g].na end
  else
    local parts, late = {}, false
    for g = 1, ng do
      local gg = G[g]
      local key = KEYS[k + g]
      local b = tonumber(ARGV[i])
      i = i + 1
      local xs, strs = {}, {}
      for j = 1, gg.nn do xs[j] = tonumber(ARGV[i]); i = i + 1 end
      for j = 1, gg.nx + gg.na do strs[j] = ARGV[i]; i = i + 1 end
      local st = load(key, gg)
      local too_late = st.w ~= nil and ts < st.w - gg.late
      local e = b
      if too_late then e = st.hb end
      local newest, pv = previous(st, gg, e)
      if too_late then
        late = true
      else
        add(st, gg, key, b, ts, xs, strs)
      end
      parts[g] = vector(st, gg, key, e, since_of(ts, newest), pv, xs)
    end
    local snap = '{"x":' .. ctx .. ',"a":[' .. table.concat(parts, ',') .. ']'
    if late then snap = snap .. ',"l":1}' else snap = snap .. '}' end
    redis.call('SET', snapkey, snap, 'PX', snap_ttl)
    out[#out + 1] = snap
  end
  k = k + 1 + ng
end
for _, key in ipairs(order) do
  local st = cache[key]
  if next(st.dirty) then
    local upd = {'w', fmt(st.w), 'hb', string.format('%d', st.hb)}
    local stale = {}
    for b in pairs(st.t) do
      if b <= st.hb - st.g.keep then stale[#stale + 1] = string.format('%d', b) end
    end
    for b in pairs(st.dirty) do
      if b > st.hb - st.g.keep then
        upd[#upd + 1] = string.format('%d', b)
        upd[#upd + 1] = cmsgpack.pack(st.t[b])
      end
    end
    redis.call('HSET', key, unpack(upd))
    if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
    redis.call('PEXPIRE', key, st.g.ttl)
  end
end
return out
"""
)

# KEYS: tile keys; ARGV per key: 7 group parameters, then the end bucket and the
# read time, both '' for "at the newest event".
_READ = (
    _PRELUDE
    + """
local out = {}
for n = 1, #KEYS do
  local a = 9 * (n - 1) + 1
  local g = group(ARGV, a)
  local st = load(KEYS[n], g)
  if st.w == nil then
    out[n] = ''
  else
    local e = tonumber(ARGV[a + 7]) or st.hb
    local ts = tonumber(ARGV[a + 8]) or st.w
    local newest, pv = previous(st, g, e)
    out[n] = vector(st, g, KEYS[n], e, since_of(ts, newest), pv, {})
  end
end
return out
"""
)

# KEYS: pairs (snapshot key, learned key); ARGV[1]: learned-marker ttl ms.
_CLAIM = """
local out = {}
for i = 1, #KEYS, 2 do
  local snap = redis.call('GET', KEYS[i])
  if not snap then
    out[#out + 1] = '?'
  elseif redis.call('SET', KEYS[i + 1], '1', 'NX', 'PX', ARGV[1]) then
    out[#out + 1] = snap
  else
    out[#out + 1] = '='
  end
end
return out
"""


def _group_args(g: TileGroup) -> list[str]:
    ttl_ms = int(g.ttl_s * 1000) + 1000
    sizes = [g.buckets, g.keep, len(g.numbers), len(g.exact), len(g.approx), ttl_ms]
    return [str(v) for v in sizes] + [_fmt(g.lateness_s)]


class RedisFeatureStore:
    """The production store: one Lua call per batch on a real Redis."""

    def __init__(self, client: Any, namespace: str, plan: FeaturePlan, horizon_s: float) -> None:
        self.client = client
        self.plan = plan
        self.prefix = f"rf:{namespace}:"
        self.horizon_ms = str(int(horizon_s * 1000))
        self._update = client.register_script(_UPDATE_AND_READ)
        self._read = client.register_script(_READ)
        self._claim = client.register_script(_CLAIM)
        self._header: list[str] = [self.horizon_ms, str(len(plan.groups))]
        for g in plan.groups:
            self._header += _group_args(g)

    def snapshot_key(self, event_id: str) -> str:
        return f"{self.prefix}snap:{event_id}"

    def tile_key(self, group: TileGroup, entity_value: str) -> str:
        return f"{self.prefix}tile:{group.name}:{entity_value}"

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        if not batch:
            return []
        keys: list[str] = []
        args: list[Any] = list(self._header)
        groups = self.plan.groups
        for req in batch:
            keys.append(self.snapshot_key(req.event_id))
            args += [req.context, _fmt(req.ts)]
            for g in groups:
                keys.append(self.tile_key(g, req.entities[g.entity_name]))
                args.append(g.bucket(req.ts))
                args.extend([_fmt(req.numbers[f]) for f in g.numbers])
                args.extend([req.distinct[f] for f in g.exact])
                args.extend([req.distinct[f] for f in g.approx])
        raw = self._call(self._update, keys, args)
        out = []
        for req, item in zip(batch, raw, strict=True):
            if item.startswith(b"="):
                out.append(FeatureSnapshot.decode(req.event_id, item[1:], replayed=True))
            else:
                out.append(FeatureSnapshot.decode(req.event_id, item))
        return out

    def claim_snapshots(self, event_ids: Sequence[str]) -> list[FeatureSnapshot | Claim]:
        if not event_ids:
            return []
        keys = []
        for event_id in event_ids:
            keys += [self.snapshot_key(event_id), f"{self.prefix}learned:{event_id}"]
        raw = self._call(self._claim, keys, [self.horizon_ms])
        out: list[FeatureSnapshot | Claim] = []
        for event_id, item in zip(event_ids, raw, strict=True):
            if item == b"?":
                out.append(Claim.MISSING)
            elif item == b"=":
                out.append(Claim.DUPLICATE)
            else:
                out.append(FeatureSnapshot.decode(event_id, item))
        return out

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        keys: list[str] = []
        args: list[str] = []
        asked: list[int] = []
        for gi, g in enumerate(self.plan.groups):
            value = entities.get(g.entity_name)
            if value is None:
                continue
            asked.append(gi)
            keys.append(self.tile_key(g, value))
            args += _group_args(g)
            args += ["", ""] if at is None else [str(g.bucket(at)), _fmt(at)]
        aggregates: list[list[float] | None] = [None] * len(self.plan.groups)
        if keys:
            for gi, item in zip(asked, self._call(self._read, keys, args), strict=True):
                aggregates[gi] = orjson.loads(item) if item else None
        return self.plan.current_values(aggregates)

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> list[bytes]:
        import redis

        try:
            return list(script(keys=keys, args=args))
        except redis.ConnectionError as exc:
            raise FeatureStoreError(f"Redis unreachable: {exc}") from exc
