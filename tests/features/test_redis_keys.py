"""Key naming on one Redis and on a Redis Cluster (``riverflow.redis_keys``)."""

from __future__ import annotations

import redis
from redis.crc import key_slot

from riverflow.features.definitions import FeaturePlan
from riverflow.features.store import RedisFeatureStore
from riverflow.features.store.redis_store import is_cluster, key_prefix
from riverflow.models.registry import RedisRegistry
from riverflow.settings import DEFAULT_SPEC
from riverflow.spec import load_spec


def test_one_redis_keeps_the_keys_it_always_had() -> None:
    # a deployment that upgrades finds its registry, checkpoint and entities again
    assert key_prefix("fraud", cluster=False) == "rf:fraud:"
    client = redis.Redis()  # no command is sent: nothing connects
    plan: FeaturePlan = load_spec(DEFAULT_SPEC).feature_plan()
    store = RedisFeatureStore(client, "fraud", plan, horizon_s=60)
    assert not is_cluster(client) and store.prefix == "rf:fraud:"
    assert store.entity_key("card_id", "c1") == "rf:fraud:ent:card_id:c1"
    assert RedisRegistry(client, "fraud", b"k").prefix == "rf:fraud:"


def test_on_a_cluster_every_key_of_a_pipeline_hashes_to_one_slot() -> None:
    prefix = key_prefix("fraud", cluster=True)
    assert prefix == "rf:{fraud}:"
    keys = [
        f"{prefix}ent:card_id:c00042", f"{prefix}ent:card_id+merchant:c1|m{{2}}",
        f"{prefix}ent:merchant:m0017:hll:1:1:4242", f"{prefix}snaps:29672410",
        f"{prefix}learned:e-1", f"{prefix}champion", f"{prefix}champion:history",
        f"{prefix}model:hoeffding:seq", f"{prefix}model:hoeffding:v:3", f"{prefix}models",
        f"{prefix}learner:checkpoint", f"{prefix}challengers",
    ]  # fmt: skip
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"fraud")}
    # and pipelines spread over the cluster's slots
    slots = {key_slot(key_prefix(f"p{i}", cluster=True).encode()) for i in range(20)}
    assert len(slots) == 20
