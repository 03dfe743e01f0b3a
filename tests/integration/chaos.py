"""Chaos on the real broker and Redis: a paced stream, stages SIGKILLed and servers
restarted under it, and the topics read back to count what was lost or doubled.

Every time here is wall-clock seconds (``time.time()``): the Kafka CreateTime of a
record a stage writes is stamped by its producer on the same machine, so "seconds
from a restart to the first prediction" compares like with like.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.registry import RedisRegistry
from riverflow.settings import Settings
from riverflow.streams.contracts import DeadLetter, Evaluation, Prediction
from riverflow.streams.kafka_io import (
    DEAF_AFTER_S,
    DEAF_PROBE_S,
    STUCK_ACKS_S,
    FreshReach,
    KafkaIOError,
    Renewal,
    groupless_reader,
    producer,
    reaches_kafka,
    read_topic,
    renewed_producer,
)
from riverflow.streams.topics import Topics
from riverflow.tools.generator import FraudStreamConfig, transactions
from riverflow.tools.stack import (
    ServerProcess,
    free_port,
    start_kafka,
    start_redis,
)

T = TypeVar("T")
SIGNING_KEY = Settings().signing_key.get_secret_value().encode()


class Stage(Protocol):
    """A stage process (conftest's ``StageProcess``)."""

    @property
    def proc(self) -> subprocess.Popen[bytes]: ...

    @property
    def log(self) -> Path: ...


# -- the stream ---------------------------------------------------------------------


class PacedStream:
    """Card transactions at ``rate`` events/s, each label ``label_delay`` events behind
    its event, produced from a thread until ``finish()``; then the labels still owed,
    at the same pace. An event's ``ts`` is the wall time it is produced at, as for
    live traffic. Records when each event and label was produced."""

    def __init__(
        self, bootstrap: str, topics: Topics, rate: float, label_delay: int = 400, seed: int = 13
    ) -> None:
        self.topics = topics
        self.rate = rate
        self.label_delay = label_delay
        self.config = FraudStreamConfig(seed=seed, cards=500)
        self.events: dict[str, float] = {}  # event id -> when its event was produced
        self.labels: dict[str, float] = {}  # event id -> when its label was produced
        self.errors: list[str] = []
        self._producer = producer(bootstrap)
        # what is not acknowledged yet, by send number: (topic, key, value), and when it
        # was sent. A producer stuck after a broker restart (librdkafka #5430, which
        # the stages' own producers survive: streams.kafka_io.STUCK_ACKS_S) is replaced
        # as kafka_io.produce_all replaces one, and the new one sends these again
        self._unacked: dict[int, tuple[str, bytes | None, bytes]] = {}
        self._sent_at: dict[int, float] = {}
        self._sends = 0
        self._generation = 0
        self._reach = FreshReach()
        self.renewal = Renewal(lambda: producer(bootstrap), lambda: reaches_kafka(bootstrap))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-stream", daemon=True)

    def start(self) -> PacedStream:
        self._thread.start()
        return self

    def finish(self, timeout_s: float = 120.0) -> None:
        """Stop producing events, send the labels still owed, wait for every ack."""
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the paced stream did not finish"
        assert not self.errors, f"producing the stream failed: {self.errors[:3]}"

    def abort(self) -> None:
        """Stop producing (a test that failed half way): what is owed is sent, unchecked."""
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        owed: list[tuple[str, bool]] = []
        stream = transactions(10**9, self.config)
        started, sent = time.monotonic(), 0
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * self.rate)
            for _ in range(due - sent):
                event, fraud = next(stream)
                self.events[event["event_id"]] = now = time.time()
                event["ts"] = round(now, 3)
                self._send(self.topics.events, event["card_id"], event)
                owed.append((event["event_id"], fraud))
                if len(owed) > self.label_delay:
                    self._label(*owed.pop(0))
            sent = max(sent, due)
            self._producer.poll(0)
            self._renew_if_stuck()
            time.sleep(0.005)
        started, sent = time.monotonic(), 0
        while sent < len(owed):
            due = min(len(owed), int((time.monotonic() - started) * self.rate))
            for event_id, fraud in owed[sent:due]:
                self._label(event_id, fraud)
            sent = max(sent, due)
            self._producer.poll(0)
            self._renew_if_stuck()
            time.sleep(0.005)
        deadline = time.monotonic() + 90
        while (left := self._producer.flush(1.0)) and time.monotonic() < deadline:
            self._renew_if_stuck()
        if left:
            self.errors.append(f"{left} records undelivered after 90 s")

    def _renew_if_stuck(self) -> None:
        """Replace the producer if a record has waited STUCK_ACKS_S for its ack while a
        new client has reached Kafka for DEAF_AFTER_S (as ``kafka_io.produce_all``)."""
        if not self._sent_at:
            return
        now = time.monotonic()
        if now - next(iter(self._sent_at.values())) < STUCK_ACKS_S:
            return
        up = self._reach.reached_for(now, self.renewal.reaches, DEAF_PROBE_S)
        if up is None or up < DEAF_AFTER_S:
            return
        self._generation += 1  # first: the stuck one's reports (purged) are ignored
        self._producer = renewed_producer(self._producer, self.renewal, self._unacked, self._acked)
        self._sent_at = dict.fromkeys(self._unacked, now)
        self._reach = FreshReach()

    def _label(self, event_id: str, fraud: bool) -> None:
        self.labels[event_id] = time.time()
        self._send(self.topics.labels, event_id, {"event_id": event_id, "is_fraud": fraud})

    def _send(self, topic: str, key: str, record: dict[str, Any]) -> None:
        i, self._sends = self._sends, self._sends + 1
        value, key_bytes = orjson.dumps(record), key.encode()
        self._unacked[i] = (topic, key_bytes, value)
        self._sent_at[i] = time.monotonic()
        generation = self._generation
        while True:
            try:
                self._producer.produce(topic, value, key_bytes, on_delivery=self._acked(i))
                return
            except BufferError:  # the local queue is full (a broker outage): let it drain
                self._producer.poll(0.05)
                self._renew_if_stuck()
                if self._generation != generation:
                    return  # a new producer sent it, with the others unacknowledged

    def _acked(self, i: int) -> Callable[[Any, Any], None]:
        """The delivery report of send ``i`` by the current producer."""
        generation = self._generation

        def acked(err: Any, _msg: Any) -> None:
            if generation != self._generation:
                return  # a replaced producer's report
            if err is not None:
                self.errors.append(str(err))
            self._unacked.pop(i, None)
            self._sent_at.pop(i, None)

        return acked


