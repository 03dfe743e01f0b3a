"""The online store: tiles per entity, point-in-time snapshots, event-id dedup.

Two implementations with one behaviour: ``RedisFeatureStore`` (one Lua call per
batch: update the tiles, read the windows, store the snapshot, all atomically)
and ``MemoryFeatureStore`` for the embedded runtime. Both process a batch in
order, add floats in the same order and so return bit-identical values.

Redis key layout (prefix ``rf:{ns}:``)::

    rf:{ns}:tile:{group}:{entity value}   hash, field "{bucket}:n" = count,
                                          "{bucket}:{j}" = sum of the group's j-th field
                                          TTL = window + one bucket
    rf:{ns}:snap:{event id}               the snapshot the event was scored with,
                                          TTL = label horizon; its presence marks
                                          the event as seen (dedup)
    rf:{ns}:learned:{event id}            the token of the label learned for this event
                                          (the learner's run and the label's offset),
                                          TTL = horizon

A snapshot is JSON: ``{"x": <model inputs>, "a": [[count, sum_1, ...] per group]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import orjson

from features.definitions import FeaturePlan, TileGroup
from features.errors import FeatureStoreError


@dataclass(frozen=True)
class FeatureRequest:
    """One event's part in a batch update: what to add, where, and its model inputs."""

    event_id: str
    ts: float
    entities: dict[str, str]
    numbers: dict[str, float]
    context: bytes  # JSON of the model inputs taken from the event


@dataclass(frozen=True)
class FeatureSnapshot:
    """What an event was scored with: its model inputs and its window aggregates."""

    event_id: str
    inputs: dict[str, Any]
    aggregates: list[list[float]]
    replayed: bool = False

    @classmethod
    def decode(cls, event_id: str, raw: bytes, replayed: bool = False) -> FeatureSnapshot:
        data = orjson.loads(raw)
        return cls(event_id, data["x"], data["a"], replayed)


class Claim(Enum):
    """Why a label's snapshot was not handed out."""

    MISSING = "missing"  # the event has not been scored (yet)
    DUPLICATE = "duplicate"  # a label for this event was learned already


class FeatureStore(Protocol):
    """What the processors need from a store."""

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        """Add each event to its tiles and read its windows, in order.

        An event id seen before is not counted again: its stored snapshot is
        returned with ``replayed=True``.
        """
        ...

    def claim_snapshots(
        self, event_ids: Sequence[str], tokens: Sequence[str], stale: Callable[[str], bool]
    ) -> list[FeatureSnapshot | Claim]:
        """The snapshot of each event, marking it learned under its token.

        An event already marked is a ``DUPLICATE``, unless ``stale(its token)``
        says that learning was lost (a learner crashed before its snapshot):
        then the mark is taken over and the snapshot handed out again.
        """
        ...


def _encode_snapshot(context: bytes, aggregates: list[list[float]]) -> bytes:
    groups = ",".join("[" + ",".join(_fmt(v) for v in agg) + "]" for agg in aggregates)
    return b'{"x":' + context + b',"a":[' + groups.encode() + b"]}"


def _fmt(value: float) -> str:
    # 17 significant digits round-trip a double exactly; Lua uses the same format.
    return f"{value:.17g}"


class MemoryFeatureStore:
    """The embedded runtime's store: same semantics as Redis, in dictionaries.

    Keys do not expire here: the embedded runtime serves bounded runs (demo, tests).
    """

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.tiles: dict[tuple[str, str], dict[int, list[float]]] = {}
        self.snapshots: dict[str, bytes] = {}
        self.learned: dict[str, str] = {}

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        out = []
        for req in batch:
            stored = self.snapshots.get(req.event_id)
            if stored is not None:
                out.append(FeatureSnapshot.decode(req.event_id, stored, replayed=True))
                continue
            aggregates = [self._update_group(g, req) for g in self.plan.groups]
            raw = _encode_snapshot(req.context, aggregates)
            self.snapshots[req.event_id] = raw
            out.append(FeatureSnapshot.decode(req.event_id, raw))
        return out

    def _update_group(self, group: TileGroup, req: FeatureRequest) -> list[float]:
        tiles = self.tiles.setdefault((group.name, req.entities[group.entity]), {})
        b = group.bucket(req.ts)
        tile = tiles.get(b)
        if tile is None:
            tile = tiles[b] = [0.0] * (1 + len(group.sum_fields))
        tile[0] += 1
        for j, name in enumerate(group.sum_fields, start=1):
            tile[j] += req.numbers[name]
        for old in [k for k in tiles if k <= b - group.buckets]:
            del tiles[old]
        total = [0.0] * len(tile)
        for bb in range(b - group.buckets + 1, b + 1):
            t = tiles.get(bb)
            if t is not None:
                for j, v in enumerate(t):
                    total[j] += v
        return total

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


