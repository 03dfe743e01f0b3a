"""A ``TopicFollower`` (and a ``TrailingReader``, and ``read_topic``) whose
consumer stops fetching gets a new one, from where it had read to; so does a
``GroupProgress`` whose consumer is refused for ``STALL_S`` on end. Seen on a real
broker restarted under load: the learner's follower of the predictions topic was
told its partitions were unknown, then fetched nothing while the topic grew, and
the learner's labels waited for their events until the test gave up. The consumers
here are fakes: the stall is librdkafka's and rare, and what is tested is what the
readers do about it."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException

from riverflow.streams import kafka_io, trailing
from riverflow.streams.contracts import Message
from riverflow.streams.kafka_io import TopicFollower, read_topic
from riverflow.streams.trailing import TrailingReader
from tests.helpers import within

NOWHERE = "127.0.0.1:1"  # never connected to: every consumer here is a fake


class Msg:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "t.predictions"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"p%d" % self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000 + self._offset)


class Consumer:
    """One partition whose end is ``topic.end``; gives what was written from where it
    was assigned, unless ``deaf``; ``unknown``: its watermarks cannot be read."""

    def __init__(self, topic: Topic, deaf: bool = False, unknown: bool = False) -> None:
        self.topic, self.deaf, self.unknown = topic, deaf, unknown
        self.at = 0
        self.assigned: list[int] = []
        self.closed = False

    def list_topics(self, timeout: float) -> Any:
        return type("Meta", (), {"cluster_id": "c1"})()

    def assign(self, tps: Sequence[Any]) -> None:
        self.assigned = [tp.offset for tp in tps]
        self.at = max(0, tps[0].offset)  # a logical start (the beginning) is 0 here

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        if self.unknown:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, "Unknown partition"))
        return 0, self.topic.end

    def consume(self, n: int, timeout: float) -> list[Msg]:
        if self.deaf or self.at >= self.topic.end or self.topic.late > 0:
            self.topic.late -= 1
            return []
        out = [Msg(o) for o in range(self.at, min(self.topic.end, self.at + n))]
        self.at += len(out)
        return out

    def close(self) -> None:
        self.closed = True

    def pause(self, tps: Sequence[Any]) -> None:
        self.deaf = True

    def resume(self, tps: Sequence[Any]) -> None:
        self.deaf = False


class Topic:
    """What the fake broker holds, and the consumers made for it, in order."""

    def __init__(self, end: int) -> None:
        self.end = end
        self.late = 0  # consume calls that come back empty although behind
        self.made: list[Consumer] = []
        self.next: list[dict[str, bool]] = []  # how the next consumers behave

    def reader(self, bootstrap: str, topic: str, group: str, **config: Any) -> Any:
        consumer = Consumer(self, **(self.next.pop(0) if self.next else {}))
        self.made.append(consumer)
        return consumer, [0]


class Index:
    def __init__(self) -> None:
        self.offsets: list[int] = []

    def add(self, messages: Sequence[Message]) -> None:
        self.offsets += [m.offset for m in messages]

    def positions(self, source: str) -> dict[int, int]:
        return {0: 0}


@pytest.fixture
def topic(monkeypatch: pytest.MonkeyPatch) -> Topic:
    made = Topic(end=5)
    monkeypatch.setattr(kafka_io, "groupless_reader", made.reader)
    monkeypatch.setattr(trailing, "groupless_reader", made.reader)
    monkeypatch.setattr(kafka_io, "STALL_S", 0.3)
    return made


def test_a_consumer_behind_that_reads_nothing_is_replaced_from_where_it_read_to(
    topic: Topic,
) -> None:
    index = Index()
    follower = TopicFollower(NOWHERE, "t.predictions", index, since_s=60)
    assert follower.caught_up()  # the first five, read by the first consumer
    topic.made[0].deaf, topic.end = True, 9  # it stops fetching; four more are written
    assert not follower.caught_up()
    assert within(3, follower.caught_up), "never replaced"
    first, second = topic.made
    assert first.closed and second.assigned == [5]
    assert index.offsets == list(range(9))  # each once, in order


def test_a_consumer_that_calls_its_partition_unknown_is_replaced_at_once(topic: Topic) -> None:
    index = Index()
    topic.next = [{"unknown": True}]
    follower = TopicFollower(NOWHERE, "t.predictions", index, since_s=60)
    assert not follower.caught_up()  # the end unknown: replaced now, not after STALL_S
    assert len(topic.made) == 2 and follower.caught_up()
    assert index.offsets == list(range(5))


def test_a_quiet_topic_then_a_slow_fetch_is_not_a_stall(topic: Topic) -> None:
    index = Index()
    follower = TopicFollower(NOWHERE, "t.predictions", index, since_s=60)
    assert follower.caught_up()
    time.sleep(0.4)  # quiet for longer than STALL_S: nothing to read, nothing heard
    topic.end, topic.late = 6, 1  # one more written; the first fetch comes back empty
    assert not follower.caught_up()
    assert follower.caught_up()
    assert len(topic.made) == 1 and index.offsets == list(range(6))


def test_following_alone_finds_a_stalled_consumer(topic: Topic) -> None:
    """The learner asks ``caught_up`` only when a label is due to be orphaned, which
    waits for the scorer's progress; ``follow``, called every batch and tick, looks
    for itself."""
    index = Index()
    follower = TopicFollower(NOWHERE, "t.predictions", index, since_s=60)
    follower.follow()
    topic.made[0].deaf, topic.end = True, 8
    deadline = time.monotonic() + 3
    while len(index.offsets) < 8 and time.monotonic() < deadline:
        follower.follow()
        time.sleep(0.05)
    assert len(topic.made) == 2 and index.offsets == list(range(8))


def test_a_trailing_reader_whose_consumer_stalls_reads_on_with_a_new_one(topic: Topic) -> None:
    """The label timeouts' reader of the predictions: stalled, no timeout would fall
    due again."""
    reader = TrailingReader(NOWHERE, "t.predictions", since_s=60, buffered=100)
    assert reader.start({0: 0}) == {0: 0}
    assert [m.offset for m in reader.fetch({0: 0})[0]] == list(range(5))
    topic.made[0].deaf, topic.end = True, 9
    deadline = time.monotonic() + 3
    while len(reader.fetch({0: 3})[0]) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(topic.made) == 2 and topic.made[1].assigned == [5]
    assert [m.offset for m in reader.fetch({0: 3})[0]] == list(range(3, 9))


def test_read_topic_following_a_stalled_consumer_reads_on_with_a_new_one(topic: Topic) -> None:
    """``riverflow tail --follow`` and the simulated users read this way."""
    seen: list[int] = []
    stop = threading.Event()

    def tail() -> None:
        for msg in read_topic(NOWHERE, "t.predictions", follow=True, stop=stop):
            seen.append(msg.offset())

    reader = threading.Thread(target=tail, daemon=True)
    reader.start()
    assert within(3, lambda: len(seen) == 5)
    topic.made[0].deaf, topic.end = True, 9
    assert within(5, lambda: len(seen) == 9), seen
    stop.set()
    reader.join(5)
    assert seen == list(range(9)) and len(topic.made) == 2 and topic.made[1].assigned == [5]


def test_read_topic_short_of_its_end_reads_on_through_a_pause_longer_than_idle(
    topic: Topic,
) -> None:
    """A fetch slower than ``idle_s`` is not the end of the topic: the read stops
    only once past the end the topic had when it began (a test of the recsys pipeline
    missed a request so on a loaded machine; ``riverflow forget`` would miss events)."""
    topic.late = 20  # 20 polls come back empty, behind
    assert [m.offset() for m in read_topic(NOWHERE, "t.predictions", idle_s=0.0)] == [0, 1, 2, 3, 4]


def test_read_topic_that_nothing_reaches_short_of_its_end_says_so(
    topic: Topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a silent short read: an error naming the topic and how much is missing."""
    monkeypatch.setattr(kafka_io, "BEHIND_S", 0.5)
    topic.next = [{"deaf": True}]
    with pytest.raises(kafka_io.KafkaIOError, match=r"t\.predictions.*5 messages short"):
        list(read_topic(NOWHERE, "t.predictions", idle_s=0.0))