# -- reading the topics back ------------------------------------------------------------


@dataclass(frozen=True)
class Seen(Generic[T]):
    """A record read back: where it is, when it was written (CreateTime, unix s)."""

    partition: int
    offset: int
    at: float
    record: T


class TopicTail(Generic[T]):
    """Every record of ``topic`` from its start, read in a thread as it arrives, as a
    downstream consumer sees them (``read_committed``: no aborted transaction), through
    ``read_topic`` following: a consumer that stops fetching after a broker restart is
    replaced (a plain one here once stopped, and a test took the learner for stuck)."""

    def __init__(self, bootstrap: str, topic: str, decode: Callable[[bytes], T]) -> None:
        self.topic = topic
        self.decode = decode
        self.seen: list[Seen[T]] = []
        self.errors: list[str] = []  # records that are not what the topic should hold
        self._stop = threading.Event()
        reading = read_topic(bootstrap, topic, follow=True, stop=self._stop)
        self._thread = threading.Thread(
            target=self._run, args=(reading,), name=f"tail-{topic}", daemon=True
        )
        self._thread.start()

    def _run(self, reading: Iterator[Any]) -> None:
        try:
            for msg in reading:
                try:
                    record = self.decode(msg.value())
                except ValueError as exc:  # pydantic's ValidationError is one
                    self.errors.append(f"{self.topic}@{msg.offset()}: {exc}")
                    continue
                _, ms = msg.timestamp()
                self.seen.append(Seen(msg.partition(), msg.offset(), ms / 1000, record))
        except KafkaIOError as exc:  # (the test's failure says so)
            self.errors.append(f"reading {self.topic} stopped: {exc}")

    def first(
        self,
        wanted: Callable[[Seen[T]], bool],
        timeout_s: float,
        since: int = 0,
        writer: Stage | None = None,
    ) -> Seen[T] | None:
        """The first record (from index ``since``) that is ``wanted``, waiting for it up
        to ``timeout_s`` (or until the stage that would write it has exited); None if
        none came."""
        deadline = time.monotonic() + timeout_s
        checked = since
        while True:
            upto = len(self.seen)
            for item in self.seen[checked:upto]:
                if wanted(item):
                    return item
            checked = upto
            if time.monotonic() >= deadline or (writer and writer.proc.poll() is not None):
                return None
            time.sleep(0.05)

    def wait(self, done: Callable[[list[Seen[T]]], bool], timeout_s: float) -> bool:
        """Wait until ``done(records so far)``; False if it never was."""
        deadline = time.monotonic() + timeout_s
        while not done(self.seen):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)
        return True

    def close(self, settle_s: float = 1.0) -> list[Seen[T]]:
        """Read ``settle_s`` longer (late duplicates), stop; every record read."""
        time.sleep(settle_s)
        self._stop.set()
        self._thread.join(30)
        return self.seen


