"""Labels by timeout on the real broker and Redis: every scored event is labelled once,
by its label message or by the timeout, across a learner killed mid-way; a label
message after its event's default is counted and never learned."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import redis
import yaml

from riverflow.assembly import signing_key
from riverflow.models.registry import RedisRegistry
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec
from riverflow.streams.contracts import Evaluation
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.streams.trailing import TrailingReader
from riverflow.tools.generator import FraudStreamConfig, transactions
from riverflow.tools.stack import Endpoints

from .conftest import StageFactory, StageProcess, collect

N, LABELLED_EVERY, LATE = 2000, 10, 100  # 3 in 10 labelled by a message: i % 10 < 3


def wait_for(learner: StageProcess, name: str, value: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := status(learner, name)) < value:
        assert time.monotonic() < deadline, f"learner {name} = {got}, not {value}"
        time.sleep(0.2)


def status(learner: StageProcess, name: str) -> float:
    try:
        return learner.metric("riverflow_stage_status", stage="learner", name=name)
    except (AssertionError, OSError):  # not reported yet, or not serving yet
        return -1.0


def timeout_spec(stack: Endpoints, spec_file: Path) -> PipelineSpec:
    """The test's spec with a label by timeout (false after 2 s), its topics made with
    two partitions each."""
    data = yaml.safe_load(spec_file.read_text())
    data["label"].update(default=False, after="2s")
    spec_file.write_text(yaml.safe_dump(data))
    spec = load_spec(spec_file)
    ensure_topics(stack.kafka_bootstrap, spec.topics.all(), 2)
    return spec


def test_each_event_is_labelled_once_by_message_or_by_timeout_across_a_kill(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory
) -> None:
    spec = timeout_spec(stack, spec_file)
    topics, kafka = spec.topics, stack.kafka_bootstrap
    run = {"partitions": 2, "label_wait_s": 30, "snapshot_every_labels": 150,
           "snapshot_every_s": 3600, "scorer_progress_poll_s": 0.5}  # fmt: skip
    learner = start_stage("learner", **run)
    start_stage("scorer", **run)

    events = [e for e, _ in transactions(N, FraudStreamConfig(seed=15))]
    ids = [e["event_id"] for e in events]
    labelled = {e for i, e in enumerate(ids) if i % LABELLED_EVERY < 3}
    out = producer(kafka)
    # the label messages first: each waits for its event, so it is claimed as soon as
    # its event is indexed, well within the 2 s window
    produce_all(out, [(topics.labels, e.encode(), orjson.dumps({"event_id": e, "is_fraud": True}))
                      for e in ids if e in labelled])  # fmt: skip
    wait_for(learner, "labels_waiting", len(labelled))

    def send(chunk: list[dict[str, object]]) -> None:
        produce_all(out, [(topics.events, e["card_id"].encode(), orjson.dumps(e))  # type: ignore[union-attr]
                          for e in chunk])  # fmt: skip

    half = N // 2
    for start in range(0, half, 250):  # a stream over ~2 s: defaults fall due meanwhile
        send(events[start : start + 250])
        time.sleep(0.5)
    wait_for(learner, "labels_defaulted", 300)
    learner.proc.send_signal(signal.SIGKILL)  # mid-way: some defaults past its checkpoint
    assert learner.proc.wait(10) == -signal.SIGKILL
    registry = RedisRegistry(redis.Redis.from_url(stack.redis_url), spec.name,
                             signing_key(Settings()))  # fmt: skip
    killed_at = registry.checkpoint()
    assert killed_at is not None and killed_at.timeouts

    learner = start_stage("learner", **run)
    send(events[half:])
    wait_for(learner, "labels_learned", N, timeout_s=90)
    evaluations = [Evaluation.decode(m.value())
                   for m in collect(kafka, topics.evaluations, N, settle_s=2)]  # fmt: skip

    by_event: defaultdict[str, list[Evaluation]] = defaultdict(list)
    for e in evaluations:
        by_event[e.event_id].append(e)
    assert set(by_event) == set(ids)
    for event_id, copies in by_event.items():
        # the label is the message's where one came, else the default
        assert {(e.defaulted, e.label) for e in copies} == (
            {(False, True)} if event_id in labelled else {(True, False)}
        )
    # an evaluation is written again only by the killed run, after its checkpoint
    again = [c for c in by_event.values() if len(c) > 1]
    assert all(min(e.labels_seen for e in c) > killed_at.labels_seen for c in again)
    assert all(
        e.label_at is not None and e.label_at.topic == topics.predictions
        for e in evaluations if e.defaulted
    )  # fmt: skip

    # label messages after their event's default: counted, never learned
    late = [e for e in ids if e not in labelled][:LATE]
    produce_all(out, [(topics.labels, e.encode(), orjson.dumps({"event_id": e, "is_fraud": True}))
                      for e in late])  # fmt: skip
    wait_for(learner, "labels_after_default", LATE)
    assert status(learner, "labels_learned") == N  # the models hold each event once
    assert status(learner, "labels_orphaned") == 0
    assert collect(kafka, topics.dlq, 1, timeout_s=2, settle_s=0) == []
    learner.proc.send_signal(signal.SIGTERM)
    assert learner.proc.wait(30) == 0
    saved = registry.checkpoint()
    assert saved is not None and saved.labels_seen == N
    assert len(collect(kafka, topics.evaluations, N, timeout_s=10, settle_s=1)) == len(evaluations)


def test_labels_waiting_in_the_topic_beat_their_timeouts_after_a_learner_outage(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory
) -> None:
    """A learner that was down for longer than ``after`` (every timeout is due when it
    comes back, and its labels wait in the topic, many batches of them) reads those
    labels before it defaults their events: each event labelled within ``after`` is
    learned with its label, and no label is lost to a default."""
    spec = timeout_spec(stack, spec_file)
    topics, kafka = spec.topics, stack.kafka_bootstrap
    run = {"partitions": 2, "label_wait_s": 30, "batch_size": 100, "snapshot_every_s": 3600,
           "scorer_progress_poll_s": 0.5}  # fmt: skip
    start_stage("scorer", **run)
    n = 1_500
    events = [e for e, _ in transactions(n, FraudStreamConfig(seed=21))]
    ids = [e["event_id"] for e in events]
    out = producer(kafka)
    produce_all(out, [(topics.events, e["card_id"].encode(), orjson.dumps(e)) for e in events])
    assert len(collect(kafka, topics.predictions, n, settle_s=0)) == n
    labelled = set(ids[::2])  # at once: well within `after` of their predictions
    produce_all(out, [(topics.labels, e.encode(), orjson.dumps({"event_id": e, "is_fraud": True}))
                      for e in ids if e in labelled])  # fmt: skip
    time.sleep(3)  # the learner is down while every timeout falls due

    learner = start_stage("learner", **run)
    wait_for(learner, "labels_learned", n, timeout_s=90)
    evaluations = [Evaluation.decode(m.value())
                   for m in collect(kafka, topics.evaluations, n, settle_s=1)]  # fmt: skip
    assert Counter(e.event_id for e in evaluations) == dict.fromkeys(ids, 1)
    assert {e.event_id for e in evaluations if not e.defaulted} == labelled
    assert all(e.label is (e.event_id in labelled) for e in evaluations)
    assert status(learner, "labels_after_default") == 0
    assert status(learner, "labels_defaulted") == n - len(labelled)


def test_a_trailing_reader_gives_each_record_once_in_order_with_small_buffers(
    stack: Endpoints,
) -> None:
    topic = f"trail-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], 2)
    produce_all(producer(stack.kafka_bootstrap),
                [(topic, str(i).encode(), str(i).encode()) for i in range(400)])  # fmt: skip
    reader = TrailingReader(stack.kafka_bootstrap, topic, since_s=3600, buffered=16)
    positions = reader.start({})
    seen: Counter[tuple[int, int]] = Counter()
    deadline = time.monotonic() + 30
    while sum(seen.values()) < 400:
        assert time.monotonic() < deadline, f"read {sum(seen.values())} of 400"
        for p, run in reader.fetch(positions).items():
            taken = list(run)[:5]  # the caller moves on slower than the reader reads
            assert [m.offset for m in taken] == list(range(positions[p], positions[p] + len(taken)))
            seen.update((p, m.offset) for m in taken)
            if taken:
                positions[p] = taken[-1].offset + 1
        assert all(len(run) <= 16 + 1000 for run in reader.fetch(positions).values())
    assert set(seen.values()) == {1} and len(seen) == 400
    # a new reader from saved positions goes on from there
    reader.close()
    again = TrailingReader(stack.kafka_bootstrap, topic, since_s=3600)
    assert again.start({0: 0, 1: 0}) == {0: 0, 1: 0}
    deadline = time.monotonic() + 10
    while sum(len(r) for r in again.fetch({0: 0, 1: 0}).values()) < 400:
        assert time.monotonic() < deadline
    again.close()


def test_clicks_held_until_their_timeout_are_learned_once_across_a_kill(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory
) -> None:
    """``learn: at_timeout``: label messages held until their event's timeout, the
    learner SIGKILLed while some are held: each event is learned once, a labelled
    one as its label message says, never by its default."""
    data = yaml.safe_load(spec_file.read_text())
    data["label"].update(default=False, after="3s", learn="at_timeout")
    spec_file.write_text(yaml.safe_dump(data))
    spec = load_spec(spec_file)
    topics, kafka = spec.topics, stack.kafka_bootstrap
    ensure_topics(kafka, topics.all(), 2)
    run = {"partitions": 2, "label_wait_s": 30, "snapshot_every_labels": 100,
           "snapshot_every_s": 3600, "scorer_progress_poll_s": 0.5}  # fmt: skip
    learner = start_stage("learner", **run)
    start_stage("scorer", **run)
    n = 1000
    events = [e for e, _ in transactions(n, FraudStreamConfig(seed=16))]
    ids = [e["event_id"] for e in events]
    labelled = {e for i, e in enumerate(ids) if i % LABELLED_EVERY < 3}
    out = producer(kafka)

    def send(chunk: list[dict[str, object]]) -> None:
        produce_all(out, [(topics.events, e["card_id"].encode(), orjson.dumps(e))  # type: ignore[union-attr]
                          for e in chunk])  # fmt: skip
        produce_all(out, [(topics.labels, str(e["event_id"]).encode(),
                           orjson.dumps({"event_id": e["event_id"], "is_fraud": True}))
                          for e in chunk if e["event_id"] in labelled])  # fmt: skip

    send(events[: n // 2])
    wait_for(learner, "labels_learned", n // 2)  # the first half, at its timeouts
    second = {e for e in ids[n // 2 :] if e in labelled}
    send(events[n // 2 :])
    wait_for(learner, "labels_held", len(second))  # clicks in, their timeouts not yet
    learner.proc.send_signal(signal.SIGKILL)
    assert learner.proc.wait(10) == -signal.SIGKILL

    learner = start_stage("learner", **run)
    wait_for(learner, "labels_learned", n, timeout_s=60)
    evaluations = [Evaluation.decode(m.value())
                   for m in collect(kafka, topics.evaluations, n, settle_s=2)]  # fmt: skip
    by_event: defaultdict[str, set[tuple[bool, object]]] = defaultdict(set)
    for e in evaluations:
        by_event[e.event_id].add((e.defaulted, e.label))
    assert set(by_event) == set(ids)
    for event_id, seen in by_event.items():
        assert seen == ({(False, True)} if event_id in labelled else {(True, False)})
    assert status(learner, "labels_held") == 0
    assert status(learner, "labels_after_default") == 0
    learner.proc.send_signal(signal.SIGTERM)
    assert learner.proc.wait(30) == 0
    registry = RedisRegistry(redis.Redis.from_url(stack.redis_url), spec.name,
                             signing_key(Settings()))  # fmt: skip
    saved = registry.checkpoint()
    assert saved is not None and saved.labels_seen == n  # the models hold each event once
