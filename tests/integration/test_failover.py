"""Failover on the real broker: a SIGKILLed scorer's partitions are served again within
10 s of its restart (static membership: the same group.instance.id takes them back
without waiting out the session), and within 10 s of the kill when it does not come
back and a second scorer runs (the session timeout, 6 s by default). No prediction is
lost; every extra one is a replay, flagged ``replayed``.

The 10 s bounds are the functional requirement (issue 13), with the margin of the
default 6 s session; they are not a benchmark."""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.confluent_host import ConfluentHost, ConsumerState
from riverflow.streams.contracts import Prediction
from riverflow.streams.hosting import HostSettings
from riverflow.streams.kafka_io import ensure_topics, producer
from riverflow.tools.generator import FraudStreamConfig, transactions
from riverflow.tools.stack import Endpoints
from tests.integration.conftest import StageFactory, StageProcess

RATE = 200  # events/s
BOUND_S = 10.0


class PacedEvents:
    """Sends fraud events at ``RATE`` per second from a thread; remembers each event's
    partition (from its delivery report)."""

    def __init__(self, bootstrap: str, topic: str, n: int) -> None:
        self.events = [e for e, _ in transactions(n, FraudStreamConfig(cards=500, seed=13))]
        self.partition: dict[str, int] = {}
        self._prod = producer(bootstrap, **{"linger.ms": 1})
        self._topic = topic
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        for i, event in enumerate(self.events):
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)

            def delivered(err: Any, msg: Any, event_id: str = event["event_id"]) -> None:
                assert err is None, err
                self.partition[event_id] = msg.partition()

            self._prod.produce(
                self._topic, orjson.dumps(event), event["card_id"].encode(), on_delivery=delivered
            )
            self._prod.poll(0)
        self._prod.flush(30)

    def join(self) -> None:
        self._thread.join()

    @property
    def ids(self) -> set[str]:
        return {e["event_id"] for e in self.events}