def resumed(
    tail: TopicTail[Any],
    produced: Mapping[str, float],
    after: float,
    timeout_s: float,
    since: int,
    writer: Stage | None = None,
) -> Seen[Any] | None:
    """The first output (from index ``since``) for an input produced after ``after``,
    waiting up to ``timeout_s`` (while ``writer`` runs): a stage that serves again."""

    def wanted(s: Seen[Any]) -> bool:
        return produced.get(s.record.event_id, 0.0) > after

    return tail.first(wanted, timeout_s, since, writer)


def tails(
    bootstrap: str, topics: Topics
) -> tuple[TopicTail[Prediction], TopicTail[Evaluation], TopicTail[DeadLetter]]:
    """Tails of the predictions, evaluations and DLQ topics."""
    return (
        TopicTail(bootstrap, topics.predictions, Prediction.decode),
        TopicTail(bootstrap, topics.evaluations, Evaluation.decode),
        TopicTail(bootstrap, topics.dlq, DeadLetter.decode),
    )


def wait_drained(
    tails: tuple[TopicTail[Prediction], TopicTail[Evaluation], TopicTail[DeadLetter]],
    stages: Mapping[str, Stage],
    events: Collection[str],
    labels: Collection[str],
    timeout_s: tuple[float, float],
) -> None:
    """Wait (up to ``timeout_s``: predictions, then evaluations) until every event is
    predicted and every label evaluated or orphaned, or the stage that would write
    them has exited."""
    predictions, evaluations, letters = tails
    predictions.wait(
        lambda seen: (
            stages["scorer"].proc.poll() is not None
            or len({s.record.event_id for s in seen}) >= len(events)
        ),
        timeout_s[0],
    )
    evaluations.wait(
        lambda seen: (
            stages["learner"].proc.poll() is not None
            or len({s.record.event_id for s in seen} | set(orphaned_labels(letters.seen)))
            >= len(labels)
        ),
        timeout_s[1],
    )


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Each partition's high watermark: where a reader that read everything stands."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "chaos-offsets"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        }
    finally:
        consumer.close()


# -- killing stages ------------------------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL of a stage and its restart at once."""

    stage: str
    killed_at: float
    restarted_at: float
    was_alive: bool  # False: the stage had already exited by itself
    # when the new process's metrics server first answered: its start-up done (imports,
    # Kafka and Redis reached), before it loads models and joins its group. None: never
    up_at: float | None = None


