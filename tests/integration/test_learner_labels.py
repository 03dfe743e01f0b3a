"""Labels on the real servers: a label waits while the scorer has not scored its
event (however long that takes), and goes to the DLQ only once the scorer has
caught up; a clean stop publishes what was learned; the store lets go of what
was learned, and remembers what went to the DLQ."""

from __future__ import annotations

import logging
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions

from riverflow.assembly import signing_key
from riverflow.features.store import (
    Claim,
    MemoryFeatureStore,
    RedisFeatureStore,
    feature_request,
)
from riverflow.kafka_runtime import ensure_pipeline_topics, retention_problem, scored_index
from riverflow.models.registry import RedisRegistry
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams import kafka_io
from riverflow.streams.contracts import DeadLetter
from riverflow.streams.kafka_io import (
    GroupProgress,
    TopicFollower,
    ensure_topics,
    offsets_since,
    produce_all,
    producer,
    topic_retention,
)
from riverflow.streams.trailing import TrailingReader
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints
from tests.helpers import within

from .conftest import StageFactory, collect


def test_orphan_marks_released_marks_and_the_replay_window_in_both_stores(
    redis_client: redis.Redis, spec: PipelineSpec
) -> None:
    plan = spec.feature_plan()
    ns = f"t{uuid.uuid4().hex[:8]}"
    rs = RedisFeatureStore(redis_client, ns, plan, horizon_s=3600, replay_window_s=60)

    events = [e for kind, e in with_labels(4, FraudStreamConfig(seed=2)) if kind == "event"]
    reqs = [
        feature_request(plan, e, e["event_id"], e["ts"], orjson.dumps({"amount": e["amount"]}))
        for e in events
    ]
    ids = [r.event_id for r in reqs]
    for store in (rs, MemoryFeatureStore(plan)):
        store.update_and_read(reqs)
        store.mark_orphans([ids[2]])  # went to the DLQ before its event was scored
        tokens = [f"r:0:{i}" for i in range(4)]
        claims = store.claim_labels(ids, tokens, [True] * 4, lambda t: True)
        assert claims == [Claim.CLAIMED, Claim.CLAIMED, Claim.ORPHANED, Claim.CLAIMED]
        store.release_learned(ids[:1], 0)  # deleted once the checkpoint is committed
        store.release_learned(ids[1:2], 5)  # or kept a little while
        # forgotten: the learner no longer holds the event either, so the label waits
        assert store.claim_labels(ids[:1], ["r2:0:0"], [False], lambda t: False) == [Claim.MISSING]
        assert store.claim_labels(ids[1:2], ["r2:0:1"], [False], lambda t: False) == [
            Claim.DUPLICATE
        ]
    assert not redis_client.exists(rs.learned_key(ids[0]))
    assert 0 < redis_client.pttl(rs.learned_key(ids[1])) <= 5000
    assert redis_client.pttl(rs.learned_key(ids[2])) > 5000  # the orphan mark: the horizon
    # the snapshots, which only recognise a scorer's replays, keep the replay window
    # (from their minute's hash's last write)
    assert all(rs.stored_snapshot(r.event_id, r.ts) for r in reqs)
    assert all(0 < redis_client.pttl(rs.snapshot_hash(r.ts)) <= 60_000 for r in reqs)


def test_group_progress_follows_the_committed_offsets(stack: Endpoints) -> None:
    topic, group = f"progress-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], 2)
    produce_all(
        producer(stack.kafka_bootstrap), [(topic, str(i).encode(), b"x") for i in range(20)]
    )
    progress = GroupProgress(stack.kafka_bootstrap, group, topic, poll_s=0)
    assert progress() is None and progress() is None  # the group has committed nothing
    member = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": group,
                       "enable.auto.commit": False})  # fmt: skip
    meta = member.list_topics(topic, timeout=10).topics[topic]
    highs = {p: member.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
             for p in meta.partitions}  # fmt: skip
    member.commit(offsets=[TopicPartition(topic, p, h) for p, h in highs.items()],
                  asynchronous=False)  # fmt: skip
    before = time.monotonic()
    first = progress()  # confirms the probe started before the commit, starts another
    assert first is not None and first <= before
    again = progress()  # nothing new produced: confirmed at once
    assert again is not None and again > before
    produce_all(producer(stack.kafka_bootstrap), [(topic, b"1", b"y")])
    made = time.monotonic()
    stuck = progress()  # confirms the probe taken before that message ...
    assert stuck is not None and stuck < made
    assert progress() == progress() == stuck  # ... and no later one: it is not committed
    member.close()
    progress.close()