class PredictionWatch:
    """Reads every prediction as it comes (``read_committed``: what a transactional
    reader sees), with the time it arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.arrivals: list[tuple[float, Prediction]] = []
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "tests-watch",
             "enable.auto.commit": False, "isolation.level": "read_committed"}
        )  # fmt: skip
        meta = None
        while meta is None or not meta.partitions:
            meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.1):
                assert not msg.error(), msg.error()
                self.arrivals.append((time.monotonic(), Prediction.decode(msg.value())))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()

    def predicted(self) -> set[str]:
        return {p.event_id for _, p in list(self.arrivals)}

    def wait_for(self, ids: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ids <= self.predicted():
            assert time.monotonic() < deadline, f"{len(ids - self.predicted())} never predicted"
            time.sleep(0.2)

    def wait_for_count(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.arrivals) < n:
            assert time.monotonic() < deadline, f"only {len(self.arrivals)} predictions"
            time.sleep(0.1)

    def served_again(self, since: float, partitions: dict[str, int], wait_s: float = 30) -> float:
        """Seconds from ``since`` (wall clock) until every input partition had an event
        scored again (by the predictions' ``scored_at``; waits up to ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        while True:
            first: dict[int, float] = {}
            for _, p in list(self.arrivals):
                part, at = partitions.get(p.event_id), p.scored_at
                if at > since and part is not None:
                    first[part] = min(first.get(part, at), at)
            if len(first) == len(set(partitions.values())):
                return max(first.values()) - since
            assert time.monotonic() < deadline, f"partitions served again: {first}"
            time.sleep(0.1)

    def check_none_lost(self, ids: set[str]) -> Counter[str]:
        """Every event predicted; extra predictions of an id are replays."""
        counts = Counter(p.event_id for _, p in self.arrivals)
        assert ids <= set(counts)
        seen: set[str] = set()
        for _, p in self.arrivals:
            if p.event_id in seen:
                assert p.replayed, f"a second prediction of {p.event_id} not flagged replayed"
            seen.add(p.event_id)
        return counts


def wait_up(stage: StageProcess, timeout_s: float = 60) -> float:
    """When the stage's process answers on its metrics port (imports done, connecting)."""
    deadline = time.monotonic() + timeout_s
    while stage.consumed() < 0:
        assert stage.proc.poll() is None, "the stage exited"
        assert time.monotonic() < deadline, "the stage never came up"
        time.sleep(0.05)
    return time.time()


def kill(stage: StageProcess) -> float:
    stage.proc.send_signal(signal.SIGKILL)
    stage.proc.wait(10)
    return time.time()


def test_a_killed_scorer_restarted_serves_its_partitions_within_ten_seconds(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory
) -> None:
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    watch = PredictionWatch(stack.kafka_bootstrap, topics.predictions)
    scorer = start_stage("scorer", partitions=3, instance_id="scorer-a")
    events = PacedEvents(stack.kafka_bootstrap, topics.events, RATE * 25)
    try:
        wait_up(scorer)
        watch.wait_for_count(RATE * 3)
        time.sleep(2)  # serving steadily
        kill(scorer)
        time.sleep(2)
        restarted_at = time.time()
        up_at = wait_up(start_stage("scorer", partitions=3, instance_id="scorer-a"))
        # from the process being up: its start (imports) took 2-10 s on the shared 2-core
        # machine, depending on what else ran; that is Python, not failover
        served = watch.served_again(up_at, events.partition)
        assert served < BOUND_S, f"partitions served again {served:.1f} s after the restart"
        events.join()
        watch.wait_for(events.ids, 60)
        time.sleep(1)  # duplicates, if any, would come now
        counts = watch.check_none_lost(events.ids)
    finally:
        watch.close()
    print(f"served again {served:.1f} s after the restarted process was up "
          f"({up_at - restarted_at:.1f} s after its start); "
          f"{sum(c > 1 for c in counts.values())} events replayed")  # fmt: skip


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_killed_scorer_not_restarted_its_partitions_move_within_ten_seconds(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory, guarantee: str
) -> None:
    # exactly once: what a read_committed reader sees, after the broker aborted the
    # dead scorer's open transaction. A kill between its offsets and its commit holds
    # the partitions' offsets until that abort: transaction_timeout_s (5 s by default)
    # plus the broker's cleanup interval (1 s on our stack; the next test)
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    watch = PredictionWatch(stack.kafka_bootstrap, topics.predictions)
    settings = {"processing_guarantee": guarantee}
    first = start_stage("scorer", partitions=3, instance_id="scorer-a", **settings)
    second = start_stage("scorer", partitions=3, instance_id="scorer-b", **settings)
    events = PacedEvents(stack.kafka_bootstrap, topics.events, RATE * 25)
    try:
        # both serve: each has consumed events lately (the group has balanced)
        deadline = time.monotonic() + 40
        while True:
            a0, b0 = first.consumed(), second.consumed()
            time.sleep(1)
            a1, b1 = first.consumed(), second.consumed()
            if a1 > a0 >= 0 and b1 > b0 >= 0:
                break
            assert time.monotonic() < deadline, "the two scorers never both consumed"
        killed_at = kill(first)
        served = watch.served_again(killed_at, events.partition)
        assert served < BOUND_S, f"partitions served again {served:.1f} s after the kill"
        events.join()
        watch.wait_for(events.ids, 60)
        time.sleep(1)
        counts = watch.check_none_lost(events.ids)
    finally:
        watch.close()
    print(f"{guarantee}: served again {served:.1f} s after the kill; "
          f"{sum(c > 1 for c in counts.values())} events replayed")  # fmt: skip


def test_offsets_a_dead_scorer_left_in_its_transaction_hold_the_next_member_under_ten_seconds(
    stack: Endpoints,
) -> None:
    # the worst moment to kill an exactly-once scorer: its offsets are in the
    # transaction, the commit not yet sent. The member taking its partitions reads their
    # committed offsets only once the broker aborted that transaction (KIP-447): the
    # default transaction_timeout_s, plus the cleanup interval of the stack we start
    topic, group = f"held-{uuid.uuid4().hex[:8]}", f"held-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic, f"{topic}-out"], partitions=1)
    feed = producer(stack.kafka_bootstrap)
    for i in range(20):
        feed.produce(topic, str(i).encode())
    assert feed.flush(30) == 0
    group_config = {"bootstrap.servers": stack.kafka_bootstrap, "group.id": group,
                    "enable.auto.commit": False, "auto.offset.reset": "earliest"}  # fmt: skip
    dying = Consumer(group_config)
    dying.subscribe([topic])
    deadline = time.monotonic() + 30
    while (msg := dying.poll(0.5)) is None or msg.error():
        assert time.monotonic() < deadline, "the dying member never read"
    timeout_ms = int(Settings().transaction_timeout_s * 1000)
    txn = producer(stack.kafka_bootstrap, **{"transactional.id": group,
                                            "transaction.timeout.ms": timeout_ms})  # fmt: skip
    txn.init_transactions(30)
    txn.begin_transaction()  # a committed transaction's offsets: 5
    txn.send_offsets_to_transaction([TopicPartition(topic, 0, 5)],
                                    dying.consumer_group_metadata(), 30)  # fmt: skip
    txn.commit_transaction(30)
    txn.begin_transaction()  # then one that is never committed
    txn.produce(f"{topic}-out", b"lost with its transaction")
    txn.send_offsets_to_transaction([TopicPartition(topic, 0, 15)],
                                    dying.consumer_group_metadata(), 30)  # fmt: skip
    held_at = time.monotonic()  # the producer is left as a SIGKILL would leave it
    dying.close()
    member = Consumer({**group_config, "isolation.level": "read_committed"})
    try:
        member.assign([TopicPartition(topic, 0)])
        while (msg := member.poll(0.2)) is None or msg.error():
            assert time.monotonic() - held_at < 60, "the next member never read"
        waited = time.monotonic() - held_at
    finally:
        member.close()
    print(f"the next member read {waited:.1f} s after the transaction was left open")
    assert msg.offset() == 5, "the aborted transaction's offsets were taken"
    assert waited < BOUND_S, (
        f"the next member read {waited:.1f} s after the dead scorer's transaction took "
        f"its offsets (transaction_timeout_s {timeout_ms / 1000:g} s)"
    )


def test_the_host_reads_a_real_consumers_statistics(stack: Endpoints) -> None:
    # the host tells a broker outage and a group coordinator out of reach from them
    # (ConsumerState): the fields it reads are those this librdkafka writes
    topic = f"stats-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], 2)
    seen: list[str] = []
    member = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"g-{topic}",
                       "group.instance.id": "stats-1", "statistics.interval.ms": 200,
                       "stats_cb": seen.append})  # fmt: skip
    member.subscribe([topic])
    deadline = time.monotonic() + 30
    while not (seen and ConsumerState.parse(seen[-1]) == ConsumerState(True, "")):
        assert time.monotonic() < deadline, seen[-1:] or "no statistics"
        member.poll(0.2)
    assert member.assignment()  # in the group indeed
    member.close()
    plain = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"h-{topic}",
                      "statistics.interval.ms": 200, "stats_cb": seen.append})  # fmt: skip
    plain.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    seen.clear()
    while not (seen and ConsumerState.parse(seen[-1]).brokers_up):
        assert time.monotonic() < deadline + 30, seen[-1:] or "no statistics"
        plain.poll(0.2)
    assert ConsumerState.parse(seen[-1]).coordinator in (None, "")  # assigned: no group wait
    plain.close()


class _Idle:
    stage = "idle"

    def process(self, batch: Any) -> list[Any]:
        return []


def test_the_host_asks_a_new_client_whether_kafka_is_back(stack: Endpoints) -> None:
    # a consumer that reaches no broker is replaced only once a new client reaches one
    # (ConfluentHost._check_deaf): that client is made from the host's own settings
    topic = f"deaf-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], 1)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
    for bootstrap, reached in ((stack.kafka_bootstrap, True), (nowhere, False)):
        host = ConfluentHost(_Idle(), topic, HostSettings(bootstrap, f"g-{topic}", 10,
                                                          instance_id="deaf-1"))  # fmt: skip
        try:
            started = time.monotonic()
            assert host._fresh_client_reaches_kafka() is reached, bootstrap
            assert time.monotonic() - started < 10  # a probe is bounded (PROBE_S, close)
        finally:
            host.consumer.close()
            host.producer.flush(1)
