"""`riverflow tail` (and ``read_topic``, what it reads with) on the real broker.
Following, as an operator runs it into a pipe: what the topic holds, then what comes
while it follows, from every partition, a record that is not JSON shown as bytes, not
fatal. Not following: the whole topic as it was, however slow the fetches. With
``--last N``: the topic's last N, oldest first across its partitions, then (following)
what comes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import orjson
from confluent_kafka import Producer

from riverflow.streams.kafka_io import (
    client_config,
    ensure_topics,
    produce_all,
    producer,
    read_topic,
)
from riverflow.tools.stack import Endpoints
from tests.helpers import within

HOSTILE = b"\xff\x00 not json"


@contextlib.contextmanager
def following(
    command: list[str], env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``command`` running, and the lines it has printed so far (read by a thread as
    they come); killed at the end if it has not exited."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)


def test_riverflow_tail_follow_prints_each_record_as_it_comes_into_a_pipe(
    stack: Endpoints,
) -> None:
    topic = f"tail-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], partitions=3)
    prod = producer(stack.kafka_bootstrap)
    produce_all(prod, [(topic, b"k%d" % i, orjson.dumps({"n": i})) for i in range(6)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a plain pipe
    env |= {"RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "RIVERFLOW_REDIS_URL": stack.redis_url}  # fmt: skip
    command = [sys.executable, "-m", "riverflow.cli", "tail", topic, "--follow", "-n", "12"]
    with following(command, env) as (proc, lines):
        # what the topic held, printed while tail goes on following
        assert within(60, lambda: len(lines) >= 6), (lines, proc.poll())
        assert proc.poll() is None
        later = [(topic, b"k%d" % i, orjson.dumps({"n": i})) for i in range(6, 11)]
        produce_all(prod, [*later, (topic, b"k-bad", HOSTILE)])
        assert proc.wait(60) == 0, proc.stderr and proc.stderr.read()
    assert len(lines) == 12
    shown: dict[int, list[int]] = {}
    values = []
    for line in lines:
        where, text = line.rstrip("\n").split(" ", 1)
        partition, offset = (int(x) for x in where.split(":"))
        shown.setdefault(partition, []).append(offset)
        values.append(text)
    assert all(offsets == sorted(offsets) for offsets in shown.values())
    assert sorted(orjson.loads(v)["n"] for v in values if v != repr(HOSTILE)) == list(range(11))
    assert values.count(repr(HOSTILE)) == 1


def test_riverflow_tail_reads_a_transactional_topic_to_its_committed_end_and_stops(
    stack: Endpoints,
) -> None:
    """Without --follow, as the scorer writes predictions under exactly-once: what was
    committed, in full, and then it stops, although the topic ends in transaction
    markers and a transaction is still open (its records are not waited for)."""
    topic = f"tail-tx-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], partitions=3)
    prod = producer(stack.kafka_bootstrap, **{"transactional.id": f"tx-{topic}"})
    prod.init_transactions()
    for batch in range(3):
        prod.begin_transaction()
        for i in range(batch * 400, batch * 400 + 400):
            prod.produce(topic, key=b"k%d" % i, value=orjson.dumps({"n": i}))
        prod.commit_transaction()
    prod.begin_transaction()
    prod.produce(topic, key=b"open", value=orjson.dumps({"n": -1}))
    prod.flush()
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": stack.redis_url}  # fmt: skip
    try:
        done = subprocess.run([sys.executable, "-m", "riverflow.cli", "tail", topic],
                              env=env, capture_output=True, text=True, timeout=50)  # fmt: skip
    finally:
        prod.abort_transaction()
    assert done.returncode == 0, done.stderr
    shown = [orjson.loads(line.split(" ", 1)[1])["n"] for line in done.stdout.splitlines()]
    assert sorted(shown) == list(range(1200))


def test_read_topic_with_no_idle_time_still_reads_the_whole_topic(stack: Endpoints) -> None:
    """``idle_s`` is how long to wait for more once at the end, not for the first fetch:
    with none, every message the topic held is still read (before, the first empty
    poll ended the read)."""
    topic = f"read-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], partitions=3)
    produce_all(producer(stack.kafka_bootstrap),
                [(topic, b"k%d" % i, b"%d" % i) for i in range(3000)])  # fmt: skip
    got = sorted(int(m.value()) for m in read_topic(stack.kafka_bootstrap, topic, idle_s=0.0))
    assert got == list(range(3000))


def stamped(stack: Endpoints, topic: str, ns: range, at_ms: int) -> None:
    """``{"n": n}`` for each n, spread over the topic's partitions by key, each stamped
    ``at_ms + n`` (so the newest by timestamp is not the last of any one partition)."""
    prod = Producer(client_config(stack.kafka_bootstrap))
    for n in ns:
        prod.produce(topic, key=b"k%d" % (n * 7), value=orjson.dumps({"n": n}), timestamp=at_ms + n)
    assert prod.flush(30) == 0


def tail_command(stack: Endpoints, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env |= {"RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "RIVERFLOW_REDIS_URL": stack.redis_url}  # fmt: skip
    return [sys.executable, "-m", "riverflow.cli", "tail", *args], env


def numbers(lines: list[str]) -> list[int]:
    return [orjson.loads(line.rstrip("\n").split(" ", 1)[1])["n"] for line in lines]


def test_riverflow_tail_last_prints_the_newest_messages_oldest_first_then_follows(
    stack: Endpoints,
) -> None:
    topic = f"tail-last-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], partitions=3)
    at_ms = int(time.time() * 1000) - 60_000
    stamped(stack, topic, range(30), at_ms)
    command, env = tail_command(stack, topic, "--last", "5")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # the five newest of the whole topic, not the first ones nor the last of a partition
    assert numbers(done.stdout.splitlines()) == [25, 26, 27, 28, 29]

    # following: those, then what comes, until --limit
    command, env = tail_command(stack, topic, "--last", "3", "--follow", "-n", "6")
    with following(command, env) as (proc, lines):
        assert within(60, lambda: len(lines) >= 3), (lines, proc.poll())
        stamped(stack, topic, range(30, 33), at_ms)
        assert proc.wait(60) == 0, proc.stderr and proc.stderr.read()
    assert numbers(lines[:3]) == [27, 28, 29]
    assert sorted(numbers(lines[3:])) == [30, 31, 32]

    # a topic with fewer messages than asked: all of them; an empty one: nothing
    empty = f"tail-empty-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [empty], partitions=2)
    command, env = tail_command(stack, empty, "--last", "5")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    stamped(stack, empty, range(2), at_ms)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and numbers(done.stdout.splitlines()) == [0, 1], done.stderr
