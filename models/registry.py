"""The model registry: immutable, signed model versions and the champion pointer.

A version is a candidate's state (HMAC-signed pickle) plus metadata: parent
version, labels seen, the label offsets it covers, metrics at snapshot time,
created time, River version. The champion pointer names the one version the
scorers serve; every move of it is appended to the pointer history.

Redis layout (prefix ``rf:{ns}:``), no TTL (this is the audit trail)::

    models                    set of candidate names with versions
    model:{name}:seq          last version number of the candidate
    model:{name}:v:{n}        signed blob
    model:{name}:meta:{n}     metadata (JSON)
    champion                  pointer (JSON {"model", "version"})
    champion:history          list of pointer moves (JSON), oldest first
    learner:checkpoint        the learner's state at its last snapshot (signed JSON, see checkpoint)
    challengers               hash: fresh challenger name -> JSON {"base", "started", "reason"}
"""

from __future__ import annotations

import base64
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import orjson
import river

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.errors import ModelError
from riverflow.models.signing import sign, verify_and_load
from riverflow.streams.contracts import ModelEvent

EXPORT_FORMAT = "riverflow-model/1"


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


class ModelRegistry(ABC):
    """Versions, pointer and history over a small set of storage primitives.

    ``MemoryRegistry`` and ``RedisRegistry`` provide the primitives; everything a
    user relies on (signing, metadata, compare-and-set moves, rollback, export)
    is written once here.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key

    # -- versions ---------------------------------------------------------------

    def publish(self, name: str, model: Any, meta: dict[str, Any]) -> int:
        """Store a new immutable version of ``name``; the pointer does not move."""
        return self._store(name, sign(model, self.key), meta)

    def load(self, name: str, version: int) -> ModelVersion:
        """The version's model, unpickled only if its signature verifies."""
        blob, meta = self._get(name, version)
        return ModelVersion(name, version, verify_and_load(blob, self.key), meta)

    def meta(self, name: str, version: int) -> dict[str, Any]:
        return self._get(name, version)[1]

    def latest(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def export(self, name: str, version: int) -> bytes:
        """A file's content: the signed blob and its metadata."""
        blob, meta = self._get(name, version)
        record = {"format": EXPORT_FORMAT, "name": name, "version": version, "meta": meta,
                  "blob_b64": base64.b64encode(blob).decode()}  # fmt: skip
        return orjson.dumps(record, option=orjson.OPT_INDENT_2)

    def import_(self, data: bytes) -> ModelVersion:
        """Store an exported version as a new version; refused unless signed with our key."""
        try:
            record = orjson.loads(data)
            if record.get("format") != EXPORT_FORMAT:
                raise ValueError(f"format is not {EXPORT_FORMAT}")
            blob = base64.b64decode(record["blob_b64"], validate=True)
            name, meta = str(record["name"]), dict(record["meta"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"not a riverflow model export: {exc}") from exc
        model = verify_and_load(blob, self.key)  # SignatureError before anything is stored
        # its version numbers (own, parent) belong to the registry it came from
        meta = {k: v for k, v in meta.items() if k not in ("version", "parent", "created", "river")}
        meta["imported_from"] = {"version": record.get("version"), "meta": record["meta"]}
        version = self._store(name, blob, meta)
        return ModelVersion(name, version, model, self.meta(name, version))

    # -- the champion pointer ---------------------------------------------------

    def champion(self) -> ChampionPointer | None:
        return ChampionPointer.decode(self._pointer())

    def move(
        self,
        to: ChampionPointer,
        kind: str,
        expect: ChampionPointer | None,
        reason: str = "",
    ) -> PointerMove | None:
        """Point the champion at ``to`` if it still points at ``expect``; None if not."""
        self._get(to.model, to.version)  # only existing versions can be served
        move = PointerMove(kind, to, expect, time.time(), reason)
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
        twice goes two steps back instead of flipping between two versions.
        """
        current = self.champion()
        for past in reversed(self.history()):
            if past.to == current and past.kind != "rollback":
                return past.previous
        return None

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
        record = {"base": base, "started": time.time(), "reason": reason}
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

    # -- storage primitives -------------------------------------------------------

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def versions(self, name: str) -> list[int]: ...

    @abstractmethod
    def _store(self, name: str, blob: bytes, meta: dict[str, Any]) -> int: ...

    @abstractmethod
    def _get(self, name: str, version: int) -> tuple[bytes, dict[str, Any]]: ...

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


def _meta(version: int, meta: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {**meta, "version": version, "created": time.time(), "river": river.__version__}
    )


class MemoryRegistry(ModelRegistry):
    """The embedded runtime's registry. Blobs are signed here too, so both registries
    hand out copies that cannot alias the publisher's live model."""

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.blobs: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self.pointer: bytes | None = None
        self.moves: list[bytes] = []
        self.saved: bytes | None = None
        self.fresh: dict[str, bytes] = {}

    def names(self) -> list[str]:
        return sorted({n for n, _ in self.blobs})

    def versions(self, name: str) -> list[int]:
        return sorted(v for n, v in self.blobs if n == name)

    def _store(self, name: str, blob: bytes, meta: dict[str, Any]) -> int:
        version = 1 + max(self.versions(name), default=0)
        self.blobs[(name, version)] = (blob, _meta(version, meta))
        return version

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


# KEYS: pointer, history; ARGV: expected pointer ('' = none), new pointer, move record
_COMPARE_AND_SET = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
return 1
"""


class RedisRegistry(ModelRegistry):
    """The registry shared by every stage of a pipeline."""

    def __init__(self, client: Any, namespace: str, key: bytes) -> None:
        super().__init__(key)
        self.client = client
        self.prefix = f"rf:{namespace}:"
        self._cas = client.register_script(_COMPARE_AND_SET)

    def _model(self, name: str) -> str:
        return f"{self.prefix}model:{name}:"

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.client.smembers(f"{self.prefix}models"))

    def versions(self, name: str) -> list[int]:
        # numbers are dense except where a publisher died between INCR and SET: check
        last = int(self.client.get(f"{self._model(name)}seq") or 0)
        keys = [f"{self._model(name)}meta:{v}" for v in range(1, last + 1)]
        found = self.client.exists(*keys) if keys else 0
        if found == last:
            return list(range(1, last + 1))
        return [v for v, k in enumerate(keys, 1) if self.client.exists(k)]

    def _store(self, name: str, blob: bytes, meta: dict[str, Any]) -> int:
        prefix = self._model(name)
        version = int(self.client.incr(f"{prefix}seq"))
        pipe = self.client.pipeline(transaction=True)
        pipe.set(f"{prefix}v:{version}", blob)
        pipe.set(f"{prefix}meta:{version}", _meta(version, meta))
        pipe.sadd(f"{self.prefix}models", name)
        pipe.execute()
        return version

    def _get(self, name: str, version: int) -> tuple[bytes, dict[str, Any]]:
        prefix = self._model(name)
        blob, meta = self.client.mget(f"{prefix}v:{version}", f"{prefix}meta:{version}")
        if blob is None or meta is None:
            raise ModelError(f"model {name!r} has no version {version}")
        return blob, orjson.loads(meta)

    def _pointer(self) -> bytes | None:
        raw = self.client.get(f"{self.prefix}champion")
        return None if raw is None else bytes(raw)

    def _compare_and_set(self, old: bytes, new: bytes, move: bytes) -> bool:
        keys = [f"{self.prefix}champion", f"{self.prefix}champion:history"]
        return bool(self._cas(keys=keys, args=[old, new, move]))

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
