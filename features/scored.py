"""What a label joins: each scored event's model inputs, its feature values and the
prediction served for it, read back from the predictions topic.

A prediction carries all of it (``Prediction.inputs`` and ``features``), so the
predictions topic is the changelog of the join: the learner indexes what it
reads there by event id, and a label finds its event in the index. Redis keeps
only what must be fast (entity state, and each event's snapshot for the short
``replay_window_s`` a scorer needs to recognise its own replays); the per-event
record that waits days for its label lives on the learner's disk
(``DiskScoredIndex``, RocksDB through ``rocksdict``) or, in the embedded
runtime, in memory (``MemoryScoredEvents``, bounded by count).

The first prediction indexed for an event is the one kept (a replay carries the
same served prediction; one re-scored after the replay window is not the
answer the user got first). Records are msgpack ``[inputs, features, model,
version, probability, value, probabilities, slot, event time]`` keyed by the
event id (``value`` and ``probabilities`` for a label that is no flag, ``slot``
for a slate's shown item, else None). Records written before the event time was
kept have 5, 7 (no flag) or 8 (a slate's) elements and read as before, without
an event time.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import orjson

from riverflow.errors import Unavailable
from riverflow.features.errors import FeatureStoreError
from riverflow.features.store.base import evict_oldest
from riverflow.streams.contracts import Message, ServedPrediction, shown_items

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredEvent:
    """One scored event as its prediction recorded it."""

    event_id: str
    inputs: dict[str, Any]
    features: dict[str, float]
    served: ServedPrediction
    # a slate's shown item: {"request", "position", "shown", "propensity"}
    slot: dict[str, Any] | None = None
    # the event's time (a slate pair's: its request's); None in a record from before
    # it was kept
    event_time: float | None = None

    @classmethod
    def unpack(cls, event_id: str, raw: bytes) -> ScoredEvent:
        inputs, features, model, version, *answer = msgpack.unpackb(raw)
        event_time = answer.pop() if len(answer) > 4 else None
        slot = answer.pop() if len(answer) > 3 else None
        served = ServedPrediction(model, version, *answer)
        return cls(event_id, inputs, features, served, slot, event_time)


def _event_time(p: dict[str, Any]) -> float:
    ts = p["event_time"]
    if type(ts) not in (int, float):
        raise TypeError("event_time is not a number")
    return float(ts)


def _slate_records(p: dict[str, Any]) -> dict[str, bytes]:
    """The record of each shown item of slate prediction ``p``, by pair id (only
    they are labelled: what the user never saw has no click to wait for)."""
    out: dict[str, bytes] = {}
    request, inputs, shown, ts = p["event_id"], p["inputs"], p["shown"], _event_time(p)
    if not isinstance(inputs, dict):
        raise TypeError("a field is not of a slate prediction's type")
    for pair, position, item in shown_items(p):
        score, features = item["score"], item["features"]
        if not (isinstance(item["inputs"], dict)
                and type(score) in (int, float) and isinstance(features, dict)
                and all(type(v) in (int, float) for v in features.values())):  # fmt: skip
            raise TypeError("a candidate is not of a slate prediction's type")
        slot = {"request": request, "position": position, "shown": shown,
                "propensity": item.get("propensity")}  # fmt: skip
        record = [{**inputs, **item["inputs"]}, features, p["model"], p["version"], score,
                  None, None, slot, ts]  # fmt: skip
        out[pair] = msgpack.packb(record)
    return out


def scored_records(messages: Sequence[Message]) -> tuple[dict[str, bytes], int]:
    """The packed record of each prediction in ``messages`` by event id (the first
    of an event in the batch), and how many were not predictions (skipped: a
    hostile or foreign record on the topic costs the join nothing else)."""
    out: dict[str, bytes] = {}
    bad = 0
    for msg in messages:
        try:
            p = orjson.loads(msg.value or b"")
            if p.get("slate") is not None:
                for pair, packed in _slate_records(p).items():
                    out.setdefault(pair, packed)
                continue
            event_id, inputs, features = p["event_id"], p["inputs"], p["features"]
            # a label that is no flag: its value (and class probabilities)
            record = [inputs, features, p["model"], p["version"], p["probability"],
                      p.get("value"), p.get("probabilities"), None, _event_time(p)]  # fmt: skip
            if not (isinstance(event_id, str) and isinstance(inputs, dict)
                    and isinstance(features, dict) and isinstance(record[2], str)
                    and type(record[3]) is int
                    and (type(record[4]) in (int, float) or (record[4] is None and "value" in p))
                    and all(type(v) in (int, float) for v in features.values())):  # fmt: skip
                raise TypeError("a field is not of a prediction's type")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            bad += 1
            log.debug(
                "%s[%s]@%s is not a prediction: %s", msg.topic, msg.partition, msg.offset, exc
            )
            continue
        if event_id not in out:
            out[event_id] = msgpack.packb(record)
    return out, bad


def defaulted_ids(prediction: Any) -> list[str]:
    """The ids a label by timeout labels for one prediction (a decoded
    ``{ns}.predictions`` record): ``[event_id]`` for an ordinary prediction; for a
    slate, the pair id (``"{request}/{item}"``) of every item shown
    (``streams.contracts.shown_items``: the very pairs the index holds records
    for). ``[]`` for a record that is not a prediction (a forged record on the
    topic labels nothing)."""
    if not isinstance(prediction, dict):
        return []
    event_id = prediction.get("event_id")
    if not isinstance(event_id, str):
        return []
    if prediction.get("slate") is None:
        return [event_id]
    try:
        return [shown.pair for shown in shown_items(prediction)]
    except (KeyError, TypeError):
        return []


class ScoredEvents(Protocol):
    """What the learner needs of the join's per-event records."""

    def follow(self) -> None:
        """Index what has been scored since the last call (a bounded amount: a
        learner far behind catches up over several calls)."""
        ...

    def caught_up(self) -> bool:
        """Whether every prediction written before this call is indexed (reading on
        to get there, within the same bound)."""
        ...

    def lookup(self, event_ids: Sequence[str]) -> dict[str, ScoredEvent]:
        """The scored events among ``event_ids`` (missing ones are left out)."""
        ...

    def forget(self, event_ids: Sequence[str]) -> None:
        """Drop the records of events whose label is learned into a committed
        checkpoint (a duplicate label still finds its learned-mark in the store)."""
        ...

    def memory_bytes(self) -> int | None:
        """What the index holds in memory, in bytes, where it can say (None)."""
        ...


