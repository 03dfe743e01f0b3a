"""The model registry: immutable, signed model versions and a champion pointer.

Redis layout (prefix ``rf:{ns}:model:{name}:``): ``seq`` (last version number),
``v:{n}`` (signed blob), ``meta:{n}`` (JSON), ``champion`` (version number).
Registry keys have no TTL: versions are the audit trail of the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import river

from models.errors import ModelError
from models.signing import sign, verify_and_load


@dataclass(frozen=True)
class ModelVersion:
    """One published model: its state and what it was made from."""

    name: str
    version: int
    model: Any
    meta: dict[str, Any] = field(default_factory=dict)


class ModelRegistry(Protocol):
    """Versions and the champion pointer, in Redis or in memory."""

    def champion(self, name: str) -> int | None: ...

    def load(self, name: str, version: int) -> ModelVersion: ...

    def publish(self, name: str, model: Any, meta: dict[str, Any]) -> int:
        """Store a new version and point the champion at it; returns its number."""
        ...


def _meta(version: int, meta: dict[str, Any]) -> dict[str, Any]:
    return {"version": version, "created": time.time(), "river": river.__version__, **meta}


class MemoryRegistry:
    """The embedded runtime's registry. Blobs are signed here too, so both registries
    hand out copies that cannot alias the publisher's live model."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.blobs: dict[tuple[str, int], tuple[bytes, dict[str, Any]]] = {}
        self.pointers: dict[str, int] = {}

    def champion(self, name: str) -> int | None:
        return self.pointers.get(name)

    def load(self, name: str, version: int) -> ModelVersion:
        try:
            blob, meta = self.blobs[(name, version)]
        except KeyError:
            raise ModelError(f"model {name!r} has no version {version}") from None
        return ModelVersion(name, version, verify_and_load(blob, self.key), meta)

    def publish(self, name: str, model: Any, meta: dict[str, Any]) -> int:
        version = 1 + max((v for n, v in self.blobs if n == name), default=0)
        self.blobs[(name, version)] = (sign(model, self.key), _meta(version, meta))
        self.pointers[name] = version
        return version


class RedisRegistry:
    """The registry shared by every stage of a pipeline."""

    def __init__(self, client: Any, namespace: str, key: bytes) -> None:
        self.client = client
        self.prefix = f"rf:{namespace}:model:"
        self.key = key

    def champion(self, name: str) -> int | None:
        raw = self.client.get(f"{self.prefix}{name}:champion")
        return None if raw is None else int(raw)

    def load(self, name: str, version: int) -> ModelVersion:
        blob, meta = self.client.mget(
            f"{self.prefix}{name}:v:{version}", f"{self.prefix}{name}:meta:{version}"
        )
        if blob is None:
            raise ModelError(f"model {name!r} has no version {version}")
        return ModelVersion(name, version, verify_and_load(blob, self.key), orjson.loads(meta))

    def publish(self, name: str, model: Any, meta: dict[str, Any]) -> int:
        blob = sign(model, self.key)
        version = int(self.client.incr(f"{self.prefix}{name}:seq"))
        pipe = self.client.pipeline(transaction=True)
        pipe.set(f"{self.prefix}{name}:v:{version}", blob)
        pipe.set(f"{self.prefix}{name}:meta:{version}", orjson.dumps(_meta(version, meta)))
        pipe.set(f"{self.prefix}{name}:champion", version)
        pipe.execute()
        return version