S = TypeVar("S", bound=Stage)


def sigkill_and_restart(
    stage: str, running: S, restart: Callable[[], S], up_within_s: float = 60.0
) -> tuple[S, Kill]:
    """SIGKILL ``running``, wait for it to die, start it again at once with
    ``restart()`` and wait up to ``up_within_s`` for its metrics server to answer;
    the new process and what happened."""
    was_alive = running.proc.poll() is None
    killed_at = time.time()
    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait(10)
    again = restart()
    restarted_at = time.time()
    return again, Kill(stage, killed_at, restarted_at, was_alive, up(again, up_within_s))


def up(stage: Any, within_s: float) -> float | None:
    """When ``stage`` (conftest's ``StageProcess``) first answered on its metrics port
    (``test_failover.wait_up``), or None if it did not within ``within_s`` or exited."""
    from tests.integration.test_failover import wait_up

    try:
        return wait_up(stage, within_s)
    except AssertionError:
        return None


# -- a stack of one's own, to restart -------------------------------------------------


@dataclass
class Outage:
    """A server stopped and started again on the same port and directory."""

    server: str
    stopping_at: float  # SIGTERM sent
    stopped_at: float  # the process gone
    starting_at: float
    up_at: float  # ready again (Kafka lists topics, Redis answers PING)

    def __str__(self) -> str:
        return (
            f"{self.server} restarted: stop took {self.stopped_at - self.stopping_at:.1f} s, "
            f"down {self.up_at - self.stopped_at:.1f} s (start took "
            f"{self.up_at - self.starting_at:.1f} s)"
        )


@dataclass
class PrivateStack:
    """A Kafka broker and a redis-server of a test's own: restarting them on their
    ports and directories leaves the session's shared stack alone. Its addresses
    stay the same across restarts (``kafka_bootstrap``, ``redis_url``)."""

    settings: Settings
    root: Path
    kafka_ports: tuple[int, int] = field(default_factory=lambda: (free_port(), free_port()))
    redis_port: int = field(default_factory=free_port)
    kafka: ServerProcess | None = None
    redis: ServerProcess | None = None

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_ports[0]}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def logs(self) -> list[Path]:
        return [s.log for s in (self.kafka, self.redis) if s is not None]

    def start(self) -> None:
        """Start whichever server is not running."""
        if self.kafka is None or not self.kafka.alive():
            self.kafka = start_kafka(self.settings, self.root / "kafka", ports=self.kafka_ports)
        if self.redis is None or not self.redis.alive():
            self.redis = start_redis(self.root / "redis", port=self.redis_port)

    def stop(self) -> None:
        for server in (self.redis, self.kafka):
            if server is not None:
                server.stop()

    def restart_redis(self, down_s: float = 0.0, kill: bool = False) -> Outage:
        """SIGTERM redis-server (``kill``: SIGKILL, no last write of its append-only
        file), wait ``down_s``, start it again (as the stack does)."""
        assert self.redis is not None
        return self._restart(self.redis, down_s, kill)

    def restart_kafka(self, down_s: float = 0.0, kill: bool = False) -> Outage:
        """SIGTERM the broker (its clean shutdown; ``kill``: SIGKILL, none, its logs
        recovered when it starts), wait ``down_s``, start it again."""
        assert self.kafka is not None
        return self._restart(self.kafka, down_s, kill)

    def _restart(self, server: ServerProcess, down_s: float, kill: bool = False) -> Outage:
        stopping = time.time()
        if kill:
            os.kill(server.pid, signal.SIGKILL)
            while server.alive():
                time.sleep(0.05)
        else:
            server.stop()
        stopped = time.time()
        time.sleep(down_s)
        starting = time.time()
        self.start()
        return Outage(server.name, stopping, stopped, starting, time.time())


# -- what the topics say -------------------------------------------------------------


