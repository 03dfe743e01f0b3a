"""The online store: tiles per entity, point-in-time snapshots, event-id dedup.

Two implementations with one behaviour: ``RedisFeatureStore`` (one Lua call per
batch, atomic; the arithmetic in the scorer's process, or on the server when
that is refused, see the class) and ``MemoryFeatureStore`` for the embedded
runtime. Both process a batch in order and run the same steps
(``features.tiles``, mirrored by the Lua here). Counts, minima, maxima, last
values and exact distinct counts are equal on every path; sums may differ in
the last bits between the in-process path (a window's running sums) and the
server's (a sum over its tiles), since they add in different orders; and
``distinct`` is a HyperLogLog in Redis (standard error 0.81%) and an exact
count in memory.

Redis key layout (prefix ``rf:{ns}:``)::

    rf:{ns}:ent:{entity}:{value}          a hash: ``s`` = msgpack [w, {group -> [hb,
                                          tiles]}]: the newest event time, and per tile
                                          group its newest bucket and its tiles, each
                                          [bucket, n, newest ts, per number: sum, sum
                                          of squares, min, max, newest value, per
                                          exact-distinct field: set] (one flat array
                                          when Lua wrote it, a list per tile when a
                                          scorer did: each is cheapest for its writer;
                                          a scorer adds the window's running totals);
                                          ``v`` = its version, +1 on every write
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

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import msgpack
import orjson
import redis
from riverflow.features.definitions import FeaturePlan, entity_value
from riverflow.features.errors import FeatureStoreError
from riverflow.features.tiles import Engine, Entity, pack_entity, unpack_entity
from riverflow.streams.contracts import ServedPrediction


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


def _packed(served: ServedPrediction) -> bytes:
    """A served prediction as the snapshot's fourth element stores it."""
    return msgpack.packb([served.model, served.version, float(served.probability)])


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
_SERVED_HEAD = bytes([_SERVED])


def _with_served(raw: bytes, served: bytes) -> bytes | None:
    """The stored snapshot with its served prediction added, or None if it has one."""
    if raw[0] != _UNSERVED:
        return None
    return _SERVED_HEAD + raw[1:] + served


class Claim(Enum):
    """Why a label's snapshot was not handed out."""

    MISSING = "missing"  # the event has not been scored (yet)
    DUPLICATE = "duplicate"  # a label for this event was learned already


class FeatureStore(Protocol):
    """What the processors (and the read path) need from a store."""

    # batches computed in process, batches run on the server, commits refused
    batches: dict[str, int]

    def update_and_read(
        self, batch: Sequence[FeatureRequest], commit: bool = True
    ) -> list[FeatureSnapshot]:
        """Add each event to its tiles and read its windows, in order.

        An event id seen before is not counted again: its stored snapshot is
        returned with ``replayed=True`` (and its ``served`` prediction, if any).

        ``commit=False`` lets a store hold the batch's writes back until
        ``record_served``, which then writes them with the predictions in one
        step (the scorer's path: one round trip per batch).
        """
        ...

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> bool:
        """Store the prediction served for each event with its snapshot.

        The first one recorded for an event stays: a replayed event does not
        overwrite it. Events without a stored snapshot are skipped.

        False when the batch held back by ``update_and_read(commit=False)`` was
        refused: nothing of it was written, and the caller runs it again with
        ``update_and_read(batch)`` (which then reads what the store holds) and
        serves from that.
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


class MemoryFeatureStore:
    """The embedded runtime's store: same semantics as Redis, in dictionaries.

    Keys do not expire here: the embedded runtime serves bounded runs (demo, tests).
    """

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.engine = Engine(plan)
        self.entities: dict[tuple[str, str], Entity] = {}
        self.batches = {"in_process": 0, "server": 0, "refused": 0}
        self.snapshots: dict[str, bytes] = {}
        self.learned: dict[str, str] = {}

    def update_and_read(
        self, batch: Sequence[FeatureRequest], commit: bool = True
    ) -> list[FeatureSnapshot]:
        out = []
        entities, step = self.entities, self.engine.step
        self.batches["in_process"] += 1
        for req in batch:
            stored = self.snapshots.get(req.event_id)
            if stored is not None:
                out.append(FeatureSnapshot.decode(req.event_id, stored, replayed=True))
                continue
            ents = {}
            for name, value in req.entities.items():
                ent = entities.get((name, value))
                if ent is None:
                    ent = entities[name, value] = Entity()
                ents[name] = ent
            vectors, late, _ = step(ents, req.ts, req.numbers, req.distinct)
            self.snapshots[req.event_id] = _encode_snapshot(req.context, vectors, late)
            out.append(FeatureSnapshot(req.event_id, orjson.loads(req.context), vectors, late=late))
        return out

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> bool:
        for event_id, prediction in served:
            raw = self.snapshots.get(event_id)
            stored = None if raw is None else _with_served(raw, _packed(prediction))
            if stored is not None:
                self.snapshots[event_id] = stored
        return True

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
            aggregates.append(None if ent is None else self.engine.read(gi, ent, at))
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
  local raw = redis.call('HGET', key, 's')
  if raw then
    local d = cmsgpack.unpack(raw)
    st.w = d[1]
    for gi, gd in pairs(d[2]) do
      local F = gd[2]
      if type(F[1]) == 'table' then  -- written by a scorer: a table per tile
        local flat = {}
        for _, rec in ipairs(F) do
          for x = 1, #rec do flat[#flat + 1] = rec[x] end
        end
        F = flat
      end
      st.g[gi] = {hb = gd[1], F = F}
    end
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
    redis.call('HSET', key, 's', cmsgpack.pack({st.w, groups}))
    redis.call('HINCRBY', key, 'v', 1)
    redis.call('PEXPIRE', key, st.dirty)
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


# What a scorer computed in process (RedisFeatureStore._in_process), applied if
# nothing it was computed from has changed. ARGV[1]: snapshot ttl ms; ARGV[2]:
# msgpack [[snapshot key, snapshot], ...], [[entity key, version it was read at,
# new state, ttl ms], ...]]. Returns 0, writing nothing, if an event has a
# snapshot already (a replay) or an entity's version moved (another writer, or
# the key expired); else writes all and returns 1.
_COMMIT = """
local d = cmsgpack.unpack(ARGV[2])
local snaps, ents = d[1], d[2]
for i = 1, #snaps do
  if redis.call('EXISTS', snaps[i][1]) == 1 then return 0 end
