"""Redis and the Kafka broker restarted (and Redis stalled, the broker frozen, and the
topics given more partitions) under a paced stream, on a stack of the module's own (the
session's shared stack is never stopped).

Scorer, learner and monitor run as processes while events flow at 250/s with
their labels 400 events behind. A server is stopped (SIGTERM, and SIGKILL as a
crash) and started again on its port and directory, as an operator's restart
does. Nothing may be lost: the stages wait the outage out, every event is
predicted, every label is learned, and (Redis) the registry's versions, champion
pointer and the learner's checkpoint survive, no version number naming a second
model. The broker restart runs with the scorer at least once and exactly once.

Run with ``-s`` to see the seconds (they are in the failure message too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewPartitions

from riverflow.models.registry import ChampionPointer, RedisRegistry
from riverflow.spec import PipelineSpec
from riverflow.streams.kafka_io import (
    METADATA_REFRESH_S,
    ReadProgress,
    ensure_topics,
    groupless_reader,
    produce_all,
    producer,
    read_topic,
)
from riverflow.tools.generator import history, stream_for
from tests.integration.chaos import (
    SIGNING_KEY,
    Outage,
    PacedStream,
    PredictionAudit,
    PrivateStack,
    TopicTail,
    by_event,
    dead,
    label_audit,
    resumed,
    stop_cleanly,
    tails,
    wait_drained,
    where_lost,
)
from tests.integration.conftest import StageFactory, StageProcess

RATE = 250  # events/s
LABEL_DELAY = 400  # events between an event and its label
STREAM_ON_S = 6.0  # the stream flows on this long after the server is back


@dataclass
class RegistryState:
    """What the registry holds at one moment."""

    pointer: ChampionPointer | None
    history: list[tuple[str, str, int]]  # (kind, model, version) of each pointer move
    versions: dict[tuple[str, int], dict[str, Any]]  # (model, version) -> its metadata
    labels_seen: int | None  # the learner checkpoint's

    @classmethod
    def read(cls, redis_url: str, namespace: str) -> RegistryState:
        registry = RedisRegistry(redis.Redis.from_url(redis_url), namespace, SIGNING_KEY)
        deadline = time.monotonic() + 10
        while True:
            try:
                saved = registry.checkpoint()
                return cls(
                    registry.champion(),
                    [(m.kind, m.to.model, m.to.version) for m in registry.history()],
                    {(n, v): registry.meta(n, v) for n in registry.names()
                     for v in registry.versions(n)},
                    None if saved is None else saved.labels_seen,
                )  # fmt: skip
            except redis.exceptions.BusyLoadingError:  # a restarted Redis reading its AOF
                assert time.monotonic() < deadline, "Redis still loading its data after 10 s"
                time.sleep(0.1)


def survived(before: RegistryState, after: RegistryState, when: str, every: bool) -> list[str]:
    """What of ``before`` is missing or changed in ``after``: the pointer and its
    history, the learner's checkpoint, the versions (``every`` one, else those that
    served as champion: the others may be pruned by retention), no version number
    going back or naming another model."""
    out = []
    last = after.history[-1][1:] if after.history else None
    if after.pointer is None:
        out.append(f"{when}: no champion pointer (it was {before.pointer})")
    elif last != (after.pointer.model, after.pointer.version):
        out.append(f"{when}: the pointer {after.pointer} is not its last move {last}")
    if after.history[: len(before.history)] != before.history:
        out.append(f"{when}: pointer history {before.history} became {after.history}")
    champions = {(model, version) for _, model, version in before.history}
    for (name, version), meta in before.versions.items():
        now = after.versions.get((name, version))
        if now is None and (every or (name, version) in champions):
            out.append(f"{when}: {name} v{version} is gone")
        elif now is not None and now != meta:
            out.append(
                f"{when}: {name} v{version} now names another model (labels_seen "
                f"{meta.get('labels_seen')} -> {now.get('labels_seen')})"
            )
    for name in sorted({n for n, _ in before.versions}):
        newest = max(v for n, v in before.versions if n == name)
        newest_now = max((v for n, v in after.versions if n == name), default=0)
        if newest_now < newest:
            out.append(f"{when}: {name}'s newest version went from v{newest} to v{newest_now}")
    if after.labels_seen is None or (before.labels_seen or 0) > after.labels_seen:
        out.append(f"{when}: learner checkpoint at {before.labels_seen} labels became "
                   f"{after.labels_seen}")  # fmt: skip
    return out


class HealthWatch:
    """Polls a stage's /healthz in a thread: what it answered, and when."""

    def __init__(self, stage: StageProcess, every_s: float = 0.25) -> None:
        self.stage, self.every_s = stage, every_s
        self.answers: list[tuple[float, int, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                status, body = self.stage.get("/healthz")
            except OSError as exc:  # the metrics server itself must keep answering
                status, body = 0, str(exc)
            self.answers.append((time.time(), status, body.strip()))

    def stop(self) -> list[tuple[float, int, str]]:
        self._done.set()
        self._thread.join(5)
        return self.answers


def health_through(outage: Outage, answers: list[tuple[float, int, str]], server: str) -> list[str]:
    """What is wrong with the scorer's /healthz answers around ``outage``: it must
    say degraded, naming ``server``, while the server is down, and answer ok again
    once it is back and the stream flows."""
    during = [(s, b) for t, s, b in answers if outage.stopped_at <= t <= outage.up_at]
    later = [(s, b) for t, s, b in answers if t > outage.up_at + STREAM_ON_S - 1]
    out = []
    if not any(s == 503 and b.startswith(f"degraded: {server}") for s, b in during):
        out.append(f"/healthz never said degraded ({server}) while it was down: {during[-5:]}")
    if any(s == 0 for s, _ in during + later):
        out.append(f"/healthz did not answer: {[b for s, b in during + later if s == 0][:2]}")
    if not later or later[-1] != (200, "ok"):
        out.append(f"/healthz not ok once {server} was back: {later[-3:]}")
    return out


@dataclass
class Run:
    """Stages on the private stack, the stream and the tails of what they write."""

    servers: PrivateStack
    spec: PipelineSpec
    stages: dict[str, StageProcess]
    stream: PacedStream
    tails: tuple[TopicTail[Any], TopicTail[Any], TopicTail[Any]]
    guarantee: str = "at_least_once"

    @classmethod
    def start(
        cls, servers: PrivateStack, spec: PipelineSpec, start: StageFactory,
        host: str = "confluent", guarantee: str = "at_least_once",
    ) -> Run:  # fmt: skip
        ensure_topics(servers.kafka_bootstrap, spec.topics.all(), partitions=3)
        seen = tails(servers.kafka_bootstrap, spec.topics)
        scorer = {"partitions": 3, "instance_id": "scorer-1", "host": host,
                  "processing_guarantee": guarantee}  # fmt: skip
        stages = {
            "scorer": start("scorer", **scorer),
            "learner": start("learner", partitions=3),
            "monitor": start("monitor", partitions=3),
        }
        stream = PacedStream(servers.kafka_bootstrap, spec.topics, RATE, LABEL_DELAY).start()
        run = cls(servers, spec, stages, stream, seen, guarantee)
        predictions, evaluations, _ = seen
        assert predictions.first(lambda s: True, 60), f"never scored; {dead(stages)}"
        assert evaluations.first(lambda s: True, 60), f"never learned; {dead(stages)}"
        return run

    def finish(self) -> tuple[list[str], list[str]]:
        """Stop the stream, drain, stop the stages cleanly; (failures, report lines)."""
        self.stream.finish()
        predictions, evaluations, letters = self.tails
        events, labels, stages = self.stream.events, self.stream.labels, self.stages
        wait_drained(self.tails, stages, events, labels, (60, 45))
        failures = dead(stages)
        failures += stop_cleanly(*stages.values())
        audit = PredictionAudit(events, by_event(predictions.close(1.0)))
        labelled = label_audit(
            self.servers.kafka_bootstrap, self.servers.redis_url, self.spec.name, labels,
            audit.predictions, evaluations.close(0.0), letters.close(0.0),
        )  # fmt: skip
        if audit.lost:
            failures.append(f"{len(audit.lost)} events never predicted, e.g. {audit.lost[:3]}")
            failures.append(where_lost(self.servers.kafka_bootstrap, self.spec.topics, audit.lost,
                                       self.stages["scorer"].log.parent))  # fmt: skip
        if self.guarantee == "exactly_once" and audit.extras:  # (read_committed)
            failures.append(f"{len(audit.extras)} extra predictions under exactly once")
        bad = audit.bad_replays
        if bad:
            failures.append(f"{len(bad)} extra predictions are not consistent replays: {bad[:3]}")
        failures += labelled.failures()
        others = [s.record for s in letters.seen if s.record.error_kind != "orphan_label"]
        if others:  # a server that is down is not a bad message
            failures.append(f"{len(others)} DLQ records of no bad input: {others[:2]}")
        failures += predictions.errors + evaluations.errors + letters.errors
        lines = [
            f"{len(events)} events at {RATE}/s, {len(audit.predictions)} predicted, lost "
            f"{len(audit.lost)}, {len(audit.extras)} extra predictions",
            labelled.summary(),
            f"DLQ: {len(letters.seen)} records "
            f"{sorted({(s.record.stage, s.record.error_kind) for s in letters.seen})}",
        ]
        return failures, lines

    def through(
        self,
        server: str,
        restart: Callable[[], Outage],
        just_after: Callable[[], list[str]] = list,
        streamed_on: Callable[[], list[str]] = list,
    ) -> tuple[Outage, float | None, list[str], list[str]]:
        """Restart a server mid-stream, stream on, then drain and stop: the outage,
        the seconds from its end to predictions flowing again, (failures, report lines).
        The scorer's /healthz says degraded (naming ``server``) while it is down.
        ``just_after`` checks right after the restart, ``streamed_on`` once the stream
        has flowed on ``STREAM_ON_S`` (both return failures)."""
        failures = []
        health = HealthWatch(self.stages["scorer"])
        try:
            since_index = len(self.tails[0].seen)
            outage = restart()
            failures += just_after()
            flowing = self.flowing_again(outage.up_at, since_index)
            if flowing is None:  # where the scorer waits, for the report
                failures.append(f"the scorer's threads:\n{self.stages['scorer'].stacks()}")
            time.sleep(STREAM_ON_S)
            failures += [f"after the outage: {d}" for d in dead(self.stages)]
            failures += streamed_on()
        except BaseException:
            self.stream.abort()
            raise
        finally:
            answers = health.stop()
        failures += health_through(outage, answers, server)
        drained, lines = self.finish()
        return outage, flowing, failures + drained, lines

    def flowing_again(self, since: float, since_index: int) -> float | None:
        """Seconds from ``since`` to the first prediction of an event produced after it."""
        predictions = self.tails[0]
        first = resumed(
            predictions, self.stream.events, since, 60, since_index, self.stages["scorer"]
        )
        return None if first is None else first.at - since


@pytest.mark.parametrize(
    ("guarantee", "kill"),
    [("at_least_once", False), ("at_least_once", True), ("exactly_once", False)],
    ids=["sigterm", "sigkill", "exactly-once"],
)
def test_a_redis_restart_mid_stream_loses_nothing(
    private_stack: PrivateStack, spec: PipelineSpec, start_private_stage: StageFactory,
    guarantee: str, kill: bool,
) -> None:  # fmt: skip
    """``kill``: Redis SIGKILLed, as a crash: with ``appendfsync everysec`` it loses what
    it took in its last second or two. The scorer's next commit of an entity written
    then is refused (the version Redis holds is behind the scorer's), so the batch is
    computed from what Redis kept; the learner joins labels from its own index. No
    event may go unpredicted, no replay differ, no label go unlearned, and what was in
    the registry two seconds before the kill must be there after it. Exactly once, the
    scorer commits its transaction before it waits Redis out (the broker would abort
    it meanwhile): a read_committed reader sees one prediction per event."""
    run = Run.start(private_stack, spec, start_private_stage, guarantee=guarantee)
    url = private_stack.redis_url
    try:
        deadline = time.monotonic() + 60  # until the learner has published and committed
        while (before := RegistryState.read(url, spec.name)).labels_seen is None:
            assert time.monotonic() < deadline, f"nothing published; {dead(run.stages)}"
            time.sleep(0.5)
        assert before.pointer is not None
        if kill:  # what ``before`` read is on disk (fsynced every second) before the kill
            time.sleep(2.5)
    except BaseException:
        run.stream.abort()
        raise
    batches: dict[str, float] = {}

    def feature_batches() -> list[str]:
        """Where the scorer computed its batches: a commit refused after the restart
        means Redis lost an entity write the scorer had been told was done."""
        scorer = run.stages["scorer"]
        for kind in ("in_process", "server", "refused"):
            batches[kind] = scorer.metric(
                "riverflow_stage_status", stage="scorer", name=f"feature_batches_{kind}"
            )
        return []

    outage, flowing, failures, lines = run.through(
        "Redis", lambda: private_stack.restart_redis(down_s=3.0, kill=kill),
        lambda: survived(before, RegistryState.read(url, spec.name), "just after the restart",
                         every=True),
        feature_batches,
    )  # fmt: skip
    failures += survived(before, RegistryState.read(url, spec.name), "at the end", every=False)
    if flowing is None:
        failures.append("no prediction of an event produced after Redis was back")
    report = "\n".join(
        [f"{outage}; predictions flowing {flowing and round(flowing, 1)} s after it was up",
         f"registry before: pointer {before.pointer}, {len(before.versions)} versions, "
         f"checkpoint at {before.labels_seen} labels",
         f"the scorer's feature batches, {STREAM_ON_S:g} s after: {batches}", *lines]
    )  # fmt: skip
    print(f"\n{report}")
    assert not failures, "\n".join(failures) + "\n\n" + report


def test_partitions_added_mid_stream_are_scored_and_their_labels_learned(
    private_stack: PrivateStack, spec: PipelineSpec, start_private_stage: StageFactory
) -> None:
    """``kafka-topics.sh --alter --partitions 5`` on the events, labels and predictions
    topics mid-stream (3 before), the stages running on. The scorers' group took the
    new events partitions only at its metadata refresh (librdkafka's default: every 5
    minutes; a static member restarted meanwhile got its old assignment back), and the
    learner never: its readers of the labels and of the predictions assigned themselves
    the partitions there were at its start, so the labels on the new partitions were
    never read, and those of events predicted there went to the DLQ as orphans. Every
    event is predicted and every label learned, some of them on the new partitions."""
    bootstrap, topics = private_stack.kafka_bootstrap, spec.topics
    run = Run.start(private_stack, spec, start_private_stage)
    failures: list[str] = []
    altered = [topics.events, topics.labels, topics.predictions]
    try:
        time.sleep(4.0)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin.create_partitions([NewPartitions(t, 5) for t in altered]).values():
            future.result(timeout=30)
        time.sleep(2 * METADATA_REFRESH_S + 5.0)  # (the stream's producer refreshes too)
        failures += dead(run.stages)
    except BaseException:
        run.stream.abort()
        raise
    drained, lines = run.finish()
    on_new = {t: sum(1 for m in read_topic(bootstrap, t) if m.partition() >= 3) for t in altered}
    if not all(on_new.values()):
        failures.append(f"records on the new partitions: {on_new} (none: nothing tested)")
    report = "\n".join([f"records on the new partitions: {on_new}", *lines])
    print(f"\n{report}")
    assert not failures + drained, "\n".join(failures + drained) + "\n\n" + report


def test_an_exactly_once_scorer_goes_on_through_redis_stalls_longer_than_its_transactions(
    private_stack: PrivateStack, spec: PipelineSpec, start_private_stage: StageFactory
) -> None:
    """Redis paused (``CLIENT PAUSE``, as a manual failover or a stalled disk does: no
    error, every command waits) 6 s, three times in half a minute, longer than the
    exactly-once scorer's transaction timeout (5 s). Its transaction stayed open under
    the stalled batch; the broker aborted it and fenced the producer, and the third time
    the scorer stopped, blaming another process with its transactional.id. It goes on:
    no producer renewed, no event lost, one prediction per event read committed."""
    run = Run.start(private_stack, spec, start_private_stage, guarantee="exactly_once")
    client = redis.Redis.from_url(private_stack.redis_url)
    failures: list[str] = []
    try:
        for _ in range(3):
            time.sleep(4.0)
            client.execute_command("CLIENT", "PAUSE", 6000, "ALL")
            time.sleep(7.0)
        failures += [f"after the stalls: {d}" for d in dead(run.stages)]
    except BaseException:
        run.stream.abort()
        raise
    drained, lines = run.finish()
    log = run.stages["scorer"].log.read_text(errors="replace")
    renewed = [line for line in log.splitlines() if "the transaction could not be ended" in line]
    if renewed:
        failures.append(f"the scorer's producer was fenced and renewed: {renewed[:2]}")
    report = "\n".join(lines)
    print(f"\n{report}")
    assert not failures + drained, "\n".join(failures + drained) + "\n\n" + report


FREEZE_S = 20.0  # the broker stopped (SIGSTOP) this long
# every stage reads again within this long of the frozen broker's return (it was ~28 s)
READS_AGAIN_S = 15.0


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_every_stage_reads_again_soon_after_the_broker_was_frozen(
    private_stack: PrivateStack, spec: PipelineSpec, start_private_stage: StageFactory,
    guarantee: str,
) -> None:  # fmt: skip
    """The broker stopped 20 s (SIGSTOP: a long GC or VM pause, the process kept) and
    resumed. For a moment after it resumed the metadata listed no broker, so librdkafka
    dropped it, and a client that had dropped its bootstrap broker before had none
    left until its re-bootstrap (5 minutes by default). In about half the runs one
    stage's consumer (the monitor's; once the scorer's: 24.8 s without a read) was
    deaf 17 s, until the host replaced it, and then 10 s more while the host waited
    for the old one's close, which never ended. Each stage reads again within
    ``READS_AGAIN_S`` of the broker's return, and nothing is lost (exactly once: the
    scorer's transactional producer too, one prediction per event read committed)."""
    run = Run.start(private_stack, spec, start_private_stage, guarantee=guarantee)
    assert private_stack.kafka is not None
    broker = private_stack.kafka.found().pid
    failures: list[str] = []
    try:
        time.sleep(3.0)
        os.kill(broker, signal.SIGSTOP)
        try:
            time.sleep(FREEZE_S)
        finally:
            os.kill(broker, signal.SIGCONT)
        back = time.monotonic()
        at_return = {name: stage.consumed() for name, stage in run.stages.items()}
        reads: dict[str, float] = {}
        while len(reads) < len(run.stages) and time.monotonic() - back < 3 * READS_AGAIN_S:
            for name, stage in run.stages.items():
                if name not in reads and stage.consumed() > at_return[name]:
                    reads[name] = time.monotonic() - back
            time.sleep(0.1)
        for name in run.stages:
            took = reads.get(name)
            if took is None or took > READS_AGAIN_S:
                seconds = "over 45" if took is None else f"{took:.1f}"
                failures.append(f"the {name} read nothing for {seconds} s after the broker "
                                "was back")  # fmt: skip
        failures += [f"after the freeze: {d}" for d in dead(run.stages)]
    except BaseException:
        run.stream.abort()
        raise
    drained, lines = run.finish()
    report = "\n".join([f"reading again, seconds after the broker's return: {reads}", *lines])
    print(f"\n{report}")
    assert not failures + drained, "\n".join(failures + drained) + "\n\n" + report


@pytest.mark.parametrize(
    ("guarantee", "kill"),
    [("at_least_once", False), ("exactly_once", False), ("at_least_once", True)],
    ids=["at-least-once", "exactly-once", "at-least-once-sigkill"],
)
def test_a_broker_restart_mid_stream_loses_nothing(
    private_stack: PrivateStack, spec: PipelineSpec, start_private_stage: StageFactory,
    guarantee: str, kill: bool,
) -> None:  # fmt: skip
    """Exactly once, the scorer's transaction can neither commit nor abort while the
    broker is away (it stopped so, before a new producer took over). ``kill``: the
    broker SIGKILLed, no clean shutdown (its partitions' leaders never handed over,
    its logs recovered when it starts)."""
    run = Run.start(private_stack, spec, start_private_stage, guarantee=guarantee)
    time.sleep(2.0)
    # held down 3 s past its stop, as the Redis restart is: a broker that is back within
    # a second or two (an idle machine) can come and go between the stage's checks
    outage, flowing, failures, lines = run.through(
        "Kafka", lambda: private_stack.restart_kafka(down_s=3.0, kill=kill)
    )
    if flowing is None:
        failures.append("no prediction of an event produced after the broker was back")
    resumed_after_stop = None if flowing is None else outage.up_at + flowing - outage.stopping_at
    report = "\n".join(
        [f"{outage}; predictions flowing {flowing and round(flowing, 1)} s after it was up, "
         f"{resumed_after_stop and round(resumed_after_stop, 1)} s after the stop began",
         *lines]
    )  # fmt: skip
    print(f"\n{report}")
    assert not failures, "\n".join(failures) + "\n\n" + report


def test_labels_a_producer_held_through_a_broker_outage_are_read_before_progress_passes_them(
    private_stack: PrivateStack,
) -> None:
    """The learner's label timeouts fall due only before ``ReadProgress``'s time, which
    promises that every label produced before it has been read. A click made while
    the broker is down waits in its producer until that producer reconnects, which
    librdkafka does after a backoff (here 2-4 s; by default up to 10 s): the
    watermarks read the moment the broker is back do not hold it yet. Progress must
    not pass the click's time until the click is read (else its timeout would label
    it a negative), and it must move on after the settle."""
    bootstrap, topic = private_stack.kafka_bootstrap, f"labels-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic], 2)
    reader, partitions = groupless_reader(bootstrap, topic, "read-progress-test")
    reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    positions: dict[int, int] = {}
    values: set[bytes] = set()

    def read() -> None:
        for msg in reader.consume(100, timeout=0.05):
            if msg.error() is None:
                positions[msg.partition()] = msg.offset() + 1
                values.add(msg.value())

    progress = ReadProgress(bootstrap, topic, lambda: positions, poll_s=0.1, settle_s=8.0)
    user = producer(bootstrap, **{"reconnect.backoff.ms": 2000, "reconnect.backoff.max.ms": 4000})
    produce_all(user, [(topic, b"u1", b"before")])
    deadline = time.monotonic() + 30
    while progress() is None and time.monotonic() < deadline:
        read()
    assert progress() is not None, "progress never confirmed a time before the outage"

    assert private_stack.kafka is not None
    private_stack.kafka.stop()
    held_at = time.time()
    user.produce(topic, key=b"u1", value=b"held")  # held by the producer: no broker
    # the learner asks every tick, so an outage longer than a tick finds it asking
    # (and a call then fails: up to 5 s for the metadata it never gets)
    progress()
    private_stack.start()
    back_at = time.time()
    passed_unread: list[float] = []
    moved_on = None
    deadline = time.monotonic() + 40
    while moved_on is None and time.monotonic() < deadline:
        user.poll(0)
        read()
        through = progress()
        if through is not None and through > held_at:
            if b"held" in values:
                moved_on = through
            else:
                passed_unread.append(through - held_at)
    reader.close()
    progress.close()
    assert user.flush(10) == 0
    assert not passed_unread, (
        f"progress passed the held click's time by {passed_unread[0]:.1f} s before it was read"
    )
    assert moved_on is not None, "progress never passed the outage"
    assert moved_on - back_at < 30, moved_on - back_at


def test_riverflow_produce_waits_out_a_broker_restart_up_to_the_outage_limit(
    private_stack: PrivateStack, spec: PipelineSpec, spec_file: Path
) -> None:
    """``riverflow produce`` with the broker stopped mid-stream for 8 s: within
    ``--acks-wait`` (default ``OUTAGE_LIMIT_S``) it delivers every message once;
    past it, it fails naming how many were not acknowledged, instead of hanging or
    exiting 0."""
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": private_stack.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": private_stack.redis_url}  # fmt: skip

    events = spec.topics.events

    def written() -> int | None:
        """How many events the topic has: 0 before it exists; None while Kafka does not
        say (just restarted, or a topic too new to have leaders the client knows)."""
        client = Consumer({"bootstrap.servers": private_stack.kafka_bootstrap,
                           "group.id": "produce-test"})  # fmt: skip
        try:
            meta = client.list_topics(events, timeout=10).topics.get(events)
            if meta is not None and meta.error is not None:
                unknown = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)
                return 0 if meta.error.code() in unknown else None
            if meta is None:
                return None
            tps = [TopicPartition(events, p) for p in meta.partitions]
            return sum(client.get_watermark_offsets(tp, timeout=10)[1] for tp in tps)
        except KafkaException:
            return None
        finally:
            client.close()

    def produce_through_an_outage(*args: str) -> subprocess.CompletedProcess[str]:
        private_stack.start()
        deadline = time.monotonic() + 60
        # (read until Kafka says: a 0 misread after the last restart would have the
        # broker stopped before this stream's first event, and no outage within it)
        while (before := written()) is None:
            assert time.monotonic() < deadline, "Kafka never said how many events there are"
            time.sleep(0.2)
        run = subprocess.Popen(
            [sys.executable, "-m", "riverflow.cli", "produce", "--spec", str(spec_file),
             "--events", "400", "--rate", "100", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while (written() or 0) <= before and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # (its topics made, its first events in: the stream flows)
        private_stack.restart_kafka(down_s=8.0)
        out, err = run.communicate(timeout=180)
        return subprocess.CompletedProcess(run.args, run.returncode, out, err)

    cut_short = produce_through_an_outage("--seed", "1", "--acks-wait", "3")
    error = [line for line in cut_short.stderr.splitlines() if line.startswith("error:")]
    assert cut_short.returncode == 2 and error, cut_short.stderr
    assert "of 800 messages not acknowledged within 3 s" in error[0], error

    waited = produce_through_an_outage("--seed", "2")  # OUTAGE_LIMIT_S: 120 s
    assert waited.returncode == 0, waited.stderr
    assert "produced 800 messages" in waited.stdout  # 400 events and their labels
    assert "messages wait for their acks" in waited.stderr
    name = stream_for(spec.label.field, None)
    sent = {rec["event_id"] for kind, rec in history(name, 400, 2) if kind == "event"}
    read = [orjson.loads(m.value())["event_id"]
            for m in read_topic(private_stack.kafka_bootstrap, spec.topics.events)]  # fmt: skip
    assert sent <= set(read)  # every event of the second run, each once
    assert all(n == 1 for e, n in Counter(read).items() if e in sent)


def scorer_members(bootstrap: str) -> dict[str, set[str]]:
    """The member ids of every consumer group whose name says scorer and that has
    members (the earlier tests' groups on this stack are empty)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    groups = [g.group_id for g in admin.list_consumer_groups().result(timeout=10).valid]
    wanted = [g for g in groups if "scorer" in g]
    described = admin.describe_consumer_groups(wanted) if wanted else {}
    members = {g: {m.member_id for m in f.result(timeout=10).members} for g, f in described.items()}
    return {g: ids for g, ids in members.items() if ids}


def test_the_faust_host_waits_out_a_redis_outage_in_its_group(
    private_stack: PrivateStack, spec: PipelineSpec, start_private_stage: StageFactory
) -> None:
    # Redis down twice the session timeout: the scorer waits it out without losing its
    # place in the group (a member whose heartbeats stopped would rejoin as a new one)
    run = Run.start(private_stack, spec, start_private_stage, host="faust")
    bootstrap = private_stack.kafka_bootstrap
    before = scorer_members(bootstrap)
    after: dict[str, set[str]] = {}

    def same_members() -> list[str]:
        after.update(scorer_members(bootstrap))
        if after != before:
            return [f"the scorer left its group in the outage: members {before} -> {after}"]
        return []

    outage, flowing, failures, lines = run.through(
        "Redis", lambda: private_stack.restart_redis(down_s=12.0), streamed_on=same_members
    )
    if flowing is None:
        failures.append("no prediction of an event produced after Redis was back")
    if len(before) != 1:
        failures.append(f"not one scorer group with members before the outage: {before}")
    report = "\n".join(
        [f"{outage}; predictions flowing {flowing and round(flowing, 1)} s after it was up",
         f"scorer group members before {before}, after the outage {after}", *lines]
    )  # fmt: skip
    print(f"\n{report}")
    assert not failures, "\n".join(failures) + "\n\n" + report