class ProgressConsumer:
    """What ``GroupProgress`` asks of a consumer: one partition at offset 3, all of it
    committed; ``stuck``: every call refused, as a client stuck after a broker restart."""

    made: ClassVar[list[ProgressConsumer]] = []
    stuck_next: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any]) -> None:
        self.stuck, ProgressConsumer.stuck_next = ProgressConsumer.stuck_next, False
        self.closed = False
        ProgressConsumer.made.append(self)

    def _answer(self) -> None:
        if self.stuck:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Local: Broker transport"))

    def list_topics(self, topic: str, timeout: float) -> Any:
        self._answer()
        meta = type("T", (), {"partitions": {0: None}, "error": None})()
        return type("Meta", (), {"topics": {topic: meta}})()

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        self._answer()
        return 0, 3

    def committed(self, tps: Sequence[Any], timeout: float) -> list[Any]:
        self._answer()
        return [type("TP", (), {"partition": tp.partition, "offset": 3})() for tp in tps]

    def close(self) -> None:
        self.closed = True


def test_group_progress_whose_consumer_stays_refused_gets_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Label timeouts fall due by ``GroupProgress``: a consumer of it stuck after a
    broker restart would hold every timeout for good. Errors for ``STALL_S`` on end
    bring a new consumer, and progress moves on with it."""
    monkeypatch.setattr(kafka_io, "Consumer", ProgressConsumer)
    monkeypatch.setattr(kafka_io, "STALL_S", 15.0)
    ProgressConsumer.made, ProgressConsumer.stuck_next = [], True
    now = [0.0]
    progress = kafka_io.GroupProgress(NOWHERE, "g", "t.events", poll_s=0, clock=lambda: now[0])
    stuck = progress.consumer
    for now[0] in (0.0, 5.0, 14.0):
        assert progress() is None
    assert progress.consumer is stuck  # refused for 14 s: kept
    now[0] = 15.0
    assert progress() is None
    assert progress.consumer is not stuck and len(ProgressConsumer.made) == 2
    assert within(5, lambda: stuck.closed)
    for now[0] in (16.0, 17.0, 18.0):  # Kafka answers: settles, probes, confirms
        through = progress()
    assert through == 17.0  # what was produced before 17 s is committed


def test_group_progress_not_asked_for_a_while_settles_before_it_moves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A learner held up through a broker outage (blocked on its writes) never asks
    ``GroupProgress`` while Kafka is away, so no call fails. The labels producers held
    meanwhile reach the topic only after they reconnect: asked again after
    ``QUIET_GAP_S``, progress settles (``settle_s``) before it passes the gap, as after
    an error. Before, it moved on at once and the held clicks' timeouts fell due."""
    monkeypatch.setattr(kafka_io, "Consumer", ProgressConsumer)
    ProgressConsumer.made, ProgressConsumer.stuck_next = [], False
    now = [0.0]
    progress = kafka_io.GroupProgress(
        NOWHERE, "g", "t.events", poll_s=0, clock=lambda: now[0], settle_s=8.0
    )
    for now[0] in (0.0, 1.0):  # probes, confirms
        through = progress()
    assert through == 0.0
    back = now[0] = 16.0  # held up: not asked for 15 s (QUIET_GAP_S is 5)
    assert progress() == 1.0  # what was probed before the gap, confirmed
    for now[0] in (back + 1, back + 4, back + 7):
        assert progress() == 1.0  # settling: nothing past the gap yet
    for now[0] in (back + 9, back + 10):  # settled: probes, confirms
        through = progress()
    assert through == back + 9


