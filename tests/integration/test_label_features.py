"""Label-fed features on the real redis-server: what the scorer reads equals a
recount of the labels the learner wrote, smoothed rates and recency included."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import redis
import yaml

from riverflow.assembly import redis_client as connect
from riverflow.features.labelled import LabelFeatures, LabelPlan, LearnedLabel
from riverflow.features.store.redis_store import FeatureLayoutError, key_prefix
from riverflow.settings import Settings
from riverflow.tools.stack import Endpoints, RedisCluster
from tests.integration.test_redis_cluster import slot_owner
from tests.label_streams import FEATURES, LATENESS_S, PLAN, check_stream, world

pytestmark = pytest.mark.integration


def test_reads_equal_a_recount_of_the_labels_written(redis_client: redis.Redis) -> None:
    ns = f"it-{uuid.uuid4().hex[:10]}"
    features = LabelFeatures.on_redis(redis_client, ns, PLAN, dedup_s=60.0)
    features.check_layout()
    totals = check_stream(features, requests=300, seed=11)
    assert totals["counted"] > 1000 and totals["late"] == 0
    assert totals["duplicates"] > 0  # batches sent twice were recognised
    assert totals["smoothed"] > 0 and totals["recent"] > 0  # priors and recency at work
    # the state sits under the namespace's own part, and every key expires
    keys = list(redis_client.scan_iter(match=f"rf:{ns}:*", count=1000))
    assert keys and all(k.startswith(f"rf:{ns}:lab:".encode()) for k in keys)
    assert all(redis_client.pttl(k) > 0 for k in keys if not k.endswith(b"features:layout"))
    # right to erasure: a user's windows go, alone and crossed with categories
    last = world(300, seed=11)[0][-1]
    pair, user = last.pairs[0], last.pairs[0]["user_id"]
    assert features.read([pair], last.ts)[0]["user_shown_1h"] > 0
    assert features.forget("user_id", user) >= 2
    assert not list(redis_client.scan_iter(match=f"rf:{ns}:lab:ent:user_id*:{user}*"))
    values = features.read([pair], last.ts)[0]
    assert values["user_shown_1h"] == 0 and values["user_cat_since_click"] == 7200.0
    assert values["item_shown_30m"] > 0  # the item's windows stay
    assert features.reset() > 0  # features reset: every window goes, and the layout
    assert list(redis_client.scan_iter(match=f"rf:{ns}:lab:ent:*")) == []
    assert redis_client.get(f"rf:{ns}:lab:features:layout") is None


def test_learners_writing_at_once_count_every_label_once(stack: Endpoints) -> None:
    """Learners writing the same entities at the same time: the server adds each
    batch atomically, so no label is lost or counted twice."""
    ns = f"it-{uuid.uuid4().hex[:10]}"
    pair = {"user_id": "u1", "item_id": "i1", "category": "c1"}

    def learner(k: int) -> None:
        features = LabelFeatures.on_redis(redis.Redis.from_url(stack.redis_url), ns, PLAN)
        for b in range(20):
            features.write([
                LearnedLabel(f"r{k}-{b}-{j}/i1", pair, j == 0, 1_000_000.0 + b)
                for j in range(5)
            ])  # fmt: skip

    threads = [threading.Thread(target=learner, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = LabelFeatures.on_redis(redis.Redis.from_url(stack.redis_url), ns, PLAN)
    got = reader.read([pair], 1_000_100.0)[0]
    assert got["user_shown_1h"] == 300.0 and got["user_clicks_1h"] == 60.0
    assert got["user_cat_since_click"] == 100.0 - 19.0
    assert got["item_ctr_30m"] == pytest.approx(0.2)  # (60 + 10 x 0.2) / (300 + 10)


def test_a_changed_plan_is_refused_against_the_stored_layout(redis_client: redis.Redis) -> None:
    ns = f"it-{uuid.uuid4().hex[:10]}"
    LabelFeatures.on_redis(redis_client, ns, PLAN).check_layout()
    # the first group now keeps another statistic: its stored tiles would be misread
    changed = [f.model_copy(update={"agg": "sum", "field": "clicked", "when": None})
               if f.name == "user_shown_1h" else f for f in FEATURES]  # fmt: skip
    other = LabelPlan.build([*changed[1:], changed[0]], "clicked", "user_id", LATENESS_S)
    with pytest.raises(FeatureLayoutError, match="lab:ent"):
        LabelFeatures.on_redis(redis_client, ns, other).check_layout()


def test_on_a_redis_cluster_a_batch_is_one_call_to_the_namespaces_node(
    redis_cluster: RedisCluster,
) -> None:
    """Label-fed keys share the namespace's hash slot: a write is one script call
    and a read one pipeline, both to the node that owns the slot, and what is read
    equals the recount."""
    ns = f"it-{uuid.uuid4().hex[:10]}"
    client = connect(Settings(redis_cluster=True), redis_cluster.url)
    features = LabelFeatures.on_redis(client, ns, PLAN)
    features.check_layout()
    totals = check_stream(features, requests=60, seed=5)
    assert totals["counted"] > 100
    owner = slot_owner(redis_cluster, key_prefix(ns, True))
    keys = redis_cluster.client(owner).keys(f"rf:{{{ns}}}:lab:*")
    assert any(b":lab:ent:@all:" in k for k in keys) and any(b":lab:snaps:" in k for k in keys)
    for node in redis_cluster.primaries():  # every script call and read went to the owner
        stats = redis_cluster.client(node).info("commandstats")
        sent = {c for c in ("cmdstat_evalsha", "cmdstat_hget") if c in stats}
        assert sent == ({"cmdstat_evalsha", "cmdstat_hget"} if node.port == owner.port else set())


def test_forget_and_features_reset_reach_the_label_fed_windows(
    redis_client: redis.Redis, stack: Endpoints, tmp_path: Path
) -> None:
    """``riverflow forget`` erases an item's label-fed windows (alone), ``features
    reset`` every label-fed window and the layout."""
    from riverflow.spec import load_spec

    data = load_spec("examples/recsys.yaml").model_dump(mode="json", exclude_none=True)
    data["name"] = f"it-{uuid.uuid4().hex[:10]}"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    plan = load_spec(spec_file).label_plan()
    assert plan is not None
    features = LabelFeatures.on_redis(redis_client, data["name"], plan)
    features.check_layout()
    pairs = [{"user_id": "u1", "item_id": i, "category": "c1"} for i in ("i1", "i2")]
    features.write([LearnedLabel(f"r1/{p['item_id']}", p, True, 1_767_225_600.0) for p in pairs])
    lab = f"rf:{data['name']}:lab:"
    env = {**os.environ, "RIVERFLOW_REDIS_URL": stack.redis_url,
           "RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap}  # fmt: skip

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "riverflow.cli", *args, "--spec",
                               str(spec_file)], env=env, capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return " ".join(done.stdout.split())

    assert "1 entity keys" in cli("forget", "i1", "--field", "item_id")
    assert not redis_client.exists(f"{lab}ent:item_id:i1")
    assert redis_client.exists(f"{lab}ent:item_id:i2", f"{lab}ent:user_id:u1") == 2
    assert "deleted" in cli("features", "reset", "--yes")
    assert not list(redis_client.scan_iter(match=f"{lab}ent:*"))
    assert not redis_client.exists(f"{lab}features:layout")