# ARGV: snapshot ttl ms, group count, then per group: buckets, sum count, tile ttl ms;
# then per event: context JSON, then per group: bucket index, the sums to add.
# KEYS: per event: its snapshot key, then its tile key per group.
_UPDATE_AND_READ = """
local fmt = function(v) return string.format('%.17g', v) end
local snap_ttl = ARGV[1]
local ngroups = tonumber(ARGV[2])
local nb, ns, ttl = {}, {}, {}
local i = 3
for g = 1, ngroups do
  nb[g] = tonumber(ARGV[i]); ns[g] = tonumber(ARGV[i + 1]); ttl[g] = ARGV[i + 2]
  i = i + 3
end
local out = {}
local k = 1
while i <= #ARGV do
  local snapkey = KEYS[k]
  local ctx = ARGV[i]
  i = i + 1
  local stored = redis.call('GET', snapkey)
  if stored then
    out[#out + 1] = '=' .. stored
    for g = 1, ngroups do i = i + 1 + ns[g] end
    k = k + 1 + ngroups
  else
    local parts = {}
    for g = 1, ngroups do
      local key = KEYS[k + g]
      local b = tonumber(ARGV[i])
      i = i + 1
      local flat = redis.call('HGETALL', key)
      local t = {}
      local stale = {}
      for j = 1, #flat, 2 do
        local fb = tonumber(string.match(flat[j], '^(-?%d+):'))
        if fb <= b - nb[g] then
          stale[#stale + 1] = flat[j]
        else
          t[flat[j]] = tonumber(flat[j + 1])
        end
      end
      local cf = b .. ':n'
      t[cf] = (t[cf] or 0) + 1
      local upd = {cf, fmt(t[cf])}
      for s = 1, ns[g] do
        local f = b .. ':' .. s
        t[f] = (t[f] or 0) + tonumber(ARGV[i])
        i = i + 1
        upd[#upd + 1] = f
        upd[#upd + 1] = fmt(t[f])
      end
      redis.call('HSET', key, unpack(upd))
      if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
      redis.call('PEXPIRE', key, ttl[g])
      local total = {}
      for s = 0, ns[g] do total[s] = 0 end
      for bb = b - nb[g] + 1, b do
        local c = t[bb .. ':n']
        if c then
          total[0] = total[0] + c
          for s = 1, ns[g] do total[s] = total[s] + t[bb .. ':' .. s] end
        end
      end
      local vals = {}
      for s = 0, ns[g] do vals[#vals + 1] = fmt(total[s]) end
      parts[#parts + 1] = '[' .. table.concat(vals, ',') .. ']'
    end
    local snap = '{"x":' .. ctx .. ',"a":[' .. table.concat(parts, ',') .. ']}'
    redis.call('SET', snapkey, snap, 'PX', snap_ttl)
    out[#out + 1] = snap
    k = k + 1 + ngroups
  end
end
return out
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


class RedisFeatureStore:
    """The production store: one Lua call per batch on a real Redis."""

    def __init__(self, client: Any, namespace: str, plan: FeaturePlan, horizon_s: float) -> None:
        self.client = client
        self.plan = plan
        self.prefix = f"rf:{namespace}:"
        self.horizon_ms = str(int(horizon_s * 1000))
        self._update = client.register_script(_UPDATE_AND_READ)
        self._claim = client.register_script(_CLAIM)
        header: list[str] = [self.horizon_ms, str(len(plan.groups))]
        for g in plan.groups:
            tile_ttl_ms = int((g.window_s + g.bucket_s) * 1000) + 1000
            header += [str(g.buckets), str(len(g.sum_fields)), str(tile_ttl_ms)]
        self._header = header

    def snapshot_key(self, event_id: str) -> str:
        return f"{self.prefix}snap:{event_id}"

    def tile_key(self, group: TileGroup, entity_value: str) -> str:
        return f"{self.prefix}tile:{group.name}:{entity_value}"

    def update_and_read(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        if not batch:
            return []
        keys: list[str] = []
        args: list[Any] = list(self._header)
        for req in batch:
            keys.append(self.snapshot_key(req.event_id))
            args.append(req.context)
            for g in self.plan.groups:
                keys.append(self.tile_key(g, req.entities[g.entity]))
                args.append(g.bucket(req.ts))
                args.extend(_fmt(req.numbers[f]) for f in g.sum_fields)
        raw = self._call(self._update, keys, args)
        out = []
        for req, item in zip(batch, raw, strict=True):
            if item.startswith(b"="):
                out.append(FeatureSnapshot.decode(req.event_id, item[1:], replayed=True))
            else:
                out.append(FeatureSnapshot.decode(req.event_id, item))
        return out

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

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> list[bytes]:
        import redis

        try:
            return list(script(keys=keys, args=args))
        except redis.ConnectionError as exc:
            raise FeatureStoreError(f"Redis unreachable: {exc}") from exc