def test_labels_wait_for_a_scorer_that_starts_late_then_only_the_unscorable_is_orphaned(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory
) -> None:
    topics, n = spec.topics, 150
    ensure_topics(stack.kafka_bootstrap, topics.all(), 1)
    learner = start_stage("learner", partitions=1, label_wait_s=1, snapshot_every_labels=100_000,
                          snapshot_every_s=3600, scorer_progress_poll_s=0.5)  # fmt: skip
    stream = list(with_labels(n, FraudStreamConfig(seed=9)))
    records = [
        (topics.events if kind == "event" else topics.labels, None, orjson.dumps(rec))
        for kind, rec in stream
    ]
    produce_all(producer(stack.kafka_bootstrap), records)
    time.sleep(6)  # far past label_wait_s: the scorer is not even running
    assert collect(stack.kafka_bootstrap, topics.dlq, 1, timeout_s=2, settle_s=0) == []

    start_stage("scorer", partitions=1)
    evaluations = collect(stack.kafka_bootstrap, topics.evaluations, n, 90, settle_s=1)
    assert len(evaluations) == n
    never = orjson.dumps({"event_id": "never-produced", "is_fraud": True})
    produce_all(producer(stack.kafka_bootstrap), [(topics.labels, None, never)])
    [letter] = [
        DeadLetter.decode(m.value()) for m in collect(stack.kafka_bootstrap, topics.dlq, 1, 60)
    ]
    assert letter.error_kind == "orphan_label" and "never-produced" in letter.error

    learner.proc.send_signal(signal.SIGTERM)  # a clean stop publishes what it learned
    assert learner.proc.wait(30) == 0
    key = signing_key(Settings())
    saved = RedisRegistry(redis.Redis.from_url(stack.redis_url), spec.name, key).checkpoint()
    assert saved is not None and saved.labels_seen == n and not saved.pending


def test_a_label_long_after_its_snapshot_left_redis_joins_the_learners_index(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory, redis_client: redis.Redis
) -> None:
    """Redis keeps an event's snapshot for the replay window only; the record a label
    joins comes back from the predictions topic into the learner's index on disk,
    which a learner killed -9 and restarted goes on with."""
    topics, n = spec.topics, 200
    ensure_topics(stack.kafka_bootstrap, topics.all(), 2)
    start_stage("scorer", replay_window_s=1)
    learner = start_stage("learner", label_wait_s=1, snapshot_every_labels=50)
    stream = list(with_labels(n, FraudStreamConfig(seed=4)))
    events = [(topics.events, None, orjson.dumps(r)) for kind, r in stream if kind == "event"]
    labels = [(topics.labels, None, orjson.dumps(r)) for kind, r in stream if kind == "label"]
    produce_all(producer(stack.kafka_bootstrap), events)
    predictions = {
        p["event_id"]: p
        for p in (orjson.loads(m.value()) for m in collect(stack.kafka_bootstrap,
                                                           topics.predictions, n, 90, 0))
    }  # fmt: skip
    assert len(predictions) == n
    time.sleep(3)  # the replay window is long gone: Redis holds no event's snapshot
    assert list(redis_client.scan_iter(f"rf:{spec.name}:snaps:*")) == []
    learner.proc.kill()  # kill -9: its index on disk survives
    learner.proc.wait(30)
    start_stage("learner", label_wait_s=1, snapshot_every_labels=50)
    produce_all(producer(stack.kafka_bootstrap), labels)
    evaluations = [orjson.loads(m.value())
                   for m in collect(stack.kafka_bootstrap, topics.evaluations, n, 90)]  # fmt: skip
    assert sorted(e["event_id"] for e in evaluations) == sorted(predictions)  # each once
    for e in evaluations:  # joined to what was served, from the predictions topic
        p = predictions[e["event_id"]]
        assert e["served"] == {"model": p["model"], "version": p["version"],
                               "probability": p["probability"]}  # fmt: skip
    assert collect(stack.kafka_bootstrap, topics.dlq, 1, timeout_s=2, settle_s=0) == []