def test_group_progress_asked_often_moves_on_without_settling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked every second (a learner's ticks), progress moves on a call after each
    probe: no settle without an error or a gap."""
    monkeypatch.setattr(kafka_io, "Consumer", ProgressConsumer)
    ProgressConsumer.made, ProgressConsumer.stuck_next = [], False
    now = [0.0]
    progress = kafka_io.GroupProgress(
        NOWHERE, "g", "t.events", poll_s=0, clock=lambda: now[0], settle_s=8.0
    )
    seen = []
    for now[0] in (0.0, 1.0, 2.0, 3.0, 4.0):
        seen.append(progress())
    assert seen == [None, 0.0, 1.0, 2.0, 3.0]


def test_a_trailing_reader_paused_on_a_full_buffer_is_not_a_stall_when_it_resumes(
    topic: Topic,
) -> None:
    """Trailing a label timeout behind, the reader's buffer fills and its partition is
    paused while the caller catches up. A pause longer than ``STALL_S`` is not silence:
    the first fetch after the resume may come back empty (the broker answers later)
    and the consumer must not be replaced for it. Seen in a 25-minute recsys run: the
    timeouts' reader was renewed "39,859 messages behind and nothing read for 18 s"."""
    topic.end = 20
    reader = TrailingReader(NOWHERE, "t.predictions", since_s=60, buffered=4)
    reader.start({0: 0})
    read: list[int] = []
    at = 0
    for _ in range(3):  # full, paused longer than STALL_S, drained, resumed
        buffered = [m.offset for m in reader.fetch({0: at})[0]]
        read += [o for o in buffered if o not in read]
        time.sleep(0.4)
        at = buffered[-1]  # the caller passes all but the last: the buffer is resumed
        topic.late = 1  # whose first fetch comes back empty
        reader.fetch({0: at})
    read += [m.offset for m in reader.fetch({0: at})[0] if m.offset not in read]
    assert len(topic.made) == 1, "a paused reader was taken for a stalled one"
    assert read == list(range(len(read))) and len(read) >= 8
