"""The online store: tiles per entity, point-in-time snapshots, event-id dedup.

One behaviour, one module per backend behind the ``FeatureStore`` protocol of
``base``: ``redis_store.RedisFeatureStore`` in production (its Lua scripts in
``lua/``) and ``memory.MemoryFeatureStore`` for the embedded runtime. Both
process a batch in order and run the same steps (``features.tiles``, mirrored by
the Lua); where their results may differ is in ``redis_store``'s docstring.
"""

from riverflow.features.store.base import (
    ORPHAN,
    Claim,
    FeatureRequest,
    FeatureSnapshot,
    FeatureStore,
    feature_request,
)
from riverflow.features.store.memory import MemoryFeatureStore
from riverflow.features.store.redis_store import RedisFeatureStore

__all__ = [
    "ORPHAN",
    "Claim",
    "FeatureRequest",
    "FeatureSnapshot",
    "FeatureStore",
    "MemoryFeatureStore",
    "RedisFeatureStore",
    "feature_request",
]
