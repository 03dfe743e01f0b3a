"""Least privilege on Redis: each stage logs in as a Redis user of its own
(``riverflow.security.redis_acl_rules``). The pipeline runs on them, and the
scorer's user cannot store a model version or move the champion pointer."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from riverflow.models.registry import ChampionPointer, RedisRegistry
from riverflow.security import STAGES, redis_acl_rules
from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints

from .chaos import stop_cleanly
from .conftest import StageFactory, StageProcess, collect

KEY = Settings().signing_key.get_secret_value().encode()


def test_each_stage_runs_as_its_own_redis_user_and_the_scorer_cannot_touch_the_registry(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory, redis_client: redis.Redis
) -> None:
    spec = load_spec(spec_file)
    topics, n = spec.topics, 2000
    tag = uuid.uuid4().hex[:6]
    users = {stage: (f"{stage}-{tag}", f"pw-{stage}-{tag}") for stage in STAGES}
    for stage, (user, password) in users.items():
        redis_client.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", *redis_acl_rules(spec, stage)
        )
    stages: dict[str, StageProcess] = {}
    try:
        ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
        stages = {
            stage: start_stage(
                stage,
                partitions=3,
                redis_username=user,
                redis_password=password,
                snapshot_every_labels=500,
            )
            for stage, (user, password) in users.items()
        }
        records = []
        for kind, rec in with_labels(n, FraudStreamConfig(seed=9, drift_at=(n // 2,))):
            topic, key = (topics.events, rec["card_id"]) if kind == "event" else (
                topics.labels, rec["event_id"])  # fmt: skip
            records.append((topic, key.encode(), orjson.dumps(rec)))
        produce_all(producer(stack.kafka_bootstrap), records)
        assert len(collect(stack.kafka_bootstrap, topics.predictions, n, 180, 1.0)) == n
        assert len(collect(stack.kafka_bootstrap, topics.evaluations, n, 180, 1.0)) == n
        for stage in stages.values():
            assert stage.proc.poll() is None  # none died on a refused command
        # the learner published and moved the pointer as it went: under its own user (its
        # versions come at most one a second: the last labels' may follow them by that)
        deadline = time.monotonic() + 10
        while (pointer := RedisRegistry(redis_client, spec.name, KEY).champion()) is None:
            assert time.monotonic() < deadline, "the learner moved no pointer"
            time.sleep(0.2)
        assert pointer.version > 0
        # the monitor saved its memory (what a restarted one needs to roll back) under its
        # own user: a refused save is only logged, so it is looked for here
        memory = RedisRegistry(redis_client, spec.name, KEY).monitor_memory
        deadline = time.monotonic() + 10
        while memory() is None:
            assert time.monotonic() < deadline, "the monitor saved no memory"
            time.sleep(0.2)

        user, password = users["scorer"]
        as_scorer = redis.Redis.from_url(stack.redis_url, username=user, password=password)
        scorer_registry = RedisRegistry(as_scorer, spec.name, KEY)
        assert scorer_registry.champion() == pointer  # it reads the pointer and versions
        assert scorer_registry.load(pointer.model, pointer.version).version == pointer.version
        with pytest.raises(redis.exceptions.NoPermissionError):
            scorer_registry.promote(ChampionPointer(pointer.model, pointer.version))
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_scorer.set(f"rf:{spec.name}:champion", b'{"model": "mine", "version": 1}')
        with pytest.raises(redis.exceptions.NoPermissionError):
            scorer_registry.publish(pointer.model, {"forged": True}, {})
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_scorer.get("rf:other-pipeline:ent:card_id:c1")  # another pipeline's keys
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_scorer.flushall()
        assert RedisRegistry(redis_client, spec.name, KEY).champion() == pointer
    finally:
        # stopped while their users exist: a stage whose user is deleted under it waits
        # the refusal out as an outage, until the fixture's SIGKILL 30 s later
        stop_cleanly(*stages.values(), timeout_s=30)
        for user, _ in users.values():
            redis_client.acl_deluser(user)


def test_label_fed_features_run_under_the_stages_redis_users(
    redis_client: redis.Redis, stack: Endpoints
) -> None:
    """The learner's user writes the label-fed windows, the scorer's reads them and
    cannot write them."""
    from riverflow.features.labelled import LabelFeatures, LearnedLabel
    from riverflow.spec import parse_spec

    data = load_spec("examples/recsys.yaml").model_dump(mode="json", exclude_none=True)
    spec = parse_spec({**data, "name": f"acl-{uuid.uuid4().hex[:8]}"})
    plan = spec.label_plan()
    assert plan is not None
    tag = uuid.uuid4().hex[:6]
    clients = {}
    try:
        for stage in ("scorer", "learner"):
            user, password = f"{stage}-{tag}", f"pw-{stage}-{tag}"
            redis_client.execute_command(
                "ACL", "SETUSER", user, "on", f">{password}", *redis_acl_rules(spec, stage)
            )
            clients[stage] = redis.Redis.from_url(stack.redis_url, username=user,
                                                  password=password)  # fmt: skip
        learner = LabelFeatures.on_redis(clients["learner"], spec.name, plan)
        scorer = LabelFeatures.on_redis(clients["scorer"], spec.name, plan)
        scorer.check_layout()  # the first to start stores the layout
        learner.check_layout()
        pair = {"user_id": "u1", "item_id": "i1", "category": "c1"}
        assert learner.write([LearnedLabel("r1/i1", pair, True, 1_767_225_600.0)]).counted == 1
        assert scorer.read([pair], 1_767_225_660.0)[0]["user_ctr_24h"] == 1.0
        with pytest.raises(redis.exceptions.ResponseError, match="access at least one of the keys"):
            scorer.write([LearnedLabel("r2/i1", pair, True, 1_767_225_600.0)])
        with pytest.raises(redis.exceptions.NoPermissionError):
            clients["scorer"].set(f"rf:{spec.name}:lab:ent:user_id:u1", b"forged")
    finally:
        for stage in clients:
            redis_client.acl_deluser(f"{stage}-{tag}")