def by_event(seen: Iterable[Seen[Any]]) -> dict[str, list[Seen[Any]]]:
    """Records by event id, each list in the order written (partition, offset)."""
    out: dict[str, list[Seen[Any]]] = {}
    for item in sorted(seen, key=lambda s: (s.partition, s.offset)):
        out.setdefault(item.record.event_id, []).append(item)
    return out


def orphaned_labels(letters: Iterable[Seen[DeadLetter]]) -> dict[str, int]:
    """Event ids of the labels the learner sent to the DLQ as orphans, with how often."""
    out: Counter[str] = Counter()
    for s in letters:
        if s.record.stage == "learner" and s.record.error_kind == "orphan_label":
            payload = base64.b64decode(s.record.payload_b64 or "")
            out[orjson.loads(payload)["event_id"]] += 1
    return dict(out)


def where_lost(bootstrap: str, topics: Topics, lost: Collection[str], logs: Path) -> str:
    """For a failure's report: where events never predicted are on the events topic,
    any prediction of them that only a read_uncommitted reader sees (an aborted
    transaction's), where each partition's log starts, and where the scorers (the
    stage logs under ``logs``) began reading each partition."""
    wanted = set(list(lost)[:50])
    lines = []
    for topic in (topics.events, topics.predictions):
        consumer, partitions = groupless_reader(
            bootstrap, topic, "riverflow-diagnosis",
            **{"isolation.level": "read_uncommitted", "enable.partition.eof": True},
        )  # fmt: skip
        starts = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[0]
                  for p in partitions]  # fmt: skip
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found: list[str] = []
        ended: set[int] = set()
        deadline = time.monotonic() + 30
        while len(ended) < len(partitions) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is not None:
                    ended.add(msg.partition())
                    continue
                try:
                    event_id = orjson.loads(msg.value()).get("event_id")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if event_id in wanted:
                    found.append(f"{event_id}@{msg.partition()}:{msg.offset()}")
        consumer.close()
        lines.append(f"{topic} (read_uncommitted; logs start at {starts}): {found[:12]}")
    for path in sorted(logs.glob("*.log")):
        began = [line.split(": ", 1)[-1].strip() for line in path.read_text(errors="replace")
                 .splitlines() if "read from offset" in line]  # fmt: skip
        if began:
            lines.append(f"{path.name}: {began[:6]}")
    return "\n".join(lines)


@dataclass
class PredictionAudit:
    """Predictions against the events produced: lost, extra, inconsistent replays."""

    produced: Mapping[str, float]
    predictions: dict[str, list[Seen[Prediction]]]

    @property
    def lost(self) -> list[str]:
        return [e for e in self.produced if e not in self.predictions]

    @property
    def extras(self) -> list[tuple[Seen[Prediction], Seen[Prediction]]]:
        """(first, extra) for every prediction after the first of its event id."""
        return [(seen[0], s) for seen in self.predictions.values() for s in seen[1:]]

    @property
    def bad_replays(self) -> list[str]:
        """Extras that are not flagged replayed, or answer otherwise than the first."""
        bad = []
        for first, extra in self.extras:
            p, q = first.record, extra.record
            if not q.replayed or (q.probability, q.model, q.version) != (
                p.probability, p.model, p.version
            ):  # fmt: skip
                bad.append(
                    f"{q.event_id}: first p={p.probability} {p.model} v{p.version}, then "
                    f"p={q.probability} {q.model} v{q.version} replayed={q.replayed}"
                )
        return bad

    def recovery_s(self, kill: Kill) -> float | None:
        """Seconds from the restart to the first prediction of an event produced after
        the kill (None: there was none)."""
        after = [
            s.at
            for e, seen in self.predictions.items()
            if self.produced.get(e, 0.0) > kill.killed_at
            for s in seen
        ]
        return min(after) - kill.restarted_at if after else None


def window(t: float, starts: list[float]) -> int:
    """Index of the window [starts[i], starts[i+1]) holding ``t``; -1 before the first."""
    return sum(t >= start for start in starts) - 1


