"""The Redis store on a real redis-server: same values as the embedded store,
replays change nothing, every key expires."""

from __future__ import annotations

import uuid

import orjson
import pytest
import redis

from features.errors import FeatureStoreError
from features.store import (
    Claim,
    FeatureRequest,
    FeatureSnapshot,
    MemoryFeatureStore,
    RedisFeatureStore,
)
from riverflow.assembly import ConnectionFailed
from riverflow.assembly import redis_client as connect
from riverflow.generator import FraudStreamConfig, transactions
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec


def requests(n: int) -> list[FeatureRequest]:
    config = FraudStreamConfig(cards=25, mean_gap_s=40.0)
    return [
        FeatureRequest(
            e["event_id"], e["ts"], {"card_id": e["card_id"]}, {"amount": e["amount"]},
            orjson.dumps({"amount": e["amount"], "channel": e["channel"]}),
        )
        for e, _ in transactions(n, config)
    ]  # fmt: skip


@pytest.fixture
def store(redis_client: redis.Redis, fraud_spec: PipelineSpec) -> RedisFeatureStore:
    ns = f"t{uuid.uuid4().hex[:8]}"
    return RedisFeatureStore(redis_client, ns, fraud_spec.feature_plan(), horizon_s=3600)


def test_same_values_bit_for_bit_as_the_embedded_store(
    store: RedisFeatureStore, fraud_spec: PipelineSpec
) -> None:
    memory = MemoryFeatureStore(fraud_spec.feature_plan())
    reqs = requests(4000)  # 25 cards over ~44 hours: windows fill and roll over
    for i in range(0, len(reqs), 400):
        got = store.update_and_read(reqs[i : i + 400])
        want = memory.update_and_read(reqs[i : i + 400])
        assert [(s.event_id, s.inputs, s.aggregates) for s in got] == [
            (s.event_id, s.inputs, s.aggregates) for s in want
        ]


def test_replaying_a_batch_leaves_every_aggregate_unchanged(
    store: RedisFeatureStore, redis_client: redis.Redis
) -> None:
    reqs = requests(600)
    first = store.update_and_read(reqs)
    keys = sorted(redis_client.scan_iter(f"{store.prefix}tile:*"))
    before = {k: redis_client.hgetall(k) for k in keys}
    again = store.update_and_read(reqs)
    assert all(s.replayed for s in again) and not any(s.replayed for s in first)
    assert [s.aggregates for s in again] == [s.aggregates for s in first]
    assert {k: redis_client.hgetall(k) for k in keys} == before


def test_every_key_written_has_a_ttl(store: RedisFeatureStore, redis_client: redis.Redis) -> None:
    reqs = requests(300)
    store.update_and_read(reqs)
    ids = [r.event_id for r in reqs[:100]]
    store.claim_snapshots(ids, ids, lambda token: False)
    keys = list(redis_client.scan_iter(f"{store.prefix}*"))
    kinds = {k.decode().split(":")[2] for k in keys}
    assert kinds == {"tile", "snap", "learned"}
    no_ttl = [k for k in keys if redis_client.pttl(k) < 0]
    assert no_ttl == []


def never(token: str) -> bool:
    return False


def tokens(ids: list[str], run: str) -> list[str]:
    return [f"{run}:{i}" for i in ids]


def test_labels_are_claimed_once(store: RedisFeatureStore) -> None:
    reqs = requests(3)
    store.update_and_read(reqs[:2])
    ids = [r.event_id for r in reqs]
    claims = store.claim_snapshots(ids, tokens(ids, "run1"), never)
    assert claims[0].inputs["channel"]  # type: ignore[union-attr]
    assert claims[2] is Claim.MISSING
    assert store.claim_snapshots(ids[:2], tokens(ids[:2], "run1"), never) == [
        Claim.DUPLICATE,
        Claim.DUPLICATE,
    ]
    # a mark whose learning was lost (the learner crashed before its snapshot) is taken over
    lost = store.claim_snapshots(ids[:2], tokens(ids[:2], "run2"), lambda t: t == f"run1:{ids[0]}")
    assert isinstance(lost[0], FeatureSnapshot) and lost[1] is Claim.DUPLICATE
    assert store.claim_snapshots(ids[:1], ["run3"], lambda t: t.startswith("run1")) == [
        Claim.DUPLICATE
    ]


def test_unreachable_redis_is_a_clear_error(fraud_spec: PipelineSpec) -> None:
    from riverflow.stack import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    settings = Settings(redis_socket_timeout_s=0.5)
    with pytest.raises(ConnectionFailed) as info:
        connect(settings, url)
    assert "Redis unreachable at 127.0.0.1" in str(info.value)
    assert "hunter2" not in str(info.value)
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    store = RedisFeatureStore(client, "x", fraud_spec.feature_plan(), 60)
    with pytest.raises(FeatureStoreError, match="Redis unreachable"):
        store.update_and_read(requests(1))
