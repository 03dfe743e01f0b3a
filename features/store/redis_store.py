"""The production store on Redis: one Lua call per batch, atomic; the arithmetic
in the scorer's process, or on the server when that is refused (see
``RedisFeatureStore``).

The scripts sit in ``lua/`` beside this module: ``update_and_read.lua`` and
``read.lua`` run after ``prelude.lua``, which does the steps of
``features.tiles`` on the server; ``commit.lua``, ``record_served.lua`` and
``claim.lua`` stand alone. Counts, minima, maxima, last values and exact
distinct counts are equal on every path; sums may differ in the last bits
between the in-process path (a window's running sums) and the server's (a sum
over its tiles), since they add in different orders; and ``distinct`` is a
HyperLogLog here (standard error 0.81%) and an exact count in memory.

Key layout (prefix ``rf:{ns}:``; on a Redis Cluster the namespace is the hash tag,
``rf:{fraud}:``, so that a pipeline's keys share one slot)::

    rf:{ns}:ent:{entity}:{value}          a hash: ``s`` = msgpack [w, {group -> [hb,
                                          tiles]}]: the newest event time, and per tile
                                          group its newest bucket and its tiles, each
                                          [bucket, n, newest ts, per number: sum, sum
                                          of squares, min, max, newest value, per
                                          exact-distinct field: set] (one flat array
                                          when Lua wrote it, a list per tile when a
                                          scorer did: each is cheapest for its writer;
                                          a scorer adds the window's running totals);
                                          a third element if it keeps sessions: {session
                                          group -> its sessions, flat, each [first ts,
                                          last ts, n, sums, minima, maxima]}
                                          (``features.sessions``);
                                          ``v`` = its version, +1 on every write
                                          TTL = longest window + its bucket + lateness,
                                          or a session gap + grace if longer
    rf:{ns}:ent:{entity}:{value}:hll:{group}:{j}:{bucket}
                                          HyperLogLog of the j-th distinct field, same TTL
    rf:{ns}:snaps:{minute}                a hash: event id -> the snapshot the event was
                                          scored with and, once scored, the prediction
                                          served for it; one hash per minute of event
                                          time (``ts // 60``), so that a batch writes a
                                          hash or two, not a key per event; TTL =
                                          replay window from its last write;
                                          an id's presence marks the event as seen
                                          (dedup of replays)
    rf:{ns}:learned:{event id}            the token of the label learned for this event
                                          (the learner's run and the label's offset),
                                          or ``orphan`` (its label went to the DLQ),
                                          TTL = label horizon; a learned label's mark
                                          expires ``keep_learned_s`` after the
                                          checkpoint covering it is committed

    rf:{ns}:features:layout               the tile and session groups the entity state is
                                          laid out by
                                          (JSON, no TTL): ``check_layout``
    rf:{ns}:lab:...                       label-fed features (``features.labelled``): a store
                                          of their own (``key_part="lab:"``), the same layout
                                          under ``rf:{ns}:lab:`` (``snaps:{minute}``: the labels
                                          written, for the dedup window)

``{entity}`` is the entity's field, or fields joined by ``+`` for a composite
key (``card_id+merchant``, value ``c00042|m0017``). Tiles older than the window
plus the lateness are dropped when their entity is written.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgpack
import orjson
import redis

from riverflow.errors import RiverflowError, Unavailable
from riverflow.features.definitions import FeaturePlan
from riverflow.features.errors import FeatureStoreError
from riverflow.features.store.base import (
    ORPHAN,
    SERVED_HEAD,
    Claim,
    FeatureRequest,
    FeatureSnapshot,
    encode_snapshot,
    packed,
)
from riverflow.features.tiles import (
    HELD_AS_STORED_BYTES,
    Engine,
    Entity,
    check_time,
    encode_entity,
    expand_held,
    held_entity,
    unpack_entity,
)
from riverflow.streams.contracts import ServedPrediction


def _lua(*names: str) -> str:
    """The text of the named scripts in ``lua/``, joined in order."""
    folder = resources.files("riverflow.features.store").joinpath("lua")
    return "".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)


log = logging.getLogger(__name__)

_UPDATE_AND_READ = _lua("prelude", "update_and_read")
_READ = _lua("prelude", "read")
_RECORD_SERVED = _lua("record_served")
_CLAIM = _lua("claim")
_COMMIT = _lua("commit")
_LOAD = _lua("load")

_LUA_STATS = ("S", "Q", "MN", "MX", "L", "C")  # names of definitions.STATS in the scripts

# A scorer holds up to ``cached_entities`` entities compact (``tiles.held_entity``: a
# fraud-bench card ~450 bytes with its key; a slate's entity, small, as its stored
# state, ~80) and at most this many more ready to compute (Python lists, 3-7 KB each):
# those the last batches touched.
READY_ENTITIES = 4096

# ``check_server`` warns of an append-only file rewritten each time it grows by less
AOF_REWRITE_MIN_BYTES = 1 << 30

# A commit sends an entity state longer than this as an argument of its own, not inside
# its msgpack (``commit.lua``): Redis CPU per 900-byte state write 6.0-6.4 -> 5.1-5.8 us,
# and redis-py packs it faster too; a short one costs the client less inside (a
# 100-byte state: 0.09 us against 0.22)
STATE_INLINE_BYTES = 200

# Snapshots are kept in one hash per this many seconds of event time
# (``rf:{ns}:snaps:{n}``): a batch's few hashes, not a key per event, which cost
# Redis ~3 us an event in key and expiry bookkeeping.
SNAPSHOT_BUCKET_S = 60


@dataclass
class _Pending:
    """A batch computed in process and not written yet."""

    touched: set[str]  # every entity key the batch read
    snapshots: list[tuple[str, str, bytes]] = field(default_factory=list)  # id, hash, snapshot
    changed: dict[str, str] = field(default_factory=dict)  # entity key -> entity name


class FeatureLayoutError(RiverflowError):
    """The spec's features do not match the layout of the entity state in Redis."""