def scorer_kill_report(
    audit: PredictionAudit, kills: list[Kill]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Per scorer kill: seconds to recovery (and of them, to the new process's start-up
    done: ``Kill.up_at``); events lost (produced after the kill
    before it and up to this one: the killed scorer had read them); predictions
    duplicated (extras written from this restart to the next)."""
    killed = [k.killed_at for k in kills]
    restarted = [k.restarted_at for k in kills]
    lost = Counter(window(audit.produced[e], killed) + 1 for e in audit.lost)
    dups = Counter(window(extra.at, restarted) for _, extra in audit.extras)
    lines = [f"before the first kill: duplicated {dups[-1]}"]
    rows = []
    t0 = min(audit.produced.values())
    for i, k in enumerate(kills):
        rec = audit.recovery_s(k)
        up_s = None if k.up_at is None else k.up_at - k.restarted_at
        after_up = None if rec is None or up_s is None else rec - up_s
        rows.append({"recovery_s": rec, "up_s": up_s, "after_up_s": after_up,
                     "lost": lost[i], "duplicated": dups[i], "kill": k})  # fmt: skip
        shown = "never" if rec is None else f"{rec:.1f} s"
        started = "never up" if up_s is None else f"up in {up_s:.1f} s"
        alive = "" if k.was_alive else " (it had already exited by itself)"
        lines.append(
            f"scorer kill {i + 1} at +{k.killed_at - t0:.1f} s{alive}: {started}, predictions "
            f"resumed {shown} after the restart; lost {lost[i]}, duplicated {dups[i]}"
        )
    lines.append(f"events produced after the last kill: lost {lost[len(kills)]}")
    return lines, rows


def learner_kill_report(
    labels: Mapping[str, float], evaluations: dict[str, list[Seen[Evaluation]]], kills: list[Kill]
) -> list[str]:
    """Per learner kill: seconds from the restart to the first evaluation of a label
    produced after the kill, and the labels evaluated again (from this restart to the
    next; evaluations are at least once, the models must not be)."""
    restarted = [k.restarted_at for k in kills]
    again = Counter(window(s.at, restarted) for seen in evaluations.values() for s in seen[1:])
    t0 = min(labels.values()) if labels else 0.0
    lines = []
    for i, k in enumerate(kills):
        after = [
            s.at for e, seen in evaluations.items() if labels.get(e, 0.0) > k.killed_at
            for s in seen
        ]  # fmt: skip
        rec = f"{min(after) - k.restarted_at:.1f} s" if after else "never"
        alive = "" if k.was_alive else " (it had already exited by itself)"
        lines.append(
            f"learner kill {i + 1} at +{k.killed_at - t0:.1f} s{alive}: evaluations resumed "
            f"{rec} after the restart; labels evaluated again {again[i]}"
        )
    return lines


@dataclass
class LabelAudit:
    """Labels against what the learner did: evaluated, orphaned, in the final models."""

    labels: Mapping[str, float]
    scored: set[str]
    evaluations: dict[str, list[Seen[Evaluation]]]
    orphans: dict[str, int]
    checkpoint: LearnerCheckpoint | None
    published: dict[str, int]  # candidate -> labels_seen of the version the checkpoint names
    end: dict[int, int]  # labels topic: partition -> end offset

    @property
    def owed(self) -> set[str]:
        """Labels whose event was scored: each must be learned exactly once."""
        return {e for e in self.labels if e in self.scored}

    def failures(self) -> list[str]:
        owed, evaluated = self.owed, set(self.evaluations)
        out = []
        wrongly_orphaned = sorted(set(self.orphans) & owed)
        if wrongly_orphaned:
            out.append(f"{len(wrongly_orphaned)} labels of scored events went to the DLQ as "
                       f"orphan_label, e.g. {wrongly_orphaned[:3]}")  # fmt: skip
        both = sorted(set(self.orphans) & evaluated)
        if both:
            out.append(f"{len(both)} labels both evaluated and orphaned, e.g. {both[:3]}")
        missing = sorted(owed - evaluated - set(self.orphans))
        if missing:
            out.append(f"{len(missing)} labels neither evaluated nor in the DLQ, e.g. "
                       f"{missing[:3]}")  # fmt: skip
        unevaluated = sorted(owed - evaluated)
        if unevaluated:
            out.append(f"{len(unevaluated)} labels of scored events never evaluated")
        if self.checkpoint is None:
            out.append("no learner checkpoint after the clean stop")
            return out
        if self.checkpoint.labels_seen != len(owed):
            out.append(f"checkpoint labels_seen {self.checkpoint.labels_seen} != {len(owed)} "
                       f"labels whose event was scored "
                       f"({self.checkpoint.labels_seen - len(owed):+d})")  # fmt: skip
        wrong = {n: s for n, s in self.published.items() if s != len(owed)}
        if wrong:
            out.append(f"final published versions' labels_seen {wrong} != {len(owed)}")
        if self.checkpoint.pending:
            out.append(f"{len(self.checkpoint.pending)} labels still waiting in the final "
                       "checkpoint")  # fmt: skip
        if self.checkpoint.positions != self.end:
            out.append(f"checkpoint positions {self.checkpoint.positions} != the labels "
                       f"topic's end {self.end}")  # fmt: skip
        return out

    def summary(self) -> str:
        extra = sum(len(s) - 1 for s in self.evaluations.values())
        seen = None if self.checkpoint is None else self.checkpoint.labels_seen
        return (
            f"labels {len(self.labels)}, of scored events {len(self.owed)}; evaluated "
            f"{len(self.evaluations)} (+{extra} again); orphaned {len(self.orphans)}; "
            f"checkpoint labels_seen {seen}; published labels_seen {self.published}"
        )


def final_models(redis_url: str, namespace: str) -> tuple[LearnerCheckpoint | None, dict[str, int]]:
    """The learner's checkpoint and the labels_seen of each version it names."""
    registry = RedisRegistry(redis.Redis.from_url(redis_url), namespace, SIGNING_KEY)
    saved = registry.checkpoint()
    if saved is None:
        return None, {}
    published = {
        name: int(registry.meta(name, v).get("labels_seen", -1))
        for name, v in saved.versions.items()
        if v
    }
    return saved, published


def label_audit(
    bootstrap: str,
    redis_url: str,
    namespace: str,
    labels: Mapping[str, float],
    scored: Iterable[str],
    evaluations: list[Seen[Evaluation]],
    letters: list[Seen[DeadLetter]],
) -> LabelAudit:
    saved, published = final_models(redis_url, namespace)
    return LabelAudit(
        labels, set(scored), by_event(evaluations), orphaned_labels(letters), saved, published,
        end_offsets(bootstrap, Topics(namespace).labels),
    )  # fmt: skip


def stop_cleanly(*stages: Stage, timeout_s: float = 60.0) -> list[str]:
    """SIGTERM each stage still running and wait for it; failures: one that exited
    badly or hung (one that had exited before is ``dead``'s to report)."""
    running = [s for s in stages if s.proc.poll() is None]
    for s in running:
        s.proc.send_signal(signal.SIGTERM)
    out = []
    for s in running:
        try:
            code = s.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            out.append(f"{s.proc.args[-1]} did not stop within {timeout_s} s of SIGTERM")
            continue
        if code != 0:
            out.append(f"{s.proc.args[-1]} exited with {code} at the clean stop")
    return out


def dead(stages: Mapping[str, Stage]) -> list[str]:
    """The stages that have exited, with their exit codes and the last line each logged
    (librdkafka's aside: a traceback's last line, or the error a stage exits on)."""
    return [f"{name} exited ({s.proc.returncode}): {last_line(s.log)}"
            for name, s in stages.items() if s.proc.poll() is not None]  # fmt: skip


def last_line(log: Path) -> str:
    """The last line of a stage's log that is not librdkafka's ("" if none)."""
    if not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    return next((line for line in reversed(lines) if line and not line.startswith("%")), "")
