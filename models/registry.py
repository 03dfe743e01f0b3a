"""The model registry: immutable, signed model versions and the champion pointer.

A version is a candidate's state (HMAC-signed pickle) plus metadata: parent
version, labels seen, the label offsets it covers, metrics at snapshot time,
created time, River version. The champion pointer names the one version the
scorers serve; every move of it is appended to the pointer history.

At publish, versions beyond the newest ``keep_versions`` of a candidate are
deleted, except the champion, every version a decision (a promotion, a
rollback) moved the pointer to or away from, and those the learner's checkpoint
continues from (``prune``). The versions the
pointer only *advanced* through (the learner's snapshots of the champion it
trains, one per ``snapshot_every`` labels) are kept among the newest only:
keeping them all grew Redis ~60 MB a minute at 1,500 labels/s (the soak,
docs/benchmarks.md).

The pointer history keeps the newest ``history_keep`` moves (``HISTORY_KEEP``,
10,000: a week of the learner's minutely snapshots and every decision in it);
the whole trail is the ``{ns}.model-events`` topic, which gets every move too.
Without a bound, it grew by a move a snapshot for as long as the pipeline ran,
and every publish (``prune``) and rollback read all of it.

Redis layout (prefix ``rf:{ns}:``; on a Redis Cluster the namespace is the hash tag,
``rf:{fraud}:``, so that the pointer and its history share one slot),
no TTL (this is the audit trail)::

    models                    set of candidate names with versions
    model:{name}:seq          last version number of the candidate (never goes back)
    model:{name}:versions     sorted set of the versions stored
    model:{name}:v:{n}        signed blob
    model:{name}:meta:{n}     metadata (JSON)
    champion                  pointer (JSON {"model", "version"})
    champion:history          list of the newest pointer moves (JSON), oldest first
    learner:checkpoint        the learner's state at its last snapshot (signed JSON, see checkpoint)
    challengers               hash: fresh challenger name -> JSON {"base", "started", "reason"}
"""

from __future__ import annotations

import base64
import contextlib
import logging
import select
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import river
from redis.exceptions import RedisError

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.errors import ModelError
from riverflow.models.signing import (
    Keys,
    document_mac,
    keyring,
    sign,
    verify_and_load,
    verify_mac,
)
from riverflow.streams.contracts import ModelEvent

log = logging.getLogger(__name__)

EXPORT_FORMAT = "riverflow-model/2"
OLD_EXPORT_FORMAT = "riverflow-model/1"  # its metadata is not signed: see ``import_``


@dataclass(frozen=True)
class ModelVersion:
    """One published model: its state and what it was made from."""

    name: str
    version: int
    model: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChampionPointer:
    """The version the scorers serve."""

    model: str
    version: int

    def encode(self) -> bytes:
        return orjson.dumps({"model": self.model, "version": self.version})

    @classmethod
    def decode(cls, raw: bytes | str | None) -> ChampionPointer | None:
        if not raw:
            return None
        data = orjson.loads(raw)
        return cls(data["model"], int(data["version"]))

    def __str__(self) -> str:
        return f"{self.model} v{self.version}"