class ListIndex:
    """The smallest ``TopicIndex``: what it was given, and where it got to."""

    def __init__(self) -> None:
        self.values: list[bytes | None] = []
        self.at: dict[int, int] = {}

    def add(self, messages: list[Any]) -> None:
        for m in messages:
            self.values.append(m.value)
            self.at[m.partition] = m.offset + 1

    def positions(self, source: str) -> dict[int, int]:
        return dict(self.at)


def test_the_follower_knows_it_has_caught_up_past_transaction_markers(stack: Endpoints) -> None:
    """An exactly-once scorer's predictions end in commit markers, which no message
    reaches: the follower must still know it has read everything."""
    topic = f"follow-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], 3)
    txn = Producer({"bootstrap.servers": stack.kafka_bootstrap,
                    "transactional.id": f"t-{uuid.uuid4().hex[:8]}"})  # fmt: skip
    txn.init_transactions(30)
    for round_ in range(2):
        txn.begin_transaction()
        for i in range(10):
            txn.produce(topic, key=str(i).encode(), value=f"{round_}-{i}".encode(), partition=0)
        txn.commit_transaction(30)
    index = ListIndex()
    follower = TopicFollower(stack.kafka_bootstrap, topic, index, since_s=3600)

    def caught_up() -> bool:
        # False also means "not known yet" (a fetch slower than its wait on a busy
        # machine): asked again until it knows; one that never counts the marker never
        # does
        deadline = time.monotonic() + 30
        while not follower.caught_up():
            if time.monotonic() > deadline:
                return False
        return True

    assert caught_up()  # partitions 1 and 2 are empty, 0 ends in a marker
    assert len(index.values) == 20
    txn.begin_transaction()
    txn.produce(topic, value=b"late", partition=1)
    txn.commit_transaction(30)
    follower.follow()
    assert caught_up() and index.values[-1] == b"late"
    follower.close()