def plan_layout(plan: FeaturePlan) -> list[list[Any]]:
    """What fixes where each value sits in an entity's stored state: per tile group,
    in order, its entity, window and buckets, and the fields of each statistic;
    then per session group ``["session", its entity, gap and grace, the fields of
    each statistic]``."""
    tiles: list[list[Any]] = [
        [g.name, [list(fields) for fields in g.stats], list(g.exact), list(g.approx)]
        for g in plan.groups
    ]
    return tiles + [["session", g.name, [list(f) for f in g.stats]] for g in plan.sessions]


def _split_layout(layout: list[list[Any]]) -> tuple[list[list[Any]], list[list[Any]]]:
    """A layout's tile groups and session groups (each kept by position in its own
    part of the state: adding to one moves nothing in the other)."""
    sessions = [g for g in layout if g and g[0] == "session"]
    return [g for g in layout if not (g and g[0] == "session")], sessions


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (redis-py ``RedisCluster``)."""
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def key_prefix(namespace: str, cluster: bool) -> str:
    """The prefix of a pipeline's keys: ``rf:fraud:`` on one Redis; ``rf:{fraud}:`` on
    a cluster, where the braces make the namespace the hash tag, so that every key of
    the pipeline hashes to one slot and one script call may touch any of them. (The
    registry, ``models.registry.RedisRegistry``, follows the same rule.)"""
    return f"rf:{{{namespace}}}:" if cluster else f"rf:{namespace}:"


class RedisFeatureStore:
    """The production store: one Lua call per batch on a real Redis.

    Two ways to run a batch, with the same results:

    - **in process** (the default): the scorer keeps the state of the entities
      it has written (a card's events all reach one scorer through its
      partition), computes the batch with ``features.tiles`` and sends one
      ``commit.lua`` call that stores the snapshots and the changed entities, if no
      event of the batch was seen before and no entity changed since it was read
      (each entity key carries a version). Redis does no arithmetic.
    - **on the server** (``update_and_read.lua``): Redis reads, updates and writes
      every entity itself. A batch goes this way when the commit was refused
      (a replay after a restart, an entity another scorer wrote, an expired
      key), then the next 1, 2, 4 ... 64 batches too while refusals go on, and
      always when the plan counts ``distinct`` (HyperLogLogs live in Redis) or
      ``cached_entities`` is 0 (``RIVERFLOW_FEATURE_CACHE_ENTITIES``).

    The scripts name their keys inside the batch rather than in KEYS. On a Redis
    Cluster (``client`` a redis-py ``RedisCluster``) every key of the namespace
    carries it as a hash tag (``key_prefix``), so they all
    live in one slot, and each call names the prefix as its one KEY, which routes
    it to that slot's node: one round trip per batch, atomic, as on one Redis.

    ``wait_replicas`` > 0: each write call (a batch's commit or update, its
    served predictions, a label's claim) is followed, on the same connection, by
    ``WAIT wait_replicas timeout``, so the call returns only once that many
    replicas hold what it wrote: a failover to one of them loses none of it.
    Fewer acknowledgements within ``wait_timeout_s`` raise ``Unavailable`` (an
    outage: the stage retries the batch, which finds its events seen).
    """

    def __init__(
        self,
        client: Any,
        namespace: str,
        plan: FeaturePlan,
        horizon_s: float,
        cached_entities: int = 500_000,
        replay_window_s: float = 900.0,
        wait_replicas: int = 0,
        wait_timeout_s: float = 1.0,
        key_part: str = "",
    ) -> None:
        self.client = client
        self.plan = plan
        self.wait_replicas = wait_replicas
        self._wait_ms = max(1, int(wait_timeout_s * 1000))
        self.cluster = is_cluster(client)
        # ``key_part``: a part of the namespace's keys of its own (label-fed features'
        # ``lab:``), in the same hash slot on a cluster
        self.prefix = key_prefix(namespace, self.cluster) + key_part
        # KEYS of a script call that names its keys in ARGV: none on one Redis; on a
        # cluster the prefix, which routes the call to the node of the namespace's slot
        self._route = [self.prefix] if self.cluster else []
        self.horizon_ms = str(int(horizon_s * 1000))  # learned-marks
        # snapshots: a minute's hash lives the replay window after its last write, so
        # each of its snapshots at least that long after its own
        self.replay_ms = str(int(replay_window_s * 1000))
        self._update = client.register_script(_UPDATE_AND_READ)
        self._read = client.register_script(_READ)
        self._claim = client.register_script(_CLAIM)
        self._record_served = client.register_script(_RECORD_SERVED)
        self._commit = client.register_script(_COMMIT)
        self._load_states = client.register_script(_LOAD)
        self._entities = plan.entities
        names = ["+".join(e) for e in self._entities]
        ttl_s = {name: 0.0 for name in names}
        for name, ttl in [*((g.entity_name, g.ttl_s) for g in plan.groups),
                          *((g.entity_name, g.ttl_s) for g in plan.sessions)]:  # fmt: skip
            ttl_s[name] = max(ttl_s[name], ttl)
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
        session_params = [
            {"gap": g.gap_s, "grace": g.grace_s, "R": g.record,
             "ent": names.index(g.entity_name) + 1,
             "ttl": str(int(ttl_s[g.entity_name] * 1000) + 1000),
             **{k: [i + 1 for i in ix] for k, ix in zip(("S", "MN", "MX"), g.layout, strict=True)}}
            for g in plan.sessions
        ]  # fmt: skip
        self._sessions = msgpack.packb(session_params, use_bin_type=False)
        # one packer for a batch's blob (a store serves one thread at a time; the
        # entity states in it are tiles.encode_entity's): ``msgpack.packb`` builds a
        # packer per call, ~0.5-0.9 us each
        self._pack = msgpack.Packer(use_bin_type=False).pack
        self._header = [self.replay_ms, repr(plan.lateness_s), self._groups]
        self._session_numbers = [g.numbers for g in plan.sessions]
        # what update_and_read packs per event, worked out once (it runs per event)
        self._entity_prefixes = [(name, self.entity_key(name, "")) for name in names]
        self._entity_index = {name: i + 1 for i, name in enumerate(names)}  # Lua's, from 1
        self._shape = [(g.bucket_s, g.numbers, (*g.exact, *g.approx)) for g in plan.groups]
        # the in-process path: entity key -> (state, the version it was read at)
        self.engine = Engine(plan)
        self.in_process = cached_entities > 0 and not any(g.approx for g in plan.groups)
        self.cached_entities = cached_entities
        # entity key -> (state, the version it was read at), ready to compute;
        # the rest of what the process holds, compact, under a shorter key (the
        # entity value alone when the plan keys one entity)
        self._cache: dict[str, tuple[Entity, int]] = {}
        self._compact: dict[str, bytes] = {}
        # the small ready entities' states as the last commit wrote them (``held_entity``)
        self._stored: dict[str, bytes] = {}
        self._ready = min(READY_ENTITIES, max(1, cached_entities // 4))
        root = len(self.entity_key(names[0], "")) if len(names) == 1 else len(f"{self.prefix}ent:")
        self._short = slice(root, None)
        self._entity_ttl_ms = {name: int(ttl_s[name] * 1000) + 1000 for name in names}
        self._skip = self._backoff = 0
        self._pending: _Pending | None = None
        self._served_at: dict[str, str] = {}  # event id -> its snapshot's hash, last batch
        self.batches = {"in_process": 0, "server": 0, "refused": 0}

    def snapshot_hash(self, ts: float) -> str:
        """The hash holding the snapshots of events at ``ts`` (one per minute of event
        time: an event and its replays share it)."""
        return f"{self.prefix}snaps:{int(ts // SNAPSHOT_BUCKET_S)}"

    def stored_snapshot(self, event_id: str, ts: float) -> bytes | None:
        """The snapshot (and served prediction) stored for an event, if any."""
        raw: bytes | None = self.client.hget(self.snapshot_hash(ts), event_id)
        return raw

    def check_server(self) -> bool:
        """Warn (once, at start) of Redis settings that stall the pipeline under load:

        - ``lazyfree-lazy-expire no`` (Redis' default): expired keys are freed on its
          main thread. A minute's snapshot hash holds the minute's events: at 10,000
          events/s, 600,000 of them, which took Redis 196 ms to free in one go
          (docs/benchmarks.md), every command waiting behind it;
        - the append-only file on, rewritten once it has grown by
          ``auto-aof-rewrite-min-size`` under ``AOF_REWRITE_MIN_BYTES`` (Redis' default
          is 64 MB): a scorer appends ~10 MB a second at 13,000 events/s, so Redis
          forked a rewrite of its whole dataset every 3-13 s (the p99 tripled).

        False if it warned; True otherwise. A user refused ``CONFIG`` (an ACL user)
        is told once which settings to check."""
        try:
            expire = self._config("lazyfree-lazy-expire")
            aof = self._config("appendonly")
            growth = self._config("auto-aof-rewrite-percentage")
            min_size = self._config("auto-aof-rewrite-min-size")
        except redis.exceptions.RedisError as exc:
            log.info("Redis' settings cannot be read (%s): check that it has "
                     "lazyfree-lazy-expire yes and, with appendonly yes, "
                     "auto-aof-rewrite-min-size 1gb (docs/operations.md)", exc)  # fmt: skip
            return True
        ok = True
        if expire == "no":
            log.warning(
                "Redis has lazyfree-lazy-expire no: an expired snapshot hash (a minute of "
                "events) is freed on Redis' main thread, ~200 ms at 10,000 events/s; set "
                "lazyfree-lazy-expire yes (riverflow stack and docker-compose do)"
            )
            ok = False
        small = min_size.isdigit() and int(min_size) < AOF_REWRITE_MIN_BYTES
        if aof == "yes" and growth not in ("", "0") and small:
            log.warning(
                "Redis rewrites its append-only file each time it grows by "
                "auto-aof-rewrite-min-size %d MB: under load that is every few seconds, "
                "a fork copying the whole dataset each time; set "
                "auto-aof-rewrite-min-size 1gb (riverflow stack and docker-compose do)",
                int(min_size) >> 20,
            )
            ok = False
        return ok

    def _config(self, name: str) -> str:
        """One setting of the server, as text ("" if it has none by that name)."""
        got = self.client.config_get(name)
        value = got.get(name, got.get(name.encode(), ""))
        return value.decode() if isinstance(value, bytes) else str(value)

    @property
    def layout_key(self) -> str:
        return f"{self.prefix}features:layout"

    def check_layout(self) -> None:
        """Refuse a spec whose features lay the stored entity state out differently.

        An entity's state holds its tile groups by position, and each tile the
        statistics its group's features read, by position: a spec that adds a
        statistic to a group, or a group before others, would read the stored
        tiles wrongly. The layout the state was written with is kept in Redis;
        the same layout, or one that only adds groups after the existing ones
        (or, from a scorer still on the previous spec, lacks the last ones), is
        taken; another raises ``FeatureLayoutError`` naming the first difference.
        Session groups are a part of their own (``features.sessions``): a session
        feature that adds a session group is taken, as is a tile group added while
        session groups exist; one that changes a session group's statistics is not.
        """
        mine = plan_layout(self.plan)
        raw = orjson.dumps(mine)
        if self.client.set(self.layout_key, raw, nx=True):
            return
        stored = orjson.loads(self.client.get(self.layout_key) or raw)
        if stored == mine:
            return
        merged = []
        # tile groups and session groups sit in two parts of the state, each by position
        for what, old, new in zip(
            ("tile group", "session group"), _split_layout(stored), _split_layout(mine), strict=True
        ):
            n = min(len(old), len(new))
            if old[:n] != new[:n]:
                i = next(i for i in range(n) if old[i] != new[i])
                raise FeatureLayoutError(
                    f"the spec's features lay out entity state differently from what is "
                    f"stored in Redis under {self.prefix}ent:* ({what} {i + 1}: stored "
                    f"{old[i]}, the spec's {new[i]}): the scorer would read the stored "
                    f"state wrongly. Give the changed spec a new name (a new pipeline), or "
                    f"stop every scorer, run `riverflow features reset`, and start them "
                    f"again (the windows restart empty)"
                )
            # new groups at the end: their windows start empty
            merged.append(new if len(new) > len(old) else old)
        if merged[0] + merged[1] != stored:
            self.client.set(self.layout_key, orjson.dumps(merged[0] + merged[1]))

    def forget(self, field: str, value: str, event_ids: Sequence[str] = ()) -> tuple[int, int]:
        """Delete what Redis holds of the entity whose ``field`` is ``value`` (as
        stored: its token if the field is marked personal): its windows, alone and in
        every composite entity it is part of, and the snapshots of ``event_ids``
        (its events still in the replay window). Returns (entity keys, snapshots)
        deleted. A scorer holding the entity in process finds its write refused
        (the version is gone) and starts it afresh from the next event."""
        glob = "".join("\\" + c if c in "*?[]\\" else c for c in value)
        patterns = []
        for entity in self._entities:
            if field in entity:
                parts = ["*"] * len(entity)
                parts[entity.index(field)] = glob
                key = self.entity_key("+".join(entity), "|".join(parts))
                patterns += [key, f"{key}:hll:*"]
        entities = self._unlink_matching(patterns)
        snapshots = 0
        if event_ids:  # the minutes' hashes alive (about the replay window's): one round trip
            pipe = self.client.pipeline(transaction=False)
            for key in self.client.scan_iter(match=f"{self.prefix}snaps:*", count=1000):
                pipe.hdel(key, *event_ids)
            snapshots = sum(int(n) for n in pipe.execute())
        self._cache.clear()
        self._stored.clear()
        self._compact.clear()
        return entities, snapshots

    def reset(self) -> int:
        """Delete the stored entity state and its layout; returns the keys deleted."""
        deleted = self._unlink_matching([f"{self.prefix}ent:*"])
        self.client.delete(self.layout_key)
        self._cache.clear()
        self._stored.clear()
        self._compact.clear()
        return deleted

    def _unlink_matching(self, patterns: Sequence[str]) -> int:
        """Delete the keys matching any of ``patterns`` (SCAN, UNLINK a thousand at a
        time); returns how many were deleted."""
        deleted = 0
        for pattern in patterns:
            batch: list[Any] = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(self.client.unlink(*batch))
        return deleted

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
                self._drop(prefix + req.entities[name])
        return out

    def _in_process(
        self, batch: Sequence[FeatureRequest]
    ) -> tuple[_Pending, list[FeatureSnapshot]]:
        """Compute the batch here, from the entities as this process holds them."""
        cache, prefixes = self._cache, self._entity_prefixes
        keyed = [[prefix + req.entities[name] for name, prefix in prefixes] for req in batch]
        touched = {key for keys in keyed for key in keys}
        self._load({key for key in touched if key not in cache})
        where = self.snapshot_hash
        served_at = self._served_at = {}
        pending = _Pending(touched)
        changed = pending.changed
        out: list[FeatureSnapshot] = []
        written: dict[str, bytes] = {}
        step = self.engine.step
        names = [name for name, _ in prefixes]
        last_ts, at = None, ""  # the last snapshot hash, and the time it is for
        # a read-only entity is left out of what the step sees (as the step would
        # leave it out)
        for req, keys in zip(batch, keyed, strict=True):
            raw = written.get(req.event_id)
            if raw is not None:  # twice in one batch: the second is a replay
                out.append(FeatureSnapshot.decode(req.event_id, raw, replayed=True))
                continue
            # every entity read goes to the commit, so that its version is checked:
            # one an event was too late for is unchanged, but read for its score,
            # and another scorer may have written it since this process read it
            # (and a read-only one: the request's pair that counted there read it)
            changed.update(zip(keys, names, strict=True))
            skip = req.read_only
            pairs = zip(names, keys, strict=True)
            if skip:
                ents = {n: cache[k][0] for n, k in pairs if n not in skip}
            else:
                ents = {n: cache[k][0] for n, k in pairs}
            vectors, late, _ = step(ents, req.ts, req.numbers, req.distinct)
            raw = written[req.event_id] = encode_snapshot(req.context, vectors, late)
            if req.ts != last_ts:  # (a slate's pairs share their request's time)
                last_ts, at = req.ts, where(req.ts)
            served_at[req.event_id] = at
            pending.snapshots.append((req.event_id, at, raw))
            inputs = req.inputs if req.inputs is not None else orjson.loads(req.context)
            out.append(FeatureSnapshot(req.event_id, inputs, vectors, False, late))
        return pending, out

    def _apply(self, pending: _Pending, served: dict[str, bytes]) -> bool:
        """Commit what ``_in_process`` computed, with the ``served`` predictions
        (event id -> encoded); False (nothing written) if it was refused."""
        cache, pack, engine = self._cache, self._pack, self.engine
        hashes: dict[str, list[Any]] = {}  # hash -> [id, snapshot, ...], as commit.lua reads them
        for event_id, key, raw in pending.snapshots:
            prediction = served.get(event_id)
            fields = hashes.get(key)
            if fields is None:
                fields = hashes[key] = []
            fields += event_id, raw if prediction is None else SERVED_HEAD + raw[1:] + prediction
        snapshots: list[Any] = [x for pair in hashes.items() for x in pair]
        entities: list[Any] = []
        args: list[Any] = [self.replay_ms, b""]  # ARGV: the msgpack second, large states after
        stored: dict[str, bytes] = {}  # the small ones, to hold as they are (held_entity)
        for key, name in pending.changed.items():
            ent, version = cache[key]
            state = encode_entity(engine, ent)
            if len(state) <= HELD_AS_STORED_BYTES:
                stored[key] = state
            else:  # grown: what an earlier commit stored small is not its state any more
                self._stored.pop(key, None)
            if len(state) > STATE_INLINE_BYTES:  # an argument of its own: its index
                args.append(state)
                entities += key, version, len(args), self._entity_ttl_ms[name]
            else:
                entities += key, version, state, self._entity_ttl_ms[name]
        args[1] = pack([snapshots, entities])
        try:
            committed = self._write(self._commit, self._route, args)
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
        self._stored.update(stored)
        if len(cache) > self._ready:  # a tenth more, so this runs once in many batches
            self._compact_oldest(len(cache) - self._ready * 9 // 10)
        self._backoff = 0
        self.batches["in_process"] += 1
        return True

    def _compact_oldest(self, n: int) -> None:
        """Compact the ``n`` longest held of the ready entities; forget the longest
        held compact ones beyond ``cached_entities``.

        An expanded entity's compact copy stays (stale, never read while the entity
        is ready) and is overwritten when it is compacted again: the dictionary then
        gains an entry per new entity only. A dictionary that gains and loses
        entries without end grows its table to 3 x its size at the next resize
        (~84 bytes an entry at 500,000); rebuilt after each cut it stays at
        ~42."""
        cache, held, short, engine = self._cache, self._compact, self._short, self.engine
        stored = self._stored
        for key in list(itertools.islice(cache, n)):
            ent, version = cache.pop(key)
            held[key[short]] = held_entity(engine, ent, version, stored.pop(key, None))
        if len(held) > self.cached_entities:
            over = len(held) - self.cached_entities * 9 // 10
            for key in list(itertools.islice(held, over)):
                del held[key]
            self._compact = dict(held)

    def _drop(self, key: str) -> None:
        self._cache.pop(key, None)
        self._stored.pop(key, None)
        self._compact.pop(key[self._short], None)

    def _forget(self, pending: _Pending) -> None:
        """Drop the entities a batch touched: their states hold its updates,
        which Redis did not take. They are read again when next needed."""
        for key in pending.touched:
            self._drop(key)

    def _load(self, keys: set[str]) -> None:
        """Make entities ready: expand those held compact, read the others from
        Redis (one round trip), with their versions."""
        held, short, engine = self._compact, self._short, self.engine
        order = []
        for key in keys:
            packed = held.get(key[short])
            if packed is None:
                order.append(key)
            else:
                self._cache[key] = expand_held(engine, packed)
        if not order:
            return
        replies = self._call(self._load_states, self._route, order)
        for key, (state, version) in zip(order, replies, strict=True):
            stored = msgpack.unpackb(state, strict_map_key=False) if state else None
            self._cache[key] = (unpack_entity(self.engine, stored), int(version or 0))

    def stored_states(self, keys: Sequence[str]) -> list[bytes | None]:
        """The stored state (``s``) of each entity key, None where absent: one call
        (``load.lua``; a pipeline of HGETs costs the client ~25 us per key)."""
        return [state for state, _ in self._call(self._load_states, self._route, list(keys))]

    def _on_server(self, batch: Sequence[FeatureRequest]) -> list[FeatureSnapshot]:
        where, entities, shape = self.snapshot_hash, self._entity_prefixes, self._shape
        events = []
        served_at = self._served_at = {}
        for req in batch:
            ts, nums, strs = check_time(float(req.ts)), req.numbers, req.distinct
            ents = req.entities
            key = served_at[req.event_id] = where(ts)
            events.append(
                [
                    [key, req.event_id], req.context, ts,
                    [prefix + ents[name] for name, prefix in entities],
                    [
                        [int(ts // width), [float(nums[f]) for f in numbers],
                         [strs[f] for f in strings]]
                        for width, numbers, strings in shape
                    ],
                    [[float(nums[f]) for f in numbers] for numbers in self._session_numbers],
                    [self._entity_index[name] for name in req.read_only],
                ]
            )  # fmt: skip
        # bytes as msgpack "raw": Redis' cmsgpack predates the bin type
        blob = msgpack.packb(events, use_bin_type=False)
        raw = self._write(self._update, self._route, [*self._header, blob, self._sessions])
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
            return self._apply(pending, {e: packed(p) for e, p in served})
        if not served:
            return True
        # the hashes the last batch's snapshots went to
        at = self._served_at
        batch = [
            [at[event_id], event_id, packed(prediction)]
            for event_id, prediction in served
            if event_id in at
        ]
        if not batch:
            return True
        self._write(self._record_served, self._route, [msgpack.packb(batch, use_bin_type=False)])
        return True

    def claim_labels(
        self,
        event_ids: Sequence[str],
        tokens: Sequence[str],
        known: Sequence[bool],
        stale: Callable[[str], bool],
    ) -> list[Claim]:
        if not event_ids:
            return []
        args: list[str] = [self.horizon_ms]
        for token, held in zip(tokens, known, strict=True):
            args += [token, "1" if held else "0"]
        keys = [self.learned_key(event_id) for event_id in event_ids]
        raw = self._write(self._claim, keys, args)
        out: list[Claim] = []
        taken: dict[str, str] = {}
        for key, token, held, item in zip(keys, tokens, known, raw, strict=True):
            if item == b"!":
                out.append(Claim.ORPHANED)
            elif item == b"?":
                out.append(Claim.MISSING)
            elif item == b"+":
                out.append(Claim.CLAIMED)
            elif not stale(item[1:].decode()):
                out.append(Claim.DUPLICATE)
            elif held:
                taken[key] = token
                out.append(Claim.CLAIMED)
            else:
                out.append(Claim.MISSING)
        if taken:  # only after a learner restart: rare, a second round trip is fine
            pipe = self.client.pipeline(transaction=False)
            for key, token in taken.items():
                pipe.set(key, token, px=int(self.horizon_ms))
            self._execute(pipe)
        return out

    def learned_key(self, event_id: str) -> str:
        return f"{self.prefix}learned:{event_id}"

    def mark_orphans(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.set(self.learned_key(event_id), ORPHAN, nx=True, px=int(self.horizon_ms))
        self._execute(pipe)

    def release_learned(self, event_ids: Sequence[str], keep_s: float) -> None:
        if not event_ids:
            return
        keep_ms = min(int(keep_s * 1000), int(self.horizon_ms))
        pipe = self.client.pipeline(transaction=False)
        for event_id in event_ids:
            if keep_ms > 0:
                pipe.pexpire(self.learned_key(event_id), keep_ms)
            else:
                pipe.delete(self.learned_key(event_id))
        self._execute(pipe)

    def _execute(self, pipe: Any) -> list[Any]:
        try:
            return list(pipe.execute())
        except redis.ConnectionError as exc:
            raise FeatureStoreError(f"Redis unreachable: {exc}") from exc

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        args: list[Any] = [self._groups]
        for g in self.plan.groups:
            value = entities.get(g.entity_name)
            args.append("" if value is None else self.entity_key(g.entity_name, value))
            if at is not None:
                check_time(at)
            args += ["", ""] if at is None else [str(g.bucket(at)), repr(float(at))]
        args.append(self._sessions)
        for sg in self.plan.sessions:
            value = entities.get(sg.entity_name)
            args += ["" if value is None else self.entity_key(sg.entity_name, value)]
            args += ["" if at is None else repr(float(at))]
        raw = self._call(self._read, self._route, args)
        aggregates = [msgpack.unpackb(item) if item else None for item in raw]
        return self.plan.current_values(aggregates)

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.ConnectionError as exc:
            raise FeatureStoreError(f"Redis unreachable: {exc}") from exc

    def _write(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """``_call`` for a script that writes; with ``wait_replicas``, then WAIT."""
        if not self.wait_replicas:
            return self._call(script, keys, args)
        # WAIT counts the replicas that have this connection's last write: it must
        # run on the connection that wrote, so both go in one pipeline, to the
        # node serving the namespace's slot
        target = self.client
        if self.cluster:
            target = self.client.get_node_from_key(self.prefix).redis_connection
        try:
            for attempt in (1, 2):
                pipe = target.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.wait_replicas, self._wait_ms)
                try:
                    result, acked = pipe.execute()
                    break
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    script.sha = target.script_load(script.script)
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.MovedError) as exc:
            if self.cluster:  # the slot moved (a failover): ask the cluster again
                self.client.nodes_manager.initialize()
            raise Unavailable(f"Redis: {type(exc).__name__}: {exc}") from exc
        if int(acked) < self.wait_replicas:
            # written, but not yet on enough replicas: retried, the batch finds it
            raise Unavailable(
                f"Redis: {acked} of {self.wait_replicas} replicas acknowledged a write "
                f"within {self._wait_ms} ms (WAIT)"
            )
        return result