@dataclass(frozen=True)
class PointerMove:
    """One entry of the pointer history (and of ``{ns}.model-events``)."""

    kind: str  # advance (the learner published the champion's next version) | promote | rollback
    to: ChampionPointer
    previous: ChampionPointer | None
    at: float
    reason: str = ""

    def as_event(self) -> ModelEvent:
        """The ``{ns}.model-events`` record, also what the pointer history keeps."""
        prev = self.previous
        return ModelEvent(
            kind=self.kind,
            model=self.to.model,
            version=self.to.version,
            previous=None if prev is None else {"model": prev.model, "version": prev.version},
            at=self.at,
            reason=self.reason,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointerMove:
        prev = data.get("previous")
        return cls(
            data["kind"],
            ChampionPointer(data["model"], int(data["version"])),
            None if prev is None else ChampionPointer(prev["model"], int(prev["version"])),
            float(data["at"]),
            data.get("reason", ""),
        )


HISTORY_KEEP = 10_000  # pointer moves kept in the registry (all go to model-events)
UNSURE_LOOKBACK = 50  # recent moves searched for one whose reply was lost


class UnsureMoves:
    """The pointer moves of one caller whose call raised.

    Redis may have applied such a move and lost its reply (killed, or the connection
    dropped between the two). The caller's next attempt would then find the pointer
    already moved and log nothing, so the audit log would miss the move and the
    caller would not act on it. ``applied`` reads the recent history once the
    registry answers again and gives back the attempts it holds (the same kind, the
    same target, stamped at or after the attempt began), with what the caller kept
    of each; ``clear`` forgets them all, once the caller has them.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        # bounded: a caller settles at its next read of the registry
        self._attempts: deque[tuple[float, str, ChampionPointer, Any]] = deque(
            maxlen=UNSURE_LOOKBACK
        )

    @contextlib.contextmanager
    def attempt(self, kind: str, to: ChampionPointer, context: Any = None) -> Iterator[None]:
        """Around a ``move`` (or ``promote``) of ``kind`` to ``to``: kept if it raises."""
        began = self.registry.clock()
        try:
            yield
        except BaseException:
            self._attempts.append((began, kind, to, context))
            raise

    def applied(self) -> list[tuple[PointerMove, Any]]:
        """The attempts that moved the pointer after all, with their context (a read
        of the history, only when there are any)."""
        if not self._attempts:
            return []
        recent = self.registry.recent_moves(UNSURE_LOOKBACK)
        found = []
        for began, kind, to, context in self._attempts:
            move = next(
                (m for m in reversed(recent) if m.kind == kind and m.to == to and m.at >= began),
                None,
            )
            if move is not None:
                found.append((move, context))
        return found

    def clear(self) -> None:
        self._attempts.clear()


class PointerWatch(Protocol):
    """Notices of pointer moves, for a scorer to follow them at once."""

    def moved(self) -> bool:
        """Whether a move was announced since the last call (never blocks)."""
        ...

    def start(self) -> None:
        """Listen (again) for moves; the caller reads the pointer after it."""
        ...

    @property
    def listening(self) -> bool: ...


class RedisPointerWatch:
    """The registry's moves channel, on a connection of its own. A failed connection
    is dropped, not retried here: ``moved`` never blocks the scorer, and the scorer's
    poll of the pointer (which notices Redis is back) calls ``start`` again."""

    def __init__(self, client: Any, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._pubsub: Any = None
        # the subscription's socket, watched with a poll: a call with nothing new on it
        # is one syscall (0.6-0.9 us), not get_message's timeout juggling and failed
        # read (~5 us), which a scorer pays once a batch (docs/benchmarks.md)
        self._socket: Any = None
        self._poller: Any = None
        self._more = True  # replies may wait in the client's buffer: read them first

    @property
    def listening(self) -> bool:
        return self._pubsub is not None

    def start(self) -> None:
        self.close()
        try:
            pubsub = self.client.pubsub()
            pubsub.subscribe(self.channel)
        except (RedisError, OSError) as exc:  # the poll goes on
            log.warning("champion moves channel unavailable, polling the pointer: %s", exc)
            return
        self._pubsub = pubsub

    def moved(self) -> bool:
        if self._pubsub is None:
            return False
        if not self._more and not self._arrived():
            return False
        seen, self._more = False, True
        try:
            for _ in range(1000):  # bounded: a flood of moves is read at the next call
                message = self._pubsub.get_message(timeout=0.0)
                if message is None:  # nothing buffered, nothing on the socket
                    self._more = False
                    break
                seen = seen or message.get("type") == "message"
        except (RedisError, OSError) as exc:  # a dropped connection: the poll goes on
            log.warning("champion moves channel lost, polling the pointer: %s", exc)
            self.close()
            return True  # a move may have been missed: read the pointer
        return seen

    def _arrived(self) -> bool:
        """Whether the subscription's socket has something to read (or has failed);
        True where the client does not show its socket. Once ``get_message`` has said
        there is nothing, every new message makes the socket readable."""
        sock = getattr(getattr(self._pubsub, "connection", None), "_sock", None)
        if sock is None:
            return True
        if sock is not self._socket:  # (re)connected: watch the new socket
            self._socket, self._poller = sock, select.poll()
            try:
                self._poller.register(sock, select.POLLIN)
            except (ValueError, OSError):  # closed under us: get_message says how
                self._poller = None
            return True
        return self._poller is None or bool(self._poller.poll(0))

    def close(self) -> None:
        self._socket = self._poller = None
        self._more = True
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):  # closing a broken connection
                pubsub.close()


class ModelRegistry(ABC):
    """Versions, pointer and history over a small set of storage primitives.

    ``MemoryRegistry`` and ``RedisRegistry`` provide the primitives; everything a
    user relies on (signing, metadata, compare-and-set moves, rollback, export)
    is written once here.
    """

    def __init__(
        self,
        key: Keys,
        keep_versions: int | None = None,
        history_keep: int = HISTORY_KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_keep < 1:
            raise ValueError(f"history_keep={history_keep}: keep at least the last move")
        self.key = keyring(key)  # signs with its current key, verifies with any
        self.keep_versions = keep_versions
        self.history_keep = history_keep
        self.clock = clock  # the time a move, a version or a challenger is stamped with
        # model -> the signed size in bytes of the last version this client published
        self.published_bytes: dict[str, int] = {}

    # -- versions ---------------------------------------------------------------

    def publish(self, name: str, model: Any, meta: dict[str, Any]) -> int:
        """Store a new immutable version of ``name``; the pointer does not move.

        Its number is above every number ``name`` ever had, and above
        ``meta["parent"]``: a registry that lost its sequence (a Redis restart
        without persistence) never hands a number out twice to a descendant of
        a version it still knows. Then older versions are pruned (see ``prune``).
        """
        meta = {**meta, "key_id": self.key.key_id}  # which key signed it (rotation)
        blob = sign(model, self.key)
        version = self._store(name, blob, meta)
        self.published_bytes[name] = len(blob)
        if self.keep_versions is not None:
            self.prune(name, self.keep_versions)
        return version

    def prune(self, name: str, keep: int) -> list[int]:
        """Delete ``name``'s versions but the newest ``keep``, the champion, every
        version a promotion or rollback moved the pointer to or away from (a
        rollback can go back to it), and those the learner's checkpoint continues
        from; returns the versions deleted."""
        versions = self.versions(name)
        old = set(versions[:-keep]) if keep else set(versions)
        if not old:
            return []
        for move in self.history():
            if move.kind == "advance" and move.previous is not None:
                continue  # the champion's own next snapshot: the newest ``keep`` cover it
            for pointer in (move.to, move.previous):
                if pointer is not None and pointer.model == name:
                    old.discard(pointer.version)
        champion = self.champion()
        if champion is not None and champion.model == name:
            old.discard(champion.version)
        saved = self.checkpoint()
        if saved is not None:
            old.discard(saved.versions.get(name, 0))
        doomed = sorted(old)
        if doomed:
            self._delete(name, doomed)
        return doomed

    def load(self, name: str, version: int) -> ModelVersion:
        """The version's model, unpickled only if its signature verifies."""
        blob, meta = self._get(name, version)
        return ModelVersion(name, version, verify_and_load(blob, self.key), meta)

    def meta(self, name: str, version: int) -> dict[str, Any]:
        """The version's metadata (not its model: a read of the metadata alone where
        the store can); ``ModelError`` if there is no such version."""
        return self._meta_of(name, version)

    def _meta_of(self, name: str, version: int) -> dict[str, Any]:
        return self._get(name, version)[1]

    def latest(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def export(self, name: str, version: int) -> bytes:
        """A file's content: the signed blob and its metadata, signed together (an
        edited ``labels_seen`` or metric is refused on import)."""
        blob, meta = self._get(name, version)
        blob_b64 = base64.b64encode(blob).decode()
        record: dict[str, Any] = {"format": EXPORT_FORMAT, "name": name, "version": version,
                                  "meta": meta, "blob_b64": blob_b64,
                                  "key_id": self.key.key_id}  # fmt: skip
        mac = document_mac(_signed(record), self.key.key)
        record["signature_b64"] = base64.b64encode(mac).decode()
        return orjson.dumps(record, option=orjson.OPT_INDENT_2)

    def import_(self, data: bytes) -> ModelVersion:
        """Store an exported version as a new version; refused unless signed with our key.

        A file of the old format (``riverflow-model/1``, metadata unsigned) is read
        only if its blob verifies, and its metadata is then kept aside as
        unverified (``imported_from.meta_verified`` false), never as the version's own.
        """
        try:
            record = orjson.loads(data)
            found = record.get("format")
            if found not in (EXPORT_FORMAT, OLD_EXPORT_FORMAT):
                raise ValueError(f"format {found!r} is not {EXPORT_FORMAT}")
            blob = base64.b64decode(record["blob_b64"], validate=True)
            name, meta = str(record["name"]), dict(record["meta"])
            signed = found == EXPORT_FORMAT
            mac = base64.b64decode(record["signature_b64"], validate=True) if signed else b""
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"not a riverflow model export: {exc}") from exc
        if signed:  # SignatureError before anything is stored
            key_id = record.get("key_id")  # None: exported before key ids
            what = "model export (blob and metadata)"
            verify_mac(
                _signed(record), mac, self.key, what, None if key_id is None else str(key_id)
            )
        model = verify_and_load(blob, self.key)
        origin = {"version": record.get("version"), "meta": record["meta"],
                  "meta_verified": signed}  # fmt: skip
        if signed:  # its version numbers (own, parent) belong to the registry it came from
            drop = ("version", "parent", "created", "river", "bytes")
            meta = {k: v for k, v in meta.items() if k not in drop}
        else:
            meta = {"model": name}
        meta["imported_from"] = origin
        version = self._store(name, blob, meta)
        return ModelVersion(name, version, model, self.meta(name, version))

    # -- the champion pointer ---------------------------------------------------

    def champion(self) -> ChampionPointer | None:
        return ChampionPointer.decode(self._pointer())

    def watch_pointer(self) -> PointerWatch | None:
        """What tells a scorer at once that the pointer moved, if this registry has
        it (Redis: pub/sub); None: the scorer finds out by reading the pointer."""
        return None

    def move(
        self,
        to: ChampionPointer,
        kind: str,
        expect: ChampionPointer | None,
        reason: str = "",
    ) -> PointerMove | None:
        """Point the champion at ``to`` if it still points at ``expect``; None if not."""
        self._get(to.model, to.version)  # only existing versions can be served
        move = PointerMove(kind, to, expect, self.clock(), reason)
        old = b"" if expect is None else expect.encode()
        ok = self._compare_and_set(old, to.encode(), move.as_event().encode())
        return move if ok else None

    def promote(self, to: ChampionPointer, kind: str = "promote", reason: str = "") -> PointerMove:
        """Move the pointer whatever it points at now (retrying a concurrent move).

        The version is loaded first: a tampered blob is refused here, before any
        scorer is pointed at it.
        """
        self.load(to.model, to.version)
        for _ in range(10):
            moved = self.move(to, kind, self.champion(), reason)
            if moved is not None:
                return moved
        raise ModelError("the champion pointer keeps moving: promotion not applied")

    def rollback_target(self) -> ChampionPointer | None:
        """The pointer before the move that made the current champion.

        Rollback moves are skipped when looking for that move, so rolling back
        twice goes two steps back instead of flipping between two versions. A
        version pruned since (one the pointer only advanced through) is passed
        over for the one before it: the newest earlier champion still stored.
        """
        current = self.champion()
        for past in reversed(self.history()):
            if past.to == current and past.kind != "rollback":
                target = past.previous
                if target is None or self.has(target):
                    return target
                current = target
        return None

    def has(self, pointer: ChampionPointer) -> bool:
        """Whether the version ``pointer`` names is stored (not pruned)."""
        try:
            self._get(pointer.model, pointer.version)
        except ModelError:
            return False
        return True

    def history(self) -> list[PointerMove]:
        return [PointerMove.from_dict(orjson.loads(raw)) for raw in self._history()]

    def recent_moves(self, n: int) -> list[PointerMove]:
        """The last ``n`` pointer moves, oldest first."""
        return [PointerMove.from_dict(orjson.loads(raw)) for raw in self._recent_moves(n)]

    # -- fresh challengers ----------------------------------------------------------

    def challengers(self) -> dict[str, dict[str, Any]]:
        """Candidates started at run time (by the monitor), beside the spec's own:
        name -> ``{"base": spec candidate it copies, "started": unix s, "reason"}``."""
        return {name: orjson.loads(raw) for name, raw in self._challengers().items()}

    def start_challenger(self, name: str, base: str, reason: str = "") -> None:
        """Ask the learner to train a fresh ``name`` built like the spec candidate ``base``."""
        record = {"base": base, "started": self.clock(), "reason": reason}
        self._set_challenger(name, orjson.dumps(record))

    def retire_challenger(self, name: str) -> None:
        """The learner stops training ``name``; its versions stay in the registry."""
        self._set_challenger(name, None)

    # -- the learner's checkpoint -------------------------------------------------

    def checkpoint(self) -> LearnerCheckpoint | None:
        """The learner state saved with its last snapshot, or None; refused unless signed
        with our key and in a format this version reads."""
        raw = self._checkpoint()
        return None if raw is None else LearnerCheckpoint.decode(raw, self.key)

    def save_checkpoint(self, checkpoint: LearnerCheckpoint) -> None:
        self._save_checkpoint(checkpoint.encode(self.key))

    # -- the monitor's memory of good versions ----------------------------------

    def monitor_memory(self) -> dict[str, Any] | None:
        """What the monitor last saved of what it needs to roll a champion back
        (``monitors.policy.PipelineMonitor.memory``); None if nothing, or nothing
        readable (logged: the monitor then learns it again, as on its first start)."""
        raw = self._monitor_memory()
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            log.warning("the monitor's saved memory is not JSON, ignored: %s", exc)
            return None
        if not isinstance(data, dict):
            log.warning("the monitor's saved memory is not an object, ignored")
            return None
        return data

    def save_monitor_memory(self, memory: dict[str, Any]) -> None:
        self._save_monitor_memory(orjson.dumps(memory))

    # -- storage primitives -------------------------------------------------------

    @abstractmethod
    def stored_bytes(self) -> int:
        """The size of every stored version's signed blob, all models together: what
        the versions take (bounded by ``keep_versions`` x a model's size x models)."""

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def versions(self, name: str) -> list[int]: ...

    @abstractmethod
    def _store(self, name: str, blob: bytes, meta: dict[str, Any]) -> int: ...

    @abstractmethod
    def _get(self, name: str, version: int) -> tuple[bytes, dict[str, Any]]: ...

    @abstractmethod
    def _delete(self, name: str, versions: list[int]) -> None: ...

    @abstractmethod
    def _pointer(self) -> bytes | None: ...

    @abstractmethod
    def _compare_and_set(self, old: bytes, new: bytes, move: bytes) -> bool: ...

    @abstractmethod
    def _history(self) -> list[bytes]: ...

    @abstractmethod
    def _recent_moves(self, n: int) -> list[bytes]: ...

    @abstractmethod
    def _challengers(self) -> dict[str, bytes]: ...

    @abstractmethod
    def _set_challenger(self, name: str, raw: bytes | None) -> None: ...

    @abstractmethod
    def _checkpoint(self) -> bytes | None: ...

    @abstractmethod
    def _save_checkpoint(self, raw: bytes) -> None: ...

    @abstractmethod
    def _monitor_memory(self) -> bytes | None: ...

    @abstractmethod
    def _save_monitor_memory(self, raw: bytes) -> None: ...


def _signed(record: dict[str, Any]) -> bytes:
    """What an export's signature covers: every field but the signature, canonical."""
    fields = {k: v for k, v in record.items() if k != "signature_b64"}
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def _meta(version: int, meta: dict[str, Any], created: float, blob: bytes) -> bytes:
    """A version's stored metadata: the caller's, its number, when it was made, the
    River that made it and its signed blob's size in bytes (``bytes``)."""
    return orjson.dumps(
        {**meta, "version": version, "created": created, "river": river.__version__,
         "bytes": len(blob)}
    )  # fmt: skip


class MemoryRegistry(ModelRegistry):
    """The embedded runtime's registry. Blobs are signed here too, so both registries
    hand out copies that cannot alias the publisher's live model."""

    def __init__(
        self,
        key: Keys,
        keep_versions: int | None = None,
        history_keep: int = HISTORY_KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(key, keep_versions, history_keep, clock)
        self.blobs: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self.seq: dict[str, int] = {}
        self.pointer: bytes | None = None
        self.moves: list[bytes] = []
        self.saved: bytes | None = None
        self.fresh: dict[str, bytes] = {}
        self.remembered: bytes | None = None  # the monitor's memory

    def stored_bytes(self) -> int:
        return sum(len(blob) for blob, _ in self.blobs.values())

    def names(self) -> list[str]:
        return sorted({n for n, _ in self.blobs})

    def versions(self, name: str) -> list[int]:
        return sorted(v for n, v in self.blobs if n == name)

    def _store(self, name: str, blob: bytes, meta: dict[str, Any]) -> int:
        last = max(self.seq.get(name, 0), *self.versions(name), int(meta.get("parent") or 0))
        version = self.seq[name] = last + 1
        self.blobs[(name, version)] = (blob, _meta(version, meta, self.clock(), blob))
        return version

    def _delete(self, name: str, versions: list[int]) -> None:
        for v in versions:
            del self.blobs[(name, v)]

    def _get(self, name: str, version: int) -> tuple[bytes, dict[str, Any]]:
        try:
            blob, meta = self.blobs[(name, version)]
        except KeyError:
            raise ModelError(f"model {name!r} has no version {version}") from None
        return blob, orjson.loads(meta)

    def _pointer(self) -> bytes | None:
        return self.pointer

    def _compare_and_set(self, old: bytes, new: bytes, move: bytes) -> bool:
        if (self.pointer or b"") != old:
            return False
        self.pointer = new
        self.moves.append(move)
        del self.moves[: -self.history_keep]
        return True

    def _history(self) -> list[bytes]:
        return list(self.moves)

    def _recent_moves(self, n: int) -> list[bytes]:
        return self.moves[-n:]

    def _challengers(self) -> dict[str, bytes]:
        return dict(self.fresh)

    def _set_challenger(self, name: str, raw: bytes | None) -> None:
        if raw is None:
            self.fresh.pop(name, None)
        else:
            self.fresh[name] = raw

    def _checkpoint(self) -> bytes | None:
        return self.saved

    def _save_checkpoint(self, raw: bytes) -> None:
        self.saved = raw

    def _monitor_memory(self) -> bytes | None:
        return self.remembered

    def _save_monitor_memory(self, raw: bytes) -> None:
        self.remembered = raw


# KEYS: pointer, history; ARGV: expected pointer ('' = none), new pointer, move record,
# how many moves the history keeps, the channel that tells scorers the pointer moved
_COMPARE_AND_SET = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
"""


_UNNUMBERED = -987654321  # the version in a meta document until _STORE numbers it

# KEYS: seq, versions (sorted set), models; ARGV: name, floor, blob key prefix, meta key
# prefix, blob, meta (JSON with "version": _UNNUMBERED, replaced here). The next number above the
# sequence, the floor and every stored version: never one handed out before.
_STORE = """
local v = redis.call('INCR', KEYS[1])
local top = redis.call('ZRANGE', KEYS[2], -1, -1)
local floor = math.max(tonumber(ARGV[2]), tonumber(top[1] or '0'))
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
while redis.call('EXISTS', ARGV[4] .. v) == 1 do
  v = v + 1
  redis.call('SET', KEYS[1], v)
end
local meta = string.gsub(ARGV[6], '"version":%-987654321', '"version":' .. v, 1)
redis.call('SET', ARGV[3] .. v, ARGV[5])
redis.call('SET', ARGV[4] .. v, meta)
redis.call('ZADD', KEYS[2], v, v)
redis.call('SADD', KEYS[3], ARGV[1])
return v
"""


class RedisRegistry(ModelRegistry):
    """The registry shared by every stage of a pipeline."""

    def __init__(
        self,
        client: Any,
        namespace: str,
        key: Keys,
        keep_versions: int | None = None,
        history_keep: int = HISTORY_KEEP,
    ) -> None:
        super().__init__(key, keep_versions, history_keep)
        self.client = client
        # on a Redis Cluster the namespace is the hash tag: the pointer, its history
        # and the version counters share one slot, so each script is one atomic call
        # there (the feature store's rule: features.store.redis_store.key_prefix;
        # models and features never import each other)
        from redis.cluster import RedisCluster

        cluster = isinstance(client, RedisCluster)
        self.prefix = f"rf:{{{namespace}}}:" if cluster else f"rf:{namespace}:"
        self._cas = client.register_script(_COMPARE_AND_SET)
        self._store_script = client.register_script(_STORE)

    def _model(self, name: str) -> str:
        return f"{self.prefix}model:{name}:"

    def stored_bytes(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for name in self.names():
            for v in self.versions(name):
                pipe.strlen(f"{self._model(name)}v:{v}")
        return sum(int(n) for n in pipe.execute())

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.client.smembers(f"{self.prefix}models"))

    def versions(self, name: str) -> list[int]:
        listed = self.client.zrange(f"{self._model(name)}versions", 0, -1)
        if listed:
            return [int(v) for v in listed]
        # written before the sorted set: numbers are dense except where a publisher
        # died between INCR and SET: check
        last = int(self.client.get(f"{self._model(name)}seq") or 0)
        keys = [f"{self._model(name)}meta:{v}" for v in range(1, last + 1)]
        found = self.client.exists(*keys) if keys else 0
        if found == last:
            return list(range(1, last + 1))
        return [v for v, k in enumerate(keys, 1) if self.client.exists(k)]

    def _store(self, name: str, blob: bytes, meta: dict[str, Any]) -> int:
        prefix = self._model(name)
        self._index(name)
        floor = int(meta.get("parent") or 0)
        keys = [f"{prefix}seq", f"{prefix}versions", f"{self.prefix}models"]
        args = [name, floor, f"{prefix}v:", f"{prefix}meta:", blob,
                _meta(_UNNUMBERED, meta, self.clock(), blob)]  # fmt: skip
        return int(self._store_script(keys=keys, args=args))

    def _index(self, name: str) -> None:
        """List the versions stored before the sorted set existed in it (once)."""
        key = f"{self._model(name)}versions"
        if self.client.exists(key):
            return
        found = self.versions(name)
        if found:
            self.client.zadd(key, {str(v): v for v in found})

    def _delete(self, name: str, versions: list[int]) -> None:
        prefix = self._model(name)
        pipe = self.client.pipeline(transaction=True)
        for v in versions:
            pipe.delete(f"{prefix}v:{v}", f"{prefix}meta:{v}")
        pipe.zrem(f"{prefix}versions", *[str(v) for v in versions])
        pipe.execute()

    def _get(self, name: str, version: int) -> tuple[bytes, dict[str, Any]]:
        prefix = self._model(name)
        blob, meta = self.client.mget(f"{prefix}v:{version}", f"{prefix}meta:{version}")
        if blob is None or meta is None:
            raise ModelError(f"model {name!r} has no version {version}")
        return blob, orjson.loads(meta)

    def _meta_of(self, name: str, version: int) -> dict[str, Any]:
        meta = self.client.get(f"{self._model(name)}meta:{version}")
        if meta is None:
            raise ModelError(f"model {name!r} has no version {version}")
        return dict(orjson.loads(meta))

    def _pointer(self) -> bytes | None:
        raw = self.client.get(f"{self.prefix}champion")
        return None if raw is None else bytes(raw)

    def _compare_and_set(self, old: bytes, new: bytes, move: bytes) -> bool:
        keys = [f"{self.prefix}champion", f"{self.prefix}champion:history"]
        args = [old, new, move, self.history_keep, self.moves_channel]
        return bool(self._cas(keys=keys, args=args))

    @property
    def moves_channel(self) -> str:
        """The pub/sub channel every pointer move is published on."""
        return f"{self.prefix}champion:moved"

    def watch_pointer(self) -> PointerWatch:
        return RedisPointerWatch(self.client, self.moves_channel)

    def _history(self) -> list[bytes]:
        return list(self.client.lrange(f"{self.prefix}champion:history", 0, -1))

    def _recent_moves(self, n: int) -> list[bytes]:
        return list(self.client.lrange(f"{self.prefix}champion:history", -n, -1))

    def _challengers(self) -> dict[str, bytes]:
        raw = self.client.hgetall(f"{self.prefix}challengers")
        return {k.decode(): bytes(v) for k, v in raw.items()}

    def _set_challenger(self, name: str, raw: bytes | None) -> None:
        if raw is None:
            self.client.hdel(f"{self.prefix}challengers", name)
        else:
            self.client.hset(f"{self.prefix}challengers", name, raw)

    def _checkpoint(self) -> bytes | None:
        raw = self.client.get(f"{self.prefix}learner:checkpoint")
        return None if raw is None else bytes(raw)

    def _save_checkpoint(self, raw: bytes) -> None:
        self.client.set(f"{self.prefix}learner:checkpoint", raw)

    def _monitor_memory(self) -> bytes | None:
        raw = self.client.get(f"{self.prefix}monitor:memory")
        return None if raw is None else bytes(raw)

    def _save_monitor_memory(self, raw: bytes) -> None:
        self.client.set(f"{self.prefix}monitor:memory", raw)
