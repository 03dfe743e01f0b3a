"""Where a pipeline's Redis keys live: one prefix per namespace, hash-tagged on a
Redis Cluster (docs/architecture.md, "Redis Cluster")."""

from __future__ import annotations

from typing import Any


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (redis-py ``RedisCluster``)."""
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def key_prefix(namespace: str, cluster: bool) -> str:
    """The prefix of a pipeline's keys: ``rf:fraud:`` on one Redis; ``rf:{fraud}:`` on
    a cluster, where the braces make the namespace the hash tag, so that every key of
    the pipeline hashes to one slot and one script call may touch any of them."""
    return f"rf:{{{namespace}}}:" if cluster else f"rf:{namespace}:"
