"""The walking skeleton on real servers: events in, predictions out, labels learned."""

from __future__ import annotations

import base64
import math
import time
from collections import Counter
from collections.abc import Iterable

import orjson
import pytest
import redis

from riverflow.assembly import signing_key
from riverflow.embedded import EmbeddedRuntime
from riverflow.models.factory import build_model
from riverflow.models.registry import ChampionPointer, RedisRegistry
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import DeadLetter, Evaluation, Prediction
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.generator import (
    BAD_KINDS,
    FraudStreamConfig,
    corrupt,
    transactions,
    with_labels,
)
from riverflow.tools.stack import Endpoints
from tests.helpers import assert_features_match, assert_served_matches, brute_force_features
from tests.integration.conftest import StageFactory, collect

N = 10_000


def by_event_id(values: Iterable[bytes]) -> dict[str, Prediction]:
    predictions = [Prediction.decode(v) for v in values]
    return {p.event_id: p for p in predictions}


@pytest.mark.parametrize("host", ["confluent", "faust"])
def test_ten_thousand_events_through_kafka_and_redis(
    stack: Endpoints,
    spec: PipelineSpec,
    start_stage: StageFactory,
    redis_client: redis.Redis,
    host: str,
) -> None:
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    config = FraudStreamConfig(cards=300, mean_gap_s=20.0, drift_at=(N // 2,))
    records: list[tuple[str, bytes | None, bytes]] = []
    events, bad = [], Counter[str]()
    for i, (kind, rec) in enumerate(with_labels(N, config)):
        if kind == "label":
            records.append((topics.labels, rec["event_id"].encode(), orjson.dumps(rec)))
            continue
        if i % 97 == 0:  # a bad copy of every 97th event (the good one is sent too)
            kind_ = BAD_KINDS[sum(bad.values()) % len(BAD_KINDS)]
            bad[kind_] += 1
            records.append((topics.events, rec["card_id"].encode(), corrupt(rec, kind_)))
        events.append(rec)
        records.append((topics.events, rec["card_id"].encode(), orjson.dumps(rec)))
    # bad labels, duplicate labels and a label for an event that never came
    labels = [orjson.loads(v) for t, _, v in records if t == topics.labels]
    records += [(topics.labels, b"x", b'{"event_id": "e1", "is_fraud": "yes"}')]
    records += [(topics.labels, None, orjson.dumps(lab)) for lab in labels[:300]]
    records += [(topics.labels, None, b'{"event_id": "never-scored", "is_fraud": true}')]
    assert set(bad) == set(BAD_KINDS)

    scorer = start_stage("scorer", partitions=3, host=host)
    # (no floor in time between versions: the labels come in a burst of seconds, and a
    # version every 2,000 of them is what the end checks)
    learner = start_stage("learner", partitions=3, label_wait_s=3, snapshot_every_labels=2000,
                          snapshot_min_interval_s=0, host=host)  # fmt: skip
    # events first, labels once they are scored: ground truth comes late
    prod = producer(stack.kafka_bootstrap)
    produce_all(prod, (r for r in records if r[0] == topics.events))

    # exactly one prediction per valid event id: none lost, none duplicated
    raw = collect(stack.kafka_bootstrap, topics.predictions, N)
    predictions = [Prediction.decode(m.value()) for m in raw]
    counts = Counter(p.event_id for p in predictions)
    assert len(counts) == N and set(counts.values()) == {1}
    assert set(counts) == {e["event_id"] for e in events}
    produce_all(prod, (r for r in records if r[0] == topics.labels))

    # every bad input is in the DLQ with its reason and where it came from
    letters = [DeadLetter.decode(m.value()) for m in
               collect(stack.kafka_bootstrap, topics.dlq, sum(bad.values()) + 2, 60)]  # fmt: skip
    scorer_kinds = Counter(d.error_kind for d in letters if d.stage == "scorer")
    assert scorer_kinds == bad
    source = {"scorer": topics.events, "learner": topics.labels}
    assert all(d.error and d.topic == source[d.stage] and d.offset >= 0 for d in letters)
    learner_kinds = Counter(d.error_kind for d in letters if d.stage == "learner")
    assert learner_kinds == {"wrong_type": 1, "orphan_label": 1}
    oversized = next(d for d in letters if d.error_kind == "oversized")
    assert len(base64.b64decode(oversized.payload_b64 or "")) > 100_000  # nothing cut off

    # feature values equal a brute-force recomputation from the events
    expected = brute_force_features(events, spec.features, spec.events.key, spec.events.time)
    for p in predictions:
        assert_features_match(p.features, expected[p.event_id])
    assert max(p.features["tx_count_1h"] for p in predictions) >= 3

    # the learner learned every label exactly once (duplicates were not learned)
    evals = [Evaluation.decode(m.value()) for m in
             collect(stack.kafka_bootstrap, topics.evaluations, N)]  # fmt: skip
    learned = Counter(e.event_id for e in evals)
    assert len(learned) == N and set(learned.values()) == {1}
    assert sorted(e.labels_seen for e in evals) == list(range(1, N + 1))
    # ... joined with the prediction that was served for its event, as it is in the topic
    served = {p.event_id: p for p in predictions}
    assert_served_matches(evals, served)
    # ... and published its snapshots as champion versions the scorer can load
    registry = RedisRegistry(
        redis_client, spec.name, Settings().signing_key.get_secret_value().encode()
    )
    champion = registry.champion()
    assert champion is not None and champion.model == spec.models.champion_spec.name
    assert champion.version >= N // 2000

    # both stages tell Prometheus what they did
    assert scorer.get("/healthz") == (200, "ok\n") and learner.get("/healthz")[0] == 200
    consumed = scorer.metric("riverflow_consumed_messages_total", stage="scorer")
    assert consumed == N + sum(bad.values())
    for kind, count in bad.items():
        assert scorer.metric("riverflow_dead_letters_total", kind=kind) == count
    assert scorer.metric("riverflow_event_latency_seconds_count") == consumed
    assert scorer.metric("riverflow_consumer_lag", partition="0") == 0
    assert learner.metric("riverflow_stage_status", name="labels_learned") == N
    assert learner.metric("riverflow_stage_status", name="prequential_roc_auc") > 0.5


def test_evaluations_join_the_prediction_each_champion_version_served(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory, redis_client: redis.Redis
) -> None:
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    stream = list(with_labels(3000, FraudStreamConfig(cards=300, mean_gap_s=20.0)))
    events = [rec for kind, rec in stream if kind == "event"]
    labels = {rec["event_id"]: rec for kind, rec in stream if kind == "label"}
    scorer = start_stage("scorer", partitions=3)
    # a version every 500 labels, however fast a wave's come (no floor in time)
    start_stage("learner", partitions=3, snapshot_every_labels=500, label_wait_s=3,
                snapshot_min_interval_s=0)  # fmt: skip
    registry = RedisRegistry(redis_client, spec.name, signing_key(Settings()))

    def scorer_follows_the_pointer() -> None:
        """The scorer reads the pointer every model_poll_s (0.1 s): a wave produced the
        moment the last evaluations show could all be scored before it looks."""
        pointer = registry.champion()
        if pointer is None:
            return
        deadline = time.monotonic() + 10
        while scorer.metric("riverflow_stage_status", name="model_version") != pointer.version:
            assert time.monotonic() < deadline, "the scorer never followed the pointer"
            time.sleep(0.05)

    prod = producer(stack.kafka_bootstrap)
    # three waves: events, their predictions, then their labels, so that each wave
    # is served by the version the learner published from the waves before it
    for wave in range(3):
        scorer_follows_the_pointer()
        chunk = events[wave * 1000 : (wave + 1) * 1000]
        produce_all(prod, ((topics.events, e["card_id"].encode(), orjson.dumps(e)) for e in chunk))
        collect(stack.kafka_bootstrap, topics.predictions, (wave + 1) * 1000, settle_s=0)
        produce_all(prod, ((topics.labels, e["event_id"].encode(),
                            orjson.dumps(labels[e["event_id"]])) for e in chunk))  # fmt: skip
        collect(stack.kafka_bootstrap, topics.evaluations, (wave + 1) * 1000, settle_s=0)
    raw = collect(stack.kafka_bootstrap, topics.predictions, 3000)
    served = by_event_id(m.value() for m in raw)
    evals = [Evaluation.decode(m.value()) for m in
             collect(stack.kafka_bootstrap, topics.evaluations, 3000)]  # fmt: skip
    assert len(served) == len(evals) == 3000
    assert_served_matches(evals, served)
    assert len({p.version for p in served.values()}) >= 3
    assert len({p.probability for p in served.values()}) >= 3  # not all one number


def test_embedded_and_kafka_runtimes_give_the_same_predictions(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory, redis_client: redis.Redis
) -> None:
    topics = spec.topics
    settings = Settings(snapshot_every_labels=0)
    key = settings.signing_key.get_secret_value().encode()
    # a champion trained on another stream, fixed for the run, in both registries
    first = spec.models.champion_spec
    model = build_model(first)
    for event, fraud in transactions(3000, FraudStreamConfig(seed=99)):
        model.learn_one({"amount": event["amount"], "category": event["category"],
                         "country": event["country"], "channel": event["channel"],
                         "tx_count_1h": 1.0, "amount_sum_1h": event["amount"],
                         "amount_mean_24h": event["amount"]}, fraud)  # fmt: skip
    remote_registry = RedisRegistry(redis_client, spec.name, key)
    remote_registry.promote(
        ChampionPointer(first.name, remote_registry.publish(first.name, model, {}))
    )

    config = FraudStreamConfig(cards=300, mean_gap_s=20.0)
    stream = [rec for kind, rec in with_labels(N, config) if kind == "event"]
    embedded = EmbeddedRuntime(spec, settings)
    embedded.registry.promote(
        ChampionPointer(first.name, embedded.registry.publish(first.name, model, {}))
    )
    embedded.scorer.champion.refresh(force=True)
    for rec in stream:
        embedded.produce(topics.events, rec["card_id"].encode(), orjson.dumps(rec))
    embedded.drain()
    local = by_event_id(v for _, v in embedded.messages(topics.predictions))

    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=1)
    start_stage("scorer", partitions=1, snapshot_every_labels=0)
    produce_all(  # idempotent: the topic keeps the stream's order, even across retries
        producer(stack.kafka_bootstrap),
        ((topics.events, rec["card_id"].encode(), orjson.dumps(rec)) for rec in stream),
    )
    remote = by_event_id(m.value() for m in collect(stack.kafka_bootstrap, topics.predictions, N))

    assert len(local) == len(remote) == N
    assert {p.version for p in remote.values()} == {p.version for p in local.values()} == {1}
    spread = {round(p.probability, 3) for p in local.values()}
    assert len(spread) > 5  # the champion really discriminates: equality is not trivial
    for event_id, mine in local.items():
        theirs = remote[event_id]
        assert theirs.features == mine.features, event_id
        assert math.isclose(theirs.probability, mine.probability, rel_tol=0, abs_tol=0)