end
for i = 1, #ents do
  local v = tonumber(redis.call('HGET', ents[i][1], 'v')) or 0
  if v ~= ents[i][2] then return 0 end
end
for i = 1, #snaps do redis.call('SET', snaps[i][1], snaps[i][2], 'PX', ARGV[1]) end
for i = 1, #ents do
  local e = ents[i]
  redis.call('HSET', e[1], 's', e[3], 'v', e[2] + 1)
  redis.call('PEXPIRE', e[1], e[4])
end
return 1
"""

_LUA_STATS = ("S", "Q", "MN", "MX", "L", "C")  # names of definitions.STATS in the scripts


@dataclass
class _Pending:
    """A batch computed in process and not written yet."""

    touched: set[str]  # every entity key the batch read
    snapshots: list[tuple[str, str, bytes]] = field(default_factory=list)  # id, key, snapshot
    changed: dict[str, str] = field(default_factory=dict)  # entity key -> entity name


class RedisFeatureStore:
    """The production store: one Lua call per batch on a real Redis.

    Two ways to run a batch, with the same results:

    - **in process** (the default): the scorer keeps the state of the entities
      it has written (a card's events all reach one scorer through its
      partition), computes the batch with ``features.tiles`` and sends one
      ``_COMMIT`` that stores the snapshots and the changed entities, if no
      event of the batch was seen before and no entity changed since it was read
      (each entity key carries a version). Redis does no arithmetic.
    - **on the server** (``_UPDATE_AND_READ``): Redis reads, updates and writes
      every entity itself. A batch goes this way when the commit was refused
      (a replay after a restart, an entity another scorer wrote, an expired
      key), then the next 1, 2, 4 ... 64 batches too while refusals go on, and
      always when the plan counts ``distinct`` (HyperLogLogs live in Redis) or
      ``cached_entities`` is 0 (``RIVERFLOW_FEATURE_CACHE_ENTITIES``).

    The scripts name their keys inside the batch rather than in KEYS, so they
    need a standalone Redis (or every key of a namespace on one cluster node).
    """

    def __init__(
        self,
        client: Any,
        namespace: str,
        plan: FeaturePlan,
        horizon_s: float,
        cached_entities: int = 15_000,
    ) -> None:
        self.client = client
        self.plan = plan
        self.prefix = f"rf:{namespace}:"
        self.horizon_ms = str(int(horizon_s * 1000))
        self._update = client.register_script(_UPDATE_AND_READ)
        self._read = client.register_script(_READ)
        self._claim = client.register_script(_CLAIM)
        self._record_served = client.register_script(_RECORD_SERVED)
        self._commit = client.register_script(_COMMIT)
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
        # the in-process path: entity key -> (state, the version it was read at)
        self.engine = Engine(plan)
        self.in_process = cached_entities > 0 and not any(g.approx for g in plan.groups)
        self.cached_entities = cached_entities
        self._cache: dict[str, tuple[Entity, int]] = {}
        self._entity_ttl_ms = {name: int(ttl_s[name] * 1000) + 1000 for name in names}
        self._skip = self._backoff = 0
        self._pending: _Pending | None = None
        self.batches = {"in_process": 0, "server": 0, "refused": 0}

    def snapshot_key(self, event_id: str) -> str:
        return f"{self.prefix}snap:{event_id}"

    def entity_key(self, entity_name: str, value: str) -> str:
        return f"{self.prefix}ent:{entity_name}:{value}"

    def update_and_read(
        self, batch: Sequence[FeatureRequest], commit: bool = True
    ) -> list[FeatureSnapshot]:
        if self._pending is not None:
            # the last batch was never committed (its caller failed before
            # record_served): forget what the process computed for it
            self._forget(self._pending)
            self._pending = None
        if not batch:
            return []
        if self.in_process and self._skip == 0:
            pending, done = self._in_process(batch)
            if not commit:
                self._pending = pending
                return done
            if self._apply(pending, {}):
                return done
        elif self._skip:
            self._skip -= 1
        self.batches["server"] += 1
        out = self._on_server(batch)
        for req in batch:  # the server changed these: what the process holds is stale
            for name, prefix in self._entity_prefixes:
                self._cache.pop(prefix + req.entities[name], None)
        return out

    def _in_process(
        self, batch: Sequence[FeatureRequest]
    ) -> tuple[_Pending, list[FeatureSnapshot]]:
        """Compute the batch here, from the entities as this process holds them."""
        cache, prefixes = self._cache, self._entity_prefixes
        keyed = [
            [(name, prefix + req.entities[name]) for name, prefix in prefixes] for req in batch
        ]
        self._load({key for keys in keyed for _, key in keys if key not in cache})
        snap = self.snapshot_key("")
        pending = _Pending({key for keys in keyed for _, key in keys})
        out: list[FeatureSnapshot] = []
        written: dict[str, bytes] = {}
        step = self.engine.step
        for req, keys in zip(batch, keyed, strict=True):
            raw = written.get(req.event_id)
            if raw is not None:  # twice in one batch: the second is a replay
                out.append(FeatureSnapshot.decode(req.event_id, raw, replayed=True))
                continue
            ents = {name: cache[key][0] for name, key in keys}
            vectors, late, names = step(ents, req.ts, req.numbers, req.distinct)
            raw = written[req.event_id] = _encode_snapshot(req.context, vectors, late)
            pending.snapshots.append((req.event_id, snap + req.event_id, raw))
            for name, key in keys:
                if name in names:
                    pending.changed[key] = name
            out.append(FeatureSnapshot(req.event_id, orjson.loads(req.context), vectors, late=late))
        return pending, out

    def _apply(self, pending: _Pending, served: dict[str, bytes]) -> bool:
        """Commit what ``_in_process`` computed, with the ``served`` predictions
        (event id -> encoded); False (nothing written) if it was refused."""
        cache = self._cache
        snapshots = []
        for event_id, key, raw in pending.snapshots:
            prediction = served.get(event_id)
            snapshots.append(
                [key, raw if prediction is None else _SERVED_HEAD + raw[1:] + prediction]
            )
        entities = []
        for key, name in pending.changed.items():
            ent, version = cache[key]
            state = msgpack.packb(pack_entity(self.engine, ent), use_bin_type=False)
            entities.append([key, version, state, self._entity_ttl_ms[name]])
        blob = msgpack.packb([snapshots, entities], use_bin_type=False)
        try:
            committed = self._call(self._commit, [], [self.horizon_ms, blob])
        except Exception:
            self._forget(pending)  # written or not, Redis holds the truth
            raise
        if not committed:
            self._forget(pending)
            self.batches["refused"] += 1
            self._backoff = min(64, 2 * self._backoff or 1)
            self._skip = self._backoff
            return False
        for key in pending.changed:
            ent, version = cache[key]
            cache[key] = (ent, version + 1)
        if len(cache) > self.cached_entities:  # forget the longest held
            for key in list(itertools.islice(cache, len(cache) - self.cached_entities * 9 // 10)):
                del cache[key]
        self._backoff = 0
        self.batches["in_process"] += 1
        return True

    def _forget(self, pending: _Pending) -> None:
        """Drop the entities a batch touched: their states hold its updates,
        which Redis did not take. They are read again when next needed."""
        for key in pending.touched:
            self._cache.pop(key, None)

    def _load(self, keys: set[str]) -> None:
        """Read entities into the process (one round trip), with their versions."""
        if not keys:
            return
        order = list(keys)
        pipe = self.client.pipeline(transaction=False)
        for key in order:
            pipe.hmget(key, "s", "v")
        try:
            replies = pipe.execute()
        except redis.ConnectionError as exc:
            raise FeatureStoreError(f"Redis unreachable: {exc}") from exc
        for key, (state, version) in zip(order, replies, strict=True):
            stored = msgpack.unpackb(state, strict_map_key=False) if state else None
            self._cache[key] = (unpack_entity(self.engine, stored), int(version or 0))

    def _on_server(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
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

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> bool:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return self._apply(pending, {e: _packed(p) for e, p in served})
        if not served:
            return True
        snap = self.snapshot_key("")
        batch = [[snap + event_id, _packed(prediction)] for event_id, prediction in served]
        self._call(self._record_served, [], [msgpack.packb(batch, use_bin_type=False)])
        return True

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

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.ConnectionError as exc:
            raise FeatureStoreError(f"Redis unreachable: {exc}") from exc