def test_partitions_added_to_the_predictions_topic_are_followed_and_trailed(
    stack: Endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kafka-topics.sh --alter --partitions 3`` on the predictions topic while the
    learner runs. Its index (``TopicFollower``) and the label timeouts' reader
    (``TrailingReader``) assigned themselves the partitions there were at start: a
    prediction written to the new one was never indexed, ``caught_up`` said all was
    read, and its event's label went to the DLQ as an orphan. Both now take the new
    partition, from its start, at their next look for added partitions."""
    monkeypatch.setattr(kafka_io, "PARTITIONS_EVERY_S", 0.0)
    topic = f"added-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], 2)
    write = producer(stack.kafka_bootstrap)
    produce_all(write, [(topic, None, b"before")])
    index = ListIndex()
    follower = TopicFollower(stack.kafka_bootstrap, topic, index, since_s=3600)
    trailing = TrailingReader(stack.kafka_bootstrap, topic, since_s=3600)
    trailing.start({})
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    admin.create_partitions([NewPartitions(topic, 3)])[topic].result(timeout=30)
    write = producer(stack.kafka_bootstrap)  # (one that knows the new partition)
    write.produce(topic, value=b"in the new partition", partition=2)
    assert write.flush(30) == 0

    def caught_up() -> bool:  # (False may mean "not known yet": asked again)
        deadline = time.monotonic() + 30
        while not follower.caught_up():
            if time.monotonic() > deadline:
                return False
        return True

    assert caught_up()
    assert sorted(index.values) == [b"before", b"in the new partition"]
    assert index.at.get(2) == 1

    def trailed() -> list[bytes | None]:
        return [m.value for m in trailing.fetch({}).get(2, [])]

    assert within(30, lambda: trailed() == [b"in the new partition"])
    follower.close()
    trailing.close()


class WritesAfterAsking:
    """A real consumer on which ``offsets_for_times`` is followed by ``writes`` landing
    on the broker before the caller's next request (the scorer's first predictions
    arriving while a learner starts)."""

    def __init__(self, consumer: Consumer, writes: Any) -> None:
        self.consumer, self.writes = consumer, writes

    def offsets_for_times(self, *args: Any, **kwargs: Any) -> Any:
        answer = self.consumer.offsets_for_times(*args, **kwargs)
        self.writes()
        return answer

    def get_watermark_offsets(self, *args: Any, **kwargs: Any) -> Any:
        return self.consumer.get_watermark_offsets(*args, **kwargs)


def test_a_reader_started_as_messages_arrive_on_an_empty_partition_skips_none(
    stack: Endpoints,
) -> None:
    topic = f"since-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], 2)
    writer = producer(stack.kafka_bootstrap)
    produce_all(writer, [(topic, b"k", b"old")])  # a partition that has a message
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": "since"})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    full = next(
        p
        for p in meta.partitions
        if consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
    )
    empty = next(p for p in meta.partitions if p != full)

    def arrive() -> None:
        for p in (full, empty):
            writer.produce(topic, value=b"new", partition=p)
        writer.flush(10)

    # asked for what is younger than now: nothing, until the two messages land
    reader: Any = WritesAfterAsking(consumer, arrive)
    starts = offsets_since(reader, topic, [full, empty], 0)
    # both are read from: the new messages are not skipped
    assert starts == {full: 1, empty: 0}
    consumer.close()


def test_the_predictions_topic_keeps_records_past_the_label_horizon_or_the_learner_says_so(
    stack: Endpoints, spec: PipelineSpec, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    day = 24 * 3600.0
    settings = Settings(label_horizon_s=30 * day, scored_dir=tmp_path / "scored")
    created = ensure_pipeline_topics(stack.kafka_bootstrap, spec, settings)
    assert spec.topics.predictions in created
    keep_ms, keep_bytes = topic_retention(stack.kafka_bootstrap, spec.topics.predictions)
    assert (keep_ms, keep_bytes) == (int(30 * day * 1000), -1)  # the horizon, not Kafka's week
    assert retention_problem(stack.kafka_bootstrap, spec.topics.predictions, 30 * day) is None
    # a topic its operator created with less: left as it is, and named at the learner's start
    short = spec.model_copy(update={"name": f"{spec.name}-short"})  # topics of its own
    ensure_topics(
        stack.kafka_bootstrap, [short.topics.predictions], 1,
        configs={short.topics.predictions: {"retention.ms": str(3_600_000)}},
    )  # fmt: skip
    ensure_pipeline_topics(stack.kafka_bootstrap, short, settings)
    assert topic_retention(stack.kafka_bootstrap, short.topics.predictions)[0] == 3_600_000
    with caplog.at_level(logging.WARNING, logger="riverflow.kafka_runtime"):
        scored_index(short, settings, stack).close()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"topic {short.topics.predictions} keeps records 1 h" in warned
    assert "RIVERFLOW_LABEL_HORIZON_S" in warned and "raise the topic's retention" in warned
    # a size bound deletes by bytes whatever the age: named too
    sized = f"{spec.name}-sized"
    ensure_topics(
        stack.kafka_bootstrap, [sized], 1, configs={sized: {"retention.bytes": "1048576"}}
    )
    problem = retention_problem(stack.kafka_bootstrap, sized, day)
    assert problem is not None and "retention.bytes" in problem