class MemoryScoredEvents:
    """The join's records in a dictionary, for the embedded runtime: the runtime
    adds every prediction before it hands the learner the next labels, so the
    index is always caught up. At most ``max_events`` are kept: past that the
    oldest go first, as the label horizon would take them."""

    def __init__(self, max_events: int = 1_000_000) -> None:
        self.records: dict[str, bytes] = {}
        self.max_events = max_events
        self.unreadable = 0
        self._order: deque[str] = deque()

    def add(self, messages: Sequence[Message]) -> None:
        records, bad = scored_records(messages)
        self.unreadable += bad
        kept = self.records
        for event_id, raw in records.items():
            if event_id not in kept:
                kept[event_id] = raw
                self._order.append(event_id)
        self._order = evict_oldest(kept, self._order, self.max_events)

    def follow(self) -> None:
        pass

    def caught_up(self) -> bool:
        return True

    def lookup(self, event_ids: Sequence[str]) -> dict[str, ScoredEvent]:
        kept = self.records
        return {e: ScoredEvent.unpack(e, kept[e]) for e in event_ids if e in kept}

    def forget(self, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            self.records.pop(event_id, None)

    def memory_bytes(self) -> None:
        return None  # (bounded by ``max_events``: capacity table, docs/architecture.md)


# RocksDB's memtable (its default: 64 MB). A freed one's pages stay in the learner's
# RSS, so the index costs two of them from its first minutes at 1,500 labels a second,
# and 10-minute soaks read RocksDB's default as a leak (+4.3-4.6 MB/min); at 10,000 events
# a second (~1 MB/s of records) 16 MB is flushed every ~16 s, cheap for RocksDB
MEMTABLE_MB = 16

# RocksDB's properties that together are what an index holds in memory
_MEMORY_PROPERTIES = ("rocksdb.block-cache-usage", "rocksdb.size-all-mem-tables")

_POSITIONS = b"\x00positions"  # not an event id: ids are non-empty text


class ScoredIndexError(Unavailable):
    """The learner's index of scored events failed to read or write (a full disk, an
    I/O error): waited out like a server outage, never blamed on a label."""


class DiskScoredIndex:
    """The join's records on disk: RocksDB (``rocksdict``) at ``path``, each record
    expiring ``ttl_s`` (the label horizon) after it was written. Memory: a block
    cache of ``cache_mb`` (index and filter blocks included) and at most two
    memtables of ``memtable_mb``: the one written, and one being flushed.

    The read positions on the predictions topic are written in the same atomic
    batch as the records they cover, so a learner restarted (even killed) goes on
    from exactly where its index is. Lost, the index is rebuilt from the topic:
    keep the predictions topic's retention at least the label horizon.
    """

    def __init__(
        self, path: Path, ttl_s: float, cache_mb: int = 256, memtable_mb: int = MEMTABLE_MB
    ) -> None:
        from rocksdict import (
            AccessType,
            BlockBasedOptions,
            Cache,
            DBCompressionType,
            Options,
            Rdict,
        )

        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        # lz4 blocks, zstd where most records settle; a bloom filter spares a label
        # whose event is not indexed (yet) a read of every level from disk. Index
        # and filter blocks live in the block cache, so memory stays at the cache
        # and the memtables however many billion records the disk holds
        options.set_compression_type(DBCompressionType.lz4())
        options.set_bottommost_compression_type(DBCompressionType.zstd())
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(Cache(cache_mb * 1024 * 1024))
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        options.set_block_based_table_factory(table)
        options.set_write_buffer_size(memtable_mb * 2**20)
        options.set_max_write_buffer_number(2)
        try:
            self.db = Rdict(str(path), options, access_type=AccessType.with_ttl(max(1, int(ttl_s))))
        except Exception as exc:  # rocksdict raises plain Exceptions (e.g. the lock)
            raise FeatureStoreError(
                f"cannot open the learner's scored-events index at {path}: {exc} "
                "(is another learner of this pipeline running on this host? "
                "RIVERFLOW_SCORED_DIR sets where it lives)"
            ) from exc
        self.path = path
        self.unreadable = 0
        raw = self.db.get(_POSITIONS)
        self._source, stored = msgpack.unpackb(raw, strict_map_key=False) if raw else ("", {})
        self._positions: dict[int, int] = {int(p): int(o) for p, o in stored.items()}

    def positions(self, source: str) -> dict[int, int]:
        """The next offset to read per partition of the predictions topic, as far as
        ``source`` (the cluster and topic they are read from) is the one they were
        saved for: a new cluster (or topic) starts from no position."""
        if source != self._source:
            if self._positions:
                log.warning("scored-events index at %s was read from %s, not %s: reading "
                            "%s again", self.path, self._source, source, source)  # fmt: skip
            self._source, self._positions = source, {}
        return dict(self._positions)

    def add(self, messages: Sequence[Message]) -> None:
        from rocksdict import WriteBatch

        if not messages:
            return
        records, bad = scored_records(messages)
        self.unreadable += bad
        ids = list(records)
        present = self._get_many(ids)
        batch = WriteBatch(raw_mode=True)
        for event_id, stored in zip(ids, present, strict=True):
            if stored is None:  # the first prediction of an event is the one kept
                batch.put(event_id.encode(), records[event_id])
        for msg in messages:
            self._positions[msg.partition] = max(
                self._positions.get(msg.partition, 0), msg.offset + 1
            )
        batch.put(_POSITIONS, msgpack.packb([self._source, self._positions]))
        self._write(batch)

    def lookup(self, event_ids: Sequence[str]) -> dict[str, ScoredEvent]:
        if not event_ids:
            return {}
        found = self._get_many(event_ids)
        return {
            e: ScoredEvent.unpack(e, raw)
            for e, raw in zip(event_ids, found, strict=True)
            if raw is not None
        }

    def _get_many(self, event_ids: Sequence[str]) -> list[bytes | None]:
        if not event_ids:
            return []
        try:
            got = self.db.get([e.encode() for e in event_ids])
        except Exception as exc:
            raise ScoredIndexError(f"scored-events index at {self.path}: {exc}") from exc
        found: list[bytes | None] = list(got or [])
        return found

    def forget(self, event_ids: Sequence[str]) -> None:
        from rocksdict import WriteBatch

        if not event_ids:
            return
        batch = WriteBatch(raw_mode=True)
        for event_id in event_ids:
            batch.delete(event_id.encode())
        self._write(batch)

    def _write(self, batch: Any) -> None:
        try:
            self.db.write(batch)
        except Exception as exc:  # rocksdict raises plain Exceptions
            raise ScoredIndexError(f"scored-events index at {self.path}: {exc}") from exc

    def memory_bytes(self) -> int | None:
        """RocksDB's memory: its block cache in use (index and filter blocks included)
        and its memtables, one being flushed too; at most ``cache_mb`` and two
        ``memtable_mb``. None once closed (a status asked at shutdown)."""
        db = self.db
        try:
            return sum(int(db.property_int_value(p) or 0) for p in _MEMORY_PROPERTIES)
        except Exception:  # rocksdict raises plain Exceptions (a closed database)
            return None

    def close(self) -> None:
        self.db.close()


class Follower(Protocol):
    """Whatever keeps an index up to date with the predictions topic
    (``streams.kafka_io.TopicFollower``)."""

    def follow(self) -> int: ...

    def caught_up(self) -> bool: ...

    def close(self) -> None: ...


class FollowedIndex:
    """The learner's ``ScoredEvents`` in the Kafka runtime: a ``DiskScoredIndex`` kept
    up to date with the predictions topic by a ``Follower``."""

    def __init__(self, index: DiskScoredIndex, follower: Follower) -> None:
        self.index = index
        self.follower = follower

    def follow(self) -> None:
        self.follower.follow()

    def caught_up(self) -> bool:
        return self.follower.caught_up()

    def lookup(self, event_ids: Sequence[str]) -> dict[str, ScoredEvent]:
        return self.index.lookup(event_ids)

    def forget(self, event_ids: Sequence[str]) -> None:
        self.index.forget(event_ids)

    def memory_bytes(self) -> int | None:
        return self.index.memory_bytes()

    def close(self) -> None:
        self.follower.close()
        self.index.close()
